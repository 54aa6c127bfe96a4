//! Depthwise convolution of small planes, 16 channels at a time (AVX-512).
//!
//! The plane-at-a-time loop of [`depthwise`](super::depthwise) vectorises along a row; on the
//! 14x14 and 7x7 planes of a network's last stages rows are shorter than two vectors, most of
//! each vector is padding, and per-channel set-up dominates (Lite0's 7x7 layers ran at a tenth
//! of the FMA rate). Here one vector holds one pixel of 16 channels: each group of 16 input
//! planes is transposed into a zero-padded pixel-major buffer (`[y][x][16]`), every output pixel
//! is `bias + sum of w[tap] * pixel[tap]` over whole vectors, 4 pixels at a time so each weight
//! vector is loaded once for 4 multiply-adds, and the results are transposed back into planes.
//! (AVX-512 gathers for the transposes measured no faster than plain loops here.) Measured on
//! EPYC-VNNI, kernel alone (`cargo test --release -p graft-runtime --lib depthwise_blocked --
//! --ignored --nocapture`): 1152 x 7x7, 5x5 taps, 137 -> 98 us; 672 x 14x14, 202 -> 175 us;
//! on 28x28 planes the plane loop was faster, hence [`MAX_PLANE`].
//! Same summation order as the plane loop (bias, then taps in order, fused multiply-adds), so
//! the two give identical results.

#[cfg(target_arch = "x86_64")]
pub(super) use x86::convolve;

use super::conv::collapse;
use super::depthwise::DepthwiseConv;

/// Input planes of at most this many pixels go through the blocked kernel.
const MAX_PLANE: usize = 16 * 16;

