//! Depthwise convolution, f32 and between int8 tensors (see the module docs of `kernels`).

use std::sync::Arc;

use tract_core::internal::*;
use tract_core::ops::cnn::Conv;

use super::aligned::Aligned;
use super::cast::{dequantize_portable, f32_zp_scale, quantize_portable, QuantizedCast};
use super::conv::{collapse, PatchGeometry};
use super::dispatch::Level;
use super::graph::{clamp_chain, konst, only_successor, passes_through, per_channel};

/// A depthwise 2-D convolution (one filter per channel), f32, batch 1, NCHW or CHW.
#[derive(Debug, Clone, PartialEq)]
pub struct DepthwiseConv {
    /// The instruction set the loop is compiled for.
    pub(super) level: Level,
    pub(super) channels: usize,
    pub(super) kernel: [usize; 2],
    pub(super) stride: [usize; 2],
    /// Zero rows above and columns left of the input.
    pub(super) pad: [usize; 2],
    pub(super) input: [usize; 2],
    pub(super) output: [usize; 2],
    /// The output's full shape (`[1, C, H, W]` or `[C, H, W]`; with absorbed clamps, the shape
    /// at the end of their chain, which may add or remove unit axes).
    pub(super) output_shape: TVec<usize>,
    /// `[C, kh * kw]`.
    pub(super) weights: Arc<Vec<f32>>,
    /// The same weights 16 channels at a time, `[ceil(C / 16), kh * kw, 16]` (zero past `C`),
    /// as the AVX-512 kernel reads them: packed once here, not per run.
    pub(super) by_block: Arc<Aligned>,
    /// `[C]`.
    pub(super) bias: Arc<Vec<f32>>,
    /// `[low, high]` for each `max` (`[c, inf]`) or `min` (`[-inf, c]`) applied to the output
    /// (absorbed by [`use_graft_kernels`]), in order, before any quantization.
    pub(super) clamp: Vec<[f32; 2]>,
}

// tract compares operators for equality (to merge identical nodes); weights that compare equal
// are the same operator, and NaN weights never come out of a folded graph.
impl Eq for DepthwiseConv {}

/// `weights` (`[channels, taps]`) as `[ceil(channels / 16), taps, 16]`, zero past `channels`.
pub(super) fn by_block(weights: &[f32], channels: usize, taps: usize) -> Aligned {
    let mut packed = Aligned::zeroed(channels.div_ceil(16) * taps * 16 * 4);
    let values = packed.floats_mut();
    for (c, filter) in weights.chunks_exact(taps).enumerate().take(channels) {
        let (block, lane) = (c / 16, c % 16);
        for (tap, &w) in filter.iter().enumerate() {
            values[(block * taps + tap) * 16 + lane] = w;
        }
    }
    packed
}

impl DepthwiseConv {
    /// The kernel for `node` when it is a convolution this kernel computes exactly: f32, one
    /// group per channel, constant weights and bias, no dilation, a batch of one.
    pub fn for_node(
        model: &TypedModel,
        node: &TypedNode,
        level: Level,
    ) -> TractResult<Option<DepthwiseConv>> {
        let Some(conv) = node.op_as::<Conv>() else {
            return Ok(None);
        };
        let channels = conv.pool_spec.input_channels;
        if conv.q_params.is_some()
            || conv.group != channels
            || conv.pool_spec.output_channels != channels
            || channels < 2
            || node.inputs.len() != 3
            || model.outlet_fact(node.inputs[0])?.datum_type != f32::datum_type()
            || node.outputs[0].fact.datum_type != f32::datum_type()
        {
            return Ok(None);
        }
        let (Some((g, output_shape)), Some(weights), Some(bias)) = (
            PatchGeometry::of_conv(model, node, conv)?,
            konst(model, node.inputs[1]),
            konst(model, node.inputs[2]),
        ) else {
            return Ok(None);
        };
        let taps = g.kernel[0] * g.kernel[1];
        if g.dilation != [1, 1]
            || weights.datum_type() != f32::datum_type()
            || weights.len() != channels * taps
            || bias.datum_type() != f32::datum_type()
        {
            return Ok(None);
        }
        let Some(bias) = per_channel(bias.view().as_slice::<f32>()?.to_vec(), channels) else {
            return Ok(None);
        };
        Ok(Some(DepthwiseConv {
            level,
            channels,
            kernel: g.kernel,
            stride: g.stride,
            pad: g.pad,
            input: g.input,
            output: g.output,
            output_shape,
            weights: Arc::new(weights.view().as_slice::<f32>()?.to_vec()),
            by_block: Arc::new(by_block(weights.view().as_slice::<f32>()?, channels, taps)),
            bias: Arc::new(bias),
            clamp: vec![],
        }))
    }

