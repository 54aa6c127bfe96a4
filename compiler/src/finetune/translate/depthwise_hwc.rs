//! Depthwise convolution on small planes, channels last: the forward pass and the gradients of
//! [`super::depthwise`] for planes of at most [`SMALL_PLANE`] outputs (Lite0's 14x14 and 7x7).
//!
//! There a plane is a few dozen values: the per-plane kernels spend their time setting up each
//! of the batch's thousands of planes (16 x 1,152 at 7x7), not multiplying. Here one image is
//! copied into a zero-padded `[H, W, C]` buffer and every tap is one multiply-add along the
//! channels, a vector of 1,152 contiguous values for each output pixel; the weights are laid out
//! `[tap, C]` to match. The output (forward) and the input gradient (backward) are transposed
//! back to `[C, H, W]` once per image. The loops are compiled for the baseline CPU and for
//! AVX2 + FMA, chosen once at start-up like the per-plane kernels.

use rayon::prelude::*;

use super::activation::Activation;
#[cfg(target_arch = "x86_64")]
use super::conv::avx2_fma;
use super::conv::{input_gradient_slots, Geometry};

/// Planes of at most this many outputs take the channels-last kernels.
pub(super) const SMALL_PLANE: usize = 14 * 14;

/// Whether a depthwise convolution takes the channels-last kernels: small planes, and enough
/// channels to fill vectors.
pub(super) fn small(g: &Geometry) -> bool {
    g.plane_out() <= SMALL_PLANE && g.channels >= 16
}

/// One image's padded input, channels last, and where each tap reads in it.
struct Layout {
    g: Geometry,
    /// Padded width.
    wp: usize,
    /// Per tap, `(row, column)` offsets in the padded image of what output `(0, 0)` reads.
    taps: Vec<(usize, usize)>,
}

impl Layout {
    fn new(g: Geometry) -> Layout {
        let [_, left, _, right] = g.attrs.pads;
        let mut taps = Vec::with_capacity(g.taps());
        for ky in 0..g.kernel[0] {
            for kx in 0..g.kernel[1] {
                taps.push((ky * g.attrs.dilations[0], kx * g.attrs.dilations[1]));
            }
        }
        Layout {
            g,
            wp: g.width + left + right,
            taps,
        }
    }

    fn padded_len(&self) -> usize {
        let [top, _, bottom, _] = self.g.attrs.pads;
        (self.g.height + top + bottom) * self.wp * self.g.channels
    }

    /// Start, in the padded image, of the channels that output `(oy, ox)` reads at `tap`.
    #[inline(always)]
    fn source(&self, oy: usize, ox: usize, (dy, dx): (usize, usize)) -> usize {
        let [sy, sx] = self.g.attrs.strides;
        ((oy * sy + dy) * self.wp + ox * sx + dx) * self.g.channels
    }

    /// Copies one `[C, H, W]` image into `buf`, zero-padded and channels last.
    #[inline(always)]
    fn pad(&self, image: &[f32], buf: &mut Vec<f32>) {
        let (c, [top, left, _, _]) = (self.g.channels, self.g.attrs.pads);
        buf.clear();
        buf.resize(self.padded_len(), 0.0);
        for (ch, plane) in image.chunks_exact(self.g.plane_in()).enumerate() {
            for (y, row) in plane.chunks_exact(self.g.width).enumerate() {
                let start = ((y + top) * self.wp + left) * c + ch;
                for (x, &v) in row.iter().enumerate() {
                    buf[start + x * c] = v;
                }
            }
        }
    }

    /// The inverse of [`Self::pad`] for a gradient: the padded channels-last `buf` cropped into
    /// the `[C, H, W]` image `out`.
    #[inline(always)]
    fn crop(&self, buf: &[f32], out: &mut [f32]) {
        let (c, [top, left, _, _]) = (self.g.channels, self.g.attrs.pads);
        for (ch, plane) in out.chunks_exact_mut(self.g.plane_in()).enumerate() {
            for (y, row) in plane.chunks_exact_mut(self.g.width).enumerate() {
                let start = ((y + top) * self.wp + left) * c + ch;
                for (x, v) in row.iter_mut().enumerate() {
                    *v = buf[start + x * c];
                }
            }
        }
    }
}

