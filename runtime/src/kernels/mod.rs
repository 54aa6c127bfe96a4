//! Kernels: graft's own implementations of the operators that dominate a CNN's time, swapped
//! into a tract graph before it is optimised ([`use_graft_kernels`]). Artifacts keep standard
//! tract NNEF; only the plan built from them differs, so the same file runs with or without them
//! (`graft bench --tract-kernels`). One kernel family per file, in the order a graph uses them:
//!
//! - [`dispatch`]: the instruction-set level ([`Level`]: `avx512`, `avxvnni`, `avx2`,
//!   `portable`), detected once per process, capped by `GRAFT_KERNELS`, and passed to every
//!   kernel so tests run each level the CPU has against the same reference.
//! - [`gemm_f32`] / [`conv`]: f32 convolutions with one group. tract lowers a 1x1 convolution to
//!   a matrix product followed by separate bias, `Max`/`Min` (ReLU6) and residual `Add` passes,
//!   and a k x k one to im2col + product; [`Convolution`] packs its weights once at load and
//!   runs a register-tiled product whose epilogue applies bias, clamps and the residual add
//!   before the single store.
//! - [`gemm_int8`] / [`qconv`]: int8 convolutions (tract's quantized `EinSum` and `Conv`; a
//!   convolution the compiler wrote per output channel is merged first, `merge_channels.rs`). tract
//!   runs per-channel requantization as whole-tensor `Scale`/`Add`/`Max`/`Min`/`Cast` operators
//!   (an int8 Lite0 four times slower than f32); [`QuantizedConvolution`] computes u8 x s8 dot
//!   products (`vpdpbusd`) and requantizes on the registers, so per-channel scales cost nothing.
//! - [`depthwise`]: depthwise convolution (tract 0.23 walks its padding zones with scalar code,
//!   half of Lite0's time): a plane-at-a-time loop for every level, and at the AVX-512 level a
//!   16-channels-a-vector kernel (`depthwise_blocked.rs`); in int8 graphs the dequantize ->
//!   depthwise -> ReLU6 -> quantize chain runs as one [`QuantizedDepthwise`] operator.
//! - [`cast`]: f32 <-> int8 casts with tract's arithmetic in vectorised loops; [`add`]: an int8
//!   graph's residual addition (dequantize both, add, quantize) as one [`QuantizedAdd`].
//! - [`layout`] / [`conv_blocked`] / [`qconv_blocked`] (AVX-512): runs of convolutions, f32
//!   and int8, in a 16-channel-blocked layout where a pixel of 16 channels is one vector: the
//!   depthwise kernel then needs no transposes and the pointwise ones no packing; the pass that
//!   introduces it is `blocking.rs` (`GRAFT_LAYOUT=plain` turns it off; [`Layout`]).
//!
//! Every kernel is unit-tested against tract's operator or a plain reference at every level
//! the CPU supports; the int8 products are bit-identical across levels.

pub mod add;
mod aligned;
#[cfg(target_arch = "x86_64")]
mod blocking;
pub mod cast;
pub mod conv;
#[cfg(target_arch = "x86_64")]
pub mod conv_blocked;
pub mod depthwise;
#[cfg(target_arch = "x86_64")]
mod depthwise_blocked;
pub mod dispatch;
pub mod gemm_f32;
pub mod gemm_int8;
mod graph;
pub mod layout;
mod merge_channels;
pub mod qconv;
#[cfg(target_arch = "x86_64")]
pub mod qconv_blocked;

pub use add::QuantizedAdd;
pub use cast::QuantizedCast;
pub use conv::Convolution;
pub use depthwise::{DepthwiseConv, QuantizedDepthwise};
pub use dispatch::{Layout, Level};
pub use merge_channels::channel_axis;
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

