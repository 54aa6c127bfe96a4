//! Fold: append the trained head to the frozen graph, giving one graph from image to class
//! probabilities, and serialize it as NNEF.
//!
//! The head's dense layers become tract `EinSum` (matrix product) + `Add` nodes with the weights as
//! constants, ReLU between layers, and a softmax at the end. The graph has two outputs:
//! probabilities, then logits. tract's declutter pass then folds constants and simplifies the
//! whole graph, and a consistency check runs after every rewrite.

pub mod manifest;

mod expand_gelu;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::axes::AxesMapping;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::math;
use tract_onnx::tract_core::ops::nn::{Softmax, SoftmaxKind};

use crate::backbone::cut::CutBackbone;
use crate::error::{CompileError, Result};
use crate::head::train::Dense;

/// Names of the head's nodes start with this (the int8 rewrite leaves the head in f32).
pub(crate) const HEAD_NODE_PREFIX: &str = "graft.head.";

/// One graph from image to `[probabilities, logits]`.
#[derive(Debug, Clone)]
pub struct FoldedModel {
    pub(crate) model: TypedModel,
    pub(crate) classes: usize,
}

impl CutBackbone {
    /// Appends `layers` (a trained head; empty to keep the cut tensor as the logits) and a softmax.
    pub fn into_folded(self, layers: &[Dense]) -> Result<FoldedModel> {
        let feature_dim = self.feature_dim();
        let (_, _, _, mut model) = self.into_parts();
        let mut width = feature_dim;
        for (i, layer) in layers.iter().enumerate() {
            if layer.inputs != width {
                return Err(CompileError::Graph {
                    stage: "fold",
                    reason: format!(
                        "layer {i} reads {} values, previous gives {width}",
                        layer.inputs
                    ),
                });
            }
            width = layer.outputs;
        }
        let wire = |model: &mut TypedModel| -> TractResult<()> {
            let mut x = model.output_outlets()?[0];
            for (i, layer) in layers.iter().enumerate() {
                if i > 0 {
                    let zero = model
                        .add_const(format!("{HEAD_NODE_PREFIX}{i}.zero"), tensor2(&[[0f32]]))?;
                    x = model.wire_node(
                        format!("{HEAD_NODE_PREFIX}{i}.relu"),
                        math::max(),
                        &[x, zero],
                    )?[0];
                }
                let weight = Tensor::from_shape(&[layer.outputs, layer.inputs], &layer.weight)?;
                let weight = model.add_const(format!("{HEAD_NODE_PREFIX}{i}.weight"), weight)?;
                let bias = Tensor::from_shape(&[1, layer.outputs], &layer.bias)?;
                let bias = model.add_const(format!("{HEAD_NODE_PREFIX}{i}.bias"), bias)?;
                let axes = AxesMapping::for_numpy_matmul(2, false, true, false)?;
                let product = model.wire_node(
                    format!("{HEAD_NODE_PREFIX}{i}.matmul"),
                    EinSum::new(axes, f32::datum_type()),
                    &[x, weight],
                )?[0];
                x = model.wire_node(
                    format!("{HEAD_NODE_PREFIX}{i}.add"),
                    math::add(),
                    &[product, bias],
                )?[0];
            }
            let probabilities = model.wire_node(
                "graft.probabilities",
                Softmax::new(tvec![1], None, SoftmaxKind::Softmax),
                &[x],
            )?[0];
            model.select_output_outlets(&[probabilities, x])?;
            model.set_outlet_label(probabilities, "probabilities".into())?;
            model.set_outlet_label(x, "logits".into())?;
            Ok(())
        };
        wire(&mut model).map_err(CompileError::graph("fold"))?;
        // The ONNX metadata (doc string, producer) travels in graft's manifest instead: tract
        // 0.23's NNEF reader cannot parse every string its writer emits (e.g. quotes).
        model.properties.retain(|key, _| !key.starts_with("onnx."));
        let model = model
            .into_decluttered()
            .map_err(CompileError::graph("fold"))?;
        model
            .check_consistency()
            .map_err(CompileError::graph("fold"))?;
        Ok(FoldedModel {
            model,
            classes: width,
        })
    }
}

impl FoldedModel {
    /// Number of classes the graph scores.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// The folded graph.
    pub fn model(&self) -> &TypedModel {
        &self.model
    }

    /// Serializes the graph as an NNEF tar archive, deterministically (fixed timestamps), so the
    /// same model always gives the same bytes.
    pub fn to_nnef(&self) -> Result<Vec<u8>> {
        let graph = CompileError::graph("NNEF serialization");
        let model = expand_gelu::expand_gelu(&self.model).map_err(&graph)?;
        tract_nnef::nnef()
            .write_to_tar_with_config(&model, Vec::new(), false, true)
            .map_err(graph)
    }
}