/// `out += w * x`, element by element.
#[inline(always)]
fn fma(out: &mut [f32], w: &[f32], x: &[f32]) {
    for ((o, &w), &x) in out.iter_mut().zip(w).zip(x) {
        *o += w * x;
    }
}

/// `[C, taps]` weights as `[taps, C]`.
fn by_tap(w: &[f32], channels: usize, taps: usize) -> Vec<f32> {
    let mut out = vec![0f32; w.len()];
    for (c, row) in w.chunks_exact(taps.max(1)).enumerate().take(channels) {
        for (t, &v) in row.iter().enumerate() {
            out[t * channels + c] = v;
        }
    }
    out
}

/// A worker's buffers.
#[derive(Default)]
struct Scratch {
    padded: Vec<f32>,
    pixels: Vec<f32>,
    grad: Vec<f32>,
}

/// One image's output `[C, P]`: the taps along the channels of each pixel, then transposed back
/// through the activation.
#[inline(always)]
fn forward_image(
    l: &Layout,
    (image, wt, b, activation): (&[f32], &[f32], &[f32], Activation),
    s: &mut Scratch,
    out: &mut [f32],
) {
    let (c, [oh, ow], p) = (l.g.channels, l.g.out, l.g.plane_out());
    l.pad(image, &mut s.padded);
    s.pixels.clear();
    s.pixels.resize(p * c, 0.0);
    for (pixel, acc) in s.pixels.chunks_exact_mut(c).enumerate() {
        let (oy, ox) = (pixel / ow, pixel % ow);
        acc.copy_from_slice(b);
        for (t, &tap) in l.taps.iter().enumerate() {
            let src = l.source(oy, ox, tap);
            fma(acc, &wt[t * c..(t + 1) * c], &s.padded[src..src + c]);
        }
    }
    debug_assert_eq!(oh * ow, p);
    for (ch, plane) in out.chunks_exact_mut(p).enumerate() {
        for (v, acc) in plane.iter_mut().zip(s.pixels.chunks_exact(c)) {
            *v = acc[ch];
        }
        activation.apply(plane);
    }
}

