//! Calibration: the value range of every f32 activation, measured by running the graph on sample
//! images, and three ways of turning what was seen into the range int8 covers.
//!
//! - `min-max`: everything seen is representable; one outlier stretches the scale for all.
//! - `percentile`: the 0.01 % most extreme values on each side are clipped.
//! - `entropy`: the window (shrunk towards zero in 1 % steps) whose 255-level quantization loses
//!   the least information, as the Kullback-Leibler divergence between the observed histogram
//!   and its quantized copy (TensorRT's entropy calibration, for asymmetric ranges).
//!
//! Which of them serves a model best is measured, not assumed: see [`super::search`].

use std::collections::HashMap;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::konst::Const;

use crate::error::{CompileError, Result};

/// Histogram bins per activation.
const BINS: usize = 2048;
/// Levels of an int8 tensor.
const LEVELS: usize = 255;
/// Share of values `percentile` clips on each side.
const PERCENTILE_TAIL: f64 = 1e-4;

/// Value range of one activation tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Range {
    /// Smallest value covered.
    pub min: f32,
    /// Largest value covered.
    pub max: f32,
}

impl Range {
    const EMPTY: Range = Range {
        min: f32::INFINITY,
        max: f32::NEG_INFINITY,
    };

    fn update(&mut self, values: &[f32]) {
        for &v in values {
            if v.is_finite() {
                self.min = self.min.min(v);
                self.max = self.max.max(v);
            }
        }
    }

    /// The int8 parameters `(zero_point, scale)` covering this range (and zero).
    pub fn qparams(&self) -> (i32, f32) {
        let min = self.min.min(0.0);
        let max = self.max.max(0.0);
        let scale = ((max - min) / 255.0).max(f32::EPSILON);
        let zero_point = (-128.0 - min / scale).round().clamp(-128.0, 127.0) as i32;
        (zero_point, scale)
    }
}

/// How observed values become the range int8 covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CalibrationMethod {
    /// Smallest to largest value seen.
    MinMax,
    /// The 0.01 % and 99.99 % percentiles.
    Percentile,
    /// The window of least Kullback-Leibler divergence after quantization.
    Entropy,
}

impl CalibrationMethod {
    /// Every method, in the order they are tried.
    pub const ALL: [CalibrationMethod; 3] = [
        CalibrationMethod::MinMax,
        CalibrationMethod::Percentile,
        CalibrationMethod::Entropy,
    ];

    /// The `--calibration` spelling.
    pub fn name(self) -> &'static str {
        match self {
            CalibrationMethod::MinMax => "min-max",
            CalibrationMethod::Percentile => "percentile",
            CalibrationMethod::Entropy => "entropy",
        }
    }
}

impl std::str::FromStr for CalibrationMethod {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        CalibrationMethod::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                format!("unknown calibration {s:?}: expected min-max, percentile or entropy")
            })
    }
}

/// Counts of observed values in [`BINS`] equal bins between the smallest and largest value.
#[derive(Debug, Clone)]
struct Histogram {
    range: Range,
    counts: Vec<u64>,
}

impl Histogram {
    fn new(range: Range) -> Histogram {
        Histogram {
            range,
            counts: vec![0; BINS],
        }
    }

    fn width(&self) -> f32 {
        ((self.range.max - self.range.min) / BINS as f32).max(f32::MIN_POSITIVE)
    }

    fn add(&mut self, values: &[f32]) {
        let (min, width) = (self.range.min, self.width());
        for &v in values {
            if v.is_finite() {
                let bin = ((v - min) / width) as usize;
                self.counts[bin.min(BINS - 1)] += 1;
            }
        }
    }

    /// The value at the lower edge of `bin`.
    fn edge(&self, bin: usize) -> f32 {
        self.range.min + bin as f32 * self.width()
    }

