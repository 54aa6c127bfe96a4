//! Kernels: graft's own implementations of operators that tract runs slowly on CPU, swapped into a
//! graph before it is optimised ([`use_graft_kernels`]). Artifacts keep standard tract NNEF; only
//! the plan built from them differs, so the same file runs with or without them.
//!
//! Casts between f32 and quantized int8 (what an int8 graph does wherever an f32 operator meets
//! an int8 one): tract converts element by element through a generic path (about 1 ns per value,
//! a third of the int8 Lite0 graph's time). [`QuantizedCast`] does the same arithmetic, bit for
//! bit, in a loop the compiler vectorises.
//!
//! In an int8 graph, depthwise convolutions stay f32 (tract has no int8 depthwise kernel), so each
//! sits in a dequantize -> convolve -> clamp -> quantize chain. [`QuantizedDepthwise`] runs such a
//! chain as one operator with the same arithmetic (dequantizing each input plane before padding
//! it, quantizing each output plane), so the f32 tensors are never written out.
//!
//! Depthwise convolution: tract 0.23's `DepthWiseConv` walks padding zones with generic scalar
//! code (under 1 G multiply-adds/s here), about half of EfficientNet-Lite0's time.
//! [`DepthwiseConv`] copies each channel once into a zero-padded plane split into one plane per
//! (row, column) phase of the stride, so every kernel tap reads one contiguous run covering the
//! whole output; the taps are summed a few dozen outputs at a time in registers, in a loop the
//! compiler vectorises. On x86-64 an AVX2+FMA build of the loop is chosen at run time when the
//! CPU has it; aarch64 always has NEON and FMA.

mod aligned;
pub mod cast;
pub mod conv;
pub mod depthwise;
mod depthwise_blocked;
pub mod dispatch;
pub mod gemm_f32;
pub mod gemm_int8;
mod graph;
pub mod qconv;

pub use cast::QuantizedCast;
pub use conv::Convolution;
pub use depthwise::{DepthwiseConv, QuantizedDepthwise};
pub use dispatch::Level;
pub use qconv::QuantizedConvolution;

use tract_core::internal::*;

use graph::{clamp_chain, replace_chain};

/// Fuses every dequantize -> depthwise -> clamp -> quantize chain into one
/// [`QuantizedDepthwise`]; returns how many.
fn fuse_quantized_depthwise(model: &mut TypedModel) -> TractResult<usize> {
    let mut fused = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some((kernel, quantize)) = QuantizedDepthwise::for_chain(model, node)? else {
            continue;
        };
        let name = format!("{}.int8_depthwise", model.node(quantize).name);
        let input = node.inputs[0];
        replace_chain(model, &[input], quantize, name, kernel)?;
        fused += 1;
    }
    Ok(fused)
}

/// Absorbs the clamps (ReLU6) after every f32 [`DepthwiseConv`] into it; returns how many.
fn fuse_depthwise_clamps(model: &mut TypedModel) -> TractResult<usize> {
    let mut fused = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(conv) = node.op_as::<DepthwiseConv>() else {
            continue;
        };
        let (clamp, last) = clamp_chain(model, id)?;
        let fact = model.outlet_fact(OutletId::new(last, 0))?;
        // The chain may add or remove unit axes: the kernel takes the shape at its end.
        let Some(shape) = fact.shape.as_concrete() else {
            continue;
        };
        if clamp.is_empty() || fact.datum_type != f32::datum_type() {
            continue;
        }
        let kernel = conv.absorbing(clamp, shape);
        let name = format!("{}.clamped", node.name);
        let input = node.inputs[0];
        replace_chain(model, &[input], last, name, kernel)?;
        fused += 1;
    }
    Ok(fused)
}

/// Replaces every f32 convolution with one group (a tract `Conv`, or the pointwise `EinSum` and
/// bias `Add` tract's declutter makes of a 1x1 one) by a [`Convolution`] that also absorbs the
/// clamps, residual add and clamps after it; returns how many.
fn fuse_convolutions(model: &mut TypedModel, level: Level) -> TractResult<usize> {
    let mut fused = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let (conv, input, last) = if let Some(conv) = Convolution::for_conv(model, node, level)? {
            (conv, node.inputs[0], id)
        } else if let Some(found) = Convolution::for_einsum(model, node, level)? {
            found
        } else {
            continue;
        };
        let (conv, residual, end) = conv.absorbing(model, last)?;
        let mut inputs = vec![input];
        inputs.extend(residual);
        let name = format!("{}.graft", model.node(id).name);
        replace_chain(model, &inputs, end, name, conv)?;
        fused += 1;
    }
    Ok(fused)
}

/// Replaces every int8 convolution with one group (tract's quantized pointwise `EinSum` and
/// quantized `Conv`, with the cast of their raw output) by a [`QuantizedConvolution`]; returns
/// how many.
fn fuse_quantized_convolutions(model: &mut TypedModel, level: Level) -> TractResult<usize> {
    let mut fused = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let found = match QuantizedConvolution::for_einsum(model, node, level)? {
            Some(found) => Some(found),
            None => QuantizedConvolution::for_conv(model, node, level)?,
        };
        let Some((conv, last)) = found else {
            continue;
        };
        let input = node.inputs[0];
        let name = format!("{}.graft", node.name);
        replace_chain(model, &[input], last, name, conv)?;
        fused += 1;
    }
    Ok(fused)
}

/// Replaces every operator one of graft's kernels computes with that kernel, using the
/// instruction set [`Level::current`] chose for this process; returns how many were replaced.
/// Run it on a typed graph before `optimize`.
pub fn use_graft_kernels(model: &mut TypedModel) -> TractResult<usize> {
    use_graft_kernels_at(model, Level::current())
}

/// [`use_graft_kernels`] at a given level (which this CPU must support).
pub fn use_graft_kernels_at(model: &mut TypedModel, level: Level) -> TractResult<usize> {
    ensure!(
        level.supported(),
        "this CPU cannot run {} kernels",
        level.name()
    );
    let mut replaced = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let patch = if let Some(kernel) = DepthwiseConv::for_node(model, node, level)? {
            TypedModelPatch::replace_single_op(model, node, &node.inputs[..1], kernel)?
        } else if let Some(kernel) = QuantizedCast::for_node(model, node)? {
            TypedModelPatch::replace_single_op(model, node, &node.inputs, kernel)?
        } else {
            continue;
        };
        patch.apply(model)?;
        replaced += 1;
    }
    replaced += fuse_quantized_depthwise(model)?;
    replaced += fuse_depthwise_clamps(model)?;
    replaced += fuse_convolutions(model, level)?;
    replaced += fuse_quantized_convolutions(model, level)?;
    if replaced > 0 {
        model.compact()?;
    }
    Ok(replaced)
}

/// `model.into_optimized()` with graft's kernels swapped in after decluttering.
pub fn into_optimized(model: TypedModel) -> TractResult<TypedModel> {
    let mut model = model.into_decluttered()?;
    use_graft_kernels(&mut model)?;
    model.optimize()?;
    Ok(model)
}
