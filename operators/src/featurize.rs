//! `featurize`: preprocessed records in, model outputs out, in micro-batches on this worker's
//! device.
//!
//! **In:** `Decoded` records. **Out:** per record, `Ok(Featured)` at the record's epoch.
//! **Failures:** a forward pass that fails (or panics: tch panics on some libtorch errors) is
//! never the records' fault (their pixels are already checked and shaped), and it is often
//! transient (a CUDA out-of-memory while another process holds the device). So the batch is run
//! again, up to `MODEL_ATTEMPTS` times with growing pauses; if it still fails, the operator sets
//! `fatal` and stops: the worker exits, nothing past the batch is committed, and the records are
//! read again after a restart. Good records are never dead-lettered for a model failure.
//! **Progress:** records wait here, with a capability for their epoch, until a batch runs:
//! when `max_batch` records are waiting, when the oldest has waited `max_wait`, or when the
//! input frontier has passed the epoch of a waiting record (nothing more will join that epoch,
//! so holding it back would only hold back the frontier).
//!
//! The model runs on the worker thread: it is the work the pipeline exists to do, and the one
//! model instance per worker is bound to that worker's device. So the operator runs one batch
//! per activation and activates itself again for the next: a backlog of a thousand records is
//! seconds of forward passes, during which the worker's other operators (the sources polling
//! Kafka and stamping epochs, the sink's delivery reports, the other lane) would otherwise not
//! run at all, and a label read late is learned late.

use crate::error::OperatorError;
use crate::metrics::{FeaturizeMetrics, GaugeShare};
use crate::records::{DeadLetter, Decoded, Epoch, Featured, Pixels};
use crate::retry::Backoff;
use crate::Fatal;
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
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

/// Forward passes tried on one batch before the worker gives up.
pub const MODEL_ATTEMPTS: u32 = 4;

/// Runs `model` on one batch, retrying failures and panics; the last error if all attempts fail.
fn forward_with_retries<M, E>(model: &mut M, images: &[&Pixels]) -> Result<Vec<ModelRow>, OperatorError>
where
    M: FnMut(&[&Pixels]) -> Result<Vec<ModelRow>, E>,
    E: std::fmt::Display,
{
    // Quadrupling pauses (0.1, 0.4, 1.6 s): a device that is briefly out of memory recovers.
    let mut pause = Backoff::new(Duration::from_millis(100), Duration::from_millis(1600)).growing_by(4);
    let (n, mut attempt) = (images.len(), 1);
    loop {
        let result = catch_unwind(AssertUnwindSafe(|| model(images).map_err(|e| e.to_string())))
            .unwrap_or_else(|panic| Err(format!("panicked: {}", crate::fetch_decode::panic_message(panic.as_ref()))))
            .and_then(|rows| {
                if rows.len() == n {
                    Ok(rows)
                } else {
                    Err(format!("the model returned {} rows for {n} images", rows.len()))
                }
            });
        match result {
            Ok(rows) => return Ok(rows),
            Err(error) if attempt < MODEL_ATTEMPTS => {
                tracing::warn!(%error, attempt, images = n, "forward pass failed; trying the batch again");
                std::thread::sleep(pause.next_pause());
                attempt += 1;
            }
            Err(error) => return Err(OperatorError::Model { attempts: MODEL_ATTEMPTS, images: n, error }),
        }
    }
}

/// `model` gets the batch's images (crops or images as decoded, RGB bytes); `metrics` gauges
/// the records waiting for a batch. The output's error side is kept for records the operator
/// may one day refuse itself; today it carries nothing.
pub fn featurize<'scope, M, E>(
    decoded: StreamVec<'scope, Epoch, Decoded>,
    batching: Batching,
    mut model: M,
    fatal: Fatal,
    metrics: FeaturizeMetrics,
) -> StreamVec<'scope, Epoch, Result<Featured, DeadLetter>>
where
    M: FnMut(&[&Pixels]) -> Result<Vec<ModelRow>, E> + 'static,
    E: std::fmt::Display,
{
    let scope = decoded.scope();
    decoded.unary_frontier(Pipeline, "Featurize", move |_default_cap, info| {
        let activator = scope.activator_for(info.address);
        let mut waiting: Vec<(Epoch, Decoded)> = Vec::new();
        let mut caps: BTreeMap<Epoch, Capability<Epoch>> = BTreeMap::new();
        let mut oldest: Option<Instant> = None;
        let mut waiting_gauge = GaugeShare::new(metrics.waiting.clone());
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
                let images: Vec<&Pixels> = batch.iter().map(|(_, d)| &d.pixels).collect();
                match forward_with_retries(&mut model, &images) {
                    Ok(rows) => {
                        for ((epoch, d), (features, logits)) in batch.into_iter().zip(rows) {
                            output.session(&caps[&epoch]).give(Ok(Featured { record: d.record, features, logits }));
                        }
                    }
                    Err(error) => {
                        // Keep the batch's capabilities: nothing of it, or after it, is
                        // published or committed; the worker stops on `fatal`.
                        tracing::error!(%error, "the model keeps failing; stopping");
                        *fatal.borrow_mut() = Some(error);
                        waiting.splice(0..0, batch);
                        return;
                    }
                }
                caps.retain(|epoch, _| waiting.iter().any(|(e, _)| e == epoch));
                if !waiting.is_empty() {
                    // One forward pass per activation: the rest after the worker's other
                    // operators have run (see the module's doc).
                    activator.activate();
                    break;
                }
            }
            waiting_gauge.set(waiting.len() as i64);
        }
    })
}

