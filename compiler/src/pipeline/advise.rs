//! Advise: measure how well a backbone's features transfer to the user's data and recommend
//! what to transfer (where to cut, which head, whether to fine-tune), with the evidence.
//!
//! The folklore grid of transfer learning (small and similar data: keep everything, train a
//! head; different data: fine-tune the upper blocks) is answered with three measurements on the
//! training images `graft compile` would train on (never its validation images):
//! - **size**: images per class;
//! - **similarity to the pretraining data**: how confidently the backbone's own ImageNet
//!   classifier recognises the images (mean top-1 softmax probability);
//! - **probe accuracy by depth**: stratified k-fold cross-validated logistic regression on the
//!   global-average-pooled features at the end of each resolution stage and at the default cut.
//!
//! One forward pass per image computes every cut and the classifier output; the features go to
//! the same cache `graft compile` uses, so the compile that follows the advice starts warm.

use graft_runtime::dataset::ImageFolder;
use serde::Serialize;

use crate::backbone::cut::MultiCut;
use crate::backbone::import::Backbone;
use crate::backbone::points::CutPoint;
use crate::data::splits::Splits;
use crate::error::{CompileError, Result};
use crate::features::{FeatureCache, FeatureExtractor, Features};
use crate::finetune::{FinetuneConfig, Strategy, Unfreeze};
use crate::head::train::{cross_validate, CvScore, HeadKind, CV_FOLDS};
use crate::pipeline::{choose_normalization, preprocessing_for, stage, CompileOptions, Reporter};
use crate::report::svg::{accuracy_range, LineChart, Series};

/// Cuts shallower than this (fraction of the graph) are not probed: their few generic channels,
/// pooled, are no match for later ones.
const MIN_PROBE_DEPTH: f32 = 0.25;

/// Mean top-1 probability of the ImageNet classifier from which the data counts as similar to
/// ImageNet (Lite0 on hymenoptera: 0.72, where fine-tuning gained nothing; cifar10-mini: 0.25
/// and flowers5: 0.18, where fine-tuning every layer gained 7.6 and 3.3 points over the head,
/// held out; see docs/RESULTS.md).
pub const SIMILAR_TOP1: f32 = 0.5;

/// Fewest training images per class worth fine-tuning on; below it, blocks overfit.
pub const MIN_FINETUNE_PER_CLASS: usize = 50;

/// Training images per class from which every layer is fine-tuned instead of the top 2 blocks
/// (Lite0, held out: every layer beat the top 2 blocks on cifar10-mini, 200 per class, and on
/// flowers5, 577 in its smallest class; below this nothing was measured, so the shallower top 2
/// blocks stay).
pub const ALL_FINETUNE_PER_CLASS: usize = 150;

/// The cross-validated linear probe at one cut.
#[derive(Debug, Clone, Serialize)]
pub struct CutProbe {
    /// Tensor name (for `--cut`).
    pub tensor: String,
    /// Its shape before pooling.
    pub shape: Vec<usize>,
    /// Position in the graph, 0 (input) to 1 (output).
    pub depth: f32,
    /// Whether this is the backbone's default cut.
    pub default: bool,
    /// Logistic regression, stratified k-fold, at the best L2 strength.
    pub cv: CvScore,
}

/// How familiar the images look to the backbone's own classifier.
#[derive(Debug, Clone, Serialize)]
pub struct Similarity {
    /// Outputs of the classifier (1000 for ImageNet-1k).
    pub classes: usize,
    /// Mean over the images of the largest softmax probability.
    pub mean_top1_probability: f32,
    /// Mean softmax entropy divided by `ln(classes)` (0 = certain, 1 = uniform).
    pub mean_normalized_entropy: f32,
}

/// What the advice is based on and what it recommends.
#[derive(Debug, Clone, Serialize)]
pub struct Advice {
    /// Class names.
    pub classes: Vec<String>,
    /// Training images per class (the images `compile` trains on).
    pub train_per_class: Vec<usize>,
    /// Normalisation used (name).
    pub normalization: String,
    /// Probes from shallow to deep.
    pub probes: Vec<CutProbe>,
    /// `None` when the backbone has no classifier output.
    pub similarity: Option<Similarity>,
    /// What to do.
    pub recommendation: Recommendation,
}

