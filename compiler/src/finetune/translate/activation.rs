//! The activation that follows a convolution, fused into the convolution's CPU kernels.
//!
//! Lite0 and the MobileNets follow almost every convolution with a ReLU6 (ONNX `Clip(0, 6)`). As
//! separate candle ops, bias, `maximum` and `minimum` each keep one more full-size activation
//! alive for the backward pass and cost one more pass over memory each way. Fused, the
//! convolution keeps only its output: a clip's derivative is 1 where the output lies strictly
//! inside the bounds and 0 elsewhere, so the output alone decides which gradients pass.

use std::mem::MaybeUninit;

use candle_core::Tensor;

/// What a fused convolution applies to its biased output.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    /// Nothing.
    Identity,
    /// `min(max(y, lo), hi)`; ReLU is `Clip { lo: 0, hi: inf }`, ReLU6 `Clip { lo: 0, hi: 6 }`.
    Clip { lo: f32, hi: f32 },
}

impl Activation {
    /// ReLU.
    pub const RELU: Activation = Activation::Clip {
        lo: 0.0,
        hi: f32::INFINITY,
    };

    /// Applies the activation in place.
    #[inline]
    pub fn apply(self, values: &mut [f32]) {
        if let Activation::Clip { lo, hi } = self {
            for v in values {
                *v = v.max(lo).min(hi);
            }
        }
    }

    /// `out = grad * d(activation)/d(input)`, with the derivative read from the activation's
    /// `output`: 1 strictly inside the clip bounds, 0 where the output was clipped.
    #[inline]
    pub fn backward(self, output: &[f32], grad: &[f32], out: &mut [f32]) {
        // SAFETY: `backward_into` only writes initialised values.
        let out = unsafe { &mut *(out as *mut [f32] as *mut [MaybeUninit<f32>]) };
        self.backward_into(output, grad, out);
    }

    /// [`Self::backward`] into memory not yet initialised; every value of `out` is written.
    #[inline]
    pub fn backward_into(self, output: &[f32], grad: &[f32], out: &mut [MaybeUninit<f32>]) {
        assert!(
            output.len() == out.len() && grad.len() == out.len(),
            "one gradient per output"
        );
        match self {
            Activation::Identity => {
                for (o, &g) in out.iter_mut().zip(grad) {
                    o.write(g);
                }
            }
            Activation::Clip { lo, hi } => {
                for ((o, &y), &g) in out.iter_mut().zip(output).zip(grad) {
                    o.write(if y > lo && y < hi { g } else { 0.0 });
                }
            }
        }
    }

    /// The activation as candle ops, for devices without the fused kernels.
    pub fn apply_tensor(self, x: Tensor) -> candle_core::Result<Tensor> {
        match self {
            Activation::Identity => Ok(x),
            Activation::Clip { lo, hi } => {
                let x = x.maximum(lo as f64)?;
                if hi.is_finite() {
                    x.minimum(hi as f64)
                } else {
                    Ok(x)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_passes_gradients_only_strictly_inside_its_bounds() {
        let relu6 = Activation::Clip { lo: 0.0, hi: 6.0 };
        let mut y = [-1.0, 0.5, 7.0, 6.0, 0.0];
        relu6.apply(&mut y);
        assert_eq!(y, [0.0, 0.5, 6.0, 6.0, 0.0]);
        let mut g = [0.0; 5];
        relu6.backward(&y, &[1.0, 2.0, 3.0, 4.0, 5.0], &mut g);
        assert_eq!(g, [0.0, 2.0, 0.0, 0.0, 0.0]);
        Activation::Identity.backward(&y, &[1.0, 2.0, 3.0, 4.0, 5.0], &mut g);
        assert_eq!(g, [1.0, 2.0, 3.0, 4.0, 5.0]);
        let mut r = [-2.0, 1e9];
        Activation::RELU.apply(&mut r);
        assert_eq!(r, [0.0, 1e9]);
    }
}
