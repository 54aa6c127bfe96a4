//! Quantize: static post-training int8 quantization of the folded graph, as one graph rewrite.
//!
//! [`calibrate`] runs the f32 graph on sample images and records the range of every activation
//! ([`calibration`]). [`quantize`] then rebuilds the graph with the chosen convolutions and pointwise (1x1) matrix
//! products in int8: weights symmetric per tensor or per output channel, activations asymmetric
//! per tensor from the calibrated range. A ReLU6 (`max(x, 0)` then `min(x, 6)`) after a quantized layer is absorbed
//! into the output range, which clamps exactly as the activation did. Quantized layers that feed
//! each other exchange int8 tensors directly; everything else (residual adds, pooling, the head)
//! stays f32 and reads the int8 tensors through a dequantizing cast.
//!
//! tract runs such convolutions with its integer matrix-multiply kernels, and writes them to NNEF
//! as ordinary `conv` / `tract_core_einsum_q` with a `graph.quant` file carrying the scales.
//!
//! [`simulate`] is the same rewrite with every quantized layer computed in f32 on int8-rounded
//! values (weights, bias, input and output go through the same quantizing casts): it runs at f32
//! speed where tract's int8 kernels are slow, which is what lets [`search`] try calibration
//! methods and per-layer fallbacks against the images held out of training for choices.

pub mod calibration;
mod pointwise;
pub mod search;

pub use calibration::{calibrate, ActivationRanges, Calibration, CalibrationMethod, Range};

use std::collections::HashMap;

use graft_runtime::artifact::LayerPrecision;
use graft_runtime::weights::to_int8;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::axes::AxesMapping;
use tract_onnx::tract_core::internal::TractErrorContext;
use tract_onnx::tract_core::ops::array::TypedConcat;
use tract_onnx::tract_core::ops::cast::cast;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat};
use tract_onnx::tract_core::ops::einsum::EinSum;

use crate::error::{CompileError, Result};
use crate::fold::HEAD_NODE_PREFIX;
use pointwise::{weights_oi, Layout};

/// Which layers [`quantize`] turns to int8.
#[derive(Debug, Clone, Default)]
pub struct QuantizeConfig {
    /// Quantize depthwise convolutions too (tract has no int8 depthwise kernel: they run through
    /// im2col and an int8 matrix product).
    pub depthwise: bool,
    /// Layers (by node name) kept in f32 whatever their kind.
    pub keep_f32: Vec<String>,
    /// One weight scale per output channel (a convolution is then written as one convolution
    /// per output channel and a concatenation, which NNEF can carry; those with more than
    /// [`MAX_PER_CHANNEL_CONV_OUTPUTS`] keep one scale).
    pub per_channel: bool,
}

/// A quantizable layer of the f32 graph.
#[derive(Debug, Clone)]
struct Candidate {
    kind: &'static str,
    /// The node doing the product (Conv or EinSum).
    node: usize,
    /// The constant bias added after an EinSum (Conv carries its own), if any.
    bias_add: Option<usize>,
    /// Absorbed activation nodes, in order.
    activation: Vec<usize>,
    /// For a pointwise product, how its axes map to `[O, K] x [K, P]`.
    layout: Option<Layout>,
}

impl Candidate {
    /// The outlet whose value the quantized layer produces.
    fn output(&self) -> OutletId {
        let last = self
            .activation
            .last()
            .or(self.bias_add.as_ref())
            .unwrap_or(&self.node);
        OutletId::new(*last, 0)
    }
}

fn const_of(model: &TypedModel, outlet: OutletId) -> Option<Arc<Tensor>> {
    model.outlet_fact(outlet).ok()?.konst.clone()
}

fn single_successor(model: &TypedModel, node: usize) -> Option<&TypedNode> {
    let outputs = &model.node(node).outputs;
    if outputs.len() != 1 || outputs[0].successors.len() != 1 {
        return None;
    }
    if model
        .output_outlets()
        .ok()?
        .contains(&OutletId::new(node, 0))
    {
        return None;
    }
    Some(model.node(outputs[0].successors[0].node))
}

/// A binary op `name` between the previous wire and a one-value constant; returns the constant.
fn scalar_binary(model: &TypedModel, node: &TypedNode, name: &str, from: usize) -> Option<f32> {
    if node.op.name() != name || node.inputs.len() != 2 {
        return None;
    }
    let other = node.inputs.iter().find(|i| i.node != from)?;
    let konst = const_of(model, *other)?;
    (konst.len() == 1)
        .then(|| konst.cast_to_scalar::<f32>().ok())
        .flatten()
}

fn absorbed_activation(model: &TypedModel, after: usize) -> Vec<usize> {
    let Some(max) = single_successor(model, after) else {
        return vec![];
    };
    if scalar_binary(model, max, "Max", after) != Some(0.0) {
        return vec![];
    }
    match single_successor(model, max.id) {
        Some(min) if scalar_binary(model, min, "Min", max.id).is_some_and(|v| v > 0.0) => {
            vec![max.id, min.id]
        }
        _ => vec![max.id],
    }
}

