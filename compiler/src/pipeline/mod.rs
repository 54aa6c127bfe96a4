//! The compile pipeline: import -> cut -> extract -> train -> fold -> artifact, and the report of
//! what happened. Stages communicate through values only; this module wires them together and
//! tells a [`Reporter`] what is going on.

pub mod advise;

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
    let probe_head = match scratch {
        true => None,
        false => Some(stage("train", || {
            train_probe_head(
                options,
                (&features.train, &features.val),
                folder.classes.len(),
                splits.select_source,
                reporter,
            )
        })?),
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
    // The all-f32 graph's own run: the artifact's, unless it was quantized or narrowed.
    let f32_evaluation = if narrowed {
        Cow::Owned(run_graph(
            &all_f32(manifest),
            &built.f32_graph,
            &report_usable,
            options,
            reporter,
        )?)
    } else {
        Cow::Borrowed(&evaluation)
    };
    check_graph_agrees_with_head(
        head_accuracy,
        &f32_evaluation,
        splits.report_source,
        extracted.cache.as_ref(),
    )?;
    if narrowed {
        reporter.message(&format!(
            "verify    {} compute, {} weights: accuracy {:.4} vs {:.4} all f32 ({:+.2} points)",
            manifest.precision,
            manifest.weights.name(),
            evaluation.accuracy(),
            f32_evaluation.accuracy(),
            (evaluation.accuracy() - f32_evaluation.accuracy()) * 100.0
        ));
    }
    let f32_accuracy = narrowed.then(|| f32_evaluation.accuracy());
    drop(f32_evaluation);
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

/// Shows an epoch's record; asks training to stop when the user pressed Ctrl-C.
fn report_epoch(reporter: &dyn Reporter, record: &EpochRecord) -> ControlFlow<()> {
    reporter.epoch(record);
    if reporter.cancelled() {
        ControlFlow::Break(())
    } else {
        ControlFlow::Continue(())
    }
}

/// Trains the head on frozen features (the whole job of `--strategy head`, the first step of
/// `finetune`): on `train`, its epoch chosen on `val` (the images from `select_source`); logreg
/// and svm choose their L2 strength by cross-validation instead and fit `train` and `val`.
fn train_probe_head(
    options: &CompileOptions,
    (train, val): (&Features, &Features),
    classes: usize,
    select_source: &str,
    reporter: &dyn Reporter,
) -> Result<TrainedHead> {
    let balance = if options.train.balance_classes {
        ", classes weighted by inverse frequency"
    } else {
        ""
    };
    reporter.message(&match options.train.head {
        HeadKind::LogReg | HeadKind::Svm => format!(
            "train     {} head: L2 strength from {:?} by stratified {CV_FOLDS}-fold cross-validation, seed {}{balance}",
            options.train.head, LAMBDA_PATH, options.train.seed
        ),
        _ => format!(
            "train     {} head: AdamW lr {} weight decay {} batch {} up to {} epochs (patience {}), seed {}{balance}",
            options.train.head,
            options.train.learning_rate,
            options.train.weight_decay,
            options.train.batch_size,
            options.train.epochs,
            options.train.patience,
            options.train.seed,
        ),
    });
    // Cross-validation on the training images is the convex heads' choice: they fit every
    // training image, the held-out-for-choices ones included (whose history numbers are then
    // in-sample).
    let convex = matches!(options.train.head, HeadKind::LogReg | HeadKind::Svm);
    let fitted = if convex {
        Cow::Owned(train.concat(val))
    } else {
        Cow::Borrowed(train)
    };
    let head = train_head(
        &options.train,
        &fitted,
        val,
        classes,
        &Device::Cpu,
        &mut |r| report_epoch(reporter, r),
    )?;
    let best = *head.best();
    reporter.message(&if convex {
        format!(
            "kept      L2 strength {} of {} by {CV_FOLDS}-fold cross-validation on {} training images: cross-validated accuracy {:.4}",
            head.best_epoch,
            head.history.len(),
            fitted.rows(),
            best.train_accuracy,
        )
    } else {
        format!(
            "kept      epoch {} of {} by {select_source} loss: train accuracy {:.4}, {select_source} accuracy {:.4} (loss {:.4})",
            head.best_epoch,
            head.history.len(),
            best.train_accuracy,
            best.val_accuracy,
            best.val_loss
        )
    });

    Ok(head)
}

/// Accuracy of the artifact's graph on the test images whose features could be extracted, and
/// their number: measured only, after every choice.
fn test_accuracy(
    manifest: &Manifest,
    graph: &[u8],
    (test, extracted): (&[Sample], &Features),
    options: &CompileOptions,
    reporter: &dyn Reporter,
) -> Result<(f32, usize)> {
    let test = usable(test, extracted);
    let evaluation = run_graph(manifest, graph, &test, options, reporter)?;
    reporter.message(&format!(
        "test      artifact run end to end on {} test images (held out: no choice made on them): accuracy {:.4}",
        evaluation.confusion.total(),
        evaluation.accuracy()
    ));
    Ok((evaluation.accuracy(), evaluation.confusion.total() as usize))
}

/// Fine-tunes (or trains from scratch) the backbone and the head, reporting what it does.
fn finetune_backbone(
    frozen: &Frozen,
    (train, val): (&[Sample], &[Sample]),
    classes: usize,
    probe_head: Option<&TrainedHead>,
    config: &FinetuneConfig,
    threads: usize,
    reporter: &dyn Reporter,
) -> Result<crate::finetune::FineTuned> {
    let what = match (&config.strategy, &config.unfreeze) {
        (Strategy::Scratch, _) => "every layer from random weights".to_string(),
        (_, Unfreeze::All) => "every backbone layer".to_string(),
        (_, Unfreeze::Blocks(n)) => format!("the top {n} blocks"),
        (_, Unfreeze::From(t)) => format!("everything after {t:?}"),
    };
    reporter.message(&format!(
        "{:<9} {what} + head: {} backbone lr {} head lr {} weight decay {} {} schedule, batch {}, up to {} epochs (patience {}){}",
        config.strategy.to_string(),
        config.optimizer,
        config.backbone_learning_rate,
        config.head_learning_rate,
        config.weight_decay,
        config.schedule,
        config.batch_size,
        config.epochs,
        config.patience,
        if config.augmentation.is_some() { ", augmented" } else { ", no augmentation" }
    ));
    let data = FinetuneData {
        backbone: frozen.backbone,
        cut: frozen.cut_name,
        preprocessing: frozen.preprocessing,
        train,
        val,
        classes,
        initial_head: probe_head,
    };
    let tuned = finetune(&data, config, threads, reporter, &mut |r| {
        report_epoch(reporter, r)
    })?;
    let info = &tuned.info;
    reporter.message(&format!(
        "trained   {} weights in {} blocks after {:?} ({}): kept epoch {} of {} (by loss on the images for choices, accuracy {:.4}); {:.1} s, {:.1} images/s forward+backward",
        info.trainable_weights,
        info.unfrozen_blocks.len(),
        info.boundary,
        info.unfrozen_blocks.join(", "),
        info.best_epoch,
        info.epochs_run,
        tuned.head.best().val_accuracy,
        info.seconds,
        info.train_images_per_second
    ));
    Ok(tuned)
}

/// `--weights f16|int8`: the graph with its large f32 tensors stored narrower (see
/// [`graft_runtime::weights`]); `None` for `--weights f32`, where the graph is used as it is.
fn narrow_weights(
    graph: &[u8],
    storage: WeightStorage,
    manifest: &mut Manifest,
    reporter: &dyn Reporter,
) -> Result<Option<Vec<u8>>> {
    manifest.weights = storage;
    if storage == WeightStorage::F32 {
        return Ok(None);
    }
    let narrowed =
        graft_runtime::weights::narrow(graph, storage).map_err(|reason| CompileError::Graph {
            stage: "weight storage",
            reason,
        })?;
    reporter.message(&format!(
        "weights   stored as {}: graph {:.1} MiB -> {:.1} MiB (widened to f32 when loaded)",
        storage.name(),
        graph.len() as f64 / (1 << 20) as f64,
        narrowed.len() as f64 / (1 << 20) as f64
    ));
    Ok(Some(narrowed))
}

/// Runs an encoded graph end to end (as the runtime will) on labelled images.
fn run_graph(
    manifest: &Manifest,
    graph: &[u8],
    samples: &[Sample],
    options: &CompileOptions,
    reporter: &dyn Reporter,
) -> Result<graft_runtime::eval::Evaluation> {
    let model = graph_model(manifest, graph, options)?;
    let evaluation = evaluate(&model, samples, options.threads, reporter);
    if reporter.cancelled() {
        return Err(CompileError::Interrupted);
    }
    Ok(evaluation)
}

/// `graph` with `manifest` loaded as the runtime loads an artifact, without writing it.
fn graph_model(manifest: &Manifest, graph: &[u8], options: &CompileOptions) -> Result<Model> {
    let artifact = Artifact::from_bytes(artifact::encode(manifest, graph), &options.out)?;
    Ok(Model::from_artifact(artifact)?)
}

/// The manifest of the all-f32 graph `manifest`'s graph was made from (f32 compute and weights).
fn all_f32(manifest: &Manifest) -> Manifest {
    let mut f32_manifest = manifest.clone();
    f32_manifest.precision = Precision::F32.name().into();
    f32_manifest.quantization = None;
    f32_manifest.weights = WeightStorage::F32;
    f32_manifest
}

/// Pairs of runs [`speed_check`] times.
const SPEED_CHECK_PAIRS: usize = 30;

/// Times the quantized `graph` against the f32 graph it came from, in alternation on this
/// machine (one thread, a synthetic picture), and warns when int8 is not the faster one: the
/// artifact records the measurement either way.
fn speed_check(
    manifest: &Manifest,
    graph: &[u8],
    f32_graph: &[u8],
    options: &CompileOptions,
    reporter: &dyn Reporter,
) -> Result<SpeedCheck> {
    let f32_model = graph_model(&all_f32(manifest), f32_graph, options)?;
    let int8_model = graph_model(manifest, graph, options)?;
    let input = vec![manifest
        .preprocessing
        .apply(&graft_runtime::bench::synthetic_image())];
    let (f32_time, int8_time, ratio) = graft_runtime::bench::alternate(
        [&f32_model, &int8_model],
        [&input, &input],
        SPEED_CHECK_PAIRS,
        5,
    )?;
    let check = SpeedCheck {
        f32_ms: f32_time.p50 as f32,
        int8_ms: int8_time.p50 as f32,
        ratio: ratio.p50 as f32,
        kernels: graft_runtime::kernels::Level::current().name().into(),
        cpu: graft_runtime::bench::cpu_name(),
    };
    reporter.message(&format!(
        "speed     int8 {:.2} ms vs f32 {:.2} ms per image on this machine ({:.2}x, {} kernels, 1 thread, {} alternating pairs)",
        check.int8_ms, check.f32_ms, check.ratio, check.kernels, SPEED_CHECK_PAIRS
    ));
    if check.ratio >= 1.0 {
        reporter.message(&format!(
            "warning   the int8 artifact runs {:.2}x the f32 time on this machine ({}, {} kernels): \
             compile with --precision f32 to deploy here, or --int8-layers faster to keep f32 where int8 is slower",
            check.ratio, check.cpu, check.kernels
        ));
    }
    Ok(check)
}

/// Most training images the int8 search runs on (a seeded sample beyond that).
const MAX_PROBE_IMAGES: usize = 1000;

/// Up to `limit` images of `samples` in a seeded order, as [`Preprocessing::pixels`], with
/// their labels; images that do not decode are skipped (the data check reported them). Decoded
/// on `threads` threads, in the same order as one thread would.
fn input_pixels(
    samples: &[Sample],
    limit: usize,
    seed: (u64, &str),
    preprocessing: &Preprocessing,
    threads: usize,
) -> (Vec<Vec<u8>>, Vec<usize>) {
    let mut order: Vec<&Sample> = samples.iter().collect();
    Rng::new(seed.0, seed.1).shuffle(&mut order);
    let (mut images, mut labels) = (Vec::new(), Vec::new());
    let mut candidates = order.as_slice();
    while images.len() < limit && !candidates.is_empty() {
        let (batch, rest) = candidates.split_at((limit - images.len()).min(candidates.len()));
        candidates = rest;
        let decoded = par_map(
            batch,
            threads,
            |sample| {
                preprocessing
                    .load(&sample.path)
                    .ok()
                    .map(|image| (preprocessing.pixels(&image), sample.label))
            },
            || (),
        );
        for (pixels, label) in decoded.into_iter().flatten() {
            images.push(pixels);
            labels.push(label);
        }
    }
    (images, labels)
}

/// The images the int8 search may look at: never those accuracy is reported on.
struct ProbeSamples<'a> {
    /// The images the head was fit on (calibration comes from these).
    fit: &'a [Sample],
    /// The images for choices, which the head was not fit on.
    select: &'a [Sample],
    /// Where `select` came from (`train holdout`, `val`).
    select_source: &'a str,
}

