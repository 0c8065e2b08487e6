//! `kafka_source`: image records from a Kafka topic into the dataflow.
//!
//! **In:** nothing from the dataflow; messages of the partitions that the caller assigned to
//! this worker's consumer (a static, deterministic assignment: partition p to worker
//! p mod workers, so every partition is read by exactly one worker of all processes).
//! **Out:** per message, `Ok(ImageRecord)` or `Err(DeadLetter)` for a payload that is not a
//! valid record, at the message's epoch.
//! **Progress:** the operator holds one capability, at the least epoch a future message can
//! have. With [`EpochPolicy::Time`] that is the current wall-clock slice; with
//! [`EpochPolicy::Offsets`] it is the least of `next_offset / records` over the partitions that
//! are not finished, so epoch boundaries depend only on offsets (deterministic replays). With
//! `stop_at_end`, a partition finishes at the end offset seen at start-up (transaction markers,
//! which take offsets but are never delivered, are skipped by following the consumer's
//! position) and the capability is dropped once all are finished, which lets the whole
//! dataflow drain and complete.
//!
//! The consumer is polled with a zero timeout and the operator re-activates itself, so the
//! worker thread never blocks on Kafka. Polling pauses while the worker's backlog (records
//! read but not yet published) is at its limit: that is the pipeline's backpressure.

use crate::feedback_join::Feedback;
use crate::metrics::SourceMetrics;
use crate::records::{DeadLetter, Epoch, ImageRecord};
use crate::{Backlog, RecordOrDead};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use timely::dataflow::operators::generic::operator::source;
use timely::dataflow::{Scope, StreamVec};

/// How records are grouped into epochs (timely timestamps).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "by")]
pub enum EpochPolicy {
    /// An epoch per wall-clock slice of `millis` milliseconds (live streams).
    Time { millis: u64 },
    /// An epoch per `records` offsets of each partition (deterministic: replays and tests).
    Offsets { records: u64 },
}

/// Where one assigned partition starts and (optionally) ends.
#[derive(Clone, Debug)]
pub struct PartitionRange {
    pub partition: i32,
    /// The first offset to read.
    pub start: i64,
    /// With stop-at-end: the offset after the last one to read.
    pub end: Option<i64>,
}

/// What the source reads and how it stamps it.
#[derive(Clone, Debug)]
pub struct SourceSpec {
    pub topic: String,
    pub partitions: Vec<PartitionRange>,
    pub epochs: EpochPolicy,
    /// Pause polling while this many records of this worker are in the pipeline.
    pub max_backlog: usize,
    /// Most messages taken per activation, so that other operators get the thread.
    pub max_poll: usize,
}

struct PartitionState {
    next: i64,
    end: Option<i64>,
}

impl PartitionState {
    fn finished(&self) -> bool {
        self.end.is_some_and(|end| self.next >= end)
    }
}

/// Reads `spec.partitions` with `consumer` (already assigned to them at their start offsets).
///
/// Setting `stop` makes the source drop its capability and read no more: the dataflow then
/// drains what is in flight, publishes it, commits, and completes (a graceful shutdown).
/// `metrics.consumed` counts the messages taken, by partition.
pub fn kafka_source<'scope, C: ConsumerContext + 'static>(
    scope: Scope<'scope, Epoch>,
    consumer: Rc<BaseConsumer<C>>,
    spec: SourceSpec,
    backlog: Backlog,
    stop: Arc<AtomicBool>,
    metrics: SourceMetrics,
) -> StreamVec<'scope, Epoch, RecordOrDead> {
    // Dead letters travel through the dataflow as data; boxing them buys nothing.
    #[allow(clippy::result_large_err)]
    let parse = |message: &BorrowedMessage<'_>| {
        ImageRecord::parse(
            message.payload(),
            message.key(),
            message.partition(),
            message.offset(),
            message.timestamp().to_millis(),
        )
    };
    messages(scope, "KafkaSource", consumer, spec, Some(backlog), stop, metrics, parse)
}

/// Reads the feedback topic's `spec.partitions` with `consumer` (assigned to them, as the
/// input's partitions are: partition p to worker p mod workers), stamped by the same epoch
/// policy as the input. **Out:** per message, `Ok(Feedback)` or `Err(DeadLetter)`. Feedback
/// is not counted in the backlog (it produces no output of its own) and is never paused:
/// it is small, and an image's label must not wait behind images.
pub fn kafka_feedback_source<'scope, C: ConsumerContext + 'static>(
    scope: Scope<'scope, Epoch>,
    consumer: Rc<BaseConsumer<C>>,
    spec: SourceSpec,
    stop: Arc<AtomicBool>,
    metrics: SourceMetrics,
) -> StreamVec<'scope, Epoch, Result<Feedback, DeadLetter>> {
    #[allow(clippy::result_large_err)]
    let parse = |message: &BorrowedMessage<'_>| {
        Feedback::parse(
            message.payload(),
            message.key(),
            message.partition(),
            message.offset(),
            message.timestamp().to_millis(),
        )
    };
    messages(scope, "KafkaFeedbackSource", consumer, spec, None, stop, metrics, parse)
}

