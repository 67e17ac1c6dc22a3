//! The threads of a batch job and what flows between them; see the
//! [module docs](super) for the picture.
//!
//! Why it cannot deadlock or grow: every chunk takes a permit (a slot in a
//! bounded channel) before the reader sends it and gives it back only once
//! written, so at most `permits` chunks exist. When the writer fails it
//! drops its ends of the channels: the reader's next permit fails and it
//! stops, and the workers, whose results no one takes any more, keep
//! draining the work queue without processing so the reader is never left
//! blocked on a full queue.

use std::collections::BTreeMap;
use std::io::{BufWriter, Read, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::Mutex;
use std::time::Instant;

use crate::model::Model;
use crate::tensor::{TensorData, TensorValues};

use super::input::{empty_values, is_number_or_empty, split_csv, Chunk, InputLayout, LineReader, LineSpan, Next, RowFormat};
use super::output::{head_of, Head, Metric, OutputPlan};
use super::progress::Progress;
use super::{BatchError, BatchOptions, BatchSummary, InputFormat, OutputFormat};

/// What every worker reads; built once, shared by reference.
struct Ctx<'a> {
    model: &'a Model,
    layout: InputLayout,
    plan: OutputPlan,
    rows: RowFormat<'a>,
    input_format: InputFormat,
    output_format: OutputFormat,
    /// Values per row, decided before the workers start.
    features: usize,
    /// Echo JSON input ids in JSON output.
    keep_ids: bool,
}

/// A chunk after a worker: output bytes, bad rows, and counts.
struct Done {
    seq: u64,
    out: Vec<u8>,
    /// Sorted by line.
    errors: Vec<(u64, String)>,
    ok: u64,
    labelled: u64,
    correct: u64,
    abs_err: f64,
    end_offset: u64,
    /// A worker panicked on this chunk: the job cannot be complete.
    fatal: Option<String>,
}

impl Done {
    fn new(seq: u64, end_offset: u64, capacity: usize) -> Done {
        Done {
            seq,
            out: Vec::with_capacity(capacity),
            errors: Vec::new(),
            ok: 0,
            labelled: 0,
            correct: 0,
            abs_err: 0.0,
            end_offset,
            fatal: None,
        }
    }
}

#[derive(Default)]
struct Totals {
    ok: u64,
    bad: u64,
    labelled: u64,
    correct: u64,
    abs_err: f64,
}

