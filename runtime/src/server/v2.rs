//! The Open Inference Protocol v2 (KServe's and Triton's HTTP/REST API), so a
//! `tritonclient.http` or KServe client works against a device unchanged.
//!
//! Routes: `GET /v2` (server metadata), `GET /v2/health/live`,
//! `GET /v2/health/ready`, `GET /v2/models/{name}[/versions/{v}]` (model
//! metadata), `GET .../ready`, `POST .../infer`.
//!
//! An infer request names every model input with its `datatype` (`FP32`,
//! `INT32`, `INT64`, `INT8`, `UINT8`: the one the model takes, no implicit
//! conversion, as in Triton), `shape`, and `data` as a flat or nested
//! row-major array. `outputs` selects outputs by name (all of them when
//! absent); `id` is echoed back; request `parameters` are accepted and
//! ignored except `binary_data_output`.
//!
//! The binary tensor data extension is supported both ways, because
//! `tritonclient.http` uses it by default: with an
//! `Inference-Header-Content-Length: N` header, the first N bytes of the body
//! are the JSON and the rest holds the raw little-endian data of the inputs
//! whose `parameters.binary_data_size` is set, in order. Outputs are answered
//! the same way when asked for (`binary_data: true` on the output, or
//! `binary_data_output: true` on the request).
//!
//! Errors on these routes have the protocol's shape, `{"error": "<message>"}`,
//! with the same status codes and field-naming messages as the other routes.

use serde_json::{Map, Value};

use super::error::{push_json_str, ApiError};
use super::request::{self, Parsed, Render};
use super::response::{write_flat, write_scalar};
use super::slot::Deployed;
use crate::tensor::{ElementType, TensorData, TensorSpec, TensorValues};

/// The header that splits JSON from binary data, both ways.
pub(crate) const HEADER_LENGTH: &str = "Inference-Header-Content-Length";

/// How to answer an infer request.
#[derive(Debug, Clone)]
pub(crate) struct V2Render {
    id: Option<String>,
    /// (output index, answer in binary) in the order asked for.
    outputs: Vec<(usize, bool)>,
}

/// A successful v2 answer: the body and, for binary outputs, the length of
/// its JSON part.
pub(crate) struct V2Body {
    pub body: Vec<u8>,
    pub json_len: Option<usize>,
}

pub(crate) fn server_metadata() -> Vec<u8> {
    format!(
        "{{\"name\":\"outpost-runtime\",\"version\":\"{}\",\"extensions\":[\"binary_tensor_data\"]}}",
        env!("CARGO_PKG_VERSION")
    )
    .into_bytes()
}

/// Checks the model name (and version, if given) of the route.
pub(crate) fn check_model(d: &Deployed, name: &str, version: Option<&str>) -> Result<(), ApiError> {
    let info = d.info();
    if name != info.name {
        return Err(ApiError::not_found(format!(
            "model {name:?} is not served here (this server serves {:?})",
            info.name
        )));
    }
    if let Some(v) = version {
        if v != info.version {
            return Err(ApiError::not_found(format!(
                "model {name:?} version {v:?} is not served here (serving version {:?})",
                info.version
            )));
        }
    }
    Ok(())
}

fn write_tensor_meta(out: &mut String, spec: &TensorSpec) {
    out.push_str("{\"name\":");
    push_json_str(out, &spec.name);
    out.push_str(",\"datatype\":\"");
    out.push_str(spec.element_type.v2_name());
    out.push_str("\",\"shape\":[");
    for (i, d) in spec.shape.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match d {
            Some(d) => out.push_str(&d.to_string()),
            None => out.push_str("-1"),
        }
    }
    out.push_str("]}");
}

pub(crate) fn model_metadata(d: &Deployed) -> Vec<u8> {
    let info = d.info();
    let sig = d.model().signature();
    let mut out = String::with_capacity(256);
    out.push_str("{\"name\":");
    push_json_str(&mut out, &info.name);
    out.push_str(",\"versions\":[");
    push_json_str(&mut out, &info.version);
    out.push_str("],\"platform\":\"tract_");
    out.push_str(info.format.as_str());
    out.push_str("\",\"inputs\":[");
    for (i, s) in sig.inputs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_tensor_meta(&mut out, s);
    }
    out.push_str("],\"outputs\":[");
    for (i, s) in sig.outputs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_tensor_meta(&mut out, s);
    }
    out.push_str("]}");
    out.into_bytes()
}

