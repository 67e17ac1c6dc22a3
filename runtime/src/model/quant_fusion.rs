//! Fuses the per-layer activation quantization of a dynamically quantized
//! ONNX model into one operator, after tract's optimizer has run.
//!
//! `onnxruntime.quantization.quantize_dynamic` — the usual way an ONNX model
//! is made int8 — writes every `MatMul` as `DynamicQuantizeLinear ->
//! MatMulInteger -> Cast -> Mul(a_scale * b_scale)`. The ONNX loader already
//! turns the integer product into an exact float one
//! (`onnx::integer_matmuls_as_float`). Around it tract's optimizer then
//! leaves seven small nodes per layer: the quantization, two casts to f32
//! (values and zero point), a reshape and a subtraction of the zero point,
//! the product of the two scales and its reshape. tract pays each node it
//! evaluates an output allocation and its shape bookkeeping, about half a
//! microsecond: on `bc_mlp_int8.onnx` at batch 1 those 21 nodes made the
//! int8 model twice as slow as the float one it was quantized from (19.0 vs
//! 9.7 µs; fused, 11.5 µs).
//!
//! [`fuse`] finds that exact pattern in an optimized graph and replaces it
//! with one [`CenteredDynamicQuantize`] node that computes the same values
//! with the same f32 operations in the same order (tract's
//! `DynamicQuantizeLinearU8`, which follows the ONNX definition; then
//! `q as f32 - zero_point as f32`; then `scale * weight_scale`), so results
//! are bit for bit those of the unfused graph. Anything that differs from the
//! pattern — another consumer of an intermediate value, a model output in
//! the middle, an integer product the loader left to tract — is left as
//! tract made it.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::{OptBinByScalar, OptBinUnicast, TypedBinOp};
use tract_onnx::tract_core::ops::cast::Cast;
use tract_onnx::tract_core::ops::change_axes::IntoShape;
use tract_onnx::tract_core::ops::konst::Const;

/// The name tract-onnx gives its typed `DynamicQuantizeLinear` (the type
/// itself is private to tract-onnx).
const DYNAMIC_QUANTIZE: &str = "DynamicQuantizeLinearU8";

/// Quantizes `x` to u8 with a scale and zero point computed from its range
/// (ONNX `DynamicQuantizeLinear`), and outputs:
/// 0. the quantized values minus the zero point, as f32, shaped as `x`;
/// 1. the scale times `weight_scale`, as f32, shaped `scale_shape` (all 1).
#[derive(Clone, Debug)]
pub struct CenteredDynamicQuantize {
    weight_scale: f32,
    scale_shape: TVec<usize>,
}

impl PartialEq for CenteredDynamicQuantize {
    fn eq(&self, other: &Self) -> bool {
        self.weight_scale.to_bits() == other.weight_scale.to_bits()
            && self.scale_shape == other.scale_shape
    }
}

impl Eq for CenteredDynamicQuantize {}

/// Scale and zero point of `DynamicQuantizeLinear` to u8: the range of `xs`
/// extended to include 0, spread over 0..=255 — the same expressions as
/// tract-onnx's, so the same floats come out.
///
/// The range is kept in eight independent lanes so it compiles to vector
/// compares: each lane, like tract's single pass, takes only a value
/// strictly below (above) what it holds, so NaN is skipped and -0.0 never
/// replaces the initial +0.0; merging the lanes the same way gives the same
/// two floats as one pass over `xs`.
fn scale_and_zero_point(xs: &[f32]) -> (f32, u8) {
    const LANES: usize = 8;
    let below = |v: f32, lo: f32| if v < lo { v } else { lo };
    let above = |v: f32, hi: f32| if v > hi { v } else { hi };
    let (mut lo, mut hi) = ([0f32; LANES], [0f32; LANES]);
    let mut chunks = xs.chunks_exact(LANES);
    for chunk in &mut chunks {
        for lane in 0..LANES {
            lo[lane] = below(chunk[lane], lo[lane]);
            hi[lane] = above(chunk[lane], hi[lane]);
        }
    }
    for (lane, v) in chunks.remainder().iter().enumerate() {
        lo[lane] = below(*v, lo[lane]);
        hi[lane] = above(*v, hi[lane]);
    }
    let min = lo.iter().fold(0f32, |m, v| below(*v, m));
    let max = hi.iter().fold(0f32, |m, v| above(*v, m));
    let scale = (max - min) / u8::MAX as f32;
    let zero_point = (-min / scale)
        .round_ties_even()
        .max(u8::MIN as f32)
        .min(u8::MAX as f32);
    (scale, zero_point as u8)
}

