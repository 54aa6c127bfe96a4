//! f32 matrix products for convolutions, `C[M x N] = A[M x K] · B[K x N]`, with the layer's
//! epilogue fused: bias, a clamp (ReLU, ReLU6), a residual add and a clamp after it.
//!
//! A convolution in CHW layout is such a product: A is the weights (`M` output channels by `K`
//! = input channels x kernel taps), B the input (a 1x1 convolution reads it as it is, `K` rows of
//! `N` pixels; other convolutions gather it, see [`Panels`]) and C the output, `M` planes of `N`
//! pixels. The weights are packed once, when the operator is built, into blocks of `MR` rows
//! stored column by column ([`PackedWeights`]); B is packed `NR` columns at a time into a panel
//! that stays in cache while every block of A runs over it. The micro-kernel keeps an
//! `MR x NR` tile of C in registers for the whole `K` loop (one broadcast of A and one FMA per
//! vector of B and row), then applies the epilogue and stores the tile once: the output is
//! written exactly once, with nothing left for separate bias, activation or add operators.
//!
//! Tiles by level ([`Level`]): AVX-512 8 x 48 (24 accumulators of 16 lanes), AVX2 + FMA 6 x 16
//! (12 of 8), portable 4 x 16 (arrays the compiler vectorises; NEON fused multiply-adds on
//! aarch64). Partial tiles store through masks (AVX-512, AVX2) or element by element.

use std::cell::RefCell;

use super::aligned::Aligned;
use super::dispatch::Level;

/// `(MR, NR)`: rows of A and columns of B in one micro-kernel tile at `level`.
pub fn tile(level: Level) -> (usize, usize) {
    match level {
        Level::Avx512 => (8, 48),
        Level::Avx2 | Level::AvxVnni => (6, 16),
        Level::Portable => (4, 16),
    }
}

/// A row-major `M x K` matrix packed for one level's micro-kernel: blocks of `MR` rows, each
/// stored column by column (`data[(block * K + k) * MR + row]`), the last block zero-padded.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedWeights {
    level: Level,
    m: usize,
    k: usize,
    data: Aligned,
}

impl PackedWeights {
    /// Packs `a` (`m x k`, row-major) for `level`.
    pub fn new(level: Level, a: &[f32], m: usize, k: usize) -> PackedWeights {
        assert_eq!(a.len(), m * k, "an {m} x {k} matrix");
        let (mr, _) = tile(level);
        let blocks = m.div_ceil(mr);
        let mut data = Aligned::zeroed(blocks * k * mr * 4);
        let packed = data.floats_mut();
        for (row, values) in a.chunks_exact(k.max(1)).enumerate().take(m) {
            let (block, r) = (row / mr, row % mr);
            for (kk, &v) in values.iter().enumerate() {
                packed[(block * k + kk) * mr + r] = v;
            }
        }
        PackedWeights { level, m, k, data }
    }

    /// Rows (output channels).
    pub fn m(&self) -> usize {
        self.m
    }

    /// Columns (the reduction length).
    pub fn k(&self) -> usize {
        self.k
    }

    /// The level the weights were packed for.
    pub fn level(&self) -> Level {
        self.level
    }

    /// The `m x k` row-major matrix they were packed from.
    pub fn unpacked(&self) -> Vec<f32> {
        let (mr, _) = tile(self.level);
        let packed = self.data.floats();
        let mut a = vec![0f32; self.m * self.k];
        for (row, values) in a.chunks_exact_mut(self.k.max(1)).enumerate() {
            let (block, r) = (row / mr, row % mr);
            for (kk, v) in values.iter_mut().enumerate() {
                *v = packed[(block * self.k + kk) * mr + r];
            }
        }
        a
    }
}

/// The B operand of a product: `K x N` values, packed `NR` columns at a time into panels of `T`
/// (f32 products: `K` rows of `NR` values; int8 products: see
/// [`gemm_int8`](super::gemm_int8)).
pub trait Panels<T> {
    /// Rows (must equal the weights' `K`).
    fn k(&self) -> usize;
    /// Columns (output pixels).
    fn n(&self) -> usize;
    /// Writes columns `n0 .. n0 + width` into `panel` (columns from `width` to `nr` are left as
    /// they are: their results are never stored).
    fn pack(&self, n0: usize, width: usize, nr: usize, panel: &mut [T]);
    /// The values when they are a dense row-major `K x N` matrix the kernels can read in place.
    fn dense(&self) -> Option<&[T]> {
        None
    }
}