impl ProbeSamples<'_> {
    /// Up to [`MAX_PROBE_IMAGES`] images as [`Preprocessing::pixels`], a seeded sample of the
    /// images for choices and the fitted ones together; and what they are in words. (Taking the
    /// images for choices first, which the head has not seen, was measured on flowers5 and
    /// changed nothing on val: 2.9 % of its predictions changed against 2.8 %, with 9 layers
    /// back in f32 instead of 5.)
    fn pixels(
        &self,
        seed: u64,
        preprocessing: &Preprocessing,
        threads: usize,
    ) -> (Vec<Vec<u8>>, String) {
        let both: Vec<Sample> = self.select.iter().chain(self.fit).cloned().collect();
        let (images, _) = input_pixels(
            &both,
            MAX_PROBE_IMAGES,
            (seed, "quantization probe"),
            preprocessing,
            threads,
        );
        let words = format!(
            "{} ({} and fitted training images)",
            count(images.len(), "image"),
            self.select_source
        );
        (images, words)
    }
}

/// `--precision int8`: calibrates on a seeded sample of the training images, chooses the
/// calibration method and the layers kept in f32 by simulating on up to [`MAX_PROBE_IMAGES`]
/// images of `samples` ([`search`]: top-1 agreement with f32, no labels), and quantizes. The
/// images accuracy is reported on are never looked at.
fn quantize_graph(
    folded: FoldedModel,
    samples: &ProbeSamples,
    preprocessing: &Preprocessing,
    options: &CompileOptions,
    reporter: &dyn Reporter,
) -> Result<(Vec<u8>, QuantizationInfo)> {
    let seed = options.train.seed;
    let (calibration, calibration_images) =
        calibrate_on(&folded.model, samples.fit, preprocessing, options)?;
    let (probe_images, probe_words) = samples.pixels(seed, preprocessing, options.threads);
    let probe = Probe::new(
        &folded.model,
        probe_images,
        preprocessing,
        None,
        options.threads,
    )?;
    let search_options = SearchOptions {
        methods: options
            .calibration
            .map_or(CalibrationMethod::ALL.to_vec(), |m| vec![m]),
        budget: options.accuracy_budget,
        base: QuantizeConfig::default(),
    };
    let result = search(
        &folded.model,
        &calibration,
        &probe,
        &search_options,
        reporter,
    )?;
    if reporter.cancelled() {
        return Err(CompileError::Interrupted);
    }
    report_search(&result, &probe_words, options, reporter);
    let ranges = calibration.ranges(result.method);
    let mut config = result.config.clone();
    let timings = if options.int8_only_where_faster {
        keep_slower_layers_f32(&folded.model, &ranges, &mut config, reporter)?
    } else {
        vec![]
    };
    let layers = layer_precisions(&folded.model, &config, &result, &timings)?;
    let quantized = quantize(&folded.model, &ranges, &config)?;
    let int8 = layers.iter().filter(|l| l.precision == "int8").count();
    reporter.message(&format!(
        "quantize  int8: {int8} of {} layers, {} activation ranges from {calibration_images} training images",
        layers.len(),
        result.method.name()
    ));
    let product_macs = Some(total_product_macs(&folded.model)?);
    let graph = FoldedModel {
        model: quantized,
        classes: folded.classes,
    }
    .to_nnef()?;
    let info = QuantizationInfo {
        method: describe_quantization(result.method, &config),
        calibration_images,
        layers,
        f32_val_accuracy: None,
        val_accuracy: None,
        calibration_trials: calibration_trials(&result),
        accuracy_budget: Some(options.accuracy_budget as f32),
        simulated_accuracy: None,
        probe: Some(probe_words),
        agreement: Some(result.simulated.agreement as f32),
        speed: None,
        product_macs,
    };
    Ok((graph, info))
}

