//! Search: how to quantize a model, chosen by measuring what each choice changes in its outputs.
//!
//! Every candidate is the [`super::simulate`]d graph (int8 numbers at f32 speed), compared with the
//! f32 graph on the same images ([`Probe`]): how many top-1 predictions it changes (its
//! disagreement) and how far its output distributions move (mean Kullback-Leibler divergence).
//! No labels are needed, so the probe can be many training images instead of the few held out
//! for choices. That is the point: scored by accuracy on 49 or 168 holdout images, gains and
//! losses cancelled and a graph that changed one prediction in seven passed a 1-point budget
//! (flowers5, measured: 14 % of the val images changed, -1.57 points); disagreement cannot cancel,
//! and it bounds the accuracy int8 can lose on those images.
//!
//! [`search`] first tries each calibration method and keeps the one closest to f32 (lowest
//! divergence), then per-channel weight scales (kept when closer: graft's kernels fuse them, so
//! they cost no time); if more images change than the budget allows, it
//! measures how much each int8 layer alone disturbs the output (its sensitivity) and returns
//! layers to f32, most sensitive first, until the disagreement fits the budget.

use graft_runtime::parallel::par_map;
use graft_runtime::preprocess::Preprocessing;
use graft_runtime::progress::Progress;
use tract_onnx::prelude::*;

use super::{plan, simulate, Calibration, CalibrationMethod, QuantizeConfig};
use crate::error::{CompileError, Result};

/// Images used to rank layers by sensitivity (the first ones of the probe).
const SENSITIVITY_IMAGES: usize = 64;

/// Images, their labels when known, and the f32 graph's output on each.
///
/// The images are kept as 8-bit pixels ([`Preprocessing::pixels`]) and normalized when run: a
/// thousand 224x224 images take 150 MB instead of 600.
pub struct Probe {
    images: Vec<Vec<u8>>,
    preprocessing: Preprocessing,
    labels: Option<Vec<usize>>,
    reference: Vec<Vec<f32>>,
    threads: usize,
}

/// The model input for `pixels` ([`Preprocessing::pixels`] of `preprocessing`): normalized into
/// a `[1, 3, H, W]` tensor.
pub fn input_tensor(preprocessing: &Preprocessing, pixels: &[u8]) -> Result<Tensor> {
    let [height, width] = preprocessing.crop.map(|v| v as usize);
    let mut values = vec![0.0; preprocessing.tensor_len()];
    preprocessing.normalize_into(pixels, &mut values);
    Tensor::from_shape(&[1, 3, height, width], &values).map_err(CompileError::graph("model input"))
}

/// How a graph's outputs compare with the f32 graph's on the probe images.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measurement {
    /// Top-1 accuracy against the labels, when the probe has labels.
    pub accuracy: Option<f64>,
    /// Share of images whose top-1 class equals the f32 graph's.
    pub agreement: f64,
    /// Mean Kullback-Leibler divergence of the output distribution from the f32 graph's.
    pub divergence: f64,
}

impl Measurement {
    /// Share of images whose top-1 class differs from the f32 graph's: what the budget limits.
    pub fn disagreement(&self) -> f64 {
        1.0 - self.agreement
    }

    /// Whether `self` is closer to the f32 graph than `other`: lower divergence, then more
    /// agreement.
    fn closer_than(&self, other: &Measurement) -> bool {
        self.divergence
            .total_cmp(&other.divergence)
            .then(other.agreement.total_cmp(&self.agreement))
            .is_lt()
    }
}

/// The output as a probability distribution: used as is when it already is one (the folded
/// graph's first output), through a softmax otherwise (a backbone's logits).
fn distribution(output: &[f32]) -> Vec<f64> {
    let sum: f64 = output.iter().map(|&v| v as f64).sum();
    if output.iter().all(|&v| v >= 0.0) && (sum - 1.0).abs() < 1e-3 {
        return output.iter().map(|&v| v as f64).collect();
    }
    let max = output.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let exp: Vec<f64> = output.iter().map(|&v| (v as f64 - max).exp()).collect();
    let total: f64 = exp.iter().sum();
    exp.into_iter().map(|e| e / total).collect()
}

fn top1(output: &[f32]) -> usize {
    (0..output.len())
        .max_by(|&a, &b| output[a].total_cmp(&output[b]).then(b.cmp(&a)))
        .unwrap_or(0)
}

fn divergence(reference: &[f32], candidate: &[f32]) -> f64 {
    let (p, q) = (distribution(reference), distribution(candidate));
    p.iter()
        .zip(&q)
        .filter(|(&p, _)| p > 0.0)
        .map(|(&p, &q)| p * (p / q.max(1e-30)).ln())
        .sum()
}