/// A dense row-major `K x N` matrix (a 1x1 convolution's input, `K` channel planes).
pub struct Rows<'a> {
    /// The values.
    pub data: &'a [f32],
    /// Rows.
    pub k: usize,
    /// Columns.
    pub n: usize,
}

impl Panels<f32> for Rows<'_> {
    fn k(&self) -> usize {
        self.k
    }

    fn n(&self) -> usize {
        self.n
    }

    fn dense(&self) -> Option<&[f32]> {
        Some(self.data)
    }

    fn pack(&self, n0: usize, width: usize, nr: usize, panel: &mut [f32]) {
        for (row, target) in self
            .data
            .chunks_exact(self.n)
            .zip(panel.chunks_exact_mut(nr))
        {
            target[..width].copy_from_slice(&row[n0..n0 + width]);
        }
    }
}

/// What happens to each product before it is stored:
/// `out = clamp(clamp(acc + bias, before) + residual, after)` (no residual: the second clamp is
/// skipped).
#[derive(Debug, Clone, Copy)]
pub struct Epilogue<'a> {
    /// One value per row of C.
    pub bias: &'a [f32],
    /// `[low, high]` applied after the bias.
    pub before: [f32; 2],
    /// A tensor shaped like C added after the first clamp.
    pub residual: Option<&'a [f32]>,
    /// `[low, high]` applied after the residual add.
    pub after: [f32; 2],
}

/// No clamp.
pub const UNBOUNDED: [f32; 2] = [f32::NEG_INFINITY, f32::INFINITY];

/// One micro-kernel call: a tile of C at `c` (row stride `ldc`), `rows x width` of it valid.
struct Tile {
    k: usize,
    a: *const f32,
    b: *const f32,
    /// Distance between B's rows: `NR` in a packed panel, `N` when read in place (x86-64 only).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    width: usize,
    bias: *const f32,
    /// Same offsets as `c`, or null.
    residual: *const f32,
    before: [f32; 2],
    after: [f32; 2],
}

thread_local! {
    /// The B panel, reused across calls on a thread.
    static PANEL: RefCell<Aligned> = RefCell::new(Aligned::default());
}

/// `c = epilogue(a · b)`, `c` being `M x N` row-major. `a` must be packed for a level this CPU
/// supports.
pub fn matmul(a: &PackedWeights, b: &impl Panels<f32>, c: &mut [f32], epilogue: &Epilogue) {
    let (m, k, n) = (a.m, a.k, b.n());
    assert_eq!(b.k(), k, "B has {} rows, A {k} columns", b.k());
    assert_eq!(c.len(), m * n, "C is {m} x {n}");
    assert_eq!(epilogue.bias.len(), m, "one bias per row");
    if let Some(residual) = epilogue.residual {
        assert_eq!(residual.len(), m * n, "the residual is shaped like C");
    }
    assert!(a.level.supported(), "{:?} kernels on this CPU", a.level);
    if let Some(data) = b.dense().filter(|_| in_place(a.level, k, n)) {
        return matmul_in_place(a, data, n, c, epilogue);
    }
    let (mr, nr) = tile(a.level);
    let product = Product {
        a,
        c: c.as_mut_ptr(),
        n,
        epilogue,
    };
    PANEL.with(|panel| {
        let mut panel = panel.borrow_mut();
        panel.reserve(k * nr * 4);
        let panel = &mut panel.floats_mut()[..k * nr];
        for n0 in (0..n).step_by(nr) {
            let width = nr.min(n - n0);
            b.pack(n0, width, nr, panel);
            let step = blocks_per_tile(a.level, width);
            for m0 in (0..m).step_by(step * mr) {
                // SAFETY: the level is supported (asserted above); the panel holds `k` rows of
                // `nr` values.
                unsafe { product.run(m0, n0, (step * mr).min(m - m0), width, panel.as_ptr(), nr) };
            }
        }
    });
}

/// What the tiles of one product share.
struct Product<'a> {
    a: &'a PackedWeights,
    /// C's first value (`M x n`, row-major).
    c: *mut f32,
    n: usize,
    epilogue: &'a Epilogue<'a>,
}

