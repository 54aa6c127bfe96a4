//! `graft`: the transfer-learning compiler's command line.

/// mimalloc, told to keep freed memory (see [`keep_freed_memory`]).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Training allocates and frees activations of tens of megabytes every step; returned to the
/// kernel, they come back as fresh zeroed pages (perf: 40 % of from-scratch training time in
/// `clear_page`). Never purging freed memory doubles training throughput; the process keeps its
/// peak memory until it exits, which a compiler run can afford.
fn keep_freed_memory() {
    // libmimalloc-sys names no constant for mi_option_purge_delay: in mimalloc's option enum
    // (v2 and v3) it comes right before mi_option_use_numa_nodes.
    let purge_delay = libmimalloc_sys::mi_option_use_numa_nodes - 1;
    // SAFETY: setting an option is a plain store, valid at any time.
    unsafe { libmimalloc_sys::mi_option_set(purge_delay, -1) };
}

mod interrupt;
mod ui;

use graft_runtime::progress::count;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};
use graft_compiler::finetune::{FinetuneConfig, OptimizerKind, Schedule, Strategy, Unfreeze};
use graft_compiler::head::train::{HeadKind, TrainConfig};
use graft_compiler::pipeline::advise::{advise, follow_advice, AUTO_CHOOSES_CUT};
use graft_compiler::pipeline::{compile, CompileOptions, CompileReport, Reporter};
use graft_compiler::quantize::Precision;
use graft_compiler::CompileError;
use graft_runtime::bench::BenchArgs;
use graft_runtime::commands::{self, EvalArgs, InspectArgs, Outcome, PredictArgs};
use graft_runtime::parallel::default_threads;
use graft_runtime::preprocess::{ChannelOrder, Normalization, Pipeline, ResizeFilter};
use graft_runtime::weights::WeightStorage;
use ui::{TerminalUi, Verbosity};

/// graft turns an ImageNet-pretrained ONNX backbone and a folder of labelled images into one
/// deployable classifier artifact, and runs it.
///
/// Exit codes: 0 success, 1 bad input (missing or corrupt files, bad options, images skipped),
/// 2 internal error.
#[derive(Parser)]
#[command(name = "graft", version, propagate_version = true)]
struct Cli {
    /// Print nothing but results and errors.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// Also log each pipeline stage (import, cut, extract, train, fold, quantize, verify, write)
    /// with its duration and numbers on stderr; -vv adds every epoch.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a new head on a backbone's features and write one artifact.
    #[command(after_help = COMPILE_EXAMPLES)]
    Compile(Box<CompileArgs>),
    /// Top-k labels for images.
    #[command(
        after_help = "Example:\n  graft predict model.graft bee.jpg photos/ --top-k 2 --json"
    )]
    Predict(PredictArgs),
    /// Accuracy, per-class precision/recall and confusion matrix on labelled images.
    #[command(
        after_help = "Examples:\n  graft eval model.graft data/   (uses data/val when present)\n  graft eval model.graft data/ --report report/   (then open report/index.html)"
    )]
    Eval(GraftEvalArgs),
    /// Show what an artifact contains: labels, preprocessing, provenance, metrics.
    #[command(after_help = "Example:\n  graft inspect model.graft --json")]
    Inspect(InspectArgs),
    /// Load time, latency percentiles, throughput and memory of an artifact on this machine.
    #[command(
        after_help = "Example:\n  graft bench model.graft photo.jpg --iterations 200 --threads 2 --json"
    )]
    Bench(BenchArgs),
    /// Compile the bundled fixtures (EfficientNet-Lite0 + 72 ant/bee photos), then predict.
    Demo(DemoArgs),
    /// Check a labelled image folder before training: counts, undecodable files, duplicates and
    /// near duplicates (leakage between train and val, label conflicts), tiny images,
    /// placeholders, imbalance. Exits 1 when it finds errors.
    #[command(
        name = "check-data",
        after_help = "Example:\n  graft check-data data/ --json"
    )]
    CheckData(CheckDataArgs),
    /// List where an ONNX backbone can be cut (`--cut`): the ends of its blocks and stages, with
    /// their shapes and feature sizes, the default cut marked.
    #[command(
        name = "inspect-backbone",
        after_help = "Example:\n  graft inspect-backbone efficientnet_lite0.onnx --json"
    )]
    InspectBackbone(InspectBackboneArgs),
    /// Measure how well a backbone's features transfer to a dataset and recommend what to
    /// transfer: cross-validated linear probes at several cuts, the backbone's own classifier's
    /// confidence on the images, images per class. `graft compile --strategy auto` follows it.
    #[command(after_help = ADVISE_EXAMPLES)]
    Advise(AdviseArgs),
    /// Print a shell completion script for graft.
    #[command(
        after_help = "Examples:\n  graft completions bash > ~/.local/share/bash-completion/completions/graft\n  graft completions zsh > ~/.zfunc/_graft\n  graft completions fish > ~/.config/fish/completions/graft.fish"
    )]
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

const ADVISE_EXAMPLES: &str = "Examples:
  graft advise --backbone efficientnet_lite0.onnx --data flowers/
  graft advise --backbone efficientnet_lite0.onnx --data flowers/ --plot probes.svg --json

Only the training images are looked at (DIR/train, or what compile keeps for training after
holding out --val-fraction), so the validation accuracy of the advised compile stays honest.
Features of every probed cut go to the feature cache that compile reads.";

#[derive(Args, Debug)]
struct AdviseArgs {
    /// ONNX backbone.
    #[arg(long, value_name = "ONNX")]
    backbone: PathBuf,
    /// Labelled images: DIR/<class>/*, DIR/train/<class>/* or DIR/{train,val}/<class>/*.
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// Also write the plot of probe accuracy vs cut depth to this SVG file.
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,
    /// Print one JSON document instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    preprocess: PreprocessArgs,
    #[command(flatten, next_help_heading = "Data split")]
    split: SplitArgs,
    #[command(flatten, next_help_heading = None)]
    work: WorkArgs,
}

