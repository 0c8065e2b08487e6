//! The work `fetch_decode` and `featurize` schedule for one worker: fetching a record's image
//! (fetch threads), decoding, resizing and cropping it (rayon's pool, with `batch`'s
//! cropping; or, with `model.resize_on` at the device, decoding only), and the forward pass on
//! the worker's device (the worker thread). Each step observes its duration metric.

use super::PipelineError;
use crate::batch::Resizing;
use crate::config::Config;
use crate::fetch::{Fetcher, UriScheme};
use crate::image::decode;
use crate::metrics::Metrics;
use crate::model::{Featurizer, ModelError};
use dlpipe_operators::records::InlineImage;
use dlpipe_operators::{ImageRecord, ModelRow, Pixels, PrepareError};
use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// Fetches a record's encoded image.
pub(super) type Fetch = Arc<dyn Fn(&ImageRecord) -> Result<Vec<u8>, PrepareError> + Send + Sync>;
/// Decodes a record's image into the pixels the model's device takes: a crop (resized and
/// centre-cropped here), or the image as decoded for the device to resize.
pub(super) type Decode = Arc<dyn Fn(&ImageRecord, &[u8]) -> Result<Pixels, PrepareError> + Send + Sync>;
/// One forward pass over a batch of images: each image's features and logits.
pub(super) type Model = Rc<RefCell<dyn FnMut(&[&Pixels]) -> Result<Vec<ModelRow>, ModelError>>>;

/// The worker's work, shared by its labelled and unlabelled lanes.
pub(super) struct Work {
    pub fetch: Fetch,
    pub decode: Decode,
    /// The worker's one model; both lanes run it, never at once (both run on this thread).
    pub model: Model,
}

impl Work {
    pub(super) fn new(
        config: &Config,
        featurizer: Featurizer,
        device: &str,
        resizing: Resizing,
        metrics: &Metrics,
        worker: &str,
    ) -> Result<Work, PipelineError> {
        let fetcher = Fetcher::new(config.fetch.clone())?;
        let limits = config.image;
        let decode_seconds = metrics.decode_seconds.with_label_values(&[worker]);
        let fetch_metrics = FetchMetrics::new(metrics, worker);
        let fetch: Fetch = Arc::new(move |record: &ImageRecord| {
            let started = Instant::now();
            let (scheme, bytes, retries) = match &record.image {
                Some(image) => {
                    // A base64 data: URI arrives as an image the record carries (its uri the media type).
                    let scheme = match UriScheme::of(&record.uri) {
                        UriScheme::Data => UriScheme::Data,
                        _ => UriScheme::Inline,
                    };
                    (scheme, inline_bytes(record, image, limits.max_encoded_bytes), 0)
                }
                None => {
                    let outcome = fetcher.fetch_with_attempts(&record.uri, limits.max_encoded_bytes);
                    let retries = outcome.retries();
                    let bytes = outcome.result.map_err(|e| PrepareError::new(e.kind(), e.to_string()));
                    (UriScheme::of(&record.uri), bytes, retries)
                }
            };
            fetch_metrics.observe(scheme, started, &bytes, retries);
            bytes
        });
        let preprocess = featurizer.preprocess().clone();
        let decode: Decode = Arc::new(move |record: &ImageRecord, bytes: &[u8]| {
            let started = Instant::now();
            let image =
                decode(bytes, &limits).map_err(|e| PrepareError::new(e.kind(), format!("{}: {e}", record.uri)))?;
            let pixels = resizing
                .pixels(&preprocess, image)
                .map_err(|e| PrepareError::new(e.kind(), format!("{}: {e}", record.uri)))?;
            decode_seconds.observe(started.elapsed().as_secs_f64());
            Ok(pixels)
        });
        let model_name = featurizer.manifest().name.clone();
        let labels = [worker, device, model_name.as_str()];
        let forward_seconds = metrics.featurize_seconds.with_label_values(&labels);
        let batch_records = metrics.featurize_batch.with_label_values(&labels);
        let model: Model = Rc::new(RefCell::new(move |images: &[&Pixels]| -> Result<Vec<ModelRow>, ModelError> {
            let (started, n) = (Instant::now(), images.len());
            let out = featurizer.forward_pixels(images)?;
            forward_seconds.observe(started.elapsed().as_secs_f64());
            batch_records.observe(n as f64);
            let row = |i| {
                (out.features_row(i).map(<[f32]>::to_vec).unwrap_or_default(), out.logits_row(i).map(<[f32]>::to_vec))
            };
            Ok((0..n).map(row).collect())
        }));
        Ok(Work { fetch, decode, model })
    }
}

