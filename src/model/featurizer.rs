//! A TorchScript model on one device: batches of preprocessed images in, pooled features and/or
//! logits out. sparkdl's DeepImageFeaturizer, minus Spark.

use super::manifest::{Manifest, OutputKind, WeightsSource};
use super::ModelError;
use crate::image::Preprocess;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tch::{CModule, Device, IValue, Tensor};

/// Parses "cpu", "cuda" (= "cuda:0") or "cuda:N", checking that the device exists.
pub fn parse_device(name: &str) -> Result<Device, ModelError> {
    let name = name.trim();
    if name == "cpu" {
        return Ok(Device::Cpu);
    }
    let index = match name.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| ModelError::Device(name.into(), "expected \"cpu\", \"cuda\" or \"cuda:N\"".into()))?,
        None => return Err(ModelError::Device(name.into(), "expected \"cpu\", \"cuda\" or \"cuda:N\"".into())),
    };
    let count = tch::Cuda::device_count() as usize;
    if index >= count {
        return Err(ModelError::Device(
            name.into(),
            format!("this machine has {count} CUDA device(s); use devices = [\"cpu\"] or --device cpu"),
        ));
    }
    Ok(Device::Cuda(index))
}

/// The outputs of one forward pass over `n` images, row-major, as f32 on the host.
#[derive(Debug)]
pub struct Outputs {
    pub n: usize,
    /// `n x feature_dim`, when the model outputs features.
    pub features: Option<Vec<f32>>,
    /// `n x num_classes`, when the model outputs logits.
    pub logits: Option<Vec<f32>>,
}

impl Outputs {
    pub fn features_row(&self, i: usize) -> Option<&[f32]> {
        let f = self.features.as_ref()?;
        let d = f.len() / self.n;
        Some(&f[i * d..(i + 1) * d])
    }

    pub fn logits_row(&self, i: usize) -> Option<&[f32]> {
        let l = self.logits.as_ref()?;
        let d = l.len() / self.n;
        Some(&l[i * d..(i + 1) * d])
    }
}

/// One loaded model instance. Forward passes take `&self`; libtorch runs them under no_grad.
pub struct Featurizer {
    module: CModule,
    manifest: Manifest,
    preprocess: Preprocess,
    device: Device,
    path: PathBuf,
}

impl std::fmt::Debug for Featurizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Featurizer").field("model", &self.manifest.name).field("device", &self.device).finish()
    }
}

impl Featurizer {
    /// Loads the model a manifest describes onto `device`, checks that the file is the one the
    /// manifest hashed, and runs one warm-up batch to check the output shapes the manifest
    /// promises (the first real batch then pays no lazy-initialisation cost either).
    pub fn load(manifest_path: &Path, device: Device) -> Result<Featurizer, ModelError> {
        let manifest = Manifest::load(manifest_path)?;
        let path = manifest_path.parent().unwrap_or(Path::new(".")).join(&manifest.file);
        if !path.is_file() {
            return Err(ModelError::NotFound(format!(
                "manifest {} names the model file {}, which does not exist",
                manifest_path.display(),
                path.display()
            )));
        }
        if let Some(want) = &manifest.sha256 {
            let got = sha256_file(&path).map_err(|source| ModelError::ManifestIo { path: path.clone(), source })?;
            if !got.eq_ignore_ascii_case(want) {
                return Err(ModelError::Mismatch {
                    path,
                    reason: format!(
                        "its sha256 is {got}, the manifest says {want}: re-export the model or fix the manifest"
                    ),
                });
            }
        }
        let preprocess = manifest
            .preprocess()
            .map_err(|e| ModelError::BadManifest { path: manifest_path.into(), reason: e.to_string() })?;
        let mut module = CModule::load_on_device(&path, device).map_err(|source| ModelError::Load {
            path: path.clone(),
            device: format!("{device:?}"),
            source,
        })?;
        module.set_eval();
        if manifest.weights.source == WeightsSource::Untrained {
            tracing::warn!(
                model = %manifest.name,
                "model {} has UNTRAINED weights (exported without --weights): its features and predictions are meaningless",
                manifest.name
            );
        }
        let featurizer = Featurizer { module, manifest, preprocess, device, path };
        featurizer.warm_up()?;
        Ok(featurizer)
    }

