//! f32 pointwise (1x1) convolutions in the 16-channel-blocked layout (AVX-512), with the same
//! fused epilogue as [`gemm_f32`](super::gemm_f32): bias, clamp, residual add, clamp.
//!
//! In the blocked layout ([`layout`](super::layout)) one cache line holds one pixel of 16
//! channels, so a 1x1 convolution is `out[p][m] = sum_k x[p][k] w[k][m]` with the pixel as the
//! row: the micro-kernel keeps `MP` pixels by `NB` blocks of 16 output channels in registers,
//! and for each input channel `k` broadcasts `x[p][k]` (read in place, 16 floats apart: no
//! packing of the activations at all) against `NB` vectors of packed weights. Its output is
//! already blocked, so the depthwise convolution that follows reads it without the transposes
//! it needs in the plain layout. The products run in `k` order with fused multiply-adds and the
//! bias is added after the sum, as in [`gemm_f32`](super::gemm_f32), so the two layouts give
//! bit-identical results (tested).

use std::sync::Arc;

use tract_core::internal::*;

use super::aligned::Aligned;
use super::conv::{Convolution, Geometry, PatchGeometry};
use super::gemm_f32::UNBOUNDED;
use super::layout::{blocked_shape, BLOCK};

/// Pixels at most in one micro-kernel tile.
const MP: usize = 12;
/// Blocks of 16 output channels at most in one tile (`MP x NB` accumulators, 24 of 32 registers).
const NB: usize = 2;

/// A 1x1 convolution's weights (`m` outputs by `k` inputs) packed for the blocked kernel:
/// `data[(block * k + kk) * 16 + lane]` = weight of output `16 * block + lane`, input `kk`; the
/// lanes past `m` are zero.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockedWeights {
    m: usize,
    k: usize,
    data: Aligned,
    /// `m` rounded up to whole blocks, zero past `m`.
    bias: Aligned,
}

impl BlockedWeights {
    /// Packs `weights` (`m x k`, row-major) and `bias` (`m`).
    pub fn new(weights: &[f32], bias: &[f32], m: usize, k: usize) -> BlockedWeights {
        assert_eq!(weights.len(), m * k, "an {m} x {k} matrix");
        assert_eq!(bias.len(), m, "one bias per output");
        let blocks = m.div_ceil(BLOCK);
        let mut data = Aligned::zeroed(blocks * k * BLOCK * 4);
        let packed = data.floats_mut();
        for (row, values) in weights.chunks_exact(k.max(1)).enumerate().take(m) {
            let (block, lane) = (row / BLOCK, row % BLOCK);
            for (kk, &v) in values.iter().enumerate() {
                packed[(block * k + kk) * BLOCK + lane] = v;
            }
        }
        let mut padded = Aligned::zeroed(blocks * BLOCK * 4);
        padded.floats_mut()[..m].copy_from_slice(bias);
        BlockedWeights {
            m,
            k,
            data,
            bias: padded,
        }
    }
}

/// The epilogue's clamps: `out = clamp(clamp(sum + bias, before) + residual, after)`.
#[derive(Debug, Clone, Copy)]
pub struct Clamps {
    /// `[low, high]` after the bias.
    pub before: [f32; 2],
    /// `[low, high]` after the residual add.
    pub after: [f32; 2],
}