pub(crate) fn run<R, W, E>(
    model: &Model,
    input: R,
    input_len: Option<u64>,
    output: W,
    errors: E,
    options: &BatchOptions,
) -> Result<BatchSummary, BatchError>
where
    R: Read + Send,
    W: Write + Send,
    E: Write + Send,
{
    let started = Instant::now();
    let layout = InputLayout::of(model)?;
    let label = options.label_column;

    // The first line decides the header and, for a model with a free
    // feature count, the width.
    let mut reader = LineReader::new(input, options.max_line_bytes);
    let mut data = Vec::new();
    let mut first_refused = None;
    let mut first_line = None;
    let mut header: Option<Vec<String>> = None;
    let mut header_line = 0;
    match reader.next_line(&mut data).map_err(BatchError::Read)? {
        None => {}
        Some(Next::TooLong(n)) => first_refused = Some(n),
        Some(Next::Line(span)) => {
            let line = &data[span.start..span.end];
            let mut fields = Vec::new();
            // A header when none of its fields is a number. A line mixing
            // numbers and text is a data row with a bad field: taking it for
            // a header would lose it silently, refusing it reports it.
            let is_header = options.input_format == InputFormat::Csv
                && split_csv(line, &mut fields).is_ok()
                && fields.iter().any(|&(a, b)| a < b)
                && fields.iter().all(|&(a, b)| a == b || !is_number_or_empty(&line[a..b]));
            if is_header {
                header = Some(fields.iter().map(|&(a, b)| String::from_utf8_lossy(&line[a..b]).into_owned()).collect());
                header_line = span.number;
                data.clear();
            } else {
                first_line = Some(span);
            }
        }
    }
    let width_of_first = || -> Option<usize> {
        let span = first_line?;
        let line = &data[span.start..span.end];
        match options.input_format {
            InputFormat::Csv => {
                let mut fields = Vec::new();
                split_csv(line, &mut fields).ok().map(|_| fields.len())
            }
            InputFormat::JsonLines => {
                let v: serde_json::Value = serde_json::from_slice(line).ok()?;
                let n = v.get("features").unwrap_or(&v).as_array()?.len();
                Some(if v.is_array() { n } else { n + usize::from(label) })
            }
        }
    };
    let columns = header.as_ref().map(Vec::len).or_else(width_of_first);
    let features = match (layout.fixed_len(), columns) {
        (Some(n), _) => n,
        (None, Some(c)) => c.saturating_sub(usize::from(label)).max(1),
        (None, None) => 1,
    };
    if let Some(h) = &header {
        if h.len() != features + usize::from(label) {
            return Err(columns_error(header_line, h.len(), features, label));
        }
    }

    let plan = {
        let probe = if options.all_outputs || head_of(&model.signature().outputs) == Head::Raw {
            probe(model)
        } else {
            None
        };
        OutputPlan::new(model, probe.as_deref(), options.all_outputs)
    };
    let header_text = match options.output_format {
        OutputFormat::Csv => plan.csv_header(),
        OutputFormat::JsonLines => String::new(),
    };
    let metric = plan.metric();
    let threads = options.worker_threads();
    let ctx = Ctx {
        model,
        rows: RowFormat { features, label, header: header.as_deref() },
        layout,
        plan,
        input_format: options.input_format,
        output_format: options.output_format,
        features,
        keep_ids: options.input_format == InputFormat::JsonLines && options.output_format == OutputFormat::JsonLines,
    };
    let check_first_chunk = options.input_format == InputFormat::Csv && header.is_none();

    // Two chunks waiting per worker keep every worker busy; four per worker
    // in flight let the writer fall a little behind without stalling anyone.
    let (work_tx, work_rx) = sync_channel::<Chunk>(2 * threads);
    let (done_tx, done_rx) = channel::<Done>();
    let (permit_tx, permit_rx) = sync_channel::<()>(4 * threads.max(1));
    let work_rx = Mutex::new(work_rx);
    let mut progress = Progress::new(options.progress, input_len);

    let (read_result, write_result) = std::thread::scope(|s| {
        for _ in 0..threads {
            let done_tx = done_tx.clone();
            let (ctx, work_rx) = (&ctx, &work_rx);
            s.spawn(move || worker(ctx, work_rx, done_tx));
        }
        drop(done_tx);
        let progress = &mut progress;
        let writer = s.spawn(move || write_all(done_rx, permit_rx, output, errors, &header_text, progress));
        let read_result = read_all(
            &mut reader,
            data,
            first_line,
            first_refused,
            check_first_chunk.then_some((features, label)),
            options,
            work_tx,
            permit_tx,
        );
        let write_result = writer.join().unwrap_or_else(|p| Err(BatchError::Panicked(panic_text(&p))));
        (read_result, write_result)
    });
    progress.finish();
    let totals = match (read_result, write_result) {
        (_, Err(e)) | (Err(e), _) => return Err(e),
        (Ok(()), Ok(t)) => t,
    };
    let elapsed = started.elapsed();
    let rows = totals.ok + totals.bad;
    let scored = (totals.labelled > 0).then_some(totals.labelled as f64);
    Ok(BatchSummary {
        rows_ok: totals.ok,
        rows_bad: totals.bad,
        accuracy: scored.filter(|_| metric == Metric::Accuracy).map(|n| totals.correct as f64 / n),
        mean_abs_error: scored.filter(|_| metric == Metric::MeanAbsError).map(|n| totals.abs_err / n),
        had_header: header.is_some(),
        elapsed,
        rows_per_sec: rows as f64 / elapsed.as_secs_f64().max(1e-9),
        threads,
        batch_size: options.batch_size,
    })
}

fn columns_error(line: u64, found: usize, features: usize, label: bool) -> BatchError {
    let hint = if !label && found == features + 1 {
        " (is the last column a label? pass --label-column)"
    } else if label {
        " plus the label column"
    } else {
        ""
    };
    BatchError::Columns { line, found, features, hint }
}

/// One run on zeros, to learn how many values each output gives per row
/// when the signature leaves it open.
fn probe(model: &Model) -> Option<Vec<TensorData>> {
    catch_unwind(AssertUnwindSafe(|| model.run(model.zero_inputs(1)))).ok()?.ok()
}

