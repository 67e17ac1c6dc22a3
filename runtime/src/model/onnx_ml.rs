//! `ai.onnx.ml` operators that skl2onnx emits and tract-onnx lacks.
//!
//! tract-onnx already has `Normalizer`, `LinearClassifier`, `LinearRegressor`,
//! `TreeEnsembleClassifier`, `CategoryMapper` and `ArrayFeatureExtractor`.
//! scikit-learn pipelines also use:
//!
//! | operator  | scikit-learn source               | here                                   |
//! |-----------|-----------------------------------|----------------------------------------|
//! | `Scaler`  | `StandardScaler`, `MinMaxScaler`  | `(x - offset) * scale`, per feature    |
//! | `Imputer` | `SimpleImputer`                   | replaces NaN (or a value) per feature  |
//! | `Binarizer` | `Binarizer`                     | `x > threshold` as 0/1 floats           |
//! | `ZipMap`  | every classifier's probabilities  | identity: the probabilities stay a `[N, classes]` tensor |
//!
//! `ZipMap` turns a probability tensor into a list of `{label: probability}`
//! maps, a type tract (and most non-Python clients) have no use for. The
//! runtime keeps the tensor, in the order of the classifier's labels, which
//! is what `/predict` and the drift sketches want.
//!
//! Each operator is an [`Expansion`]: it is wired into tract's own typed ops
//! at load time, so the optimizer fuses it like anything else.

use tract_onnx::model::{OnnxOpRegister, ParsingContext};
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::change_axes::wire_with_rank_broadcast;
use tract_onnx::tract_core::ops::logic::{comp_eq, comp_gt, Iff};
use tract_onnx::tract_core::ops::math::{is_nan, mul, sub};
use tract_onnx::tract_hir::internal::*;

/// Registers the operators of this module.
pub fn register(reg: &mut OnnxOpRegister) {
    reg.insert("Scaler", scaler);
    reg.insert("Imputer", imputer);
    reg.insert("Binarizer", binarizer);
    reg.insert("ZipMap", zipmap);
}

fn wire_to_f32(prefix: &str, model: &mut TypedModel, x: OutletId) -> TractResult<OutletId> {
    if model.outlet_fact(x)?.datum_type == f32::datum_type() {
        return Ok(x);
    }
    Ok(model.wire_node(
        format!("{prefix}.to_f32"),
        tract_onnx::tract_core::ops::cast::cast(f32::datum_type()),
        &[x],
    )?[0])
}

fn same_shape_f32_rules<'r, 'p: 'r, 's: 'r>(
    s: &mut Solver<'r>,
    inputs: &'p [TensorProxy],
    outputs: &'p [TensorProxy],
) -> InferenceResult {
    check_input_arity(inputs, 1)?;
    check_output_arity(outputs, 1)?;
    s.equals(&outputs[0].datum_type, DatumType::F32)?;
    s.equals(&inputs[0].shape, &outputs[0].shape)?;
    Ok(())
}

// ---------------------------------------------------------------- Scaler

#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct Scaler {
    offset: Arc<Tensor>,
    scale: Arc<Tensor>,
}

fn scaler(_ctx: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let offset: Vec<f32> = node.get_attr_opt_vec("offset")?.unwrap_or_else(|| vec![0.0]);
    let scale: Vec<f32> = node.get_attr_opt_vec("scale")?.unwrap_or_else(|| vec![1.0]);
    node.expect(!offset.is_empty() && !scale.is_empty(), "offset and scale are not empty")?;
    Ok((expand(Scaler { offset: rctensor1(&offset), scale: rctensor1(&scale) }), vec![]))
}

impl Expansion for Scaler {
    fn name(&self) -> StaticName {
        "Scaler".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        same_shape_f32_rules(s, inputs, outputs)
    }

    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        let x = wire_to_f32(prefix, model, inputs[0])?;
        let offset = model.add_const(format!("{prefix}.offset"), self.offset.clone())?;
        let scale = model.add_const(format!("{prefix}.scale"), self.scale.clone())?;
        let centered = wire_with_rank_broadcast(format!("{prefix}.sub"), model, sub(), &[x, offset])?[0];
        wire_with_rank_broadcast(format!("{prefix}.mul"), model, mul(), &[centered, scale])
    }
}

// ---------------------------------------------------------------- Imputer

#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct Imputer {
    imputed: Arc<Tensor>,
    /// `None` replaces NaN (scikit-learn's default `missing_values=np.nan`).
    replaced: Option<Arc<Tensor>>,
}

fn imputer(_ctx: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let imputed: Vec<f32> = node.get_attr_opt_vec("imputed_value_floats")?.unwrap_or_default();
    node.expect(
        !imputed.is_empty(),
        "imputed_value_floats is set (integer imputation is not supported)",
    )?;
    let replaced: f32 = node.get_attr_opt("replaced_value_float")?.unwrap_or(0.0);
    let replaced = if replaced.is_nan() { None } else { Some(rctensor0(replaced)) };
    Ok((expand(Imputer { imputed: rctensor1(&imputed), replaced }), vec![]))
}

impl Expansion for Imputer {
    fn name(&self) -> StaticName {
        "Imputer".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        same_shape_f32_rules(s, inputs, outputs)
    }

    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        let x = wire_to_f32(prefix, model, inputs[0])?;
        let mask = match &self.replaced {
            None => model.wire_node(format!("{prefix}.is_nan"), is_nan(), &[x])?[0],
            Some(v) => {
                let v = model.add_const(format!("{prefix}.replaced"), v.clone())?;
                wire_with_rank_broadcast(format!("{prefix}.eq"), model, TypedBinOp(comp_eq(), None), &[x, v])?[0]
            }
        };
        let imputed = model.add_const(format!("{prefix}.imputed"), self.imputed.clone())?;
        // Iff needs its three inputs at the same rank; broadcasting does the rest.
        wire_with_rank_broadcast(format!("{prefix}.where"), model, Iff, &[mask, imputed, x])
    }
}

// ---------------------------------------------------------------- Binarizer

#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct Binarizer {
    threshold: Arc<Tensor>,
}

fn binarizer(_ctx: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let threshold: f32 = node.get_attr_opt("threshold")?.unwrap_or(0.0);
    Ok((expand(Binarizer { threshold: rctensor0(threshold) }), vec![]))
}

impl Expansion for Binarizer {
    fn name(&self) -> StaticName {
        "Binarizer".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        same_shape_f32_rules(s, inputs, outputs)
    }

    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        let x = wire_to_f32(prefix, model, inputs[0])?;
        let t = model.add_const(format!("{prefix}.threshold"), self.threshold.clone())?;
        let gt = wire_with_rank_broadcast(format!("{prefix}.gt"), model, TypedBinOp(comp_gt(), None), &[x, t])?[0];
        model.wire_node(
            format!("{prefix}.to_f32"),
            tract_onnx::tract_core::ops::cast::cast(f32::datum_type()),
            &[gt],
        )
    }
}

// ---------------------------------------------------------------- ZipMap

#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct ZipMapAsTensor;

fn zipmap(_ctx: &ParsingContext, _node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    Ok((expand(ZipMapAsTensor), vec![]))
}

impl Expansion for ZipMapAsTensor {
    fn name(&self) -> StaticName {
        "ZipMap".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].datum_type, &outputs[0].datum_type)?;
        s.equals(&inputs[0].shape, &outputs[0].shape)?;
        Ok(())
    }

    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        model.wire_node(prefix, tract_onnx::tract_core::ops::identity::Identity, &[inputs[0]])
    }
}
