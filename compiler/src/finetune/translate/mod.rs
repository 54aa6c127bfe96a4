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
//! On the CPU in f32 (what training runs on), every Conv is one of graft's fused custom ops
//! ([`conv_cpu`], [`depthwise_conv_cpu`]) with the Relu or constant Clip after it folded in by
//! `fuse_activations`, so a convolution keeps one activation for the backward pass instead of
//! five. On other devices, [`conv_portable`] builds it from candle ops: depthwise convolutions
//! (`group == channels`) as a sum of shifted, strided slices times per-channel weights rather
//! than candle's grouped conv, which runs one convolution per channel. Pooling is computed from
//! the same slices so that its backward pass works for any kernel and stride (candle's own
//! pooling backward needs kernel == stride); global average pooling on the CPU is one op of
//! graft's (`global_pool.rs`), whose backward writes the spread gradient directly.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor, Var, D};
use tract_onnx::pb;

use crate::backbone::import::proto::{
    attribute, float, float_values, int, int64_values, ints, node_name, ONNX_FLOAT, ONNX_INT64,
};
use crate::error::{CompileError, Result};
use crate::util::rng::Rng;

mod activation;
mod conv;
mod depthwise;
mod depthwise_hwc;
mod global_pool;
pub use activation::Activation;
pub use conv::{conv_cpu, ConvAttrs};
pub use depthwise::depthwise_conv_cpu;

/// A translated operator with its attributes.
#[derive(Debug, Clone, PartialEq)]
enum Op {
    Conv {
        attrs: ConvAttrs,
        group: usize,
        /// The Relu or Clip that followed the node, fused into it by [`fuse_activations`].
        activation: Activation,
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
    /// Identity at inference; in training, zeroes each value with probability `ratio` and
    /// scales the rest by `1 / (1 - ratio)`.
    /// `ratio` from the attribute (opset < 12), else from input 1, else 0.5.
    Dropout {
        ratio: Option<f64>,
    },
    Identity,
    Transpose {
        perm: Vec<usize>,
    },
    LayerNorm {
        axis: i64,
        epsilon: f64,
    },
    Erf,
    Tanh,
    Gelu {
        tanh: bool,
    },
    Sub,
    Div,
    Sqrt,
    ReduceMean {
        axes: Option<Vec<i64>>,
        keepdims: bool,
    },
    /// The input's dims, as integers (shape arithmetic runs on the real batch size).
    Shape,
    Gather {
        axis: i64,
    },
    Unsqueeze {
        axes: Option<Vec<i64>>,
    },
    Squeeze {
        axes: Option<Vec<i64>>,
    },
}

/// A pooling window.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Window {
    kernel: [usize; 2],
    strides: [usize; 2],
    pads: [usize; 4],
    /// ONNX `ceil_mode`: a last, partial window at the end of each axis.
    ceil: bool,
}

