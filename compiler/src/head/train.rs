//! Train: fit a new classifier head on cached backbone features with candle.
//!
//! Features are standardized with the training set's mean and standard deviation (folded back
//! into the first layer afterwards, so the deployed graph takes raw features). The head is a
//! linear softmax classifier or a one-hidden-layer MLP with ReLU and dropout, trained with AdamW
//! (decoupled weight decay) on mini-batches, with early stopping on the validation loss: the
//! weights of the best epoch are kept. Every random choice comes from [`Rng`] seeded by the
//! config, so training is reproducible.

use std::fmt;
use std::ops::ControlFlow;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use graft_runtime::artifact::EpochRecord;

use crate::error::{CompileError, Result};
use crate::features::Features;
use crate::util::rng::Rng;

/// Architecture of the new head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadKind {
    /// One dense layer, softmax.
    Linear,
    /// Dense (hidden units) + ReLU + dropout, then dense, softmax.
    Mlp {
        /// Hidden units.
        hidden: usize,
    },
    /// Multinomial logistic regression solved to convergence, L2 strength chosen by 5-fold
    /// cross-validation ([`crate::head::linear`]).
    LogReg,
    /// One-vs-rest linear SVM (hinge loss), L2 strength chosen by 5-fold cross-validation.
    Svm,
}

impl FromStr for HeadKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "linear" => return Ok(HeadKind::Linear),
            "logreg" => return Ok(HeadKind::LogReg),
            "svm" => return Ok(HeadKind::Svm),
            _ => {}
        }
        if let Some(h) = s.strip_prefix("mlp:") {
            return match h.parse::<usize>() {
                Ok(hidden) if (1..=65_536).contains(&hidden) => Ok(HeadKind::Mlp { hidden }),
                _ => Err(format!(
                    "--head {s:?}: hidden units must be a number from 1 to 65536"
                )),
            };
        }
        Err(format!(
            "unknown head {s:?}: expected linear, logreg, svm or mlp:H (e.g. mlp:256)"
        ))
    }
}

impl fmt::Display for HeadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeadKind::Linear => write!(f, "linear"),
            HeadKind::Mlp { hidden } => write!(f, "mlp:{hidden}"),
            HeadKind::LogReg => write!(f, "logreg"),
            HeadKind::Svm => write!(f, "svm"),
        }
    }
}

/// Training hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Head architecture.
    pub head: HeadKind,
    /// Maximum number of epochs.
    pub epochs: usize,
    /// Mini-batch size.
    pub batch_size: usize,
    /// AdamW learning rate.
    pub learning_rate: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Stop after this many epochs without a better validation loss.
    pub patience: usize,
    /// Dropout probability before the last layer of an MLP head.
    pub dropout: f32,
    /// Seed of initialisation, shuffling and dropout.
    pub seed: u64,
    /// Weight each image's loss by its class: `false` = 1 for all, `true` = inverse frequency
    /// (`images / (classes * images of the class)`), so every class counts equally.
    pub balance_classes: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            head: HeadKind::Linear,
            epochs: 100,
            batch_size: 32,
            learning_rate: 1e-3,
            weight_decay: 1e-2,
            patience: 10,
            dropout: 0.2,
            seed: 42,
            balance_classes: false,
        }
    }
}

/// A dense layer `y = x W^T + b`.
#[derive(Debug, Clone, PartialEq)]
pub struct Dense {
    /// Row-major `[outputs, inputs]`.
    pub weight: Vec<f32>,
    /// `[outputs]`.
    pub bias: Vec<f32>,
    /// Input width.
    pub inputs: usize,
    /// Output width.
    pub outputs: usize,
}

impl Dense {
    fn apply(&self, x: &[f32]) -> Vec<f32> {
        (0..self.outputs)
            .map(|o| {
                let w = &self.weight[o * self.inputs..(o + 1) * self.inputs];
                self.bias[o] + w.iter().zip(x).map(|(a, b)| a * b).sum::<f32>()
            })
            .collect()
    }
}

