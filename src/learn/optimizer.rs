//! The optimizers' per-weight state and their update step.

use super::config::{AdagradConfig, FtrlConfig, OptimizerConfig};
use super::kernels::{self, FtrlParams, SimdPath};

/// What an optimizer remembers between updates, laid out like the weights: a `K x D` row-major
/// matrix for the weights and a `K` vector for the bias.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum OptimizerState {
    /// Plain SGD keeps nothing; its learning rate depends only on the update count.
    Sgd,
    /// Accumulated squared gradients.
    Adagrad { sum_sq_weight: Vec<f32>, sum_sq_bias: Vec<f32> },
    /// FTRL-Proximal's `z` (adjusted accumulated gradients) and `n` (accumulated squared
    /// gradients); the weights are a function of them, kept materialised for prediction.
    Ftrl { z_weight: Vec<f32>, n_weight: Vec<f32>, z_bias: Vec<f32>, n_bias: Vec<f32> },
}

/// The name of one state tensor in snapshots, its data, and whether it is `K x D` (else `K`).
pub(crate) type StateTensor<'a> = (&'static str, &'a [f32], bool);

impl OptimizerState {
    /// Fresh state for `classes` classes of `dim` features.
    pub(crate) fn new(config: &OptimizerConfig, classes: usize, dim: usize) -> OptimizerState {
        let zeros = |n: usize| vec![0.0f32; n];
        match config {
            OptimizerConfig::Sgd(_) => OptimizerState::Sgd,
            OptimizerConfig::Adagrad(_) => {
                OptimizerState::Adagrad { sum_sq_weight: zeros(classes * dim), sum_sq_bias: zeros(classes) }
            }
            OptimizerConfig::Ftrl(_) => OptimizerState::Ftrl {
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
            OptimizerState::Sgd => {}
            OptimizerState::Adagrad { sum_sq_weight, sum_sq_bias } => {
                grow(sum_sq_weight, dim);
                grow(sum_sq_bias, 1);
            }
            OptimizerState::Ftrl { z_weight, n_weight, z_bias, n_bias } => {
                grow(z_weight, dim);
                grow(n_weight, dim);
                grow(z_bias, 1);
                grow(n_bias, 1);
            }
        }
    }

    /// The state's tensors, named as in snapshots.
    pub(crate) fn tensors(&self) -> Vec<StateTensor<'_>> {
        match self {
            OptimizerState::Sgd => Vec::new(),
            OptimizerState::Adagrad { sum_sq_weight, sum_sq_bias } => {
                vec![("optimizer.sum_sq_weight", sum_sq_weight, true), ("optimizer.sum_sq_bias", sum_sq_bias, false)]
            }
            OptimizerState::Ftrl { z_weight, n_weight, z_bias, n_bias } => vec![
                ("optimizer.z_weight", z_weight, true),
                ("optimizer.n_weight", n_weight, true),
                ("optimizer.z_bias", z_bias, false),
                ("optimizer.n_bias", n_bias, false),
            ],
        }
    }

    /// Rebuilds the state of `config`'s optimizer from tensors fetched by name (in the order
    /// [`tensors`](Self::tensors) lists them); `fetch` checks their shapes.
    pub(crate) fn from_tensors<E>(
        config: &OptimizerConfig,
        mut fetch: impl FnMut(&'static str, bool) -> Result<Vec<f32>, E>,
    ) -> Result<OptimizerState, E> {
        Ok(match config {
            OptimizerConfig::Sgd(_) => OptimizerState::Sgd,
            OptimizerConfig::Adagrad(_) => OptimizerState::Adagrad {
                sum_sq_weight: fetch("optimizer.sum_sq_weight", true)?,
                sum_sq_bias: fetch("optimizer.sum_sq_bias", false)?,
            },
            OptimizerConfig::Ftrl(_) => OptimizerState::Ftrl {
                z_weight: fetch("optimizer.z_weight", true)?,
                n_weight: fetch("optimizer.n_weight", true)?,
                z_bias: fetch("optimizer.z_bias", false)?,
                n_bias: fetch("optimizer.n_bias", false)?,
            },
        })
    }

    /// Applies one update. `coeffs[k]` is `p_k - y_k`, so class `k`'s weight gradient is
    /// `coeffs[k] * x` and its bias gradient `coeffs[k]`; `t` is the number of updates before
    /// this one. The state must have been created for `config`. No optimizer regularises the
    /// bias.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn step(
        &mut self,
        config: &OptimizerConfig,
        simd: SimdPath,
        t: u64,
        weights: &mut [f32],
        bias: &mut [f32],
        x: &[f32],
        coeffs: &[f32],
    ) {
        match (config, self) {
            (OptimizerConfig::Sgd(c), OptimizerState::Sgd) => {
                let lr = c.schedule.learning_rate(c.learning_rate, t);
                // L2 as weight decay: w <- (1 - lr * l2) w - lr * c_k x.
                simd.sgd_step(weights, x, coeffs, lr, 1.0 - lr * c.l2);
                for (b, &ck) in bias.iter_mut().zip(coeffs) {
                    *b -= lr * ck;
                }
            }
            (OptimizerConfig::Adagrad(c), OptimizerState::Adagrad { sum_sq_weight, sum_sq_bias }) => {
                let AdagradConfig { learning_rate, epsilon, l2 } = *c;
                simd.adagrad_step(weights, sum_sq_weight, x, coeffs, learning_rate, epsilon, l2);
                for ((b, g2), &ck) in bias.iter_mut().zip(sum_sq_bias).zip(coeffs) {
                    kernels::adagrad_coordinate(b, g2, ck, learning_rate, epsilon);
                }
            }
            (OptimizerConfig::Ftrl(c), OptimizerState::Ftrl { z_weight, n_weight, z_bias, n_bias }) => {
                let FtrlConfig { alpha, beta, l1, l2 } = *c;
                let params = FtrlParams { inv_alpha: 1.0 / alpha, beta, l1, l2 };
                simd.ftrl_step(weights, z_weight, n_weight, x, coeffs, params);
                let bias_params = FtrlParams { l1: 0.0, l2: 0.0, ..params };
                for (((b, z), n), &ck) in bias.iter_mut().zip(z_bias).zip(n_bias).zip(coeffs) {
                    kernels::ftrl_coordinate(b, z, n, ck, bias_params);
                }
            }
            (config, state) => unreachable!("optimizer state {state:?} was not made for {config:?}"),
        }
    }
}
