//! Convolution (one group) as one candle custom op on f32 CPU tensors: padding, bias and the
//! following activation fused, forward and backward each one parallel pass over the images.
//!
//! candle's own `conv2d` pads into a copy, builds the im2col matrix of the whole batch, and
//! differentiates through `conv_transpose2d`; with the bias add and a `Clip` as separate ops,
//! one Lite0 convolution kept four full-size activations for the backward pass. Here each image's
//! im2col matrix is built in a buffer the size of one image (and not at all for 1x1 stride-1
//! convolutions, which are plain matrix products), multiplied by the weights with the `gemm`
//! crate (the kernels candle's matmul uses), and only the activated output is kept: the backward
//! pass recomputes the im2col matrix instead of storing it. 1x1 convolutions on planes of 28x28
//! and below go through one product for the whole batch instead (channel-major copies in and
//! out), where one small product per image was mostly overhead.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Storage, StorageRef, Tensor};
use rayon::prelude::*;

use super::activation::Activation;
use crate::finetune::profile;

/// A convolution's attributes (ONNX `strides`, `pads`, `dilations`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConvAttrs {
    pub strides: [usize; 2],
    /// Top, left, bottom, right.
    pub pads: [usize; 4],
    pub dilations: [usize; 2],
}

/// The sizes of one convolution on one batch.
#[derive(Debug, Clone, Copy)]
pub(super) struct Geometry {
    pub batch: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub out_channels: usize,
    pub kernel: [usize; 2],
    pub attrs: ConvAttrs,
    pub out: [usize; 2],
}

impl Geometry {
    /// From the input dims `[N, C, H, W]` and weight dims `[O, C/groups, KH, KW]`.
    pub fn new(input: &[usize], weight: &[usize], attrs: ConvAttrs) -> Result<Geometry> {
        let (&[batch, channels, height, width], &[out_channels, _, kh, kw]) = (input, weight)
        else {
            candle_core::bail!(
                "convolution needs 4-d input and weight, got {input:?} and {weight:?}"
            );
        };
        let out = |size: usize, before: usize, after: usize, k: usize, axis: usize| {
            let span = attrs.dilations[axis] * (k.max(1) - 1) + 1;
            let padded = size + before + after;
            if padded < span {
                candle_core::bail!("a {k}-wide kernel does not fit a padded size of {padded}");
            }
            Ok((padded - span) / attrs.strides[axis].max(1) + 1)
        };
        let [top, left, bottom, right] = attrs.pads;
        Ok(Geometry {
            batch,
            channels,
            height,
            width,
            out_channels,
            kernel: [kh, kw],
            attrs,
            out: [
                out(height, top, bottom, kh, 0)?,
                out(width, left, right, kw, 1)?,
            ],
        })
    }

    pub fn plane_in(&self) -> usize {
        self.height * self.width
    }

    pub fn plane_out(&self) -> usize {
        self.out[0] * self.out[1]
    }

    pub fn taps(&self) -> usize {
        self.kernel[0] * self.kernel[1]
    }

    /// A 1x1 convolution with stride 1 and no padding: the input plane is its own im2col.
    fn pointwise(&self) -> bool {
        self.kernel == [1, 1] && self.attrs.strides == [1, 1] && self.attrs.pads == [0; 4]
    }

    /// A 1x1 convolution on planes small enough (Lite0's 28x28 and below) that one matrix
    /// product per image is mostly overhead: the batch goes through one product instead, with
    /// its planes side by side (channel-major).
    fn batched(&self) -> bool {
        self.pointwise() && self.plane_out() <= 28 * 28 && self.batch > 1
    }

    /// The input row that output row `oy` reads at kernel row `ky`, if inside the image.
    #[inline]
    fn input_row(&self, ky: usize, oy: usize) -> Option<usize> {
        let y = oy * self.attrs.strides[0] + ky * self.attrs.dilations[0];
        y.checked_sub(self.attrs.pads[0])
            .filter(|&y| y < self.height)
    }

