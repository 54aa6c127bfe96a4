//! int8 convolutions with one group (the pointwise products and the stem of an int8 artifact)
//! as one graft operator over [`gemm_int8`](super::gemm_int8): int8 in, int8 out, the
//! requantization fused.
//!
//! The compiler writes a quantized 1x1 convolution as tract's quantized `EinSum`
//! (`kn,mk,m,,,,m,,->mn`: activations, weights, int32 bias, then zero point and scale of the
//! activations, weights and output). tract lowers it to an integer product followed by its
//! requantization as separate whole-tensor operators (`Scale`, `Add`, `Max`, `Min`, `Cast`) when
//! the weight scales are per channel: an int8 graph four times slower than its f32 original.
//! [`QuantizedConvolution`] computes the same layer with the requantization on the registers
//! of each tile, so per-channel scales cost nothing.

use std::sync::Arc;

use tract_core::internal::*;
use tract_core::ops::cast::Cast;
use tract_core::ops::cnn::Conv;
use tract_core::ops::einsum::EinSum;

use super::conv::{PatchGeometry, Patches};
use super::dispatch::Level;
use super::gemm_f32::Panels;
use super::gemm_int8::{group, matmul, tile, PackedInt8, Requantization, RowsInt8};
use super::graph::{int8_values, konst, only_successor, per_channel};

/// A quantized convolution's int8 input as the product's operand: [`Patches`] rows interleaved
/// into groups of four (see [`gemm_int8`](super::gemm_int8)).
impl Panels<u8> for Patches<'_, i8> {
    fn k(&self) -> usize {
        self.geometry.rows()
    }

    fn n(&self) -> usize {
        self.geometry.columns()
    }

    fn pack(&self, n0: usize, width: usize, nr: usize, panel: &mut [u8]) {
        let k = self.k();
        // Four rows of the patch matrix at a time, then interleaved into groups.
        let mut rows = [[self.zero; 64]; 4];
        assert!(nr <= 64, "panels of at most 64 columns");
        for (q, target) in panel.chunks_exact_mut(nr * 4).enumerate() {
            for (t, row) in rows.iter_mut().enumerate() {
                let kk = 4 * q + t;
                if kk < k {
                    self.planes
                        .patch_row(self.geometry, kk, n0, &mut row[..width]);
                } else {
                    row[..width].fill(self.zero);
                }
            }
            for (j, out) in target.chunks_exact_mut(4).take(width).enumerate() {
                out.copy_from_slice(&group([rows[0][j], rows[1][j], rows[2][j], rows[3][j]]));
            }
        }
    }
}

/// How the int8 input becomes the product's operand.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Geometry {
    /// `K` planes of `N` pixels as they are.
    Pointwise { k: usize, n: usize },
    /// Patches gathered while packing.
    Patches(PatchGeometry),
}

/// An int8 convolution with one group, batch 1: int8 weights (zero point 0, scales per tensor or
/// per output channel), int8 activations in and out.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedConvolution {
    geometry: Geometry,
    weights: Arc<PackedInt8>,
    x0: i8,
    output: DatumType,
    output_shape: TVec<usize>,
}

// See the note on `Convolution`'s `Eq`.
impl Eq for QuantizedConvolution {}

/// The nine inputs of a tract quantized product after the activations and weights: int32 bias,
/// then zero point and scale of the activations, weights and output.
fn requantization(
    model: &TypedModel,
    node: &TypedNode,
    m: usize,
) -> TractResult<Option<Requantization>> {
    let values: Option<Vec<Arc<Tensor>>> =
        node.inputs[2..].iter().map(|&i| konst(model, i)).collect();
    let Some(values) = values else {
        return Ok(None);
    };
    let scalar_i32 = |t: &Tensor| -> TractResult<Option<i32>> {
        (t.len() == 1)
            .then(|| t.cast_to_scalar::<i32>())
            .transpose()
    };
    let floats = |t: &Tensor| -> TractResult<Vec<f32>> {
        Ok(t.cast_to::<f32>()?.view().as_slice::<f32>()?.to_vec())
    };
    let (Some(x0), Some(k0), Some(y0)) = (
        scalar_i32(&values[1])?,
        scalar_i32(&values[3])?,
        scalar_i32(&values[5])?,
    ) else {
        return Ok(None);
    };
    let bias = values[0].cast_to::<i32>()?;
    let Some(bias) = per_channel(bias.view().as_slice::<i32>()?.to_vec(), m) else {
        return Ok(None);
    };
    let (x_scale, k_scales, y_scale) = (
        floats(&values[2])?,
        floats(&values[4])?,
        floats(&values[6])?,
    );
    if k0 != 0
        || x_scale.len() != 1
        || y_scale.len() != 1
        || !(k_scales.len() == 1 || k_scales.len() == m)
        || !(-128..=127).contains(&x0)
        || !(-128..=127).contains(&y0)
    {
        return Ok(None);
    }
    Ok(Some(Requantization {
        x0,
        x_scale: x_scale[0],
        k_scales,
        bias,
        y0,
        y_scale: y_scale[0],
    }))
}