    /// This convolution followed by `clamp`, its output reshaped to `shape` (the end of a chain
    /// that may add or remove unit axes).
    pub(crate) fn absorbing(&self, clamp: Vec<[f32; 2]>, shape: &[usize]) -> DepthwiseConv {
        let mut conv = self.clone();
        conv.clamp.extend(clamp);
        conv.output_shape = shape.into();
        conv
    }

    fn check_input(&self, len: usize) -> TractResult<()> {
        let expected = self.channels * self.input[0] * self.input[1];
        ensure!(
            len == expected,
            "graft's depthwise kernel expects {expected} input values, got {len}"
        );
        Ok(())
    }

    /// Convolves `input` (`C x H x W`, contiguous) into `output` (`C x OH x OW`).
    pub fn run(&self, input: &[f32], output: &mut [f32]) {
        self.dispatch(Planes::F32(input), Sink::F32(output))
    }

    pub(super) fn dispatch(&self, input: Planes, output: Sink) {
        #[cfg(target_arch = "x86_64")]
        match self.level {
            // SAFETY (both): the level is supported (checked when the kernel was built).
            Level::Avx512 if super::depthwise_blocked::applies(self) => {
                return unsafe { super::depthwise_blocked::convolve(self, input, output, false) }
            }
            Level::Avx512 => return unsafe { self.run_avx512(input, output) },
            Level::Avx2 | Level::AvxVnni => return unsafe { self.run_avx2_fma(input, output) },
            Level::Portable => {}
        }
        self.run_portable(input, output)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn run_avx512(&self, input: Planes, output: Sink) {
        self.convolve::<true, WIDE_LANES>(input, output)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2_fma(&self, input: Planes, output: Sink) {
        self.convolve::<true, LANES>(input, output)
    }

    fn run_portable(&self, input: Planes, output: Sink) {
        // aarch64 has fused multiply-add in its base instruction set.
        self.convolve::<{ cfg!(target_arch = "aarch64") }, LANES>(input, output)
    }

    #[inline(always)]
    fn convolve<const FMA: bool, const LANES: usize>(&self, input: Planes, mut output: Sink) {
        let [kh, kw] = self.kernel;
        let [sh, sw] = self.stride;
        let [ih, iw] = self.input;
        let [oh, ow] = self.output;
        let collapsed = collapse(&self.clamp);
        let [pad_top, pad_left] = self.pad;
        // The zero-padded input split into one plane per (row, column) phase of the stride:
        // padded pixel (y, x) lands in plane (y % sh, x % sw) at (y / sh, x / sw). Tap (ky, kx)
        // of every output then reads one contiguous run of a plane, `oh` rows of
        // `phase_width`, so each tap is a multiply-add over the whole output at once (computed
        // `phase_width` wide; the extra columns are dropped at the end).
        let phase_rows = (oh - 1) + kh.div_ceil(sh);
        let phase_width = (ow - 1) + kw.div_ceil(sw);
        let plane_len = phase_rows * phase_width;
        // Computed in whole runs of `LANES`: the extra outputs are dropped, and the extra
        // input they read is `slack` (plus `kw` read by the unused columns of the last row).
        let outputs = (oh * phase_width).next_multiple_of(LANES);
        let slack = outputs - oh * phase_width + kw;
        let mut planes = vec![0f32; sh * sw * plane_len + slack];
        let mut accumulator = vec![0f32; outputs];
        // (where tap (ky, kx) starts reading in `planes`, its weight for the current channel)
        let mut taps: Vec<(usize, f32)> = (0..kh * kw)
            .map(|tap| {
                let (ky, kx) = (tap / kw, tap % kw);
                let start =
                    ((ky % sh) * sw + kx % sw) * plane_len + (ky / sh) * phase_width + kx / sw;
                (start, 0.0)
            })
            .collect();
        // int8 input planes are dequantized whole (one vectorised pass) before padding, and int8
        // outputs are quantized from a whole plane: rows are often too short to vectorise.
        let int8_input = matches!(input, Planes::Int8 { .. });
        let int8_output = matches!(output, Sink::Int8 { .. });
        let mut dequantized = vec![0f32; if int8_input { ih * iw } else { 0 }];
        let mut results = vec![0f32; if int8_output { oh * ow } else { 0 }];
        // The runs of an input plane copied into `planes`, the same for every channel:
        // (start in `planes`, start in the input plane, length). The padding around them stays
        // as allocated, zero.
        let mut runs: Vec<(usize, usize, usize)> = vec![];
        for y in pad_top..(ih + pad_top).min(phase_rows * sh) {
            for phase in 0..sw {
                // Column `offset` of this phase is padded column `offset * sw + phase`, input
                // column `offset * sw + phase - pad_left`.
                let first = pad_left.saturating_sub(phase).div_ceil(sw).min(phase_width);
                let count = phase_width.saturating_sub(first).min(
                    (iw + pad_left)
                        .saturating_sub(first * sw + phase)
                        .div_ceil(sw),
                );
                if count > 0 {
                    let start = ((y % sh) * sw + phase) * plane_len + (y / sh) * phase_width;
                    let x = first * sw + phase - pad_left;
                    runs.push((start + first, (y - pad_top) * iw + x, count));
                }
            }
        }
        for channel in 0..self.channels {
            let plane: &[f32] = match input {
                Planes::F32(values) => &values[channel * ih * iw..(channel + 1) * ih * iw],
                Planes::Int8 {
                    values,
                    zero_point,
                    scale,
                } => {
                    let values = &values[channel * ih * iw..(channel + 1) * ih * iw];
                    dequantize_portable(values, &mut dequantized, zero_point, scale);
                    &dequantized
                }
            };
            for &(target, source, count) in &runs {
                let target = &mut planes[target..target + count];
                if sw == 1 {
                    target.copy_from_slice(&plane[source..source + count]);
                } else {
                    // Every `sw`-th pixel: whole groups of `sw` (which the compiler turns into
                    // vector shuffles), then the last pixel, whose group may end past the plane.
                    let (last, target) = target.split_last_mut().expect("runs are not empty");
                    let groups = &plane[source..source + target.len() * sw];
                    for (value, group) in target.iter_mut().zip(groups.chunks_exact(sw)) {
                        *value = group[0];
                    }
                    *last = plane[source + target.len() * sw];
                }
            }
            let weights = &self.weights[channel * kh * kw..(channel + 1) * kh * kw];
            for (tap, &w) in taps.iter_mut().zip(weights) {
                tap.1 = w;
            }
            accumulate::<FMA, LANES>(&mut accumulator, self.bias[channel], &taps, &planes);
            // The first `ow` columns of each accumulator row, clamped (a function, not a
            // closure: a closure is compiled without the caller's target features).
            let rows = Rows {
                values: &accumulator,
                width: phase_width,
                used: ow,
            };
            let planes_out = channel * oh * ow..(channel + 1) * oh * ow;
            match &mut output {
                Sink::F32(values) => rows.finish(collapsed, &self.clamp, &mut values[planes_out]),
                Sink::Int8 {
                    values,
                    zero_point,
                    scale,
                } => {
                    rows.finish(collapsed, &self.clamp, &mut results);
                    quantize_portable(&results, &mut values[planes_out], *zero_point, *scale);
                }
            }
        }
    }
}

/// The accumulator of one channel: rows of `width` values, the first `used` of each an output.
struct Rows<'a> {
    values: &'a [f32],
    width: usize,
    used: usize,
}

impl Rows<'_> {
    /// Copies the outputs into `plane`, clamped by `collapsed` (the clamps as one) or else by
    /// each of `clamp` in turn.
    #[inline(always)]
    fn finish(&self, collapsed: Option<[f32; 2]>, clamp: &[[f32; 2]], plane: &mut [f32]) {
        let rows = self.values.chunks_exact(self.width);
        let outputs = plane.chunks_exact_mut(self.used);
        match collapsed {
            // One clamp (ReLU6): applied while the rows are copied out.
            Some([low, high]) => {
                for (out_row, row) in outputs.zip(rows) {
                    for (out, &v) in out_row.iter_mut().zip(&row[..self.used]) {
                        *out = v.max(low).min(high);
                    }
                }
            }
            None => {
                for (out_row, row) in outputs.zip(rows) {
                    out_row.copy_from_slice(&row[..self.used]);
                }
                for [low, high] in clamp {
                    plane.iter_mut().for_each(|v| *v = v.max(*low).min(*high));
                }
            }
        }
    }
}

