//! From model outputs to output rows, and the prediction each row is scored
//! by when the input has labels.
//!
//! Which outputs make `prediction` and `probability` is decided from the
//! signature the way `POST /predict` decides it (see
//! [`crate::server::response`]): an integer output with one value per row
//! is a class label, a float `[N, C]` output holds class scores, a float
//! with one value per row is a regressor's value.

use std::io::Write as _;

use crate::model::Model;
use crate::tensor::{ElementType, TensorData, TensorSpec, TensorValues};

/// Which outputs the seed-style columns come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Head {
    Classifier { label: Option<usize>, scores: Option<usize> },
    Value(usize),
    Raw,
}

fn batch_first(spec: &TensorSpec) -> bool {
    matches!(spec.shape.first(), Some(None) | Some(Some(1)))
}

fn one_per_row(spec: &TensorSpec) -> bool {
    batch_first(spec) && (spec.shape.len() == 1 || (spec.shape.len() == 2 && spec.shape[1] == Some(1)))
}

pub(crate) fn head_of(outputs: &[TensorSpec]) -> Head {
    let label =
        outputs.iter().position(|o| matches!(o.element_type, ElementType::I64 | ElementType::I32) && one_per_row(o));
    let scores = outputs.iter().position(|o| {
        o.element_type == ElementType::F32 && batch_first(o) && o.shape.len() == 2 && !matches!(o.shape[1], Some(0) | Some(1))
    });
    if label.is_some() || scores.is_some() {
        return Head::Classifier { label, scores };
    }
    match outputs.iter().position(|o| o.element_type == ElementType::F32 && one_per_row(o)) {
        Some(ix) => Head::Value(ix),
        None => Head::Raw,
    }
}

/// What the summary scores labelled rows by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Metric {
    Accuracy,
    MeanAbsError,
    None,
}

/// How output rows are written; built once per job.
pub(crate) struct OutputPlan {
    pub head: Head,
    /// Write every output flattened (`--all-outputs`, or a model with no
    /// classifier/regressor head).
    pub all: bool,
    /// Output names, and how many values each gives per row (for the CSV
    /// header; from a probe run, since a signature may leave them free).
    pub outputs: Vec<(String, usize)>,
}

impl OutputPlan {
    /// `probe`: the outputs of one row, if a probe run succeeded.
    pub fn new(model: &Model, probe: Option<&[TensorData]>, all_outputs: bool) -> OutputPlan {
        let specs = &model.signature().outputs;
        let head = head_of(specs);
        let outputs = specs
            .iter()
            .enumerate()
            .map(|(ix, spec)| {
                let from_probe = probe.and_then(|p| p.get(ix)).map(|t| t.values.len());
                let from_spec = spec.shape.iter().skip(usize::from(batch_first(spec))).try_fold(1usize, |a, d| d.map(|d| a * d as usize));
                (spec.name.clone(), from_probe.or(from_spec).unwrap_or(1))
            })
            .collect();
        OutputPlan { head, all: all_outputs || head == Head::Raw, outputs }
    }

    pub fn metric(&self) -> Metric {
        match self.head {
            Head::Classifier { .. } => Metric::Accuracy,
            Head::Value(_) => Metric::MeanAbsError,
            Head::Raw => Metric::None,
        }
    }

    fn has_probability(&self) -> bool {
        matches!(self.head, Head::Classifier { scores: Some(_), .. })
    }

    /// The CSV header line, `\n` included.
    pub fn csv_header(&self) -> String {
        let mut cols = vec!["line".to_string()];
        if self.all {
            for (name, len) in &self.outputs {
                if *len == 1 {
                    cols.push(csv_field(name));
                } else {
                    cols.extend((0..*len).map(|i| csv_field(&format!("{name}_{i}"))));
                }
            }
        } else {
            cols.push("prediction".into());
            if self.has_probability() {
                cols.push("probability".into());
            }
        }
        let mut s = cols.join(",");
        s.push('\n');
        s
    }

    /// The prediction of row `r` as a number (for accuracy / error).
    pub fn predicted(&self, outputs: &[TensorData], r: usize, rows: usize) -> Option<f64> {
        match self.head {
            Head::Classifier { label: Some(l), .. } => value_f64(&outputs.get(l)?.values, r * row_len(outputs.get(l)?, rows)),
            Head::Classifier { label: None, scores: Some(s) } => {
                let t = outputs.get(s)?;
                let n = row_len(t, rows);
                best_class(&t.values, r * n, n).map(|(c, _)| c as f64)
            }
            Head::Value(v) => value_f64(&outputs.get(v)?.values, r * row_len(outputs.get(v)?, rows)),
            _ => None,
        }
    }