pub(crate) fn model_ready(d: &Deployed) -> Vec<u8> {
    let mut out = String::from("{\"name\":");
    push_json_str(&mut out, &d.info().name);
    out.push_str(",\"ready\":true}");
    out.into_bytes()
}

fn element_size(t: ElementType) -> usize {
    match t {
        ElementType::F32 | ElementType::I32 => 4,
        ElementType::I64 => 8,
        ElementType::I8 | ElementType::U8 => 1,
    }
}

fn from_le_bytes(t: ElementType, bytes: &[u8]) -> TensorValues {
    match t {
        ElementType::F32 => {
            TensorValues::F32(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
        }
        ElementType::I32 => {
            TensorValues::I32(bytes.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
        }
        ElementType::I64 => TensorValues::I64(
            bytes
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
        ),
        ElementType::I8 => TensorValues::I8(bytes.iter().map(|b| *b as i8).collect()),
        ElementType::U8 => TensorValues::U8(bytes.to_vec()),
    }
}

fn append_le_bytes(out: &mut Vec<u8>, v: &TensorValues) {
    match v {
        TensorValues::F32(x) => x.iter().for_each(|e| out.extend_from_slice(&e.to_le_bytes())),
        TensorValues::I32(x) => x.iter().for_each(|e| out.extend_from_slice(&e.to_le_bytes())),
        TensorValues::I64(x) => x.iter().for_each(|e| out.extend_from_slice(&e.to_le_bytes())),
        TensorValues::I8(x) => x.iter().for_each(|e| out.push(*e as u8)),
        TensorValues::U8(x) => out.extend_from_slice(x),
    }
}

fn str_field<'a>(obj: &'a Map<String, Value>, key: &str, field: &str) -> Result<&'a str, ApiError> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(ApiError::invalid_field(format!("{field}.{key}"), "expected a string")),
        None => Err(ApiError::invalid_field(format!("{field}.{key}"), "missing")),
    }
}

fn shape_field(obj: &Map<String, Value>, field: &str) -> Result<Vec<usize>, ApiError> {
    let f = format!("{field}.shape");
    let Some(Value::Array(dims)) = obj.get("shape") else {
        return Err(ApiError::invalid_field(f, "missing or not an array of dimensions"));
    };
    dims.iter()
        .enumerate()
        .map(|(i, d)| {
            d.as_u64()
                .and_then(|d| usize::try_from(d).ok())
                .ok_or_else(|| ApiError::invalid_field(format!("{f}[{i}]"), "expected a non-negative integer"))
        })
        .collect()
}

fn binary_size(obj: &Map<String, Value>, field: &str) -> Result<Option<usize>, ApiError> {
    match obj.get("parameters").and_then(|p| p.get("binary_data_size")) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| {
                ApiError::invalid_field(format!("{field}.parameters.binary_data_size"), "expected a byte count")
            }),
    }
}

fn flag(v: Option<&Value>) -> bool {
    matches!(v, Some(Value::Bool(true)))
}

