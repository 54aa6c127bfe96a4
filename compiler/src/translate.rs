//! Translate: the trainable part of an ONNX backbone as a candle program.
//!
//! Fine-tuning retrains the top of the backbone, so that part must run forward and backward in
//! candle. [`Subgraph::extract`] takes the ONNX nodes that compute one tensor (the cut) from
//! another (the frozen/trainable boundary), turns the weights of Conv, Gemm, MatMul and
//! BatchNormalization into trainable [`Var`]s and every other initializer into a constant, and
//! refuses, naming the node, any operator or attribute it cannot train. [`Subgraph::write_back`]
//! puts the trained values back into the ONNX initializers, so the rest of the compiler (cut,
//! fold, quantize) treats a fine-tuned backbone exactly like the original.
//!
//! Depthwise convolutions (`group == channels`) are computed as a sum of shifted, strided slices
//! times per-channel weights rather than by candle's grouped conv, which runs one convolution per
//! channel; pooling is computed the same way so that its backward pass works for any kernel and
//! stride (candle's own pooling backward needs kernel == stride).

use std::collections::{HashMap, HashSet};

use candle_core::{DType, Device, Tensor, Var, D};
use tract_onnx::pb;

use crate::error::{CompileError, Result};
use crate::rng::Rng;

mod depthwise;
pub use depthwise::depthwise_conv_cpu;

/// ONNX `TensorProto.DataType` values graft reads.
const ONNX_FLOAT: i32 = 1;
const ONNX_INT64: i32 = 7;

/// A translated operator with its attributes.
#[derive(Debug, Clone, PartialEq)]
enum Op {
    Conv {
        strides: [usize; 2],
        /// Top, left, bottom, right.
        pads: [usize; 4],
        dilations: [usize; 2],
        group: usize,
    },
    BatchNorm {
        epsilon: f64,
        momentum: f64,
    },
    Relu,
    Clip,
    Sigmoid,
    HardSigmoid {
        alpha: f64,
        beta: f64,
    },
    HardSwish,
    Mul,
    Add,
    Concat {
        axis: i64,
    },
    MaxPool(Window),
    AveragePool {
        window: Window,
        count_include_pad: bool,
    },
    GlobalAveragePool,
    Flatten {
        axis: i64,
    },
    Reshape,
    Gemm {
        alpha: f64,
        beta: f64,
        trans_a: bool,
        trans_b: bool,
    },
    MatMul,
}

/// A pooling window.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Window {
    kernel: [usize; 2],
    strides: [usize; 2],
    pads: [usize; 4],
}

/// One ONNX node of the trainable part.
#[derive(Debug, Clone)]
struct Step {
    node: String,
    op: Op,
    inputs: Vec<String>,
    output: String,
}

/// A weight or statistic of the subgraph, stored in an ONNX initializer.
#[derive(Debug)]
struct Parameter {
    name: String,
    var: Var,
    /// Trained by the optimizer (weights, biases, BN scale and shift); BN running statistics are
    /// updated by the forward pass instead.
    trainable: bool,
}

/// The ONNX nodes between two tensors, runnable and trainable in candle.
#[derive(Debug)]
pub struct Subgraph {
    input: String,
    output: String,
    steps: Vec<Step>,
    parameters: Vec<Parameter>,
    constants: HashMap<String, Tensor>,
    integer_constants: HashMap<String, Vec<i64>>,
}

