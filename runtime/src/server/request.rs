//! From request bodies to model inputs, with every refusal naming its field.
//!
//! Three body shapes reach a model (the Open Inference Protocol's is in
//! [`super::v2`]):
//!
//! - `POST /predict` `{"features": [f32, ...]}`: the seed's request, one
//!   sample of a single-input model. The flat list fills one sample of the
//!   input (30 values for a `[N, 30]` input, 64 for `[N, 1, 8, 8]`).
//! - `POST /predict` `{"inputs": {"name": nested array, ...}}`: any model,
//!   every input by name. An array with the input's full rank is taken as it
//!   is (a batch); one with a rank less is one sample, and the outputs then
//!   come back without the batch dimension too.
//! - `POST /predict/batch` `{"instances": [[...], [...]]}`: N samples of a
//!   single-input model, run as one `[N, ...]` tensor.
//!
//! Values are checked against the input's element type: floats must be
//! finite and within f32 range, integers whole and within their type's range.
//! JSON has no NaN or infinity, but Python's `json` writes `NaN`, `Infinity`
//! and `-Infinity` anyway (and `1e999` overflows every float); such bodies are
//! answered 422 naming the value, not 400, because the client's intent is
//! clear and its mistake is the value. The repair pass that finds them runs
//! only after the strict parser failed, so well-formed requests never pay for it.

use serde_json::{Map, Value};

use super::error::ApiError;
use super::slot::Deployed;
use crate::tensor::{ElementType, TensorData, TensorSpec, TensorValues};

/// A request checked against the model, ready to run.
#[derive(Debug)]
pub(crate) struct Parsed {
    /// In the order of the model's inputs.
    pub inputs: Vec<TensorData>,
    /// Samples in the request when every input carries them on its first
    /// dimension (the condition for merging it with other requests).
    pub rows: Option<usize>,
    pub render: Render,
}

/// How to answer once the outputs are there.
#[derive(Debug, Clone)]
pub(crate) enum Render {
    /// The seed's `{"prediction", "probability", "model"}` for one sample.
    Predict,
    /// `{"outputs": {name: nested array}, "model"}`; `single_sample` strips
    /// the batch dimension the server added.
    Named { single_sample: bool },
    /// `{"predictions": [...], "probabilities": [...], "model"}`.
    Batch,
    /// Open Inference Protocol v2.
    V2(super::v2::V2Render),
}

/// Parses a JSON body; on failure, retries with non-finite tokens made
/// visible so they are reported as 422 (see the module docs), else 400.
pub(crate) fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => Ok(v),
        Err(e) => match repair_non_finite(body) {
            Some(repaired) => serde_json::from_slice::<Value>(&repaired).map_err(|_| ApiError::malformed_json(e)),
            None => Err(ApiError::malformed_json(e)),
        },
    }
}

/// Markers the repair pass puts where a non-finite number was. A NUL byte
/// cannot appear in a JSON string unescaped, so no client sends these.
const NAN_MARK: &str = "\u{0}NaN";
const INF_MARK: &str = "\u{0}Infinity";
const NEG_INF_MARK: &str = "\u{0}-Infinity";