/// `POST /v2/models/{name}/infer`. `header_len` is the
/// `Inference-Header-Content-Length` header, if sent.
pub(crate) fn parse_infer(body: &[u8], header_len: Option<usize>, d: &Deployed) -> Result<Parsed, ApiError> {
    let (json, mut binary) = match header_len {
        Some(n) if n > body.len() => {
            return Err(ApiError::bad_request(format!(
                "{HEADER_LENGTH} is {n} but the body has only {} bytes",
                body.len()
            )))
        }
        Some(n) => body.split_at(n),
        None => (body, &[][..]),
    };
    let value = request::parse_json(json)?;
    let Value::Object(req) = &value else {
        return Err(ApiError::invalid_field("body", "expected a JSON object"));
    };
    let id = match req.get("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(ApiError::invalid_field("id", "expected a string")),
    };
    let binary_output = flag(req.get("parameters").and_then(|p| p.get("binary_data_output")));
    let Some(Value::Array(given)) = req.get("inputs") else {
        return Err(ApiError::invalid_field("inputs", "missing or not an array of input tensors"));
    };

    let specs = &d.model().signature().inputs;
    let layout = &d.layout().inputs;
    let mut slots: Vec<Option<TensorData>> = vec![None; specs.len()];
    for (i, item) in given.iter().enumerate() {
        let field = format!("inputs[{i}]");
        let Value::Object(obj) = item else {
            return Err(ApiError::invalid_field(field, "expected an object with name, shape, datatype, data"));
        };
        let name = str_field(obj, "name", &field)?;
        let Some(ix) = specs.iter().position(|s| s.name == name) else {
            let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
            return Err(ApiError::invalid_field(
                format!("{field}.name"),
                format!("the model has no input named {name:?}; it takes: {}", names.join(", ")),
            ));
        };
        if slots[ix].is_some() {
            return Err(ApiError::invalid_field(format!("{field}.name"), format!("input {name:?} given twice")));
        }
        let spec = &specs[ix];
        let datatype = str_field(obj, "datatype", &field)?;
        let Some(t) = ElementType::from_v2_name(datatype) else {
            return Err(ApiError::invalid_field(
                format!("{field}.datatype"),
                format!("{datatype:?} is not supported; use one of FP32, INT32, INT64, INT8, UINT8"),
            ));
        };
        if t != spec.element_type {
            return Err(ApiError::invalid_field(
                format!("{field}.datatype"),
                format!("input {name:?} takes {}, got {datatype}", spec.element_type.v2_name()),
            ));
        }
        let shape = shape_field(obj, &field)?;
        let shape_name = format!("{field}.shape");
        // The claimed shape meets the model's dimensions and the body's size
        // before any value is decoded or any room reserved for them.
        request::check_dims(&shape, spec, layout[ix].batched, &shape_name)?;
        let count = request::element_count(&shape).ok_or_else(|| {
            ApiError::invalid_shape(&shape_name, format!("the element count of {shape:?} overflows"))
        })?;
        let values = match (binary_size(obj, &field)?, obj.get("data")) {
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid_field(
                    field,
                    "has both \"data\" and parameters.binary_data_size; send one",
                ))
            }
            (Some(size), None) => {
                let Some(bytes) = count.checked_mul(element_size(t)) else {
                    return Err(ApiError::invalid_shape(
                        &shape_name,
                        format!("the byte size of {count} {datatype} values of shape {shape:?} overflows"),
                    ));
                };
                if size != bytes {
                    return Err(ApiError::invalid_shape(
                        format!("{field}.parameters.binary_data_size"),
                        format!("{size} bytes do not hold {count} {datatype} values of shape {shape:?}"),
                    ));
                }
                if size > binary.len() {
                    return Err(ApiError::bad_request(format!(
                        "{field}: binary data of {size} bytes runs past the end of the body"
                    )));
                }
                let (mine, rest) = binary.split_at(size);
                binary = rest;
                let values = from_le_bytes(t, mine);
                if let TensorValues::F32(x) = &values {
                    if let Some(j) = x.iter().position(|v| !v.is_finite()) {
                        return Err(ApiError::non_finite(
                            format!("{field}.data[{j}]"),
                            format!("{} is not a finite number", x[j]),
                        ));
                    }
                }
                values
            }
            (None, Some(data)) => {
                let limit = request::max_json_elements(json.len());
                if count > limit {
                    return Err(ApiError::invalid_shape(
                        &shape_name,
                        format!("{shape:?} claims {count} values, more than the body can hold ({limit} at most)"),
                    ));
                }
                let data_field = format!("{field}.data");
                let flat = request::tensor_from_json(data, t, &data_field, limit)?;
                if flat.values.len() != count {
                    return Err(ApiError::invalid_shape(
                        data_field,
                        format!("{} values do not fill shape {shape:?} ({count} values)", flat.values.len()),
                    ));
                }
                flat.values
            }
            (None, None) => {
                return Err(ApiError::invalid_field(format!("{field}.data"), "missing"));
            }
        };
        slots[ix] = Some(TensorData { shape, values });
    }
    let mut inputs = Vec::with_capacity(specs.len());
    for (ix, slot) in slots.into_iter().enumerate() {
        match slot {
            Some(t) => inputs.push(t),
            None => {
                return Err(ApiError::invalid_field(
                    "inputs",
                    format!("missing input {:?} (the model takes {} inputs)", specs[ix].name, specs.len()),
                ))
            }
        }
    }
    if let Some(err) = request::batch_disagreement(&inputs, d) {
        return Err(err);
    }

    let out_specs = &d.model().signature().outputs;
    let outputs = match req.get("outputs") {
        None | Some(Value::Null) => (0..out_specs.len()).map(|ix| (ix, binary_output)).collect(),
        Some(Value::Array(wanted)) => {
            let mut chosen = Vec::with_capacity(wanted.len());
            for (i, w) in wanted.iter().enumerate() {
                let field = format!("outputs[{i}]");
                let Value::Object(obj) = w else {
                    return Err(ApiError::invalid_field(field, "expected an object with a name"));
                };
                let name = str_field(obj, "name", &field)?;
                let Some(ix) = out_specs.iter().position(|s| s.name == name) else {
                    let names: Vec<&str> = out_specs.iter().map(|s| s.name.as_str()).collect();
                    return Err(ApiError::invalid_field(
                        format!("{field}.name"),
                        format!("the model has no output named {name:?}; it gives: {}", names.join(", ")),
                    ));
                };
                let params = obj.get("parameters");
                if params.and_then(|p| p.get("classification")).is_some_and(|c| c.as_u64() != Some(0)) {
                    return Err(ApiError::invalid_field(
                        format!("{field}.parameters.classification"),
                        "the classification extension is not supported",
                    ));
                }
                let binary = match params.and_then(|p| p.get("binary_data")) {
                    Some(Value::Bool(b)) => *b,
                    _ => binary_output,
                };
                chosen.push((ix, binary));
            }
            chosen
        }
        Some(_) => return Err(ApiError::invalid_field("outputs", "expected an array of {\"name\": ...}")),
    };
    let rows = request::common_rows(&inputs, d);
    Ok(Parsed { inputs, rows, render: Render::V2(V2Render { id, outputs }) })
}

