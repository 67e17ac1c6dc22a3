//! A small CSV reader for the data files operators hand to Outpost:
//! reference data for drift sketches, test data for publish gates and
//! bundle self-tests.
//!
//! The format is the one DESIGN.md fixes, no more:
//!
//! - comma-separated, UTF-8 (a leading byte-order mark is ignored), `\n` or
//!   `\r\n` line ends, blank lines skipped;
//! - **one sample per line**; fields may be double-quoted (`""` inside quotes
//!   is a quote), but a quoted field cannot span lines;
//! - an **optional header**: the first line is a header if any of its fields
//!   is not a number; without one, features are named `f0`, `f1`, … and the
//!   label `label`;
//! - every field a number as Rust's `f32` parser reads it (`1`, `-2.5e3`,
//!   `NaN`, `inf`); an **empty feature field is a missing value (NaN)**, which
//!   drift sketches count separately; a label may not be empty;
//! - with [`LabelColumn::Last`], the last column is the label. Labels that are
//!   all integers become [`Labels::Classes`], otherwise [`Labels::Values`].
//!
//! Files larger than [`MAX_CSV_BYTES`] (256 MiB) are refused before reading:
//! a device-class tool should not try to hold more in memory, and a
//! reference sample of that size says nothing a smaller one does not.
//!
//! Errors name the file, the 1-based line and column (and the column's
//! header name when there is one).

use std::io::Read;
use std::path::{Path, PathBuf};

/// Largest CSV file [`read_csv`] accepts, in bytes.
pub const MAX_CSV_BYTES: u64 = 256 * 1024 * 1024;

/// Whether the last column is a label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LabelColumn {
    Last,
    None,
}

/// Labels, one per row.
#[derive(Clone, Debug, PartialEq)]
pub enum Labels {
    /// Every label was an integer (class labels).
    Classes(Vec<i64>),
    /// At least one label had a fraction (regression targets).
    Values(Vec<f32>),
}

impl Labels {
    pub fn len(&self) -> usize {
        match self {
            Labels::Classes(v) => v.len(),
            Labels::Values(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every label as f32 (class labels beyond 2^24 lose precision).
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            Labels::Classes(v) => v.iter().map(|x| *x as f32).collect(),
            Labels::Values(v) => v.clone(),
        }
    }
}

/// A parsed CSV file.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// From the header, or `f0`, `f1`, … without one.
    pub feature_names: Vec<String>,
    /// One row per sample, `feature_names.len()` values each.
    pub rows: Vec<Vec<f32>>,
    /// With [`LabelColumn::Last`]: one label per row.
    pub labels: Option<Labels>,
    /// The label column's header name (`label` without a header).
    pub label_name: Option<String>,
    pub had_header: bool,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn n_features(&self) -> usize {
        self.feature_names.len()
    }

    /// The rows as one row-major buffer (`len() × n_features()`), the shape
    /// a batched model input wants.
    pub fn flat(&self) -> Vec<f32> {
        self.rows.iter().flatten().copied().collect()
    }

    /// One feature's values.
    pub fn column(&self, j: usize) -> Option<Vec<f32>> {
        (j < self.n_features()).then(|| self.rows.iter().map(|r| r[j]).collect())
    }
}

/// Why a CSV file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {size} bytes is over the {limit}-byte limit for CSV files")]
    TooLarge { path: PathBuf, size: u64, limit: u64 },
    #[error("{path}: not UTF-8 text (line {line})")]
    Encoding { path: PathBuf, line: usize },
    #[error("{path}: no data rows")]
    Empty { path: PathBuf },
    #[error("{path}: line {line}: {found} columns, expected {expected} (as on line {first_line})")]
    Width { path: PathBuf, line: usize, expected: usize, found: usize, first_line: usize },
    #[error("{path}: line {line}, column {column}{name}: {value:?} is not a number", name = fmt_name(name))]
    NotANumber { path: PathBuf, line: usize, column: usize, name: Option<String>, value: String },
    #[error("{path}: line {line}, column {column}{name}: the label is empty", name = fmt_name(name))]
    EmptyLabel { path: PathBuf, line: usize, column: usize, name: Option<String> },
    #[error("{path}: line {line}: unterminated quoted field")]
    Quote { path: PathBuf, line: usize },
    #[error("{path}: a label column needs at least one feature column besides it")]
    NoFeatures { path: PathBuf },
}

