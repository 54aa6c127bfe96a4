//! Linear classifiers on features, as recommended for small datasets: multinomial logistic
//! regression (L2) and a one-vs-rest linear SVM (hinge loss, L2), with the regularisation
//! strength chosen by stratified k-fold cross-validation.
//!
//! Both are convex problems solved to convergence on the whole training set at once (no
//! mini-batches, no epochs): logistic regression by accelerated gradient descent with
//! backtracking, the SVM by full-batch Pegasos subgradient steps with iterate averaging. The
//! result is one dense layer, folded into the graph like the `linear` head.

use candle_core::{DType, Device, Tensor, D};

use crate::util::rng::Rng;

/// Stratified, seeded k-fold split: `k` disjoint sets of row indices covering every row, each
/// class spread over the folds as evenly as its size allows.
pub fn stratified_folds(labels: &[usize], k: usize, seed: u64) -> Vec<Vec<usize>> {
    let k = k.max(1);
    let classes = labels.iter().copied().max().map_or(0, |m| m + 1);
    let mut rng = Rng::new(seed, "kfold");
    let mut folds = vec![Vec::new(); k];
    let mut next = 0;
    for class in 0..classes {
        let mut rows: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == class).collect();
        rng.shuffle(&mut rows);
        for row in rows {
            folds[next % k].push(row);
            next += 1;
        }
    }
    for fold in &mut folds {
        fold.sort_unstable();
    }
    folds
}

/// A linear classifier `logits = x W^T + b`.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearModel {
    /// Row-major `[classes, dim]`.
    pub weight: Vec<f32>,
    /// `[classes]`.
    pub bias: Vec<f32>,
    /// Input width.
    pub dim: usize,
}

impl LinearModel {
    /// Predicted class of each row of the row-major `[rows, dim]` matrix `x`.
    pub fn predict(&self, x: &[f32]) -> Vec<usize> {
        let classes = self.bias.len();
        x.chunks(self.dim)
            .map(|row| {
                (0..classes)
                    .map(|c| {
                        let w = &self.weight[c * self.dim..(c + 1) * self.dim];
                        self.bias[c] + w.iter().zip(row).map(|(a, b)| a * b).sum::<f32>()
                    })
                    .enumerate()
                    .fold((0, f32::NEG_INFINITY), |best, (c, v)| {
                        if v > best.1 {
                            (c, v)
                        } else {
                            best
                        }
                    })
                    .0
            })
            .collect()
    }
}

fn one_hot(labels: &[usize], classes: usize, dtype: DType) -> candle_core::Result<Tensor> {
    let mut values = vec![0f32; labels.len() * classes];
    for (i, &l) in labels.iter().enumerate() {
        values[i * classes + l] = 1.0;
    }
    Tensor::from_vec(values, (labels.len(), classes), &Device::Cpu)?.to_dtype(dtype)
}

/// Mean cross-entropy + `lambda/2 |W|^2` at `params = [W | b]`, with the log-probabilities.
fn logistic_value(
    x: &Tensor,
    y: &Tensor,
    params: &Tensor,
    lambda: f64,
) -> candle_core::Result<(f64, Tensor)> {
    let dim = x.dim(1)?;
    let n = x.dim(0)? as f64;
    let w = params.narrow(1, 0, dim)?;
    let b = params.narrow(1, dim, 1)?.squeeze(1)?;
    let logits = x.matmul(&w.t()?)?.broadcast_add(&b)?;
    let log_p = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let scalar = |t: Tensor| -> candle_core::Result<f64> { t.to_dtype(DType::F64)?.to_scalar() };
    let loss = -scalar(log_p.mul(y)?.sum_all()?)? / n + 0.5 * lambda * scalar(w.sqr()?.sum_all()?)?;
    Ok((loss, log_p))
}

/// `(objective, gradient w.r.t. [W | b])` of [`logistic_value`].
fn logistic_objective(
    x: &Tensor,
    y: &Tensor,
    params: &Tensor,
    lambda: f64,
) -> candle_core::Result<(f64, Tensor)> {
    let dim = x.dim(1)?;
    let n = x.dim(0)? as f64;
    let (loss, log_p) = logistic_value(x, y, params, lambda)?;
    let w = params.narrow(1, 0, dim)?;
    let residual = (log_p.exp()? - y)?;
    let grad_w = ((residual.t()?.matmul(x)? / n)? + (w * lambda)?)?;
    let grad_b = (residual.sum(0)? / n)?.unsqueeze(1)?;
    Ok((loss, Tensor::cat(&[grad_w, grad_b], 1)?))
}