/// Activation ranges of `model` measured on `options.calibration_images` seeded images of `fit`,
/// and how many images that was (undecodable ones are skipped).
fn calibrate_on(
    model: &TypedModel,
    fit: &[Sample],
    preprocessing: &Preprocessing,
    options: &CompileOptions,
) -> Result<(Calibration, usize)> {
    let (pixels, _) = input_pixels(
        fit,
        options.calibration_images,
        (options.train.seed, "calibration"),
        preprocessing,
        options.threads,
    );
    let inputs = pixels
        .iter()
        .map(|pixels| input_tensor(preprocessing, pixels))
        .collect::<Result<Vec<_>>>()?;
    Ok((calibrate(model, &inputs, |_| {})?, pixels.len()))
}

/// `--int8-layers faster`: times every int8 layer of `config` alone on this machine and keeps in
/// f32 those slower in int8; returns the timings.
fn keep_slower_layers_f32(
    model: &TypedModel,
    ranges: &ActivationRanges,
    config: &mut QuantizeConfig,
    reporter: &dyn Reporter,
) -> Result<Vec<LayerTiming>> {
    let timings = time_layers(model, ranges, config, 15)?;
    let slower: Vec<&LayerTiming> = timings.iter().filter(|t| t.int8_ms > t.f32_ms).collect();
    config
        .keep_f32
        .extend(slower.iter().map(|t| t.layer.clone()));
    reporter.message(&format!(
        "quantize  timed alone here: {} of {} int8 layers are slower than in f32 and stay f32 (int8 {:.2} ms vs f32 {:.2} ms in all)",
        slower.len(),
        timings.len(),
        timings.iter().map(|t| t.int8_ms).sum::<f64>(),
        timings.iter().map(|t| t.f32_ms).sum::<f64>(),
    ));
    Ok(timings)
}

