//! f32 convolutions with one group (1x1 "pointwise" layers, stems, ResNet and VGG convolutions)
//! as one graft operator: the packed matrix product of [`gemm_f32`](super::gemm_f32) with the
//! bias, the activation clamps and a following residual add fused into its epilogue.
//!
//! tract runs a pointwise convolution as an `EinSum` lowered to its matrix product, then the bias
//! `Add`, the `Max`/`Min` of a ReLU6 and a residual `Add` as separate passes over the tensor; a
//! k x k convolution adds an im2col pass that writes the whole patch matrix out. [`Convolution`]
//! reads its input directly (1x1) or gathers patches one panel at a time while packing
//! ([`Patches`]), and writes each output value once.

use std::sync::Arc;

use tract_core::internal::*;
use tract_core::ops::cnn::{Conv, KernelFormat};
use tract_core::ops::einsum::EinSum;
use tract_core::ops::nn::DataFormat;

use super::dispatch::Level;
use super::gemm_f32::{matmul, tile, Epilogue, PackedWeights, Panels, Rows, UNBOUNDED};
use super::graph::{clamp_chain, follow, konst, per_channel};

/// How the input becomes the product's `K x N` operand.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Geometry {
    /// A 1x1 convolution, stride 1, no padding: the input's `K` planes of `N` pixels as they are.
    Pointwise {
        /// Input channels.
        k: usize,
        /// Pixels.
        n: usize,
    },
    /// Any other 2-D convolution with one group: patches gathered while packing.
    Patches(PatchGeometry),
}

/// A 2-D convolution's shape, batch 1, CHW.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PatchGeometry {
    /// Input channels.
    pub channels: usize,
    /// Input height and width.
    pub input: [usize; 2],
    /// Kernel height and width.
    pub kernel: [usize; 2],
    /// Vertical and horizontal stride.
    pub stride: [usize; 2],
    /// Vertical and horizontal dilation.
    pub dilation: [usize; 2],
    /// Zero rows above and columns left of the input.
    pub pad: [usize; 2],
    /// Output height and width.
    pub output: [usize; 2],
}

impl PatchGeometry {
    /// The geometry of tract convolution `node` when it is 2-D with an OIHW kernel, in NCHW with
    /// a batch of one or in CHW, with concrete shapes; and its output's full shape.
    pub fn of_conv(
        model: &TypedModel,
        node: &TypedNode,
        conv: &Conv,
    ) -> TractResult<Option<(PatchGeometry, TVec<usize>)>> {
        let spec = &conv.pool_spec;
        let rank = match spec.data_format {
            DataFormat::NCHW => 4,
            DataFormat::CHW => 3,
            _ => return Ok(None),
        };
        if conv.kernel_fmt != KernelFormat::OIHW || spec.kernel_shape.len() != 2 {
            return Ok(None);
        }
        let (Some(input_shape), Some(output_shape)) = (
            model.outlet_fact(node.inputs[0])?.shape.as_concrete(),
            node.outputs[0].fact.shape.as_concrete(),
        ) else {
            return Ok(None);
        };
        if input_shape.len() != rank
            || output_shape.len() != rank
            || (rank == 4 && (input_shape[0] != 1 || output_shape[0] != 1))
        {
            return Ok(None);
        }
        let spatial = &input_shape[rank - 2..];
        let padding = spec.computed_padding(spatial);
        let geometry = PatchGeometry {
            channels: spec.input_channels,
            input: [spatial[0], spatial[1]],
            kernel: [spec.kernel_shape[0], spec.kernel_shape[1]],
            stride: [spec.strides()[0], spec.strides()[1]],
            dilation: [spec.dilations()[0], spec.dilations()[1]],
            pad: [padding[0].pad_before, padding[1].pad_before],
            output: [output_shape[rank - 2], output_shape[rank - 1]],
        };
        Ok(Some((geometry, output_shape.into())))
    }

    /// Rows of the patch matrix: channels x kernel taps.
    pub fn rows(&self) -> usize {
        self.channels * self.kernel[0] * self.kernel[1]
    }

    /// Columns of the patch matrix: output pixels.
    pub fn columns(&self) -> usize {
        self.output[0] * self.output[1]
    }
}

