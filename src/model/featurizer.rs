//! A TorchScript model on one device: batches of images (RGB bytes) in, pooled features and/or
//! logits out. sparkdl's DeepImageFeaturizer, minus Spark.
//!
//! An image arrives cropped by the host, or as decoded (`model.resize_on = "device"`), when
//! the device resizes and crops it first, as the host would ([`Featurizer::forward_pixels`]).
//!
//! On a GPU the crops are normalised on the device, through the same per-channel table as
//! [`Preprocess::normalise`] (a table, not arithmetic, so the result is bit for bit the host's):
//! a quarter of the bytes cross to the device, and the GPU does the work. On the CPU the host
//! does it in Rust, an order of magnitude faster than libtorch's gather ([`Normalise`]). On CUDA the batch goes
//! through a pinned staging buffer and is copied asynchronously; the copy of the outputs back
//! waits for it. tch has no CUDA stream API: each worker owns one device and runs everything on
//! its default stream, so the copy, the normalisation and the forward pass run in order.

use super::manifest::{Manifest, OutputKind, WeightsSource};
use super::ModelError;
use crate::image::Preprocess;
use dlpipe_operators::records::Pixels;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use tch::{CModule, Device, IValue, Kind, Tensor};

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
    /// Where the crops are normalised.
    normalise: Normalise,
    /// Behind a lock because tch tensors are not `Sync`; held briefly, or on CUDA while the
    /// staging buffer is in use.
    on_device: Mutex<OnDevice>,
}

/// Where a batch of crops is normalised. Both give the same values, bit for bit (one table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Normalise {
    /// On the model's device, as tensor operations: the default on a GPU (a quarter of the
    /// bytes cross to it, and it does the work).
    OnDevice,
    /// On the host, in Rust, before the copy: the default on the CPU, where libtorch's
    /// gather took ~0.7 ms an image against ~0.04 ms here (5-10% of a bf16 forward pass).
    OnHost,
}

/// The tensors the device-side normalisation keeps between batches.
struct OnDevice {
    /// [`Preprocess::lut`] on the device: 3 x 256 f32.
    lut: Tensor,
    /// [0, 256, 512] i32 on the device, added along a crop's last (channel) axis: channel c's
    /// bytes index table c.
    channel_offsets: Tensor,
    /// CUDA only: pinned host memory the batch is staged in, grown to the largest batch seen.
    staging: Option<Tensor>,
    /// CUDA only: an asynchronous copy out of `staging` may still be running (a forward pass
    /// failed before the outputs' copy back waited for it).
    copy_pending: bool,
}

impl OnDevice {
    fn new(preprocess: &Preprocess, device: Device) -> OnDevice {
        OnDevice {
            lut: Tensor::from_slice(preprocess.lut()).to_device(device),
            channel_offsets: Tensor::from_slice(&[0i32, 256, 512]).to_device(device),
            staging: None,
            copy_pending: false,
        }
    }