/// Every quantizable layer's precision under `config`, with its timings when measured and why it
/// stayed f32 when it did.
fn layer_precisions(
    model: &TypedModel,
    config: &QuantizeConfig,
    result: &SearchResult,
    timings: &[LayerTiming],
) -> Result<Vec<LayerPrecision>> {
    let mut layers = plan(model, config)?;
    for layer in &mut layers {
        let timing = timings.iter().find(|t| t.layer == layer.layer);
        layer.timed_ms = timing.map(|t| [t.f32_ms as f32, t.int8_ms as f32]);
        layer.reason = if result.fallbacks.iter().any(|f| f.layer == layer.layer) {
            Some(artifact::KEPT_F32_FOR_BUDGET.into())
        } else if layer.kind == "depthwise" && !config.depthwise {
            Some(artifact::KEPT_F32_NO_INT8_DEPTHWISE.into())
        } else if timing.is_some_and(|t| t.int8_ms > t.f32_ms) {
            Some(artifact::KEPT_F32_SLOWER_IN_INT8.into())
        } else {
            None
        };
    }
    Ok(layers)
}

/// The quantization scheme in words, as the artifact records it.
fn describe_quantization(method: CalibrationMethod, config: &QuantizeConfig) -> String {
    format!(
        "{} activation ranges (asymmetric per tensor), int8 weights symmetric per {}",
        method.name(),
        if config.per_channel {
            format!(
                "output channel (per tensor for convolutions of more than {} outputs)",
                crate::quantize::MAX_PER_CHANNEL_CONV_OUTPUTS
            )
        } else {
            "tensor".into()
        }
    )
}