impl Geometry {
    fn k(&self) -> usize {
        match self {
            Geometry::Pointwise { k, .. } => *k,
            Geometry::Patches(g) => g.rows(),
        }
    }

    fn n(&self) -> usize {
        match self {
            Geometry::Pointwise { n, .. } => *n,
            Geometry::Patches(g) => g.columns(),
        }
    }

    fn input_len(&self) -> usize {
        match self {
            Geometry::Pointwise { k, n } => k * n,
            Geometry::Patches(g) => g.channels * g.input[0] * g.input[1],
        }
    }
}

/// A convolution's input rearranged so that every row of its patch matrix is made of contiguous
/// runs: zero-padded, and split into one plane per (row, column) phase of the stride. Padded
/// pixel `(y, x)` of channel `c` lands in plane `(c, y % sh, x % sw)` at `(y / sh, x / sw)`, so
/// tap `(ky, kx)` of output row `oy` reads columns `ox + kx / sw` of row `oy + ky / sh` of plane
/// `(c, ky % sh, kx % sw)`: one copy per output row instead of a bounds check per value.
pub struct PhasePlanes<T> {
    values: Vec<T>,
    rows: usize,
    width: usize,
}

impl<T: Copy> PhasePlanes<T> {
    /// `input` (`C x H x W`) for `g`, the padding filled with `zero`.
    pub fn new(input: &[T], g: &PatchGeometry, zero: T) -> PhasePlanes<T> {
        let [sh, sw] = g.stride;
        let [ih, iw] = g.input;
        let [pt, pl] = g.pad;
        let rows = (g.output[0] - 1) + ((g.kernel[0] - 1) * g.dilation[0] + 1).div_ceil(sh);
        let width = (g.output[1] - 1) + ((g.kernel[1] - 1) * g.dilation[1] + 1).div_ceil(sw);
        let plane = rows * width;
        let mut values = vec![zero; g.channels * sh * sw * plane];
        for (c, source) in input.chunks_exact(ih * iw).enumerate() {
            for y in 0..ih {
                let py = y + pt;
                if py / sh >= rows {
                    break;
                }
                let line = &source[y * iw..(y + 1) * iw];
                let row = (py / sh) * width;
                for phase in 0..sw {
                    // The input columns of this phase, x = first, first + sw, ..., land side by
                    // side from column (first + pl) / sw of the phase plane.
                    let first = (phase + sw - pl % sw) % sw;
                    let start = (first + pl) / sw;
                    if first >= iw || start >= width {
                        continue;
                    }
                    let at = ((c * sh + py % sh) * sw + phase) * plane + row;
                    let target = &mut values[at + start..at + width];
                    for (value, &x) in target.iter_mut().zip(line[first..].iter().step_by(sw)) {
                        *value = x;
                    }
                }
            }
        }
        PhasePlanes {
            values,
            rows,
            width,
        }
    }

    /// Row `kk` = `(c, ky, kx)` of the patch matrix, columns `n0 .. n0 + target.len()`.
    #[inline]
    pub fn patch_row(&self, g: &PatchGeometry, kk: usize, n0: usize, target: &mut [T]) {
        let [sh, sw] = g.stride;
        let [kh, kw] = g.kernel;
        let (c, tap) = (kk / (kh * kw), kk % (kh * kw));
        let (ky, kx) = ((tap / kw) * g.dilation[0], (tap % kw) * g.dilation[1]);
        let plane = ((c * sh + ky % sh) * sw + kx % sw) * self.rows * self.width;
        let ow = g.output[1];
        let (mut n, mut j) = (n0, 0);
        while j < target.len() {
            let (oy, ox) = (n / ow, n % ow);
            let run = (ow - ox).min(target.len() - j);
            let start = plane + (oy + ky / sh) * self.width + ox + kx / sw;
            target[j..j + run].copy_from_slice(&self.values[start..start + run]);
            j += run;
            n += run;
        }
    }
}