    fn percentile_range(&self) -> Range {
        let total: u64 = self.counts.iter().sum();
        let tail = (total as f64 * PERCENTILE_TAIL) as u64;
        fn first_above<'a>(mut counts: impl Iterator<Item = (usize, &'a u64)>, tail: u64) -> usize {
            let mut seen = 0;
            counts
                .find(|(_, &c)| {
                    seen += c;
                    seen > tail
                })
                .map_or(0, |(i, _)| i)
        }
        let low = first_above(self.counts.iter().enumerate(), tail);
        let high = first_above(self.counts.iter().enumerate().rev(), tail);
        Range {
            min: if self.range.min < 0.0 {
                self.edge(low)
            } else {
                self.range.min
            },
            max: self.edge(high + 1).min(self.range.max),
        }
    }

    /// The window `[zero - f * (zero - 0), zero + f * (BINS - zero)]` (in bins, `zero` being the
    /// bin holding 0) of least divergence, for `f` from 1 down in 1 % steps while the window still
    /// spans at least [`LEVELS`] bins.
    fn entropy_range(&self) -> Range {
        let zero = if self.range.min >= 0.0 {
            0
        } else if self.range.max <= 0.0 {
            BINS
        } else {
            ((-self.range.min / self.width()) as usize).min(BINS)
        };
        let mut best = (f64::INFINITY, 0, BINS);
        for step in 0..100 {
            let f = 1.0 - step as f64 / 100.0;
            let low = zero - (zero as f64 * f).round() as usize;
            let high = zero + ((BINS - zero) as f64 * f).round() as usize;
            if high - low < LEVELS {
                break;
            }
            let divergence = self.divergence(low, high, zero.min(BINS - 1));
            if divergence < best.0 - 1e-12 {
                best = (divergence, low, high);
            }
        }
        let (_, low, high) = best;
        Range {
            min: self.edge(low).max(self.range.min),
            max: self.edge(high).min(self.range.max),
        }
    }

    /// KL(P || Q): P is the histogram inside bins `low..high`, with the values outside added to
    /// the edge bins (they clip there); Q spreads each of [`LEVELS`] equal chunks' mass evenly
    /// over the chunk's non-empty bins. The bin holding zero is left out of both: zero is
    /// exactly representable whatever the window, and after a ReLU its spike would otherwise
    /// dominate and favour the narrowest window.
    fn divergence(&self, low: usize, high: usize, zero: usize) -> f64 {
        let mut p: Vec<f64> = self.counts[low..high].iter().map(|&c| c as f64).collect();
        let last = p.len() - 1;
        p[0] += self.counts[..low].iter().sum::<u64>() as f64;
        p[last] += self.counts[high..].iter().sum::<u64>() as f64;
        if (low..high).contains(&zero) {
            p[zero - low] = 0.0;
        }
        let total: f64 = p.iter().sum();
        if total == 0.0 {
            return 0.0;
        }
        let mut q = vec![0f64; p.len()];
        for level in 0..LEVELS {
            let start = level * p.len() / LEVELS;
            let end = (level + 1) * p.len() / LEVELS;
            let chunk = &p[start..end];
            let mass: f64 = chunk.iter().sum();
            let filled = chunk.iter().filter(|&&c| c > 0.0).count();
            for (q, &p) in q[start..end].iter_mut().zip(chunk) {
                if p > 0.0 {
                    *q = mass / filled as f64;
                }
            }
        }
        p.iter()
            .zip(&q)
            .filter(|(&p, _)| p > 0.0)
            .map(|(&p, &q)| p / total * ((p / total) / (q / total)).ln())
            .sum()
    }
}

/// The range int8 covers at each calibrated activation (keyed by outlet of the calibrated graph).
#[derive(Debug, Clone, Default)]
pub struct ActivationRanges {
    ranges: HashMap<OutletId, Range>,
}

impl ActivationRanges {
    /// The range at `outlet`.
    pub fn range(&self, outlet: OutletId) -> Option<Range> {
        self.ranges.get(&outlet).copied()
    }

    /// Ranges given outlet by outlet.
    pub fn from_ranges(ranges: impl IntoIterator<Item = (OutletId, Range)>) -> ActivationRanges {
        ActivationRanges {
            ranges: ranges.into_iter().collect(),
        }
    }
}

/// What calibration observed at every f32 activation of a graph.
#[derive(Debug, Clone)]
pub struct Calibration {
    histograms: HashMap<OutletId, Histogram>,
    /// Number of images the ranges were measured on.
    pub images: usize,
}

impl Calibration {
    /// The observed min-max range at `outlet`.
    pub fn range(&self, outlet: OutletId) -> Option<Range> {
        self.histograms.get(&outlet).map(|h| h.range)
    }

    /// The ranges `method` chooses.
    pub fn ranges(&self, method: CalibrationMethod) -> ActivationRanges {
        let ranges = self
            .histograms
            .iter()
            .map(|(&outlet, histogram)| {
                let range = match method {
                    CalibrationMethod::MinMax => histogram.range,
                    CalibrationMethod::Percentile => histogram.percentile_range(),
                    CalibrationMethod::Entropy => histogram.entropy_range(),
                };
                (outlet, range)
            })
            .collect();
        ActivationRanges { ranges }
    }
}