    /// For kernel column `kx`: the output columns `lo..hi` that read inside the image, and the
    /// input column read by output column `lo`.
    #[inline]
    fn columns(&self, kx: usize) -> (usize, usize, usize) {
        let (s, left) = (self.attrs.strides[1], self.attrs.pads[1]);
        let offset = kx * self.attrs.dilations[1];
        let lo = left.saturating_sub(offset).div_ceil(s);
        let hi = (self.width + left)
            .saturating_sub(offset)
            .div_ceil(s)
            .min(self.out[1]);
        let hi = hi.max(lo);
        (lo, hi, (lo * s + offset).saturating_sub(left))
    }

    /// The im2col matrix of one image: row `(c * KH + ky) * KW + kx`, column `oy * OW + ox`.
    fn im2col(&self, x: &[f32], cols: &mut [f32]) {
        let (plane_out, [kh, kw], ow) = (self.plane_out(), self.kernel, self.out[1]);
        let s = self.attrs.strides[1];
        for (row, dst) in cols.chunks_exact_mut(plane_out).enumerate() {
            let (c, ky, kx) = (row / (kh * kw), row / kw % kh, row % kw);
            let plane = &x[c * self.plane_in()..(c + 1) * self.plane_in()];
            let (lo, hi, first) = self.columns(kx);
            for (oy, out) in dst.chunks_exact_mut(ow).enumerate() {
                let Some(y) = self.input_row(ky, oy) else {
                    out.fill(0.0);
                    continue;
                };
                let src = &plane[y * self.width..(y + 1) * self.width];
                out[..lo].fill(0.0);
                out[hi..].fill(0.0);
                for (i, o) in out[lo..hi].iter_mut().enumerate() {
                    *o = src[first + i * s];
                }
            }
        }
    }

    /// Adds an im2col-shaped gradient back onto one image's input gradient.
    fn col2im(&self, cols: &[f32], dx: &mut [f32]) {
        let (plane_out, [kh, kw], ow) = (self.plane_out(), self.kernel, self.out[1]);
        let (plane_in, s) = (self.plane_in(), self.attrs.strides[1]);
        for (row, src) in cols.chunks_exact(plane_out).enumerate() {
            let (c, ky, kx) = (row / (kh * kw), row / kw % kh, row % kw);
            let plane = &mut dx[c * plane_in..(c + 1) * plane_in];
            let (lo, hi, first) = self.columns(kx);
            for (oy, grad) in src.chunks_exact(ow).enumerate() {
                let Some(y) = self.input_row(ky, oy) else {
                    continue;
                };
                let dst = &mut plane[y * self.width..(y + 1) * self.width];
                for (i, g) in grad[lo..hi].iter().enumerate() {
                    dst[first + i * s] += g;
                }
            }
        }
    }
}

