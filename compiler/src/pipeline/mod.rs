//! The compile pipeline: [`compile`] is the list of its stages (import, cut, split, extract,
//! train, build the graph, verify, write), each a function here with a typed input and output;
//! stages communicate through values only and tell a [`Reporter`] what is going on. Beside it:
//! `transfer.rs` (the head and fine-tuning drivers), `int8.rs` (the int8 stage), `measure.rs`
//! (graphs run end to end on the reported images), `checks.rs` (inputs, outputs, agreement),
//! `own_head.rs` (`--keep-imagenet-head`), and [`advise`] (what to transfer, `--strategy auto`).

pub mod advise;
mod checks;
mod int8;
mod measure;
mod own_head;
mod transfer;

pub use checks::read_labels;
use checks::*;
use int8::*;
use measure::*;
use own_head::*;
use transfer::*;

use graft_runtime::progress::count;
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use graft_runtime::artifact::{
    self, CalibrationTrial, EpochRecord, LayerPrecision, Manifest, Metrics, QuantizationInfo,
    SpeedCheck, TransferInfo,
};
use graft_runtime::dataset::{ImageFolder, Sample};
use graft_runtime::eval::{evaluate, ConfusionMatrix, Evaluation};
use graft_runtime::parallel::par_map;
use graft_runtime::preprocess::{
    ChannelOrder, Normalization, Pipeline, Preprocessing, ResizeFilter,
};
use graft_runtime::progress::Progress;
use graft_runtime::weights::WeightStorage;
use graft_runtime::{Artifact, Model};

use crate::backbone::cut::CutBackbone;
use crate::backbone::import::Backbone;
use crate::backbone::probe::probe_normalization;
use crate::data::splits::Splits;
use crate::error::{CompileError, Result};
use crate::features::{Extraction, FeatureCache, FeatureExtractor, Features};
use crate::finetune::{finetune, FinetuneConfig, FinetuneData, Strategy, Unfreeze};
use crate::fold::manifest::{manifest_for, HeadSummary};
use crate::fold::FoldedModel;
use crate::head::train::{train_head, HeadKind, TrainConfig, TrainedHead, CV_FOLDS, LAMBDA_PATH};
use crate::quantize::search::{
    input_tensor, search, Measurement, Probe, SearchOptions, SearchResult,
};
use crate::quantize::{
    calibrate, plan, quantize, time_layers, total_product_macs, ActivationRanges, Calibration,
    CalibrationMethod, LayerTiming, Precision, QuantizeConfig,
};
use crate::util::rng::Rng;
use tract_onnx::prelude::TypedModel;

/// Receives what the pipeline has to say: progress of long loops, messages, epochs.
pub trait Reporter: Progress {
    /// A line of information for the user.
    fn message(&self, text: &str);
    /// An epoch of head training ended.
    fn epoch(&self, record: &EpochRecord);
}

/// Says nothing: for library callers, tests and benches.
impl Reporter for graft_runtime::progress::NoProgress {
    fn message(&self, _: &str) {}
    fn epoch(&self, _: &EpochRecord) {}
}