/// Every calibration method the search tried, as the artifact records it.
fn calibration_trials(result: &SearchResult) -> Vec<CalibrationTrial> {
    result
        .trials
        .iter()
        .map(|t| CalibrationTrial {
            method: t.method.name().into(),
            simulated_accuracy: None,
            agreement: Some(t.measurement.agreement as f32),
            divergence: Some(t.measurement.divergence as f32),
        })
        .collect()
}

/// Prints what the int8 search measured and chose.
fn report_search(
    result: &SearchResult,
    probe: &str,
    options: &CompileOptions,
    reporter: &dyn Reporter,
) {
    let changed = |m: &Measurement| {
        format!(
            "{:.2} % changed (divergence {:.4})",
            m.disagreement() * 100.0,
            m.divergence
        )
    };
    let trials: Vec<String> = result
        .trials
        .iter()
        .map(|t| format!("{} {}", t.method.name(), changed(&t.measurement)))
        .collect();
    reporter.message(&format!(
        "quantize  simulated int8 on {probe} against f32, top-1 predictions: {}; using {}",
        trials.join(", "),
        result.method.name()
    ));
    if let Some(per_channel) = result.per_channel {
        reporter.message(&format!(
            "quantize  per-channel weight scales: {} ({})",
            changed(&per_channel),
            if result.config.per_channel {
                "kept: closer to f32"
            } else {
                "not kept: no closer to f32"
            }
        ));
    }
    let budget = options.accuracy_budget * 100.0;
    let now = changed(&result.simulated);
    if result.fallbacks.is_empty() {
        reporter.message(&format!(
            "quantize  {now}, within the {budget:.2} % budget: no layer falls back to f32"
        ));
    } else {
        let names: Vec<&str> = result.fallbacks.iter().map(|f| f.layer.as_str()).collect();
        reporter.message(&format!(
            "quantize  {} most sensitive layers back to f32 for the {budget:.2} % budget ({now} now): {}",
            names.len(),
            names.join(", ")
        ));
    }
}

