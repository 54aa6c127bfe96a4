//! Helpers shared by the unit tests of graph rewrites.

use tract_onnx::prelude::*;

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