/// A row-major view of a matrix inside a slice, with explicit strides (for transposes).
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Mat<'a> {
    /// A contiguous row-major `rows x cols` matrix.
    fn new(data: &'a [f32], rows: usize, cols: usize) -> Mat<'a> {
        Mat {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose, without moving data.
    fn t(self) -> Mat<'a> {
        Mat {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Columns `first .. first + count` of a row-major matrix.
    fn columns(self, first: usize, count: usize) -> Mat<'a> {
        assert!(first + count <= self.cols, "columns inside the matrix");
        Mat {
            data: &self.data[first * self.col_stride..],
            cols: count,
            ..self
        }
    }

    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride
                < self.data.len()
    }
}

/// `dst = a * b` (or `dst += a * b` with `accumulate`), `dst` row-major `a.rows x b.cols`, on
/// the calling thread (callers parallelise over images).
fn matmul(dst: &mut [f32], accumulate: bool, a: Mat, b: Mat) {
    assert!(dst.len() >= a.rows * b.cols, "matmul shapes");
    // SAFETY: dst holds a.rows x b.cols values (asserted above), initialised.
    unsafe {
        gemm_into(
            dst.as_mut_ptr(),
            b.cols,
            accumulate,
            a,
            b,
            gemm::Parallelism::None,
        )
    }
}

/// How a [`product`] uses the threads.
#[derive(Clone, Copy)]
enum Threads {
    /// The calling thread only.
    One,
    /// Rayon's threads, each computing its own block of the result's columns with gemm on one
    /// thread: on two cores this beat gemm's own rayon split by 5-10 % on Lite0's 7x7 products
    /// (1152 x 192 x 784 and the like).
    All,
}

/// Columns at least per thread in [`Threads::All`].
const MIN_COLUMNS_PER_THREAD: usize = 64;

/// `a * b` as a new row-major `a.rows x b.cols` matrix, written once by gemm (never zeroed
/// first: at 7x7 the buffers' zeroing and copies were a fifth of a 1x1 convolution's time).
fn product(a: Mat, b: Mat, threads: Threads) -> Vec<f32> {
    let (m, n) = (a.rows, b.cols);
    let parts = match threads {
        Threads::One => 1,
        Threads::All => rayon::current_num_threads()
            .min(n / MIN_COLUMNS_PER_THREAD)
            .max(1),
    };
    let width = n.div_ceil(parts.max(1)).max(1);
    let mut dst: Vec<f32> = Vec::with_capacity(m * n);
    let start = SendPtr(dst.as_mut_ptr());
    profile::timed("  of which batched products", || {
        (0..parts).into_par_iter().for_each(|part| {
            let n0 = (part * width).min(n);
            let cols = width.min(n - n0);
            // SAFETY: `dst` has room for m x n values; this part writes its `cols` columns from
            // `n0` of every row (rows `n` apart), disjoint from the other parts' columns.
            unsafe {
                let start = &start;
                gemm_into(
                    start.0.add(n0),
                    n,
                    false,
                    a,
                    b.columns(n0, cols),
                    gemm::Parallelism::None,
                )
            }
        });
    });
    // SAFETY: the parts cover all `n` columns of the `m` rows; gemm, not reading the destination
    // (`accumulate` false), wrote every value.
    unsafe { dst.set_len(m * n) };
    dst
}

/// A pointer the parts of a [`product`] write through, each into its own columns.
struct SendPtr(*mut f32);
// SAFETY: the parts write disjoint values (see `product`).
unsafe impl Sync for SendPtr {}

/// `dst = a * b` (or `+=`), `dst` row-major `a.rows x b.cols`, its rows `ldd` values apart.
///
/// # Safety
/// `dst` points to `a.rows` writable rows of `b.cols` values, `ldd` apart, initialised when
/// `accumulate`.
unsafe fn gemm_into(
    dst: *mut f32,
    ldd: usize,
    accumulate: bool,
    a: Mat,
    b: Mat,
    parallelism: gemm::Parallelism,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(b.rows == k && a.fits() && b.fits(), "matmul shapes");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for row in 0..m {
                // SAFETY: row `row` of dst, `n` values (the caller's guarantee).
                unsafe { std::ptr::write_bytes(dst.add(row * ldd), 0, n) };
            }
        }
        return;
    }
    // SAFETY: `fits` keeps every element gemm reads inside a's and b's slices; the caller
    // guarantees dst.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            ldd as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// A tensor's f32 values on the CPU, borrowed for as long as the view lives.
struct CpuView<'a> {
    storage: StorageRef<'a>,
    range: (usize, usize),
}

impl<'a> CpuView<'a> {
    fn of(tensor: &'a Tensor) -> Result<CpuView<'a>> {
        let (storage, layout) = tensor.storage_and_layout();
        let Some(range) = layout.contiguous_offsets() else {
            candle_core::bail!("graft's CPU kernels need contiguous tensors");
        };
        if !matches!(&*storage, Storage::Cpu(CpuStorage::F32(_))) {
            candle_core::bail!("graft's CPU kernels need f32 tensors on the CPU");
        }
        Ok(CpuView { storage, range })
    }

    fn data(&self) -> &[f32] {
        match &*self.storage {
            Storage::Cpu(CpuStorage::F32(v)) => &v[self.range.0..self.range.1],
            _ => unreachable!("checked in CpuView::of"),
        }
    }
}

/// The slice of a custom op's contiguous f32 input.
pub(super) fn slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("graft's CPU kernels need contiguous tensors"),
    }
}

