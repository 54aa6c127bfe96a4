//! Per-channel quantized convolutions, merged back into one.
//!
//! NNEF's quantized `conv` takes its weight scale from the kernel tensor's type: one scale per
//! tensor. The compiler therefore writes an int8 convolution with one weight scale per output
//! channel (Lite0's stem, whose per-channel scales span a factor of 34) as one single-channel
//! quantized `Conv` per output channel, all reading the same input with the same output type,
//! and a `Concat` of their outputs: standard NNEF that plain tract runs as written, slowly
//! (one patch matrix per channel). [`merge_channel_convolutions`] makes them one tract quantized
//! `Conv` with a weight-scale vector again, which [`QuantizedConvolution`] then runs as one
//! product with the per-channel requantization fused, and which tract alone also runs.
//!
//! [`QuantizedConvolution`]: super::QuantizedConvolution

use tract_core::internal::*;
use tract_core::ops::array::TypedConcat;
use tract_core::ops::cnn::{Conv, KernelFormat, PoolSpec};

use super::graph::{int8_values, konst, only_successor};

/// The channel axis of a convolution's input and output: the axis the compiler concatenates the
/// single-channel convolutions on, and the one this pass merges (a decluttered graph drops the
/// batch axis, so CHW as often as NCHW).
pub fn channel_axis(pool_spec: &PoolSpec) -> usize {
    let format = pool_spec.data_format;
    if format.c_is_last() {
        pool_spec.rank() + format.has_n() as usize
    } else {
        format.has_n() as usize
    }
}

/// One single-channel convolution of a group to merge.
struct Part {
    weights: Vec<i8>,
    bias: i32,
    k_scale: f32,
}

/// The inputs every part shares, by position in a quantized `Conv`'s nine: the activations,
/// then the zero point and scale of the activations and weights and the output.
const SHARED: [usize; 5] = [3, 4, 5, 7, 8];

/// A scalar constant's value as f64 (to compare zero points and scales across parts).
fn scalar(model: &TypedModel, outlet: OutletId) -> TractResult<Option<f64>> {
    match konst(model, outlet) {
        Some(t) if t.len() == 1 => Ok(Some(t.cast_to_scalar::<f64>()?)),
        _ => Ok(None),
    }
}

/// The part computed by the node at `outlet`, when it is a single-channel quantized convolution
/// like `first` (same input, geometry and shared quantization parameters) read by `concat` only.
fn part(
    model: &TypedModel,
    outlet: OutletId,
    first: &TypedNode,
    concat: usize,
) -> TractResult<Option<Part>> {
    let node = model.node(outlet.node);
    let (Some(conv), Some(reference)) = (node.op_as::<Conv>(), first.op_as::<Conv>()) else {
        return Ok(None);
    };
    let same_geometry = {
        let mut spec = reference.pool_spec.clone();
        spec.output_channels = conv.pool_spec.output_channels;
        spec == conv.pool_spec
    };
    if conv.q_params.is_none()
        || conv.q_params != reference.q_params
        || conv.group != 1
        || conv.kernel_fmt != KernelFormat::OIHW
        || conv.pool_spec.output_channels != 1
        || !same_geometry
        || node.inputs.len() != 9
        || node.inputs[0] != first.inputs[0]
        || only_successor(model, node.id)?.map(|n| n.id) != Some(concat)
    {
        return Ok(None);
    }
    for &i in &SHARED {
        let (a, b) = (
            scalar(model, node.inputs[i])?,
            scalar(model, first.inputs[i])?,
        );
        if a.is_none() || a != b {
            return Ok(None);
        }
    }
    let (Some(weights), Some(bias), Some(k_scale)) = (
        konst(model, node.inputs[1]),
        konst(model, node.inputs[2]),
        scalar(model, node.inputs[6])?,
    ) else {
        return Ok(None);
    };
    let Some(weights) = int8_values(&weights)?.filter(|_| bias.len() == 1) else {
        return Ok(None);
    };
    Ok(Some(Part {
        weights,
        bias: bias.cast_to_scalar::<i32>()?,
        k_scale: k_scale as f32,
    }))
}

