//! Fixed inputs and fixed input shapes: `serve --fix NAME=VALUE` and
//! `serve --shape NAME=D0,D1,…`, carried by [`super::LoadOptions`].
//!
//! Some published models only load once an input is known. An audio model
//! branches (`If`) on its sample rate, and tract can only type an `If` whose
//! branches agree unless the condition is a constant; a detector exported
//! with free height and width has shape arithmetic (`Resize` after strided
//! layers) that tract cannot unify symbolically, but folds at 320×320. So a
//! fixed input becomes a constant *before* tract types and optimizes the
//! graph (the branch folds, the input leaves the served signature), and a
//! fixed shape replaces the model's own dimensions before any symbol is
//! given to them.
//!
//! ONNX is fixed on tract's untyped graph (where an `If` on a constant
//! folds, see `apply_to_onnx`); TFLite, which tract-tflite hands over
//! typed, on the typed graph (`apply_to_typed`).
//!
//! Values are parsed once, from text, into [`FixedInput`]: the element
//! type is only known against a model, so the value keeps what the text
//! said (booleans, integers, or floats) and is converted, with range checks,
//! when the model is loaded.

use std::str::FromStr;

use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::{Factoid, GenericFactoid, InferenceModel, ShapeFactoid};
use tract_onnx::tract_hir::ops::konst::Const;

use super::{LoadError, MAX_SAMPLE_ELEMENTS};

/// Most dimensions a fixed value or a fixed shape may have. No model Outpost
/// serves comes near; it bounds what a caller can make the loader walk.
pub const MAX_FIXED_RANK: usize = 8;

/// An input replaced by a constant before optimization.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FixedInput {
    /// The model's input name.
    pub name: String,
    /// The value's shape: `[]` for a scalar.
    pub shape: Vec<usize>,
    /// The values, row-major.
    pub values: FixedValues,
}

/// A fixed value's elements, as the text gave them.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum FixedValues {
    Bool(Vec<bool>),
    Int(Vec<i64>),
    Float(Vec<f64>),
}

impl FixedValues {
    fn len(&self) -> usize {
        match self {
            FixedValues::Bool(v) => v.len(),
            FixedValues::Int(v) => v.len(),
            FixedValues::Float(v) => v.len(),
        }
    }
}

/// An input whose dimensions are given instead of the model's own.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InputShape {
    pub name: String,
    pub dims: Vec<usize>,
}

/// Why a `NAME=VALUE` or `NAME=D0,D1,…` text is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("{0:?} is not NAME=VALUE")]
    NoName(String),
    #[error("value of {name:?} is not a number, a boolean or a JSON array of them: {reason}")]
    BadValue { name: String, reason: String },
    #[error("shape of {name:?} is not a comma-separated list of positive dimensions: {reason}")]
    BadShape { name: String, reason: String },
}

fn split_spec(text: &str) -> Result<(&str, &str), SpecError> {
    // The last `=`: tensor names may hold one, values and shapes never do.
    match text.rsplit_once('=') {
        Some((name, value)) if !name.trim().is_empty() => Ok((name.trim(), value.trim())),
        _ => Err(SpecError::NoName(text.to_string())),
    }
}

impl FromStr for FixedInput {
    type Err = SpecError;

    /// `NAME=VALUE`: VALUE a JSON number or boolean (a scalar), or a
    /// rectangular JSON array of them.
    fn from_str(text: &str) -> Result<FixedInput, SpecError> {
        let (name, value) = split_spec(text)?;
        let bad = |reason: String| SpecError::BadValue { name: name.to_string(), reason };
        let json: serde_json::Value = serde_json::from_str(value).map_err(|e| bad(e.to_string()))?;
        let mut shape = Vec::new();
        let mut leaves = Vec::new();
        flatten(&json, 0, &mut shape, &mut None, &mut leaves).map_err(bad)?;
        let values = if leaves.iter().all(|v| v.is_boolean()) {
            FixedValues::Bool(leaves.iter().filter_map(|v| v.as_bool()).collect())
        } else if leaves.iter().all(|v| v.as_i64().is_some()) {
            FixedValues::Int(leaves.iter().filter_map(|v| v.as_i64()).collect())
        } else if leaves.iter().all(|v| v.is_number()) {
            FixedValues::Float(leaves.iter().filter_map(|v| v.as_f64()).collect())
        } else {
            return Err(bad("mixes booleans and numbers".into()));
        };
        Ok(FixedInput { name: name.to_string(), shape, values })
    }
}