/// Rewrites bare `NaN`, `Infinity`, `-Infinity` and numbers that overflow
/// f64, outside strings, into marker strings. `None` if there were none (the
/// body is broken for another reason).
fn repair_non_finite(body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(body.len() + 16);
    let mut changed = false;
    let mut i = 0;
    let push_mark = |out: &mut Vec<u8>, mark: &str| {
        out.extend_from_slice(b"\"\\u0000");
        out.extend_from_slice(&mark.as_bytes()[1..]);
        out.push(b'"');
    };
    while i < body.len() {
        let c = body[i];
        if c == b'"' {
            // Copy the string through, escapes included.
            out.push(c);
            i += 1;
            while i < body.len() {
                let s = body[i];
                out.push(s);
                i += 1;
                if s == b'\\' && i < body.len() {
                    out.push(body[i]);
                    i += 1;
                } else if s == b'"' {
                    break;
                }
            }
            continue;
        }
        if body[i..].starts_with(b"NaN") {
            push_mark(&mut out, NAN_MARK);
            i += 3;
            changed = true;
            continue;
        }
        if body[i..].starts_with(b"Infinity") {
            push_mark(&mut out, INF_MARK);
            i += 8;
            changed = true;
            continue;
        }
        if body[i..].starts_with(b"-Infinity") {
            push_mark(&mut out, NEG_INF_MARK);
            i += 9;
            changed = true;
            continue;
        }
        if c == b'-' || c.is_ascii_digit() {
            let start = i;
            i += 1;
            while i < body.len() && matches!(body[i], b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-') {
                i += 1;
            }
            let token = &body[start..i];
            let overflows = std::str::from_utf8(token)
                .ok()
                .and_then(|t| t.parse::<f64>().ok())
                .is_some_and(f64::is_infinite);
            if overflows {
                push_mark(&mut out, if c == b'-' { NEG_INF_MARK } else { INF_MARK });
                changed = true;
            } else {
                out.extend_from_slice(token);
            }
            continue;
        }
        out.push(c);
        i += 1;
    }
    changed.then_some(out)
}

/// A JSON string that stands for a non-finite number: the repair markers, and
/// the spellings clients put in strings when their JSON library refuses NaN.
fn non_finite_string(s: &str) -> Option<&'static str> {
    match s {
        NAN_MARK => Some("NaN"),
        INF_MARK => Some("Infinity"),
        NEG_INF_MARK => Some("-Infinity"),
        _ => match s.to_ascii_lowercase().as_str() {
            "nan" | "-nan" => Some("NaN"),
            "inf" | "infinity" | "+inf" | "+infinity" => Some("Infinity"),
            "-inf" | "-infinity" => Some("-Infinity"),
            _ => None,
        },
    }
}