/// A trained head, ready to be folded into the graph: it takes raw (unstandardized) features.
#[derive(Debug, Clone)]
pub struct TrainedHead {
    /// Architecture.
    pub kind: HeadKind,
    /// Dense layers; a ReLU sits between consecutive layers.
    pub layers: Vec<Dense>,
    /// Per-epoch metrics.
    pub history: Vec<EpochRecord>,
    /// 1-based epoch whose weights were kept.
    pub best_epoch: usize,
}

impl TrainedHead {
    /// Logits for one raw feature vector, computed in plain Rust (a reference for the folded
    /// graph).
    pub fn logits(&self, features: &[f32]) -> Vec<f32> {
        let mut x = features.to_vec();
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.apply(&x);
            if i + 1 < self.layers.len() {
                x.iter_mut().for_each(|v| *v = v.max(0.0));
            }
        }
        x
    }

    /// Predicted class of each row.
    pub fn predict(&self, features: &Features) -> Vec<usize> {
        (0..features.rows())
            .map(|i| argmax(&self.logits(features.row(i))))
            .collect()
    }

    /// The kept epoch's metrics.
    pub fn best(&self) -> &EpochRecord {
        &self.history[self.best_epoch - 1]
    }
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &x)| {
            if x > best.1 {
                (i, x)
            } else {
                best
            }
        })
        .0
}

struct Standardizer {
    mean: Vec<f32>,
    inv_std: Vec<f32>,
}

impl Standardizer {
    fn fit(features: &Features) -> Standardizer {
        let (n, d) = (features.rows() as f64, features.dim);
        let mut mean = vec![0f64; d];
        let mut sq = vec![0f64; d];
        for i in 0..features.rows() {
            for (j, &v) in features.row(i).iter().enumerate() {
                mean[j] += v as f64;
                sq[j] += (v as f64) * (v as f64);
            }
        }
        let mut inv_std = vec![1f32; d];
        for j in 0..d {
            mean[j] /= n;
            let var = (sq[j] / n - mean[j] * mean[j]).max(0.0);
            let std = var.sqrt();
            inv_std[j] = if std > 1e-6 { (1.0 / std) as f32 } else { 1.0 };
        }
        Standardizer {
            mean: mean.into_iter().map(|m| m as f32).collect(),
            inv_std,
        }
    }

    fn apply(&self, features: &Features) -> Vec<f32> {
        features
            .data
            .chunks_exact(features.dim)
            .flat_map(|row| {
                row.iter()
                    .zip(&self.mean)
                    .zip(&self.inv_std)
                    .map(|((v, m), s)| (v - m) * s)
            })
            .collect()
    }

    /// Rewrites `layer` (which reads standardized features) to read raw features:
    /// `W' = W diag(inv_std)`, `b' = b - W' mean`.
    fn fold_into(&self, layer: &mut Dense) {
        for o in 0..layer.outputs {
            let row = &mut layer.weight[o * layer.inputs..(o + 1) * layer.inputs];
            let mut shift = 0f64;
            for (j, w) in row.iter_mut().enumerate() {
                *w *= self.inv_std[j];
                shift += *w as f64 * self.mean[j] as f64;
            }
            layer.bias[o] -= shift as f32;
        }
    }
}

/// A dense layer as candle variables: `x W^T + b`.
pub(crate) struct Layer {
    weight: Var,
    bias: Var,
}

impl Layer {
    /// The variables of trained weights.
    pub(crate) fn from_dense(dense: &Dense, device: &Device) -> Result<Layer> {
        Ok(Layer {
            weight: Var::from_vec(dense.weight.clone(), (dense.outputs, dense.inputs), device)?,
            bias: Var::from_vec(dense.bias.clone(), dense.outputs, device)?,
        })
    }

    /// A layer of zeros.
    pub(crate) fn zeros(inputs: usize, outputs: usize, device: &Device) -> Result<Layer> {
        Ok(Layer {
            weight: Var::zeros((outputs, inputs), DType::F32, device)?,
            bias: Var::zeros(outputs, DType::F32, device)?,
        })
    }