/// Walks a nested JSON array, recording its shape (checked rectangular) and
/// its leaves in row-major order.
fn flatten<'a>(
    value: &'a serde_json::Value,
    depth: usize,
    shape: &mut Vec<usize>,
    leaf_depth: &mut Option<usize>,
    leaves: &mut Vec<&'a serde_json::Value>,
) -> Result<(), String> {
    match value {
        serde_json::Value::Array(items) => {
            if depth >= MAX_FIXED_RANK {
                return Err(format!("more than {MAX_FIXED_RANK} dimensions"));
            }
            if items.is_empty() {
                return Err("an empty array".into());
            }
            if leaf_depth.is_some_and(|d| d <= depth) {
                return Err("not rectangular: arrays and numbers at the same depth".into());
            }
            match shape.get(depth) {
                None => shape.push(items.len()),
                Some(&len) if len == items.len() => {}
                Some(&len) => return Err(format!("not rectangular: rows of {len} and {} at depth {depth}", items.len())),
            }
            items.iter().try_for_each(|item| flatten(item, depth + 1, shape, leaf_depth, leaves))
        }
        serde_json::Value::Bool(_) | serde_json::Value::Number(_) => {
            match leaf_depth {
                None if shape.len() > depth => return Err("not rectangular: arrays and numbers at the same depth".into()),
                None => *leaf_depth = Some(depth),
                Some(d) if *d != depth => return Err("not rectangular: numbers at different depths".into()),
                Some(_) => {}
            }
            leaves.push(value);
            Ok(())
        }
        other => Err(format!("{} is not a number or a boolean", kind(other))),
    }
}

fn kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Object(_) => "an object",
        _ => "a value",
    }
}

impl FromStr for InputShape {
    type Err = SpecError;

    /// `NAME=D0,D1,…`, each dimension a positive integer.
    fn from_str(text: &str) -> Result<InputShape, SpecError> {
        let (name, dims) = split_spec(text)?;
        let bad = |reason: String| SpecError::BadShape { name: name.to_string(), reason };
        let dims = dims
            .split(',')
            .map(|d| match d.trim().parse::<usize>() {
                Ok(0) => Err(bad("a dimension of 0".into())),
                Ok(d) => Ok(d),
                Err(_) => Err(bad(format!("{:?} is not a positive integer", d.trim()))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if dims.len() > MAX_FIXED_RANK {
            return Err(bad(format!("more than {MAX_FIXED_RANK} dimensions")));
        }
        let elements = dims.iter().try_fold(1usize, |acc, d| acc.checked_mul(*d));
        if elements.is_none_or(|n| n > MAX_SAMPLE_ELEMENTS) {
            return Err(bad(format!("more than {MAX_SAMPLE_ELEMENTS} elements")));
        }
        Ok(InputShape { name: name.to_string(), dims })
    }
}

impl std::fmt::Display for InputShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dims: Vec<String> = self.dims.iter().map(usize::to_string).collect();
        write!(f, "{}={}", self.name, dims.join(","))
    }
}

/// The position of the graph input called `name` among `names`, or the
/// error that lists the inputs the model has.
fn input_index(names: &[String], name: &str) -> Result<usize, LoadError> {
    names.iter().position(|n| n == name).ok_or_else(|| LoadError::UnknownInput {
        name: name.to_string(),
        known: names.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", "),
    })
}

