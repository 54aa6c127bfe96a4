//! Global average pooling (`[N, C, H, W]` -> `[N, C, 1, 1]`) as one candle custom op on f32 CPU
//! tensors.
//!
//! As candle ops (`mean_keepdim` over W, then H) its backward pass hands the convolution before it
//! a broadcast gradient, which candle then copies element by element into a contiguous tensor:
//! at 7x7 with 1,280 channels that copy was most of what was left of a top-2 step's backward
//! pass outside graft's kernels. Here the backward pass writes the spread gradient directly.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::conv::slice;

/// The mean of each `[H, W]` plane.
struct GlobalAverage;

impl CustomOp1 for GlobalAverage {
    fn name(&self) -> &'static str {
        "graft-global-average-pool"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(storage, layout)?;
        let (n, c, h, w) = layout.shape().dims4()?;
        let plane = (h * w).max(1);
        let means = x
            .par_chunks(plane)
            .map(|p| p.iter().sum::<f32>() / plane as f32)
            .collect();
        Ok((CpuStorage::F32(means), Shape::from((n, c, 1, 1))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (_, _, h, w) = arg.dims4()?;
        let plane = h * w;
        let scale = 1.0 / plane.max(1) as f32;
        let grad = grad.flatten_all()?.to_vec1::<f32>()?;
        let mut spread = vec![0f32; grad.len() * plane];
        spread
            .par_chunks_mut(plane.max(1))
            .zip(grad.par_iter())
            .for_each(|(out, &g)| out.fill(g * scale));
        Ok(Some(Tensor::from_vec(spread, arg.shape(), arg.device())?))
    }
}

/// ONNX GlobalAveragePool: graft's op for f32 tensors on the CPU, candle's means elsewhere.
pub fn global_average_pool(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && x.rank() == 4 {
        return x.contiguous()?.apply_op1(GlobalAverage);
    }
    x.mean_keepdim(3)?.mean_keepdim(2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::testing::max_abs_diff;
    use candle_core::{Device, Var};

    #[test]
    fn matches_candle_means_forward_and_backward() {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 5, 7, 3), &Device::Cpu).unwrap())
            .unwrap();
        let weights = Tensor::randn(0f32, 1.0, (2, 5, 1, 1), &Device::Cpu).unwrap();
        let fast = global_average_pool(&x).unwrap();
        let slow = x.mean_keepdim(3).unwrap().mean_keepdim(2).unwrap();
        assert_eq!(fast.dims(), [2, 5, 1, 1]);
        assert!(max_abs_diff(&fast, &slow) < 1e-6);
        let gradient = |y: &Tensor| {
            let grads = (y * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            grads.get(&x).unwrap().clone()
        };
        assert!(max_abs_diff(&gradient(&fast), &gradient(&slow)) < 1e-7);
    }
}