/// Field paths are built only when something is wrong: the happy path keeps
/// indices in a small stack.
fn path_of(field: &str, idx: &[usize]) -> String {
    let mut p = String::with_capacity(field.len() + idx.len() * 4);
    p.push_str(field);
    for i in idx {
        p.push('[');
        p.push_str(&i.to_string());
        p.push(']');
    }
    p
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Appends one JSON scalar to `out`, converted to `out`'s element type.
fn push_scalar(out: &mut TensorValues, v: &Value, field: &str, idx: &[usize]) -> Result<(), ApiError> {
    let n = match v {
        Value::Number(n) => n,
        Value::String(s) => {
            return Err(match non_finite_string(s) {
                Some(what) => ApiError::non_finite(path_of(field, idx), format!("{what} is not a finite number")),
                None => ApiError::invalid_field(path_of(field, idx), "expected a number, got a string"),
            })
        }
        other => {
            return Err(ApiError::invalid_field(
                path_of(field, idx),
                format!("expected a number, got {}", type_name(other)),
            ))
        }
    };
    match out {
        TensorValues::F32(vec) => {
            // Without serde_json's arbitrary_precision every number has an f64 view.
            let x = n.as_f64().unwrap_or(f64::NAN);
            let f = x as f32;
            if !f.is_finite() {
                return Err(ApiError::non_finite(
                    path_of(field, idx),
                    format!("{n} is too large for a 32-bit float (largest is {:e})", f32::MAX),
                ));
            }
            vec.push(f);
        }
        TensorValues::I8(vec) => vec.push(integer(n, i8::MIN as i64, i8::MAX as i64, "int8", field, idx)? as i8),
        TensorValues::U8(vec) => vec.push(integer(n, 0, u8::MAX as i64, "uint8", field, idx)? as u8),
        TensorValues::I32(vec) => {
            vec.push(integer(n, i32::MIN as i64, i32::MAX as i64, "int32", field, idx)? as i32)
        }
        TensorValues::I64(vec) => vec.push(integer(n, i64::MIN, i64::MAX, "int64", field, idx)?),
    }
    Ok(())
}

fn integer(
    n: &serde_json::Number,
    min: i64,
    max: i64,
    type_name: &str,
    field: &str,
    idx: &[usize],
) -> Result<i64, ApiError> {
    let out_of_range = || ApiError::invalid_field(path_of(field, idx), format!("{n} is out of range for {type_name}"));
    if let Some(i) = n.as_i64() {
        return if (min..=max).contains(&i) { Ok(i) } else { Err(out_of_range()) };
    }
    if n.is_u64() {
        return Err(out_of_range());
    }
    let x = n.as_f64().unwrap_or(f64::NAN);
    if x.fract() != 0.0 {
        return Err(ApiError::invalid_field(path_of(field, idx), format!("expected an integer, got {n}")));
    }
    // `as` saturates, so compare in f64 first.
    if x < min as f64 || x > max as f64 {
        return Err(out_of_range());
    }
    Ok(x as i64)
}

pub(crate) fn empty_values(t: ElementType, capacity: usize) -> TensorValues {
    match t {
        ElementType::F32 => TensorValues::F32(Vec::with_capacity(capacity)),
        ElementType::I8 => TensorValues::I8(Vec::with_capacity(capacity)),
        ElementType::U8 => TensorValues::U8(Vec::with_capacity(capacity)),
        ElementType::I32 => TensorValues::I32(Vec::with_capacity(capacity)),
        ElementType::I64 => TensorValues::I64(Vec::with_capacity(capacity)),
    }
}

/// The shape a nested JSON array claims, read along its first elements.
fn claimed_shape(v: &Value) -> Vec<usize> {
    let mut shape = Vec::new();
    let mut cur = v;
    while let Value::Array(a) = cur {
        shape.push(a.len());
        match a.first() {
            Some(first) => cur = first,
            None => break,
        }
    }
    shape
}

/// Walks a nested array of the claimed shape, appending its scalars.
fn flatten(
    v: &Value,
    shape: &[usize],
    out: &mut TensorValues,
    field: &str,
    idx: &mut Vec<usize>,
) -> Result<(), ApiError> {
    let depth = idx.len();
    if depth == shape.len() {
        if v.is_array() {
            return Err(ApiError::invalid_shape(
                path_of(field, idx),
                format!("ragged array: expected a number at depth {depth}, got an array"),
            ));
        }
        return push_scalar(out, v, field, idx);
    }
    let Value::Array(items) = v else {
        return Err(ApiError::invalid_shape(
            path_of(field, idx),
            format!("ragged array: expected an array of {} at depth {depth}, got {}", shape[depth], type_name(v)),
        ));
    };
    if items.len() != shape[depth] {
        return Err(ApiError::invalid_shape(
            path_of(field, idx),
            format!("ragged array: expected {} elements like its siblings, got {}", shape[depth], items.len()),
        ));
    }
    for (i, item) in items.iter().enumerate() {
        idx.push(i);
        flatten(item, shape, out, field, idx)?;
        idx.pop();
    }
    Ok(())
}

/// The most scalars a JSON text of `len` bytes can hold in one array: each
/// takes a digit and a separator (`[1,2,3]` is 7 bytes for 3). A tensor
/// decoded from such a body has at most this many elements, so it bounds
/// what the decoder may reserve whatever the arrays claim.
pub(crate) fn max_json_elements(len: usize) -> usize {
    len / 2 + 1
}

/// The element count of a shape, `None` when it overflows `usize`.
pub(crate) fn element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, d| acc.checked_mul(*d))
}

/// Refuses a claimed shape whose element count overflows or passes `limit`
/// (what the body can hold, or the model's fixed size): the answer to
/// arrays whose first elements claim far more than the rest delivers. Checked
/// before anything is reserved for the values.
fn check_claim(shape: &[usize], limit: usize, field: &str) -> Result<usize, ApiError> {
    match element_count(shape) {
        None => Err(ApiError::invalid_shape(
            field,
            format!("the array claims shape {shape:?}, whose element count overflows"),
        )),
        Some(n) if n > limit => Err(ApiError::invalid_shape(
            field,
            format!("the array claims shape {shape:?} ({n} values), more than the body can hold ({limit} at most)"),
        )),
        Some(n) => Ok(n),
    }
}

