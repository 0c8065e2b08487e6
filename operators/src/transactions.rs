//! Kafka transactions, as both transactional writers use them (the exactly-once sink, and the
//! checkpoint writer in the library): committing and aborting with retries, telling a fenced
//! producer from a passing failure, and [`bounded`]: a transactional call that does not
//! return in time stops the process rather than hang it.

use crate::retry::Backoff;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, Producer, PurgeConfig};
use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a transaction's calls may take before the attempt counts as failed.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// How long past its own timeout a transactional call may go on before [`bounded`] gives up on
/// it: a call that keeps its timeout has returned by then.
pub const OVERDUE_AFTER: Duration = Duration::from_secs(10);

/// The process's exit code when it stops for a restart to go on: EX_TEMPFAIL, "try again". A
/// transactional call overran ([`bounded`]), or the broker aborted a transaction that outlived
/// `transaction.timeout.ms` ([`outlived`]).
pub const RESTART_EXIT_CODE: i32 = 75;

/// Runs `call`, a librdkafka transactional call given `timeout`, under the process's
/// [`Watchdog`]: if it has not returned `OVERDUE_AFTER` past its timeout, the process logs what
/// hung and exits with [`RESTART_EXIT_CODE`] for the orchestrator to restart it. librdkafka
/// 2.12 can block in `send_offsets_to_transaction` past its timeout while the transaction
/// coordinator moves to another broker (confluentinc/librdkafka#5456, #5511), and nothing can
/// cancel the call; a restart is safe, as the next producer of the transactional id aborts
/// the open transaction.
pub fn bounded<T>(what: &str, timeout: Duration, call: impl FnOnce() -> T) -> T {
    static PROCESS: OnceLock<Watchdog> = OnceLock::new();
    let watchdog = PROCESS.get_or_init(|| {
        Watchdog::new(|what, after| {
            tracing::error!(
                "{what} has not returned after {after:?} (librdkafka ignores its timeout while the transaction \
                 coordinator moves; confluentinc/librdkafka#5456): exiting with code {RESTART_EXIT_CODE} for the \
                 orchestrator to restart this process, whose transaction the restart aborts"
            );
            // `_exit`, not `exit`: the C++ static destructors `exit` runs (libtorch's,
            // librdkafka's) crash while other threads still use them, and the orchestrator
            // would see SIGSEGV instead of this code (tests/watchdog.rs: 1 of 2 runs).
            // SAFETY: `_exit` ends the process at once; nothing of this process runs after it.
            unsafe { libc::_exit(RESTART_EXIT_CODE) }
        })
    });
    watchdog.bounded(what, timeout + OVERDUE_AFTER, call)
}

/// A thread that calls `overdue` for a call still running past its deadline.
pub struct Watchdog {
    state: Arc<(Mutex<Calls>, Condvar)>,
}

#[derive(Default)]
struct Calls {
    next_id: u64,
    /// Running calls: deadline, what, and when each began.
    running: BTreeMap<u64, (Instant, String, Instant)>,
}

impl Watchdog {
    /// Starts the watching thread; `overdue(what, running_for)` is called (once per call) for a
    /// call past its deadline.
    pub fn new(overdue: impl Fn(&str, Duration) + Send + 'static) -> Watchdog {
        let state: Arc<(Mutex<Calls>, Condvar)> = Arc::default();
        let watched = Arc::clone(&state);
        std::thread::Builder::new()
            .name("dlpipe:watchdog".into())
            .spawn(move || {
                let (calls, changed) = &*watched;
                let mut guard = calls.lock().expect("not poisoned");
                loop {
                    let now = Instant::now();
                    let late: Vec<u64> = guard.running.iter().filter(|(_, c)| c.0 <= now).map(|(id, _)| *id).collect();
                    for id in late {
                        let (_, what, began) = guard.running.remove(&id).expect("listed");
                        overdue(&what, began.elapsed());
                    }
                    let next = guard.running.values().map(|c| c.0).min();
                    let wait = next.map_or(Duration::from_secs(3600), |d| d.saturating_duration_since(now));
                    guard = changed.wait_timeout(guard, wait).expect("not poisoned").0;
                }
            })
            .expect("a thread for the watchdog");
        Watchdog { state }
    }

    /// Runs `call`, watched for `limit`.
    pub fn bounded<T>(&self, what: &str, limit: Duration, call: impl FnOnce() -> T) -> T {
        let (calls, changed) = &*self.state;
        let id = {
            let mut guard = calls.lock().expect("not poisoned");
            guard.next_id += 1;
            let id = guard.next_id;
            let now = Instant::now();
            guard.running.insert(id, (now + limit, what.to_owned(), now));
            id
        };
        changed.notify_one();
        let result = call();
        calls.lock().expect("not poisoned").running.remove(&id);
        result
    }
}

