//! `fetch_decode`: records in, their images' pixels (RGB bytes) out; fetching on the operator's own threads,
//! decoding on rayon's pool.
//!
//! **In:** `ImageRecord`s. **Out:** per record, `Ok(Decoded)` or `Err(DeadLetter)` when it
//! could not be fetched, decoded or preprocessed (the caller's closures say why), at the
//! record's epoch.
//! **Progress:** for every epoch with records still being prepared the operator keeps a
//! capability, and releases it when the last of them is out; so the output frontier trails
//! the input frontier only by work in flight.
//!
//! Fetching blocks on the network or the disk, so it runs on a pool of `max_in_flight` threads
//! that belongs to this operator: a slow server holds one of them, never a decoding thread or
//! another worker's fetch. Decoding is CPU work and goes to rayon's pool (one thread per core).
//! Neither runs on the worker thread: while the worker runs the model on one batch, the next is
//! fetched and decoded. At most `max_in_flight` records are being prepared at once; the rest
//! wait here, in arrival order. Fetched bytes wait for room in a [`ByteBudget`] shared by the
//! process's workers before they go to decoding, so memory stays bounded whatever the inputs
//! weigh.
//!
//! A panic in either closure (an image decoder's bug met by a crafted file) is caught and
//! becomes that record's dead letter, kind `internal_error`; the pipeline goes on.

use crate::metrics::{FetchDecodeMetrics, GaugeShare};
use crate::records::{DeadLetter, Decoded, Epoch, ImageRecord, Pixels};
use std::collections::{BTreeMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::StreamVec;

/// A failed preparation: what becomes the record's dead letter.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct PrepareError {
    /// A short kind (`not_found`, `undecodable`, ...): the dead letter's `error_kind`.
    pub kind: String,
    /// What went wrong, naming the input.
    pub message: String,
}

impl PrepareError {
    pub fn new(kind: impl Into<String>, message: impl Into<String>) -> PrepareError {
        PrepareError { kind: kind.into(), message: message.into() }
    }
}

/// The work behind `fetch_decode`: bytes for a record, then the pixels from the bytes.
pub struct Prepare<F, D> {
    /// Blocking I/O: runs on the operator's fetch threads.
    pub fetch: F,
    /// CPU work: runs on rayon's pool.
    pub decode: D,
    /// Encoded bytes fetched and not yet decoded, across every worker that shares it.
    pub budget: Arc<ByteBudget>,
}

/// A bound on the bytes held between fetching and decoding, shared by the workers of a
/// process: fetch threads wait for room before handing their bytes on. Without it, 64 fetch
/// threads per worker holding 32 MiB images each could hold gigabytes while rayon decodes two
/// at a time. One input larger than the whole budget still goes through, alone.
#[derive(Debug)]
pub struct ByteBudget {
    limit: u64,
    held: Mutex<u64>,
    freed: Condvar,
}

impl ByteBudget {
    pub fn new(limit: u64) -> ByteBudget {
        ByteBudget { limit, held: Mutex::new(0), freed: Condvar::new() }
    }

    /// Waits until `bytes` fit (or nothing else is held), then holds them.
    pub fn acquire(&self, bytes: u64) {
        let mut held = self.held.lock().expect("not poisoned");
        while *held > 0 && held.saturating_add(bytes) > self.limit {
            held = self.freed.wait(held).expect("not poisoned");
        }
        *held += bytes;
    }

    pub fn release(&self, bytes: u64) {
        *self.held.lock().expect("not poisoned") -= bytes;
        self.freed.notify_all();
    }

    /// Bytes held now.
    pub fn held(&self) -> u64 {
        *self.held.lock().expect("not poisoned")
    }
}