    fn warm_up(&self) -> Result<(), ModelError> {
        let zeros = vec![0f32; self.preprocess.tensor_len()];
        let input = &self.manifest.input;
        match self.forward(&zeros, 1) {
            Ok(_) => Ok(()),
            Err(mismatch @ ModelError::Mismatch { .. }) => Err(mismatch),
            Err(e) => Err(ModelError::Mismatch {
                path: self.path.clone(),
                reason: format!(
                    "a 3x{}x{} {:?} image, as the manifest describes its input, does not run: {e}",
                    input.height, input.width, input.dtype
                ),
            }),
        }
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn preprocess(&self) -> &Preprocess {
        &self.preprocess
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Runs `n` images laid out contiguously as `n x 3 x H x W` f32 (what [`Preprocess::run`]
    /// writes) through the model.
    pub fn forward(&self, batch: &[f32], n: usize) -> Result<Outputs, ModelError> {
        let (h, w) = self.preprocess.output_size();
        assert_eq!(batch.len(), n * self.preprocess.tensor_len(), "batch length does not match n images");
        let model = &self.manifest.name;
        let forward_err = |source| ModelError::Forward { model: model.clone(), source };
        // libtorch's CPU convolutions take a different path for a batch of one, whose results
        // differ from the same image's in any larger batch in the last bits. Features must not
        // depend on how records happened to be batched (the stream's learner is deterministic
        // across worker counts only if its inputs are), so a single image runs as a pair.
        let padded;
        let (batch, rows) = if n == 1 {
            padded = [batch, batch].concat();
            (&padded[..], 2)
        } else {
            (batch, n)
        };
        let out = tch::no_grad(|| -> Result<Vec<Tensor>, ModelError> {
            let input = Tensor::from_slice(batch)
                .view([rows as i64, 3, i64::from(h), i64::from(w)])
                .to_device(self.device)
                .to_kind(self.manifest.input.dtype.kind());
            let result = self.module.forward_is(&[IValue::Tensor(input)]).map_err(forward_err)?;
            Ok(match result {
                IValue::Tensor(t) => vec![t],
                IValue::Tuple(items) | IValue::GenericList(items) => items
                    .into_iter()
                    .map(|item| match item {
                        IValue::Tensor(t) => Ok(t),
                        other => {
                            Err(self.mismatch(format!("forward returned a tuple holding {}", ivalue_kind(&other))))
                        }
                    })
                    .collect::<Result<_, _>>()?,
                other => return Err(self.mismatch(format!("forward returned {}, not tensors", ivalue_kind(&other)))),
            })
        })?;
        if out.len() != self.manifest.outputs.len() {
            return Err(self.mismatch(format!(
                "forward returned {} tensor(s), the manifest lists outputs {:?}",
                out.len(),
                self.manifest.outputs
            )));
        }
        let mut outputs = Outputs { n, features: None, logits: None };
        for (kind, tensor) in self.manifest.outputs.iter().zip(out) {
            let dim = self.manifest.dim(*kind);
            let got = tensor.size();
            if got != [rows as i64, dim as i64] {
                let per_image = got.get(1..).map(|d| format!("{d:?}")).unwrap_or_default();
                return Err(self.mismatch(format!(
                    "its {kind:?} output has shape {per_image} per image, the manifest says {dim} values \
                     (feature_dim / num_classes)"
                )));
            }
            let host = tensor.narrow(0, 0, n as i64).to_kind(tch::Kind::Float).to_device(Device::Cpu).contiguous();
            let len = n * self.manifest.dim(*kind);
            let mut values = vec![0f32; len];
            host.copy_data(&mut values, len);
            match kind {
                OutputKind::Features => outputs.features = Some(values),
                OutputKind::Logits => outputs.logits = Some(values),
            }
        }
        Ok(outputs)
    }

    fn mismatch(&self, reason: String) -> ModelError {
        ModelError::Mismatch { path: self.path.clone(), reason }
    }
}

fn ivalue_kind(v: &IValue) -> &'static str {
    match v {
        IValue::None => "None",
        IValue::Tensor(_) => "a tensor",
        IValue::Double(_) | IValue::Int(_) | IValue::Bool(_) => "a number",
        IValue::Tuple(_) => "a tuple",
        IValue::String(_) => "a string",
        IValue::GenericDict(_) => "a dict",
        _ => "a list",
    }
}

/// Hex sha256 of a file, streamed.
pub(crate) fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}