/// A nested JSON array (or a scalar) as a tensor of element type `t`, of at
/// most `limit` elements.
///
/// The shape is read along the first elements, so a few bytes can claim
/// any size: it is checked against `limit` before the values are reserved,
/// and the walk then refuses any array that does not deliver what its
/// first elements claimed. Recursion is as deep as the JSON nests, which
/// serde_json bounds (128 levels).
pub(crate) fn tensor_from_json(v: &Value, t: ElementType, field: &str, limit: usize) -> Result<TensorData, ApiError> {
    let shape = claimed_shape(v);
    let len = check_claim(&shape, limit, field)?;
    let mut values = empty_values(t, len);
    flatten(v, &shape, &mut values, field, &mut Vec::with_capacity(shape.len()))?;
    Ok(TensorData { shape, values })
}

pub(crate) fn shape_text(shape: &[Option<u64>]) -> String {
    let dims: Vec<String> =
        shape.iter().map(|d| d.map(|d| d.to_string()).unwrap_or_else(|| "N".to_string())).collect();
    format!("[{}]", dims.join(", "))
}

fn input_names(specs: &[TensorSpec]) -> String {
    let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    names.join(", ")
}

/// Checks a tensor against the model input's fixed dimensions (the free ones
/// take any size but zero).
pub(crate) fn check_dims(shape: &[usize], spec: &TensorSpec, batched: bool, field: &str) -> Result<(), ApiError> {
    let mismatch = || {
        ApiError::invalid_shape(field, format!("expected shape {}, got {:?}", shape_text(&spec.shape), shape))
    };
    if shape.len() != spec.shape.len() {
        return Err(mismatch());
    }
    for (ix, (want, got)) in spec.shape.iter().zip(shape).enumerate() {
        if *got == 0 {
            return Err(ApiError::invalid_shape(field, format!("dimension {ix} is empty (shape {shape:?})")));
        }
        match want {
            // A fixed batch of 1 runs larger batches row by row.
            Some(1) if ix == 0 && batched => {}
            Some(w) if u64::try_from(*got) != Ok(*w) => return Err(mismatch()),
            _ => {}
        }
    }
    Ok(())
}

/// The single input of a model the seed-style endpoints need.
fn single_input<'a>(d: &'a Deployed, field: &str) -> Result<&'a TensorSpec, ApiError> {
    let specs = &d.model().signature().inputs;
    if specs.len() != 1 {
        return Err(ApiError::invalid_field(
            field,
            format!(
                "this model takes {} inputs ({}); send {{\"inputs\": {{name: array, ...}}}} instead",
                specs.len(),
                input_names(specs)
            ),
        ));
    }
    Ok(&specs[0])
}

