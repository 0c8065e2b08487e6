//! `kafka_txn_sink`: predictions and dead letters out to Kafka in transactions, each committing
//! its outputs together with the input offsets they answer (exactly-once delivery).
//!
//! **In:** one `Outcome` per input record, from the partitions this worker reads.
//! **Out:** the [`Position`] of each partition as its epochs commit: at epoch 0, where this run
//! started each partition (`SinkSpec::starts`); at epoch e, once e's transaction is committed,
//! the next offset after e's records. The operator keeps a capability for every epoch not yet
//! committed, so its output frontier is the *committed* frontier.
//!
//! **Transactions:** outputs wait in memory until their epoch is complete (the input frontier
//! has passed it). Then one transaction takes every complete epoch: their outputs, and
//! (`send_offsets_to_transaction`) the next offset of each of their partitions for the
//! consumer group. Consumers reading with `isolation.level=read_committed` (librdkafka's
//! default, `dlpipe tail`'s) see each output exactly once: a crash aborts the open transaction,
//! and the restart reads from the committed offsets. The producer's `transactional.id` belongs
//! to the worker, so a restarted worker fences its predecessor (a zombie's commit fails). The
//! commit blocks the worker thread until the broker has the transaction (milliseconds on a
//! local broker): that, and the outputs waiting for their epoch, is the price of exactly-once.
//!
//! **Open epochs** (`SinkSpec::partial_commit_after`): an epoch stays open until every
//! partition of every worker has passed it, which with offset epochs a quiet partition can
//! take for ever. So once an output of an open epoch has waited that long, a transaction takes
//! the outputs of each partition from the oldest record in the [`Backlog`] upwards, as far as
//! every record has its outputs here, with the offset after the last of them. Nothing above a
//! record still in flight is committed (a restart reads from the committed offset). The epoch
//! still retires, and learning still happens, only when it closes: predictions use earlier
//! epochs' classifier, so what is published does not depend on when it was committed.
//!
//! **Refusals:** an output the broker refuses as too large aborts the transaction; it is
//! replaced by a small dead letter of kind `output_too_large` and the transaction is tried
//! again. Any other failure is retried with backoff (a broker restarting, a coordinator
//! moving) for up to `SinkSpec::give_up_after`, then sets `fatal`; a fenced producer sets it
//! at once. A commit that fails retriably is retried as it is, never aborted and redone
//! (it may have succeeded). A transaction that cannot be aborted (a coordinator that came
//! back from a crash without it) is left to a new producer of the same transactional id,
//! whose initialisation fences the old one and aborts what it had open. Nothing is committed
//! past an output that is not in a committed transaction.
//! **Replays:** outcomes of records before a partition's `published` start are not sent
//! (an earlier run's transaction has them); they count for progress and positions, and the
//! offsets a transaction commits never go below that start (a replay committing its own lower
//! offsets would make the next restart publish those records again).

use crate::backlog::{Backlog, SharedBacklog};
use crate::kafka_sink::{is_replay, too_large, MessageInFlight, MessageKind, Outgoing, Report, SinkContext, SinkSpec};
use crate::metrics::SinkMetrics;
use crate::records::{Epoch, Outcome, Position};
use crate::retry::Backoff;
use crate::transactions::{abort_retrying, commit_retrying, is_fenced, is_fenced_or_fatal, TIMEOUT};
use crate::Fatal;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::StreamVec;

struct EpochOutputs {
    hold: Capability<Epoch>,
    outgoing: Vec<Outgoing>,
    /// Highest offset per partition among this epoch's records.
    offsets: BTreeMap<i32, i64>,
}

/// Outputs of open epochs taken out for a transaction before their epochs close, and the
/// offset after the last of them in each partition. Kept until a transaction commits them.
#[derive(Default)]
struct Partial {
    outgoing: Vec<Outgoing>,
    next: BTreeMap<i32, i64>,
}

/// Why a transaction did not commit.
enum Failure {
    /// Retry (after replacing refused outputs).
    Retry(String),
    /// The transaction could not be aborted, for a reason other than fencing (a coordinator
    /// that lost or never had it, after a broker crash): retry with a new producer, whose
    /// `init_transactions` aborts whatever is open under this transactional id.
    Renew(String),
    /// The producer is fenced or broken for good.
    Fatal(String),
}

/// Makes this worker's transactional producer again (initialised: it fences the old one).
pub type RenewProducer = Box<dyn Fn() -> Result<BaseProducer<SinkContext>, String>>;

/// The worker's transactional producer (initialised), and how to make a new one.
pub struct TxnProducer {
    pub producer: BaseProducer<SinkContext>,
    pub renew: RenewProducer,
}