/// `y = activation(conv(x, w) + b)`: x `[N, C, H, W]`, w `[O, C, KH, KW]`, b `[O]`.
struct Conv {
    attrs: ConvAttrs,
    activation: Activation,
}

impl CustomOp3 for Conv {
    fn name(&self) -> &'static str {
        "graft-conv"
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
        let g = Geometry::new(l1.dims(), l2.dims(), self.attrs)?;
        let kind = if g.pointwise() {
            "conv 1x1 forward"
        } else {
            "conv forward"
        };
        profile::timed(kind, || {
            if g.batched() {
                self.forward_batched(&g, x, w, b)
            } else {
                self.forward(&g, x, w, b)
            }
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = Geometry::new(x.dims(), w.dims(), self.attrs)?;
        let kind = if g.pointwise() {
            "conv 1x1 backward"
        } else {
            "conv backward"
        };
        fused_backward([x, w, y, grad], kind, |data, x_grad| {
            if g.batched() {
                self.backward_batched(&g, data, x_grad)
            } else {
                self.backward(&g, data, x_grad)
            }
        })
    }
}

/// Gradients `(input if it needs one, weight, bias)` as computed on the CPU slices of `[x, w,
/// y, grad]` by `backward(data, whether x needs a gradient)`, timed as `kind`, as tensors.
pub(super) fn fused_backward(
    [x, w, y, grad]: [&Tensor; 4],
    kind: &'static str,
    backward: impl FnOnce([&[f32]; 4], bool) -> (Option<Vec<f32>>, Vec<f32>, Vec<f32>),
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let grad = grad.contiguous()?;
    let (gx, gw, gb) = {
        let _timer = profile::Timer::start(kind);
        let views = [
            CpuView::of(x)?,
            CpuView::of(w)?,
            CpuView::of(y)?,
            CpuView::of(&grad)?,
        ];
        backward(views.each_ref().map(CpuView::data), x.track_op())
    };
    let device = x.device();
    let bias = gb.len();
    Ok((
        gx.map(|gx| Tensor::from_vec(gx, x.shape(), device))
            .transpose()?,
        Some(Tensor::from_vec(gw, w.shape(), device)?),
        Some(Tensor::from_vec(gb, bias, device)?),
    ))
}

/// `[A, B, P]` -> `[B, A, P]` as a new buffer, one `[A, P]` block per task, each plane passed
/// through `finish(index along A, plane)` while it is in cache.
fn swap_leading_axes(
    x: &[f32],
    [a, b, p]: [usize; 3],
    finish: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(a * b * p);
    out.spare_capacity_mut()
        .par_chunks_mut((a * p).max(1))
        .enumerate()
        .for_each(|(j, block)| {
            for (i, plane) in block.chunks_exact_mut(p.max(1)).enumerate() {
                finish(i, write(plane, &x[(i * b + j) * p..(i * b + j + 1) * p]));
            }
        });
    // SAFETY: each of the `b` blocks of `a * p` values was written above.
    unsafe { out.set_len(a * b * p) };
    out
}

/// `[N, C, P]` -> `[C, N * P]`.
fn to_channel_major(x: &[f32], [n, c, p]: [usize; 3]) -> Vec<f32> {
    swap_leading_axes(x, [n, c, p], |_, _| ())
}

/// `[C, N * P]` -> `[N, C, P]`, each plane passed through `finish(channel, plane)`.
fn from_channel_major(
    x: &[f32],
    [n, c, p]: [usize; 3],
    finish: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    swap_leading_axes(x, [c, n, p], finish)
}

/// Copies `src` into `dst` (same length), returning it initialised.
fn write<'a>(dst: &'a mut [MaybeUninit<f32>], src: &[f32]) -> &'a mut [f32] {
    assert_eq!(dst.len(), src.len(), "a plane per plane");
    for (d, &s) in dst.iter_mut().zip(src) {
        d.write(s);
    }
    // SAFETY: every value was written just above.
    unsafe { initialised(dst) }
}

