//! The pass that puts runs of graft's operators in the 16-channel-blocked layout
//! ([`layout`](super::layout)), at the AVX-512 level.
//!
//! Walking the graph in order, every operator with a blocked form is replaced by it, followed by
//! a [`FromBlocked`] back to the plain tensor the rest of the graph reads. An input is given to
//! a blocked operator as the blocked tensor behind the `FromBlocked` that produced it (through
//! reshapes), so between two blocked operators nothing is converted, and the unused
//! `FromBlocked`s are left for `compact`; an input with no blocked producer gets a
//! [`ToBlocked`] (one per tensor), unless the operator reads plain input itself (direct
//! convolutions, depthwise convolutions transposing their input in).
//!
//! Operators with a blocked form: f32 convolutions with one group ([`BlockedConv`]), depthwise
//! convolutions f32 and int8 ([`BlockedDepthwise`]), int8 pointwise convolutions
//! ([`BlockedQuantizedConv`]); and, when their inputs are already blocked, element-wise
//! operators that do not care about the layout: graft's f32 <-> int8 casts, its int8 residual
//! addition ([`QuantizedAdd`]) and the f32 `Add` of two tensors of the same shape, run as they
//! are on the blocked tensors (whose padding lanes hold finite values).

use tract_core::internal::*;

use super::conv::Convolution;
use super::conv_blocked::BlockedConv;
use super::depthwise::{DepthwiseConv, QuantizedDepthwise};
use super::depthwise_blocked::BlockedDepthwise;
use super::graph::passes_through;
use super::layout::{FromBlocked, ToBlocked};
use super::qconv::QuantizedConvolution;
use super::qconv_blocked::BlockedQuantizedConv;
use super::{QuantizedAdd, QuantizedCast};

/// What a node becomes in the blocked layout.
struct Blocked {
    op: Box<dyn TypedOp>,
    /// Per input: the `(channels, pixels)` it is given blocked, or `None` (plain, as it is).
    inputs: TVec<Option<(usize, usize)>>,
    /// The output's `(channels, pixels)`.
    output: (usize, usize),
}

/// The blocked tensor behind `outlet` when a [`FromBlocked`] produced it (through reshapes):
/// its outlet and `(channels, pixels)`.
fn blocked_source(model: &TypedModel, outlet: OutletId) -> Option<(OutletId, (usize, usize))> {
    let mut producer = model.node(outlet.node);
    while passes_through(model, producer) {
        producer = model.node(producer.inputs[0].node);
    }
    let from = producer.op_as::<FromBlocked>()?;
    Some((producer.inputs[0], (from.channels, from.pixels)))
}

/// The blocked form of `node`, if it has one.
fn blocked_form(model: &TypedModel, node: &TypedNode) -> TractResult<Option<Blocked>> {
    if let Some(conv) = node.op_as::<Convolution>() {
        let op = BlockedConv::of(conv);
        let output = (op.m(), op.pixels());
        let mut inputs = tvec![op.blocked_input()];
        inputs.extend(node.inputs[1..].iter().map(|_| Some(output)));
        return Ok(Some(Blocked {
            op: Box::new(op),
            inputs,
            output,
        }));
    }
    let depthwise = if let Some(conv) = node.op_as::<DepthwiseConv>() {
        Some((conv, None))
    } else {
        node.op_as::<QuantizedDepthwise>()
            .map(|q| (q.parts().0, Some(q.parts().1)))
    };
    if let Some((conv, int8)) = depthwise {
        // Blocked input when its producer is blocked; else transposed in (no conversion op).
        let blocked_input = blocked_source(model, node.inputs[0]).is_some();
        let Some(op) = BlockedDepthwise::of(conv, int8, blocked_input) else {
            return Ok(None);
        };
        let input = (op.channels(), op.input_pixels());
        let output = (op.channels(), op.output_pixels());
        return Ok(Some(Blocked {
            op: Box::new(op),
            inputs: tvec![blocked_input.then_some(input)],
            output,
        }));
    }
    if let Some(conv) = node.op_as::<QuantizedConvolution>() {
        let Some(op) = BlockedQuantizedConv::of(conv) else {
            return Ok(None);
        };
        let (input, output) = ((op.k(), op.pixels()), (op.m(), op.pixels()));
        return Ok(Some(Blocked {
            op: Box::new(op),
            inputs: tvec![Some(input)],
            output,
        }));
    }
    elementwise_form(model, node)
}