fn is_int8(dt: DatumType) -> bool {
    dt.unquantized() == i8::datum_type()
}

impl QuantizedConvolution {
    fn new(
        level: Level,
        geometry: Geometry,
        (weights, m, k): (&[i8], usize, usize),
        requant: &Requantization,
        output_shape: TVec<usize>,
    ) -> QuantizedConvolution {
        QuantizedConvolution {
            geometry,
            weights: Arc::new(PackedInt8::new(level, weights, m, k, requant)),
            x0: requant.x0 as i8,
            output: i8::datum_type().quantize(QParams::ZpScale {
                zero_point: requant.y0,
                scale: requant.y_scale,
            }),
            output_shape,
        }
    }

    /// The kernel for a tract quantized pointwise `EinSum` (`kn,mk,m,,,,m,,->mn` or with one
    /// weight scale); returns it and the last node it replaces (the cast of its raw int8 output
    /// to the quantized type, when there is one).
    pub fn for_einsum(
        model: &TypedModel,
        node: &TypedNode,
        level: Level,
    ) -> TractResult<Option<(QuantizedConvolution, usize)>> {
        let Some(einsum) = node.op_as::<EinSum>() else {
            return Ok(None);
        };
        if einsum.q_params.is_none() || node.inputs.len() != 9 {
            return Ok(None);
        }
        let x_fact = model.outlet_fact(node.inputs[0])?;
        let (Some(weights), Some(x_shape)) =
            (konst(model, node.inputs[1]), x_fact.shape.as_concrete())
        else {
            return Ok(None);
        };
        let (inputs, outputs) = einsum.axes.to_strs();
        let letters = |s: &str| s.chars().collect::<Vec<char>>();
        let (x, w, y) = (
            letters(&inputs[0]),
            letters(&inputs[1]),
            letters(&outputs[0]),
        );
        if x.len() != 2
            || w.len() != 2
            || x[0] != w[1]
            || y != [w[0], x[1]]
            || !is_int8(x_fact.datum_type)
        {
            return Ok(None);
        }
        let (k, n) = (x_shape[0], x_shape[1]);
        let m = weights.shape()[0];
        let (Some(weights), Some(requant)) =
            (int8_values(&weights)?, requantization(model, node, m)?)
        else {
            return Ok(None);
        };
        if weights.len() != m * k
            || (x_fact.datum_type.is_quantized() && x_fact.datum_type.zp_scale().0 != requant.x0)
        {
            return Ok(None);
        }
        let conv = QuantizedConvolution::new(
            level,
            Geometry::Pointwise { k, n },
            (&weights, m, k),
            &requant,
            tvec![m, n],
        );
        Ok(Some(conv.with_cast(model, node.id)?))
    }

    /// The kernel for a tract quantized `Conv` with one group, OIHW weights, batch 1.
    pub fn for_conv(
        model: &TypedModel,
        node: &TypedNode,
        level: Level,
    ) -> TractResult<Option<(QuantizedConvolution, usize)>> {
        let Some(conv) = node.op_as::<Conv>() else {
            return Ok(None);
        };
        let input_fact = model.outlet_fact(node.inputs[0])?;
        if conv.q_params.is_none()
            || conv.group != 1
            || node.inputs.len() != 9
            || !is_int8(input_fact.datum_type)
        {
            return Ok(None);
        }
        let (Some((geometry, output_shape)), Some(weights)) = (
            PatchGeometry::of_conv(model, node, conv)?,
            konst(model, node.inputs[1]),
        ) else {
            return Ok(None);
        };
        let (m, k) = (conv.pool_spec.output_channels, geometry.rows());
        let (Some(weights), Some(requant)) =
            (int8_values(&weights)?, requantization(model, node, m)?)
        else {
            return Ok(None);
        };
        if weights.len() != m * k {
            return Ok(None);
        }
        let geometry = Geometry::Patches(geometry);
        let conv =
            QuantizedConvolution::new(level, geometry, (&weights, m, k), &requant, output_shape);
        Ok(Some(conv.with_cast(model, node.id)?))
    }

