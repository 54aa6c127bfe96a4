//! Depthwise convolution 16 channels at a time (AVX-512), in bands of output rows.
//!
//! The plane-at-a-time loop of [`depthwise`](super::depthwise) vectorises along a row: on
//! Lite0's 14x14 and 7x7 planes rows are shorter than two vectors and per-channel set-up
//! dominates, and on the large planes it makes several passes (phase planes, accumulator, copy
//! out). Here one vector holds one pixel of 16 channels. For each group of 16 channels and each
//! band of output rows, the input rows the band reads are copied into a zero-padded
//! pixel-major buffer (`[row][x][16]`; from the blocked layout as they are, from planes with
//! 16x16 in-register transposes, int8 input dequantized on the way), or read in place (f32
//! blocked input on wide planes); every output pixel is `bias + sum of w[tap] * pixel[tap]` over
//! whole vectors, 8 pixels at a time and a row's last pixels in one call (a 7-pixel row is one
//! call, not four), each input vector of a kernel row loaded once for all its taps. The weights
//! are packed `[tap][16]` per group once, when the operator is built (packing them per run cost
//! the 7x7 layers half their time). Same arithmetic in the same order as the plane loop (bias,
//! then taps in order, fused multiply-adds; the same dequantize and quantize), so the two give
//! identical results (tested).

#[cfg(target_arch = "x86_64")]
pub(super) use x86::{convolve, convolve_blocked, transpose16};

use tract_core::internal::*;

use super::conv::collapse;
use super::depthwise::{DepthwiseConv, Planes, Sink};
use super::dispatch::Level;
use super::layout::blocked_shape;

/// Output rows computed per band (the band's input rows stay in cache).
const BAND: usize = 8;

/// Whether the blocked kernel computes `conv`: clamps that are one clamp.
pub(super) fn applies(conv: &DepthwiseConv) -> bool {
    collapse(&conv.clamp).is_some()
}

/// A [`DepthwiseConv`] the blocked kernel computes writing the blocked layout
/// (`[ceil(C / 16), H * W, 16]`; see [`layout`](super::layout)), reading a blocked input or a
/// plain one (transposed in); f32, or int8 in and out (the int8 graph's dequantize ->
/// depthwise -> clamp -> quantize chain, as [`QuantizedDepthwise`](super::QuantizedDepthwise)).
#[derive(Debug, Clone, PartialEq)]
pub struct BlockedDepthwise {
    conv: DepthwiseConv,
    /// The int8 input and output types; `None` for f32.
    int8: Option<[DatumType; 2]>,
    blocked_input: bool,
}

impl Eq for BlockedDepthwise {}

impl BlockedDepthwise {
    /// The blocked form of `conv` (`int8`: its quantized input and output types), when its
    /// level is AVX-512 and the kernel [`applies`].
    pub fn of(
        conv: &DepthwiseConv,
        int8: Option<[DatumType; 2]>,
        blocked_input: bool,
    ) -> Option<BlockedDepthwise> {
        (conv.level == Level::Avx512 && applies(conv)).then(|| BlockedDepthwise {
            conv: conv.clone(),
            int8,
            blocked_input,
        })
    }

    /// Channels.
    pub fn channels(&self) -> usize {
        self.conv.channels
    }

    /// Input pixels.
    pub fn input_pixels(&self) -> usize {
        self.conv.input[0] * self.conv.input[1]
    }

    /// Output pixels.
    pub fn output_pixels(&self) -> usize {
        self.conv.output[0] * self.conv.output[1]
    }

    /// The output's element type.
    pub fn output_type(&self) -> DatumType {
        self.int8.map_or(f32::datum_type(), |[_, out]| out)
    }

    fn input_len(&self) -> usize {
        if self.blocked_input {
            blocked_shape(self.channels(), self.input_pixels())
                .iter()
                .product()
        } else {
            self.channels() * self.input_pixels()
        }
    }
}