impl Product<'_> {
    /// The tile of C at rows `m0 .. m0 + rows` (whole blocks of A but the last) and columns
    /// `n0 .. n0 + width`, B's `k` rows read from `b`, `ldb` values apart.
    ///
    /// # Safety
    /// The weights' level is supported by this CPU, the tile lies inside C, and each of B's rows
    /// holds the micro-kernel's `NR` values from `b` on.
    unsafe fn run(
        &self,
        m0: usize,
        n0: usize,
        rows: usize,
        width: usize,
        b: *const f32,
        ldb: usize,
    ) {
        let offset = m0 * self.n + n0;
        let tile = Tile {
            k: self.a.k,
            // Blocks of `mr` rows, `k * mr` values each: row m0 starts block m0 / mr.
            a: self.a.data.floats()[m0 * self.a.k..].as_ptr(),
            b,
            ldb,
            c: self.c.add(offset),
            ldc: self.n,
            rows,
            width,
            bias: self.epilogue.bias[m0..].as_ptr(),
            residual: self
                .epilogue
                .residual
                .map_or(std::ptr::null(), |r| r.as_ptr().add(offset)),
            before: self.epilogue.before,
            after: self.epilogue.after,
        };
        run_tile(self.a.level, &tile)
    }
}

/// Blocks of A the narrow kernel takes at once.
const GROUP: usize = 4;

/// Whether a dense B is read in place: a short reduction over a wide image (the 1x1 products of
/// the first, 56x56 and 112x112 blocks), where packing costs as much as the product and the
/// output rows are better written one block of rows at a time: -3 % on Lite0's f32 latency
/// (per-pair medians 0.966-0.975 in three in-process A/B runs, EPYC-VNNI).
fn in_place(level: Level, k: usize, n: usize) -> bool {
    level == Level::Avx512 && k <= 64 && n >= 48 * 16
}

/// [`matmul`] reading a dense B in place: each block of A's rows runs across every column of B
/// (so C is written a few rows at a time), the last partial panel packed once.
fn matmul_in_place(a: &PackedWeights, b: &[f32], n: usize, c: &mut [f32], epilogue: &Epilogue) {
    let (m, k) = (a.m, a.k);
    let (mr, nr) = tile(a.level);
    let full = n / nr * nr;
    let mut last = Aligned::zeroed(k * nr * 4);
    let last = last.floats_mut();
    if full < n {
        Rows { data: b, k, n }.pack(full, n - full, nr, last);
    }
    let product = Product {
        a,
        c: c.as_mut_ptr(),
        n,
        epilogue,
    };
    for m0 in (0..m).step_by(mr) {
        for n0 in (0..n).step_by(nr) {
            let (source, ldb) = if n0 < full {
                (b[n0..].as_ptr(), n)
            } else {
                (last.as_ptr(), nr)
            };
            // SAFETY: AVX-512 is supported (asserted by the caller); a full panel reads `nr`
            // columns of each of B's `k` rows from `n0 < full`, the last one its packed copy.
            unsafe { product.run(m0, n0, mr.min(m - m0), nr.min(n - n0), source, ldb) };
        }
    }
}

/// Columns at most that the AVX-512 level computes with its narrow kernel (vectorised along the
/// rows), which takes up to four blocks of A (32 rows) at once: below 8 columns a 16-lane vector
/// of B wastes most of its lanes and the 8 x 48 tile's broadcasts of A make it load-bound (the 49
/// pixels of a 7x7 map leave one column past 48, which cost as much as a quarter of the layer).
const NARROW: usize = 6;

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
        Level::Avx512 => x86::tile_avx512(tile),
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 | Level::AvxVnni => x86::tile_avx2(tile),
        _ => tile_portable(tile),
    }
}

#[inline(always)]
fn finish(value: f32, residual: Option<f32>, before: [f32; 2], after: [f32; 2]) -> f32 {
    let v = value.max(before[0]).min(before[1]);
    match residual {
        Some(r) => (v + r).max(after[0]).min(after[1]),
        None => v,
    }
}