/// A compile configuration and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Recommendation {
    /// `head` or `finetune`.
    pub strategy: String,
    /// Tensor to cut at.
    pub cut: String,
    /// Head to train (`compile --head`).
    pub head: String,
    /// What to unfreeze, when fine-tuning: top blocks, or every layer.
    pub unfreeze: Option<Unfreeze>,
    /// Backbone learning rate, when fine-tuning.
    pub backbone_learning_rate: Option<f64>,
    /// One sentence per decision, with the numbers behind it.
    pub reasons: Vec<String>,
}

impl Recommendation {
    /// The `graft compile` flags that follow this advice.
    pub fn flags(&self) -> String {
        let mut flags = format!("--cut {} --head {}", self.cut, self.head);
        if let (Some(unfreeze), Some(lr)) = (&self.unfreeze, self.backbone_learning_rate) {
            flags.push_str(&format!(
                " --strategy finetune --unfreeze {unfreeze} --backbone-lr {lr}"
            ));
        }
        flags
    }

    /// Applies the advice to compile options: cut, head and fine-tuning (the other fine-tuning
    /// settings keep their defaults).
    pub fn apply(&self, options: &mut CompileOptions) -> Result<()> {
        options.cut = Some(self.cut.clone());
        options.train.head = self.head.parse().map_err(CompileError::InvalidOption)?;
        options.finetune = match (&self.unfreeze, self.backbone_learning_rate) {
            (Some(unfreeze), Some(lr)) => {
                let mut config = FinetuneConfig::new(Strategy::Finetune);
                config.unfreeze = unfreeze.clone();
                config.backbone_learning_rate = lr;
                config.seed = options.train.seed;
                config.balance_classes = options.train.balance_classes;
                Some(config)
            }
            _ => None,
        };
        Ok(())
    }
}

/// The cuts `advise` probes: at each spatial resolution at least a quarter of the way into the
/// graph, the last block output (`Add`, else the last cut point) there, then the default cut.
pub fn probe_cuts(points: &[CutPoint], default_cut: &str) -> Vec<CutPoint> {
    let mut chosen: Vec<CutPoint> = Vec::new();
    let spatial = |p: &CutPoint| p.shape.get(2..).map(|hw| hw.to_vec());
    let mut k = 0;
    while k < points.len() {
        let resolution = spatial(&points[k]);
        let mut end = k;
        while end + 1 < points.len() && spatial(&points[end + 1]) == resolution {
            end += 1;
        }
        let stage = &points[k..=end];
        let pick = stage
            .iter()
            .rev()
            .find(|p| p.op == "Add")
            .unwrap_or(&points[end]);
        if resolution
            .as_ref()
            .is_some_and(|hw| hw.len() == 2 && hw[0] * hw[1] > 1)
            && pick.depth >= MIN_PROBE_DEPTH
            && pick.tensor != default_cut
        {
            chosen.push(pick.clone());
        }
        k = end + 1;
    }
    if let Some(default) = points.iter().find(|p| p.tensor == default_cut) {
        chosen.push(default.clone());
    }
    chosen
}

