//! int8 matrix products for quantized convolutions, `C[M x N] = A[M x K] · B[K x N]` with
//! int8 weights A (symmetric, zero point 0), int8 activations B (any zero point) and the
//! requantization to the int8 output fused: int32 sums, bias, per-channel (or per-tensor)
//! scale, output zero point, rounding and saturation happen on the tile in registers, so the
//! int32 products are never written out.
//!
//! x86's dot-product instructions (`vpdpbusd`: AVX-512 VNNI, AVX-VNNI) multiply *unsigned* bytes
//! by signed ones, four at a time, into 32-bit sums. Activations are made unsigned while they are
//! packed (`x + 128`, a flip of the sign bit); the extra `128 * sum(w)` of each output channel is
//! folded, with the input zero point and the bias, into one constant per channel computed when
//! the weights are packed: `sum w (x - x0) + bias = sum w (x + 128) + (bias - (128 + x0) sum w)`.
//! Exact in 32 bits (no saturating 16-bit steps), so every level computes the same integers and
//! the outputs are identical across levels.
//!
//! Layouts: weights in blocks of `MR` rows, each as `K/4` groups of `MR x 4` bytes (one 32-bit
//! broadcast per row and group); activations packed `NR` columns at a time as `K/4` groups of
//! `NR x 4` bytes (one vector load per 16 or 8 columns and group). `K` is padded to a multiple
//! of 4 with zero weights.

use std::cell::RefCell;

use super::aligned::Aligned;
use super::dispatch::Level;
use super::gemm_f32::Panels;

/// `(MR, NR)`: rows of A and columns of B in one micro-kernel tile at `level`.
pub fn tile(level: Level) -> (usize, usize) {
    match level {
        Level::Avx512 => (8, 48),
        Level::AvxVnni => (6, 16),
        Level::Avx2 => (4, 8),
        Level::Portable => (4, 16),
    }
}

/// How the int32 sums become int8 outputs, per output channel:
/// `y = saturate(round_ties_even((sum + bias) * x_scale * k_scale / y_scale) + y0)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Requantization {
    /// The activations' zero point.
    pub x0: i32,
    /// The activations' scale.
    pub x_scale: f32,
    /// The weights' scales: one, or one per output channel.
    pub k_scales: Vec<f32>,
    /// int32 bias, one per output channel.
    pub bias: Vec<i32>,
    /// The output's zero point.
    pub y0: i32,
    /// The output's scale.
    pub y_scale: f32,
}

/// Weights packed for one level, with the per-channel constants of the epilogue.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedInt8 {
    level: Level,
    m: usize,
    k: usize,
    data: Aligned,
    /// `bias - (128 + x0) * sum(w)` per row (padded to whole blocks).
    offset: Vec<i32>,
    /// `x_scale * k_scale / y_scale` per row (padded).
    multiplier: Vec<f32>,
    y0: f32,
}

impl PackedInt8 {
    /// Packs `a` (`m x k` int8, row-major) and `requant` for `level`.
    pub fn new(level: Level, a: &[i8], m: usize, k: usize, requant: &Requantization) -> Self {
        assert_eq!(a.len(), m * k, "an {m} x {k} matrix");
        assert!(requant.k_scales.len() == 1 || requant.k_scales.len() == m);
        assert_eq!(requant.bias.len(), m, "one bias per row");
        let (mr, _) = tile(level);
        let (blocks, groups) = (m.div_ceil(mr), k.div_ceil(4));
        let mut data = Aligned::zeroed(blocks * groups * mr * 4);
        let packed = data.int8_mut();
        let mut offset = vec![0i32; blocks * mr];
        let mut multiplier = vec![0f32; blocks * mr];
        for (row, values) in a.chunks_exact(k.max(1)).enumerate().take(m) {
            let (block, r) = (row / mr, row % mr);
            for (kk, &v) in values.iter().enumerate() {
                packed[((block * groups + kk / 4) * mr + r) * 4 + kk % 4] = v;
            }
            let sum: i32 = values.iter().map(|&v| v as i32).sum();
            offset[row] = requant.bias[row] - (128 + requant.x0) * sum;
            let k_scale = requant.k_scales[if requant.k_scales.len() == 1 { 0 } else { row }];
            multiplier[row] = requant.x_scale * k_scale / requant.y_scale;
        }
        PackedInt8 {
            level,
            m,
            k,
            data,
            offset,
            multiplier,
            y0: requant.y0 as f32,
        }
    }

