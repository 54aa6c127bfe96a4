//! Write exact GELU back as the operators it was fused from, before NNEF serialization.
//!
//! tract's declutter fuses `x * 0.5 * (1 + erf(x / sqrt 2))` (what PyTorch exports for GELU,
//! e.g. in ConvNeXt) into one `GeluExact` operator, which tract 0.23's NNEF writer has no
//! serializer for: a ConvNeXt compile failed at "No serializer found ... GeluExact". Expanded
//! again, the artifact stays standard tract NNEF (`tract_core_erf` and arithmetic) that any tract
//! reader loads.

use std::borrow::Cow;
use std::f32::consts::FRAC_1_SQRT_2;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::math;
use tract_onnx::tract_core::ops::nn::GeluExact;

/// `model` with every `GeluExact` replaced by `0.5 * x * (1 + erf(x / sqrt 2))` (borrowed
/// unchanged when it has none).
pub(crate) fn expand_gelu(model: &TypedModel) -> TractResult<Cow<'_, TypedModel>> {
    let gelus: Vec<usize> = model
        .nodes()
        .iter()
        .filter(|n| {
            n.op_as::<ElementWiseOp>()
                .is_some_and(|e| e.0.is::<GeluExact>())
        })
        .map(|n| n.id)
        .collect();
    if gelus.is_empty() {
        return Ok(Cow::Borrowed(model));
    }
    let mut model = model.clone();
    for id in gelus {
        let node = model.node(id);
        let name = node.name.clone();
        let input = node.inputs[0];
        let fact = model.outlet_fact(input)?.clone();
        let mut patch = TypedModelPatch::default();
        let x = patch.tap_model(&model, input)?;
        let constant = |patch: &mut TypedModelPatch, suffix: &str, v: f32| {
            let value = tensor0(v)
                .cast_to_dt(fact.datum_type)?
                .into_owned()
                .broadcast_into_rank(fact.rank())?;
            patch.add_const(format!("{name}.{suffix}"), value)
        };
        let c = constant(&mut patch, "inv_sqrt2", FRAC_1_SQRT_2)?;
        let one = constant(&mut patch, "one", 1.0)?;
        let half = constant(&mut patch, "half", 0.5)?;
        let scaled = patch.wire_node(format!("{name}.scaled"), math::mul(), &[x, c])?[0];
        let erf = patch.wire_node(format!("{name}.erf"), math::erf(), &[scaled])?[0];
        let plus = patch.wire_node(format!("{name}.plus_one"), math::add(), &[erf, one])?[0];
        let half_x = patch.wire_node(format!("{name}.half_x"), math::mul(), &[x, half])?[0];
        let y = patch.wire_node(format!("{name}.gelu"), math::mul(), &[half_x, plus])?[0];
        patch.shunt_outside(&model, OutletId::new(id, 0), y)?;
        patch.apply(&mut model)?;
    }
    let model = model.into_compact()?;
    model.check_consistency()?;
    Ok(Cow::Owned(model))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::testing::run_once;
    use tract_onnx::tract_core::internal::Approximation;
    use tract_onnx::tract_core::ops::nn::gelu_exact::gelu_exact;

    #[test]
    fn expanded_gelu_computes_the_same_values_and_serializes() {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([2, 5])).unwrap();
        let y = model.wire_node("gelu", gelu_exact(), &[x]).unwrap()[0];
        model.select_output_outlets(&[y]).unwrap();
        let input = tensor2(&[[-3f32, -1.0, -0.25, 0.0, 0.5], [1.0, 2.0, 3.0, -0.01, 7.0]]);
        let run = |m: &TypedModel| run_once(m, &input);
        let expanded = expand_gelu(&model).unwrap();
        assert!(expanded
            .nodes()
            .iter()
            .all(|n| !n.op.name().contains("Gelu")));
        run(&model)
            .close_enough(&run(&expanded), Approximation::Close)
            .unwrap();
        tract_nnef::nnef()
            .write_to_tar(&expanded, Vec::new())
            .expect("standard NNEF");
    }
}
