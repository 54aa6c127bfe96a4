//! The runtime's command-line commands (`predict`, `eval`, `inspect`), shared by `graft-run` and
//! `graft` so both print the same thing.
//!
//! Each command writes its result to `out` (text, or JSON with `--json`) and reports per-image
//! problems to stderr. It returns [`Outcome::Partial`] when some inputs were skipped, which the
//! binaries turn into exit code 1.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::artifact::{self, Manifest};
use crate::dataset::{has_image_extension, ImageFolder, Sample};
use crate::error::{Error, Result};
use crate::eval::{evaluate, ClassStats, Evaluation};
use crate::model::{LabelScore, Model};
use crate::parallel::{default_threads, par_map};
use crate::progress::count;
pub use crate::progress::{NoProgress, Progress};

/// How a command ended when it did not fail outright.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Everything was processed.
    Complete,
    /// Some inputs were skipped (reported on stderr).
    Partial,
}

/// Arguments of `predict`.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct PredictArgs {
    /// Artifact written by `graft compile`.
    pub model: PathBuf,
    /// Image files, or folders whose images (searched recursively) are all classified.
    #[cfg_attr(feature = "cli", arg(required = true))]
    pub images: Vec<PathBuf>,
    /// Number of labels to show per image.
    #[cfg_attr(feature = "cli", arg(short = 'k', long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..)))]
    pub top_k: u16,
    /// Print one JSON document instead of text.
    #[cfg_attr(feature = "cli", arg(long, conflicts_with = "jsonl"))]
    pub json: bool,
    /// Print one JSON object per line and image as each batch is classified
    /// (`{"path", "top_k"}`, or `{"path", "error"}` for an image that could not be), for large
    /// folders and pipes.
    #[cfg_attr(feature = "cli", arg(long))]
    pub jsonl: bool,
    /// Worker threads (default: all cores).
    #[cfg_attr(feature = "cli", arg(long))]
    pub threads: Option<usize>,
    /// Images decoded and classified together; text results are printed batch by batch, so
    /// memory stays bounded on large folders. The images of a batch run on the worker threads
    /// through the same batch-1 graph (in tract a batch-8 graph is slower per image).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..)))]
    pub batch: u32,
}

/// Arguments of `eval`.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct EvalArgs {
    /// Artifact written by `graft compile`.
    pub model: PathBuf,
    /// Labelled images: `DIR/<class>/*` (all are used) or `DIR/{train,val}/<class>/*` (the
    /// validation split is used). Class folder names must be labels of the model.
    pub data: PathBuf,
    /// Print one JSON document instead of text.
    #[cfg_attr(feature = "cli", arg(long))]
    pub json: bool,
    /// Worker threads (default: all cores).
    #[cfg_attr(feature = "cli", arg(long))]
    pub threads: Option<usize>,
}

/// Arguments of `inspect`.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct InspectArgs {
    /// Artifact to describe.
    pub model: PathBuf,
    /// Print the manifest as JSON.
    #[cfg_attr(feature = "cli", arg(long))]
    pub json: bool,
}

/// Writes `value` to `out` as pretty JSON and a newline. Serialized first, so a write error
/// (a closed pipe) keeps its kind.
pub(crate) fn write_json(out: &mut dyn Write, value: &impl Serialize) -> Result<()> {
    let io = |e| Error::io("<stdout>", e);
    let json = serde_json::to_string_pretty(value).map_err(|e| io(std::io::Error::other(e)))?;
    writeln!(out, "{json}").map_err(io)
}

#[derive(Serialize)]
struct ImagePrediction<'a> {
    #[serde(serialize_with = "crate::paths::serialize")]
    path: &'a Path,
    top_k: Vec<LabelScore>,
}

#[derive(Serialize)]
struct Failure<'a> {
    #[serde(serialize_with = "crate::paths::serialize")]
    path: &'a Path,
    error: String,
}

