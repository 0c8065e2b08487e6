//! `kafka_sink`: predictions and dead letters out to Kafka, and input offsets committed once
//! everything below them is acknowledged.
//!
//! **In:** one `Outcome` per input record (a prediction or a dead letter), from the partitions
//! this worker reads. **Out:** the [`Position`] of each partition as its epochs retire: at
//! epoch 0, where this run started each partition (`SinkSpec::starts`); at epoch e, once e
//! and every epoch before it are acknowledged and the input frontier has passed them, the
//! next offset after e's records. The operator keeps a capability for every epoch that still
//! has messages unacknowledged by the broker, so its output frontier is the *acknowledged*
//! frontier: a probe on it says which epochs are fully published, and the dataflow only
//! completes when every output is acknowledged.
//! **Commits:** with a `committer`, the next offsets of retired epochs are committed for the
//! consumer group (at-least-once: a crash replays from the last commit, never skips). Without
//! one, the caller commits from the positions (the checkpoint does, so that the group's
//! offsets never run ahead of the learner's checkpoint).
//! **Replays:** outcomes of records before a partition's `published` start were published by
//! an earlier run (a restart replays them only for the learner): they count for progress and
//! positions, and are not sent again.
//!
//! **Refusals:** an output the producer or the broker refuses as too large (a topic's
//! `max.message.bytes` below what a record produced) is replaced, in its epoch, by a small
//! dead letter of kind `output_too_large`; the stream goes on. Any other refusal, or a
//! replacement refused too, sets `fatal`, and from then on nothing is committed: the worker
//! stops, and the refused record is read again after a restart. No offset is ever committed
//! past an output that was not acknowledged.
//!
//! The producer is polled with a zero timeout; delivery reports arrive in those polls.
//! **Metrics:** dead letters by kind as they are handed to the producer; acknowledged messages
//! by topic; the time from send to acknowledgement; for predictions, the time from the input
//! record's Kafka timestamp to the acknowledgement (end-to-end latency).

use crate::backlog::SharedBacklog;
use crate::metrics::SinkMetrics;
use crate::records::{now_ms, DeadLetter, Epoch, FeaturesModel, Outcome, Position};
use crate::retry::{is_retriable_code, Backoff};
use crate::Fatal;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::StreamVec;

/// One message for the producer: a prediction, a dead letter or a record's features, encoded.
pub(crate) struct Outgoing {
    pub(crate) sent: Sent,
    pub(crate) payload: String,
}

impl Outgoing {
    /// Encodes one outcome of `epoch` as its messages: the prediction (and, with a features
    /// topic, the record's features) or the dead letter. Counts dead letters by kind.
    pub(crate) fn encode(
        epoch: Epoch,
        outcome: Outcome,
        spec: &SinkSpec,
        metrics: &mut SinkMetrics,
        mut give: impl FnMut(Outgoing),
    ) {
        let (partition, offset) = match &outcome {
            Outcome::Predicted(p) => (p.record.partition, p.record.offset),
            Outcome::Dead(d) | Outcome::FeedbackDead(d) => (d.partition, d.offset),
        };
        let sent = |kind, key: &str| Sent { epoch, kind, key: key.to_owned(), partition, offset, replacement: false };
        let input = outcome.input_position().is_some();
        match outcome {
            Outcome::Predicted(p) => {
                let ts = p.record.kafka_ts_ms;
                give(Outgoing {
                    sent: sent(MessageKind::Prediction { input_ts_ms: ts }, &p.record.id),
                    payload: p.to_json(),
                });
                if let Some(features) = &spec.features {
                    let payload = p.features_json(&features.model);
                    give(Outgoing { sent: sent(MessageKind::Features, &p.record.id), payload });
                }
            }
            Outcome::Dead(d) | Outcome::FeedbackDead(d) => {
                metrics.dead_lettered.with(&d.error_kind).inc();
                let kind = if input { MessageKind::DeadLetter } else { MessageKind::FeedbackDeadLetter };
                give(Outgoing { sent: sent(kind, d.id.as_deref().unwrap_or_default()), payload: d.to_json() });
            }
        }
    }
}

/// Records an input outcome's offset among its epoch's `offsets` (the highest per partition),
/// and says whether it is a replay: a record before its partition's `published_from`, which an
/// earlier run published and this one reads again for the learner only. A replay is not sent;
/// its backlog slot is freed here. Feedback dead letters have no input offset and are never
/// replays.
pub(crate) fn is_replay(
    outcome: &Outcome,
    offsets: &mut BTreeMap<i32, i64>,
    published_from: &BTreeMap<i32, i64>,
    backlog: &SharedBacklog,
) -> bool {
    let Some((partition, offset)) = outcome.input_position() else { return false };
    let max = offsets.entry(partition).or_insert(offset);
    *max = (*max).max(offset);
    let replay = published_from.get(&partition).is_some_and(|from| offset < *from);
    if replay {
        backlog.borrow_mut().done(partition, offset);
    }
    replay
}