/// The source of both: each message of the assigned partitions, as `parse` makes it.
#[allow(clippy::too_many_arguments)]
fn messages<'scope, C: ConsumerContext + 'static, T: Clone + 'static>(
    scope: Scope<'scope, Epoch>,
    name: &str,
    consumer: Rc<BaseConsumer<C>>,
    spec: SourceSpec,
    backlog: Option<Backlog>,
    stop: Arc<AtomicBool>,
    mut metrics: SourceMetrics,
    parse: impl Fn(&BorrowedMessage<'_>) -> T + 'static,
) -> StreamVec<'scope, Epoch, T> {
    source(scope, name, move |capability, info| {
        let activator = scope.activator_for(info.address);
        let mut partitions: BTreeMap<i32, PartitionState> =
            spec.partitions.iter().map(|p| (p.partition, PartitionState { next: p.start, end: p.end })).collect();
        let least_epoch = move |partitions: &BTreeMap<i32, PartitionState>| -> Option<Epoch> {
            let open = partitions.values().filter(|p| !p.finished());
            match spec.epochs {
                EpochPolicy::Offsets { records } => open.map(|p| p.next.max(0) as u64 / records).min(),
                EpochPolicy::Time { millis } => open.map(|_| crate::records::now_ms() as u64 / millis).min(),
            }
        };
        let mut capability = least_epoch(&partitions).map(|epoch| capability.delayed(&epoch));
        let epochs = spec.epochs;
        let (max_backlog, max_poll) = (spec.max_backlog, spec.max_poll);
        let topic = spec.topic;
        move |output| {
            if stop.load(Ordering::Relaxed) {
                if capability.take().is_some() {
                    tracing::info!(topic, "stop requested: reading no more, draining what is in flight");
                }
                return;
            }
            let Some(cap) = capability.as_mut() else { return };
            let mut taken = 0;
            while taken < max_poll && backlog.as_ref().is_none_or(|b| b.get() < max_backlog) {
                let Some(result) = consumer.poll(Duration::ZERO) else { break };
                match result {
                    Ok(message) => {
                        let (partition, offset) = (message.partition(), message.offset());
                        let Some(state) = partitions.get_mut(&partition) else {
                            tracing::warn!(topic, partition, "message from a partition not assigned to this worker");
                            continue;
                        };
                        if state.finished() || offset < state.next {
                            continue; // beyond the stop offset, or a re-delivery after a seek
                        }
                        state.next = offset + 1;
                        metrics.consumed.with(&partition.to_string()).inc();
                        let epoch = match epochs {
                            EpochPolicy::Offsets { records } => offset.max(0) as u64 / records,
                            EpochPolicy::Time { .. } => *cap.time(),
                        };
                        output.session(&cap.delayed(&epoch)).give(parse(&message));
                        if let Some(backlog) = &backlog {
                            backlog.set(backlog.get() + 1);
                        }
                        taken += 1;
                    }
                    Err(KafkaError::PartitionEOF(partition)) => {
                        tracing::debug!(topic, partition, "reached the end of the partition");
                    }
                    Err(error) => tracing::warn!(topic, %error, "Kafka consumer error (the client retries)"),
                }
            }
            if taken < max_poll {
                skip_control_records(&*consumer, &topic, &mut partitions);
            }
            match least_epoch(&partitions) {
                Some(epoch) => {
                    cap.downgrade(&epoch.max(*cap.time()));
                    if taken == max_poll {
                        activator.activate();
                    } else {
                        // Nothing (more) to read, or the backlog is full: look again shortly.
                        activator.activate_after(Duration::from_millis(5));
                    }
                }
                None => {
                    tracing::info!(topic, "all assigned partitions read to their end offsets");
                    capability = None;
                }
            }
        }
    })
}

/// Moves each unfinished partition's next offset up to the consumer's position. Transaction
/// markers (commit and abort records) take offsets but are never delivered as messages, so a
/// partition whose last offset is a marker would otherwise never reach its end offset, and a
/// `stop_at_end` run on a transactional input would never finish.
fn skip_control_records<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partitions: &mut BTreeMap<i32, PartitionState>,
) {
    if !partitions.values().any(|p| p.end.is_some() && !p.finished()) {
        return;
    }
    let Ok(positions) = consumer.position() else { return };
    for (partition, state) in partitions.iter_mut().filter(|(_, s)| s.end.is_some() && !s.finished()) {
        if let Some(rdkafka::Offset::Offset(position)) = positions.find_partition(topic, *partition).map(|e| e.offset())
        {
            state.next = state.next.max(position);
        }
    }
}
