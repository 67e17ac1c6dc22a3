//! Self-test vectors: a few inputs and the outputs the runtime produced for
//! them when the bundle was made. A device runs them after loading a new
//! model and before it switches traffic to it, and again during probation:
//! a model that loads but computes something else (a bad conversion, a
//! miscompiled kernel, a corrupted slot) is caught before it serves.
//!
//! # Comparison rule
//!
//! Output count, shapes and element types must match exactly. Values match
//! when `|actual − expected| ≤ absolute + relative · |expected|`, computed in
//! f64 for every element type — so integer outputs (class labels) must be
//! equal whenever `absolute < 1`, and NaN matches only NaN. The tolerance
//! exists because the device's CPU (ARM NEON) and the bundling machine's
//! (x86 AVX) sum floats in different orders.

use std::fmt::Display;

use serde::{Deserialize, Serialize};

use super::Limits;
use crate::tensor::TensorData;

/// How far a device's output may be from the recorded one.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tolerance {
    pub absolute: f32,
    pub relative: f32,
}

impl Default for Tolerance {
    /// 1e-4 absolute plus 1e-3 relative: far above float reordering noise
    /// (~1e-6 for a small MLP), far below any real change of the model.
    fn default() -> Tolerance {
        Tolerance { absolute: 1e-4, relative: 1e-3 }
    }
}

impl Tolerance {
    pub fn allows(&self, expected: f64, actual: f64) -> bool {
        if expected.is_nan() || actual.is_nan() {
            return expected.is_nan() && actual.is_nan();
        }
        if expected.is_infinite() || actual.is_infinite() {
            return expected == actual;
        }
        (actual - expected).abs() <= self.absolute as f64 + self.relative as f64 * expected.abs()
    }
}

/// One input set and the outputs expected for it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SelfTestVector {
    /// One tensor per model input, in the model's input order.
    pub inputs: Vec<TensorData>,
    /// One tensor per model output, in the model's output order.
    pub expected: Vec<TensorData>,
}

/// The self-test a manifest carries.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SelfTest {
    pub tolerance: Tolerance,
    pub vectors: Vec<SelfTestVector>,
}

/// Why a self-test failed.
#[derive(Debug, thiserror::Error)]
pub enum SelfTestError {
    #[error("self-test vector {vector}: the model failed to run: {reason}")]
    Run { vector: usize, reason: String },
    #[error("self-test vector {vector}: {got} outputs, expected {expected}")]
    OutputCount { vector: usize, expected: usize, got: usize },
    #[error("self-test vector {vector}, output {output}: shape {got:?}/{got_type}, expected {expected:?}/{expected_type}")]
    Shape {
        vector: usize,
        output: usize,
        expected: Vec<usize>,
        expected_type: crate::tensor::ElementType,
        got: Vec<usize>,
        got_type: crate::tensor::ElementType,
    },
    #[error("self-test vector {vector}, output {output}, value {index}: got {got}, expected {expected} (tolerance {tolerance:?})")]
    Value { vector: usize, output: usize, index: usize, expected: f64, got: f64, tolerance: Tolerance },
}

impl SelfTest {
    /// Runs every vector through `run` (typically `|inputs| model.run(inputs)`)
    /// and compares the outputs.
    ///
    /// ```
    /// use outpost_runtime::bundle::{SelfTest, SelfTestVector, Tolerance};
    /// use outpost_runtime::tensor::TensorData;
    /// let x = TensorData::f32(vec![1, 2], vec![1.0, 2.0]).unwrap();
    /// let y = TensorData::f32(vec![1, 1], vec![3.0]).unwrap();
    /// let test = SelfTest { tolerance: Tolerance::default(), vectors: vec![SelfTestVector { inputs: vec![x], expected: vec![y] }] };
    /// // A "model" that sums its input row.
    /// let sum = |inputs: Vec<TensorData>| -> Result<Vec<TensorData>, String> {
    ///     let v = inputs[0].values.to_f64_vec();
    ///     Ok(vec![TensorData::f32(vec![1, 1], vec![v.iter().sum::<f64>() as f32]).unwrap()])
    /// };
    /// test.run(sum).unwrap();
    /// ```
    pub fn run<E: Display>(
        &self,
        mut run: impl FnMut(Vec<TensorData>) -> Result<Vec<TensorData>, E>,
    ) -> Result<(), SelfTestError> {
        for (i, vector) in self.vectors.iter().enumerate() {
            let outputs =
                run(vector.inputs.clone()).map_err(|e| SelfTestError::Run { vector: i, reason: e.to_string() })?;
            self.check(i, &vector.expected, &outputs)?;
        }
        Ok(())
    }

    /// Compares one vector's outputs with the expected ones.
    pub fn check(&self, vector: usize, expected: &[TensorData], actual: &[TensorData]) -> Result<(), SelfTestError> {
        if expected.len() != actual.len() {
            return Err(SelfTestError::OutputCount { vector, expected: expected.len(), got: actual.len() });
        }
        for (output, (e, a)) in expected.iter().zip(actual).enumerate() {
            if e.shape != a.shape || e.element_type() != a.element_type() {
                return Err(SelfTestError::Shape {
                    vector,
                    output,
                    expected: e.shape.clone(),
                    expected_type: e.element_type(),
                    got: a.shape.clone(),
                    got_type: a.element_type(),
                });
            }
            let (ev, av) = (e.values.to_f64_vec(), a.values.to_f64_vec());
            if let Some(index) = ev.iter().zip(&av).position(|(x, y)| !self.tolerance.allows(*x, *y)) {
                return Err(SelfTestError::Value {
                    vector,
                    output,
                    index,
                    expected: ev[index],
                    got: av[index],
                    tolerance: self.tolerance,
                });
            }
        }
        Ok(())
    }

    /// Counts and shapes within `limits`, a sane tolerance: checked when
    /// signing and when verifying, since postcard does not check that a
    /// tensor's shape matches its number of values.
    pub fn validate(&self, limits: &Limits) -> Result<(), String> {
        let t = self.tolerance;
        if !(t.absolute.is_finite() && t.relative.is_finite() && t.absolute >= 0.0 && t.relative >= 0.0) {
            return Err(format!("self-test tolerance {t:?} must be finite and not negative"));
        }
        if self.vectors.len() as u64 > limits.self_test_vectors as u64 {
            return Err(format!(
                "{} self-test vectors, the limit is {}",
                self.vectors.len(),
                limits.self_test_vectors
            ));
        }
        let mut values: u64 = 0;
        for (i, v) in self.vectors.iter().enumerate() {
            for t in v.inputs.iter().chain(&v.expected) {
                let product = t.shape.iter().try_fold(1usize, |acc, d| acc.checked_mul(*d));
                if product != Some(t.values.len()) {
                    return Err(format!("self-test vector {i}: shape {:?} does not match {} values", t.shape, t.values.len()));
                }
                values += t.values.len() as u64;
            }
        }
        if values > limits.self_test_values {
            return Err(format!("{values} self-test values, the limit is {}", limits.self_test_values));
        }
        Ok(())
    }
}
