//! Fine-tune: retrain the top blocks of the backbone together with the head, or the whole
//! network from random weights (the baseline that shows what transfer is worth).
//!
//! The backbone is split at a boundary tensor. The frozen part below it runs in tract, once per
//! image when images are not augmented (its outputs are kept in memory) or once per image and
//! epoch when they are. The trainable part above it is translated to candle
//! ([`crate::finetune::translate`]) with its ONNX weights as variables, and trained with the head by
//! AdamW or SGD with momentum, the backbone at a smaller learning rate than the head, on a
//! cosine or step schedule, early-stopping on the validation loss. The weights of the best epoch
//! are written back into the ONNX initializers, so cutting, folding, quantizing and the runtime
//! handle a fine-tuned backbone exactly like the original.

pub mod adamw;
pub mod augment;
pub mod profile;
pub mod translate;

use std::borrow::Cow;
use std::fmt;
use std::ops::ControlFlow;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use graft_runtime::artifact::{EpochRecord, TransferInfo};
use graft_runtime::dataset::Sample;
use graft_runtime::parallel::par_map;
use graft_runtime::preprocess::Preprocessing;
use graft_runtime::progress::Progress;
use image::DynamicImage;
use tract_onnx::prelude::{tvec, IntoRunnable, IntoTValue, TypedSimplePlan};

use crate::backbone::import::Backbone;
use crate::error::{CompileError, Result};
use crate::finetune::adamw::FusedAdamW;
use crate::finetune::augment::Augmentation;
use crate::finetune::translate::Subgraph;
use crate::head::train::{
    class_weights, correct_predictions, weighted_cross_entropy, EarlyStopping, HeadKind, Layer,
    Network, TrainedHead,
};
use crate::util::rng::Rng;

/// What to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// Frozen backbone, new head (feature extraction / linear probe).
    #[default]
    Head,
    /// Head first, then the top blocks and the head together at small learning rates.
    Finetune,
    /// Every layer from random weights, no pretraining: the baseline.
    Scratch,
}

impl FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "head" => Ok(Strategy::Head),
            "finetune" => Ok(Strategy::Finetune),
            "scratch" => Ok(Strategy::Scratch),
            _ => Err(format!(
                "unknown strategy {s:?}: expected head, finetune or scratch"
            )),
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Strategy::Head => "head",
            Strategy::Finetune => "finetune",
            Strategy::Scratch => "scratch",
        })
    }
}

/// Which part of the backbone is trained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unfreeze {
    /// The top N weighted blocks (see [`Backbone::blocks`]).
    Blocks(usize),
    /// Every layer.
    All,
    /// Everything after this tensor.
    From(String),
}

impl FromStr for Unfreeze {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if s == "all" {
            return Ok(Unfreeze::All);
        }
        match s.parse::<usize>() {
            Ok(n) if n >= 1 => Ok(Unfreeze::Blocks(n)),
            _ => Err(format!(
                "--unfreeze {s:?}: expected a number of top blocks (1 or more) or \"all\""
            )),
        }
    }
}

/// As the `--unfreeze` value (a number of blocks, or `"all"`) in `graft advise --json`; an
/// `--unfreeze-from` tensor as its name.
impl serde::Serialize for Unfreeze {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Unfreeze::Blocks(n) => serializer.serialize_u64(*n as u64),
            Unfreeze::All => serializer.serialize_str("all"),
            Unfreeze::From(tensor) => serializer.serialize_str(tensor),
        }
    }
}

impl fmt::Display for Unfreeze {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unfreeze::Blocks(n) => write!(f, "{n}"),
            Unfreeze::All => f.write_str("all"),
            Unfreeze::From(tensor) => f.write_str(tensor),
        }
    }
}

/// Optimizer of the joint training.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptimizerKind {
    /// AdamW (decoupled weight decay).
    AdamW,
    /// SGD with heavy-ball momentum and L2 weight decay.
    Sgd,
}

impl FromStr for OptimizerKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "adamw" => Ok(OptimizerKind::AdamW),
            "sgd" => Ok(OptimizerKind::Sgd),
            _ => Err(format!("unknown optimizer {s:?}: expected adamw or sgd")),
        }
    }
}

impl fmt::Display for OptimizerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OptimizerKind::AdamW => "adamw",
            OptimizerKind::Sgd => "sgd",
        })
    }
}

/// Learning-rate schedule over the epochs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// The same rate every epoch.
    Constant,
    /// Half a cosine from the base rate to zero.
    Cosine,
    /// The base rate, divided by 10 after each third of the epochs.
    Step,
}

impl Schedule {
    /// Factor of the base rate in epoch `epoch` (0-based) of `epochs`.
    pub fn factor(self, epoch: usize, epochs: usize) -> f64 {
        let progress = epoch as f64 / epochs.max(1) as f64;
        match self {
            Schedule::Constant => 1.0,
            Schedule::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            Schedule::Step => 0.1f64.powi((progress * 3.0).floor() as i32),
        }
    }
}

