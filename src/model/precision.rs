//! `model.precision`: which export of a model runs. Each precision is its own TorchScript file
//! (`NAME` for f32, `NAME_bf16`, `NAME_f16`, written by `tools/export_model.py --dtype`), not a
//! conversion at load: the shipped exports are frozen, their weights are constants of the graph
//! that `CModule::to` cannot convert, and a separate file gives every precision its own sha256,
//! so feature caches, classifiers and checkpoints never mix features of two precisions. Measured
//! (README, "Precision"): a bf16 export and an unfrozen f32 module converted to bf16 at load run
//! at the same speed with the same features (cosine to f32 0.9975 both, EfficientNet-Lite0).

use super::manifest::{resolve, Dtype, Manifest};
use super::ModelError;
use crate::config::Precision;
use std::path::{Path, PathBuf};
use tch::Device;

/// The CPU features that decide "auto", as /proc/cpuinfo and the compiler's detection name them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuFeatures {
    /// AVX-512 BF16: dot products of bf16 pairs in one instruction.
    pub avx512_bf16: bool,
    /// AMX tiles for bf16 (Sapphire Rapids and later).
    pub amx_bf16: bool,
    /// AVX-512 VNNI: int8 dot products (what an int8 model would use).
    pub avx512_vnni: bool,
    /// AMX tiles for int8.
    pub amx_int8: bool,
}

impl CpuFeatures {
    /// This machine's: `is_x86_feature_detected!` where Rust has it stable (AVX-512), the
    /// kernel's flags for AMX (its detection is not stable in Rust yet).
    pub fn detect() -> CpuFeatures {
        let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let mut features = CpuFeatures::from_cpuinfo(&flags);
        #[cfg(target_arch = "x86_64")]
        {
            features.avx512_bf16 |= std::arch::is_x86_feature_detected!("avx512bf16");
            features.avx512_vnni |= std::arch::is_x86_feature_detected!("avx512vnni");
        }
        features
    }

    /// From the text of /proc/cpuinfo (the first processor's `flags` line).
    pub fn from_cpuinfo(text: &str) -> CpuFeatures {
        let flags: Vec<&str> = text
            .lines()
            .find(|l| l.starts_with("flags"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, f)| f.split_whitespace().collect())
            .unwrap_or_default();
        let has = |name: &str| flags.contains(&name);
        CpuFeatures {
            avx512_bf16: has("avx512_bf16"),
            amx_bf16: has("amx_bf16"),
            avx512_vnni: has("avx512_vnni"),
            amx_int8: has("amx_int8"),
        }
    }

    /// Whether libtorch's oneDNN kernels compute bf16 natively here rather than emulating it.
    pub fn native_bf16(&self) -> bool {
        self.avx512_bf16 || self.amx_bf16
    }

    /// The features present, for the log.
    pub fn names(&self) -> Vec<&'static str> {
        [
            (self.avx512_bf16, "avx512_bf16"),
            (self.amx_bf16, "amx_bf16"),
            (self.avx512_vnni, "avx512_vnni"),
            (self.amx_int8, "amx_int8"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect()
    }
}

/// The dtype `precision` means on `devices`: "auto" is bf16 when every device is CUDA or a
/// CPU with native bf16, f32 otherwise (one precision for all: features must not depend on
/// which device a record happened to run on).
pub fn wanted_dtype(precision: Precision, devices: &[Device], cpu: &CpuFeatures) -> Dtype {
    match precision {
        Precision::F32 => Dtype::F32,
        Precision::Bf16 => Dtype::Bf16,
        Precision::F16 => Dtype::F16,
        Precision::Auto if devices.iter().all(|d| d.is_cuda() || cpu.native_bf16()) => Dtype::Bf16,
        Precision::Auto => Dtype::F32,
    }
}

fn suffix(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F32 => "",
        Dtype::Bf16 => "_bf16",
        Dtype::F16 => "_f16",
    }
}

fn name_of(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F32 => "f32",
        Dtype::Bf16 => "bf16",
        Dtype::F16 => "f16",
    }
}

/// The manifest of `model`'s export in `dtype`: the manifest `path` itself when it is in that
/// dtype, else its sibling `STEM_bf16.json` / `STEM_f16.json` / `STEM.json` (STEM: the name
/// without a dtype suffix). None when there is no such export.
fn sibling(path: &Path, manifest: &Manifest, dtype: Dtype) -> Option<PathBuf> {
    if manifest.input.dtype == dtype {
        return Some(path.to_path_buf());
    }
    let file_stem = path.file_stem()?.to_str()?;
    let stem = file_stem.strip_suffix(suffix(manifest.input.dtype)).unwrap_or(file_stem);
    let candidate = path.with_file_name(format!("{stem}{}.json", suffix(dtype)));
    let fits = Manifest::load(&candidate).is_ok_and(|m| m.input.dtype == dtype);
    fits.then_some(candidate)
}