    /// Rows (output channels).
    pub fn m(&self) -> usize {
        self.m
    }

    /// The reduction length.
    pub fn k(&self) -> usize {
        self.k
    }

    /// The level the weights were packed for.
    pub fn level(&self) -> Level {
        self.level
    }

    /// The `m x k` row-major int8 matrix they were packed from.
    pub fn unpacked(&self) -> Vec<i8> {
        let (mr, _) = tile(self.level);
        let groups = self.k.div_ceil(4);
        let packed = self.data.int8();
        let mut a = vec![0i8; self.m * self.k];
        for (row, values) in a.chunks_exact_mut(self.k.max(1)).enumerate() {
            let (block, r) = (row / mr, row % mr);
            for (kk, v) in values.iter_mut().enumerate() {
                *v = packed[((block * groups + kk / 4) * mr + r) * 4 + kk % 4];
            }
        }
        a
    }

    /// The epilogue's constants per row (`offset`, `multiplier`; `m` of each) and the output
    /// zero point.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // for the blocked kernel
    pub(crate) fn requantization(&self) -> (&[i32], &[f32], f32) {
        (&self.offset[..self.m], &self.multiplier[..self.m], self.y0)
    }
}

// The B operand is a `Panels<u8>`: columns packed as `K/4` groups of `NR x 4` bytes, each
// activation as `x + 128` (unsigned); rows past `K` may hold anything (their weights are zero).

/// Four int8 values as the unsigned bytes of one 32-bit group.
#[inline(always)]
pub(crate) fn group(values: [i8; 4]) -> [u8; 4] {
    (u32::from_le_bytes(values.map(|v| v as u8)) ^ 0x8080_8080).to_le_bytes()
}

/// A dense row-major `K x N` int8 matrix (a 1x1 convolution's input, `K` channel planes).
pub struct RowsInt8<'a> {
    /// The values.
    pub data: &'a [i8],
    /// Rows.
    pub k: usize,
    /// Columns.
    pub n: usize,
}

impl Panels<u8> for RowsInt8<'_> {
    fn k(&self) -> usize {
        self.k
    }

    fn n(&self) -> usize {
        self.n
    }

    fn pack(&self, n0: usize, width: usize, nr: usize, panel: &mut [u8]) {
        let n = self.n;
        for (g, target) in panel.chunks_exact_mut(nr * 4).enumerate() {
            let row = |t: usize| -> &[i8] {
                let r = (4 * g + t).min(self.k - 1);
                &self.data[r * n + n0..r * n + n0 + width]
            };
            let (r0, r1, r2, r3) = (row(0), row(1), row(2), row(3));
            for (j, out) in target.chunks_exact_mut(4).take(width).enumerate() {
                out.copy_from_slice(&group([r0[j], r1[j], r2[j], r3[j]]));
            }
        }
    }
}

/// One micro-kernel call: a tile of C at `c` (row stride `ldc`), `rows x width` of it valid.
struct Tile {
    groups: usize,
    a: *const i8,
    b: *const u8,
    c: *mut i8,
    ldc: usize,
    rows: usize,
    width: usize,
    offset: *const i32,
    multiplier: *const f32,
    y0: f32,
}

thread_local! {
    /// The B panel, reused across calls on a thread.
    static PANEL: RefCell<Aligned> = RefCell::new(Aligned::default());
}