/// What the sink holds between activations: outputs by epoch, the partial transaction staged,
/// the offsets committed so far, and the retry state.
struct TxnState {
    epochs: BTreeMap<Epoch, EpochOutputs>,
    partial: Option<Partial>,
    /// When the oldest output of an open epoch not yet committed arrived.
    open_since: Option<Instant>,
    /// The next offset committed for each partition: no transaction moves it back.
    committed: BTreeMap<i32, i64>,
    published_from: BTreeMap<i32, i64>,
    failing_since: Option<Instant>,
    retry_at: Option<Instant>,
    backoff: Backoff,
    failed: bool,
}

pub fn kafka_txn_sink<'scope, C: ConsumerContext + 'static>(
    outcomes: StreamVec<'scope, Epoch, Outcome>,
    producer: TxnProducer,
    consumer: Arc<BaseConsumer<C>>,
    spec: SinkSpec,
    backlog: SharedBacklog,
    fatal: Fatal,
    mut metrics: SinkMetrics,
) -> StreamVec<'scope, Epoch, Position> {
    let scope = outcomes.scope();
    outcomes.unary_frontier::<CapacityContainerBuilder<Vec<Position>>, _, _, _>(
        Pipeline,
        "KafkaTxnSink",
        move |default_cap, info| {
            let activator = scope.activator_for(info.address);
            let mut starts = Some((default_cap, spec.starts.clone()));
            let mut state = TxnState::new(&spec.starts);
            let TxnProducer { mut producer, renew } = producer;
            move |(input, frontier), output| {
                if let Some((cap, positions)) = starts.take() {
                    output.session(&cap).give_iterator(positions.into_iter());
                }
                input.for_each_stamp(|cap, data| {
                    let Some(cap) = cap.retain_least(0) else { return };
                    let outcomes = data.flat_map(|batch| batch.drain(..));
                    state.receive(cap, outcomes, &spec, &mut metrics, &backlog);
                });
                let pending = state.epochs.values().map(|e| e.outgoing.len()).sum::<usize>()
                    + state.partial.as_ref().map_or(0, |p| p.outgoing.len());
                metrics.unacked.set(pending as i64);
                let complete: Vec<Epoch> =
                    state.epochs.keys().copied().take_while(|e| !frontier.frontier().less_equal(e)).collect();
                if !state.due(&spec, &complete, &backlog.borrow()) {
                    if !state.failed && !state.epochs.is_empty() {
                        activator.activate_after(Duration::from_millis(50));
                    }
                    return;
                }
                let started = Instant::now();
                match transact(&producer, &*consumer, &spec, &mut state, &complete) {
                    Ok(()) => {
                        let delivered: Vec<Report> =
                            std::mem::take(&mut *producer.context().reports.lock().expect("not poisoned"));
                        for report in delivered {
                            report.observe_published(&mut metrics);
                        }
                        for (hold, positions) in state.committed_ok(&complete, &mut backlog.borrow_mut()) {
                            output.session(&hold).give_iterator(positions.into_iter());
                        }
                        tracing::trace!(seconds = started.elapsed().as_secs_f64(), "transaction committed");
                    }
                    Err(Failure::Retry(error)) => {
                        let reports: Vec<Report> =
                            std::mem::take(&mut *producer.context().reports.lock().expect("not poisoned"));
                        if state.replace_refused(reports, &mut metrics) == 0 {
                            if let Err(error) = state.wait_to_retry(&spec, &error) {
                                metrics.failed.inc();
                                *fatal.borrow_mut() = Some(error);
                                return;
                            }
                        }
                    }
                    Err(Failure::Renew(error)) => match renew() {
                        Ok(renewed) => {
                            tracing::warn!(%error, "a transaction could not be aborted; a new producer fenced the old one, retrying");
                            producer = renewed;
                            state.retry_at = Some(Instant::now() + state.backoff.peek());
                        }
                        Err(renew_error) => {
                            metrics.failed.inc();
                            state.failed = true;
                            *fatal.borrow_mut() =
                                Some(format!("{error}; and no new transactional producer could be made: {renew_error}"));
                            return;
                        }
                    },
                    Err(Failure::Fatal(error)) => {
                        metrics.failed.inc();
                        state.failed = true;
                        *fatal.borrow_mut() = Some(error);
                        return;
                    }
                }
                if !state.epochs.is_empty() {
                    activator.activate_after(Duration::from_millis(2));
                }
            }
        },
    )
}

