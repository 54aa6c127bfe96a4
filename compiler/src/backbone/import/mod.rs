//! Import: read an ONNX backbone with tract-onnx, check that graft can use it, and describe it.
//!
//! Checks made here, each with an error naming the file: the file parses as ONNX; every operator
//! is one tract implements (the error names the first node that is not); there is exactly one
//! image input, NCHW with 3 channels and a known height and width (a symbolic batch dimension is
//! fixed to 1).

use std::collections::{HashMap, HashSet};
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
    path: PathBuf,
    external_files: Vec<PathBuf>,
    sha256: String,
    proto: pb::ModelProto,
    input_name: String,
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

    /// The default cut: the tensor the backbone's own classifier reads. The classifier is the
    /// last weighted node when it is a Gemm or MatMul (ResNet, VGG, MobileNet, EfficientNet), or
    /// a 1x1 Conv followed only by activation, pooling and flattening (SqueezeNet's conv
    /// classifier). A Dropout or Identity in front of it is skipped: the cut is the tensor
    /// before them.
    pub fn default_cut(&self) -> Result<String> {
        let graph = self.graph();
        let last = graph
            .node
            .iter()
            .rposition(|n| matches!(n.op_type.as_str(), "Gemm" | "MatMul" | "Conv"));
        let classifier = last.filter(|&i| {
            let node = &graph.node[i];
            node.op_type != "Conv"
                || (is_pointwise_conv(graph, node) && {
                    graph.node[i + 1..]
                        .iter()
                        .all(|n| CLASSIFIER_TAIL.contains(&n.op_type.as_str()))
                })
        });
        let Some(mut cut) = classifier.and_then(|i| graph.node[i].input.first().cloned()) else {
            return Err(CompileError::InvalidCut {
                path: self.path.clone(),
                cut: "(default)".into(),
                reason: "the graph ends in neither a Gemm/MatMul classifier nor a 1x1 Conv \
                         classifier followed by pooling; name a tensor with --cut (see graft \
                         inspect-backbone)"
                    .into(),
            });
        };
        while let Some(node) = graph
            .node
            .iter()
            .find(|n| n.output.first() == Some(&cut))
            .filter(|n| matches!(n.op_type.as_str(), "Dropout" | "Identity"))
        {
            cut = node.input[0].clone();
        }
        Ok(cut)
    }

    /// Every tensor name a cut can be made at, in graph order.
    pub fn tensor_names(&self) -> Vec<String> {
        self.graph()
            .node
            .iter()
            .flat_map(|n| n.output.iter().cloned())
            .collect()
    }

    /// The tensors the graph can be cut at as a chain: after the node producing one, no other
    /// tensor computed from the image is still needed. Of each run of such tensors with one shape,
    /// the last is kept, and so is every residual `Add`: the ends of blocks and stages, in graph
    /// order, with their shapes.
    pub fn cut_points(&self) -> Result<Vec<CutPoint>> {
        let count = self.graph().node.len().max(1) as f32;
        // A Dropout's output is its input at inference: the cut is listed before it.
        let chain: Vec<(&str, &str, f32)> = self
            .chain_points()
            .into_iter()
            .filter(|&(_, op, _)| op != "Dropout")
            .map(|(tensor, op, index)| (tensor, op, (index + 1) as f32 / count))
            .collect();
        let names: Vec<&str> = chain.iter().map(|c| c.0).collect();
        let shapes = self.tensor_shapes(&names)?;
        let mut points = Vec::new();
        for (k, (&(tensor, op, depth), shape)) in chain.iter().zip(&shapes).enumerate() {
            let stage_end = shapes.get(k + 1).is_none_or(|next| next != shape);
            if stage_end || op == "Add" {
                points.push(CutPoint {
                    tensor: tensor.to_string(),
                    op: op.to_string(),
                    shape: shape.clone(),
                    depth,
                });
            }
        }
        Ok(points)
    }

    /// Tensors after whose producing node (by index) no other tensor computed from the image is
    /// still needed: the places a graph can be split into two chained parts.
    fn chain_points(&self) -> Vec<(&str, &str, usize)> {
        let graph = self.graph();
        let initializers: HashSet<&str> =
            graph.initializer.iter().map(|t| t.name.as_str()).collect();
        let mut consumers: HashMap<&str, usize> = HashMap::new();
        for node in &graph.node {
            for input in &node.input {
                if !input.is_empty() && !initializers.contains(input.as_str()) {
                    *consumers.entry(input.as_str()).or_default() += 1;
                }
            }
        }
        for output in &graph.output {
            *consumers.entry(output.name.as_str()).or_default() += 1;
        }
        let mut live: HashSet<&str> = HashSet::from([self.input_name.as_str()]);
        let mut chain: Vec<(&str, &str, usize)> = Vec::new();
        for (i, node) in graph.node.iter().enumerate() {
            for input in &node.input {
                if let Some(n) = consumers.get_mut(input.as_str()) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        live.remove(input.as_str());
                    }
                }
            }
            if node.op_type == "Constant" {
                continue;
            }
            for output in &node.output {
                if consumers.get(output.as_str()).copied().unwrap_or(0) > 0 {
                    live.insert(output.as_str());
                }
            }
            if let ([only], [output]) = (&live.iter().collect::<Vec<_>>()[..], &node.output[..]) {
                if **only == output.as_str() {
                    chain.push((output.as_str(), node.op_type.as_str(), i));
                }
            }
        }
        chain
    }

    /// The blocks holding weights (Conv, Gemm, MatMul, BatchNormalization) before tensor `cut`,
    /// in graph order. A node's block is its name up to the first numbered path segment
    /// (`/_blocks.15/_expand_conv/Conv` is in `/_blocks.15`, `/layer4/layer4.1/conv1/Conv` in
    /// `/layer4/layer4.1`), or its first segment (`/_conv_head/Conv` is in `/_conv_head`); when
    /// names say nothing, each weighted node is a block of its own.
    pub fn blocks(&self, cut: &str) -> Vec<Block> {
        let graph = self.graph();
        let end = graph
            .node
            .iter()
            .position(|n| n.output.iter().any(|o| o == cut))
            .map_or(graph.node.len(), |i| i + 1);
        let weighted = |n: &pb::NodeProto| {
            matches!(
                n.op_type.as_str(),
                "Conv" | "Gemm" | "MatMul" | "BatchNormalization"
            )
        };
        let mut blocks: Vec<Block> = Vec::new();
        for (index, node) in graph.node[..end].iter().enumerate() {
            if !weighted(node) {
                continue;
            }
            let name =
                block_name(&node.name).unwrap_or_else(|| format!("{} #{index}", node.op_type));
            match blocks.iter_mut().find(|b| b.name == name) {
                Some(block) => block.nodes += 1,
                None => blocks.push(Block {
                    name,
                    first_node: index,
                    nodes: 1,
                }),
            }
        }
        if blocks.len() == 1 && blocks[0].nodes > 1 {
            return graph.node[..end]
                .iter()
                .enumerate()
                .filter(|(_, n)| weighted(n))
                .map(|(index, n)| Block {
                    name: format!("{} #{index}", n.op_type),
                    first_node: index,
                    nodes: 1,
                })
                .collect();
        }
        blocks
    }

    /// The last tensor before node `first_node` that the graph can be split at (see
    /// [`Self::cut_points`]), or the image input.
    pub fn boundary_before(&self, first_node: usize) -> String {
        self.chain_points()
            .into_iter()
            .filter(|&(_, _, index)| index < first_node)
            .map(|(tensor, _, _)| tensor.to_string())
            .next_back()
            .unwrap_or_else(|| self.input_name.clone())
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
    fn tensor_shapes(&self, names: &[&str]) -> Result<Vec<Vec<usize>>> {
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

    fn graph(&self) -> &pb::GraphProto {
        self.proto.graph.as_ref().expect("checked at load")
    }
}

/// A group of weighted nodes that fine-tuning unfreezes together (see [`Backbone::blocks`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Block {
    /// Name shared by its nodes (`/_blocks.15`).
    pub name: String,
    /// Index of its first weighted node in the ONNX graph.
    pub first_node: usize,
    /// Weighted nodes in it.
    pub nodes: usize,
}