    /// Absorbs a cast of node `last`'s raw int8 output to the quantized output type (what tract's
    /// NNEF reader adds after a quantized product); returns the operator and the last node.
    fn with_cast(
        self,
        model: &TypedModel,
        last: usize,
    ) -> TractResult<(QuantizedConvolution, usize)> {
        if let Some(next) = only_successor(model, last)? {
            let to_output = next.op_as::<Cast>().is_some_and(|c| {
                c.to.unquantized() == i8::datum_type() && c.to.zp_scale() == self.output.zp_scale()
            });
            if to_output {
                return Ok((self, next.id));
            }
        }
        // No cast to absorb: produce the type the replaced node declared (the same bytes; tract
        // may have lowered the quantized output to raw int8 for its next operator).
        let declared = model.outlet_fact(OutletId::new(last, 0))?.datum_type;
        let output = if is_int8(declared) {
            declared
        } else {
            self.output
        };
        Ok((QuantizedConvolution { output, ..self }, last))
    }

    /// A pointwise convolution's packed weights, pixel count and output type; `None` for other
    /// geometries.
    pub fn pointwise_parts(&self) -> Option<(&PackedInt8, usize, DatumType)> {
        match self.geometry {
            Geometry::Pointwise { n, .. } => Some((&self.weights, n, self.output)),
            Geometry::Patches(_) => None,
        }
    }

    fn input_len(&self) -> usize {
        match &self.geometry {
            Geometry::Pointwise { k, n } => k * n,
            Geometry::Patches(g) => g.channels * g.input[0] * g.input[1],
        }
    }

    /// Runs the convolution on `input` (`C x H x W` int8) into `output`.
    pub fn run(&self, input: &[i8], output: &mut [i8]) {
        match &self.geometry {
            Geometry::Pointwise { k, n } => {
                let rows = RowsInt8 {
                    data: input,
                    k: *k,
                    n: *n,
                };
                matmul(&self.weights, &rows, output)
            }
            Geometry::Patches(geometry) => {
                let patches = Patches::new(input, geometry, self.x0);
                matmul(&self.weights, &patches, output)
            }
        }
    }
}