/// `output = epilogue(weights · input)` in the blocked layout: `input` is `[ceil(k/16)][pixels][16]`,
/// `output` and `residual` `[ceil(m/16)][pixels][16]`. Needs AVX-512 (asserted).
pub fn product(
    weights: &BlockedWeights,
    input: &[f32],
    pixels: usize,
    residual: Option<&[f32]>,
    clamps: Clamps,
    output: &mut [f32],
) {
    let (m, k) = (weights.m, weights.k);
    assert!(
        super::dispatch::Level::Avx512.supported(),
        "the blocked layout needs AVX-512"
    );
    assert_eq!(
        input.len(),
        k.div_ceil(BLOCK) * pixels * BLOCK,
        "blocked input"
    );
    assert_eq!(
        output.len(),
        m.div_ceil(BLOCK) * pixels * BLOCK,
        "blocked output"
    );
    if let Some(r) = residual {
        assert_eq!(
            r.len(),
            output.len(),
            "the residual is shaped like the output"
        );
    }
    let blocks = m.div_ceil(BLOCK);
    let out = output.as_mut_ptr();
    let weight_bytes = k * blocks * BLOCK * 4;
    for_each_tile(
        pixels,
        blocks,
        [MP, NB],
        weight_bytes,
        |b0, nb, p0, rows| {
            let tile = Tile {
                k,
                pixels,
                x: input.as_ptr().wrapping_add(p0 * BLOCK),
                w: weights.data.floats()[b0 * k * BLOCK..].as_ptr(),
                bias: weights.bias.floats()[b0 * BLOCK..].as_ptr(),
                out: out.wrapping_add((b0 * pixels + p0) * BLOCK),
                residual: residual.map_or(std::ptr::null(), |r| {
                    r.as_ptr().wrapping_add((b0 * pixels + p0) * BLOCK)
                }),
                clamps,
                offsets: std::ptr::null(),
                step: BLOCK,
            };
            // SAFETY: AVX-512 is supported (asserted); the tile's pixels and blocks lie inside the
            // input, weights, output and residual (lengths asserted above).
            unsafe { x86::tile(&tile, rows, nb) }
        },
    );
}

/// `n` split into the fewest runs of at most `most`, of nearly equal length (49 pixels, at most
/// 8 a run: 7 runs of 7, not 6 of 8 and one of 1): `(first, length)` of each.
pub(super) fn even_runs(n: usize, most: usize) -> impl Iterator<Item = (usize, usize)> {
    let runs = n.div_ceil(most);
    let at = move |t: usize| t * (n / runs.max(1)) + t.min(n % runs.max(1));
    (0..runs).map(move |t| (at(t), at(t + 1) - at(t)))
}

/// The tiles of a blocked product over `pixels` pixels and `blocks` output blocks, tiles of at
/// most `[pixels, blocks]` = `most`: `run(first block, blocks, first pixel, pixels)`. Weights of
/// at most 32 KiB stay in L1 and are read once per pixel tile; larger ones are read once per
/// group of blocks, the pixels streaming past them.
pub(super) fn for_each_tile(
    pixels: usize,
    blocks: usize,
    [most_pixels, most_blocks]: [usize; 2],
    weight_bytes: usize,
    mut run: impl FnMut(usize, usize, usize, usize),
) {
    let groups = || {
        (0..blocks)
            .step_by(most_blocks)
            .map(|b0| (b0, (blocks - b0).min(most_blocks)))
    };
    if weight_bytes <= 32 << 10 {
        for (p0, rows) in even_runs(pixels, most_pixels) {
            for (b0, nb) in groups() {
                run(b0, nb, p0, rows);
            }
        }
    } else {
        for (b0, nb) in groups() {
            for (p0, rows) in even_runs(pixels, most_pixels) {
                run(b0, nb, p0, rows);
            }
        }
    }
}

/// One micro-kernel call; pointers at the tile's first pixel and block.
struct Tile {
    k: usize,
    /// Pixels in the whole tensor (the distance between blocks is `16 * pixels`).
    pixels: usize,
    x: *const f32,
    w: *const f32,
    bias: *const f32,
    out: *mut f32,
    /// Same offsets as `out`, or null.
    residual: *const f32,
    clamps: Clamps,
    /// Direct convolutions: input `kk` of the tile's first pixel is at `x + offsets[kk]`, and
    /// the next pixels `step` values apart. Null for blocked input.
    offsets: *const usize,
    step: usize,
}

mod x86 {
    use std::arch::x86_64::*;

    use super::{Tile, BLOCK, MP, NB};

