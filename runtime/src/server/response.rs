//! From model outputs to response bodies.
//!
//! The seed-style answer reads a classifier the way scikit-learn users expect
//! (`predict` and `predict_proba(...).max()`), finding the outputs by type and
//! shape rather than by name (see [`Head`]):
//!
//! - `prediction`: the integer label output; without one, the argmax of the
//!   score output; for a regressor, its value.
//! - `probability`: the largest class probability. A score row that is not a
//!   probability distribution (values outside [0, 1], or not summing to 1)
//!   is read as logits and passed through softmax first, so `probability`
//!   is always a probability. `null` when the model gives no scores.

use std::io::Write as _;

use super::error::push_json_str;
use super::request::Render;
use super::slot::{Deployed, Head};
use crate::tensor::{TensorData, TensorValues};

/// Writes one element as JSON. Non-finite floats become `null` (JSON has no
/// NaN), which a model can produce even from finite input.
pub(crate) fn write_scalar(out: &mut Vec<u8>, v: &TensorValues, i: usize) {
    // Writing to a Vec cannot fail.
    let _ = match v {
        TensorValues::F32(x) => serde_json::to_writer(&mut *out, &x[i]),
        TensorValues::I8(x) => serde_json::to_writer(&mut *out, &x[i]),
        TensorValues::U8(x) => serde_json::to_writer(&mut *out, &x[i]),
        TensorValues::I32(x) => serde_json::to_writer(&mut *out, &x[i]),
        TensorValues::I64(x) => serde_json::to_writer(&mut *out, &x[i]),
    };
}

/// Writes `values[offset..offset + product(shape)]` as a nested array.
pub(crate) fn write_nested(out: &mut Vec<u8>, shape: &[usize], v: &TensorValues, offset: usize) {
    match shape.split_first() {
        None => write_scalar(out, v, offset),
        Some((&n, rest)) => {
            let stride: usize = rest.iter().product();
            out.push(b'[');
            for i in 0..n {
                if i > 0 {
                    out.push(b',');
                }
                write_nested(out, rest, v, offset + i * stride);
            }
            out.push(b']');
        }
    }
}

/// Writes a flat array of `values[start..end]`.
pub(crate) fn write_flat(out: &mut Vec<u8>, v: &TensorValues, start: usize, end: usize) {
    out.push(b'[');
    for i in start..end {
        if i > start {
            out.push(b',');
        }
        write_scalar(out, v, i);
    }
    out.push(b']');
}

fn write_model(out: &mut Vec<u8>, d: &Deployed) {
    let mut s = String::with_capacity(64);
    s.push_str("\"model\":{\"name\":");
    push_json_str(&mut s, &d.info().name);
    s.push_str(",\"version\":");
    push_json_str(&mut s, &d.info().version);
    s.push('}');
    out.extend_from_slice(s.as_bytes());
}

/// Values per row of a tensor whose first dimension is the batch.
fn row_len(t: &TensorData) -> usize {
    t.shape.iter().skip(1).product()
}

fn as_f64(v: &TensorValues, i: usize) -> f64 {
    match v {
        TensorValues::F32(x) => x[i] as f64,
        TensorValues::I8(x) => x[i] as f64,
        TensorValues::U8(x) => x[i] as f64,
        TensorValues::I32(x) => x[i] as f64,
        TensorValues::I64(x) => x[i] as f64,
    }
}

/// (argmax, probability of it) of one score row; see the module docs.
fn best_class(v: &TensorValues, start: usize, len: usize) -> Option<(usize, f64)> {
    if len == 0 {
        return None;
    }
    let row: Vec<f64> = (start..start + len).map(|i| as_f64(v, i)).collect();
    let mut best = 0;
    for (i, x) in row.iter().enumerate() {
        if *x > row[best] || row[best].is_nan() {
            best = i;
        }
    }
    let sum: f64 = row.iter().sum();
    let is_distribution = row.iter().all(|x| (0.0..=1.0).contains(x)) && (sum - 1.0).abs() <= 1e-3;
    let p = if is_distribution {
        row[best]
    } else {
        // Softmax of the largest logit: 1 / sum(exp(x_i - x_max)).
        let denom: f64 = row.iter().map(|x| (x - row[best]).exp()).sum();
        1.0 / denom
    };
    Some((best, p))
}

/// Probabilities are written at f32 precision (what the model computes in):
/// `0.9993987`, not `0.9993987083435059`.
fn write_f64_or_null(out: &mut Vec<u8>, x: Option<f64>) {
    match x {
        Some(x) if x.is_finite() => {
            let _ = serde_json::to_writer(&mut *out, &(x as f32));
        }
        _ => out.extend_from_slice(b"null"),
    }
}