    fn new(inputs: usize, outputs: usize, rng: &mut Rng, device: &Device) -> Result<Layer> {
        let bound = 1.0 / (inputs as f32).sqrt();
        let init: Vec<f32> = (0..inputs * outputs)
            .map(|_| (rng.next_f32() * 2.0 - 1.0) * bound)
            .collect();
        Ok(Layer {
            weight: Var::from_vec(init, (outputs, inputs), device)?,
            bias: Var::zeros(outputs, DType::F32, device)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)
    }

    fn snapshot(&self) -> Result<Dense> {
        let (outputs, inputs) = self.weight.dims2()?;
        Ok(Dense {
            weight: self.weight.flatten_all()?.to_vec1()?,
            bias: self.bias.to_vec1()?,
            inputs,
            outputs,
        })
    }
}

/// The head network, one for head training and fine-tuning: dense layers with ReLU (and, while
/// training an mlp head, dropout) between them.
pub(crate) struct Network {
    layers: Vec<Layer>,
    dropout: f32,
}

impl Network {
    /// A network of `layers`, without dropout.
    pub(crate) fn of(layers: Vec<Layer>) -> Network {
        Network {
            layers,
            dropout: 0.0,
        }
    }

    /// The trained weights.
    pub(crate) fn snapshot(&self) -> Result<Vec<Dense>> {
        self.layers.iter().map(Layer::snapshot).collect()
    }

    /// Logits of `x`; dropout between layers only when given a generator.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        dropout_rng: Option<&mut Rng>,
    ) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        let mut dropout_rng = dropout_rng;
        for (i, layer) in self.layers.iter().enumerate() {
            if i > 0 {
                x = x.relu()?;
                if let Some(rng) = dropout_rng.as_deref_mut() {
                    x = apply_dropout(&x, self.dropout, rng)?;
                }
            }
            x = layer.forward(&x)?;
        }
        Ok(x)
    }

    /// Weights and biases, layer by layer.
    pub(crate) fn vars(&self) -> Vec<Var> {
        self.layers
            .iter()
            .flat_map(|l| [l.weight.clone(), l.bias.clone()])
            .collect()
    }
}

fn apply_dropout(x: &Tensor, p: f32, rng: &mut Rng) -> candle_core::Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let keep = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if rng.next_f32() < p { 0.0 } else { keep })
        .collect();
    x.mul(&Tensor::from_vec(mask, x.shape(), x.device())?)
}

/// Loss and accuracy of `network` on a whole (standardized) set.
fn measure(network: &Network, x: &Tensor, y: &Tensor) -> candle_core::Result<(f32, f32)> {
    let logits = network.forward(x, None)?;
    let loss = candle_nn::loss::cross_entropy(&logits, y)?.to_scalar::<f32>()?;
    let correct = correct_predictions(&logits, y)?;
    Ok((loss, correct as f32 / y.dim(0)? as f32))
}

/// Rows of `logits` whose largest value is at the label in `y`.
pub(crate) fn correct_predictions(logits: &Tensor, y: &Tensor) -> candle_core::Result<usize> {
    Ok(logits
        .argmax(D::Minus1)?
        .eq(y)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()? as usize)
}

/// Loss weight of each class: 1, or with `balance` the inverse frequency
/// `images / (classes * images of the class)`.
pub(crate) fn class_weights(
    labels: &[usize],
    classes: usize,
    balance: bool,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let mut counts = vec![0usize; classes];
    for &l in labels {
        counts[l] += 1;
    }
    let weights: Vec<f32> = counts
        .iter()
        .map(|&n| {
            if balance && n > 0 {
                labels.len() as f32 / (classes * n) as f32
            } else {
                1.0
            }
        })
        .collect();
    Tensor::from_vec(weights, classes, device)
}