/// Applies fixed shapes, then fixed inputs, to an ONNX model as tract read
/// it, before any free dimension gets a symbol and before typing (where an
/// `If` on a constant condition folds).
pub(crate) fn apply_to_onnx(
    model: &mut InferenceModel,
    fixed: &[FixedInput],
    shapes: &[InputShape],
) -> Result<(), LoadError> {
    if fixed.is_empty() && shapes.is_empty() {
        return Ok(());
    }
    check_distinct(fixed, shapes)?;
    let names: Vec<String> = model.inputs.iter().map(|o| model.node(o.node).name.clone()).collect();
    let index_of = |name: &str| input_index(&names, name);
    let prepare = |e: TractError| LoadError::Prepare { reason: format!("{e:#}") };
    for shape in shapes {
        let ix = index_of(&shape.name)?;
        let fact = model.input_fact(ix).map_err(prepare)?.clone();
        check_dims(&fact.shape, &shape.dims)
            .map_err(|reason| LoadError::InputShape { name: shape.name.clone(), reason })?;
        let fact = fact.with_shape(shape.dims.iter().copied().collect::<ShapeFactoid>());
        model.set_input_fact(ix, fact).map_err(prepare)?;
    }
    let mut removed = Vec::new();
    for value in fixed {
        let ix = index_of(&value.name)?;
        let fact = model.input_fact(ix).map_err(prepare)?.clone();
        let bad = |reason: String| LoadError::FixedInput { name: value.name.clone(), reason };
        let Some(dt) = fact.datum_type.concretize() else {
            return Err(bad("the model does not declare this input's element type".into()));
        };
        let shape = fixed_shape(&fact.shape, value).map_err(bad)?;
        let tensor = to_tensor(value, dt, &shape).map_err(bad)?;
        let outlet = model.inputs[ix];
        let konst = Const::new(tensor.clone().into_arc_tensor()).map_err(prepare)?;
        model.node_mut(outlet.node).op = Box::new(konst);
        model.set_outlet_fact(outlet, InferenceFact::from(tensor)).map_err(prepare)?;
        removed.push(outlet);
        log::info!("input {:?} fixed to a constant of shape {:?}", value.name, shape);
    }
    if !removed.is_empty() {
        let remaining: Vec<OutletId> = model.inputs.iter().copied().filter(|o| !removed.contains(o)).collect();
        model.set_input_outlets(&remaining).map_err(prepare)?;
    }
    for shape in shapes {
        log::info!("input {:?} fixed to shape {:?}", shape.name, shape.dims);
    }
    Ok(())
}