/// Everything `graft compile` needs.
#[derive(Debug, Clone)]
pub struct CompileOptions {
    /// The ONNX backbone.
    pub backbone: PathBuf,
    /// Labelled images (`DIR/<class>/*` or `DIR/{train,val}/<class>/*`); not needed with
    /// `keep_imagenet_head`.
    pub data: Option<PathBuf>,
    /// Where to write the artifact.
    pub out: PathBuf,
    /// Tensor to cut at (default: the input of the last Gemm/MatMul).
    pub cut: Option<String>,
    /// Keep the backbone's own classifier instead of training a head.
    pub keep_imagenet_head: bool,
    /// Label file (one per line) for `keep_imagenet_head`.
    pub labels_file: Option<PathBuf>,
    /// Input size for backbones with dynamic spatial dimensions.
    pub input_size: Option<[usize; 2]>,
    /// Per-channel normalisation; `None` probes the backbone for it (see [`crate::backbone::probe`]).
    pub normalization: Option<Normalization>,
    /// Shorter side after resizing (default: crop / 0.875).
    pub resize_shorter: Option<u32>,
    /// Resize filter.
    pub filter: ResizeFilter,
    /// Decode and resize implementation (recorded in the artifact).
    pub pipeline: Pipeline,
    /// Channel order.
    pub channel_order: ChannelOrder,
    /// Head training settings.
    pub train: TrainConfig,
    /// Fraction of each class held out for validation when the data has no validation split.
    pub val_fraction: f32,
    /// Feature cache root; `None` disables caching.
    pub cache_dir: Option<PathBuf>,
    /// Worker threads for extraction and evaluation.
    pub threads: usize,
    /// Evaluate the written graph end to end on the validation images.
    pub verify: bool,
    /// `f32`, or `int8` (quantized after training, calibrated on training images).
    pub precision: Precision,
    /// Training images to calibrate int8 activation ranges on.
    pub calibration_images: usize,
    /// How activation ranges are chosen; `None` tries every method and keeps the one whose
    /// simulated outputs stay closest to f32 on training images.
    pub calibration: Option<CalibrationMethod>,
    /// Share of the probed training images (a fraction: 0.01 is one in a hundred) whose top-1
    /// class int8 may change against f32 before the most sensitive layers go back to f32.
    pub accuracy_budget: f64,
    /// Time each int8 layer alone on this machine and keep f32 where int8 is slower.
    pub int8_only_where_faster: bool,
    /// How the artifact stores its large weight tensors (widened to f32 at load).
    pub weights: WeightStorage,
    /// Fine-tuning or training from scratch; `None` trains the head only.
    pub finetune: Option<FinetuneConfig>,
}

impl CompileOptions {
    /// Defaults for everything but the backbone and the output: default cut, `--normalize auto`,
    /// bilinear RGB preprocessing, default training, 20 % holdout, no cache, all cores, verify.
    pub fn new(backbone: impl Into<PathBuf>, out: impl Into<PathBuf>) -> CompileOptions {
        CompileOptions {
            backbone: backbone.into(),
            data: None,
            out: out.into(),
            cut: None,
            keep_imagenet_head: false,
            labels_file: None,
            input_size: None,
            normalization: None,
            resize_shorter: None,
            filter: ResizeFilter::Bilinear,
            pipeline: Pipeline::Fast,
            channel_order: ChannelOrder::Rgb,
            train: TrainConfig::default(),
            val_fraction: 0.2,
            cache_dir: None,
            threads: graft_runtime::parallel::default_threads(),
            verify: true,
            precision: Precision::F32,
            calibration_images: 32,
            calibration: None,
            accuracy_budget: 0.01,
            int8_only_where_faster: false,
            weights: WeightStorage::F32,
            finetune: None,
        }
    }
}

/// What a compile did and measured.
#[derive(Debug, Clone)]
pub struct CompileReport {
    /// The manifest written into the artifact.
    pub manifest: Manifest,
    /// Size of the artifact in bytes.
    pub artifact_bytes: u64,
    /// Feature vectors read from the cache (train + validation).
    pub cache_hits: usize,
    /// Feature vectors computed by running the backbone.
    pub computed: usize,
    /// Images skipped because they could not be decoded.
    pub skipped: Vec<(PathBuf, String)>,
    /// Validation accuracy of the trained head on the cached features.
    pub head_val_accuracy: Option<f32>,
    /// Validation accuracy of the artifact's graph run end to end.
    pub artifact_val_accuracy: Option<f32>,
    /// Wall-clock seconds spent extracting features.
    pub extract_seconds: f64,
    /// Wall-clock seconds of the whole compile.
    pub total_seconds: f64,
    /// The written artifact run end to end on the validation images (`None` without verify).
    pub evaluation: Option<graft_runtime::eval::Evaluation>,
}

