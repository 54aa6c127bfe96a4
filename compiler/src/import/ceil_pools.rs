//! Give ceil-mode pooling explicit end padding, so that it survives the NNEF round trip.
//!
//! ONNX `MaxPool` / `AveragePool` with `ceil_mode=1` (SqueezeNet, GoogLeNet) add a last, partial
//! window at the end of each axis. tract keeps the flag in its typed graph but NNEF has no such
//! flag: tract's writer drops it, and an artifact reloaded from NNEF computed 55x55 where the
//! graph expected 56x56 (`Reshape: 3025 should be equal to 3136`). The same windows are had with
//! ordinary explicit padding at the end, large enough to hold the partial window: padding is
//! never part of a max, and an average without `count_include_pad` divides by the taps inside the
//! image only. An average that counts padding would count the new taps too, so that one case is
//! refused with the node's name rather than silently changed.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::bail;
use tract_onnx::tract_core::ops::cnn::{MaxPool, PaddingSpec, PoolSpec, SumPool};

/// Rewrites every ceil-mode pooling of `model` to explicit padding with the same output shape.
pub(crate) fn explicit_ceil_pools(model: &mut TypedModel) -> TractResult<()> {
    for id in 0..model.nodes().len() {
        let node = model.node(id);
        let (spec, counts_padding) = if let Some(pool) = node.op_as::<MaxPool>() {
            (&pool.pool_spec, false)
        } else if let Some(pool) = node.op_as::<SumPool>() {
            (&pool.pool_spec, pool.count_include_pad)
        } else {
            continue;
        };
        let PaddingSpec::ExplicitOnnxPool(before, after, true) = &spec.padding else {
            continue;
        };
        let input = model
            .outlet_fact(node.inputs[0])?
            .shape
            .as_concrete()
            .map(|s| s.to_vec());
        let output = node.outputs[0].fact.shape.as_concrete().map(|s| s.to_vec());
        let (Some(input), Some(output)) = (input, output) else {
            bail!("pooling {:?} in ceil mode needs fixed shapes", node.name);
        };
        let input_hw = spec.data_format.shape(input.clone())?.hw_dims().to_vec();
        let output_hw = spec.data_format.shape(output.clone())?.hw_dims().to_vec();
        let mut padded_after = after.clone();
        for axis in 0..input_hw.len() {
            let field = (spec.kernel_shape[axis] - 1) * spec.dilation(axis) + 1;
            let reach = (output_hw[axis] - 1) * spec.stride(axis) + field;
            padded_after[axis] = reach.saturating_sub(input_hw[axis] + before[axis]);
        }
        if counts_padding && padded_after.iter().zip(after).any(|(new, old)| new > old) {
            bail!(
                "AveragePool {:?} has ceil_mode=1 and count_include_pad=1: its last windows count \
                 padding that NNEF cannot express; export it with ceil_mode=0 or \
                 count_include_pad=0",
                node.name
            );
        }
        let explicit = PoolSpec {
            padding: PaddingSpec::Explicit(before.clone(), padded_after),
            ..spec.clone()
        };
        let same = explicit.output_shape(&input)?;
        let expected = spec.data_format.shape(output)?;
        if same.hw_dims() != expected.hw_dims() {
            bail!(
                "pooling {:?}: explicit padding changes its output shape",
                node.name
            );
        }
        let node = model.node_mut(id);
        if let Some(pool) = node.op_as_mut::<MaxPool>() {
            pool.pool_spec = explicit;
        } else if let Some(pool) = node.op_as_mut::<SumPool>() {
            pool.pool_spec = explicit;
        }
    }
    model.check_consistency()
}