    fn probability(&self, outputs: &[TensorData], r: usize, rows: usize) -> Option<f64> {
        match self.head {
            Head::Classifier { scores: Some(s), .. } => {
                let t = outputs.get(s)?;
                let n = row_len(t, rows);
                best_class(&t.values, r * n, n).map(|(_, p)| p)
            }
            _ => None,
        }
    }

    /// Appends the CSV line of row `r` of a run over `rows` rows.
    pub fn write_csv(&self, out: &mut Vec<u8>, line: u64, outputs: &[TensorData], r: usize, rows: usize) {
        let _ = write!(out, "{line}");
        if self.all {
            for t in outputs {
                let n = row_len(t, rows);
                for i in r * n..(r + 1) * n {
                    out.push(b',');
                    write_csv_scalar(out, &t.values, i);
                }
            }
        } else {
            out.push(b',');
            self.write_prediction(out, outputs, r, rows, false);
            if self.has_probability() {
                out.push(b',');
                match self.probability(outputs, r, rows) {
                    Some(p) if p.is_finite() => write_f32(out, p as f32),
                    _ => {}
                }
            }
        }
        out.push(b'\n');
    }

    /// Appends the JSON line of row `r`: `{"line", "id"?, "prediction",
    /// "probability"}` or `{"line", "id"?, "outputs": {name: values}}`.
    pub fn write_json(
        &self,
        out: &mut Vec<u8>,
        line: u64,
        id: Option<&serde_json::Value>,
        outputs: &[TensorData],
        r: usize,
        rows: usize,
    ) {
        let _ = write!(out, "{{\"line\":{line}");
        if let Some(id) = id {
            out.extend_from_slice(b",\"id\":");
            let _ = serde_json::to_writer(&mut *out, id);
        }
        if self.all {
            out.extend_from_slice(b",\"outputs\":{");
            for (k, (t, (name, _))) in outputs.iter().zip(&self.outputs).enumerate() {
                if k > 0 {
                    out.push(b',');
                }
                let _ = serde_json::to_writer(&mut *out, name);
                out.push(b':');
                let n = row_len(t, rows);
                if n == 1 {
                    write_json_scalar(out, &t.values, r);
                } else {
                    out.push(b'[');
                    for i in r * n..(r + 1) * n {
                        if i > r * n {
                            out.push(b',');
                        }
                        write_json_scalar(out, &t.values, i);
                    }
                    out.push(b']');
                }
            }
            out.push(b'}');
        } else {
            out.extend_from_slice(b",\"prediction\":");
            self.write_prediction(out, outputs, r, rows, true);
            if self.has_probability() {
                out.extend_from_slice(b",\"probability\":");
                match self.probability(outputs, r, rows) {
                    Some(p) if p.is_finite() => write_f32(out, p as f32),
                    _ => out.extend_from_slice(b"null"),
                }
            }
        }
        out.extend_from_slice(b"}\n");
    }

    fn write_prediction(&self, out: &mut Vec<u8>, outputs: &[TensorData], r: usize, rows: usize, json: bool) {
        let scalar = |out: &mut Vec<u8>, t: &TensorData| {
            let i = r * row_len(t, rows);
            if json {
                write_json_scalar(out, &t.values, i)
            } else {
                write_csv_scalar(out, &t.values, i)
            }
        };
        match self.head {
            Head::Classifier { label: Some(l), .. } if l < outputs.len() => scalar(out, &outputs[l]),
            Head::Classifier { label: None, scores: Some(s) } if s < outputs.len() => {
                let t = &outputs[s];
                let n = row_len(t, rows);
                match best_class(&t.values, r * n, n) {
                    Some((c, _)) => {
                        let _ = write!(out, "{c}");
                    }
                    None if json => out.extend_from_slice(b"null"),
                    None => {}
                }
            }
            Head::Value(v) if v < outputs.len() => scalar(out, &outputs[v]),
            _ if json => out.extend_from_slice(b"null"),
            _ => {}
        }
    }
}

