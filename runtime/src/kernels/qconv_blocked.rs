//! int8 pointwise (1x1) convolutions in the 16-channel-blocked layout (AVX-512 VNNI), the
//! requantization fused as in [`gemm_int8`](super::gemm_int8).
//!
//! A blocked int8 tensor is `[ceil(C / 16)][P][16]` bytes: 16 channels of one pixel side by
//! side, so four consecutive input channels of a pixel are one 32-bit word. The micro-kernel
//! keeps `MP` pixels by `NB` blocks of 16 output channels as int32 sums; for each group of four
//! input channels it broadcasts a pixel's word (made unsigned by flipping the sign bits, the
//! `+128` that [`PackedInt8`]'s per-channel offset already accounts for) against one vector of
//! packed weights per block (`vpdpbusd`). The same integer sums and the same requantization as
//! the plain layout's kernel, so the outputs are identical (tested); like the f32 blocked
//! kernels, the int8 depthwise convolution that follows reads the output without transposes.

use std::sync::Arc;

use tract_core::internal::*;

use super::aligned::Aligned;
use super::conv_blocked::for_each_tile;
use super::gemm_int8::PackedInt8;
use super::layout::{blocked_shape, BLOCK};
use super::qconv::QuantizedConvolution;

/// Pixels at most in one micro-kernel tile.
const MP: usize = 12;
/// Blocks of 16 output channels at most in one tile.
const NB: usize = 2;

/// Weights packed for the blocked int8 kernel: `data[((block * groups + g) * 16 + lane) * 4 + i]`
/// = weight of output `16 * block + lane`, input `4 * g + i` (zero past `m` and `k`); the
/// requantization constants per output, zero past `m`.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockedInt8Weights {
    m: usize,
    k: usize,
    data: Aligned,
    offset: Vec<i32>,
    multiplier: Vec<f32>,
    y0: f32,
}

impl BlockedInt8Weights {
    /// Repacks `packed` (weights and requantization) for the blocked kernel.
    pub fn new(packed: &PackedInt8) -> BlockedInt8Weights {
        let (m, k) = (packed.m(), packed.k());
        let weights = packed.unpacked();
        let (blocks, groups) = (m.div_ceil(BLOCK), k.div_ceil(4));
        let mut data = Aligned::zeroed(blocks * groups * BLOCK * 4);
        let bytes = data.int8_mut();
        for (row, values) in weights.chunks_exact(k.max(1)).enumerate().take(m) {
            let (block, lane) = (row / BLOCK, row % BLOCK);
            for (kk, &v) in values.iter().enumerate() {
                bytes[((block * groups + kk / 4) * BLOCK + lane) * 4 + kk % 4] = v;
            }
        }
        let (offset, multiplier, y0) = packed.requantization();
        let pad = |n: usize| blocks * BLOCK - n;
        let mut offset = offset.to_vec();
        offset.extend(std::iter::repeat_n(0, pad(m)));
        let mut multiplier = multiplier.to_vec();
        multiplier.extend(std::iter::repeat_n(0.0, pad(m)));
        BlockedInt8Weights {
            m,
            k,
            data,
            offset,
            multiplier,
            y0,
        }
    }
}

