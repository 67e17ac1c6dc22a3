//! Batch mode: run a model over a whole file of rows, as fast as the cores
//! allow, in memory that does not grow with the file.
//!
//! The seed's deployment table names four ways to serve a model — REST,
//! batch, streaming, edge. This is the batch one: `outpost-runtime batch`
//! reads a CSV or JSON Lines file, predicts every row and writes one output
//! row per good input row, in input order.
//!
//! # The pipeline
//!
//! ```text
//!             chunks of raw lines           predicted chunks (any order)
//!  reader ──▶ [bounded queue] ──▶ worker × N ──▶ [queue] ──▶ ordered writer ──▶ output
//!    ▲                                                          │   └──────▶ errors file
//!    └──────────── in-flight permits (bounded) ◀────────────────┘
//! ```
//!
//! - The **reader** only cuts the input into chunks of `batch_size` whole
//!   lines (a memchr and a copy); it parses nothing, so it is never the
//!   bottleneck.
//! - **Workers** parse their chunk (fields → numbers, checked), run the model
//!   once on all its good rows as one `[rows, features…]` tensor (one
//!   vectorized call, not one call per row), and format the output rows.
//! - The **writer** puts chunks back in input order and writes them.
//!
//! Memory stays flat whatever the file size because a chunk needs a
//! *permit* before the reader may send it, and the writer returns the permit
//! only once the chunk is written: at most `4 × threads` chunks exist at any
//! moment, however slow the disk or however far one worker falls behind.
//!
//! # What is a bad row
//!
//! A row that cannot be fed to the model — wrong number of columns, a field
//! that is not a number, an empty field, NaN or infinity, a value out of
//! range for an integer input, a line longer than
//! [`BatchOptions::max_line_bytes`], JSON that does not parse — does not stop
//! the job. It goes to the **errors file** as `line,reason` (1-based line
//! numbers of the input file, blank lines counted), and the summary counts
//! it. Output rows carry the same line number in their first column, so
//! outputs, errors and inputs join on it.
//!
//! Fatal errors (the only ones that make the command exit non-zero): the
//! model cannot be fed from rows (several inputs, a sample of unknown size),
//! the input cannot be read, the output cannot be written, and a header (or,
//! without one, every row of the first chunk) whose width does not match the
//! model — that is a wrong file or a forgotten `--label-column`, not a few
//! bad rows.
//!
//! # Formats
//!
//! Input, by extension unless given ([`InputFormat`]):
//! - **CSV**: comma-separated, optional header, fields may be
//!   double-quoted. The first non-blank line is a header when none of its
//!   fields is a number; a first line mixing numbers and text is a data row
//!   with a bad field (reported in the errors file, where taking it for a
//!   header would lose it silently — stricter than [`crate::dataset`], which
//!   reads small reference files a person has looked at). With
//!   [`BatchOptions::label_column`] the last column is the label.
//! - **JSON Lines**: one `{"features": [...]}` object per line (optional
//!   `"label"` and `"id"`; the id is echoed in JSON output), or a bare
//!   `[...]` array (its last element is the label with `label_column`).
//!
//! Output ([`OutputFormat`]), first column/field `line`:
//! - a classifier gives `prediction` (its label output, else the argmax of
//!   its scores) and `probability` (the largest class probability; scores
//!   that are not a distribution are passed through softmax first) — the
//!   same reading as `POST /predict`;
//! - a regressor gives `prediction`;
//! - anything else, or with [`BatchOptions::all_outputs`], every output
//!   flattened: `name` for one value per row, `name_0`, `name_1`, … otherwise.
//!
//! With labels, the summary reports accuracy (classifiers) or the mean
//! absolute error (regressors).
//!
//! # Use
//!
//! ```no_run
//! use std::path::Path;
//! use outpost_runtime::batch::{run_files, BatchOptions};
//! use outpost_runtime::model::{LoadOptions, Model};
//! # fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let model = Model::load("fixtures/bc_mlp.onnx", &LoadOptions::default())?;
//! let (input, output) = (Path::new("rows.csv"), Path::new("predictions.csv"));
//! let options = BatchOptions { label_column: true, ..BatchOptions::for_files(input, output) };
//! // Bad rows go to predictions.csv.errors; the summary counts them.
//! let summary = run_files(&model, input, output, None, &options)?;
//! println!("{summary}");
//! # Ok(()) }
//! ```