impl Window {
    /// The padding for an `h x w` input: with ceil mode, the end padding grows to hold the
    /// last partial window (which must start inside the image or its leading padding).
    fn pads_for(&self, h: usize, w: usize) -> [usize; 4] {
        let mut pads = self.pads;
        if self.ceil {
            for (axis, size) in [h, w].into_iter().enumerate() {
                let (before, after) = (pads[axis], pads[axis + 2]);
                let (k, s) = (self.kernel[axis], self.strides[axis]);
                let span = (size + before + after).saturating_sub(k);
                let mut out = span.div_ceil(s) + 1;
                if (out - 1) * s >= size + before {
                    out -= 1;
                }
                pads[axis + 2] = after.max(((out - 1) * s + k).saturating_sub(size + before));
            }
        }
        pads
    }
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
    /// Relu and Clip nodes folded into the convolution before them.
    fused_activations: usize,
    /// Dropout masks' generator.
    dropout_rng: Mutex<Rng>,
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
        let index = GraphIndex::of(graph);
        let (needed_nodes, constant_names) = index.needed(from, to)?;
        let steps = steps_of(graph, &needed_nodes)?;
        let (parameters, constants, integer_constants) =
            index.load_constants(constant_names, &weight_names(&steps), (device, dtype))?;
        let onnx_nodes = steps.len();
        let steps = fuse_activations(steps, &constants, to)?;
        let fused_activations = onnx_nodes - steps.len();
        Ok(Subgraph {
            input: from.to_string(),
            output: to.to_string(),
            steps,
            parameters,
            constants,
            integer_constants,
            fused_activations,
            dropout_rng: Mutex::new(Rng::new(0, "dropout")),
        })
    }

    /// Name of the boundary tensor the subgraph reads.
    pub fn input_name(&self) -> &str {
        &self.input
    }

    /// Number of ONNX nodes translated (a fused activation counts as its own node).
    pub fn node_count(&self) -> usize {
        self.steps.len() + self.fused_activations
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
                Op::LayerNorm { .. } => &[Role::Input, Role::Scale, Role::Bias],
                _ => &[],
            };
            for (name, role) in step.inputs.iter().zip(layout) {
                roles.insert(name.as_str(), *role);
            }
        }
        roles
    }

    /// Runs the subgraph on a batch `[N, ...]` of boundary tensors. With `train`, batch
    /// normalization uses the batch statistics and updates its running statistics, and dropout
    /// drops.
    pub fn forward(&self, input: &Tensor, train: bool) -> Result<Tensor> {
        let mut env = Env {
            floats: HashMap::new(),
            ints: self
                .integer_constants
                .iter()
                .map(|(k, v)| (k.as_str(), v.clone()))
                .collect(),
        };
        env.floats.insert(self.input.as_str(), input.clone());
        for p in &self.parameters {
            env.floats
                .insert(p.name.as_str(), p.var.as_tensor().clone());
        }
        for (name, t) in &self.constants {
            env.floats.insert(name.as_str(), t.clone());
        }
        for step in &self.steps {
            match self.step(step, &env, train)? {
                Value::Float(t) => {
                    env.floats.insert(step.output.as_str(), t);
                }
                Value::Ints(v) => {
                    env.ints.insert(step.output.as_str(), v);
                }
            }
        }
        env.floats
            .remove(self.output.as_str())
            .ok_or_else(|| CompileError::Untrainable {
                node: self.output.clone(),
                reason: "the subgraph does not compute it".into(),
            })
    }

    /// One node's value, from the values computed so far.
    fn step(&self, step: &Step, env: &Env, train: bool) -> Result<Value> {
        let input = |i: usize| env.float(step, i);
        let optional = |i: usize| input(i).ok();
        let out = match &step.op {
            Op::Conv {
                attrs,
                group,
                activation,
            } => conv(
                &input(0)?,
                &input(1)?,
                optional(2).as_ref(),
                *attrs,
                *group,
                *activation,
            )?,
            Op::BatchNorm { epsilon, momentum } => {
                self.batch_norm(step, env, (*epsilon, *momentum), train)?
            }
            Op::LayerNorm { axis, epsilon } => layer_norm(
                &input(0)?,
                &input(1)?,
                optional(2).as_ref(),
                *axis,
                *epsilon,
            )?,
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
            Op::Erf => input(0)?.erf()?,
            Op::Tanh => input(0)?.tanh()?,
            Op::Sqrt => input(0)?.sqrt()?,
            Op::Gelu { tanh: false } => input(0)?.gelu_erf()?,
            Op::Gelu { tanh: true } => input(0)?.gelu()?,
            Op::Mul => input(0)?.broadcast_mul(&input(1)?)?,
            Op::Add => input(0)?.broadcast_add(&input(1)?)?,
            Op::Sub => input(0)?.broadcast_sub(&input(1)?)?,
            Op::Div => input(0)?.broadcast_div(&input(1)?)?,
            Op::Dropout { ratio } => {
                let ratio = match ratio {
                    Some(r) => *r,
                    None => self.scalar(step.inputs.get(1))?.unwrap_or(0.5),
                };
                self.dropout(input(0)?, ratio, train)?
            }
            Op::Identity => return env.value(step, 0),
            Op::MaxPool(window) => max_pool(&input(0)?, window)?,
            Op::AveragePool {
                window,
                count_include_pad,
            } => average_pool(&input(0)?, window, *count_include_pad)?,
            Op::GlobalAveragePool => global_pool::global_average_pool(&input(0)?)?,
            Op::ReduceMean { axes, keepdims } => {
                let axes = env.axes(step, axes)?;
                reduce_mean(&input(0)?, axes.as_deref(), *keepdims)?
            }
            Op::Gemm {
                alpha,
                beta,
                trans_a,
                trans_b,
            } => gemm(
                &input(0)?,
                &input(1)?,
                optional(2),
                [*alpha, *beta],
                [*trans_a, *trans_b],
            )?,
            Op::MatMul => input(0)?.broadcast_matmul(&input(1)?)?,
            Op::Transpose { perm } => input(0)?.permute(perm.clone())?,
            Op::Concat { .. }
            | Op::Flatten { .. }
            | Op::Reshape
            | Op::Shape
            | Op::Gather { .. }
            | Op::Unsqueeze { .. }
            | Op::Squeeze { .. } => return env.shape_op(step),
        };
        Ok(Value::Float(out))
    }

    /// Batch normalization: with `train`, on the batch's statistics, which also move the
    /// running statistics by `1 - momentum`; else on the running statistics.
    fn batch_norm(
        &self,
        step: &Step,
        env: &Env,
        (epsilon, momentum): (f64, f64),
        train: bool,
    ) -> Result<Tensor> {
        let input = |i: usize| env.float(step, i);
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
            for (i, batch) in [(3, &mean), (4, &var)] {
                if let Some(p) = self.parameters.iter().find(|p| p.name == step.inputs[i]) {
                    let updated = ((p.var.as_tensor() * momentum)?
                        + (batch.detach().flatten_all()? * (1.0 - momentum))?)?;
                    p.var.set(&updated)?;
                }
            }
            (mean, var)
        } else {
            (channel(&input(3)?)?, channel(&input(4)?)?)
        };
        Ok(x.broadcast_sub(&mean)?
            .broadcast_div(&(var + epsilon)?.sqrt()?)?
            .broadcast_mul(&channel(&scale)?)?
            .broadcast_add(&channel(&shift)?)?)
    }

    /// Inverted dropout with a mask from the subgraph's own seeded generator, so that training
    /// runs are repeatable.
    fn dropout(&self, x: Tensor, ratio: f64, train: bool) -> Result<Tensor> {
        if !train || ratio <= 0.0 {
            return Ok(x);
        }
        let keep = 1.0 - ratio;
        let mask: Vec<f32> = {
            let mut rng = self.dropout_rng.lock().unwrap_or_else(|e| e.into_inner());
            (0..x.elem_count())
                .map(|_| {
                    if (rng.next_f32() as f64) < keep {
                        (1.0 / keep) as f32
                    } else {
                        0.0
                    }
                })
                .collect()
        };
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        Ok((x * mask)?)
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
        Ok(Some(scalar_value(t)?))
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

/// A computed tensor: floats (candle, differentiable) or integers (shape arithmetic).
enum Value {
    Float(Tensor),
    Ints(Vec<i64>),
}

/// The tensors computed so far in one forward pass.
struct Env<'a> {
    floats: HashMap<&'a str, Tensor>,
    ints: HashMap<&'a str, Vec<i64>>,
}