fn candidates(model: &TypedModel) -> TractResult<Vec<Candidate>> {
    let mut found = vec![];
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(&first) = node.inputs.first() else {
            continue;
        };
        if model.outlet_fact(first)?.datum_type != f32::datum_type() {
            continue;
        }
        if let Some(conv) = node.op_as::<Conv>() {
            if conv.q_params.is_some()
                || conv.kernel_fmt != KernelFormat::OIHW
                || node.inputs.len() != 3
                || const_of(model, node.inputs[1]).is_none()
                || const_of(model, node.inputs[2]).is_none()
            {
                continue;
            }
            let kind = if conv.group == 1 { "conv" } else { "depthwise" };
            found.push(Candidate {
                kind,
                node: id,
                bias_add: None,
                activation: absorbed_activation(model, id),
                layout: None,
            });
        } else if let Some(einsum) = node.op_as::<EinSum>() {
            // A 1x1 convolution after tract's declutter: constant weights times activations in
            // one of the layouts `pointwise::Layout` recognises, then a constant bias. The
            // trained head stays f32: its outputs are the logits, and it is tiny.
            if einsum.q_params.is_some()
                || node.inputs.len() != 2
                || node.name.starts_with(HEAD_NODE_PREFIX)
            {
                continue;
            }
            let Some(weight) = const_of(model, node.inputs[1]) else {
                continue;
            };
            let x_shape = model
                .outlet_fact(node.inputs[0])?
                .shape
                .as_concrete()
                .map(|s| s.to_vec());
            let y_shape = node.outputs[0].fact.shape.as_concrete().map(|s| s.to_vec());
            let (Some(x_shape), Some(y_shape)) = (x_shape, y_shape) else {
                continue;
            };
            let Some(layout) = Layout::of(einsum, &x_shape, &y_shape) else {
                continue;
            };
            let out_channels = weight.shape()[usize::from(layout.weights_transposed)];
            let Some(add) = single_successor(model, id) else {
                continue;
            };
            if add.op.name() != "Add" {
                continue;
            }
            let other = add.inputs.iter().find(|i| i.node != id).copied();
            let Some(bias) = other.and_then(|o| const_of(model, o)) else {
                continue;
            };
            if bias.len() != out_channels {
                continue;
            }
            found.push(Candidate {
                kind: "pointwise",
                node: id,
                bias_add: Some(add.id),
                activation: absorbed_activation(model, add.id),
                layout: Some(layout),
            });
        }
    }
    Ok(found)
}

/// Multiply-adds of one run of node `id` when it is a product layer: a convolution, or a
/// matrix product (`EinSum`) with a constant operand. `None` for any other node.
fn product_macs(model: &TypedModel, id: usize) -> TractResult<Option<u64>> {
    let node = model.node(id);
    let Some(output) = node.outputs[0].fact.shape.as_concrete() else {
        return Ok(None);
    };
    let outputs: usize = output.iter().product();
    if let Some(conv) = node.op_as::<Conv>() {
        let Some(weights) = node.inputs.get(1).and_then(|&w| const_of(model, w)) else {
            return Ok(None);
        };
        let per_output = weights.len() / conv.pool_spec.output_channels.max(1);
        return Ok(Some((outputs * per_output) as u64));
    }
    let Some(einsum) = node.op_as::<EinSum>() else {
        return Ok(None);
    };
    if !node
        .inputs
        .iter()
        .take(2)
        .any(|&i| const_of(model, i).is_some())
    {
        return Ok(None);
    }
    let facts = model.node_input_facts(id)?;
    let mut space = 1usize;
    for axis in einsum.axes.iter_all_axes() {
        let size = axis
            .inputs
            .iter()
            .enumerate()
            .find_map(|(slot, positions)| {
                let position = *positions.first()?;
                facts.get(slot)?.shape.as_concrete()?.get(position).copied()
            });
        space *= size.unwrap_or(1);
    }
    Ok(Some(space as u64))
}

/// Multiply-adds of one image through every product layer of `model` (convolutions and matrix
/// products with constant weights), whether [`plan`] can quantize them or not: the denominator
/// of the int8 coverage the artifact reports.
pub fn total_product_macs(model: &TypedModel) -> Result<u64> {
    let mut total = 0;
    for id in 0..model.nodes().len() {
        total += product_macs(model, id)
            .map_err(CompileError::graph("quantize"))?
            .unwrap_or(0);
    }
    Ok(total)
}

/// Every quantizable layer of `model`, with the precision `config` gives it.
pub fn plan(model: &TypedModel, config: &QuantizeConfig) -> Result<Vec<LayerPrecision>> {
    let found = candidates(model).map_err(CompileError::graph("quantize"))?;
    found
        .iter()
        .map(|c| -> Result<LayerPrecision> {
            Ok(LayerPrecision {
                layer: model.node(c.node).name.clone(),
                kind: c.kind.to_string(),
                precision: if chosen(model, c, config) {
                    "int8"
                } else {
                    "f32"
                }
                .to_string(),
                reason: None,
                timed_ms: None,
                macs: product_macs(model, c.node).map_err(CompileError::graph("quantize"))?,
            })
        })
        .collect()
}