/// Multinomial logistic regression with L2 strength `lambda` (bias not penalised) on the
/// row-major `[rows, dim]` matrix `x`, to a gradient norm below `1e-5` or `max_iterations`,
/// computing in `dtype` (F32, or F64 for exact checks).
pub fn fit_logistic(
    x: &[f32],
    dim: usize,
    (labels, classes): (&[usize], usize),
    lambda: f64,
    max_iterations: usize,
    dtype: DType,
) -> candle_core::Result<LinearModel> {
    fit_logistic_from(
        x,
        dim,
        (labels, classes),
        lambda,
        max_iterations,
        dtype,
        None,
    )
}

/// [`fit_logistic`] starting from `start` instead of zero weights: a warm start from the
/// solution at a nearby `lambda` converges in far fewer iterations (the problem is strictly
/// convex, so the optimum is the same).
pub fn fit_logistic_from(
    x: &[f32],
    dim: usize,
    (labels, classes): (&[usize], usize),
    lambda: f64,
    max_iterations: usize,
    dtype: DType,
    start: Option<&LinearModel>,
) -> candle_core::Result<LinearModel> {
    let xt = Tensor::from_slice(x, (labels.len(), dim), &Device::Cpu)?.to_dtype(dtype)?;
    let y = one_hot(labels, classes, dtype)?;
    let mut params = match start {
        Some(model) => {
            let w = Tensor::from_slice(&model.weight, (classes, dim), &Device::Cpu)?;
            let b = Tensor::from_slice(&model.bias, (classes, 1), &Device::Cpu)?;
            Tensor::cat(&[w, b], 1)?.to_dtype(dtype)?
        }
        None => Tensor::zeros((classes, dim + 1), dtype, &Device::Cpu)?,
    };
    let mut previous = params.clone();
    let mut step = 1.0f64;
    let mut momentum_t = 1.0f64;
    let (mut value, _) = logistic_value(&xt, &y, &params, lambda)?;
    for _ in 0..max_iterations {
        let next_t = (1.0 + (1.0 + 4.0 * momentum_t * momentum_t).sqrt()) / 2.0;
        let look = (&params + ((&params - &previous)? * ((momentum_t - 1.0) / next_t))?)?;
        let (look_value, grad) = logistic_objective(&xt, &y, &look, lambda)?;
        let grad_sq = grad
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        if grad_sq.sqrt() < 1e-5 {
            params = look;
            break;
        }
        let candidate = loop {
            let candidate = (&look - (&grad * step)?)?;
            let (v, _) = logistic_value(&xt, &y, &candidate, lambda)?;
            if v <= look_value - 0.5 * step * grad_sq || step < 1e-12 {
                break (candidate, v);
            }
            step *= 0.5;
        };
        if candidate.1 > value {
            // Restart momentum when the objective went up.
            momentum_t = 1.0;
            previous = params.clone();
            continue;
        }
        previous = std::mem::replace(&mut params, candidate.0);
        value = candidate.1;
        momentum_t = next_t;
        step *= 1.5;
    }
    to_model(&params, dim)
}

fn to_model(params: &Tensor, dim: usize) -> candle_core::Result<LinearModel> {
    let params = params.to_dtype(DType::F32)?;
    Ok(LinearModel {
        weight: params.narrow(1, 0, dim)?.flatten_all()?.to_vec1()?,
        bias: params.narrow(1, dim, 1)?.flatten_all()?.to_vec1()?,
        dim,
    })
}

