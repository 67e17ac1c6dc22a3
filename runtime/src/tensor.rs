//! Tensors as the rest of Outpost sees them: a shape and a flat, row-major
//! vector of one of the element types devices exchange (f32, i8, u8, i32, i64).
//!
//! tract has its own `Tensor`; this type exists so that the HTTP layer, the
//! bundle format (self-test vectors) and the drift sketches never depend on
//! tract's internals, and so that what crosses the wire is plain serde data.

use serde::{Deserialize, Serialize};

/// Element types a model input or output may have at Outpost's edges.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ElementType {
    F32,
    I8,
    U8,
    I32,
    I64,
}

impl ElementType {
    /// The name the Open Inference Protocol v2 uses (`FP32`, `INT8`, ...).
    pub fn v2_name(self) -> &'static str {
        match self {
            ElementType::F32 => "FP32",
            ElementType::I8 => "INT8",
            ElementType::U8 => "UINT8",
            ElementType::I32 => "INT32",
            ElementType::I64 => "INT64",
        }
    }

    pub fn from_v2_name(name: &str) -> Option<ElementType> {
        Some(match name {
            "FP32" => ElementType::F32,
            "INT8" => ElementType::I8,
            "UINT8" => ElementType::U8,
            "INT32" => ElementType::I32,
            "INT64" => ElementType::I64,
            _ => return None,
        })
    }
}

impl std::fmt::Display for ElementType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            ElementType::F32 => "f32",
            ElementType::I8 => "i8",
            ElementType::U8 => "u8",
            ElementType::I32 => "i32",
            ElementType::I64 => "i64",
        };
        f.write_str(s)
    }
}

/// Name, element type and shape of one model input or output.
/// A `None` dimension is free (typically the batch dimension).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub element_type: ElementType,
    pub shape: Vec<Option<u64>>,
}

impl TensorSpec {
    /// Whether the first dimension is free, i.e. the model takes a batch.
    pub fn has_batch_dim(&self) -> bool {
        matches!(self.shape.first(), Some(None))
    }

    /// Number of elements in one sample (product of all dims but the first),
    /// if they are all fixed and their product fits in `usize`.
    pub fn sample_len(&self) -> Option<usize> {
        self.shape
            .iter()
            .skip(1)
            .try_fold(1usize, |acc, d| d.and_then(|d| usize::try_from(d).ok()).and_then(|d| acc.checked_mul(d)))
    }
}

/// The inputs and outputs of a model, in the model's own order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSignature {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

/// Flat row-major values of one element type.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum TensorValues {
    F32(Vec<f32>),
    I8(Vec<i8>),
    U8(Vec<u8>),
    I32(Vec<i32>),
    I64(Vec<i64>),
}

impl TensorValues {
    pub fn len(&self) -> usize {
        match self {
            TensorValues::F32(v) => v.len(),
            TensorValues::I8(v) => v.len(),
            TensorValues::U8(v) => v.len(),
            TensorValues::I32(v) => v.len(),
            TensorValues::I64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn element_type(&self) -> ElementType {
        match self {
            TensorValues::F32(_) => ElementType::F32,
            TensorValues::I8(_) => ElementType::I8,
            TensorValues::U8(_) => ElementType::U8,
            TensorValues::I32(_) => ElementType::I32,
            TensorValues::I64(_) => ElementType::I64,
        }
    }

    /// Every value as f64 (exact for all element types but very large i64).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        match self {
            TensorValues::F32(v) => v.iter().map(|x| *x as f64).collect(),
            TensorValues::I8(v) => v.iter().map(|x| *x as f64).collect(),
            TensorValues::U8(v) => v.iter().map(|x| *x as f64).collect(),
            TensorValues::I32(v) => v.iter().map(|x| *x as f64).collect(),
            TensorValues::I64(v) => v.iter().map(|x| *x as f64).collect(),
        }
    }
}

/// A tensor: shape plus flat values. `values.len()` equals the product of `shape`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorData {
    pub shape: Vec<usize>,
    pub values: TensorValues,
}

impl TensorData {
    pub fn new(shape: Vec<usize>, values: TensorValues) -> Result<TensorData, ShapeMismatch> {
        // Checked: a shape from a message may claim more than usize holds.
        let expected = shape.iter().try_fold(1usize, |acc, d| acc.checked_mul(*d));
        if expected != Some(values.len()) {
            return Err(ShapeMismatch { shape, len: values.len() });
        }
        Ok(TensorData { shape, values })
    }

    pub fn f32(shape: Vec<usize>, values: Vec<f32>) -> Result<TensorData, ShapeMismatch> {
        TensorData::new(shape, TensorValues::F32(values))
    }

    pub fn element_type(&self) -> ElementType {
        self.values.element_type()
    }

    /// Size of the first dimension (1 for scalars).
    pub fn batch_len(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{len} values do not fill shape {shape:?}")]
pub struct ShapeMismatch {
    pub shape: Vec<usize>,
    pub len: usize,
}