/// Cross-entropy with a weight per class: `sum_i w[y_i] * nll_i / sum_i w[y_i]` (the plain mean
/// when every weight is 1).
pub(crate) fn weighted_cross_entropy(
    logits: &Tensor,
    y: &Tensor,
    class_weights: &Tensor,
    smoothing: f64,
) -> candle_core::Result<Tensor> {
    let log_probabilities = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let mut nll = log_probabilities
        .gather(&y.unsqueeze(1)?, 1)?
        .squeeze(1)?
        .neg()?;
    if smoothing > 0.0 {
        let uniform = log_probabilities.mean(D::Minus1)?.neg()?;
        nll = ((nll * (1.0 - smoothing))? + (uniform * smoothing)?)?;
    }
    let weights = class_weights.index_select(y, 0)?;
    (nll * &weights)?.sum_all()? / weights.sum_all()?.to_scalar::<f32>()? as f64
}

/// Trains a head on `train`, early-stopping on `val`; calls `on_epoch` after every epoch, and
/// stops with [`CompileError::Interrupted`] when it answers `ControlFlow::Break`.
pub fn train_head(
    config: &TrainConfig,
    train: &Features,
    val: &Features,
    classes: usize,
    device: &Device,
    on_epoch: &mut dyn FnMut(&EpochRecord) -> ControlFlow<()>,
) -> Result<TrainedHead> {
    if train.rows() == 0 || val.rows() == 0 {
        return Err(CompileError::NotEnoughData(format!(
            "need training and validation images, have {} and {}",
            train.rows(),
            val.rows()
        )));
    }
    if config.batch_size == 0 || config.epochs == 0 {
        return Err(CompileError::InvalidOption(
            "--epochs and --batch-size must be at least 1".into(),
        ));
    }
    let dim = train.dim;
    let standardizer = Standardizer::fit(train);
    let to_tensors = |f: &Features| -> candle_core::Result<(Tensor, Tensor)> {
        let x = Tensor::from_vec(standardizer.apply(f), (f.rows(), dim), device)?;
        let y: Vec<u32> = f.labels.iter().map(|&l| l as u32).collect();
        Ok((x, Tensor::from_vec(y, f.rows(), device)?))
    };
    let (train_x, train_y) = to_tensors(train)?;
    let (val_x, val_y) = to_tensors(val)?;
    if matches!(config.head, HeadKind::LogReg | HeadKind::Svm) {
        return fit_convex_head(
            config,
            &standardizer,
            (train, &train_x, &train_y),
            (val, &val_x, &val_y),
            classes,
            on_epoch,
        );
    }

    let mut init_rng = Rng::new(config.seed, "head-init");
    let widths: Vec<usize> = match config.head {
        HeadKind::Linear => vec![dim, classes],
        HeadKind::Mlp { hidden } => vec![dim, hidden, classes],
        HeadKind::LogReg | HeadKind::Svm => unreachable!("fitted by fit_convex_head"),
    };
    let network = Network {
        layers: widths
            .windows(2)
            .map(|w| Layer::new(w[0], w[1], &mut init_rng, device))
            .collect::<Result<_>>()?,
        dropout: config.dropout,
    };
    let mut optimizer = AdamW::new(
        network.vars(),
        ParamsAdamW {
            lr: config.learning_rate,
            weight_decay: config.weight_decay,
            ..ParamsAdamW::default()
        },
    )?;

    let class_weights = class_weights(&train.labels, classes, config.balance_classes, device)?;

    let mut shuffle_rng = Rng::new(config.seed, "head-shuffle");
    let mut dropout_rng = Rng::new(config.seed, "head-dropout");
    let mut order: Vec<u32> = (0..train.rows() as u32).collect();
    let mut history = Vec::new();
    let mut stopping = EarlyStopping::new(config.patience);
    for epoch in 1..=config.epochs {
        shuffle_rng.shuffle(&mut order);
        let mut loss_sum = 0f64;
        for batch in order.chunks(config.batch_size) {
            let idx = Tensor::from_slice(batch, batch.len(), device)?;
            let x = train_x.index_select(&idx, 0)?;
            let y = train_y.index_select(&idx, 0)?;
            let logits = network.forward(&x, Some(&mut dropout_rng))?;
            let loss = weighted_cross_entropy(&logits, &y, &class_weights, 0.0)?;
            optimizer.backward_step(&loss)?;
            loss_sum += loss.to_scalar::<f32>()? as f64 * batch.len() as f64;
        }
        let (_, train_accuracy) = measure(&network, &train_x, &train_y)?;
        let (val_loss, val_accuracy) = measure(&network, &val_x, &val_y)?;
        let record = EpochRecord {
            epoch,
            train_loss: (loss_sum / train.rows() as f64) as f32,
            train_accuracy,
            val_loss,
            val_accuracy,
        };
        if on_epoch(&record).is_break() {
            return Err(CompileError::Interrupted);
        }
        history.push(record);
        if stopping.improves(val_loss) {
            stopping.keep(val_loss, epoch, network.snapshot()?);
        } else if stopping.should_stop(epoch) {
            break;
        }
    }
    let (_, best_epoch, mut layers) = stopping.best().expect("at least one epoch ran");
    standardizer.fold_into(&mut layers[0]);
    Ok(TrainedHead {
        kind: config.head,
        layers,
        history,
        best_epoch,
    })
}