impl Env<'_> {
    fn name(step: &Step, i: usize) -> Result<&str> {
        step.inputs
            .get(i)
            .filter(|n| !n.is_empty())
            .map(|n| n.as_str())
            .ok_or_else(|| CompileError::Untrainable {
                node: step.node.clone(),
                reason: format!("input {i} is missing"),
            })
    }

    /// Input `i` of `step` as a float tensor.
    fn float(&self, step: &Step, i: usize) -> Result<Tensor> {
        let name = Self::name(step, i)?;
        self.floats
            .get(name)
            .cloned()
            .ok_or_else(|| CompileError::Untrainable {
                node: step.node.clone(),
                reason: format!("input {name:?} is not an f32 tensor"),
            })
    }

    /// Input `i` of `step` as integers (a shape, axes, indices).
    fn ints(&self, step: &Step, i: usize) -> Result<Vec<i64>> {
        let name = Self::name(step, i)?;
        self.ints
            .get(name)
            .cloned()
            .ok_or_else(|| CompileError::Untrainable {
                node: step.node.clone(),
                reason: format!(
                    "input {name:?} must be integers known when the graph runs (a constant or \
                     computed from shapes)"
                ),
            })
    }

    /// Input `i` as it is, float or integers.
    fn value(&self, step: &Step, i: usize) -> Result<Value> {
        match self.float(step, i) {
            Ok(t) => Ok(Value::Float(t)),
            Err(_) => Ok(Value::Ints(self.ints(step, i)?)),
        }
    }

    /// Axes from the attribute, else from input 1 (opset 13+), else none.
    fn axes(&self, step: &Step, attribute: &Option<Vec<i64>>) -> Result<Option<Vec<i64>>> {
        Ok(match attribute {
            Some(axes) => Some(axes.clone()),
            None if step.inputs.get(1).is_some_and(|n| !n.is_empty()) => Some(self.ints(step, 1)?),
            None => None,
        })
    }

    /// Operators that move or compute shapes: on float tensors they reshape, on integer
    /// tensors (shape arithmetic, as `x.view(x.size(0), -1)` exports) they compute the values.
    fn shape_op(&self, step: &Step) -> Result<Value> {
        let integers = step
            .inputs
            .first()
            .is_some_and(|n| self.ints.contains_key(n.as_str()));
        Ok(match (&step.op, integers) {
            (Op::Shape, _) => Value::Ints(
                self.float(step, 0)?
                    .dims()
                    .iter()
                    .map(|&d| d as i64)
                    .collect(),
            ),
            (Op::Gather { axis }, true) => {
                if *axis != 0 {
                    return Err(untrainable(
                        step,
                        "Gather on integers along an axis other than 0",
                    ));
                }
                let data = self.ints(step, 0)?;
                let picked = self
                    .ints(step, 1)?
                    .iter()
                    .map(|&i| {
                        let index = if i < 0 { i + data.len() as i64 } else { i };
                        data.get(index as usize).copied()
                    })
                    .collect::<Option<Vec<i64>>>()
                    .ok_or_else(|| untrainable(step, "Gather index out of range"))?;
                Value::Ints(picked)
            }
            (Op::Unsqueeze { .. } | Op::Squeeze { .. }, true) => Value::Ints(self.ints(step, 0)?),
            (Op::Concat { .. }, true) => Value::Ints(
                (0..step.inputs.len())
                    .map(|i| self.ints(step, i))
                    .collect::<Result<Vec<_>>>()?
                    .concat(),
            ),
            (Op::Concat { axis }, false) => {
                let parts = (0..step.inputs.len())
                    .map(|i| self.float(step, i))
                    .collect::<Result<Vec<_>>>()?;
                let rank = parts[0].rank();
                Value::Float(Tensor::cat(&parts, axis_index(*axis, rank))?)
            }
            (Op::Flatten { axis }, false) => {
                let x = self.float(step, 0)?;
                let axis = axis_index(*axis, x.rank());
                let outer: usize = x.dims()[..axis].iter().product();
                Value::Float(x.reshape((outer, ()))?)
            }
            (Op::Reshape, false) => {
                let x = self.float(step, 0)?;
                let target = self.ints(step, 1)?;
                Value::Float(x.reshape(reshape_target(x.dims(), &target))?)
            }
            (Op::Unsqueeze { axes }, false) => {
                let mut x = self.float(step, 0)?;
                let mut axes = self.axes(step, axes)?.unwrap_or_default();
                let rank = (x.rank() + axes.len()) as i64;
                axes.iter_mut()
                    .for_each(|a| *a = if *a < 0 { *a + rank } else { *a });
                axes.sort_unstable();
                for a in axes {
                    x = x.unsqueeze(a as usize)?;
                }
                Value::Float(x)
            }
            (Op::Squeeze { axes }, false) => {
                let mut x = self.float(step, 0)?;
                let rank = x.rank();
                let mut axes: Vec<usize> = match self.axes(step, axes)? {
                    Some(axes) => axes.iter().map(|&a| axis_index(a, rank)).collect(),
                    None => (0..rank).filter(|&d| x.dims()[d] == 1).collect(),
                };
                axes.sort_unstable();
                for a in axes.into_iter().rev() {
                    x = x.squeeze(a)?;
                }
                Value::Float(x)
            }
            (op, _) => {
                return Err(untrainable(step, &format!("{op:?} on integer tensors")));
            }
        })
    }
}