/// The blocked form of an element-wise operator whose inputs are all blocked alike.
fn elementwise_form(model: &TypedModel, node: &TypedNode) -> TractResult<Option<Blocked>> {
    let is_add = node.op.name() == "Add"
        && node.inputs.len() == 2
        && node.outputs[0].fact.datum_type == f32::datum_type();
    if !(node.op_is::<QuantizedCast>() || node.op_is::<QuantizedAdd>() || is_add) {
        return Ok(None);
    }
    let shapes: TVec<_> = node
        .inputs
        .iter()
        .map(|&i| model.outlet_fact(i).map(|f| f.shape.clone()))
        .collect::<TractResult<_>>()?;
    let sources: Option<TVec<_>> = node
        .inputs
        .iter()
        .map(|&i| blocked_source(model, i))
        .collect();
    let Some(sources) = sources else {
        return Ok(None);
    };
    let dims = sources[0].1;
    if sources.iter().any(|s| s.1 != dims) || shapes.iter().any(|s| *s != shapes[0]) {
        return Ok(None);
    }
    Ok(Some(Blocked {
        op: tract_core::dyn_clone::clone_box(node.op.as_ref()),
        inputs: node.inputs.iter().map(|_| Some(dims)).collect(),
        output: dims,
    }))
}

/// Runs the pass; returns how many operators were converted.
pub(super) fn use_blocked_layout(model: &mut TypedModel) -> TractResult<usize> {
    let mut converted = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(blocked) = blocked_form(model, node)? else {
            continue;
        };
        let shapes: Option<Vec<_>> = node
            .outputs
            .iter()
            .map(|o| o.fact.shape.as_concrete())
            .collect();
        let Some(shapes) = shapes else {
            continue;
        };
        let mut patch = TypedModelPatch::default();
        let mut inputs = tvec![];
        for (i, (&outlet, dims)) in node.inputs.iter().zip(&blocked.inputs).enumerate() {
            let wire = match dims {
                None => patch.tap_model(model, outlet)?,
                Some(dims) => blocked_input(model, &mut patch, node, i, *dims)?,
            };
            inputs.push(wire);
        }
        let outputs = patch.wire_node(format!("{}.blocked", node.name), blocked.op, &inputs)?;
        // Every output (one, or an int8 sum and its f32 form) back to the plain layout.
        for (slot, (&out, shape)) in outputs.iter().zip(shapes).enumerate() {
            let back = FromBlocked {
                dt: node.outputs[slot].fact.datum_type,
                channels: blocked.output.0,
                pixels: blocked.output.1,
                shape: shape.into(),
            };
            let name = match slot {
                0 => format!("{}.from_blocked", node.name),
                _ => format!("{}.from_blocked.{slot}", node.name),
            };
            let back = patch.wire_node(name, back, &[out])?[0];
            patch.shunt_outside(model, OutletId::new(id, slot), back)?;
        }
        patch.apply(model)?;
        converted += 1;
    }
    Ok(converted)
}

/// Input `i` of `node` as a blocked tensor of `dims` in `patch`: the blocked tensor behind it,
/// a conversion of it made for an earlier operator, or a new [`ToBlocked`].
fn blocked_input(
    model: &TypedModel,
    patch: &mut TypedModelPatch,
    node: &TypedNode,
    i: usize,
    (channels, pixels): (usize, usize),
) -> TractResult<OutletId> {
    let outlet = node.inputs[i];
    if let Some((source, dims)) = blocked_source(model, outlet) {
        if dims == (channels, pixels) {
            return patch.tap_model(model, source);
        }
    }
    let to = ToBlocked {
        dt: model.outlet_fact(outlet)?.datum_type,
        channels,
        pixels,
    };
    let earlier = model
        .outlet_successors(outlet)
        .iter()
        .find(|s| model.node(s.node).op_as::<ToBlocked>() == Some(&to));
    if let Some(inlet) = earlier {
        return patch.tap_model(model, OutletId::new(inlet.node, 0));
    }
    let tap = patch.tap_model(model, outlet)?;
    Ok(patch.wire_node(format!("{}.to_blocked.{i}", node.name), to, &[tap])?[0])
}
