//! TFLite loading through tract-tflite.
//!
//! The model first goes through [`super::tflite_rewrite`], which refuses the
//! operators tract-tflite lacks (naming them) and rewrites what published
//! models need: float16 constants, quantize / dequantize at the graph edges
//! (moved into the runtime's input and output adapters), `PRELU`,
//! per-channel quantized fully-connected layers. A model that needs none of
//! it reaches tract byte for byte. After tract has read the model, two
//! fixes apply to its graph: quantized softmax output types (a tract-tflite
//! bug) and output names. Limits and the operator lists are re-exported
//! here; `docs/model-support.md` says what loads.

use std::any::Any;

use tract_onnx::prelude::*;

use tract_onnx::tract_core::model::TypedModelPatch;
use tract_onnx::tract_core::ops::cast::cast;
use tract_onnx::tract_core::ops::nn::Softmax;

use super::tflite_rewrite;
use super::{EdgeQuantization, LoadError, PreparedModel};
use crate::tensor::ElementType;

pub use super::tflite_rewrite::{
    MAX_BUFFERS, MAX_MODEL_BYTES, MAX_OPERATORS, MAX_OPERATOR_CODES, MAX_RANK, MAX_REWRITTEN_BYTES, MAX_TENSORS,
    REWRITTEN_BUILTINS, TRACT_BUILTINS,
};

pub(crate) fn load(bytes: &[u8]) -> Result<PreparedModel, LoadError> {
    let prepared = tflite_rewrite::prepare(bytes)?;
    if !prepared.changes.is_empty() {
        log::info!("TFLite model rewritten for tract: {}", prepared.changes.join("; "));
    }
    let mut model = read(&prepared.bytes)?;
    fix_quantized_softmax(&mut model, &prepared.quantized_softmax)?;
    label_outputs(&mut model, &prepared.output_names)?;
    Ok(PreparedModel { model, inputs: prepared.inputs, outputs: prepared.outputs })
}

/// tract-tflite 0.23.9 wires a quantized `SOFTMAX` with its input's
/// quantization as output type, and tract's quantized softmax kernel writes
/// `p / scale` with no zero point. TFLite's int8 softmax output is
/// `scale 1/256, zero point -128`, so as read the result is wrong (and clips
/// at p = 0.5). The fix: let the kernel produce the uint8 representation
/// with zero point 0 (the same real values: `q_u8 = q_i8 + 128`), then cast,
/// exactly, to the type the model declares.
fn fix_quantized_softmax(
    model: &mut TypedModel,
    fixes: &[(String, EdgeQuantization)],
) -> Result<(), LoadError> {
    for (name, q) in fixes {
        let wanted = quantized_type(q);
        let computed = if q.zero_point == 0 {
            wanted
        } else {
            DatumType::QU8(QParams::ZpScale { zero_point: 0, scale: q.scale })
        };
        let id = model.node_id_by_name(name).map_err(|_| LoadError::Prepare {
            reason: format!("quantized SOFTMAX {name:?} not found after reading the model"),
        })?;
        let node = model.node(id);
        let Some(softmax) = node.op_as::<Softmax>() else {
            return Err(LoadError::Prepare {
                reason: format!("quantized SOFTMAX {name:?} was not read as a softmax ({})", node.op.name()),
            });
        };
        let fixed = Softmax { quant_output_dt: Some(computed), ..softmax.clone() };
        let input = node
            .inputs
            .first()
            .copied()
            .ok_or_else(|| LoadError::Prepare { reason: format!("SOFTMAX {name:?} has no input") })?;
        // The model declares `wanted`: give the node that type first, so the
        // patch substitutes like for like; later nodes' facts are refreshed
        // once all softmaxes are patched.
        let outlet = OutletId::new(id, 0);
        let mut fact = model.outlet_fact(outlet).map_err(prepare_err)?.clone();
        fact.datum_type = wanted;
        model.set_outlet_fact(outlet, fact).map_err(prepare_err)?;
        let patch = || -> TractResult<TypedModelPatch> {
            let mut patch = TypedModelPatch::default();
            let tapped = patch.tap_model(model, input)?;
            let mut wire = patch.wire_node(format!("{name}.softmax"), fixed, &[tapped])?;
            if computed != wanted {
                wire = patch.wire_node(format!("{name}.requantize"), cast(wanted), &wire)?;
            }
            patch.shunt_outside(model, outlet, wire[0])?;
            Ok(patch)
        };
        patch().and_then(|p| p.apply(model)).map_err(prepare_err)?;
    }
    if !fixes.is_empty() {
        model.refresh_output_facts().map_err(prepare_err)?;
    }
    Ok(())
}

fn quantized_type(q: &EdgeQuantization) -> DatumType {
    let qp = QParams::ZpScale { zero_point: q.zero_point, scale: q.scale };
    match q.element_type {
        ElementType::U8 => DatumType::QU8(qp),
        _ => DatumType::QI8(qp),
    }
}

/// Callers address outputs by the model's tensor names; tract names an
/// output after the node that computes it, which for an operator wired as
/// several nodes (a fused activation) carries a suffix.
fn label_outputs(model: &mut TypedModel, names: &[String]) -> Result<(), LoadError> {
    let outlets = model.output_outlets().map_err(prepare_err)?.to_vec();
    for (outlet, name) in outlets.into_iter().zip(names) {
        model.set_outlet_label(outlet, name.clone()).map_err(prepare_err)?;
    }
    Ok(())
}

fn prepare_err(e: TractError) -> LoadError {
    LoadError::Prepare { reason: format!("{e:#}") }
}

/// tract-tflite unwraps freely on what it reads from the flatbuffer. The
/// rewrite checks what it knows tract relies on; a panic on anything else
/// still must not take the process down with it, so it becomes a load error.
fn read(bytes: &[u8]) -> Result<TypedModel, LoadError> {
    let result = std::panic::catch_unwind(|| {
        let mut reader = bytes;
        tract_tflite::tflite().model_for_read(&mut reader)
    });
    match result {
        Ok(Ok(model)) => Ok(model),
        Ok(Err(e)) => Err(LoadError::Parse { format: "TFLite", reason: format!("{e:#}") }),
        Err(panic) => Err(LoadError::Parse {
            format: "TFLite",
            reason: format!("tract-tflite failed reading the model: {}", panic_message(&panic)),
        }),
    }
}

fn panic_message(panic: &Box<dyn Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic".to_string()
    }
}