fn untrainable(step: &Step, reason: &str) -> CompileError {
    CompileError::Untrainable {
        node: step.node.clone(),
        reason: format!("{reason} is not supported"),
    }
}

/// ONNX LayerNormalization: normalised over the dims from `axis` on, then scaled and shifted.
fn layer_norm(
    x: &Tensor,
    scale: &Tensor,
    bias: Option<&Tensor>,
    axis: i64,
    epsilon: f64,
) -> candle_core::Result<Tensor> {
    let rank = x.rank();
    let from = axis_index(axis, rank);
    let mut mean = x.clone();
    for d in (from..rank).rev() {
        mean = mean.mean_keepdim(d)?;
    }
    let centred = x.broadcast_sub(&mean)?;
    let mut var = centred.sqr()?;
    for d in (from..rank).rev() {
        var = var.mean_keepdim(d)?;
    }
    let y = centred
        .broadcast_div(&(var + epsilon)?.sqrt()?)?
        .broadcast_mul(scale)?;
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// ONNX ReduceMean over `axes` (all when none).
fn reduce_mean(x: &Tensor, axes: Option<&[i64]>, keepdims: bool) -> candle_core::Result<Tensor> {
    let rank = x.rank();
    let mut axes: Vec<usize> = match axes {
        Some(a) if !a.is_empty() => a.iter().map(|&a| axis_index(a, rank)).collect(),
        _ => (0..rank).collect(),
    };
    axes.sort_unstable();
    let mut y = x.clone();
    for &a in axes.iter().rev() {
        y = y.mean_keepdim(a)?;
    }
    if !keepdims {
        for &a in axes.iter().rev() {
            y = y.squeeze(a)?;
        }
    }
    Ok(y)
}

/// ONNX Gemm: `alpha * A' B' + beta * C`.
fn gemm(
    a: &Tensor,
    b: &Tensor,
    c: Option<Tensor>,
    [alpha, beta]: [f64; 2],
    [trans_a, trans_b]: [bool; 2],
) -> candle_core::Result<Tensor> {
    let a = if trans_a { a.t()? } else { a.clone() };
    let b = if trans_b { b.t()? } else { b.clone() };
    let mut y = (a.matmul(&b)? * alpha)?;
    if let Some(c) = c {
        y = y.broadcast_add(&(c * beta)?)?;
    }
    Ok(y)
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
        ceil: int(node, "ceil_mode", 0) != 0,
    })
}

/// An ONNX Conv, not yet fused with the activation after it.
fn conv_op(node: &pb::NodeProto) -> std::result::Result<Op, String> {
    Ok(Op::Conv {
        attrs: ConvAttrs {
            strides: pair(ints(node, "strides"), 1, "strides")?,
            pads: pads(node)?,
            dilations: pair(ints(node, "dilations"), 1, "dilations")?,
        },
        group: int(node, "group", 1).max(1) as usize,
        activation: Activation::Identity,
    })
}