/// Early stopping on the loss of the images for choices, shared by head training and
/// fine-tuning: the best epoch so far with its state, and whether `patience` epochs have passed
/// without a lower loss.
pub(crate) struct EarlyStopping<T> {
    best: Option<(f32, usize, T)>,
    patience: usize,
}

impl<T> EarlyStopping<T> {
    /// Nothing kept yet; stop after `patience` (at least 1) epochs without a lower loss.
    pub(crate) fn new(patience: usize) -> EarlyStopping<T> {
        EarlyStopping {
            best: None,
            patience: patience.max(1),
        }
    }

    /// Whether `loss` is lower than the best so far (or nothing is kept yet).
    pub(crate) fn improves(&self, loss: f32) -> bool {
        self.best.as_ref().is_none_or(|(best, _, _)| loss < *best)
    }

    /// Keeps `state` of `epoch` as the best.
    pub(crate) fn keep(&mut self, loss: f32, epoch: usize, state: T) {
        self.best = Some((loss, epoch, state));
    }

    /// Whether `epoch` is `patience` epochs past the best one.
    pub(crate) fn should_stop(&self, epoch: usize) -> bool {
        epoch - self.best.as_ref().map_or(0, |b| b.1) >= self.patience
    }

    /// The best epoch: its loss, number and state.
    pub(crate) fn best(self) -> Option<(f32, usize, T)> {
        self.best
    }
}

/// L2 strengths tried by cross-validation for `logreg` and `svm`.
pub const LAMBDA_PATH: [f64; 5] = [1e-4, 1e-3, 1e-2, 1e-1, 1.0];

/// Folds of the cross-validation that picks the L2 strength.
pub const CV_FOLDS: usize = 5;

/// Cross-validated accuracy of a linear classifier at one L2 strength.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CvScore {
    /// L2 strength.
    pub lambda: f64,
    /// Held-out accuracy over all folds (correct / rows).
    pub accuracy: f32,
    /// Held-out accuracy of each fold.
    pub fold_accuracies: Vec<f32>,
}

impl CvScore {
    /// Standard error of the mean of the fold accuracies (0 with fewer than two folds).
    pub fn standard_error(&self) -> f32 {
        let k = self.fold_accuracies.len();
        if k < 2 {
            return 0.0;
        }
        let mean = self.fold_accuracies.iter().sum::<f32>() / k as f32;
        let var = self
            .fold_accuracies
            .iter()
            .map(|a| (a - mean) * (a - mean))
            .sum::<f32>()
            / (k - 1) as f32;
        (var / k as f32).sqrt()
    }
}

/// Stratified `folds`-fold cross-validation of a `logreg` or `svm` head on `features`
/// (standardized with their own statistics) at every strength of [`LAMBDA_PATH`]; returns the
/// score at the strength that cross-validates best.
pub fn cross_validate(
    kind: HeadKind,
    features: &Features,
    classes: usize,
    folds: usize,
    seed: u64,
) -> Result<CvScore> {
    let x = Standardizer::fit(features).apply(features);
    let mut path = cross_validation_path(
        kind,
        (&x, features.dim),
        (&features.labels, classes),
        folds,
        seed,
    )?;
    Ok(path.swap_remove(best_on_path(&path)))
}