impl Subgraph {
    /// The nodes of `graph` that compute tensor `to` from tensor `from`, with their weights as
    /// variables of `dtype` on `device`. Every tensor they read must be `from`, an initializer,
    /// a Constant node or a tensor computed inside the subgraph: a residual connection that
    /// bypasses `from` is an error, as is an operator that cannot be trained.
    pub fn extract(
        graph: &pb::GraphProto,
        from: &str,
        to: &str,
        device: &Device,
        dtype: DType,
    ) -> Result<Subgraph> {
        let initializers: HashMap<&str, &pb::TensorProto> = graph
            .initializer
            .iter()
            .map(|t| (t.name.as_str(), t))
            .collect();
        let mut producer: HashMap<&str, usize> = HashMap::new();
        for (i, node) in graph.node.iter().enumerate() {
            for out in &node.output {
                producer.insert(out.as_str(), i);
            }
        }
        let unsupported = |node: &pb::NodeProto, why: String| CompileError::Untrainable {
            node: node_name(node),
            reason: why,
        };

        let mut downstream: HashSet<&str> = HashSet::from([from]);
        for node in &graph.node {
            if node.input.iter().any(|i| downstream.contains(i.as_str())) {
                downstream.extend(node.output.iter().map(|o| o.as_str()));
            }
        }
        let mut needed_nodes = HashSet::new();
        let mut constant_names = Vec::new();
        let mut stack = vec![to.to_string()];
        let mut seen = HashSet::new();
        let mut reaches_from = false;
        while let Some(tensor) = stack.pop() {
            if !seen.insert(tensor.clone()) {
                continue;
            }
            if tensor == from {
                reaches_from = true;
                continue;
            }
            if initializers.contains_key(tensor.as_str()) {
                constant_names.push(tensor);
                continue;
            }
            let Some(&index) = producer.get(tensor.as_str()) else {
                return Err(CompileError::Untrainable {
                    node: tensor.clone(),
                    reason: format!(
                        "the trainable part computing {to:?} reads {tensor:?}, which does not \
                         come from {from:?}: choose a boundary that every path crosses"
                    ),
                });
            };
            let node = &graph.node[index];
            if node.op_type == "Constant" {
                constant_names.push(tensor);
                continue;
            }
            if !downstream.contains(tensor.as_str()) {
                return Err(CompileError::Untrainable {
                    node: node_name(node),
                    reason: format!(
                        "the trainable part computing {to:?} reads {tensor:?}, which does not \
                         come from {from:?} (a connection that skips the boundary): choose a \
                         boundary that every path crosses"
                    ),
                });
            }
            needed_nodes.insert(index);
            stack.extend(node.input.iter().filter(|i| !i.is_empty()).cloned());
        }
        if !reaches_from {
            return Err(CompileError::Untrainable {
                node: to.to_string(),
                reason: format!("{to:?} does not depend on {from:?}"),
            });
        }

        let mut steps = Vec::new();
        for (index, node) in graph.node.iter().enumerate() {
            if !needed_nodes.contains(&index) {
                continue;
            }
            let op = translate_op(node).map_err(|why| unsupported(node, why))?;
            let inputs: Vec<String> = node.input.clone();
            let [output] = &node.output[..] else {
                return Err(unsupported(
                    node,
                    "only single-output nodes can be trained".into(),
                ));
            };
            steps.push(Step {
                node: node_name(node),
                op,
                inputs,
                output: output.clone(),
            });
        }

        let mut trainable = HashSet::new();
        let mut statistics = HashSet::new();
        for step in &steps {
            let weights: &[usize] = match step.op {
                Op::Conv { .. } | Op::Gemm { .. } => &[1, 2],
                Op::MatMul => &[1],
                Op::BatchNorm { .. } => &[1, 2],
                _ => &[],
            };
            for &i in weights {
                if let Some(name) = step.inputs.get(i).filter(|n| !n.is_empty()) {
                    trainable.insert(name.clone());
                }
            }
            if let Op::BatchNorm { .. } = step.op {
                statistics.extend(step.inputs.iter().skip(3).take(2).cloned());
            }
        }

        let mut parameters = Vec::new();
        let mut constants = HashMap::new();
        let mut integer_constants = HashMap::new();
        for name in constant_names {
            let proto =
                match initializers.get(name.as_str()) {
                    Some(t) => (*t).clone(),
                    None => constant_node_value(&graph.node[producer[name.as_str()]]).ok_or_else(
                        || CompileError::Untrainable {
                            node: name.clone(),
                            reason: "a Constant node without a tensor value".into(),
                        },
                    )?,
                };
            let dims: Vec<usize> = proto.dims.iter().map(|&d| d as usize).collect();
            match proto.data_type {
                ONNX_FLOAT => {
                    let values =
                        float_values(&proto).map_err(|reason| CompileError::Untrainable {
                            node: name.clone(),
                            reason,
                        })?;
                    let tensor = Tensor::from_vec(values, dims, device)?.to_dtype(dtype)?;
                    if trainable.contains(&name) || statistics.contains(&name) {
                        parameters.push(Parameter {
                            trainable: trainable.contains(&name),
                            name,
                            var: Var::from_tensor(&tensor)?,
                        });
                    } else {
                        constants.insert(name, tensor);
                    }
                }
                ONNX_INT64 => {
                    let values =
                        little_endian(&proto.raw_data, &proto.int64_data, i64::from_le_bytes);
                    integer_constants.insert(name, values);
                }
                other => {
                    return Err(CompileError::Untrainable {
                        node: name,
                        reason: format!(
                            "constant of ONNX data type {other} (only float and int64)"
                        ),
                    })
                }
            }
        }
        Ok(Subgraph {
            input: from.to_string(),
            output: to.to_string(),
            steps,
            parameters,
            constants,
            integer_constants,
        })
    }

    /// Name of the boundary tensor the subgraph reads.
    pub fn input_name(&self) -> &str {
        &self.input
    }

    /// Number of ONNX nodes translated.
    pub fn node_count(&self) -> usize {
        self.steps.len()
    }

    /// The variables the optimizer trains.
    pub fn trainable_vars(&self) -> Vec<Var> {
        self.parameters
            .iter()
            .filter(|p| p.trainable)
            .map(|p| p.var.clone())
            .collect()
    }

    /// Number of trainable scalar weights.
    pub fn trainable_weights(&self) -> usize {
        self.parameters
            .iter()
            .filter(|p| p.trainable)
            .map(|p| p.var.elem_count())
            .sum()
    }

    /// Copies of every parameter's current value, to restore the best epoch later.
    pub fn snapshot(&self) -> Result<Vec<Tensor>> {
        Ok(self
            .parameters
            .iter()
            .map(|p| p.var.as_tensor().copy())
            .collect::<candle_core::Result<_>>()?)
    }

    /// Sets every parameter back to a [`Self::snapshot`].
    pub fn restore(&self, snapshot: &[Tensor]) -> Result<()> {
        for (p, value) in self.parameters.iter().zip(snapshot) {
            p.var.set(value)?;
        }
        Ok(())
    }

    /// Replaces the pretrained weights by a fresh initialisation (training from scratch):
    /// He-normal conv and dense weights, zero biases, unit BN scales and zero BN shifts.
    pub fn reinitialize(&self, seed: u64) -> Result<()> {
        let mut rng = Rng::new(seed, "scratch-init");
        let roles = self.parameter_roles();
        for p in &self.parameters {
            let shape = p.var.shape().clone();
            let dims = shape.dims();
            let values: Vec<f32> = match roles.get(p.name.as_str()) {
                Some(Role::Weight) => {
                    let fan_in: usize = dims[1..].iter().product::<usize>().max(1);
                    let std = (2.0 / fan_in as f32).sqrt();
                    (0..shape.elem_count())
                        .map(|_| rng.normal() * std)
                        .collect()
                }
                Some(Role::Scale) | Some(Role::Variance) => vec![1.0; shape.elem_count()],
                _ => vec![0.0; shape.elem_count()],
            };
            let tensor =
                Tensor::from_vec(values, shape, p.var.device())?.to_dtype(p.var.dtype())?;
            p.var.set(&tensor)?;
        }
        Ok(())
    }

