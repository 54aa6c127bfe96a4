//! The 16-channel-blocked layout and the two operators that enter and leave it.
//!
//! tract's tensors are channel-major (`C x H x W`): one channel's pixels side by side. A
//! depthwise convolution wants the opposite, one vector holding one pixel of 16 channels, so in
//! the plain layout graft's depthwise kernel transposes every input row in and every output row
//! out, which costs about as much as its multiply-adds. In the blocked layout a tensor of `C`
//! channels over `P` pixels is `[ceil(C / 16)][P][16]` (the lanes past `C` hold finite values
//! that every consumer ignores: zero weights, or dropped when converting back): a pixel of 16
//! channels is one cache line, the depthwise kernel reads it directly and the
//! pointwise convolutions ([`conv_blocked`](super::conv_blocked)) read and write it
//! without packing. onnxruntime runs its f32 CNNs in the same kind of layout (NCHWc).
//!
//! [`use_graft_kernels`](super::use_graft_kernels) puts every run of graft's blocked
//! operators in the layout, with a [`ToBlocked`] where a run starts and a [`FromBlocked`] where
//! plain-layout operators read its result; between two blocked operators nothing is converted.

use tract_core::internal::*;

/// Channels in one block: one AVX-512 vector, one cache line of f32.
pub const BLOCK: usize = 16;

/// A value the blocked layout holds: f32 (converted with AVX-512 transposes where the CPU has
/// them) or int8 (plain loops).
pub trait Element: Copy + Default {
    /// Converts between `plain` (`channels x pixels`) and `blocked`; see [`to_blocked`].
    fn convert(
        from: &[Self],
        channels: usize,
        pixels: usize,
        to: &mut [Self],
        direction: Direction,
    );
}

impl Element for f32 {
    fn convert(from: &[f32], channels: usize, pixels: usize, to: &mut [f32], direction: Direction) {
        check(from.len(), to.len(), channels, pixels, direction);
        #[cfg(target_arch = "x86_64")]
        if super::dispatch::Level::Avx512.supported() {
            // SAFETY: AVX-512 is there; the lengths are checked above.
            return unsafe { x86::convert(from, channels, pixels, to, direction) };
        }
        convert_plain(from, channels, pixels, to, direction)
    }
}

impl Element for i8 {
    fn convert(from: &[i8], channels: usize, pixels: usize, to: &mut [i8], direction: Direction) {
        check(from.len(), to.len(), channels, pixels, direction);
        convert_plain(from, channels, pixels, to, direction)
    }
}

/// `values` (`channels x pixels`, channel-major) in the blocked layout.
pub fn to_blocked<T: Element>(values: &[T], channels: usize, pixels: usize) -> Vec<T> {
    let mut out = vec![T::default(); channels.div_ceil(BLOCK) * pixels * BLOCK];
    T::convert(values, channels, pixels, &mut out, Direction::In);
    out
}

/// `values` in the blocked layout back as `channels x pixels`, channel-major.
pub fn from_blocked<T: Element>(values: &[T], channels: usize, pixels: usize) -> Vec<T> {
    let mut out = vec![T::default(); channels * pixels];
    T::convert(values, channels, pixels, &mut out, Direction::Out);
    out
}

/// Which way a conversion goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Channel-major to blocked.
    In,
    /// Blocked to channel-major.
    Out,
}

fn check(from: usize, to: usize, channels: usize, pixels: usize, direction: Direction) {
    let blocked_len = channels.div_ceil(BLOCK) * pixels * BLOCK;
    let (plain_len, other) = match direction {
        Direction::In => (from, to),
        Direction::Out => (to, from),
    };
    assert_eq!(plain_len, channels * pixels, "{channels} x {pixels} values");
    assert_eq!(
        other, blocked_len,
        "the blocked layout of {channels} x {pixels}"
    );
}