/// The cross-validated score at every strength of [`LAMBDA_PATH`].
fn cross_validation_path(
    kind: HeadKind,
    (x, dim): (&[f32], usize),
    (labels, classes): (&[usize], usize),
    folds: usize,
    seed: u64,
) -> Result<Vec<CvScore>> {
    let folds = crate::head::linear::stratified_folds(labels, folds, seed);
    // correct[k][f]: rows of fold f predicted right at LAMBDA_PATH[k]. Each fold walks the path
    // from the strongest regularisation down, warm-starting from the previous solution.
    let mut correct = vec![vec![0usize; folds.len()]; LAMBDA_PATH.len()];
    for (f, held) in folds.iter().enumerate() {
        let rest: Vec<usize> = (0..labels.len())
            .filter(|i| held.binary_search(i).is_err())
            .collect();
        let held_x = gather_rows(x, dim, held);
        let mut previous = None;
        for (k, &lambda) in LAMBDA_PATH.iter().enumerate().rev() {
            let model = fit_linear(
                kind,
                (x, dim),
                (labels, classes),
                &rest,
                (lambda, 300),
                previous.as_ref(),
            )?;
            correct[k][f] = model
                .predict(&held_x)
                .iter()
                .zip(held)
                .filter(|(p, &i)| **p == labels[i])
                .count();
            previous = Some(model);
        }
    }
    Ok(LAMBDA_PATH
        .iter()
        .zip(&correct)
        .map(|(&lambda, right)| CvScore {
            lambda,
            accuracy: right.iter().sum::<usize>() as f32 / labels.len().max(1) as f32,
            fold_accuracies: right
                .iter()
                .zip(&folds)
                .map(|(&r, held)| r as f32 / held.len().max(1) as f32)
                .collect(),
        })
        .collect())
}

/// Index of the best score; ties go to the stronger regularisation (later in the path), the
/// simpler model.
fn best_on_path(path: &[CvScore]) -> usize {
    let mut best = 0;
    for (k, score) in path.iter().enumerate() {
        if score.accuracy >= path[best].accuracy {
            best = k;
        }
    }
    best
}

/// The given rows of the row-major `[_, dim]` matrix `x`, in that order.
fn gather_rows(x: &[f32], dim: usize, rows: &[usize]) -> Vec<f32> {
    rows.iter()
        .flat_map(|&i| x[i * dim..(i + 1) * dim].iter().copied())
        .collect()
}

/// Fits a `logreg` or `svm` classifier on the given rows of the row-major `x`, with L2
/// strength `lambda`, for at most `iterations`; logistic regression starts from `start`.
fn fit_linear(
    kind: HeadKind,
    (x, dim): (&[f32], usize),
    (labels, classes): (&[usize], usize),
    rows: &[usize],
    (lambda, iterations): (f64, usize),
    start: Option<&crate::head::linear::LinearModel>,
) -> candle_core::Result<crate::head::linear::LinearModel> {
    let xs = gather_rows(x, dim, rows);
    let ys: Vec<usize> = rows.iter().map(|&i| labels[i]).collect();
    match kind {
        HeadKind::Svm => crate::head::linear::fit_svm(&xs, dim, &ys, classes, lambda, iterations),
        _ => crate::head::linear::fit_logistic_from(
            &xs,
            dim,
            (&ys, classes),
            lambda,
            iterations,
            DType::F32,
            start,
        ),
    }
}