/// The infer answer: `model_name`, `model_version`, `id`, `outputs`.
pub(crate) fn render_infer(r: &V2Render, d: &Deployed, outputs: &[TensorData]) -> V2Body {
    let specs = &d.model().signature().outputs;
    let mut out = Vec::with_capacity(256);
    let mut binary = Vec::new();
    let mut head = String::with_capacity(96);
    head.push_str("{\"model_name\":");
    push_json_str(&mut head, &d.info().name);
    head.push_str(",\"model_version\":");
    push_json_str(&mut head, &d.info().version);
    if let Some(id) = &r.id {
        head.push_str(",\"id\":");
        push_json_str(&mut head, id);
    }
    head.push_str(",\"outputs\":[");
    out.extend_from_slice(head.as_bytes());
    let mut written = 0;
    for (ix, as_binary) in &r.outputs {
        let (Some(t), Some(spec)) = (outputs.get(*ix), specs.get(*ix)) else { continue };
        if written > 0 {
            out.push(b',');
        }
        written += 1;
        let mut meta = String::with_capacity(64);
        meta.push_str("{\"name\":");
        push_json_str(&mut meta, &spec.name);
        meta.push_str(",\"datatype\":\"");
        meta.push_str(t.element_type().v2_name());
        meta.push_str("\",\"shape\":");
        out.extend_from_slice(meta.as_bytes());
        let _ = serde_json::to_writer(&mut out, &t.shape);
        if *as_binary {
            let before = binary.len();
            append_le_bytes(&mut binary, &t.values);
            out.extend_from_slice(b",\"parameters\":{\"binary_data_size\":");
            let _ = serde_json::to_writer(&mut out, &(binary.len() - before));
            out.extend_from_slice(b"}}");
        } else {
            out.extend_from_slice(b",\"data\":");
            if t.values.is_empty() {
                out.extend_from_slice(b"[]");
            } else if t.shape.is_empty() {
                out.push(b'[');
                write_scalar(&mut out, &t.values, 0);
                out.push(b']');
            } else {
                write_flat(&mut out, &t.values, 0, t.values.len());
            }
            out.push(b'}');
        }
    }
    out.extend_from_slice(b"]}");
    if binary.is_empty() && !r.outputs.iter().any(|(_, b)| *b) {
        return V2Body { body: out, json_len: None };
    }
    let json_len = out.len();
    out.extend_from_slice(&binary);
    V2Body { body: out, json_len: Some(json_len) }
}