/// Which output a message is, and so its topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MessageKind {
    /// With the input record's Kafka timestamp, for the end-to-end latency.
    Prediction {
        input_ts_ms: Option<i64>,
    },
    DeadLetter,
    /// A second message of a predicted record: its features.
    Features,
    /// A feedback record's dead letter (`partition` and `offset` are the feedback's).
    FeedbackDeadLetter,
}

/// What the sink needs to know of a message again when its delivery report comes back (the
/// payload stays behind: the producer has copied it).
#[derive(Clone)]
pub(crate) struct Sent {
    pub(crate) epoch: Epoch,
    pub(crate) kind: MessageKind,
    pub(crate) key: String,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    /// A small dead letter standing in for an output the broker refused as too large.
    pub(crate) replacement: bool,
}

impl Sent {
    /// The topic this message goes to.
    pub(crate) fn topic<'a>(&self, spec: &'a SinkSpec) -> &'a str {
        match self.kind {
            _ if self.replacement => &spec.dead_letter_topic,
            MessageKind::Prediction { .. } => &spec.predictions_topic,
            MessageKind::DeadLetter | MessageKind::FeedbackDeadLetter => &spec.dead_letter_topic,
            MessageKind::Features => {
                &spec.features.as_ref().expect("features are only sent with a features topic").topic
            }
        }
    }

    /// What this message answers, for errors: "record P:O" (input) or "feedback P:O".
    pub(crate) fn source(&self) -> String {
        let what = if self.kind == MessageKind::FeedbackDeadLetter { "feedback" } else { "record" };
        format!("{what} {}:{}", self.partition, self.offset)
    }

    /// Whether this is an input record's one prediction or dead letter (what the backlog
    /// counts), rather than its features or a feedback record's dead letter.
    pub(crate) fn is_record_output(&self) -> bool {
        matches!(self.kind, MessageKind::Prediction { .. } | MessageKind::DeadLetter)
    }

    /// The small dead letter that replaces this message when the broker refuses its size
    /// (for features: the record has its prediction, and this says its features are missing).
    pub(crate) fn replaced(&self, error: &str) -> Outgoing {
        let what = if self.kind == MessageKind::Features { "features" } else { "output" };
        let dead = DeadLetter::output_too_large(&self.key, self.partition, self.offset, what, error);
        let sent = Sent {
            epoch: self.epoch,
            // A replaced features message or feedback dead letter still is not an input
            // record's output (it goes to the dead-letter topic as every replacement does).
            kind: if self.is_record_output() { MessageKind::DeadLetter } else { self.kind },
            key: dead.id.clone().unwrap_or_default(),
            partition: self.partition,
            offset: self.offset,
            replacement: true,
        };
        Outgoing { sent, payload: dead.to_json() }
    }
}

/// What the sink attaches to each message it sends, and gets back with its delivery report.
pub struct MessageInFlight {
    pub(crate) at: Instant,
    pub(crate) message: Sent,
}

/// One delivery report.
pub(crate) struct Report {
    /// Why the message was not delivered, if it was not: the error code and the message.
    pub(crate) outcome: Result<(), (Option<RDKafkaErrorCode>, String)>,
    pub(crate) topic: String,
    /// Seconds from send to acknowledgement.
    pub(crate) produce_seconds: f64,
    pub(crate) message: Sent,
}

impl Report {
    /// Counts a delivered message: by topic, its produce time and, for a prediction, the
    /// end-to-end latency from its input's Kafka timestamp.
    pub(crate) fn observe_published(&self, metrics: &mut SinkMetrics) {
        metrics.published.with(&self.topic).inc();
        metrics.produce_seconds.observe(self.produce_seconds);
        if let MessageKind::Prediction { input_ts_ms: Some(ts) } = self.message.kind {
            metrics.end_to_end_seconds.observe((now_ms() - ts).max(0) as f64 / 1000.0);
        }
    }
}

/// Delivery reports, collected by the producer's callbacks during `poll`.
#[derive(Clone, Default)]
pub struct SinkContext {
    pub(crate) reports: Arc<Mutex<Vec<Report>>>,
}

impl ClientContext for SinkContext {}

impl ProducerContext for SinkContext {
    type DeliveryOpaque = Box<MessageInFlight>;

    fn delivery(&self, result: &DeliveryResult<'_>, delivery: Box<MessageInFlight>) {
        let (outcome, topic) = match result {
            Ok(message) => (Ok(()), message.topic().to_owned()),
            Err((error, message)) => (
                Err((error.rdkafka_error_code(), format!("delivery to topic {} failed: {error}", message.topic()))),
                message.topic().to_owned(),
            ),
        };
        let MessageInFlight { at, message } = *delivery;
        let report = Report { outcome, topic, produce_seconds: at.elapsed().as_secs_f64(), message };
        self.reports.lock().expect("not poisoned").push(report);
    }
}