/// `metrics` gauges the records queued here and those being prepared.
pub fn fetch_decode<'scope, F, D>(
    records: StreamVec<'scope, Epoch, ImageRecord>,
    max_in_flight: usize,
    prepare: Prepare<F, D>,
    metrics: FetchDecodeMetrics,
) -> StreamVec<'scope, Epoch, Result<Decoded, DeadLetter>>
where
    F: Fn(&ImageRecord) -> Result<Vec<u8>, PrepareError> + Send + Sync + 'static,
    D: Fn(&ImageRecord, &[u8]) -> Result<Pixels, PrepareError> + Send + Sync + 'static,
{
    let worker = records.scope().worker();
    let index = worker.index();
    let fetch = Arc::new(prepare.fetch);
    let decode = Arc::new(prepare.decode);
    let budget = prepare.budget;
    records.unary_frontier(Pipeline, "FetchDecode", move |_default_cap, info| {
        let activator = Arc::new(worker.sync_activator_for(info.address.to_vec()));
        let (done_tx, done_rx) = mpsc::channel::<(Epoch, Result<Decoded, DeadLetter>)>();
        let pool = FetchPool::new(max_in_flight.max(1), index);
        // Per epoch: its capability and how many of its records are queued or being prepared.
        let mut pending: BTreeMap<Epoch, (Capability<Epoch>, usize)> = BTreeMap::new();
        let mut queue: VecDeque<(Epoch, ImageRecord)> = VecDeque::new();
        let mut in_flight = 0usize;
        let (mut queued_gauge, mut in_flight_gauge) =
            (GaugeShare::new(metrics.queued.clone()), GaugeShare::new(metrics.in_flight.clone()));
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
            // has `max_in_flight` records in preparation ahead of it, each of which activates
            // the operator when done.
            while in_flight < max_in_flight {
                let Some((epoch, record)) = queue.pop_front() else { break };
                in_flight += 1;
                let (tx, fetch, decode, activator, budget) = (
                    done_tx.clone(),
                    Arc::clone(&fetch),
                    Arc::clone(&decode),
                    Arc::clone(&activator),
                    Arc::clone(&budget),
                );
                pool.submit(Box::new(move || {
                    let done = move |result| {
                        // The operator may be gone at shutdown; then nobody needs the result.
                        if tx.send((epoch, result)).is_ok() {
                            let _ = activator.activate();
                        }
                    };
                    let mut record = record;
                    let bytes = match guarded("fetching", &record, || fetch(&record)) {
                        Ok(bytes) => bytes,
                        Err(e) => return done(Err(record.dead_letter(&e.kind, e.message))),
                    };
                    // An image the record carried is in `bytes` now: held once, and never in
                    // the outputs downstream.
                    record.image = None;
                    let held = bytes.len() as u64;
                    budget.acquire(held);
                    rayon::spawn(move || {
                        let result = match guarded("decoding", &record, || decode(&record, &bytes)) {
                            Ok(pixels) => Ok(Decoded { record, pixels }),
                            Err(e) => Err(record.dead_letter(&e.kind, e.message)),
                        };
                        drop(bytes);
                        budget.release(held);
                        done(result)
                    });
                }));
            }
            queued_gauge.set(queue.len() as i64);
            in_flight_gauge.set(in_flight as i64);
        }
    })
}

/// Runs `work` for `record`, turning a panic into an `internal_error`.
fn guarded<T>(
    stage: &str,
    record: &ImageRecord,
    work: impl FnOnce() -> Result<T, PrepareError>,
) -> Result<T, PrepareError> {
    catch_unwind(AssertUnwindSafe(work)).unwrap_or_else(|payload| {
        let message = panic_message(payload.as_ref());
        tracing::error!(id = %record.id, partition = record.partition, offset = record.offset, stage, message, "panic while preparing a record; it goes to the dead-letter topic");
        Err(PrepareError::new("internal_error", format!("panicked while {stage} {}: {message}", record.uri)))
    })
}

/// The message of a caught panic.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    match (payload.downcast_ref::<&str>(), payload.downcast_ref::<String>()) {
        (Some(s), _) => (*s).to_owned(),
        (_, Some(s)) => s.clone(),
        _ => "a panic without a message".into(),
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// Threads that run fetches: as many as records may be in flight, so a slow URI holds only its
/// own thread. They end when the operator (the sender) is dropped and their job is done.
struct FetchPool {
    jobs: mpsc::Sender<Job>,
}

impl FetchPool {
    fn new(threads: usize, worker: usize) -> FetchPool {
        let (jobs, receiver) = mpsc::channel::<Job>();
        let receiver = Arc::new(Mutex::new(receiver));
        for i in 0..threads {
            let receiver = Arc::clone(&receiver);
            std::thread::Builder::new()
                .name(format!("dlpipe-fetch-{worker}-{i}"))
                .spawn(move || loop {
                    // The lock is held only while waiting for the next job, not while running it.
                    let job = receiver.lock().map(|r| r.recv());
                    match job {
                        Ok(Ok(job)) => job(),
                        _ => return,
                    }
                })
                .expect("spawn a fetch thread");
        }
        FetchPool { jobs }
    }

    fn submit(&self, job: Job) {
        self.jobs.send(job).expect("fetch threads outlive the operator");
    }
}

