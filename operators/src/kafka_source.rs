//! `kafka_source`: records from a Kafka topic into the dataflow.
//!
//! **In:** messages of the partitions the caller assigned to this worker's consumer (partition
//! p to worker p mod workers: each partition is read by exactly one worker of all processes).
//! **Out:** per message, the record it holds ([`FromMessage`]: an `ImageRecord`, a `Feedback`)
//! or the `DeadLetter` of a payload that is not one, at the message's epoch.
//! **Progress:** the operator holds one capability, at the least epoch a future message can
//! have. With [`EpochPolicy::Time`] that is the current wall-clock slice; with
//! [`EpochPolicy::Offsets`] it is the least of `next_offset / records` over the partitions that
//! are not finished, so epoch boundaries depend only on offsets (deterministic replays). With
//! `stop_at_end`, a partition finishes at the end offset seen at start-up (transaction markers,
//! which take offsets but are never delivered, are skipped by following the consumer's
//! position) and the capability is dropped once all are finished, which lets the whole
//! dataflow drain and complete.
//!
//! **Backpressure without stalls:** each partition has a queue of its own
//! ([`AssignedConsumer`]), so the source chooses what to read: the partition whose next record
//! has the least epoch first (round robin among equals). While the worker's backlog (records
//! read, not yet published) is under `max_backlog` any partition is read; at the limit, only
//! partitions whose next record is of the backlog's oldest epoch or older. Invariant: the
//! source never leaves unread a record that the oldest epoch in flight needs to complete, so a
//! backlog full of later epochs (one partition read far ahead of another) always drains. The
//! backlog exceeds `max_backlog` by at most the records of its oldest epoch (with offset
//! epochs, `records` per partition).
//!
//! **Failures:** a record is never taken past an earlier one still on another queue (offsets
//! may have gaps, so the source cannot tell a skipped record from a transaction marker):
//! - each partition is split into its queue before it is assigned: librdkafka starts a fetch
//!   asynchronously, and one started before the split sends its first records to the
//!   consumer's own queue and later ones to the partition's;
//! - should a record still come on the consumer's queue, it is not taken, nor is anything of
//!   its partition's queue in that activation: the partition is split again, sought back to
//!   where the source is, and not read until a seek succeeds;
//! - the consumer's queue counts as drained only when it is empty: `poll` also returns nothing
//!   after serving a log or statistics event, with messages behind it.
//!
//! Consumer errors are logged; the client retries them.
//!
//! The queues are polled with a zero timeout and the operator re-activates itself, so the
//! worker thread never blocks on Kafka. The source tells the backlog which partitions are not
//! read past the least open epoch, for the stall report.

use crate::backlog::{SharedBacklog, Unread};
use crate::metrics::SourceMetrics;
use crate::records::{DeadLetter, Epoch, Feedback, ImageRecord, InputMessage, InputSpec, ID_HEADER, LABEL_HEADER};
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, BTreeSet};
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
    /// How image records are carried (the feedback source ignores it).
    pub input: InputSpec,
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

/// What a Kafka source makes of each message: the record its payload holds, or the dead
/// letter of a payload that is not one (dead letters travel as data; boxing buys nothing).
#[allow(clippy::result_large_err)]
pub trait FromMessage: Clone + Sized + 'static {
    fn from_message(message: &BorrowedMessage<'_>, input: &InputSpec) -> Result<Self, DeadLetter>;
}

impl FromMessage for ImageRecord {
    fn from_message(message: &BorrowedMessage<'_>, input: &InputSpec) -> Result<ImageRecord, DeadLetter> {
        // The last of a repeated header wins, as later headers override earlier ones.
        let header = |name: &str| {
            let headers = message.headers()?;
            headers.iter().filter(|h| h.key == name).last().and_then(|h| h.value)
        };
        let message = InputMessage {
            payload: message.payload(),
            key: message.key(),
            id_header: header(ID_HEADER),
            label_header: header(LABEL_HEADER),
            partition: message.partition(),
            offset: message.offset(),
            kafka_ts_ms: message.timestamp().to_millis(),
        };
        ImageRecord::parse_message(input, &message)
    }
}

