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
//! **Refusals:** an output the broker refuses as too large aborts the transaction; it is
//! replaced by a small dead letter of kind `output_too_large` and the transaction is tried
//! again. Any other failure is retried with backoff (a broker restarting, a coordinator
//! moving) for up to `SinkSpec::give_up_after`, then sets `fatal`; a fenced producer sets it
//! at once. A commit that fails retriably is retried as it is, never aborted and redone
//! (it may have succeeded). A transaction that cannot be aborted (a coordinator that came
//! back from a crash without it) is left to a new producer of the same transactional id,
//! whose initialisation fences the old one and aborts what it had open. Nothing is committed past an output that is not in a committed transaction.
//! **Replays:** outcomes of records before a partition's `published` start are not sent
//! (an earlier run's transaction has them); they count for progress and positions, and the
//! offsets a transaction commits never go below that start (a replay committing its own lower
//! offsets would make the next restart publish those records again).

use crate::kafka_sink::{is_replay, too_large, Delivery, Outgoing, OutputKind, Report, SinkContext, SinkSpec};
use crate::metrics::SinkMetrics;
use crate::records::{now_ms, Epoch, Outcome, Position};
use crate::{Backlog, Fatal};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, PurgeConfig};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::StreamVec;

/// How long a transaction's calls may take before the attempt counts as failed.
const TIMEOUT: Duration = Duration::from_secs(30);

struct EpochOutputs {
    hold: Capability<Epoch>,
    outgoing: Vec<Outgoing>,
    /// Highest offset per partition among this epoch's records.
    offsets: BTreeMap<i32, i64>,
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

pub fn kafka_txn_sink<'scope, C: ConsumerContext + 'static>(
    outcomes: StreamVec<'scope, Epoch, Outcome>,
    producer: TxnProducer,
    consumer: Rc<BaseConsumer<C>>,
    spec: SinkSpec,
    backlog: Backlog,
    fatal: Fatal,
    mut metrics: SinkMetrics,
) -> StreamVec<'scope, Epoch, Position> {
    let scope = outcomes.scope();
    outcomes.unary_frontier::<CapacityContainerBuilder<Vec<Position>>, _, _, _>(
        Pipeline,
        "KafkaTxnSink",
        move |default_cap, info| {
            let activator = scope.activator_for(info.address);
            let mut epochs: BTreeMap<Epoch, EpochOutputs> = BTreeMap::new();
            let mut starts = Some((default_cap, spec.starts.clone()));
            let published_from: BTreeMap<i32, i64> = spec.starts.iter().map(|s| (s.partition, s.published)).collect();
            let (mut failing_since, mut retry_at, mut failed) = (None::<Instant>, None::<Instant>, false);
            let mut backoff = Duration::from_millis(100);
            let TxnProducer { mut producer, renew } = producer;
            move |(input, frontier), output| {
                if let Some((cap, positions)) = starts.take() {
                    output.session(&cap).give_iterator(positions.into_iter());
                }
                input.for_each_stamp(|cap, data| {
                    let Some(cap) = cap.retain_least(0) else { return };
                    let epoch = *cap.time();
                    let state = epochs.entry(epoch).or_insert_with(|| EpochOutputs {
                        hold: cap,
                        outgoing: Vec::new(),
                        offsets: BTreeMap::new(),
                    });
                    for batch in data {
                        for outcome in batch.drain(..) {
                            if is_replay(&outcome, &mut state.offsets, &published_from, &backlog) {
                                continue;
                            }
                            Outgoing::encode(epoch, outcome, &spec, &mut metrics, |message| {
                                state.outgoing.push(message)
                            });
                        }
                    }
                });
                metrics.unacked.set(epochs.values().map(|e| e.outgoing.len() as i64).sum());
                let complete: Vec<Epoch> =
                    epochs.keys().copied().take_while(|e| !frontier.frontier().less_equal(e)).collect();
                if failed || complete.is_empty() || retry_at.is_some_and(|at| Instant::now() < at) {
                    if !failed && !epochs.is_empty() {
                        activator.activate_after(Duration::from_millis(50));
                    }
                    return;
                }
                let started = Instant::now();
                match transact(&producer, &*consumer, &spec, &mut epochs, &complete) {
                    Ok(()) => {
                        failing_since = None;
                        retry_at = None;
                        backoff = Duration::from_millis(100);
                        let delivered: Vec<Report> =
                            std::mem::take(&mut *producer.context().reports.lock().expect("not poisoned"));
                        for report in delivered {
                            metrics.published.with(&report.topic).inc();
                            metrics.produce_seconds.observe(report.produce_seconds);
                            if let OutputKind::Prediction { input_ts_ms: Some(ts) } = report.message.kind {
                                metrics.end_to_end_seconds.observe((now_ms() - ts).max(0) as f64 / 1000.0);
                            }
                        }
                        for epoch in complete {
                            let state = epochs.remove(&epoch).expect("a complete epoch");
                            let records = state.outgoing.iter().filter(|o| o.sent.is_record_output()).count();
                            backlog.set(backlog.get().saturating_sub(records));
                            let mut session = output.session(&state.hold);
                            for (partition, offset) in state.offsets {
                                let published = published_from.get(&partition).map_or(offset + 1, |from| (offset + 1).max(*from));
                                session.give(Position { partition, learned: offset + 1, published });
                            }
                        }
                        tracing::trace!(seconds = started.elapsed().as_secs_f64(), "transaction committed");
                    }
                    Err(Failure::Retry(error)) => {
                        // Outputs refused for their size get their small replacement; other
                        // failures are retried as they are.
                        let reports: Vec<Report> =
                            std::mem::take(&mut *producer.context().reports.lock().expect("not poisoned"));
                        let mut replaced = 0;
                        for report in reports {
                            let Err((code, message)) = report.outcome else { continue };
                            if !too_large(code) || report.message.replacement {
                                continue;
                            }
                            let m = report.message;
                            if let Some(slot) = epochs.get_mut(&m.epoch).and_then(|e| {
                                e.outgoing.iter_mut().find(|o| {
                                    (o.sent.partition, o.sent.offset, o.sent.kind) == (m.partition, m.offset, m.kind)
                                        && !o.sent.replacement
                                })
                            }) {
                                tracing::warn!(id = %crate::records::truncate(&m.key, 64), partition = m.partition, offset = m.offset, message, "the broker refused an output as too large; a small dead letter replaces it");
                                *slot = m.replaced(&message);
                                metrics.dead_lettered.with("output_too_large").inc();
                                replaced += 1;
                            }
                        }
                        if replaced > 0 {
                            retry_at = None;
                        } else {
                            let since = *failing_since.get_or_insert_with(Instant::now);
                            if since.elapsed() > spec.give_up_after {
                                metrics.failed.inc();
                                failed = true;
                                *fatal.borrow_mut() = Some(format!(
                                    "the outputs' transaction kept failing for {:.0} s: {error}",
                                    since.elapsed().as_secs_f64()
                                ));
                                return;
                            }
                            tracing::warn!(%error, retry_in = ?backoff, "a transaction of outputs failed; retrying");
                            retry_at = Some(Instant::now() + backoff);
                            backoff = (backoff * 2).min(Duration::from_secs(2));
                        }
                    }
                    Err(Failure::Renew(error)) => match renew() {
                        Ok(renewed) => {
                            tracing::warn!(%error, "a transaction could not be aborted; a new producer fenced the old one, retrying");
                            producer = renewed;
                            retry_at = Some(Instant::now() + backoff);
                        }
                        Err(renew_error) => {
                            metrics.failed.inc();
                            failed = true;
                            *fatal.borrow_mut() =
                                Some(format!("{error}; and no new transactional producer could be made: {renew_error}"));
                            return;
                        }
                    },
                    Err(Failure::Fatal(error)) => {
                        metrics.failed.inc();
                        failed = true;
                        *fatal.borrow_mut() = Some(error);
                        return;
                    }
                }
                if !epochs.is_empty() {
                    activator.activate_after(Duration::from_millis(2));
                }
            }
        },
    )
}

