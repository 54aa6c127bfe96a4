//! Import: read an ONNX backbone with tract-onnx, check that graft can use it, and describe it.
//!
//! Checks made here, each with an error naming the file: the file parses as ONNX; every operator
//! is one tract implements (the error names the first node that is not); there is exactly one
//! image input, NCHW with 3 channels and a known height and width (a symbolic batch dimension is
//! fixed to 1).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tract_onnx::pb::{self, tensor_shape_proto::dimension::Value as Dim, type_proto};
use tract_onnx::prelude::*;

mod ceil_pools;
mod external_data;
mod fold_batchnorm;
pub(crate) mod proto;

use crate::error::{CompileError, Result};

/// Largest ONNX file read: protobuf cannot encode a message of 2 GiB or more (larger models
/// keep their weights as external data).
const MAX_ONNX_BYTES: u64 = 2 << 30;

/// Largest input accepted, in pixels (2048x2048): ImageNet CNNs take 224x224 to 600x600, and
/// an 8192x8192 input needs tens of gigabytes for its activations before anything can fail
/// cleanly.
const MAX_INPUT_PIXELS: u64 = 2048 * 2048;

/// Most nodes an ONNX graph may have (EfficientNet-B7 exports to about 2,600; DenseNet-201 to
/// about 700). tract's optimizer is superlinear in graph size: a compile of a chain of Relu
/// nodes took 8 s at 2,000 nodes and 36 s at 4,000 (2-core EPYC, 2026-11-28), and minutes at
/// 10,000, so a larger graph is refused before it starts.
const MAX_NODES: usize = 4096;

/// An ONNX classifier backbone, parsed and checked.
#[derive(Debug, Clone)]
pub struct Backbone {
    pub(in crate::backbone) path: PathBuf,
    external_files: Vec<PathBuf>,
    sha256: String,
    proto: pb::ModelProto,
    pub(in crate::backbone) input_name: String,
    input_shape: [usize; 4],
}

impl Backbone {
    /// Reads and checks the ONNX file at `path`. `input_size` (`[height, width]`) is required
    /// when the model's input has symbolic spatial dimensions, and must agree with it otherwise.
    pub fn load(path: &Path, input_size: Option<[usize; 2]>) -> Result<Backbone> {
        let bytes = graft_runtime::read::read_regular(path, MAX_ONNX_BYTES, "backbone")?;
        let invalid = |reason: String| CompileError::InvalidBackbone {
            path: path.to_path_buf(),
            reason,
        };
        let onnx = tract_onnx::onnx();
        let proto = onnx
            .proto_model_for_read(&mut &bytes[..])
            .map_err(|e| invalid(format!("not a valid ONNX model: {e:#}")))?;
        let graph = proto
            .graph
            .as_ref()
            .ok_or_else(|| invalid("the ONNX model has no graph".into()))?;
        if graph.node.is_empty() {
            return Err(invalid("the ONNX graph has no nodes".into()));
        }
        if graph.node.len() > MAX_NODES {
            return Err(invalid(format!(
                "the ONNX graph has {} nodes, more than graft's limit of {MAX_NODES} (image CNNs have a few thousand at most)",
                graph.node.len()
            )));
        }
        for node in &graph.node {
            let standard = node.domain.is_empty() || node.domain == "ai.onnx";
            if !standard || !onnx.op_register.0.contains_key(&node.op_type) {
                let op = if standard {
                    node.op_type.clone()
                } else {
                    format!("{}.{}", node.domain, node.op_type)
                };
                return Err(CompileError::UnsupportedOperator {
                    path: path.to_path_buf(),
                    op,
                    node: node_label(node),
                });
            }
        }
        let initializers: HashSet<&str> =
            graph.initializer.iter().map(|t| t.name.as_str()).collect();
        let inputs: Vec<&pb::ValueInfoProto> = graph
            .input
            .iter()
            .filter(|i| !initializers.contains(i.name.as_str()))
            .collect();
        let [input] = inputs[..] else {
            let names: Vec<&str> = inputs.iter().map(|i| i.name.as_str()).collect();
            return Err(invalid(format!(
                "expected exactly one image input, found {}: {names:?}",
                names.len()
            )));
        };
        let dims = input_dims(input)
            .ok_or_else(|| invalid(format!("input {:?} has no tensor shape", input.name)))?;
        let input_shape = resolve_input_shape(&input.name, &dims, input_size).map_err(invalid)?;
        let input_name = input.name.clone();
        let external_files = external_data::external_files(path, &proto)?;
        let mut hasher = Sha256::new();
        hasher.update(&bytes);
        external_data::hash_files(&external_files, &mut hasher)?;
        Ok(Backbone {
            path: path.to_path_buf(),
            external_files,
            sha256: graft_runtime::artifact::hex(&hasher.finalize()),
            proto,
            input_name,
            input_shape,
        })
    }