impl FromMessage for Feedback {
    fn from_message(message: &BorrowedMessage<'_>, _input: &InputSpec) -> Result<Feedback, DeadLetter> {
        let (payload, key, partition, offset) =
            (message.payload(), message.key(), message.partition(), message.offset());
        Feedback::parse(payload, key, partition, offset, message.timestamp().to_millis())
    }
}

/// Reads `spec.partitions` with `consumer` (already assigned to them at their start offsets),
/// each message made a record `R` (an [`ImageRecord`] for the pipeline's input) or a dead letter.
///
/// Setting `stop` makes the source drop its capability and read no more: the dataflow then
/// drains what is in flight, publishes it, commits, and completes (a graceful shutdown).
/// `metrics.consumed` counts the messages taken, by partition.
///
/// ```no_run
/// use dlpipe_operators::records::{InputFormat, InputSpec};
/// use dlpipe_operators::{kafka_source, AssignedConsumer, EpochPolicy, ImageRecord, PartitionRange, SourceSpec};
/// use rdkafka::config::ClientConfig;
/// use rdkafka::consumer::BaseConsumer;
/// use std::sync::Arc;
/// use timely::dataflow::operators::Inspect;
///
/// timely::execute_directly(|worker| {
///     let consumer: BaseConsumer =
///         ClientConfig::new().set("bootstrap.servers", "127.0.0.1:9092").set("group.id", "g").create().unwrap();
///     // Partition 0 of "images" from offset 0 to its offset 100, ten offsets an epoch.
///     let partitions = vec![PartitionRange { partition: 0, start: 0, end: Some(100) }];
///     let assigned = AssignedConsumer::assign(Arc::new(consumer), "images", &partitions).unwrap();
///     let epochs = EpochPolicy::Offsets { records: 10 };
///     let input = InputSpec { format: InputFormat::Json, max_image_bytes: 32 << 20 };
///     let spec = SourceSpec { topic: "images".into(), partitions, epochs, max_backlog: 1000, max_poll: 256, input };
///     worker.dataflow::<u64, _, _>(|scope| {
///         kafka_source::<ImageRecord, _>(scope, assigned, spec, Default::default(), Default::default(), Default::default())
///             .inspect(|record| println!("{record:?}"));
///     });
/// });
/// ```
// Dead letters travel as data (see `FromMessage`).
#[allow(clippy::result_large_err)]
pub fn kafka_source<'scope, R: FromMessage, C: ConsumerContext + 'static>(
    scope: Scope<'scope, Epoch>,
    consumer: AssignedConsumer<C>,
    spec: SourceSpec,
    backlog: SharedBacklog,
    stop: Arc<AtomicBool>,
    metrics: SourceMetrics,
) -> StreamVec<'scope, Epoch, Result<R, DeadLetter>> {
    let input = spec.input;
    messages(scope, "KafkaSource", consumer, spec, Some(backlog), stop, metrics, move |m| R::from_message(m, &input))
}

/// Reads the feedback topic's `spec.partitions` with `consumer` (assigned to them, as the
/// input's partitions are: partition p to worker p mod workers), stamped by the same epoch
/// policy as the input. **Out:** per message, `Ok(Feedback)` or `Err(DeadLetter)`. Feedback
/// is not counted in the backlog (it produces no output of its own) and is never paused:
/// it is small, and an image's label must not wait behind images.
// Dead letters travel as data (see `FromMessage`).
#[allow(clippy::result_large_err)]
pub fn kafka_feedback_source<'scope, C: ConsumerContext + 'static>(
    scope: Scope<'scope, Epoch>,
    consumer: AssignedConsumer<C>,
    spec: SourceSpec,
    stop: Arc<AtomicBool>,
    metrics: SourceMetrics,
) -> StreamVec<'scope, Epoch, Result<Feedback, DeadLetter>> {
    let input = spec.input;
    messages(scope, "KafkaFeedbackSource", consumer, spec, None, stop, metrics, move |m| {
        Feedback::from_message(m, &input)
    })
}