/// `c = requantize(a · b)`, `c` being `M x N` row-major int8. `a` must be packed for a level
/// this CPU supports.
pub fn matmul(a: &PackedInt8, b: &impl Panels<u8>, c: &mut [i8]) {
    let (m, k, n) = (a.m, a.k, b.n());
    assert_eq!(b.k(), k, "B has {} rows, A {k} columns", b.k());
    assert_eq!(c.len(), m * n, "C is {m} x {n}");
    assert!(a.level.supported(), "{:?} kernels on this CPU", a.level);
    let (mr, nr) = tile(a.level);
    let groups = k.div_ceil(4);
    PANEL.with(|panel| {
        let mut panel = panel.borrow_mut();
        panel.reserve(groups * nr * 4);
        let panel = &mut panel.bytes_mut()[..groups * nr * 4];
        for n0 in (0..n).step_by(nr) {
            let width = nr.min(n - n0);
            b.pack(n0, width, nr, panel);
            let step = blocks_per_tile(a.level, width);
            for block in (0..m.div_ceil(mr)).step_by(step) {
                let m0 = block * mr;
                let tile = Tile {
                    groups,
                    a: a.data.int8()[block * groups * mr * 4..].as_ptr(),
                    b: panel.as_ptr(),
                    // SAFETY: `m0 * n + n0` is inside C; the kernel touches rows
                    // m0..m0 + rows and columns n0..n0 + width only.
                    c: unsafe { c.as_mut_ptr().add(m0 * n + n0) },
                    ldc: n,
                    rows: (step * mr).min(m - m0),
                    width,
                    offset: a.offset[m0..].as_ptr(),
                    multiplier: a.multiplier[m0..].as_ptr(),
                    y0: a.y0,
                };
                // SAFETY: the level is supported (asserted above); each packed block holds
                // `groups * mr * 4` bytes (`rows` covers whole blocks but the last), the panel
                // `groups * nr * 4`, the constants `rows`.
                unsafe { run_tile(a.level, &tile) };
            }
        }
    });
}

/// Columns at most that the AVX-512 level computes with its narrow kernel, four blocks of A at
/// once (see the f32 products' narrow kernel: the same reasons, the 49th pixel of a 7x7 map).
const NARROW: usize = 6;

/// Blocks of A the narrow kernel takes at once.
const GROUP: usize = 4;

/// Blocks of `MR` rows in one micro-kernel call.
fn blocks_per_tile(level: Level, width: usize) -> usize {
    if level == Level::Avx512 && width <= NARROW {
        GROUP
    } else {
        1
    }
}

unsafe fn run_tile(level: Level, tile: &Tile) {
    match level {
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => x86::tile_vnni512(tile),
        #[cfg(target_arch = "x86_64")]
        Level::AvxVnni => x86::tile_avxvnni(tile),
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => x86::tile_avx2(tile),
        _ => tile_portable(tile),
    }
}

/// The requantization of one sum (the reference every level matches).
#[inline(always)]
pub(crate) fn requantize(sum: i32, offset: i32, multiplier: f32, y0: f32) -> i8 {
    let y = ((sum.wrapping_add(offset)) as f32).mul_add(multiplier, y0);
    let y = y.round_ties_even().clamp(-128.0, 127.0);
    // SAFETY: an integer in -128..=127 (no NaN: the inputs are finite).
    unsafe { y.to_int_unchecked::<i32>() as i8 }
}