/// `predict`: top-k labels for each image, computed [`PredictArgs::batch`] images at a time.
/// The throughput (images per second, loading excluded) goes to stderr at the end.
pub fn predict(
    args: &PredictArgs,
    out: &mut dyn Write,
    progress: &dyn Progress,
) -> Result<Outcome> {
    let model = Model::load(&args.model)?;
    let images = expand_images(&args.images)?;
    let threads = args.threads.unwrap_or_else(default_threads).max(1);
    let labels = model.labels();
    let started = std::time::Instant::now();
    progress.start("classifying", images.len());
    let mut predictions = Vec::new();
    let mut failures = Vec::new();
    let mut cancelled = false;
    let mut classified = 0;
    for batch in images.chunks(args.batch as usize) {
        let results = par_map(
            batch,
            threads,
            |path| model.classify_path(path),
            || progress.advance(),
        );
        let first_failure = failures.len();
        for (path, result) in batch.iter().zip(results) {
            match result {
                Ok(c) => {
                    classified += 1;
                    predictions.push(ImagePrediction {
                        path,
                        top_k: c.top_k(args.top_k as usize, labels),
                    })
                }
                Err(e) => {
                    crate::progress::note(format_args!("warning: skipped {e}"));
                    failures.push(Failure {
                        path,
                        error: e.to_string(),
                    });
                }
            }
        }
        if !args.json {
            // Text and JSON lines stream: this batch's lines now; JSON keeps every prediction
            // for one document.
            write_batch(args.jsonl, &predictions, &failures[first_failure..], out)?;
            predictions.clear();
        }
        if progress.cancelled() {
            cancelled = true;
            break;
        }
    }
    progress.finish();
    let seconds = started.elapsed().as_secs_f64();
    if args.json {
        let doc = serde_json::json!({ "model": crate::paths::lossy(&args.model), "predictions": predictions, "failures": failures });
        write_json(out, &doc)?;
    } else if !failures.is_empty() {
        crate::progress::note(format_args!(
            "{} of {} could not be classified",
            failures.len(),
            count(images.len(), "image")
        ));
    }
    crate::progress::note(format_args!(
        "{}",
        throughput_line(classified, seconds, threads.min(images.len()), args.batch)
    ));
    Ok(if failures.is_empty() && !cancelled {
        Outcome::Complete
    } else {
        Outcome::Partial
    })
}

/// Writes one batch's results: a text line per prediction, or with `jsonl` a JSON object per
/// line for each prediction and each failure.
fn write_batch(
    jsonl: bool,
    predictions: &[ImagePrediction],
    failures: &[Failure],
    out: &mut dyn Write,
) -> Result<()> {
    let io = |e| Error::io("<stdout>", e);
    for p in predictions {
        if jsonl {
            let line = serde_json::to_string(p).map_err(|e| io(std::io::Error::other(e)))?;
            writeln!(out, "{line}").map_err(io)?;
            continue;
        }
        let scores: Vec<String> = p
            .top_k
            .iter()
            .map(|s| format!("{} {:.3}", s.label, s.probability))
            .collect();
        writeln!(out, "{}: {}", p.path.display(), scores.join(", ")).map_err(io)?;
    }
    if jsonl {
        for f in failures {
            let line = serde_json::to_string(f).map_err(|e| io(std::io::Error::other(e)))?;
            writeln!(out, "{line}").map_err(io)?;
        }
    }
    out.flush().map_err(io)
}

/// `classified 72 images in 2.104 s: 34.3 images/s (2 threads, batches of 32)`.
fn throughput_line(images: usize, seconds: f64, threads: usize, batch: u32) -> String {
    format!(
        "classified {} in {seconds:.3} s: {:.1} images/s ({}, batches of {batch})",
        count(images, "image"),
        images as f64 / seconds.max(1e-9),
        count(threads, "thread"),
    )
}

/// Files named on the command line, with folders expanded to the images below them (sorted).
fn expand_images(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for path in paths {
        if path.is_dir() {
            let before = out.len();
            collect_dir(path, &mut out, 0)?;
            if out.len() == before {
                return Err(Error::dataset(path, "folder contains no images"));
            }
        } else {
            out.push(path.clone());
        }
    }
    Ok(out)
}

fn collect_dir(dir: &Path, out: &mut Vec<PathBuf>, depth: usize) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok())
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if is_dir && depth < 8 {
            collect_dir(&path, out, depth + 1)?;
        } else if !is_dir && has_image_extension(&path) {
            out.push(path);
        }
    }
    Ok(())
}