/// Block of a node named like a path (PyTorch exports name nodes after their modules):
/// 1. up to a segment ending in a digit and one letter (GoogLeNet's `/inception4a`, Inception's
///    `Mixed_5b`: modules whose branches are numbered inside them);
/// 2. else up to the first numbered segment (`/_blocks.15`, `/layer4/layer4.1`,
///    `/features/features.3`);
/// 3. else up to the deepest segment ending in a digit, above the operator's own module
///    (DenseNet's `/features/denseblock1/denselayer2`, `/features/transition1`);
/// 4. else the first segment (`/_conv_head`).
fn block_name(node: &str) -> Option<String> {
    let segments: Vec<&str> = node.trim_start_matches('/').split('/').collect();
    if segments.len() < 2 {
        return None;
    }
    let parents = &segments[..segments.len() - 1];
    let lettered = |s: &&str| {
        let b = s.as_bytes();
        b.len() >= 2 && b[b.len() - 1].is_ascii_lowercase() && b[b.len() - 2].is_ascii_digit()
    };
    let numbered = |s: &&str| {
        let tail_digits = s
            .rsplit(['.', '_'])
            .next()
            .is_some_and(|tail| !tail.is_empty() && tail.bytes().all(|b| b.is_ascii_digit()));
        (tail_digits && s.contains('.')) || s.bytes().all(|b| b.is_ascii_digit())
    };
    let ends_in_digit = |s: &&str| s.bytes().last().is_some_and(|b| b.is_ascii_digit());
    let above_module = &parents[..parents.len().saturating_sub(1)];
    let depth = parents
        .iter()
        .position(lettered)
        .or_else(|| parents.iter().position(numbered))
        .or_else(|| above_module.iter().rposition(ends_in_digit))
        .map_or(1, |i| i + 1);
    Some(format!("/{}", parents[..depth].join("/")))
}