    fn parameter_roles(&self) -> HashMap<&str, Role> {
        let mut roles = HashMap::new();
        for step in &self.steps {
            let layout: &[Role] = match step.op {
                Op::Conv { .. } | Op::Gemm { .. } => &[Role::Input, Role::Weight, Role::Bias],
                Op::MatMul => &[Role::Input, Role::Weight],
                Op::BatchNorm { .. } => &[
                    Role::Input,
                    Role::Scale,
                    Role::Bias,
                    Role::Mean,
                    Role::Variance,
                ],
                _ => &[],
            };
            for (name, role) in step.inputs.iter().zip(layout) {
                roles.insert(name.as_str(), *role);
            }
        }
        roles
    }

    /// Runs the subgraph on a batch `[N, ...]` of boundary tensors. With `train`, batch
    /// normalization uses the batch statistics and updates its running statistics.
    pub fn forward(&self, input: &Tensor, train: bool) -> Result<Tensor> {
        let mut values: HashMap<&str, Tensor> = HashMap::new();
        values.insert(self.input.as_str(), input.clone());
        for p in &self.parameters {
            values.insert(p.name.as_str(), p.var.as_tensor().clone());
        }
        for (name, t) in &self.constants {
            values.insert(name.as_str(), t.clone());
        }
        let params: HashMap<&str, &Var> = self
            .parameters
            .iter()
            .map(|p| (p.name.as_str(), &p.var))
            .collect();
        for step in &self.steps {
            let input = |i: usize| -> Result<Tensor> {
                let name = step
                    .inputs
                    .get(i)
                    .filter(|n| !n.is_empty())
                    .ok_or_else(|| CompileError::Untrainable {
                        node: step.node.clone(),
                        reason: format!("input {i} is missing"),
                    })?;
                values
                    .get(name.as_str())
                    .cloned()
                    .ok_or_else(|| CompileError::Untrainable {
                        node: step.node.clone(),
                        reason: format!("input {name:?} is not an f32 tensor"),
                    })
            };
            let optional = |i: usize| input(i).ok();
            let out = match &step.op {
                Op::Conv {
                    strides,
                    pads,
                    dilations,
                    group,
                } => conv(
                    &input(0)?,
                    &input(1)?,
                    optional(2).as_ref(),
                    *strides,
                    *pads,
                    *dilations,
                    *group,
                )?,
                Op::BatchNorm { epsilon, momentum } => {
                    let x = input(0)?;
                    let (scale, shift) = (input(1)?, input(2)?);
                    let channel = |t: &Tensor| t.reshape((1, (), 1, 1));
                    let (mean, var) = if train {
                        let mean = x.mean_keepdim(0)?.mean_keepdim(2)?.mean_keepdim(3)?;
                        let centred = x.broadcast_sub(&mean)?;
                        let var = centred
                            .sqr()?
                            .mean_keepdim(0)?
                            .mean_keepdim(2)?
                            .mean_keepdim(3)?;
                        let stat = |i: usize, batch: &Tensor| -> Result<()> {
                            if let Some(v) = params.get(step.inputs[i].as_str()) {
                                let updated = ((v.as_tensor() * *momentum)?
                                    + (batch.detach().flatten_all()? * (1.0 - *momentum))?)?;
                                v.set(&updated)?;
                            }
                            Ok(())
                        };
                        stat(3, &mean)?;
                        stat(4, &var)?;
                        (mean, var)
                    } else {
                        (channel(&input(3)?)?, channel(&input(4)?)?)
                    };
                    x.broadcast_sub(&mean)?
                        .broadcast_div(&(var + *epsilon)?.sqrt()?)?
                        .broadcast_mul(&channel(&scale)?)?
                        .broadcast_add(&channel(&shift)?)?
                }
                Op::Relu => input(0)?.relu()?,
                Op::Clip => {
                    let mut x = input(0)?;
                    if let Some(lo) = self.scalar(step.inputs.get(1))? {
                        x = x.maximum(lo)?;
                    }
                    if let Some(hi) = self.scalar(step.inputs.get(2))? {
                        x = x.minimum(hi)?;
                    }
                    x
                }
                Op::Sigmoid => sigmoid(&input(0)?)?,
                Op::HardSigmoid { alpha, beta } => hard_sigmoid(&input(0)?, *alpha, *beta)?,
                Op::HardSwish => {
                    let x = input(0)?;
                    (&x * hard_sigmoid(&x, 1.0 / 6.0, 0.5)?)?
                }
                Op::Mul => input(0)?.broadcast_mul(&input(1)?)?,
                Op::Add => input(0)?.broadcast_add(&input(1)?)?,
                Op::Concat { axis } => {
                    let parts = (0..step.inputs.len())
                        .map(input)
                        .collect::<Result<Vec<_>>>()?;
                    let rank = parts[0].rank();
                    Tensor::cat(&parts, axis_index(*axis, rank))?
                }
                Op::MaxPool(window) => max_pool(&input(0)?, window)?,
                Op::AveragePool {
                    window,
                    count_include_pad,
                } => average_pool(&input(0)?, window, *count_include_pad)?,
                Op::GlobalAveragePool => input(0)?.mean_keepdim(3)?.mean_keepdim(2)?,
                Op::Flatten { axis } => {
                    let x = input(0)?;
                    let axis = axis_index(*axis, x.rank());
                    let outer: usize = x.dims()[..axis].iter().product();
                    x.reshape((outer, ()))?
                }
                Op::Reshape => {
                    let x = input(0)?;
                    let target = self.integer_constants.get(&step.inputs[1]).ok_or_else(|| {
                        CompileError::Untrainable {
                            node: step.node.clone(),
                            reason: "its shape is not a constant".into(),
                        }
                    })?;
                    x.reshape(reshape_target(x.dims(), target))?
                }
                Op::Gemm {
                    alpha,
                    beta,
                    trans_a,
                    trans_b,
                } => {
                    let a = input(0)?;
                    let a = if *trans_a { a.t()? } else { a };
                    let b = input(1)?;
                    let b = if *trans_b { b.t()? } else { b };
                    let mut y = (a.matmul(&b)? * *alpha)?;
                    if let Some(c) = optional(2) {
                        y = y.broadcast_add(&(c * *beta)?)?;
                    }
                    y
                }
                Op::MatMul => input(0)?.broadcast_matmul(&input(1)?)?,
            };
            values.insert(step.output.as_str(), out);
        }
        values
            .remove(self.output.as_str())
            .ok_or_else(|| CompileError::Untrainable {
                node: self.output.clone(),
                reason: "the subgraph does not compute it".into(),
            })
    }