/// A convolution's input read as its patch matrix: row `(c, ky, kx)` (the weights' OIHW order),
/// column `oy * OW + ox`, zero where the patch falls in the padding.
/// The values are f32, or int8 for quantized convolutions (whose padding is the input's zero
/// point, the quantized zero).
pub struct Patches<'a, T> {
    /// The input as phase planes.
    pub planes: PhasePlanes<T>,
    /// Its geometry.
    pub geometry: &'a PatchGeometry,
    /// The value padding reads.
    pub zero: T,
}

impl<'a, T: Copy> Patches<'a, T> {
    /// `input` (`C x H x W`) for `geometry`, padded with `zero`.
    pub fn new(input: &[T], geometry: &'a PatchGeometry, zero: T) -> Patches<'a, T> {
        Patches {
            planes: PhasePlanes::new(input, geometry, zero),
            geometry,
            zero,
        }
    }
}

impl Panels<f32> for Patches<'_, f32> {
    fn k(&self) -> usize {
        self.geometry.rows()
    }

    fn n(&self) -> usize {
        self.geometry.columns()
    }

    fn pack(&self, n0: usize, width: usize, nr: usize, panel: &mut [f32]) {
        for (kk, row) in panel.chunks_exact_mut(nr).enumerate() {
            self.planes
                .patch_row(self.geometry, kk, n0, &mut row[..width]);
        }
    }
}

/// A convolution with one group, f32, batch 1, and its fused epilogue (see [`Epilogue`]): the
/// second input, when present, is the residual added after the first clamp.
#[derive(Debug, Clone, PartialEq)]
pub struct Convolution {
    geometry: Geometry,
    weights: Arc<PackedWeights>,
    bias: Arc<Vec<f32>>,
    before: [f32; 2],
    residual: bool,
    after: [f32; 2],
    /// The output's full shape (unit axes as at the end of the fused chain).
    output_shape: TVec<usize>,
}

// tract compares operators for equality (to merge identical nodes); weights that compare equal
// are the same operator, and NaN weights never come out of a folded graph.
impl Eq for Convolution {}

/// `[low, high]` of two clamps applied one after the other, when that is one clamp.
fn compose(first: [f32; 2], then: [f32; 2]) -> Option<[f32; 2]> {
    let low = first[0].max(then[0]);
    let high = first[1].min(then[1]);
    (then[0] <= first[1] && first[0] <= then[1] && low <= high).then_some([low, high])
}

/// One clamp for a chain of them, when it is one.
pub(crate) fn collapse(clamps: &[[f32; 2]]) -> Option<[f32; 2]> {
    clamps.iter().try_fold(UNBOUNDED, |acc, &c| compose(acc, c))
}

impl Convolution {
    fn new(
        level: Level,
        geometry: Geometry,
        weights: &[f32],
        bias: Vec<f32>,
        output_shape: TVec<usize>,
    ) -> Convolution {
        let m = bias.len();
        let weights = PackedWeights::new(level, weights, m, geometry.k());
        Convolution {
            geometry,
            weights: Arc::new(weights),
            bias: Arc::new(bias),
            before: UNBOUNDED,
            residual: false,
            after: UNBOUNDED,
            output_shape,
        }
    }

    /// The kernel for a tract `Conv` node it computes exactly: f32, one group, OIHW constant
    /// weights and bias, batch 1.
    pub fn for_conv(
        model: &TypedModel,
        node: &TypedNode,
        level: Level,
    ) -> TractResult<Option<Convolution>> {
        let Some(conv) = node.op_as::<Conv>() else {
            return Ok(None);
        };
        if conv.q_params.is_some()
            || conv.group != 1
            || node.inputs.len() != 3
            || model.outlet_fact(node.inputs[0])?.datum_type != f32::datum_type()
            || node.outputs[0].fact.datum_type != f32::datum_type()
        {
            return Ok(None);
        }
        let (Some((geometry, output_shape)), Some(weights), Some(bias)) = (
            PatchGeometry::of_conv(model, node, conv)?,
            konst(model, node.inputs[1]),
            konst(model, node.inputs[2]),
        ) else {
            return Ok(None);
        };
        let m = conv.pool_spec.output_channels;
        if weights.datum_type() != f32::datum_type()
            || weights.len() != m * geometry.rows()
            || bias.datum_type() != f32::datum_type()
        {
            return Ok(None);
        }
        let Some(bias) = per_channel(bias.view().as_slice::<f32>()?.to_vec(), m) else {
            return Ok(None);
        };
        let geometry = if geometry.kernel == [1, 1]
            && geometry.stride == [1, 1]
            && geometry.pad == [0, 0]
            && geometry.input == geometry.output
        {
            Geometry::Pointwise {
                k: geometry.channels,
                n: geometry.columns(),
            }
        } else {
            Geometry::Patches(geometry)
        };
        Ok(Some(Convolution::new(
            level,
            geometry,
            weights.view().as_slice::<f32>()?,
            bias,
            output_shape,
        )))
    }