/// The cheap part of `graft check-data`, from the content hashes extraction computed anyway:
/// validation images identical to training images, and identical images under two labels.
fn warn_about_duplicates(
    samples: &[Sample],
    train_count: usize,
    extraction: &Extraction,
    classes: &[String],
    reporter: &dyn Reporter,
) {
    let mut first_seen: HashMap<[u8; 32], (usize, bool)> = HashMap::new();
    let (mut leaked, mut conflicts) = (0, Vec::new());
    for (i, (sample, hash)) in samples.iter().zip(&extraction.content_hashes).enumerate() {
        let Some(hash) = hash else { continue };
        let is_val = i >= train_count;
        match first_seen.get(hash) {
            Some(&(label, seen_in_val)) => {
                if is_val && !seen_in_val {
                    leaked += 1;
                }
                if label != sample.label {
                    conflicts.push(format!(
                        "{} ({} and {})",
                        sample.path.display(),
                        classes[label],
                        classes[sample.label]
                    ));
                }
            }
            None => {
                first_seen.insert(*hash, (sample.label, is_val));
            }
        }
    }
    if leaked > 0 {
        reporter.message(&format!(
            "warning   {leaked} validation images are identical to training images: validation accuracy is inflated (graft check-data lists them)"
        ));
    }
    if !conflicts.is_empty() {
        reporter.message(&format!(
            "warning   {} under two labels: {}",
            match conflicts.len() {
                1 => "1 image appears".to_string(),
                n => format!("{n} images appear"),
            },
            conflicts.join(", ")
        ));
    }
}

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

