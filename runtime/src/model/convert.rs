//! Conversions between Outpost's [`TensorData`] and tract's tensors, and the
//! edge (de)quantization the runtime performs for models whose graph is int8
//! but whose interface is float (TFLite full-integer models as published).

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::bail;

use super::LoadError;
use crate::tensor::{ElementType, TensorData, TensorSpec, TensorValues};

/// Affine quantization parameters of one edge tensor: `real = (q - zero_point) * scale`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EdgeQuantization {
    pub scale: f32,
    pub zero_point: i32,
    /// The integer type the graph sees (I8 or U8).
    pub element_type: ElementType,
}

impl EdgeQuantization {
    fn quantize(&self, x: f32) -> i32 {
        let (lo, hi) = match self.element_type {
            ElementType::U8 => (0, 255),
            _ => (-128, 127),
        };
        // Same rounding as TFLite's reference QUANTIZE: round half away from zero.
        let q = (x / self.scale).round() as i64 + self.zero_point as i64;
        q.clamp(lo, hi) as i32
    }

    fn dequantize(&self, q: i32) -> f32 {
        (q - self.zero_point) as f32 * self.scale
    }
}

/// What the runtime does to an input before the graph sees it.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub enum InputAdapter {
    /// Passed as it is.
    #[default]
    Direct,
    /// The caller gives f32; the graph takes the quantized integer tensor.
    Quantize(EdgeQuantization),
}

/// What the runtime does to a graph output before the caller sees it.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub enum OutputAdapter {
    #[default]
    Direct,
    /// The graph gives a quantized integer tensor; the caller gets f32.
    Dequantize(EdgeQuantization),
}

fn element_type_of(dt: DatumType) -> Option<ElementType> {
    Some(match dt.unquantized() {
        DatumType::F32 | DatumType::F16 | DatumType::F64 => ElementType::F32,
        DatumType::I8 => ElementType::I8,
        DatumType::U8 | DatumType::Bool => ElementType::U8,
        DatumType::I32 | DatumType::I16 | DatumType::U16 => ElementType::I32,
        // Integer outputs computed from shapes (e.g. class labels picked by
        // ArrayFeatureExtractor) may come out as symbolic dims: they are plain
        // integers once the model runs.
        DatumType::I64 | DatumType::U32 | DatumType::TDim => ElementType::I64,
        _ => return None,
    })
}

pub(super) fn spec_for(
    name: &str,
    fact: &TypedFact,
    adapter_in: &impl EdgeAdapter,
    what: &'static str,
) -> Result<TensorSpec, LoadError> {
    let element_type = if adapter_in.is_float_interface() {
        ElementType::F32
    } else {
        element_type_of(fact.datum_type).ok_or_else(|| LoadError::UnsupportedType {
            what,
            name: name.to_string(),
            element_type: format!("{:?}", fact.datum_type),
        })?
    };
    let shape = fact.shape.iter().map(|d| d.to_i64().ok().map(|d| d as u64)).collect();
    Ok(TensorSpec { name: name.to_string(), element_type, shape })
}

/// Adapters that may turn an integer graph edge into a float interface.
pub(super) trait EdgeAdapter {
    fn is_float_interface(&self) -> bool;
}

impl EdgeAdapter for InputAdapter {
    fn is_float_interface(&self) -> bool {
        matches!(self, InputAdapter::Quantize(_))
    }
}

impl EdgeAdapter for OutputAdapter {
    fn is_float_interface(&self) -> bool {
        matches!(self, OutputAdapter::Dequantize(_))
    }
}

pub(super) fn to_tract(t: &TensorData, dt: DatumType, adapter: &InputAdapter) -> TractResult<Tensor> {
    let mut tensor = match (adapter, &t.values) {
        (InputAdapter::Quantize(q), TensorValues::F32(v)) => match q.element_type {
            ElementType::U8 => {
                let raw: Vec<u8> = v.iter().map(|x| q.quantize(*x) as u8).collect();
                Tensor::from_shape(&t.shape, &raw)?
            }
            _ => {
                let raw: Vec<i8> = v.iter().map(|x| q.quantize(*x) as i8).collect();
                Tensor::from_shape(&t.shape, &raw)?
            }
        },
        (InputAdapter::Quantize(_), _) => bail!("quantized input expects f32 values"),
        (InputAdapter::Direct, TensorValues::F32(v)) => Tensor::from_shape(&t.shape, v)?,
        (InputAdapter::Direct, TensorValues::I8(v)) => Tensor::from_shape(&t.shape, v)?,
        (InputAdapter::Direct, TensorValues::U8(v)) => Tensor::from_shape(&t.shape, v)?,
        (InputAdapter::Direct, TensorValues::I32(v)) => Tensor::from_shape(&t.shape, v)?,
        (InputAdapter::Direct, TensorValues::I64(v)) => Tensor::from_shape(&t.shape, v)?,
    };
    if tensor.datum_type() != dt {
        if tensor.datum_type() == dt.unquantized() {
            // Same bits, only the quantization parameters are attached.
            unsafe { tensor.set_datum_type(dt) };
        } else {
            tensor = tensor.cast_to_dt(dt)?.into_owned();
        }
    }
    Ok(tensor)
}