impl FromStr for Schedule {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "constant" => Ok(Schedule::Constant),
            "cosine" => Ok(Schedule::Cosine),
            "step" => Ok(Schedule::Step),
            _ => Err(format!(
                "unknown schedule {s:?}: expected cosine, step or constant"
            )),
        }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Schedule::Constant => "constant",
            Schedule::Cosine => "cosine",
            Schedule::Step => "step",
        })
    }
}

/// Settings of fine-tuning and of training from scratch.
#[derive(Debug, Clone)]
pub struct FinetuneConfig {
    /// `Finetune` or `Scratch` (`Head` never reaches this module).
    pub strategy: Strategy,
    /// What to unfreeze (ignored by `Scratch`, which trains everything).
    pub unfreeze: Unfreeze,
    /// Optimizer.
    pub optimizer: OptimizerKind,
    /// Learning rate of the unfrozen backbone layers.
    pub backbone_learning_rate: f64,
    /// Learning rate of the head.
    pub head_learning_rate: f64,
    /// Weight decay (decoupled for AdamW, L2 for SGD).
    pub weight_decay: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Maximum epochs.
    pub epochs: usize,
    /// Stop after this many epochs without a better validation loss.
    pub patience: usize,
    /// Mini-batch size.
    pub batch_size: usize,
    /// Label smoothing of the training loss: the target puts this much probability evenly on
    /// all classes (0: plain cross-entropy). The loss that picks the epoch stays plain.
    pub label_smoothing: f64,
    /// Random variations of the training images, or none (frozen outputs computed once).
    pub augmentation: Option<Augmentation>,
    /// Seed of initialisation, shuffling and augmentation.
    pub seed: u64,
    /// Weight classes by inverse frequency in the loss.
    pub balance_classes: bool,
    /// Where candle trains.
    pub device: Device,
}

impl FinetuneConfig {
    /// Defaults for `strategy`: AdamW, backbone 1e-4 / head 1e-3 for fine-tuning (1e-3 for both
    /// from scratch), weight decay 1e-4, cosine schedule, 10 epochs (patience 5), batch 16, no
    /// label smoothing, augmentation on, top 2 blocks, CPU.
    pub fn new(strategy: Strategy) -> FinetuneConfig {
        let scratch = strategy == Strategy::Scratch;
        FinetuneConfig {
            strategy,
            unfreeze: if scratch {
                Unfreeze::All
            } else {
                Unfreeze::Blocks(2)
            },
            optimizer: OptimizerKind::AdamW,
            backbone_learning_rate: if scratch { 1e-3 } else { 1e-4 },
            head_learning_rate: 1e-3,
            weight_decay: 1e-4,
            momentum: 0.9,
            schedule: Schedule::Cosine,
            epochs: 10,
            patience: 5,
            batch_size: 16,
            label_smoothing: 0.0,
            augmentation: Some(Augmentation::default()),
            seed: 42,
            balance_classes: false,
            device: Device::Cpu,
        }
    }
}

/// The backbone split into a frozen prefix (tract) and a trainable part (candle).
pub struct TrainablePart {
    /// Tensor between the two parts.
    pub boundary: String,
    /// Names of the unfrozen blocks.
    pub blocks: Vec<String>,
    /// The trainable part.
    pub subgraph: Subgraph,
    prefix: Option<Arc<TypedSimplePlan>>,
    input_shape: Vec<usize>,
    boundary_shape: Vec<usize>,
}

impl TrainablePart {
    /// Splits `backbone` below `unfreeze`, the trainable part ending at tensor `cut`.
    pub fn new(
        backbone: &Backbone,
        cut: &str,
        unfreeze: &Unfreeze,
        device: &Device,
    ) -> Result<TrainablePart> {
        let blocks = backbone.blocks(cut);
        let boundary = match unfreeze {
            Unfreeze::All => backbone.input_name().to_string(),
            Unfreeze::From(tensor) => tensor.clone(),
            Unfreeze::Blocks(n) => {
                let Some(first) = blocks.len().checked_sub(*n).map(|i| &blocks[i]) else {
                    return Err(CompileError::InvalidOption(format!(
                        "--unfreeze {n}: the backbone has only {} blocks with weights before {cut:?}",
                        blocks.len()
                    )));
                };
                backbone.boundary_before(first.first_node)
            }
        };
        let subgraph =
            Subgraph::extract(backbone.onnx_graph(), &boundary, cut, device, DType::F32)?;
        let boundary_index = backbone
            .onnx_graph()
            .node
            .iter()
            .position(|n| n.output.contains(&boundary));
        let unfrozen = blocks
            .iter()
            .filter(|b| boundary_index.is_none_or(|i| b.first_node > i))
            .map(|b| b.name.clone())
            .collect();
        let input_shape = backbone.input_shape().to_vec();
        let (prefix, boundary_shape) = if boundary == backbone.input_name() {
            (None, input_shape.clone())
        } else {
            let model = backbone.prefix(&boundary)?;
            let fact = model
                .output_fact(0)
                .map_err(CompileError::graph("prefix"))?;
            let shape = fact
                .shape
                .as_concrete()
                .map(|s| s.to_vec())
                .ok_or_else(|| CompileError::Untrainable {
                    node: boundary.clone(),
                    reason: "its shape is not fixed".into(),
                })?;
            let plan = graft_runtime::kernels::into_optimized(model)
                .and_then(|m| m.into_runnable())
                .map_err(CompileError::graph("prefix"))?;
            (Some(plan), shape)
        };
        Ok(TrainablePart {
            boundary,
            blocks: unfrozen,
            subgraph,
            prefix,
            input_shape,
            boundary_shape,
        })
    }