/// The reader: cuts the input into chunks and sends them, each with a permit.
#[allow(clippy::too_many_arguments)]
fn read_all<R: Read>(
    reader: &mut LineReader<R>,
    first_data: Vec<u8>,
    first_line: Option<LineSpan>,
    first_refused: Option<u64>,
    check_width: Option<(usize, bool)>,
    options: &BatchOptions,
    work: SyncSender<Chunk>,
    permits: SyncSender<()>,
) -> Result<(), BatchError> {
    let too_long = || format!("line longer than {} bytes", options.max_line_bytes);
    let mut chunk = Chunk { seq: 0, data: first_data, lines: Vec::new(), refused: Vec::new(), end_offset: 0 };
    chunk.lines.extend(first_line);
    chunk.refused.extend(first_refused.map(|n| (n, too_long())));
    let mut capacity = 64 * 1024;
    loop {
        let mut eof = false;
        // Refused lines count towards the chunk size too, so a file of
        // nothing but overlong lines still moves in bounded chunks.
        while chunk.lines.len() + chunk.refused.len() < options.batch_size {
            match reader.next_line(&mut chunk.data).map_err(BatchError::Read)? {
                None => {
                    eof = true;
                    break;
                }
                Some(Next::Line(span)) => chunk.lines.push(span),
                Some(Next::TooLong(n)) => chunk.refused.push((n, too_long())),
            }
        }
        chunk.end_offset = reader.offset();
        if chunk.seq == 0 {
            if let Some((features, label)) = check_width {
                check_first_chunk(&chunk, features, label)?;
            }
        }
        let empty = chunk.lines.is_empty() && chunk.refused.is_empty();
        if !empty {
            capacity = capacity.max(chunk.data.len());
            let seq = chunk.seq;
            // Either fails only when the writer is gone; it has the error.
            if permits.send(()).is_err() || work.send(chunk).is_err() {
                return Ok(());
            }
            chunk = Chunk {
                seq: seq + 1,
                data: Vec::with_capacity(capacity),
                lines: Vec::with_capacity(options.batch_size.min(1 << 16)),
                refused: Vec::new(),
                end_offset: 0,
            };
        }
        if eof {
            return Ok(());
        }
    }
}

/// Without a header the first rows stand for the file's layout: when not
/// one of them has the width the model needs, the file (or a forgotten
/// `--label-column`) is wrong, and a million error lines would not say so
/// as clearly as one fatal error.
fn check_first_chunk(chunk: &Chunk, features: usize, label: bool) -> Result<(), BatchError> {
    let want = features + usize::from(label);
    let mut fields = Vec::new();
    let mut first = None;
    for span in &chunk.lines {
        if split_csv(&chunk.data[span.start..span.end], &mut fields).is_err() {
            continue;
        }
        if fields.len() == want {
            return Ok(());
        }
        first.get_or_insert((span.number, fields.len()));
    }
    match first {
        Some((line, found)) => Err(columns_error(line, found, features, label)),
        None => Ok(()),
    }
}