/// `v` rounded to the nearest integer, ties to even: `f32::round_ties_even`
/// without its libm call (x86_64's baseline has no rounding instruction), so
/// the loop over a tensor vectorizes. Below 2^23, adding 2^23 leaves no
/// fraction bits and the addition rounds to nearest even; from 2^23 on
/// every float is an integer already; NaN and infinities pass through.
fn round_ties_even(v: f32) -> f32 {
    const NO_FRACTION: f32 = 8_388_608.0; // 2^23
    let a = v.abs();
    if a < NO_FRACTION {
        ((a + NO_FRACTION) - NO_FRACTION).copysign(v)
    } else {
        v
    }
}

/// `x` quantized, then centred on the zero point, in f32. The addition wraps
/// as tract's does in a release build: it can only overflow when the scale
/// underflowed to 0 and `x / scale` is infinite.
fn centered(x: f32, scale: f32, zero_point: u8) -> f32 {
    let q = (round_ties_even(x / scale) as i32)
        .wrapping_add(zero_point as i32)
        .clamp(u8::MIN as i32, u8::MAX as i32) as u8;
    q as f32 - zero_point as f32
}

impl Op for CenteredDynamicQuantize {
    fn name(&self) -> StaticName {
        "OutpostCenteredDynamicQuantize".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("weight scale {}", self.weight_scale)])
    }

    op_as_typed_op!();
}

impl EvalOp for CenteredDynamicQuantize {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let input = input.cast_to::<f32>()?;
        let xs = input.try_as_plain_ram()?.as_slice::<f32>()?;
        let (scale, zero_point) = scale_and_zero_point(xs);
        let mut out = Tensor::zero_dt(f32::datum_type(), input.shape())?;
        let mut plain = out.try_as_plain_ram_mut()?;
        for (y, x) in plain.as_slice_mut::<f32>()?.iter_mut().zip(xs) {
            *y = centered(*x, scale, zero_point);
        }
        let product = Tensor::from_shape(&self.scale_shape, &[scale * self.weight_scale])?;
        Ok(tvec!(out.into_tvalue(), product.into_tvalue()))
    }
}

impl TypedOp for CenteredDynamicQuantize {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(
            f32::fact(inputs[0].shape.clone()),
            f32::fact(self.scale_shape.clone())
        ))
    }

    as_op!();
}

/// One occurrence of the pattern, by outlet of the optimized graph.
struct Found {
    /// What the quantization reads.
    input: OutletId,
    /// The zero-point subtraction's output (replaced by output 0).
    centered: OutletId,
    /// The end of the scale product chain (replaced by output 1).
    scale: OutletId,
    op: CenteredDynamicQuantize,
    name: String,
}

/// Replaces every occurrence of the pattern in `model`; returns the model
/// unchanged if there is none or if tract refuses the patch.
pub fn fuse(model: TypedModel) -> TypedModel {
    let found: Vec<Found> = model
        .nodes()
        .iter()
        .filter(|n| n.op().name() == DYNAMIC_QUANTIZE)
        .filter_map(|n| find(&model, n.id))
        .collect();
    if found.is_empty() {
        return model;
    }
    match apply(&model, &found) {
        Ok(fused) => fused,
        Err(e) => {
            log::debug!("dynamic quantization left unfused: {e:#}");
            model
        }
    }
}

