//! Reading rows: cutting the input into chunks of lines (the reader thread)
//! and turning one line into checked model input values (the workers).
//!
//! The reader never parses numbers; it finds line ends with the standard
//! library's memchr (inside `read_until`) and copies bytes. Parsing, the
//! expensive part, happens in parallel in the workers.

use std::io::{BufRead, Read};

use serde::Deserialize;

use crate::model::Model;
use crate::tensor::{ElementType, TensorValues};

use super::BatchError;

/// Lines handed to a worker: their bytes, end to end, and where each starts.
pub(crate) struct Chunk {
    /// Position of the chunk in the input; the writer restores this order.
    pub seq: u64,
    pub data: Vec<u8>,
    pub lines: Vec<LineSpan>,
    /// Lines the reader refused itself (too long), with the reason.
    pub refused: Vec<(u64, String)>,
    /// Input bytes consumed up to the end of this chunk (for the progress bar).
    pub end_offset: u64,
}

/// One line of a chunk: its 1-based number in the input and its byte range
/// in [`Chunk::data`], line end excluded.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LineSpan {
    pub number: u64,
    pub start: usize,
    pub end: usize,
}

/// What the next non-blank line was.
pub(crate) enum Next {
    Line(LineSpan),
    /// Longer than the limit: skipped without being stored.
    TooLong(u64),
}

/// Splits a byte stream into lines, counting them (blank ones too, so line
/// numbers match what an editor shows) and skipping blank ones.
pub(crate) struct LineReader<R> {
    inner: std::io::BufReader<R>,
    line_no: u64,
    offset: u64,
    max_line: usize,
}

impl<R: Read> LineReader<R> {
    pub fn new(inner: R, max_line: usize) -> LineReader<R> {
        // 1 MiB: large reads keep the syscall count negligible next to parsing.
        LineReader { inner: std::io::BufReader::with_capacity(1 << 20, inner), line_no: 0, offset: 0, max_line }
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Appends the next non-blank line to `buf` and says where it is.
    pub fn next_line(&mut self, buf: &mut Vec<u8>) -> std::io::Result<Option<Next>> {
        loop {
            let start = buf.len();
            // Room for the line, `\r\n`, and one byte to tell "too long".
            let limit = self.max_line as u64 + 3;
            let n = (&mut self.inner).take(limit).read_until(b'\n', buf)?;
            if n == 0 {
                return Ok(None);
            }
            self.offset += n as u64;
            self.line_no += 1;
            let number = self.line_no;
            let terminated = buf.last() == Some(&b'\n');
            let mut end = buf.len();
            if terminated {
                end -= 1;
                if end > start && buf[end - 1] == b'\r' {
                    end -= 1;
                }
            }
            if end - start > self.max_line {
                buf.truncate(start);
                if !terminated {
                    self.skip_rest_of_line()?;
                }
                return Ok(Some(Next::TooLong(number)));
            }
            let mut s = start;
            if number == 1 && buf[s..end].starts_with(b"\xEF\xBB\xBF") {
                s += 3; // UTF-8 byte-order mark, as spreadsheets write it
            }
            if buf[s..end].iter().all(u8::is_ascii_whitespace) {
                buf.truncate(start);
                continue;
            }
            return Ok(Some(Next::Line(LineSpan { number, start: s, end })));
        }
    }

    fn skip_rest_of_line(&mut self) -> std::io::Result<()> {
        loop {
            let (found, used) = {
                let avail = self.inner.fill_buf()?;
                if avail.is_empty() {
                    return Ok(());
                }
                match avail.iter().position(|b| *b == b'\n') {
                    Some(i) => (true, i + 1),
                    None => (false, avail.len()),
                }
            };
            self.inner.consume(used);
            self.offset += used as u64;
            if found {
                return Ok(());
            }
        }
    }
}

/// How rows become the model's single input.
#[derive(Clone, Debug)]
pub(crate) struct InputLayout {
    pub element_type: ElementType,
    /// The input's dimensions after the batch one (all of them when
    /// `batched` is false); `None` only for a free feature count.
    pub sample: Vec<Option<usize>>,
    /// The first dimension takes the rows (free, or fixed at 1 — such a
    /// model runs row by row inside [`Model::run`]). If false the input has
    /// no batch dimension and every row is its own run.
    pub batched: bool,
}

impl InputLayout {
    pub fn of(model: &Model) -> Result<InputLayout, BatchError> {
        let inputs = &model.signature().inputs;
        let [spec] = inputs.as_slice() else {
            let names: Vec<&str> = inputs.iter().map(|s| s.name.as_str()).collect();
            return Err(BatchError::Unsupported(format!(
                "batch mode feeds one input per row; this model takes {} inputs ({})",
                inputs.len(),
                names.join(", ")
            )));
        };
        let dims: Vec<Option<usize>> = spec.shape.iter().map(|d| d.map(|d| d as usize)).collect();
        let batched = matches!(dims.first(), Some(None) | Some(Some(1)));
        let sample: Vec<Option<usize>> = if batched { dims[1..].to_vec() } else { dims.clone() };
        // A free feature count is fine on a `[N, F]` input: the file says it.
        // Any other free dimension leaves a flat row ambiguous.
        let free = sample.iter().filter(|d| d.is_none()).count();
        let ok = free == 0 || (batched && sample.len() == 1);
        if !ok || dims.is_empty() {
            return Err(BatchError::Unsupported(format!(
                "input {:?} has shape {}: a row of a file cannot tell how to fill it",
                spec.name,
                crate::server::request::shape_text(&spec.shape)
            )));
        }
        Ok(InputLayout { element_type: spec.element_type, sample, batched })
    }