/// [`featurize()`] as a method of a stream of decoded records.
pub trait Featurize<'scope> {
    /// Runs `model` over micro-batches of the records' pixels on this worker; each record
    /// with its features (and logits) at its epoch.
    ///
    /// ```
    /// use dlpipe_operators::{Batching, Decoded, Featurize, ImageRecord, Pixels};
    /// use std::time::Duration;
    /// use timely::dataflow::operators::vec::ToStream;
    /// use timely::dataflow::operators::Inspect;
    ///
    /// timely::example(|scope| {
    ///     let decoded = |offset: i64| Decoded {
    ///         record: ImageRecord {
    ///             id: offset.to_string(), uri: "mem://x".into(), label: None, partition: 0, offset, kafka_ts_ms: None, image: None,
    ///         },
    ///         pixels: Pixels::Crop(vec![offset as u8, 1]),
    ///     };
    ///     // A "model" over images of 2 bytes: their sum is the one feature; no logits. Its
    ///     // error is anything that displays (a real model's is the device's).
    ///     let model = |images: &[&Pixels]| -> Result<_, String> {
    ///         Ok(images.iter().map(|p| (vec![p.bytes().iter().map(|b| f32::from(*b)).sum()], None)).collect())
    ///     };
    ///     let batching = Batching { max_batch: 8, max_wait: Duration::from_millis(5) };
    ///     vec![decoded(1), decoded(2), decoded(3)]
    ///         .to_stream(scope)
    ///         .featurize(batching, model, Default::default(), Default::default())
    ///         .inspect(|featured| {
    ///             let featured = featured.as_ref().expect("featurized");
    ///             assert_eq!(featured.features, vec![featured.record.offset as f32 + 1.0]);
    ///         });
    /// });
    /// ```
    fn featurize<M, E>(
        self,
        batching: Batching,
        model: M,
        fatal: Fatal,
        metrics: FeaturizeMetrics,
    ) -> StreamVec<'scope, Epoch, Result<Featured, DeadLetter>>
    where
        M: FnMut(&[&Pixels]) -> Result<Vec<ModelRow>, E> + 'static,
        E: std::fmt::Display;
}