/// Whether the blocked kernel computes `conv`: small planes, and clamps that are one clamp.
pub(super) fn applies(conv: &DepthwiseConv) -> bool {
    conv.input[0] * conv.input[1] <= MAX_PLANE && collapse(&conv.clamp).is_some()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::cast::{dequantize_portable, quantize_portable};
    use super::super::conv::collapse;
    use super::super::depthwise::{DepthwiseConv, Planes, Sink};

    /// `conv` on `input` into `output`, for a convolution [`applies`](super::applies) accepts.
    #[target_feature(enable = "avx512f,fma")]
    pub(in super::super) unsafe fn convolve(conv: &DepthwiseConv, input: Planes, mut output: Sink) {
        let [kh, kw] = conv.kernel;
        let [sh, sw] = conv.stride;
        let [ih, iw] = conv.input;
        let [oh, ow] = conv.output;
        let [pt, pl] = conv.pad;
        let [low, high] = collapse(&conv.clamp).expect("checked by applies");
        let (low, high) = (_mm512_set1_ps(low), _mm512_set1_ps(high));
        let taps = kh * kw;
        // The padded input every output reads, pixel-major, 16 channels a pixel; the padding
        // stays zero (only input pixels are rewritten, group after group).
        let (ph, pw) = ((oh - 1) * sh + kh, (ow - 1) * sw + kw);
        let mut padded = vec![0f32; ph * pw * 16];
        let (plane_in, plane_out) = (ih * iw, oh * ow);
        let mut results = vec![0f32; plane_out * 16];
        let mut weights = vec![0f32; taps * 16];
        let mut dequantized = vec![
            0f32;
            if matches!(input, Planes::Int8 { .. }) {
                16 * plane_in
            } else {
                0
            }
        ];
        let mut quantizing = vec![
            0f32;
            if matches!(output, Sink::Int8 { .. }) {
                plane_out
            } else {
                0
            }
        ];
        for c0 in (0..conv.channels).step_by(16) {
            let lanes = (conv.channels - c0).min(16);
            let mask: __mmask16 = ((1u32 << lanes) - 1) as u16;
            let source: &[f32] = match input {
                Planes::F32(values) => &values[c0 * plane_in..(c0 + lanes) * plane_in],
                Planes::Int8 {
                    values,
                    zero_point,
                    scale,
                } => {
                    let target = &mut dequantized[..lanes * plane_in];
                    dequantize_portable(
                        &values[c0 * plane_in..(c0 + lanes) * plane_in],
                        target,
                        zero_point,
                        scale,
                    );
                    target
                }
            };
            // Input pixels into the padded buffer (rows and columns past it are never read).
            let (rows, columns) = (ih.min(ph.saturating_sub(pt)), iw.min(pw.saturating_sub(pl)));
            for (c, plane) in source.chunks_exact(plane_in).enumerate() {
                for y in 0..rows {
                    let target = &mut padded[((y + pt) * pw + pl) * 16 + c..];
                    for (x, &v) in plane[y * iw..y * iw + columns].iter().enumerate() {
                        *target.get_unchecked_mut(x * 16) = v;
                    }
                }
            }
            for (tap, w) in weights.chunks_exact_mut(16).enumerate() {
                for (c, w) in w.iter_mut().enumerate() {
                    *w = if c < lanes {
                        conv.weights[(c0 + c) * taps + tap]
                    } else {
                        0.0
                    };
                }
            }
            let bias = _mm512_maskz_loadu_ps(mask, conv.bias.as_ptr().add(c0));
            let block = Block {
                padded: padded.as_ptr(),
                weights: weights.as_ptr(),
                kernel: [kh, kw],
                pw,
                bias,
                low,
                high,
            };
            for oy in 0..oh {
                let row = oy * sh * pw;
                let mut ox = 0;
                while ox + 4 <= ow {
                    block.pixels::<4>(
                        row + ox * sw,
                        sw,
                        results.as_mut_ptr().add((oy * ow + ox) * 16),
                    );
                    ox += 4;
                }
                while ox < ow {
                    block.pixels::<1>(
                        row + ox * sw,
                        sw,
                        results.as_mut_ptr().add((oy * ow + ox) * 16),
                    );
                    ox += 1;
                }
            }
            // Back to planes, 16 pixels of one channel at a time.
            for c in 0..lanes {
                let channel = c0 + c;
                let target: &mut [f32] = match &mut output {
                    Sink::F32(values) => {
                        &mut values[channel * plane_out..(channel + 1) * plane_out]
                    }
                    Sink::Int8 { .. } => &mut quantizing,
                };
                for (p, value) in target.iter_mut().enumerate() {
                    *value = *results.get_unchecked(p * 16 + c);
                }
                if let Sink::Int8 {
                    values,
                    zero_point,
                    scale,
                } = &mut output
                {
                    let plane = &mut values[channel * plane_out..(channel + 1) * plane_out];
                    quantize_portable(&quantizing, plane, *zero_point, *scale);
                }
            }
        }
    }

    /// One group of 16 channels: the padded input, the weights (`[tap][16]`) and the epilogue.
    struct Block {
        padded: *const f32,
        weights: *const f32,
        kernel: [usize; 2],
        pw: usize,
        bias: __m512,
        low: __m512,
        high: __m512,
    }

    impl Block {
        /// `N` outputs whose first tap reads padded pixel `start`, the next ones `stride`
        /// pixels further, stored 16 floats apart from `out`.
        #[inline(always)]
        unsafe fn pixels<const N: usize>(&self, start: usize, stride: usize, out: *mut f32) {
            let [kh, kw] = self.kernel;
            let mut acc = [self.bias; N];
            for ky in 0..kh {
                let row = start + ky * self.pw;
                for kx in 0..kw {
                    let w = _mm512_loadu_ps(self.weights.add((ky * kw + kx) * 16));
                    for (i, acc) in acc.iter_mut().enumerate() {
                        let x = _mm512_loadu_ps(self.padded.add((row + kx + i * stride) * 16));
                        *acc = _mm512_fmadd_ps(w, x, *acc);
                    }
                }
            }
            for (i, acc) in acc.iter().enumerate() {
                let y = _mm512_min_ps(_mm512_max_ps(*acc, self.low), self.high);
                _mm512_storeu_ps(out.add(i * 16), y);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::depthwise::{DepthwiseConv, Planes, Sink};
    use super::super::dispatch::Level;

    fn conv(level: Level, channels: usize, size: usize, k: usize, stride: usize) -> DepthwiseConv {
        let out = size.div_ceil(stride);
        DepthwiseConv {
            level,
            channels,
            kernel: [k, k],
            stride: [stride, stride],
            pad: [k / 2, k / 2],
            input: [size, size],
            output: [out, out],
            output_shape: [channels, out, out].into_iter().collect(),
            weights: Arc::new(
                (0..channels * k * k)
                    .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
                    .collect(),
            ),
            bias: Arc::new((0..channels).map(|c| c as f32 * 0.25 - 1.0).collect()),
            clamp: vec![[0.0, f32::INFINITY], [f32::NEG_INFINITY, 6.0]],
        }
    }

    #[test]
    fn blocked_and_plane_loops_agree_bit_for_bit() {
        if !Level::Avx512.supported() {
            return;
        }
        for (c, s, k, st) in [(19, 7, 5, 1), (33, 14, 3, 2), (16, 9, 3, 1), (5, 16, 5, 2)] {
            let blocked = conv(Level::Avx512, c, s, k, st);
            assert!(super::applies(&blocked));
            let plane = conv(Level::Avx2, c, s, k, st);
            let input: Vec<f32> = (0..c * s * s)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 17.0)
                .collect();
            let len = c * blocked.output[0] * blocked.output[1];
            let (mut a, mut b) = (vec![f32::NAN; len], vec![f32::NAN; len]);
            blocked.dispatch(Planes::F32(&input), Sink::F32(&mut a));
            plane.dispatch(Planes::F32(&input), Sink::F32(&mut b));
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{c}x{s}x{s} k{k} s{st}"
            );
            let raw: Vec<i8> = (0..c * s * s).map(|i| (i * 73 % 256) as u8 as i8).collect();
            let (mut qa, mut qb) = (vec![0i8; len], vec![0i8; len]);
            for (conv, out) in [(&blocked, &mut qa), (&plane, &mut qb)] {
                conv.dispatch(
                    Planes::Int8 {
                        values: &raw,
                        zero_point: -5.0,
                        scale: 0.05,
                    },
                    Sink::Int8 {
                        values: out,
                        zero_point: -128.0,
                        scale: 6.0 / 255.0,
                    },
                );
            }
            assert_eq!(qa, qb, "int8 {c}x{s}x{s} k{k} s{st}");
        }
    }

    #[test]
    #[ignore]
    fn timing() {
        for (c, s, k, st) in [
            (672, 14, 5, 1),
            (1152, 7, 5, 1),
            (240, 28, 5, 1),
            (144, 56, 3, 1),
            (96, 112, 3, 2),
        ] {
            for level in [Level::Avx2, Level::Avx512] {
                let conv = conv(level, c, s, k, st);
                let input: Vec<f32> = (0..c * s * s)
                    .map(|i| ((i * 53 % 97) as f32 - 48.0) / 17.0)
                    .collect();
                let mut output = vec![0f32; c * conv.output[0] * conv.output[1]];
                for _ in 0..5 {
                    conv.dispatch(Planes::F32(&input), Sink::F32(&mut output));
                }
                let t = std::time::Instant::now();
                for _ in 0..100 {
                    conv.dispatch(Planes::F32(&input), Sink::F32(&mut output));
                }
                eprintln!(
                    "{c}x{s}x{s} k{k} s{st} {level:?}: {:.1} us",
                    t.elapsed().as_secs_f64() * 1e4
                );
            }
        }
    }
}
