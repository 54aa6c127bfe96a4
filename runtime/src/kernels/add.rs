//! The residual addition of an int8 graph as one operator.
//!
//! An int8 graph adds an inverted-residual block's output to its input as whole-tensor passes:
//! the int8 operands dequantized to f32, an f32 `Add`, and a quantizing cast of the sum (which
//! the next block may also read as f32, when its own residual connection starts there).
//! [`QuantizedAdd`] reads the operands once and writes the int8 sum (and the f32 one where it is
//! read), with the same f32 arithmetic in the same order, so the values are those of the
//! unfused chain (tested). It does not care about the layout: the blocking pass runs it on
//! blocked tensors.

use tract_core::internal::*;

use super::cast::{f32_zp_scale, quantize_portable, QuantizedCast};
use super::dispatch::Level;
use super::graph::{only_successor, passes_through};

/// `quantize(a + b)` where each operand is a per-tensor quantized int8 tensor (dequantized as
/// `(q - zero_point) * scale`) or an f32 one, all of the same shape, with tract's arithmetic: one
/// f32 addition, then `round_ties_even(x / scale + zero_point)` clamped to `[-128, 127]`. A
/// second output, when asked for, is the f32 sum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantizedAdd {
    /// Per operand: its quantized type, or `None` for f32.
    inputs: [Option<DatumType>; 2],
    /// The quantized type of the output.
    output: DatumType,
    /// Whether the f32 sum is a second output.
    f32_sum: bool,
    level: Level,
}

/// One operand of the addition.
#[derive(Clone, Copy)]
pub enum Operand<'a> {
    /// int8 values and their `[zero_point, scale]`.
    Int8(&'a [i8], [f32; 2]),
    /// f32 values.
    F32(&'a [f32]),
}

impl Operand<'_> {
    fn len(&self) -> usize {
        match self {
            Operand::Int8(v, _) => v.len(),
            Operand::F32(v) => v.len(),
        }
    }

    /// Values `at..at + out.len()` as f32 into `out`.
    #[inline(always)]
    fn load(&self, at: usize, out: &mut [f32]) {
        match *self {
            Operand::Int8(values, [zero_point, scale]) => {
                for (x, &q) in out.iter_mut().zip(&values[at..]) {
                    *x = (q as f32 - zero_point) * scale;
                }
            }
            Operand::F32(values) => out.copy_from_slice(&values[at..at + out.len()]),
        }
    }
}

/// Where a chain's operand comes from.
enum Source {
    /// A dequantizing cast of this int8 tensor, read by the `Add` alone.
    Int8(OutletId, DatumType),
    /// This f32 tensor.
    F32(OutletId),
}

/// What [`QuantizedAdd::for_chain`] found.
pub(crate) struct Chain {
    pub(crate) op: QuantizedAdd,
    /// The operator's inputs.
    pub(crate) inputs: [OutletId; 2],
    /// The f32 `Add` whose sum other operators also read (then the operator's second output),
    /// if any do.
    pub(crate) f32_sum: Option<usize>,
}

impl QuantizedAdd {
    /// The fused operator for the chain ending at `node` when it is a quantizing cast of an f32
    /// `Add` (through reshapes and unit axes) of two tensors of its shape, at least one of them
    /// a dequantized int8 tensor read by the `Add` alone.
    pub(crate) fn for_chain(
        model: &TypedModel,
        node: &TypedNode,
        level: Level,
    ) -> TractResult<Option<Chain>> {
        let Some(quantize) = node.op_as::<QuantizedCast>().filter(|c| c.to_int8) else {
            return Ok(None);
        };
        let add = back_through(model, node.inputs[0]);
        if add.op.name() != "Add" || add.inputs.len() != 2 {
            return Ok(None);
        }
        // The sum reaches the cast alone, or directly (then others may read it too).
        let direct = node.inputs[0].node == add.id;
        if !direct && !reaches(model, add.id, node.id)? {
            return Ok(None);
        }
        let sources = [source(model, add, 0)?, source(model, add, 1)?];
        if sources.iter().all(|s| matches!(s, Source::F32(_))) {
            return Ok(None);
        }
        let shape = |outlet: OutletId| model.outlet_fact(outlet).map(|f| f.shape.clone());
        let out = shape(OutletId::new(node.id, 0))?;
        let mut inputs = [OutletId::new(0, 0); 2];
        let mut types = [None; 2];
        for (i, source) in sources.into_iter().enumerate() {
            (inputs[i], types[i]) = match source {
                Source::Int8(outlet, dt) => (outlet, Some(dt)),
                Source::F32(outlet) => (outlet, None),
            };
            // One shape in and out (the output takes its inputs' shape, blocked or not).
            if shape(inputs[i])? != out {
                return Ok(None);
            }
        }
        let others = direct && add.outputs[0].successors.len() > 1;
        let op = QuantizedAdd {
            inputs: types,
            output: quantize.quantized,
            f32_sum: others,
            level,
        };
        Ok(Some(Chain {
            op,
            inputs,
            f32_sum: others.then_some(add.id),
        }))
    }

