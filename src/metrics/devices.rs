//! Device metrics of the CUDA devices a run uses: memory in use, total memory and utilisation,
//! read from `nvidia-smi --query-gpu` every few seconds (tch 0.24 has no memory query).
//!
//! Only CUDA devices named in `model.devices` are reported, and only when `nvidia-smi` answers:
//! on a CPU-only run these metrics do not exist rather than read zero. `cuda:N` is the N-th
//! visible device; when `CUDA_VISIBLE_DEVICES` lists numeric indices, nvidia-smi's (physical)
//! index is mapped back through it.

use super::Metrics;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

/// One GPU as nvidia-smi reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuSample {
    /// nvidia-smi's (physical) index.
    pub index: usize,
    pub memory_used_bytes: i64,
    pub memory_total_bytes: i64,
    pub utilization_ratio: f64,
}

/// Parses `nvidia-smi --query-gpu=index,memory.used,memory.total,utilization.gpu
/// --format=csv,noheader,nounits` (MiB and percent); lines it cannot read are skipped.
pub fn parse_nvidia_smi(text: &str) -> Vec<GpuSample> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            let [index, used, total, util] = fields.as_slice() else { return None };
            Some(GpuSample {
                index: index.parse().ok()?,
                memory_used_bytes: used.parse::<i64>().ok()? * 1024 * 1024,
                memory_total_bytes: total.parse::<i64>().ok()? * 1024 * 1024,
                utilization_ratio: util.parse::<f64>().ok()? / 100.0,
            })
        })
        .collect()
}

/// The CUDA ordinals among `devices` ("cuda" is ordinal 0).
pub fn cuda_ordinals(devices: &[String]) -> Vec<usize> {
    let mut ordinals: Vec<usize> = devices
        .iter()
        .filter_map(|d| match d.as_str() {
            "cuda" => Some(0),
            other => other.strip_prefix("cuda:")?.parse().ok(),
        })
        .collect();
    ordinals.sort_unstable();
    ordinals.dedup();
    ordinals
}

fn query() -> Option<Vec<GpuSample>> {
    let out = Command::new("nvidia-smi")
        .args(["--query-gpu=index,memory.used,memory.total,utilization.gpu", "--format=csv,noheader,nounits"])
        .output()
        .ok()?;
    out.status.success().then(|| parse_nvidia_smi(&String::from_utf8_lossy(&out.stdout)))
}

/// Polls nvidia-smi every `every` on a thread while the process runs, when `devices` has a
/// CUDA device and nvidia-smi answers; otherwise starts nothing.
pub fn spawn_poller(metrics: Arc<Metrics>, devices: &[String], every: Duration) {
    let ordinals = cuda_ordinals(devices);
    if ordinals.is_empty() {
        return;
    }
    if query().is_none() {
        tracing::info!("nvidia-smi is not available: no device memory or utilisation metrics");
        return;
    }
    // cuda:N → physical index, through CUDA_VISIBLE_DEVICES when it lists numbers.
    let visible: Option<Vec<usize>> = std::env::var("CUDA_VISIBLE_DEVICES")
        .ok()
        .and_then(|v| v.split(',').map(|s| s.trim().parse().ok()).collect::<Option<Vec<usize>>>());
    let physical: Vec<(usize, usize)> =
        ordinals.iter().filter_map(|&o| Some((o, visible.as_ref().map_or(Some(o), |v| v.get(o).copied())?))).collect();
    let _ = std::thread::Builder::new().name("gpu-metrics".into()).spawn(move || loop {
        if let Some(samples) = query() {
            for (ordinal, index) in &physical {
                let Some(s) = samples.iter().find(|s| s.index == *index) else { continue };
                let device = format!("cuda:{ordinal}");
                metrics.device_memory_used.with_label_values(&[&device]).set(s.memory_used_bytes);
                metrics.device_memory_total.with_label_values(&[&device]).set(s.memory_total_bytes);
                metrics.device_utilization.with_label_values(&[&device]).set(s.utilization_ratio);
            }
        }
        std::thread::sleep(every);
    });
}