/// `--head logreg|svm`: picks the L2 strength from [`LAMBDA_PATH`] by stratified
/// [`CV_FOLDS`]-fold cross-validated accuracy on the training rows, then fits all of them. The
/// history holds one record per strength tried (`epoch` = its position in the path;
/// `train_accuracy` = its cross-validated accuracy; validation numbers of the final fit in the
/// chosen one's record only make sense there), and the chosen one is `best_epoch`.
fn fit_convex_head(
    config: &TrainConfig,
    standardizer: &Standardizer,
    (train, train_x, train_y): (&Features, &Tensor, &Tensor),
    (_, val_x, val_y): (&Features, &Tensor, &Tensor),
    classes: usize,
    on_epoch: &mut dyn FnMut(&EpochRecord) -> ControlFlow<()>,
) -> Result<TrainedHead> {
    use crate::head::linear::LinearModel;
    let dim = train.dim;
    let x: Vec<f32> = train_x.flatten_all()?.to_vec1()?;
    let to_network = |model: &LinearModel| -> candle_core::Result<Network> {
        Ok(Network {
            layers: vec![Layer {
                weight: Var::from_vec(model.weight.clone(), (classes, dim), train_x.device())?,
                bias: Var::from_vec(model.bias.clone(), classes, train_x.device())?,
            }],
            dropout: 0.0,
        })
    };
    let path = cross_validation_path(
        config.head,
        (&x, dim),
        (&train.labels, classes),
        CV_FOLDS,
        config.seed,
    )?;
    // The fit on every training row at each strength, strongest first (warm starts).
    let all_rows: Vec<usize> = (0..train.rows()).collect();
    let mut models = Vec::with_capacity(path.len());
    for score in path.iter().rev() {
        let model = fit_linear(
            config.head,
            (&x, dim),
            (&train.labels, classes),
            &all_rows,
            (score.lambda, 1000),
            models.last(),
        )?;
        models.push(model);
    }
    models.reverse();
    let mut history = Vec::new();
    for (k, (score, model)) in path.iter().zip(&models).enumerate() {
        let network = to_network(model)?;
        let (train_loss, _) = measure(&network, train_x, train_y)?;
        let (val_loss, val_accuracy) = measure(&network, val_x, val_y)?;
        let record = EpochRecord {
            epoch: k + 1,
            train_loss,
            train_accuracy: score.accuracy,
            val_loss,
            val_accuracy,
        };
        if on_epoch(&record).is_break() {
            return Err(CompileError::Interrupted);
        }
        history.push(record);
    }
    let chosen = best_on_path(&path);
    let model = models.swap_remove(chosen);
    let mut layer = Dense {
        weight: model.weight,
        bias: model.bias,
        inputs: dim,
        outputs: classes,
    };
    standardizer.fold_into(&mut layer);
    Ok(TrainedHead {
        kind: config.head,
        layers: vec![layer],
        history,
        best_epoch: chosen + 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logreg_and_svm_heads_separate_blobs() {
        for head in [HeadKind::LogReg, HeadKind::Svm] {
            let config = TrainConfig {
                head,
                ..TrainConfig::default()
            };
            let trained = train_head(
                &config,
                &blobs(60, 1),
                &blobs(30, 2),
                3,
                &Device::Cpu,
                &mut |_| ControlFlow::Continue(()),
            )
            .unwrap();
            assert_eq!(trained.history.len(), LAMBDA_PATH.len());
            assert_eq!(
                trained.predict(&blobs(30, 3)),
                blobs(30, 3).labels,
                "{head}"
            );
        }
    }

    fn blobs(n: usize, seed: u64) -> Features {
        let mut rng = Rng::new(seed, "blobs");
        let mut f = Features {
            dim: 4,
            ..Features::default()
        };
        for i in 0..n {
            let label = i % 3;
            for j in 0..4 {
                let centre = if j == label { 50.0 } else { 10.0 };
                f.data.push(centre + rng.next_f32() * 4.0);
            }
            f.labels.push(label);
            f.paths.push(format!("{i}").into());
        }
        f
    }

    /// Two overlapping classes, 9:1. Balancing the loss trades majority recall for minority
    /// recall, and the weighted loss equals the plain one when all weights are 1.
    #[test]
    fn balanced_classes_raise_minority_recall() {
        let overlapping = |n: usize, seed: u64| {
            let mut rng = Rng::new(seed, "overlap");
            let mut f = Features {
                dim: 2,
                ..Features::default()
            };
            for i in 0..n {
                let label = usize::from(i % 10 == 0);
                f.data.push(label as f32 * 1.0 + rng.next_f32() * 3.0);
                f.data.push(rng.next_f32());
                f.labels.push(label);
                f.paths.push(format!("{i}").into());
            }
            f
        };
        let (train, val) = (overlapping(400, 3), overlapping(200, 4));
        let minority_recall = |balance_classes: bool| {
            let config = TrainConfig {
                epochs: 40,
                patience: 40,
                learning_rate: 0.05,
                balance_classes,
                ..TrainConfig::default()
            };
            let head = train_head(&config, &train, &val, 2, &Device::Cpu, &mut |_| {
                ControlFlow::Continue(())
            })
            .unwrap();
            let predicted = head.predict(&val);
            let (hits, total) = val
                .labels
                .iter()
                .zip(&predicted)
                .filter(|(l, _)| **l == 1)
                .fold((0, 0), |(h, t), (_, p)| (h + usize::from(*p == 1), t + 1));
            hits as f32 / total as f32
        };
        let (plain, balanced) = (minority_recall(false), minority_recall(true));
        assert!(
            balanced > plain + 0.2,
            "minority recall {plain} -> {balanced}"
        );

        let logits = Tensor::new(&[[2.0f32, -1.0], [0.5, 0.3], [-1.0, 1.0]], &Device::Cpu).unwrap();
        let y = Tensor::new(&[0u32, 1, 1], &Device::Cpu).unwrap();
        let ones = Tensor::new(&[1.0f32, 1.0], &Device::Cpu).unwrap();
        let ours = weighted_cross_entropy(&logits, &y, &ones, 0.0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let candle = candle_nn::loss::cross_entropy(&logits, &y)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((ours - candle).abs() < 1e-6);
        // Smoothing 0.2 with 2 classes: target (0.9, 0.1) on row 0, written out by hand.
        let smoothed = weighted_cross_entropy(&logits, &y, &ones, 0.2)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let rows = [([2.0f32, -1.0], 0), ([0.5, 0.3], 1), ([-1.0, 1.0], 1)];
        let expected = rows
            .iter()
            .map(|(z, label)| {
                let lse = (z[0].exp() + z[1].exp()).ln();
                let logp = [z[0] - lse, z[1] - lse];
                -(0.9 * logp[*label] + 0.1 * logp[1 - label])
            })
            .sum::<f32>()
            / 3.0;
        assert!(
            (smoothed - expected).abs() < 1e-5,
            "{smoothed} vs {expected}"
        );
    }

    #[test]
    fn linear_head_separates_blobs_and_folds_standardization() {
        let (train, val) = (blobs(60, 1), blobs(30, 2));
        let config = TrainConfig {
            epochs: 60,
            learning_rate: 0.05,
            ..TrainConfig::default()
        };
        let mut epochs = 0;
        let head = train_head(&config, &train, &val, 3, &Device::Cpu, &mut |_| {
            epochs += 1;
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(epochs, head.history.len());
        assert_eq!(head.best().val_accuracy, 1.0);
        // The folded head reads raw features: its predictions equal the validation labels.
        assert_eq!(head.predict(&val), val.labels);
    }

    #[test]
    fn training_is_reproducible_and_seed_dependent() {
        let (train, val) = (blobs(30, 3), blobs(15, 4));
        let run = |seed| {
            let config = TrainConfig {
                head: HeadKind::Mlp { hidden: 8 },
                epochs: 5,
                seed,
                ..TrainConfig::default()
            };
            train_head(&config, &train, &val, 3, &Device::Cpu, &mut |_| {
                ControlFlow::Continue(())
            })
            .unwrap()
            .layers
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn head_kind_parses() {
        assert_eq!("linear".parse::<HeadKind>(), Ok(HeadKind::Linear));
        assert_eq!(
            "mlp:64".parse::<HeadKind>(),
            Ok(HeadKind::Mlp { hidden: 64 })
        );
        assert!("mlp:0".parse::<HeadKind>().is_err());
        assert_eq!("svm".parse::<HeadKind>(), Ok(HeadKind::Svm));
        assert_eq!("logreg".parse::<HeadKind>(), Ok(HeadKind::LogReg));
        assert!("rbf".parse::<HeadKind>().is_err());
        assert_eq!(HeadKind::Mlp { hidden: 7 }.to_string(), "mlp:7");
    }
}
