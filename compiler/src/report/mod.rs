//! Report: what a user looks at after `graft compile --report DIR` or `graft eval --report
//! DIR`. One HTML page that works offline (inline CSS, inline SVG charts, misclassified images
//! inlined as small JPEGs; no scripts, no network) and `metrics.json` with the same numbers.
//!
//! The page shows the training curves (loss and accuracy per epoch, for the head and for
//! fine-tuning), the confusion matrix as a heat map, per-class precision and recall, the
//! misclassified images with true and predicted labels, f32 vs quantized accuracy, latency and
//! size.

pub mod svg;

use graft_runtime::progress::count;
use std::fmt::Write as _;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use graft_runtime::artifact::{EpochRecord, Manifest};
use graft_runtime::eval::{ClassStats, Evaluation};
use graft_runtime::preprocess::decode_at_least;
use serde::Serialize;

use crate::error::{CompileError, Result};
use crate::report::svg::{accuracy_range, bar_chart, escape, heat_map, LineChart, Series};

/// Misclassified images shown on the page (all are listed in `metrics.json`).
pub const SHOWN_MISTAKES: usize = 24;

/// Single-image latency of the artifact, measured by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Latency {
    /// Median milliseconds per 640x480 image (preprocess and run, one thread).
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// Timed runs.
    pub runs: usize,
}

/// What the report is made from.
pub struct ReportInput<'a> {
    /// Heading of the page (e.g. `graft compile: hymenoptera.graft`).
    pub title: String,
    /// The artifact.
    pub artifact: &'a Path,
    /// Its size in bytes.
    pub artifact_bytes: u64,
    /// Its manifest.
    pub manifest: &'a Manifest,
    /// The artifact run on labelled images (the validation images for compile).
    pub evaluation: &'a Evaluation,
    /// Which images were evaluated, in words.
    pub evaluated_on: String,
    /// Latency, when measured.
    pub latency: Option<Latency>,
}

/// The numbers of the report, written as `metrics.json`.
#[derive(Debug, Clone, Serialize)]
pub struct ReportMetrics {
    /// The artifact file.
    #[serde(serialize_with = "graft_runtime::paths::serialize")]
    pub artifact: PathBuf,
    /// Its size in bytes.
    pub artifact_bytes: u64,
    /// Class names.
    pub labels: Vec<String>,
    /// Which images were evaluated.
    pub evaluated_on: String,
    /// Images evaluated.
    pub images: u64,
    /// Accuracy of the artifact on them.
    pub accuracy: f32,
    /// Precision and recall per class.
    pub per_class: Vec<ClassStats>,
    /// Confusion matrix, `[true][predicted]`.
    pub confusion: Vec<Vec<u64>>,
    /// Head training, epoch by epoch (for `logreg` / `svm`: step by step on the L2 path).
    pub head_history: Vec<EpochRecord>,
    /// The epoch (or L2 step) whose weights the head kept.
    pub head_kept: Option<usize>,
    /// Fine-tuning, epoch by epoch (empty for a head only).
    pub finetune_history: Vec<EpochRecord>,
    /// The fine-tuning epoch whose weights were kept.
    pub finetune_kept: Option<usize>,
    /// Compute precision of the graph (`f32` or `int8`).
    pub precision: String,
    /// Validation accuracy of the all-f32 graph, when the artifact is quantized or narrowed.
    pub f32_val_accuracy: Option<f32>,
    /// Validation accuracy the compile measured for the artifact itself.
    pub compiled_val_accuracy: Option<f32>,
    /// With a `train/val/test` folder: the artifact's accuracy on the test split (held out) and
    /// the number of test images.
    pub test_accuracy: Option<(f32, usize)>,
    /// Single-image latency.
    pub latency: Option<Latency>,
    /// Every misclassified image, the most confident mistakes first (whatever the classes).
    pub mistakes: Vec<MistakeEntry>,
}