    /// Writes `quantize(a + b)` into `out`, and the f32 sum into `sum` when given (slices of one
    /// length).
    pub fn run(&self, [a, b]: [Operand; 2], out: &mut [i8], sum: Option<&mut [f32]>) {
        assert!(
            a.len() == out.len() && b.len() == out.len(),
            "lengths differ"
        );
        assert!(sum.as_ref().is_none_or(|s| s.len() == out.len()));
        let target = f32_zp_scale(self.output);
        match self.level {
            // SAFETY: the level was checked to be supported when the operator was made.
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => unsafe { add_avx512([a, b], out, sum, target) },
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 | Level::AvxVnni => unsafe { add_avx2([a, b], out, sum, target) },
            _ => add_portable([a, b], out, sum, target),
        }
    }
}

/// Input `i` of `add`: the int8 tensor behind a dequantizing cast that only `add` reads, else
/// the f32 tensor itself.
fn source(model: &TypedModel, add: &TypedNode, i: usize) -> TractResult<Source> {
    let outlet = add.inputs[i];
    let dequantize = back_through(model, outlet);
    if let Some(cast) = dequantize.op_as::<QuantizedCast>().filter(|c| !c.to_int8) {
        if reaches(model, dequantize.id, add.id)? {
            return Ok(Source::Int8(dequantize.inputs[0], cast.quantized));
        }
    }
    Ok(Source::F32(outlet))
}

/// The node producing `outlet`, through nodes that [`passes_through`].
fn back_through(model: &TypedModel, outlet: OutletId) -> &TypedNode {
    let mut node = model.node(outlet.node);
    while passes_through(model, node) {
        node = model.node(node.inputs[0].node);
    }
    node
}

/// Whether node `from`'s output reaches node `to` alone: through [`only_successor`]s that
/// [`passes_through`].
fn reaches(model: &TypedModel, from: usize, to: usize) -> TractResult<bool> {
    let mut current = from;
    while let Some(next) = only_successor(model, current)? {
        if next.id == to {
            return Ok(true);
        }
        if !passes_through(model, next) {
            return Ok(false);
        }
        current = next.id;
    }
    Ok(false)
}