fn chosen(model: &TypedModel, candidate: &Candidate, config: &QuantizeConfig) -> bool {
    (candidate.kind != "depthwise" || config.depthwise)
        && !config
            .keep_f32
            .iter()
            .any(|name| *name == model.node(candidate.node).name)
}

fn scalar_i32(model: &mut TypedModel, name: String, v: i32) -> TractResult<OutletId> {
    model.add_const(name, tensor0(v))
}

fn scalar_f32(model: &mut TypedModel, name: String, v: f32) -> TractResult<OutletId> {
    model.add_const(name, tensor0(v))
}

/// How long one quantizable layer takes alone on this machine (one thread, best of several runs).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerTiming {
    /// Node name.
    pub layer: String,
    /// The layer in f32 (product, bias, activation), in milliseconds.
    pub f32_ms: f64,
    /// The layer in int8 with the casts at its boundaries, in milliseconds.
    pub int8_ms: f64,
}

/// The single-layer graph of `candidate`: its input as the source, its product, bias and
/// activation, its output; and the ranges of that input and output in the new graph.
fn layer_alone(
    model: &TypedModel,
    candidate: &Candidate,
    ranges: &ActivationRanges,
) -> TractResult<(TypedModel, ActivationRanges)> {
    let mut alone = TypedModel::default();
    let input = model.node(candidate.node).inputs[0];
    let source = alone.add_source("x", model.outlet_fact(input)?.clone())?;
    let mut wires: HashMap<OutletId, OutletId> = HashMap::from([(input, source)]);
    let nodes = std::iter::once(candidate.node)
        .chain(candidate.bias_add)
        .chain(candidate.activation.iter().copied());
    for id in nodes {
        let node = model.node(id);
        let mut inputs = tvec![];
        for (ix, outlet) in node.inputs.iter().enumerate() {
            let wire = match wires.get(outlet) {
                Some(wire) => *wire,
                None => {
                    let konst = const_of(model, *outlet).context("a non-constant side input")?;
                    alone.add_const(format!("{}.{ix}", node.name), konst)?
                }
            };
            inputs.push(wire);
        }
        let output = alone.wire_node(&node.name, node.op.clone(), &inputs)?[0];
        wires.insert(OutletId::new(id, 0), output);
    }
    let output = wires[&candidate.output()];
    alone.select_output_outlets(&[output])?;
    let range = |outlet| {
        ranges
            .range(outlet)
            .with_context(|| format!("no calibrated range for {:?}", model.node(outlet.node).name))
    };
    let alone_ranges = ActivationRanges::from_ranges([
        (source, range(input)?),
        (output, range(candidate.output())?),
    ]);
    Ok((alone, alone_ranges))
}