/// The portable micro-kernel: 4 x 16, plain arrays.
unsafe fn tile_portable(t: &Tile) {
    const MR: usize = 4;
    const NR: usize = 16;
    let a = std::slice::from_raw_parts(t.a, t.k * MR);
    let b = std::slice::from_raw_parts(t.b, t.k * NR);
    let mut acc = [[0f32; NR]; MR];
    for (a, b) in a.chunks_exact(MR).zip(b.chunks_exact(NR)) {
        for (row, &w) in acc.iter_mut().zip(a) {
            for (sum, &x) in row.iter_mut().zip(b) {
                // aarch64 has fused multiply-add in its base instruction set.
                *sum = if cfg!(target_arch = "aarch64") {
                    w.mul_add(x, *sum)
                } else {
                    *sum + w * x
                };
            }
        }
    }
    for (r, row) in acc.iter().enumerate().take(t.rows) {
        let bias = *t.bias.add(r);
        for (j, &sum) in row.iter().enumerate().take(t.width) {
            let at = r * t.ldc + j;
            let residual = (!t.residual.is_null()).then(|| *t.residual.add(at));
            *t.c.add(at) = finish(sum + bias, residual, t.before, t.after);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Tile, NARROW};

    #[target_feature(enable = "avx512f,avx512vl")]
    pub(super) unsafe fn tile_avx512(t: &Tile) {
        match t.width {
            1..=NARROW => narrow(t),
            _ => match t.width.div_ceil(16) {
                3 => avx512::<3>(t),
                2 => avx512::<2>(t),
                _ => avx512::<1>(t),
            },
        }
    }

    /// A tile of at most [`NARROW`] columns and up to four blocks of A, vectorised along the
    /// rows: per `k`, one load of each block's packed A column (8 rows, one AVX register) and one
    /// broadcast of B per column, each pair feeding one multiply-add. Four blocks keep four
    /// independent chains of multiply-adds per column in flight (one would wait on the FMA
    /// latency). The sums run in the same order as in [`avx512`] (products in `k` order, fused,
    /// then the bias), so the results are identical.
    #[inline(always)]
    unsafe fn narrow(t: &Tile) {
        const MR: usize = 8;
        const BLOCKS: usize = 4;
        let blocks = t.rows.div_ceil(MR);
        let mut acc = [[_mm256_setzero_ps(); BLOCKS]; NARROW];
        let mut b = t.b;
        for kk in 0..t.k {
            let mut columns = [_mm256_setzero_ps(); BLOCKS];
            for (g, column) in columns.iter_mut().enumerate().take(blocks) {
                *column = _mm256_loadu_ps(t.a.add((g * t.k + kk) * MR));
            }
            for (j, sums) in acc.iter_mut().enumerate().take(t.width) {
                let x = _mm256_set1_ps(*b.add(j));
                for (sum, column) in sums.iter_mut().zip(&columns) {
                    *sum = _mm256_fmadd_ps(*column, x, *sum);
                }
            }
            b = b.add(t.ldb);
        }
        let mut sums = [[0f32; MR * BLOCKS]; NARROW];
        for (column, out) in acc.iter().zip(sums.iter_mut()) {
            for (g, sum) in column.iter().enumerate() {
                _mm256_storeu_ps(out[g * MR..].as_mut_ptr(), *sum);
            }
        }
        for r in 0..t.rows {
            let bias = *t.bias.add(r);
            for (j, column) in sums.iter().enumerate().take(t.width) {
                let at = r * t.ldc + j;
                let residual = (!t.residual.is_null()).then(|| *t.residual.add(at));
                *t.c.add(at) = super::finish(column[r] + bias, residual, t.before, t.after);
            }
        }
    }

    #[inline(always)]
    unsafe fn avx512<const NV: usize>(t: &Tile) {
        const MR: usize = 8;
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        let (mut a, mut b) = (t.a, t.b);
        for _ in 0..t.k {
            let mut x = [_mm512_setzero_ps(); NV];
            for (v, x) in x.iter_mut().enumerate() {
                *x = _mm512_loadu_ps(b.add(16 * v));
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let w = _mm512_set1_ps(*a.add(r));
                for (sum, &x) in row.iter_mut().zip(&x) {
                    *sum = _mm512_fmadd_ps(w, x, *sum);
                }
            }
            a = a.add(MR);
            b = b.add(t.ldb);
        }
        let (lo, hi) = (_mm512_set1_ps(t.before[0]), _mm512_set1_ps(t.before[1]));
        let (lo2, hi2) = (_mm512_set1_ps(t.after[0]), _mm512_set1_ps(t.after[1]));
        for (r, row) in acc.iter().enumerate() {
            if r >= t.rows {
                break;
            }
            let bias = _mm512_set1_ps(*t.bias.add(r));
            for (v, &sum) in row.iter().enumerate() {
                let columns = t.width.saturating_sub(16 * v).min(16);
                let mask: __mmask16 = ((1u32 << columns) - 1) as u16;
                let at = r * t.ldc + 16 * v;
                let mut y = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(sum, bias), lo), hi);
                if !t.residual.is_null() {
                    let residual = _mm512_maskz_loadu_ps(mask, t.residual.add(at));
                    y = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(y, residual), lo2), hi2);
                }
                _mm512_mask_storeu_ps(t.c.add(at), mask, y);
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile_avx2(t: &Tile) {
        match t.width.div_ceil(8) {
            2 => avx2::<2>(t),
            _ => avx2::<1>(t),
        }
    }

    #[inline(always)]
    unsafe fn avx2<const NV: usize>(t: &Tile) {
        const MR: usize = 6;
        let mut acc = [[_mm256_setzero_ps(); NV]; MR];
        let (mut a, mut b) = (t.a, t.b);
        for _ in 0..t.k {
            let mut x = [_mm256_setzero_ps(); NV];
            for (v, x) in x.iter_mut().enumerate() {
                *x = _mm256_loadu_ps(b.add(8 * v));
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let w = _mm256_set1_ps(*a.add(r));
                for (sum, &x) in row.iter_mut().zip(&x) {
                    *sum = _mm256_fmadd_ps(w, x, *sum);
                }
            }
            a = a.add(MR);
            b = b.add(t.ldb);
        }
        let (lo, hi) = (_mm256_set1_ps(t.before[0]), _mm256_set1_ps(t.before[1]));
        let (lo2, hi2) = (_mm256_set1_ps(t.after[0]), _mm256_set1_ps(t.after[1]));
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        for (r, row) in acc.iter().enumerate() {
            if r >= t.rows {
                break;
            }
            let bias = _mm256_set1_ps(*t.bias.add(r));
            for (v, &sum) in row.iter().enumerate() {
                let columns = t.width.saturating_sub(8 * v).min(8) as i32;
                let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(columns), lanes);
                let at = r * t.ldc + 8 * v;
                let mut y = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(sum, bias), lo), hi);
                if !t.residual.is_null() {
                    let residual = _mm256_maskload_ps(t.residual.add(at), mask);
                    y = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(y, residual), lo2), hi2);
                }
                _mm256_maskstore_ps(t.c.add(at), mask, y);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain triple loop with the same epilogue.
    pub(crate) fn reference(
        a: &[f32],
        b: &[f32],
        (m, k, n): (usize, usize, usize),
        epilogue: &Epilogue,
    ) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let sum: f64 = (0..k)
                    .map(|p| a[i * k + p] as f64 * b[p * n + j] as f64)
                    .sum();
                let residual = epilogue.residual.map(|r| r[i * n + j]);
                c[i * n + j] = finish(
                    sum as f32 + epilogue.bias[i],
                    residual,
                    epilogue.before,
                    epilogue.after,
                );
            }
        }
        c
    }

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7919 + seed * 104729) % 2003) as f32 / 1001.0 - 1.0)
            .collect()
    }

    #[test]
    fn every_level_matches_the_reference_over_odd_shapes() {
        for level in Level::available() {
            for (m, k, n) in [
                (1, 1, 1),
                (8, 16, 48),
                (13, 27, 49),
                (24, 96, 196),
                (6, 5, 17),
                (40, 33, 100),
                (9, 3, 47),
                (70, 20, 53),
                (33, 9, 6),
                // read in place at AVX-512: a short reduction over many columns, and a last
                // partial panel
                (20, 16, 800),
                (9, 64, 1000),
            ] {
                let (a, b) = (values(m * k, 1), values(k * n, 2));
                let bias = values(m, 3);
                let residual = values(m * n, 4);
                for epilogue in [
                    Epilogue {
                        bias: &bias,
                        before: UNBOUNDED,
                        residual: None,
                        after: UNBOUNDED,
                    },
                    Epilogue {
                        bias: &bias,
                        before: [0.0, 0.5],
                        residual: Some(&residual),
                        after: [-0.25, f32::INFINITY],
                    },
                ] {
                    let expected = reference(&a, &b, (m, k, n), &epilogue);
                    let packed = PackedWeights::new(level, &a, m, k);
                    let mut c = vec![f32::NAN; m * n];
                    matmul(&packed, &Rows { data: &b, k, n }, &mut c, &epilogue);
                    let worst = c
                        .iter()
                        .zip(&expected)
                        .fold(0f32, |w, (x, y)| w.max((x - y).abs()));
                    assert!(
                        worst < 1e-4,
                        "{level:?} {m}x{k}x{n}: differs by {worst} (NaN: unwritten output)"
                    );
                }
            }
        }
    }
}