fn run_advise(args: &AdviseArgs, verbosity: Verbosity) -> Result<Outcome, Failure> {
    let ui = TerminalUi::new(verbosity);
    let mut options = CompileOptions::new(&args.backbone, PathBuf::new());
    options.data = Some(args.data.clone());
    args.preprocess.apply(&mut options);
    args.split.apply(&mut options);
    options.cache_dir = args.work.cache_dir();
    options.threads = args.work.threads();
    let advice = advise(&options, &ui)?;
    if let Some(plot) = &args.plot {
        graft_runtime::artifact::write_atomic(plot, advice.plot_svg().as_bytes())?;
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &advice).map_err(std::io::Error::from)?;
        writeln!(out)?;
    } else {
        write!(out, "{}", advice.to_text())?;
    }
    Ok(Outcome::Complete)
}

#[derive(Args, Debug)]
struct GraftEvalArgs {
    #[command(flatten)]
    eval: EvalArgs,
    /// Also write an HTML report (confusion matrix, per-class precision/recall, misclassified
    /// images, training curves from the artifact, latency, size) and metrics.json into this
    /// folder.
    #[arg(long, value_name = "DIR")]
    report: Option<PathBuf>,
}

fn run_eval(args: &GraftEvalArgs, ui: &TerminalUi) -> Result<Outcome, Failure> {
    if let Some(dir) = &args.report {
        graft_compiler::report::check_report_dir(dir)?;
    }
    let mut stdout = std::io::stdout().lock();
    let (outcome, evaluation) = commands::eval_returning(&args.eval, &mut stdout, ui)?;
    if let Some(dir) = &args.report {
        let page = write_report(
            dir,
            &args.eval.model,
            &evaluation,
            format!("{}", args.eval.data.display()),
        )?;
        ui.message(&format!("report    {}", page.display()));
    }
    Ok(outcome)
}

/// Writes the report of `artifact` evaluated as `evaluation`, with its latency.
fn write_report(
    dir: &Path,
    artifact: &Path,
    evaluation: &graft_runtime::eval::Evaluation,
    evaluated_on: String,
) -> Result<PathBuf, Failure> {
    let model = graft_runtime::Model::load(artifact)?;
    let latency = graft_compiler::report::measure_latency(&model, 20)?;
    let artifact_bytes = std::fs::metadata(artifact)
        .map_err(|e| Failure {
            message: format!("{}: {e}", artifact.display()),
            code: 1,
        })?
        .len();
    let input = graft_compiler::report::ReportInput {
        title: format!("graft report: {}", artifact.display()),
        artifact,
        artifact_bytes,
        manifest: model.manifest(),
        evaluation,
        evaluated_on,
        latency: Some(latency),
    };
    Ok(graft_compiler::report::write_report(dir, &input)?)
}

#[derive(Args, Debug)]
struct InspectBackboneArgs {
    /// ONNX backbone.
    #[arg(value_name = "ONNX")]
    backbone: PathBuf,
    /// Input size HxW, for backbones whose input height and width are dynamic.
    #[arg(long, value_name = "HxW", value_parser = parse_size)]
    input_size: Option<[usize; 2]>,
    /// Print one JSON document instead of text.
    #[arg(long)]
    json: bool,
}

fn run_inspect_backbone(
    args: &InspectBackboneArgs,
    out: &mut dyn std::io::Write,
) -> Result<Outcome, Failure> {
    let backbone =
        graft_compiler::backbone::import::Backbone::load(&args.backbone, args.input_size)?;
    let points = backbone.cut_points()?;
    let default = backbone.default_cut().ok();
    let blocks = default
        .as_deref()
        .map(|cut| backbone.blocks(cut))
        .unwrap_or_default();
    if args.json {
        let doc = serde_json::json!({
            "backbone": backbone.path(),
            "input": backbone.input_shape(),
            "default_cut": default,
            "cut_points": points,
            "blocks": blocks,
        });
        serde_json::to_writer_pretty(&mut *out, &doc).map_err(std::io::Error::from)?;
        writeln!(out)?;
        return Ok(Outcome::Complete);
    }
    writeln!(
        out,
        "backbone  {} (input {:?}): {} cut points, from input to output",
        backbone.path().display(),
        backbone.input_shape(),
        points.len()
    )?;
    let width = points
        .iter()
        .map(|p| p.tensor.len())
        .max()
        .unwrap_or(6)
        .max(6);
    let op_width = points.iter().map(|p| p.op.len()).max().unwrap_or(2).max(2);
    writeln!(
        out,
        "{:>5}  {:<width$}  {:<op_width$}  {:<18} {:>8}",
        "depth", "tensor", "op", "shape", "features"
    )?;
    for p in &points {
        let features = p.shape.get(1).copied().unwrap_or(0);
        let marker = if default.as_deref() == Some(p.tensor.as_str()) {
            "  <- default cut (pooled features before the classifier)"
        } else {
            ""
        };
        writeln!(
            out,
            "{:>4.0}%  {:<width$}  {:<op_width$}  {:<18} {:>8}{marker}",
            p.depth * 100.0,
            p.tensor,
            p.op,
            format!("{:?}", p.shape),
            features
        )?;
    }
    writeln!(
        out,
        "Use one with graft compile --cut TENSOR; [1, C, H, W] maps are global-average-pooled to C features."
    )?;
    write_blocks(out, &blocks)
}

/// The blocks `--strategy finetune --unfreeze N` counts, from the top.
fn write_blocks(
    out: &mut dyn std::io::Write,
    blocks: &[graft_compiler::backbone::points::Block],
) -> Result<Outcome, Failure> {
    if blocks.is_empty() {
        return Ok(Outcome::Complete);
    }
    writeln!(
        out,
        "\n{} blocks with weights below the default cut; --strategy finetune --unfreeze N retrains the top N:",
        blocks.len()
    )?;
    let line: Vec<String> = blocks
        .iter()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let plural = if b.nodes == 1 { "" } else { "s" };
            format!("{}. {} ({} layer{plural})", i + 1, b.name, b.nodes)
        })
        .collect();
    writeln!(out, "  {}", line.join(", "))?;
    Ok(Outcome::Complete)
}