/// Output lanes accumulated in registers at once by [`accumulate`]: 4 AVX2 vectors, or 8 AVX-512
/// ones ([`WIDE_LANES`]); each vector is its own chain of dependent multiply-adds, and fewer than
/// about 8 chains leave the FMA units waiting on their latency.
const LANES: usize = 32;
/// [`LANES`] for AVX-512.
#[cfg(target_arch = "x86_64")]
const WIDE_LANES: usize = 128;

/// `out[i] = bias + sum of w * source[offset + i]` over `taps` (`(offset, w)`), summed in tap
/// order. Computed `LANES` outputs at a time with the sums held in registers, so each tap costs
/// one load and one multiply-add per output instead of a pass over `out` (a length that is not a
/// multiple of `LANES` leaves a scalar remainder: callers pad).
#[inline(always)]
fn accumulate<const FMA: bool, const LANES: usize>(
    out: &mut [f32],
    bias: f32,
    taps: &[(usize, f32)],
    source: &[f32],
) {
    let madd = |w: f32, s: f32, sum: f32| if FMA { w.mul_add(s, sum) } else { sum + w * s };
    let mut chunks = out.chunks_exact_mut(LANES);
    let mut start = 0;
    for chunk in &mut chunks {
        let mut sums = [bias; LANES];
        for &(offset, w) in taps {
            let values: &[f32; LANES] = source[offset + start..offset + start + LANES]
                .try_into()
                .expect("LANES values");
            for (sum, &value) in sums.iter_mut().zip(values) {
                *sum = madd(w, value, *sum);
            }
        }
        chunk.copy_from_slice(&sums);
        start += LANES;
    }
    for (i, out) in chunks.into_remainder().iter_mut().enumerate() {
        *out = taps.iter().fold(bias, |sum, &(offset, w)| {
            madd(w, source[offset + start + i], sum)
        });
    }
}

