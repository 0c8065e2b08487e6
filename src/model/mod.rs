//! TorchScript CNNs described by a manifest: where the file is, what input it wants, what it
//! returns. [`Featurizer`] loads one onto a device and runs batches; [`top_k`] turns logits into
//! named class probabilities (sparkdl's DeepImagePredictor with decodePredictions).

mod featurizer;
mod manifest;
mod precision;
mod threads;

pub use featurizer::{crops_on_device, parse_device, Featurizer, Normalise, Outputs};
pub use manifest::{resolve, Dtype, InputSpec, Manifest, OutputKind, WeightsSource};
pub use precision::{resolve_precision, wanted_dtype, CpuFeatures};
pub use threads::set_intra_op_threads;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{0}")]
    NotFound(String),
    #[error("cannot read manifest {path}: {source}")]
    ManifestIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("manifest {path} is not valid: {reason}")]
    BadManifest { path: PathBuf, reason: String },
    #[error("model file {path} does not match its manifest: {reason}")]
    Mismatch { path: PathBuf, reason: String },
    #[error("cannot load TorchScript model {path} on {device}: {source}")]
    Load {
        path: PathBuf,
        device: String,
        #[source]
        source: tch::TchError,
    },
    /// `model.precision` asks for what this model or device cannot run.
    #[error("{0}")]
    Precision(String),
    #[error("device {0:?} is not available: {1}")]
    Device(String, String),
    /// Pixels the device cannot make a crop of (the host checks them before sending them).
    #[error("cannot crop the batch on the device: {0}")]
    Pixels(String),
    #[error("forward pass of {model} failed: {source}")]
    Forward {
        model: String,
        #[source]
        source: tch::TchError,
    },
}

/// One class of a prediction.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClassProbability {
    /// Index of the class in the model's (or classifier's) class list.
    pub class: usize,
    /// Its name, when the model has class names.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub name: Option<String>,
    pub probability: f32,
}

/// Softmax over `logits`, then the `k` most probable classes, most probable first.
pub fn top_k(logits: &[f32], k: usize, names: &[String]) -> Vec<ClassProbability> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    let k = k.min(order.len());
    if k == 0 {
        return Vec::new();
    }
    order.select_nth_unstable_by(k - 1, |a, b| exps[*b].total_cmp(&exps[*a]).then(a.cmp(b)));
    order.truncate(k);
    order.sort_by(|a, b| exps[*b].total_cmp(&exps[*a]).then(a.cmp(b)));
    order
        .into_iter()
        .map(|class| ClassProbability { class, name: names.get(class).cloned(), probability: exps[class] / sum })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_is_a_sorted_softmax() {
        let names: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        let top = top_k(&[1.0, 3.0, 2.0, 3.0], 3, &names);
        assert_eq!(top.iter().map(|c| c.class).collect::<Vec<_>>(), vec![1, 3, 2], "ties keep class order");
        let z = 1f32.exp() + 2.0 * 3f32.exp() + 2f32.exp();
        assert!((top[0].probability - 3f32.exp() / z).abs() < 1e-6);
        assert_eq!(top[2].name.as_deref(), Some("c"));
        assert_eq!(top_k(&[0.0; 4], 10, &[]).len(), 4);
    }
}