    /// Values per row when the model fixes it.
    pub fn fixed_len(&self) -> Option<usize> {
        self.sample.iter().try_fold(1usize, |acc, d| d.map(|d| acc * d))
    }

    /// Shape of the tensor holding `rows` rows of `features` values.
    pub fn shape(&self, rows: usize, features: usize) -> Vec<usize> {
        let sample = self.sample.iter().map(|d| d.unwrap_or(features));
        if self.batched {
            std::iter::once(rows).chain(sample).collect()
        } else {
            sample.collect()
        }
    }
}

pub(crate) fn empty_values(t: ElementType, capacity: usize) -> TensorValues {
    crate::server::request::empty_values(t, capacity)
}

pub(crate) fn truncate(values: &mut TensorValues, len: usize) {
    match values {
        TensorValues::F32(v) => v.truncate(len),
        TensorValues::I8(v) => v.truncate(len),
        TensorValues::U8(v) => v.truncate(len),
        TensorValues::I32(v) => v.truncate(len),
        TensorValues::I64(v) => v.truncate(len),
    }
}

/// Appends `x` converted to the input's element type, or says why it cannot be.
fn push_number(values: &mut TensorValues, x: f64) -> Result<(), String> {
    if !x.is_finite() {
        return Err(format!("{x} is not a finite number"));
    }
    fn int(x: f64, min: f64, max: f64, name: &str) -> Result<f64, String> {
        if x.fract() != 0.0 {
            return Err(format!("{x} is not an integer ({name} input)"));
        }
        if x < min || x > max {
            return Err(format!("{x} is out of range for {name}"));
        }
        Ok(x)
    }
    match values {
        TensorValues::F32(v) => {
            let f = x as f32;
            if !f.is_finite() {
                return Err(format!("{x} is too large for a 32-bit float"));
            }
            v.push(f)
        }
        TensorValues::I8(v) => v.push(int(x, i8::MIN as f64, i8::MAX as f64, "int8")? as i8),
        TensorValues::U8(v) => v.push(int(x, 0.0, u8::MAX as f64, "uint8")? as u8),
        TensorValues::I32(v) => v.push(int(x, i32::MIN as f64, i32::MAX as f64, "int32")? as i32),
        TensorValues::I64(v) => v.push(int(x, -9.2e18, 9.2e18, "int64")? as i64),
    }
    Ok(())
}

/// Exact powers of ten in f32: 10^10 is the last whose odd part (5^10)
/// fits f32's 24-bit significand.
const POW10_F32: [f32; 11] = [1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10];

/// Parses the decimal number at the start of `s` (`-12.5`, `3828e-6`,
/// `.5`, `+1.`) and says how many bytes it took — when the result is
/// certain to be exactly what `str::parse::<f32>` gives; `None` otherwise.
///
/// Clinger's fast path: with a decimal significand `w ≤ 2^24` and an
/// exponent `|q| ≤ 10`, both `w` and `10^|q|` are exact f32 values, so the
/// single multiplication or division `w × 10^q` is correctly rounded —
/// the same bits the standard library's parser (which takes this very path
/// first) returns. Measurements with up to 7 significant digits, what
/// sensors and most CSV exports write, all take it.
pub(crate) fn fast_f32(s: &[u8]) -> Option<(f32, usize)> {
    let mut i = 0;
    let negative = match s.first() {
        Some(b'-') => {
            i = 1;
            true
        }
        Some(b'+') => {
            i = 1;
            false
        }
        _ => false,
    };
    let mut w: u64 = 0;
    let mut significant = 0u32;
    let mut q: i32 = 0;
    let mut any_digit = false;
    while let Some(d) = s.get(i).and_then(|c| c.checked_sub(b'0')).filter(|d| *d < 10) {
        w = w * 10 + d as u64;
        significant += u32::from(w != 0);
        any_digit = true;
        i += 1;
        if significant > 18 {
            return None; // u64 would overflow; not a fast-path number anyway
        }
    }
    if s.get(i) == Some(&b'.') {
        i += 1;
        while let Some(d) = s.get(i).and_then(|c| c.checked_sub(b'0')).filter(|d| *d < 10) {
            w = w * 10 + d as u64;
            significant += u32::from(w != 0);
            q -= 1;
            any_digit = true;
            i += 1;
            if significant > 18 {
                return None;
            }
        }
    }
    if !any_digit {
        return None;
    }
    if matches!(s.get(i), Some(b'e') | Some(b'E')) {
        i += 1;
        let exp_negative = match s.get(i) {
            Some(b'-') => {
                i += 1;
                true
            }
            Some(b'+') => {
                i += 1;
                false
            }
            _ => false,
        };
        let start = i;
        let mut e: i32 = 0;
        while let Some(d) = s.get(i).and_then(|c| c.checked_sub(b'0')).filter(|d| *d < 10) {
            e = e * 10 + d as i32;
            i += 1;
            if i - start > 4 {
                return None;
            }
        }
        if i == start {
            return None; // "1e": not a number
        }
        q += if exp_negative { -e } else { e };
    }
    let x = if w == 0 {
        0.0
    } else if w > 1 << 24 || !(-10..=10).contains(&q) {
        return None;
    } else if q >= 0 {
        w as f32 * POW10_F32[q as usize]
    } else {
        w as f32 / POW10_F32[(-q) as usize]
    };
    Some((if negative { -x } else { x }, i))
}

/// Splits one CSV line into field ranges (quotes stripped, bare fields
/// trimmed). Commas inside double quotes do not split.
pub(crate) fn split_csv(line: &[u8], fields: &mut Vec<(usize, usize)>) -> Result<(), &'static str> {
    fields.clear();
    let n = line.len();
    let mut i = 0;
    loop {
        while i < n && (line[i] == b' ' || line[i] == b'\t') {
            i += 1;
        }
        if i < n && line[i] == b'"' {
            let start = i + 1;
            let mut j = start;
            loop {
                match line[j..].iter().position(|b| *b == b'"') {
                    None => return Err("unterminated quoted field"),
                    Some(k) => {
                        j += k;
                        if j + 1 < n && line[j + 1] == b'"' {
                            j += 2; // "" is a quote inside the field
                        } else {
                            break;
                        }
                    }
                }
            }
            fields.push((start, j));
            i = j + 1;
            while i < n && (line[i] == b' ' || line[i] == b'\t') {
                i += 1;
            }
            if i == n {
                return Ok(());
            }
            if line[i] != b',' {
                return Err("text after a closing quote");
            }
            i += 1;
        } else {
            let start = i;
            let end = line[i..].iter().position(|b| *b == b',').map_or(n, |k| i + k);
            let mut e = end;
            while e > start && (line[e - 1] == b' ' || line[e - 1] == b'\t') {
                e -= 1;
            }
            fields.push((start, e));
            if end == n {
                return Ok(());
            }
            i = end + 1;
        }
    }
}