fn head_train_accuracy(head: &TrainedHead, train: &Features) -> f32 {
    let pairs = train.labels.iter().copied().zip(head.predict(train));
    ConfusionMatrix::from_pairs(head.layers.last().map_or(0, |l| l.outputs), pairs).accuracy()
}

/// `--keep-imagenet-head`: the backbone's own classifier, softmax appended, no training.
fn compile_with_own_head(
    options: &CompileOptions,
    backbone: Backbone,
    preprocessing: Preprocessing,
    reporter: &dyn Reporter,
    started: Instant,
) -> Result<CompileReport> {
    let outputs = backbone.output_names();
    let [output] = &outputs[..] else {
        return Err(CompileError::InvalidOption(format!(
            "--keep-imagenet-head needs a backbone with one output, it has {}",
            outputs.len()
        )));
    };
    let cut = backbone.cut(output)?;
    let classes = cut.feature_dim();
    let labels = match &options.labels_file {
        Some(path) => read_labels(path, classes)?,
        None => (0..classes).map(|i| format!("class_{i}")).collect(),
    };
    reporter.message(&format!(
        "head      the backbone's own classifier ({output:?}, {classes} classes), softmax appended"
    ));
    let manifest = manifest_for(
        &cut,
        &preprocessing,
        &labels,
        &HeadSummary::backbone_classifier(classes),
    );
    let mut manifest = manifest;
    let graph = cut.into_folded(&[])?.to_nnef()?;
    let narrowed = narrow_weights(&graph, options.weights, &mut manifest, reporter)?;
    let bytes = artifact::encode(&manifest, narrowed.as_deref().unwrap_or(&graph));
    artifact::write_atomic(&options.out, &bytes)?;
    Ok(CompileReport {
        manifest,
        artifact_bytes: bytes.len() as u64,
        cache_hits: 0,
        computed: 0,
        skipped: Vec::new(),
        head_val_accuracy: None,
        artifact_val_accuracy: None,
        extract_seconds: 0.0,
        total_seconds: started.elapsed().as_secs_f64(),
        evaluation: None,
    })
}

/// The f32 graph, run end to end, must measure what the head measured on the features it was
/// trained and evaluated on (the same images, the same graph): both see identical tensors, so
/// they differ by rounding at most. A gap of more than 10 points (and 3 images) means the
/// features were not this graph's (a damaged or stale cache that passed its checks, a bug), and
/// the artifact is refused rather than written with a number that is not its own.
fn check_graph_agrees_with_head(
    head_accuracy: f32,
    graph: &graft_runtime::eval::Evaluation,
    source: &str,
    cache: Option<&FeatureCache>,
) -> Result<()> {
    let images = graph.confusion.total().max(1) as f32;
    let gap = head_accuracy - graph.accuracy();
    if gap <= 0.10 || gap * images < 3.0 {
        return Ok(());
    }
    let hint = match cache {
        Some(cache) => format!(
            "the cached features do not match the backbone; delete {} or compile with --no-cache",
            cache.dir().display()
        ),
        None => "this is a bug in graft; please report it".into(),
    };
    Err(CompileError::Inconsistent(format!(
        "verify: the artifact classifies {} {source} images with accuracy {:.4}, but the head measured {head_accuracy:.4} on the features it was trained with: {hint}. No artifact written",
        graph.confusion.total(),
        graph.accuracy()
    )))
}

/// Fails early, before any work, when the artifact could not be written at `out`.
fn check_output_path(out: &Path) -> Result<()> {
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if out.is_dir() {
        return Err(CompileError::InvalidOption(format!(
            "--out {}: is a folder, expected a file name",
            out.display()
        )));
    }
    if !parent.is_dir() {
        return Err(CompileError::InvalidOption(format!(
            "--out {}: folder {} does not exist",
            out.display(),
            parent.display()
        )));
    }
    graft_runtime::artifact::check_writable(out).map_err(|e| match e {
        graft_runtime::Error::Io { source, .. } => CompileError::InvalidOption(format!(
            "--out {}: cannot write into folder {}: {source}",
            out.display(),
            parent.display()
        )),
        other => other.into(),
    })
}