/// The same for a graph a format hands over already typed (TFLite, read by
/// tract-tflite): the source of a fixed shape is replaced by one with the
/// given fact, a fixed input's source by a constant, and every fact
/// downstream recomputed, before decluttering folds what became constant.
/// `adapters` (one per graph input, possibly fewer) loses the fixed
/// inputs' entries; an input the runtime quantizes at the edge cannot be
/// fixed (its value would be given in one domain and read in another).
pub(crate) fn apply_to_typed(
    model: &mut TypedModel,
    adapters: &mut Vec<super::InputAdapter>,
    fixed: &[FixedInput],
    shapes: &[InputShape],
) -> Result<(), LoadError> {
    use tract_onnx::tract_core::ops::source::TypedSource;

    if fixed.is_empty() && shapes.is_empty() {
        return Ok(());
    }
    check_distinct(fixed, shapes)?;
    let names: Vec<String> = model.inputs.iter().map(|o| model.node(o.node).name.clone()).collect();
    let index_of = |name: &str| input_index(&names, name);
    let prepare = |e: TractError| LoadError::Prepare { reason: format!("{e:#}") };
    let declared = |fact: &TypedFact| ShapeFactoid::closed(fact.shape.iter().map(|d| GenericFactoid::Only(d.clone())).collect());
    for shape in shapes {
        let ix = index_of(&shape.name)?;
        let fact = model.input_fact(ix).map_err(prepare)?.clone();
        check_dims(&declared(&fact), &shape.dims)
            .map_err(|reason| LoadError::InputShape { name: shape.name.clone(), reason })?;
        let fact = fact.datum_type.fact(&shape.dims);
        let outlet = model.inputs[ix];
        model.node_mut(outlet.node).op = Box::new(TypedSource::new(fact.clone()));
        model.set_outlet_fact(outlet, fact).map_err(prepare)?;
    }
    let mut removed = Vec::new();
    for value in fixed {
        let ix = index_of(&value.name)?;
        let bad = |reason: String| LoadError::FixedInput { name: value.name.clone(), reason };
        if adapters.get(ix).is_some_and(|a| *a != super::InputAdapter::Direct) {
            return Err(bad("the runtime quantizes this input at the model's edge; fixing it is not supported".into()));
        }
        let fact = model.input_fact(ix).map_err(prepare)?.clone();
        let shape = fixed_shape(&declared(&fact), value).map_err(bad)?;
        let tensor = to_tensor(value, fact.datum_type, &shape).map_err(bad)?;
        let outlet = model.inputs[ix];
        let konst = Const::new(tensor.clone().into_arc_tensor()).map_err(prepare)?;
        model.node_mut(outlet.node).op = Box::new(konst);
        let fact = TypedFact::try_from(tensor).map_err(prepare)?;
        model.set_outlet_fact(outlet, fact).map_err(prepare)?;
        removed.push(outlet);
        log::info!("input {:?} fixed to a constant of shape {:?}", value.name, shape);
    }
    if !removed.is_empty() {
        let kept: Vec<bool> = model.inputs.iter().map(|o| !removed.contains(o)).collect();
        let remaining: Vec<OutletId> = model.inputs.iter().copied().filter(|o| !removed.contains(o)).collect();
        model.set_input_outlets(&remaining).map_err(prepare)?;
        let mut keep = kept.into_iter();
        adapters.retain(|_| keep.next().unwrap_or(true));
    }
    model.refresh_output_facts().map_err(prepare)?;
    for shape in shapes {
        log::info!("input {:?} fixed to shape {:?}", shape.name, shape.dims);
    }
    Ok(())
}

/// One name fixed twice, or both fixed and reshaped, is a mistake to point
/// out rather than to settle silently.
pub(crate) fn check_distinct(fixed: &[FixedInput], shapes: &[InputShape]) -> Result<(), LoadError> {
    let mut seen: Vec<&str> = Vec::new();
    for name in fixed.iter().map(|f| f.name.as_str()).chain(shapes.iter().map(|s| s.name.as_str())) {
        if seen.contains(&name) {
            return Err(LoadError::FixedInput {
                name: name.to_string(),
                reason: "given more than once (a fixed value already fixes the shape)".into(),
            });
        }
        seen.push(name);
    }
    Ok(())
}

/// The model's dimensions, as far as it declares them, against the given
/// ones: same rank, and every dimension the model fixes kept.
fn check_dims(declared: &ShapeFactoid, dims: &[usize]) -> Result<(), String> {
    if declared.is_open() {
        // The model does not say the rank: anything it then meets is
        // checked by tract while typing.
        return Ok(());
    }
    let declared: Vec<_> = declared.dims().cloned().collect();
    if declared.len() != dims.len() {
        return Err(format!(
            "the model's input has rank {} ({}), not {} ({dims:?})",
            declared.len(),
            display(&declared),
            dims.len()
        ));
    }
    for (axis, (want, got)) in declared.iter().zip(dims).enumerate() {
        if let GenericFactoid::Only(TDim::Val(v)) = want {
            if *v != *got as i64 {
                return Err(format!(
                    "dimension {axis} is {v} in the model ({}), not {got}",
                    display(&declared)
                ));
            }
        }
    }
    Ok(())
}

