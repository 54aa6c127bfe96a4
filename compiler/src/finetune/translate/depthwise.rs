//! Depthwise convolution (`group == channels`) as one candle custom op on f32 CPU tensors, with
//! padding, bias and the following activation fused, like [`super::conv`].
//!
//! candle runs a grouped convolution as one convolution per channel, and the portable
//! shifted-slice formulation in [`super::depthwise_conv`] allocates two full activations per
//! kernel tap. Here the forward pass is one pass over the data and the input, weight and bias
//! gradients together one more, parallel over channel planes.
//!
//! Each plane is first copied, zero-padded, into `stride x stride` phase planes (rows and
//! columns `j * stride + phase`). In that layout every kernel tap reads one contiguous run of
//! the input for the whole output plane, written with the phase plane's row length ("wide"
//! rows whose last columns are discarded): one long multiply-add per tap instead of one short
//! loop per output row (a per-row loop spent its time in loop overhead on small planes). Planes
//! of at most 14x14 with 16 channels or more go to [`super::depthwise_hwc`] instead, which
//! works along the channels: there even this per-plane setup was most of the time. The
//! per-plane kernels are compiled twice, for the baseline CPU and for AVX2 + FMA, and the AVX2
//! copy is chosen once at run time when the CPU has it.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::activation::Activation;
#[cfg(target_arch = "x86_64")]
use super::conv::avx2_fma;
use super::conv::{fused_backward, input_gradient_slots, operands, slice, ConvAttrs, Geometry};
use super::depthwise_hwc;
use crate::finetune::profile;

/// `y = activation(depthwise(x, w) + b)`: x `[N, C, H, W]`, w `[C, 1, KH, KW]`, b `[C]`.
struct Depthwise {
    attrs: ConvAttrs,
    activation: Activation,
}

/// The padded, phase-split layout of one plane and where each tap reads in it.
#[derive(Debug, Clone)]
struct Plan {
    g: Geometry,
    /// Row length of each phase plane, and of the wide output rows.
    width: usize,
    /// Length of one phase plane: its rows and one slack row that wide rows may read into.
    phase_len: usize,
    /// Per tap, the offset in the split plane that output `(0, 0)` reads.
    offsets: Vec<usize>,
}

impl Plan {
    fn new(g: Geometry) -> Plan {
        let ([sy, sx], [dy, dx]) = (g.attrs.strides, g.attrs.dilations);
        let [top, left, bottom, right] = g.attrs.pads;
        let width = (g.width + left + right).div_ceil(sx);
        let rows = (g.height + top + bottom).div_ceil(sy);
        let phase_len = (rows + 1) * width;
        let mut offsets = Vec::with_capacity(g.taps());
        for ky in 0..g.kernel[0] {
            for kx in 0..g.kernel[1] {
                let (y, x) = (ky * dy, kx * dx);
                let phase = (y % sy) * sx + x % sx;
                offsets.push(phase * phase_len + (y / sy) * width + x / sx);
            }
        }
        Plan {
            g,
            width,
            phase_len,
            offsets,
        }
    }

    /// Length of the split plane.
    fn split_len(&self) -> usize {
        self.g.attrs.strides[0] * self.g.attrs.strides[1] * self.phase_len
    }

    /// Length of the wide output plane.
    fn wide_len(&self) -> usize {
        self.g.out[0] * self.width
    }

    /// Where input value `(y, x)` goes in the split plane.
    #[inline]
    fn split_index(&self, y: usize, x: usize) -> usize {
        let [sy, sx] = self.g.attrs.strides;
        let (py, px) = (y + self.g.attrs.pads[0], x + self.g.attrs.pads[1]);
        ((py % sy) * sx + px % sx) * self.phase_len + (py / sy) * self.width + px / sx
    }

    /// Calls `f(input offset, split offset, count, step)` for runs of one input row that go to
    /// one contiguous run of the split plane: every `step`-th input value, from the input offset.
    #[inline(always)]
    fn for_each_run(&self, mut f: impl FnMut(usize, usize, usize, usize)) {
        let (w, sx) = (self.g.width, self.g.attrs.strides[1]);
        for y in 0..self.g.height {
            for first in 0..sx.min(w) {
                let count = (w - first).div_ceil(sx);
                f(y * w + first, self.split_index(y, first), count, sx);
            }
        }
    }

    /// Copies a plane into a zeroed split plane.
    #[inline(always)]
    fn split_plane(&self, plane: &[f32], out: &mut Vec<f32>) {
        out.clear();
        out.resize(self.split_len(), 0.0);
        self.for_each_run(|src, dst, count, step| {
            let dst = &mut out[dst..dst + count];
            if step == 1 {
                dst.copy_from_slice(&plane[src..src + count]);
            } else {
                for (d, s) in dst.iter_mut().zip(plane[src..].iter().step_by(step)) {
                    *d = *s;
                }
            }
        });
    }