/// Best of `runs` timed runs of `model` on zeros, after two untimed ones, in milliseconds.
fn best_time(model: TypedModel, runs: usize) -> TractResult<f64> {
    let input = model
        .input_fact(0)?
        .shape
        .as_concrete()
        .context("fixed input shape")?
        .to_vec();
    let input = Tensor::zero::<f32>(&input)?;
    let plan = graft_runtime::kernels::into_optimized(model)?.into_runnable()?;
    let mut best = f64::INFINITY;
    for run in 0..runs + 2 {
        let started = std::time::Instant::now();
        plan.run(tvec![input.clone().into()])?;
        if run >= 2 {
            best = best.min(started.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(best)
}

/// Times every layer `config` puts in int8, alone, in f32 and in int8 (with the casts at its
/// boundaries), on this machine: how [`QuantizeConfig::keep_f32`] can be extended with the
/// layers tract runs slower in int8 here.
pub fn time_layers(
    model: &TypedModel,
    ranges: &ActivationRanges,
    config: &QuantizeConfig,
    runs: usize,
) -> Result<Vec<LayerTiming>> {
    let timings = || -> TractResult<Vec<LayerTiming>> {
        let mut timings = vec![];
        for candidate in candidates(model)?
            .iter()
            .filter(|c| chosen(model, c, config))
        {
            let (alone, alone_ranges) = layer_alone(model, candidate, ranges)?;
            let everything = QuantizeConfig {
                depthwise: true,
                keep_f32: vec![],
                per_channel: config.per_channel,
            };
            let int8 = rewrite(&alone, &alone_ranges, &everything, false)
                .map_err(|e| TractError::msg(e.to_string()))?;
            timings.push(LayerTiming {
                layer: model.node(candidate.node).name.clone(),
                f32_ms: best_time(alone, runs)?,
                int8_ms: best_time(int8, runs)?,
            });
        }
        Ok(timings)
    };
    timings().map_err(CompileError::graph("time layers"))
}

/// Symmetric int8 weights, one scale for the tensor or one per output channel (axis 0):
/// `(quantized, scales)`.
fn quantize_weights(weights: &Tensor, per_channel: bool) -> TractResult<(Tensor, Vec<f32>)> {
    let view = weights.view();
    let values = view.as_slice::<f32>()?;
    let rows = if per_channel { weights.shape()[0] } else { 1 };
    let per_row = values.len() / rows.max(1);
    let mut quantized = Vec::with_capacity(values.len());
    let mut scales = Vec::with_capacity(rows);
    for row in values.chunks(per_row.max(1)) {
        let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = (max / 127.0).max(f32::EPSILON);
        quantized.extend(row.iter().map(|&w| to_int8(w, scale)));
        scales.push(scale);
    }
    Ok((Tensor::from_shape(weights.shape(), &quantized)?, scales))
}

fn quantized_bias(
    bias: &Tensor,
    x_scale: f32,
    k_scales: &[f32],
    len: usize,
) -> TractResult<Tensor> {
    let bias = bias.cast_to::<f32>()?;
    let view = bias.view();
    let values = view.as_slice::<f32>()?;
    let ints: Vec<i32> = (0..len)
        .map(|i| {
            let b = values[if values.len() == 1 { 0 } else { i }];
            let scale = x_scale * k_scales[if k_scales.len() == 1 { 0 } else { i }];
            (b / scale).round().clamp(i32::MIN as f32, i32::MAX as f32) as i32
        })
        .collect();
    Ok(tensor1(&ints))
}

/// Wires in a rebuilt graph: the f32 value of every old outlet, and its int8 twin when a
/// quantized layer produced it or a quantizing cast was already made.
struct Rebuild<'a> {
    old: &'a TypedModel,
    new: TypedModel,
    ranges: &'a ActivationRanges,
    simulate: bool,
    f32_wire: HashMap<OutletId, OutletId>,
    int8_wire: HashMap<OutletId, OutletId>,
    per_channel: bool,
}

impl Rebuild<'_> {
    fn qparams(&self, old: OutletId) -> TractResult<(i32, f32)> {
        self.ranges
            .range(old)
            .map(|r| r.qparams())
            .with_context(|| format!("no calibrated range for {:?}", self.old.node(old.node).name))
    }

    /// The int8 type of the value at `old`: its calibrated zero point and scale.
    fn qi8(&self, old: OutletId) -> TractResult<DatumType> {
        let (zero_point, scale) = self.qparams(old)?;
        Ok(i8::datum_type().quantize(QParams::ZpScale { zero_point, scale }))
    }

    fn int8(&mut self, old: OutletId) -> TractResult<OutletId> {
        if let Some(w) = self.int8_wire.get(&old) {
            return Ok(*w);
        }
        let dt = self.qi8(old)?;
        let name = format!("{}.quantize", self.old.node(old.node).name);
        let wire = self.new.wire_node(name, cast(dt), &[self.f32_wire[&old]])?[0];
        self.int8_wire.insert(old, wire);
        Ok(wire)
    }

    fn copy(&mut self, node: &TypedNode) -> TractResult<()> {
        let inputs: TVec<OutletId> = node.inputs.iter().map(|i| self.f32_wire[i]).collect();
        let outputs = if let Some(source) =
            node.op_as::<tract_onnx::tract_core::ops::source::TypedSource>()
        {
            tvec![self.new.add_source(&node.name, source.fact.clone())?]
        } else {
            self.new.wire_node(&node.name, node.op.clone(), &inputs)?
        };
        for (slot, wire) in outputs.into_iter().enumerate() {
            self.f32_wire.insert(OutletId::new(node.id, slot), wire);
        }
        Ok(())
    }

    fn quantized(&mut self, candidate: &Candidate) -> TractResult<()> {
        let node = self.old.node(candidate.node);
        let name = node.name.clone();
        let x_old = node.inputs[0];
        let (x0, x_scale) = self.qparams(x_old)?;
        let weights = const_of(self.old, node.inputs[1]).context("constant weights")?;
        let weights = match &candidate.layout {
            Some(layout) => Arc::new(weights_oi(&weights, layout)?),
            None => weights,
        };
        let per_channel = self.per_channel && per_channel_possible(node);
        let (kernel, k_scales) = quantize_weights(&weights, per_channel)?;
        let out_channels = weights.shape()[0];
        let bias_old = match candidate.bias_add {
            Some(add) => {
                let add = self.old.node(add);
                let other = add
                    .inputs
                    .iter()
                    .find(|i| i.node != node.id)
                    .context("bias")?;
                const_of(self.old, *other).context("constant bias")?
            }
            None => const_of(self.old, node.inputs[2]).context("constant bias")?,
        };
        let bias = quantized_bias(&bias_old, x_scale, &k_scales, out_channels)?;
        if self.simulate {
            let rounded_bias = (&bias, bias_old.shape());
            let y = self.simulated(
                candidate,
                x_old,
                (&kernel, &k_scales),
                rounded_bias,
                x_scale,
            )?;
            self.f32_wire.insert(candidate.output(), y);
            return Ok(());
        }
        let x = self.int8(x_old)?;
        let y = if let Some(conv) = node.op_as::<Conv>().filter(|_| k_scales.len() > 1) {
            self.quantized_conv_per_channel(
                candidate,
                conv,
                (x, &kernel),
                &bias,
                (x0, x_scale),
                &k_scales,
            )?
        } else if let Some(conv) = node.op_as::<Conv>() {
            let kernel = self.new.add_const(format!("{name}.weights_int8"), kernel)?;
            self.quantized_conv(candidate, conv, [x, kernel], bias, (x0, x_scale), &k_scales)?
        } else {
            let kernel = self.new.add_const(format!("{name}.weights_int8"), kernel)?;
            self.quantized_pointwise(candidate, [x, kernel], bias, (x0, x_scale), &k_scales)?
        };
        self.f32_wire.insert(candidate.output(), y);
        Ok(())
    }

    /// `candidate` in f32 on int8-rounded values: the input through the quantizing cast and
    /// back, dequantized int8 weights and bias, the original f32 product, then the output
    /// through its quantizing cast (which also clamps as the absorbed activation did) and back.
    fn simulated(
        &mut self,
        candidate: &Candidate,
        x_old: OutletId,
        (kernel, k_scales): (&Tensor, &[f32]),
        (bias, bias_shape): (&Tensor, &[usize]),
        x_scale: f32,
    ) -> TractResult<OutletId> {
        let node = self.old.node(candidate.node);
        let name = node.name.clone();
        let x = self.int8(x_old)?;
        let x = self
            .new
            .wire_node(format!("{name}.x_rounded"), cast(f32::datum_type()), &[x])?[0];
        let rows = kernel.shape()[0];
        let kernel_values = kernel.cast_to::<f32>()?;
        let kernel_view = kernel_values.view();
        let per_row = kernel.len() / rows.max(1);
        let weights: Vec<f32> = kernel_view
            .as_slice::<f32>()?
            .iter()
            .enumerate()
            .map(|(i, w)| w * k_scales[if k_scales.len() == 1 { 0 } else { i / per_row }])
            .collect();
        let mut weights = Tensor::from_shape(kernel.shape(), &weights)?;
        if candidate
            .layout
            .as_ref()
            .is_some_and(|l| l.weights_transposed)
        {
            weights = weights.permute_axes(&[1, 0])?;
        }
        let weights = self
            .new
            .add_const(format!("{name}.weights_rounded"), weights)?;
        let bias_view = bias.view();
        let bias_values: Vec<f32> = bias_view
            .as_slice::<i32>()?
            .iter()
            .enumerate()
            .map(|(i, &b)| b as f32 * x_scale * k_scales[if k_scales.len() == 1 { 0 } else { i }])
            .collect();
        // The original bias's shape, unless it was one value broadcast over the channels.
        let len = [bias_values.len()];
        let shape = if bias_shape.iter().product::<usize>() == bias_values.len() {
            bias_shape
        } else {
            &len[..]
        };
        let bias = self.new.add_const(
            format!("{name}.bias_rounded"),
            Tensor::from_shape(shape, &bias_values)?,
        )?;
        let y = match candidate.bias_add {
            None => self
                .new
                .wire_node(&name, node.op.clone(), &[x, weights, bias])?[0],
            Some(add) => {
                let product = self.new.wire_node(&name, node.op.clone(), &[x, weights])?[0];
                let add = self.old.node(add);
                let inputs: TVec<OutletId> = add
                    .inputs
                    .iter()
                    .map(|i| if i.node == node.id { product } else { bias })
                    .collect();
                self.new.wire_node(&add.name, add.op.clone(), &inputs)?[0]
            }
        };
        let y_dt = self.qi8(candidate.output())?;
        let y = self
            .new
            .wire_node(format!("{name}.y_rounded"), cast(y_dt), &[y])?[0];
        self.dequantized(candidate, y)
    }

    /// The nine inputs of a tract quantized product (x, kernel, int32 bias, then zero point and
    /// scale of x, kernel and output) and the int8 output type.
    fn quantized_inputs(
        &mut self,
        (candidate, name): (&Candidate, &str),
        [x, kernel]: [OutletId; 2],
        bias: Tensor,
        (x0, x_scale): (i32, f32),
        k_scales: &[f32],
    ) -> TractResult<([OutletId; 9], DatumType)> {
        let (y0, y_scale) = self.qparams(candidate.output())?;
        let y_dt = self.qi8(candidate.output())?;
        let bias = self.new.add_const(format!("{name}.bias_int32"), bias)?;
        let inputs = [
            x,
            kernel,
            bias,
            scalar_i32(&mut self.new, format!("{name}.x0"), x0)?,
            scalar_f32(&mut self.new, format!("{name}.x_scale"), x_scale)?,
            scalar_i32(&mut self.new, format!("{name}.k0"), 0)?,
            match k_scales {
                [one] => scalar_f32(&mut self.new, format!("{name}.k_scale"), *one)?,
                many => self
                    .new
                    .add_const(format!("{name}.k_scale"), tensor1(many))?,
            },
            scalar_i32(&mut self.new, format!("{name}.y0"), y0)?,
            scalar_f32(&mut self.new, format!("{name}.y_scale"), y_scale)?,
        ];
        Ok((inputs, y_dt))
    }

    /// Records the int8 output `y` of `candidate` and returns its dequantized f32 value.
    fn dequantized(&mut self, candidate: &Candidate, y: OutletId) -> TractResult<OutletId> {
        let name = &self.old.node(candidate.node).name;
        self.int8_wire.insert(candidate.output(), y);
        Ok(self
            .new
            .wire_node(format!("{name}.dequantize"), cast(f32::datum_type()), &[y])?[0])
    }

    /// A 1x1 convolution as one int8 matrix product over all pixels: `[Co, Ci] x [Ci, H*W]`,
    /// the activations' axes moved there and the product's moved back (see [`pointwise`]).
    /// (tract multiplies a `[Ci, H, W]` einsum one image row at a time when it is quantized; the
    /// flattening is written into the graph and, as the runtime does not declutter again, stays.)
    fn quantized_pointwise(
        &mut self,
        candidate: &Candidate,
        [x, kernel]: [OutletId; 2],
        bias: Tensor,
        x_params: (i32, f32),
        k_scales: &[f32],
    ) -> TractResult<OutletId> {
        let name = self.old.node(candidate.node).name.clone();
        let layout = candidate.layout.as_ref().context("pointwise layout")?;
        let (x, pixel_dims) = layout.wire_input(&mut self.new, &name, x)?;
        let (inputs, y_dt) =
            self.quantized_inputs((candidate, &name), [x, kernel], bias, x_params, k_scales)?;
        let axes: AxesMapping = if k_scales.len() > 1 {
            "kn,mk,m,,,,m,,->mn"
        } else {
            "kn,mk,m,,,,,,->mn"
        }
        .parse()?;
        let op = EinSum::newq(axes, i32::datum_type(), y_dt);
        let y = self.new.wire_node(format!("{name}.int8"), op, &inputs)?[0];
        let y = layout.wire_output(&mut self.new, &name, y, pixel_dims)?;
        self.dequantized(candidate, y)
    }

    /// A tract quantized convolution: int8 in, int8 out (the activation is the output range).
    fn quantized_conv(
        &mut self,
        candidate: &Candidate,
        conv: &Conv,
        x_and_kernel: [OutletId; 2],
        bias: Tensor,
        x_params: (i32, f32),
        k_scales: &[f32],
    ) -> TractResult<OutletId> {
        let name = self.old.node(candidate.node).name.clone();
        let (inputs, y_dt) =
            self.quantized_inputs((candidate, &name), x_and_kernel, bias, x_params, k_scales)?;
        let op = Conv::new(
            conv.pool_spec.clone(),
            conv.kernel_fmt,
            conv.group,
            Some(y_dt),
        );
        let y = self.new.wire_node(format!("{name}.int8"), op, &inputs)?[0];
        self.dequantized(candidate, y)
    }
}

impl Rebuild<'_> {
    /// A convolution with one weight scale per output channel. NNEF's quantized `conv` takes its
    /// weight scale from the kernel tensor's type, one per tensor, so the layer is written as one
    /// single-channel convolution per output channel, each with its own scale, and their int8
    /// outputs (one output type) concatenated: standard NNEF that plain tract runs as written,
    /// and that graft's runtime merges back into one product with per-channel requantization
    /// (`kernels/merge_channels.rs`). For Lite0's stem, per-tensor scales were the largest
    /// single source of int8 error (mean divergence from f32 on hymenoptera 0.0034 -> 0.0003).
    fn quantized_conv_per_channel(
        &mut self,
        candidate: &Candidate,
        conv: &Conv,
        (x, kernel): (OutletId, &Tensor),
        bias: &Tensor,
        x_params: (i32, f32),
        k_scales: &[f32],
    ) -> TractResult<OutletId> {
        let name = self.old.node(candidate.node).name.clone();
        let channels = k_scales.len();
        let per_channel = kernel.len() / channels;
        let (values, biases) = (kernel.view(), bias.view());
        let (values, biases) = (values.as_slice::<i8>()?, biases.as_slice::<i32>()?);
        let mut shape: TVec<usize> = kernel.shape().into();
        shape[0] = 1;
        let mut pool_spec = conv.pool_spec.clone();
        pool_spec.output_channels = 1;
        let mut outputs = Vec::with_capacity(channels);
        for (c, &k_scale) in k_scales.iter().enumerate() {
            let part = format!("{name}.c{c}");
            let weights = &values[c * per_channel..(c + 1) * per_channel];
            let weights = Tensor::from_shape(&shape, weights)?;
            let weights = self
                .new
                .add_const(format!("{part}.weights_int8"), weights)?;
            let (inputs, y_dt) = self.quantized_inputs(
                (candidate, &part),
                [x, weights],
                tensor1(&[biases[c]]),
                x_params,
                &[k_scale],
            )?;
            let op = Conv::new(pool_spec.clone(), conv.kernel_fmt, 1, Some(y_dt));
            outputs.push(self.new.wire_node(format!("{part}.int8"), op, &inputs)?[0]);
        }
        let axis = graft_runtime::kernels::channel_axis(&conv.pool_spec);
        let y = self
            .new
            .wire_node(format!("{name}.int8"), TypedConcat::new(axis), &outputs)?[0];
        self.dequantized(candidate, y)
    }
}