#[derive(Args, Debug)]
struct CheckDataArgs {
    /// Labelled images: DIR/<class>/*, DIR/train/<class>/* or DIR/{train,val}/<class>/*.
    #[arg(value_name = "DIR")]
    data: PathBuf,
    /// Print one JSON document (every finding with every path) instead of text.
    #[arg(long)]
    json: bool,
    /// Worker threads [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
}

/// Paths printed per finding in text mode (`--json` lists them all).
const SHOWN_PATHS: usize = 10;

fn run_check_data(
    args: &CheckDataArgs,
    out: &mut dyn std::io::Write,
    ui: &TerminalUi,
) -> Result<Outcome, Failure> {
    use graft_compiler::data::check::{check_data, Severity};
    let threads = args
        .threads
        .unwrap_or_else(graft_runtime::parallel::default_threads);
    let report = check_data(&args.data, threads, ui)?;
    let errors = report.count(Severity::Error);
    if args.json {
        serde_json::to_writer_pretty(&mut *out, &report).map_err(std::io::Error::from)?;
        writeln!(out)?;
    } else {
        writeln!(
            out,
            "data      {}: {} classes{}, {} files ignored (not images)",
            report.root.display(),
            report.classes.len(),
            report
                .val_split
                .as_ref()
                .map(|v| format!(", splits train/{v}"))
                .unwrap_or_default(),
            report.ignored_files
        )?;
        let width = report
            .classes
            .iter()
            .map(|c| c.class.len())
            .max()
            .unwrap_or(5)
            .max(5);
        writeln!(out, "{:<width$} {:>7} {:>7}", "class", "train", "val")?;
        for c in &report.classes {
            writeln!(out, "{:<width$} {:>7} {:>7}", c.class, c.train, c.val)?;
        }
        for finding in &report.findings {
            let label = match finding.severity {
                Severity::Error => "error",
                Severity::Warning => "warning",
            };
            writeln!(out, "{label:<9} {} [{}]", finding.message, finding.kind)?;
            for path in finding.paths.iter().take(SHOWN_PATHS) {
                writeln!(out, "          {}", path.display())?;
            }
            if finding.paths.len() > SHOWN_PATHS {
                writeln!(
                    out,
                    "          ... and {} more (--json lists them all)",
                    finding.paths.len() - SHOWN_PATHS
                )?;
            }
        }
        writeln!(
            out,
            "{errors} errors, {} warnings",
            report.count(Severity::Warning)
        )?;
    }
    Ok(if errors > 0 {
        Outcome::Partial
    } else {
        Outcome::Complete
    })
}

const COMPILE_EXAMPLES: &str = "Examples:
  graft compile --backbone efficientnet_lite0.onnx --data hymenoptera/ --out bees.graft
  graft compile --backbone b.onnx --data flowers/ --out f.graft --head mlp:256 --normalize tf
  graft compile --backbone b.onnx --data flowers/ --out f.graft --strategy finetune --unfreeze 2
  graft compile --backbone b.onnx --data flowers/ --out f.graft --strategy auto   (see graft advise)
  graft compile --backbone b.onnx --keep-imagenet-head --labels imagenet.txt --out imagenet.graft

DATA is DIR/<class>/<image> or DIR/train/<class>/<image> (20 % of each class is held out for
validation, seeded), DIR/{train,val}/<class>/<image> or DIR/{train,val,test}/<class>/<image>. Every choice (epoch,
int8 calibration and fallbacks, fine-tuning epoch) is made on a seeded 20 % of the training
images, so the validation accuracy is held out; with a test split, choices are made on val and
the test accuracy is the held-out number. Features of the frozen backbone are cached, so a second
compile on the same images (e.g. with another head) skips extraction.";

