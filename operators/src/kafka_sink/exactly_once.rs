//! Exactly-once delivery: outputs and the input offsets they answer commit together in Kafka
//! transactions.
//!
//! **Transactions:** outputs wait in the ledger until their epoch is closed; then one
//! transaction takes every closed epoch's outputs and the next offset of each of their
//! partitions for the group. A `read_committed` consumer sees each output once: a crash
//! aborts the open transaction, and the restart reads from the committed offsets. The
//! `transactional.id` is the worker's, so a restarted worker fences its predecessor. The
//! commit blocks the worker thread for the broker's round trip: the price of exactly-once.
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
//! at once, as an expired transaction does (the brokers were away past
//! `SinkSpec::transaction_timeout` and aborted it: the process exits for a restart). A commit
//! that fails retriably is retried as it is, never aborted and redone (it may have succeeded).
//! A transaction that cannot be aborted (a coordinator that came back from a crash without it)
//! is left to a new producer of the same transactional id, whose initialisation fences the old
//! one and aborts what it had open. Nothing is committed past an output that is not in a
//! committed transaction.
//! **Replays:** outcomes of records before a partition's `published` start are not sent
//! (an earlier run's transaction has them); they count for progress and positions, and the
//! offsets a transaction commits never go below that start (a replay committing its own lower
//! offsets would make the next restart publish those records again).

use super::ledger::Ledger;
use super::messages::{too_large, MessageInFlight, MessageKind, Outgoing, Report, SinkContext};
use super::{SinkSpec, Step};
use crate::backlog::Backlog;
use crate::error::OperatorError;
use crate::metrics::SinkMetrics;
use crate::records::Epoch;
use crate::retry::Backoff;
use crate::transactions::{
    abort_retrying, bounded, commit_retrying, is_fenced, is_fenced_or_fatal, outlived, outlived_message, TIMEOUT,
};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    /// The broker aborted the transaction, open past `transaction.timeout.ms` ([`outlived`]).
    Expired(String),
}

/// Makes this worker's transactional producer again (initialised: it fences the old one).
pub type RenewProducer = Box<dyn Fn() -> Result<BaseProducer<SinkContext>, Box<dyn std::error::Error>>>;

/// The worker's transactional producer (initialised), and how to make a new one.
pub struct TxnProducer {
    pub producer: BaseProducer<SinkContext>,
    pub renew: RenewProducer,
}

/// What exactly-once delivery holds besides the ledger: the producer, the partial
/// transaction staged, the offsets committed so far, and the retry state.
pub(crate) struct ExactlyOnce<C: ConsumerContext> {
    producer: TxnProducer,
    consumer: Arc<BaseConsumer<C>>,
    partial: Option<Partial>,
    /// When the oldest output of an open epoch not yet committed arrived.
    open_since: Option<Instant>,
    /// The next offset committed for each partition: no transaction moves it back.
    committed: BTreeMap<i32, i64>,
    /// Per partition, where this run starts publishing: no transaction commits below it.
    published_from: BTreeMap<i32, i64>,
    failing_since: Option<Instant>,
    retry_at: Option<Instant>,
    backoff: Backoff,
}

impl<C: ConsumerContext> ExactlyOnce<C> {
    pub(crate) fn new(producer: TxnProducer, consumer: Arc<BaseConsumer<C>>, spec: &SinkSpec) -> ExactlyOnce<C> {
        ExactlyOnce {
            producer,
            consumer,
            partial: None,
            open_since: None,
            committed: BTreeMap::new(),
            published_from: spec.starts.iter().map(|s| (s.partition, s.published)).collect(),
            failing_since: None,
            retry_at: None,
            backoff: Backoff::kafka(),
        }
    }

    /// Commits, when one is due, a transaction of the closed epochs (the input has passed
    /// them: `open` is false) and of the outputs of open epochs that may go early; retires
    /// the closed epochs once it commits.
    pub(crate) fn step<H>(
        &mut self,
        ledger: &mut Ledger<H>,
        open: impl Fn(&Epoch) -> bool,
        spec: &SinkSpec,
        backlog: &mut Backlog,
        metrics: &mut SinkMetrics,
    ) -> Result<Step<H>, OperatorError> {
        let staged = self.partial.as_ref().map_or(0, |p| p.outgoing.len());
        metrics.unacked.set((ledger.waiting() + staged) as i64);
        if ledger.waiting() > 0 {
            self.open_since.get_or_insert_with(Instant::now);
        }
        let complete = ledger.closed(open);
        let busy = (!ledger.epochs.is_empty()).then_some(Duration::from_millis(50));
        if !self.due(spec, &complete, ledger, backlog) {
            return Ok(Step { retired: Vec::new(), again: busy });
        }
        let started = Instant::now();
        let mut retired = Vec::new();
        match self.transact(ledger, spec, &complete) {
            Ok(()) => {
                for report in self.take_reports() {
                    report.observe_published(metrics);
                }
                retired = self.committed_ok(ledger, &complete, backlog);
                tracing::trace!(seconds = started.elapsed().as_secs_f64(), "transaction committed");
            }
            Err(Failure::Retry(error)) => {
                let reports = self.take_reports();
                if self.replace_refused(ledger, reports, metrics) == 0 {
                    self.wait_to_retry(spec, error).inspect_err(|_| metrics.failed.inc())?;
                }
            }
            Err(Failure::Renew(error)) => {
                let renewed = (self.producer.renew)().map_err(|renew| {
                    metrics.failed.inc();
                    OperatorError::Transaction(format!(
                        "{error}; and no new transactional producer could be made: {renew}"
                    ))
                })?;
                tracing::warn!(%error, "a transaction could not be aborted; a new producer fenced the old one, retrying");
                self.producer.producer = renewed;
                self.retry_at = Some(Instant::now() + self.backoff.peek());
            }
            Err(Failure::Fatal(error)) => {
                metrics.failed.inc();
                return Err(OperatorError::Transaction(error));
            }
            Err(Failure::Expired(error)) => {
                metrics.failed.inc();
                return Err(OperatorError::TransactionExpired(error));
            }
        }
        let again = (!ledger.epochs.is_empty()).then_some(Duration::from_millis(2));
        Ok(Step { retired, again })
    }

