//! Probe: find the input normalisation a backbone's weights were trained with, by asking the
//! backbone's own classifier.
//!
//! ONNX files do not say how their input was normalised, and a wrong guess costs accuracy
//! (EfficientNet-Lite, trained in TensorFlow on `(x - 127) / 128`, loses 2-3 points of transfer
//! accuracy when fed torchvision's ImageNet statistics). `--normalize auto` runs the backbone's
//! original classifier under each candidate normalisation and keeps the one that recognises
//! images best:
//! - for an ImageNet-1k classifier (1000 outputs), on 16 labelled ImageNet photos embedded in
//!   graft (`fixtures/golden`), scored by the mean log-probability of the true class;
//! - otherwise, on up to 16 of the user's training images, scored by the mean top-1 probability.
//!
//! The decision is cached per backbone.

use std::path::Path;

use graft_runtime::dataset::Sample;
use graft_runtime::parallel::par_map;
use graft_runtime::preprocess::{decode_image, load_image, Preprocessing};
use image::DynamicImage;
use tract_onnx::prelude::*;

use crate::backbone::import::Backbone;
use crate::error::{CompileError, Result};

mod result;

pub use result::{candidates, ProbeResult};

/// Number of the user's images the fallback probe looks at.
pub const PROBE_IMAGES: usize = 16;

/// The ImageNet photos (224x224 centre crops) and their class indices, from `fixtures/golden`.
const REFERENCE_IMAGES: [(&[u8], usize); 16] = [
    (
        include_bytes!("../../../../fixtures/golden/0000_n01440764.png"),
        0,
    ),
    (
        include_bytes!("../../../../fixtures/golden/0001_n01748264.png"),
        63,
    ),
    (
        include_bytes!("../../../../fixtures/golden/0002_n01990800.png"),
        126,
    ),
    (
        include_bytes!("../../../../fixtures/golden/0003_n02095570.png"),
        189,
    ),
    (
        include_bytes!("../../../../fixtures/golden/0004_n02110627.png"),
        252,
    ),
    (
        include_bytes!("../../../../fixtures/golden/0005_n02236044.png"),
        315,
    ),
    (
        include_bytes!("../../../../fixtures/golden/0006_n02492035.png"),
        378,
    ),
    (
        include_bytes!("../../../../fixtures/golden/0007_n02823750.png"),
        441,
    ),
    (
        include_bytes!("../../../../fixtures/golden/0008_n03063599.png"),
        504,
    ),
    (
        include_bytes!("../../../../fixtures/golden/0009_n03400231.png"),
        567,
    ),
    (
        include_bytes!("../../../../fixtures/golden/0010_n03680355.png"),
        630,
    ),
    (
        include_bytes!("../../../../fixtures/golden/0011_n03873416.png"),
        693,
    ),
    (
        include_bytes!("../../../../fixtures/golden/0012_n04049303.png"),
        756,
    ),
    (
        include_bytes!("../../../../fixtures/golden/0013_n04296562.png"),
        819,
    ),
    (
        include_bytes!("../../../../fixtures/golden/0014_n04517823.png"),
        882,
    ),
    (
        include_bytes!("../../../../fixtures/golden/0015_n07720875.png"),
        945,
    ),
];