/// `output = requantize(weights · input)` in the blocked layout: `input` is
/// `[ceil(k/16)][pixels][16]` int8, `output` `[ceil(m/16)][pixels][16]`. Needs AVX-512 VNNI
/// (asserted).
pub fn product(weights: &BlockedInt8Weights, input: &[i8], pixels: usize, output: &mut [i8]) {
    let (m, k) = (weights.m, weights.k);
    assert!(
        super::dispatch::Level::Avx512.supported(),
        "the blocked layout needs AVX-512 VNNI"
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
    let blocks = m.div_ceil(BLOCK);
    let groups = k.div_ceil(4);
    let out = output.as_mut_ptr();
    let weight_bytes = groups * blocks * BLOCK * 4;
    for_each_tile(
        pixels,
        blocks,
        [MP, NB],
        weight_bytes,
        |b0, nb, p0, rows| {
            let tile = Tile {
                groups,
                pixels,
                x: input.as_ptr().wrapping_add(p0 * BLOCK),
                w: weights.data.int8()[b0 * groups * BLOCK * 4..].as_ptr(),
                offset: weights.offset[b0 * BLOCK..].as_ptr(),
                multiplier: weights.multiplier[b0 * BLOCK..].as_ptr(),
                y0: weights.y0,
                out: out.wrapping_add((b0 * pixels + p0) * BLOCK),
            };
            // SAFETY: AVX-512 VNNI is supported (asserted); the tile's pixels and blocks lie inside
            // the input, weights and output (lengths asserted above).
            unsafe { x86::tile(&tile, rows, nb) }
        },
    );
}

/// One micro-kernel call; pointers at the tile's first pixel and block.
struct Tile {
    groups: usize,
    pixels: usize,
    x: *const i8,
    w: *const i8,
    offset: *const i32,
    multiplier: *const f32,
    y0: f32,
    out: *mut i8,
}

mod x86 {
    use std::arch::x86_64::*;

    use super::{Tile, BLOCK, MP, NB};

    /// Runs the `rows x nb` tile (at most `MP x NB`).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn tile(t: &Tile, rows: usize, nb: usize) {
        macro_rules! dispatch {
            ($($r:literal)*) => {
                match (rows, nb) {
                    $(($r, 1) => kernel::<$r, 1>(t),
                      ($r, 2) => kernel::<$r, 2>(t),)*
                    _ => unreachable!("a tile of {rows} x {nb}"),
                }
            };
        }
        debug_assert!(rows <= MP && nb <= NB);
        dispatch!(1 2 3 4 5 6 7 8 9 10 11 12)
    }

    #[inline(always)]
    unsafe fn kernel<const R: usize, const B: usize>(t: &Tile) {
        // The sums start from the per-channel offset (the integer part of the requantization).
        let mut offset = [_mm512_setzero_si512(); B];
        for (b, offset) in offset.iter_mut().enumerate() {
            *offset = _mm512_loadu_si512(t.offset.add(b * BLOCK) as *const _);
        }
        let mut acc = [offset; R];
        let block_stride = t.pixels * BLOCK;
        let flip = _mm512_set1_epi32(0x8080_8080u32 as i32);
        // One loop over the groups of four channels; `x` steps a word at a time and jumps to
        // the next block after four.
        let (mut w, mut x, mut word) = (t.w, t.x, 0);
        for _ in 0..t.groups {
            let mut wv = [_mm512_setzero_si512(); B];
            for (b, wv) in wv.iter_mut().enumerate() {
                *wv = _mm512_loadu_si512(w.add(b * t.groups * BLOCK * 4) as *const _);
            }
            for (p, acc) in acc.iter_mut().enumerate() {
                let word = (x.add(p * BLOCK) as *const i32).read_unaligned();
                let xv = _mm512_xor_si512(_mm512_set1_epi32(word), flip);
                for (sum, wv) in acc.iter_mut().zip(&wv) {
                    *sum = _mm512_dpbusd_epi32(*sum, xv, *wv);
                }
            }
            w = w.add(BLOCK * 4);
            word += 1;
            x = x.add(4);
            if word == BLOCK / 4 {
                word = 0;
                x = x.add(block_stride - BLOCK);
            }
        }
        // The epilogue on the accumulators, shaped as the f32 kernel's (see there). The plain
        // kernel's `round(clamp(y, -128, 127))` with one clamp: rounding commutes
        // with clamping to integers, and the saturating narrowing (`vpmovsdb`) clamps below
        // (a value under -2^31 converts to i32::MIN, which saturates to -128 as well).
        let y0 = _mm512_set1_ps(t.y0);
        let high = _mm512_set1_ps(127.0);
        let mut multiplier = [_mm512_setzero_ps(); B];
        for (b, multiplier) in multiplier.iter_mut().enumerate() {
            *multiplier = _mm512_loadu_ps(t.multiplier.add(b * BLOCK));
        }
        for (p, acc) in acc.iter().enumerate() {
            for (b, &sum) in acc.iter().enumerate() {
                let y = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), multiplier[b], y0);
                let y = _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                    _mm512_min_ps(y, high),
                );
                let at = b * block_stride + p * BLOCK;
                _mm_storeu_si128(t.out.add(at) as *mut _, _mm512_cvtsepi32_epi8(y));
            }
        }
    }
}

/// A pointwise [`QuantizedConvolution`] in the blocked layout: int8 input
/// `[ceil(k/16), pixels, 16]`, int8 output `[ceil(m/16), pixels, 16]` of the same quantized type.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockedQuantizedConv {
    weights: Arc<BlockedInt8Weights>,
    pixels: usize,
    output: DatumType,
}