/// One transaction: the outputs of the `complete` epochs, and the next offsets of their
/// partitions for the group. Aborted on any failure.
fn transact<C: ConsumerContext>(
    producer: &BaseProducer<SinkContext>,
    consumer: &BaseConsumer<C>,
    spec: &SinkSpec,
    epochs: &mut BTreeMap<Epoch, EpochOutputs>,
    complete: &[Epoch],
) -> Result<(), Failure> {
    producer.begin_transaction().map_err(|e| classify("cannot begin a transaction", e))?;
    let result = send_and_commit(producer, consumer, spec, epochs, complete);
    if let Err(Failure::Retry(error)) = &result {
        // Nothing of it becomes visible. A producer that cannot abort cannot go on. The
        // reports of the purged messages are taken from the context by the caller.
        if let Err(abort) = abort_retrying(producer, spec.give_up_after) {
            let error = format!("{error}; aborting the transaction failed too: {abort}");
            // A producer whose abort failed is broken (librdkafka raises INVALID_TXN_STATE
            // from a restarted coordinator as fatal), but unless it was fenced, a new one may go
            // on: nothing of this transaction was committed, and its initialisation aborts it.
            return Err(if is_fenced(&abort) { Failure::Fatal(error) } else { Failure::Renew(error) });
        }
    }
    result
}

fn send_and_commit<C: ConsumerContext>(
    producer: &BaseProducer<SinkContext>,
    consumer: &BaseConsumer<C>,
    spec: &SinkSpec,
    epochs: &mut BTreeMap<Epoch, EpochOutputs>,
    complete: &[Epoch],
) -> Result<(), Failure> {
    let mut next: BTreeMap<i32, i64> = BTreeMap::new();
    for epoch in complete {
        let state = epochs.get_mut(epoch).expect("a complete epoch");
        for (partition, offset) in &state.offsets {
            let at = next.entry(*partition).or_insert(offset + 1);
            *at = (*at).max(offset + 1);
        }
        // Records replayed for the learner only (before where publishing starts) must not move
        // the group's offsets back below it: a restart would publish again what an earlier
        // run's transactions had committed.
        for start in &spec.starts {
            if let Some(at) = next.get_mut(&start.partition) {
                *at = (*at).max(start.published);
            }
        }
        for slot in state.outgoing.iter_mut() {
            loop {
                let sent = slot.sent.clone();
                let topic = sent.topic(spec);
                let key = sent.key.clone();
                let delivery = Box::new(Delivery { at: Instant::now(), message: sent });
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
    }
    let mut offsets = TopicPartitionList::new();
    for (partition, offset) in &next {
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
    let mut backoff = Duration::from_millis(100);
    loop {
        match call() {
            Err(KafkaError::Transaction(e)) if e.is_retriable() && started.elapsed() < give_up_after => {
                tracing::warn!(error = %e, "{what}: retrying");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(2));
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
