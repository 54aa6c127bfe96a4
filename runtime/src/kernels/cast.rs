//! Casts between f32 and per-tensor quantized int8.

use tract_core::internal::*;

/// A cast from f32 to per-tensor quantized int8 or back, with tract's arithmetic: quantizing is
/// `round_ties_even(x / scale + zero_point)` clamped to `[-128, 127]`, dequantizing is
/// `(q - zero_point) * scale`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantizedCast {
    /// The quantized type (`QI8`).
    pub(crate) quantized: DatumType,
    /// Towards int8 (quantize) or towards f32 (dequantize).
    pub(crate) to_int8: bool,
}

/// The zero point and scale of a quantized type as the kernels' f32 arithmetic uses them.
pub(crate) fn f32_zp_scale(dt: DatumType) -> [f32; 2] {
    let (zero_point, scale) = dt.zp_scale();
    [zero_point as f32, scale]
}

impl QuantizedCast {
    /// The kernel for `node` when it is such a cast.
    pub fn for_node(model: &TypedModel, node: &TypedNode) -> TractResult<Option<QuantizedCast>> {
        let Some(cast) = node.op_as::<tract_core::ops::cast::Cast>() else {
            return Ok(None);
        };
        let from = model.outlet_fact(node.inputs[0])?.datum_type;
        let is_qi8 = |dt: DatumType| dt.is_quantized() && dt.unquantized() == i8::datum_type();
        Ok(if from == f32::datum_type() && is_qi8(cast.to) {
            Some(QuantizedCast {
                quantized: cast.to,
                to_int8: true,
            })
        } else if is_qi8(from) && cast.to == f32::datum_type() {
            Some(QuantizedCast {
                quantized: from,
                to_int8: false,
            })
        } else {
            None
        })
    }

    fn quantize(input: &[f32], output: &mut [i8], zero_point: f32, scale: f32) {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has the feature the function is compiled for.
            return unsafe { quantize_avx2(input, output, zero_point, scale) };
        }
        quantize_portable(input, output, zero_point, scale)
    }

    fn dequantize(input: &[i8], output: &mut [f32], zero_point: f32, scale: f32) {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has the feature the function is compiled for.
            return unsafe { dequantize_avx2(input, output, zero_point, scale) };
        }
        dequantize_portable(input, output, zero_point, scale)
    }
}

#[inline(always)]
pub(crate) fn quantize_portable(input: &[f32], output: &mut [i8], zero_point: f32, scale: f32) {
    for (q, &x) in output.iter_mut().zip(input) {
        let v = (x / scale + zero_point)
            .round_ties_even()
            .clamp(-128.0, 127.0);
        // NaN becomes 0, as in tract.
        let v = if v.is_nan() { 0.0 } else { v };
        // SAFETY: `v` is an integer in -128..=127, so the conversion is exact. (The checked `as`
        // conversion also handles NaN and out-of-range values, which makes the compiler convert
        // one value at a time.)
        *q = unsafe { v.to_int_unchecked::<i32>() } as i8;
    }
}

#[inline(always)]
pub(crate) fn dequantize_portable(input: &[i8], output: &mut [f32], zero_point: f32, scale: f32) {
    for (x, &q) in output.iter_mut().zip(input) {
        *x = (q as f32 - zero_point) * scale;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_avx2(input: &[f32], output: &mut [i8], zero_point: f32, scale: f32) {
    quantize_portable(input, output, zero_point, scale)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dequantize_avx2(input: &[i8], output: &mut [f32], zero_point: f32, scale: f32) {
    dequantize_portable(input, output, zero_point, scale)
}

impl Op for QuantizedCast {
    fn name(&self) -> StaticName {
        "GraftQuantizedCast".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{} {:?}",
            if self.to_int8 { "to" } else { "from" },
            self.quantized
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for QuantizedCast {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let [zero_point, scale] = f32_zp_scale(self.quantized);
        let to = if self.to_int8 {
            self.quantized
        } else {
            f32::datum_type()
        };
        // SAFETY: every element is written below (input and output have the same length), and
        // i8 / f32 have no invalid bit patterns.
        let mut output = unsafe { Tensor::uninitialized_dt(to, input.shape())? };
        {
            let view = input.view();
            let mut plain = output.try_as_plain_ram_mut()?;
            if self.to_int8 {
                Self::quantize(
                    view.as_slice::<f32>()?,
                    plain.as_slice_mut::<i8>()?,
                    zero_point,
                    scale,
                );
            } else {
                Self::dequantize(
                    view.as_slice::<i8>()?,
                    plain.as_slice_mut::<f32>()?,
                    zero_point,
                    scale,
                );
            }
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for QuantizedCast {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let to = if self.to_int8 {
            self.quantized
        } else {
            f32::datum_type()
        };
        Ok(tvec!(to.fact(inputs[0].shape.clone())))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::use_graft_kernels;

    #[test]
    fn quantized_casts_match_tracts_bit_for_bit() {
        let dt = i8::datum_type().quantize(QParams::ZpScale {
            zero_point: -3,
            scale: 0.037,
        });
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([1000])).unwrap();
        let q = model
            .wire_node("q", tract_core::ops::cast::cast(dt), &[x])
            .unwrap();
        let y = model
            .wire_node("y", tract_core::ops::cast::cast(f32::datum_type()), &q)
            .unwrap();
        model.select_output_outlets(&[q[0], y[0]]).unwrap();
        // Values across and beyond the range, exact halves included.
        let values: Vec<f32> = (0..1000)
            .map(|i| (i as f32 - 500.0) * 0.0185 + if i % 7 == 0 { 0.0 } else { 0.001 })
            .chain([f32::NAN, 1e9, -1e9])
            .take(1000)
            .collect();
        let run = |model: TypedModel| {
            let out = model
                .into_optimized()
                .unwrap()
                .into_runnable()
                .unwrap()
                .run(tvec![tensor1(&values).into()])
                .unwrap();
            (out[0].clone().into_tensor(), out[1].clone().into_tensor())
        };
        let reference = run(model.clone());
        assert_eq!(use_graft_kernels(&mut model).unwrap(), 2);
        let ours = run(model);
        assert_eq!(ours.0.datum_type(), dt);
        assert_eq!(
            ours.0.view().as_slice::<i8>().unwrap(),
            reference.0.view().as_slice::<i8>().unwrap()
        );
        let (a, b) = (
            ours.1.view().as_slice::<f32>().unwrap().to_vec(),
            reference.1.view().as_slice::<f32>().unwrap().to_vec(),
        );
        assert!(a.iter().zip(&b).all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}