/// Measures and recommends (see the module documentation). `options` are those of the compile
/// to advise: backbone, data, split, preprocessing, cache, threads and seed are taken from them.
pub fn advise(options: &CompileOptions, reporter: &dyn Reporter) -> Result<Advice> {
    let backbone = Backbone::load(&options.backbone, options.input_size)?;
    let data = options.data.as_deref().ok_or_else(|| {
        CompileError::InvalidOption("--data is required to advise on a dataset".into())
    })?;
    let folder = ImageFolder::scan(data)?;
    // The compile's training images (the ones it fits and makes choices on); the images it
    // reports accuracy on are never probed.
    let splits = Splits::of(&folder, options.val_fraction, options.train.seed)?;
    let train_samples = [&splits.fit[..], &splits.select].concat();
    let mut preprocessing = preprocessing_for(&backbone, options)?;
    if options.normalization.is_none() {
        preprocessing.normalization =
            choose_normalization(&backbone, &preprocessing, &train_samples, options, reporter)?;
    }

    let default_cut = backbone.default_cut()?;
    let points = backbone.cut_points()?;
    let probes = probe_cuts(&points, &default_cut);
    let mut tensors: Vec<String> = probes.iter().map(|p| p.tensor.clone()).collect();
    let classifier = classifier_output(&backbone, &points, &default_cut);
    if let Some(output) = &classifier {
        tensors.push(output.tensor.clone());
    }
    reporter.message(&format!(
        "advise    probing {} cuts{} with {}-fold cross-validated logistic regression on {} training images",
        probes.len(),
        if classifier.is_some() {
            " and the backbone's classifier"
        } else {
            ""
        },
        CV_FOLDS,
        train_samples.len()
    ));
    let cuts = MultiCut::new(&backbone, &tensors)?;
    let extractor = FeatureExtractor::for_cuts(&cuts, &backbone, &preprocessing)?;
    let caches = match options.cache_dir.as_deref() {
        Some(root) => cuts
            .cuts()
            .iter()
            .map(|(name, shape)| {
                FeatureCache::for_tensor(root, (&backbone, name, shape[1]), &preprocessing)
            })
            .collect::<Vec<_>>(),
        None => Vec::new(),
    };
    let mut extractions = stage("extract", || {
        extractor.extract_outputs(&train_samples, &caches, options.threads, reporter)
    })?;
    let classes = folder.classes.len();
    let similarity = classifier.map(|_| {
        let logits = extractions.pop().expect("one extraction per output");
        similarity(&logits.features)
    });
    let mut scored = Vec::new();
    reporter.start("cross-validating probes", probes.len());
    for (point, extraction) in probes.into_iter().zip(&extractions) {
        if reporter.cancelled() {
            return Err(CompileError::Interrupted);
        }
        let cv = stage("probe", || {
            cross_validate(
                HeadKind::LogReg,
                &extraction.features,
                classes,
                CV_FOLDS,
                options.train.seed,
            )
        })?;
        tracing::info!(cut = %point.tensor, accuracy = cv.accuracy, lambda = cv.lambda, "probed");
        reporter.message(&format!(
            "probe     {:<42} {:>5} features: accuracy {:.4} ± {:.4}",
            point.tensor,
            point.shape[1],
            cv.accuracy,
            cv.standard_error()
        ));
        scored.push(CutProbe {
            default: point.tensor == default_cut,
            tensor: point.tensor,
            shape: point.shape,
            depth: point.depth,
            cv,
        });
        reporter.advance();
    }
    reporter.finish();
    let train_per_class = graft_runtime::dataset::counts(&train_samples, classes);
    let recommendation = recommend(&scored, similarity.as_ref(), &train_per_class);
    Ok(Advice {
        classes: folder.classes.clone(),
        train_per_class,
        normalization: preprocessing.normalization.name.clone(),
        probes: scored,
        similarity,
        recommendation,
    })
}

/// Why `--strategy auto` refuses `--cut` and `--unfreeze-from`.
pub const AUTO_CHOOSES_CUT: &str =
    "--strategy auto chooses the cut and the blocks to retrain: leave out --cut and --unfreeze-from";

/// `--strategy auto`, for library callers as for `graft compile`: advises on the options' data
/// (their preprocessing, split and seed), reports each reason, and applies the advice (cut,
/// head, fine-tuning) to the options, which [`compile`](crate::compile) then follows.
pub fn follow_advice(options: &mut CompileOptions, reporter: &dyn Reporter) -> Result<Advice> {
    let unfreeze_from = options
        .finetune
        .as_ref()
        .is_some_and(|f| matches!(f.unfreeze, Unfreeze::From(_)));
    if options.cut.is_some() || unfreeze_from {
        return Err(CompileError::InvalidOption(AUTO_CHOOSES_CUT.into()));
    }
    let advice = advise(options, reporter)?;
    for reason in &advice.recommendation.reasons {
        reporter.message(&format!("advice    {reason}"));
    }
    reporter.message(&format!(
        "advice    compiling with {}",
        advice.recommendation.flags()
    ));
    advice.recommendation.apply(options)?;
    Ok(advice)
}