fn translate_op(node: &pb::NodeProto) -> std::result::Result<Op, String> {
    Ok(match node.op_type.as_str() {
        "Conv" => conv_op(node)?,
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
        "AveragePool" => {
            let count_include_pad = int(node, "count_include_pad", 0) != 0;
            let window = window(node)?;
            if count_include_pad && window.ceil {
                return Err("ceil_mode 1 with count_include_pad 1 is not supported".into());
            }
            Op::AveragePool {
                window,
                count_include_pad,
            }
        }
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
        "Dropout" => Op::Dropout {
            ratio: attribute(node, "ratio").map(|a| a.f as f64),
        },
        "Identity" => Op::Identity,
        "Transpose" => Op::Transpose {
            perm: ints(node, "perm")
                .ok_or("Transpose without perm is not supported")?
                .iter()
                .map(|&p| p as usize)
                .collect(),
        },
        "LayerNormalization" => {
            if int(node, "stash_type", 1) != 1 || node.output.len() > 1 {
                return Err("LayerNormalization with extra outputs is not supported".into());
            }
            Op::LayerNorm {
                axis: int(node, "axis", -1),
                epsilon: float(node, "epsilon", 1e-5),
            }
        }
        "Erf" => Op::Erf,
        "Tanh" => Op::Tanh,
        "Sqrt" => Op::Sqrt,
        "Gelu" => Op::Gelu {
            tanh: attribute(node, "approximate").is_some_and(|a| a.s == b"tanh"),
        },
        "Sub" => Op::Sub,
        "Div" => Op::Div,
        "ReduceMean" => Op::ReduceMean {
            axes: ints(node, "axes"),
            keepdims: int(node, "keepdims", 1) != 0,
        },
        "Shape" => {
            if attribute(node, "start").is_some() || attribute(node, "end").is_some() {
                return Err("Shape with start/end is not supported".into());
            }
            Op::Shape
        }
        "Gather" => Op::Gather {
            axis: int(node, "axis", 0),
        },
        "Unsqueeze" => Op::Unsqueeze {
            axes: ints(node, "axes"),
        },
        "Squeeze" => Op::Squeeze {
            axes: ints(node, "axes"),
        },
        other => {
            return Err(format!(
                "operator {other} cannot be trained (graft translates Conv, BatchNormalization, \
                 LayerNormalization, Relu, Clip, Sigmoid, HardSigmoid, HardSwish, Erf, Tanh, \
                 Gelu, Sqrt, Mul, Add, Sub, Div, Concat, MaxPool, AveragePool, GlobalAveragePool, \
                 ReduceMean, Flatten, Reshape, Transpose, Shape, Gather, Unsqueeze, Squeeze, \
                 Dropout, Identity, Gemm, MatMul): move the boundary above it with \
                 --unfreeze-from or a smaller --unfreeze"
            ))
        }
    })
}

fn constant_node_value(node: &pb::NodeProto) -> Option<pb::TensorProto> {
    attribute(node, "value").and_then(|a| a.t.clone())
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

/// ONNX Conv followed by `activation`: graft's fused kernels ([`conv_cpu`],
/// [`depthwise_conv_cpu`]) for f32 on the CPU, else candle ops ([`conv_portable`]).
fn conv(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    attrs: ConvAttrs,
    group: usize,
    activation: Activation,
) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        if is_depthwise(x, weight, group)? {
            return depthwise_conv_cpu(x, weight, bias, attrs, activation);
        }
        if group == 1 {
            return conv_cpu(x, weight, bias, attrs, activation);
        }
    }
    activation.apply_tensor(conv_portable(x, weight, bias, attrs, group)?)
}

/// One input channel per group and one output channel per input channel.
fn is_depthwise(x: &Tensor, weight: &Tensor, group: usize) -> candle_core::Result<bool> {
    let channels = x.dim(1)?;
    Ok(group > 1 && group == channels && weight.dim(0)? == channels)
}