/// One-vs-rest linear SVM: for each class, `min lambda/2 |w|^2 + mean(max(0, 1 - y (w.x + b)))`
/// with `y = +1` for the class and `-1` otherwise, by full-batch Pegasos steps (`1 / (lambda t)`)
/// with the average of the second half of the iterates.
pub fn fit_svm(
    x: &[f32],
    dim: usize,
    labels: &[usize],
    classes: usize,
    lambda: f64,
    iterations: usize,
) -> candle_core::Result<LinearModel> {
    let n = labels.len();
    let xt = Tensor::from_slice(x, (n, dim), &Device::Cpu)?;
    // Signs: +1 for the class, -1 for the others, [n, classes].
    let signs = ((one_hot(labels, classes, DType::F32)? * 2.0)? - 1.0)?;
    let mut params = Tensor::zeros((classes, dim + 1), DType::F32, &Device::Cpu)?;
    let mut average = params.zeros_like()?;
    let mut averaged = 0usize;
    let ones = Tensor::ones((n, 1), DType::F32, &Device::Cpu)?;
    let xb = Tensor::cat(&[&xt, &ones], 1)?;
    let penalised = {
        let mut mask = vec![1f32; dim + 1];
        mask[dim] = 0.0;
        Tensor::from_vec(mask, (1, dim + 1), &Device::Cpu)?
    };
    for t in 1..=iterations.max(1) {
        let margins = (xb.matmul(&params.t()?)? * &signs)?;
        let active = margins.lt(1.0)?.to_dtype(DType::F32)?;
        let coefficient = (active * &signs)?;
        let subgradient = ((params.broadcast_mul(&penalised)? * lambda)?
            - (coefficient.t()?.matmul(&xb)? / n as f64)?)?;
        let step = 1.0 / (lambda * t as f64);
        params = (params - (subgradient * step)?)?;
        if t > iterations / 2 {
            average = (average + &params)?;
            averaged += 1;
        }
    }
    to_model(&(average / averaged.max(1) as f64)?, dim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_are_stratified_seeded_and_disjoint() {
        let labels: Vec<usize> = (0..50).map(|i| usize::from(i % 5 == 0)).collect();
        let folds = stratified_folds(&labels, 5, 3);
        assert_eq!(folds, stratified_folds(&labels, 5, 3));
        assert_ne!(folds, stratified_folds(&labels, 5, 4));
        let mut all: Vec<usize> = folds.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(
            all,
            (0..50).collect::<Vec<_>>(),
            "every row in exactly one fold"
        );
        for fold in &folds {
            assert_eq!(fold.len(), 10);
            let minority = fold.iter().filter(|&&i| labels[i] == 1).count();
            assert_eq!(minority, 2, "10 minority rows over 5 folds");
        }
    }

    /// Two points x = +1 (class 1) and x = -1 (class 0): by symmetry the biases are 0 and the
    /// class weights are -v and +v, with v the root of the optimality condition, found here by
    /// bisection.
    #[test]
    fn logistic_regression_reaches_the_known_optimum() {
        let x = [1.0f32, -1.0];
        let labels = [1usize, 0];
        let lambda = 0.1;
        let model = fit_logistic(&x, 1, (&labels, 2), lambda, 5000, DType::F64).unwrap();
        let (w0, w1) = (model.weight[0] as f64, model.weight[1] as f64);
        assert!(
            (w0 + w1).abs() < 1e-4 && model.bias[0].abs() < 1e-4,
            "{model:?}"
        );
        // Per class weight v = w1 = -w0; logit margin 2v; mean loss log(1 + e^{-2v});
        // d/dv: -2 sigmoid(-2v) + lambda * 2v = 0 (the penalty counts both rows of W).
        let v = w1;
        let stationarity = -2.0 / (1.0 + (2.0 * v).exp()) + lambda * 2.0 * v;
        assert!(stationarity.abs() < 1e-4, "v {v}: gradient {stationarity}");
        // Bisection on the same equation gives the same v.
        let (mut lo, mut hi) = (0.0f64, 100.0f64);
        for _ in 0..200 {
            let mid = (lo + hi) / 2.0;
            if -2.0 / (1.0 + (2.0 * mid).exp()) + lambda * 2.0 * mid < 0.0 {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        assert!((v - lo).abs() < 1e-3, "v {v} vs {lo}");
        assert_eq!(model.predict(&[0.5, -2.0]), vec![1, 0]);
    }

    /// Points x = +1 (y = +1) and x = -1 (y = -1) with small lambda: the max-margin solution
    /// w = 1, b = 0 (margins exactly 1).
    #[test]
    fn svm_reaches_the_max_margin_solution() {
        let x = [1.0f32, -1.0, 2.0, -3.0];
        let labels = [1usize, 0, 1, 0];
        let model = fit_svm(&x, 1, &labels, 2, 0.01, 20_000).unwrap();
        let w1 = model.weight[1];
        assert!((w1 - 1.0).abs() < 0.02, "{model:?}");
        assert!(model.bias[1].abs() < 0.05, "{model:?}");
        assert_eq!(model.predict(&[0.3, -0.2]), vec![1, 0]);
    }
}