    /// The delivery reports the producer's callbacks collected.
    fn take_reports(&self) -> Vec<Report> {
        std::mem::take(&mut *self.producer.producer.context().reports.lock().expect("not poisoned"))
    }

    /// Whether a transaction is due now: of the complete epochs, or of the outputs of open
    /// epochs that have waited `spec.partial_commit_after` (staged here); never while it waits
    /// to retry.
    fn due<H>(&mut self, spec: &SinkSpec, complete: &[Epoch], ledger: &mut Ledger<H>, backlog: &Backlog) -> bool {
        if self.retry_at.is_some_and(|at| Instant::now() < at) {
            return false;
        }
        let partial_due = spec
            .partial_commit_after
            .is_some_and(|after| complete.is_empty() && self.open_since.is_some_and(|since| since.elapsed() >= after));
        if self.partial.is_none() && partial_due {
            self.stage_partial(ledger, backlog, complete);
            if self.partial.is_none() {
                // Nothing can go yet (each waits for an earlier record): look again later.
                self.open_since = Some(Instant::now());
            }
        }
        !complete.is_empty() || self.partial.is_some()
    }

    /// Takes out of the open epochs every output that may commit before its epoch closes:
    /// in each partition, those of the records from the least offset in the backlog upwards,
    /// as far as every record has its outputs here (the `complete` epochs commit in the same
    /// transaction). Above a record still in flight nothing goes: a restart reads from the
    /// committed offset, and would publish again what was committed above it.
    fn stage_partial<H>(&mut self, ledger: &mut Ledger<H>, backlog: &Backlog, complete: &[Epoch]) {
        let here: BTreeSet<(i32, i64)> = ledger
            .epochs
            .values()
            .flat_map(|e| e.waiting.iter().map(|o| &o.sent))
            .filter(|s| s.is_record_output())
            .map(|s| (s.partition, s.offset))
            .collect();
        let mut partial = Partial { outgoing: Vec::new(), next: committable(backlog, &here) };
        for (epoch, entry) in ledger.epochs.iter_mut().filter(|(e, _)| !complete.contains(e)) {
            let (now, later) = std::mem::take(&mut entry.waiting).into_iter().partition(|o: &Outgoing| {
                o.sent.kind != MessageKind::FeedbackDeadLetter
                    && partial.next.get(&o.sent.partition).is_some_and(|next| o.sent.offset < *next)
            });
            entry.waiting = later;
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
    fn next_offsets<H>(&self, ledger: &Ledger<H>, complete: &[Epoch]) -> BTreeMap<i32, i64> {
        let mut next: BTreeMap<i32, i64> = self.partial.as_ref().map(|p| p.next.clone()).unwrap_or_default();
        for entry in complete.iter().map(|e| &ledger.epochs[e]) {
            for (partition, offset) in &entry.offsets {
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
    /// its partitions' positions.
    fn committed_ok<H>(&mut self, ledger: &mut Ledger<H>, complete: &[Epoch], backlog: &mut Backlog) -> Retired<H> {
        self.failing_since = None;
        self.retry_at = None;
        self.backoff.reset();
        let staged = self.partial.take().into_iter().flat_map(|p| p.outgoing);
        let mut retired = Vec::new();
        let mut committed: Vec<Outgoing> = staged.collect();
        for (hold, positions, waiting) in ledger.retire(complete) {
            committed.extend(waiting);
            retired.push((hold, positions));
        }
        // Per partition: the least and greatest offset of the records published, and how many.
        let mut published: BTreeMap<i32, (i64, i64, usize)> = BTreeMap::new();
        for sent in committed.iter().map(|o| &o.sent).filter(|s| s.is_record_output()) {
            backlog.done(sent.partition, sent.offset);
            let range = published.entry(sent.partition).or_insert((sent.offset, sent.offset, 0));
            *range = (range.0.min(sent.offset), range.1.max(sent.offset), range.2 + 1);
        }
        tracing::debug!(?complete, ?published, next_offsets = ?self.committed, "transaction committed");
        self.open_since = (ledger.waiting() > 0).then(Instant::now);
        retired
    }

    /// Replaces each output the broker refused for its size with its small dead letter;
    /// returns how many.
    fn replace_refused<H>(&mut self, ledger: &mut Ledger<H>, reports: Vec<Report>, metrics: &mut SinkMetrics) -> usize {
        let mut replaced = 0;
        for report in reports {
            let Err((code, message)) = report.outcome else { continue };
            if !too_large(code) || report.message.replacement {
                continue;
            }
            let m = report.message;
            let staged = self.partial.iter_mut().flat_map(|p| p.outgoing.iter_mut());
            let epoch = ledger.epochs.get_mut(&m.epoch).into_iter().flat_map(|e| e.waiting.iter_mut());
            let mut slots = staged.chain(epoch);
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
    fn wait_to_retry(&mut self, spec: &SinkSpec, error: String) -> Result<(), OperatorError> {
        let since = *self.failing_since.get_or_insert_with(Instant::now);
        if since.elapsed() > spec.give_up_after {
            let seconds = since.elapsed().as_secs_f64();
            return Err(OperatorError::Transaction(format!(
                "the outputs' transaction kept failing for {seconds:.0} s: {error}"
            )));
        }
        let pause = self.backoff.next_pause();
        tracing::warn!(%error, retry_in = ?pause, "a transaction of outputs failed; retrying");
        self.retry_at = Some(Instant::now() + pause);
        Ok(())
    }

    /// One transaction: the staged partial outputs and those of the `complete` epochs, and the
    /// next offsets of their partitions for the group. Aborted on any failure.
    fn transact<H>(&mut self, ledger: &mut Ledger<H>, spec: &SinkSpec, complete: &[Epoch]) -> Result<(), Failure> {
        let producer = &self.producer.producer;
        let open = Open { since: Instant::now(), timeout: spec.transaction_timeout };
        producer.begin_transaction().map_err(|e| open.classify("cannot begin a transaction", e))?;
        let next = self.next_offsets(ledger, complete);
        let staged = self.partial.iter_mut().flat_map(|p| p.outgoing.iter_mut());
        let epochs = ledger.epochs.iter_mut().filter(|(e, _)| complete.contains(e));
        let slots = staged.chain(epochs.flat_map(|(_, entry)| entry.waiting.iter_mut()));
        let result = send_and_commit(producer, &*self.consumer, spec, &open, slots, &next);
        match &result {
            Ok(()) => self.committed.extend(next),
            Err(Failure::Retry(error)) => {
                // Nothing of it becomes visible. A producer that cannot abort cannot go on. The
                // reports of the purged messages are taken from the context by the caller.
                if let Err(abort) = abort_retrying(producer, spec.give_up_after) {
                    let error = format!("{error}; aborting the transaction failed too");
                    // A producer whose abort failed is broken (librdkafka raises
                    // INVALID_TXN_STATE from a restarted coordinator as fatal), but unless it
                    // was fenced, a new one may go on: nothing of this transaction was
                    // committed, and its initialisation aborts it.
                    return Err(if is_fenced(&abort) {
                        open.classify(&error, abort)
                    } else {
                        Failure::Renew(format!("{error}: {abort}"))
                    });
                }
            }
            Err(_) => {}
        }
        result
    }
}

/// Retired epochs: the hold of each, and the positions to give at it.
type Retired<H> = Vec<(H, Vec<crate::records::Position>)>;

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

fn send_and_commit<'a, C: ConsumerContext>(
    producer: &BaseProducer<SinkContext>,
    consumer: &BaseConsumer<C>,
    spec: &SinkSpec,
    open: &Open,
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
        let what = "adding the input offsets to the transaction";
        bounded(what, TIMEOUT, || producer.send_offsets_to_transaction(&offsets, &group, TIMEOUT))
            .map_err(|e| open.classify("cannot add the input offsets to the transaction", e))?;
    }
    commit_retrying(producer, spec.give_up_after)
        .map_err(|e| open.classify("cannot commit the outputs' transaction", e))?;
    producer.poll(Duration::ZERO);
    Ok(())
}

/// The transaction in progress: since when, and the producer's `transaction.timeout.ms`.
struct Open {
    since: Instant,
    timeout: Duration,
}

impl Open {
    /// A transaction the broker aborted as expired, a fenced producer (another instance of
    /// this worker took over) or a fatal producer error ends the worker; anything else is worth
    /// another transaction.
    fn classify(&self, what: &str, error: KafkaError) -> Failure {
        let open_for = self.since.elapsed();
        if outlived(&error, open_for, self.timeout) {
            Failure::Expired(outlived_message(what, &error, open_for, self.timeout))
        } else if is_fenced(&error) {
            Failure::Fatal(format!(
                "{what}: {error}. Another instance of this worker (a later `dlpipe run` of the same group) has fenced it"
            ))
        } else if is_fenced_or_fatal(&error) {
            Failure::Fatal(format!("{what}: {error}"))
        } else {
            Failure::Retry(format!("{what}: {error}"))
        }
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