    fn scalar(&self, name: Option<&String>) -> Result<Option<f64>> {
        let Some(name) = name.filter(|n| !n.is_empty()) else {
            return Ok(None);
        };
        let t = self
            .constants
            .get(name)
            .ok_or_else(|| CompileError::Untrainable {
                node: name.clone(),
                reason: "Clip bounds must be constants".into(),
            })?;
        Ok(Some(
            t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?[0],
        ))
    }

    /// Writes every parameter's current value into the initializer of the same name.
    pub fn write_back(&self, graph: &mut pb::GraphProto) -> Result<()> {
        let mut by_name: HashMap<&str, &Parameter> = self
            .parameters
            .iter()
            .map(|p| (p.name.as_str(), p))
            .collect();
        for init in graph.initializer.iter_mut() {
            if let Some(p) = by_name.remove(init.name.as_str()) {
                let values = p
                    .var
                    .as_tensor()
                    .flatten_all()?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?;
                init.float_data.clear();
                init.raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            }
        }
        if let Some(name) = by_name.keys().next() {
            return Err(CompileError::Untrainable {
                node: name.to_string(),
                reason: "a trained weight held by a Constant node cannot be written back".into(),
            });
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Role {
    Input,
    Weight,
    Bias,
    Scale,
    Mean,
    Variance,
}

fn node_name(node: &pb::NodeProto) -> String {
    if node.name.is_empty() {
        format!("{} -> {:?}", node.op_type, node.output)
    } else {
        node.name.clone()
    }
}

fn attribute<'a>(node: &'a pb::NodeProto, name: &str) -> Option<&'a pb::AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

fn ints(node: &pb::NodeProto, name: &str) -> Option<Vec<i64>> {
    attribute(node, name).map(|a| a.ints.clone())
}

fn int(node: &pb::NodeProto, name: &str, default: i64) -> i64 {
    attribute(node, name).map_or(default, |a| a.i)
}

fn float(node: &pb::NodeProto, name: &str, default: f32) -> f64 {
    attribute(node, name).map_or(default, |a| a.f) as f64
}

fn pair(
    values: Option<Vec<i64>>,
    default: usize,
    what: &str,
) -> std::result::Result<[usize; 2], String> {
    match values.as_deref() {
        None | Some([]) => Ok([default, default]),
        Some(&[a, b]) if a >= 0 && b >= 0 => Ok([a as usize, b as usize]),
        Some(v) => Err(format!("{what} {v:?}: only 2-D windows are supported")),
    }
}

fn pads(node: &pb::NodeProto) -> std::result::Result<[usize; 4], String> {
    if let Some(a) = attribute(node, "auto_pad") {
        let mode = String::from_utf8_lossy(&a.s);
        if mode != "NOTSET" && mode != "VALID" {
            return Err(format!(
                "auto_pad {mode} is not supported (explicit pads are)"
            ));
        }
    }
    match ints(node, "pads").as_deref() {
        None | Some([]) => Ok([0; 4]),
        Some(&[t, l, b, r]) if [t, l, b, r].iter().all(|&p| p >= 0) => {
            Ok([t as usize, l as usize, b as usize, r as usize])
        }
        Some(v) => Err(format!(
            "pads {v:?}: only 2-D non-negative pads are supported"
        )),
    }
}

fn window(node: &pb::NodeProto) -> std::result::Result<Window, String> {
    if int(node, "ceil_mode", 0) != 0 {
        return Err("ceil_mode 1 is not supported".into());
    }
    if ints(node, "dilations").is_some_and(|d| d.iter().any(|&v| v != 1)) {
        return Err("dilated pooling is not supported".into());
    }
    let kernel = pair(ints(node, "kernel_shape"), 0, "kernel_shape")?;
    if kernel.contains(&0) {
        return Err("kernel_shape is missing".into());
    }
    Ok(Window {
        kernel,
        strides: pair(ints(node, "strides"), 1, "strides")?,
        pads: pads(node)?,
    })
}

fn translate_op(node: &pb::NodeProto) -> std::result::Result<Op, String> {
    Ok(match node.op_type.as_str() {
        "Conv" => Op::Conv {
            strides: pair(ints(node, "strides"), 1, "strides")?,
            pads: pads(node)?,
            dilations: pair(ints(node, "dilations"), 1, "dilations")?,
            group: int(node, "group", 1).max(1) as usize,
        },
        "BatchNormalization" => {
            if int(node, "training_mode", 0) != 0 {
                return Err("training_mode 1 in the exported graph is not supported".into());
            }
            Op::BatchNorm {
                epsilon: float(node, "epsilon", 1e-5),
                momentum: float(node, "momentum", 0.9),
            }
        }
        "Relu" => Op::Relu,
        "Clip" => {
            if attribute(node, "min").is_some() || attribute(node, "max").is_some() {
                return Err("Clip with min/max attributes (opset < 11) is not supported".into());
            }
            Op::Clip
        }
        "Sigmoid" => Op::Sigmoid,
        "HardSigmoid" => Op::HardSigmoid {
            alpha: float(node, "alpha", 0.2),
            beta: float(node, "beta", 0.5),
        },
        "HardSwish" => Op::HardSwish,
        "Mul" => Op::Mul,
        "Add" => Op::Add,
        "Concat" => Op::Concat {
            axis: int(node, "axis", 1),
        },
        "MaxPool" => Op::MaxPool(window(node)?),
        "AveragePool" => Op::AveragePool {
            window: window(node)?,
            count_include_pad: int(node, "count_include_pad", 0) != 0,
        },
        "GlobalAveragePool" => Op::GlobalAveragePool,
        "Flatten" => Op::Flatten {
            axis: int(node, "axis", 1),
        },
        "Reshape" => Op::Reshape,
        "Gemm" => Op::Gemm {
            alpha: float(node, "alpha", 1.0),
            beta: float(node, "beta", 1.0),
            trans_a: int(node, "transA", 0) != 0,
            trans_b: int(node, "transB", 0) != 0,
        },
        "MatMul" => Op::MatMul,
        other => {
            return Err(format!(
                "operator {other} cannot be trained (graft translates Conv, BatchNormalization, \
                 Relu, Clip, Sigmoid, HardSigmoid, HardSwish, Mul, Add, Concat, MaxPool, \
                 AveragePool, GlobalAveragePool, Flatten, Reshape, Gemm, MatMul): move the \
                 boundary above it"
            ))
        }
    })
}

fn constant_node_value(node: &pb::NodeProto) -> Option<pb::TensorProto> {
    attribute(node, "value").and_then(|a| a.t.clone())
}

fn float_values(proto: &pb::TensorProto) -> std::result::Result<Vec<f32>, String> {
    if !proto.external_data.is_empty() {
        return Err("weights stored as ONNX external data cannot be trained".into());
    }
    let count: usize = proto.dims.iter().map(|&d| d as usize).product();
    let values = little_endian(&proto.raw_data, &proto.float_data, f32::from_le_bytes);
    if values.len() != count {
        return Err(format!(
            "holds {} values for dims {:?}",
            values.len(),
            proto.dims
        ));
    }
    Ok(values)
}

/// A tensor's values: from `raw_data` (little-endian bytes) when present, else the typed field.
fn little_endian<T: Clone, const N: usize>(
    raw: &[u8],
    typed: &[T],
    from_bytes: fn([u8; N]) -> T,
) -> Vec<T> {
    if raw.is_empty() {
        return typed.to_vec();
    }
    raw.chunks_exact(N)
        .map(|b| from_bytes(b.try_into().expect("chunks of N bytes")))
        .collect()
}

fn axis_index(axis: i64, rank: usize) -> usize {
    if axis < 0 {
        (rank as i64 + axis) as usize
    } else {
        axis as usize
    }
}

/// ONNX Reshape semantics, with the first dimension taken as the batch: exported graphs record
/// batch size 1, training runs larger batches.
fn reshape_target(dims: &[usize], target: &[i64]) -> Vec<usize> {
    let total: usize = dims.iter().product();
    let mut out: Vec<usize> = target
        .iter()
        .enumerate()
        .map(|(i, &t)| match t {
            0 => dims.get(i).copied().unwrap_or(1),
            t if t > 0 => t as usize,
            _ => 0,
        })
        .collect();
    if let (Some(first), Some(&batch)) = (out.first_mut(), dims.first()) {
        if target[0] == 1 && batch != 1 {
            *first = batch;
        }
    }
    if let Some(hole) = out.iter().position(|&d| d == 0) {
        let known: usize = out.iter().filter(|&&d| d != 0).product();
        out[hole] = total / known.max(1);
    }
    out
}

fn sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

fn hard_sigmoid(x: &Tensor, alpha: f64, beta: f64) -> candle_core::Result<Tensor> {
    x.affine(alpha, beta)?.clamp(0.0, 1.0)
}

/// Zero-pads the two spatial dimensions: top, left, bottom, right.
fn pad_spatial(x: &Tensor, pads: [usize; 4]) -> candle_core::Result<Tensor> {
    let [top, left, bottom, right] = pads;
    let mut x = x.clone();
    if top + bottom > 0 {
        x = x.pad_with_zeros(2, top, bottom)?;
    }
    if left + right > 0 {
        x = x.pad_with_zeros(3, left, right)?;
    }
    Ok(x)
}

/// Output size of a window sliding over `size` (already padded).
fn out_size(size: usize, kernel: usize, stride: usize, dilation: usize) -> usize {
    (size - dilation * (kernel - 1) - 1) / stride + 1
}

/// `x[:, :, offset + stride * i]` for `i < count` along `dim` (2 or 3), differentiably: a narrow,
/// then for strides above 1 a reshape that puts every stride-th element first.
fn strided(
    x: &Tensor,
    dim: usize,
    offset: usize,
    count: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    if stride == 1 {
        return x.narrow(dim, offset, count);
    }
    let available = x.dim(dim)? - offset;
    let need = stride * count;
    let mut slice = x.narrow(dim, offset, available.min(need))?;
    if available < need {
        slice = slice.pad_with_zeros(dim, 0, need - available)?;
    }
    let mut shape = slice.dims().to_vec();
    shape[dim] = count;
    shape.insert(dim + 1, stride);
    slice
        .reshape(shape)?
        .narrow(dim + 1, 0, 1)?
        .squeeze(dim + 1)
}

/// The `kernel` shifted views a window of `x` (already padded) sees, each `[N, C, OH, OW]`.
fn windows(
    x: &Tensor,
    kernel: [usize; 2],
    strides: [usize; 2],
    dilations: [usize; 2],
) -> candle_core::Result<Vec<Tensor>> {
    let (h, w) = (x.dim(2)?, x.dim(3)?);
    let oh = out_size(h, kernel[0], strides[0], dilations[0]);
    let ow = out_size(w, kernel[1], strides[1], dilations[1]);
    let mut views = Vec::with_capacity(kernel[0] * kernel[1]);
    for i in 0..kernel[0] {
        let rows = strided(x, 2, i * dilations[0], oh, strides[0])?;
        for j in 0..kernel[1] {
            views.push(strided(&rows, 3, j * dilations[1], ow, strides[1])?);
        }
    }
    Ok(views)
}

/// ONNX Conv. Depthwise convolutions (one input channel per group) use [`depthwise_conv`].
fn conv(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    strides: [usize; 2],
    pads: [usize; 4],
    dilations: [usize; 2],
    group: usize,
) -> candle_core::Result<Tensor> {
    let channels = x.dim(1)?;
    let (out_channels, _, kh, kw) = weight.dims4()?;
    let y = if group > 1 && group == channels && out_channels == channels {
        let padded = pad_spatial(x, pads)?;
        if x.device().is_cpu() && x.dtype() == DType::F32 {
            depthwise::depthwise_conv_cpu(&padded, weight, strides, dilations)?
        } else {
            depthwise_conv(&padded, weight, strides, dilations)?
        }
    } else if (kh, kw) == (1, 1) && strides == [1, 1] && pads == [0; 4] && group == 1 {
        let (n, c, h, w) = x.dims4()?;
        weight
            .reshape((out_channels, c))?
            .broadcast_matmul(&x.reshape((n, c, h * w))?)?
            .reshape((n, out_channels, h, w))?
    } else if strides[0] == strides[1]
        && dilations[0] == dilations[1]
        && pads.iter().all(|&p| p == pads[0])
    {
        x.conv2d(weight, pads[0], strides[0], dilations[0], group)?
    } else if strides[0] == strides[1] && dilations[0] == dilations[1] {
        pad_spatial(x, pads)?.conv2d(weight, 0, strides[0], dilations[0], group)?
    } else {
        return Err(candle_core::Error::Msg(format!(
            "conv with strides {strides:?} and dilations {dilations:?}: unequal strides or \
             dilations per axis are not supported"
        )));
    };
    match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
        None => Ok(y),
    }
}

/// Depthwise convolution of a padded `[N, C, H, W]` input with `[C, 1, KH, KW]` weights, as a sum
/// over kernel positions of a shifted, strided view times one weight per channel.
pub fn depthwise_conv(
    x: &Tensor,
    weight: &Tensor,
    strides: [usize; 2],
    dilations: [usize; 2],
) -> candle_core::Result<Tensor> {
    let (c, _, kh, kw) = weight.dims4()?;
    let taps = weight.reshape((c, kh * kw))?;
    let mut sum: Option<Tensor> = None;
    for (k, view) in windows(x, [kh, kw], strides, dilations)?
        .into_iter()
        .enumerate()
    {
        let w = taps.narrow(1, k, 1)?.reshape((1, c, 1, 1))?;
        let term = view.broadcast_mul(&w)?;
        sum = Some(match sum {
            Some(s) => (s + term)?,
            None => term,
        });
    }
    sum.ok_or_else(|| candle_core::Error::Msg("empty depthwise kernel".into()))
}

fn max_pool(x: &Tensor, window: &Window) -> candle_core::Result<Tensor> {
    if window.pads == [0; 4] && window.kernel == window.strides {
        return x.max_pool2d_with_stride(
            (window.kernel[0], window.kernel[1]),
            (window.strides[0], window.strides[1]),
        );
    }
    let lowest = x
        .min_keepdim(D::Minus1)?
        .min_keepdim(D::Minus2)?
        .min_keepdim(1)?
        .detach();
    let padded = pad_spatial(&x.broadcast_sub(&lowest)?, window.pads)?;
    let views = windows(&padded, window.kernel, window.strides, [1, 1])?;
    let mut out = views[0].clone();
    for v in &views[1..] {
        out = out.maximum(v)?;
    }
    out.broadcast_add(&lowest)
}

fn average_pool(
    x: &Tensor,
    window: &Window,
    count_include_pad: bool,
) -> candle_core::Result<Tensor> {
    let sum = |t: &Tensor| -> candle_core::Result<Tensor> {
        let views = windows(
            &pad_spatial(t, window.pads)?,
            window.kernel,
            window.strides,
            [1, 1],
        )?;
        let mut out = views[0].clone();
        for v in &views[1..] {
            out = (out + v)?;
        }
        Ok(out)
    };
    let area = (window.kernel[0] * window.kernel[1]) as f64;
    if count_include_pad || window.pads == [0; 4] {
        return sum(x)? / area;
    }
    let ones = Tensor::ones((1, 1, x.dim(2)?, x.dim(3)?), x.dtype(), x.device())?;
    sum(x)?.broadcast_div(&sum(&ones)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr_ints(name: &str, v: &[i64]) -> pb::AttributeProto {
        pb::AttributeProto {
            name: name.into(),
            ints: v.to_vec(),
            r#type: 7,
            ..Default::default()
        }
    }

    fn attr_int(name: &str, v: i64) -> pb::AttributeProto {
        pb::AttributeProto {
            name: name.into(),
            i: v,
            r#type: 2,
            ..Default::default()
        }
    }

    fn node(
        op: &str,
        inputs: &[&str],
        output: &str,
        attribute: Vec<pb::AttributeProto>,
    ) -> pb::NodeProto {
        pb::NodeProto {
            name: format!("{op}_{output}"),
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            attribute,
            ..Default::default()
        }
    }

    fn init(name: &str, dims: &[i64], rng: &mut Rng) -> pb::TensorProto {
        let count: i64 = dims.iter().product();
        pb::TensorProto {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: ONNX_FLOAT,
            float_data: (0..count).map(|_| rng.normal() * 0.5).collect(),
            ..Default::default()
        }
    }

    fn scalar_init(name: &str, v: f32) -> pb::TensorProto {
        pb::TensorProto {
            name: name.into(),
            data_type: ONNX_FLOAT,
            float_data: vec![v],
            ..Default::default()
        }
    }

    /// A small graph using every translated operator family: a strided, asymmetrically padded
    /// conv, BN, a depthwise conv with stride 2, ReLU6, hard-swish, sigmoid gating, a residual
    /// add, concat, both poolings with kernel != stride, global pooling, flatten and a Gemm.
    fn toy_graph() -> pb::GraphProto {
        let mut rng = Rng::new(7, "toy");
        let nodes = vec![
            node(
                "Conv",
                &["x", "w1", "b1"],
                "c1",
                vec![
                    attr_ints("pads", &[0, 1, 1, 0]),
                    attr_ints("strides", &[1, 1]),
                ],
            ),
            node(
                "BatchNormalization",
                &["c1", "g", "beta", "mean", "var"],
                "bn",
                vec![],
            ),
            node("Clip", &["bn", "zero", "six"], "r6", vec![]),
            node(
                "Conv",
                &["r6", "wd", "bd"],
                "dw",
                vec![
                    attr_ints("pads", &[1, 1, 1, 1]),
                    attr_ints("strides", &[2, 2]),
                    attr_int("group", 4),
                ],
            ),
            node("HardSwish", &["dw"], "hs", vec![]),
            node("Sigmoid", &["hs"], "sg", vec![]),
            node("Mul", &["hs", "sg"], "gated", vec![]),
            node("Add", &["gated", "hs"], "res", vec![]),
            node("Relu", &["res"], "rl", vec![]),
            node("HardSigmoid", &["res"], "hsig", vec![]),
            node("Concat", &["rl", "hsig"], "cat", vec![attr_int("axis", 1)]),
            node(
                "MaxPool",
                &["cat"],
                "mp",
                vec![
                    attr_ints("kernel_shape", &[3, 3]),
                    attr_ints("strides", &[1, 1]),
                    attr_ints("pads", &[1, 1, 1, 1]),
                ],
            ),
            node(
                "AveragePool",
                &["mp"],
                "ap",
                vec![
                    attr_ints("kernel_shape", &[2, 2]),
                    attr_ints("strides", &[1, 1]),
                ],
            ),
            node("GlobalAveragePool", &["ap"], "gap", vec![]),
            node("Flatten", &["gap"], "flat", vec![]),
            node(
                "Gemm",
                &["flat", "wg", "bg"],
                "y",
                vec![attr_int("transB", 1)],
            ),
        ];
        pb::GraphProto {
            node: nodes,
            initializer: vec![
                init("w1", &[4, 3, 3, 3], &mut rng),
                init("b1", &[4], &mut rng),
                init("g", &[4], &mut rng),
                init("beta", &[4], &mut rng),
                init("mean", &[4], &mut rng),
                pb::TensorProto {
                    name: "var".into(),
                    dims: vec![4],
                    data_type: ONNX_FLOAT,
                    float_data: vec![1.0, 0.5, 2.0, 1.5],
                    ..Default::default()
                },
                scalar_init("zero", 0.0),
                scalar_init("six", 6.0),
                init("wd", &[4, 1, 3, 3], &mut rng),
                init("bd", &[4], &mut rng),
                init("wg", &[3, 8], &mut rng),
                init("bg", &[3], &mut rng),
            ],
            ..Default::default()
        }
    }

    fn input(dtype: DType) -> Tensor {
        let mut rng = Rng::new(3, "x");
        let values: Vec<f32> = (0..2 * 3 * 7 * 7).map(|_| rng.normal()).collect();
        Tensor::from_vec(values, (2, 3, 7, 7), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    #[test]
    fn gradients_match_finite_differences() {
        let graph = toy_graph();
        let sub = Subgraph::extract(&graph, "x", "y", &Device::Cpu, DType::F64).unwrap();
        assert_eq!(sub.node_count(), 16);
        let x = input(DType::F64);
        let target = Tensor::new(&[[0.3f64, -0.2, 0.1], [1.0, 0.5, -0.5]], &Device::Cpu).unwrap();
        let loss = |s: &Subgraph| -> f64 {
            (s.forward(&x, false).unwrap() * &target)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let out = (sub.forward(&x, false).unwrap() * &target)
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = out.backward().unwrap();
        let eps = 1e-6;
        let mut checked = 0;
        for var in sub.trainable_vars() {
            let analytic = grads
                .get(&var)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let base = var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for k in (0..base.len()).step_by(5) {
                let nudge = |delta: f64| {
                    let mut v = base.clone();
                    v[k] += delta;
                    var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                        .unwrap();
                    loss(&sub)
                };
                let numeric = (nudge(eps) - nudge(-eps)) / (2.0 * eps);
                var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                let scale = numeric.abs().max(analytic[k].abs()).max(1e-3);
                assert!(
                    (numeric - analytic[k]).abs() / scale < 1e-4,
                    "gradient of element {k} of a {:?} weight: analytic {} vs numeric {numeric}",
                    var.shape(),
                    analytic[k]
                );
                checked += 1;
            }
        }
        assert!(checked > 20, "checked {checked} gradients");
    }

    #[test]
    fn depthwise_kernel_matches_shifted_slices_forward_and_backward() {
        let mut rng = Rng::new(5, "dwk");
        for (strides, dilations, size) in [
            ([1, 1], [1, 1], 9),
            ([2, 2], [1, 1], 10),
            ([2, 1], [2, 2], 11),
        ] {
            let (n, c) = (2, 3);
            let xs: Vec<f32> = (0..n * c * size * size).map(|_| rng.normal()).collect();
            let ws: Vec<f32> = (0..c * 9).map(|_| rng.normal()).collect();
            let x = Var::from_vec(xs, (n, c, size, size), &Device::Cpu).unwrap();
            let w = Var::from_vec(ws, (c, 1, 3, 3), &Device::Cpu).unwrap();
            let fast = depthwise::depthwise_conv_cpu(&x, &w, strides, dilations).unwrap();
            let slow = depthwise_conv(&x, &w, strides, dilations).unwrap();
            assert_eq!(fast.dims(), slow.dims());
            let weights = Tensor::rand(0f32, 1f32, fast.shape(), &Device::Cpu).unwrap();
            let grads = |y: &Tensor| {
                let g = (y * &weights)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                [g.get(&x).unwrap().clone(), g.get(&w).unwrap().clone()]
            };
            let max_diff = |a: &Tensor, b: &Tensor| {
                (a - b)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            };
            assert!(max_diff(&fast, &slow) < 1e-5);
            for (a, b) in grads(&fast).iter().zip(grads(&slow).iter()) {
                assert!(
                    max_diff(a, b) < 1e-4,
                    "gradients differ for strides {strides:?}"
                );
            }
        }
    }

    #[test]
    fn depthwise_and_pooling_match_direct_loops() {
        let mut rng = Rng::new(11, "dw");
        let (c, h, w) = (3, 6, 5);
        let xs: Vec<f32> = (0..c * h * w).map(|_| rng.normal()).collect();
        let ws: Vec<f32> = (0..c * 9).map(|_| rng.normal()).collect();
        let x = Tensor::from_vec(xs.clone(), (1, c, h, w), &Device::Cpu).unwrap();
        let wt = Tensor::from_vec(ws.clone(), (c, 1, 3, 3), &Device::Cpu).unwrap();
        let got = conv(&x, &wt, None, [2, 2], [1, 1, 1, 1], [1, 1], c).unwrap();
        let reference = x.conv2d(&wt, 1, 2, 1, c).unwrap();
        assert_eq!(got.dims(), reference.dims());
        let diff = (got - reference)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            diff < 1e-5,
            "depthwise differs from candle's grouped conv by {diff}"
        );

        let pooled = max_pool(
            &x,
            &Window {
                kernel: [3, 3],
                strides: [2, 2],
                pads: [1, 1, 1, 1],
            },
        )
        .unwrap();
        assert_eq!(pooled.dims(), &[1, c, 3, 3]);
        let p = pooled.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for ch in 0..c {
            for oy in 0..3 {
                for ox in 0..3 {
                    let mut best = f32::MIN;
                    for ky in 0..3 {
                        for kx in 0..3 {
                            let (y, x) = ((oy * 2 + ky) as isize - 1, (ox * 2 + kx) as isize - 1);
                            if (0..h as isize).contains(&y) && (0..w as isize).contains(&x) {
                                best = best.max(xs[ch * h * w + y as usize * w + x as usize]);
                            }
                        }
                    }
                    assert!((p[ch * 9 + oy * 3 + ox] - best).abs() < 1e-5);
                }
            }
        }
        let averaged = average_pool(
            &x,
            &Window {
                kernel: [3, 3],
                strides: [2, 2],
                pads: [1, 1, 1, 1],
            },
            false,
        )
        .unwrap();
        let a = averaged.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let corner = (xs[0] + xs[1] + xs[w] + xs[w + 1]) / 4.0;
        assert!((a[0] - corner).abs() < 1e-6);
    }

    #[test]
    fn write_back_round_trips_and_scratch_reinitializes() {
        let mut graph = toy_graph();
        let sub = Subgraph::extract(&graph, "x", "y", &Device::Cpu, DType::F32).unwrap();
        let before = sub.forward(&input(DType::F32), false).unwrap();
        sub.reinitialize(1).unwrap();
        let changed = sub.forward(&input(DType::F32), false).unwrap();
        assert!(
            (&before - &changed)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 1e-3
        );
        sub.write_back(&mut graph).unwrap();
        let reread = Subgraph::extract(&graph, "x", "y", &Device::Cpu, DType::F32).unwrap();
        let again = reread.forward(&input(DType::F32), false).unwrap();
        assert_eq!(
            changed.to_vec2::<f32>().unwrap(),
            again.to_vec2::<f32>().unwrap()
        );
    }

    #[test]
    fn untranslatable_operator_and_bypassing_boundary_are_named() {
        let mut graph = toy_graph();
        graph.node[4].op_type = "Softplus".into();
        graph.node[4].name = "Softplus_hs".into();
        let err = Subgraph::extract(&graph, "x", "y", &Device::Cpu, DType::F32).unwrap_err();
        assert!(
            err.to_string().starts_with(
                "cannot train node \"Softplus_hs\": operator Softplus cannot be trained"
            ),
            "{err}"
        );

        let graph = toy_graph();
        let sub = Subgraph::extract(&graph, "dw", "y", &Device::Cpu, DType::F32).unwrap();
        assert_eq!(sub.node_count(), 12);
        let err = Subgraph::extract(&graph, "sg", "res", &Device::Cpu, DType::F32).unwrap_err();
        assert!(
            err.to_string()
                .contains("reads \"hs\", which does not come from \"sg\""),
            "{err}"
        );
    }
}