    /// Reads a plane back out of a split plane (dropping the padding).
    #[inline(always)]
    fn merge_plane(&self, split: &[f32], plane: &mut [f32]) {
        self.for_each_run(|dst, src, count, step| {
            let src = &split[src..src + count];
            if step == 1 {
                plane[dst..dst + count].copy_from_slice(src);
            } else {
                for (d, s) in plane[dst..].iter_mut().step_by(step).zip(src) {
                    *d = *s;
                }
            }
        });
    }
}

/// `out += w * x`.
#[inline(always)]
fn axpy(out: &mut [f32], w: f32, x: &[f32]) {
    for (o, v) in out.iter_mut().zip(x) {
        *o += w * v;
    }
}

/// Sum of products in eight lanes, so that it vectorizes.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// One wide output plane (set to `bias` plus each tap times its run of the split input).
#[inline(always)]
fn forward_plane(plan: &Plan, split: &[f32], weights: &[f32], bias: f32, wide: &mut [f32]) {
    wide.fill(bias);
    let n = wide.len();
    for (&offset, &w) in plan.offsets.iter().zip(weights) {
        axpy(wide, w, &split[offset..offset + n]);
    }
}

/// One plane's weight gradient (added to `gw`) and, when given, its split input gradient
/// (added to `gx`), from the wide output gradient `gy` (zero in the discarded columns).
#[inline(always)]
fn backward_plane(
    plan: &Plan,
    split: &[f32],
    weights: &[f32],
    gy: &[f32],
    gw: &mut [f32],
    mut gx: Option<&mut [f32]>,
) {
    let n = gy.len();
    for ((&offset, &w), gw) in plan.offsets.iter().zip(weights).zip(gw) {
        *gw += dot(gy, &split[offset..offset + n]);
        if let Some(gx) = gx.as_deref_mut() {
            axpy(&mut gx[offset..offset + n], w, gy);
        }
    }
}

/// One plane's forward pass: split, taps, compacted into `out`, activation.
#[inline(always)]
fn forward_job(
    job: &Job,
    x: &[f32],
    weights: &[f32],
    bias: f32,
    scratch: &mut Scratch,
    out: &mut [f32],
) {
    let (plan, ow) = (job.plan, job.plan.g.out[1]);
    plan.split_plane(x, &mut scratch.split);
    scratch.wide.resize(plan.wide_len(), 0.0);
    forward_plane(plan, &scratch.split, weights, bias, &mut scratch.wide);
    for (dst, src) in out
        .chunks_exact_mut(ow)
        .zip(scratch.wide.chunks_exact(plan.width))
    {
        dst.copy_from_slice(&src[..ow]);
    }
    job.activation.apply(out);
}

/// One plane's backward pass: the output gradient through the activation in wide rows, its
/// sum (the bias gradient, returned), the weight gradient (added to `gw`) and, when given, the
/// input gradient (written to `gx`).
#[inline(always)]
fn backward_job(
    job: &Job,
    [x, weights, y, grad]: [&[f32]; 4],
    scratch: &mut Scratch,
    gw: &mut [f32],
    gx: Option<&mut [f32]>,
) -> f32 {
    let (plan, ow) = (job.plan, job.plan.g.out[1]);
    scratch.wide.clear();
    scratch.wide.resize(plan.wide_len(), 0.0);
    for ((dst, y), grad) in scratch
        .wide
        .chunks_exact_mut(plan.width)
        .zip(y.chunks_exact(ow))
        .zip(grad.chunks_exact(ow))
    {
        job.activation.backward(y, grad, &mut dst[..ow]);
    }
    plan.split_plane(x, &mut scratch.split);
    scratch.gx.clear();
    scratch
        .gx
        .resize(if gx.is_some() { plan.split_len() } else { 0 }, 0.0);
    let split_gx = gx.is_some().then_some(&mut scratch.gx[..]);
    backward_plane(plan, &scratch.split, weights, &scratch.wide, gw, split_gx);
    if let Some(gx) = gx {
        plan.merge_plane(&scratch.gx, gx);
    }
    scratch.wide.iter().sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn forward_job_avx2(
    job: &Job,
    x: &[f32],
    weights: &[f32],
    bias: f32,
    scratch: &mut Scratch,
    out: &mut [f32],
) {
    forward_job(job, x, weights, bias, scratch, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn backward_job_avx2(
    job: &Job,
    data: [&[f32]; 4],
    scratch: &mut Scratch,
    gw: &mut [f32],
    gx: Option<&mut [f32]>,
) -> f32 {
    backward_job(job, data, scratch, gw, gx)
}

/// What every plane of one call shares.
struct Job<'a> {
    plan: &'a Plan,
    activation: Activation,
}

type ForwardJob = fn(&Job, &[f32], &[f32], f32, &mut Scratch, &mut [f32]);
type BackwardJob = fn(&Job, [&[f32]; 4], &mut Scratch, &mut [f32], Option<&mut [f32]>) -> f32;

/// The per-plane kernels for this CPU, chosen once.
#[derive(Clone, Copy)]
struct Kernels {
    forward: ForwardJob,
    backward: BackwardJob,
}

fn kernels() -> Kernels {
    static KERNELS: std::sync::OnceLock<Kernels> = std::sync::OnceLock::new();
    *KERNELS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if avx2_fma() {
            return Kernels {
                // SAFETY: only chosen when the CPU has AVX2 and FMA.
                forward: |j, x, w, b, s, o| unsafe { forward_job_avx2(j, x, w, b, s, o) },
                backward: |j, d, s, gw, gx| unsafe { backward_job_avx2(j, d, s, gw, gx) },
            };
        }
        Kernels {
            forward: forward_job,
            backward: backward_job,
        }
    })
}