/// [`fetch_decode()`] as a method of a stream of records.
pub trait FetchDecode<'scope> {
    /// Fetches each record's image on fetch threads and decodes it on rayon's pool; a record
    /// that cannot be is a dead letter. Each output at its record's epoch.
    ///
    /// ```
    /// use dlpipe_operators::{ByteBudget, FetchDecode, ImageRecord, Pixels, Prepare};
    /// use std::sync::Arc;
    /// use timely::dataflow::operators::vec::ToStream;
    /// use timely::dataflow::operators::Inspect;
    ///
    /// timely::example(|scope| {
    ///     let record = |id: &str| ImageRecord {
    ///         id: id.into(), uri: format!("mem://{id}"), label: None, partition: 0, offset: 0, kafka_ts_ms: None, image: None,
    ///     };
    ///     let prepare = Prepare {
    ///         // The bytes behind a URI, and the pixels (the model's input bytes) of those bytes.
    ///         fetch: |r: &ImageRecord| Ok(r.uri.as_bytes().to_vec()),
    ///         decode: |_r: &ImageRecord, bytes: &[u8]| Ok(Pixels::Crop(vec![bytes.len() as u8])),
    ///         budget: Arc::new(ByteBudget::new(1 << 20)),
    ///     };
    ///     vec![record("a"), record("bb")]
    ///         .to_stream(scope)
    ///         .fetch_decode(4, prepare, Default::default())
    ///         .inspect(|decoded| {
    ///             let decoded = decoded.as_ref().expect("fetched and decoded");
    ///             assert_eq!(decoded.pixels, Pixels::Crop(vec![decoded.record.uri.len() as u8]));
    ///         });
    /// });
    /// ```
    fn fetch_decode<F, D>(
        self,
        max_in_flight: usize,
        prepare: Prepare<F, D>,
        metrics: FetchDecodeMetrics,
    ) -> StreamVec<'scope, Epoch, Result<Decoded, DeadLetter>>
    where
        F: Fn(&ImageRecord) -> Result<Vec<u8>, PrepareError> + Send + Sync + 'static,
        D: Fn(&ImageRecord, &[u8]) -> Result<Pixels, PrepareError> + Send + Sync + 'static;
}