    /// Number of values of one image's boundary tensor.
    pub fn boundary_len(&self) -> usize {
        self.boundary_shape[1..].iter().product()
    }

    /// The boundary tensor of one preprocessed image (`[3, H, W]` values), computed by tract.
    pub fn boundary_of(&self, chw: Vec<f32>) -> Result<Vec<f32>> {
        let Some(plan) = &self.prefix else {
            return Ok(chw);
        };
        let input = tract_onnx::prelude::Tensor::from_shape(&self.input_shape, &chw)
            .map_err(CompileError::graph("prefix"))?;
        let out = plan
            .run(tvec!(input.into_tvalue()))
            .map_err(CompileError::graph("prefix"))?;
        Ok(out[0]
            .view()
            .as_slice::<f32>()
            .map_err(CompileError::graph("prefix"))?
            .to_vec())
    }

    /// `[N, D]` features of a batch of boundary tensors (flattened, `N * boundary_len` values):
    /// the trainable part, then global average pooling when the cut is a feature map.
    pub fn features(&self, boundary: &Tensor, train: bool) -> Result<Tensor> {
        let mut shape = self.boundary_shape.clone();
        shape[0] = boundary.elem_count() / self.boundary_len();
        let out = self.subgraph.forward(&boundary.reshape(shape)?, train)?;
        Ok(match out.rank() {
            4 => out.mean(D::Minus1)?.mean(D::Minus1)?,
            _ => out.flatten_from(1)?,
        })
    }
}

/// The result of fine-tuning: the backbone with trained weights and the head trained with it.
pub struct FineTuned {
    /// The backbone, its trained initializers replaced.
    pub backbone: Backbone,
    /// The head, on the fine-tuned backbone's raw features (the initial head itself when no
    /// epoch of joint training beat it).
    pub head: TrainedHead,
    /// What was done, for the manifest.
    pub info: TransferInfo,
}

/// SGD with heavy-ball momentum: `v = m v + g + wd w`, `w -= lr v`.
struct SgdMomentum {
    vars: Vec<Var>,
    velocity: Vec<Option<Tensor>>,
    learning_rate: f64,
    momentum: f64,
    weight_decay: f64,
}

impl SgdMomentum {
    fn step(&mut self, grads: &candle_core::backprop::GradStore) -> candle_core::Result<()> {
        for (var, velocity) in self.vars.iter().zip(self.velocity.iter_mut()) {
            let Some(grad) = grads.get(var) else {
                continue;
            };
            let grad = (grad + (var.as_tensor() * self.weight_decay)?)?;
            let v = match velocity.take() {
                Some(v) => ((v * self.momentum)? + grad)?,
                None => grad,
            };
            var.set(&(var.as_tensor() - (&v * self.learning_rate)?)?)?;
            *velocity = Some(v);
        }
        Ok(())
    }
}

/// One optimizer per parameter group (backbone, head), so each has its own learning rate.
enum GroupOptimizer {
    AdamW(AdamW),
    /// AdamW in place, for f32 weights on the CPU.
    FusedAdamW(FusedAdamW),
    Sgd(SgdMomentum),
}

impl GroupOptimizer {
    fn new(
        kind: OptimizerKind,
        vars: Vec<Var>,
        learning_rate: f64,
        config: &FinetuneConfig,
    ) -> candle_core::Result<GroupOptimizer> {
        let params = ParamsAdamW {
            lr: learning_rate,
            weight_decay: config.weight_decay,
            ..ParamsAdamW::default()
        };
        let cpu_f32 = vars
            .iter()
            .all(|v| v.device().is_cpu() && v.dtype() == DType::F32);
        Ok(match kind {
            OptimizerKind::AdamW if cpu_f32 => {
                GroupOptimizer::FusedAdamW(FusedAdamW::new(vars, params))
            }
            OptimizerKind::AdamW => GroupOptimizer::AdamW(AdamW::new(vars, params)?),
            OptimizerKind::Sgd => GroupOptimizer::Sgd(SgdMomentum {
                velocity: vec![None; vars.len()],
                vars,
                learning_rate,
                momentum: config.momentum,
                weight_decay: config.weight_decay,
            }),
        })
    }

    fn set_learning_rate(&mut self, lr: f64) {
        match self {
            GroupOptimizer::AdamW(o) => o.set_learning_rate(lr),
            GroupOptimizer::FusedAdamW(o) => o.set_learning_rate(lr),
            GroupOptimizer::Sgd(o) => o.learning_rate = lr,
        }
    }