    /// The kernel for a pointwise `EinSum` (what tract's declutter makes of a 1x1 convolution: a
    /// product of constant weights `[M, K]` with the input read as `K` planes of `N` pixels,
    /// `mk,kn->mn` once unit axes are set aside) followed by its bias `Add` (through casts and
    /// unit axes); returns it, its input, and the `Add`'s node id.
    pub fn for_einsum(
        model: &TypedModel,
        node: &TypedNode,
        level: Level,
    ) -> TractResult<Option<(Convolution, OutletId, usize)>> {
        let Some(einsum) = node.op_as::<EinSum>() else {
            return Ok(None);
        };
        if einsum.q_params.is_some() || node.inputs.len() != 2 {
            return Ok(None);
        }
        let Some((w, x)) = [(0, 1), (1, 0)].into_iter().find(|&(w, x)| {
            konst(model, node.inputs[w]).is_some() && konst(model, node.inputs[x]).is_none()
        }) else {
            return Ok(None);
        };
        let weights = konst(model, node.inputs[w]).context("constant weights")?;
        let x_fact = model.outlet_fact(node.inputs[x])?;
        let y_fact = &node.outputs[0].fact;
        let (Some(x_shape), Some(y_shape)) =
            (x_fact.shape.as_concrete(), y_fact.shape.as_concrete())
        else {
            return Ok(None);
        };
        if [x_fact.datum_type, weights.datum_type(), y_fact.datum_type]
            .iter()
            .any(|&dt| dt != f32::datum_type())
        {
            return Ok(None);
        }
        let (inputs, outputs) = einsum.axes.to_strs();
        // Each operand's axes of more than one element.
        let big = |letters: &str, shape: &[usize]| -> Vec<(char, usize)> {
            letters
                .chars()
                .zip(shape.iter().copied())
                .filter(|&(_, d)| d != 1)
                .collect()
        };
        let (wa, xa, ya) = (
            big(&inputs[w], weights.shape()),
            big(&inputs[x], x_shape),
            big(&outputs[0], y_shape),
        );
        // Weights [m, k]; x [k, pixels...]; y [m, pixels...].
        let [(m_axis, m), (k_axis, k)] = wa[..] else {
            return Ok(None);
        };
        let pointwise = xa.first() == Some(&(k_axis, k))
            && ya.first() == Some(&(m_axis, m))
            && xa[1..] == ya[1..]
            && !ya.iter().any(|&(a, _)| a == k_axis);
        let n: usize = xa[1..].iter().map(|&(_, d)| d).product();
        // A product over one or a few pixels (a classifier after pooling) is left to tract.
        if !pointwise || n < 8 {
            return Ok(None);
        }
        // The bias: an Add of a constant with one value per output channel.
        let Some(add) = follow(model, node.id)? else {
            return Ok(None);
        };
        if add.op.name() != "Add" || add.inputs.len() != 2 {
            return Ok(None);
        }
        let before_add = add.inputs.iter().position(|i| konst(model, *i).is_none());
        let Some(bias) = before_add
            .map(|i| add.inputs[1 - i])
            .and_then(|i| konst(model, i))
        else {
            return Ok(None);
        };
        let add_fact = model.outlet_fact(OutletId::new(add.id, 0))?;
        let add_len = add_fact
            .shape
            .as_concrete()
            .map(|s| s.iter().product::<usize>());
        if bias.datum_type() != f32::datum_type()
            || bias.len() != m
            || add_len != Some(m * n)
            || bias.shape().iter().filter(|&&d| d != 1).count() > 1
        {
            return Ok(None);
        }
        let conv = Convolution::new(
            level,
            Geometry::Pointwise { k, n },
            weights.view().as_slice::<f32>()?,
            bias.view().as_slice::<f32>()?.to_vec(),
            y_shape.into(),
        );
        Ok(Some((conv, node.inputs[x], add.id)))
    }