/// A tensor the backbone can be cut at (see [`Backbone::cut_points`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CutPoint {
    /// ONNX tensor name, for `--cut`.
    pub tensor: String,
    /// Operator producing it.
    pub op: String,
    /// Its shape (`[1, C, H, W]` maps are global-average-pooled to `C` features).
    pub shape: Vec<usize>,
    /// Position in the graph, 0 (input) to 1 (output), by node count.
    pub depth: f32,
}

/// Operators that may follow a 1x1 Conv classifier: activation, pooling, flattening.
const CLASSIFIER_TAIL: &[&str] = &[
    "Relu",
    "Dropout",
    "Identity",
    "GlobalAveragePool",
    "ReduceMean",
    "AveragePool",
    "Flatten",
    "Reshape",
    "Squeeze",
    "Softmax",
    "LogSoftmax",
    "Shape",
    "Gather",
    "Unsqueeze",
    "Concat",
    "Constant",
];

/// Whether `node` is a Conv with a 1x1 kernel (from its attribute or its weight's dims).
fn is_pointwise_conv(graph: &pb::GraphProto, node: &pb::NodeProto) -> bool {
    if let Some(kernel) = proto::ints(node, "kernel_shape") {
        return kernel.iter().all(|&k| k == 1);
    }
    node.input
        .get(1)
        .and_then(|w| graph.initializer.iter().find(|t| &t.name == w))
        .is_some_and(|w| w.dims.len() == 4 && w.dims[2] == 1 && w.dims[3] == 1)
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
    fn block_names_follow_numbered_path_segments() {
        assert_eq!(
            block_name("/_blocks.15/_project_conv/Conv").as_deref(),
            Some("/_blocks.15")
        );
        assert_eq!(
            block_name("/layer4/layer4.1/conv1/Conv").as_deref(),
            Some("/layer4/layer4.1")
        );
        assert_eq!(
            block_name("/features/features.3/conv/conv.0/conv.0.0/Conv").as_deref(),
            Some("/features/features.3")
        );
        assert_eq!(
            block_name("/features/3/conv/0/Conv").as_deref(),
            Some("/features/3")
        );
        assert_eq!(
            block_name("/_conv_head/Conv").as_deref(),
            Some("/_conv_head")
        );
        assert_eq!(block_name("/_swish_1/Clip").as_deref(), Some("/_swish_1"));
        assert_eq!(
            block_name("/inception4a/branch2/branch2.0/conv/Conv").as_deref(),
            Some("/inception4a")
        );
        assert_eq!(
            block_name("/features/denseblock1/denselayer2/conv1/Conv").as_deref(),
            Some("/features/denseblock1/denselayer2")
        );
        assert_eq!(
            block_name("/features/transition1/conv/Conv").as_deref(),
            Some("/features/transition1")
        );
        assert_eq!(block_name("/conv1/Conv").as_deref(), Some("/conv1"));
        assert_eq!(block_name("Conv_12"), None);
    }

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