/// Values per row of an output of a run over `rows` rows.
fn row_len(t: &TensorData, rows: usize) -> usize {
    t.values.len() / rows.max(1)
}

fn value_f64(v: &TensorValues, i: usize) -> Option<f64> {
    Some(match v {
        TensorValues::F32(x) => *x.get(i)? as f64,
        TensorValues::I8(x) => *x.get(i)? as f64,
        TensorValues::U8(x) => *x.get(i)? as f64,
        TensorValues::I32(x) => *x.get(i)? as f64,
        TensorValues::I64(x) => *x.get(i)? as f64,
    })
}

/// (argmax, its probability) of one score row: the scores themselves when
/// they are a distribution, else their softmax — as `POST /predict` reads them.
pub(crate) fn best_class(v: &TensorValues, start: usize, len: usize) -> Option<(usize, f64)> {
    if len == 0 {
        return None;
    }
    let mut best = 0;
    let mut best_x = value_f64(v, start)?;
    let mut sum = 0.0;
    let mut in_unit = true;
    for k in 0..len {
        let x = value_f64(v, start + k)?;
        if x > best_x || best_x.is_nan() {
            best = k;
            best_x = x;
        }
        sum += x;
        in_unit &= (0.0..=1.0).contains(&x);
    }
    if in_unit && (sum - 1.0).abs() <= 1e-3 {
        return Some((best, best_x));
    }
    let mut denom = 0.0;
    for k in 0..len {
        denom += (value_f64(v, start + k)? - best_x).exp();
    }
    Some((best, 1.0 / denom))
}

/// Shortest representation that reads back as the same f32 (ryu, through
/// serde_json): `0.99939865`, not `0.9993986487388611`.
fn write_f32(out: &mut Vec<u8>, x: f32) {
    let _ = serde_json::to_writer(&mut *out, &x);
}

/// A CSV cell: non-finite floats as `NaN`, `inf`, `-inf` (what pandas reads).
fn write_csv_scalar(out: &mut Vec<u8>, v: &TensorValues, i: usize) {
    match v {
        TensorValues::F32(x) if x[i].is_nan() => out.extend_from_slice(b"NaN"),
        TensorValues::F32(x) if x[i].is_infinite() => {
            out.extend_from_slice(if x[i] > 0.0 { b"inf" } else { b"-inf" })
        }
        other => write_json_scalar(out, other, i),
    }
}

/// A JSON value: non-finite floats become `null` (JSON has no NaN).
fn write_json_scalar(out: &mut Vec<u8>, v: &TensorValues, i: usize) {
    crate::server::response::write_scalar(out, v, i)
}

/// A header cell, quoted when it must be.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, t: ElementType, shape: &[Option<u64>]) -> TensorSpec {
        TensorSpec { name: name.into(), element_type: t, shape: shape.to_vec() }
    }

    #[test]
    fn heads_like_the_server() {
        let clf = [spec("label", ElementType::I64, &[None]), spec("p", ElementType::F32, &[None, Some(2)])];
        assert_eq!(head_of(&clf), Head::Classifier { label: Some(0), scores: Some(1) });
        assert_eq!(head_of(&[spec("y", ElementType::F32, &[None, Some(1)])]), Head::Value(0));
        assert_eq!(head_of(&[spec("e", ElementType::F32, &[None, Some(4), Some(4)])]), Head::Raw);
    }

    #[test]
    fn probability_of_distributions_and_logits() {
        assert_eq!(best_class(&TensorValues::F32(vec![0.25, 0.75]), 0, 2), Some((1, 0.75)));
        let (c, p) = best_class(&TensorValues::F32(vec![0.0, 0.0, 2.0]), 0, 3).unwrap();
        assert_eq!(c, 2);
        assert!((p - 2f64.exp() / (2.0 + 2f64.exp())).abs() < 1e-12);
    }

    #[test]
    fn csv_cells() {
        let mut out = Vec::new();
        write_csv_scalar(&mut out, &TensorValues::F32(vec![f32::NAN, 0.1, f32::NEG_INFINITY]), 0);
        write_csv_scalar(&mut out, &TensorValues::F32(vec![f32::NAN, 0.1, f32::NEG_INFINITY]), 1);
        write_csv_scalar(&mut out, &TensorValues::F32(vec![f32::NAN, 0.1, f32::NEG_INFINITY]), 2);
        assert_eq!(out, b"NaN0.1-inf");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
    }
}
