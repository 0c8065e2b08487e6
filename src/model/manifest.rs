//! The manifest beside each TorchScript file (written by `tools/export_model.py`, or by hand for
//! a user's own model): the contract between the exported network and dlpipe.

use super::ModelError;
use crate::image::Preprocess;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Manifest format this build reads.
pub const MANIFEST_FORMAT: u32 = 1;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    /// Name dlpipe calls the model by (`--model NAME`).
    pub name: String,
    pub architecture: String,
    /// TorchScript file, relative to the manifest's folder.
    pub file: String,
    /// sha256 of `file`; checked at load so a manifest never describes another model. Also the
    /// key of feature caches and what classifiers record as their featurizer.
    pub sha256: Option<String>,
    pub input: InputSpec,
    /// What `forward` returns, in order: one kind is a tensor, two are a tuple.
    pub outputs: Vec<OutputKind>,
    /// Width of the pooled feature vector.
    #[serde(default)]
    pub feature_dim: usize,
    /// Number of logits.
    #[serde(default)]
    pub num_classes: usize,
    #[serde(default)]
    pub class_names: Vec<String>,
    #[serde(default)]
    pub weights: Weights,
    #[serde(default)]
    pub torch_version: Option<String>,
    #[serde(default)]
    pub exported_by: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    pub height: u32,
    pub width: u32,
    #[serde(default = "three")]
    pub channels: u32,
    /// Only "NCHW" (PyTorch's layout; a channels-last model converts inside its forward).
    #[serde(default = "nchw")]
    pub layout: String,
    #[serde(default)]
    pub dtype: Dtype,
    pub resize_shorter_side: u32,
    /// Only "center".
    #[serde(default = "center")]
    pub crop: String,
    /// "bilinear" (PIL's antialiased bilinear, torchvision's default) or "bicubic".
    #[serde(default = "bilinear")]
    pub interpolation: String,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

fn three() -> u32 {
    3
}
fn nchw() -> String {
    "NCHW".into()
}
fn center() -> String {
    "center".into()
}
fn bilinear() -> String {
    "bilinear".into()
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    #[default]
    F32,
    Bf16,
    F16,
}

impl Dtype {
    pub fn kind(self) -> tch::Kind {
        match self {
            Dtype::F32 => tch::Kind::Float,
            Dtype::Bf16 => tch::Kind::BFloat16,
            Dtype::F16 => tch::Kind::Half,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputKind {
    Features,
    Logits,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Weights {
    #[serde(default)]
    pub source: WeightsSource,
    #[serde(default)]
    pub package: Option<String>,
    #[serde(default)]
    pub file: Option<String>,
    #[serde(default)]
    pub sha256: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightsSource {
    Pretrained,
    User,
    Untrained,
    /// A hand-written manifest that does not say.
    #[default]
    Unknown,
}

impl Manifest {
    /// Reads and validates a manifest file.
    pub fn load(path: &Path) -> Result<Manifest, ModelError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ModelError::ManifestIo { path: path.into(), source })?;
        let manifest: Manifest = serde_json::from_str(&text)
            .map_err(|e| ModelError::BadManifest { path: path.into(), reason: e.to_string() })?;
        manifest.validate(path)?;
        Ok(manifest)
    }

    /// Checks what this build supports; errors are [`ModelError::BadManifest`] naming `path`.
    fn validate(&self, path: &Path) -> Result<(), ModelError> {
        let bad = |reason: String| ModelError::BadManifest { path: path.into(), reason };
        if self.format != MANIFEST_FORMAT {
            return Err(bad(format!("format {} is not the supported format {MANIFEST_FORMAT}", self.format)));
        }
        let input = &self.input;
        if input.channels != 3 {
            return Err(bad(format!("input.channels is {}; only RGB (3) models are supported", input.channels)));
        }
        if input.layout != "NCHW" {
            return Err(bad(format!("input.layout {:?} is not supported (\"NCHW\")", input.layout)));
        }
        if input.crop != "center" {
            return Err(bad(format!("input.crop {:?} is not supported (\"center\")", input.crop)));
        }
        if !["bilinear", "bicubic"].contains(&input.interpolation.as_str()) {
            return Err(bad(format!(
                "input.interpolation {:?} is not supported (\"bilinear\", \"bicubic\")",
                input.interpolation
            )));
        }
        if self.outputs.is_empty()
            || self.outputs.len() > 2
            || (self.outputs.len() == 2 && self.outputs[0] == self.outputs[1])
        {
            return Err(bad(format!("outputs {:?} must be [\"features\"], [\"logits\"] or both", self.outputs)));
        }
        if self.outputs.contains(&OutputKind::Features) && self.feature_dim == 0 {
            return Err(bad("outputs include features but feature_dim is 0".into()));
        }
        if self.outputs.contains(&OutputKind::Logits) && self.num_classes == 0 {
            return Err(bad("outputs include logits but num_classes is 0".into()));
        }
        if !self.class_names.is_empty() && self.class_names.len() != self.num_classes {
            return Err(bad(format!("{} class_names for {} classes", self.class_names.len(), self.num_classes)));
        }
        self.preprocess().map(|_| ()).map_err(|e| bad(e.to_string()))
    }

    /// The preprocessing this model's input needs.
    pub fn preprocess(&self) -> Result<Preprocess, crate::image::PreprocessError> {
        let i = &self.input;
        Ok(Preprocess::new(i.height, i.width, i.resize_shorter_side, i.mean, i.std)?
            .with_bicubic(i.interpolation == "bicubic"))
    }

    pub fn has(&self, kind: OutputKind) -> bool {
        self.outputs.contains(&kind)
    }

    /// Width of one row of `kind` output.
    pub fn dim(&self, kind: OutputKind) -> usize {
        match kind {
            OutputKind::Features => self.feature_dim,
            OutputKind::Logits => self.num_classes,
        }
    }
}

/// Finds a model by name or path: a `.json` manifest, a `.pt` file with its manifest beside it,
/// or a NAME with `NAME.json` in `model_dir`. Returns the manifest's path.
pub fn resolve(model: &str, model_dir: &Path) -> Result<PathBuf, ModelError> {
    let given = Path::new(model);
    let candidate = match given.extension().and_then(|e| e.to_str()) {
        Some("json") => given.to_path_buf(),
        Some("pt") | Some("ts") => given.with_extension("json"),
        _ => model_dir.join(format!("{model}.json")),
    };
    if candidate.is_file() {
        return Ok(candidate);
    }
    let mut known: Vec<String> = std::fs::read_dir(model_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".json")).map(str::to_owned))
        .collect();
    known.sort();
    let known = if known.is_empty() { "none".to_owned() } else { known.join(", ") };
    Err(ModelError::NotFound(format!(
        "model {model:?} not found: no manifest {} (models in {}: {known}). Export one with \
         `.venv/bin/python tools/export_model.py NAME --out {}`, or pass a manifest's path",
        candidate.display(),
        model_dir.display(),
        model_dir.display()
    )))
}