    /// Runs the `rows x nb` tile (at most `MP x NB`).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile(t: &Tile, rows: usize, nb: usize) {
        macro_rules! dispatch {
            ($($r:literal)*) => {
                match (rows, nb, t.offsets.is_null()) {
                    $(($r, 1, true) => kernel::<$r, 1>(t),
                      ($r, 2, true) => kernel::<$r, 2>(t),
                      ($r, 1, false) => direct::<$r, 1>(t),
                      ($r, 2, false) => direct::<$r, 2>(t),)*
                    _ => unreachable!("a tile of {rows} x {nb}"),
                }
            };
        }
        debug_assert!(rows <= MP && nb <= NB);
        dispatch!(1 2 3 4 5 6 7 8 9 10 11 12)
    }

    #[inline(always)]
    unsafe fn kernel<const R: usize, const B: usize>(t: &Tile) {
        let mut acc = [[_mm512_setzero_ps(); B]; R];
        let block_stride = t.pixels * BLOCK;
        // One loop over `k` (nested block and lane loops left the accumulators in memory):
        // `x` steps one lane at a time and jumps to the next block after 16.
        let (mut w, mut x, mut lane) = (t.w, t.x, 0);
        for _ in 0..t.k {
            let mut wv = [_mm512_setzero_ps(); B];
            for (b, wv) in wv.iter_mut().enumerate() {
                *wv = _mm512_loadu_ps(w.add(b * t.k * BLOCK));
            }
            for (p, acc) in acc.iter_mut().enumerate() {
                let xv = _mm512_set1_ps(*x.add(p * BLOCK));
                for (sum, wv) in acc.iter_mut().zip(&wv) {
                    *sum = _mm512_fmadd_ps(xv, *wv, *sum);
                }
            }
            w = w.add(BLOCK);
            lane += 1;
            x = x.add(1);
            if lane == BLOCK {
                lane = 0;
                x = x.add(block_stride - BLOCK);
            }
        }
        store(t, &acc)
    }

    /// [`kernel`] for a direct convolution: input `kk` of pixel `p` at
    /// `x + offsets[kk] + p * step`.
    #[inline(always)]
    unsafe fn direct<const R: usize, const B: usize>(t: &Tile) {
        let mut acc = [[_mm512_setzero_ps(); B]; R];
        let mut w = t.w;
        for kk in 0..t.k {
            let mut wv = [_mm512_setzero_ps(); B];
            for (b, wv) in wv.iter_mut().enumerate() {
                *wv = _mm512_loadu_ps(w.add(b * t.k * BLOCK));
            }
            let x = t.x.add(*t.offsets.add(kk));
            for (p, acc) in acc.iter_mut().enumerate() {
                let xv = _mm512_set1_ps(*x.add(p * t.step));
                for (sum, wv) in acc.iter_mut().zip(&wv) {
                    *sum = _mm512_fmadd_ps(xv, *wv, *sum);
                }
            }
            w = w.add(BLOCK);
        }
        store(t, &acc)
    }

    /// The epilogue: bias, clamp, residual, clamp; one store per vector, straight from the
    /// accumulators. Loops over the constant `R` and `B` with no branch inside (the residual
    /// test is outside): a branch in the loop, or one flat loop over the `R * B` vectors, made the
    /// compiler keep the accumulators in memory (2x slower); going through a stack array cost
    /// the short reductions (k = 16, 24) 8-10 %. The two loops are written out on purpose: one
    /// body shared through a `const RESIDUAL: bool` parameter spilled them again (2.4x slower).
    #[inline(always)]
    unsafe fn store<const R: usize, const B: usize>(t: &Tile, acc: &[[__m512; B]; R]) {
        let block_stride = t.pixels * BLOCK;
        let [lo, hi] = t.clamps.before.map(|v| _mm512_set1_ps(v));
        let [lo2, hi2] = t.clamps.after.map(|v| _mm512_set1_ps(v));
        let mut bias = [_mm512_setzero_ps(); B];
        for (b, bias) in bias.iter_mut().enumerate() {
            *bias = _mm512_loadu_ps(t.bias.add(b * BLOCK));
        }
        if t.residual.is_null() {
            for (p, acc) in acc.iter().enumerate() {
                for (b, &sum) in acc.iter().enumerate() {
                    let at = b * block_stride + p * BLOCK;
                    let y = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(sum, bias[b]), lo), hi);
                    _mm512_storeu_ps(t.out.add(at), y);
                }
            }
        } else {
            for (p, acc) in acc.iter().enumerate() {
                for (b, &sum) in acc.iter().enumerate() {
                    let at = b * block_stride + p * BLOCK;
                    let y = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(sum, bias[b]), lo), hi);
                    let r = _mm512_loadu_ps(t.residual.add(at));
                    let y = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(y, r), lo2), hi2);
                    _mm512_storeu_ps(t.out.add(at), y);
                }
            }
        }
    }
}

