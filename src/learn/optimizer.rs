//! The optimizers: their hyperparameters, per-weight state and update step.

use super::config::{AdagradConfig, FtrlConfig, OptimizerConfig, SgdConfig};
use super::kernels::{self, FtrlParams, SimdPath};

/// An optimizer with its hyperparameters and what it remembers between updates, laid out like
/// the weights: a `K x D` row-major matrix for the weights and a `K` vector for the bias.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Optimizer {
    /// Plain SGD keeps nothing; its learning rate depends only on the update count.
    Sgd(SgdConfig),
    /// Accumulated squared gradients.
    Adagrad { config: AdagradConfig, sum_sq_weight: Vec<f32>, sum_sq_bias: Vec<f32> },
    /// FTRL-Proximal's `z` (adjusted accumulated gradients) and `n` (accumulated squared
    /// gradients); the weights are a function of them, kept materialised for prediction.
    Ftrl { config: FtrlConfig, z_weight: Vec<f32>, n_weight: Vec<f32>, z_bias: Vec<f32>, n_bias: Vec<f32> },
}

/// The name of one state tensor in snapshots, its data, and whether it is `K x D` (else `K`).
pub(crate) type StateTensor<'a> = (&'static str, &'a [f32], bool);

impl Optimizer {
    /// A fresh optimizer for `classes` classes of `dim` features.
    pub(crate) fn new(config: &OptimizerConfig, classes: usize, dim: usize) -> Optimizer {
        let zeros = |n: usize| vec![0.0f32; n];
        match config {
            OptimizerConfig::Sgd(c) => Optimizer::Sgd(*c),
            OptimizerConfig::Adagrad(c) => {
                Optimizer::Adagrad { config: *c, sum_sq_weight: zeros(classes * dim), sum_sq_bias: zeros(classes) }
            }
            OptimizerConfig::Ftrl(c) => Optimizer::Ftrl {
                config: *c,
                z_weight: zeros(classes * dim),
                n_weight: zeros(classes * dim),
                z_bias: zeros(classes),
                n_bias: zeros(classes),
            },
        }
    }

    /// Adds the state of a new class: as if it had never had a gradient.
    pub(crate) fn add_class(&mut self, dim: usize) {
        let grow = |v: &mut Vec<f32>, n: usize| v.resize(v.len() + n, 0.0);
        match self {
            Optimizer::Sgd(_) => {}
            Optimizer::Adagrad { sum_sq_weight, sum_sq_bias, .. } => {
                grow(sum_sq_weight, dim);
                grow(sum_sq_bias, 1);
            }
            Optimizer::Ftrl { z_weight, n_weight, z_bias, n_bias, .. } => {
                grow(z_weight, dim);
                grow(n_weight, dim);
                grow(z_bias, 1);
                grow(n_bias, 1);
            }
        }
    }

    /// Forgets the accumulated statistics while keeping the weights and biases as they are, so
    /// that the next steps are as large as the first ones were: AdaGrad's squared gradients
    /// are zeroed; FTRL's `n` is zeroed and its `z` set to the value that gives the current
    /// weight with `n = 0` (FTRL's weights are a function of `z` and `n`: zeroing `z` too would
    /// zero the weights). Plain SGD keeps nothing: its schedule is the model's to restart.
    pub(crate) fn restart(&mut self, weights: &[f32], bias: &[f32]) {
        match self {
            Optimizer::Sgd(_) => {}
            Optimizer::Adagrad { sum_sq_weight, sum_sq_bias, .. } => {
                sum_sq_weight.fill(0.0);
                sum_sq_bias.fill(0.0);
            }
            Optimizer::Ftrl { config, z_weight, n_weight, z_bias, n_bias } => {
                let FtrlConfig { alpha, beta, l1, l2 } = *config;
                let params = FtrlParams { inv_alpha: 1.0 / alpha, beta, l1, l2 };
                let bias_params = FtrlParams { l1: 0.0, l2: 0.0, ..params };
                for ((z, n), &w) in z_weight.iter_mut().zip(n_weight.iter_mut()).zip(weights) {
                    (*z, *n) = (ftrl_z_of_weight(w, params), 0.0);
                }
                for ((z, n), &b) in z_bias.iter_mut().zip(n_bias.iter_mut()).zip(bias) {
                    (*z, *n) = (ftrl_z_of_weight(b, bias_params), 0.0);
                }
            }
        }
    }

