//! `featurize`: preprocessed records in, model outputs out, in micro-batches on this worker's
//! device.
//!
//! **In:** `Decoded` records. **Out:** per record, `Ok(Featured)`, or `Err(DeadLetter)` for
//! every record of a batch the model failed on (kind `model_error`), at the record's epoch.
//! **Progress:** records wait here, with a capability for their epoch, until a batch runs:
//! when `max_batch` records are waiting, when the oldest has waited `max_wait`, or when the
//! input frontier has passed the epoch of a waiting record (nothing more will join that epoch,
//! so holding it back would only hold back the frontier).
//!
//! The model runs on the worker thread: it is the work the pipeline exists to do, and the one
//! model instance per worker is bound to that worker's device.

use crate::metrics::FeaturizeMetrics;
use crate::records::{DeadLetter, Decoded, Epoch, Featured};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::StreamVec;

/// One row of model output: features, and logits when the model has them.
pub type ModelRow = (Vec<f32>, Option<Vec<f32>>);

/// Micro-batching limits.
#[derive(Clone, Copy, Debug)]
pub struct Batching {
    pub max_batch: usize,
    pub max_wait: Duration,
}

/// `model` gets the batch's pixels, concatenated, and the number of images; `metrics` gauges
/// the records waiting for a batch.
pub fn featurize<'scope, M>(
    decoded: StreamVec<'scope, Epoch, Decoded>,
    batching: Batching,
    mut model: M,
    metrics: FeaturizeMetrics,
) -> StreamVec<'scope, Epoch, Result<Featured, DeadLetter>>
where
    M: FnMut(&[f32], usize) -> Result<Vec<ModelRow>, String> + 'static,
{
    let scope = decoded.scope();
    decoded.unary_frontier(Pipeline, "Featurize", move |_default_cap, info| {
        let activator = scope.activator_for(info.address);
        let mut waiting: Vec<(Epoch, Decoded)> = Vec::new();
        let mut caps: BTreeMap<Epoch, Capability<Epoch>> = BTreeMap::new();
        let mut oldest: Option<Instant> = None;
        let mut pixels: Vec<f32> = Vec::new();
        move |(input, frontier), output| {
            input.for_each_stamp(|cap, data| {
                let Some(cap) = cap.retain_least(0) else { return };
                let epoch = *cap.time();
                caps.entry(epoch).or_insert(cap);
                for batch in data {
                    waiting.extend(batch.drain(..).map(|d| (epoch, d)));
                }
                oldest.get_or_insert_with(Instant::now);
            });
            while let Some(least) = waiting.iter().map(|(e, _)| *e).min() {
                let full = waiting.len() >= batching.max_batch;
                let waited = oldest.is_some_and(|t| t.elapsed() >= batching.max_wait);
                let epoch_closed = !frontier.frontier().less_equal(&least);
                if !(full || waited || epoch_closed) {
                    // Come back when the oldest record has waited long enough.
                    let left = batching.max_wait.saturating_sub(oldest.map_or(Duration::ZERO, |t| t.elapsed()));
                    activator.activate_after(left);
                    break;
                }
                let take = waiting.len().min(batching.max_batch);
                let batch: Vec<(Epoch, Decoded)> = waiting.drain(..take).collect();
                oldest = if waiting.is_empty() { None } else { Some(Instant::now()) };
                pixels.clear();
                for (_, d) in &batch {
                    pixels.extend_from_slice(&d.pixels);
                }
                let result = model(&pixels, batch.len());
                let result = result.and_then(|rows| {
                    if rows.len() == batch.len() {
                        Ok(rows)
                    } else {
                        Err(format!("the model returned {} rows for {} images", rows.len(), batch.len()))
                    }
                });
                match result {
                    Ok(rows) => {
                        for ((epoch, d), (features, logits)) in batch.into_iter().zip(rows) {
                            output.session(&caps[&epoch]).give(Ok(Featured { record: d.record, features, logits }));
                        }
                    }
                    Err(error) => {
                        tracing::error!(%error, images = batch.len(), "forward pass failed; the batch goes to the dead-letter topic");
                        for (epoch, d) in batch {
                            output.session(&caps[&epoch]).give(Err(d.record.dead_letter("model_error", error.clone())));
                        }
                    }
                }
                caps.retain(|epoch, _| waiting.iter().any(|(e, _)| e == epoch));
            }
            metrics.waiting.set(waiting.len() as i64);
        }
    })
}