/// A direct convolution's plain input, zero-padded: `C` planes of `rows x width`, input pixel
/// `(y, x)` at `(y + pad_top, x + pad_left)`; and where each input of the product reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Direct {
    geometry: PatchGeometry,
    rows: usize,
    width: usize,
    /// `offsets[(c * kh + ky) * kw + kx]`: where tap `(c, ky, kx)` of output pixel `(0, 0)`
    /// reads (the weights' OIHW order).
    offsets: Vec<usize>,
}

impl Direct {
    fn new(geometry: &PatchGeometry) -> Direct {
        let g = geometry;
        let span = |out: usize, stride: usize, kernel: usize, dilation: usize| {
            (out - 1) * stride + (kernel - 1) * dilation + 1
        };
        let rows = span(g.output[0], g.stride[0], g.kernel[0], g.dilation[0]);
        let width = span(g.output[1], g.stride[1], g.kernel[1], g.dilation[1]);
        let mut offsets = vec![];
        for c in 0..g.channels {
            for ky in 0..g.kernel[0] {
                for kx in 0..g.kernel[1] {
                    let at = (c * rows + ky * g.dilation[0]) * width + kx * g.dilation[1];
                    offsets.push(at);
                }
            }
        }
        Direct {
            geometry: g.clone(),
            rows,
            width,
            offsets,
        }
    }

    /// `input` (`C x H x W`) zero-padded.
    fn pad(&self, input: &[f32]) -> Aligned {
        let g = &self.geometry;
        let [ih, iw] = g.input;
        let [pt, pl] = g.pad;
        let mut padded = Aligned::zeroed(g.channels * self.rows * self.width * 4);
        let values = padded.floats_mut();
        let columns = iw.min(self.width.saturating_sub(pl));
        for (c, plane) in input.chunks_exact(ih * iw).enumerate() {
            for (y, line) in plane.chunks_exact(iw).enumerate() {
                if y + pt >= self.rows {
                    break;
                }
                let at = (c * self.rows + y + pt) * self.width + pl;
                values[at..at + columns].copy_from_slice(&line[..columns]);
            }
        }
        padded
    }
}

/// Where a [`BlockedConv`] reads its input.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Input {
    /// A 1x1 convolution of a blocked input, `[ceil(k / 16), pixels, 16]`.
    Blocked,
    /// Any other convolution with one group, of a plain `C x H x W` input (a stem reading the
    /// image, or a k x k convolution after plain-layout operators), read directly: no patch
    /// matrix.
    Direct(Direct),
}

/// A [`Convolution`] writing the blocked layout `[ceil(m / 16), pixels, 16]`: a pointwise one
/// reading a blocked input, or any other reading a plain one; a residual, when it has one, is
/// blocked like the output.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockedConv {
    weights: Arc<BlockedWeights>,
    input: Input,
    /// Output pixels.
    pixels: usize,
    clamps: [[f32; 2]; 2],
    residual: bool,
}

// tract compares operators for equality; NaN weights never come out of a folded graph.
impl Eq for BlockedConv {}

impl BlockedConv {
    /// The blocked form of `conv`.
    pub fn of(conv: &Convolution) -> BlockedConv {
        let (weights, bias, geometry) = conv.parts();
        let (m, k) = (bias.len(), weights.len() / bias.len().max(1));
        let (before, residual, after) = conv.epilogue_parts();
        let (input, pixels) = match geometry {
            Geometry::Pointwise { n, .. } => (Input::Blocked, *n),
            Geometry::Patches(g) => (Input::Direct(Direct::new(g)), g.columns()),
        };
        BlockedConv {
            weights: Arc::new(BlockedWeights::new(&weights, bias, m, k)),
            input,
            pixels,
            clamps: [before, if residual { after } else { UNBOUNDED }],
            residual,
        }
    }