impl TxnState {
    /// Whether a transaction is due now: of the complete epochs, or of the outputs of open
    /// epochs that have waited `spec.partial_commit_after` (staged here); never while the sink
    /// has failed or waits to retry.
    fn due(&mut self, spec: &SinkSpec, complete: &[Epoch], backlog: &Backlog) -> bool {
        if self.failed || self.retry_at.is_some_and(|at| Instant::now() < at) {
            return false;
        }
        let partial_due = spec
            .partial_commit_after
            .is_some_and(|after| complete.is_empty() && self.open_since.is_some_and(|since| since.elapsed() >= after));
        if self.partial.is_none() && partial_due {
            self.stage_partial(backlog, complete);
            if self.partial.is_none() {
                // Nothing can go yet (each waits for an earlier record): look again later.
                self.open_since = Some(Instant::now());
            }
        }
        !complete.is_empty() || self.partial.is_some()
    }

    /// Encodes the outcomes of the epoch `cap` holds into its outputs (replays are not sent).
    fn receive(
        &mut self,
        cap: Capability<Epoch>,
        outcomes: impl Iterator<Item = Outcome>,
        spec: &SinkSpec,
        metrics: &mut SinkMetrics,
        backlog: &SharedBacklog,
    ) {
        let epoch = *cap.time();
        let outputs = self.epochs.entry(epoch).or_insert_with(|| EpochOutputs {
            hold: cap,
            outgoing: Vec::new(),
            offsets: BTreeMap::new(),
        });
        for outcome in outcomes {
            if is_replay(&outcome, &mut outputs.offsets, &self.published_from, backlog) {
                continue;
            }
            Outgoing::encode(epoch, outcome, spec, metrics, |message| outputs.outgoing.push(message));
        }
        self.open_since.get_or_insert_with(Instant::now);
    }

    fn new(starts: &[Position]) -> TxnState {
        TxnState {
            epochs: BTreeMap::new(),
            partial: None,
            open_since: None,
            committed: BTreeMap::new(),
            published_from: starts.iter().map(|s| (s.partition, s.published)).collect(),
            failing_since: None,
            retry_at: None,
            backoff: Backoff::kafka(),
            failed: false,
        }
    }

    /// Takes out of the open epochs every output that may commit before its epoch closes:
    /// in each partition, those of the records from the least offset in the backlog upwards,
    /// as far as every record has its outputs here (the `complete` epochs commit in the same
    /// transaction). Above a record still in flight nothing goes: a restart reads from the
    /// committed offset, and would publish again what was committed above it.
    fn stage_partial(&mut self, backlog: &Backlog, complete: &[Epoch]) {
        let here: BTreeSet<(i32, i64)> = self
            .epochs
            .values()
            .flat_map(|e| e.outgoing.iter().map(|o| &o.sent))
            .filter(|s| s.is_record_output())
            .map(|s| (s.partition, s.offset))
            .collect();
        let mut partial = Partial { outgoing: Vec::new(), next: committable(backlog, &here) };
        for (epoch, outputs) in self.epochs.iter_mut().filter(|(e, _)| !complete.contains(e)) {
            let (now, later) = std::mem::take(&mut outputs.outgoing).into_iter().partition(|o: &Outgoing| {
                o.sent.kind != MessageKind::FeedbackDeadLetter
                    && partial.next.get(&o.sent.partition).is_some_and(|next| o.sent.offset < *next)
            });
            outputs.outgoing = later;
            tracing::trace!(epoch, outputs = now.len(), "outputs of an open epoch staged for a transaction");
            partial.outgoing.extend(now);
        }
        if !partial.outgoing.is_empty() {
            self.partial = Some(partial);
        }
    }

    /// The next offset of each partition that a transaction of the staged partial outputs and
    /// the `complete` epochs commits: never below where publishing started (a replay must not
    /// move the group back), nor below what an earlier transaction committed.
    fn next_offsets(&self, complete: &[Epoch]) -> BTreeMap<i32, i64> {
        let mut next: BTreeMap<i32, i64> = self.partial.as_ref().map(|p| p.next.clone()).unwrap_or_default();
        for outputs in complete.iter().map(|e| &self.epochs[e]) {
            for (partition, offset) in &outputs.offsets {
                let at = next.entry(*partition).or_insert(offset + 1);
                *at = (*at).max(offset + 1);
            }
        }
        for (partition, at) in next.iter_mut() {
            let floor = self.published_from.get(partition).into_iter().chain(self.committed.get(partition)).max();
            *at = (*at).max(floor.copied().unwrap_or(0));
        }
        next
    }