fn display(dims: &[GenericFactoid<TDim>]) -> String {
    let dims: Vec<String> = dims
        .iter()
        .map(|d| match d {
            GenericFactoid::Only(d) => d.to_string(),
            GenericFactoid::Any => "?".into(),
        })
        .collect();
    format!("[{}]", dims.join(", "))
}

/// The shape the constant takes: the value's own, checked against the
/// model's declaration; a scalar also fills a declared shape of one element
/// (`[1]`, `[1, 1]`), which is how exporters often declare a scalar.
fn fixed_shape(declared: &ShapeFactoid, value: &FixedInput) -> Result<Vec<usize>, String> {
    if value.values.len() != value.shape.iter().product::<usize>() {
        return Err("the value's element count does not match its shape".into());
    }
    if declared.is_open() {
        return Ok(value.shape.clone());
    }
    let ones: Option<Vec<usize>> = declared
        .dims()
        .map(|d| match d {
            GenericFactoid::Only(TDim::Val(1)) | GenericFactoid::Any => Some(1),
            GenericFactoid::Only(TDim::Sym(_)) => Some(1),
            _ => None,
        })
        .collect();
    if value.shape.is_empty() {
        if let Some(ones) = ones {
            return Ok(ones);
        }
    }
    check_dims(declared, &value.shape)?;
    Ok(value.shape.clone())
}

/// The value as a tensor of the input's element type, refusing what does
/// not fit it (a fraction for an integer, 300 for a u8, 2 for a boolean).
fn to_tensor(value: &FixedInput, dt: DatumType, shape: &[usize]) -> Result<Tensor, String> {
    let int_range: Option<(i128, i128)> = match dt {
        DatumType::I8 => Some((i8::MIN.into(), i8::MAX.into())),
        DatumType::I16 => Some((i16::MIN.into(), i16::MAX.into())),
        DatumType::I32 => Some((i32::MIN.into(), i32::MAX.into())),
        DatumType::I64 => Some((i64::MIN.into(), i64::MAX.into())),
        DatumType::U8 => Some((0, u8::MAX.into())),
        DatumType::U16 => Some((0, u16::MAX.into())),
        DatumType::U32 => Some((0, u32::MAX.into())),
        DatumType::U64 => Some((0, u64::MAX.into())),
        _ => None,
    };
    let float_max: Option<f64> = match dt {
        DatumType::F16 => Some(65504.0),
        DatumType::F32 => Some(f32::MAX as f64),
        DatumType::F64 => Some(f64::MAX),
        _ => None,
    };
    let tract = |e: TractError| format!("{e:#}");
    let tensor = match (&value.values, dt) {
        (FixedValues::Bool(v), DatumType::Bool) => Tensor::from_shape(shape, v).map_err(tract)?,
        (FixedValues::Int(v), DatumType::Bool) => {
            if let Some(bad) = v.iter().find(|x| **x != 0 && **x != 1) {
                return Err(format!("the input is boolean: {bad} is neither 0, 1, false nor true"));
            }
            let v: Vec<bool> = v.iter().map(|x| *x == 1).collect();
            Tensor::from_shape(shape, &v).map_err(tract)?
        }
        (FixedValues::Int(v), _) if int_range.is_some() => {
            let (lo, hi) = int_range.unwrap_or((0, 0));
            if let Some(bad) = v.iter().find(|x| i128::from(**x) < lo || i128::from(**x) > hi) {
                return Err(format!("{bad} does not fit the input's element type {dt:?}"));
            }
            Tensor::from_shape(shape, v).map_err(tract)?.cast_to_dt(dt).map_err(tract)?.into_owned()
        }
        (FixedValues::Int(v), _) if float_max.is_some() => {
            let v: Vec<f64> = v.iter().map(|x| *x as f64).collect();
            float_tensor(&v, dt, shape, float_max.unwrap_or(0.0))?
        }
        (FixedValues::Float(v), _) if float_max.is_some() => float_tensor(v, dt, shape, float_max.unwrap_or(0.0))?,
        (FixedValues::Float(_), _) if int_range.is_some() => {
            return Err(format!("the input's element type is {dt:?}: give integers"));
        }
        (FixedValues::Bool(_), _) => return Err(format!("the input's element type is {dt:?}, not boolean")),
        _ => return Err(format!("inputs of element type {dt:?} cannot be fixed")),
    };
    Ok(tensor)
}