/// Commits the open transaction, retrying the commit itself while it fails retriably (a
/// timed-out commit may have succeeded: aborting and redoing it could publish twice).
pub fn commit_retrying<C: rdkafka::producer::ProducerContext>(
    producer: &BaseProducer<C>,
    give_up_after: Duration,
) -> Result<(), KafkaError> {
    // `commit_transaction` flushes first, polling 100 ms at a time: on a local broker that
    // was the whole cost of a transaction. Flushing here in 1 ms polls leaves it nothing to wait for.
    serve_until_empty(producer, Instant::now() + TIMEOUT);
    retrying("committing a transaction", give_up_after, || {
        bounded("committing a transaction", TIMEOUT, || producer.commit_transaction(TIMEOUT))
    })
}

/// Aborts the open transaction, retrying while the abort fails retriably (a coordinator that
/// is away). Messages still queued or in flight are purged first and their delivery reports
/// served: librdkafka's abort waits for them, and with reports delivered as events (as
/// rust-rdkafka has them) nothing would serve them during the call, so it would time out.
pub fn abort_retrying<C: rdkafka::producer::ProducerContext>(
    producer: &BaseProducer<C>,
    give_up_after: Duration,
) -> Result<(), KafkaError> {
    retrying("aborting a transaction", give_up_after, || {
        producer.purge(PurgeConfig::default().queue().inflight());
        serve_until_empty(producer, Instant::now() + TIMEOUT);
        bounded("aborting a transaction", TIMEOUT, || producer.abort_transaction(TIMEOUT))
    })
}

/// Calls `call` again while it fails with a retriable transaction error, for up to
/// `give_up_after`, with a backoff doubling from 100 ms to 2 s.
fn retrying(
    what: &str,
    give_up_after: Duration,
    mut call: impl FnMut() -> Result<(), KafkaError>,
) -> Result<(), KafkaError> {
    let started = Instant::now();
    let mut backoff = Backoff::kafka();
    loop {
        match call() {
            Err(KafkaError::Transaction(e)) if e.is_retriable() && started.elapsed() < give_up_after => {
                tracing::warn!(error = %e, "{what}: retrying");
                std::thread::sleep(backoff.next_pause());
            }
            result => return result,
        }
    }
}

/// Polls the producer 1 ms at a time until it holds no message or event, or `deadline`.
fn serve_until_empty<C: rdkafka::producer::ProducerContext>(producer: &BaseProducer<C>, deadline: Instant) {
    while producer.in_flight_count() > 0 && Instant::now() < deadline {
        producer.poll(Duration::from_millis(1));
    }
}

/// Whether `error` says another producer of the same transactional id took over, or that
/// this producer is broken for good.
pub fn is_fenced_or_fatal(error: &KafkaError) -> bool {
    is_fenced(error) || matches!(error, KafkaError::Transaction(e) if e.is_fatal())
}

/// Whether `error`, met by a transaction open for `open_for`, fenced the producer because the
/// broker aborted the transaction at the producer's `transaction_timeout`, not because another
/// producer of the id took over. Both bump the id's epoch and read alike; but a coordinator
/// times out only a transaction it has held for longer than that (it counts from the first
/// partition added, after the producer began), so a younger one was fenced by another producer.
/// An outlived transaction means the brokers were unreachable for that long: nothing of it
/// was committed, and a restart continues from the committed offsets.
pub fn outlived(error: &KafkaError, open_for: Duration, transaction_timeout: Duration) -> bool {
    is_fenced(error) && open_for >= transaction_timeout
}

/// What a worker whose transaction [`outlived`] its timeout says as it stops.
pub fn outlived_message(what: &str, error: &KafkaError, open_for: Duration, transaction_timeout: Duration) -> String {
    format!(
        "{what}: {error}. The transaction was open for {:.0} s, longer than transaction.timeout.ms ({} ms): the \
         brokers were unreachable for that long and aborted it. Exiting with code {RESTART_EXIT_CODE} for the \
         orchestrator to restart this process, which continues from the committed offsets (a larger \
         transaction.timeout.ms in [kafka.properties] rides out longer outages)",
        open_for.as_secs_f64(),
        transaction_timeout.as_millis()
    )
}

/// Whether `error` says another producer of the same transactional id took over (or that
/// this one may not use the id at all).
pub fn is_fenced(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::InvalidProducerEpoch
                | RDKafkaErrorCode::Fenced
                | RDKafkaErrorCode::TransactionalIdAuthorizationFailed
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn a_call_past_its_limit_is_reported_once_and_one_in_time_never() {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let watchdog = Watchdog::new(move |what, after| tx.lock().unwrap().send((what.to_owned(), after)).unwrap());
        assert_eq!(watchdog.bounded("quick", Duration::from_millis(200), || 7), 7);
        watchdog.bounded("stuck", Duration::from_millis(100), || std::thread::sleep(Duration::from_millis(400)));
        let (what, after) = rx.recv_timeout(Duration::from_secs(1)).unwrap();
        assert_eq!(what, "stuck");
        assert!(after >= Duration::from_millis(100) && after < Duration::from_millis(400), "{after:?}");
        assert!(rx.recv_timeout(Duration::from_millis(500)).is_err(), "reported once, and 'quick' never");
    }
}