impl Probe {
    /// Runs the f32 `model` on `images` ([`Preprocessing::pixels`] of `preprocessing`) on
    /// `threads` threads.
    pub fn new(
        model: &TypedModel,
        images: Vec<Vec<u8>>,
        preprocessing: &Preprocessing,
        labels: Option<Vec<usize>>,
        threads: usize,
    ) -> Result<Probe> {
        if images.is_empty() {
            return Err(CompileError::NotEnoughData(
                "choosing how to quantize needs at least one image".into(),
            ));
        }
        if let Some(image) = images
            .iter()
            .find(|i| i.len() != preprocessing.tensor_len())
        {
            return Err(CompileError::Graph {
                stage: "quantization probe",
                reason: format!(
                    "an image has {} pixel values, the preprocessing makes {}",
                    image.len(),
                    preprocessing.tensor_len()
                ),
            });
        }
        let mut probe = Probe {
            images,
            preprocessing: preprocessing.clone(),
            labels,
            reference: vec![],
            threads,
        };
        probe.reference = probe.outputs(model, usize::MAX)?;
        Ok(probe)
    }

    /// The model input for image `index` ([`input_tensor`]).
    pub fn input(&self, index: usize) -> Result<Tensor> {
        input_tensor(&self.preprocessing, &self.images[index])
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.images.len()
    }

    /// Whether there are no images (never true: [`Probe::new`] refuses that).
    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// The f32 graph measured against itself: its accuracy, full agreement, no divergence.
    pub fn reference(&self) -> Measurement {
        self.compare(&self.reference)
    }

    /// Runs `model` on every probe image and compares it with the f32 graph.
    pub fn measure(&self, model: &TypedModel) -> Result<Measurement> {
        self.measure_first(model, usize::MAX)
    }

    /// [`Probe::measure`] on the first `limit` images only.
    pub fn measure_first(&self, model: &TypedModel, limit: usize) -> Result<Measurement> {
        Ok(self.compare(&self.outputs(model, limit)?))
    }

    /// The same probe scored by agreement with f32 instead of accuracy (labels dropped).
    pub fn without_labels(self) -> Probe {
        Probe {
            labels: None,
            ..self
        }
    }

    fn outputs(&self, model: &TypedModel, limit: usize) -> Result<Vec<Vec<f32>>> {
        let plan = graft_runtime::kernels::into_optimized(model.clone())
            .and_then(|m| m.into_runnable())
            .map_err(CompileError::graph("quantization probe"))?;
        let indices: Vec<usize> = (0..limit.min(self.images.len())).collect();
        par_map(
            &indices,
            self.threads,
            |&index| -> Result<Vec<f32>> {
                let input = self.input(index)?;
                let outputs = plan
                    .run(tvec![input.into()])
                    .map_err(CompileError::graph("quantization probe"))?;
                outputs[0]
                    .view()
                    .as_slice::<f32>()
                    .map(|v| v.to_vec())
                    .map_err(CompileError::graph("quantization probe"))
            },
            || (),
        )
        .into_iter()
        .collect()
    }

    /// Compares `outputs` (of the first `outputs.len()` images) with the f32 graph's.
    fn compare(&self, outputs: &[Vec<f32>]) -> Measurement {
        let n = outputs.len() as f64;
        let agreement = outputs
            .iter()
            .zip(&self.reference)
            .filter(|(o, r)| top1(o) == top1(r))
            .count() as f64
            / n;
        let divergence = outputs
            .iter()
            .zip(&self.reference)
            .map(|(o, r)| divergence(r, o))
            .sum::<f64>()
            / n;
        let accuracy = self.labels.as_ref().map(|labels| {
            outputs
                .iter()
                .zip(labels)
                .filter(|(o, &l)| top1(o) == l)
                .count() as f64
                / n
        });
        Measurement {
            accuracy,
            agreement,
            divergence,
        }
    }
}

/// What [`search`] may choose from.
#[derive(Debug, Clone)]
pub struct SearchOptions {
    /// Calibration methods to try (one: no choice).
    pub methods: Vec<CalibrationMethod>,
    /// Largest acceptable [`Measurement::disagreement`] with f32 (0.01: one image in a hundred).
    pub budget: f64,
    /// The layers that may be int8 at all.
    pub base: QuantizeConfig,
}

/// One calibration method, simulated on the probe.
#[derive(Debug, Clone)]
pub struct Trial {
    /// The method.
    pub method: CalibrationMethod,
    /// Its simulated outcome with every allowed layer in int8.
    pub measurement: Measurement,
}

/// A layer returned to f32 to keep within the budget.
#[derive(Debug, Clone)]
pub struct Fallback {
    /// Node name.
    pub layer: String,
    /// Its sensitivity: mean divergence from f32 with only this layer in int8.
    pub divergence: f64,
}