    /// A transaction of the staged outputs and the `complete` epochs committed: their records
    /// leave the backlog, the retry state starts over, and each complete epoch retires with
    /// its partitions' positions (returned with the capability to give them at).
    fn committed_ok(&mut self, complete: &[Epoch], backlog: &mut Backlog) -> Vec<(Capability<Epoch>, Vec<Position>)> {
        self.failing_since = None;
        self.retry_at = None;
        self.backoff.reset();
        for sent in self.partial.take().into_iter().flat_map(|p| p.outgoing).map(|o| o.sent) {
            if sent.is_record_output() {
                backlog.done(sent.partition, sent.offset);
            }
        }
        let mut retired = Vec::new();
        for epoch in complete {
            let outputs = self.epochs.remove(epoch).expect("a complete epoch");
            for sent in outputs.outgoing.iter().map(|o| &o.sent).filter(|s| s.is_record_output()) {
                backlog.done(sent.partition, sent.offset);
            }
            let positions = outputs.offsets.into_iter().map(|(partition, offset)| {
                let published = self.published_from.get(&partition).map_or(offset + 1, |from| (offset + 1).max(*from));
                Position { partition, learned: offset + 1, published }
            });
            retired.push((outputs.hold, positions.collect()));
        }
        let open = self.epochs.values().any(|e| !e.outgoing.is_empty());
        self.open_since = open.then(Instant::now);
        retired
    }

    /// Replaces each output the broker refused for its size with its small dead letter;
    /// returns how many.
    fn replace_refused(&mut self, reports: Vec<Report>, metrics: &mut SinkMetrics) -> usize {
        let mut replaced = 0;
        for report in reports {
            let Err((code, message)) = report.outcome else { continue };
            if !too_large(code) || report.message.replacement {
                continue;
            }
            let m = report.message;
            let staged = self.partial.iter_mut().flat_map(|p| p.outgoing.iter_mut());
            let mut slots = staged.chain(self.epochs.get_mut(&m.epoch).into_iter().flat_map(|e| e.outgoing.iter_mut()));
            if let Some(slot) = slots.find(|o| {
                (o.sent.partition, o.sent.offset, o.sent.kind) == (m.partition, m.offset, m.kind) && !o.sent.replacement
            }) {
                tracing::warn!(id = %crate::records::truncate(&m.key, 64), partition = m.partition, offset = m.offset, message, "the broker refused an output as too large; a small dead letter replaces it");
                *slot = m.replaced(&message);
                metrics.dead_lettered.with("output_too_large").inc();
                replaced += 1;
            }
        }
        if replaced > 0 {
            self.retry_at = None;
        }
        replaced
    }

    /// Schedules the next try of a failed transaction with backoff; the error that stops the
    /// worker once it has failed for longer than `spec.give_up_after`.
    fn wait_to_retry(&mut self, spec: &SinkSpec, error: &str) -> Result<(), String> {
        let since = *self.failing_since.get_or_insert_with(Instant::now);
        if since.elapsed() > spec.give_up_after {
            self.failed = true;
            let seconds = since.elapsed().as_secs_f64();
            return Err(format!("the outputs' transaction kept failing for {seconds:.0} s: {error}"));
        }
        let pause = self.backoff.next_pause();
        tracing::warn!(%error, retry_in = ?pause, "a transaction of outputs failed; retrying");
        self.retry_at = Some(Instant::now() + pause);
        Ok(())
    }
}

/// Per partition, the offset after the longest run of records, from the least offset in the
/// `backlog` upwards, whose outputs are all `here`: what may be committed before the epochs
/// close. A partition whose least record in flight has no output here is absent.
fn committable(backlog: &Backlog, here: &BTreeSet<(i32, i64)>) -> BTreeMap<i32, i64> {
    let partitions: BTreeSet<i32> = here.iter().map(|(partition, _)| *partition).collect();
    partitions
        .into_iter()
        .filter_map(|partition| {
            let last = backlog.offsets(partition).take_while(|offset| here.contains(&(partition, *offset))).last();
            last.map(|last| (partition, last + 1))
        })
        .collect()
}