/// Maps the folder's class names onto the model's labels.
fn samples_for_model(folder: &ImageFolder, labels: &[String]) -> Result<Vec<Sample>> {
    let mapping = folder
        .classes
        .iter()
        .map(|c| {
            labels.iter().position(|l| l == c).ok_or_else(|| {
                Error::dataset(
                    folder.root.join(c),
                    format!(
                        "class folder {c:?} is not a label of the model (labels: {})",
                        labels.join(", ")
                    ),
                )
            })
        })
        .collect::<Result<Vec<usize>>>()?;
    Ok(folder
        .evaluation_samples()
        .iter()
        .map(|s| Sample {
            path: s.path.clone(),
            label: mapping[s.label],
        })
        .collect())
}

/// Evaluates `model` on the labelled images in `data` (see [`EvalArgs::data`]).
pub fn evaluate_folder(
    model: &Model,
    data: &Path,
    threads: usize,
    progress: &dyn Progress,
) -> Result<Evaluation> {
    let folder = ImageFolder::scan(data)?;
    let samples = samples_for_model(&folder, model.labels())?;
    Ok(evaluate(model, &samples, threads, progress))
}

#[derive(Serialize)]
struct EvalReport<'a> {
    #[serde(serialize_with = "crate::paths::serialize")]
    model: &'a Path,
    #[serde(serialize_with = "crate::paths::serialize")]
    data: &'a Path,
    images: u64,
    accuracy: f32,
    per_class: Vec<ClassStats>,
    confusion: &'a [Vec<u64>],
    failures: Vec<Failure<'a>>,
}

/// `eval`: accuracy, per-class precision/recall and the confusion matrix on labelled images.
pub fn eval(args: &EvalArgs, out: &mut dyn Write, progress: &dyn Progress) -> Result<Outcome> {
    eval_returning(args, out, progress).map(|(outcome, _)| outcome)
}

/// [`eval`], also returning the evaluation (for reports).
pub fn eval_returning(
    args: &EvalArgs,
    out: &mut dyn Write,
    progress: &dyn Progress,
) -> Result<(Outcome, Evaluation)> {
    let model = Model::load(&args.model)?;
    let evaluation = evaluate_folder(
        &model,
        &args.data,
        args.threads.unwrap_or_else(default_threads),
        progress,
    )?;
    for (path, error) in &evaluation.failures {
        crate::progress::note(format_args!("warning: skipped {}: {error}", path.display()));
    }
    let io = |e| Error::io("<stdout>", e);
    let labels = &evaluation.labels;
    if args.json {
        let report = EvalReport {
            model: &args.model,
            data: &args.data,
            images: evaluation.confusion.total(),
            accuracy: evaluation.accuracy(),
            per_class: evaluation.confusion.per_class(labels),
            confusion: &evaluation.confusion.counts,
            failures: evaluation
                .failures
                .iter()
                .map(|(path, error)| Failure {
                    path,
                    error: error.clone(),
                })
                .collect(),
        };
        write_json(out, &report)?;
    } else {
        writeln!(
            out,
            "accuracy {:.4} on {} ({})",
            evaluation.accuracy(),
            count(evaluation.confusion.total(), "image"),
            args.data.display()
        )
        .map_err(io)?;
        write!(out, "{}", evaluation.confusion.display(labels)).map_err(io)?;
        if !evaluation.failures.is_empty() {
            let skipped = count(evaluation.failures.len(), "image");
            writeln!(out, "{skipped} skipped").map_err(io)?;
        }
    }
    let outcome = if evaluation.failures.is_empty() {
        Outcome::Complete
    } else {
        Outcome::Partial
    };
    Ok((outcome, evaluation))
}

/// `inspect`: what is inside an artifact.
pub fn inspect(args: &InspectArgs, out: &mut dyn Write) -> Result<Outcome> {
    let artifact = crate::artifact::Artifact::open(&args.model)?;
    let io = |e| Error::io("<stdout>", e);
    if args.json {
        let doc = serde_json::json!({
            "path": crate::paths::lossy(&artifact.path),
            "size_bytes": artifact.size,
            "format_version": crate::artifact::FORMAT_VERSION,
            "checksum_sha256": artifact.checksum,
            "graph_bytes": artifact.graph_bytes().len(),
            "manifest": artifact.manifest,
        });
        write_json(out, &doc)?;
    } else {
        write!(
            out,
            "{}",
            describe(
                &artifact.manifest,
                &artifact.path,
                artifact.size,
                &artifact.checksum
            )
        )
        .map_err(io)?;
    }
    Ok(Outcome::Complete)
}

