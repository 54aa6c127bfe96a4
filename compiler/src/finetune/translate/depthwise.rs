//! Depthwise convolution as one candle custom op with its own backward pass, for f32 on CPU.
//!
//! candle runs a grouped convolution as one convolution per channel, and the portable
//! shifted-slice formulation in [`super::depthwise_conv`] allocates two full activations per
//! kernel tap. Here the forward pass, the input gradient and the weight gradient are each one
//! pass over the data, parallel over channel planes.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Geometry shared by the three kernels.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    batch: usize,
    channels: usize,
    height: usize,
    width: usize,
    kernel: [usize; 2],
    strides: [usize; 2],
    dilations: [usize; 2],
    out: [usize; 2],
}

impl Geometry {
    fn new(
        input: &[usize],
        weight: &[usize],
        strides: [usize; 2],
        dilations: [usize; 2],
    ) -> Geometry {
        let out = |size: usize, k: usize, s: usize, d: usize| (size - d * (k - 1) - 1) / s + 1;
        Geometry {
            batch: input[0],
            channels: input[1],
            height: input[2],
            width: input[3],
            kernel: [weight[2], weight[3]],
            strides,
            dilations,
            out: [
                out(input[2], weight[2], strides[0], dilations[0]),
                out(input[3], weight[3], strides[1], dilations[1]),
            ],
        }
    }

    /// Values in one input plane, in one output plane, and kernel taps.
    fn sizes(&self) -> (usize, usize, usize) {
        (
            self.height * self.width,
            self.out[0] * self.out[1],
            self.kernel[0] * self.kernel[1],
        )
    }

    /// Calls `f(tap, input offset in the plane, output offset in the plane)` for every tap and
    /// output position.
    #[inline]
    fn for_each(&self, mut f: impl FnMut(usize, usize, usize)) {
        let [kh, kw] = self.kernel;
        let [oh, ow] = self.out;
        for ky in 0..kh {
            for kx in 0..kw {
                let tap = ky * kw + kx;
                for oy in 0..oh {
                    let y = oy * self.strides[0] + ky * self.dilations[0];
                    let row = y * self.width + kx * self.dilations[1];
                    for ox in 0..ow {
                        f(tap, row + ox * self.strides[1], oy * ow + ox);
                    }
                }
            }
        }
    }
}

fn slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("depthwise conv needs contiguous tensors"),
    }
}

/// `y = depthwise(x, w)`: x `[N, C, H, W]` (already padded), w `[C, 1, KH, KW]`.
struct Forward {
    strides: [usize; 2],
    dilations: [usize; 2],
}

impl CustomOp2 for Forward {
    fn name(&self) -> &'static str {
        "graft-depthwise-conv"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (slice(s1, l1)?, slice(s2, l2)?);
        let g = Geometry::new(l1.dims(), l2.dims(), self.strides, self.dilations);
        let (plane_in, plane_out, taps) = g.sizes();
        let mut y = vec![0f32; g.batch * g.channels * plane_out];
        y.par_chunks_mut(plane_out)
            .enumerate()
            .for_each(|(p, out)| {
                let c = p % g.channels;
                let input = &x[p * plane_in..(p + 1) * plane_in];
                let weights = &w[c * taps..(c + 1) * taps];
                g.for_each(|tap, i, o| out[o] += input[i] * weights[tap]);
            });
        Ok((
            CpuStorage::F32(y),
            Shape::from((g.batch, g.channels, g.out[0], g.out[1])),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let grad_x = grad.apply_op2_no_bwd(
            w,
            &InputGradient {
                strides: self.strides,
                dilations: self.dilations,
                input: [x.dim(2)?, x.dim(3)?],
            },
        )?;
        let grad_w = x.apply_op2_no_bwd(
            &grad,
            &WeightGradient {
                strides: self.strides,
                dilations: self.dilations,
                kernel: [w.dim(2)?, w.dim(3)?],
            },
        )?;
        Ok((Some(grad_x), Some(grad_w)))
    }
}

/// `dL/dx` from `dL/dy` `[N, C, OH, OW]` and w.
struct InputGradient {
    strides: [usize; 2],
    dilations: [usize; 2],
    input: [usize; 2],
}

impl CustomOp2 for InputGradient {
    fn name(&self) -> &'static str {
        "graft-depthwise-conv-input-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (gy, w) = (slice(s1, l1)?, slice(s2, l2)?);
        let d = l1.dims();
        let g = Geometry::new(
            &[d[0], d[1], self.input[0], self.input[1]],
            l2.dims(),
            self.strides,
            self.dilations,
        );
        let (plane_in, plane_out, taps) = g.sizes();
        let mut gx = vec![0f32; g.batch * g.channels * plane_in];
        gx.par_chunks_mut(plane_in)
            .enumerate()
            .for_each(|(p, out)| {
                let c = p % g.channels;
                let grad = &gy[p * plane_out..(p + 1) * plane_out];
                let weights = &w[c * taps..(c + 1) * taps];
                g.for_each(|tap, i, o| out[i] += grad[o] * weights[tap]);
            });
        Ok((
            CpuStorage::F32(gx),
            Shape::from((g.batch, g.channels, g.height, g.width)),
        ))
    }
}

/// `dL/dw` from x and `dL/dy`.
struct WeightGradient {
    strides: [usize; 2],
    dilations: [usize; 2],
    kernel: [usize; 2],
}

impl CustomOp2 for WeightGradient {
    fn name(&self) -> &'static str {
        "graft-depthwise-conv-weight-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, gy) = (slice(s1, l1)?, slice(s2, l2)?);
        let d = l1.dims();
        let g = Geometry::new(
            d,
            &[d[1], 1, self.kernel[0], self.kernel[1]],
            self.strides,
            self.dilations,
        );
        let (plane_in, plane_out, taps) = g.sizes();
        let mut gw = vec![0f32; g.channels * taps];
        gw.par_chunks_mut(taps).enumerate().for_each(|(c, out)| {
            for n in 0..g.batch {
                let p = n * g.channels + c;
                let input = &x[p * plane_in..(p + 1) * plane_in];
                let grad = &gy[p * plane_out..(p + 1) * plane_out];
                g.for_each(|tap, i, o| out[tap] += input[i] * grad[o]);
            }
        });
        Ok((
            CpuStorage::F32(gw),
            Shape::from((g.channels, 1, g.kernel[0], g.kernel[1])),
        ))
    }
}

/// Depthwise convolution of a padded `[N, C, H, W]` f32 CPU tensor with `[C, 1, KH, KW]` weights.
pub fn depthwise_conv_cpu(
    x: &Tensor,
    weight: &Tensor,
    strides: [usize; 2],
    dilations: [usize; 2],
) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, Forward { strides, dilations })
}