/// Builds rayon's global pool, where records are decoded and cropped, with its threads named
/// `dlpipe-decode-N` at niceness `nice` (`pipeline.decode_nice`). A pool that exists already
/// (an earlier run in this process) keeps its threads as they are.
pub(super) fn start_decoding_pool(nice: i32) {
    let built = rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("dlpipe-decode-{i}"))
        .start_handler(move |_| lower_this_threads_priority(nice))
        .build_global();
    if built.is_err() {
        tracing::debug!("rayon's pool exists already: its threads keep their priority");
    }
}

fn lower_this_threads_priority(nice: i32) {
    if nice == 0 {
        return;
    }
    // On Linux, PRIO_PROCESS with who = 0 is the calling thread, not the whole process.
    // SAFETY: setpriority takes integers and changes only this thread's niceness.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } != 0 {
        let error = std::io::Error::last_os_error();
        tracing::warn!(nice, %error, "cannot lower a decoding thread's priority; it competes with the model's");
    }
}

/// One worker's fetch metrics by [`UriScheme`]: the handles of each scheme are made on its first
/// image, so that only the schemes a deployment uses appear in `/metrics`.
struct FetchMetrics {
    worker: String,
    seconds: HistogramVec,
    bytes: IntCounterVec,
    retries: IntCounterVec,
    errors: IntCounterVec,
    by_scheme: [OnceLock<SchemeHandles>; UriScheme::ALL.len()],
}

struct SchemeHandles {
    seconds: Histogram,
    bytes: IntCounter,
    retries: IntCounter,
}

impl FetchMetrics {
    fn new(metrics: &Metrics, worker: &str) -> FetchMetrics {
        FetchMetrics {
            worker: worker.to_owned(),
            seconds: metrics.fetch_seconds.clone(),
            bytes: metrics.fetched_bytes.clone(),
            retries: metrics.fetch_retries.clone(),
            errors: metrics.fetch_errors.clone(),
            by_scheme: Default::default(),
        }
    }

    fn observe(&self, scheme: UriScheme, started: Instant, bytes: &Result<Vec<u8>, PrepareError>, retries: u32) {
        let handles = self.by_scheme[scheme.index()].get_or_init(|| {
            let labels = [self.worker.as_str(), scheme.as_str()];
            SchemeHandles {
                seconds: self.seconds.with_label_values(&labels),
                bytes: self.bytes.with_label_values(&labels),
                retries: self.retries.with_label_values(&labels),
            }
        });
        handles.seconds.observe(started.elapsed().as_secs_f64());
        handles.retries.inc_by(u64::from(retries));
        match bytes {
            Ok(bytes) => handles.bytes.inc_by(bytes.len() as u64),
            Err(error) => {
                self.errors.with_label_values(&[self.worker.as_str(), scheme.as_str(), error.kind.as_str()]).inc()
            }
        }
    }
}

/// The bytes of an image the record carries. The source refused oversized ones already; the
/// size is checked again here (before decoding the base64) so that no path decodes an image
/// over the limit.
fn inline_bytes(record: &ImageRecord, image: &InlineImage, max_bytes: u64) -> Result<Vec<u8>, PrepareError> {
    use base64::Engine;
    let size = image.decoded_len();
    if size > max_bytes {
        let message = format!("record {}: its image is {size} bytes, over the limit of {max_bytes}", record.id);
        return Err(PrepareError::new("too_large", message));
    }
    match image {
        InlineImage::Raw(bytes) => Ok(bytes.clone()),
        InlineImage::Base64(text) => {
            base64::engine::general_purpose::STANDARD_PAD_INDIFFERENT.decode(text).map_err(|e| {
                PrepareError::new("invalid_image", format!("record {}: its image is not valid base64 ({e})", record.id))
            })
        }
    }
}