#[derive(Args, Debug)]
struct CompileArgs {
    /// ONNX backbone (an ImageNet classifier such as EfficientNet-Lite, MobileNet, ResNet).
    #[arg(long, value_name = "ONNX")]
    backbone: PathBuf,
    /// Labelled images: DIR/<class>/*, DIR/train/<class>/* or DIR/{train,val}/<class>/*.
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "keep_imagenet_head"
    )]
    data: Option<PathBuf>,
    /// Artifact to write (replaced atomically).
    #[arg(long, short, value_name = "FILE")]
    out: PathBuf,
    #[command(flatten)]
    preprocess: PreprocessArgs,
    /// Tensor to cut the backbone at [default: the input of its last Gemm/MatMul, i.e. the pooled
    /// features]. A [1,C,H,W] feature map is global-average-pooled.
    #[arg(long, value_name = "TENSOR", help_heading = "Head training")]
    cut: Option<String>,
    /// Head to train: linear (softmax regression, AdamW), logreg (logistic regression solved to
    /// convergence) or svm (one-vs-rest linear SVM), both with the L2 strength chosen by 5-fold
    /// cross-validation, or mlp:H (H hidden units, ReLU, dropout).
    #[arg(long, default_value = "linear", value_parser = parse_head, help_heading = "Head training")]
    head: HeadKind,
    /// Maximum training epochs.
    #[arg(long, default_value_t = TrainConfig::default().epochs, value_parser = parse_count, help_heading = "Head training")]
    epochs: usize,
    /// Mini-batch size.
    #[arg(long, default_value_t = TrainConfig::default().batch_size, value_parser = parse_count, help_heading = "Head training")]
    batch_size: usize,
    /// AdamW learning rate.
    #[arg(long, default_value_t = TrainConfig::default().learning_rate, value_parser = parse_learning_rate, help_heading = "Head training")]
    lr: f64,
    /// AdamW decoupled weight decay.
    #[arg(long, default_value_t = TrainConfig::default().weight_decay, value_parser = parse_weight_decay, help_heading = "Head training")]
    weight_decay: f64,
    /// Stop after this many epochs without a lower loss on the images for choices (a holdout of
    /// the training images; val with a test split).
    #[arg(long, default_value_t = TrainConfig::default().patience, value_parser = parse_count, help_heading = "Head training")]
    patience: usize,
    /// Dropout before the output layer of an mlp head.
    #[arg(long, default_value_t = TrainConfig::default().dropout, value_parser = parse_fraction::<f32>, help_heading = "Head training")]
    dropout: f32,
    /// Class weights in the training loss: none, or auto (inverse class frequency, so a class
    /// with few images counts as much as a large one; see `graft check-data` for imbalance).
    #[arg(long, default_value = "none", value_parser = ["none", "auto"], help_heading = "Head training")]
    class_weights: String,
    #[command(flatten, next_help_heading = "Head training")]
    split: SplitArgs,
    #[command(flatten, next_help_heading = None)]
    work: WorkArgs,
    /// What to train: head (frozen backbone, new head), finetune (the head first, then the top
    /// --unfreeze blocks and the head together at small learning rates), scratch (every layer
    /// from random weights: the no-transfer baseline), or auto (run `graft advise` first and
    /// follow it: it sets --cut, --head, --strategy and --unfreeze).
    #[arg(long, default_value = "head", value_parser = parse_strategy, help_heading = "Fine-tuning")]
    strategy: StrategyChoice,
    /// Blocks to retrain with --strategy finetune: the top N blocks with weights (see graft
    /// inspect-backbone for the graph), or all.
    #[arg(long, default_value = "2", value_parser = parse_unfreeze, value_name = "N|all", help_heading = "Fine-tuning")]
    unfreeze: Unfreeze,
    /// Retrain everything after this tensor instead of --unfreeze N (a cut point of graft
    /// inspect-backbone).
    #[arg(
        long,
        value_name = "TENSOR",
        conflicts_with = "unfreeze",
        help_heading = "Fine-tuning"
    )]
    unfreeze_from: Option<String>,
    /// Optimizer of the joint training: adamw, or sgd (with momentum).
    #[arg(long, default_value = "adamw", value_parser = parse_optimizer, help_heading = "Fine-tuning")]
    optimizer: OptimizerKind,
    /// Learning rate of the retrained backbone layers [default: 1e-4, 1e-3 from scratch].
    #[arg(long, value_name = "LR", value_parser = parse_learning_rate, help_heading = "Fine-tuning")]
    backbone_lr: Option<f64>,
    /// Learning rate of the head during joint training.
    #[arg(long, value_name = "LR", default_value_t = FinetuneConfig::new(Strategy::Finetune).head_learning_rate, value_parser = parse_learning_rate, help_heading = "Fine-tuning")]
    finetune_head_lr: f64,
    /// Weight decay of the joint training (decoupled for adamw, L2 for sgd).
    #[arg(long, value_name = "WD", default_value_t = FinetuneConfig::new(Strategy::Finetune).weight_decay, value_parser = parse_weight_decay, help_heading = "Fine-tuning")]
    finetune_weight_decay: f64,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9, value_parser = parse_fraction::<f64>, help_heading = "Fine-tuning")]
    momentum: f64,
    /// Learning-rate schedule: cosine, step (/10 after each third) or constant.
    #[arg(long, default_value = "cosine", value_parser = parse_schedule, help_heading = "Fine-tuning")]
    schedule: Schedule,
    /// Maximum epochs of joint training.
    #[arg(long, value_name = "N", default_value_t = FinetuneConfig::new(Strategy::Finetune).epochs, value_parser = parse_count, help_heading = "Fine-tuning")]
    finetune_epochs: usize,
    /// Stop joint training after this many epochs without a lower loss on the images for
    /// choices.
    #[arg(long, value_name = "N", default_value_t = FinetuneConfig::new(Strategy::Finetune).patience, value_parser = parse_count, help_heading = "Fine-tuning")]
    finetune_patience: usize,
    /// Mini-batch size of joint training.
    #[arg(long, value_name = "N", default_value_t = FinetuneConfig::new(Strategy::Finetune).batch_size, value_parser = parse_count, help_heading = "Fine-tuning")]
    finetune_batch_size: usize,
    /// Label smoothing of the joint training's loss: the target spreads this much probability
    /// evenly over the classes, which keeps the fine-tuned head from growing overconfident.
    #[arg(long, value_name = "EPS", default_value_t = FinetuneConfig::new(Strategy::Finetune).label_smoothing, value_parser = parse_fraction::<f64>, help_heading = "Fine-tuning")]
    label_smoothing: f64,
    /// Do not augment training images (random crops, flips, colour jitter); the frozen layers
    /// then run once per image instead of once per image and epoch.
    #[arg(long, help_heading = "Fine-tuning")]
    no_augment: bool,
    /// Where candle trains: cpu, or cuda (GPU 0; needs a build with --features cuda).
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"], help_heading = "Fine-tuning")]
    device: String,
    /// Graph precision: f32, or int8 (convolutions and 1x1 products quantized after training,
    /// activation ranges calibrated on training images; the artifact records the held-out
    /// validation accuracy of both, and both graphs' latency on this machine, with a warning when int8 is
    /// not the faster one). See docs/PERFORMANCE.md for int8 speed by CPU.
    #[arg(long, default_value = "f32", value_parser = parse_precision, help_heading = "Precision")]
    precision: Precision,
    /// Training images to calibrate int8 activation ranges on.
    #[arg(
        long,
        default_value_t = 32,
        value_name = "N",
        help_heading = "Precision"
    )]
    calibration_images: usize,
    /// How int8 activation ranges are chosen: auto (simulate min-max, percentile and entropy on
    /// training images and keep the one whose outputs stay closest to f32), or one of them.
    #[arg(long, default_value = "auto", value_parser = ["auto", "min-max", "percentile", "entropy"], help_heading = "Precision")]
    calibration: String,
    /// Share of the training images, in percent, whose top-1 class int8 may change against f32
    /// (which bounds the accuracy it can lose on them); beyond it the most sensitive layers
    /// (measured one by one) go back to f32 until the simulated graph fits. Measured on up to
    /// 1000 training images, never on val or test.
    #[arg(long, default_value_t = 1.0, value_name = "PERCENT", value_parser = parse_budget, help_heading = "Precision")]
    accuracy_budget: f64,
    /// Which layers may be int8: all that the accuracy budget allows, or only those that also
    /// run faster in int8 than in f32 when timed alone on this machine (use `faster` when
    /// compiling on the CPU the artifact will run on).
    #[arg(long, default_value = "all", value_parser = ["all", "faster"], help_heading = "Precision")]
    int8_layers: String,
    /// How the artifact stores its large weight tensors: f32, f16 (half the size) or int8
    /// (symmetric per output channel, a quarter). They are widened back to f32 when the artifact
    /// is loaded, so inference runs at f32 speed; the end-to-end check measures the accuracy.
    #[arg(long, default_value = "f32", value_parser = parse_weights, help_heading = "Precision")]
    weights: WeightStorage,
    /// Skip running the finished artifact on the validation images.
    #[arg(long, help_heading = "Output")]
    no_verify: bool,
    /// Also write an HTML report (training curves, confusion matrix, per-class
    /// precision/recall, misclassified images, f32 vs quantized accuracy, latency, size) and
    /// metrics.json into this folder.
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with = "no_verify",
        help_heading = "Output"
    )]
    report: Option<PathBuf>,
    /// Keep the backbone's own classifier (no training, --data not needed): an artifact of the
    /// unmodified model, for checking the import against the original.
    #[arg(long, help_heading = "Output")]
    keep_imagenet_head: bool,
    /// Class names for --keep-imagenet-head, one per line, in output order.
    #[arg(
        long,
        value_name = "FILE",
        requires = "keep_imagenet_head",
        help_heading = "Output"
    )]
    labels: Option<PathBuf>,
    /// Print the compile report as JSON on stdout.
    #[arg(long, help_heading = "Output")]
    json: bool,
}