/// Refuses an `--out` that is one of the compile's input files (the same file by identity, so
/// links and `./` spellings are caught too): the artifact would replace it.
fn check_out_is_not_an_input<'a>(
    out: &Path,
    inputs: impl IntoIterator<Item = (&'static str, &'a Path)>,
) -> Result<()> {
    let Some(target) = FileId::of(out) else {
        return Ok(()); // a file that does not exist yet is nobody's input
    };
    for (what, input) in inputs {
        if FileId::of(input) == Some(target) {
            return Err(CompileError::InvalidOption(format!(
                "--out {}: is {what} {} (writing the artifact would replace it); choose another file",
                out.display(),
                input.display()
            )));
        }
    }
    Ok(())
}

/// A file's identity: device and inode on Unix, the canonical path elsewhere.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
struct FileId {
    #[cfg(unix)]
    id: (u64, u64),
    #[cfg(not(unix))]
    id: u64,
}

impl FileId {
    fn of(path: &Path) -> Option<FileId> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let meta = std::fs::metadata(path).ok()?;
            Some(FileId {
                id: (meta.dev(), meta.ino()),
            })
        }
        #[cfg(not(unix))]
        {
            use std::hash::{Hash, Hasher};
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            path.canonicalize().ok()?.hash(&mut hasher);
            Some(FileId {
                id: hasher.finish(),
            })
        }
    }
}

/// Largest labels file read (a million 64-byte labels).
const LABELS_FILE_LIMIT: u64 = 64 << 20;

/// Reads one label per line; the count must match the model's outputs.
pub fn read_labels(path: &Path, expected: usize) -> Result<Vec<String>> {
    let bytes = graft_runtime::read::read_regular(path, LABELS_FILE_LIMIT, "labels")?;
    let text = String::from_utf8(bytes).map_err(|_| {
        CompileError::InvalidOption(format!("{}: labels file is not UTF-8", path.display()))
    })?;
    let labels: Vec<String> = text.lines().map(|l| l.trim().to_string()).collect();
    for (line, label) in labels.iter().enumerate() {
        if let Some(reason) = graft_runtime::artifact::label_problem(label) {
            return Err(CompileError::InvalidOption(format!(
                "{}: line {}: label {label:?} {reason}",
                path.display(),
                line + 1
            )));
        }
    }
    if labels.len() != expected {
        return Err(CompileError::InvalidOption(format!(
            "{}: has {} labels, the model has {expected} outputs",
            path.display(),
            labels.len()
        )));
    }
    Ok(labels)
}

/// The rows of `all` whose images are among `samples` (those whose features were extracted).
fn rows_of(all: &Features, samples: &[Sample]) -> Features {
    let paths: HashSet<&Path> = samples.iter().map(|s| s.path.as_path()).collect();
    let rows: Vec<usize> = (0..all.rows())
        .filter(|&i| paths.contains(all.paths[i].as_path()))
        .collect();
    all.select(&rows)
}

/// The samples of `samples` whose features were extracted (undecodable images are skipped).
fn usable(samples: &[Sample], features: &Features) -> Vec<Sample> {
    let extracted: HashSet<&Path> = features.paths.iter().map(|p| p.as_path()).collect();
    samples
        .iter()
        .filter(|s| extracted.contains(s.path.as_path()))
        .cloned()
        .collect()
}

fn check_every_class_present(features: &Features, classes: &[String], what: &str) -> Result<()> {
    let counts = graft_runtime::dataset::counts(
        &features
            .labels
            .iter()
            .map(|&label| Sample {
                path: PathBuf::new(),
                label,
            })
            .collect::<Vec<_>>(),
        classes.len(),
    );
    match counts.iter().position(|&n| n == 0) {
        Some(c) => Err(CompileError::NotEnoughData(format!(
            "class {:?} has no decodable {what} images",
            classes[c]
        ))),
        None => Ok(()),
    }
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