    /// The ONNX file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// File name of the ONNX model, without its directory.
    pub fn file_name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// The files the backbone was read from: the ONNX file, then its external-data files.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        std::iter::once(self.path.as_path()).chain(self.external_files.iter().map(PathBuf::as_path))
    }

    /// SHA-256 of the ONNX file and of its external-data files (when it has any), hex.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Name of the image input.
    pub fn input_name(&self) -> &str {
        &self.input_name
    }

    /// Input shape, `[1, 3, height, width]`.
    pub fn input_shape(&self) -> [usize; 4] {
        self.input_shape
    }

    /// Names of the graph's outputs (for a classifier, its logits).
    pub fn output_names(&self) -> Vec<String> {
        self.graph().output.iter().map(|o| o.name.clone()).collect()
    }

    /// The graph from the image input to tensor `tensor`, decluttered (no pooling: the tensor
    /// as it is).
    pub fn prefix(&self, tensor: &str) -> Result<TypedModel> {
        self.typed(&[tensor.to_string()])
            .map_err(CompileError::graph("prefix"))
    }

    /// The graph from the image input to `tensors`, BatchNormalization folded into the
    /// convolutions before it, decluttered, ceil-mode pooling made explicit.
    fn typed(&self, tensors: &[String]) -> TractResult<TypedModel> {
        let keep: HashSet<&str> = tensors.iter().map(|t| t.as_str()).collect();
        let mut proto = self.proto.clone();
        let graph = proto.graph.as_mut().expect("checked at load");
        fold_batchnorm::fold_batchnorm(graph, &keep);
        let mut model = self
            .inference_model_of(&proto)?
            .with_outputs_by_name(tensors.iter().map(|t| t.as_str()))?
            .into_typed()?
            .into_decluttered()?;
        ceil_pools::explicit_ceil_pools(&mut model)?;
        Ok(model)
    }

    /// The graph from the image input to the named tensors (its outputs, in that order),
    /// decluttered. A name that is not a tensor of the graph, or a graph tract cannot analyse
    /// up to it, is an [`CompileError::InvalidCut`].
    pub(crate) fn typed_with_outputs(&self, tensors: &[String]) -> Result<TypedModel> {
        let invalid_cut = |reason: String| CompileError::InvalidCut {
            path: self.path.clone(),
            cut: tensors.join(", "),
            reason,
        };
        let known = self.tensor_names();
        if let Some(missing) = tensors.iter().find(|t| !known.contains(t)) {
            let hint = known
                .iter()
                .rev()
                .take(8)
                .rev()
                .map(|t| t.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(CompileError::InvalidCut {
                path: self.path.clone(),
                cut: missing.clone(),
                reason: format!("no tensor of that name in the graph (the last ones are: {hint})"),
            });
        }
        self.typed(tensors)
            .map_err(|e| invalid_cut(format!("tract cannot analyse the graph up to it: {e:#}")))
    }

    /// The ONNX graph, for translating part of it.
    pub fn onnx_graph(&self) -> &pb::GraphProto {
        self.graph()
    }

    /// This backbone with its graph changed by `edit` (trained weights written back); the path
    /// and hash still name the original file, which the manifest records as the source.
    pub fn with_graph_edit(
        &self,
        edit: impl FnOnce(&mut pb::GraphProto) -> Result<()>,
    ) -> Result<Backbone> {
        let mut changed = self.clone();
        edit(changed.proto.graph.as_mut().expect("checked at load"))?;
        Ok(changed)
    }

    /// Concrete shapes of the named tensors (tract's shape inference on the whole graph).
    pub(in crate::backbone) fn tensor_shapes(&self, names: &[&str]) -> Result<Vec<Vec<usize>>> {
        let typed = self
            .inference_model()?
            .with_outputs_by_name(names.iter().copied())
            .and_then(|m| m.into_typed())
            .map_err(CompileError::graph("import"))?;
        typed
            .output_outlets()
            .map_err(CompileError::graph("import"))?
            .iter()
            .map(|&o| {
                let fact = typed
                    .outlet_fact(o)
                    .map_err(CompileError::graph("import"))?;
                Ok(fact
                    .shape
                    .as_concrete()
                    .map(|s| s.to_vec())
                    .unwrap_or_default())
            })
            .collect()
    }

    /// The whole ONNX graph as tract's inference model, input fixed to [`Self::input_shape`].
    fn inference_model(&self) -> Result<InferenceModel> {
        self.inference_model_of(&self.proto)
            .map_err(|e| CompileError::InvalidBackbone {
                path: self.path.clone(),
                reason: format!("tract cannot load it: {e:#}"),
            })
    }

    fn inference_model_of(&self, proto: &pb::ModelProto) -> TractResult<InferenceModel> {
        let model_dir = self.path.parent().and_then(|p| p.to_str());
        let mut model = tract_onnx::onnx().parse(proto, model_dir)?.model;
        model.set_input_fact(0, f32::fact(self.input_shape).into())?;
        Ok(model)
    }

    pub(in crate::backbone) fn graph(&self) -> &pb::GraphProto {
        self.proto.graph.as_ref().expect("checked at load")
    }
}

