//! What `train`, `evaluate`, `featurize` and `predict --classifier` share: loading the model on
//! every device, featurizing a dataset (cached), reporting images without features.

use anyhow::Context;
use dlpipe::batch::Resizing;
use dlpipe::config::Config;
use dlpipe::config::Precision;
use dlpipe::fetch::{FetchConfig, Fetcher};
use dlpipe::model::{parse_device, resolve, resolve_precision, set_intra_op_threads, Featurizer};
use dlpipe::transfer::{extract_features, Features, FeaturizeOptions};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::Device;

/// Flags for featurizing, shared by the batch commands.
#[derive(clap::Args, Debug, Clone)]
pub struct FeaturizeFlags {
    /// Device(s): cpu, cuda, cuda:N; repeat for several [default: every one of model.devices].
    #[arg(long = "device")]
    pub devices: Vec<String>,
    /// Images per forward pass [default: model.batch_size].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Feature cache folder [default: train.feature_cache].
    #[arg(long, value_name = "DIR")]
    pub feature_cache: Option<PathBuf>,
    /// Featurize every image, neither reading nor writing the feature cache.
    #[arg(long)]
    pub no_cache: bool,
}

/// Loads model `name` in model.precision once per device (the flags' devices, or all of the
/// config's).
pub fn load_featurizers(config: &Config, name: &str, flags: &FeaturizeFlags) -> anyhow::Result<Vec<Featurizer>> {
    load_featurizers_in(config, name, Some(config.model.precision), flags)
}

/// [`load_featurizers`] of the export a classifier recorded, unless the user chose a model or a
/// precision: "auto" must not swap the features a classifier was trained on for another export's.
pub fn load_classifier_featurizers(
    config: &Config,
    name: &str,
    chosen_by_user: bool,
    flags: &FeaturizeFlags,
) -> anyhow::Result<Vec<Featurizer>> {
    if chosen_by_user || config.model.precision != Precision::Auto {
        return load_featurizers(config, name, flags);
    }
    tracing::info!(model = name, "model.precision = \"auto\": running the export the classifier was trained on");
    load_featurizers_in(config, name, None, flags)
}

fn load_featurizers_in(
    config: &Config,
    name: &str,
    precision: Option<Precision>,
    flags: &FeaturizeFlags,
) -> anyhow::Result<Vec<Featurizer>> {
    let names = if flags.devices.is_empty() { &config.model.devices } else { &flags.devices };
    // One model per device, all featurizing at once (`extract_features`).
    set_intra_op_threads(config.model.intra_op_threads, names.len());
    let devices: Vec<Device> = names.iter().map(|d| parse_device(d)).collect::<Result<_, _>>()?;
    let manifest = match precision {
        Some(precision) => resolve_precision(name, &config.model.dir, precision, &devices)?,
        None => resolve(name, &config.model.dir)?,
    };
    let started = Instant::now();
    let featurizers = devices
        .iter()
        .zip(names)
        .map(|(device, d)| Featurizer::load(&manifest, *device).with_context(|| format!("loading model {name} on {d}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    tracing::info!(
        model = %featurizers[0].manifest().name,
        devices = ?devices,
        seconds = format!("{:.2}", started.elapsed().as_secs_f64()),
        "model loaded"
    );
    Ok(featurizers)
}

/// The labelled images of `--data` (a folder or a list), each URI of a list checked first: a
/// scheme dlpipe cannot fetch fails here, naming its line, rather than image by image.
pub fn load_dataset(config: &Config, path: &Path) -> anyhow::Result<Vec<dlpipe::transfer::Example>> {
    let fetcher = Fetcher::new(config.fetch.clone())?;
    Ok(dlpipe::transfer::dataset::load_checked(path, |uri| fetcher.check(uri))?)
}

/// The features of `uris` with the command's flags, logging a summary and every image that
/// has none (those are left out of what follows, never silently).
pub fn featurize_uris(
    config: &Config,
    featurizers: Vec<Featurizer>,
    uris: &[String],
    flags: &FeaturizeFlags,
) -> anyhow::Result<Features> {
    let cache_dir = flags.feature_cache.clone().unwrap_or_else(|| config.train.feature_cache.clone());
    let cache_dir: Option<&Path> = (!flags.no_cache && !cache_dir.as_os_str().is_empty()).then_some(&cache_dir);
    // The user names these files; file_roots guard the stream against its producers.
    let fetcher = Fetcher::new(FetchConfig { file_roots: Vec::new(), ..config.fetch.clone() })?;
    let resizing = Resizing::of(&config.model, featurizers.iter().all(|f| f.device().is_cuda()));
    tracing::info!(resize_on = %resizing.describe(), "where images are resized");
    let options = FeaturizeOptions {
        fetcher: &fetcher,
        limits: config.image,
        batch_size: flags.batch_size.unwrap_or(config.model.batch_size),
        cache_dir,
        progress: true,
        resizing,
    };
    let features = extract_features(featurizers, uris, &options)?;
    let failed: Vec<_> = features.failures().collect();
    for (_, error) in failed.iter().take(20) {
        eprintln!("error: {error}");
    }
    if failed.len() > 20 {
        eprintln!("error: ... and {} more image(s) without features", failed.len() - 20);
    }
    let rate = match features.computed {
        0 => String::new(),
        n => format!(" ({:.1} images/s)", n as f64 / features.seconds.max(1e-9)),
    };
    eprintln!(
        "features of {} image(s) in {:.1} s: {} from the cache, {} computed{rate}{}",
        uris.len() - failed.len(),
        features.seconds,
        features.cached,
        features.computed,
        if failed.is_empty() { String::new() } else { format!("; {} failed (see above)", failed.len()) }
    );
    if failed.len() == uris.len() {
        anyhow::bail!("none of the {} image(s) could be featurized", uris.len());
    }
    Ok(features)
}