fn worker(ctx: &Ctx<'_>, work: &Mutex<Receiver<Chunk>>, done: Sender<Done>) {
    let mut writer_gone = false;
    loop {
        // A poisoned lock only means another worker panicked while waiting;
        // the receiver itself is intact.
        let next = work.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok(chunk) = next else { return };
        if writer_gone {
            continue; // drain, so the reader never blocks on a full queue
        }
        let (seq, end_offset) = (chunk.seq, chunk.end_offset);
        let result = catch_unwind(AssertUnwindSafe(|| process(ctx, chunk))).unwrap_or_else(|p| {
            let mut d = Done::new(seq, end_offset, 0);
            d.fatal = Some(panic_text(&p));
            d
        });
        writer_gone = done.send(result).is_err();
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Parses a chunk, runs the model once over its good rows, formats them.
fn process(ctx: &Ctx<'_>, chunk: Chunk) -> Done {
    let Chunk { seq, data, lines, mut refused, end_offset } = chunk;
    let mut done = Done::new(seq, end_offset, lines.len() * 40);
    let mut values = empty_values(ctx.layout.element_type, lines.len() * ctx.features);
    let mut good: Vec<usize> = Vec::with_capacity(lines.len());
    let mut labels = Vec::new();
    let mut ids = Vec::new();
    let mut fields = Vec::new();
    for (ix, span) in lines.iter().enumerate() {
        match parse_line(ctx, &data[span.start..span.end], &mut fields, &mut values) {
            Ok((label, id)) => {
                good.push(ix);
                labels.extend(label);
                if ctx.keep_ids {
                    ids.push(id);
                }
            }
            Err(reason) => refused.push((span.number, reason)),
        }
    }
    if !good.is_empty() {
        let rows = good.len();
        let outputs = if ctx.layout.batched { ctx.run(values, rows) } else { Err(String::new()) };
        match outputs {
            Ok(outputs) => {
                for (r, &ix) in good.iter().enumerate() {
                    ctx.emit(&mut done, lines[ix].number, ids.get(r).and_then(Option::as_ref), &outputs, r, rows, labels.get(r));
                }
            }
            // The batch failed (or the model has no batch dimension): run the
            // rows one by one, so one row the model chokes on costs one row.
            Err(_) => {
                for (r, &ix) in good.iter().enumerate() {
                    let span = lines[ix];
                    let mut one = empty_values(ctx.layout.element_type, ctx.features);
                    let id = ids.get(r).and_then(Option::as_ref);
                    let result = parse_line(ctx, &data[span.start..span.end], &mut fields, &mut one)
                        .and_then(|_| ctx.run(one, 1));
                    match result {
                        Ok(outputs) => ctx.emit(&mut done, span.number, id, &outputs, 0, 1, labels.get(r)),
                        Err(e) => refused.push((span.number, format!("inference failed: {e}"))),
                    }
                }
            }
        }
    }
    refused.sort_by_key(|(n, _)| *n);
    done.errors = refused;
    done
}

fn parse_line(
    ctx: &Ctx<'_>,
    line: &[u8],
    fields: &mut Vec<(usize, usize)>,
    values: &mut TensorValues,
) -> Result<(Option<f64>, Option<serde_json::Value>), String> {
    match ctx.input_format {
        InputFormat::Csv => ctx.rows.parse_csv(line, fields, values).map(|label| (label, None)),
        InputFormat::JsonLines => ctx.rows.parse_json(line, values),
    }
}

impl Ctx<'_> {
    fn run(&self, values: TensorValues, rows: usize) -> Result<Vec<TensorData>, String> {
        let input = TensorData { shape: self.layout.shape(rows, self.features), values };
        match catch_unwind(AssertUnwindSafe(|| self.model.run(vec![input]))) {
            Ok(Ok(outputs)) => Ok(outputs),
            Ok(Err(e)) => Err(e.to_string()),
            Err(p) => Err(format!("the model panicked: {}", panic_text(&p))),
        }
    }

    /// Writes row `r` of a run over `rows` rows and scores it.
    #[allow(clippy::too_many_arguments)]
    fn emit(
        &self,
        done: &mut Done,
        line: u64,
        id: Option<&serde_json::Value>,
        outputs: &[TensorData],
        r: usize,
        rows: usize,
        label: Option<&f64>,
    ) {
        match self.output_format {
            OutputFormat::Csv => self.plan.write_csv(&mut done.out, line, outputs, r, rows),
            OutputFormat::JsonLines => self.plan.write_json(&mut done.out, line, id, outputs, r, rows),
        }
        done.ok += 1;
        if let (Some(label), Some(predicted)) = (label, self.plan.predicted(outputs, r, rows)) {
            done.labelled += 1;
            done.correct += u64::from(predicted == *label);
            done.abs_err += (predicted - label).abs();
        }
    }
}

/// The writer: restores input order, writes outputs and errors, returns permits.
fn write_all<W: Write, E: Write>(
    done: Receiver<Done>,
    permits: Receiver<()>,
    output: W,
    errors: E,
    header: &str,
    progress: &mut Progress,
) -> Result<Totals, BatchError> {
    let mut out = BufWriter::with_capacity(1 << 20, output);
    let mut errs = BufWriter::new(errors);
    out.write_all(header.as_bytes()).map_err(BatchError::Write)?;
    errs.write_all(b"line,reason\n").map_err(BatchError::WriteErrors)?;
    let mut totals = Totals::default();
    let mut pending: BTreeMap<u64, Done> = BTreeMap::new();
    let mut next = 0u64;
    for d in done {
        if let Some(reason) = d.fatal {
            return Err(BatchError::Panicked(reason));
        }
        pending.insert(d.seq, d);
        while let Some(d) = pending.remove(&next) {
            out.write_all(&d.out).map_err(BatchError::Write)?;
            for (line, reason) in &d.errors {
                writeln!(errs, "{line},\"{}\"", reason.replace('"', "\"\"")).map_err(BatchError::WriteErrors)?;
            }
            totals.ok += d.ok;
            totals.bad += d.errors.len() as u64;
            totals.labelled += d.labelled;
            totals.correct += d.correct;
            totals.abs_err += d.abs_err;
            progress.update(d.end_offset, totals.ok + totals.bad);
            next += 1;
            // The reader sent this chunk's permit before the chunk.
            let _ = permits.recv();
        }
    }
    if !pending.is_empty() {
        return Err(BatchError::Panicked(format!("chunk {next} never came back from the workers")));
    }
    out.flush().map_err(BatchError::Write)?;
    errs.flush().map_err(BatchError::WriteErrors)?;
    Ok(totals)
}