/// Whether the broker (or the producer's own check) refused a message for its size.
pub(crate) fn too_large(code: Option<RDKafkaErrorCode>) -> bool {
    matches!(
        code,
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::MessageBatchTooLarge
        )
    )
}

/// Topics the sink writes and commits for.
#[derive(Clone, Debug)]
pub struct SinkSpec {
    pub input_topic: String,
    pub predictions_topic: String,
    pub dead_letter_topic: String,
    /// Where each predicted record's features go too, if anywhere.
    pub features: Option<FeaturesOutput>,
    /// Where this run starts each of the worker's partitions, emitted at epoch 0.
    pub starts: Vec<Position>,
    /// How long the transactional sink retries a failing transaction before it stops the
    /// worker (the at-least-once sink's producer retries each message itself).
    pub give_up_after: Duration,
    /// Exactly-once: once an output of an epoch that is still open has waited this long, the
    /// outputs that can be (every record before them in their partition is published) are
    /// committed in a transaction of their own, with their offsets, before the epoch closes
    /// (a quiet partition holds an offset epoch open). `None`: only whole epochs.
    pub partial_commit_after: Option<Duration>,
}

/// The features topic: one message per predicted record, after its prediction.
#[derive(Clone, Debug)]
pub struct FeaturesOutput {
    pub topic: String,
    pub model: FeaturesModel,
}

struct EpochState {
    /// Keeps this epoch open on the output until it is acknowledged; its positions are given
    /// at it when it retires.
    hold: Capability<Epoch>,
    unacked: usize,
    /// Highest offset per partition among this epoch's records.
    offsets: BTreeMap<i32, i64>,
}

pub fn kafka_sink<'scope, C: ConsumerContext + 'static>(
    outcomes: StreamVec<'scope, Epoch, Outcome>,
    producer: BaseProducer<SinkContext>,
    committer: Option<Arc<BaseConsumer<C>>>,
    spec: SinkSpec,
    backlog: SharedBacklog,
    fatal: Fatal,
    mut metrics: SinkMetrics,
) -> StreamVec<'scope, Epoch, Position> {
    let scope = outcomes.scope();
    outcomes.unary_frontier::<CapacityContainerBuilder<Vec<Position>>, _, _, _>(
        Pipeline,
        "KafkaSink",
        move |default_cap, info| {
            let activator = scope.activator_for(info.address);
            let reports = Arc::clone(&producer.context().reports);
            let mut epochs: BTreeMap<Epoch, EpochState> = BTreeMap::new();
            // Encoded messages not yet accepted by the producer's queue:
            // (epoch, the input's Kafka timestamp for a prediction or None for a dead letter, key, payload).
            let mut unsent: VecDeque<Outgoing> = VecDeque::new();
            let mut unacked = 0i64;
            // Set once a message is refused for good: from then on nothing is committed (the
            // worker stops on `fatal`), so the refused record is read again after a restart.
            let mut failed = false;
            let mut starts = Some((default_cap, spec.starts.clone()));
            let published_from: BTreeMap<i32, i64> = spec.starts.iter().map(|s| (s.partition, s.published)).collect();
            move |(input, frontier), output| {
                if let Some((cap, positions)) = starts.take() {
                    output.session(&cap).give_iterator(positions.into_iter());
                }
                input.for_each_stamp(|cap, data| {
                    let Some(cap) = cap.retain_least(0) else { return };
                    let epoch = *cap.time();
                    let state = epochs.entry(epoch).or_insert_with(|| EpochState {
                        hold: cap,
                        unacked: 0,
                        offsets: BTreeMap::new(),
                    });
                    for batch in data {
                        for outcome in batch.drain(..) {
                            if is_replay(&outcome, &mut state.offsets, &published_from, &backlog) {
                                continue;
                            }
                            Outgoing::encode(epoch, outcome, &spec, &mut metrics, |message| {
                                state.unacked += 1;
                                unacked += 1;
                                unsent.push_back(message);
                            });
                        }
                    }
                });
                if let Err(error) = send(&producer, &mut unsent, &spec, &mut metrics) {
                    failed = true;
                    *fatal.borrow_mut() = Some(error);
                    return;
                }
                producer.poll(Duration::ZERO);
                let delivered: Vec<Report> = std::mem::take(&mut *reports.lock().expect("not poisoned"));
                for report in delivered {
                    match acknowledge(report, &mut epochs, &mut unsent, &backlog, &mut metrics) {
                        Ok(true) => unacked -= 1,
                        Ok(false) => {}
                        Err(error) => {
                            // The epoch stays unacknowledged, and `failed` stops all commits.
                            failed = true;
                            *fatal.borrow_mut() = Some(error);
                        }
                    }
                }
                metrics.unacked.set(unacked);
                // Retire epochs from the oldest while each is complete: fully acknowledged, and
                // no more records for it can arrive.
                let mut commit: BTreeMap<i32, i64> = BTreeMap::new();
                while let Some(entry) = epochs.first_entry().filter(|_| !failed) {
                    if entry.get().unacked > 0 || frontier.frontier().less_equal(entry.key()) {
                        break;
                    }
                    let state = entry.remove();
                    let mut session = output.session(&state.hold);
                    for (partition, offset) in state.offsets {
                        session.give(Position { partition, learned: offset + 1, published: offset + 1 });
                        let max = commit.entry(partition).or_insert(offset);
                        *max = (*max).max(offset);
                    }
                }
                if let (Some(consumer), false) = (&committer, commit.is_empty()) {
                    let last = frontier.frontier().is_empty() && epochs.is_empty();
                    commit_offsets(consumer, &spec.input_topic, &commit, last);
                }
                if !epochs.is_empty() || !unsent.is_empty() {
                    activator.activate_after(Duration::from_millis(2));
                }
            }
        },
    )
}