/// One sample of the single input from a flat (or sample-shaped) array:
/// returns its values and the per-sample shape.
fn one_sample(
    v: &Value,
    spec: &TensorSpec,
    sample_shape: Option<&[usize]>,
    body_limit: usize,
    field: &str,
) -> Result<(TensorValues, Vec<usize>), ApiError> {
    if !v.is_array() {
        return Err(ApiError::invalid_field(field, format!("expected an array of numbers, got {}", type_name(v))));
    }
    let wrong_size = |want: usize, got: &dyn std::fmt::Display, shape: &[usize]| {
        ApiError::invalid_shape(
            field,
            format!(
                "expected {want} values (one sample of input {:?}, shape {}), got {got} (shape {shape:?})",
                spec.name,
                shape_text(&spec.shape),
            ),
        )
    };
    let want = match sample_shape {
        Some(s) => Some(element_count(s).ok_or_else(|| {
            ApiError::invalid_shape(field, format!("input {:?} has a sample too large to address", spec.name))
        })?),
        None => None,
    };
    // A fixed sample is refused on what the array claims before anything is
    // reserved for it; a free one may take no more than the body holds.
    if let Some(want) = want {
        let claimed = claimed_shape(v);
        match element_count(&claimed) {
            Some(n) if n <= want => {}
            Some(n) => return Err(wrong_size(want, &n, &claimed)),
            None => return Err(wrong_size(want, &"an overflowing count", &claimed)),
        }
    }
    let t = tensor_from_json(v, spec.element_type, field, want.unwrap_or(body_limit).min(body_limit))?;
    let len = t.values.len();
    match (sample_shape, want) {
        (Some(s), Some(want)) => {
            if len != want || (t.shape.len() != 1 && t.shape != s) {
                return Err(wrong_size(want, &len, &t.shape));
            }
            Ok((t.values, s.to_vec()))
        }
        // A `[N, F]` input with F free: one row of whatever length came.
        (None, _) if spec.shape.len() == 2 && t.shape.len() == 1 && len > 0 => Ok((t.values, vec![len])),
        _ => Err(ApiError::invalid_field(
            field,
            format!(
                "input {:?} has shape {}, which a flat list cannot fill; send {{\"inputs\": {{{:?}: nested array}}}}",
                spec.name,
                shape_text(&spec.shape),
                spec.name
            ),
        )),
    }
}

fn object_of(v: &Value) -> Result<&Map<String, Value>, ApiError> {
    v.as_object().ok_or_else(|| {
        ApiError::invalid_field("body", format!("expected a JSON object, got {}", type_name(v)))
    })
}

/// `POST /predict`: `{"features": [...]}` or `{"inputs": {...}}`.
pub(crate) fn parse_predict(body: &[u8], d: &Deployed) -> Result<Parsed, ApiError> {
    let value = parse_json(body)?;
    let obj = object_of(&value)?;
    let limit = max_json_elements(body.len());
    match (obj.get("features"), obj.get("inputs")) {
        (Some(_), Some(_)) => Err(ApiError::invalid_field("body", "send either \"features\" or \"inputs\", not both")),
        (Some(features), None) => parse_features(features, d, limit),
        (None, Some(inputs)) => parse_named_inputs(inputs, d, limit),
        (None, None) => Err(ApiError::invalid_field(
            "features",
            "missing: send {\"features\": [numbers]} (or {\"inputs\": {name: array}})",
        )),
    }
}

fn parse_features(features: &Value, d: &Deployed, limit: usize) -> Result<Parsed, ApiError> {
    let spec = single_input(d, "features")?;
    let layout = &d.layout().inputs[0];
    let (values, sample) = if layout.batched {
        one_sample(features, spec, layout.sample_shape.as_deref(), limit, "features")?
    } else {
        // No batch dimension: the list fills the whole (fixed) input.
        let whole: Option<Vec<usize>> = spec.shape.iter().map(|d| d.map(|d| d as usize)).collect();
        let (values, shape) = one_sample(features, spec, whole.as_deref(), limit, "features")?;
        let t = TensorData { shape, values };
        return Ok(Parsed { inputs: vec![t], rows: None, render: Render::Predict });
    };
    let mut shape = Vec::with_capacity(sample.len() + 1);
    shape.push(1);
    shape.extend_from_slice(&sample);
    Ok(Parsed { inputs: vec![TensorData { shape, values }], rows: Some(1), render: Render::Predict })
}

