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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::testing::run_once;
    use tract_onnx::tract_core::internal::Approximation;
    use tract_onnx::tract_core::ops::nn::DataFormat;

    fn pool_spec(size: usize) -> (PoolSpec, [usize; 4]) {
        let spec = PoolSpec {
            data_format: DataFormat::NCHW,
            kernel_shape: tvec![3, 3],
            padding: PaddingSpec::ExplicitOnnxPool(tvec![0, 0], tvec![0, 0], true),
            dilations: None,
            strides: Some(tvec![2, 2]),
            input_channels: 2,
            output_channels: 2,
        };
        (spec, [1, 2, size, size])
    }

    /// A 3x3/2 ceil-mode max pooling of a 112x112 map (56x56; 55x55 in floor mode) gives the same
    /// values once made explicit, through an NNEF round trip.
    #[test]
    fn ceil_mode_max_pool_survives_nnef() {
        let (spec, shape) = pool_spec(112);
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact(shape)).unwrap();
        let y = model
            .wire_node("pool", MaxPool::new(spec, None), &[x])
            .unwrap();
        model.select_output_outlets(&y).unwrap();
        let len: usize = shape.iter().product();
        let values: Vec<f32> = (0..len).map(|i| ((i * 37) % 101) as f32 - 50.0).collect();
        let input = Tensor::from_shape(&shape, &values).unwrap();
        let expected = run_once(&model, &input);
        assert_eq!(expected.shape(), [1, 2, 56, 56]);

        explicit_ceil_pools(&mut model).unwrap();
        let nnef = tract_nnef::nnef();
        let mut bytes = vec![];
        nnef.write_to_tar(&model, &mut bytes).unwrap();
        let reloaded = nnef.model_for_read(&mut &bytes[..]).unwrap();
        let got = run_once(&reloaded, &input);
        expected.close_enough(&got, Approximation::Exact).unwrap();
    }

    #[test]
    fn ceil_mode_average_counting_padding_is_refused_by_name() {
        let (spec, shape) = pool_spec(112);
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact(shape)).unwrap();
        let y = model
            .wire_node("/inception/avg", SumPool::new(spec, true, true), &[x])
            .unwrap();
        model.select_output_outlets(&y).unwrap();
        let err = explicit_ceil_pools(&mut model).unwrap_err().to_string();
        assert!(
            err.starts_with(
                "AveragePool \"/inception/avg\" has ceil_mode=1 and count_include_pad=1"
            ),
            "{err}"
        );
    }
}