fn apply(model: &TypedModel, found: &[Found]) -> TractResult<TypedModel> {
    let mut patch = TypedModelPatch::new("fuse dynamic quantization");
    for f in found {
        let input = patch.tap_model(model, f.input)?;
        let outs = patch.wire_node(&f.name, f.op.clone(), &[input])?;
        patch.shunt_outside(model, f.centered, outs[0])?;
        patch.shunt_outside(model, f.scale, outs[1])?;
    }
    let mut fused = model.clone();
    patch.apply(&mut fused)?;
    fused.into_compact()
}

/// The single consumer of `outlet`, if it has exactly one and is not a
/// model output.
fn only_consumer(model: &TypedModel, outlet: OutletId) -> Option<&TypedNode> {
    match model.outlet_successors(outlet) {
        [one] if !model.outputs.contains(&outlet) => Some(model.node(one.node)),
        _ => None,
    }
}

fn is_cast_to_f32(node: &TypedNode) -> bool {
    node.op_as::<Cast>()
        .is_some_and(|c| c.to == f32::datum_type())
}

/// The elementwise binary operator a node applies, in any of the forms the
/// optimizer leaves it.
fn binary_name(node: &TypedNode) -> Option<&'static str> {
    if let Some(op) = node.op_as::<TypedBinOp>() {
        return Some(op.0.name());
    }
    if let Some(op) = node.op_as::<OptBinByScalar>() {
        return Some(op.binop.name());
    }
    node.op_as::<OptBinUnicast>().map(|op| op.binop.name())
}

/// Follows an optional reshape of a single value (`IntoShape` to all-1
/// dimensions) from `outlet`: returns the reshaped outlet (or `outlet`) and
/// the shape the value ends with.
fn through_unit_reshape(model: &TypedModel, outlet: OutletId) -> Option<(OutletId, TVec<usize>)> {
    let shape_of = |o: OutletId| -> Option<TVec<usize>> {
        model
            .outlet_fact(o)
            .ok()?
            .shape
            .as_concrete()
            .map(|s| s.iter().copied().collect())
    };
    if let Some(next) = only_consumer(model, outlet) {
        if next.op_as::<IntoShape>().is_some() {
            let reshaped = OutletId::new(next.id, 0);
            let shape = shape_of(reshaped)?;
            return shape.iter().all(|d| *d == 1).then_some((reshaped, shape));
        }
    }
    let shape = shape_of(outlet)?;
    shape.iter().all(|d| *d == 1).then_some((outlet, shape))
}

/// The scalar value of a constant node.
fn const_scalar_f32(model: &TypedModel, outlet: OutletId) -> Option<f32> {
    let konst = model.node(outlet.node).op_as::<Const>()?;
    let t = konst.val();
    (t.datum_type() == f32::datum_type() && t.len() == 1)
        .then(|| {
            t.try_as_plain_ram()
                .ok()?
                .as_slice::<f32>()
                .ok()?
                .first()
                .copied()
        })
        .flatten()
}