    fn step(&mut self, grads: &candle_core::backprop::GradStore) -> candle_core::Result<()> {
        match self {
            GroupOptimizer::AdamW(o) => o.step(grads),
            GroupOptimizer::FusedAdamW(o) => o.step(grads),
            GroupOptimizer::Sgd(o) => o.step(grads),
        }
    }
}

/// Decoded images with their labels; undecodable ones are left out (extraction reports them).
struct Images {
    images: Vec<DynamicImage>,
    labels: Vec<usize>,
}

fn decode_all(
    samples: &[Sample],
    preprocessing: &Preprocessing,
    threads: usize,
    progress: &dyn Progress,
    what: &str,
) -> Images {
    progress.start(what, samples.len());
    let decoded = par_map(
        samples,
        threads,
        |s| preprocessing.load(&s.path).ok(),
        || progress.advance(),
    );
    progress.finish();
    let mut out = Images {
        images: Vec::new(),
        labels: Vec::new(),
    };
    for (sample, image) in samples.iter().zip(decoded) {
        if let Some(image) = image {
            out.images.push(image);
            out.labels.push(sample.label);
        }
    }
    out
}

/// What to fine-tune on: the backbone cut at tensor `cut`, its preprocessing, the training
/// images, the images the epoch is chosen on, and the head trained on frozen features that
/// starts the joint training (`None` from scratch: the head then starts at zero).
pub struct FinetuneData<'a> {
    /// The backbone.
    pub backbone: &'a Backbone,
    /// The tensor the head reads.
    pub cut: &'a str,
    /// How images become input tensors.
    pub preprocessing: &'a Preprocessing,
    /// Images the weights are trained on.
    pub train: &'a [Sample],
    /// Images the epoch is chosen on (by loss).
    pub val: &'a [Sample],
    /// Number of classes.
    pub classes: usize,
    /// The head trained on frozen features.
    pub initial_head: Option<&'a TrainedHead>,
}

/// Trains the part of the backbone above the boundary chosen by `config`, and a head on its
/// features at the cut, on the training images, early-stopping on the images for choices: set
/// up, then one epoch at a time, each evaluated, the best kept. `on_epoch` is called after every
/// epoch; `ControlFlow::Break` stops with [`CompileError::Interrupted`].
pub fn finetune(
    data: &FinetuneData,
    config: &FinetuneConfig,
    threads: usize,
    progress: &dyn Progress,
    on_epoch: &mut dyn FnMut(&EpochRecord) -> ControlFlow<()>,
) -> Result<FineTuned> {
    let _denormals = FlushDenormals::on();
    train_jointly(data, config, threads, progress, on_epoch)
}

/// Denormal floats flushed to zero (x86's FTZ and DAZ bits) on this thread and rayon's, until
/// dropped. Lite0 has no BatchNorm, so from random weights some activations and gradients shrink
/// into the denormal range, where each multiply-add costs many times a normal one: a
/// from-scratch epoch of hymenoptera ran its 1x1 convolutions' forward pass 1.3x slower than
/// fine-tuning did (`GRAFT_TRAINING_PROFILE=1`, same run).
struct FlushDenormals(Option<u32>);

impl FlushDenormals {
    fn on() -> FlushDenormals {
        let previous = mxcsr(None);
        if let Some(bits) = previous {
            let flushed = bits | 0x8040;
            rayon::broadcast(|_| mxcsr(Some(flushed)));
            mxcsr(Some(flushed));
        }
        FlushDenormals(previous)
    }
}

impl Drop for FlushDenormals {
    fn drop(&mut self) {
        if let Some(bits) = self.0 {
            rayon::broadcast(|_| mxcsr(Some(bits)));
            mxcsr(Some(bits));
        }
    }
}

/// Reads this thread's MXCSR (x86-64 only), setting it first to `set` when given.
fn mxcsr(set: Option<u32>) -> Option<u32> {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: reads and writes the calling thread's SSE control register only.
    #[allow(deprecated)]
    unsafe {
        use std::arch::x86_64::{_mm_getcsr, _mm_setcsr};
        if let Some(bits) = set {
            _mm_setcsr(bits);
        }
        Some(_mm_getcsr())
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = set;
        None
    }
}

/// [`finetune`]'s epochs, early stopping and result.
fn train_jointly(
    data: &FinetuneData,
    config: &FinetuneConfig,
    threads: usize,
    progress: &dyn Progress,
    on_epoch: &mut dyn FnMut(&EpochRecord) -> ControlFlow<()>,
) -> Result<FineTuned> {
    let mut run = JointTraining::new(data, config, threads, progress)?;
    // Epoch 0 is the starting point, the head trained on frozen features: joint training is
    // kept only if it lowers the validation loss below it. Random weights are never kept.
    let start_loss = match data.initial_head {
        Some(_) => run.evaluate()?.0,
        None => f32::INFINITY,
    };
    let mut stopping = EarlyStopping::new(config.patience);
    stopping.keep(start_loss, 0, run.snapshot()?);
    let started = Instant::now();
    let mut history: Vec<EpochRecord> = Vec::new();
    for epoch in 1..=config.epochs {
        let record = run.epoch(epoch - 1)?;
        history.push(record);
        if stopping.improves(record.val_loss) {
            stopping.keep(record.val_loss, epoch, run.snapshot()?);
        }
        if on_epoch(&record).is_break() {
            return Err(CompileError::Interrupted);
        }
        if stopping.should_stop(epoch) {
            break;
        }
    }
    if let Some(table) = profile::report() {
        eprint!("{table}");
    }
    let (_, best_epoch, best) = stopping.best().expect("the start is kept");
    run.restore(&best)?;
    run.result(data, history, best_epoch, started.elapsed().as_secs_f64())
}