/// Finds the manifest of `model` (as [`resolve`] does) in the precision `precision` means on
/// `devices`, and logs the decision with the CPU features it saw. "auto" keeps a model named
/// by its 16-bit export, and falls back to f32 when a model has no bf16 export; an explicit
/// precision the model or device cannot run is a [`ModelError::Precision`] naming the key.
pub fn resolve_precision(
    model: &str,
    model_dir: &Path,
    precision: Precision,
    devices: &[Device],
) -> Result<PathBuf, ModelError> {
    let path = resolve(model, model_dir)?;
    let manifest = Manifest::load(&path)?;
    let cpu = CpuFeatures::detect();
    let named = manifest.input.dtype;
    let want = match precision {
        Precision::Auto if named != Dtype::F32 => named,
        _ => wanted_dtype(precision, devices, &cpu),
    };
    let on_cpu = devices.iter().any(|d| !d.is_cuda());
    if want == Dtype::F16 && on_cpu {
        return Err(ModelError::Precision(format!(
            "model.precision = \"{precision}\" asks for f16 on a CPU: libtorch's CPU kernels have no fast f16; use \
             \"bf16\", \"f32\" or \"auto\", or a CUDA device"
        )));
    }
    let chosen = match sibling(&path, &manifest, want) {
        Some(found) => found,
        None if precision == Precision::Auto => {
            tracing::info!(model = %manifest.name, "no {} export of {}: running it in f32", name_of(want), manifest.name);
            sibling(&path, &manifest, Dtype::F32).unwrap_or(path.clone())
        }
        None => {
            let stem = manifest.name.strip_suffix(suffix(named)).unwrap_or(&manifest.name);
            return Err(ModelError::Precision(format!(
                "model.precision = \"{precision}\": model {} has no {} export (no {stem}{}.json beside {}); export \
                 one with `.venv/bin/python tools/export_model.py {} --dtype {} --out {}`, or set model.precision = \
                 \"auto\"",
                manifest.name,
                name_of(want),
                suffix(want),
                path.display(),
                manifest.architecture,
                name_of(want),
                path.parent().unwrap_or(Path::new(".")).display(),
            )));
        }
    };
    if want == Dtype::Bf16 && on_cpu && !cpu.native_bf16() {
        tracing::warn!("model.precision = \"{precision}\": this CPU has no native bf16; libtorch emulates it, slowly");
    }
    tracing::info!(
        precision = %precision,
        dtype = name_of(want),
        devices = ?devices,
        cpu_features = ?cpu.names(),
        manifest = %chosen.display(),
        "model precision decided"
    );
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EPYC: &str = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n";
    const SKYLAKE: &str = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n";
    const SAPPHIRE: &str = "flags\t: avx512f amx_bf16 amx_tile amx_int8\n";

    #[test]
    fn cpuinfo_flags_are_read_whole_words() {
        let epyc = CpuFeatures::from_cpuinfo(EPYC);
        assert_eq!(epyc.names(), ["avx512_bf16", "avx512_vnni"]);
        assert!(epyc.native_bf16());
        assert!(!CpuFeatures::from_cpuinfo(SKYLAKE).native_bf16());
        let spr = CpuFeatures::from_cpuinfo(SAPPHIRE);
        assert!(spr.native_bf16() && spr.amx_int8 && !spr.avx512_bf16);
        assert_eq!(CpuFeatures::from_cpuinfo("flags : avx512_bf16x\n"), CpuFeatures::default());
    }

    #[test]
    fn auto_is_bf16_on_native_bf16_cpus_and_cuda_and_f32_elsewhere() {
        let (native, plain) = (CpuFeatures::from_cpuinfo(EPYC), CpuFeatures::from_cpuinfo(SKYLAKE));
        let (cpu, cuda) = ([Device::Cpu], [Device::Cuda(0)]);
        assert_eq!(wanted_dtype(Precision::Auto, &cpu, &native), Dtype::Bf16);
        assert_eq!(wanted_dtype(Precision::Auto, &cpu, &plain), Dtype::F32);
        assert_eq!(wanted_dtype(Precision::Auto, &cuda, &plain), Dtype::Bf16);
        assert_eq!(wanted_dtype(Precision::Auto, &[Device::Cuda(0), Device::Cpu], &plain), Dtype::F32, "one for all");
        assert_eq!(wanted_dtype(Precision::F32, &cpu, &native), Dtype::F32, "explicit wins");
        assert_eq!(wanted_dtype(Precision::Bf16, &cpu, &plain), Dtype::Bf16, "explicit wins");
    }
}