mod input;
mod output;
mod pipeline;
mod progress;

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::model::Model;

pub use progress::ProgressMode;

/// How input rows are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InputFormat {
    Csv,
    JsonLines,
}

/// How output rows are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    Csv,
    JsonLines,
}

/// `.jsonl`, `.ndjson` and `.json` are JSON Lines; everything else is CSV.
fn is_json_lines(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "jsonl" | "ndjson" | "json"))
}

impl InputFormat {
    /// The format a file name says (see [`OutputFormat::from_path`] for the rule).
    pub fn from_path(path: &Path) -> InputFormat {
        if is_json_lines(path) {
            InputFormat::JsonLines
        } else {
            InputFormat::Csv
        }
    }
}

impl OutputFormat {
    /// `.jsonl`, `.ndjson` and `.json` are JSON Lines; everything else is CSV.
    pub fn from_path(path: &Path) -> OutputFormat {
        if is_json_lines(path) {
            OutputFormat::JsonLines
        } else {
            OutputFormat::Csv
        }
    }
}

/// How a batch job runs. [`BatchOptions::default`] reads and writes CSV.
#[derive(Clone, Debug)]
pub struct BatchOptions {
    pub input_format: InputFormat,
    pub output_format: OutputFormat,
    /// Rows per model run (and per chunk a worker takes). Larger batches
    /// amortize the per-call cost; 1024 is past the knee for small models.
    pub batch_size: usize,
    /// Worker threads that parse and predict; 0 = one per core. Each model
    /// run is single-threaded, so this is the parallelism.
    pub threads: usize,
    /// The last column (CSV), the `label` field or the last array element
    /// (JSON Lines) is the true label: it is not fed to the model, and the
    /// summary reports accuracy against it.
    pub label_column: bool,
    /// Write every model output flattened instead of `prediction`/`probability`.
    pub all_outputs: bool,
    /// A longer line is a bad row (it is skipped, never held in memory).
    pub max_line_bytes: usize,
    pub progress: ProgressMode,
}

impl Default for BatchOptions {
    fn default() -> Self {
        BatchOptions {
            input_format: InputFormat::Csv,
            output_format: OutputFormat::Csv,
            batch_size: 1024,
            threads: 0,
            label_column: false,
            all_outputs: false,
            max_line_bytes: 16 * 1024 * 1024,
            progress: ProgressMode::Auto,
        }
    }
}

impl BatchOptions {
    /// Defaults with the formats the file names say.
    pub fn for_files(input: &Path, output: &Path) -> BatchOptions {
        BatchOptions {
            input_format: InputFormat::from_path(input),
            output_format: OutputFormat::from_path(output),
            ..BatchOptions::default()
        }
    }

    /// The worker count actually used.
    pub fn worker_threads(&self) -> usize {
        if self.threads > 0 {
            self.threads
        } else {
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
        }
    }

    fn validate(&self) -> Result<(), BatchError> {
        if self.batch_size == 0 {
            return Err(BatchError::Options("batch size must be at least 1".into()));
        }
        if self.batch_size > 1 << 20 {
            return Err(BatchError::Options(format!("batch size {} is over the limit of {}", self.batch_size, 1 << 20)));
        }
        if self.threads > 1024 {
            return Err(BatchError::Options(format!("{} threads is more than any device has use for", self.threads)));
        }
        if self.max_line_bytes == 0 {
            return Err(BatchError::Options("the line length limit must be at least 1 byte".into()));
        }
        Ok(())
    }
}

/// What a batch job did.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct BatchSummary {
    /// Rows predicted and written to the output.
    pub rows_ok: u64,
    /// Rows refused (each is a line in the errors file).
    pub rows_bad: u64,
    /// With labels, on a classifier: share of good rows whose prediction
    /// equals the label.
    pub accuracy: Option<f64>,
    /// With labels, on a regressor: mean absolute error of the good rows.
    pub mean_abs_error: Option<f64>,
    /// Whether the CSV input started with a header.
    pub had_header: bool,
    #[serde(serialize_with = "seconds")]
    pub elapsed: Duration,
    /// Input rows (good and bad) per second of wall time.
    pub rows_per_sec: f64,
    pub threads: usize,
    pub batch_size: usize,
}