/// The initial head's layers as variables, or one zero layer (from scratch).
fn start_head(
    initial_head: Option<&TrainedHead>,
    (classes, feature_dim): (usize, usize),
    device: &Device,
) -> Result<Network> {
    let layers = match initial_head {
        Some(head) => head
            .layers
            .iter()
            .map(|l| Layer::from_dense(l, device))
            .collect::<Result<_>>()?,
        None => vec![Layer::zeros(feature_dim, classes, device)?],
    };
    Ok(Network::of(layers))
}

/// The weights of an epoch, kept while it is the best.
struct Snapshot {
    backbone: Vec<Tensor>,
    head: Vec<Tensor>,
}

/// The state of a joint training run: the trainable part of the backbone, the head, the
/// optimizers, and the decoded images with their frozen-prefix outputs.
struct JointTraining<'a> {
    config: &'a FinetuneConfig,
    preprocessing: &'a Preprocessing,
    threads: usize,
    progress: &'a dyn Progress,
    part: TrainablePart,
    head: Network,
    backbone_optimizer: GroupOptimizer,
    head_optimizer: GroupOptimizer,
    train_images: Images,
    /// The frozen prefix's outputs on the training images when there is a frozen prefix and
    /// no augmentation (then they are the same every epoch); otherwise rows are made per batch.
    fixed_train_rows: Option<Vec<Vec<f32>>>,
    /// The images for choices, and their frozen-prefix outputs when there is a frozen prefix
    /// (without one they are preprocessed at each evaluation: whole-network rows are the
    /// 224x224 inputs, 0.6 MB an image).
    val_images: Images,
    val_rows: Option<Vec<Vec<f32>>>,
    class_weights: Tensor,
    shuffle: Rng,
    images_trained: usize,
    training_seconds: f64,
}