/// A misclassified image, by label name.
#[derive(Debug, Clone, Serialize)]
pub struct MistakeEntry {
    /// The image file.
    #[serde(serialize_with = "graft_runtime::paths::serialize")]
    pub path: PathBuf,
    /// True label.
    pub truth: String,
    /// Predicted label.
    pub predicted: String,
    /// Probability of the prediction.
    pub probability: f32,
}

impl ReportMetrics {
    /// Gathers the numbers from the input.
    pub fn new(input: &ReportInput) -> ReportMetrics {
        let labels = input.evaluation.labels.clone();
        let training = input.manifest.training.as_ref();
        ReportMetrics {
            artifact: input.artifact.to_path_buf(),
            artifact_bytes: input.artifact_bytes,
            evaluated_on: input.evaluated_on.clone(),
            images: input.evaluation.confusion.total(),
            accuracy: input.evaluation.accuracy(),
            per_class: input.evaluation.confusion.per_class(&labels),
            confusion: input.evaluation.confusion.counts.clone(),
            head_history: training.map(|t| t.history.clone()).unwrap_or_default(),
            head_kept: training.map(|t| t.best_epoch),
            finetune_kept: training
                .and_then(|t| t.transfer.as_ref())
                .map(|t| t.best_epoch),
            finetune_history: training
                .and_then(|t| t.transfer.as_ref())
                .map(|t| t.history.clone())
                .unwrap_or_default(),
            precision: input.manifest.precision.clone(),
            f32_val_accuracy: input
                .manifest
                .quantization
                .as_ref()
                .and_then(|q| q.f32_val_accuracy),
            compiled_val_accuracy: input.manifest.metrics.as_ref().map(|m| m.val_accuracy),
            test_accuracy: input
                .manifest
                .metrics
                .as_ref()
                .and_then(|m| m.test_accuracy.zip(m.test_images)),
            latency: input.latency,
            mistakes: most_confident_first(
                input
                    .evaluation
                    .mistakes
                    .iter()
                    .map(|m| MistakeEntry {
                        path: m.path.clone(),
                        truth: labels[m.truth].clone(),
                        predicted: labels[m.predicted].clone(),
                        probability: m.probability,
                    })
                    .collect(),
            ),
            labels,
        }
    }
}

/// `mistakes` ordered by the probability of their wrong prediction, highest first (ties by
/// path): the page shows the ones the model was surest of, from every confusion pair, instead of
/// the first ones by file name (flowers5 showed 24 daisies and none of its 30 rose -> tulip
/// errors).
fn most_confident_first(mut mistakes: Vec<MistakeEntry>) -> Vec<MistakeEntry> {
    mistakes.sort_by(|a, b| {
        b.probability
            .total_cmp(&a.probability)
            .then_with(|| a.path.cmp(&b.path))
    });
    mistakes
}

/// Checks, before any long work, that [`write_report`] could write into `dir`: a folder that
/// exists and accepts new files, or a new folder inside one. A file in the way is an error
/// naming the option, instead of a failure after the artifact was written.
pub fn check_report_dir(dir: &Path) -> Result<()> {
    let invalid = |reason: String| {
        CompileError::InvalidOption(format!("--report {}: {reason}", dir.display()))
    };
    match std::fs::metadata(dir) {
        Ok(meta) if !meta.is_dir() => Err(invalid("exists and is not a folder".into())),
        Ok(_) => graft_runtime::artifact::check_writable(&dir.join("index.html"))
            .map_err(|_| invalid("the folder is not writable".into())),
        Err(_) => {
            let parent = match dir.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            if !parent.is_dir() {
                return Err(invalid(format!(
                    "folder {} does not exist",
                    parent.display()
                )));
            }
            graft_runtime::artifact::check_writable(&dir.join("index.html")).or_else(|_| {
                graft_runtime::artifact::check_writable(dir)
                    .map_err(|_| invalid(format!("cannot create it in {}", parent.display())))
            })
        }
    }
}