/// Fuses every dequantize, dequantize -> add -> quantize chain (an int8 residual connection;
/// one operand may be f32) into one [`QuantizedAdd`], which also gives the f32 sum where other
/// operators read it; returns how many.
fn fuse_quantized_adds(model: &mut TypedModel, level: Level) -> TractResult<usize> {
    let mut fused = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(chain) = QuantizedAdd::for_chain(model, node, level)? else {
            continue;
        };
        let mut patch = TypedModelPatch::default();
        let inputs = patch.taps(model, &chain.inputs)?;
        let outputs = patch.wire_node(format!("{}.int8_add", node.name), chain.op, &inputs)?;
        patch.shunt_outside(model, OutletId::new(id, 0), outputs[0])?;
        if let Some(add) = chain.f32_sum {
            patch.shunt_outside(model, OutletId::new(add, 0), outputs[1])?;
        }
        patch.apply(model)?;
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
/// instruction set [`Level::current`] chose for this process and the [`Layout::current`];
/// returns how many were replaced. Run it on a typed graph before `optimize`.
pub fn use_graft_kernels(model: &mut TypedModel) -> TractResult<usize> {
    use_graft_kernels_in(model, Level::current(), Layout::current())
}

/// [`use_graft_kernels`] at a given level (which this CPU must support), in the layout this
/// process uses.
pub fn use_graft_kernels_at(model: &mut TypedModel, level: Level) -> TractResult<usize> {
    use_graft_kernels_in(model, level, Layout::current())
}

/// [`use_graft_kernels`] at a given level (which this CPU must support) and layout (blocked
/// applies at the AVX-512 level only).
pub fn use_graft_kernels_in(
    model: &mut TypedModel,
    level: Level,
    layout: Layout,
) -> TractResult<usize> {
    ensure!(
        level.supported(),
        "this CPU cannot run {} kernels",
        level.name()
    );
    let mut replaced = merge_channels::merge_channel_convolutions(model)?;
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
    replaced += fuse_quantized_adds(model, level)?;
    replaced += fuse_quantized_depthwise(model)?;
    replaced += fuse_depthwise_clamps(model)?;
    replaced += fuse_convolutions(model, level)?;
    replaced += fuse_quantized_convolutions(model, level)?;
    #[cfg(target_arch = "x86_64")]
    if layout.at(level) == Layout::Blocked {
        blocking::use_blocked_layout(model)?;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = layout;
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

#[cfg(test)]
mod tests {
    use super::*;
    use tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec, PoolSpec};
    use tract_core::ops::math::{add, max, min};
    use tract_core::ops::nn::DataFormat;

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7919 + seed * 104729) % 2003) as f32 / 2003.0 - 0.5)
            .collect()
    }

    /// Wires a convolution of `x` (`channels` in) with `out` outputs, `group` groups, a square
    /// `kernel` and `stride` (padding `kernel / 2`), then ReLU6.
    fn conv(
        model: &mut TypedModel,
        name: &str,
        x: OutletId,
        [channels, out, group, kernel, stride]: [usize; 5],
    ) -> OutletId {
        let w = Tensor::from_shape(
            &[out, channels / group, kernel, kernel],
            &values(out * channels / group * kernel * kernel, out + kernel),
        )
        .unwrap();
        let w = model.add_const(format!("{name}.w"), w).unwrap();
        let b = model
            .add_const(format!("{name}.b"), tensor1(&values(out, 7)))
            .unwrap();
        let pad = kernel / 2;
        let op = Conv::new(
            PoolSpec {
                data_format: DataFormat::NCHW,
                kernel_shape: tvec![kernel, kernel],
                padding: PaddingSpec::Explicit(tvec![pad, pad], tvec![pad, pad]),
                dilations: None,
                strides: Some(tvec![stride, stride]),
                input_channels: channels,
                output_channels: out,
            },
            KernelFormat::OIHW,
            group,
            None,
        );
        let y = model.wire_node(name, op, &[x, w, b]).unwrap()[0];
        let zero = model
            .add_const(format!("{name}.0"), tensor4(&[[[[0f32]]]]))
            .unwrap();
        let six = model
            .add_const(format!("{name}.6"), tensor4(&[[[[6f32]]]]))
            .unwrap();
        let y = model
            .wire_node(format!("{name}.relu"), max(), &[y, zero])
            .unwrap()[0];
        model
            .wire_node(format!("{name}.relu6"), min(), &[y, six])
            .unwrap()[0]
    }

    /// A stem and two inverted-residual blocks (expand, depthwise, project, residual add) with
    /// channel counts that are not multiples of 16, as graft's kernels run them in the plain and
    /// the blocked layouts: the same values bit for bit, and in the blocked graph the stem
    /// reading the plain image directly, one conversion out, none between blocked operators.
    #[test]
    fn the_blocked_layout_gives_the_plain_layouts_values_with_one_conversion_at_the_end() {
        if !Level::Avx512.supported() {
            return;
        }
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([1, 3, 23, 21])).unwrap();
        let stem = conv(&mut model, "stem", x, [3, 24, 1, 3, 2]);
        let mut y = stem;
        for (i, (expand, kernel)) in [(72, 3), (40, 5)].into_iter().enumerate() {
            let e = conv(
                &mut model,
                &format!("b{i}.expand"),
                y,
                [24, expand, 1, 1, 1],
            );
            let d = conv(
                &mut model,
                &format!("b{i}.dw"),
                e,
                [expand, expand, expand, kernel, 1],
            );
            let p = conv(
                &mut model,
                &format!("b{i}.project"),
                d,
                [expand, 24, 1, 1, 1],
            );
            y = model
                .wire_node(format!("b{i}.add"), add(), &[p, y])
                .unwrap()[0];
        }
        model.select_output_outlets(&[y]).unwrap();
        let image = Tensor::from_shape(&[1, 3, 23, 21], &values(3 * 23 * 21, 3)).unwrap();
        let run = |layout: Layout| {
            let mut graph = model.clone().into_decluttered().unwrap();
            use_graft_kernels_in(&mut graph, Level::Avx512, layout).unwrap();
            let ops: Vec<String> = graph
                .nodes()
                .iter()
                .map(|n| n.op.name().to_string())
                .collect();
            let out = graph.into_optimized().unwrap().into_runnable().unwrap();
            let out = out.run(tvec![image.clone().into()]).unwrap();
            (out[0].view().as_slice::<f32>().unwrap().to_vec(), ops)
        };
        let (plain, _) = run(Layout::Plain);
        let (blocked, ops) = run(Layout::Blocked);
        let count = |name: &str| ops.iter().filter(|o| *o == name).count();
        assert_eq!(count("GraftBlockedConv"), 5, "{ops:?}");
        assert_eq!(count("GraftBlockedDepthwise"), 2, "{ops:?}");
        assert_eq!(count("GraftToBlocked"), 0, "{ops:?}");
        assert_eq!(count("GraftFromBlocked"), 1, "{ops:?}");
        assert!(plain.iter().any(|&v| v != 0.0));
        assert_eq!(plain.len(), blocked.len());
        let same = plain
            .iter()
            .zip(&blocked)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "blocked and plain layouts differ");
    }
}