fn describe_precision(m: &Manifest) -> String {
    let Some(q) = &m.quantization else {
        return m.precision.clone();
    };
    let int8 = q.layers.iter().filter(|l| l.precision == "int8").count();
    let mut kinds: Vec<String> = Vec::new();
    for kind in ["conv", "pointwise", "depthwise"] {
        let of_kind: Vec<_> = q.layers.iter().filter(|l| l.kind == kind).collect();
        if !of_kind.is_empty() {
            let n = of_kind.iter().filter(|l| l.precision == "int8").count();
            kinds.push(format!("{kind} {n}/{}", of_kind.len()));
        }
    }
    let accuracy = match (q.f32_val_accuracy, q.val_accuracy) {
        (Some(f), Some(i)) => format!(
            "; validation accuracy {i:.4} vs {f:.4} in f32 ({:+.2} points)",
            (i - f) * 100.0
        ),
        _ => String::new(),
    };
    let trials = describe_trials(q);
    let budget_fallbacks: Vec<&str> = q
        .layers
        .iter()
        .filter(|l| l.reason.as_deref() == Some(artifact::KEPT_F32_FOR_BUDGET))
        .map(|l| l.layer.as_str())
        .collect();
    // Artifacts with a probe budget top-1 changes in percent; older ones accuracy in points.
    let unit = if q.probe.is_some() { " %" } else { "-point" };
    let budget = match q.accuracy_budget {
        Some(b) if budget_fallbacks.is_empty() => {
            format!(
                "; within the {:.2}{unit} budget with no fallback",
                b * 100.0
            )
        }
        Some(b) => format!(
            "; kept f32 for the {:.2}{unit} budget: {}",
            b * 100.0,
            budget_fallbacks.join(", ")
        ),
        None => String::new(),
    };
    let slower = q
        .layers
        .iter()
        .filter(|l| l.reason.as_deref() == Some(artifact::KEPT_F32_SLOWER_IN_INT8))
        .count();
    let timed = if q.layers.iter().any(|l| l.timed_ms.is_some()) {
        format!("; {slower} layers kept f32 as slower in int8 when timed on the compiling machine")
    } else {
        String::new()
    };
    let speed = q.speed.as_ref().map_or(String::new(), |s| {
        format!(
            "; int8 {:.2} ms vs f32 {:.2} ms per image when compiled ({:.2}x, {} kernels, {})",
            s.int8_ms, s.f32_ms, s.ratio, s.kernels, s.cpu
        )
    });
    let coverage = q.int8_mac_fraction().map_or(String::new(), |f| {
        format!(
            ", {:.1} % of the {:.1} M multiply-adds of its convolutions and products",
            f * 100.0,
            q.product_macs.unwrap_or(0) as f64 / 1e6
        )
    });
    format!(
        "{}: {int8} of {} layers int8 ({}){coverage}, {} on {}{trials}{budget}{timed}{accuracy}{speed}",
        m.precision,
        q.layers.len(),
        kinds.join(", "),
        q.method,
        count(q.calibration_images, "image")
    )
}

/// The calibration methods the compiler simulated: top-1 agreement with f32 on its probe images,
/// or (artifacts from before the probe was recorded) simulated validation accuracy.
fn describe_trials(q: &crate::artifact::QuantizationInfo) -> String {
    if q.calibration_trials.is_empty() {
        return String::new();
    }
    let tried: Vec<String> = q
        .calibration_trials
        .iter()
        .map(|t| {
            let value = t.agreement.or(t.simulated_accuracy).unwrap_or(f32::NAN);
            format!("{} {value:.4}", t.method)
        })
        .collect();
    match (&q.probe, q.agreement) {
        (Some(probe), Some(agreement)) => format!(
            "; simulated on {probe}, top-1 agreement with f32 {} (chosen: {agreement:.4})",
            tried.join(", ")
        ),
        _ => format!("; simulated validation accuracy {}", tried.join(", ")),
    }
}

