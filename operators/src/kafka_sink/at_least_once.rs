//! At-least-once delivery: messages go to the producer as they come, an epoch retires once
//! every message of it is acknowledged, and the input offsets of retired epochs are committed
//! for the group (or, without a committer, by the caller from the positions).
//!
//! **Failures:** an output the producer or the broker refuses as too large is replaced, in its
//! epoch, by a small dead letter; any other refusal is the worker's fatal error, and nothing
//! is committed past it.

use super::ledger::Ledger;
use super::messages::{too_large, MessageInFlight, Outgoing, Report, SinkContext};
use super::{SinkSpec, Step};
use crate::backlog::Backlog;
use crate::error::OperatorError;
use crate::metrics::SinkMetrics;
use crate::records::{Epoch, Position};
use crate::retry::{is_retriable_code, Backoff};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The producer, and the consumer that commits the group's offsets (if the sink does).
pub(crate) struct AtLeastOnce<C: ConsumerContext> {
    pub(crate) producer: BaseProducer<SinkContext>,
    pub(crate) committer: Option<Arc<BaseConsumer<C>>>,
}

impl<C: ConsumerContext> AtLeastOnce<C> {
    /// Sends what waits, takes the delivery reports, retires the acknowledged epochs the input
    /// has passed (`open` is false) and commits their offsets.
    pub(crate) fn step<H>(
        &mut self,
        ledger: &mut Ledger<H>,
        open: impl Fn(&Epoch) -> bool,
        spec: &SinkSpec,
        backlog: &mut Backlog,
        metrics: &mut SinkMetrics,
    ) -> Result<Step<H>, OperatorError> {
        send(&self.producer, ledger, spec, metrics)?;
        self.producer.poll(Duration::ZERO);
        let reports: Vec<Report> = std::mem::take(&mut *self.producer.context().reports.lock().expect("not poisoned"));
        for report in reports {
            acknowledge(report, ledger, backlog, metrics)?;
        }
        let in_flight: usize = ledger.epochs.values().map(|e| e.in_flight + e.waiting.len()).sum();
        metrics.unacked.set(in_flight as i64);
        let retired = ledger.retire_acknowledged(&open);
        if let Some(consumer) = &self.committer {
            let positions = retired.iter().flat_map(|(_, positions)| positions);
            // Nothing commits after the last epoch of a finished input: wait for that commit.
            let last = ledger.epochs.is_empty() && !open(&Epoch::MAX);
            commit_offsets(consumer, &spec.input_topic, positions, last);
        }
        let again = (!ledger.epochs.is_empty()).then_some(Duration::from_millis(2));
        Ok(Step { retired, again })
    }
}

/// Hands the waiting messages to the producer, oldest epoch first, until its queue is full;
/// an output the producer refuses as too large is replaced by its small dead letter. The
/// error that stops the worker, for any other refusal.
fn send<H>(
    producer: &BaseProducer<SinkContext>,
    ledger: &mut Ledger<H>,
    spec: &SinkSpec,
    metrics: &mut SinkMetrics,
) -> Result<(), OperatorError> {
    for entry in ledger.epochs.values_mut() {
        while let Some(Outgoing { sent, payload }) = entry.waiting.pop_front() {
            let topic = sent.topic(spec);
            // The key is an id of at most 1 KiB; the payload is only borrowed.
            let key = sent.key.clone();
            let delivery = Box::new(MessageInFlight { at: Instant::now(), message: sent });
            let record = BaseRecord::with_opaque_to(topic, delivery).key(&key).payload(&payload);
            match producer.send(record) {
                Ok(()) => entry.in_flight += 1,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), record)) => {
                    let sent = record.delivery_opaque.message;
                    entry.waiting.push_front(Outgoing { sent, payload });
                    return Ok(());
                }
                Err((error, record)) => {
                    let message = record.delivery_opaque.message;
                    if too_large(error.rdkafka_error_code()) && !message.replacement {
                        tracing::warn!(id = %crate::records::truncate(&message.key, 64), partition = message.partition, offset = message.offset, %error, "an output is larger than the producer accepts; a small dead letter replaces it");
                        entry.waiting.push_front(message.replaced(&error.to_string()));
                        metrics.dead_lettered.with("output_too_large").inc();
                        continue;
                    }
                    metrics.failed.inc();
                    let (what, topic) = (message.source(), topic.to_owned());
                    return Err(OperatorError::Unproducible { what, topic, error: error.to_string() });
                }
            }
        }
    }
    Ok(())
}