impl<'scope> FetchDecode<'scope> for StreamVec<'scope, Epoch, ImageRecord> {
    fn fetch_decode<F, D>(
        self,
        max_in_flight: usize,
        prepare: Prepare<F, D>,
        metrics: FetchDecodeMetrics,
    ) -> StreamVec<'scope, Epoch, Result<Decoded, DeadLetter>>
    where
        F: Fn(&ImageRecord) -> Result<Vec<u8>, PrepareError> + Send + Sync + 'static,
        D: Fn(&ImageRecord, &[u8]) -> Result<Pixels, PrepareError> + Send + Sync + 'static,
    {
        fetch_decode(self, max_in_flight, prepare, metrics)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::FetchDecodeMetrics;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};
    use timely::dataflow::operators::capture::{Capture, Event};
    use timely::dataflow::operators::vec::ToStream;

    fn record(i: i64, uri: &str) -> ImageRecord {
        ImageRecord {
            id: format!("r{i}"),
            uri: uri.into(),
            label: None,
            partition: 0,
            offset: i,
            kafka_ts_ms: None,
            image: None,
        }
    }

    /// Runs `records` through `fetch_decode` on one worker and returns its outputs in offset order.
    fn run<F, D>(
        records: Vec<ImageRecord>,
        max_in_flight: usize,
        fetch: F,
        decode: D,
    ) -> Vec<Result<Decoded, DeadLetter>>
    where
        F: Fn(&ImageRecord) -> Result<Vec<u8>, PrepareError> + Send + Sync + 'static,
        D: Fn(&ImageRecord, &[u8]) -> Result<Pixels, PrepareError> + Send + Sync + 'static,
    {
        run_with(records, max_in_flight, Prepare { fetch, decode, budget: Arc::new(ByteBudget::new(u64::MAX)) })
    }

    /// Like `run`, with the whole `Prepare` (a byte budget of the test's choosing).
    fn run_with<F, D>(
        records: Vec<ImageRecord>,
        max_in_flight: usize,
        prepare: Prepare<F, D>,
    ) -> Vec<Result<Decoded, DeadLetter>>
    where
        F: Fn(&ImageRecord) -> Result<Vec<u8>, PrepareError> + Send + Sync + 'static,
        D: Fn(&ImageRecord, &[u8]) -> Result<Pixels, PrepareError> + Send + Sync + 'static,
    {
        let captured = timely::execute_directly(move |worker| {
            let (tx, rx) = mpsc::channel();
            worker.dataflow::<Epoch, _, _>(|scope| {
                fetch_decode(records.to_stream(scope), max_in_flight, prepare, FetchDecodeMetrics::default())
                    .capture_into(tx);
            });
            rx
        });
        let mut out: Vec<_> = captured
            .into_iter()
            .flat_map(|event| match event {
                Event::Messages(_, data) => data,
                Event::Progress(_) => Vec::new(),
            })
            .collect();
        out.sort_by_key(|r| match r {
            Ok(d) => d.record.offset,
            Err(d) => d.offset,
        });
        out
    }

    #[test]
    fn a_panicking_decoder_or_fetch_dead_letters_its_record_and_the_rest_go_on() {
        let records: Vec<_> = (0..20)
            .map(|i| {
                record(
                    i,
                    if i == 3 {
                        "panic-fetch"
                    } else if i == 7 {
                        "panic-decode"
                    } else {
                        "ok"
                    },
                )
            })
            .collect();
        let out = run(
            records,
            4,
            |r| if r.uri == "panic-fetch" { panic!("fetch bug") } else { Ok(r.uri.clone().into_bytes()) },
            |_, bytes| {
                if bytes == b"panic-decode" {
                    panic!("decoder bug {}", 42)
                } else {
                    Ok(Pixels::Crop(vec![bytes.len() as u8]))
                }
            },
        );
        assert_eq!(out.len(), 20, "one output per record");
        for (i, r) in out.iter().enumerate() {
            match (i, r) {
                (3, Err(d)) => assert!(d.error_kind == "internal_error" && d.error.contains("fetch bug"), "{d:?}"),
                (7, Err(d)) => {
                    assert!(d.error_kind == "internal_error" && d.error.contains("decoder bug 42"), "{d:?}")
                }
                (_, Ok(d)) => assert_eq!(d.pixels, Pixels::Crop(vec![2])),
                (i, other) => panic!("record {i}: {other:?}"),
            }
        }
    }

    #[test]
    fn slow_fetches_hold_only_their_own_threads() {
        // Two fetches that hang for a while, more than rayon has threads on a small machine,
        // and 30 quick ones: the quick ones must not queue behind the slow ones.
        let hang = Duration::from_secs(3);
        let started = Instant::now();
        let quick_done = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&quick_done);
        let records: Vec<_> = (0..32)
            .map(|i| record(i, if i < rayon::current_num_threads() as i64 + 1 { "slow" } else { "quick" }))
            .collect();
        let slow = records.iter().filter(|r| r.uri == "slow").count();
        let out = run(
            records,
            64,
            move |r| {
                if r.uri == "slow" {
                    std::thread::sleep(hang);
                } else {
                    seen.lock().unwrap().push(started.elapsed());
                }
                Ok(vec![0])
            },
            |_, _| Ok(Pixels::Crop(vec![0])),
        );
        assert_eq!(out.len(), 32);
        let quick = quick_done.lock().unwrap();
        assert_eq!(quick.len(), 32 - slow);
        let last_quick = quick.iter().max().unwrap();
        assert!(*last_quick < hang / 2, "a quick fetch waited {last_quick:?} behind {slow} slow ones");
    }

    #[test]
    fn bytes_between_fetch_and_decode_stay_within_the_budget() {
        // 40 records of 10 MB each, fetched at once by 40 threads, decoded slowly: with a
        // 25 MB budget no more than two are ever held (without it, up to 40: 400 MB).
        const MB: u64 = 1 << 20;
        let budget = Arc::new(ByteBudget::new(25 * MB));
        let (held, peak) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (h, p, b) = (Arc::clone(&held), Arc::clone(&peak), Arc::clone(&budget));
        let records: Vec<_> = (0..40).map(|i| record(i, "big")).collect();
        let prepare = Prepare {
            fetch: |_: &ImageRecord| Ok(vec![7u8; 10 * MB as usize]),
            decode: move |_: &ImageRecord, bytes: &[u8]| {
                let now = h.fetch_add(bytes.len() as u64, Ordering::SeqCst) + bytes.len() as u64;
                p.fetch_max(now.max(b.held()), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
                h.fetch_sub(bytes.len() as u64, Ordering::SeqCst);
                Ok(Pixels::Crop(vec![0]))
            },
            budget: Arc::clone(&budget),
        };
        let out = run_with(records, 40, prepare);
        assert_eq!(out.len(), 40);
        assert!(out.iter().all(Result::is_ok));
        let peak = peak.load(Ordering::SeqCst);
        assert!(peak > 0 && peak <= 25 * MB, "peak {} MB held", peak / MB);
        assert_eq!(budget.held(), 0);
        // An input larger than the whole budget still goes through, alone.
        let small = ByteBudget::new(MB);
        small.acquire(10 * MB);
        small.release(10 * MB);
        assert_eq!(small.held(), 0);
    }
}