fn parse_named_inputs(inputs: &Value, d: &Deployed, limit: usize) -> Result<Parsed, ApiError> {
    let Value::Object(given) = inputs else {
        return Err(ApiError::invalid_field(
            "inputs",
            format!("expected an object of input name to array, got {}", type_name(inputs)),
        ));
    };
    let specs = &d.model().signature().inputs;
    if let Some(unknown) = given.keys().find(|k| !specs.iter().any(|s| &s.name == *k)) {
        return Err(ApiError::invalid_field(
            format!("inputs.{unknown}"),
            format!("the model has no input named {unknown:?}; it takes: {}", input_names(specs)),
        ));
    }
    let mut tensors = Vec::with_capacity(specs.len());
    let mut added_batch = Vec::with_capacity(specs.len());
    for (spec, layout) in specs.iter().zip(&d.layout().inputs) {
        let field = format!("inputs.{}", spec.name);
        let v = given.get(&spec.name).ok_or_else(|| {
            ApiError::invalid_field(&field, format!("missing: the model takes inputs {}", input_names(specs)))
        })?;
        // The claimed shape meets the model's dimensions before anything is
        // decoded; the walk then holds the array to that claim.
        let mut shape = claimed_shape(v);
        let added = layout.batched && shape.len() + 1 == spec.shape.len();
        if added {
            shape.insert(0, 1);
        }
        check_dims(&shape, spec, layout.batched, &field)?;
        let mut t = tensor_from_json(v, spec.element_type, &field, limit)?;
        if added {
            t.shape.insert(0, 1);
        }
        tensors.push(t);
        added_batch.push(added);
    }
    let rows = common_rows(&tensors, d);
    if let Some(err) = batch_disagreement(&tensors, d) {
        return Err(err);
    }
    let single_sample = !added_batch.is_empty() && added_batch.iter().all(|a| *a);
    Ok(Parsed { inputs: tensors, rows, render: Render::Named { single_sample } })
}

/// The batch size every input shares, if all are batched.
pub(crate) fn common_rows(tensors: &[TensorData], d: &Deployed) -> Option<usize> {
    let layout = &d.layout().inputs;
    if tensors.is_empty() || !layout.iter().all(|l| l.batched) {
        return None;
    }
    let rows = tensors[0].shape.first().copied()?;
    tensors.iter().all(|t| t.shape.first() == Some(&rows)).then_some(rows)
}

/// Batched inputs must agree on the batch size: say which one does not.
pub(crate) fn batch_disagreement(tensors: &[TensorData], d: &Deployed) -> Option<ApiError> {
    let specs = &d.model().signature().inputs;
    let layout = &d.layout().inputs;
    let mut first: Option<(usize, &str)> = None;
    for ((t, spec), l) in tensors.iter().zip(specs).zip(layout) {
        if !l.batched {
            continue;
        }
        let rows = t.shape.first().copied().unwrap_or(1);
        match first {
            None => first = Some((rows, &spec.name)),
            Some((r, name)) if r != rows => {
                return Some(ApiError::invalid_shape(
                    format!("inputs.{}", spec.name),
                    format!("batch of {rows} does not match the batch of {r} in input {name:?}"),
                ))
            }
            _ => {}
        }
    }
    None
}

/// `POST /predict/batch`: `{"instances": [[...], ...]}`.
pub(crate) fn parse_batch(body: &[u8], d: &Deployed) -> Result<Parsed, ApiError> {
    let value = parse_json(body)?;
    let limit = max_json_elements(body.len());
    let obj = object_of(&value)?;
    let instances = obj
        .get("instances")
        .ok_or_else(|| ApiError::invalid_field("instances", "missing: send {\"instances\": [[numbers], ...]}"))?;
    let Value::Array(list) = instances else {
        return Err(ApiError::invalid_field(
            "instances",
            format!("expected an array of samples, got {}", type_name(instances)),
        ));
    };
    if list.is_empty() {
        return Err(ApiError::invalid_shape("instances", "expected at least one sample"));
    }
    let spec = single_input(d, "instances")?;
    let layout = &d.layout().inputs[0];
    if !layout.batched {
        return Err(ApiError::invalid_field(
            "instances",
            format!("input {:?} has no batch dimension (shape {})", spec.name, shape_text(&spec.shape)),
        ));
    }
    let mut values = empty_values(spec.element_type, 0);
    let mut sample: Option<Vec<usize>> = None;
    for (i, instance) in list.iter().enumerate() {
        let field = format!("instances[{i}]");
        let want = sample.as_deref().or(layout.sample_shape.as_deref());
        let (row, shape) = one_sample(instance, spec, want, limit, &field)?;
        append(&mut values, row);
        sample.get_or_insert(shape);
    }
    let mut shape = vec![list.len()];
    shape.extend(sample.unwrap_or_default());
    Ok(Parsed { inputs: vec![TensorData { shape, values }], rows: Some(list.len()), render: Render::Batch })
}