/// The backbone's classifier output, when it has exactly one `[1, N]` (N >= 2) output beyond
/// the default cut.
fn classifier_output(
    backbone: &Backbone,
    points: &[CutPoint],
    default_cut: &str,
) -> Option<CutPoint> {
    let outputs = backbone.output_names();
    let [output] = &outputs[..] else {
        return None;
    };
    points
        .iter()
        .find(|p| &p.tensor == output && p.tensor != default_cut)
        .filter(|p| p.shape.len() == 2 && p.shape[1] >= 2)
        .cloned()
}

/// Mean top-1 probability and normalised entropy of softmax over each row of `logits`.
fn similarity(logits: &Features) -> Similarity {
    let (mut top1, mut entropy) = (0f64, 0f64);
    let classes = logits.dim;
    for i in 0..logits.rows() {
        let row = logits.row(i);
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exp: Vec<f64> = row.iter().map(|&l| ((l - max) as f64).exp()).collect();
        let sum: f64 = exp.iter().sum();
        top1 += 1.0 / sum;
        entropy -= exp
            .iter()
            .map(|e| e / sum)
            .filter(|&p| p > 0.0)
            .map(|p| p * p.ln())
            .sum::<f64>();
    }
    let n = logits.rows().max(1) as f64;
    Similarity {
        classes,
        mean_top1_probability: (top1 / n) as f32,
        mean_normalized_entropy: (entropy / n / (classes.max(2) as f64).ln()) as f32,
    }
}

/// The decision rules, from the measurements (see the module documentation and
/// docs/RESULTS.md for the data they were checked on).
pub fn recommend(
    probes: &[CutProbe],
    similarity: Option<&Similarity>,
    train_per_class: &[usize],
) -> Recommendation {
    let mut reasons = Vec::new();
    let best = probes.iter().fold(&probes[0], |b, p| {
        if p.cv.accuracy > b.cv.accuracy {
            p
        } else {
            b
        }
    });
    let default = probes.iter().find(|p| p.default).unwrap_or(best);
    let noise = best.cv.standard_error();
    let cut = if best.tensor == default.tensor {
        reasons.push(format!(
            "cut at the default {}: its features probe best ({:.4}; the next-best cut {})",
            default.tensor,
            default.cv.accuracy,
            probes
                .iter()
                .filter(|p| p.tensor != default.tensor)
                .max_by(|a, b| a.cv.accuracy.total_cmp(&b.cv.accuracy))
                .map_or("-".into(), |p| format!("{} {:.4}", p.tensor, p.cv.accuracy))
        ));
        default
    } else if default.cv.accuracy >= best.cv.accuracy - noise {
        reasons.push(format!(
            "cut at the default {}: it probes {:.4}, within the noise ({:.4} standard error) of the best, {} at {:.4}",
            default.tensor, default.cv.accuracy, noise, best.tensor, best.cv.accuracy
        ));
        default
    } else {
        reasons.push(format!(
            "cut earlier, at {}: its features probe {:.4} vs {:.4} at the default {} (more than the {:.4} standard error): the upper layers are too specific to the pretraining task for this data",
            best.tensor, best.cv.accuracy, default.cv.accuracy, default.tensor, noise
        ));
        best
    };
    let fewest = train_per_class.iter().copied().min().unwrap_or(0);
    let similar = similarity.map(|s| s.mean_top1_probability >= SIMILAR_TOP1);
    let describe = |s: &Similarity| {
        format!(
            "the backbone's own {}-class classifier gives these images a mean top-1 probability of {:.2}",
            s.classes, s.mean_top1_probability
        )
    };
    let finetune = match (similar, similarity) {
        (Some(true), Some(s)) => {
            reasons.push(format!(
                "keep the backbone frozen: {} (>= {SIMILAR_TOP1}), so the data looks like the pretraining data and its features already fit",
                describe(s)
            ));
            None
        }
        _ if fewest < MIN_FINETUNE_PER_CLASS => {
            reasons.push(format!(
                "keep the backbone frozen: the smallest class has {fewest} training images (< {MIN_FINETUNE_PER_CLASS}), too few to retrain blocks without overfitting"
            ));
            None
        }
        (_, similarity) => {
            let (unfreeze, what) = if fewest >= ALL_FINETUNE_PER_CLASS {
                (Unfreeze::All, "every layer")
            } else {
                (Unfreeze::Blocks(2), "the top 2 blocks")
            };
            reasons.push(format!(
                "fine-tune {what} at learning rate 1e-4: {}, and every class has at least {fewest} training images ({} for every layer)",
                similarity.map_or("the backbone has no classifier to compare the data with".into(), |s| format!(
                    "{} (< {SIMILAR_TOP1}), so the data differs from the pretraining data", describe(s)
                )),
                if unfreeze == Unfreeze::All { format!(">= {ALL_FINETUNE_PER_CLASS}") } else { format!("< {ALL_FINETUNE_PER_CLASS}") }
            ));
            Some(unfreeze)
        }
    };
    let head = if finetune.is_some() {
        reasons
            .push("head linear: fine-tuning starts from it and trains it with the blocks".into());
        HeadKind::Linear
    } else {
        reasons.push(format!(
            "head logreg: the classifier the probes measured, L2 strength by cross-validation ({:.0e} at this cut)",
            cut.cv.lambda
        ));
        HeadKind::LogReg
    };
    Recommendation {
        strategy: if finetune.is_some() {
            "finetune"
        } else {
            "head"
        }
        .into(),
        cut: cut.tensor.clone(),
        head: head.to_string(),
        backbone_learning_rate: finetune
            .as_ref()
            .map(|_| FinetuneConfig::new(Strategy::Finetune).backbone_learning_rate),
        unfreeze: finetune,
        reasons,
    }
}

