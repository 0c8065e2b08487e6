//! The CNN features of a dataset's images: from the feature cache where it has them, from the
//! model on every configured device where it does not.

use super::cache::{content_hash, CacheError, ContentHash, FeatureCache};
use crate::batch::{run_inputs, InputOutcome, Resizing};
use crate::fetch::{FetchError, Fetcher};
use crate::image::{decode, DecodeError, ImageLimits, PreprocessError};
use crate::model::{Featurizer, ModelError, OutputKind};
use dlpipe_operators::Pixels;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;
use std::sync::Mutex;
use std::time::Instant;

/// Why one image has no features. Every message names the image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("{uri}: {source}")]
    Decode {
        uri: String,
        #[source]
        source: DecodeError,
    },
    #[error("{uri}: {source}")]
    Preprocess {
        uri: String,
        #[source]
        source: PreprocessError,
    },
}

impl ImageError {
    /// A short, stable label of the cause (as in dead letters).
    pub fn kind(&self) -> &'static str {
        match self {
            ImageError::Fetch(e) => e.kind(),
            ImageError::Decode { source, .. } => source.kind(),
            ImageError::Preprocess { source, .. } => source.kind(),
        }
    }
}

/// Why featurizing a dataset stopped (as opposed to one image failing).
#[derive(Debug, thiserror::Error)]
pub enum FeaturizeError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("model {0} outputs no features, so it cannot featurize for transfer learning")]
    NoFeatures(String),
    #[error("featurizing needs at least one model")]
    NoFeaturizer,
}

/// What [`extract_features`] found.
pub struct Features {
    pub dim: usize,
    /// Row-major, one row per image that has features, in input order.
    pub matrix: Vec<f32>,
    /// For each input, its row of `matrix`, or why it has none.
    pub rows: Vec<Result<usize, ImageError>>,
    /// How many rows came from the cache, and how many the model computed.
    pub cached: usize,
    pub computed: usize,
    pub seconds: f64,
}

impl Features {
    /// The features of input `i`, if it has them.
    pub fn get(&self, i: usize) -> Option<&[f32]> {
        match self.rows[i] {
            Ok(row) => Some(&self.matrix[row * self.dim..(row + 1) * self.dim]),
            Err(_) => None,
        }
    }

    /// The features of `inputs` that have them, row-major, with `label(input)` for each: a
    /// training or evaluation set. Inputs without features are left out (reported earlier).
    pub fn select(
        &self,
        inputs: impl IntoIterator<Item = usize>,
        mut label: impl FnMut(usize) -> usize,
    ) -> (Vec<f32>, Vec<usize>) {
        let (mut x, mut labels) = (Vec::new(), Vec::new());
        for i in inputs {
            if let Some(row) = self.get(i) {
                x.extend_from_slice(row);
                labels.push(label(i));
            }
        }
        (x, labels)
    }

    /// The inputs that have no features, with the reason.
    pub fn failures(&self) -> impl Iterator<Item = (usize, &ImageError)> {
        self.rows.iter().enumerate().filter_map(|(i, r)| r.as_ref().err().map(|e| (i, e)))
    }
}

/// How to featurize.
pub struct FeaturizeOptions<'a> {
    pub fetcher: &'a Fetcher,
    pub limits: ImageLimits,
    pub batch_size: usize,
    /// The cache folder, or None to featurize everything.
    pub cache_dir: Option<&'a std::path::Path>,
    /// Show progress bars on stderr.
    pub progress: bool,
    /// Where images are resized (the cache keeps the features of each choice apart).
    pub resizing: Resizing,
}

/// The cache key of a featurizer: its model's sha256 and input spec, and where images are
/// resized when that is not the host (the device's crops differ from the host's in a few
/// bytes of a photo).
pub fn cache_key(featurizer: &Featurizer, resizing: Resizing) -> String {
    let manifest = featurizer.manifest();
    let mut spec = serde_json::to_string(&manifest.input).expect("serialisable");
    if resizing != Resizing::ON_HOST {
        spec.push_str(&resizing.describe());
    }
    FeatureCache::key(manifest.sha256.as_deref().unwrap_or(&manifest.file), &spec)
}