/// Where a depthwise convolution reads its input planes.
#[derive(Clone, Copy)]
pub(super) enum Planes<'a> {
    F32(&'a [f32]),
    Int8 {
        values: &'a [i8],
        zero_point: f32,
        scale: f32,
    },
}

impl<'a> Planes<'a> {
    /// int8 `values` of quantized type `dt` (its zero point and scale dequantize them).
    pub(super) fn int8(values: &'a [i8], dt: DatumType) -> Planes<'a> {
        let [zero_point, scale] = f32_zp_scale(dt);
        Planes::Int8 {
            values,
            zero_point,
            scale,
        }
    }

    /// Values.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // the blocked kernels' check
    pub(super) fn len(&self) -> usize {
        match self {
            Planes::F32(values) => values.len(),
            Planes::Int8 { values, .. } => values.len(),
        }
    }
}

impl<'a> Sink<'a> {
    /// int8 `values` of quantized type `dt` (its zero point and scale quantize into them).
    pub(super) fn int8(values: &'a mut [i8], dt: DatumType) -> Sink<'a> {
        let [zero_point, scale] = f32_zp_scale(dt);
        Sink::Int8 {
            values,
            zero_point,
            scale,
        }
    }
}

/// Where a depthwise convolution writes its output planes.
pub(super) enum Sink<'a> {
    F32(&'a mut [f32]),
    /// Quantized (after the kernel's clamps).
    Int8 {
        values: &'a mut [i8],
        zero_point: f32,
        scale: f32,
    },
}

impl Op for DepthwiseConv {
    fn name(&self) -> StaticName {
        "GraftDepthwiseConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{} channels, kernel {:?}, stride {:?}, pad {:?}, {:?} -> {:?}, clamp {:?}",
            self.channels, self.kernel, self.stride, self.pad, self.input, self.output, self.clamp
        )])
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for DepthwiseConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let view = input.view();
        let values = view.as_slice::<f32>()?;
        self.check_input(values.len())?;
        // SAFETY: the kernel writes every output value (f32 has no invalid bit patterns).
        let mut output = unsafe { Tensor::uninitialized::<f32>(&self.output_shape)? };
        {
            let mut plain = output.try_as_plain_ram_mut()?;
            self.run(values, plain.as_slice_mut::<f32>()?);
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for DepthwiseConv {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(&*self.output_shape)))
    }

    as_op!();
}

