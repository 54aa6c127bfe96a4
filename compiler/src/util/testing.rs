//! Helpers shared by the unit tests of graph rewrites.

use tract_onnx::prelude::*;

/// Largest absolute difference between two f32 candle tensors of one shape.
pub(crate) fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

/// Largest absolute value of a candle tensor, as f32.
pub(crate) fn max_abs(t: &candle_core::Tensor) -> f32 {
    t.abs()
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_dtype(candle_core::DType::F32))
        .and_then(|d| d.to_scalar::<f32>())
        .unwrap()
}

/// Runs `model` once on `input` and returns its first output.
pub(crate) fn run_once(model: &TypedModel, input: &Tensor) -> Tensor {
    model
        .clone()
        .into_runnable()
        .unwrap()
        .run(tvec![input.clone().into()])
        .unwrap()[0]
        .clone()
        .into_tensor()
}