/// Runs the whole pipeline and writes the artifact: the list of its stages, each a function
/// below with a typed input and output.
pub fn compile(options: &CompileOptions, reporter: &dyn Reporter) -> Result<CompileReport> {
    let started = Instant::now();
    check_output_path(&options.out)?;
    // The data folder is checked before the backbone is imported: a wrong --data is the more
    // common mistake, and its error should not wait for the import.
    let folder = match (&options.data, options.keep_imagenet_head) {
        (Some(data), false) => Some(ImageFolder::scan(data)?),
        _ => None,
    };
    let backbone = import_backbone(options, reporter)?;
    let mut preprocessing = preprocessing_for(&backbone, options)?;
    if options.keep_imagenet_head {
        if options.normalization.is_none() {
            reporter.message(
                "normalize imagenet (no images to probe with; pass --normalize to choose)",
            );
        }
        return compile_with_own_head(options, backbone, preprocessing, reporter, started);
    }
    let (Some(data), Some(folder)) = (options.data.as_deref(), folder) else {
        return Err(CompileError::InvalidOption(
            "--data is required (unless --keep-imagenet-head)".into(),
        ));
    };
    let (cut_name, cut) = cut_backbone(&backbone, options, reporter)?;
    let images = folder.samples().map(|s| ("a data image", s.path.as_path()));
    check_out_is_not_an_input(&options.out, images)?;
    let splits = Splits::of(&folder, options.val_fraction, options.train.seed)?;
    reporter.message(&splits.describe(data, &folder.classes));
    if options.normalization.is_none() {
        preprocessing.normalization = stage("normalize", || {
            choose_normalization(&backbone, &preprocessing, &splits.fit, options, reporter)
        })?;
    }
    let extracted = extract_features(&cut, &preprocessing, (&splits, &folder), options, reporter)?;
    let trained = train(
        Frozen {
            backbone: &backbone,
            cut,
            cut_name: &cut_name,
            preprocessing: &preprocessing,
        },
        (&splits, &folder, &extracted),
        options,
        reporter,
    )?;
    let built = build_graph(
        &trained,
        &preprocessing,
        &splits,
        &folder.classes,
        options,
        reporter,
    )?;
    let verified = verify(&built, &trained, &splits, options, (&extracted, reporter))?;
    write_artifact(
        built,
        &trained,
        &splits,
        verified,
        (&extracted, options, reporter),
        started,
    )
}

/// Imports the backbone and says which file it is.
fn import_backbone(options: &CompileOptions, reporter: &dyn Reporter) -> Result<Backbone> {
    let backbone = stage("import", || {
        Backbone::load(&options.backbone, options.input_size)
    })?;
    let inputs = backbone.files().map(|f| ("the backbone", f)).chain(
        options
            .labels_file
            .iter()
            .map(|f| ("the labels file", f.as_path())),
    );
    check_out_is_not_an_input(&options.out, inputs)?;
    let [_, _, height, width] = backbone.input_shape();
    reporter.message(&format!(
        "backbone  {} (input {}x{}, sha256 {})",
        backbone.path().display(),
        height,
        width,
        &backbone.sha256()[..12]
    ));
    Ok(backbone)
}

/// Cuts the backbone at `--cut` (default: its pooled features).
fn cut_backbone(
    backbone: &Backbone,
    options: &CompileOptions,
    reporter: &dyn Reporter,
) -> Result<(String, CutBackbone)> {
    let cut_name = match &options.cut {
        Some(c) => c.clone(),
        None => backbone.default_cut()?,
    };
    let cut = stage("cut", || backbone.clone().cut(&cut_name))?;
    reporter.message(&format!(
        "cut       at {:?}: features {:?}{}",
        cut.cut_name(),
        cut.cut_shape(),
        if cut.cut_shape().len() == 4 {
            " (global average pooled)"
        } else {
            ""
        }
    ));
    Ok((cut_name, cut))
}

/// The features of every image of the folder through the frozen cut (through the cache).
struct Extracted {
    extraction: Extraction,
    cache: Option<FeatureCache>,
    seconds: f64,
}

/// Features of the images that fit the weights, make the choices and are reported.
struct ByRole {
    train: Features,
    val: Features,
    report: Features,
}

impl ByRole {
    /// The features of the fit, choice and reported images, each class present in each.
    fn of(all: &Features, splits: &Splits, classes: &[String]) -> Result<ByRole> {
        let roles = ByRole {
            train: rows_of(all, &splits.fit),
            val: rows_of(all, &splits.select),
            report: rows_of(all, &splits.report),
        };
        check_every_class_present(&roles.train, classes, "training")?;
        check_every_class_present(&roles.val, classes, splits.select_source)?;
        check_every_class_present(&roles.report, classes, splits.report_source)?;
        Ok(roles)
    }
}