    /// Copies `parts`, back to back, into the pinned staging buffer and starts their
    /// asynchronous copy to `device`; the flat u8 tensor there.
    fn stage(&mut self, parts: &[&[u8]], device: Device) -> Tensor {
        if self.copy_pending {
            // A failed batch's copy may still be reading the buffer we are about to overwrite.
            if let Device::Cuda(index) = device {
                tch::Cuda::synchronize(index as i64);
            }
            self.copy_pending = false;
        }
        let len: usize = parts.iter().map(|part| part.len()).sum();
        let staging = match &self.staging {
            Some(staging) if staging.numel() >= len => staging,
            _ => self.staging.insert(Tensor::empty([len as i64], (Kind::Uint8, Device::Cpu)).pin_memory(device)),
        };
        // SAFETY: `staging` is a contiguous u8 CPU tensor of at least `len` bytes that nothing
        // else reads or writes: no copy out of it is pending (above), and `self` is borrowed
        // mutably, under the featurizer's lock.
        let mut buffer = unsafe { std::slice::from_raw_parts_mut(staging.data_ptr().cast::<u8>(), len) };
        for part in parts {
            let (head, rest) = buffer.split_at_mut(part.len());
            head.copy_from_slice(part);
            buffer = rest;
        }
        let on_device = staging.narrow(0, 0, len as i64).to_device_(device, Kind::Uint8, true, false);
        self.copy_pending = true;
        on_device
    }
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
        let on_device = Mutex::new(OnDevice::new(&preprocess, device));
        let normalise = if device.is_cuda() { Normalise::OnDevice } else { Normalise::OnHost };
        let featurizer = Featurizer { module, manifest, preprocess, device, path, normalise, on_device };
        featurizer.warm_up()?;
        Ok(featurizer)
    }

    /// Normalises the crops where `normalise` says instead of the device's default (tests run
    /// the device's path on the CPU with it).
    pub fn normalising(mut self, normalise: Normalise) -> Featurizer {
        self.normalise = normalise;
        self
    }

    fn warm_up(&self) -> Result<(), ModelError> {
        let zeros = vec![0u8; self.preprocess.crop_len()];
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

    /// Runs `n` crops laid out contiguously as `n x H x W x 3` bytes (what [`Preprocess::crop`]
    /// writes) through the model.
    pub fn forward(&self, batch: &[u8], n: usize) -> Result<Outputs, ModelError> {
        assert_eq!(batch.len(), n * self.preprocess.crop_len(), "batch length does not match n images");
        let crops: Vec<&[u8]> = batch.chunks_exact(self.preprocess.crop_len()).collect();
        self.forward_crops(&crops)
    }

    /// Runs a batch of the stream's images through the model: crops the host made, and images
    /// as decoded, which are resized and cropped here, on the model's device, the way
    /// [`Preprocess::crop`] does it on the host (see [`device_crops`]).
    pub fn forward_pixels(&self, images: &[&Pixels]) -> Result<Outputs, ModelError> {
        if images.iter().all(|pixels| matches!(pixels, Pixels::Crop(_))) {
            let crops: Vec<&[u8]> = images.iter().map(|pixels| pixels.bytes()).collect();
            return self.forward_crops(&crops);
        }
        let n = images.len();
        let images = if n == 1 { vec![images[0], images[0]] } else { images.to_vec() };
        let parts: Vec<&[u8]> = images.iter().map(|pixels| pixels.bytes()).collect();
        let kind = self.manifest.input.dtype.kind();
        let mut on_device = self.on_device.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let flat = if self.device.is_cuda() {
            on_device.stage(&parts, self.device)
        } else {
            Tensor::from_slice(&parts.concat())
        };
        let input = tch::no_grad(|| -> Result<Tensor, ModelError> {
            let crops = device_crops(&flat, &images, &self.preprocess)?;
            let (h, w) = self.preprocess.output_size();
            Ok(normalised(&crops, &on_device, (images.len(), h, w), kind))
        })?;
        let outputs = self.run(input, n, images.len())?;
        // The outputs are on the host: the stream has run past the copy out of staging.
        on_device.copy_pending = false;
        Ok(outputs)
    }

    /// Runs crops, each `H x W x 3` bytes, through the model, normalising them where
    /// `self.normalise` says.
    fn forward_crops(&self, crops: &[&[u8]]) -> Result<Outputs, ModelError> {
        // libtorch's CPU convolutions take a different path for a batch of one, whose results
        // differ from the same image's in any larger batch in the last bits. Features must not
        // depend on how records happened to be batched (the stream's learner is deterministic
        // across worker counts only if its inputs are), so a single image runs as a pair.
        let n = crops.len();
        let crops = if n == 1 { vec![crops[0], crops[0]] } else { crops.to_vec() };
        let rows = crops.len();
        let (h, w) = self.preprocess.output_size();
        let kind = self.manifest.input.dtype.kind();
        match (self.normalise, self.device.is_cuda()) {
            (Normalise::OnHost, _) => {
                let len = self.preprocess.tensor_len();
                let mut pixels = vec![0f32; rows * len];
                for (crop, out) in crops.iter().zip(pixels.chunks_exact_mut(len)) {
                    self.preprocess.normalise(crop, out);
                }
                let shape = [rows as i64, 3, i64::from(h), i64::from(w)];
                let input =
                    tch::no_grad(|| Tensor::from_slice(&pixels).view(shape).to_device(self.device).to_kind(kind));
                self.run(input, n, rows)
            }
            (Normalise::OnDevice, true) => {
                let mut on_device = self.on_device.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                let flat = on_device.stage(&crops, self.device);
                let input = tch::no_grad(|| normalised(&flat, &on_device, (rows, h, w), kind));
                let outputs = self.run(input, n, rows)?;
                // The outputs are on the host: the stream has run past the copy out of staging.
                on_device.copy_pending = false;
                Ok(outputs)
            }
            (Normalise::OnDevice, false) => {
                let on_device = self.on_device.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                let flat = Tensor::from_slice(&crops.concat());
                let input = tch::no_grad(|| normalised(&flat, &on_device, (rows, h, w), kind));
                drop(on_device);
                self.run(input, n, rows)
            }
        }
    }

    /// Runs the model on `input` (`rows` images); the first `n` rows of its outputs.
    fn run(&self, input: Tensor, n: usize, rows: usize) -> Result<Outputs, ModelError> {
        let model = &self.manifest.name;
        let forward_err = |source| ModelError::Forward { model: model.clone(), source };
        let out = tch::no_grad(|| -> Result<Vec<Tensor>, ModelError> {
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

/// The crops `device` makes of `images` (as [`Featurizer::forward_pixels`] does before the
/// model), back on the host as `n x H x W x 3` bytes: what tests compare with the host's and
/// `dlpipe bench` times.
pub fn crops_on_device(images: &[&Pixels], preprocess: &Preprocess, device: Device) -> Result<Vec<u8>, ModelError> {
    let parts: Vec<&[u8]> = images.iter().map(|pixels| pixels.bytes()).collect();
    let flat = Tensor::from_slice(&parts.concat()).to_device(device);
    let crops = tch::no_grad(|| device_crops(&flat, images, preprocess))?;
    let len = images.len() * preprocess.crop_len();
    let mut bytes = vec![0u8; len];
    crops.view([-1]).to_device(Device::Cpu).copy_data(&mut bytes, len);
    Ok(bytes)
}

/// `images` (their bytes back to back in `flat`, u8 on the device) as crops of the model's
/// input size: `rows x H x W x 3` u8. A host's crop is taken as it is; an image as decoded is
/// resized and cropped as [`Preprocess::crop`] does it, in the host's order and rounding: the
/// vertical pass rounded to bytes, then the horizontal one (in float throughout, 12-18% of the
/// bytes would be one off the host's; this way, 0.14% of a photo's, none of Fashion-MNIST's;
/// `tests/model.rs`). Only the crop's rows go through the horizontal pass. Images of one size
/// are resized together: one call per size in the batch. An image that [`Preprocess::plan`]
/// refuses is an error (the host checked it before sending it).
fn device_crops(flat: &Tensor, images: &[&Pixels], preprocess: &Preprocess) -> Result<Tensor, ModelError> {
    let (crop_h, crop_w) = preprocess.output_size();
    let (crop_h, crop_w) = (i64::from(crop_h), i64::from(crop_w));
    let mut crops: Vec<Option<Tensor>> = images.iter().map(|_| None).collect();
    let mut by_size: BTreeMap<(u32, u32), Vec<(usize, Tensor)>> = BTreeMap::new();
    let mut offset = 0;
    for (i, pixels) in images.iter().enumerate() {
        let len = pixels.bytes().len() as i64;
        let bytes = flat.narrow(0, offset, len);
        offset += len;
        match pixels {
            Pixels::Crop(_) if len == crop_h * crop_w * 3 => crops[i] = Some(bytes.view([crop_h, crop_w, 3])),
            Pixels::Crop(_) => {
                return Err(ModelError::Pixels(format!("a crop of {len} bytes, not {crop_w}x{crop_h}x3")))
            }
            Pixels::Image { width, height, .. } if len == i64::from(*width) * i64::from(*height) * 3 => by_size
                .entry((*width, *height))
                .or_default()
                .push((i, bytes.view([i64::from(*height), i64::from(*width), 3]))),
            Pixels::Image { width, height, .. } => {
                return Err(ModelError::Pixels(format!("a {width}x{height} image of {len} bytes")))
            }
        }
    }
    for ((width, height), members) in by_size {
        let plan = preprocess.plan(width, height).map_err(|e| ModelError::Pixels(e.to_string()))?;
        let stacked = Tensor::stack(&members.iter().map(|(_, image)| image).collect::<Vec<_>>(), 0);
        // N x C x H x W, as torch's resampling takes it.
        let mut x = stacked.permute([0, 3, 1, 2]).to_kind(Kind::Float);
        let resample = |x: &Tensor, size: [i64; 2]| {
            let resized = if preprocess.bicubic() {
                x.internal_upsample_bicubic2d_aa(size, false, None, None)
            } else {
                x.internal_upsample_bilinear2d_aa(size, false, None, None)
            };
            // The host's rounding of its fixed-point sums: half up.
            (resized + 0.5).floor().clamp(0.0, 255.0)
        };
        if plan.height != height {
            x = resample(&x, [i64::from(plan.height), i64::from(width)]);
        }
        x = x.narrow(2, i64::from(plan.top), crop_h);
        if plan.width != width {
            x = resample(&x, [crop_h, i64::from(plan.width)]);
        }
        let resized = x.narrow(3, i64::from(plan.left), crop_w).permute([0, 2, 3, 1]).to_kind(Kind::Uint8);
        for (j, (i, _)) in members.into_iter().enumerate() {
            crops[i] = Some(resized.get(j as i64));
        }
    }
    let crops: Vec<Tensor> = crops.into_iter().map(|crop| crop.expect("every image placed")).collect();
    Ok(Tensor::stack(&crops, 0))
}

/// `crops` (`rows` crops of h x w, flat u8 on the device) through the table of `on_device`, as
/// the model's input of `kind`. Each byte through its channel's table: the table's values,
/// exactly. i32 indices and index_select, in the crops' own NHWC order: on CPU a third of the
/// time of i64 and `take` in NCHW order. The result is NCHW as the model takes it, laid out
/// channels-last in memory, as the exported models convert their input to first.
fn normalised(crops: &Tensor, on_device: &OnDevice, (rows, h, w): (usize, u32, u32), kind: Kind) -> Tensor {
    let shape = [rows as i64, i64::from(h), i64::from(w), 3];
    let index = crops.view(shape).to_kind(Kind::Int) + &on_device.channel_offsets;
    on_device.lut.index_select(0, &index.view([-1])).view(shape).permute([0, 3, 1, 2]).to_kind(kind)
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
