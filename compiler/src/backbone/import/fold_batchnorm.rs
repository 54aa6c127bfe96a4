//! Fold every `Conv -> BatchNormalization` pair of an ONNX graph into one Conv with a bias.
//!
//! Exports made in training mode, or with constant folding off, keep BatchNormalization as its own
//! node. tract then runs it as a per-channel Mul and Add after the convolution, which hides the
//! convolution's bias from the int8 rewrite (it quantizes a product followed by a constant bias
//! add): a MobileNetV2 export with unfolded BN had 1 of 11 layers quantized. Folded, the graph is
//! the one an inference export would have given, so int8 covers the same convolutions either way,
//! and the f32 graph does one pass over each activation less.
//!
//! The fold is exact up to f32 rounding: `w' = w * g / sqrt(v + eps)` per output channel and
//! `b' = (b - m) * g / sqrt(v + eps) + beta`. It is applied to the graph tract compiles, not to the
//! one candle fine-tunes (which trains the BN parameters themselves).

use std::collections::{HashMap, HashSet};

use tract_onnx::pb;

use super::proto::{float, float_tensor, float_values, int};

/// Folds each BatchNormalization whose input is produced by a Conv read by nothing else, unless
/// that Conv's own output is in `keep` (a tensor someone asked for by name). Returns how many
/// were folded.
pub(crate) fn fold_batchnorm(graph: &mut pb::GraphProto, keep: &HashSet<&str>) -> usize {
    let mut readers: HashMap<String, usize> = HashMap::new();
    for node in &graph.node {
        for input in &node.input {
            *readers.entry(input.clone()).or_default() += 1;
        }
    }
    for output in &graph.output {
        *readers.entry(output.name.clone()).or_default() += 1;
    }
    let producer: HashMap<String, usize> = graph
        .node
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.output.iter().map(move |o| (o.clone(), i)))
        .collect();
    let mut folds = Vec::new();
    for (bn_index, bn) in graph.node.iter().enumerate() {
        if bn.op_type != "BatchNormalization" || bn.output.len() != 1 || bn.input.len() != 5 {
            continue;
        }
        if int(bn, "training_mode", 0) != 0 {
            continue;
        }
        let x = &bn.input[0];
        let Some(&conv_index) = producer.get(x) else {
            continue;
        };
        let conv = &graph.node[conv_index];
        if conv.op_type != "Conv" || readers.get(x) != Some(&1) || keep.contains(x.as_str()) {
            continue;
        }
        if let Some(fold) = Fold::plan(graph, conv, bn) {
            folds.push((conv_index, bn_index, fold));
        }
    }
    let count = folds.len();
    let mut removed = HashSet::new();
    for (conv_index, bn_index, fold) in folds {
        let output = graph.node[bn_index].output.clone();
        let conv = &mut graph.node[conv_index];
        conv.input.truncate(1);
        conv.input.push(fold.weight.name.clone());
        conv.input.push(fold.bias.name.clone());
        conv.output = output;
        graph.initializer.push(fold.weight);
        graph.initializer.push(fold.bias);
        removed.insert(bn_index);
    }
    let mut index = 0;
    graph.node.retain(|_| {
        let keep = !removed.contains(&index);
        index += 1;
        keep
    });
    count
}

/// The new weight and bias initializers of one Conv + BN pair.
struct Fold {
    weight: pb::TensorProto,
    bias: pb::TensorProto,
}

