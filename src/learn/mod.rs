//! Online multinomial logistic regression on feature vectors: the classifier that learns from
//! labelled records on top of the CNN's pooled features (transfer learning, one example at a
//! time).
//!
//! - [`SoftmaxRegression`]: the model, with classes discovered from labels or fixed by config,
//!   running feature standardisation ([`RunningStandardizer`]), SGD, AdaGrad or FTRL-Proximal
//!   ([`OptimizerConfig`]), test-then-train updates that report how well the example was
//!   predicted ([`UpdateOutcome`]), class weights for imbalanced data ([`ClassWeights`]), replay
//!   of recent examples at each epoch's end ([`ReplayConfig`]), and safetensors snapshots
//!   (files or bytes).
//! - [`Prequential`]: accuracy and log-loss of those predictions, in total and over a window.
//! - [`PageHinkley`]: drift detection on those log-losses, and the [`DriftAction`] the
//!   learner takes on a detection ([`DriftConfig`], the `[drift]` config section).
//!
//! The module is pure computation: no I/O beyond snapshots, no threads, and no randomness
//! but a seeded [`SplitMix64`] whose state is in snapshots. An
//! update costs a few microseconds for 1280 features and 10 classes (`cargo bench --bench
//! learner`), so the learner keeps up with any CNN.

mod class_weights;
mod config;
mod drift;
mod kernels;
mod model;
mod optimizer;
mod prequential;
mod replay;
mod rng;
mod snapshot;
mod standardize;
#[cfg(test)]
mod testutil;

pub use class_weights::{ClassWeights, ClassWeightsError};
pub use config::{
    AdagradConfig, FtrlConfig, LearnerConfig, LearningRateSchedule, OptimizerConfig, ReplayConfig, SgdConfig,
};
pub use drift::{DriftAction, DriftConfig, PageHinkley, PageHinkleyState};
pub use kernels::{argmax, SimdPath, VARIANCE_EPSILON};
pub use model::{SoftmaxRegression, UpdateOutcome};
pub use prequential::{Prequential, PrequentialState};
pub use rng::SplitMix64;
pub use snapshot::{SnapshotError, FORMAT_VERSION, RESERVED_PREFIX};
pub use standardize::RunningStandardizer;

use std::path::PathBuf;

/// Why the learner refused an input, a config or a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum LearnError {
    #[error("label {label:?} would be a new class, but the learner already has max_classes = {max_classes}")]
    TooManyClasses { label: String, max_classes: usize },
    #[error("label {label:?} is not one of the {classes} classes fixed by the learner config")]
    UnknownLabel { label: String, classes: usize },
    #[error("class index {index} is out of range: the model has {classes} classes")]
    ClassIndex { index: usize, classes: usize },
    #[error("feature vector has {got} values, the model expects {expected}")]
    Dimension { expected: usize, got: usize },
    #[error("feature {index} of the feature vector is {value}; features must be finite")]
    NonFinite { index: usize, value: f32 },
    #[error("output buffer has {got} slots for {expected} values")]
    OutputLength { expected: usize, got: usize },
    #[error(
        "the model diverged after {updates} updates (its logits are no longer finite): the learning rate is too \
         high for these features; lower it, or turn on standardize"
    )]
    Diverged { updates: u64 },
    #[error("invalid learner config: {field} {reason}")]
    Config { field: &'static str, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("model snapshot {origin}: {source}")]
    Snapshot {
        /// The file, or "(in-memory snapshot)".
        origin: String,
        #[source]
        source: SnapshotError,
    },
}

impl LearnError {
    /// The error for the first non-finite value of `x`, which must have one.
    pub(crate) fn non_finite(x: &[f32]) -> LearnError {
        let index = x.iter().position(|v| !v.is_finite()).expect("x has a non-finite value");
        LearnError::NonFinite { index, value: x[index] }
    }
}