/// The parts of the concatenation `node`, in order, when it joins single-channel quantized
/// convolutions along their channel axis, with the first of them.
fn parts<'m>(
    model: &'m TypedModel,
    node: &TypedNode,
) -> TractResult<Option<(Vec<Part>, &'m TypedNode)>> {
    let Some(concat) = node.op_as::<TypedConcat>() else {
        return Ok(None);
    };
    if node.inputs.len() < 2 {
        return Ok(None);
    }
    let first = model.node(node.inputs[0].node);
    let Some(conv) = first.op_as::<Conv>() else {
        return Ok(None);
    };
    if concat.axis != channel_axis(&conv.pool_spec) {
        return Ok(None);
    }
    let mut found = Vec::with_capacity(node.inputs.len());
    for &input in &node.inputs {
        match part(model, input, first, node.id)? {
            Some(p) if input.slot == 0 => found.push(p),
            _ => return Ok(None),
        }
    }
    Ok(Some((found, first)))
}

/// Replaces every concatenation of single-channel quantized convolutions (see the module
/// documentation) by one quantized `Conv` with per-channel weight scales; returns how many.
pub(crate) fn merge_channel_convolutions(model: &mut TypedModel) -> TractResult<usize> {
    let mut merged = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some((found, first)) = parts(model, node)? else {
            continue;
        };
        let conv = first.op_as::<Conv>().context("checked by parts")?;
        let weights: Vec<i8> = found
            .iter()
            .flat_map(|p| p.weights.iter().copied())
            .collect();
        let mut shape: TVec<usize> = model
            .outlet_fact(first.inputs[1])?
            .shape
            .as_concrete()
            .context("constant weights")?
            .into();
        shape[0] = found.len();
        let mut pool_spec = conv.pool_spec.clone();
        pool_spec.output_channels = found.len();
        let output = model.outlet_fact(OutletId::new(id, 0))?.datum_type;
        let op = Conv::new(pool_spec, KernelFormat::OIHW, 1, Some(output));
        let name = format!("{}.merged", node.name);
        let first_inputs = first.inputs.clone();

        let mut patch = TypedModelPatch::default();
        let x = patch.tap_model(model, first_inputs[0])?;
        let kernel = patch.add_const(
            format!("{name}.weights"),
            Tensor::from_shape(&shape, &weights)?,
        )?;
        let bias = patch.add_const(
            format!("{name}.bias"),
            tensor1(&found.iter().map(|p| p.bias).collect::<Vec<_>>()),
        )?;
        let k_scale = patch.add_const(
            format!("{name}.k_scale"),
            tensor1(&found.iter().map(|p| p.k_scale).collect::<Vec<_>>()),
        )?;
        let mut inputs = vec![x, kernel, bias];
        for (i, &outlet) in first_inputs.iter().enumerate().skip(3) {
            inputs.push(if i == 6 {
                k_scale
            } else {
                patch.tap_model(model, outlet)?
            });
        }
        let y = patch.wire_node(name, op, &inputs)?[0];
        patch.shunt_outside(model, OutletId::new(id, 0), y)?;
        patch.apply(model)?;
        merged += 1;
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_core::ops::cnn::PaddingSpec;
    use tract_core::ops::nn::DataFormat;

    fn qi8(zero_point: i32, scale: f32) -> DatumType {
        i8::datum_type().quantize(QParams::ZpScale { zero_point, scale })
    }

    /// A 3-channel int8 input, `channels` single-channel 3x3 stride-2 quantized convolutions
    /// with their own weight scales, concatenated; channel `odd`, if any, with another output
    /// zero point.
    fn split_model(channels: usize, odd: Option<usize>) -> TypedModel {
        let mut model = TypedModel::default();
        let x_dt = qi8(-1, 0.0078125);
        let y_dt = qi8(-128, 0.0235);
        let x = model.add_source("x", x_dt.fact([1, 3, 9, 11])).unwrap();
        let scalar_i = |m: &mut TypedModel, n: &str, v: i32| m.add_const(n, tensor0(v)).unwrap();
        let scalar_f = |m: &mut TypedModel, n: &str, v: f32| m.add_const(n, tensor0(v)).unwrap();
        let x0 = scalar_i(&mut model, "x0", -1);
        let x_scale = scalar_f(&mut model, "x_scale", 0.0078125);
        let k0 = scalar_i(&mut model, "k0", 0);
        let y0 = scalar_i(&mut model, "y0", -128);
        let other_y0 = scalar_i(&mut model, "other_y0", -127);
        let y_scale = scalar_f(&mut model, "y_scale", 0.0235);
        let mut outputs = vec![];
        for c in 0..channels {
            let values: Vec<i8> = (0..27).map(|i| ((i * 37 + c * 11) % 255) as i8).collect();
            let w = model
                .add_const(
                    format!("w{c}"),
                    Tensor::from_shape(&[1, 3, 3, 3], &values).unwrap(),
                )
                .unwrap();
            let b = model
                .add_const(format!("b{c}"), tensor1(&[(c as i32 - 3) * 500]))
                .unwrap();
            let k_scale = scalar_f(&mut model, &format!("k{c}"), 0.002 * (1 + c * c) as f32);
            let op = Conv::new(
                PoolSpec {
                    data_format: DataFormat::NCHW,
                    kernel_shape: tvec![3, 3],
                    padding: PaddingSpec::Explicit(tvec![1, 1], tvec![1, 1]),
                    dilations: None,
                    strides: Some(tvec![2, 2]),
                    input_channels: 3,
                    output_channels: 1,
                },
                KernelFormat::OIHW,
                1,
                Some(y_dt),
            );
            let y0 = if odd == Some(c) { other_y0 } else { y0 };
            let inputs = [x, w, b, x0, x_scale, k0, k_scale, y0, y_scale];
            outputs.push(model.wire_node(format!("c{c}"), op, &inputs).unwrap()[0]);
        }
        let y = model
            .wire_node("concat", TypedConcat::new(1), &outputs)
            .unwrap()[0];
        model.select_output_outlets(&[y]).unwrap();
        model
    }

    fn run(model: TypedModel) -> Vec<i8> {
        run_optimized(model.into_optimized().unwrap())
    }

    fn run_optimized(model: TypedModel) -> Vec<i8> {
        let input: Vec<i8> = (0..3 * 9 * 11)
            .map(|i| ((i * 53) % 256) as u8 as i8)
            .collect();
        let input = Tensor::from_shape(&[1, 3, 9, 11], &input)
            .unwrap()
            .cast_to_dt(qi8(-1, 0.0078125))
            .unwrap()
            .into_owned();
        let out = model
            .into_runnable()
            .unwrap()
            .run(tvec![input.into()])
            .unwrap();
        out[0].view().as_slice::<i8>().unwrap().to_vec()
    }

    #[test]
    fn single_channel_convolutions_become_one_per_channel_convolution_with_the_same_bytes() {
        let split = split_model(5, None);
        let mut merged = split.clone();
        assert_eq!(merge_channel_convolutions(&mut merged).unwrap(), 1);
        merged.compact().unwrap();
        let convs = merged.nodes().iter().filter(|n| n.op_is::<Conv>()).count();
        assert_eq!(convs, 1);
        assert!(!merged.nodes().iter().any(|n| n.op_is::<TypedConcat>()));
        let (a, b) = (run(split), run(merged));
        assert!(a.iter().any(|&v| v != -128), "all outputs clamped: {a:?}");
        assert_eq!(a, b);
    }

    /// Through graft's kernels at every level the CPU has, in both layouts: one
    /// `QuantizedConvolution` (or its blocked twin), within one step of tract's split graph.
    #[test]
    fn graft_kernels_run_the_merged_convolution_as_tract_runs_the_split_one() {
        use crate::kernels::{use_graft_kernels_in, Layout, Level};
        let split = split_model(19, None);
        let expected = run(split.clone());
        for level in Level::ALL.into_iter().filter(|l| l.supported()) {
            for layout in [Layout::Plain, Layout::Blocked] {
                let mut graph = split.clone();
                use_graft_kernels_in(&mut graph, level, layout).unwrap();
                assert!(!graph.nodes().iter().any(|n| n.op_is::<Conv>()));
                let got = run_optimized(graph.into_optimized().unwrap());
                let worst = expected
                    .iter()
                    .zip(&got)
                    .map(|(&a, &b)| (a as i32 - b as i32).abs())
                    .max();
                assert!(worst <= Some(1), "{level:?} {layout:?}: {worst:?}");
            }
        }
    }

    #[test]
    fn convolutions_with_other_output_types_are_left_alone() {
        let mut model = split_model(3, Some(1));
        assert_eq!(merge_channel_convolutions(&mut model).unwrap(), 0);
    }
}