fn float_tensor(v: &[f64], dt: DatumType, shape: &[usize], max: f64) -> Result<Tensor, String> {
    if let Some(bad) = v.iter().find(|x| x.abs() > max) {
        return Err(format!("{bad} is out of the range of the input's element type {dt:?}"));
    }
    let tract = |e: TractError| format!("{e:#}");
    Ok(Tensor::from_shape(shape, v).map_err(tract)?.cast_to_dt(dt).map_err(tract)?.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_as_scalars_and_rectangular_arrays() {
        let f: FixedInput = "sr=16000".parse().expect("scalar");
        assert_eq!((f.name.as_str(), f.shape.clone(), f.values), ("sr", vec![], FixedValues::Int(vec![16000])));
        let f: FixedInput = "w=[[1, 2.5], [3, 4]]".parse().expect("matrix");
        assert_eq!((f.shape, f.values), (vec![2, 2], FixedValues::Float(vec![1.0, 2.5, 3.0, 4.0])));
        let f: FixedInput = "a=b=true".parse().expect("name holding '='");
        assert_eq!((f.name.as_str(), f.values), ("a=b", FixedValues::Bool(vec![true])));
    }

    #[test]
    fn malformed_values_are_refused() {
        for bad in ["=1", "x", "x=", "x=abc", "x=[1,[2]]", "x=[[1],2]", "x=[[1,2],[3]]", "x=[]", "x=[true,1]", "x=\"7\"", "x=null"] {
            assert!(bad.parse::<FixedInput>().is_err(), "{bad} parsed");
        }
        let deep = format!("x={}1{}", "[".repeat(9), "]".repeat(9));
        assert!(deep.parse::<FixedInput>().is_err());
    }

    #[test]
    fn shapes_parse_and_refuse_zero_and_garbage() {
        let s: InputShape = "images=1,3,320,320".parse().expect("shape");
        assert_eq!(s.dims, vec![1, 3, 320, 320]);
        assert_eq!(s.to_string(), "images=1,3,320,320");
        for bad in ["images", "images=", "images=1,0", "images=1,-3", "images=1,,2", "images=a", "x=1,1,1,1,1,1,1,1,1", "x=65536,65536,65536"] {
            assert!(bad.parse::<InputShape>().is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn values_are_range_checked_against_the_element_type() {
        let v = |t: &str| t.parse::<FixedInput>().expect("parses");
        assert!(to_tensor(&v("x=300"), DatumType::U8, &[]).is_err());
        assert!(to_tensor(&v("x=-1"), DatumType::U32, &[]).is_err());
        assert!(to_tensor(&v("x=1.5"), DatumType::I64, &[]).is_err());
        assert!(to_tensor(&v("x=2"), DatumType::Bool, &[]).is_err());
        assert!(to_tensor(&v("x=1e39"), DatumType::F32, &[]).is_err());
        assert!(to_tensor(&v("x=true"), DatumType::F32, &[]).is_err());
        let t = to_tensor(&v("x=255"), DatumType::U8, &[]).expect("fits");
        assert_eq!(t.cast_to_scalar::<u8>().expect("u8"), 255);
        let t = to_tensor(&v("x=[1,0]"), DatumType::Bool, &[2]).expect("0/1 as booleans");
        assert_eq!(t.try_as_plain_ram().and_then(|v| v.as_slice::<bool>().map(<[bool]>::to_vec)).expect("bool"), vec![true, false]);
    }
}