#[derive(Args, Debug)]
struct DemoArgs {
    /// Folder for the demo artifact and its feature cache.
    #[arg(long, value_name = "DIR", default_value = default_demo_dir())]
    out: PathBuf,
    /// The `fixtures` folder of a graft checkout (the backbone and the ant/bee photos), for a
    /// `graft` installed elsewhere [default: the checkout this binary was built from].
    #[arg(long, value_name = "DIR")]
    fixtures: Option<PathBuf>,
}

fn default_demo_dir() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/../target/graft-demo")
}

fn fixtures_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
    dir.canonicalize().unwrap_or(dir)
}

fn parse_head(s: &str) -> Result<HeadKind, String> {
    s.parse()
}

/// `--normalize`: a normalisation, or `auto`.
#[derive(Debug, Clone)]
enum NormalizeChoice {
    Auto,
    Fixed(Normalization),
}

impl NormalizeChoice {
    /// The fixed normalisation, or `None` for `auto` (the compiler probes the backbone).
    fn normalization(&self) -> Option<Normalization> {
        match self {
            NormalizeChoice::Auto => None,
            NormalizeChoice::Fixed(n) => Some(n.clone()),
        }
    }
}

fn parse_normalization(s: &str) -> Result<NormalizeChoice, String> {
    match s {
        "auto" => Ok(NormalizeChoice::Auto),
        _ => s.parse().map(NormalizeChoice::Fixed),
    }
}

fn parse_filter(s: &str) -> Result<ResizeFilter, String> {
    s.parse()
}

fn parse_pipeline(s: &str) -> Result<Pipeline, String> {
    s.parse()
}

fn parse_size(s: &str) -> Result<[usize; 2], String> {
    let err = || format!("expected HxW such as 224x224, got {s:?}");
    let (h, w) = s.split_once(['x', 'X']).ok_or_else(err)?;
    let h: usize = h.trim().parse().map_err(|_| err())?;
    let w: usize = w.trim().parse().map_err(|_| err())?;
    if h == 0 || w == 0 || h > 16_384 || w > 16_384 {
        return Err(err());
    }
    Ok([h, w])
}

/// `s` (trimmed) as a `T` that `valid` accepts, else the error "`s` `expected`". Numeric
/// options go through it so that NaN, infinities and out-of-range values fail at once, naming
/// the option, instead of after the whole compile.
fn parse_checked<T: std::str::FromStr>(
    s: &str,
    valid: impl Fn(&T) -> bool,
    expected: &str,
) -> Result<T, String> {
    s.trim()
        .parse::<T>()
        .ok()
        .filter(|v| valid(v))
        .ok_or_else(|| format!("{s:?} {expected}"))
}

/// A learning rate: a number greater than 0 and at most 1.
fn parse_learning_rate(s: &str) -> Result<f64, String> {
    parse_checked(
        s,
        |&v| v > 0.0 && v <= 1.0,
        "is not a learning rate: expected a number greater than 0 and at most 1",
    )
}

/// A weight decay: a number from 0 to 100.
fn parse_weight_decay(s: &str) -> Result<f64, String> {
    parse_checked(
        s,
        |v| (0.0..=100.0).contains(v),
        "is not a weight decay: expected a number from 0 to 100",
    )
}

/// A probability such as a dropout rate or a momentum: at least 0 and less than 1.
fn parse_fraction<T: std::str::FromStr + PartialOrd + From<f32>>(s: &str) -> Result<T, String> {
    parse_checked(
        s,
        |v| *v >= T::from(0.0) && *v < T::from(1.0),
        "is not a fraction: expected a number from 0 up to (not including) 1",
    )
}

/// A count of at least 1 (epochs, batch size, patience).
fn parse_count(s: &str) -> Result<usize, String> {
    parse_checked(
        s,
        |&v| v >= 1,
        "is not a count: expected a whole number of at least 1",
    )
}

fn parse_budget(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=100.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a percentage from 0 to 100")),
    }
}