/// The source of both: each message of the assigned partitions, as `parse` makes it.
#[allow(clippy::too_many_arguments)]
fn messages<'scope, C: ConsumerContext + 'static, T: Clone + 'static>(
    scope: Scope<'scope, Epoch>,
    name: &str,
    consumer: AssignedConsumer<C>,
    spec: SourceSpec,
    backlog: Option<SharedBacklog>,
    stop: Arc<AtomicBool>,
    mut metrics: SourceMetrics,
    parse: impl Fn(&BorrowedMessage<'_>) -> T + 'static,
) -> StreamVec<'scope, Epoch, T> {
    source(scope, name, move |capability, info| {
        let activator = scope.activator_for(info.address);
        let topic = spec.topic;
        let AssignedConsumer { consumer, mut queues } = consumer;
        let mut reader = Reader::new(&spec.partitions, spec.epochs, spec.max_backlog);
        // Partitions whose records came on the consumer's queue: not read until their own
        // queue is back and sought to where the source is.
        let mut unsplit = BTreeSet::new();
        let mut capability = reader.least_epoch().map(|epoch| capability.delayed(&epoch));
        let max_poll = spec.max_poll;
        move |output| {
            if stop.load(Ordering::Relaxed) {
                if capability.take().is_some() {
                    tracing::info!(topic, "stop requested: reading no more, draining what is in flight");
                }
                return;
            }
            let Some(cap) = capability.as_mut() else { return };
            let in_backlog = || backlog.as_ref().map(|b| (b.borrow().len(), b.borrow().oldest_epoch()));
            // First the consumer's own queue (its events: statistics, errors), then the
            // partitions' queues in the order `Reader::next_to_read` chooses.
            let (mut taken, mut consumer_idle, mut events) = (0, false, 0);
            let mut idle = unsplit.clone();
            while taken < max_poll {
                let result = if !consumer_idle {
                    match poll_consumer_queue(&consumer, &reader, events < max_poll) {
                        Polled::Result(result) => result,
                        // Nor is anything of its own queue taken in this activation, which may
                        // already hold later records (taking one would skip these).
                        Polled::Unsplit(partition) => {
                            unsplit.insert(partition);
                            idle.insert(partition);
                            continue;
                        }
                        Polled::Event => {
                            events += 1;
                            continue;
                        }
                        Polled::Drained => {
                            consumer_idle = true;
                            continue;
                        }
                    }
                } else {
                    let Some(partition) = reader.next_to_read(in_backlog(), &idle) else { break };
                    let queue = queues.get(&partition).expect("a queue for every partition read");
                    match queue.poll(Duration::ZERO) {
                        Some(Ok(message)) => Ok(message),
                        Some(Err(error)) => {
                            idle.insert(partition);
                            Err(error)
                        }
                        None => {
                            idle.insert(partition);
                            continue;
                        }
                    }
                };
                let (Some((partition, offset, epoch)), Ok(message)) = (reader.accept(&topic, &result), &result) else {
                    continue;
                };
                // A time slice is never before the one the capability holds.
                let epoch = epoch.max(*cap.time());
                metrics.consumed.with(&partition.to_string()).inc();
                output.session(&cap.delayed(&epoch)).give(parse(message));
                if let Some(backlog) = &backlog {
                    backlog.borrow_mut().read(partition, offset, epoch);
                }
                taken += 1;
            }
            let drained = taken < max_poll;
            match settle(&consumer, &mut queues, &topic, &mut reader, &mut unsplit, backlog.as_ref(), drained) {
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

/// A consumer assigned to a source's partitions, each split into a queue of its own so that
/// the source chooses which partition to read.
pub struct AssignedConsumer<C: ConsumerContext> {
    consumer: Arc<BaseConsumer<C>>,
    queues: BTreeMap<i32, PartitionQueue<C>>,
}

impl<C: ConsumerContext> AssignedConsumer<C> {
    /// Splits each of `partitions` of `topic` into its queue, then assigns `consumer` to them at
    /// their start offsets: split first, no fetch ever sends a record to the consumer's own
    /// queue (librdkafka starts a fetch asynchronously, and one started before the split does).
    pub fn assign(
        consumer: Arc<BaseConsumer<C>>,
        topic: &str,
        partitions: &[PartitionRange],
    ) -> KafkaResult<AssignedConsumer<C>> {
        let mut assignment = TopicPartitionList::new();
        for p in partitions {
            assignment.add_partition_offset(topic, p.partition, Offset::Offset(p.start))?;
        }
        let assigned = Self::split(consumer, topic, partitions)?;
        assigned.consumer.assign(&assignment)?;
        Ok(assigned)
    }

    /// Splits `partitions` of `topic`, already assigned to `consumer`, each into its queue. Where
    /// a partition's fetch has started, records of it wait on the consumer's own queue: the
    /// source takes none of them and seeks the partition back (see "Failures").
    pub fn split(
        consumer: Arc<BaseConsumer<C>>,
        topic: &str,
        partitions: &[PartitionRange],
    ) -> KafkaResult<AssignedConsumer<C>> {
        let mut queues = BTreeMap::new();
        for p in partitions {
            let queue = consumer.split_partition_queue(topic, p.partition).ok_or_else(|| {
                KafkaError::Subscription(format!("no queue for partition {} of topic {topic:?}", p.partition))
            })?;
            queues.insert(p.partition, queue);
        }
        Ok(AssignedConsumer { consumer, queues })
    }

    /// The consumer (for the group's offsets and metadata).
    pub fn consumer(&self) -> &Arc<BaseConsumer<C>> {
        &self.consumer
    }
}

/// After an activation's reads: splits again what came on the consumer's queue, steps over
/// transaction markers once the queues are `drained`, and tells the backlog what is unread.
/// The least epoch a future message can have.
fn settle<C: ConsumerContext>(
    consumer: &Arc<BaseConsumer<C>>,
    queues: &mut BTreeMap<i32, PartitionQueue<C>>,
    topic: &str,
    reader: &mut Reader,
    unsplit: &mut BTreeSet<i32>,
    backlog: Option<&SharedBacklog>,
    drained: bool,
) -> Option<Epoch> {
    unsplit.retain(|partition| !resplit(consumer, queues, topic, *partition, reader.partitions[partition].next));
    if drained {
        skip_control_records(&**consumer, topic, &mut reader.partitions);
    }
    let least = reader.least_epoch();
    if let Some(backlog) = backlog {
        backlog.borrow_mut().set_unread(least.map(|epoch| reader.unread(epoch)).unwrap_or_default());
    }
    least
}

/// What one poll of the consumer's own queue gave.
enum Polled<'a> {
    /// A message or an error, for [`Reader::accept`].
    Result(KafkaResult<BorrowedMessage<'a>>),
    /// A record the source wants of a partition whose fetch started before its split (see
    /// "Failures"): not taken; the partition is split again and sought back to it.
    Unsplit(i32),
    /// A log or statistics event was served, not a message: `poll` says nothing then, though
    /// messages may wait behind it.
    Event,
    /// The queue is empty (or `events_allowed` was false).
    Drained,
}

/// Polls the consumer's own queue once, without waiting.
fn poll_consumer_queue<'a, C: ConsumerContext>(
    consumer: &'a BaseConsumer<C>,
    reader: &Reader,
    events_allowed: bool,
) -> Polled<'a> {
    match consumer.poll(Duration::ZERO) {
        Some(Ok(message)) if reader.wants(message.partition(), message.offset()) => {
            Polled::Unsplit(message.partition())
        }
        Some(result) => Polled::Result(result),
        None if events_allowed && consumer_queue_len(consumer) > 0 => Polled::Event,
        None => Polled::Drained,
    }
}

/// Messages and events waiting on the queue `consumer.poll` serves (the consumer's, or the main
/// queue of a consumer without a group).
fn consumer_queue_len<C: ConsumerContext>(consumer: &BaseConsumer<C>) -> usize {
    use rdkafka::bindings::rd_kafka_queue_length;
    use rdkafka::bindings::{rd_kafka_queue_destroy, rd_kafka_queue_get_consumer, rd_kafka_queue_get_main};
    let client = consumer.client().native_ptr();
    // SAFETY: `client` is the live handle `consumer` owns; each queue handle got here is a new
    // reference, released before returning.
    unsafe {
        let mut queue = rd_kafka_queue_get_consumer(client);
        if queue.is_null() {
            queue = rd_kafka_queue_get_main(client);
        }
        let len = rd_kafka_queue_length(queue);
        rd_kafka_queue_destroy(queue);
        len
    }
}

/// Gives `partition` a queue of its own again and reads it from `next` (the records that came
/// on the consumer's queue were not taken; seeking drops what is still fetched there). Whether
/// it did: a partition whose seek failed is not read (its queue may hold records past `next`)
/// until a later try succeeds.
fn resplit<C: ConsumerContext>(
    consumer: &Arc<BaseConsumer<C>>,
    queues: &mut BTreeMap<i32, PartitionQueue<C>>,
    topic: &str,
    partition: i32,
    next: i64,
) -> bool {
    if let Some(queue) = consumer.split_partition_queue(topic, partition) {
        queues.insert(partition, queue);
    }
    if let Err(error) = consumer.seek(topic, partition, rdkafka::Offset::Offset(next), Duration::from_secs(10)) {
        tracing::warn!(topic, partition, next, %error, "cannot seek a partition back to its queue; retrying");
        return false;
    }
    tracing::debug!(topic, partition, next, "partition given its own queue again");
    true
}

/// The source's partitions, where each is, and which one to read next.
struct Reader {
    partitions: BTreeMap<i32, PartitionState>,
    epochs: EpochPolicy,
    max_backlog: usize,
    /// The partition after the one read last: where the round robin among equals starts.
    cursor: i32,
}

impl Reader {
    fn new(ranges: &[PartitionRange], epochs: EpochPolicy, max_backlog: usize) -> Reader {
        let partitions = ranges.iter().map(|p| (p.partition, PartitionState { next: p.start, end: p.end })).collect();
        Reader { partitions, epochs, max_backlog, cursor: 0 }
    }

    /// The epoch of a partition's next record (the current slice, with time epochs).
    fn next_epoch(&self, state: &PartitionState) -> Epoch {
        match self.epochs {
            EpochPolicy::Offsets { records } => state.next.max(0) as u64 / records,
            EpochPolicy::Time { millis } => crate::records::now_ms() as u64 / millis,
        }
    }

    /// The least epoch a future message can have; `None` once every partition is finished.
    fn least_epoch(&self) -> Option<Epoch> {
        self.partitions.values().filter(|p| !p.finished()).map(|p| self.next_epoch(p)).min()
    }

    /// The partitions not read past `epoch` (offset epochs only: a time slice holds no partition).
    fn unread(&self, epoch: Epoch) -> Vec<Unread> {
        if !matches!(self.epochs, EpochPolicy::Offsets { .. }) {
            return Vec::new();
        }
        self.partitions
            .iter()
            .filter(|(_, s)| !s.finished() && self.next_epoch(s) <= epoch)
            .map(|(partition, s)| Unread { partition: *partition, next_offset: s.next, epoch: self.next_epoch(s) })
            .collect()
    }

    /// The partition to poll next, among those not `idle` in this activation: the least next
    /// epoch first, round robin among equals. With `backlog` = (records in it, its oldest
    /// epoch) at `max_backlog` or over, only a partition whose next record is of the oldest
    /// epoch or older: that epoch can then always complete and make room.
    fn next_to_read(&self, backlog: Option<(usize, Option<Epoch>)>, idle: &BTreeSet<i32>) -> Option<i32> {
        let may_read = |epoch: Epoch| match backlog {
            None => true,
            Some((len, oldest)) => len < self.max_backlog || oldest.is_some_and(|oldest| epoch <= oldest),
        };
        self.partitions
            .iter()
            .filter(|(partition, state)| !state.finished() && !idle.contains(*partition))
            .map(|(partition, state)| (self.next_epoch(state), *partition))
            .filter(|(epoch, _)| may_read(*epoch))
            .min_by_key(|(epoch, partition)| (*epoch, *partition < self.cursor, *partition))
            .map(|(_, partition)| partition)
    }

    /// Whether the record at `offset` of `partition` is one the source would take.
    fn wants(&self, partition: i32, offset: i64) -> bool {
        self.partitions.get(&partition).is_some_and(|s| !s.finished() && offset >= s.next)
    }

    /// Takes one poll's result: the message's (partition, offset, epoch) when it is a new
    /// record to emit; `None` for an event, a re-delivery, or a message past the end.
    fn accept(&mut self, topic: &str, result: &KafkaResult<BorrowedMessage<'_>>) -> Option<(i32, i64, Epoch)> {
        let message = match result {
            Ok(message) => message,
            Err(KafkaError::PartitionEOF(partition)) => {
                tracing::debug!(topic, partition, "reached the end of the partition");
                return None;
            }
            Err(error) => {
                tracing::warn!(topic, %error, "Kafka consumer error (the client retries)");
                return None;
            }
        };
        let (partition, offset) = (message.partition(), message.offset());
        if !self.partitions.contains_key(&partition) {
            tracing::warn!(topic, partition, "message from a partition not assigned to this worker");
            return None;
        }
        self.take(partition, offset)
    }

    /// Takes the record at `offset` of `partition` (an assigned one): its epoch when it is a new
    /// record to emit; `None` for a re-delivery (after a seek) or a record past the end.
    fn take(&mut self, partition: i32, offset: i64) -> Option<(i32, i64, Epoch)> {
        let state = self.partitions.get_mut(&partition)?;
        if state.finished() || offset < state.next {
            return None;
        }
        if offset > state.next {
            // Transaction markers and compaction leave gaps; anything else would be a loss.
            tracing::debug!(partition, from = state.next, to = offset, "offsets skipped");
        }
        state.next = offset + 1;
        self.cursor = partition + 1;
        let epoch = match self.epochs {
            EpochPolicy::Offsets { records } => offset.max(0) as u64 / records,
            // The slice the capability stands at (never before it).
            EpochPolicy::Time { millis } => crate::records::now_ms() as u64 / millis,
        };
        Some((partition, offset, epoch))
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(ranges: &[(i32, i64, Option<i64>)], max_backlog: usize) -> Reader {
        let ranges: Vec<PartitionRange> =
            ranges.iter().map(|&(partition, start, end)| PartitionRange { partition, start, end }).collect();
        Reader::new(&ranges, EpochPolicy::Offsets { records: 10 }, max_backlog)
    }

    #[test]
    fn reads_the_least_next_epoch_first_and_round_robin_among_equals() {
        // Partition 0 is at epoch 2 (offset 25), 1 and 2 at epoch 0, 3 is finished.
        let mut r = reader(&[(0, 25, None), (1, 3, None), (2, 7, None), (3, 5, Some(5))], 100);
        let none = BTreeSet::new();
        assert_eq!(r.next_to_read(None, &none), Some(1));
        assert_eq!(r.take(1, 3), Some((1, 3, 0)));
        // After 1, its equal 2 comes next; then 1 again.
        assert_eq!(r.next_to_read(None, &none), Some(2));
        assert_eq!(r.take(2, 7), Some((2, 7, 0)));
        assert_eq!(r.next_to_read(None, &none), Some(1));
        // An idle partition is passed over in this activation.
        assert_eq!(r.next_to_read(None, &BTreeSet::from([1])), Some(2));
        assert_eq!(r.least_epoch(), Some(0));
        let unread: Vec<i32> = r.unread(0).iter().map(|u| u.partition).collect();
        assert_eq!(unread, vec![1, 2]);
    }

    #[test]
    fn a_full_backlog_reads_only_partitions_at_its_oldest_epoch() {
        let r = reader(&[(0, 25, None), (1, 13, None)], 4);
        let none = BTreeSet::new();
        // Under the bound: the least epoch (1, partition 1).
        assert_eq!(r.next_to_read(Some((3, Some(2))), &none), Some(1));
        // At the bound with the backlog's oldest record of epoch 2: both may go (1 first).
        assert_eq!(r.next_to_read(Some((4, Some(2))), &none), Some(1));
        // Oldest epoch 1: only partition 1, whose next record is of epoch 1, can complete it.
        assert_eq!(r.next_to_read(Some((4, Some(1))), &BTreeSet::from([1])), None);
        // Oldest epoch 0 (another partition's record in flight): nothing is read.
        assert_eq!(r.next_to_read(Some((9, Some(0))), &none), None);
    }

    #[test]
    fn re_deliveries_and_records_past_the_end_are_not_taken() {
        let mut r = reader(&[(0, 10, Some(12))], 100);
        assert_eq!(r.take(0, 9), None, "before the start: a re-delivery after a seek");
        assert_eq!(r.take(0, 10), Some((0, 10, 1)));
        assert_eq!(r.take(0, 10), None, "the same record again");
        assert_eq!(r.take(0, 11), Some((0, 11, 1)));
        assert_eq!(r.take(0, 12), None, "past the end");
        assert_eq!(r.least_epoch(), None, "every partition finished");
        assert_eq!(r.next_to_read(None, &BTreeSet::new()), None);
    }
}