/// ONNX Conv from candle ops, which candle differentiates on any device: depthwise
/// convolutions as [`depthwise_conv`], 1x1 ones as a matrix product, the rest by `conv2d`.
pub fn conv_portable(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    attrs: ConvAttrs,
    group: usize,
) -> candle_core::Result<Tensor> {
    let ConvAttrs {
        strides,
        pads,
        dilations,
    } = attrs;
    let (out_channels, _, kh, kw) = weight.dims4()?;
    let y = if is_depthwise(x, weight, group)? {
        depthwise_conv(&pad_spatial(x, pads)?, weight, strides, dilations)?
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
    let pads = window.pads_for(x.dim(2)?, x.dim(3)?);
    if pads == [0; 4] && window.kernel == window.strides {
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
    let padded = pad_spatial(&x.broadcast_sub(&lowest)?, pads)?;
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
    let pads = window.pads_for(x.dim(2)?, x.dim(3)?);
    let sum = |t: &Tensor| -> candle_core::Result<Tensor> {
        let views = windows(
            &pad_spatial(t, pads)?,
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
    if count_include_pad || pads == [0; 4] {
        return sum(x)? / area;
    }
    let ones = Tensor::ones((1, 1, x.dim(2)?, x.dim(3)?), x.dtype(), x.device())?;
    sum(x)?.broadcast_div(&sum(&ones)?)
}

/// Where each tensor of an ONNX graph comes from: its initializers and each output's node.
struct GraphIndex<'a> {
    graph: &'a pb::GraphProto,
    initializers: HashMap<&'a str, &'a pb::TensorProto>,
    producer: HashMap<&'a str, usize>,
}

/// The float constants of a subgraph: parameters (trainable weights and BatchNorm statistics),
/// the other float constants, and the int64 ones (shapes, axes).
type Constants = (
    Vec<Parameter>,
    HashMap<String, Tensor>,
    HashMap<String, Vec<i64>>,
);

impl<'a> GraphIndex<'a> {
    fn of(graph: &'a pb::GraphProto) -> GraphIndex<'a> {
        let initializers = graph
            .initializer
            .iter()
            .map(|t| (t.name.as_str(), t))
            .collect();
        let mut producer = HashMap::new();
        for (i, node) in graph.node.iter().enumerate() {
            for out in &node.output {
                producer.insert(out.as_str(), i);
            }
        }
        GraphIndex {
            graph,
            initializers,
            producer,
        }
    }

    /// The nodes that compute `to` from `from` and the constants they read; an error when a
    /// path reaches `to` without crossing `from`.
    fn needed(&self, from: &str, to: &str) -> Result<(HashSet<usize>, Vec<String>)> {
        let graph = self.graph;
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
            if self.initializers.contains_key(tensor.as_str()) {
                constant_names.push(tensor);
                continue;
            }
            let Some(&index) = self.producer.get(tensor.as_str()) else {
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
        Ok((needed_nodes, constant_names))
    }

    /// The constants as candle tensors: the weights in `weights.0` (trainable) and `weights.1`
    /// (BatchNorm statistics) become variables.
    fn load_constants(
        &self,
        names: Vec<String>,
        (trainable, statistics): &(HashSet<String>, HashSet<String>),
        (device, dtype): (&Device, DType),
    ) -> Result<Constants> {
        let mut parameters = Vec::new();
        let mut constants = HashMap::new();
        let mut integer_constants = HashMap::new();
        for name in names {
            let proto = self.constant(&name)?;
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
                    integer_constants.insert(name, int64_values(&proto));
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
        Ok((parameters, constants, integer_constants))
    }

    /// The value of an initializer or of a Constant node's output.
    fn constant(&self, name: &str) -> Result<pb::TensorProto> {
        match self.initializers.get(name) {
            Some(t) => Ok((*t).clone()),
            None => constant_node_value(&self.graph.node[self.producer[name]]).ok_or_else(|| {
                CompileError::Untrainable {
                    node: name.to_string(),
                    reason: "a Constant node without a tensor value".into(),
                }
            }),
        }
    }
}

/// The needed nodes, in graph order, translated to candle steps.
fn steps_of(graph: &pb::GraphProto, needed_nodes: &HashSet<usize>) -> Result<Vec<Step>> {
    let unsupported = |node: &pb::NodeProto, why: String| CompileError::Untrainable {
        node: node_name(node),
        reason: why,
    };
    let mut steps = Vec::new();
    for (index, node) in graph.node.iter().enumerate() {
        if !needed_nodes.contains(&index) {
            continue;
        }
        let op = translate_op(node).map_err(|why| unsupported(node, why))?;
        let [output] = &node.output[..] else {
            return Err(unsupported(
                node,
                "only single-output nodes can be trained".into(),
            ));
        };
        steps.push(Step {
            node: node_name(node),
            op,
            inputs: node.input.clone(),
            output: output.clone(),
        });
    }
    Ok(steps)
}

/// The first value of a constant (a Clip bound), as f64.
fn scalar_value(t: &Tensor) -> candle_core::Result<f64> {
    Ok(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?[0])
}

/// Folds each Relu, and each Clip with constant bounds, that is the only reader of a Conv's
/// output into that Conv, so that the pair runs as one fused kernel and keeps one activation
/// for the backward pass instead of three.
fn fuse_activations(
    mut steps: Vec<Step>,
    constants: &HashMap<String, Tensor>,
    output: &str,
) -> Result<Vec<Step>> {
    let mut readers: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, step) in steps.iter().enumerate() {
        for input in &step.inputs {
            readers.entry(input.clone()).or_default().push(i);
        }
    }
    let bound = |name: Option<&String>, default: f32| -> Result<Option<f32>> {
        match name.filter(|n| !n.is_empty()) {
            None => Ok(Some(default)),
            Some(n) => match constants.get(n) {
                None => Ok(None),
                Some(t) => Ok(Some(scalar_value(t)? as f32)),
            },
        }
    };
    let mut removed = HashSet::new();
    for i in 0..steps.len() {
        if !matches!(steps[i].op, Op::Conv { .. }) || steps[i].output == output {
            continue;
        }
        let Some(&[j]) = readers.get(&steps[i].output).map(Vec::as_slice) else {
            continue;
        };
        let reader = &steps[j];
        if reader.inputs.first() != Some(&steps[i].output) {
            continue;
        }
        let fused = match reader.op {
            Op::Relu => Some(Activation::RELU),
            Op::Clip => match (
                bound(reader.inputs.get(1), f32::NEG_INFINITY)?,
                bound(reader.inputs.get(2), f32::INFINITY)?,
            ) {
                (Some(lo), Some(hi)) => Some(Activation::Clip { lo, hi }),
                _ => None,
            },
            _ => None,
        };
        if let (Some(fused), Op::Conv { activation, .. }) = (fused, &mut steps[i].op) {
            *activation = fused;
            steps[i].output = steps[j].output.clone();
            removed.insert(j);
        }
    }
    Ok(steps
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !removed.contains(i))
        .map(|(_, step)| step)
        .collect())
}

/// The weights the steps train (conv, dense and normalisation weights and biases) and the
/// BatchNorm running statistics they update.
fn weight_names(steps: &[Step]) -> (HashSet<String>, HashSet<String>) {
    let mut trainable = HashSet::new();
    let mut statistics = HashSet::new();
    for step in steps {
        let weights: &[usize] = match step.op {
            Op::Conv { .. } | Op::Gemm { .. } => &[1, 2],
            Op::MatMul => &[1],
            Op::BatchNorm { .. } | Op::LayerNorm { .. } => &[1, 2],
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
    (trainable, statistics)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::testing::{max_abs, max_abs_diff};

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

    /// The fused CPU kernels (convolution, depthwise; padding, bias and activation inside)
    /// against candle ops differentiated by candle, forward and all three gradients.
    #[test]
    fn fused_conv_kernels_match_candle_ops_forward_and_backward() {
        let mut rng = Rng::new(5, "fused");
        let relu6ish = Activation::Clip { lo: 0.0, hi: 1.0 };
        let (relu, identity) = (Activation::RELU, Activation::Identity);
        // [input channels, output channels, group, size, kernel], strides, pads, dilations, act
        type Case = ([usize; 5], [usize; 2], [usize; 4], [usize; 2], Activation);
        let cases: [Case; 17] = [
            ([3, 4, 1, 9, 3], [2, 2], [0, 0, 1, 1], [1, 1], relu6ish),
            ([3, 5, 1, 8, 3], [1, 1], [1, 1, 1, 1], [1, 1], relu),
            // 1x1 on planes up to 28x28: one channel-major product for the batch.
            ([4, 6, 1, 7, 1], [1, 1], [0; 4], [1, 1], identity),
            ([5, 7, 1, 6, 1], [1, 1], [0; 4], [1, 1], relu6ish),
            // Planes over 28x28: one product per image instead of one for the batch.
            ([3, 4, 1, 30, 1], [1, 1], [0; 4], [1, 1], relu6ish),
            // Over FORWARD_BLOCK outputs per image: finished in blocks of 1,024 columns.
            ([2, 64, 1, 33, 1], [1, 1], [0; 4], [1, 1], relu6ish),
            ([2, 64, 1, 34, 3], [1, 1], [1, 1, 1, 1], [1, 1], relu),
            ([4, 6, 1, 7, 1], [2, 2], [0; 4], [1, 1], relu6ish),
            // Square once padded: candle's conv2d backward takes both axes' output padding
            // from H.
            ([2, 3, 1, 11, 3], [2, 2], [2, 1, 0, 1], [2, 2], identity),
            ([3, 3, 3, 9, 3], [1, 1], [1, 1, 1, 1], [1, 1], relu6ish),
            ([3, 3, 3, 10, 3], [2, 2], [0, 0, 1, 1], [1, 1], relu),
            ([3, 3, 3, 11, 5], [2, 2], [2, 2, 2, 2], [1, 1], identity),
            ([2, 2, 2, 12, 3], [2, 1], [1, 2, 0, 1], [2, 2], relu6ish),
            ([2, 2, 2, 12, 3], [2, 2], [1, 2, 0, 1], [1, 1], relu),
            // 16 channels or more on planes up to 14x14: the channels-last kernels.
            ([16, 16, 16, 7, 3], [1, 1], [1, 1, 1, 1], [1, 1], relu6ish),
            ([24, 24, 24, 11, 5], [2, 2], [2, 2, 2, 2], [1, 1], identity),
            ([16, 16, 16, 12, 3], [2, 1], [1, 2, 0, 1], [2, 2], relu),
        ];
        for ([ci, co, group, size, k], strides, pads, dilations, act) in cases {
            let n = 2;
            let mut normal = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.normal()).collect() };
            let x = Var::from_vec(
                normal(n * ci * size * size),
                (n, ci, size, size),
                &Device::Cpu,
            )
            .unwrap();
            let w = Var::from_vec(
                normal(co * ci / group * k * k),
                (co, ci / group, k, k),
                &Device::Cpu,
            )
            .unwrap();
            let b = Var::from_vec(normal(co), co, &Device::Cpu).unwrap();
            let attrs = ConvAttrs {
                strides,
                pads,
                dilations,
            };
            let fast = conv(&x, &w, Some(&b), attrs, group, act).unwrap();
            let slow = act
                .apply_tensor(conv_portable(&x, &w, Some(&b), attrs, group).unwrap())
                .unwrap();
            assert_eq!(fast.dims(), slow.dims());
            let weights = Tensor::rand(0f32, 1f32, fast.shape(), &Device::Cpu).unwrap();
            let case = format!("{ci}->{co} group {group} k{k} strides {strides:?} pads {pads:?}");
            let grads = |y: &Tensor| {
                let g = (y * &weights).unwrap().sum_all().unwrap().backward();
                let g = g.unwrap_or_else(|e| panic!("backward failed for {case}: {e}"));
                [&x, &w, &b].map(|v| g.get(v).unwrap().clone())
            };
            assert!(max_abs_diff(&fast, &slow) < 1e-4, "outputs differ: {case}");
            for (what, (a, b)) in ["x", "w", "b"]
                .iter()
                .zip(grads(&fast).iter().zip(&grads(&slow)))
            {
                // Sums of a few thousand f32 terms, in another order than candle's: 1e-3, or
                // 1e-5 of the largest value (the bias gradient of a 64-channel 33x33 map
                // reaches about 1,000).
                let scale = max_abs(b);
                let diff = max_abs_diff(a, b);
                assert!(
                    diff < 1e-3f32.max(1e-5 * scale),
                    "d{what} differs by {diff} (largest {scale}): {case}"
                );
            }
        }
    }

    /// conv -> Clip(0, 6) and depthwise -> Relu fuse; a conv read twice does not; the fused
    /// subgraph computes what the unfused one does.
    #[test]
    fn relu_and_constant_clips_after_a_conv_are_fused_into_it() {
        let mut rng = Rng::new(9, "fuse");
        let graph = pb::GraphProto {
            node: vec![
                node("Conv", &["x", "w1", "b1"], "c1", vec![]),
                node("Clip", &["c1", "zero", "six"], "r1", vec![]),
                node("Conv", &["r1", "wd"], "dw", vec![attr_int("group", 4)]),
                node("Relu", &["dw"], "r2", vec![]),
                node("Conv", &["r2", "w3"], "c3", vec![]),
                node("Relu", &["c3"], "r3", vec![]),
                node("Add", &["r3", "c3"], "sum", vec![]),
                node("Conv", &["sum", "w3"], "out", vec![]),
            ],
            initializer: vec![
                init("w1", &[4, 3, 1, 1], &mut rng),
                init("b1", &[4], &mut rng),
                init("wd", &[4, 1, 3, 3], &mut rng),
                init("w3", &[4, 4, 1, 1], &mut rng),
                scalar_init("zero", 0.0),
                scalar_init("six", 6.0),
            ],
            ..Default::default()
        };
        let sub = Subgraph::extract(&graph, "x", "out", &Device::Cpu, DType::F32).unwrap();
        let convs: Vec<(&str, Activation)> = sub
            .steps
            .iter()
            .filter_map(|s| match s.op {
                Op::Conv { activation, .. } => Some((s.output.as_str(), activation)),
                _ => None,
            })
            .collect();
        assert_eq!(
            convs,
            [
                ("r1", Activation::Clip { lo: 0.0, hi: 6.0 }),
                ("r2", Activation::RELU),
                ("c3", Activation::Identity),
                ("out", Activation::Identity),
            ]
        );
        assert_eq!(sub.node_count(), 8, "counts the ONNX nodes, fused or not");
        let unfused = Subgraph {
            steps: steps_of(&graph, &(0..graph.node.len()).collect()).unwrap(),
            ..Subgraph::extract(&graph, "x", "out", &Device::Cpu, DType::F32).unwrap()
        };
        let x = input(DType::F32).narrow(2, 0, 5).unwrap();
        let (a, b) = (
            sub.forward(&x, false).unwrap(),
            unfused.forward(&x, false).unwrap(),
        );
        assert!(max_abs_diff(&a, &b) < 1e-5);
    }

    #[test]
    fn depthwise_and_pooling_match_direct_loops() {
        let mut rng = Rng::new(11, "dw");
        let (c, h, w) = (3, 6, 5);
        let xs: Vec<f32> = (0..c * h * w).map(|_| rng.normal()).collect();
        let ws: Vec<f32> = (0..c * 9).map(|_| rng.normal()).collect();
        let x = Tensor::from_vec(xs.clone(), (1, c, h, w), &Device::Cpu).unwrap();
        let wt = Tensor::from_vec(ws.clone(), (c, 1, 3, 3), &Device::Cpu).unwrap();
        let attrs = ConvAttrs {
            strides: [2, 2],
            pads: [1, 1, 1, 1],
            dilations: [1, 1],
        };
        let reference = x.conv2d(&wt, 1, 2, 1, c).unwrap();
        for got in [
            conv(&x, &wt, None, attrs, c, Activation::Identity).unwrap(),
            conv_portable(&x, &wt, None, attrs, c).unwrap(),
        ] {
            assert_eq!(got.dims(), reference.dims());
            let diff = max_abs_diff(&got, &reference);
            assert!(
                diff < 1e-5,
                "depthwise differs from candle's grouped conv by {diff}"
            );
        }

        let pooled = max_pool(
            &x,
            &Window {
                kernel: [3, 3],
                strides: [2, 2],
                pads: [1, 1, 1, 1],
                ceil: false,
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
                ceil: false,
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
        assert!(max_abs_diff(&before, &changed) > 1e-3);
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
            ) && err.to_string().ends_with(
                "move the boundary above it with --unfreeze-from or a smaller --unfreeze"
            ),
            "{err}"
        );
        let mut graph = toy_graph();
        graph.node[4].op_type = "AveragePool".into();
        graph.node[4].attribute = vec![
            attr_ints("kernel_shape", &[3, 3]),
            attr_int("ceil_mode", 1),
            attr_int("count_include_pad", 1),
        ];
        let err = Subgraph::extract(&graph, "x", "y", &Device::Cpu, DType::F32).unwrap_err();
        assert!(
            err.to_string()
                .contains("ceil_mode 1 with count_include_pad 1 is not supported"),
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

    /// Ceil mode adds a last, partial window, never one that starts in the end padding
    /// (SqueezeNet's 3x3/2 pooling of 111 gives 55, of 112 gives 56).
    #[test]
    fn ceil_mode_pads_the_end_for_a_last_partial_window() {
        let window = |pads: [usize; 4]| Window {
            kernel: [3, 3],
            strides: [2, 2],
            pads,
            ceil: true,
        };
        assert_eq!(window([0; 4]).pads_for(111, 112), [0, 0, 0, 1]);
        assert_eq!(window([0; 4]).pads_for(6, 7), [0, 0, 1, 0]);
        assert_eq!(window([1; 4]).pads_for(6, 7), [1, 1, 2, 1]);
        let x = Tensor::arange(0f32, 36.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 6, 6))
            .unwrap();
        let pooled = max_pool(&x, &window([0; 4])).unwrap();
        assert_eq!(pooled.dims(), &[1, 1, 3, 3]);
        let values = pooled.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(
            values,
            [14.0, 16.0, 17.0, 26.0, 28.0, 29.0, 32.0, 34.0, 35.0]
        );
    }
}