/// The features of every image of `uris`, with the same model on each of `featurizers` (one
/// per device; they must load the same model). Images the cache holds are not featurized
/// again; the others are shared out among the devices in contiguous blocks, and their
/// features added to the cache as they come. Decoding runs on rayon's pool (every core), a
/// batch ahead of each device.
pub fn extract_features(
    featurizers: Vec<Featurizer>,
    uris: &[String],
    options: &FeaturizeOptions<'_>,
) -> Result<Features, FeaturizeError> {
    let started = Instant::now();
    let first = featurizers.first().ok_or(FeaturizeError::NoFeaturizer)?;
    let manifest = first.manifest();
    if !manifest.has(OutputKind::Features) {
        return Err(FeaturizeError::NoFeatures(manifest.name.clone()));
    }
    let dim = manifest.feature_dim;
    let max_bytes = options.limits.max_encoded_bytes;
    let cache = match options.cache_dir {
        Some(dir) => Some(FeatureCache::open(dir, &cache_key(first, options.resizing), dim)?),
        None => None,
    };
    let Lookup { results, hashes, cached } = look_up(cache.as_ref(), uris, options);
    let missing: Vec<usize> = (0..uris.len()).filter(|&i| results[i].is_none()).collect();

    // The model on each device, over its block of the missing images.
    let cache = Mutex::new(cache);
    let results = Mutex::new(results);
    let featurizing = progress_bar(missing.len(), "featurizing", options.progress);
    let block = missing.len().div_ceil(featurizers.len()).max(1);
    let outcome: Result<(), FeaturizeError> = std::thread::scope(|scope| {
        let handles: Vec<_> = featurizers
            .into_iter()
            .zip(missing.chunks(block).chain(std::iter::repeat(&[][..])))
            .map(|(featurizer, mine)| {
                let (cache, results, featurizing, hashes) = (&cache, &results, &featurizing, &hashes);
                scope.spawn(move || -> Result<(), FeaturizeError> {
                    let preprocess = featurizer.preprocess();
                    let prepare = |k: usize| -> Result<Pixels, ImageError> {
                        let uri = &uris[mine[k]];
                        let bytes = options.fetcher.fetch(uri, max_bytes)?;
                        let image = decode(&bytes, &options.limits)
                            .map_err(|source| ImageError::Decode { uri: uri.clone(), source })?;
                        options
                            .resizing
                            .pixels(preprocess, image)
                            .map_err(|source| ImageError::Preprocess { uri: uri.clone(), source })
                    };
                    let mut since_flush = 0;
                    let mut cache_error = None;
                    run_inputs(&featurizer, mine.len(), options.batch_size, prepare, |k, outcome| {
                        featurizing.inc(1);
                        let i = mine[k];
                        let result = match outcome {
                            InputOutcome::Done { outputs, row } => {
                                let features = outputs.features_row(row).expect("features checked above").to_vec();
                                if let (Some(cache), Some(hash)) = (cache.lock().expect("poisoned").as_mut(), hashes[i])
                                {
                                    since_flush += 1;
                                    let mut done = cache.insert(hash, &features);
                                    // Flush now and then, so an interrupted run keeps its work.
                                    if done.is_ok() && since_flush >= 512 {
                                        since_flush = 0;
                                        done = cache.flush();
                                    }
                                    if let Err(e) = done {
                                        cache_error.get_or_insert(e);
                                    }
                                }
                                Ok(features)
                            }
                            InputOutcome::Failed(e) => Err(e),
                        };
                        results.lock().expect("poisoned")[i] = Some(result);
                    })?;
                    match cache_error {
                        Some(e) => Err(e.into()),
                        None => Ok(()),
                    }
                })
            })
            .collect();
        handles.into_iter().try_for_each(|h| h.join().expect("featurizing thread panicked"))
    });
    featurizing.finish_and_clear();
    if let Some(cache) = cache.into_inner().expect("poisoned").as_mut() {
        cache.flush()?;
    }
    outcome?;

    let (matrix, rows, featured) = into_matrix(results.into_inner().expect("poisoned"));
    let computed = featured - cached;
    Ok(Features { dim, matrix, rows, cached, computed, seconds: started.elapsed().as_secs_f64() })
}

/// Every image's features as one row-major matrix; per image its row, or why it has none; and
/// how many rows there are.
#[allow(clippy::type_complexity)]
fn into_matrix(
    results: Vec<Option<Result<Vec<f32>, ImageError>>>,
) -> (Vec<f32>, Vec<Result<usize, ImageError>>, usize) {
    let mut matrix = Vec::new();
    let mut next = 0;
    let rows = results
        .into_iter()
        .map(|r| match r.expect("every input has an outcome") {
            Ok(features) => {
                matrix.extend_from_slice(&features);
                next += 1;
                Ok(next - 1)
            }
            Err(e) => Err(e),
        })
        .collect();
    (matrix, rows, next)
}

/// A progress bar of `len` steps named `what`, drawn only when `show`.
fn progress_bar(len: usize, what: &str, show: bool) -> ProgressBar {
    let bar = ProgressBar::new(len as u64).with_style(
        ProgressStyle::with_template(&format!(
            "{what:>11} {{bar:40}} {{pos}}/{{len}} [{{elapsed_precise}} < {{eta_precise}}] {{per_sec}}"
        ))
        .expect("valid template"),
    );
    if !show {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar
}

/// Per image: its features if the cache has them (or why it could not be read), its content
/// hash; and how many the cache had.
struct Lookup {
    results: Vec<Option<Result<Vec<f32>, ImageError>>>,
    hashes: Vec<Option<ContentHash>>,
    cached: usize,
}

/// Hashes every image's content and takes what `cache` already holds (nothing without a cache).
fn look_up(cache: Option<&FeatureCache>, uris: &[String], options: &FeaturizeOptions<'_>) -> Lookup {
    let mut lookup =
        Lookup { results: (0..uris.len()).map(|_| None).collect(), hashes: vec![None; uris.len()], cached: 0 };
    let Some(cache) = cache else { return lookup };
    let max_bytes = options.limits.max_encoded_bytes;
    let hashing = progress_bar(uris.len(), "hashing", options.progress);
    let found: Vec<Result<ContentHash, FetchError>> = uris
        .par_iter()
        .map(|uri| {
            let hash = options.fetcher.fetch(uri, max_bytes).map(|bytes| content_hash(&bytes));
            hashing.inc(1);
            hash
        })
        .collect();
    hashing.finish_and_clear();
    for (i, hash) in found.into_iter().enumerate() {
        match hash {
            Ok(hash) => {
                if let Some(row) = cache.get(&hash) {
                    lookup.results[i] = Some(Ok(row.to_vec()));
                    lookup.cached += 1;
                }
                lookup.hashes[i] = Some(hash);
            }
            Err(e) => lookup.results[i] = Some(Err(e.into())),
        }
    }
    tracing::info!(cache = %cache.path().display(), hits = lookup.cached, images = uris.len(), "feature cache");
    lookup
}