/// A worker's scratch: a split plane, a wide plane and (backward) a split gradient.
#[derive(Default)]
struct Scratch {
    split: Vec<f32>,
    wide: Vec<f32>,
    gx: Vec<f32>,
}

impl CustomOp3 for Depthwise {
    fn name(&self) -> &'static str {
        "graft-depthwise-conv"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let geometry = Geometry::new(l1.dims(), l2.dims(), self.attrs)?;
        let _timer = profile::Timer::start("depthwise forward");
        let shape = Shape::from((
            geometry.batch,
            geometry.channels,
            geometry.out[0],
            geometry.out[1],
        ));
        if depthwise_hwc::small(&geometry) {
            let y = depthwise_hwc::forward(geometry, [x, w, b], self.activation);
            return Ok((CpuStorage::F32(y), shape));
        }
        let plan = Plan::new(geometry);
        let g = plan.g;
        let (plane_in, plane_out, taps) = (g.plane_in(), g.plane_out(), g.taps());
        let forward = kernels().forward;
        let job = Job {
            plan: &plan,
            activation: self.activation,
        };
        let mut y = vec![0f32; g.batch * g.channels * plane_out];
        y.par_chunks_mut(plane_out.max(1))
            .enumerate()
            .for_each_init(Scratch::default, |scratch, (p, out)| {
                let c = p % g.channels;
                let x = &x[p * plane_in..(p + 1) * plane_in];
                forward(&job, x, &w[c * taps..(c + 1) * taps], b[c], scratch, out);
            });
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let geometry = Geometry::new(x.dims(), w.dims(), self.attrs)?;
        if depthwise_hwc::small(&geometry) {
            return fused_backward([x, w, y, grad], "depthwise backward", |data, x_grad| {
                depthwise_hwc::backward(geometry, data, self.activation, x_grad)
            });
        }
        let plan = Plan::new(geometry);
        fused_backward([x, w, y, grad], "depthwise backward", |data, x_grad| {
            self.backward(&plan, data, x_grad)
        })
    }
}

impl Depthwise {
    /// Input gradient per plane, and per-plane weight and bias gradients summed over the batch.
    fn backward(
        &self,
        plan: &Plan,
        [x, w, y, grad]: [&[f32]; 4],
        x_grad: bool,
    ) -> (Option<Vec<f32>>, Vec<f32>, Vec<f32>) {
        let g = plan.g;
        let (plane_in, plane_out, taps) = (g.plane_in(), g.plane_out(), g.taps());
        let planes = g.batch * g.channels;
        let backward = kernels().backward;
        let job = Job {
            plan,
            activation: self.activation,
        };
        let mut gx = vec![0f32; if x_grad { planes * plane_in } else { 0 }];
        let slots = input_gradient_slots(&mut gx, planes, plane_in);
        let mut plane_gw = vec![0f32; planes * taps];
        let mut plane_gb = vec![0f32; planes];
        slots
            .into_par_iter()
            .zip(plane_gw.par_chunks_mut(taps.max(1)))
            .zip(plane_gb.par_iter_mut())
            .enumerate()
            .for_each_init(Scratch::default, |scratch, (p, ((gx, gw), gb))| {
                let c = p % g.channels;
                let (input, out) = (
                    p * plane_in..(p + 1) * plane_in,
                    p * plane_out..(p + 1) * plane_out,
                );
                let data = [
                    &x[input],
                    &w[c * taps..(c + 1) * taps],
                    &y[out.clone()],
                    &grad[out],
                ];
                *gb = backward(&job, data, scratch, gw, gx);
            });
        let mut gw = vec![0f32; g.channels * taps];
        let mut gb = vec![0f32; g.channels];
        for (p, (pw, &pb)) in plane_gw
            .chunks_exact(taps.max(1))
            .zip(&plane_gb)
            .enumerate()
        {
            let c = p % g.channels;
            gw[c * taps..(c + 1) * taps]
                .iter_mut()
                .zip(pw)
                .for_each(|(s, v)| *s += v);
            gb[c] += pb;
        }
        (x_grad.then_some(gx), gw, gb)
    }
}

/// `activation(depthwise(x, w) + b)` for an unpadded `[N, C, H, W]` f32 CPU tensor and
/// `[C, 1, KH, KW]` weights; `b` is zeros when absent.
pub fn depthwise_conv_cpu(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    attrs: ConvAttrs,
    activation: Activation,
) -> Result<Tensor> {
    let [x, weight, bias] = operands(x, weight, bias)?;
    x.apply_op3(&weight, &bias, Depthwise { attrs, activation })
}
