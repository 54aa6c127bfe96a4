//! Cut points: where a backbone's graph can be cut (the ends of its blocks and stages, in graph
//! order, with their shapes), its default cut before the classifier, and the blocks holding
//! weights that fine-tuning unfreezes together.

use std::collections::{HashMap, HashSet};

use tract_onnx::pb;

use super::import::{proto, Backbone};
use crate::error::{CompileError, Result};

impl Backbone {
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
    pub(in crate::backbone) fn chain_points(&self) -> Vec<(&str, &str, usize)> {
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
}