/// One image's gradients: weight (`[taps, C]`, added to `gwt`) and bias (added to `gb`) sums,
/// and the input gradient written to `gx` when given.
#[inline(always)]
fn backward_image(
    l: &Layout,
    [image, wt, y, grad]: [&[f32]; 4],
    activation: Activation,
    s: &mut Scratch,
    (gwt, gb, gx): (&mut [f32], &mut [f32], Option<&mut [f32]>),
) {
    let (c, ow, p) = (l.g.channels, l.g.out[1], l.g.plane_out());
    // The output gradient through the activation, channels last.
    s.grad.clear();
    s.grad.resize(p, 0.0);
    s.pixels.clear();
    s.pixels.resize(p * c, 0.0);
    for ch in 0..c {
        let plane = ch * p..(ch + 1) * p;
        activation.backward(&y[plane.clone()], &grad[plane], &mut s.grad);
        for (pixel, &g) in s.grad.iter().enumerate() {
            s.pixels[pixel * c + ch] = g;
        }
    }
    l.pad(image, &mut s.padded);
    let mut gx_padded = gx.as_ref().map(|_| vec![0f32; l.padded_len()]);
    for (pixel, g) in s.pixels.chunks_exact(c).enumerate() {
        let (oy, ox) = (pixel / ow, pixel % ow);
        gb.iter_mut().zip(g).for_each(|(s, &v)| *s += v);
        for (t, &tap) in l.taps.iter().enumerate() {
            let src = l.source(oy, ox, tap);
            fma(&mut gwt[t * c..(t + 1) * c], g, &s.padded[src..src + c]);
            if let Some(gxp) = gx_padded.as_deref_mut() {
                fma(&mut gxp[src..src + c], &wt[t * c..(t + 1) * c], g);
            }
        }
    }
    if let (Some(gx), Some(gxp)) = (gx, gx_padded) {
        l.crop(&gxp, gx);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn forward_image_avx2(
    l: &Layout,
    operands: (&[f32], &[f32], &[f32], Activation),
    s: &mut Scratch,
    out: &mut [f32],
) {
    forward_image(l, operands, s, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn backward_image_avx2(
    l: &Layout,
    data: [&[f32]; 4],
    activation: Activation,
    s: &mut Scratch,
    sums: (&mut [f32], &mut [f32], Option<&mut [f32]>),
) {
    backward_image(l, data, activation, s, sums)
}

/// `activation(depthwise(x, w) + b)` for `[N, C, H, W]` input, `[C, taps]` weights: `[N, C, P]`.
pub(super) fn forward(g: Geometry, [x, w, b]: [&[f32]; 3], activation: Activation) -> Vec<f32> {
    let l = Layout::new(g);
    let wt = by_tap(w, g.channels, g.taps());
    let (image_in, image_out) = (g.channels * g.plane_in(), g.channels * g.plane_out());
    let mut y = vec![0f32; g.batch * image_out];
    y.par_chunks_mut(image_out.max(1))
        .enumerate()
        .for_each_init(Scratch::default, |s, (n, out)| {
            let operands = (&x[n * image_in..(n + 1) * image_in], &wt[..], b, activation);
            #[cfg(target_arch = "x86_64")]
            if avx2_fma() {
                // SAFETY: the CPU has AVX2 and FMA (checked once in `avx2_fma`).
                return unsafe { forward_image_avx2(&l, operands, s, out) };
            }
            forward_image(&l, operands, s, out)
        });
    y
}

/// The gradients of [`forward`]: input (when `x_grad`), weight `[C, taps]` and bias.
pub(super) fn backward(
    g: Geometry,
    [x, w, y, grad]: [&[f32]; 4],
    activation: Activation,
    x_grad: bool,
) -> (Option<Vec<f32>>, Vec<f32>, Vec<f32>) {
    let (c, taps) = (g.channels, g.taps());
    let l = Layout::new(g);
    let wt = by_tap(w, c, taps);
    let (image_in, image_out) = (c * g.plane_in(), c * g.plane_out());
    let mut gx = vec![0f32; if x_grad { g.batch * image_in } else { 0 }];
    let slots = input_gradient_slots(&mut gx, g.batch, image_in);
    let zero = || (vec![0f32; taps * c], vec![0f32; c], Scratch::default());
    let (gwt, gb, _) = slots
        .into_par_iter()
        .enumerate()
        .fold(zero, |(mut gwt, mut gb, mut s), (n, gx)| {
            let out = n * image_out..(n + 1) * image_out;
            let data = [
                &x[n * image_in..(n + 1) * image_in],
                &wt[..],
                &y[out.clone()],
                &grad[out],
            ];
            let sums = (&mut gwt[..], &mut gb[..], gx);
            #[cfg(target_arch = "x86_64")]
            if avx2_fma() {
                // SAFETY: the CPU has AVX2 and FMA (checked once in `avx2_fma`).
                unsafe { backward_image_avx2(&l, data, activation, &mut s, sums) };
                return (gwt, gb, s);
            }
            backward_image(&l, data, activation, &mut s, sums);
            (gwt, gb, s)
        })
        .reduce(zero, |(mut gwt, mut gb, s), (gwt2, gb2, _)| {
            gwt.iter_mut().zip(gwt2).for_each(|(a, v)| *a += v);
            gb.iter_mut().zip(gb2).for_each(|(a, v)| *a += v);
            (gwt, gb, s)
        });
    // [taps, C] -> [C, taps].
    let mut gw = vec![0f32; c * taps];
    for (t, row) in gwt.chunks_exact(c.max(1)).enumerate() {
        for (ch, &v) in row.iter().enumerate() {
            gw[ch * taps + t] = v;
        }
    }
    (x_grad.then_some(gx), gw, gb)
}