/// Most output channels of a convolution given per-channel weight scales: it is written as one
/// convolution per channel, so the graph grows by a node per channel (a stem has 16-64; every
/// 3x3 convolution of a ResNet-50 together would add 26,000). Larger ones keep one scale.
pub const MAX_PER_CHANNEL_CONV_OUTPUTS: usize = 64;

/// Whether `node`'s weights can have one scale per output channel: a pointwise product, or a
/// convolution with one group, its output channels first in the kernel (OIHW) and at most
/// [`MAX_PER_CHANNEL_CONV_OUTPUTS`] of them.
fn per_channel_possible(node: &TypedNode) -> bool {
    node.op_as::<EinSum>().is_some()
        || node.op_as::<Conv>().is_some_and(|c| {
            c.group == 1
                && c.kernel_fmt == KernelFormat::OIHW
                && c.pool_spec.output_channels <= MAX_PER_CHANNEL_CONV_OUTPUTS
        })
}

/// Rebuilds `model` with its quantizable layers in int8 where `config` chooses them, using
/// `ranges` (calibrated on this same `model`).
pub fn quantize(
    model: &TypedModel,
    ranges: &ActivationRanges,
    config: &QuantizeConfig,
) -> Result<TypedModel> {
    rewrite(model, ranges, config, false)
}