    /// The channels and pixels of its input when it reads the blocked layout; `None` when it
    /// reads a plain one.
    pub fn blocked_input(&self) -> Option<(usize, usize)> {
        (self.input == Input::Blocked).then_some((self.weights.k, self.pixels))
    }

    /// Output channels.
    pub fn m(&self) -> usize {
        self.weights.m
    }

    /// Output pixels.
    pub fn pixels(&self) -> usize {
        self.pixels
    }

    fn input_len(&self) -> usize {
        match &self.input {
            Input::Blocked => self.weights.k.div_ceil(BLOCK) * self.pixels * BLOCK,
            Input::Direct(d) => d.geometry.channels * d.geometry.input[0] * d.geometry.input[1],
        }
    }

    fn run(&self, input: &[f32], residual: Option<&[f32]>, output: &mut [f32]) {
        let clamps = Clamps {
            before: self.clamps[0],
            after: self.clamps[1],
        };
        match &self.input {
            Input::Blocked => product(&self.weights, input, self.pixels, residual, clamps, output),
            Input::Direct(d) => direct_product(&self.weights, d, input, residual, clamps, output),
        }
    }
}

/// A direct convolution of the plain `input` into the blocked `output`, one output row at a
/// time (a tile's pixels are `stride` apart in the padded planes).
fn direct_product(
    weights: &BlockedWeights,
    direct: &Direct,
    input: &[f32],
    residual: Option<&[f32]>,
    clamps: Clamps,
    output: &mut [f32],
) {
    let g = &direct.geometry;
    let [oh, ow] = g.output;
    let pixels = oh * ow;
    let blocks = weights.m.div_ceil(BLOCK);
    assert!(
        super::dispatch::Level::Avx512.supported(),
        "the blocked layout needs AVX-512"
    );
    assert_eq!(
        input.len(),
        g.channels * g.input[0] * g.input[1],
        "plain input"
    );
    assert_eq!(weights.k, direct.offsets.len(), "one weight per tap");
    assert_eq!(output.len(), blocks * pixels * BLOCK, "blocked output");
    if let Some(r) = residual {
        assert_eq!(
            r.len(),
            output.len(),
            "the residual is shaped like the output"
        );
    }
    let padded = direct.pad(input);
    let out = output.as_mut_ptr();
    for oy in 0..oh {
        for (ox, columns) in even_runs(ow, MP) {
            for b0 in (0..blocks).step_by(NB) {
                let at = (b0 * pixels + oy * ow + ox) * BLOCK;
                let tile = Tile {
                    k: weights.k,
                    pixels,
                    x: padded.floats()[(oy * g.stride[0]) * direct.width + ox * g.stride[1]..]
                        .as_ptr(),
                    w: weights.data.floats()[b0 * weights.k * BLOCK..].as_ptr(),
                    bias: weights.bias.floats()[b0 * BLOCK..].as_ptr(),
                    out: out.wrapping_add(at),
                    residual: residual.map_or(std::ptr::null(), |r| r.as_ptr().wrapping_add(at)),
                    clamps,
                    offsets: direct.offsets.as_ptr(),
                    step: g.stride[1],
                };
                // SAFETY: AVX-512 is supported (asserted); every tap of the tile's pixels lies
                // inside the padded planes (sized from the output), and its outputs inside the
                // output and residual (lengths asserted).
                unsafe { x86::tile(&tile, columns, (blocks - b0).min(NB)) }
            }
        }
    }
}