/// Extracts (or reads from the cache) the features of every image of the splits.
fn extract_features(
    cut: &CutBackbone,
    preprocessing: &Preprocessing,
    (splits, folder): (&Splits, &ImageFolder),
    options: &CompileOptions,
    reporter: &dyn Reporter,
) -> Result<Extracted> {
    let started = Instant::now();
    let extractor = FeatureExtractor::new(cut, preprocessing)?;
    let cache = options
        .cache_dir
        .as_deref()
        .and_then(|root| FeatureCache::new(root, cut, preprocessing));
    let all = splits.all();
    let extraction = stage("extract", || {
        extractor.extract(&all, cache.as_ref(), options.threads, reporter)
    })?;
    tracing::info!(
        images = all.len(),
        cache_hits = extraction.cache_hits,
        computed = extraction.computed,
        skipped = extraction.failures.len(),
        "features extracted"
    );
    let seconds = started.elapsed().as_secs_f64();
    report_extraction(&extraction, cache.as_ref(), seconds, reporter);
    warn_about_duplicates(
        &all,
        splits.fit.len() + splits.select.len(),
        &extraction,
        &folder.classes,
        reporter,
    );
    Ok(Extracted {
        extraction,
        cache,
        seconds,
    })
}

/// The frozen backbone the head is trained on.
struct Frozen<'a> {
    backbone: &'a Backbone,
    cut: CutBackbone,
    cut_name: &'a str,
    preprocessing: &'a Preprocessing,
}

/// The trained model: the (possibly fine-tuned) cut, its head, and the features it was judged on.
struct Trained {
    cut: CutBackbone,
    head: TrainedHead,
    /// The head trained on frozen features (none from scratch).
    probe_head: Option<TrainedHead>,
    features: ByRole,
    transfer: Option<TransferInfo>,
    classes: Vec<String>,
}

/// Trains the head on the frozen features, then fine-tunes (or trains from scratch) when asked;
/// a fine-tuned backbone's features are extracted again, by tract, for everything after.
fn train(
    frozen: Frozen,
    (splits, folder, extracted): (&Splits, &ImageFolder, &Extracted),
    options: &CompileOptions,
    reporter: &dyn Reporter,
) -> Result<Trained> {
    let features = ByRole::of(&extracted.extraction.features, splits, &folder.classes)?;
    let scratch = options
        .finetune
        .as_ref()
        .is_some_and(|f| f.strategy == Strategy::Scratch);
    let probe_head = if scratch {
        None
    } else {
        Some(stage("train", || {
            train_probe_head(
                options,
                (&features.train, &features.val),
                folder.classes.len(),
                splits.select_source,
                reporter,
            )
        })?)
    };
    let classes = folder.classes.clone();
    let Some(config) = &options.finetune else {
        let head = probe_head.clone().expect("trained unless from scratch");
        return Ok(Trained {
            cut: frozen.cut,
            head,
            probe_head,
            features,
            transfer: None,
            classes,
        });
    };
    let tuned = stage("finetune", || {
        finetune_backbone(
            &frozen,
            (&splits.fit, &splits.select),
            folder.classes.len(),
            probe_head.as_ref(),
            config,
            options.threads,
            reporter,
        )
    })?;
    let cut = tuned.backbone.clone().cut(frozen.cut_name)?;
    let extractor = FeatureExtractor::new(&cut, frozen.preprocessing)?;
    let tuned_features = extractor.extract(&splits.all(), None, options.threads, reporter)?;
    let features = ByRole::of(&tuned_features.features, splits, &folder.classes)?;
    let tract_accuracy = ConfusionMatrix::from_pairs(
        folder.classes.len(),
        features
            .val
            .labels
            .iter()
            .copied()
            .zip(tuned.head.predict(&features.val)),
    )
    .accuracy();
    reporter.message(&format!(
        "check     fine-tuned backbone in tract: {} accuracy {tract_accuracy:.4} (candle: {:.4}{})",
        splits.select_source,
        tuned.head.best().val_accuracy,
        probe_head.as_ref().map_or(String::new(), |h| format!(
            ", head alone before fine-tuning: {:.4}",
            h.best().val_accuracy
        ))
    ));
    Ok(Trained {
        cut,
        head: tuned.head,
        probe_head,
        features,
        transfer: Some(tuned.info),
        classes,
    })
}