/// The graph [`quantize`] would build, with every int8 layer computed in f32 on int8-rounded
/// values: the same numbers up to the rounding of the integer requantization, at f32 speed.
pub fn simulate(
    model: &TypedModel,
    ranges: &ActivationRanges,
    config: &QuantizeConfig,
) -> Result<TypedModel> {
    rewrite(model, ranges, config, true)
}

fn rewrite(
    model: &TypedModel,
    ranges: &ActivationRanges,
    config: &QuantizeConfig,
    simulate: bool,
) -> Result<TypedModel> {
    let rewrite = || -> TractResult<TypedModel> {
        let found = candidates(model)?;
        let mut by_output: HashMap<usize, &Candidate> = HashMap::new();
        let mut absorbed: Vec<usize> = vec![];
        for candidate in found.iter().filter(|c| chosen(model, c, config)) {
            by_output.insert(candidate.output().node, candidate);
            absorbed.push(candidate.node);
            absorbed.extend(candidate.bias_add);
            absorbed.extend(&candidate.activation);
        }
        let mut rebuild = Rebuild {
            old: model,
            new: TypedModel::default(),
            ranges,
            simulate,
            f32_wire: HashMap::new(),
            int8_wire: HashMap::new(),
            per_channel: config.per_channel,
        };
        rebuild.new.symbols = model.symbols.clone();
        rebuild.new.properties = model.properties.clone();
        for id in model.eval_order()? {
            if let Some(candidate) = by_output.get(&id) {
                rebuild.quantized(candidate)?;
            } else if !absorbed.contains(&id) {
                rebuild.copy(model.node(id))?;
            }
        }
        let outputs: TVec<OutletId> = model
            .output_outlets()?
            .iter()
            .map(|o| rebuild.f32_wire[o])
            .collect();
        rebuild.new.select_output_outlets(&outputs)?;
        for (old, new) in model.output_outlets()?.iter().zip(outputs.iter()) {
            if let Some(label) = model.outlet_label(*old) {
                rebuild.new.set_outlet_label(*new, label.to_string())?;
            }
        }
        // Not decluttered again: that would undo the flattening of the pointwise products.
        let new = rebuild.new;
        new.check_consistency()?;
        Ok(new)
    };
    rewrite().map_err(CompileError::graph(if simulate {
        "simulate quantization"
    } else {
        "quantize"
    }))
}