impl Op for QuantizedConvolution {
    fn name(&self) -> StaticName {
        "GraftQuantizedConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let (mr, nr) = tile(self.weights.level());
        Ok(vec![format!(
            "{:?}, {} x {} int8 weights, {:?} tiles {mr}x{nr} -> {:?}",
            self.geometry,
            self.weights.m(),
            self.weights.k(),
            self.weights.level(),
            self.output
        )])
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for QuantizedConvolution {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        ensure!(
            is_int8(input.datum_type()),
            "graft's int8 convolution takes int8 input"
        );
        let view = input.view();
        let values = view.as_slice::<i8>()?;
        ensure!(
            values.len() == self.input_len(),
            "graft's int8 convolution expects {} input values, got {}",
            self.input_len(),
            values.len()
        );
        // SAFETY: every value is written by the product (i8 has no invalid bit patterns).
        let mut output = unsafe { Tensor::uninitialized_dt(self.output, &self.output_shape)? };
        {
            let mut out = output.try_as_plain_ram_mut()?;
            self.run(values, out.as_slice_mut::<i8>()?);
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for QuantizedConvolution {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(self.output.fact(&*self.output_shape)))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{use_graft_kernels_in, Layout};
    use tract_core::axes::AxesMapping;
    use tract_core::ops::cast::cast;
    use tract_core::ops::cnn::{KernelFormat, PaddingSpec, PoolSpec};
    use tract_core::ops::nn::DataFormat;

    fn qi8(zero_point: i32, scale: f32) -> DatumType {
        i8::datum_type().quantize(QParams::ZpScale { zero_point, scale })
    }

    /// The nine inputs of a tract quantized product, as the compiler wires them.
    fn quantized_inputs(
        model: &mut TypedModel,
        x: OutletId,
        weights: Tensor,
        m: usize,
        k_scales: &[f32],
    ) -> TVec<OutletId> {
        let bias: Vec<i32> = (0..m).map(|i| i as i32 * 53 - 300).collect();
        let mut inputs = tvec![x];
        inputs.push(model.add_const("w", weights).unwrap());
        inputs.push(model.add_const("bias", tensor1(&bias)).unwrap());
        inputs.push(model.add_const("x0", tensor0(-3i32)).unwrap());
        inputs.push(model.add_const("x_scale", tensor0(0.05f32)).unwrap());
        inputs.push(model.add_const("k0", tensor0(0i32)).unwrap());
        inputs.push(match k_scales {
            [one] => model.add_const("k_scale", tensor0(*one)).unwrap(),
            many => model.add_const("k_scale", tensor1(many)).unwrap(),
        });
        inputs.push(model.add_const("y0", tensor0(-20i32)).unwrap());
        inputs.push(model.add_const("y_scale", tensor0(0.09f32)).unwrap());
        inputs
    }

    fn weights(shape: &[usize]) -> Tensor {
        let len = shape.iter().product::<usize>();
        let values: Vec<i8> = (0..len)
            .map(|i| ((i * 37 % 255) as i32 - 127) as i8)
            .collect();
        Tensor::from_shape(shape, &values).unwrap()
    }

    /// Runs `model` (f32 in, f32 out) with tract's operators and with graft's kernels at every
    /// level; the int8 results may differ by one step (tract rounds its requantization its
    /// own way), and every level gives the same values.
    fn check(model: TypedModel, input_shape: &[usize]) {
        let len = input_shape.iter().product::<usize>();
        let values: Vec<f32> = (0..len)
            .map(|i| ((i * 53 % 97) as f32 - 40.0) / 7.0)
            .collect();
        let input = Tensor::from_shape(input_shape, &values).unwrap();
        let run = |model: TypedModel| -> Vec<f32> {
            let out = model
                .into_runnable()
                .unwrap()
                .run(tvec![input.clone().into()])
                .unwrap();
            out[0].view().as_slice::<f32>().unwrap().to_vec()
        };
        let reference = run(model.clone().into_optimized().unwrap());
        let mut first: Option<Vec<f32>> = None;
        for (level, layout) in Level::available()
            .into_iter()
            .flat_map(|l| [(l, Layout::Plain), (l, Layout::Blocked)])
        {
            let mut ours = model.clone().into_decluttered().unwrap();
            use_graft_kernels_in(&mut ours, level, layout).unwrap();
            let kernel = ["GraftQuantizedConv", "GraftBlockedQuantizedConv"];
            let fused = ours
                .nodes()
                .iter()
                .filter(|n| kernel.contains(&&*n.op.name()))
                .count();
            assert_eq!(fused, 1, "{level:?}");
            let values = run(ours.into_optimized().unwrap());
            let worst = reference
                .iter()
                .zip(&values)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                worst <= 0.09 * 1.001,
                "{level:?}: {worst} is more than one step"
            );
            assert!(
                values
                    .iter()
                    .zip(&reference)
                    .filter(|(a, b)| a == b)
                    .count()
                    * 10
                    > values.len() * 9
            );
            match &first {
                Some(first) => assert_eq!(first, &values, "{level:?} and the first level"),
                None => first = Some(values),
            }
        }
    }

    #[test]
    fn quantized_stem_convolution_matches_tract_within_one_step() {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([1, 3, 21, 20])).unwrap();
        let x = model.wire_node("q", cast(qi8(-3, 0.05)), &[x]).unwrap()[0];
        let conv = Conv::new(
            PoolSpec {
                data_format: DataFormat::NCHW,
                kernel_shape: tvec![3, 3],
                padding: PaddingSpec::Explicit(tvec![0, 0], tvec![1, 1]),
                dilations: None,
                strides: Some(tvec![2, 2]),
                input_channels: 3,
                output_channels: 13,
            },
            KernelFormat::OIHW,
            1,
            Some(qi8(-20, 0.09)),
        );
        let inputs = quantized_inputs(&mut model, x, weights(&[13, 3, 3, 3]), 13, &[0.004]);
        let y = model.wire_node("conv", conv, &inputs).unwrap();
        let y = model.wire_node("dq", cast(f32::datum_type()), &y).unwrap();
        model.select_output_outlets(&y).unwrap();
        check(model, &[1, 3, 21, 20]);
    }

    #[test]
    fn quantized_pointwise_product_with_per_channel_scales_matches_tract_within_one_step() {
        let (m, k, n) = (19, 24, 50);
        for per_channel in [true, false] {
            let mut model = TypedModel::default();
            let x = model.add_source("x", f32::fact([k, n])).unwrap();
            let x = model.wire_node("q", cast(qi8(-3, 0.05)), &[x]).unwrap()[0];
            let scales: Vec<f32> = if per_channel {
                (0..m).map(|i| 0.002 + i as f32 * 0.0004).collect()
            } else {
                vec![0.004]
            };
            let inputs = quantized_inputs(&mut model, x, weights(&[m, k]), m, &scales);
            let axes: AxesMapping = if per_channel {
                "kn,mk,m,,,,m,,->mn"
            } else {
                "kn,mk,m,,,,,,->mn"
            }
            .parse()
            .unwrap();
            let op = EinSum::newq(axes, i32::datum_type(), qi8(-20, 0.09));
            let y = model.wire_node("pointwise", op, &inputs).unwrap();
            let y = model.wire_node("dq", cast(f32::datum_type()), &y).unwrap();
            model.select_output_outlets(&y).unwrap();
            check(model, &[k, n]);
        }
    }
}