/// The graph to write (f32, or int8, weights narrowed when asked), the all-f32 graph, and the
/// manifest so far.
struct Built {
    manifest: Manifest,
    f32_graph: Vec<u8>,
    /// The computed graph (int8 or f32) with its weights stored as `--weights` asks.
    graph: Vec<u8>,
}

/// Folds the head into the graph, quantizes and narrows it when asked, and times int8 against
/// f32.
fn build_graph(
    trained: &Trained,
    preprocessing: &Preprocessing,
    splits: &Splits,
    classes: &[String],
    options: &CompileOptions,
    reporter: &dyn Reporter,
) -> Result<Built> {
    // The training record is the head's own training on frozen features (from scratch, there
    // is none: the joint training is recorded); joint training is recorded as the transfer.
    let summary = HeadSummary::trained(
        trained.probe_head.as_ref().unwrap_or(&trained.head),
        &options.train,
    )
    .with_transfer(trained.transfer.clone());
    let mut manifest = manifest_for(&trained.cut, preprocessing, classes, &summary);
    let (folded, f32_graph) = stage("fold", || {
        let folded = trained.cut.clone().into_folded(&trained.head.layers)?;
        let graph = folded.to_nnef()?;
        Ok((folded, graph))
    })?;
    let int8_graph = match options.precision {
        Precision::F32 => None,
        Precision::Int8 => {
            let val_usable = usable(&splits.select, &trained.features.val);
            let (graph, info) = stage("quantize", || {
                quantize_graph(
                    folded,
                    &ProbeSamples {
                        fit: &splits.fit,
                        select: &val_usable,
                        select_source: splits.select_source,
                    },
                    preprocessing,
                    options,
                    reporter,
                )
            })?;
            manifest.quantization = Some(info);
            Some(graph)
        }
    };
    manifest.precision = options.precision.name().into();
    let computed_graph = int8_graph.unwrap_or_else(|| f32_graph.clone());
    let graph = narrow_weights(&computed_graph, options.weights, &mut manifest, reporter)?
        .unwrap_or(computed_graph);
    if manifest.quantization.is_some() {
        let speed = stage("speed", || {
            speed_check(&manifest, &graph, &f32_graph, options, reporter)
        })?;
        if let Some(info) = manifest.quantization.as_mut() {
            info.speed = Some(speed);
        }
    }
    Ok(Built {
        manifest,
        f32_graph,
        graph,
    })
}

/// What the reported images measured: the head on cached features, and the written graph run
/// end to end (with `verify`).
struct Verified {
    head_confusion: ConfusionMatrix,
    evaluation: Option<Evaluation>,
    /// The all-f32 graph's accuracy, when the written one is quantized or narrowed.
    f32_accuracy: Option<f32>,
}

/// Runs the written graph end to end on the reported images, checks that its all-f32 form
/// measures what the head measured, and records int8 (or narrowed) against f32.
fn verify(
    built: &Built,
    trained: &Trained,
    splits: &Splits,
    options: &CompileOptions,
    (extracted, reporter): (&Extracted, &dyn Reporter),
) -> Result<Verified> {
    let report = &trained.features.report;
    let head_confusion = ConfusionMatrix::from_pairs(
        trained.classes.len(),
        report
            .labels
            .iter()
            .copied()
            .zip(trained.head.predict(report)),
    );
    if !options.verify {
        return Ok(Verified {
            head_confusion,
            evaluation: None,
            f32_accuracy: None,
        });
    }
    let head_accuracy = head_confusion.accuracy();
    let report_usable = usable(&splits.report, report);
    let manifest = &built.manifest;
    let evaluation = stage("verify", || {
        run_graph(manifest, &built.graph, &report_usable, options, reporter)
    })?;
    reporter.message(&format!(
        "verify    artifact run end to end on {}: accuracy {:.4} (head on cached features: {:.4})",
        count(
            evaluation.confusion.total(),
            &format!("{} image", splits.report_source)
        ),
        evaluation.accuracy(),
        head_accuracy
    ));
    let narrowed = manifest.quantization.is_some() || manifest.weights != WeightStorage::F32;
    // The all-f32 graph's own run, when the artifact's is not it (quantized or narrowed).
    let f32_evaluation = narrowed
        .then(|| {
            run_graph(
                &all_f32(manifest),
                &built.f32_graph,
                &report_usable,
                options,
                reporter,
            )
        })
        .transpose()?;
    check_graph_agrees_with_head(
        head_accuracy,
        f32_evaluation.as_ref().unwrap_or(&evaluation),
        splits.report_source,
        extracted.cache.as_ref(),
    )?;
    let f32_accuracy = f32_evaluation.map(|e| e.accuracy());
    if let Some(f32_accuracy) = f32_accuracy {
        reporter.message(&format!(
            "verify    {} compute, {} weights: accuracy {:.4} vs {:.4} all f32 ({:+.2} points)",
            manifest.precision,
            manifest.weights.name(),
            evaluation.accuracy(),
            f32_accuracy,
            (evaluation.accuracy() - f32_accuracy) * 100.0
        ));
    }
    Ok(Verified {
        head_confusion,
        evaluation: Some(evaluation),
        f32_accuracy,
    })
}