/// A depthwise convolution between int8 tensors, replacing the chain an int8 graph has around
/// an f32 depthwise convolution: dequantize, convolve, clamp (ReLU6 as `max` then `min`),
/// quantize. The same f32 arithmetic in the same order, bit for bit, without writing the f32
/// tensors out: each channel's input plane is dequantized into a scratch plane and its output
/// quantized from one.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedDepthwise {
    /// The convolution, with the chain's clamps and the quantizing cast's output shape.
    conv: DepthwiseConv,
    input: DatumType,
    output: DatumType,
}

// See the note on `DepthwiseConv`'s `Eq`.
impl Eq for QuantizedDepthwise {}

impl QuantizedDepthwise {
    /// The fused kernel starting at `node` when it is a dequantizing cast feeding (alone) a
    /// graft depthwise convolution whose output reaches a quantizing cast through `max` / `min`
    /// with constants only; returns it and the quantizing cast's node id.
    pub(crate) fn for_chain(
        model: &TypedModel,
        node: &TypedNode,
    ) -> TractResult<Option<(QuantizedDepthwise, usize)>> {
        let Some(dequantize) = node.op_as::<QuantizedCast>() else {
            return Ok(None);
        };
        if dequantize.to_int8 {
            return Ok(None);
        }
        let mut conv_node = only_successor(model, node.id)?;
        while let Some(next) = conv_node.filter(|n| passes_through(model, n)) {
            conv_node = only_successor(model, next.id)?;
        }
        let Some(conv_node) = conv_node else {
            return Ok(None);
        };
        let Some(conv) = conv_node.op_as::<DepthwiseConv>() else {
            return Ok(None);
        };
        let (clamp, last) = clamp_chain(model, conv_node.id)?;
        let Some(next) = only_successor(model, last)? else {
            return Ok(None);
        };
        let Some(quantize) = next.op_as::<QuantizedCast>().filter(|q| q.to_int8) else {
            return Ok(None);
        };
        let Some(shape) = model
            .outlet_fact(OutletId::new(next.id, 0))?
            .shape
            .as_concrete()
        else {
            return Ok(None);
        };
        let fused = QuantizedDepthwise {
            conv: conv.absorbing(clamp, shape),
            input: dequantize.quantized,
            output: quantize.quantized,
        };
        Ok(Some((fused, next.id)))
    }
}

impl QuantizedDepthwise {
    /// The f32 convolution (with the chain's clamps) and the int8 input and output types.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // for the blocking pass
    pub(crate) fn parts(&self) -> (&DepthwiseConv, [DatumType; 2]) {
        (&self.conv, [self.input, self.output])
    }
}

