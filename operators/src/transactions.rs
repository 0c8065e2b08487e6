//! Kafka transactions, as both transactional writers use them (the exactly-once sink, and the
//! checkpoint writer in the library): committing and aborting with retries, and telling a
//! fenced producer from a passing failure.

use crate::retry::Backoff;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, Producer, PurgeConfig};
use std::time::{Duration, Instant};

/// How long a transaction's calls may take before the attempt counts as failed.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Commits the open transaction, retrying the commit itself while it fails retriably (a
/// timed-out commit may have succeeded: aborting and redoing it could publish twice).
pub fn commit_retrying<C: rdkafka::producer::ProducerContext>(
    producer: &BaseProducer<C>,
    give_up_after: Duration,
) -> Result<(), KafkaError> {
    // `commit_transaction` flushes first, polling 100 ms at a time: on a local broker that
    // was the whole cost of a transaction. Flushing here in 1 ms polls leaves it nothing to wait for.
    serve_until_empty(producer, Instant::now() + TIMEOUT);
    retrying("committing a transaction", give_up_after, || producer.commit_transaction(TIMEOUT))
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
        producer.abort_transaction(TIMEOUT)
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