/// Measures the test split (when there is one), records the metrics in the manifest and writes
/// the artifact atomically.
fn write_artifact(
    built: Built,
    trained: &Trained,
    splits: &Splits,
    verified: Verified,
    (extracted, options, reporter): (&Extracted, &CompileOptions, &dyn Reporter),
    started: Instant,
) -> Result<CompileReport> {
    let Built {
        mut manifest,
        graph,
        ..
    } = built;
    let artifact_val_accuracy = verified.evaluation.as_ref().map(|e| e.accuracy());
    if let (Some(info), Some(f32_accuracy)) =
        (manifest.quantization.as_mut(), verified.f32_accuracy)
    {
        info.val_accuracy = artifact_val_accuracy;
        info.f32_val_accuracy = Some(f32_accuracy);
    }
    let head_val_accuracy = verified.head_confusion.accuracy();
    let confusion = verified
        .evaluation
        .as_ref()
        .map_or(&verified.head_confusion, |e| &e.confusion);
    let extraction = &extracted.extraction;
    let test_accuracy = match &splits.test {
        Some(test) => Some(stage("test", || {
            test_accuracy(
                &manifest,
                &graph,
                (test, &extraction.features),
                options,
                reporter,
            )
        })?),
        None => None,
    };
    let features = &trained.features;
    manifest.metrics = Some(Metrics {
        validation_source: splits.report_source.to_string(),
        train_images: features.train.rows(),
        val_images: features.report.rows(),
        train_accuracy: head_train_accuracy(&trained.head, &features.train),
        val_accuracy: artifact_val_accuracy.unwrap_or(head_val_accuracy),
        confusion: confusion.counts.clone(),
        selection_source: Some(splits.select_source.to_string()),
        selection_images: Some(features.val.rows()),
        test_accuracy: test_accuracy.map(|t| t.0),
        test_images: test_accuracy.map(|t| t.1),
    });
    let bytes = artifact::encode(&manifest, &graph);
    if reporter.cancelled() {
        return Err(CompileError::Interrupted);
    }
    stage("write", || {
        artifact::write_atomic(&options.out, &bytes).map_err(Into::into)
    })?;
    tracing::info!(path = %options.out.display(), bytes = bytes.len(), "artifact written");
    let mut skipped = extraction.failures.clone();
    skipped.sort();
    Ok(CompileReport {
        manifest,
        artifact_bytes: bytes.len() as u64,
        cache_hits: extraction.cache_hits,
        computed: extraction.computed,
        skipped,
        head_val_accuracy: Some(head_val_accuracy),
        artifact_val_accuracy,
        extract_seconds: extracted.seconds,
        total_seconds: started.elapsed().as_secs_f64(),
        evaluation: verified.evaluation,
    })
}

/// The preprocessing the options ask for (ImageNet statistics until `--normalize auto` has
/// probed the backbone).
pub(crate) fn preprocessing_for(
    backbone: &Backbone,
    options: &CompileOptions,
) -> Result<Preprocessing> {
    let [_, _, height, width] = backbone.input_shape();
    let mut preprocessing = Preprocessing::for_input(
        height as u32,
        width as u32,
        options
            .normalization
            .clone()
            .unwrap_or_else(Normalization::imagenet),
    );
    if let Some(r) = options.resize_shorter {
        preprocessing.resize_shorter = r;
    }
    preprocessing.filter = options.filter;
    preprocessing.pipeline = options.pipeline;
    preprocessing.channel_order = options.channel_order;
    preprocessing.validate()?;
    Ok(preprocessing)
}