fn node_label(node: &pb::NodeProto) -> String {
    if node.name.is_empty() {
        node.output.first().cloned().unwrap_or_default()
    } else {
        node.name.clone()
    }
}

/// The input's dimensions: `Some(n)` for a fixed size, `None` for a symbolic one.
fn input_dims(input: &pb::ValueInfoProto) -> Option<Vec<Option<usize>>> {
    let type_proto::Value::TensorType(t) = input.r#type.as_ref()?.value.as_ref()?;
    let shape = t.shape.as_ref()?;
    Some(
        shape
            .dim
            .iter()
            .map(|d| match d.value {
                Some(Dim::DimValue(v)) if v > 0 => Some(v as usize),
                _ => None,
            })
            .collect(),
    )
}

fn resolve_input_shape(
    name: &str,
    dims: &[Option<usize>],
    input_size: Option<[usize; 2]>,
) -> std::result::Result<[usize; 4], String> {
    let fmt_dims = || {
        dims.iter()
            .map(|d| d.map_or("?".to_string(), |v| v.to_string()))
            .collect::<Vec<_>>()
            .join("x")
    };
    let &[_, channels, height, width] = dims else {
        return Err(format!(
            "input {name:?} has shape {}, expected NCHW images (rank 4)",
            fmt_dims()
        ));
    };
    if channels != Some(3) {
        return Err(format!(
            "input {name:?} has shape {}, expected NCHW images with 3 channels",
            fmt_dims()
        ));
    }
    let [h, w] = match (height, width, input_size) {
        (Some(h), Some(w), Some([rh, rw])) if (h, w) != (rh, rw) => {
            return Err(format!(
                "--input-size {rh}x{rw} disagrees with the model's fixed input {h}x{w}"
            ))
        }
        (Some(h), Some(w), _) => [h, w],
        (_, _, Some(size)) => size,
        _ => {
            return Err(format!(
                "input {name:?} has dynamic spatial dimensions ({}); pass --input-size HxW",
                fmt_dims()
            ))
        }
    };
    if (h as u64) * (w as u64) > MAX_INPUT_PIXELS {
        return Err(format!(
            "input {name:?} is {h}x{w}, more than graft's limit of {MAX_INPUT_PIXELS} pixels (2048x2048); ImageNet CNNs take 224 to 600"
        ));
    }
    Ok([1, 3, h, w])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_shape_resolution() {
        let fixed = [Some(1), Some(3), Some(224), Some(224)];
        assert_eq!(resolve_input_shape("x", &fixed, None), Ok([1, 3, 224, 224]));
        let dynamic_batch = [None, Some(3), Some(240), Some(240)];
        assert_eq!(
            resolve_input_shape("x", &dynamic_batch, None),
            Ok([1, 3, 240, 240])
        );
        let dynamic = [None, Some(3), None, None];
        assert_eq!(
            resolve_input_shape("x", &dynamic, None).unwrap_err(),
            "input \"x\" has dynamic spatial dimensions (?x3x?x?); pass --input-size HxW"
        );
        assert_eq!(
            resolve_input_shape("x", &dynamic, Some([96, 128])),
            Ok([1, 3, 96, 128])
        );
        let gray = [Some(1), Some(1), Some(28), Some(28)];
        assert!(resolve_input_shape("x", &gray, None)
            .unwrap_err()
            .contains("3 channels"));
        assert!(resolve_input_shape("x", &fixed, Some([96, 96])).is_err());
    }
}