/// What [`search`] chose and measured.
#[derive(Debug, Clone)]
pub struct SearchResult {
    /// The calibration method chosen.
    pub method: CalibrationMethod,
    /// The layers to quantize: the base configuration plus the fallbacks kept in f32.
    pub config: QuantizeConfig,
    /// The f32 graph on the probe.
    pub reference: Measurement,
    /// Every method tried.
    pub trials: Vec<Trial>,
    /// Layers returned to f32, in the order they were.
    pub fallbacks: Vec<Fallback>,
    /// The kept method with one weight scale per output channel, when the base configuration is
    /// per tensor; chosen when closer to f32 (graft's kernels fuse the
    /// per-channel requantization, so it costs no time).
    pub per_channel: Option<Measurement>,
    /// The simulated outcome of the final choice.
    pub simulated: Measurement,
    /// Probe images measured.
    pub images: usize,
}

/// Chooses the calibration method and the layers kept in f32 (see the module documentation).
pub fn search(
    model: &TypedModel,
    calibration: &Calibration,
    probe: &Probe,
    options: &SearchOptions,
    progress: &dyn Progress,
) -> Result<SearchResult> {
    let mut trials = Vec::new();
    progress.start("calibration methods", options.methods.len());
    for &method in &options.methods {
        let candidate = simulate(model, &calibration.ranges(method), &options.base)?;
        trials.push(Trial {
            method,
            measurement: probe.measure(&candidate)?,
        });
        progress.advance();
    }
    progress.finish();
    let best = trials
        .iter()
        .reduce(|best, t| {
            if t.measurement.closer_than(&best.measurement) {
                t
            } else {
                best
            }
        })
        .ok_or_else(|| CompileError::InvalidOption("no calibration method to try".into()))?;
    let method = best.method;
    let mut simulated = best.measurement;
    let ranges = calibration.ranges(method);
    let mut config = options.base.clone();
    let mut per_channel = None;
    if !config.per_channel {
        let candidate = QuantizeConfig {
            per_channel: true,
            ..config.clone()
        };
        let measurement = probe.measure(&simulate(model, &ranges, &candidate)?)?;
        per_channel = Some(measurement);
        if measurement.closer_than(&simulated) {
            config = candidate;
            simulated = measurement;
        }
    }
    let mut fallbacks = Vec::new();
    let within = |m: &Measurement| m.disagreement() <= options.budget + 1e-9;
    if !within(&simulated) {
        let int8: Vec<String> = plan(model, &config)?
            .into_iter()
            .filter(|l| l.precision == "int8")
            .map(|l| l.layer)
            .collect();
        let mut sensitivity = Vec::new();
        progress.start("layer sensitivity", int8.len());
        for layer in &int8 {
            let mut alone = config.clone();
            alone
                .keep_f32
                .extend(int8.iter().filter(|l| *l != layer).cloned());
            let candidate = simulate(model, &ranges, &alone)?;
            sensitivity.push(Fallback {
                layer: layer.clone(),
                divergence: probe
                    .measure_first(&candidate, SENSITIVITY_IMAGES)?
                    .divergence,
            });
            progress.advance();
            if progress.cancelled() {
                return Err(CompileError::Interrupted);
            }
        }
        progress.finish();
        sensitivity.sort_by(|a, b| b.divergence.total_cmp(&a.divergence));
        progress.start("fallback to f32", sensitivity.len());
        for fallback in sensitivity {
            config.keep_f32.push(fallback.layer.clone());
            fallbacks.push(fallback);
            simulated = probe.measure(&simulate(model, &ranges, &config)?)?;
            progress.advance();
            if within(&simulated) || progress.cancelled() {
                break;
            }
        }
        progress.finish();
    }
    Ok(SearchResult {
        method,
        config,
        reference: probe.reference(),
        trials,
        fallbacks,
        per_channel,
        simulated,
        images: probe.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_become_distributions() {
        let p = distribution(&[0.25, 0.75]);
        assert_eq!(p, vec![0.25, 0.75]);
        let q = distribution(&[0.0, 2f32.ln()]);
        assert!((q[0] - 1.0 / 3.0).abs() < 1e-6 && (q[1] - 2.0 / 3.0).abs() < 1e-6);
    }

    #[test]
    fn divergence_is_zero_for_equal_outputs_and_grows_with_difference() {
        assert!(divergence(&[0.5, 0.5], &[0.5, 0.5]).abs() < 1e-12);
        let near = divergence(&[0.5, 0.5], &[0.45, 0.55]);
        let far = divergence(&[0.5, 0.5], &[0.1, 0.9]);
        assert!(near > 0.0 && far > near, "{near} {far}");
    }

    #[test]
    fn ties_in_top1_go_to_the_first_class() {
        assert_eq!(top1(&[0.2, 0.4, 0.4]), 1);
    }
}
