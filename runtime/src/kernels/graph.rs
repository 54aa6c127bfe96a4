//! Graph walking shared by the kernel rewrites: constants, single successors, clamp chains.

use std::sync::Arc;

use tract_core::internal::*;
use tract_core::ops::change_axes::AxisOp;

/// The constant value at `outlet`: a constant, or an operator of constants (the NNEF reader
/// leaves casts of stored tensors in place), evaluated here.
pub(crate) fn konst(model: &TypedModel, outlet: OutletId) -> Option<Arc<Tensor>> {
    konst_within(model, outlet, 3)
}

fn konst_within(model: &TypedModel, outlet: OutletId, depth: usize) -> Option<Arc<Tensor>> {
    let fact = model.outlet_fact(outlet).ok()?;
    if let Some(value) = &fact.konst {
        return Some(value.clone());
    }
    let node = model.node(outlet.node);
    if depth == 0 || node.inputs.is_empty() {
        return None;
    }
    let inputs: Option<TVec<TValue>> = node
        .inputs
        .iter()
        .map(|&i| Some(konst_within(model, i, depth - 1)?.into_tvalue()))
        .collect();
    let outputs = node.op.eval_out_of_plan(inputs?).ok()??;
    Some(outputs.get(outlet.slot)?.clone().into_arc_tensor())
}

/// The int8 values of a constant (plain or quantized int8).
pub(crate) fn int8_values(tensor: &Tensor) -> TractResult<Option<Vec<i8>>> {
    if tensor.datum_type().unquantized() != i8::datum_type() {
        return Ok(None);
    }
    Ok(Some(tensor.view().as_slice::<i8>()?.to_vec()))
}

/// The node fed by node `id`'s output when it is the only one, and that output is not one of the
/// model's.
pub(crate) fn only_successor(model: &TypedModel, id: usize) -> TractResult<Option<&TypedNode>> {
    let node = model.node(id);
    let outlet = OutletId::new(id, 0);
    Ok(match &*node.outputs {
        [output] if output.successors.len() == 1 && !model.output_outlets()?.contains(&outlet) => {
            Some(model.node(output.successors[0].node))
        }
        _ => None,
    })
}

/// Whether `node` changes nothing in a contiguous f32 buffer: unit axes added or removed, reshapes,
/// and
/// f32-to-f32 casts (the NNEF reader leaves both around the batch axis).
pub(crate) fn passes_through(model: &TypedModel, node: &TypedNode) -> bool {
    if let Some(axis) = node.op_as::<AxisOp>() {
        return matches!(axis, AxisOp::Add(_) | AxisOp::Rm(_) | AxisOp::Reshape(..));
    }
    node.op_as::<tract_core::ops::cast::Cast>()
        .is_some_and(|c| c.to == f32::datum_type())
        && model
            .outlet_fact(node.inputs[0])
            .is_ok_and(|f| f.datum_type == f32::datum_type())
}

/// The first node after node `id`, through [`only_successor`]s that [`passes_through`].
pub(crate) fn follow(model: &TypedModel, id: usize) -> TractResult<Option<&TypedNode>> {
    let mut next = only_successor(model, id)?;
    while let Some(node) = next.filter(|n| passes_through(model, n)) {
        next = only_successor(model, node.id)?;
    }
    Ok(next)
}

/// Follows node `start`'s output through [`only_successor`]s that pass it through or clamp it
/// (`max` / `min` with a scalar constant, as ReLU6 is written); returns the clamps as
/// `[low, high]` in order, and the last node followed (`start` when none).
pub(crate) fn clamp_chain(model: &TypedModel, start: usize) -> TractResult<(Vec<[f32; 2]>, usize)> {
    let mut clamp = vec![];
    let mut current = start;
    while let Some(next) = only_successor(model, current)? {
        if !passes_through(model, next) {
            let name = next.op.name();
            if (name != "Max" && name != "Min") || next.inputs.len() != 2 {
                break;
            }
            let Some(other) = next.inputs.iter().find(|i| i.node != current) else {
                break;
            };
            let Some(value) = konst(model, *other).filter(|k| k.len() == 1) else {
                break;
            };
            let value = value.cast_to_scalar::<f32>()?;
            clamp.push(if name == "Max" {
                [value, f32::INFINITY]
            } else {
                [f32::NEG_INFINITY, value]
            });
        }
        current = next.id;
    }
    Ok((clamp, current))
}

/// Wires `op` to `input` in place of the chain that ends at node `last` (whose output the rest of
/// the graph now reads from `op`; the chain is left unused, for `compact`).
pub(crate) fn replace_chain(
    model: &mut TypedModel,
    inputs: &[OutletId],
    last: usize,
    name: String,
    op: impl Into<Box<dyn TypedOp>>,
) -> TractResult<()> {
    let mut patch = TypedModelPatch::default();
    let inputs = patch.taps(model, inputs)?;
    let output = patch.wire_node(name, op, &inputs)?[0];
    patch.shunt_outside(model, OutletId::new(last, 0), output)?;
    patch.apply(model)
}

/// `values` as one value per channel: as they are when there are `channels` of them, repeated
/// when there is one (a bias broadcast over the channels); `None` otherwise.
pub(crate) fn per_channel<T: Copy>(values: Vec<T>, channels: usize) -> Option<Vec<T>> {
    match values.len() {
        n if n == channels => Some(values),
        1 => Some(vec![values[0]; channels]),
        _ => None,
    }
}