/// Writes `DIR/index.html` and `DIR/metrics.json` (each atomically); returns the page's path.
pub fn write_report(dir: &Path, input: &ReportInput) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| CompileError::io(dir, e))?;
    let metrics = ReportMetrics::new(input);
    let json = serde_json::to_vec_pretty(&metrics).expect("metrics serialize");
    graft_runtime::artifact::write_atomic(&dir.join("metrics.json"), &json)?;
    let page = dir.join("index.html");
    graft_runtime::artifact::write_atomic(&page, render(input, &metrics).as_bytes())?;
    Ok(page)
}

/// The HTML page.
fn render(input: &ReportInput, m: &ReportMetrics) -> String {
    let mut html = String::new();
    let _ = write!(
        html,
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em auto; padding: 0 1em; max-width: 1340px; color: #222; }}
h1 {{ font-size: 1.5em; }} h2 {{ font-size: 1.2em; margin-top: 1.6em; }}
table {{ border-collapse: collapse; }} td, th {{ padding: 3px 10px; border-bottom: 1px solid #ddd; text-align: left; }}
.charts {{ display: flex; flex-wrap: wrap; gap: 12px; }}
.charts svg {{ width: calc(50% - 6px); min-width: 480px; height: auto; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 10px; }}
figure {{ margin: 0; width: 132px; font-size: 12px; }} figure img {{ width: 128px; height: 128px; object-fit: cover; border: 2px solid #d62728; }}
</style></head><body>
<h1>{title}</h1>
"#,
        title = escape(&input.title)
    );
    html.push_str(&summary(input, m));
    html.push_str(&training(input, m));
    html.push_str(&per_class(m));
    html.push_str(&mistakes(m));
    html.push_str(
        "<p>The numbers are also in metrics.json beside this page.</p>\n</body></html>\n",
    );
    html
}

/// The summary table: what the artifact is and how it did.
fn summary(input: &ReportInput, m: &ReportMetrics) -> String {
    let mut html = String::from("<h2>Summary</h2>\n<table>\n");
    let mut row = |k: &str, v: String| {
        let _ = writeln!(
            html,
            "<tr><th>{}</th><td>{}</td></tr>",
            escape(k),
            escape(&v)
        );
    };
    row("artifact", input.artifact.display().to_string());
    row(
        "accuracy",
        format!(
            "{:.4} on {} ({})",
            m.accuracy,
            count(m.images, "image"),
            m.evaluated_on
        ),
    );
    if let Some((accuracy, images)) = m.test_accuracy {
        row(
            "test accuracy",
            format!(
                "{accuracy:.4} on {} (held out: no choice made on them)",
                count(images, "test image")
            ),
        );
    }
    row("classes", m.labels.join(", "));
    row(
        "size",
        format!(
            "{:.1} MiB ({} bytes)",
            m.artifact_bytes as f64 / (1 << 20) as f64,
            m.artifact_bytes
        ),
    );
    row("precision", m.precision.clone());
    if let Some(f32_accuracy) = m.f32_val_accuracy {
        row(
            "f32 vs quantized",
            format!(
                "all-f32 graph {f32_accuracy:.4}, this artifact {:.4} ({:+.2} points)",
                m.compiled_val_accuracy.unwrap_or(m.accuracy),
                (m.compiled_val_accuracy.unwrap_or(m.accuracy) - f32_accuracy) * 100.0
            ),
        );
    }
    if let Some(l) = m.latency {
        row(
            "latency",
            format!(
                "p50 {:.1} ms, p90 {:.1} ms per 640x480 image (preprocess and run, 1 thread, {} runs; graft bench measures more)",
                l.p50_ms, l.p90_ms, l.runs
            ),
        );
    }
    row(
        "backbone",
        format!(
            "{} cut at {}",
            input.manifest.backbone.file_name, input.manifest.backbone.cut
        ),
    );
    row("head", input.manifest.head.kind.clone());
    html.push_str("</table>\n");
    html
}

/// Loss and accuracy curves of the head's training and of fine-tuning, the kept epochs marked;
/// empty without a training history.
fn training(input: &ReportInput, m: &ReportMetrics) -> String {
    let mut html = String::new();
    let head = &input.manifest.head.kind;
    let (head_unit, head_axis) = if head == "logreg" || head == "svm" {
        ("step", "step on the L2 path (5-fold cross-validation)")
    } else {
        ("epoch", "epoch")
    };
    let charts = [
        HistoryChart {
            stage: "Head training",
            unit: head_unit,
            x_label: head_axis,
            history: &m.head_history,
            kept: m.head_kept,
        },
        HistoryChart {
            stage: "Fine-tuning",
            unit: "epoch",
            x_label: "epoch",
            history: &m.finetune_history,
            kept: m.finetune_kept,
        },
    ];
    if charts.iter().any(|c| !c.history.is_empty()) {
        html.push_str("<h2>Training</h2>\n<div class=\"charts\">\n");
        for chart in charts.iter().filter(|c| !c.history.is_empty()) {
            html.push_str(&chart.to_svg("loss", |r| (r.train_loss as f64, r.val_loss as f64)));
            html.push_str(&chart.to_svg("accuracy", |r| {
                (r.train_accuracy as f64, r.val_accuracy as f64)
            }));
        }
        html.push_str("</div>\n");
    }
    html
}

/// The confusion matrix and precision / recall per class.
fn per_class(m: &ReportMetrics) -> String {
    let mut html =
        String::from("<h2>Confusion matrix and per-class metrics</h2>\n<div class=\"charts\">\n");
    html.push_str(&heat_map(
        "Confusion matrix (rows: true class)",
        &m.labels,
        &m.confusion,
    ));
    html.push_str(&bar_chart(
        "Precision and recall per class",
        "",
        &m.labels,
        &[
            (
                "precision",
                "#1f77b4",
                m.per_class.iter().map(|c| c.precision as f64).collect(),
            ),
            (
                "recall",
                "#ff7f0e",
                m.per_class.iter().map(|c| c.recall as f64).collect(),
            ),
        ],
        (0.0, 1.0),
    ));
    html.push_str("</div>\n");
    html
}

/// The most confident mistakes, with their images.
fn mistakes(m: &ReportMetrics) -> String {
    let mut html = String::new();
    let _ = writeln!(
        html,
        "<h2>Misclassified images ({} of {})</h2>\n<div class=\"grid\">",
        m.mistakes.len().min(SHOWN_MISTAKES),
        m.mistakes.len()
    );
    for mistake in m.mistakes.iter().take(SHOWN_MISTAKES) {
        let image = thumbnail(&mistake.path)
            .map(|data| format!(r#"<img src="data:image/jpeg;base64,{data}" alt="">"#))
            .unwrap_or_else(|| "<div>(unreadable)</div>".into());
        let _ = writeln!(
            html,
            "<figure title=\"{}\">{image}<figcaption>true <b>{}</b><br>predicted <b>{}</b> ({:.2})</figcaption></figure>",
            escape(&mistake.path.display().to_string()),
            escape(&mistake.truth),
            escape(&mistake.predicted),
            mistake.probability
        );
    }
    html.push_str("</div>\n");
    html
}

/// One training stage's history, charted quantity by quantity.
struct HistoryChart<'a> {
    /// `Head training` or `Fine-tuning`.
    stage: &'a str,
    /// What one point is (`epoch`, or `step` on the L2 path).
    unit: &'a str,
    /// The x axis label.
    x_label: &'a str,
    history: &'a [EpochRecord],
    /// The epoch (step) kept, marked on the validation curve.
    kept: Option<usize>,
}

impl HistoryChart<'_> {
    /// Train and validation curves of one quantity.
    fn to_svg(&self, quantity: &str, values: impl Fn(&EpochRecord) -> (f64, f64)) -> String {
        let history = self.history;
        let epochs: Vec<f64> = history.iter().map(|r| r.epoch as f64).collect();
        let pairs: Vec<(f64, f64)> = history.iter().map(&values).collect();
        let all = pairs.iter().flat_map(|&(a, b)| [a, b]);
        let (lo, hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
        let y_range = if quantity == "accuracy" {
            accuracy_range(lo)
        } else {
            (0.0, hi * 1.05)
        };
        let (first, last) = (epochs[0], epochs[epochs.len() - 1]);
        let step = ((last - first) / 8.0).ceil().max(1.0);
        let kept = self
            .kept
            .and_then(|k| history.iter().position(|r| r.epoch == k));
        let unit = self.unit;
        let tooltips = (0..history.len())
            .map(|i| match kept {
                Some(k) if k == i => format!("kept: {unit} {} ({:.4})", epochs[i], pairs[i].1),
                _ => String::new(),
            })
            .collect();
        LineChart {
            title: format!(
                "{}: {quantity}{}",
                self.stage,
                self.kept
                    .map_or(String::new(), |k| format!(" (kept: {unit} {k}, in red)"))
            ),
            x_label: self.x_label.into(),
            y_label: quantity.into(),
            x_range: (first, last),
            y_range,
            x_ticks: std::iter::successors(Some(first), |e| Some(e + step))
                .take_while(|e| *e <= last)
                .map(|e| (e, format!("{e}")))
                .collect(),
            series: vec![
                Series {
                    name: format!("train {quantity}"),
                    color: "#1f77b4",
                    points: epochs.iter().zip(&pairs).map(|(&e, p)| (e, p.0)).collect(),
                    ..Series::default()
                },
                Series {
                    name: format!("validation {quantity}"),
                    color: "#ff7f0e",
                    points: epochs.iter().zip(&pairs).map(|(&e, p)| (e, p.1)).collect(),
                    highlight: kept,
                    tooltips,
                    ..Series::default()
                },
            ],
        }
        .to_svg()
    }
}

/// Times `runs` single-threaded classifications (preprocess and run) of `graft bench`'s
/// synthetic 640x480 image, after two untimed ones.
pub fn measure_latency(model: &graft_runtime::Model, runs: usize) -> Result<Latency> {
    let image = graft_runtime::bench::synthetic_image();
    for _ in 0..2 {
        model.classify(&image)?;
    }
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let started = std::time::Instant::now();
        model.classify(&image)?;
        times.push(started.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    Ok(Latency {
        p50_ms: at(0.5),
        p90_ms: at(0.9),
        runs: times.len(),
    })
}

/// A 128-pixel JPEG thumbnail of the image file, base64-encoded (a large JPEG is decoded at the
/// reduced scale that still has 128 pixels on its shorter side).
fn thumbnail(path: &Path) -> Option<String> {
    let bytes = std::fs::read(path).ok()?;
    let image = decode_at_least(&bytes, path, 128)
        .ok()?
        .thumbnail(128, 128)
        .to_rgb8();
    let mut bytes = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(Cursor::new(&mut bytes), 80)
        .encode_image(&image)
        .ok()?;
    Some(base64(&bytes))
}

/// Standard base64 with padding.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mistakes_are_ordered_by_confidence_across_classes() {
        let mistake = |path: &str, truth: &str, probability| MistakeEntry {
            path: path.into(),
            truth: truth.into(),
            predicted: "x".into(),
            probability,
        };
        let ordered = most_confident_first(vec![
            mistake("a/1.jpg", "daisy", 0.4),
            mistake("a/2.jpg", "daisy", 0.9),
            mistake("b/1.jpg", "rose", 0.95),
            mistake("a/0.jpg", "daisy", 0.9),
        ]);
        let paths: Vec<_> = ordered.iter().map(|m| m.path.to_str().unwrap()).collect();
        assert_eq!(paths, ["b/1.jpg", "a/0.jpg", "a/2.jpg", "a/1.jpg"]);
    }

    #[test]
    fn base64_matches_the_rfc_4648_vectors() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in cases {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
    }
}