fn plain<T: Datum + Copy>(t: &Tensor) -> TractResult<Vec<T>> {
    Ok(t.to_plain_array_view::<T>()?.iter().copied().collect())
}

pub(super) fn from_tract(v: &TValue, adapter: &OutputAdapter) -> TractResult<TensorData> {
    let t: &Tensor = v;
    let shape = t.shape().to_vec();
    let dt = t.datum_type();
    let values = if let OutputAdapter::Dequantize(q) = adapter {
        let raw: Vec<i32> = match dt.unquantized() {
            DatumType::U8 => plain::<u8>(t)?.into_iter().map(i32::from).collect(),
            DatumType::I8 => plain::<i8>(t)?.into_iter().map(i32::from).collect(),
            other => bail!("dequantized output expects an 8-bit tensor, got {other:?}"),
        };
        TensorValues::F32(raw.into_iter().map(|x| q.dequantize(x)).collect())
    } else {
        match dt.unquantized() {
            DatumType::F32 => TensorValues::F32(plain::<f32>(t)?),
            DatumType::F16 | DatumType::F64 => {
                TensorValues::F32(plain::<f32>(t.cast_to::<f32>()?.as_ref())?)
            }
            DatumType::I8 => TensorValues::I8(plain::<i8>(t)?),
            DatumType::U8 => TensorValues::U8(plain::<u8>(t)?),
            DatumType::Bool => {
                TensorValues::U8(plain::<bool>(t)?.into_iter().map(u8::from).collect())
            }
            DatumType::I32 => TensorValues::I32(plain::<i32>(t)?),
            DatumType::I16 | DatumType::U16 => {
                TensorValues::I32(plain::<i32>(t.cast_to::<i32>()?.as_ref())?)
            }
            DatumType::I64 => TensorValues::I64(plain::<i64>(t)?),
            DatumType::U32 | DatumType::TDim => {
                TensorValues::I64(plain::<i64>(t.cast_to::<i64>()?.as_ref())?)
            }
            other => bail!("output of type {other:?} cannot be returned"),
        }
    };
    Ok(TensorData { shape, values })
}

pub(super) fn shape_display(shape: &[Option<u64>]) -> String {
    let dims: Vec<String> = shape
        .iter()
        .map(|d| d.map(|d| d.to_string()).unwrap_or_else(|| "N".into()))
        .collect();
    format!("[{}]", dims.join(", "))
}

fn slice_values(values: &TensorValues, start: usize, end: usize) -> TensorValues {
    match values {
        TensorValues::F32(v) => TensorValues::F32(v[start..end].to_vec()),
        TensorValues::I8(v) => TensorValues::I8(v[start..end].to_vec()),
        TensorValues::U8(v) => TensorValues::U8(v[start..end].to_vec()),
        TensorValues::I32(v) => TensorValues::I32(v[start..end].to_vec()),
        TensorValues::I64(v) => TensorValues::I64(v[start..end].to_vec()),
    }
}

/// Rows `[from, to)` of the first axis. The caller has checked the shape.
pub(super) fn slice_rows(t: &TensorData, from: usize, to: usize) -> TensorData {
    let row_len: usize = t.shape.iter().skip(1).product();
    let mut shape = t.shape.clone();
    if let Some(first) = shape.first_mut() {
        *first = to - from;
    }
    TensorData { shape, values: slice_values(&t.values, from * row_len, to * row_len) }
}

fn extend_values(acc: &mut TensorValues, more: TensorValues) -> Result<(), String> {
    match (acc, more) {
        (TensorValues::F32(a), TensorValues::F32(b)) => a.extend(b),
        (TensorValues::I8(a), TensorValues::I8(b)) => a.extend(b),
        (TensorValues::U8(a), TensorValues::U8(b)) => a.extend(b),
        (TensorValues::I32(a), TensorValues::I32(b)) => a.extend(b),
        (TensorValues::I64(a), TensorValues::I64(b)) => a.extend(b),
        _ => return Err("rows of one output have different element types".into()),
    }
    Ok(())
}

/// Concatenates per-row outputs along the first axis.
pub(super) fn stack_rows(rows: Vec<Vec<TensorData>>) -> Result<Vec<TensorData>, String> {
    let mut rows = rows.into_iter();
    let Some(first) = rows.next() else { return Ok(vec![]) };
    let mut stacked: Vec<TensorData> = first
        .into_iter()
        .map(|mut t| {
            if t.shape.is_empty() {
                t.shape = vec![1];
            }
            t
        })
        .collect();
    for row in rows {
        if row.len() != stacked.len() {
            return Err("rows have different numbers of outputs".into());
        }
        for (acc, t) in stacked.iter_mut().zip(row) {
            let rows_in = t.shape.first().copied().unwrap_or(1);
            if acc.shape.get(1..) != Some(t.shape.get(1..).unwrap_or(&[])) {
                return Err(format!("row output shape {:?} differs from {:?}", t.shape, acc.shape));
            }
            extend_values(&mut acc.values, t.values)?;
            acc.shape[0] += rows_in;
        }
    }
    Ok(stacked)
}