fn describe(m: &Manifest, path: &Path, size: u64, checksum: &str) -> String {
    let p = &m.preprocessing;
    let n = &p.normalization;
    let mut lines = vec![
        (
            "artifact",
            format!(
                "{} ({:.1} MiB, format v{}, sha256 {})",
                path.display(),
                size as f64 / (1 << 20) as f64,
                crate::artifact::FORMAT_VERSION,
                &checksum[..16.min(checksum.len())]
            ),
        ),
        ("producer", m.producer.clone()),
        ("precision", describe_precision(m)),
        (
            "weights",
            match m.weights {
                crate::weights::WeightStorage::F32 => "stored f32".to_string(),
                w => format!("stored {} (widened to f32 when loaded)", w.name()),
            },
        ),
        (
            "labels",
            format!("{} classes: {}", m.labels.len(), abbreviate(&m.labels, 12)),
        ),
        (
            "input",
            format!("{} f32 {:?} (NCHW)", m.input.name, m.input.shape),
        ),
        (
            "preprocess",
            format!(
                "shorter side -> {} ({}), centre crop {}x{}, {}, normalize {} (mean {:?}, std {:?}, pixel units); pipeline {}",
                p.resize_shorter, p.filter, p.crop[0], p.crop[1], p.channel_order, n.name, n.mean, n.std, p.pipeline
            ),
        ),
        (
            "backbone",
            format!(
                "{} (sha256 {}), cut at {:?} -> features {:?}",
                m.backbone.file_name,
                &m.backbone.sha256[..16.min(m.backbone.sha256.len())],
                m.backbone.cut,
                m.backbone.feature_shape
            ),
        ),
        (
            "head",
            format!(
                "{} ({})",
                m.head.kind,
                m.head
                    .layers
                    .iter()
                    .map(|[i, o]| format!("{i}->{o}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
    ];
    lines.extend(describe_training(m));
    if let Some(x) = &m.metrics {
        lines.push(("metrics", describe_metrics(x)));
    }
    if !m.versions.is_empty() {
        lines.push((
            "versions",
            m.versions
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", "),
        ));
    }
    lines
        .into_iter()
        .map(|(k, v)| format!("{k:<11} {v}\n"))
        .collect()
}

/// The `training` and `transfer` lines of [`describe`], when the artifact records them.
fn describe_training(m: &Manifest) -> Vec<(&'static str, String)> {
    let mut lines = Vec::new();
    if let Some(t) = &m.training {
        lines.push((
            "training",
            format!(
                "{} lr {} weight decay {} batch {} seed {}; {} epochs run, kept epoch {}",
                t.optimizer,
                t.learning_rate,
                t.weight_decay,
                t.batch_size,
                t.seed,
                t.epochs_run,
                t.best_epoch
            ),
        ));
        if let Some(x) = &t.transfer {
            lines.push((
                "transfer",
                format!(
                    "{} from {:?}: {} blocks ({} weights), {} backbone lr {} head lr {}, {} schedule{}; {} epochs run, kept epoch {}, {:.1} images/s",
                    x.strategy,
                    x.boundary,
                    x.unfrozen_blocks.len(),
                    x.trainable_weights,
                    x.optimizer,
                    x.backbone_learning_rate,
                    x.head_learning_rate,
                    x.schedule,
                    if x.augmented { ", augmented" } else { "" },
                    x.epochs_run,
                    x.best_epoch,
                    x.train_images_per_second
                ),
            ));
        }
    }
    lines
}

/// The `metrics` line of [`describe`]: which images each accuracy comes from.
fn describe_metrics(x: &crate::artifact::Metrics) -> String {
    let choices = match (x.selection_source.as_deref(), x.selection_images) {
        (Some("val"), _) => ", used for choices".to_string(),
        (Some(source), Some(n)) => {
            format!(", held out; choices made on {n} {source} images")
        }
        _ => ", also used for choices (made before graft held images out)".to_string(),
    };
    let test = match (x.test_accuracy, x.test_images) {
        (Some(a), Some(n)) => {
            format!(", test accuracy {a:.4} on {} (held out)", count(n, "image"))
        }
        _ => String::new(),
    };
    format!(
        "val accuracy {:.4} on {} ({}{choices}){test}, train accuracy {:.4} on {}",
        x.val_accuracy,
        count(x.val_images, "image"),
        x.validation_source,
        x.train_accuracy,
        count(x.train_images, "image")
    )
}

fn abbreviate(labels: &[String], max: usize) -> String {
    if labels.len() <= max {
        labels.join(", ")
    } else {
        format!(
            "{}, ... ({} more)",
            labels[..max].join(", "),
            labels.len() - max
        )
    }
}