/// The portable micro-kernel: 4 x 16, plain arrays.
#[inline(always)]
unsafe fn tile_portable(t: &Tile) {
    const MR: usize = 4;
    const NR: usize = 16;
    let a = std::slice::from_raw_parts(t.a, t.groups * MR * 4);
    let b = std::slice::from_raw_parts(t.b, t.groups * NR * 4);
    let mut acc = [[0i32; NR]; MR];
    for (a, b) in a.chunks_exact(MR * 4).zip(b.chunks_exact(NR * 4)) {
        for (row, w) in acc.iter_mut().zip(a.chunks_exact(4)) {
            for (sum, x) in row.iter_mut().zip(b.chunks_exact(4)) {
                *sum += w[0] as i32 * x[0] as i32
                    + w[1] as i32 * x[1] as i32
                    + w[2] as i32 * x[2] as i32
                    + w[3] as i32 * x[3] as i32;
            }
        }
    }
    for (r, row) in acc.iter().enumerate().take(t.rows) {
        let (offset, multiplier) = (*t.offset.add(r), *t.multiplier.add(r));
        for (j, &sum) in row.iter().enumerate().take(t.width) {
            *t.c.add(r * t.ldc + j) = requantize(sum, offset, multiplier, t.y0);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Tile, GROUP, NARROW};

    /// AVX2 without dot-product instructions: activations widened to 16 bits and multiplied
    /// in pairs into 32-bit sums (`vpmaddwd`, exact: no saturating 8-bit step), 4 x 8 tiles.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile_avx2(t: &Tile) {
        const MR: usize = 4;
        const NR: usize = 8;
        // Per row: pixels 0-3 and 4-7, each lane the sum of two of a pixel's four products.
        let mut low = [_mm256_setzero_si256(); MR];
        let mut high = [_mm256_setzero_si256(); MR];
        let (mut a, mut b) = (t.a, t.b);
        for _ in 0..t.groups {
            let x = _mm256_loadu_si256(b as *const __m256i);
            let x_low = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(x));
            let x_high = _mm256_cvtepu8_epi16(_mm256_extracti128_si256::<1>(x));
            for r in 0..MR {
                let w = (a.add(4 * r) as *const i32).read_unaligned();
                let w = _mm256_broadcastq_epi64(_mm_cvtepi8_epi16(_mm_cvtsi32_si128(w)));
                low[r] = _mm256_add_epi32(low[r], _mm256_madd_epi16(x_low, w));
                high[r] = _mm256_add_epi32(high[r], _mm256_madd_epi16(x_high, w));
            }
            a = a.add(MR * 4);
            b = b.add(NR * 4);
        }
        let y0 = _mm256_set1_ps(t.y0);
        let (lo, hi) = (_mm256_set1_ps(-128.0), _mm256_set1_ps(127.0));
        for r in 0..MR {
            if r >= t.rows {
                break;
            }
            // [p0, p1, p4, p5 | p2, p3, p6, p7] -> pixels in order.
            let sum = _mm256_hadd_epi32(low[r], high[r]);
            let sum = _mm256_permute4x64_epi64::<0b11_01_10_00>(sum);
            let offset = _mm256_set1_epi32(*t.offset.add(r));
            let multiplier = _mm256_set1_ps(*t.multiplier.add(r));
            let y = _mm256_cvtepi32_ps(_mm256_add_epi32(sum, offset));
            let y = _mm256_fmadd_ps(y, multiplier, y0);
            let y = _mm256_min_ps(_mm256_max_ps(y, lo), hi);
            let y = _mm256_cvtps_epi32(_mm256_round_ps::<
                { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
            >(y));
            let mut lanes = [0i32; 8];
            _mm256_storeu_si256(lanes.as_mut_ptr() as *mut _, y);
            let out = t.c.add(r * t.ldc);
            for (j, &value) in lanes.iter().enumerate().take(t.width) {
                *out.add(j) = value as i8;
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn tile_vnni512(t: &Tile) {
        match t.width {
            1..=NARROW => narrow(t),
            _ => match t.width.div_ceil(16) {
                3 => vnni512::<3>(t),
                2 => vnni512::<2>(t),
                _ => vnni512::<1>(t),
            },
        }
    }

    /// A tile of at most [`NARROW`] columns and up to [`GROUP`] blocks of A, vectorised along
    /// the rows: per group of four `k`, one load of each block's packed A (8 rows x 4 bytes) and
    /// one broadcast of each column's 4 bytes of B, each pair feeding one `vpdpbusd`. Integer
    /// sums, so the same results as [`vnni512`]; requantized by the scalar reference.
    #[inline(always)]
    unsafe fn narrow(t: &Tile) {
        const MR: usize = 8;
        const NR: usize = 48;
        let blocks = t.rows.div_ceil(MR);
        let mut acc = [[_mm256_setzero_si256(); GROUP]; NARROW];
        let mut b = t.b;
        for g in 0..t.groups {
            let mut weights = [_mm256_setzero_si256(); GROUP];
            for (block, w) in weights.iter_mut().enumerate().take(blocks) {
                *w = _mm256_loadu_si256(t.a.add((block * t.groups + g) * MR * 4) as *const _);
            }
            for (j, sums) in acc.iter_mut().enumerate().take(t.width) {
                let x = _mm256_set1_epi32((b.add(4 * j) as *const i32).read_unaligned());
                for (sum, w) in sums.iter_mut().zip(&weights) {
                    *sum = _mm256_dpbusd_epi32(*sum, x, *w);
                }
            }
            b = b.add(NR * 4);
        }
        let mut sums = [[0i32; MR * GROUP]; NARROW];
        for (column, out) in acc.iter().zip(sums.iter_mut()) {
            for (block, sum) in column.iter().enumerate() {
                _mm256_storeu_si256(out[block * MR..].as_mut_ptr() as *mut _, *sum);
            }
        }
        for r in 0..t.rows {
            let (offset, multiplier) = (*t.offset.add(r), *t.multiplier.add(r));
            for (j, column) in sums.iter().enumerate().take(t.width) {
                *t.c.add(r * t.ldc + j) = super::requantize(column[r], offset, multiplier, t.y0);
            }
        }
    }

    #[inline(always)]
    unsafe fn vnni512<const NV: usize>(t: &Tile) {
        const MR: usize = 8;
        const NR: usize = 48;
        let mut acc = [[_mm512_setzero_si512(); NV]; MR];
        let (mut a, mut b) = (t.a, t.b);
        for _ in 0..t.groups {
            let mut x = [_mm512_setzero_si512(); NV];
            for (v, x) in x.iter_mut().enumerate() {
                *x = _mm512_loadu_si512(b.add(64 * v) as *const _);
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let w = _mm512_set1_epi32((a.add(4 * r) as *const i32).read_unaligned());
                for (sum, &x) in row.iter_mut().zip(&x) {
                    *sum = _mm512_dpbusd_epi32(*sum, x, w);
                }
            }
            a = a.add(MR * 4);
            b = b.add(NR * 4);
        }
        let y0 = _mm512_set1_ps(t.y0);
        let (low, high) = (_mm512_set1_ps(-128.0), _mm512_set1_ps(127.0));
        for (r, row) in acc.iter().enumerate() {
            if r >= t.rows {
                break;
            }
            let offset = _mm512_set1_epi32(*t.offset.add(r));
            let multiplier = _mm512_set1_ps(*t.multiplier.add(r));
            for (v, &sum) in row.iter().enumerate() {
                let columns = t.width.saturating_sub(16 * v).min(16);
                let mask: __mmask16 = ((1u32 << columns) - 1) as u16;
                let y = _mm512_cvtepi32_ps(_mm512_add_epi32(sum, offset));
                let y = _mm512_fmadd_ps(y, multiplier, y0);
                let y = _mm512_min_ps(_mm512_max_ps(y, low), high);
                let y = _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                    y,
                );
                let bytes = _mm512_cvtepi32_epi8(y);
                _mm_mask_storeu_epi8(t.c.add(r * t.ldc + 16 * v), mask, bytes);
            }
        }
    }

    #[target_feature(enable = "avx2,fma,avxvnni")]
    pub(super) unsafe fn tile_avxvnni(t: &Tile) {
        match t.width.div_ceil(8) {
            2 => avxvnni::<2>(t),
            _ => avxvnni::<1>(t),
        }
    }

    #[inline(always)]
    unsafe fn avxvnni<const NV: usize>(t: &Tile) {
        const MR: usize = 6;
        const NR: usize = 16;
        let mut acc = [[_mm256_setzero_si256(); NV]; MR];
        let (mut a, mut b) = (t.a, t.b);
        for _ in 0..t.groups {
            let mut x = [_mm256_setzero_si256(); NV];
            for (v, x) in x.iter_mut().enumerate() {
                *x = _mm256_loadu_si256(b.add(32 * v) as *const _);
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let w = _mm256_set1_epi32((a.add(4 * r) as *const i32).read_unaligned());
                for (sum, &x) in row.iter_mut().zip(&x) {
                    *sum = _mm256_dpbusd_avx_epi32(*sum, x, w);
                }
            }
            a = a.add(MR * 4);
            b = b.add(NR * 4);
        }
        let y0 = _mm256_set1_ps(t.y0);
        let (low, high) = (_mm256_set1_ps(-128.0), _mm256_set1_ps(127.0));
        for (r, row) in acc.iter().enumerate() {
            if r >= t.rows {
                break;
            }
            let offset = _mm256_set1_epi32(*t.offset.add(r));
            let multiplier = _mm256_set1_ps(*t.multiplier.add(r));
            for (v, &sum) in row.iter().enumerate() {
                let y = _mm256_cvtepi32_ps(_mm256_add_epi32(sum, offset));
                let y = _mm256_fmadd_ps(y, multiplier, y0);
                let y = _mm256_min_ps(_mm256_max_ps(y, low), high);
                // Rounds to nearest, ties to even (the default rounding mode).
                let y = _mm256_cvtps_epi32(_mm256_round_ps::<
                    { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
                >(y));
                let mut lanes = [0i32; 8];
                _mm256_storeu_si256(lanes.as_mut_ptr() as *mut _, y);
                let columns = t.width.saturating_sub(8 * v).min(8);
                let out = t.c.add(r * t.ldc + 8 * v);
                for (j, &value) in lanes.iter().enumerate().take(columns) {
                    *out.add(j) = value as i8;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain triple loop on the original (signed) values, then [`requantize`].
    fn reference(
        a: &[i8],
        b: &[i8],
        (m, k, n): (usize, usize, usize),
        q: &Requantization,
    ) -> Vec<i8> {
        let mut c = vec![0i8; m * n];
        for i in 0..m {
            let k_scale = q.k_scales[if q.k_scales.len() == 1 { 0 } else { i }];
            let multiplier = q.x_scale * k_scale / q.y_scale;
            for j in 0..n {
                let sum: i32 = (0..k)
                    .map(|p| a[i * k + p] as i32 * (b[p * n + j] as i32 - q.x0))
                    .sum();
                c[i * n + j] = requantize(sum, q.bias[i], multiplier, q.y0 as f32);
            }
        }
        c
    }

    fn bytes(len: usize, seed: usize) -> Vec<i8> {
        (0..len)
            .map(|i| ((i * 7919 + seed * 104729) % 256) as u8 as i8)
            .collect()
    }

    #[test]
    fn every_level_matches_the_reference_exactly() {
        let mut saturated = 0;
        for level in Level::available() {
            for (m, k, n) in [
                (1, 1, 1),
                (8, 16, 48),
                (13, 27, 49),
                (24, 96, 196),
                (6, 5, 17),
                (40, 33, 100),
                (9, 3, 47),
                (7, 130, 9),
                (70, 20, 53),
                (33, 9, 6),
            ] {
                let a: Vec<i8> = bytes(m * k, 1).iter().map(|&v| v.max(-127)).collect();
                let b = bytes(k * n, 2);
                for per_channel in [false, true] {
                    let q = Requantization {
                        x0: -9,
                        x_scale: 0.8,
                        k_scales: if per_channel {
                            (0..m).map(|i| 0.001 + i as f32 * 0.0003).collect()
                        } else {
                            vec![0.002]
                        },
                        bias: (0..m).map(|i| i as i32 * 37 - 200).collect(),
                        y0: -14,
                        y_scale: 0.3 + k as f32 * 0.01,
                    };
                    let expected = reference(&a, &b, (m, k, n), &q);
                    let packed = PackedInt8::new(level, &a, m, k, &q);
                    let mut c = vec![0i8; m * n];
                    matmul(&packed, &RowsInt8 { data: &b, k, n }, &mut c);
                    assert_eq!(
                        c, expected,
                        "{level:?} {m}x{k}x{n} per channel {per_channel}"
                    );
                    saturated += c.iter().filter(|&&v| v == -128 || v == 127).count();
                }
            }
        }
        assert!(saturated > 100, "saturation exercised: {saturated} values");
    }
}