    /// Extends the operator ending at node `last` with the clamps, residual add and clamps that
    /// follow it alone; returns the extended operator, the residual's outlet, and the last node
    /// absorbed (`last` when nothing was).
    pub fn absorbing(
        &self,
        model: &TypedModel,
        last: usize,
    ) -> TractResult<(Convolution, Option<OutletId>, usize)> {
        let mut conv = self.clone();
        let (clamps, mut end) = clamp_chain(model, last)?;
        let Some(before) = collapse(&clamps) else {
            return Ok((conv, None, last));
        };
        conv.before = before;
        let mut residual = None;
        if let Some((add, other)) = self.residual_add(model, end)? {
            let (clamps, after_end) = clamp_chain(model, add)?;
            if let Some(after) = collapse(&clamps) {
                conv.residual = true;
                conv.after = after;
                residual = Some(other);
                end = after_end;
            }
        }
        // The chain may add or remove unit axes: the operator takes the shape at its end.
        conv.output_shape = model
            .outlet_fact(OutletId::new(end, 0))?
            .shape
            .as_concrete()
            .context("concrete")?
            .into();
        Ok((conv, residual, end))
    }

    /// The residual `Add` node `end` feeds (through pass-throughs), with its other input, when
    /// that input is a non-constant f32 tensor of the output's shape.
    fn residual_add(
        &self,
        model: &TypedModel,
        end: usize,
    ) -> TractResult<Option<(usize, OutletId)>> {
        let Some(add) = follow(model, end)? else {
            return Ok(None);
        };
        if add.op.name() != "Add" || add.inputs.len() != 2 {
            return Ok(None);
        }
        let Some(other) = add.inputs.iter().find(|i| i.node != end).copied() else {
            return Ok(None);
        };
        let out = model.outlet_fact(OutletId::new(add.id, 0))?;
        let other_fact = model.outlet_fact(other)?;
        let Some(shape) = out.shape.as_concrete() else {
            return Ok(None);
        };
        let fits = other_fact.konst.is_none()
            && other_fact.datum_type == f32::datum_type()
            && out.datum_type == f32::datum_type()
            && other_fact.shape.as_concrete() == Some(shape)
            && shape.iter().product::<usize>() == self.output_len();
        Ok(fits.then_some((add.id, other)))
    }

    fn output_len(&self) -> usize {
        self.bias.len() * self.geometry.n()
    }

    /// The weights (`m x k`, row-major, `k` in OIHW order), bias and geometry.
    pub fn parts(&self) -> (Vec<f32>, &[f32], &Geometry) {
        (self.weights.unpacked(), &self.bias, &self.geometry)
    }

    /// The epilogue: the clamp after the bias, whether a residual is added, the clamp after it.
    pub fn epilogue_parts(&self) -> ([f32; 2], bool, [f32; 2]) {
        (self.before, self.residual, self.after)
    }

    /// Runs the convolution: `input` (`C x H x W`), `residual` (shaped like the output) when the
    /// operator has one, into `output`.
    pub fn run(&self, input: &[f32], residual: Option<&[f32]>, output: &mut [f32]) {
        let epilogue = Epilogue {
            bias: &self.bias,
            before: self.before,
            residual,
            after: self.after,
        };
        match &self.geometry {
            Geometry::Pointwise { k, n } => {
                let rows = Rows {
                    data: input,
                    k: *k,
                    n: *n,
                };
                matmul(&self.weights, &rows, output, &epilogue)
            }
            Geometry::Patches(geometry) => {
                let patches = Patches::new(input, geometry, 0.0);
                matmul(&self.weights, &patches, output, &epilogue)
            }
        }
    }
}