fn fmt_name(name: &Option<String>) -> String {
    name.as_ref().map(|n| format!(" ({n:?})")).unwrap_or_default()
}

/// Read a CSV file (see the [module docs](self) for the format).
pub fn read_csv(path: impl AsRef<Path>, label: LabelColumn) -> Result<Dataset, DatasetError> {
    read_csv_with_limit(path, label, MAX_CSV_BYTES)
}

/// [`read_csv`] with a different size limit in bytes.
pub fn read_csv_with_limit(path: impl AsRef<Path>, label: LabelColumn, limit: u64) -> Result<Dataset, DatasetError> {
    let path = path.as_ref();
    let io = |source| DatasetError::Io { path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    if size > limit {
        return Err(DatasetError::TooLarge { path: path.to_path_buf(), size, limit });
    }
    // The file may grow between the check and the read; read at most one
    // byte past the limit to tell.
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(limit + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > limit {
        return Err(DatasetError::TooLarge { path: path.to_path_buf(), size: bytes.len() as u64, limit });
    }
    let text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let good = &e.as_bytes()[..e.utf8_error().valid_up_to()];
            let line = good.iter().filter(|b| **b == b'\n').count() + 1;
            return Err(DatasetError::Encoding { path: path.to_path_buf(), line });
        }
    };
    parse_csv(&text, path, label)
}

/// Parse CSV text; `source` names it in errors.
pub fn parse_csv(text: &str, source: impl AsRef<Path>, label: LabelColumn) -> Result<Dataset, DatasetError> {
    let path = source.as_ref().to_path_buf();
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);

    let mut header: Option<Vec<String>> = None;
    let mut width: Option<(usize, usize)> = None; // (columns, first line)
    let mut rows = Vec::new();
    let mut raw_labels: Vec<f32> = Vec::new();
    let mut fields = Vec::new();

    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        split_fields(line, &mut fields).ok_or_else(|| DatasetError::Quote { path: path.clone(), line: line_no })?;

        if width.is_none() && header.is_none() {
            // The first non-blank line: a header if any field is not a
            // number (an empty field counts as a missing number).
            let is_header = fields.iter().any(|f| !f.is_empty() && f.parse::<f32>().is_err());
            if is_header {
                width = Some((fields.len(), line_no));
                header = Some(fields.clone());
                continue;
            }
        }
        let (expected, first_line) = *width.get_or_insert((fields.len(), line_no));
        if fields.len() != expected {
            return Err(DatasetError::Width { path, line: line_no, expected, found: fields.len(), first_line });
        }
        let n_feat = match label {
            LabelColumn::Last if expected < 2 => return Err(DatasetError::NoFeatures { path }),
            LabelColumn::Last => expected - 1,
            LabelColumn::None => expected,
        };
        let name_of = |j: usize| header.as_ref().and_then(|h| h.get(j).cloned());
        let mut row = Vec::with_capacity(n_feat);
        for (j, f) in fields.iter().enumerate() {
            let is_label = j == n_feat;
            let value = if f.is_empty() {
                if is_label {
                    return Err(DatasetError::EmptyLabel { path, line: line_no, column: j + 1, name: name_of(j) });
                }
                f32::NAN
            } else {
                f.parse::<f32>().map_err(|_| DatasetError::NotANumber {
                    path: path.clone(),
                    line: line_no,
                    column: j + 1,
                    name: name_of(j),
                    value: f.clone(),
                })?
            };
            if is_label {
                raw_labels.push(value);
            } else {
                row.push(value);
            }
        }
        rows.push(row);
    }

    let Some((columns, _)) = width else {
        return Err(DatasetError::Empty { path });
    };
    if rows.is_empty() {
        return Err(DatasetError::Empty { path });
    }
    let n_feat = if label == LabelColumn::Last { columns - 1 } else { columns };
    let (feature_names, label_name) = match &header {
        Some(h) => (h[..n_feat].to_vec(), (label == LabelColumn::Last).then(|| h[n_feat].clone())),
        None => ((0..n_feat).map(|j| format!("f{j}")).collect(), (label == LabelColumn::Last).then(|| "label".to_string())),
    };
    let labels = (label == LabelColumn::Last).then(|| {
        // Integers exactly representable in f32 and in i64 are classes.
        let integral = raw_labels.iter().all(|x| x.is_finite() && x.fract() == 0.0 && x.abs() < 9.0e18);
        if integral {
            Labels::Classes(raw_labels.iter().map(|x| *x as i64).collect())
        } else {
            Labels::Values(raw_labels)
        }
    });
    Ok(Dataset { feature_names, rows, labels, label_name, had_header: header.is_some() })
}