/// How the artifact computes the graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// Everything f32.
    #[default]
    F32,
    /// Convolutions and 1x1 products in int8 with calibrated activation ranges (see
    /// [`quantize`]).
    Int8,
}

impl Precision {
    /// The `--precision` spelling.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Int8 => "int8",
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(Precision::F32),
            "int8" => Ok(Precision::Int8),
            _ => Err(format!("unknown precision {s:?}: expected f32 or int8")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_round_trip_within_half_a_step() {
        let w = tensor1(&[0.5f32, -1.27, 0.01, 1.0]);
        let (q, scales) = quantize_weights(&w, false).unwrap();
        let scale = scales[0];
        assert!((scale - 0.01).abs() < 1e-7);
        assert_eq!(q.datum_type(), i8::datum_type());
        let back = q.cast_to::<f32>().unwrap();
        for (a, b) in w
            .view()
            .as_slice::<f32>()
            .unwrap()
            .iter()
            .zip(back.view().as_slice::<f32>().unwrap())
        {
            let b = b * scale;
            assert!((a - b).abs() <= scale / 2.0 + 1e-7, "{a} vs {b}");
        }
    }

    #[test]
    fn rounding_casts_survive_tracts_optimiser() {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([4])).unwrap();
        let dt = i8::datum_type().quantize(QParams::ZpScale {
            zero_point: -128,
            scale: 0.5,
        });
        let q = model.wire_node("q", cast(dt), &[x]).unwrap();
        let y = model.wire_node("y", cast(f32::datum_type()), &q).unwrap();
        model.select_output_outlets(&y).unwrap();
        let plan = model.into_optimized().unwrap().into_runnable().unwrap();
        let out = plan
            .run(tvec![tensor1(&[0.3f32, 1.1, -2.0, 500.0]).into()])
            .unwrap();
        assert_eq!(
            out[0].view().as_slice::<f32>().unwrap(),
            &[0.5, 1.0, 0.0, 127.5],
            "rounded to the 0.5 grid and clamped to [0, 127.5]"
        );
    }