impl Op for BlockedConv {
    fn name(&self) -> StaticName {
        "GraftBlockedConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let input = match &self.input {
            Input::Blocked => "1x1 of a blocked input".to_string(),
            Input::Direct(d) => format!("direct, {:?}", d.geometry),
        };
        Ok(vec![format!(
            "{input}, {} -> {} channels, {} pixels, clamps {:?}{}",
            self.weights.k,
            self.weights.m,
            self.pixels,
            self.clamps[0],
            if self.residual {
                format!(", + residual, clamp {:?}", self.clamps[1])
            } else {
                String::new()
            }
        )])
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for BlockedConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(
            inputs.len() == 1 + self.residual as usize,
            "GraftBlockedConv takes {} inputs",
            1 + self.residual as usize
        );
        let views: TVec<_> = inputs.iter().map(|i| i.view()).collect();
        let input = views[0].as_slice::<f32>()?;
        ensure!(
            input.len() == self.input_len(),
            "graft's blocked convolution expects {} input values, got {}",
            self.input_len(),
            input.len()
        );
        let shape = blocked_shape(self.weights.m, self.pixels);
        let residual = match views.get(1) {
            Some(r) => {
                let r = r.as_slice::<f32>()?;
                ensure!(
                    r.len() == shape.iter().product::<usize>(),
                    "residual of the output's size"
                );
                Some(r)
            }
            None => None,
        };
        // SAFETY: the product writes every output value (f32 has no invalid bit patterns).
        let mut output = unsafe { Tensor::uninitialized_aligned::<f32>(&shape, 64)? };
        {
            let mut plain = output.try_as_plain_ram_mut()?;
            self.run(input, residual, plain.as_slice_mut::<f32>()?);
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for BlockedConv {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(blocked_shape(self.weights.m, self.pixels))))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::super::dispatch::Level;
    use super::super::gemm_f32::{matmul, Epilogue, PackedWeights, Rows};
    use super::super::layout::{from_blocked, to_blocked};
    use super::*;

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7919 + seed * 104729) % 2003) as f32 / 1001.0 - 1.0)
            .collect()
    }

    /// The blocked product gives, bit for bit, what the plain-layout product gives at AVX-512
    /// (same sums in the same order), over odd channel counts, pixel counts and epilogues.
    #[test]
    fn matches_the_plain_layout_bit_for_bit() {
        if !Level::Avx512.supported() {
            return;
        }
        for (m, k, n) in [
            (1, 1, 1),
            (16, 16, 48),
            (24, 16, 12544),
            (96, 24, 3136),
            (13, 27, 49),
            (40, 33, 100),
            (320, 1152, 49),
            (1280, 320, 49),
            (70, 20, 9),
            (33, 9, 6),
            (48, 17, 15),
        ] {
            let (a, b) = (values(m * k, 1), values(k * n, 2));
            let bias = values(m, 3);
            let residual = values(m * n, 4);
            for with_residual in [false, true] {
                let epilogue = Epilogue {
                    bias: &bias,
                    before: [0.0, 0.5],
                    residual: with_residual.then_some(&residual[..]),
                    after: if with_residual {
                        [-0.25, f32::INFINITY]
                    } else {
                        UNBOUNDED
                    },
                };
                let packed = PackedWeights::new(Level::Avx512, &a, m, k);
                let mut plain = vec![f32::NAN; m * n];
                matmul(&packed, &Rows { data: &b, k, n }, &mut plain, &epilogue);

                let weights = BlockedWeights::new(&a, &bias, m, k);
                let input = to_blocked(&b, k, n);
                let blocked_residual = to_blocked(&residual, m, n);
                let mut out = vec![f32::NAN; m.div_ceil(16) * n * 16];
                let clamps = Clamps {
                    before: epilogue.before,
                    after: epilogue.after,
                };
                let r = with_residual.then_some(&blocked_residual[..]);
                product(&weights, &input, n, r, clamps, &mut out);
                let back = from_blocked(&out, m, n);
                let same = back
                    .iter()
                    .zip(&plain)
                    .all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "{m}x{k}x{n} residual {with_residual}");
                // The padding lanes hold finite values (zero weights, zero bias).
                assert!(out.iter().all(|v| v.is_finite()), "{m}x{k}x{n}");
            }
        }
    }

    /// Direct convolutions of a plain input give, bit for bit, what the plain layout's patch
    /// product gives, over strides, paddings, dilations and odd sizes.
    #[test]
    fn direct_convolutions_match_the_patch_product_bit_for_bit() {
        use super::super::conv::Patches;
        if !Level::Avx512.supported() {
            return;
        }
        for (channels, m, input, kernel, stride, dilation, pad) in [
            (3, 32, [23, 21], [3, 3], [2, 2], [1, 1], [1, 1]),
            (3, 24, [16, 16], [3, 3], [2, 2], [1, 1], [0, 0]),
            (5, 17, [9, 13], [5, 3], [1, 2], [1, 1], [2, 1]),
            (4, 40, [12, 12], [3, 3], [1, 1], [2, 2], [2, 2]),
            (2, 8, [7, 30], [7, 7], [2, 2], [1, 1], [3, 3]),
            (16, 33, [6, 6], [1, 1], [2, 2], [1, 1], [0, 0]),
        ] {
            let span = |i: usize| (kernel[i] - 1) * dilation[i] + 1;
            let output = [0, 1].map(|i| (input[i] + 2 * pad[i] - span(i)) / stride[i] + 1);
            let geometry = PatchGeometry {
                channels,
                input,
                kernel,
                stride,
                dilation,
                pad,
                output,
            };
            let (k, n) = (geometry.rows(), geometry.columns());
            let (a, x) = (values(m * k, 1), values(channels * input[0] * input[1], 2));
            let bias = values(m, 3);
            let epilogue = Epilogue {
                bias: &bias,
                before: [0.0, 0.6],
                residual: None,
                after: UNBOUNDED,
            };
            let packed = PackedWeights::new(Level::Avx512, &a, m, k);
            let mut plain = vec![f32::NAN; m * n];
            matmul(
                &packed,
                &Patches::new(&x, &geometry, 0.0),
                &mut plain,
                &epilogue,
            );
            let weights = BlockedWeights::new(&a, &bias, m, k);
            let mut out = vec![f32::NAN; m.div_ceil(16) * n * 16];
            let clamps = Clamps {
                before: epilogue.before,
                after: UNBOUNDED,
            };
            direct_product(
                &weights,
                &Direct::new(&geometry),
                &x,
                None,
                clamps,
                &mut out,
            );
            let back = from_blocked(&out, m, n);
            let same = back
                .iter()
                .zip(&plain)
                .all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "{geometry:?}");
            assert!(out.iter().all(|v| v.is_finite()), "{geometry:?}");
        }
    }

    #[test]
    #[ignore]
    fn timing() {
        if !Level::Avx512.supported() {
            return;
        }
        for (m, k, n) in [
            (96, 16, 12544),
            (24, 96, 3136),
            (144, 24, 3136),
            (480, 80, 196),
            (320, 1152, 49),
            (1280, 320, 49),
        ] {
            let (a, b) = (values(m * k, 1), values(k * n, 2));
            let bias = values(m, 3);
            let packed = PackedWeights::new(Level::Avx512, &a, m, k);
            let weights = BlockedWeights::new(&a, &bias, m, k);
            let input = to_blocked(&b, k, n);
            let mut plain = vec![0f32; m * n];
            let mut out = vec![0f32; m.div_ceil(16) * n * 16];
            let epilogue = Epilogue {
                bias: &bias,
                before: [0.0, 6.0],
                residual: None,
                after: UNBOUNDED,
            };
            let clamps = Clamps {
                before: [0.0, 6.0],
                after: UNBOUNDED,
            };
            for round in 0..3 {
                let t = std::time::Instant::now();
                for _ in 0..100 {
                    matmul(&packed, &Rows { data: &b, k, n }, &mut plain, &epilogue);
                }
                let a_us = t.elapsed().as_secs_f64() * 1e4;
                let t = std::time::Instant::now();
                for _ in 0..100 {
                    product(&weights, &input, n, None, clamps, &mut out);
                }
                let b_us = t.elapsed().as_secs_f64() * 1e4;
                eprintln!("{m}x{k}x{n} round {round}: plain {a_us:.1} us, blocked {b_us:.1} us");
            }
        }
    }
}