impl Op for BlockedDepthwise {
    fn name(&self) -> StaticName {
        "GraftBlockedDepthwise".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let mut info = self.conv.info()?;
        info.push(format!(
            "16-channel blocks, {} input, {:?}",
            if self.blocked_input {
                "blocked"
            } else {
                "plain"
            },
            self.int8
        ));
        Ok(info)
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for BlockedDepthwise {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let view = input.view();
        let shape = blocked_shape(self.channels(), self.output_pixels());
        // SAFETY: the kernel writes every output value, padding lanes included (zero weights).
        let mut output =
            unsafe { Tensor::uninitialized_aligned_dt(self.output_type(), &shape, 64)? };
        {
            let mut plain = output.try_as_plain_ram_mut()?;
            let (planes, sink) = match self.int8 {
                None => (
                    Planes::F32(view.as_slice::<f32>()?),
                    Sink::F32(plain.as_slice_mut::<f32>()?),
                ),
                Some([input_type, output_type]) => (
                    Planes::int8(view.as_slice::<i8>()?, input_type),
                    Sink::int8(plain.as_slice_mut::<i8>()?, output_type),
                ),
            };
            ensure!(
                planes.len() == self.input_len(),
                "graft's blocked depthwise kernel expects {} input values, got {}",
                self.input_len(),
                planes.len()
            );
            // SAFETY: AVX-512 is supported (the level was checked when the kernel was built); the
            // lengths match the shapes (the output is allocated from them).
            unsafe {
                if self.blocked_input {
                    convolve_blocked(&self.conv, planes, sink)
                } else {
                    convolve(&self.conv, planes, sink, true)
                }
            }
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for BlockedDepthwise {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let shape = blocked_shape(self.channels(), self.output_pixels());
        Ok(tvec!(self.output_type().fact(shape)))
    }

    as_op!();
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::aligned::Aligned;
    use super::super::conv::collapse;
    use super::super::depthwise::{DepthwiseConv, Planes, Sink};
    use super::BAND;

    /// Transposes 16 vectors of 16 floats in place (row `i` becomes column `i`).
    #[inline(always)]
    pub(in super::super) unsafe fn transpose16(r: &mut [__m512; 16]) {
        let mut a = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            a[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            a[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        let pd = _mm512_castps_pd;
        let ps = _mm512_castpd_ps;
        let mut b = [_mm512_setzero_ps(); 16];
        for i in 0..4 {
            b[4 * i] = ps(_mm512_unpacklo_pd(pd(a[4 * i]), pd(a[4 * i + 2])));
            b[4 * i + 1] = ps(_mm512_unpackhi_pd(pd(a[4 * i]), pd(a[4 * i + 2])));
            b[4 * i + 2] = ps(_mm512_unpacklo_pd(pd(a[4 * i + 1]), pd(a[4 * i + 3])));
            b[4 * i + 3] = ps(_mm512_unpackhi_pd(pd(a[4 * i + 1]), pd(a[4 * i + 3])));
        }
        // b[4i + j], 128-bit lane L: column 4L + j, rows 4i..4i+3; a 4x4 transpose of lanes.
        for j in 0..4 {
            let c0 = _mm512_shuffle_f32x4::<0x88>(b[j], b[4 + j]);
            let c1 = _mm512_shuffle_f32x4::<0xdd>(b[j], b[4 + j]);
            let c2 = _mm512_shuffle_f32x4::<0x88>(b[8 + j], b[12 + j]);
            let c3 = _mm512_shuffle_f32x4::<0xdd>(b[8 + j], b[12 + j]);
            r[j] = _mm512_shuffle_f32x4::<0x88>(c0, c2);
            r[4 + j] = _mm512_shuffle_f32x4::<0x88>(c1, c3);
            r[8 + j] = _mm512_shuffle_f32x4::<0xdd>(c0, c2);
            r[12 + j] = _mm512_shuffle_f32x4::<0xdd>(c1, c3);
        }
    }

    fn mask(count: usize) -> __mmask16 {
        ((1u32 << count.min(16)) - 1) as u16
    }

    /// `conv` on `input` into `output`, for a convolution [`applies`](super::applies) accepts.
    /// With `blocked_output`, the output is written in the blocked layout, without transposes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    pub(in super::super) unsafe fn convolve(
        conv: &DepthwiseConv,
        input: Planes,
        mut output: Sink,
        blocked_output: bool,
    ) {
        let kh = conv.kernel[0];
        let [sh, sw] = conv.stride;
        let [ih, iw] = conv.input;
        let [oh, ow] = conv.output;
        let [pt, pl] = conv.pad;
        let [low, high] = collapse(&conv.clamp).expect("checked by applies");
        let (low, high) = (_mm512_set1_ps(low), _mm512_set1_ps(high));
        let mut scratch = Scratch::new(conv);
        let (pw, [padded, results]) = scratch.views();
        let (plane_in, plane_out) = (ih * iw, oh * ow);
        // Input columns that land in the buffer.
        let columns = iw.min(pw.saturating_sub(pl));
        for c0 in (0..conv.channels).step_by(16) {
            let lanes = (conv.channels - c0).min(16);
            let block = Block::for_channels(conv, c0, (padded.as_ptr(), pw), [low, high]);
            for oy0 in (0..oh).step_by(BAND) {
                let rows_out = BAND.min(oh - oy0);
                let rows_in = (rows_out - 1) * sh + kh;
                // Transpose the band's input rows in.
                for row in 0..rows_in {
                    let target = padded.as_mut_ptr().add(row * pw * 16);
                    let y = (oy0 * sh + row) as isize - pt as isize;
                    if y < 0 || y as usize >= ih {
                        std::ptr::write_bytes(target, 0, pw * 16);
                        continue;
                    }
                    let y = y as usize;
                    for x0 in (0..columns).step_by(16) {
                        let count = (columns - x0).min(16);
                        let mut v = [_mm512_setzero_ps(); 16];
                        for (c, v) in v.iter_mut().enumerate().take(lanes) {
                            let at = (c0 + c) * plane_in + y * iw + x0;
                            *v = match input {
                                Planes::F32(values) => {
                                    _mm512_maskz_loadu_ps(mask(count), values.as_ptr().add(at))
                                }
                                Planes::Int8 {
                                    values,
                                    zero_point,
                                    scale,
                                } => {
                                    let q =
                                        _mm_maskz_loadu_epi8(mask(count), values.as_ptr().add(at));
                                    let q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
                                    _mm512_mul_ps(
                                        _mm512_sub_ps(q, _mm512_set1_ps(zero_point)),
                                        _mm512_set1_ps(scale),
                                    )
                                }
                            };
                        }
                        transpose16(&mut v);
                        for (p, v) in v.iter().enumerate().take(count) {
                            _mm512_storeu_ps(target.add((pl + x0 + p) * 16), *v);
                        }
                    }
                }
                for r in 0..rows_out {
                    let start = r * sh * pw;
                    match sw {
                        1 => block.row::<1>(start, ow, results.as_mut_ptr()),
                        2 => block.row::<2>(start, ow, results.as_mut_ptr()),
                        _ => block.row::<0>(start, ow, results.as_mut_ptr()),
                    }
                    let oy = oy0 + r;
                    if blocked_output {
                        let at = ((c0 / 16) * plane_out + oy * ow) * 16;
                        for x in 0..ow {
                            let v = _mm512_loadu_ps(results.as_ptr().add(x * 16));
                            store16(&mut output, at + x * 16, v);
                        }
                        continue;
                    }
                    // Transpose the output row back into the planes.
                    for x0 in (0..ow).step_by(16) {
                        let count = (ow - x0).min(16);
                        let mut v = [_mm512_setzero_ps(); 16];
                        for (p, v) in v.iter_mut().enumerate().take(count) {
                            *v = _mm512_loadu_ps(results.as_ptr().add((x0 + p) * 16));
                        }
                        transpose16(&mut v);
                        for (c, v) in v.iter().enumerate().take(lanes) {
                            let at = (c0 + c) * plane_out + oy * ow + x0;
                            match &mut output {
                                Sink::F32(values) => _mm512_mask_storeu_ps(
                                    values.as_mut_ptr().add(at),
                                    mask(count),
                                    *v,
                                ),
                                Sink::Int8 {
                                    values,
                                    zero_point,
                                    scale,
                                } => {
                                    let q = _mm512_add_ps(
                                        _mm512_div_ps(*v, _mm512_set1_ps(*scale)),
                                        _mm512_set1_ps(*zero_point),
                                    );
                                    let q = _mm512_roundscale_ps::<
                                        { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
                                    >(q);
                                    let q = _mm512_min_ps(
                                        _mm512_max_ps(q, _mm512_set1_ps(-128.0)),
                                        _mm512_set1_ps(127.0),
                                    );
                                    let q = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(q));
                                    _mm_mask_storeu_epi8(
                                        values.as_mut_ptr().add(at),
                                        mask(count),
                                        q,
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Stores 16 values at `at` of `output` (quantized for int8, as the plain path does).
    #[inline(always)]
    unsafe fn store16(output: &mut Sink, at: usize, v: __m512) {
        match output {
            Sink::F32(values) => _mm512_storeu_ps(values.as_mut_ptr().add(at), v),
            Sink::Int8 {
                values,
                zero_point,
                scale,
            } => {
                let q = _mm512_add_ps(
                    _mm512_div_ps(v, _mm512_set1_ps(*scale)),
                    _mm512_set1_ps(*zero_point),
                );
                let q =
                    _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(q);
                let q = _mm512_min_ps(
                    _mm512_max_ps(q, _mm512_set1_ps(-128.0)),
                    _mm512_set1_ps(127.0),
                );
                let q = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(q));
                _mm_storeu_si128(values.as_mut_ptr().add(at) as *mut _, q);
            }
        }
    }

    /// `conv` with input and output in the blocked layout (`[ceil(C / 16)][H][W][16]`,
    /// [`layout`](super::super::layout)): each band's input rows are copied into the padded
    /// buffer as they are (f32) or dequantized (int8), and output rows are written in place;
    /// no transposes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
    pub(in super::super) unsafe fn convolve_blocked(
        conv: &DepthwiseConv,
        input: Planes,
        mut output: Sink,
    ) {
        let [kh, kw] = conv.kernel;
        let [sh, sw] = conv.stride;
        let [ih, iw] = conv.input;
        let [oh, ow] = conv.output;
        let [pt, pl] = conv.pad;
        let [low, high] = collapse(&conv.clamp).expect("checked by applies");
        let (low, high) = (_mm512_set1_ps(low), _mm512_set1_ps(high));
        let mut scratch = Scratch::new(conv);
        let (pw, [padded, results]) = scratch.views();
        let (plane_in, plane_out) = (ih * iw * 16, oh * ow * 16);
        let columns = iw.min(pw.saturating_sub(pl));
        // The outputs whose taps all fall inside the input columns: `lo .. hi`.
        let lo = pl.div_ceil(sw).min(ow);
        let hi = if pl + iw >= kw {
            ((pl + iw - kw) / sw + 1).clamp(lo, ow)
        } else {
            lo
        };
        // f32 rows are read where they are, no band copy, when few outputs reach into the
        // padding (those are computed tap by tap): on 56x56 and wider planes, -10 to -35 %;
        // on 14x14 planes with 5x5 kernels the edges would double the time.
        let in_place = kh <= 8 && (ow - (hi - lo)) * 8 <= ow;
        for (block, c0) in (0..conv.channels).step_by(16).enumerate() {
            let band = Block::for_channels(conv, c0, (padded.as_ptr(), pw), [low, high]);
            if let (Planes::F32(values), Sink::F32(out), true) = (input, &mut output, in_place) {
                let block_in = values.as_ptr().add(block * plane_in);
                let block_out = out.as_mut_ptr().add(block * plane_out);
                for oy in 0..oh {
                    let mut rows = [std::ptr::null::<f32>(); 8];
                    for (ky, row) in rows.iter_mut().enumerate().take(kh) {
                        let y = (oy * sh + ky) as isize - pt as isize;
                        if y >= 0 && (y as usize) < ih {
                            *row = block_in.add(y as usize * iw * 16).wrapping_sub(pl * 16);
                        }
                    }
                    let target = block_out.add(oy * ow * 16);
                    let geometry = ([lo, hi, ow], [pl, iw]);
                    match sw {
                        1 => band.row_in_place::<1>(&rows, geometry.0, geometry.1, target),
                        2 => band.row_in_place::<2>(&rows, geometry.0, geometry.1, target),
                        _ => band.row_in_place::<0>(&rows, geometry.0, geometry.1, target),
                    }
                }
                continue;
            }
            for oy0 in (0..oh).step_by(BAND) {
                let rows_out = BAND.min(oh - oy0);
                let rows_in = (rows_out - 1) * sh + kh;
                for row in 0..rows_in {
                    let target = padded.as_mut_ptr().add(row * pw * 16);
                    let y = (oy0 * sh + row) as isize - pt as isize;
                    if y < 0 || y as usize >= ih {
                        std::ptr::write_bytes(target, 0, pw * 16);
                        continue;
                    }
                    let at = block * plane_in + y as usize * iw * 16;
                    let target = target.add(pl * 16);
                    match input {
                        Planes::F32(values) => std::ptr::copy_nonoverlapping(
                            values.as_ptr().add(at),
                            target,
                            columns * 16,
                        ),
                        Planes::Int8 {
                            values,
                            zero_point,
                            scale,
                        } => {
                            let (zero_point, scale) =
                                (_mm512_set1_ps(zero_point), _mm512_set1_ps(scale));
                            for x in 0..columns {
                                let q =
                                    _mm_loadu_si128(values.as_ptr().add(at + x * 16) as *const _);
                                let q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
                                let v = _mm512_mul_ps(_mm512_sub_ps(q, zero_point), scale);
                                _mm512_storeu_ps(target.add(x * 16), v);
                            }
                        }
                    }
                }
                for r in 0..rows_out {
                    let start = r * sh * pw;
                    let at = block * plane_out + (oy0 + r) * ow * 16;
                    // f32 rows are written in place; int8 ones quantized from `results`.
                    let out = match &mut output {
                        Sink::F32(values) => values.as_mut_ptr().add(at),
                        Sink::Int8 { .. } => results.as_mut_ptr(),
                    };
                    match sw {
                        1 => band.row::<1>(start, ow, out),
                        2 => band.row::<2>(start, ow, out),
                        _ => band.row::<0>(start, ow, out),
                    }
                    if let Sink::Int8 { .. } = output {
                        for x in 0..ow {
                            let v = _mm512_loadu_ps(results.as_ptr().add(x * 16));
                            store16(&mut output, at + x * 16, v);
                        }
                    }
                }
            }
        }
    }

    /// The buffers both drivers use, 64-byte aligned (every vector load is one cache line): a
    /// band's padded input rows (pixel-major, 16 channels a pixel; columns outside the input
    /// stay zero, rows outside it are zeroed when a band reads them), one output row of
    /// results (whole vectors of 16 pixels).
    struct Scratch {
        /// Pixels in a padded row.
        pw: usize,
        padded: Aligned,
        results: Aligned,
    }

    impl Scratch {
        fn new(conv: &DepthwiseConv) -> Scratch {
            let ([kh, kw], [sh, sw], ow) = (conv.kernel, conv.stride, conv.output[1]);
            let pw = (ow - 1) * sw + kw;
            let band_rows = (BAND - 1) * sh + kh;
            Scratch {
                pw,
                padded: Aligned::zeroed(band_rows * pw * 64),
                results: Aligned::zeroed(ow.next_multiple_of(16) * 64),
            }
        }

        /// `pw` and the two buffers as f32.
        fn views(&mut self) -> (usize, [&mut [f32]; 2]) {
            (
                self.pw,
                [self.padded.floats_mut(), self.results.floats_mut()],
            )
        }
    }

    /// One group of 16 channels: the padded band, the weights (`[tap][16]`) and the epilogue.
    struct Block {
        padded: *const f32,
        weights: *const f32,
        kernel: [usize; 2],
        /// The horizontal stride.
        stride: usize,
        pw: usize,
        bias: __m512,
        low: __m512,
        high: __m512,
    }

    impl Block {
        /// The 16 channels from `c0` of `conv` (a multiple of 16; their weights `[tap][16]` in
        /// `conv.by_block`), reading the band at `padded`, `pw` pixels a row.
        #[inline(always)]
        unsafe fn for_channels(
            conv: &DepthwiseConv,
            c0: usize,
            (padded, pw): (*const f32, usize),
            [low, high]: [__m512; 2],
        ) -> Block {
            let taps = conv.kernel[0] * conv.kernel[1];
            let lanes = (conv.channels - c0).min(16);
            Block {
                padded,
                weights: conv.by_block.floats()[c0 * taps..].as_ptr(),
                kernel: conv.kernel,
                stride: conv.stride[1],
                pw,
                bias: _mm512_maskz_loadu_ps(mask(lanes), conv.bias.as_ptr().add(c0)),
                low,
                high,
            }
        }

        /// One output row of `ow` pixels whose first tap reads padded pixel `start`, stored 16
        /// floats apart from `out`; `S` is the horizontal stride (0: read from `self.stride`).
        #[inline(always)]
        unsafe fn row<const S: usize>(&self, start: usize, ow: usize, out: *mut f32) {
            let at = |ox: usize| {
                let first = start + ox * self.stride;
                move |ky: usize| self.padded.add((first + ky * self.pw) * 16)
            };
            self.span::<S, _>([0, ow], at, out)
        }

        /// Outputs `from .. to` of a row, kernel row `ky` of output `ox` read from
        /// `at(ox)(ky)`: 8 at a time, the last 1-7 in one call (7x7 and 14x14 planes are most
        /// of a row).
        #[inline(always)]
        unsafe fn span<const S: usize, F: Fn(usize) -> *const f32>(
            &self,
            [from, to]: [usize; 2],
            at: impl Fn(usize) -> F,
            out: *mut f32,
        ) {
            let mut ox = from;
            while ox + 8 <= to {
                self.pixels_from::<8, S>(at(ox), out.add(ox * 16));
                ox += 8;
            }
            let target = out.add(ox * 16);
            match to - ox {
                1 => self.pixels_from::<1, S>(at(ox), target),
                2 => self.pixels_from::<2, S>(at(ox), target),
                3 => self.pixels_from::<3, S>(at(ox), target),
                4 => self.pixels_from::<4, S>(at(ox), target),
                5 => self.pixels_from::<5, S>(at(ox), target),
                6 => self.pixels_from::<6, S>(at(ox), target),
                7 => self.pixels_from::<7, S>(at(ox), target),
                _ => {}
            }
        }

        /// One output row read in place from the input: kernel row `ky` of output pixel 0 starts
        /// at `rows[ky]` (null: padding), a pointer `pl` pixels before the input row (never
        /// read there: the `lo` first and the last `ow - hi` outputs, which reach into the
        /// padding, are computed tap by tap with bounds checks, `iw` pixels being real).
        #[inline(always)]
        unsafe fn row_in_place<const S: usize>(
            &self,
            rows: &[*const f32],
            [lo, hi, ow]: [usize; 3],
            [pl, iw]: [usize; 2],
            out: *mut f32,
        ) {
            let stride = self.stride;
            let at = |ox: usize| {
                move |ky: usize| -> *const f32 {
                    let row: *const f32 = rows[ky];
                    if row.is_null() {
                        row
                    } else {
                        row.wrapping_add(ox * stride * 16)
                    }
                }
            };
            self.span::<S, _>([lo, hi], at, out);
            for ox in (0..lo).chain(hi..ow) {
                self.pixel_checked(rows, ox * stride, [pl, iw], out.add(ox * 16));
            }
        }

        /// One output whose first tap reads virtual (padded) column `x` of `rows`, skipping the
        /// taps outside the `iw` real columns that start at column `pl`.
        #[inline(always)]
        unsafe fn pixel_checked(
            &self,
            rows: &[*const f32],
            x: usize,
            [pl, iw]: [usize; 2],
            out: *mut f32,
        ) {
            let [kh, kw] = self.kernel;
            let mut acc = self.bias;
            for (ky, &row) in rows.iter().enumerate().take(kh) {
                if row.is_null() {
                    continue;
                }
                for kx in 0..kw {
                    let column = x + kx;
                    if column < pl || column >= pl + iw {
                        continue;
                    }
                    let w = _mm512_loadu_ps(self.weights.add((ky * kw + kx) * 16));
                    let v = _mm512_loadu_ps(row.wrapping_add(column * 16));
                    acc = _mm512_fmadd_ps(w, v, acc);
                }
            }
            let y = _mm512_min_ps(_mm512_max_ps(acc, self.low), self.high);
            _mm512_storeu_ps(out, y);
        }

        /// `N` outputs, the next ones `S` (or `self.stride` when `S` is 0) pixels further, stored
        /// 16 floats apart from `out`, kernel row `ky` of the first read at `row_of(ky)` (null: a
        /// row of padding, skipped). With the stride a constant, each load's address is a
        /// constant offset from one pointer.
        #[inline(always)]
        unsafe fn pixels_from<const N: usize, const S: usize>(
            &self,
            row_of: impl Fn(usize) -> *const f32,
            out: *mut f32,
        ) {
            let [kh, kw] = self.kernel;
            let step = if S == 0 { self.stride } else { S } * 16;
            let mut acc = [self.bias; N];
            for ky in 0..kh {
                let row = row_of(ky);
                if row.is_null() {
                    continue;
                }
                let weights = self.weights.add(ky * kw * 16);
                match (S, kw) {
                    (1, 3) => taps::<N, 1, 3>(row, weights, &mut acc),
                    (1, 5) => taps::<N, 1, 5>(row, weights, &mut acc),
                    (2, 3) => taps::<N, 2, 3>(row, weights, &mut acc),
                    (2, 5) => taps::<N, 2, 5>(row, weights, &mut acc),
                    _ => {}
                }
                if S != 0 && (kw == 3 || kw == 5) {
                    continue;
                }
                for kx in 0..kw {
                    let w = _mm512_loadu_ps(self.weights.add((ky * kw + kx) * 16));
                    let first = row.add(kx * 16);
                    for (i, acc) in acc.iter_mut().enumerate() {
                        let x = _mm512_loadu_ps(first.add(i * step));
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

    /// One kernel row of `KW` taps for `N` outputs `S` pixels apart: the `(N - 1) * S + KW`
    /// input vectors the row reads are loaded once and each feeds every tap that uses it (the
    /// tap-by-tap loop loaded each once per tap and was bound by loads). Taps in the same order,
    /// so the sums are the same.
    #[inline(always)]
    unsafe fn taps<const N: usize, const S: usize, const KW: usize>(
        row: *const f32,
        weights: *const f32,
        acc: &mut [__m512; N],
    ) {
        let mut x = [_mm512_setzero_ps(); 20];
        for (j, x) in x.iter_mut().enumerate().take((N - 1) * S + KW) {
            *x = _mm512_loadu_ps(row.add(j * 16));
        }
        for kx in 0..KW {
            let w = _mm512_loadu_ps(weights.add(kx * 16));
            for (i, acc) in acc.iter_mut().enumerate() {
                *acc = _mm512_fmadd_ps(w, x[i * S + kx], *acc);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::depthwise::{by_block, DepthwiseConv, Planes, Sink};
    use super::super::dispatch::Level;

    fn conv(level: Level, channels: usize, size: usize, k: usize, stride: usize) -> DepthwiseConv {
        let out = size.div_ceil(stride);
        let weights: Vec<f32> = (0..channels * k * k)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
            .collect();
        DepthwiseConv {
            level,
            channels,
            kernel: [k, k],
            stride: [stride, stride],
            pad: [k / 2, k / 2],
            input: [size, size],
            output: [out, out],
            output_shape: [channels, out, out].into_iter().collect(),
            weights: Arc::new(weights.clone()),
            by_block: Arc::new(by_block(&weights, channels, k * k)),
            bias: Arc::new((0..channels).map(|c| c as f32 * 0.25 - 1.0).collect()),
            clamp: vec![[0.0, f32::INFINITY], [f32::NEG_INFINITY, 6.0]],
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn transpose16_transposes() {
        use std::arch::x86_64::*;
        if !Level::Avx512.supported() {
            return;
        }
        let values: Vec<f32> = (0..256).map(|i| i as f32).collect();
        let mut out = [0f32; 256];
        // SAFETY: AVX-512 is there (checked above).
        unsafe {
            let mut rows = [_mm512_setzero_ps(); 16];
            for (i, row) in rows.iter_mut().enumerate() {
                *row = _mm512_loadu_ps(values[i * 16..].as_ptr());
            }
            super::x86::transpose16(&mut rows);
            for (i, row) in rows.iter().enumerate() {
                _mm512_storeu_ps(out[i * 16..].as_mut_ptr(), *row);
            }
        }
        for i in 0..16 {
            for j in 0..16 {
                assert_eq!(out[i * 16 + j], values[j * 16 + i], "({i}, {j})");
            }
        }
    }

    #[test]
    fn blocked_and_plane_loops_agree_bit_for_bit() {
        if !Level::Avx512.supported() {
            return;
        }
        for (c, s, k, st) in [
            (19, 7, 5, 1),
            (33, 14, 3, 2),
            (16, 9, 3, 1),
            (5, 16, 5, 2),
            (17, 40, 3, 1),
            (3, 37, 5, 2),
            (20, 19, 3, 2),
        ] {
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

    /// The blocked-layout kernel (f32 rows read in place, int8 rows dequantized into the band)
    /// gives the plane loop's values bit for bit, over kernels, strides, paddings and planes
    /// narrower than the kernel.
    #[test]
    fn blocked_layout_matches_the_plane_loop_bit_for_bit() {
        use super::super::layout::{from_blocked, to_blocked};
        if !Level::Avx512.supported() {
            return;
        }
        let cases = [
            (19, [7, 7], 5, 1, [2, 2]),
            (33, [14, 14], 3, 2, [1, 1]),
            (16, [9, 11], 3, 1, [1, 1]),
            (5, [16, 16], 5, 2, [2, 2]),
            (17, [40, 37], 3, 1, [1, 1]),
            (3, [37, 30], 5, 2, [2, 2]),
            (20, [19, 19], 3, 2, [0, 0]),
            (6, [3, 2], 5, 1, [2, 2]),
            (4, [8, 9], 3, 2, [0, 1]),
            (3, [64, 61], 5, 2, [2, 2]),
            (18, [33, 70], 5, 1, [2, 2]),
        ];
        for (c, [h, w], k, st, pad) in cases {
            let out = [0, 1].map(|i| ([h, w][i] + 2 * pad[i] - k) / st + 1);
            let mut blocked = conv(Level::Avx512, c, h, k, st);
            blocked.input = [h, w];
            blocked.pad = pad;
            blocked.output = out;
            let mut plane = blocked.clone();
            plane.level = Level::Avx2;
            let (pixels_in, pixels_out) = (h * w, out[0] * out[1]);
            let input: Vec<f32> = (0..c * pixels_in)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 17.0)
                .collect();
            let mut expected = vec![f32::NAN; c * pixels_out];
            plane.dispatch(Planes::F32(&input), Sink::F32(&mut expected));
            let mut ours = vec![f32::NAN; c.div_ceil(16) * pixels_out * 16];
            // SAFETY: AVX-512 is there (checked above); the buffers have the blocked shapes.
            unsafe {
                super::convolve_blocked(
                    &blocked,
                    Planes::F32(&to_blocked(&input, c, pixels_in)),
                    Sink::F32(&mut ours),
                )
            };
            let ours = from_blocked(&ours, c, pixels_out);
            let same = ours
                .iter()
                .zip(&expected)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "f32 {c}x{h}x{w} k{k} s{st} pad {pad:?}");

            let raw: Vec<i8> = (0..c * pixels_in)
                .map(|i| (i * 73 % 256) as u8 as i8)
                .collect();
            let (zero_point, scale) = (-5.0, 0.05);
            let sink_scale = 6.0 / 255.0;
            let mut expected = vec![0i8; c * pixels_out];
            plane.dispatch(
                Planes::Int8 {
                    values: &raw,
                    zero_point,
                    scale,
                },
                Sink::Int8 {
                    values: &mut expected,
                    zero_point: -128.0,
                    scale: sink_scale,
                },
            );
            let mut ours = vec![0i8; c.div_ceil(16) * pixels_out * 16];
            // SAFETY: as above.
            unsafe {
                super::convolve_blocked(
                    &blocked,
                    Planes::Int8 {
                        values: &to_blocked(&raw, c, pixels_in),
                        zero_point,
                        scale,
                    },
                    Sink::Int8 {
                        values: &mut ours,
                        zero_point: -128.0,
                        scale: sink_scale,
                    },
                )
            };
            assert_eq!(
                from_blocked(&ours, c, pixels_out),
                expected,
                "int8 {c}x{h}x{w} k{k} s{st} pad {pad:?}"
            );
        }
    }

    #[test]
    #[ignore]
    fn timing() {
        for (c, s, k, st) in [
            (1152, 7, 5, 1),
            (672, 14, 5, 1),
            (32, 112, 3, 1),
            (672, 14, 3, 1),
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
                if level == Level::Avx512 {
                    let blocked_in = vec![0.5f32; c.div_ceil(16) * s * s * 16];
                    let mut blocked_out =
                        vec![0f32; c.div_ceil(16) * conv.output[0] * conv.output[1] * 16];
                    let t = std::time::Instant::now();
                    for _ in 0..100 {
                        // SAFETY: AVX-512 is there (the level is available).
                        unsafe {
                            super::convolve_blocked(
                                &conv,
                                Planes::F32(&blocked_in),
                                Sink::F32(&mut blocked_out),
                            )
                        };
                    }
                    eprintln!(
                        "{c}x{s}x{s} k{k} s{st} blocked layout: {:.1} us",
                        t.elapsed().as_secs_f64() * 1e4
                    );
                    let int8_in: Vec<i8> = (0..blocked_in.len())
                        .map(|i| (i * 53 % 97) as i8 - 48)
                        .collect();
                    let mut int8_out = vec![0i8; blocked_out.len()];
                    let t = std::time::Instant::now();
                    for _ in 0..100 {
                        let input = Planes::Int8 {
                            values: &int8_in,
                            zero_point: -3.0,
                            scale: 0.05,
                        };
                        let output = Sink::Int8 {
                            values: &mut int8_out,
                            zero_point: -128.0,
                            scale: 6.0 / 255.0,
                        };
                        // SAFETY: AVX-512 is there (the level is available).
                        unsafe { super::convolve_blocked(&conv, input, output) };
                    }
                    eprintln!(
                        "{c}x{s}x{s} k{k} s{st} blocked layout, int8: {:.1} us",
                        t.elapsed().as_secs_f64() * 1e4
                    );
                    let t = std::time::Instant::now();
                    for _ in 0..100 {
                        // SAFETY: AVX-512 is there (the level is available).
                        unsafe { conv.run_avx512(Planes::F32(&input), Sink::F32(&mut output)) };
                    }
                    eprintln!(
                        "{c}x{s}x{s} k{k} s{st} plane loop, AVX-512: {:.1} us",
                        t.elapsed().as_secs_f64() * 1e4
                    );
                }
            }
        }
    }
}