/// The conversion in plain loops; the padding lanes of a blocked target are zeroed.
fn convert_plain<T: Copy + Default>(
    from: &[T],
    channels: usize,
    pixels: usize,
    to: &mut [T],
    direction: Direction,
) {
    for c in 0..channels {
        let (block, lane) = (c / BLOCK, c % BLOCK);
        for p in 0..pixels {
            let at = (block * pixels + p) * BLOCK + lane;
            match direction {
                Direction::In => to[at] = from[c * pixels + p],
                Direction::Out => to[c * pixels + p] = from[at],
            }
        }
    }
    if direction == Direction::In {
        for block in channels / BLOCK..channels.div_ceil(BLOCK) {
            for p in 0..pixels {
                let at = (block * pixels + p) * BLOCK;
                to[at + channels % BLOCK..at + BLOCK].fill(T::default());
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::depthwise_blocked::transpose16;
    use super::{Direction, BLOCK};

    fn mask(count: usize) -> __mmask16 {
        ((1u32 << count.min(16)) - 1) as u16
    }

    /// 16 x 16 tiles: 16 channels by 16 pixels, transposed in registers.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn convert(
        from: &[f32],
        channels: usize,
        pixels: usize,
        to: &mut [f32],
        direction: Direction,
    ) {
        let (src, dst) = (from.as_ptr(), to.as_mut_ptr());
        for block in 0..channels.div_ceil(BLOCK) {
            let c0 = block * BLOCK;
            let lanes = (channels - c0).min(BLOCK);
            for p0 in (0..pixels).step_by(BLOCK) {
                let count = (pixels - p0).min(BLOCK);
                let blocked = (block * pixels + p0) * BLOCK;
                let mut v = [_mm512_setzero_ps(); 16];
                match direction {
                    Direction::In => {
                        for (c, v) in v.iter_mut().enumerate().take(lanes) {
                            *v =
                                _mm512_maskz_loadu_ps(mask(count), src.add((c0 + c) * pixels + p0));
                        }
                        transpose16(&mut v);
                        for (p, v) in v.iter().enumerate().take(count) {
                            _mm512_storeu_ps(dst.add(blocked + p * BLOCK), *v);
                        }
                    }
                    Direction::Out => {
                        for (p, v) in v.iter_mut().enumerate().take(count) {
                            *v = _mm512_loadu_ps(src.add(blocked + p * BLOCK));
                        }
                        transpose16(&mut v);
                        for (c, v) in v.iter().enumerate().take(lanes) {
                            let at = dst.add((c0 + c) * pixels + p0);
                            _mm512_mask_storeu_ps(at, mask(count), *v);
                        }
                    }
                }
            }
        }
    }
}

/// Enters the blocked layout: `channels x pixels` f32 (any shape of that many values,
/// channel-major) to `[ceil(channels / 16), pixels, 16]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ToBlocked {
    /// The element type (f32 or int8, quantized or not).
    pub dt: DatumType,
    /// Channels.
    pub channels: usize,
    /// Pixels.
    pub pixels: usize,
}

/// Leaves the blocked layout: `[ceil(channels / 16), pixels, 16]` back to `channels x pixels`,
/// shaped `shape`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FromBlocked {
    /// The element type (f32 or int8, quantized or not).
    pub dt: DatumType,
    /// Channels.
    pub channels: usize,
    /// Pixels.
    pub pixels: usize,
    /// The plain tensor's shape (`channels * pixels` values).
    pub shape: TVec<usize>,
}

/// The blocked layout's shape for `channels` over `pixels`.
pub fn blocked_shape(channels: usize, pixels: usize) -> [usize; 3] {
    [channels.div_ceil(BLOCK), pixels, BLOCK]
}

impl Op for ToBlocked {
    fn name(&self) -> StaticName {
        "GraftToBlocked".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{} channels x {} pixels",
            self.channels, self.pixels
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for ToBlocked {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let shape = blocked_shape(self.channels, self.pixels);
        let output = convert_tensor(
            &input,
            self.dt,
            (self.channels, self.pixels),
            &shape,
            Direction::In,
        )?;
        Ok(tvec!(output.into_tvalue()))
    }
}

/// `input` converted in `direction` into a new tensor of `shape`.
fn convert_tensor(
    input: &Tensor,
    dt: DatumType,
    (channels, pixels): (usize, usize),
    shape: &[usize],
    direction: Direction,
) -> TractResult<Tensor> {
    let expected = match direction {
        Direction::In => channels * pixels,
        Direction::Out => blocked_shape(channels, pixels).iter().product(),
    };
    ensure!(
        input.datum_type() == dt && input.len() == expected,
        "a layout conversion expects {expected} values of {dt:?}, got {} of {:?}",
        input.len(),
        input.datum_type()
    );
    // SAFETY: the conversion writes every value, padding included.
    let mut output = unsafe { Tensor::uninitialized_aligned_dt(dt, shape, 64)? };
    {
        let view = input.view();
        let mut plain = output.try_as_plain_ram_mut()?;
        if dt == f32::datum_type() {
            let to = plain.as_slice_mut::<f32>()?;
            f32::convert(view.as_slice::<f32>()?, channels, pixels, to, direction);
        } else {
            ensure!(
                dt.unquantized() == i8::datum_type(),
                "f32 or int8, not {dt:?}"
            );
            let to = plain.as_slice_mut::<i8>()?;
            i8::convert(view.as_slice::<i8>()?, channels, pixels, to, direction);
        }
    }
    Ok(output)
}

impl TypedOp for ToBlocked {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(self
            .dt
            .fact(blocked_shape(self.channels, self.pixels))))
    }

    as_op!();
}

impl Op for FromBlocked {
    fn name(&self) -> StaticName {
        "GraftFromBlocked".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{} channels x {} pixels",
            self.channels, self.pixels
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for FromBlocked {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let output = convert_tensor(
            &input,
            self.dt,
            (self.channels, self.pixels),
            &self.shape,
            Direction::Out,
        )?;
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for FromBlocked {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(self.dt.fact(&*self.shape)))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain loops, whatever the CPU.
    fn reference(values: &[f32], channels: usize, pixels: usize) -> Vec<f32> {
        let mut out = vec![0f32; channels.div_ceil(BLOCK) * pixels * BLOCK];
        for c in 0..channels {
            for p in 0..pixels {
                out[((c / BLOCK) * pixels + p) * BLOCK + c % BLOCK] = values[c * pixels + p];
            }
        }
        out
    }

    #[test]
    fn round_trips_and_matches_the_plain_loops() {
        for (channels, pixels) in [(1, 1), (16, 16), (3, 50), (24, 49), (33, 17), (96, 196)] {
            let values: Vec<f32> = (0..channels * pixels).map(|i| i as f32 + 0.5).collect();
            let blocked = to_blocked(&values, channels, pixels);
            assert_eq!(
                blocked,
                reference(&values, channels, pixels),
                "{channels} x {pixels}"
            );
            assert_eq!(from_blocked(&blocked, channels, pixels), values);
        }
    }
}