/// A chunk of values at a time: the operands as f32 into stack buffers, their sum, then the
/// cast's own quantizing loop (each loop vectorises; the arithmetic is the unfused chain's).
#[inline(always)]
fn add_portable(
    [a, b]: [Operand; 2],
    out: &mut [i8],
    mut sum: Option<&mut [f32]>,
    [zero_point, scale]: [f32; 2],
) {
    const CHUNK: usize = 256;
    let (mut x, mut y) = ([0f32; CHUNK], [0f32; CHUNK]);
    for (c, out) in out.chunks_mut(CHUNK).enumerate() {
        let (at, n) = (c * CHUNK, out.len());
        a.load(at, &mut x[..n]);
        b.load(at, &mut y[..n]);
        for (x, y) in x.iter_mut().zip(&y) {
            *x += *y;
        }
        if let Some(sum) = sum.as_deref_mut() {
            sum[at..at + n].copy_from_slice(&x[..n]);
        }
        quantize_portable(&x[..n], out, zero_point, scale);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn add_avx512(
    operands: [Operand; 2],
    out: &mut [i8],
    sum: Option<&mut [f32]>,
    target: [f32; 2],
) {
    add_portable(operands, out, sum, target)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn add_avx2(
    operands: [Operand; 2],
    out: &mut [i8],
    sum: Option<&mut [f32]>,
    target: [f32; 2],
) {
    add_portable(operands, out, sum, target)
}

impl Op for QuantizedAdd {
    fn name(&self) -> StaticName {
        "GraftQuantizedAdd".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let operand = |dt: Option<DatumType>| dt.map_or("F32".to_string(), |dt| format!("{dt:?}"));
        Ok(vec![format!(
            "{} + {} -> {:?}{}",
            operand(self.inputs[0]),
            operand(self.inputs[1]),
            self.output,
            if self.f32_sum { " and the F32 sum" } else { "" }
        )])
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for QuantizedAdd {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (a, b) = args_2!(inputs);
        ensure!(
            a.shape() == b.shape(),
            "GraftQuantizedAdd adds tensors of one shape, got {:?} and {:?}",
            a.shape(),
            b.shape()
        );
        let shape = a.shape();
        let (a, b) = (a.view(), b.view());
        fn operand<'a>(
            dt: Option<DatumType>,
            view: &'a TensorView<'_>,
        ) -> TractResult<Operand<'a>> {
            Ok(match dt {
                Some(dt) => Operand::Int8(view.as_slice::<i8>()?, f32_zp_scale(dt)),
                None => Operand::F32(view.as_slice::<f32>()?),
            })
        }
        let operands = [operand(self.inputs[0], &a)?, operand(self.inputs[1], &b)?];
        // SAFETY: `run` writes every value (i8 and f32 have no invalid bit patterns).
        let mut output = unsafe { Tensor::uninitialized_aligned_dt(self.output, shape, 64)? };
        let mut sum = if self.f32_sum {
            Some(unsafe { Tensor::uninitialized_aligned::<f32>(shape, 64)? })
        } else {
            None
        };
        {
            let mut out = output.try_as_plain_ram_mut()?;
            let mut sum_view = sum.as_mut().map(|s| s.try_as_plain_ram_mut()).transpose()?;
            let sum_values = sum_view
                .as_mut()
                .map(|s| s.as_slice_mut::<f32>())
                .transpose()?;
            self.run(operands, out.as_slice_mut::<i8>()?, sum_values);
        }
        let mut outputs = tvec!(output.into_tvalue());
        outputs.extend(sum.map(|s| s.into_tvalue()));
        Ok(outputs)
    }
}

impl TypedOp for QuantizedAdd {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let shape = inputs[0].shape.clone();
        let mut facts = tvec!(self.output.fact(shape.clone()));
        if self.f32_sum {
            facts.push(f32::fact(shape));
        }
        Ok(facts)
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{use_graft_kernels_in, Layout};
    use tract_core::ops::cast::cast;

    fn qi8(zero_point: i32, scale: f32) -> DatumType {
        i8::datum_type().quantize(QParams::ZpScale { zero_point, scale })
    }

    /// Two int8 tensors dequantized, added and quantized, as an int8 graph writes a residual.
    fn residual_graph(shape: &[usize], [a, b, y]: [DatumType; 3]) -> TypedModel {
        let mut model = TypedModel::default();
        let xa = model.add_source("a", a.fact(shape)).unwrap();
        let xb = model.add_source("b", b.fact(shape)).unwrap();
        let fa = model
            .wire_node("a.dequantize", cast(f32::datum_type()), &[xa])
            .unwrap();
        let fb = model
            .wire_node("b.dequantize", cast(f32::datum_type()), &[xb])
            .unwrap();
        let sum = model
            .wire_node("add", tract_core::ops::math::add(), &[fa[0], fb[0]])
            .unwrap();
        let q = model.wire_node("quantize", cast(y), &sum).unwrap();
        model.select_output_outlets(&q).unwrap();
        model
    }

    fn run(model: TypedModel, inputs: [&Tensor; 2]) -> Vec<i8> {
        let out = model
            .into_optimized()
            .unwrap()
            .into_runnable()
            .unwrap()
            .run(inputs.iter().map(|&t| t.clone().into()).collect())
            .unwrap();
        out[0].view().as_slice::<i8>().unwrap().to_vec()
    }

    fn int8(shape: &[usize], dt: DatumType, seed: usize) -> Tensor {
        let len = shape.iter().product::<usize>();
        let values: Vec<i8> = (0..len)
            .map(|i| ((i * 131 + seed * 71) % 256) as u8 as i8)
            .collect();
        let mut t = Tensor::from_shape(shape, &values).unwrap();
        // SAFETY: same storage (i8), quantization parameters only.
        unsafe { t.set_datum_type(dt) };
        t
    }

    /// tract's unfused operators and the fused one give the same bytes at every level, over
    /// zero points and scales that saturate and that land on halves, with odd lengths.
    #[test]
    fn matches_the_unfused_chain_byte_for_byte() {
        for (shape, types) in [
            (vec![24, 7, 9], [qi8(-5, 0.29), qi8(2, 0.34), qi8(-8, 0.25)]),
            (vec![1, 3, 5, 5], [qi8(0, 0.5), qi8(0, 0.5), qi8(0, 1.0)]),
            (vec![1000], [qi8(-128, 0.1), qi8(127, 0.1), qi8(3, 0.01)]),
        ] {
            let model = residual_graph(&shape, types);
            let inputs = [int8(&shape, types[0], 1), int8(&shape, types[1], 2)];
            let reference = run(model.clone(), [&inputs[0], &inputs[1]]);
            for level in Level::available() {
                let mut fused = model.clone();
                use_graft_kernels_in(&mut fused, level, Layout::Plain).unwrap();
                let names: Vec<_> = fused.nodes().iter().map(|n| n.op.name()).collect();
                assert!(names.iter().any(|n| n == "GraftQuantizedAdd"), "{names:?}");
                assert!(!names.iter().any(|n| n == "Add"), "{names:?}");
                let ours = run(fused, [&inputs[0], &inputs[1]]);
                assert_eq!(ours, reference, "{shape:?} at {level:?}");
            }
        }
    }

    /// Two residual connections in a row, as Lite0's blocks 6 and 7 have: the first sum is
    /// also read as f32 by the second addition. Both become one operator each (the first with
    /// the f32 sum as a second output), with the same values.
    #[test]
    fn chains_of_sums_read_as_f32_are_fused_with_the_same_values() {
        let shape = [16, 5, 3];
        let types = [qi8(-5, 0.29), qi8(2, 0.34), qi8(-8, 0.25)];
        let mut model = residual_graph(&shape, types);
        let c = model.add_source("c", types[0].fact(shape)).unwrap();
        let fc = model
            .wire_node("c.dequantize", cast(f32::datum_type()), &[c])
            .unwrap();
        let first = model.node_by_name("add").unwrap().id;
        let sum = model
            .wire_node(
                "add2",
                tract_core::ops::math::add(),
                &[fc[0], OutletId::new(first, 0)],
            )
            .unwrap();
        let q2 = model.wire_node("quantize2", cast(types[2]), &sum).unwrap();
        let mut outputs = model.output_outlets().unwrap().to_vec();
        outputs.push(q2[0]);
        model.select_output_outlets(&outputs).unwrap();
        let inputs = [
            int8(&shape, types[0], 1),
            int8(&shape, types[1], 2),
            int8(&shape, types[0], 3),
        ];
        let run_all = |model: TypedModel| -> Vec<Tensor> {
            let plan = model.into_optimized().unwrap().into_runnable().unwrap();
            let values = inputs.iter().map(|t| t.clone().into()).collect();
            plan.run(values)
                .unwrap()
                .into_iter()
                .map(|t| t.into_tensor())
                .collect()
        };
        let reference = run_all(model.clone());
        for level in Level::available() {
            let mut fused = model.clone();
            use_graft_kernels_in(&mut fused, level, Layout::Plain).unwrap();
            let names: Vec<_> = fused.nodes().iter().map(|n| n.op.name()).collect();
            let count = names.iter().filter(|n| *n == "GraftQuantizedAdd").count();
            assert_eq!(count, 2, "{names:?}");
            assert!(!names.iter().any(|n| n == "Add"), "{names:?}");
            assert_eq!(run_all(fused), reference, "at {level:?}");
        }
    }
}