impl Op for Convolution {
    fn name(&self) -> StaticName {
        "GraftConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let (mr, nr) = tile(self.weights.level());
        Ok(vec![format!(
            "{:?}, {} x {} weights, {:?} tiles {mr}x{nr}, clamp {:?}{}",
            self.geometry,
            self.weights.m(),
            self.weights.k(),
            self.weights.level(),
            self.before,
            if self.residual {
                format!(", + residual, clamp {:?}", self.after)
            } else {
                String::new()
            }
        )])
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for Convolution {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(
            inputs.len() == 1 + self.residual as usize,
            "GraftConv takes {} inputs",
            1 + self.residual as usize
        );
        let views: TVec<_> = inputs.iter().map(|i| i.view()).collect();
        let input = views[0].as_slice::<f32>()?;
        ensure!(
            input.len() == self.geometry.input_len(),
            "graft's convolution expects {} input values, got {}",
            self.geometry.input_len(),
            input.len()
        );
        let residual = match views.get(1) {
            Some(r) => {
                let r = r.as_slice::<f32>()?;
                ensure!(
                    r.len() == self.output_len(),
                    "residual of the output's size"
                );
                Some(r)
            }
            None => None,
        };
        // SAFETY: every value is written by the product (f32 has no invalid bit patterns).
        let mut output = unsafe { Tensor::uninitialized::<f32>(&self.output_shape)? };
        {
            let mut plain = output.try_as_plain_ram_mut()?;
            self.run(input, residual, plain.as_slice_mut::<f32>()?);
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for Convolution {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(&*self.output_shape)))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{use_graft_kernels_in, Layout};
    use tract_core::ops::cnn::{PaddingSpec, PoolSpec};
    use tract_core::ops::math::{add, max, min};

    fn values(len: usize, seed: usize, scale: f32) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 7919 + seed * 104729) % 2003) as f32 / 1001.0 - 1.0) * scale)
            .collect()
    }

    struct Layer {
        channels: usize,
        out: usize,
        input: [usize; 2],
        kernel: [usize; 2],
        stride: [usize; 2],
        dilation: [usize; 2],
        padding: PaddingSpec,
        relu6: bool,
        residual: bool,
    }

    /// `layer` as tract builds it (a Conv, ReLU6 as `max` / `min`, a residual `Add` of the input
    /// when shapes allow), run by tract's operators and by graft's kernels at every level.
    fn check(layer: Layer) {
        let mut model = TypedModel::default();
        let [h, w] = layer.input;
        let x = model
            .add_source("x", f32::fact([1, layer.channels, h, w]))
            .unwrap();
        let taps = layer.kernel[0] * layer.kernel[1];
        let weights = values(layer.out * layer.channels * taps, 1, 0.5);
        let weights = Tensor::from_shape(
            &[layer.out, layer.channels, layer.kernel[0], layer.kernel[1]],
            &weights,
        )
        .unwrap();
        let weights = model.add_const("w", weights).unwrap();
        let bias = model
            .add_const("b", tensor1(&values(layer.out, 2, 1.0)))
            .unwrap();
        let conv = Conv::new(
            PoolSpec {
                data_format: DataFormat::NCHW,
                kernel_shape: layer.kernel.iter().copied().collect(),
                padding: layer.padding,
                dilations: Some(layer.dilation.iter().copied().collect()),
                strides: Some(layer.stride.iter().copied().collect()),
                input_channels: layer.channels,
                output_channels: layer.out,
            },
            KernelFormat::OIHW,
            1,
            None,
        );
        let mut y = model.wire_node("conv", conv, &[x, weights, bias]).unwrap()[0];
        if layer.relu6 {
            let zero = model.add_const("zero", tensor4(&[[[[0f32]]]])).unwrap();
            let six = model.add_const("six", tensor4(&[[[[6f32]]]])).unwrap();
            y = model.wire_node("relu", max(), &[y, zero]).unwrap()[0];
            y = model.wire_node("relu6", min(), &[y, six]).unwrap()[0];
        }
        if layer.residual {
            y = model.wire_node("residual", add(), &[y, x]).unwrap()[0];
        }
        model.select_output_outlets(&[y]).unwrap();
        let image = Tensor::from_shape(
            &[1, layer.channels, h, w],
            &values(layer.channels * h * w, 3, 2.0),
        )
        .unwrap();
        let run = |model: TypedModel| {
            let out = model
                .into_runnable()
                .unwrap()
                .run(tvec![image.clone().into()])
                .unwrap();
            (
                out[0].view().as_slice::<f32>().unwrap().to_vec(),
                out[0].shape().to_vec(),
            )
        };
        let (reference, shape) = run(model.clone().into_optimized().unwrap());
        let graft = |n: &TypedNode| ["GraftConv", "GraftBlockedConv"].contains(&&*n.op.name());
        for (level, layout) in Level::available()
            .into_iter()
            .flat_map(|l| [(l, Layout::Plain), (l, Layout::Blocked)])
        {
            let mut ours = model.clone().into_decluttered().unwrap();
            let replaced = use_graft_kernels_in(&mut ours, level, layout).unwrap();
            assert_eq!(replaced, 1, "{level:?}: {ours}");
            let fused = ours.nodes().iter().filter(|n| graft(n)).count();
            assert_eq!(fused, 1, "{level:?} {layout:?}: one fused operator");
            let leftover: Vec<_> = ours
                .nodes()
                .iter()
                .filter(|n| !graft(n))
                .filter(|n| n.name.starts_with("relu") || n.name == "residual")
                .map(|n| &n.name)
                .collect();
            assert!(leftover.is_empty(), "{level:?}: absorbed {leftover:?}");
            let (values, our_shape) = run(ours.into_optimized().unwrap());
            assert_eq!(shape, our_shape);
            let worst = reference
                .iter()
                .zip(&values)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(worst < 1e-4, "{level:?} {shape:?}: differs by {worst}");
        }
    }

    fn layer(channels: usize, out: usize, input: [usize; 2], kernel: [usize; 2]) -> Layer {
        Layer {
            channels,
            out,
            input,
            kernel,
            stride: [1, 1],
            dilation: [1, 1],
            padding: PaddingSpec::Valid,
            relu6: false,
            residual: false,
        }
    }

    #[test]
    fn pointwise_with_bias_relu6_and_residual_match_tract() {
        check(Layer {
            relu6: true,
            ..layer(16, 40, [7, 7], [1, 1])
        });
        check(Layer {
            residual: true,
            ..layer(24, 24, [14, 9], [1, 1])
        });
        check(layer(3, 5, [3, 3], [1, 1]));
        check(layer(33, 17, [11, 13], [1, 1]));
    }

    #[test]
    fn strided_padded_and_dilated_convolutions_match_tract() {
        let explicit = |t, l, b, r| PaddingSpec::Explicit(tvec![t, l], tvec![b, r]);
        check(Layer {
            stride: [2, 2],
            padding: explicit(0, 0, 1, 1),
            relu6: true,
            ..layer(3, 32, [31, 30], [3, 3])
        });
        check(Layer {
            stride: [2, 2],
            padding: explicit(3, 3, 3, 3),
            ..layer(3, 8, [23, 20], [7, 7])
        });
        check(Layer {
            padding: PaddingSpec::SameUpper,
            residual: true,
            ..layer(8, 8, [9, 10], [3, 3])
        });
        check(Layer {
            dilation: [2, 1],
            padding: explicit(2, 1, 2, 1),
            ..layer(4, 6, [12, 11], [3, 3])
        });
        check(Layer {
            stride: [2, 2],
            ..layer(16, 32, [14, 14], [1, 1])
        });
        check(Layer {
            stride: [1, 2],
            padding: explicit(1, 2, 0, 2),
            ..layer(5, 7, [6, 13], [2, 5])
        });
    }

    #[test]
    fn clamps_compose_only_when_they_are_one_clamp() {
        let relu6 = [[0.0, f32::INFINITY], [f32::NEG_INFINITY, 6.0]];
        assert_eq!(collapse(&relu6), Some([0.0, 6.0]));
        assert_eq!(collapse(&[]), Some(UNBOUNDED));
        assert_eq!(collapse(&[[0.0, 1.0], [2.0, 3.0]]), None);
    }
}