fn seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl std::fmt::Display for BatchSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} rows predicted, {} bad", self.rows_ok, self.rows_bad)?;
        if let Some(a) = self.accuracy {
            write!(f, ", accuracy {:.4}", a)?;
        }
        if let Some(e) = self.mean_abs_error {
            write!(f, ", mean absolute error {:.6}", e)?;
        }
        write!(
            f,
            "; {:.1} s, {:.0} rows/s ({} threads, batch {})",
            self.elapsed.as_secs_f64(),
            self.rows_per_sec,
            self.threads,
            self.batch_size
        )
    }
}

/// Why a batch job stopped. Bad rows are not errors: see the module docs.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("invalid batch options: {0}")]
    Options(String),
    /// The model's inputs cannot be filled from rows of a file.
    #[error("{0}")]
    Unsupported(String),
    /// The header (or the whole first chunk) does not have the model's width.
    #[error("line {line}: {found} columns, but the model takes {features} feature(s){hint}")]
    Columns { line: u64, found: usize, features: usize, hint: &'static str },
    #[error("{path}: {error}")]
    File { path: PathBuf, error: std::io::Error },
    #[error("cannot read the input: {0}")]
    Read(std::io::Error),
    #[error("cannot write the output: {0}")]
    Write(std::io::Error),
    #[error("cannot write the errors file: {0}")]
    WriteErrors(std::io::Error),
    #[error("a batch thread panicked: {0}")]
    Panicked(String),
}

/// Runs `model` over `input`, writing predictions to `output` and bad rows
/// to `errors`. `input_len` (bytes, when known) drives the progress bar's
/// ETA. See the module docs for the pipeline and the formats.
pub fn run<R, W, E>(
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
    options.validate()?;
    pipeline::run(model, input, input_len, output, errors, options)
}

/// Runs a batch job between files. `output` is written as
/// `<output>.partial` and renamed only when the job completed, so a file at
/// `output` is always complete. `errors` defaults to `<output>.errors`; it
/// is always (re)created, with just its header when every row was good. An
/// `input` or `output` of `-` is stdin or stdout.
pub fn run_files(
    model: &Model,
    input: &Path,
    output: &Path,
    errors: Option<&Path>,
    options: &BatchOptions,
) -> Result<BatchSummary, BatchError> {
    options.validate()?;
    let file_err = |path: &Path| {
        let path = path.to_path_buf();
        move |error| BatchError::File { path, error }
    };
    let stdout = output == Path::new("-");
    let errors_path = match errors {
        Some(p) => p.to_path_buf(),
        None if stdout => PathBuf::from("batch.errors"),
        None => append_to_name(output, ".errors"),
    };
    let (reader, input_len): (Box<dyn Read + Send>, Option<u64>) = if input == Path::new("-") {
        (Box::new(std::io::stdin()), None)
    } else {
        let file = File::open(input).map_err(file_err(input))?;
        let len = file.metadata().ok().filter(|m| m.is_file()).map(|m| m.len());
        (Box::new(file), len)
    };
    let errors_file = File::create(&errors_path).map_err(file_err(&errors_path))?;
    if stdout {
        return run(model, reader, input_len, std::io::stdout(), errors_file, options);
    }
    let partial = append_to_name(output, ".partial");
    let out_file = File::create(&partial).map_err(file_err(&partial))?;
    let result = run(model, reader, input_len, out_file, errors_file, options);
    match result {
        Ok(summary) => {
            std::fs::rename(&partial, output).map_err(file_err(output))?;
            Ok(summary)
        }
        Err(e) => {
            // A half-written output would pass for a complete one.
            let _ = std::fs::remove_file(&partial);
            Err(e)
        }
    }
}

fn append_to_name(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_from_extensions() {
        assert_eq!(InputFormat::from_path(Path::new("a.CSV")), InputFormat::Csv);
        assert_eq!(InputFormat::from_path(Path::new("a.jsonl")), InputFormat::JsonLines);
        assert_eq!(OutputFormat::from_path(Path::new("a.ndjson")), OutputFormat::JsonLines);
        assert_eq!(OutputFormat::from_path(Path::new("-")), OutputFormat::Csv);
        assert_eq!(append_to_name(Path::new("out/p.csv"), ".errors"), PathBuf::from("out/p.csv.errors"));
    }
}