/// One transaction: the staged partial outputs and those of the `complete` epochs, and the
/// next offsets of their partitions for the group. Aborted on any failure.
fn transact<C: ConsumerContext>(
    producer: &BaseProducer<SinkContext>,
    consumer: &BaseConsumer<C>,
    spec: &SinkSpec,
    state: &mut TxnState,
    complete: &[Epoch],
) -> Result<(), Failure> {
    producer.begin_transaction().map_err(|e| classify("cannot begin a transaction", e))?;
    let next = state.next_offsets(complete);
    let staged = state.partial.iter_mut().flat_map(|p| p.outgoing.iter_mut());
    let epochs = state.epochs.iter_mut().filter(|(e, _)| complete.contains(e));
    let slots = staged.chain(epochs.flat_map(|(_, outputs)| outputs.outgoing.iter_mut()));
    let result = send_and_commit(producer, consumer, spec, slots, &next);
    match &result {
        Ok(()) => state.committed.extend(next),
        Err(Failure::Retry(error)) => {
            // Nothing of it becomes visible. A producer that cannot abort cannot go on. The
            // reports of the purged messages are taken from the context by the caller.
            if let Err(abort) = abort_retrying(producer, spec.give_up_after) {
                let error = format!("{error}; aborting the transaction failed too: {abort}");
                // A producer whose abort failed is broken (librdkafka raises INVALID_TXN_STATE
                // from a restarted coordinator as fatal), but unless it was fenced, a new one
                // may go on: nothing of this transaction was committed, and its
                // initialisation aborts it.
                return Err(if is_fenced(&abort) { Failure::Fatal(error) } else { Failure::Renew(error) });
            }
        }
        Err(_) => {}
    }
    result
}

fn send_and_commit<'a, C: ConsumerContext>(
    producer: &BaseProducer<SinkContext>,
    consumer: &BaseConsumer<C>,
    spec: &SinkSpec,
    slots: impl Iterator<Item = &'a mut Outgoing>,
    next: &BTreeMap<i32, i64>,
) -> Result<(), Failure> {
    for slot in slots {
        loop {
            let sent = slot.sent.clone();
            let topic = sent.topic(spec);
            let key = sent.key.clone();
            let delivery = Box::new(MessageInFlight { at: Instant::now(), message: sent });
            let record = BaseRecord::with_opaque_to(topic, delivery).key(&key).payload(&slot.payload);
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    producer.poll(Duration::from_millis(10));
                }
                Err((error, record)) => {
                    let message = record.delivery_opaque.message;
                    if too_large(error.rdkafka_error_code()) && !message.replacement {
                        *slot = message.replaced(&error.to_string());
                        continue;
                    }
                    return Err(Failure::Retry(format!(
                        "cannot produce the output of {} to {topic}: {error}",
                        message.source()
                    )));
                }
            }
        }
    }
    let mut offsets = TopicPartitionList::new();
    for (partition, offset) in next {
        offsets.add_partition_offset(&spec.input_topic, *partition, Offset::Offset(*offset)).expect("valid offset");
    }
    // Epochs of feedback dead letters alone move no input offset.
    if !next.is_empty() {
        let group = consumer
            .group_metadata()
            .ok_or_else(|| Failure::Fatal("the input consumer has no group metadata".into()))?;
        producer
            .send_offsets_to_transaction(&offsets, &group, TIMEOUT)
            .map_err(|e| classify("cannot add the input offsets to the transaction", e))?;
    }
    commit_retrying(producer, spec.give_up_after).map_err(|e| classify("cannot commit the outputs' transaction", e))?;
    producer.poll(Duration::ZERO);
    Ok(())
}

/// A fenced producer (another instance of this worker took over) or a fatal producer error
/// ends the worker; anything else is worth another transaction.
fn classify(what: &str, error: KafkaError) -> Failure {
    if is_fenced_or_fatal(&error) {
        Failure::Fatal(format!(
            "{what}: {error}. Another instance of this worker (a later `dlpipe run` of the same group) has fenced it"
        ))
    } else {
        Failure::Retry(format!("{what}: {error}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_each_partition_up_to_its_first_record_in_flight_without_outputs() {
        let mut backlog = Backlog::default();
        // Partition 0: offsets 10, 11, 13 (12 is a transaction marker, never read), 14.
        // Partition 1: 3 and 4. Partition 2: 7.
        for (partition, offset) in [(0, 10), (0, 11), (0, 13), (0, 14), (1, 3), (1, 4), (2, 7)] {
            backlog.read(partition, offset, 0);
        }
        // Outputs are here for 0:10, 0:11, 0:13 (not 0:14), 1:4 (not 1:3: a slow fetch), 2:7.
        let here: BTreeSet<(i32, i64)> = [(0, 10), (0, 11), (0, 13), (1, 4), (2, 7)].into_iter().collect();
        let next = committable(&backlog, &here);
        // 0: up to 13 (the gap of the marker does not stop it), so 14; 1: nothing, its first
        // record is in flight (committing 5 would skip 3 on a restart); 2: all of it.
        assert_eq!(next, BTreeMap::from([(0, 14), (2, 8)]));
        // Once 1:3's output comes, partition 1 goes too.
        let here: BTreeSet<(i32, i64)> = here.into_iter().chain([(1, 3)]).collect();
        assert_eq!(committable(&backlog, &here)[&1], 5);
    }
}
