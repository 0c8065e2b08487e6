//! `fetch_decode`: records in, model-ready pixels out, the work done on a thread pool.
//!
//! **In:** `ImageRecord`s. **Out:** per record, `Ok(Decoded)` or `Err(DeadLetter)` when it
//! could not be fetched, decoded or preprocessed (the caller's `prepare` says why), at the
//! record's epoch.
//! **Progress:** for every epoch with records still being prepared the operator keeps a
//! capability, and releases it when the last of them is out; so the output frontier trails
//! the input frontier only by work in flight.
//!
//! `prepare` runs on rayon's pool, never on the worker thread: while the worker runs the model
//! on one batch, the pool fetches and decodes the next. At most `max_in_flight` records are
//! on the pool at once; the rest wait here, in arrival order.

use crate::metrics::FetchDecodeMetrics;
use crate::records::{DeadLetter, Decoded, Epoch, ImageRecord};
use std::collections::{BTreeMap, VecDeque};
use std::sync::mpsc;
use std::sync::Arc;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::StreamVec;

/// A failed preparation: a short kind (`not_found`, `undecodable`, ...) and the message.
pub type PrepareError = (String, String);

/// `metrics` gauges the records queued here and those on the pool.
pub fn fetch_decode<'scope, F>(
    records: StreamVec<'scope, Epoch, ImageRecord>,
    max_in_flight: usize,
    prepare: Arc<F>,
    metrics: FetchDecodeMetrics,
) -> StreamVec<'scope, Epoch, Result<Decoded, DeadLetter>>
where
    F: Fn(&ImageRecord) -> Result<Vec<f32>, PrepareError> + Send + Sync + 'static,
{
    let worker = records.scope().worker();
    records.unary_frontier(Pipeline, "FetchDecode", move |_default_cap, info| {
        let activator = Arc::new(worker.sync_activator_for(info.address.to_vec()));
        let (done_tx, done_rx) = mpsc::channel::<(Epoch, Result<Decoded, DeadLetter>)>();
        // Per epoch: its capability and how many of its records are queued or on the pool.
        let mut pending: BTreeMap<Epoch, (Capability<Epoch>, usize)> = BTreeMap::new();
        let mut queue: VecDeque<(Epoch, ImageRecord)> = VecDeque::new();
        let mut in_flight = 0usize;
        move |(input, _frontier), output| {
            input.for_each_stamp(|cap, data| {
                let Some(cap) = cap.retain_least(0) else { return };
                let epoch = *cap.time();
                for batch in data {
                    let n = batch.len();
                    queue.extend(batch.drain(..).map(|r| (epoch, r)));
                    pending.entry(epoch).or_insert_with(|| (cap.clone(), 0)).1 += n;
                }
            });
            while let Ok((epoch, result)) = done_rx.try_recv() {
                in_flight -= 1;
                let entry = pending.get_mut(&epoch).expect("an epoch with work has a capability");
                output.session(&entry.0).give(result);
                entry.1 -= 1;
                if entry.1 == 0 {
                    pending.remove(&epoch);
                }
            }
            // Results first, then new work: the slots they free are filled in this same call.
            // (The other order could empty the pool here and leave records queued with nothing
            // left to activate the operator: a stalled dataflow.) Whatever is queued after this
            // has `max_in_flight` records on the pool ahead of it, each of which activates the
            // operator when done.
            while in_flight < max_in_flight {
                let Some((epoch, record)) = queue.pop_front() else { break };
                in_flight += 1;
                let (tx, prepare, activator) = (done_tx.clone(), Arc::clone(&prepare), Arc::clone(&activator));
                rayon::spawn(move || {
                    let result = match prepare(&record) {
                        Ok(pixels) => Ok(Decoded { record, pixels }),
                        Err((kind, error)) => Err(record.dead_letter(&kind, error)),
                    };
                    // The operator may be gone at shutdown; then nobody needs the result.
                    if tx.send((epoch, result)).is_ok() {
                        let _ = activator.activate();
                    }
                });
            }
            metrics.queued.set(queue.len() as i64);
            metrics.in_flight.set(in_flight as i64);
        }
    })
}