fn parse_precision(s: &str) -> Result<Precision, String> {
    s.parse()
}

fn parse_weights(s: &str) -> Result<WeightStorage, String> {
    s.parse()
}

/// How images become input tensors, shared by compile and advise (advise probes with the
/// preprocessing the compile will use).
#[derive(Args, Debug)]
#[command(next_help_heading = "Preprocessing")]
struct PreprocessArgs {
    /// Input normalisation: auto (ask the backbone's own classifier which of imagenet, tf, unit
    /// it was trained with), imagenet, tf ((x-127)/128), unit (x/255), none, or custom
    /// M,S / M1,M2,M3,S1,S2,S3 on the 0..1 scale.
    #[arg(long, default_value = "auto", value_parser = parse_normalization)]
    normalize: NormalizeChoice,
    /// Resize the shorter image side to this before the centre crop [default: crop / 0.875].
    #[arg(long, value_name = "PIXELS")]
    resize: Option<u32>,
    /// Resize filter: bilinear, bicubic or nearest.
    #[arg(long, default_value = "bilinear", value_parser = parse_filter)]
    filter: ResizeFilter,
    /// How images are decoded and resized: fast (large JPEGs decoded at 1/2, 1/4 or 1/8 scale by
    /// libjpeg-turbo, never below the resize, other images as reference does; SIMD resize of the
    /// crop only), reference (full-size decode and the `image` crate's resize, which artifacts
    /// made before this option record) or fast-v1 (fast, with libjpeg-turbo for full-scale JPEGs
    /// too: the first fast pipeline). Recorded in the artifact; the runtime follows it.
    #[arg(long, default_value = "fast", value_parser = parse_pipeline)]
    pipeline: Pipeline,
    /// Feed channels as BGR instead of RGB.
    #[arg(long)]
    bgr: bool,
    /// Input size HxW, for backbones whose input height and width are dynamic.
    #[arg(long, value_name = "HxW", value_parser = parse_size)]
    input_size: Option<[usize; 2]>,
}

impl PreprocessArgs {
    fn channel_order(&self) -> ChannelOrder {
        if self.bgr {
            ChannelOrder::Bgr
        } else {
            ChannelOrder::Rgb
        }
    }

    fn apply(&self, options: &mut CompileOptions) {
        options.input_size = self.input_size;
        options.normalization = self.normalize.normalization();
        options.resize_shorter = self.resize;
        options.filter = self.filter;
        options.pipeline = self.pipeline;
        options.channel_order = self.channel_order();
    }
}

/// Which images make the choices, shared by compile and advise (advise looks only at the images
/// the compile trains and chooses on).
#[derive(Args, Debug)]
struct SplitArgs {
    /// Seed for the holdouts, the cross-validation folds, initialisation, shuffling and
    /// dropout.
    #[arg(long, default_value_t = TrainConfig::default().seed)]
    seed: u64,
    /// Fraction of each class held out for validation when DIR has no val split, and of the
    /// training images held out to make choices on.
    #[arg(long, default_value_t = 0.2)]
    val_fraction: f32,
}

impl SplitArgs {
    fn apply(&self, options: &mut CompileOptions) {
        options.train.seed = self.seed;
        options.val_fraction = self.val_fraction;
    }
}

/// Feature cache and worker threads, shared by compile and advise.
#[derive(Args, Debug)]
struct WorkArgs {
    /// Feature cache folder [default: $GRAFT_CACHE_DIR, else $XDG_CACHE_HOME/graft, else
    /// ~/.cache/graft].
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Do not read or write the feature cache.
    #[arg(long, conflicts_with = "cache_dir")]
    no_cache: bool,
    /// Worker threads for feature extraction and evaluation [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
}

impl WorkArgs {
    fn cache_dir(&self) -> Option<PathBuf> {
        if self.no_cache {
            None
        } else {
            Some(self.cache_dir.clone().unwrap_or_else(default_cache_dir))
        }
    }

    fn threads(&self) -> usize {
        self.threads.unwrap_or_else(default_threads)
    }
}

fn default_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("GRAFT_CACHE_DIR") {
        return dir.into();
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("graft");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".cache/graft"),
        None => PathBuf::from(".graft-cache"),
    }
}

/// `--strategy`: one of the fixed strategies, or `auto` (follow `graft advise`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum StrategyChoice {
    Auto,
    Fixed(Strategy),
}

fn parse_strategy(s: &str) -> Result<StrategyChoice, String> {
    if s == "auto" {
        return Ok(StrategyChoice::Auto);
    }
    s.parse()
        .map(StrategyChoice::Fixed)
        .map_err(|_| format!("unknown strategy {s:?}: expected head, finetune, scratch or auto"))
}

fn parse_unfreeze(s: &str) -> Result<Unfreeze, String> {
    s.parse()
}

fn parse_optimizer(s: &str) -> Result<OptimizerKind, String> {
    s.parse()
}

fn parse_schedule(s: &str) -> Result<Schedule, String> {
    s.parse()
}

/// The candle device `--device` names.
fn training_device(name: &str) -> Result<candle_core::Device, Failure> {
    match name {
        "cuda" => cuda_device(),
        _ => Ok(candle_core::Device::Cpu),
    }
}