/// Takes one delivery report: a delivered message is acknowledged in its epoch (and its record
/// leaves the backlog): `true`; one the broker refused as too large is replaced, in its epoch,
/// by its small dead letter, which stays unacknowledged until that is delivered: `false`. The
/// error that stops the worker, for any other failure.
fn acknowledge(
    report: Report,
    epochs: &mut BTreeMap<Epoch, EpochState>,
    unsent: &mut VecDeque<Outgoing>,
    backlog: &SharedBacklog,
    metrics: &mut SinkMetrics,
) -> Result<bool, String> {
    match &report.outcome {
        Ok(()) => report.observe_published(metrics),
        Err((code, error)) if too_large(*code) && !report.message.replacement => {
            // The broker's limit (max.message.bytes of the topic) is below the producer's.
            let m = &report.message;
            tracing::warn!(id = %crate::records::truncate(&m.key, 64), partition = m.partition, offset = m.offset, error, "the broker refused an output as too large; a small dead letter replaces it");
            unsent.push_back(report.message.replaced(error));
            metrics.dead_lettered.with("output_too_large").inc();
            return Ok(false);
        }
        Err((_, error)) => {
            metrics.failed.inc();
            return Err(format!("the output of {} was not delivered: {error}", report.message.source()));
        }
    }
    if let Some(state) = epochs.get_mut(&report.message.epoch) {
        state.unacked -= 1;
    }
    if report.message.is_record_output() {
        backlog.borrow_mut().done(report.message.partition, report.message.offset);
    }
    Ok(true)
}

/// Hands the `unsent` messages to the producer until its queue is full; an output the
/// producer refuses as too large is replaced by its small dead letter. The error that stops
/// the worker, for any other refusal.
fn send(
    producer: &BaseProducer<SinkContext>,
    unsent: &mut VecDeque<Outgoing>,
    spec: &SinkSpec,
    metrics: &mut SinkMetrics,
) -> Result<(), String> {
    while let Some(Outgoing { sent, payload }) = unsent.pop_front() {
        let topic = sent.topic(spec);
        // The key is an id of at most 1 KiB; the payload is only borrowed.
        let key = sent.key.clone();
        let delivery = Box::new(MessageInFlight { at: Instant::now(), message: sent });
        let record = BaseRecord::with_opaque_to(topic, delivery).key(&key).payload(&payload);
        match producer.send(record) {
            Ok(()) => {}
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), record)) => {
                let sent = record.delivery_opaque.message;
                unsent.push_front(Outgoing { sent, payload });
                break;
            }
            Err((error, record)) => {
                let message = record.delivery_opaque.message;
                if too_large(error.rdkafka_error_code()) && !message.replacement {
                    tracing::warn!(id = %crate::records::truncate(&message.key, 64), partition = message.partition, offset = message.offset, %error, "an output is larger than the producer accepts; a small dead letter replaces it");
                    unsent.push_front(message.replaced(&error.to_string()));
                    metrics.dead_lettered.with("output_too_large").inc();
                    continue;
                }
                return Err(format!("cannot produce the output of {} to {topic}: {error}", message.source()));
            }
        }
    }
    Ok(())
}

/// Commits the offset after each partition's highest retired `commit` offset for the group:
/// asynchronously, or (`last`: nothing else will commit after it) synchronously, waiting out a
/// coordinator that moves or loads meanwhile.
fn commit_offsets<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    commit: &BTreeMap<i32, i64>,
    last: bool,
) {
    let mut list = TopicPartitionList::new();
    for (partition, offset) in commit {
        list.add_partition_offset(topic, *partition, Offset::Offset(offset + 1)).expect("valid offset");
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