/// Runs one stage of the pipeline inside a tracing span named after it, then logs its duration
/// as a [`STAGE_LOG`] event (`graft -v` prints it).
pub(crate) fn stage<T>(name: &'static str, run: impl FnOnce() -> Result<T>) -> Result<T> {
    let started = Instant::now();
    let result = tracing::info_span!("stage", name).in_scope(run);
    tracing::info!(target: STAGE_LOG, "{name} {:.2} s", started.elapsed().as_secs_f64());
    result
}

/// The tracing target of the event that closes a pipeline stage (`stage`): the `-v` log
/// prints it as `stage     NAME SECONDS s`.
pub const STAGE_LOG: &str = "graft::stage";

/// `--normalize auto`: ask the backbone's own classifier (see [`crate::backbone::probe`]).
pub(crate) fn choose_normalization(
    backbone: &Backbone,
    preprocessing: &Preprocessing,
    samples: &[Sample],
    options: &CompileOptions,
    reporter: &dyn Reporter,
) -> Result<Normalization> {
    let probe = probe_normalization(
        backbone,
        preprocessing,
        samples,
        options.threads,
        options.cache_dir.as_deref(),
    )?;
    Ok(match probe {
        Some(probe) => {
            let scores: Vec<String> = probe
                .scores
                .iter()
                .map(|(name, score)| format!("{name} {score:.3}"))
                .collect();
            reporter.message(&format!(
                "normalize {} (auto, by {}: {})",
                probe.chosen,
                probe.method,
                scores.join(", ")
            ));
            probe.normalization()
        }
        None => {
            reporter.message(
                "normalize imagenet (auto: the backbone has no classifier output to probe; pass --normalize to choose)",
            );
            Normalization::imagenet()
        }
    })
}

fn report_extraction(
    extraction: &Extraction,
    cache: Option<&FeatureCache>,
    seconds: f64,
    reporter: &dyn Reporter,
) {
    let rate = if extraction.computed > 0 {
        format!(" ({:.1} images/s)", extraction.computed as f64 / seconds)
    } else {
        String::new()
    };
    let where_ = cache.map_or("feature cache disabled".to_string(), |c| {
        format!("cache {}", c.dir().display())
    });
    reporter.message(&format!(
        "features  {}: {} from cache, {} computed in {:.1}s{rate}; {where_}",
        count(extraction.features.rows(), "image"),
        extraction.cache_hits,
        extraction.computed,
        seconds
    ));
    for (_, reason) in &extraction.failures {
        reporter.message(&format!("warning   skipped {reason}"));
    }
    if !extraction.failures.is_empty() {
        reporter.message(&format!(
            "warning   {} undecodable image(s) skipped",
            extraction.failures.len()
        ));
    }
}

#[cfg(test)]
mod tests {
    use graft_runtime::eval::{ConfusionMatrix, Evaluation};

    use super::*;

    fn evaluation(right: u64, wrong: u64) -> Evaluation {
        Evaluation {
            labels: vec!["a".into(), "b".into()],
            confusion: ConfusionMatrix {
                counts: vec![vec![right, wrong], vec![0, 0]],
            },
            failures: Vec::new(),
            mistakes: Vec::new(),
        }
    }

    #[test]
    fn an_artifact_far_below_its_head_is_refused() {
        // Rounding-level differences pass; so does a large gap of fewer than 3 images.
        check_graph_agrees_with_head(0.90, &evaluation(89, 11), "val", None).unwrap();
        check_graph_agrees_with_head(1.0, &evaluation(8, 2), "val", None).unwrap();
        // Swapped cache rows: the head saw 100 %, the graph 0 %.
        let err = check_graph_agrees_with_head(1.0, &evaluation(0, 40), "val", None)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "verify: the artifact classifies 40 val images with accuracy 0.0000, but the head measured 1.0000 on the features it was trained with: this is a bug in graft; please report it. No artifact written"
        );
    }
}