impl Fold {
    /// `None` when a parameter is not a float initializer of the right length.
    fn plan(graph: &pb::GraphProto, conv: &pb::NodeProto, bn: &pb::NodeProto) -> Option<Fold> {
        let init = |name: &String| -> Option<(&pb::TensorProto, Vec<f32>)> {
            let t = graph.initializer.iter().find(|t| &t.name == name)?;
            Some((t, float_values(t).ok()?))
        };
        let (weight_proto, weight) = init(conv.input.get(1)?)?;
        let channels = *weight_proto.dims.first()? as usize;
        let bias = match conv.input.get(2).filter(|n| !n.is_empty()) {
            Some(name) => init(name)?.1,
            None => vec![0.0; channels],
        };
        let params: Vec<Vec<f32>> = bn.input[1..]
            .iter()
            .map(|n| init(n).map(|(_, v)| v))
            .collect::<Option<_>>()?;
        if bias.len() != channels || params.iter().any(|p| p.len() != channels) {
            return None;
        }
        let [gamma, beta, mean, var] = &params[..] else {
            return None;
        };
        let epsilon = float(bn, "epsilon", 1e-5);
        let scale: Vec<f64> = (0..channels)
            .map(|c| gamma[c] as f64 / (var[c] as f64 + epsilon).sqrt())
            .collect();
        let per_channel = weight.len() / channels.max(1);
        let folded: Vec<f32> = weight
            .iter()
            .enumerate()
            .map(|(i, &w)| (w as f64 * scale[i / per_channel]) as f32)
            .collect();
        let shift: Vec<f32> = (0..channels)
            .map(|c| ((bias[c] as f64 - mean[c] as f64) * scale[c] + beta[c] as f64) as f32)
            .collect();
        let name = &bn.output[0];
        Some(Fold {
            weight: float_tensor(
                &format!("{name}.folded_weight"),
                &weight_proto.dims,
                &folded,
            ),
            bias: float_tensor(&format!("{name}.folded_bias"), &[channels as i64], &shift),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(op: &str, inputs: &[&str], output: &str) -> pb::NodeProto {
        pb::NodeProto {
            op_type: op.into(),
            name: format!("/{output}/{op}"),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            ..Default::default()
        }
    }

    fn graph() -> pb::GraphProto {
        pb::GraphProto {
            node: vec![
                node("Conv", &["x", "w"], "c"),
                node("BatchNormalization", &["c", "g", "b", "m", "v"], "y"),
                node("Relu", &["y"], "z"),
            ],
            initializer: vec![
                float_tensor("w", &[2, 1, 1, 2], &[1.0, 2.0, 3.0, 4.0]),
                float_tensor("g", &[2], &[2.0, 0.5]),
                float_tensor("b", &[2], &[0.1, -0.1]),
                float_tensor("m", &[2], &[1.0, -1.0]),
                float_tensor("v", &[2], &[3.0, 0.0]),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn conv_then_batchnorm_becomes_one_conv() {
        let mut g = graph();
        assert_eq!(fold_batchnorm(&mut g, &HashSet::new()), 1);
        assert_eq!(g.node.len(), 2);
        let conv = &g.node[0];
        assert_eq!(conv.output, ["y"]);
        assert_eq!(conv.input, ["x", "y.folded_weight", "y.folded_bias"]);
        let value = |name: &str| {
            float_values(g.initializer.iter().find(|t| t.name == name).unwrap()).unwrap()
        };
        let s0 = 2.0 / (3.0f32 + 1e-5).sqrt();
        let s1 = 0.5 / (1e-5f32).sqrt();
        let w = value("y.folded_weight");
        let expected = [s0, 2.0 * s0, 3.0 * s1, 4.0 * s1];
        for (a, b) in w.iter().zip(expected) {
            assert!((a - b).abs() <= 1e-3 * b.abs(), "{w:?} vs {expected:?}");
        }
        let bias = value("y.folded_bias");
        assert!((bias[0] - (-s0 + 0.1)).abs() < 1e-5);
        assert!((bias[1] - (s1 - 0.1)).abs() <= 1e-3 * s1);
    }

    #[test]
    fn a_kept_or_shared_conv_output_is_not_folded() {
        let mut g = graph();
        assert_eq!(fold_batchnorm(&mut g, &HashSet::from(["c"])), 0);
        let mut g = graph();
        g.node.push(node("Relu", &["c"], "other"));
        assert_eq!(fold_batchnorm(&mut g, &HashSet::new()), 0);
        assert_eq!(g.node.len(), 4);
    }
}