/// Takes one delivery report: a delivered message is acknowledged in its epoch (and its record
/// leaves the backlog); one the broker refused as too large is replaced, in its epoch, by its
/// small dead letter, which stays in flight until that is delivered. The error that stops the
/// worker, for any other failure.
fn acknowledge<H>(
    report: Report,
    ledger: &mut Ledger<H>,
    backlog: &mut Backlog,
    metrics: &mut SinkMetrics,
) -> Result<(), OperatorError> {
    let entry = ledger.epochs.get_mut(&report.message.epoch).expect("an epoch with a message in flight is open");
    entry.in_flight -= 1;
    match &report.outcome {
        Ok(()) => report.observe_published(metrics),
        Err((code, error)) if too_large(*code) && !report.message.replacement => {
            // The broker's limit (max.message.bytes of the topic) is below the producer's.
            let m = &report.message;
            tracing::warn!(id = %crate::records::truncate(&m.key, 64), partition = m.partition, offset = m.offset, error, "the broker refused an output as too large; a small dead letter replaces it");
            entry.waiting.push_back(report.message.replaced(error));
            metrics.dead_lettered.with("output_too_large").inc();
            return Ok(());
        }
        Err((_, error)) => {
            // The epoch keeps a message unacknowledged: it never retires, nothing is committed.
            entry.in_flight += 1;
            metrics.failed.inc();
            return Err(OperatorError::Undelivered { what: report.message.source(), error: error.clone() });
        }
    }
    if report.message.is_record_output() {
        backlog.done(report.message.partition, report.message.offset);
    }
    Ok(())
}

/// Commits, for the group, the offset after each partition's highest retired record:
/// asynchronously, or (`last`: nothing else will commit after it) synchronously, waiting out a
/// coordinator that moves or loads meanwhile.
fn commit_offsets<'a, C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    positions: impl Iterator<Item = &'a Position>,
    last: bool,
) {
    let mut next: BTreeMap<i32, i64> = BTreeMap::new();
    for p in positions {
        let at = next.entry(p.partition).or_insert(p.published);
        *at = (*at).max(p.published);
    }
    if next.is_empty() {
        return;
    }
    let mut list = TopicPartitionList::new();
    for (partition, offset) in next {
        list.add_partition_offset(topic, partition, Offset::Offset(offset)).expect("valid offset");
    }
    if last {
        commit_finally(consumer, &list);
    } else if let Err(error) = consumer.commit(&list, CommitMode::Async) {
        tracing::warn!(%error, "offset commit failed; it is retried with the next epoch");
    }
}

/// The last commit of a run, retried for up to a minute while the group coordinator is
/// unavailable (moving, loading, or the broker restarting). Giving up only means the records
/// after the previous commit are read again by the next run (at-least-once), so it warns.
pub fn commit_finally<C: ConsumerContext>(consumer: &BaseConsumer<C>, list: &TopicPartitionList) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut backoff = Backoff::kafka();
    loop {
        let error = match consumer.commit(list, CommitMode::Sync) {
            Ok(()) => return,
            Err(error) => error,
        };
        let retriable = error.rdkafka_error_code().is_some_and(is_retriable_code);
        if !retriable || Instant::now() + backoff.peek() > deadline {
            tracing::warn!(%error, "the final offset commit failed: the next run reads the last records again");
            return;
        }
        tracing::info!(%error, "waiting for the group coordinator to commit the final offsets");
        std::thread::sleep(backoff.next_pause());
    }
}