/// Picks the normalisation under which the backbone's own classifier recognises images best (see
/// the module documentation). Returns `None` when the backbone has no classifier output to ask
/// (a single `[1, N]` output, N >= 2).
pub fn probe_normalization(
    backbone: &Backbone,
    base: &Preprocessing,
    samples: &[Sample],
    threads: usize,
    cache_root: Option<&Path>,
) -> Result<Option<ProbeResult>> {
    let cache_file = cache_root.map(|root| {
        root.join("probe")
            .join(format!("{}.json", &backbone.sha256()[..24]))
    });
    if let Some(cached) = cache_file
        .as_ref()
        .and_then(|f| graft_runtime::read::read_regular(f, 1 << 20, "probe cache").ok())
        .and_then(|bytes| ProbeResult::from_cache(&bytes))
    {
        return Ok(Some(cached));
    }
    let outputs = backbone.output_names();
    let [output] = &outputs[..] else {
        return Ok(None);
    };
    let Ok(classifier) = backbone.clone().cut(output) else {
        return Ok(None);
    };
    if classifier.cut_shape().len() != 2 || classifier.feature_dim() < 2 {
        return Ok(None);
    }
    let plan = graft_runtime::kernels::into_optimized(classifier.model().clone())
        .and_then(|m| m.into_runnable())
        .map_err(CompileError::graph("normalization probe"))?;
    let run = Runner {
        plan,
        shape: backbone.input_shape(),
        threads,
    };
    let result = if classifier.feature_dim() == 1000 {
        let images: Vec<(DynamicImage, usize)> = REFERENCE_IMAGES
            .iter()
            .map(|(bytes, class)| {
                let image = decode_image(bytes, Path::new("reference.png")).expect("embedded PNG");
                (image, *class)
            })
            .collect();
        let result = run.choose(
            base,
            &images,
            "mean log-probability of the true class on 16 embedded ImageNet photos",
            |logits, class| log_softmax_at(logits, *class),
        )?;
        if let Some(file) = cache_file {
            // A cache that cannot be written costs the probe again next time, nothing more.
            let dir = file.parent().expect("cache file has a folder");
            let json = serde_json::to_vec_pretty(&result).expect("probe result serializes");
            if std::fs::create_dir_all(dir).is_ok() {
                let _ = graft_runtime::artifact::write_atomic(&file, &json);
            }
        }
        result
    } else {
        let step = (samples.len() / PROBE_IMAGES).max(1);
        let picked: Vec<&Sample> = samples.iter().step_by(step).take(PROBE_IMAGES).collect();
        let images: Vec<(DynamicImage, ())> =
            par_map(&picked, threads, |s| load_image(&s.path).ok(), || {})
                .into_iter()
                .flatten()
                .map(|image| (image, ()))
                .collect();
        if images.is_empty() {
            return Ok(None);
        }
        let method = format!(
            "mean top-1 probability of the backbone's classifier on {} training images",
            images.len()
        );
        run.choose(base, &images, &method, |logits, _| top1_probability(logits))?
    };
    Ok(Some(result))
}

struct Runner {
    plan: Arc<TypedSimplePlan>,
    shape: [usize; 4],
    threads: usize,
}

impl Runner {
    /// Scores every candidate normalisation on `images` and picks the best.
    fn choose<T: Sync>(
        &self,
        base: &Preprocessing,
        images: &[(DynamicImage, T)],
        method: &str,
        score: impl Fn(&[f32], &T) -> f32 + Sync,
    ) -> Result<ProbeResult> {
        let mut scores = Vec::new();
        for normalization in candidates() {
            let preprocessing = Preprocessing {
                normalization: normalization.clone(),
                ..base.clone()
            };
            let per_image = par_map(
                images,
                self.threads,
                |(image, tag)| -> Result<f32> {
                    let logits = self.logits(&preprocessing.apply(image))?;
                    Ok(score(&logits, tag))
                },
                || {},
            )
            .into_iter()
            .collect::<Result<Vec<f32>>>()?;
            let mean = per_image.iter().sum::<f32>() / per_image.len() as f32;
            scores.push((normalization.name, mean));
        }
        let chosen = scores
            .iter()
            .fold(&scores[0], |best, s| if s.1 > best.1 { s } else { best })
            .0
            .clone();
        Ok(ProbeResult {
            scores,
            chosen,
            method: method.to_string(),
        })
    }

    fn logits(&self, chw: &[f32]) -> Result<Vec<f32>> {
        let graph = CompileError::graph("normalization probe");
        let input = Tensor::from_shape(&self.shape, chw).map_err(&graph)?;
        let out = self.plan.run(tvec!(input.into_tvalue())).map_err(&graph)?;
        Ok(out[0].view().as_slice::<f32>().map_err(&graph)?.to_vec())
    }
}

/// Largest softmax probability of `logits`.
fn top1_probability(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
    1.0 / sum
}

/// `log softmax(logits)[class]`.
fn log_softmax_at(logits: &[f32], class: usize) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
    logits[class] - max - sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top1_probability_is_the_softmax_maximum() {
        assert!((top1_probability(&[0.0, 0.0]) - 0.5).abs() < 1e-6);
        let p = top1_probability(&[2.0, 1.0, 0.0]);
        let expected = 2f32.exp() / (2f32.exp() + 1f32.exp() + 1.0);
        assert!((p - expected).abs() < 1e-6);
        assert!((log_softmax_at(&[2.0, 1.0, 0.0], 0) - expected.ln()).abs() < 1e-6);
    }
}