impl<'a> JointTraining<'a> {
    /// Splits the backbone at the boundary, starts the head, decodes the images and runs the
    /// frozen prefix on the validation (and, without augmentation, the training) images.
    fn new(
        data: &FinetuneData<'a>,
        config: &'a FinetuneConfig,
        threads: usize,
        progress: &'a dyn Progress,
    ) -> Result<JointTraining<'a>> {
        let device = &config.device;
        let unfreeze = match config.strategy {
            Strategy::Scratch => Unfreeze::All,
            _ => config.unfreeze.clone(),
        };
        let part = TrainablePart::new(data.backbone, data.cut, &unfreeze, device)?;
        if config.strategy == Strategy::Scratch {
            part.subgraph.reinitialize(config.seed)?;
        }
        let feature_dim = {
            let probe = Tensor::zeros(part.boundary_len(), DType::F32, device)?;
            part.features(&probe, false)?.dim(1)?
        };
        let head = start_head(data.initial_head, (data.classes, feature_dim), device)?;
        let decode =
            |samples, what| decode_all(samples, data.preprocessing, threads, progress, what);
        let train_images = decode(data.train, "decoding training images");
        let val_images = decode(data.val, "decoding validation images");
        if train_images.images.is_empty() || val_images.images.is_empty() {
            return Err(CompileError::NotEnoughData(
                "fine-tuning needs decodable training and validation images".into(),
            ));
        }
        let class_weights = class_weights(
            &train_images.labels,
            data.classes,
            config.balance_classes,
            device,
        )?;
        let head_vars = head.vars();
        let mut run = JointTraining {
            backbone_optimizer: GroupOptimizer::new(
                config.optimizer,
                part.subgraph.trainable_vars(),
                config.backbone_learning_rate,
                config,
            )?,
            head_optimizer: GroupOptimizer::new(
                config.optimizer,
                head_vars,
                config.head_learning_rate,
                config,
            )?,
            config,
            preprocessing: data.preprocessing,
            threads,
            progress,
            part,
            head,
            train_images,
            fixed_train_rows: None,
            val_images,
            val_rows: None,
            class_weights,
            shuffle: Rng::new(config.seed, "finetune-shuffle"),
            images_trained: 0,
            training_seconds: 0.0,
        };
        if run.part.prefix.is_some() {
            let rows = run.frozen_outputs(&run.val_images, "frozen layers (validation)", None)?;
            run.val_rows = Some(rows);
            if config.augmentation.is_none() {
                let rows =
                    run.frozen_outputs(&run.train_images, "frozen layers (training)", None)?;
                run.fixed_train_rows = Some(rows);
            }
        }
        Ok(run)
    }

    /// The frozen prefix's outputs on `images`, augmented first when `augment` is given.
    fn frozen_outputs(
        &self,
        images: &Images,
        what: &str,
        augment: Option<(&Augmentation, u64)>,
    ) -> Result<Vec<Vec<f32>>> {
        self.progress.start(what, images.images.len());
        let indices: Vec<usize> = (0..images.images.len()).collect();
        let rows = self.boundary_rows(images, &indices, augment, || self.progress.advance());
        self.progress.finish();
        rows
    }

    /// The frozen prefix's outputs on `images[indices]`, augmented first when `augment` is
    /// given, on the worker threads.
    fn boundary_rows(
        &self,
        images: &Images,
        indices: &[usize],
        augment: Option<(&Augmentation, u64)>,
        advance: impl Fn() + Sync,
    ) -> Result<Vec<Vec<f32>>> {
        let rows = par_map(
            indices,
            self.threads,
            |&i| {
                if self.progress.cancelled() {
                    return Err(CompileError::Interrupted);
                }
                let chw = match augment {
                    Some((aug, epoch)) => aug.apply(
                        &images.images[i],
                        self.preprocessing,
                        self.config.seed,
                        (epoch << 32) | i as u64,
                    ),
                    None => self.preprocessing.apply(&images.images[i]),
                };
                self.part.boundary_of(chw)
            },
            advance,
        );
        rows.into_iter().collect()
    }

    /// The rows of `images[indices]`: looked up in `fixed` when they were computed once, else
    /// made now by [`Self::boundary_rows`] (timed as "augment + frozen layers").
    fn rows_of<'r>(
        &self,
        images: &Images,
        fixed: Option<&'r [Vec<f32>]>,
        indices: &[usize],
        augment: Option<(&Augmentation, u64)>,
    ) -> Result<Vec<Cow<'r, [f32]>>> {
        Ok(match fixed {
            Some(all) => indices
                .iter()
                .map(|&i| Cow::Borrowed(&all[i][..]))
                .collect(),
            None => profile::timed("augment + frozen layers", || {
                self.boundary_rows(images, indices, augment, || {})
            })?
            .into_iter()
            .map(Cow::Owned)
            .collect(),
        })
    }

    /// The head's logits on the trainable part's features.
    fn head_forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.head.forward(x, None)
    }

    fn batch_tensor(&self, rows: &[Cow<[f32]>]) -> candle_core::Result<Tensor> {
        let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_vec(
            flat,
            rows.len() * self.part.boundary_len(),
            &self.config.device,
        )
    }

    /// Loss and accuracy on the images for choices.
    fn evaluate(&self) -> Result<(f32, f32)> {
        let device = &self.config.device;
        let mut loss_sum = 0.0f64;
        let mut correct = 0usize;
        let n = self.val_images.images.len();
        let indices: Vec<usize> = (0..n).collect();
        for chunk in indices.chunks(32) {
            let rows = self.rows_of(&self.val_images, self.val_rows.as_deref(), chunk, None)?;
            let features = self.part.features(&self.batch_tensor(&rows)?, false)?;
            let logits = self.head_forward(&features)?;
            let labels: Vec<u32> = chunk
                .iter()
                .map(|&i| self.val_images.labels[i] as u32)
                .collect();
            let y = Tensor::from_vec(labels, chunk.len(), device)?;
            loss_sum += candle_nn::loss::cross_entropy(&logits, &y)?.to_scalar::<f32>()? as f64
                * chunk.len() as f64;
            correct += correct_predictions(&logits, &y)?;
        }
        Ok((
            (loss_sum / n as f64) as f32,
            (correct as f64 / n as f64) as f32,
        ))
    }

    /// One epoch: the learning rates of the schedule, the (augmented) frozen-prefix outputs,
    /// shuffled mini-batches, then the evaluation.
    fn epoch(&mut self, epoch: usize) -> Result<EpochRecord> {
        let config = self.config;
        let factor = config.schedule.factor(epoch, config.epochs);
        self.backbone_optimizer
            .set_learning_rate(config.backbone_learning_rate * factor);
        self.head_optimizer
            .set_learning_rate(config.head_learning_rate * factor);
        // Rows not computed once are made one batch at a time: a whole epoch of them at
        // 224x224 is 0.6 MB an image (1.6 GB for flowers5's training split).
        let fixed = self.fixed_train_rows.take();
        let trained = self.train_on(fixed.as_deref(), epoch);
        self.fixed_train_rows = fixed;
        let (loss_sum, correct, n) = trained?;
        let (val_loss, val_accuracy) = self.evaluate()?;
        Ok(EpochRecord {
            epoch: epoch + 1,
            train_loss: (loss_sum / n as f64) as f32,
            train_accuracy: correct as f32 / n as f32,
            val_loss,
            val_accuracy,
        })
    }

    /// One pass over the training images in shuffled mini-batches, their rows from `fixed` or
    /// made per batch (augmented when configured): loss sum, correct predictions and rows seen.
    /// Only the training steps count toward the throughput, not making the rows.
    fn train_on(
        &mut self,
        fixed: Option<&[Vec<f32>]>,
        epoch: usize,
    ) -> Result<(f64, usize, usize)> {
        let config = self.config;
        let augment = config.augmentation.as_ref().map(|a| (a, epoch as u64));
        let mut order: Vec<usize> = (0..self.train_images.images.len()).collect();
        self.shuffle.shuffle(&mut order);
        let (mut loss_sum, mut correct) = (0.0f64, 0usize);
        let mut steps_seconds = 0.0;
        let progress = self.progress;
        progress.start(&format!("epoch {}: training", epoch + 1), order.len());
        profile::start();
        for batch in order.chunks(config.batch_size.max(1)) {
            if progress.cancelled() {
                profile::stop();
                progress.finish();
                return Err(CompileError::Interrupted);
            }
            let rows = self.rows_of(&self.train_images, fixed, batch, augment)?;
            let started = Instant::now();
            let labels: Vec<u32> = batch
                .iter()
                .map(|&i| self.train_images.labels[i] as u32)
                .collect();
            let y = Tensor::from_vec(labels, batch.len(), &config.device)?;
            let (logits, loss) = profile::timed("forward", || -> Result<_> {
                let features = self.part.features(&self.batch_tensor(&rows)?, true)?;
                let logits = self.head_forward(&features)?;
                let loss = weighted_cross_entropy(
                    &logits,
                    &y,
                    &self.class_weights,
                    config.label_smoothing,
                )?;
                Ok((logits, loss))
            })?;
            let grads = profile::timed("backward", || loss.backward())?;
            profile::timed("optimizer", || -> Result<()> {
                self.backbone_optimizer.step(&grads)?;
                self.head_optimizer.step(&grads)?;
                Ok(())
            })?;
            loss_sum += loss.to_scalar::<f32>()? as f64 * batch.len() as f64;
            correct += correct_predictions(&logits, &y)?;
            steps_seconds += started.elapsed().as_secs_f64();
            for _ in 0..batch.len() {
                progress.advance();
            }
        }
        profile::stop();
        progress.finish();
        self.training_seconds += steps_seconds;
        self.images_trained += order.len();
        Ok((loss_sum, correct, order.len()))
    }

    fn snapshot(&self) -> Result<Snapshot> {
        Ok(Snapshot {
            backbone: self.part.subgraph.snapshot()?,
            head: self
                .head
                .vars()
                .iter()
                .map(|v| v.as_tensor().copy())
                .collect::<candle_core::Result<Vec<_>>>()?,
        })
    }

    fn restore(&self, snapshot: &Snapshot) -> Result<()> {
        self.part.subgraph.restore(&snapshot.backbone)?;
        for (var, value) in self.head.vars().iter().zip(&snapshot.head) {
            var.set(value)?;
        }
        Ok(())
    }

    /// The trained backbone and head (the initial head itself when no epoch beat it), and the
    /// record of the run.
    fn result(
        &self,
        data: &FinetuneData,
        history: Vec<EpochRecord>,
        best_epoch: usize,
        seconds: f64,
    ) -> Result<FineTuned> {
        let config = self.config;
        let part = &self.part;
        let layers = self.head.snapshot()?;
        let tuned = data
            .backbone
            .with_graph_edit(|graph| part.subgraph.write_back(graph))?;
        let info = TransferInfo {
            strategy: config.strategy.to_string(),
            boundary: part.boundary.clone(),
            unfrozen_blocks: part.blocks.clone(),
            trainable_weights: part.subgraph.trainable_weights(),
            optimizer: config.optimizer.to_string(),
            backbone_learning_rate: config.backbone_learning_rate,
            head_learning_rate: config.head_learning_rate,
            weight_decay: config.weight_decay,
            schedule: config.schedule.to_string(),
            batch_size: config.batch_size,
            augmented: config.augmentation.is_some(),
            epochs_run: history.len(),
            best_epoch,
            history: history.clone(),
            seconds,
            train_images_per_second: self.images_trained as f64 / self.training_seconds.max(1e-9),
        };
        let head = match data.initial_head {
            Some(head) if best_epoch == 0 => head.clone(),
            initial => TrainedHead {
                kind: initial.map_or(HeadKind::Linear, |h| h.kind),
                layers,
                history,
                best_epoch,
            },
        };
        Ok(FineTuned {
            backbone: tuned,
            head,
            info,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::testing::{max_abs, max_abs_diff};

    /// One training step of Lite0's top 2 blocks on `device` in `dtype` (graft's fused kernels
    /// for f32 on the CPU, candle ops otherwise): the features of a fixed batch and every trained
    /// weight's gradient, as f32 on the CPU.
    fn training_step(device: &Device, dtype: DType) -> (Tensor, Vec<Tensor>) {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../fixtures/efficientnet_lite0.onnx"
        );
        let backbone = Backbone::load(std::path::Path::new(path), None).unwrap();
        let part =
            TrainablePart::new(&backbone, "features", &Unfreeze::Blocks(2), &Device::Cpu).unwrap();
        let graph = backbone.onnx_graph();
        let subgraph = Subgraph::extract(graph, &part.boundary, "features", device, dtype).unwrap();
        let mut shape = part.boundary_shape.clone();
        shape[0] = 2;
        let mut rng = Rng::new(4, "step");
        let values: Vec<f32> = (0..2 * part.boundary_len()).map(|_| rng.normal()).collect();
        let boundary = Tensor::from_vec(values, shape, device)
            .and_then(|t| t.to_dtype(dtype))
            .unwrap();
        let features = subgraph.forward(&boundary, true).unwrap();
        let weights: Vec<f32> = (0..features.elem_count()).map(|_| rng.normal()).collect();
        let weights = Tensor::from_vec(weights, features.shape(), device)
            .and_then(|t| t.to_dtype(dtype))
            .unwrap();
        let grads = (&features * weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let cpu = |t: &Tensor| {
            t.to_device(&Device::Cpu)
                .and_then(|t| t.to_dtype(DType::F32))
                .unwrap()
        };
        let vars = subgraph.trainable_vars();
        (
            cpu(&features),
            vars.iter().map(|v| cpu(grads.get(v).unwrap())).collect(),
        )
    }

    /// Largest difference relative to the largest value of `b`.
    fn relative_difference(a: &Tensor, b: &Tensor) -> f32 {
        max_abs_diff(a, b) / max_abs(b).max(1e-12)
    }

    /// The same step through graft's f32 CPU kernels and through candle's own ops in f64 (what
    /// other devices run): same features, same gradient for every weight.
    #[test]
    fn fused_cpu_kernels_and_candle_ops_agree_on_a_training_step() {
        let (features, grads) = training_step(&Device::Cpu, DType::F32);
        let (reference, reference_grads) = training_step(&Device::Cpu, DType::F64);
        assert_eq!(features.dims(), [2, 1280]);
        assert!(grads.len() > 6);
        assert!(relative_difference(&features, &reference) < 1e-4);
        for (g, r) in grads.iter().zip(&reference_grads) {
            let d = relative_difference(g, r);
            assert!(d < 1e-3, "gradient of {:?} differs by {d}", r.shape());
        }
    }

    /// Behind the `cuda` feature (needs a GPU): the same step on CUDA agrees with the CPU.
    #[cfg(feature = "cuda")]
    #[test]
    fn a_training_step_on_cuda_matches_the_cpu() {
        let (cpu_features, cpu_grads) = training_step(&Device::Cpu, DType::F32);
        let (gpu_features, gpu_grads) = training_step(&Device::new_cuda(0).unwrap(), DType::F32);
        assert!(relative_difference(&gpu_features, &cpu_features) < 1e-3);
        for (g, c) in gpu_grads.iter().zip(&cpu_grads) {
            let d = relative_difference(g, c);
            assert!(d < 1e-2, "gradient of {:?} differs by {d}", c.shape());
        }
    }

    #[test]
    fn schedules_start_at_the_base_rate_and_decay() {
        assert_eq!(Schedule::Cosine.factor(0, 10), 1.0);
        assert!((Schedule::Cosine.factor(5, 10) - 0.5).abs() < 1e-12);
        assert!(Schedule::Cosine.factor(9, 10) < 0.03);
        assert_eq!(Schedule::Step.factor(3, 9), 0.1);
        assert!((Schedule::Step.factor(8, 9) - 0.01).abs() < 1e-12);
        assert_eq!(Schedule::Constant.factor(7, 9), 1.0);
    }

    #[test]
    fn options_parse_with_clear_errors() {
        assert_eq!("3".parse::<Unfreeze>(), Ok(Unfreeze::Blocks(3)));
        assert_eq!("all".parse::<Unfreeze>(), Ok(Unfreeze::All));
        assert_eq!(
            "0".parse::<Unfreeze>().unwrap_err(),
            "--unfreeze \"0\": expected a number of top blocks (1 or more) or \"all\""
        );
        assert_eq!(
            "lora".parse::<Strategy>().unwrap_err(),
            "unknown strategy \"lora\": expected head, finetune or scratch"
        );
        assert_eq!("sgd".parse::<OptimizerKind>(), Ok(OptimizerKind::Sgd));
    }

    #[test]
    fn sgd_momentum_accumulates_velocity() {
        let w = Var::new(&[1.0f32], &Device::Cpu).unwrap();
        let mut sgd = SgdMomentum {
            vars: vec![w.clone()],
            velocity: vec![None],
            learning_rate: 0.1,
            momentum: 0.9,
            weight_decay: 0.0,
        };
        for _ in 0..2 {
            let loss = (w.as_tensor() * 2.0).unwrap().sum_all().unwrap();
            sgd.step(&loss.backward().unwrap()).unwrap();
        }
        let value = w.as_tensor().to_vec1::<f32>().unwrap()[0];
        assert!(
            (value - (1.0 - 0.2 - 0.1 * (0.9 * 2.0 + 2.0))).abs() < 1e-6,
            "{value}"
        );
    }
}