/// Split one line into trimmed fields, honouring double quotes. `None` on an
/// unterminated quote.
fn split_fields(line: &str, out: &mut Vec<String>) -> Option<()> {
    out.clear();
    let mut field = String::new();
    let mut chars = line.chars().peekable();
    let mut quoted = false;
    let mut was_quoted = false;
    while let Some(c) = chars.next() {
        if quoted {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    field.push('"');
                    chars.next();
                } else {
                    quoted = false;
                }
            } else {
                field.push(c);
            }
        } else if c == '"' && field.trim().is_empty() {
            field.clear();
            quoted = true;
            was_quoted = true;
        } else if c == ',' {
            out.push(finish(&field, was_quoted));
            field.clear();
            was_quoted = false;
        } else {
            field.push(c);
        }
    }
    if quoted {
        return None;
    }
    out.push(finish(&field, was_quoted));
    Some(())
}

fn finish(field: &str, quoted: bool) -> String {
    // Quoted content is kept as written; bare fields are trimmed.
    if quoted {
        field.to_string()
    } else {
        field.trim().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_detected_and_labels_are_classes() {
        let d = parse_csv("\u{feff}\"mean radius\",b,target\r\n1.5,2,0\r\n\r\n3,4,1\n", "t.csv", LabelColumn::Last).unwrap();
        assert!(d.had_header);
        assert_eq!(d.feature_names, vec!["mean radius", "b"]);
        assert_eq!(d.rows, vec![vec![1.5, 2.0], vec![3.0, 4.0]]);
        assert_eq!(d.labels, Some(Labels::Classes(vec![0, 1])));
        assert_eq!(d.label_name.as_deref(), Some("target"));
    }

    #[test]
    fn no_header_and_regression_labels() {
        let d = parse_csv("1,2,0.5\n3,,1\n", "t.csv", LabelColumn::Last).unwrap();
        assert!(!d.had_header);
        assert_eq!(d.feature_names, vec!["f0", "f1"]);
        assert!(d.rows[1][1].is_nan());
        assert_eq!(d.labels, Some(Labels::Values(vec![0.5, 1.0])));
        let d = parse_csv("1,2\n", "t.csv", LabelColumn::None).unwrap();
        assert_eq!(d.labels, None);
        assert_eq!(d.rows, vec![vec![1.0, 2.0]]);
    }

    #[test]
    fn errors_name_line_and_column() {
        let e = parse_csv("a,b\n1,2\n3,x\n", "t.csv", LabelColumn::None).unwrap_err();
        assert_eq!(e.to_string(), "t.csv: line 3, column 2 (\"b\"): \"x\" is not a number");
        let e = parse_csv("1,2\n3\n", "t.csv", LabelColumn::None).unwrap_err();
        assert_eq!(e.to_string(), "t.csv: line 2: 1 columns, expected 2 (as on line 1)");
        let e = parse_csv("1,2\n3,\n", "t.csv", LabelColumn::Last).unwrap_err();
        assert!(matches!(e, DatasetError::EmptyLabel { line: 2, column: 2, .. }));
        let e = parse_csv("a,b\n", "t.csv", LabelColumn::None).unwrap_err();
        assert!(matches!(e, DatasetError::Empty { .. }));
        let e = parse_csv("1\n", "t.csv", LabelColumn::Last).unwrap_err();
        assert!(matches!(e, DatasetError::NoFeatures { .. }));
        let e = parse_csv("\"a,b\n", "t.csv", LabelColumn::None).unwrap_err();
        assert!(matches!(e, DatasetError::Quote { line: 1, .. }));
    }

    #[test]
    fn size_limit_is_enforced() {
        let dir = std::env::temp_dir().join(format!("outpost-dataset-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("big.csv");
        std::fs::write(&p, "1,2\n3,4\n").unwrap();
        assert!(matches!(read_csv_with_limit(&p, LabelColumn::None, 4), Err(DatasetError::TooLarge { .. })));
        assert_eq!(read_csv(&p, LabelColumn::None).unwrap().len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
