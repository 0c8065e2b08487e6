//! Transfer learning in batch, sparkdl's workflow: a labelled image dataset is featurized with
//! a pretrained CNN (once: features are cached by model and image content), split into train
//! and test sets by class, and the stream's own learner is trained on it for several shuffled
//! epochs; the classifier is evaluated, drawn and saved in a file the stream can start from.
//!
//! - [`dataset`]: class folders or `uri,label` lists; the stratified split.
//! - [`cache`]: the feature cache.
//! - [`features`]: a dataset's features, from the cache or the model on every device.
//! - [`train`]: epochs of the online learner, with class weights.
//! - [`evaluate`]: accuracy, per-class precision/recall/F1, log-loss, confusion matrix.
//! - [`plot`]: the confusion matrix and the training curve as PNG.
//! - [`classifier`]: classifier files.

pub mod cache;
pub mod classifier;
pub mod dataset;
pub mod evaluate;
pub mod features;
pub mod plot;
pub mod train;

pub use classifier::{Classifier, ClassifierError, TrainingRecord};
pub use dataset::{Example, Split};
pub use evaluate::Evaluation;
pub use features::{extract_features, Features, FeaturizeOptions};
pub use train::EpochStats;

/// The sorted set of labels of `examples`: the classes of a classifier trained on them.
pub fn classes_of<'a>(examples: impl IntoIterator<Item = &'a Example>) -> Vec<String> {
    let set: std::collections::BTreeSet<&str> = examples.into_iter().map(|e| e.label.as_str()).collect();
    set.into_iter().map(String::from).collect()
}