    /// The state's tensors, named as in snapshots.
    pub(crate) fn tensors(&self) -> Vec<StateTensor<'_>> {
        match self {
            Optimizer::Sgd(_) => Vec::new(),
            Optimizer::Adagrad { sum_sq_weight, sum_sq_bias, .. } => {
                vec![("optimizer.sum_sq_weight", sum_sq_weight, true), ("optimizer.sum_sq_bias", sum_sq_bias, false)]
            }
            Optimizer::Ftrl { z_weight, n_weight, z_bias, n_bias, .. } => vec![
                ("optimizer.z_weight", z_weight, true),
                ("optimizer.n_weight", n_weight, true),
                ("optimizer.z_bias", z_bias, false),
                ("optimizer.n_bias", n_bias, false),
            ],
        }
    }

    /// Rebuilds `config`'s optimizer from its state tensors, fetched by name (the names
    /// [`tensors`](Self::tensors) lists); `fetch` checks their shapes.
    pub(crate) fn from_tensors<E>(
        config: &OptimizerConfig,
        mut fetch: impl FnMut(&'static str, bool) -> Result<Vec<f32>, E>,
    ) -> Result<Optimizer, E> {
        Ok(match config {
            OptimizerConfig::Sgd(c) => Optimizer::Sgd(*c),
            OptimizerConfig::Adagrad(c) => Optimizer::Adagrad {
                config: *c,
                sum_sq_weight: fetch("optimizer.sum_sq_weight", true)?,
                sum_sq_bias: fetch("optimizer.sum_sq_bias", false)?,
            },
            OptimizerConfig::Ftrl(c) => Optimizer::Ftrl {
                config: *c,
                z_weight: fetch("optimizer.z_weight", true)?,
                n_weight: fetch("optimizer.n_weight", true)?,
                z_bias: fetch("optimizer.z_bias", false)?,
                n_bias: fetch("optimizer.n_bias", false)?,
            },
        })
    }

    /// Applies one update, except for SGD's step on the weights, which it returns for the caller
    /// to apply (fused with the next forward pass, see the model). `coeffs[k]` is `p_k - y_k`, so
    /// class `k`'s weight gradient is `coeffs[k] * x` and its bias gradient `coeffs[k]`; `t` is
    /// the number of updates before this one. For SGD, `coeffs` is turned into the step,
    /// `-lr * coeffs[k]`, and the weight decay factor is returned. No optimizer regularises
    /// the bias.
    pub(crate) fn step(
        &mut self,
        simd: SimdPath,
        t: u64,
        weights: &mut [f32],
        bias: &mut [f32],
        x: &[f32],
        coeffs: &mut [f32],
    ) -> Option<f32> {
        match self {
            Optimizer::Sgd(c) => {
                let lr = c.schedule.learning_rate(c.learning_rate, t);
                for (b, ck) in bias.iter_mut().zip(coeffs.iter_mut()) {
                    *b -= lr * *ck;
                    *ck *= -lr;
                }
                // L2 as weight decay: w <- (1 - lr * l2) w - lr * c_k x.
                Some(1.0 - lr * c.l2)
            }
            Optimizer::Adagrad { config, sum_sq_weight, sum_sq_bias } => {
                simd.adagrad_step(weights, sum_sq_weight, x, coeffs, *config);
                for ((b, g2), &ck) in bias.iter_mut().zip(sum_sq_bias).zip(coeffs.iter()) {
                    kernels::adagrad_coordinate(b, g2, ck, config.learning_rate, config.epsilon);
                }
                None
            }
            Optimizer::Ftrl { config, z_weight, n_weight, z_bias, n_bias } => {
                let FtrlConfig { alpha, beta, l1, l2 } = *config;
                let params = FtrlParams { inv_alpha: 1.0 / alpha, beta, l1, l2 };
                simd.ftrl_step(weights, z_weight, n_weight, x, coeffs, params);
                let bias_params = FtrlParams { l1: 0.0, l2: 0.0, ..params };
                for (((b, z), n), &ck) in bias.iter_mut().zip(z_bias).zip(n_bias).zip(coeffs.iter()) {
                    kernels::ftrl_coordinate(b, z, n, ck, bias_params);
                }
                None
            }
        }
    }
}

/// The FTRL accumulator `z` that gives weight `w` when `n = 0`: the inverse of
/// `kernels::ftrl_weight` there, `w = (l1 sign(z) - z) / (beta / alpha + l2)`. Zero for a zero
/// weight (any `|z| <= l1` gives one).
fn ftrl_z_of_weight(w: f32, p: FtrlParams) -> f32 {
    if w == 0.0 {
        return 0.0;
    }
    -(w * (p.beta * p.inv_alpha + p.l2)) - p.l1.copysign(w)
}