/// `prediction` and `probability` of row `r`, written as `"prediction":…,"probability":…`.
fn write_prediction(out: &mut Vec<u8>, d: &Deployed, outputs: &[TensorData], r: usize) {
    out.extend_from_slice(b"\"prediction\":");
    write_row_prediction(out, d, outputs, r);
    out.extend_from_slice(b",\"probability\":");
    write_f64_or_null(out, row_probability(d, outputs, r));
}

fn write_row_prediction(out: &mut Vec<u8>, d: &Deployed, outputs: &[TensorData], r: usize) {
    match d.layout().head {
        Head::Classifier { label: Some(l), .. } if l < outputs.len() => {
            let t = &outputs[l];
            write_scalar(out, &t.values, r * row_len(t));
        }
        Head::Classifier { label: None, scores: Some(s) } if s < outputs.len() => {
            let t = &outputs[s];
            let n = row_len(t);
            match best_class(&t.values, r * n, n) {
                Some((class, _)) => {
                    let _ = write!(out, "{class}");
                }
                None => out.extend_from_slice(b"null"),
            }
        }
        Head::Value(v) if v < outputs.len() => {
            let t = &outputs[v];
            write_scalar(out, &t.values, r * row_len(t));
        }
        _ => match outputs.first() {
            Some(t) if !t.shape.is_empty() => write_nested(out, &t.shape[1..], &t.values, r * row_len(t)),
            Some(t) => write_nested(out, &t.shape, &t.values, 0),
            None => out.extend_from_slice(b"null"),
        },
    }
}

fn row_probability(d: &Deployed, outputs: &[TensorData], r: usize) -> Option<f64> {
    match d.layout().head {
        Head::Classifier { scores: Some(s), .. } if s < outputs.len() => {
            let t = &outputs[s];
            let n = row_len(t);
            best_class(&t.values, r * n, n).map(|(_, p)| p)
        }
        _ => None,
    }
}

fn has_scores(d: &Deployed) -> bool {
    matches!(d.layout().head, Head::Classifier { scores: Some(_), .. })
}

/// The answer body of a successful seed-style or named request.
pub(crate) fn render(render: &Render, d: &Deployed, outputs: &[TensorData]) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    match render {
        Render::Predict => {
            out.push(b'{');
            write_prediction(&mut out, d, outputs, 0);
            out.push(b',');
            write_model(&mut out, d);
            out.push(b'}');
        }
        Render::Batch => {
            let rows = outputs.first().and_then(|t| t.shape.first().copied()).unwrap_or(0);
            out.extend_from_slice(b"{\"predictions\":[");
            for r in 0..rows {
                if r > 0 {
                    out.push(b',');
                }
                write_row_prediction(&mut out, d, outputs, r);
            }
            out.push(b']');
            if has_scores(d) {
                out.extend_from_slice(b",\"probabilities\":[");
                for r in 0..rows {
                    if r > 0 {
                        out.push(b',');
                    }
                    write_f64_or_null(&mut out, row_probability(d, outputs, r));
                }
                out.push(b']');
            }
            out.push(b',');
            write_model(&mut out, d);
            out.push(b'}');
        }
        Render::Named { single_sample } => {
            out.extend_from_slice(b"{\"outputs\":{");
            for (i, (t, spec)) in outputs.iter().zip(&d.model().signature().outputs).enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                let mut name = String::new();
                push_json_str(&mut name, &spec.name);
                out.extend_from_slice(name.as_bytes());
                out.push(b':');
                if *single_sample && t.shape.first() == Some(&1) {
                    write_nested(&mut out, &t.shape[1..], &t.values, 0);
                } else {
                    write_nested(&mut out, &t.shape, &t.values, 0);
                }
            }
            out.extend_from_slice(b"},");
            write_model(&mut out, d);
            out.push(b'}');
        }
        // Answered by the v2 module; kept here so callers have one entry point.
        Render::V2(_) => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probabilities_and_logits() {
        let probs = TensorValues::F32(vec![0.2, 0.8]);
        assert_eq!(best_class(&probs, 0, 2), Some((1, 0.800000011920929)));
        let logits = TensorValues::F32(vec![0.0, 0.0, 2.0]);
        let (c, p) = best_class(&logits, 0, 3).unwrap();
        assert_eq!(c, 2);
        assert!((p - (2f64.exp() / (2.0 + 2f64.exp()))).abs() < 1e-9);
    }

    #[test]
    fn nested_writer() {
        let mut out = Vec::new();
        write_nested(&mut out, &[2, 2], &TensorValues::I64(vec![1, 2, 3, 4]), 0);
        assert_eq!(out, b"[[1,2],[3,4]]");
        let mut out = Vec::new();
        write_nested(&mut out, &[2], &TensorValues::F32(vec![0.5, f32::NAN]), 0);
        assert_eq!(out, b"[0.5,null]");
    }
}