/// Runs `model` (the folded f32 graph) twice over `inputs`: once for the range of every f32
/// activation, once for its histogram. `on_image` counts images over both passes.
pub fn calibrate(
    model: &TypedModel,
    inputs: &[Tensor],
    mut on_image: impl FnMut(usize),
) -> Result<Calibration> {
    if inputs.is_empty() {
        return Err(CompileError::NotEnoughData(
            "quantization needs at least one calibration image".into(),
        ));
    }
    let outlets: Vec<OutletId> = model
        .eval_order()
        .map_err(CompileError::graph("calibrate"))?
        .into_iter()
        .filter(|&n| !model.node(n).op_is::<Const>())
        .flat_map(|n| (0..model.node(n).outputs.len()).map(move |slot| OutletId::new(n, slot)))
        .filter(|&o| {
            model
                .outlet_fact(o)
                .is_ok_and(|f| f.datum_type == f32::datum_type())
        })
        .collect();
    let mut probe = model.clone();
    probe
        .select_output_outlets(&outlets)
        .map_err(CompileError::graph("calibrate"))?;
    let plan = graft_runtime::kernels::into_optimized(probe)
        .and_then(|m| m.into_runnable())
        .map_err(CompileError::graph("calibrate"))?;
    let mut done = 0;
    let mut each_activation = |visit: &mut dyn FnMut(usize, &[f32])| -> Result<()> {
        for input in inputs {
            let values = plan
                .run(tvec![input.clone().into()])
                .map_err(CompileError::graph("calibrate"))?;
            for (index, value) in values.iter().enumerate() {
                let view = value.view();
                let slice = view
                    .as_slice::<f32>()
                    .map_err(CompileError::graph("calibrate"))?;
                visit(index, slice);
            }
            done += 1;
            on_image(done);
        }
        Ok(())
    };
    let mut ranges = vec![Range::EMPTY; outlets.len()];
    each_activation(&mut |index, values| ranges[index].update(values))?;
    let mut histograms: Vec<Histogram> = ranges.into_iter().map(Histogram::new).collect();
    each_activation(&mut |index, values| histograms[index].add(values))?;
    Ok(Calibration {
        histograms: outlets.into_iter().zip(histograms).collect(),
        images: inputs.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qparams_cover_the_range_and_zero() {
        let (zp, scale) = Range { min: 0.0, max: 6.0 }.qparams();
        assert_eq!(zp, -128);
        assert!((scale - 6.0 / 255.0).abs() < 1e-7);
        let (zp, scale) = Range {
            min: -1.0,
            max: 1.0,
        }
        .qparams();
        assert!((scale - 2.0 / 255.0).abs() < 1e-7);
        assert_eq!(zp, -1, "-128 - (-1 / scale) = -0.5 rounds away from zero");
        let (zp, _) = Range { min: 2.0, max: 4.0 }.qparams();
        assert_eq!(zp, -128, "zero stays representable");
    }

    /// 100,000 values spread evenly over [0, 1) plus one outlier at 50.
    fn with_outlier() -> Histogram {
        let mut values: Vec<f32> = (0..100_000).map(|i| i as f32 / 100_000.0).collect();
        values.push(50.0);
        histogram_of(&values)
    }

    #[test]
    fn percentile_clips_a_lone_outlier_and_keeps_the_bulk() {
        let h = with_outlier();
        assert_eq!(
            h.range,
            Range {
                min: 0.0,
                max: 50.0
            }
        );
        let p = h.percentile_range();
        assert_eq!(p.min, 0.0, "non-negative tensors keep their minimum");
        assert!(p.max >= 0.99 && p.max < 1.1, "{p:?}");
    }

    fn histogram_of(values: &[f32]) -> Histogram {
        let mut range = Range::EMPTY;
        range.update(values);
        let mut histogram = Histogram::new(range);
        histogram.add(values);
        histogram
    }

    #[test]
    fn entropy_clips_a_long_tail_and_keeps_uniform_data_whole() {
        // Exponentially distributed values (quantiles of Exp(1)): a long thin tail to 12.2.
        let n = 100_000;
        let tail: Vec<f32> = (0..n)
            .map(|i| -(1.0 - (i as f64 + 0.5) / n as f64).ln() as f32)
            .collect();
        let h = histogram_of(&tail);
        let e = h.entropy_range();
        assert_eq!(e.min, h.range.min, "nothing below zero to clip");
        assert!(e.max < 0.9 * h.range.max, "the thin tail is clipped: {e:?}");
        assert!(e.max > 3.0, "the bulk stays inside: {e:?}");

        let uniform: Vec<f32> = (0..n).map(|i| i as f32 / 50_000.0 - 1.0).collect();
        let e = histogram_of(&uniform).entropy_range();
        assert!(e.min < -0.99 && e.max > 0.99, "nothing to clip: {e:?}");
    }

    #[test]
    fn divergence_is_zero_when_every_bin_is_its_own_level() {
        let mut h = Histogram::new(Range { min: 0.0, max: 1.0 });
        for (i, c) in h.counts.iter_mut().enumerate() {
            *c = (i % 7) as u64;
        }
        assert!(h.divergence(0, LEVELS, 0) < 1e-12);
        assert!(h.divergence(0, BINS, 0) > 0.0);
    }

    #[test]
    fn methods_parse_by_name() {
        for m in CalibrationMethod::ALL {
            assert_eq!(m.name().parse::<CalibrationMethod>(), Ok(m));
        }
        assert_eq!(
            "kl".parse::<CalibrationMethod>().unwrap_err(),
            "unknown calibration \"kl\": expected min-max, percentile or entropy"
        );
    }
}