/// Appends `src` to `dst` (same element type by construction).
pub(crate) fn append(dst: &mut TensorValues, src: TensorValues) {
    match (dst, src) {
        (TensorValues::F32(d), TensorValues::F32(s)) => d.extend(s),
        (TensorValues::I8(d), TensorValues::I8(s)) => d.extend(s),
        (TensorValues::U8(d), TensorValues::U8(s)) => d.extend(s),
        (TensorValues::I32(d), TensorValues::I32(s)) => d.extend(s),
        (TensorValues::I64(d), TensorValues::I64(s)) => d.extend(s),
        // Callers build both sides from the same input spec.
        (d, s) => debug_assert_eq!(d.element_type(), s.element_type()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_tokens_become_422_naming_the_index() {
        let v = parse_json(br#"{"features":[1.0, NaN, 2]}"#).unwrap();
        let e = tensor_from_json(&v["features"], ElementType::F32, "features", 100).unwrap_err();
        assert_eq!((e.status, e.code, e.field.as_deref()), (422, "non_finite", Some("features[1]")));

        let v = parse_json(br#"{"features":[-Infinity]}"#).unwrap();
        let e = tensor_from_json(&v["features"], ElementType::F32, "features", 100).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("features[0]"));

        let v = parse_json(br#"{"features":[1, 1e999]}"#).unwrap();
        let e = tensor_from_json(&v["features"], ElementType::F32, "features", 100).unwrap_err();
        assert_eq!((e.code, e.field.as_deref()), ("non_finite", Some("features[1]")));

        // Fits f64 but not f32.
        let v = parse_json(br#"{"features":[1e39]}"#).unwrap();
        let e = tensor_from_json(&v["features"], ElementType::F32, "features", 100).unwrap_err();
        assert_eq!(e.code, "non_finite");

        // Inside a string, NaN is just text and the body stays malformed elsewhere.
        assert_eq!(parse_json(br#"{"a":"NaN", }"#).unwrap_err().status, 400);
        assert_eq!(parse_json(b"{not json").unwrap_err().status, 400);
    }

    #[test]
    fn ragged_and_mistyped_arrays_are_named() {
        let v: Value = serde_json::from_str("[[1,2],[3]]").unwrap();
        let e = tensor_from_json(&v, ElementType::F32, "x", 100).unwrap_err();
        assert_eq!((e.code, e.field.as_deref()), ("invalid_shape", Some("x[1]")));
        let v: Value = serde_json::from_str(r#"[[1,2],[3,"a"]]"#).unwrap();
        let e = tensor_from_json(&v, ElementType::F32, "x", 100).unwrap_err();
        assert_eq!((e.code, e.field.as_deref()), ("invalid_field", Some("x[1][1]")));
        let v: Value = serde_json::from_str("[1.5]").unwrap();
        assert_eq!(tensor_from_json(&v, ElementType::I64, "x", 100).unwrap_err().code, "invalid_field");
        let v: Value = serde_json::from_str("[300]").unwrap();
        assert_eq!(tensor_from_json(&v, ElementType::U8, "x", 100).unwrap_err().code, "invalid_field");
        let v: Value = serde_json::from_str("[[1,2],[3,4]]").unwrap();
        let t = tensor_from_json(&v, ElementType::I32, "x", 100).unwrap();
        assert_eq!(t.shape, vec![2, 2]);
        assert_eq!(t.values, TensorValues::I32(vec![1, 2, 3, 4]));
    }
}