impl Advice {
    /// The measurements and the recommendation as a text report.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let (fewest, most) = (
            self.train_per_class.iter().min().copied().unwrap_or(0),
            self.train_per_class.iter().max().copied().unwrap_or(0),
        );
        out.push_str(&format!(
            "data        {} classes, {} training images ({} to {} per class; validation images are not looked at)\n",
            self.classes.len(),
            self.train_per_class.iter().sum::<usize>(),
            fewest,
            most
        ));
        match &self.similarity {
            Some(s) => out.push_str(&format!(
                "similarity  the backbone's {}-class classifier: mean top-1 probability {:.2}, normalized entropy {:.2} (from {SIMILAR_TOP1}: similar to its training data)\n",
                s.classes, s.mean_top1_probability, s.mean_normalized_entropy
            )),
            None => out.push_str("similarity  not measured: the backbone has no classifier output\n"),
        }
        let width = self
            .probes
            .iter()
            .map(|p| p.tensor.len())
            .max()
            .unwrap_or(3);
        out.push_str(&format!(
            "\n{:>5}  {:<width$}  {:>8}  {:<18} {}\n",
            "depth",
            "cut",
            "features",
            "probe accuracy",
            "(logistic regression, stratified 5-fold)"
        ));
        for p in &self.probes {
            let bar = "#".repeat((p.cv.accuracy * 40.0).round() as usize);
            let marker = if p.tensor == self.recommendation.cut {
                " <- advised"
            } else {
                ""
            };
            out.push_str(&format!(
                "{:>4.0}%  {:<width$}  {:>8}  {:.4} ± {:.4}    {bar}{marker}\n",
                p.depth * 100.0,
                p.tensor,
                p.shape[1],
                p.cv.accuracy,
                p.cv.standard_error()
            ));
        }
        out.push_str(&format!(
            "\nadvice      {}: graft compile ... {}\n",
            self.recommendation.strategy,
            self.recommendation.flags()
        ));
        for reason in &self.recommendation.reasons {
            out.push_str(&format!("  - {reason}\n"));
        }
        out.push_str("graft compile --strategy auto follows this advice.\n");
        out
    }

    /// A self-contained SVG plot of probe accuracy (with one standard error) against cut depth,
    /// the advised cut in red.
    pub fn plot_svg(&self) -> String {
        let lowest = self
            .probes
            .iter()
            .map(|p| p.cv.accuracy - p.cv.standard_error())
            .fold(1.0f32, f32::min);
        LineChart {
            title: "Linear probe accuracy vs cut depth (stratified 5-fold CV)".into(),
            x_label: "cut depth (share of the backbone's nodes)".into(),
            y_label: "accuracy".into(),
            x_range: (0.0, 1.0),
            y_range: accuracy_range(lowest as f64),
            x_ticks: (0..=4)
                .map(|q| (q as f64 / 4.0, format!("{}%", q * 25)))
                .collect(),
            series: vec![Series {
                name: "logistic regression".into(),
                color: "#1f77b4",
                points: self
                    .probes
                    .iter()
                    .map(|p| (p.depth as f64, p.cv.accuracy as f64))
                    .collect(),
                errors: Some(
                    self.probes
                        .iter()
                        .map(|p| p.cv.standard_error() as f64)
                        .collect(),
                ),
                highlight: self
                    .probes
                    .iter()
                    .position(|p| p.tensor == self.recommendation.cut),
                tooltips: self
                    .probes
                    .iter()
                    .map(|p| {
                        format!(
                            "{} ({} features): {:.4} ± {:.4}",
                            p.tensor,
                            p.shape[1],
                            p.cv.accuracy,
                            p.cv.standard_error()
                        )
                    })
                    .collect(),
            }],
        }
        .to_svg()
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn point(tensor: &str, op: &str, shape: &[usize], depth: f32) -> CutPoint {
        CutPoint {
            tensor: tensor.into(),
            op: op.into(),
            shape: shape.to_vec(),
            depth,
        }
    }

    fn probe(tensor: &str, accuracy: f32, folds: &[f32], default: bool) -> CutProbe {
        CutProbe {
            tensor: tensor.into(),
            shape: vec![1, 8, 7, 7],
            depth: 0.5,
            default,
            cv: CvScore {
                lambda: 0.1,
                accuracy,
                fold_accuracies: folds.to_vec(),
            },
        }
    }

    fn similar(top1: f32) -> Similarity {
        Similarity {
            classes: 1000,
            mean_top1_probability: top1,
            mean_normalized_entropy: 0.5,
        }
    }

    #[test]
    fn one_cut_per_resolution_stage_past_the_shallow_ones_then_the_default() {
        let points = [
            point("a", "Add", &[1, 16, 56, 56], 0.1),
            point("b", "Add", &[1, 24, 28, 28], 0.3),
            point("c", "Clip", &[1, 96, 28, 28], 0.35),
            point("d", "Add", &[1, 40, 14, 14], 0.5),
            point("e", "Add", &[1, 40, 14, 14], 0.6),
            point("f", "Clip", &[1, 240, 14, 14], 0.65),
            point("g", "Conv", &[1, 320, 7, 7], 0.8),
            point("h", "Clip", &[1, 1280, 7, 7], 0.9),
            point("pooled", "GlobalAveragePool", &[1, 1280, 1, 1], 0.95),
            point("features", "Flatten", &[1, 1280], 0.97),
            point("logits", "Gemm", &[1, 1000], 1.0),
        ];
        let chosen: Vec<String> = probe_cuts(&points, "features")
            .into_iter()
            .map(|p| p.tensor)
            .collect();
        assert_eq!(chosen, ["b", "e", "h", "features"]);
    }

    #[test]
    fn similar_data_gets_a_frozen_backbone_at_the_default_cut() {
        let probes = [
            probe("early", 0.80, &[0.8, 0.8], false),
            probe("features", 0.95, &[0.9, 1.0], true),
        ];
        let advice = recommend(&probes, Some(&similar(0.7)), &[120, 124]);
        assert_eq!(
            (
                advice.strategy.as_str(),
                advice.cut.as_str(),
                advice.head.as_str()
            ),
            ("head", "features", "logreg")
        );
        assert_eq!(advice.flags(), "--cut features --head logreg");
    }

    #[test]
    fn unfamiliar_data_with_enough_images_is_fine_tuned_deeper_with_more_data() {
        let probes = [probe("features", 0.75, &[0.7, 0.8], true)];
        let advice = recommend(&probes, Some(&similar(0.2)), &[149, 500]);
        assert_eq!(advice.unfreeze, Some(Unfreeze::Blocks(2)));
        assert_eq!(
            advice.flags(),
            "--cut features --head linear --strategy finetune --unfreeze 2 --backbone-lr 0.0001"
        );
        let advice = recommend(&probes, Some(&similar(0.2)), &[200, 200]);
        assert_eq!(advice.unfreeze, Some(Unfreeze::All));
        assert_eq!(
            advice.flags(),
            "--cut features --head linear --strategy finetune --unfreeze all --backbone-lr 0.0001"
        );
        assert!(advice.reasons.iter().any(|r| r.starts_with(
            "fine-tune every layer at learning rate 1e-4: the backbone's own 1000-class classifier"
        )));
        let json = serde_json::to_value(&advice).unwrap();
        assert_eq!(json["unfreeze"], "all");
        let two = recommend(&probes, Some(&similar(0.2)), &[60, 60]);
        assert_eq!(serde_json::to_value(&two).unwrap()["unfreeze"], 2);
        let advice = recommend(&probes, None, &[200, 200]);
        assert_eq!(advice.strategy, "finetune");
    }

    #[test]
    fn too_few_images_keep_the_backbone_frozen_even_when_unfamiliar() {
        let probes = [probe("features", 0.75, &[0.7, 0.8], true)];
        let advice = recommend(&probes, Some(&similar(0.2)), &[49, 500]);
        assert_eq!(advice.strategy, "head");
        assert!(advice
            .reasons
            .iter()
            .any(|r| r.contains("49 training images")));
    }

    #[test]
    fn an_earlier_cut_is_advised_only_when_it_wins_beyond_the_noise() {
        // Best 0.80, standard error 0.01: the default at 0.795 is within it.
        let close = [
            probe("early", 0.80, &[0.79, 0.81], false),
            probe("features", 0.795, &[0.79, 0.80], true),
        ];
        assert_eq!(recommend(&close, None, &[10, 10]).cut, "features");
        let clear = [
            probe("early", 0.80, &[0.79, 0.81], false),
            probe("features", 0.70, &[0.69, 0.71], true),
        ];
        let advice = recommend(&clear, None, &[10, 10]);
        assert_eq!(advice.cut, "early");
        assert!(advice.reasons[0].starts_with("cut earlier, at early"));
    }

    #[test]
    fn similarity_of_certain_and_uniform_predictions() {
        let logits = Features {
            data: vec![100.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0],
            dim: 4,
            labels: vec![0, 0],
            paths: vec![PathBuf::new(), PathBuf::new()],
        };
        let s = similarity(&logits);
        assert_eq!(s.classes, 4);
        assert!((s.mean_top1_probability - (1.0 + 0.25) / 2.0).abs() < 1e-4);
        assert!((s.mean_normalized_entropy - 0.5).abs() < 1e-4);
    }

    #[test]
    fn recommendation_applies_to_compile_options() {
        let probes = [probe("features", 0.75, &[0.7, 0.8], true)];
        let mut options = CompileOptions::new("b.onnx", "o.graft");
        recommend(&probes, Some(&similar(0.2)), &[200, 200])
            .apply(&mut options)
            .unwrap();
        assert_eq!(options.cut.as_deref(), Some("features"));
        let finetune = options.finetune.as_ref().expect("fine-tuning advised");
        assert_eq!(finetune.unfreeze, Unfreeze::All);
        recommend(&probes, Some(&similar(0.9)), &[200, 200])
            .apply(&mut options)
            .unwrap();
        assert!(options.finetune.is_none());
        assert_eq!(options.train.head, HeadKind::LogReg);
    }

    #[test]
    fn the_plot_has_one_marker_per_probe_and_marks_the_advised_cut() {
        let probes = vec![
            probe("early", 0.6, &[0.5, 0.7], false),
            probe("features", 0.9, &[0.85, 0.95], true),
        ];
        let recommendation = recommend(&probes, Some(&similar(0.9)), &[100, 100]);
        let advice = Advice {
            classes: vec!["a".into(), "b".into()],
            train_per_class: vec![100, 100],
            normalization: "tf".into(),
            probes,
            similarity: Some(similar(0.9)),
            recommendation,
        };
        let svg = advice.plot_svg();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<circle").count(), 2);
        assert_eq!(svg.matches("#d62728").count(), 1);
        assert!(
            svg.contains(">1</text>") && svg.contains(">0.5</text>"),
            "{svg}"
        );
        let text = advice.to_text();
        assert!(text.contains("<- advised"), "{text}");
    }
}