/// Whether a field reads as a number (the header rule of [`crate::dataset`]:
/// an empty field counts as a missing number).
pub(crate) fn is_number_or_empty(field: &[u8]) -> bool {
    field.is_empty() || std::str::from_utf8(field).is_ok_and(|s| s.parse::<f64>().is_ok())
}

/// Shows a field in an error message: quoted, cut at 40 characters.
fn show(field: &[u8]) -> String {
    let s = String::from_utf8_lossy(field);
    if s.chars().count() > 40 {
        let cut: String = s.chars().take(40).collect();
        format!("{cut:?}…")
    } else {
        format!("{s:?}")
    }
}

/// What a worker needs to read a row.
pub(crate) struct RowFormat<'a> {
    /// Values one row gives the model.
    pub features: usize,
    pub label: bool,
    /// Column names from the CSV header, for error messages.
    pub header: Option<&'a [String]>,
}

impl RowFormat<'_> {
    fn column(&self, j: usize) -> String {
        match self.header.and_then(|h| h.get(j)) {
            Some(name) => format!("column {} ({name:?})", j + 1),
            None => format!("column {}", j + 1),
        }
    }

    fn width(&self) -> usize {
        self.features + usize::from(self.label)
    }

    /// Parses one CSV line into `values` (appending `features` values) and
    /// returns its label. On error nothing is appended.
    pub fn parse_csv(
        &self,
        line: &[u8],
        fields: &mut Vec<(usize, usize)>,
        values: &mut TensorValues,
    ) -> Result<Option<f64>, String> {
        if let TensorValues::F32(v) = values {
            let before = v.len();
            if let Some(label) = self.parse_csv_fast(line, v) {
                return Ok(label);
            }
            v.truncate(before);
        }
        split_csv(line, fields).map_err(str::to_string)?;
        if fields.len() != self.width() {
            let hint = if !self.label && fields.len() == self.features + 1 {
                " (is the last column a label? pass --label-column)"
            } else {
                ""
            };
            return Err(format!("{} columns, expected {}{hint}", fields.len(), self.width()));
        }
        let before = values.len();
        let result = self.fill(line, fields, values);
        if result.is_err() {
            truncate(values, before);
        }
        result
    }

    /// One pass over a row of plain numbers: each field parsed where it
    /// stands ([`fast_f32`]), no field list, no UTF-8 check (the parser
    /// accepts ASCII only). Anything unusual — quotes, a number beyond the
    /// fast path, a bad field, the wrong width — returns `None` and the
    /// caller takes the general path, which also words the error. Parsing
    /// is most of a batch job's CPU time; this halves it.
    fn parse_csv_fast(&self, line: &[u8], out: &mut Vec<f32>) -> Option<Option<f64>> {
        let n = line.len();
        let mut i = 0;
        let skip_blanks = |mut i: usize| {
            while i < n && (line[i] == b' ' || line[i] == b'\t') {
                i += 1;
            }
            i
        };
        for j in 0..self.features {
            i = skip_blanks(i);
            let (x, used) = fast_f32(&line[i..])?;
            out.push(x);
            i = skip_blanks(i + used);
            let last = j + 1 == self.features && !self.label;
            if last {
                return (i == n).then_some(None);
            }
            if i >= n || line[i] != b',' {
                return None;
            }
            i += 1;
        }
        // The label: one field to the end of the line.
        let field = line[i..].trim_ascii();
        if field.is_empty() || field.contains(&b',') || field.first() == Some(&b'"') {
            return None;
        }
        let label = std::str::from_utf8(field).ok()?.parse::<f64>().ok().filter(|x| x.is_finite())?;
        Some(Some(label))
    }

    fn fill(&self, line: &[u8], fields: &[(usize, usize)], values: &mut TensorValues) -> Result<Option<f64>, String> {
        for (j, &(a, b)) in fields[..self.features].iter().enumerate() {
            let field = &line[a..b];
            if field.is_empty() {
                return Err(format!("{}: empty field", self.column(j)));
            }
            let text = std::str::from_utf8(field).map_err(|_| format!("{}: not UTF-8 text", self.column(j)))?;
            match &mut *values {
                // The common case, parsed straight to f32: parsing to f64 and
                // narrowing could round twice.
                TensorValues::F32(v) => match text.parse::<f32>() {
                    Ok(x) if x.is_finite() => v.push(x),
                    Ok(x) => return Err(format!("{}: {x} is not a finite number", self.column(j))),
                    Err(_) => return Err(format!("{}: {} is not a number", self.column(j), show(field))),
                },
                other => {
                    let x = text
                        .parse::<f64>()
                        .map_err(|_| format!("{}: {} is not a number", self.column(j), show(field)))?;
                    push_number(other, x).map_err(|e| format!("{}: {e}", self.column(j)))?;
                }
            }
        }
        if !self.label {
            return Ok(None);
        }
        let j = self.features;
        let (a, b) = fields[j];
        let field = &line[a..b];
        if field.is_empty() {
            return Err(format!("{}: the label is empty", self.column(j)));
        }
        match std::str::from_utf8(field).ok().and_then(|s| s.parse::<f64>().ok()) {
            Some(x) if x.is_finite() => Ok(Some(x)),
            Some(x) => Err(format!("{}: label {x} is not a finite number", self.column(j))),
            None => Err(format!("{}: label {} is not a number", self.column(j), show(field))),
        }
    }

    /// Parses one JSON line (`{"features": [...]}` or a bare array) into
    /// `values`; returns its label and id. On error nothing is appended.
    pub fn parse_json(
        &self,
        line: &[u8],
        values: &mut TensorValues,
    ) -> Result<(Option<f64>, Option<serde_json::Value>), String> {
        #[derive(Deserialize)]
        struct Row {
            features: Vec<f64>,
            #[serde(default)]
            label: Option<f64>,
            #[serde(default)]
            id: Option<serde_json::Value>,
        }
        let first = line.iter().find(|b| !b.is_ascii_whitespace()).copied();
        let (mut numbers, mut label, id) = if first == Some(b'[') {
            let numbers: Vec<f64> = serde_json::from_slice(line).map_err(|e| format!("not a JSON array of numbers: {e}"))?;
            (numbers, None, None)
        } else {
            let row: Row = serde_json::from_slice(line).map_err(|e| format!("not a {{\"features\": [numbers]}} object: {e}"))?;
            (row.features, row.label, row.id)
        };
        if self.label {
            if first == Some(b'[') {
                label = numbers.pop();
            }
            if label.is_none() {
                return Err("no label (the \"label\" field, or the array's last element)".into());
            }
        }
        if numbers.len() != self.features {
            return Err(format!("{} features, expected {}", numbers.len(), self.features));
        }
        let before = values.len();
        for (j, x) in numbers.iter().enumerate() {
            if let Err(e) = push_number(values, *x) {
                truncate(values, before);
                return Err(format!("features[{j}]: {e}"));
            }
        }
        Ok((label, id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(s: &str) -> Result<Vec<String>, &'static str> {
        let mut f = Vec::new();
        split_csv(s.as_bytes(), &mut f)?;
        Ok(f.iter().map(|(a, b)| s[*a..*b].to_string()).collect())
    }

    #[test]
    fn fast_path_matches_the_standard_parser() {
        let fixed = [
            "0", "-0", "+0.0", "1", "-1", "13.68", "0.003828", "1214.0", "1.", ".5", "-.25", "16777216", "16777217",
            "0.1", "3.4028235e38", "1e10", "1e-10", "1e11", "7.5e-3", "1E3", "00012.500", "0.000001", "123456789",
        ];
        for s in fixed {
            if let Some((x, used)) = fast_f32(s.as_bytes()) {
                assert_eq!(used, s.len(), "{s}");
                assert_eq!(x.to_bits(), s.parse::<f32>().unwrap().to_bits(), "{s}");
            }
        }
        // A deterministic sweep of decimals of up to 8 significant digits
        // and exponents -12..12: every accepted one is bit-exact.
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut accepted = 0;
        for _ in 0..200_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let digits = 1 + (state % 8) as u32;
            let w = (state >> 8) % 10u64.pow(digits);
            let point = ((state >> 40) % (digits as u64 + 1)) as usize;
            let mut text = format!("{w:0width$}", width = digits as usize);
            text.insert(text.len() - point, '.');
            if state >> 63 == 1 {
                text = format!("-{text}");
            }
            if (state >> 50) % 3 == 0 {
                text = format!("{text}e{}", ((state >> 52) % 25) as i32 - 12);
            }
            let want = text.parse::<f32>().unwrap();
            if let Some((x, used)) = fast_f32(text.as_bytes()) {
                accepted += 1;
                assert_eq!(used, text.len(), "{text}");
                assert_eq!(x.to_bits(), want.to_bits(), "{text}: {x} vs {want}");
            }
        }
        assert!(accepted > 150_000, "the fast path takes most plain decimals ({accepted})");
        for s in ["", "-", ".", "e5", "1e", "1e+", "nan", "inf", "abc"] {
            assert!(fast_f32(s.as_bytes()).is_none(), "{s}");
        }
        assert_eq!(fast_f32(b"2.5,3"), Some((2.5, 3)));
    }

    #[test]
    fn fast_and_general_rows_agree() {
        let f = RowFormat { features: 3, label: true, header: None };
        let mut fields = Vec::new();
        for line in ["1,2.5,-3e2,1", " 1 , 2.5 ,\"-300\", 1", "1,2.5,-300.000000001,1", "1,2.5,-3e2,  1  "] {
            let mut v = TensorValues::F32(Vec::new());
            assert_eq!(f.parse_csv(line.as_bytes(), &mut fields, &mut v), Ok(Some(1.0)), "{line}");
            assert_eq!(v, TensorValues::F32(vec![1.0, 2.5, -300.0]), "{line}");
        }
        let mut v = TensorValues::F32(Vec::new());
        assert!(f.parse_csv(b"1,2.5,-3e2", &mut fields, &mut v).unwrap_err().starts_with("3 columns"));
        assert!(f.parse_csv(b"1,2.5,-3e2,1,", &mut fields, &mut v).unwrap_err().starts_with("5 columns"));
        assert_eq!(v, TensorValues::F32(vec![]));
    }

    #[test]
    fn csv_fields() {
        assert_eq!(split("1, 2 ,3").unwrap(), vec!["1", "2", "3"]);
        assert_eq!(split("\"a,b\",\"c\"\"d\" ,").unwrap(), vec!["a,b", "c\"\"d", ""]);
        assert_eq!(split("").unwrap(), vec![""]);
        assert!(split("\"open").is_err());
        assert!(split("\"a\"x,1").is_err());
    }

    #[test]
    fn lines_counted_blank_skipped_long_refused() {
        let text = b"\xEF\xBB\xBFa,b\r\n\n  \n1,2\nxxxxxxxxxxxxxxxxxxxx\n3,4";
        let mut r = LineReader::new(&text[..], 10);
        let mut buf = Vec::new();
        let mut seen = Vec::new();
        while let Some(next) = r.next_line(&mut buf).unwrap() {
            match next {
                Next::Line(l) => seen.push((l.number, String::from_utf8(buf[l.start..l.end].to_vec()).unwrap())),
                Next::TooLong(n) => seen.push((n, "<long>".into())),
            }
        }
        assert_eq!(
            seen,
            vec![(1, "a,b".into()), (4, "1,2".into()), (5, "<long>".into()), (6, "3,4".into())]
        );
        assert_eq!(r.offset(), text.len() as u64);
    }

    #[test]
    fn row_errors_name_the_column() {
        let header = vec!["x".to_string(), "y".to_string(), "label".to_string()];
        let f = RowFormat { features: 2, label: true, header: Some(&header) };
        let mut v = TensorValues::F32(Vec::new());
        let mut fields = Vec::new();
        assert_eq!(f.parse_csv(b"1,2.5,1", &mut fields, &mut v), Ok(Some(1.0)));
        assert_eq!(f.parse_csv(b"1,abc,1", &mut fields, &mut v).unwrap_err(), "column 2 (\"y\"): \"abc\" is not a number");
        assert_eq!(f.parse_csv(b"1,NaN,1", &mut fields, &mut v).unwrap_err(), "column 2 (\"y\"): NaN is not a finite number");
        assert_eq!(f.parse_csv(b"1,,1", &mut fields, &mut v).unwrap_err(), "column 2 (\"y\"): empty field");
        assert!(f.parse_csv(b"1,2", &mut fields, &mut v).unwrap_err().starts_with("2 columns, expected 3"));
        assert_eq!(v, TensorValues::F32(vec![1.0, 2.5]), "failed rows leave nothing behind");
        let j = RowFormat { features: 2, label: false, header: None };
        let mut v = TensorValues::I64(Vec::new());
        assert_eq!(j.parse_json(br#"{"features":[1,2],"id":"a"}"#, &mut v), Ok((None, Some(serde_json::json!("a")))));
        assert!(j.parse_json(b"[1,2.5]", &mut v).unwrap_err().contains("not an integer"));
        assert!(j.parse_json(b"[1,2", &mut v).is_err());
        assert_eq!(v, TensorValues::I64(vec![1, 2]));
    }
}
