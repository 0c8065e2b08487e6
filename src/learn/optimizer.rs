//! The optimizers' per-weight state and their update step.

use super::config::{AdagradConfig, FtrlConfig, OptimizerConfig, SgdConfig};
use super::kernels::{self, FtrlParams};

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
    /// this one. The state must have been created for `config`.
    #[inline(always)]
    pub(crate) fn step(
        &mut self,
        config: &OptimizerConfig,
        t: u64,
        weights: &mut [f32],
        bias: &mut [f32],
        x: &[f32],
        coeffs: &[f32],
    ) {
        let d = x.len();
        debug_assert!(d > 0 && weights.len() == d * coeffs.len() && bias.len() == coeffs.len());
        match (config, self) {
            (OptimizerConfig::Sgd(c), OptimizerState::Sgd) => sgd_step(c, t, weights, bias, x, coeffs),
            (OptimizerConfig::Adagrad(c), OptimizerState::Adagrad { sum_sq_weight, sum_sq_bias }) => {
                let AdagradConfig { learning_rate, epsilon, l2 } = *c;
                let rows = weights.chunks_exact_mut(d).zip(sum_sq_weight.chunks_exact_mut(d));
                for (((w, g2), b), (b2, &ck)) in rows.zip(bias.iter_mut()).zip(sum_sq_bias.iter_mut().zip(coeffs)) {
                    kernels::adagrad_row(w, g2, x, ck, learning_rate, epsilon, l2);
                    *b2 += ck * ck;
                    *b -= learning_rate * ck / (b2.sqrt() + epsilon);
                }
            }
            (OptimizerConfig::Ftrl(c), OptimizerState::Ftrl { z_weight, n_weight, z_bias, n_bias }) => {
                let FtrlConfig { alpha, beta, l1, l2 } = *c;
                let params = FtrlParams { inv_alpha: 1.0 / alpha, beta, l1, l2 };
                let rows =
                    weights.chunks_exact_mut(d).zip(z_weight.chunks_exact_mut(d)).zip(n_weight.chunks_exact_mut(d));
                for (((w, z), n), &ck) in rows.zip(coeffs) {
                    kernels::ftrl_row(w, z, n, x, ck, params);
                }
                // The bias is one more coordinate, unregularised.
                let bias_params = FtrlParams { l1: 0.0, l2: 0.0, ..params };
                for (((b, z), n), &ck) in bias.iter_mut().zip(z_bias.iter_mut()).zip(n_bias.iter_mut()).zip(coeffs) {
                    kernels::ftrl_row(
                        std::slice::from_mut(b),
                        std::slice::from_mut(z),
                        std::slice::from_mut(n),
                        &[1.0],
                        ck,
                        bias_params,
                    );
                }
            }
            (config, state) => unreachable!("optimizer state {state:?} was not made for {config:?}"),
        }
    }
}

#[inline(always)]
fn sgd_step(c: &SgdConfig, t: u64, weights: &mut [f32], bias: &mut [f32], x: &[f32], coeffs: &[f32]) {
    let lr = c.schedule.learning_rate(c.learning_rate, t);
    // L2 is weight decay: w <- (1 - lr * l2) w - lr * c_k x. Without it, skip the multiply.
    let decay = 1.0 - lr * c.l2;
    for ((w, b), &ck) in weights.chunks_exact_mut(x.len()).zip(bias.iter_mut()).zip(coeffs) {
        if c.l2 == 0.0 {
            kernels::axpy(w, -lr * ck, x);
        } else {
            kernels::scale_axpy(w, decay, -lr * ck, x);
        }
        *b -= lr * ck;
    }
}