impl<'scope> Featurize<'scope> for StreamVec<'scope, Epoch, Decoded> {
    fn featurize<M, E>(
        self,
        batching: Batching,
        model: M,
        fatal: Fatal,
        metrics: FeaturizeMetrics,
    ) -> StreamVec<'scope, Epoch, Result<Featured, DeadLetter>>
    where
        M: FnMut(&[&Pixels]) -> Result<Vec<ModelRow>, E> + 'static,
        E: std::fmt::Display,
    {
        featurize(self, batching, model, fatal, metrics)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::ImageRecord;
    use std::cell::RefCell;
    use std::rc::Rc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use timely::container::CapacityContainerBuilder;
    use timely::dataflow::operators::capture::{Capture, Event};
    use timely::dataflow::operators::probe::Handle;
    use timely::dataflow::operators::vec::ToStream;
    use timely::dataflow::operators::{Concat, Probe};

    fn decoded(i: i64) -> Decoded {
        let record = ImageRecord {
            id: format!("r{i}"),
            uri: "u".into(),
            label: None,
            partition: 0,
            offset: i,
            kafka_ts_ms: None,
            image: None,
        };
        Decoded { record, pixels: Pixels::Crop(vec![i as u8]) }
    }

    /// Runs 10 records through `featurize` with `model`, stepping until the dataflow is done or
    /// `fatal` is set; returns the outputs and the fatal error.
    fn run<M>(model: M) -> (Vec<Result<Featured, DeadLetter>>, Option<String>)
    where
        M: FnMut(&[&Pixels]) -> Result<Vec<ModelRow>, String> + Send + Sync + 'static,
    {
        timely::execute_directly(move |worker| {
            let fatal: Fatal = Rc::new(RefCell::new(None));
            let (tx, rx) = std::sync::mpsc::channel();
            let probe = Handle::new();
            let batching = Batching { max_batch: 4, max_wait: Duration::from_millis(1) };
            let f = Rc::clone(&fatal);
            worker.dataflow::<Epoch, _, _>(|scope| {
                let out = featurize(
                    (0..10).map(decoded).collect::<Vec<_>>().to_stream(scope),
                    batching,
                    model,
                    f,
                    Default::default(),
                );
                out.probe_with(&probe).capture_into(tx);
            });
            while !probe.done() && fatal.borrow().is_none() {
                worker.step();
            }
            for dataflow in worker.installed_dataflows() {
                worker.drop_dataflow(dataflow);
            }
            let out = rx
                .try_iter()
                .flat_map(|e| match e {
                    Event::Messages(_, data) => data,
                    Event::Progress(_) => Vec::new(),
                })
                .collect();
            let fatal = fatal.borrow().as_ref().map(ToString::to_string);
            (out, fatal)
        })
    }

    fn rows(images: &[&Pixels]) -> Vec<ModelRow> {
        images.iter().map(|p| (vec![f32::from(p.bytes()[0]) * 2.0], None)).collect()
    }

    #[test]
    fn a_failing_or_panicking_forward_pass_is_retried_and_no_record_is_dead_lettered() {
        // The first batch fails, then panics, then works; the later batches work.
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&calls);
        let (out, fatal) = run(move |images| match seen.fetch_add(1, Ordering::SeqCst) {
            0 => Err("CUDA out of memory".into()),
            1 => panic!("libtorch threw"),
            _ => Ok(rows(images)),
        });
        assert_eq!(fatal, None);
        assert_eq!(out.len(), 10);
        assert!(
            out.iter().all(|r| r.as_ref().is_ok_and(|f| f.features == vec![f.record.offset as f32 * 2.0])),
            "{out:?}"
        );
        // At least 3 batches of at most 4, the first one tried three times.
        assert!(calls.load(Ordering::SeqCst) >= 3 + 2);
    }

    #[test]
    fn a_model_that_keeps_failing_stops_the_worker_without_dead_letters() {
        let (out, fatal) = run(|_| Err("device lost".into()));
        let fatal = fatal.expect("fatal is set");
        assert!(fatal.contains("device lost") && fatal.contains(&MODEL_ATTEMPTS.to_string()), "{fatal}");
        assert!(out.is_empty(), "nothing may be published for records the model never saw: {out:?}");
    }

    #[test]
    fn other_operators_of_the_worker_run_between_forward_passes() {
        // A ticker operator counts its activations; the model notes the count at each batch.
        // With ten records waiting in batches of two, every batch must see a new count: a
        // featurize that ran its whole backlog in one activation would starve the worker's
        // sources and sink for as long.
        let seen = timely::execute_directly(|worker| {
            let ticks = Rc::new(std::cell::Cell::new(0u64));
            let seen: Rc<RefCell<Vec<u64>>> = Rc::default();
            let probe = Handle::new();
            let (model_ticks, model_seen) = (Rc::clone(&ticks), Rc::clone(&seen));
            let model = move |images: &[&Pixels]| {
                model_seen.borrow_mut().push(model_ticks.get());
                Ok::<_, String>(rows(images))
            };
            let batching = Batching { max_batch: 2, max_wait: Duration::from_secs(60) };
            worker.dataflow::<Epoch, _, _>(|scope| {
                let records = (0..10).map(decoded).collect::<Vec<_>>().to_stream(scope).concat(ticker(
                    scope,
                    Rc::clone(&ticks),
                    Rc::clone(&seen),
                ));
                featurize(records, batching, model, Rc::new(RefCell::new(None)), Default::default()).probe_with(&probe);
            });
            while !probe.done() {
                worker.step();
            }
            let seen = seen.borrow().clone();
            seen
        });
        assert_eq!(seen.len(), 5, "five batches of two");
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "the ticker ran between every two batches: {seen:?}");
    }

    /// An operator that emits nothing and activates itself until the model has run 5 batches.
    fn ticker<'scope>(
        scope: timely::dataflow::Scope<'scope, Epoch>,
        ticks: Rc<std::cell::Cell<u64>>,
        batches: Rc<RefCell<Vec<u64>>>,
    ) -> StreamVec<'scope, Epoch, Decoded> {
        timely::dataflow::operators::generic::operator::source::<_, CapacityContainerBuilder<Vec<Decoded>>, _, _>(
            scope,
            "Ticker",
            move |cap, info| {
                let activator = scope.activator_for(info.address);
                let mut cap = Some(cap);
                move |_output| {
                    ticks.set(ticks.get() + 1);
                    if batches.borrow().len() >= 5 {
                        cap.take();
                    } else {
                        activator.activate();
                    }
                }
            },
        )
    }
}