#[cfg(feature = "cuda")]
fn cuda_device() -> Result<candle_core::Device, Failure> {
    candle_core::Device::new_cuda(0).map_err(|e| Failure {
        message: format!("--device cuda: no usable CUDA GPU: {e}"),
        code: 1,
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda_device() -> Result<candle_core::Device, Failure> {
    Err(Failure {
        message: "--device cuda: this graft was built without CUDA; rebuild with \
                  `cargo build --release --features cuda` on a machine with the CUDA toolkit"
            .into(),
        code: 1,
    })
}

impl CompileArgs {
    /// The fine-tuning settings, when --strategy asks for more than a head.
    fn finetune(&self) -> Result<Option<FinetuneConfig>, Failure> {
        let strategy = match self.strategy {
            StrategyChoice::Fixed(Strategy::Head) | StrategyChoice::Auto => return Ok(None),
            StrategyChoice::Fixed(strategy) => strategy,
        };
        let mut config = FinetuneConfig::new(strategy);
        if strategy == Strategy::Finetune {
            config.unfreeze = match &self.unfreeze_from {
                Some(tensor) => Unfreeze::From(tensor.clone()),
                None => self.unfreeze.clone(),
            };
        }
        if let Some(lr) = self.backbone_lr {
            config.backbone_learning_rate = lr;
        }
        config.head_learning_rate = self.finetune_head_lr;
        config.weight_decay = self.finetune_weight_decay;
        config.optimizer = self.optimizer;
        config.momentum = self.momentum;
        config.schedule = self.schedule;
        config.epochs = self.finetune_epochs;
        config.patience = self.finetune_patience;
        config.batch_size = self.finetune_batch_size;
        config.label_smoothing = self.label_smoothing;
        if self.no_augment {
            config.augmentation = None;
        }
        config.seed = self.split.seed;
        config.balance_classes = self.class_weights == "auto";
        config.device = training_device(&self.device)?;
        if config.epochs == 0 || config.batch_size == 0 {
            return Err(Failure {
                message: "--finetune-epochs and --finetune-batch-size must be at least 1".into(),
                code: 1,
            });
        }
        Ok(Some(config))
    }

    fn options(&self) -> Result<CompileOptions, Failure> {
        let mut options = CompileOptions {
            backbone: self.backbone.clone(),
            data: self.data.clone(),
            out: self.out.clone(),
            cut: self.cut.clone(),
            keep_imagenet_head: self.keep_imagenet_head,
            labels_file: self.labels.clone(),
            train: TrainConfig {
                head: self.head,
                epochs: self.epochs,
                batch_size: self.batch_size,
                learning_rate: self.lr,
                weight_decay: self.weight_decay,
                patience: self.patience,
                dropout: self.dropout,
                balance_classes: self.class_weights == "auto",
                ..TrainConfig::default()
            },
            cache_dir: self.work.cache_dir(),
            threads: self.work.threads(),
            verify: !self.no_verify,
            precision: self.precision,
            calibration_images: self.calibration_images,
            calibration: (self.calibration != "auto")
                .then(|| self.calibration.parse())
                .transpose()
                .map_err(|message: String| Failure { message, code: 1 })?,
            accuracy_budget: self.accuracy_budget / 100.0,
            int8_only_where_faster: self.int8_layers == "faster",
            weights: self.weights,
            finetune: self.finetune()?,
            ..CompileOptions::new(&self.backbone, &self.out)
        };
        self.preprocess.apply(&mut options);
        self.split.apply(&mut options);
        Ok(options)
    }
}

/// An error message with the exit code it maps to.
struct Failure {
    message: String,
    code: u8,
}

impl From<CompileError> for Failure {
    fn from(e: CompileError) -> Self {
        let code = match &e {
            CompileError::Interrupted => interrupt::EXIT_CODE,
            e if e.is_user_error() => 1,
            _ => 2,
        };
        Failure {
            message: e.to_string(),
            code,
        }
    }
}

impl From<graft_runtime::Error> for Failure {
    fn from(e: graft_runtime::Error) -> Self {
        if e.is_broken_pipe() {
            return Failure::broken_pipe();
        }
        CompileError::from(e).into()
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            return Failure::broken_pipe();
        }
        Failure {
            message: format!("writing output: {e}"),
            code: 2,
        }
    }
}

impl Failure {
    /// The reader of stdout went away (`graft ... | head -1`): stop quietly, with success.
    fn broken_pipe() -> Failure {
        Failure {
            message: String::new(),
            code: 0,
        }
    }
}

fn print_report(report: &CompileReport, out_path: &Path, json: bool) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    let m = &report.manifest;
    if json {
        let doc = serde_json::json!({
            "artifact": graft_runtime::paths::lossy(out_path),
            "artifact_bytes": report.artifact_bytes,
            "labels": m.labels,
            "cache_hits": report.cache_hits,
            "computed": report.computed,
            "skipped": report.skipped.iter().map(|(p, e)| serde_json::json!({"path": graft_runtime::paths::lossy(p), "error": e})).collect::<Vec<_>>(),
            "head_val_accuracy": report.head_val_accuracy,
            "artifact_val_accuracy": report.artifact_val_accuracy,
            "extract_seconds": report.extract_seconds,
            "total_seconds": report.total_seconds,
            "manifest": m,
        });
        // `io::Error::from` keeps a closed pipe's kind (quiet exit 0, as before this wrote JSON
        // through a string); `other` would turn it into an error.
        serde_json::to_writer_pretty(&mut out, &doc).map_err(std::io::Error::from)?;
        writeln!(out)?;
        return Ok(());
    }
    if let Some(metrics) = &m.metrics {
        let confusion = graft_runtime::eval::ConfusionMatrix {
            counts: metrics.confusion.clone(),
        };
        let held_out = match metrics.selection_source.as_deref() {
            Some("val") => "used for choices".to_string(),
            Some(_) => "held out: no choice made on them".to_string(),
            None => "also used for choices (artifact made before graft held images out)".into(),
        };
        writeln!(
            out,
            "validation accuracy {:.4} ({}, {held_out})",
            metrics.val_accuracy,
            count(
                metrics.val_images,
                &format!("{} image", metrics.validation_source)
            )
        )?;
        if let (Some(accuracy), Some(images)) = (metrics.test_accuracy, metrics.test_images) {
            writeln!(
                out,
                "test accuracy {accuracy:.4} ({}, held out: no choice made on them)",
                count(images, "test image")
            )?;
        }
        write!(out, "{}", confusion.display(&m.labels))?;
    }
    if !report.skipped.is_empty() {
        writeln!(out, "{} undecodable image(s) skipped", report.skipped.len())?;
    }
    writeln!(
        out,
        "wrote {} ({:.1} MiB, {} classes) in {:.1}s",
        out_path.display(),
        report.artifact_bytes as f64 / (1 << 20) as f64,
        m.labels.len(),
        report.total_seconds
    )?;
    Ok(())
}

fn run_compile(args: &CompileArgs, verbosity: Verbosity) -> Result<Outcome, Failure> {
    let ui = TerminalUi::new(verbosity);
    let mut options = args.options()?;
    if let Some(dir) = &args.report {
        graft_compiler::report::check_report_dir(dir)?;
    }
    if args.strategy == StrategyChoice::Auto {
        // --unfreeze-from only reaches the options with --strategy finetune: checked here.
        if args.unfreeze_from.is_some() {
            return Err(CompileError::InvalidOption(AUTO_CHOOSES_CUT.into()).into());
        }
        follow_advice(&mut options, &ui)?;
    }
    let report = compile(&options, &ui)?;
    if let (Some(dir), Some(evaluation)) = (&args.report, &report.evaluation) {
        let page = write_report(
            dir,
            &args.out,
            evaluation,
            match report.manifest.metrics.as_ref() {
                Some(m) if m.selection_source.as_deref() == Some("val") => {
                    "the validation split, which the compile's choices were made on".into()
                }
                Some(m) if m.validation_source == "holdout" => {
                    "validation images held out of the folder; no choice made on them".into()
                }
                _ => "the validation split; no choice made on it".into(),
            },
        )?;
        ui.message(&format!("report    {}", page.display()));
    }
    print_report(&report, &args.out, args.json)?;
    Ok(Outcome::Complete)
}

fn run_demo(args: &DemoArgs, verbosity: Verbosity) -> Result<Outcome, Failure> {
    let fixtures = args.fixtures.clone().unwrap_or_else(fixtures_dir);
    let backbone = fixtures.join("efficientnet_lite0.onnx");
    let data = fixtures.join("hymenoptera-mini");
    if !backbone.is_file() || !data.is_dir() {
        return Err(Failure {
            message: format!(
                "the demo needs the fixtures folder of a graft checkout ({} has no efficientnet_lite0.onnx and hymenoptera-mini); pass --fixtures DIR",
                fixtures.display()
            ),
            code: 1,
        });
    }
    std::fs::create_dir_all(&args.out).map_err(|e| Failure {
        message: format!("{}: {e}", args.out.display()),
        code: 1,
    })?;
    let model = args.out.join("hymenoptera.graft");
    let compile_args = CompileArgs::parse_from_demo(&backbone, &data, &model, &args.out);
    graft_runtime::progress::note(format_args!(
        "graft demo: compiling {} + {}",
        backbone.display(),
        data.display()
    ));
    run_compile(&compile_args, verbosity)?;
    let val = data.join("val");
    let images: Vec<PathBuf> = ["ants", "bees"]
        .iter()
        .flat_map(|c| {
            let mut files: Vec<PathBuf> = std::fs::read_dir(val.join(c))
                .into_iter()
                .flatten()
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            files.sort();
            files.into_iter().take(2)
        })
        .collect();
    println!("\ngraft predict {} <4 validation images>:", model.display());
    let predict = PredictArgs {
        model: model.clone(),
        images,
        top_k: 2u16,
        json: false,
        jsonl: false,
        threads: None,
        batch: 32,
    };
    let outcome = commands::predict(
        &predict,
        &mut std::io::stdout().lock(),
        &TerminalUi::new(verbosity),
    )?;
    println!(
        "\nNext: graft inspect {0}   |   graft eval {0} {1}",
        model.display(),
        data.display()
    );
    Ok(outcome)
}

impl CompileArgs {
    fn parse_from_demo(backbone: &Path, data: &Path, out: &Path, dir: &Path) -> CompileArgs {
        let mut args = vec![
            "compile".into(),
            "--backbone".into(),
            backbone.as_os_str().to_owned(),
            "--data".into(),
            data.as_os_str().to_owned(),
            "--out".into(),
            out.as_os_str().to_owned(),
            "--cache-dir".into(),
            dir.join("cache").into_os_string(),
        ];
        args.insert(0, "graft".into());
        match Cli::parse_from(args).command {
            Command::Compile(c) => *c,
            _ => unreachable!("parsed a compile command"),
        }
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 1 } else { 0 });
        }
    };
    interrupt::install_handler();
    let verbosity = Verbosity::from_flags(cli.quiet, cli.verbose);
    if verbosity >= Verbosity::Stages {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .event_format(ui::LogLines)
            .init();
    }
    let ui = TerminalUi::new(verbosity);
    let mut stdout = std::io::stdout().lock();
    let result: Result<Outcome, Failure> = match &cli.command {
        Command::Compile(args) => {
            drop(stdout);
            run_compile(args, verbosity)
        }
        Command::Predict(args) => commands::predict(args, &mut stdout, &ui).map_err(Into::into),
        Command::Eval(args) => {
            drop(stdout);
            run_eval(args, &ui)
        }
        Command::Inspect(args) => commands::inspect(args, &mut stdout).map_err(Into::into),
        Command::Bench(args) => graft_runtime::bench::bench(args, &mut stdout).map_err(Into::into),
        Command::Demo(args) => {
            drop(stdout);
            run_demo(args, verbosity)
        }
        Command::CheckData(args) => run_check_data(args, &mut stdout, &ui),
        Command::InspectBackbone(args) => run_inspect_backbone(args, &mut stdout),
        Command::Advise(args) => {
            drop(stdout);
            run_advise(args, verbosity)
        }
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "graft", &mut script);
            stdout
                .write_all(&script)
                .map(|()| Outcome::Complete)
                .map_err(Into::into)
        }
    };
    match result {
        Ok(Outcome::Complete) => ExitCode::SUCCESS,
        Ok(Outcome::Partial) => ExitCode::from(1),
        Err(failure) if failure.code == 0 => ExitCode::SUCCESS,
        Err(failure) => {
            graft_runtime::progress::note(format_args!("error: {}", failure.message));
            ExitCode::from(failure.code)
        }
    }
}