/// Matches the pattern at the `DynamicQuantizeLinearU8` node `dq`:
///
/// ```text
/// x ─ DQ ─0─ Cast(f32) ──────────────────── Sub ─ (centered)
///       ├─2─ Cast(f32) ─ [IntoShape 1..1] ──┘
///       └─1─ Mul(const scalar) ─ [IntoShape 1..1] ─ (scale)
/// ```
fn find(model: &TypedModel, dq: usize) -> Option<Found> {
    let node = model.node(dq);
    let [input] = node.inputs.as_slice() else {
        return None;
    };
    if model.outlet_fact(*input).ok()?.datum_type != f32::datum_type() || node.outputs.len() != 3 {
        return None;
    }
    let values_cast = only_consumer(model, OutletId::new(dq, 0)).filter(|n| is_cast_to_f32(n))?;
    let zp_cast = only_consumer(model, OutletId::new(dq, 2)).filter(|n| is_cast_to_f32(n))?;
    let (zp, _) = through_unit_reshape(model, OutletId::new(zp_cast.id, 0))?;
    let sub = only_consumer(model, OutletId::new(values_cast.id, 0))?;
    if binary_name(sub)? != "Sub"
        || sub.inputs.as_slice() != [OutletId::new(values_cast.id, 0), zp]
        || model.outlet_fact(OutletId::new(sub.id, 0)).ok()?.shape
            != model.outlet_fact(*input).ok()?.shape
    {
        return None;
    }
    let mul = only_consumer(model, OutletId::new(dq, 1))?;
    if binary_name(mul)? != "Mul" || mul.inputs.len() != 2 {
        return None;
    }
    let other = *mul.inputs.iter().find(|o| **o != OutletId::new(dq, 1))?;
    let weight_scale = const_scalar_f32(model, other)?;
    let (scale, scale_shape) = through_unit_reshape(model, OutletId::new(mul.id, 0))?;
    Some(Found {
        input: *input,
        centered: OutletId::new(sub.id, 0),
        scale,
        op: CenteredDynamicQuantize {
            weight_scale,
            scale_shape,
        },
        name: format!("{}.centered", node.name),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ONNX operator documentation's examples for DynamicQuantizeLinear.
    #[test]
    fn scale_and_zero_point_follow_the_onnx_examples() {
        let cases: [(&[f32], f32, u8, &[u8]); 3] = [
            (
                &[0., 2., -3., -2.5, 1.34, 0.5],
                0.019_607_844,
                153,
                &[153, 255, 0, 26, 221, 179],
            ),
            (
                &[-1., -2.1, -1.3, -2.5, -3.34, -4.],
                0.015_686_275,
                255,
                &[191, 121, 172, 96, 42, 0],
            ),
            (
                &[1., 2.1, 1.3, 2.5, 3.34, 4., 1.5, 2.6, 3.9, 4., 3., 2.345],
                0.015_686_275,
                0,
                &[64, 134, 83, 159, 213, 255, 96, 166, 249, 255, 191, 149],
            ),
        ];
        for (xs, want_scale, want_zp, want_q) in cases {
            let (scale, zp) = scale_and_zero_point(xs);
            assert!(
                (scale - want_scale).abs() < 1e-8,
                "scale {scale} vs {want_scale}"
            );
            assert_eq!(zp, want_zp);
            let q: Vec<f32> = xs.iter().map(|x| centered(*x, scale, zp)).collect();
            let want: Vec<f32> = want_q.iter().map(|q| *q as f32 - want_zp as f32).collect();
            assert_eq!(q, want);
        }
    }

    /// An ONNX fixture's graph as the loader hands it to the optimizer.
    fn decluttered(name: &str) -> TypedModel {
        let bytes = std::fs::read(crate::model::fixture_path(name)).expect("fixture");
        let prepared = crate::model::onnx::load(&bytes, &[], &[], false).expect("loads");
        prepared.model.into_decluttered().expect("declutters")
    }

    /// The int8 fixture's decluttered graph, its batch dimension bound to
    /// `batch` (None: left symbolic).
    fn int8_decluttered(batch: Option<usize>) -> TypedModel {
        let model = decluttered("bc_mlp_int8.onnx");
        match batch {
            None => model,
            Some(n) => {
                let sym = crate::model::plans::batch_symbol(&model).expect("batch symbol");
                let subs = std::collections::HashMap::from([(sym, (n as i64).to_dim())]);
                model.set_symbols(&subs).expect("binds N")
            }
        }
    }

    fn count(model: &TypedModel, name: &str) -> usize {
        model
            .nodes()
            .iter()
            .filter(|n| n.op().name() == name)
            .count()
    }

    /// Both plans of one graph, as tract optimizes it and fused: for batch 1
    /// and for the symbolic batch. Built once: optimizing is the slow part.
    fn plans(batch_one: bool) -> &'static (Arc<TypedSimplePlan>, Arc<TypedSimplePlan>) {
        static PLANS: std::sync::OnceLock<[(Arc<TypedSimplePlan>, Arc<TypedSimplePlan>); 2]> =
            std::sync::OnceLock::new();
        let build = |batch| {
            let optimized = int8_decluttered(batch).into_optimized().expect("optimizes");
            let fused = fuse(optimized.clone());
            (
                optimized.into_runnable().expect("runnable"),
                fused.into_runnable().expect("runnable"),
            )
        };
        &PLANS.get_or_init(|| [build(Some(1)), build(None)])[if batch_one { 0 } else { 1 }]
    }

    /// Every output of both plans on `rows`, compared bit for bit (NaN
    /// included).
    fn assert_same_outputs(
        plain: &Arc<TypedSimplePlan>,
        fused: &Arc<TypedSimplePlan>,
        rows: &[f32],
    ) {
        let input = Tensor::from_shape(&[rows.len() / 30, 30], rows).expect("input");
        let a = plain
            .run(tvec!(input.clone().into_tvalue()))
            .expect("plain runs");
        let b = fused.run(tvec!(input.into_tvalue())).expect("fused runs");
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.datum_type(), y.datum_type());
            assert_eq!(x.shape(), y.shape());
            if x.datum_type() == f32::datum_type() {
                let bits = |t: &TValue| -> Vec<u32> {
                    t.try_as_plain_ram()
                        .expect("plain")
                        .as_slice::<f32>()
                        .expect("f32")
                        .iter()
                        .map(|v| v.to_bits())
                        .collect()
                };
                assert_eq!(bits(x), bits(y), "rows {rows:?}");
            } else {
                assert_eq!(x, y, "rows {rows:?}");
            }
        }
    }

    fn test_rows() -> &'static [Vec<f32>] {
        static ROWS: std::sync::OnceLock<Vec<Vec<f32>>> = std::sync::OnceLock::new();
        ROWS.get_or_init(|| {
            let path = crate::model::fixture_path("data/bc_test.csv");
            crate::dataset::read_csv(path, crate::dataset::LabelColumn::Last)
                .expect("test rows")
                .rows
        })
    }

    #[test]
    fn every_dynamic_quantization_of_the_int8_fixture_is_fused() {
        for batch in [Some(1), Some(32), None] {
            let optimized = int8_decluttered(batch).into_optimized().expect("optimizes");
            let fused = fuse(optimized.clone());
            assert_eq!(count(&fused, DYNAMIC_QUANTIZE), 0, "batch {batch:?}");
            assert_eq!(
                count(&fused, "OutpostCenteredDynamicQuantize"),
                3,
                "batch {batch:?}"
            );
            // Seven nodes per layer become one (constants go with them).
            assert!(
                fused.nodes().len() + 3 * 6 <= optimized.nodes().len(),
                "batch {batch:?}: {} -> {} nodes",
                optimized.nodes().len(),
                fused.nodes().len()
            );
        }
    }

    #[test]
    fn fused_plans_give_bit_identical_outputs_on_the_test_rows() {
        let rows = test_rows();
        let (plain, fused) = plans(true);
        for row in rows {
            assert_same_outputs(plain, fused, row);
        }
        let (plain, fused) = plans(false);
        assert_same_outputs(plain, fused, &rows.concat());
        assert_same_outputs(plain, fused, &rows[..7].concat());
    }

    #[test]
    fn a_graph_without_the_pattern_is_returned_as_it_was() {
        let optimized = decluttered("bc_mlp.onnx").into_optimized().expect("optimizes");
        let fused = fuse(optimized.clone());
        assert_eq!(format!("{fused:?}"), format!("{optimized:?}"));
    }

    /// A second consumer of the quantized values (here: the values made a
    /// model output too) must keep the pattern unfused, and the graph valid.
    #[test]
    fn an_intermediate_value_used_elsewhere_keeps_the_pattern() {
        let mut optimized = int8_decluttered(Some(1))
            .into_optimized()
            .expect("optimizes");
        let dq = optimized
            .nodes()
            .iter()
            .find(|n| n.op().name() == DYNAMIC_QUANTIZE)
            .expect("dq")
            .id;
        let mut outputs = optimized.output_outlets().expect("outputs").to_vec();
        outputs.push(OutletId::new(dq, 0));
        optimized.select_output_outlets(&outputs).expect("outputs");
        let fused = fuse(optimized);
        assert_eq!(count(&fused, DYNAMIC_QUANTIZE), 1);
        assert_eq!(count(&fused, "OutpostCenteredDynamicQuantize"), 2);
        fused.into_runnable().expect("still runnable");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Rows like the data: a test row with every feature scaled by
        /// 0.5..2 (the probabilities stay away from 0 and 1, where a
        /// difference in the last bit would show).
        #[test]
        fn fused_plans_give_bit_identical_outputs_near_the_data(
            row in 0usize..143,
            factors in proptest::collection::vec(0.5f32..2.0, 30),
            rows_in_batch in 1usize..5,
        ) {
            let rows = test_rows();
            let row: Vec<f32> = rows[row % rows.len()].iter().zip(&factors).map(|(x, f)| x * f).collect();
            let (plain, fused) = plans(true);
            assert_same_outputs(plain, fused, &row);
            let (plain, fused) = plans(false);
            assert_same_outputs(plain, fused, &row.repeat(rows_in_batch));
        }

        /// Rows far from the data: ranges across many orders of magnitude,
        /// zeros, infinities and NaN.
        #[test]
        fn fused_plans_give_bit_identical_outputs_far_from_the_data(
            row in proptest::collection::vec(
                proptest::prop_oneof![
                    4 => -1e4f32..1e4f32,
                    2 => proptest::num::f32::ANY,
                    1 => proptest::strategy::Just(0.0f32),
                ],
                30,
            ),
        ) {
            let (plain, fused) = plans(true);
            assert_same_outputs(plain, fused, &row);
        }
    }

    /// tract-onnx's range pass, one value at a time.
    fn reference_range(xs: &[f32]) -> (f32, f32) {
        xs.iter().fold((0f32, 0f32), |(lo, hi), &v| {
            if v < lo {
                (v, hi)
            } else if v > hi {
                (lo, v)
            } else {
                (lo, hi)
            }
        })
    }

    #[test]
    fn round_ties_even_matches_the_standard_library() {
        let mut special = vec![
            0.0,
            -0.0,
            0.5,
            -0.5,
            1.5,
            -1.5,
            2.5,
            -2.5,
            0.499_999_97,
            8_388_607.5,
            -8_388_607.5,
            8_388_608.0,
            8_388_609.0,
            16_777_217.0,
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            -f32::MIN_POSITIVE,
            1e-45,
            -1e-45,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ];
        special.extend((-3000..3000).map(|k| k as f32 + 0.5));
        // A spread of every kind of float: all exponents, many mantissas.
        special.extend((0..u32::MAX).step_by(4099).map(f32::from_bits));
        for v in special {
            let (ours, std) = (round_ties_even(v), v.round_ties_even());
            assert!(
                ours.to_bits() == std.to_bits() || (ours.is_nan() && std.is_nan()),
                "{v:e}: {ours:e} vs {std:e}"
            );
        }
    }

    proptest::proptest! {
        /// The lane-wise range is the one-pass range, bit for bit, on any
        /// values (NaN, -0.0 and infinities included) and any length.
        #[test]
        fn lanes_find_the_range_one_pass_finds(
            xs in proptest::collection::vec(
                proptest::prop_oneof![
                    3 => -1e3f32..1e3f32,
                    1 => proptest::num::f32::ANY,
                    1 => proptest::strategy::Just(-0.0f32),
                ],
                0..40,
            ),
        ) {
            let (min, max) = reference_range(&xs);
            let scale = (max - min) / 255.0;
            let zp = (-min / scale).round_ties_even().clamp(0.0, 255.0) as u8;
            let (s, z) = scale_and_zero_point(&xs);
            proptest::prop_assert_eq!(s.to_bits(), scale.to_bits());
            proptest::prop_assert_eq!(z, zp);
        }
    }

    #[test]
    fn all_zero_input_gives_zeros_not_nan() {
        let (scale, zp) = scale_and_zero_point(&[0.0; 4]);
        assert_eq!(zp, 0);
        assert!(centered(0.0, scale, zp) == 0.0);
    }
}