/// `values` as the f32s they hold.
///
/// # Safety
/// Every value has been written.
unsafe fn initialised(values: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: MaybeUninit<f32> has f32's layout, and the caller guarantees initialisation.
    unsafe { &mut *(values as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// Output values of one block of columns in [`Conv::forward`] (256 KB): its bias and
/// activation are applied while it is still in the core's cache, not in a second sweep over the
/// whole output.
const FORWARD_BLOCK: usize = 64 * 1024;

/// Columns of a [`FORWARD_BLOCK`] of `rows` output channels on a plane of `p` pixels: at least
/// 16, at most the plane.
fn block_columns(rows: usize, p: usize) -> usize {
    (FORWARD_BLOCK / rows.max(1)).clamp(16, p.max(16))
}

impl Conv {
    /// One image at a time: its im2col matrix (none for 1x1), times the weights, plus the bias,
    /// through the activation, a block of columns at a time (see [`FORWARD_BLOCK`]); the
    /// output is written once, never zeroed first.
    fn forward(
        &self,
        g: &Geometry,
        x: &[f32],
        w: &[f32],
        b: &[f32],
    ) -> Result<(CpuStorage, Shape)> {
        let (o, k, p) = (g.out_channels, g.channels * g.taps(), g.plane_out());
        let (image_in, image_out) = (g.channels * g.plane_in(), o * p);
        let columns = block_columns(o, p);
        let mut y = Vec::with_capacity(g.batch * image_out);
        y.spare_capacity_mut()
            .par_chunks_mut(image_out.max(1))
            .enumerate()
            .for_each_init(Vec::new, |cols, (n, out)| {
                let x = &x[n * image_in..(n + 1) * image_in];
                let x = if g.pointwise() {
                    x
                } else {
                    cols.resize(k * p, 0.0);
                    g.im2col(x, cols);
                    cols
                };
                let out = out.as_mut_ptr().cast::<f32>();
                for n0 in (0..p).step_by(columns) {
                    let width = columns.min(p - n0);
                    let x = Mat::new(x, k, p).columns(n0, width);
                    // SAFETY: `out` is this image's `o x p` output; the block is its `o` rows
                    // of `width` columns from `n0`, written by gemm before they are read.
                    unsafe {
                        gemm_into(
                            out.add(n0),
                            p,
                            false,
                            Mat::new(w, o, k),
                            x,
                            gemm::Parallelism::None,
                        );
                        for (row, &bias) in b.iter().enumerate() {
                            let row = std::slice::from_raw_parts_mut(out.add(row * p + n0), width);
                            row.iter_mut().for_each(|v| *v += bias);
                            self.activation.apply(row);
                        }
                    }
                }
            });
        // SAFETY: every image's `o x p` outputs were written above.
        unsafe { y.set_len(g.batch * image_out) };
        Ok((
            CpuStorage::F32(y),
            Shape::from((g.batch, o, g.out[0], g.out[1])),
        ))
    }

    /// Input, weight and bias gradients, one pass over the images: each image's output
    /// gradient through the activation, its im2col matrix rebuilt, `dw += g * cols^T`,
    /// `dcols = w^T * g` put back onto the input gradient.
    fn backward(
        &self,
        g: &Geometry,
        [x, w, y, grad]: [&[f32]; 4],
        x_grad: bool,
    ) -> (Option<Vec<f32>>, Vec<f32>, Vec<f32>) {
        let (o, k, plane_out) = (g.out_channels, g.channels * g.taps(), g.plane_out());
        let (image_in, image_out) = (g.channels * g.plane_in(), o * plane_out);
        let mut gx = vec![0f32; if x_grad { g.batch * image_in } else { 0 }];
        let slots = input_gradient_slots(&mut gx, g.batch, image_in);
        let zero = || (vec![0f32; o * k], vec![0f32; o], Vec::new(), Vec::new());
        let (gw, gb, _, _) = slots
            .into_par_iter()
            .enumerate()
            .fold(zero, |(mut gw, mut gb, mut gy, mut cols), (n, gx)| {
                let out = n * image_out..(n + 1) * image_out;
                let x = &x[n * image_in..(n + 1) * image_in];
                if g.pointwise() {
                    let image = [x, w, &y[out.clone()], &grad[out]];
                    let sums = (&mut gw[..], &mut gb[..], &mut gy);
                    self.backward_pointwise_image([o, k, plane_out], image, gx, sums);
                    return (gw, gb, gy, cols);
                }
                gy.resize(image_out, 0.0);
                self.activation
                    .backward(&y[out.clone()], &grad[out], &mut gy);
                for (sum, row) in gb.iter_mut().zip(gy.chunks_exact(plane_out)) {
                    *sum += row.iter().sum::<f32>();
                }
                let gy_mat = Mat::new(&gy, o, plane_out);
                cols.resize(k * plane_out, 0.0);
                g.im2col(x, &mut cols);
                matmul(&mut gw, true, gy_mat, Mat::new(&cols, k, plane_out).t());
                if let Some(gx) = gx {
                    matmul(&mut cols, false, Mat::new(w, o, k).t(), gy_mat);
                    g.col2im(&cols, gx);
                }
                (gw, gb, gy, cols)
            })
            .reduce(zero, |(mut gw, mut gb, a, b), (gw2, gb2, _, _)| {
                gw.iter_mut().zip(gw2).for_each(|(s, v)| *s += v);
                gb.iter_mut().zip(gb2).for_each(|(s, v)| *s += v);
                (gw, gb, a, b)
            });
        (x_grad.then_some(gx), gw, gb)
    }

    /// One image's 1x1 gradients, a block of columns at a time (see [`FORWARD_BLOCK`]): the
    /// block's output gradient stays in cache for the bias sum and both products. Adds to `gw`
    /// (`o x k`) and `gb`, writes `gx` (`k x p`) when given; `gy` is scratch.
    fn backward_pointwise_image(
        &self,
        [o, k, p]: [usize; 3],
        [x, w, y, grad]: [&[f32]; 4],
        mut gx: Option<&mut [f32]>,
        (gw, gb, gy): (&mut [f32], &mut [f32], &mut Vec<f32>),
    ) {
        let columns = block_columns(o, p);
        gy.resize(o * columns, 0.0);
        let w_t = Mat::new(w, o, k).t();
        for n0 in (0..p).step_by(columns) {
            let width = columns.min(p - n0);
            let block = &mut gy[..o * width];
            for (row, (out, sum)) in block.chunks_exact_mut(width).zip(gb.iter_mut()).enumerate() {
                let at = row * p + n0..row * p + n0 + width;
                self.activation.backward(&y[at.clone()], &grad[at], out);
                *sum += out.iter().sum::<f32>();
            }
            let gy_mat = Mat::new(block, o, width);
            matmul(gw, true, gy_mat, Mat::new(x, k, p).columns(n0, width).t());
            if let Some(gx) = gx.as_deref_mut() {
                assert!(gx.len() >= k * p, "an input gradient per image");
                // SAFETY: `gx` is this image's `k x p` input gradient (asserted); the block is
                // its `k` rows of `width` columns from `n0`.
                unsafe {
                    gemm_into(
                        gx.as_mut_ptr().add(n0),
                        p,
                        false,
                        w_t,
                        gy_mat,
                        gemm::Parallelism::None,
                    )
                };
            }
        }
    }

    /// A 1x1 convolution of the whole batch as one product, channel-major; bias and activation
    /// applied as the result is copied back to `[N, O, P]`.
    fn forward_batched(
        &self,
        g: &Geometry,
        x: &[f32],
        w: &[f32],
        b: &[f32],
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, o, p) = (g.batch, g.channels, g.out_channels, g.plane_out());
        let xt = to_channel_major(x, [n, c, p]);
        let yt = product(Mat::new(w, o, c), Mat::new(&xt, c, n * p), Threads::All);
        drop(xt);
        let y = from_channel_major(&yt, [n, o, p], |ch, plane| {
            plane.iter_mut().for_each(|v| *v += b[ch]);
            self.activation.apply(plane);
        });
        Ok((CpuStorage::F32(y), Shape::from((n, o, g.out[0], g.out[1]))))
    }

    /// The gradients of [`Self::forward_batched`], each one product over the batch; the weight
    /// and input gradients, equal in size, computed side by side, one thread each.
    fn backward_batched(
        &self,
        g: &Geometry,
        [x, w, y, grad]: [&[f32]; 4],
        x_grad: bool,
    ) -> (Option<Vec<f32>>, Vec<f32>, Vec<f32>) {
        let (n, c, o, p) = (g.batch, g.channels, g.out_channels, g.plane_out());
        // The output gradient through the activation, written channel-major, and its sums.
        let mut gyt = Vec::with_capacity(o * n * p);
        let gb: Vec<f32> = gyt
            .spare_capacity_mut()
            .par_chunks_mut((n * p).max(1))
            .enumerate()
            .map(|(ch, row)| {
                for (i, out) in row.chunks_exact_mut(p.max(1)).enumerate() {
                    let plane = (i * o + ch) * p..(i * o + ch + 1) * p;
                    self.activation
                        .backward_into(&y[plane.clone()], &grad[plane], out);
                }
                // SAFETY: the row was written just above.
                unsafe { initialised(row) }.iter().sum::<f32>()
            })
            .collect();
        // SAFETY: each of the `o` rows of `n * p` values was written above.
        unsafe { gyt.set_len(o * n * p) };
        let xt = to_channel_major(x, [n, c, p]);
        let gyt_mat = Mat::new(&gyt, o, n * p);
        let weight_gradient = |threads| product(gyt_mat, Mat::new(&xt, c, n * p).t(), threads);
        let input_gradient = |threads| {
            let gxt = product(Mat::new(w, o, c).t(), gyt_mat, threads);
            from_channel_major(&gxt, [n, c, p], |_, _| ())
        };
        let (gw, gx) = if !x_grad {
            (weight_gradient(Threads::All), None)
        } else {
            // One thread each on two cores; on more, each splits its columns further.
            let each = if rayon::current_num_threads() > 2 {
                Threads::All
            } else {
                Threads::One
            };
            let (gw, gx) = rayon::join(|| weight_gradient(each), || input_gradient(each));
            (gw, Some(gx))
        };
        (gx, gw, gb)
    }
}

/// Whether the CPU has AVX2 and FMA (the runtime's `Avx2` kernel level), for the kernels
/// compiled for them (depthwise), read once.
#[cfg(target_arch = "x86_64")]
pub(super) fn avx2_fma() -> bool {
    static AVX2_FMA: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVX2_FMA.get_or_init(|| graft_runtime::kernels::dispatch::Level::Avx2.supported())
}

/// One `Option<&mut chunk>` per image or plane for a parallel backward pass: the chunks of
/// `gx` (`count` of `len` values) when the input needs a gradient (`gx` not empty), else None.
pub(super) fn input_gradient_slots(
    gx: &mut [f32],
    count: usize,
    len: usize,
) -> Vec<Option<&mut [f32]>> {
    if gx.is_empty() {
        (0..count).map(|_| None).collect()
    } else {
        gx.chunks_mut(len.max(1)).map(Some).collect()
    }
}

/// `x`, `weight` and the bias (`[O]`, zeros when absent) of a fused op, contiguous.
pub(super) fn operands(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<[Tensor; 3]> {
    let bias = match bias {
        Some(b) => b.flatten_all()?.contiguous()?,
        None => Tensor::zeros(weight.dim(0)?, weight.dtype(), weight.device())?,
    };
    Ok([x.contiguous()?, weight.contiguous()?, bias])
}

/// `activation(conv(x, w) + b)` for f32 CPU tensors and one group; `b` is zeros when absent.
pub fn conv_cpu(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    attrs: ConvAttrs,
    activation: Activation,
) -> Result<Tensor> {
    let [x, weight, bias] = operands(x, weight, bias)?;
    x.apply_op3(&weight, &bias, Conv { attrs, activation })
}