impl Op for QuantizedDepthwise {
    fn name(&self) -> StaticName {
        "GraftQuantizedDepthwise".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let mut info = self.conv.info()?;
        info.push(format!("{:?} -> {:?}", self.input, self.output));
        Ok(info)
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for QuantizedDepthwise {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let view = input.view();
        let values = view.as_slice::<i8>()?;
        let conv = &self.conv;
        conv.check_input(values.len())?;
        // SAFETY: the kernel writes every output value (i8 has no invalid bit patterns).
        let mut output = unsafe { Tensor::uninitialized_dt(self.output, &conv.output_shape)? };
        {
            let mut plain = output.try_as_plain_ram_mut()?;
            conv.dispatch(
                Planes::int8(values, self.input),
                Sink::int8(plain.as_slice_mut::<i8>()?, self.output),
            );
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for QuantizedDepthwise {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(self.output.fact(&*self.conv.output_shape)))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{use_graft_kernels, use_graft_kernels_in, Layout};
    use tract_core::ops::change_axes::AxisOp;
    use tract_core::ops::cnn::{KernelFormat, PaddingSpec, PoolSpec};
    use tract_core::ops::nn::DataFormat;

    /// A depthwise convolution (followed, when `relu6`, by the batch axis removed and ReLU6 as
    /// `max` then `min`, as in Lite0's NNEF) through tract's own operators and through graft's
    /// kernel.
    fn both(
        channels: usize,
        input: [usize; 2],
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: PaddingSpec,
        relu6: bool,
    ) -> (Vec<f32>, Vec<Vec<f32>>, TVec<usize>) {
        let mut model = TypedModel::default();
        let x = model
            .add_source("x", f32::fact([1, channels, input[0], input[1]]))
            .unwrap();
        let taps = kernel[0] * kernel[1];
        let weights: Vec<f32> = (0..channels * taps)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let weights = model
            .add_const(
                "w",
                Tensor::from_shape(&[channels, 1, kernel[0], kernel[1]], &weights).unwrap(),
            )
            .unwrap();
        let bias: Vec<f32> = (0..channels).map(|c| c as f32 * 0.25 - 1.0).collect();
        let bias = model.add_const("b", tensor1(&bias)).unwrap();
        let conv = Conv::new(
            PoolSpec {
                data_format: DataFormat::NCHW,
                kernel_shape: kernel.iter().copied().collect(),
                padding,
                dilations: None,
                strides: Some(stride.iter().copied().collect()),
                input_channels: channels,
                output_channels: channels,
            },
            KernelFormat::OIHW,
            channels,
            None,
        );
        let mut y = model.wire_node("conv", conv, &[x, weights, bias]).unwrap();
        if relu6 {
            y = model.wire_node("rm_n", AxisOp::Rm(0), &y).unwrap();
            let zero = model.add_const("zero", tensor3(&[[[0f32]]])).unwrap();
            let six = model.add_const("six", tensor3(&[[[6f32]]])).unwrap();
            y = model
                .wire_node("relu", tract_core::ops::math::max(), &[y[0], zero])
                .unwrap();
            y = model
                .wire_node("relu6", tract_core::ops::math::min(), &[y[0], six])
                .unwrap();
        }
        model.select_output_outlets(&y).unwrap();
        let values: Vec<f32> = (0..channels * input[0] * input[1])
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 17.0)
            .collect();
        let image = Tensor::from_shape(&[1, channels, input[0], input[1]], &values).unwrap();
        let run = |model: TypedModel| {
            let out = model
                .into_optimized()
                .unwrap()
                .into_runnable()
                .unwrap()
                .run(tvec![image.clone().into()])
                .unwrap();
            (
                out[0].view().as_slice::<f32>().unwrap().to_vec(),
                out[0].shape().into(),
            )
        };
        let (reference, shape) = run(model.clone());
        // The kernel at every level this CPU has, and the clamps absorbed into it.
        let mut results = vec![];
        for level in Level::available() {
            for layout in [Layout::Plain, Layout::Blocked] {
                let mut model = model.clone();
                assert_eq!(
                    use_graft_kernels_in(&mut model, level, layout).unwrap(),
                    1 + relu6 as usize
                );
                let kernel = ["GraftDepthwiseConv", "GraftBlockedDepthwise"];
                assert!(model
                    .nodes()
                    .iter()
                    .any(|n| kernel.contains(&&*n.op.name())));
                assert!(!model.nodes().iter().any(|n| n.name.starts_with("relu")));
                let (ours, our_shape) = run(model);
                assert_eq!(shape, our_shape);
                results.push(ours);
            }
        }
        (reference, results, shape)
    }

    fn worst(reference: &[f32], ours: &[Vec<f32>]) -> f32 {
        ours.iter()
            .flat_map(|ours| reference.iter().zip(ours))
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
    }

    #[test]
    fn matches_tract_for_strides_kernels_and_paddings() {
        let explicit = |t, l, b, r| PaddingSpec::Explicit(tvec![t, l], tvec![b, r]);
        for (channels, input, kernel, stride, padding) in [
            (3, [7, 9], [3, 3], [1, 1], explicit(1, 1, 1, 1)),
            (4, [8, 8], [3, 3], [2, 2], explicit(0, 0, 1, 1)),
            (5, [11, 10], [5, 5], [2, 2], explicit(2, 2, 2, 2)),
            (2, [9, 9], [5, 5], [1, 1], PaddingSpec::SameUpper),
            (6, [6, 13], [3, 3], [1, 2], PaddingSpec::Valid),
            (3, [10, 10], [3, 3], [3, 3], explicit(1, 1, 0, 0)),
            (2, [40, 37], [3, 3], [2, 2], explicit(1, 1, 1, 1)),
            (3, [33, 30], [5, 5], [1, 1], PaddingSpec::SameUpper),
            (2, [21, 19], [3, 5], [2, 1], explicit(1, 2, 1, 2)),
            (2, [9, 8], [3, 3], [1, 1], explicit(4, 5, 0, 0)),
        ] {
            let (reference, ours, shape) = both(channels, input, kernel, stride, padding, false);
            let worst = worst(&reference, &ours);
            assert!(worst < 1e-4, "{shape:?}: differs by {worst}");
        }
    }

    #[test]
    fn relu6_after_a_depthwise_convolution_is_absorbed() {
        let padding = PaddingSpec::Explicit(tvec![1, 1], tvec![1, 1]);
        for size in [[12, 11], [40, 41]] {
            let (reference, ours, shape) = both(19, size, [3, 3], [2, 2], padding.clone(), true);
            assert_eq!(&*shape, &[19, size[0] / 2, size[1].div_ceil(2)]);
            assert!(reference.contains(&0.0) && reference.contains(&6.0));
            assert!(reference.iter().any(|&v| v > 0.0 && v < 6.0));
            let worst = worst(&reference, &ours);
            assert!(worst < 1e-4, "differs by {worst}");
        }
    }

    #[test]
    fn int8_depthwise_chain_is_fused_with_the_unfused_arithmetic() {
        let (channels, size) = (4, [9, 8]);
        let qi8 =
            |zero_point, scale| i8::datum_type().quantize(QParams::ZpScale { zero_point, scale });
        let (x_dt, y_dt) = (qi8(-5, 0.05), qi8(-128, 6.0 / 255.0));
        let mut model = TypedModel::default();
        let x = model
            .add_source("x", x_dt.fact([1, channels, size[0], size[1]]))
            .unwrap();
        let x_f32 = model
            .wire_node(
                "dequantize",
                tract_core::ops::cast::cast(f32::datum_type()),
                &[x],
            )
            .unwrap();
        let weights: Vec<f32> = (0..channels * 9)
            .map(|i| ((i * 29 % 17) as f32 - 8.0) / 5.0)
            .collect();
        let weights = model
            .add_const(
                "w",
                Tensor::from_shape(&[channels, 1, 3, 3], &weights).unwrap(),
            )
            .unwrap();
        let bias = model
            .add_const("b", tensor1(&[0.5f32, -0.25, 1.0, 0.0]))
            .unwrap();
        let conv = Conv::new(
            PoolSpec {
                data_format: DataFormat::NCHW,
                kernel_shape: tvec![3, 3],
                padding: PaddingSpec::Explicit(tvec![1, 1], tvec![1, 1]),
                dilations: None,
                strides: Some(tvec![2, 1]),
                input_channels: channels,
                output_channels: channels,
            },
            KernelFormat::OIHW,
            channels,
            None,
        );
        let y = model
            .wire_node("conv", conv, &[x_f32[0], weights, bias])
            .unwrap();
        let zero = model.add_const("zero", tensor4(&[[[[0f32]]]])).unwrap();
        let six = model.add_const("six", tensor4(&[[[[6f32]]]])).unwrap();
        let y = model
            .wire_node("relu", tract_core::ops::math::max(), &[y[0], zero])
            .unwrap();
        let y = model
            .wire_node("relu6", tract_core::ops::math::min(), &[y[0], six])
            .unwrap();
        let y = model
            .wire_node("quantize", tract_core::ops::cast::cast(y_dt), &y)
            .unwrap();
        model.select_output_outlets(&y).unwrap();

        let raw: Vec<i8> = (0..channels * size[0] * size[1])
            .map(|i| ((i * 73 % 256) as i32 - 128) as i8)
            .collect();
        let mut input = Tensor::from_shape(&[1, channels, size[0], size[1]], &raw).unwrap();
        unsafe { input.set_datum_type(x_dt) };
        let run = |model: TypedModel| -> Vec<i8> {
            let out = model
                .into_optimized()
                .unwrap()
                .into_runnable()
                .unwrap()
                .run(tvec![input.clone().into()])
                .unwrap();
            out[0].view().as_slice::<i8>().unwrap().to_vec()
        };
        let reference = run(model.clone());
        let conv_node = model.node_by_name("conv").unwrap();
        let kernel = DepthwiseConv::for_node(&model, conv_node, Level::current())
            .unwrap()
            .unwrap();
        let mut layouts = vec![];
        for layout in [Layout::Plain, Layout::Blocked] {
            let mut fused = model.clone();
            use_graft_kernels_in(&mut fused, Level::current(), layout).unwrap();
            let kernel = ["GraftQuantizedDepthwise", "GraftBlockedDepthwise"];
            assert!(fused
                .nodes()
                .iter()
                .any(|n| kernel.contains(&&*n.op.name())));
            assert!(!fused.nodes().iter().any(|n| n.op_is::<DepthwiseConv>()));
            layouts.push(run(fused));
        }
        assert_eq!(layouts[0], layouts[1], "the same bytes in both layouts");
        let ours = layouts.remove(0);

        // The unfused arithmetic by hand: dequantize, graft's f32 kernel, max, min, quantize.
        let dequantized: Vec<f32> = raw.iter().map(|&q| (q as f32 + 5.0) * 0.05).collect();
        let mut convolved = vec![0f32; ours.len()];
        kernel.run(&dequantized, &mut convolved);
        let mut expected = vec![0i8; ours.len()];
        let clamped: Vec<f32> = convolved.iter().map(|v| v.clamp(0.0, 6.0)).collect();
        quantize_portable(&clamped, &mut expected, -128.0, 6.0 / 255.0);
        assert_eq!(ours, expected, "bit for bit with the unfused chain");
        // And within one step of tract's own operators (its convolution rounds differently).
        assert!(ours
            .iter()
            .zip(&reference)
            .all(|(a, b)| (*a as i32 - *b as i32).abs() <= 1));
    }

    #[test]
    fn leaves_other_convolutions_alone() {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([1, 4, 6, 6])).unwrap();
        let w = model
            .add_const("w", Tensor::zero::<f32>(&[2, 2, 3, 3]).unwrap())
            .unwrap();
        let b = model.add_const("b", tensor1(&[0f32, 0.0])).unwrap();
        let grouped = Conv::new(
            PoolSpec {
                data_format: DataFormat::NCHW,
                kernel_shape: tvec![3, 3],
                padding: PaddingSpec::Valid,
                dilations: None,
                strides: None,
                input_channels: 4,
                output_channels: 2,
            },
            KernelFormat::OIHW,
            2,
            None,
        );
        let y = model.wire_node("grouped", grouped, &[x, w, b]).unwrap();
        model.select_output_outlets(&y).unwrap();
        assert_eq!(use_graft_kernels(&mut model).unwrap(), 0);
    }
}