impl Eq for BlockedQuantizedConv {}

impl BlockedQuantizedConv {
    /// The blocked form of `conv` when it is pointwise.
    pub fn of(conv: &QuantizedConvolution) -> Option<BlockedQuantizedConv> {
        let (packed, pixels, output) = conv.pointwise_parts()?;
        Some(BlockedQuantizedConv {
            weights: Arc::new(BlockedInt8Weights::new(packed)),
            pixels,
            output,
        })
    }

    /// Input channels.
    pub fn k(&self) -> usize {
        self.weights.k
    }

    /// Output channels.
    pub fn m(&self) -> usize {
        self.weights.m
    }

    /// Pixels.
    pub fn pixels(&self) -> usize {
        self.pixels
    }
}

impl Op for BlockedQuantizedConv {
    fn name(&self) -> StaticName {
        "GraftBlockedQuantizedConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "1x1, {} -> {} int8 channels, {} pixels, 16-channel blocks -> {:?}",
            self.weights.k, self.weights.m, self.pixels, self.output
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for BlockedQuantizedConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let view = input.view();
        ensure!(
            input.datum_type().unquantized() == i8::datum_type(),
            "GraftBlockedQuantizedConv takes int8"
        );
        let values = view.as_slice::<i8>()?;
        let expected: usize = blocked_shape(self.weights.k, self.pixels).iter().product();
        ensure!(
            values.len() == expected,
            "graft's blocked int8 convolution expects {expected} input values, got {}",
            values.len()
        );
        let shape = blocked_shape(self.weights.m, self.pixels);
        // SAFETY: the product writes every output value.
        let mut output = unsafe { Tensor::uninitialized_aligned_dt(self.output, &shape, 64)? };
        {
            let mut plain = output.try_as_plain_ram_mut()?;
            product(
                &self.weights,
                values,
                self.pixels,
                plain.as_slice_mut::<i8>()?,
            );
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for BlockedQuantizedConv {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(self
            .output
            .fact(blocked_shape(self.weights.m, self.pixels))))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::super::dispatch::Level;
    use super::super::gemm_int8::{matmul, Requantization, RowsInt8};
    use super::super::layout::{from_blocked, to_blocked};
    use super::*;

    fn bytes(len: usize, seed: usize) -> Vec<i8> {
        (0..len)
            .map(|i| ((i * 7919 + seed * 104729) % 251) as u8 as i8)
            .collect()
    }

    /// The same outputs as the plain layout's int8 kernel, byte for byte.
    #[test]
    fn matches_the_plain_layout_exactly() {
        if !Level::Avx512.supported() {
            return;
        }
        for (m, k, n) in [
            (1, 4, 1),
            (16, 16, 48),
            (96, 16, 500),
            (24, 96, 196),
            (13, 27, 49),
            (40, 33, 100),
            (320, 1152, 49),
            (33, 9, 6),
        ] {
            let (a, x) = (bytes(m * k, 1), bytes(k * n, 2));
            // Per-tensor and per-channel scales, and scales so large that most outputs
            // saturate from beyond the i32 range (the epilogue's one-sided clamp).
            for (per_channel, x_scale) in [(false, 0.02), (true, 0.02), (true, 1e6)] {
                let requant = Requantization {
                    x0: -3,
                    x_scale,
                    k_scales: if per_channel {
                        (0..m).map(|i| 0.001 + i as f32 * 1e-4).collect()
                    } else {
                        vec![0.002]
                    },
                    bias: (0..m as i32).map(|i| i * 37 - 200).collect(),
                    y0: 5,
                    y_scale: 0.05,
                };
                let packed = PackedInt8::new(Level::Avx512, &a, m, k, &requant);
                let mut plain = vec![0i8; m * n];
                matmul(&packed, &RowsInt8 { data: &x, k, n }, &mut plain);
                let weights = BlockedInt8Weights::new(&packed);
                let input = to_blocked(&x, k, n);
                let mut out = vec![0i8; m.div_ceil(16) * n * 16];
                product(&weights, &input, n, &mut out);
                assert_eq!(from_blocked(&out, m, n), plain, "{m}x{k}x{n}");
            }
        }
    }
}
