//! Classifier files: a trained [`SoftmaxRegression`] (weights, classes, standardisation,
//! optimizer state) in safetensors, with the featurizer it was trained on and how it was
//! trained in the metadata. The stream's snapshots are classifier files too (without the
//! training record), so `evaluate` and `predict` read them, and `dlpipe run --init-model`
//! warm-starts from a trained one.

use super::evaluate::Evaluation;
use super::train::EpochStats;
use crate::learn::{LearnError, SoftmaxRegression};
use crate::model::Manifest;
use dlpipe_operators::ClassifierId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Metadata keys, shared with the stream's snapshots.
pub const KEY_FEATURIZER_NAME: &str = "featurizer.name";
pub const KEY_FEATURIZER_SHA256: &str = "featurizer.sha256";
pub const KEY_TRAINING: &str = "training";

/// How a classifier was trained in batch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainingRecord {
    pub dlpipe_version: String,
    /// The dataset as given on the command line.
    pub data: String,
    /// Examples in the dataset, on each side of the split, and without features (failed).
    pub examples: usize,
    pub train_examples: usize,
    pub test_examples: usize,
    pub failed_examples: usize,
    pub test_split: f64,
    pub seed: u64,
    pub epochs: usize,
    /// The weight of each class, in class order.
    pub class_weights: Vec<f32>,
    pub curve: Vec<EpochStats>,
    /// On the held-out side of the split, when there was one.
    pub held_out: Option<Evaluation>,
    pub featurize_seconds: f64,
    pub train_seconds: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum ClassifierError {
    #[error(transparent)]
    Learn(#[from] LearnError),
    #[error("{path}: metadata {key:?} is not valid: {reason}")]
    Metadata { path: PathBuf, key: &'static str, reason: String },
    #[error(
        "{path} records no featurizer (metadata {KEY_FEATURIZER_NAME:?}); name the model it was trained on with \
         --model"
    )]
    NoFeaturizer { path: PathBuf },
    #[error(
        "{path} was trained on features of model {trained} (sha256 {trained_sha}), but model {given} has sha256 \
         {given_sha}: its features mean something else. Use --model {trained}, or retrain"
    )]
    FeaturizerMismatch { path: PathBuf, trained: String, trained_sha: String, given: String, given_sha: String },
    #[error("{path}: the classifier has {classes} features, model {model} gives {dim}")]
    Dimension { path: PathBuf, classes: usize, model: String, dim: usize },
}

/// The id predictions name a classifier file by: `sha256:` and the first 16 hex digits of the
/// file's sha256 (`sha256sum FILE` shows the same digits).
pub fn classifier_id(bytes: &[u8]) -> ClassifierId {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(bytes);
    ClassifierId(format!("sha256:{}", hex::encode(&digest[..8])))
}

/// A classifier and what its file says about it.
pub struct Classifier {
    pub path: PathBuf,
    /// What predictions call it ([`classifier_id`] of the file).
    pub id: ClassifierId,
    pub model: SoftmaxRegression,
    pub featurizer_name: Option<String>,
    pub featurizer_sha256: Option<String>,
    pub training: Option<TrainingRecord>,
    /// All of the file's own metadata (the model's reserved keys excluded).
    pub metadata: BTreeMap<String, String>,
}

impl Classifier {
    pub fn load(path: &Path) -> Result<Classifier, ClassifierError> {
        let (model, metadata) = SoftmaxRegression::load(path)?;
        let bytes = std::fs::read(path).map_err(|source| LearnError::Io { path: path.into(), source })?;
        let training = match metadata.get(KEY_TRAINING) {
            Some(json) => Some(serde_json::from_str(json).map_err(|e| ClassifierError::Metadata {
                path: path.into(),
                key: KEY_TRAINING,
                reason: e.to_string(),
            })?),
            None => None,
        };
        let non_empty = |key: &str| metadata.get(key).filter(|v| !v.is_empty()).cloned();
        Ok(Classifier {
            path: path.into(),
            id: classifier_id(&bytes),
            featurizer_name: non_empty(KEY_FEATURIZER_NAME),
            featurizer_sha256: non_empty(KEY_FEATURIZER_SHA256),
            training,
            model,
            metadata,
        })
    }

    /// Writes `model` with its featurizer and training record (atomically, as snapshots are).
    pub fn save(
        path: &Path,
        model: &SoftmaxRegression,
        featurizer: &Manifest,
        training: Option<&TrainingRecord>,
    ) -> Result<(), ClassifierError> {
        let mut metadata = featurizer_metadata(featurizer);
        if let Some(training) = training {
            metadata.insert(KEY_TRAINING.into(), serde_json::to_string(training).expect("serialisable"));
        }
        Ok(model.save(path, &metadata)?)
    }

    /// The model to featurize with: `given` (a name or manifest path) or the one recorded.
    pub fn featurizer_model<'a>(&'a self, given: Option<&'a str>) -> Result<&'a str, ClassifierError> {
        given
            .or(self.featurizer_name.as_deref())
            .ok_or_else(|| ClassifierError::NoFeaturizer { path: self.path.clone() })
    }

    /// Checks that features of `manifest`'s model are what this classifier was trained on.
    pub fn check_featurizer(&self, manifest: &Manifest) -> Result<(), ClassifierError> {
        if let (Some(trained), Some(given)) = (&self.featurizer_sha256, &manifest.sha256) {
            if trained != given {
                return Err(ClassifierError::FeaturizerMismatch {
                    path: self.path.clone(),
                    trained: self.featurizer_name.clone().unwrap_or_else(|| "(unnamed)".into()),
                    trained_sha: trained.clone(),
                    given: manifest.name.clone(),
                    given_sha: given.clone(),
                });
            }
        }
        if self.model.dim() != manifest.feature_dim {
            return Err(ClassifierError::Dimension {
                path: self.path.clone(),
                classes: self.model.dim(),
                model: manifest.name.clone(),
                dim: manifest.feature_dim,
            });
        }
        Ok(())
    }
}

/// The metadata naming a featurizer, as classifier files and stream snapshots record it.
pub fn featurizer_metadata(manifest: &Manifest) -> BTreeMap<String, String> {
    let mut metadata = BTreeMap::new();
    metadata.insert(KEY_FEATURIZER_NAME.into(), manifest.name.clone());
    metadata.insert(KEY_FEATURIZER_SHA256.into(), manifest.sha256.clone().unwrap_or_default());
    metadata
}