    /// A stem-like convolution (3 -> 8 channels, 3x3, stride 2) whose channels' weights differ
    /// by up to 1000x, then ReLU6, and its input.
    fn stem_model() -> (TypedModel, Vec<Tensor>) {
        use tract_onnx::tract_core::ops::cnn::{PaddingSpec, PoolSpec};
        use tract_onnx::tract_core::ops::math::{max, min};
        use tract_onnx::tract_core::ops::nn::DataFormat;
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([1, 3, 12, 12])).unwrap();
        let weights: Vec<f32> = (0..8 * 27)
            .map(|i| ((i * 37 % 29) as f32 / 14.0 - 1.0) * 10f32.powi((i / 27) % 4 - 2))
            .collect();
        let w = model
            .add_const("w", Tensor::from_shape(&[8, 3, 3, 3], &weights).unwrap())
            .unwrap();
        let b = model.add_const("b", tensor1(&[0.05f32; 8])).unwrap();
        let pool_spec = PoolSpec {
            data_format: DataFormat::NCHW,
            kernel_shape: tvec![3, 3],
            padding: PaddingSpec::Explicit(tvec![1, 1], tvec![1, 1]),
            dilations: None,
            strides: Some(tvec![2, 2]),
            input_channels: 3,
            output_channels: 8,
        };
        let conv = Conv::new(pool_spec, KernelFormat::OIHW, 1, None);
        let y = model.wire_node("stem", conv, &[x, w, b]).unwrap()[0];
        let zero = model.add_const("zero", tensor4(&[[[[0f32]]]])).unwrap();
        let six = model.add_const("six", tensor4(&[[[[6f32]]]])).unwrap();
        let y = model.wire_node("relu", max(), &[y, zero]).unwrap()[0];
        let y = model.wire_node("relu6", min(), &[y, six]).unwrap()[0];
        model.select_output_outlets(&[y]).unwrap();
        let inputs = (0..4)
            .map(|seed| {
                let v: Vec<f32> = (0..3 * 144)
                    .map(|i| ((i * 7919 + seed * 104729) % 255) as f32 / 128.0 - 1.0)
                    .collect();
                Tensor::from_shape(&[1, 3, 12, 12], &v).unwrap()
            })
            .collect();
        (model, inputs)
    }

    fn outputs(model: &TypedModel, input: &Tensor) -> Vec<f32> {
        let plan = model
            .clone()
            .into_optimized()
            .unwrap()
            .into_runnable()
            .unwrap();
        let out = plan.run(tvec![input.clone().into()]).unwrap();
        out[0].view().as_slice::<f32>().unwrap().to_vec()
    }

    /// Per-channel scales for a convolution: written as one single-channel convolution per
    /// output channel and a concatenation, which tract runs as the simulation computes it, and
    /// nearer f32 than one scale for the tensor.
    #[test]
    fn per_channel_convolution_is_split_by_channel_and_closer_to_f32() {
        let (model, inputs) = stem_model();
        let ranges = calibrate(&model, &inputs, |_| {})
            .unwrap()
            .ranges(CalibrationMethod::MinMax);
        let config = |per_channel| QuantizeConfig {
            per_channel,
            ..QuantizeConfig::default()
        };
        let real = quantize(&model, &ranges, &config(true)).unwrap();
        let convs = real.nodes().iter().filter(|n| n.op_is::<Conv>()).count();
        let concats = real
            .nodes()
            .iter()
            .filter(|n| n.op_is::<TypedConcat>())
            .count();
        assert_eq!((convs, concats), (8, 1));
        let simulated = simulate(&model, &ranges, &config(true)).unwrap();
        let per_tensor = simulate(&model, &ranges, &config(false)).unwrap();
        let step = ranges.range(OutletId::new(model.node_by_name("relu6").unwrap().id, 0));
        let step = step.unwrap().qparams().1;
        let (mut real_gap, mut per_channel_error, mut per_tensor_error) = (0f32, 0f32, 0f32);
        for input in &inputs {
            let reference = outputs(&model, input);
            let (r, s, t) = (
                outputs(&real, input),
                outputs(&simulated, input),
                outputs(&per_tensor, input),
            );
            for i in 0..reference.len() {
                real_gap = real_gap.max((r[i] - s[i]).abs());
                per_channel_error += (s[i] - reference[i]).abs();
                per_tensor_error += (t[i] - reference[i]).abs();
            }
        }
        assert!(
            real_gap <= step * 1.01,
            "real vs simulated: {real_gap} ({step} a step)"
        );
        assert!(
            per_channel_error * 2.0 < per_tensor_error,
            "per channel {per_channel_error}, per tensor {per_tensor_error}"
        );
    }
}
