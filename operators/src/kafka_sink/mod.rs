//! `kafka_sink`: predictions, features and dead letters out to Kafka, and the input offsets
//! they answer committed once they are, by a [`Delivery`] mode: at-least-once or exactly-once.
//!
//! **In:** one `Outcome` per input record (a prediction or a dead letter), from the partitions
//! this worker reads, and the dead letters of feedback records. **Out:** the [`Position`] of
//! each partition as its epochs retire: at epoch 0, where this run started each partition
//! ([`SinkSpec::starts`]); at epoch e, once e is published (acknowledged, or in a committed
//! transaction) and the input frontier has passed it, the next offset after e's records.
//! **Progress:** the operator keeps a capability for every epoch not yet retired, so its
//! output frontier is the *published* frontier: a probe on it says which epochs are out, and
//! the dataflow completes only when every output is.
//! **Replays:** outcomes of records before a partition's `published` start were published by
//! an earlier run (a restart replays them for the learner only): they count for progress and
//! positions, and are not sent again.
//! **Failures:** an output refused as too large (a topic's `max.message.bytes`) is replaced,
//! in its epoch, by a small dead letter of kind `output_too_large`, and the stream goes on.
//! Any other refusal the mode cannot retry sets `fatal`: the sink stops, nothing is committed
//! past the refused output, and a restart reads it again.
//! **Metrics:** dead letters by kind; acknowledged messages by topic; send-to-acknowledgement
//! time; for predictions, the time from the input's Kafka timestamp (end to end).
//!
//! | file | what it owns |
//! |---|---|
//! | `mod.rs` | the operator, [`Delivery`] and [`SinkSpec`] |
//! | `ledger.rs` | per epoch: its hold, waiting and in-flight messages, offsets, retirement |
//! | `messages.rs` | outcomes encoded as messages; delivery reports |
//! | `at_least_once.rs` | sending as outputs come, acknowledging, committing offsets |
//! | `exactly_once.rs` | transactions of outputs and offsets, early ones for open epochs |

mod at_least_once;
mod exactly_once;
mod ledger;
pub(crate) mod messages;

pub use at_least_once::commit_finally;
pub use exactly_once::{RenewProducer, TxnProducer};
pub use messages::SinkContext;

use crate::backlog::SharedBacklog;
use crate::metrics::SinkMetrics;
use crate::records::{Epoch, ModelId, Outcome, Position};
use crate::Fatal;
use at_least_once::AtLeastOnce;
use exactly_once::ExactlyOnce;
use ledger::Ledger;
use messages::Outgoing;
use rdkafka::consumer::{BaseConsumer, ConsumerContext};
use rdkafka::producer::BaseProducer;
use std::sync::Arc;
use std::time::Duration;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::StreamVec;

/// How the sink publishes, and so what a consumer of its topics sees after a crash.
pub enum Delivery<C: ConsumerContext + 'static> {
    /// Outputs go out as they come; an epoch's offsets are committed by `committer` once all
    /// its outputs are acknowledged (or, with `None`, by the caller from the positions). A
    /// crash replays from the last commit: outputs after it may be published twice.
    AtLeastOnce { producer: BaseProducer<SinkContext>, committer: Option<Arc<BaseConsumer<C>>> },
    /// Outputs wait for their epoch and commit in a transaction with their input offsets
    /// (`consumer`'s group): a `read_committed` consumer sees each exactly once.
    ExactlyOnce { producer: TxnProducer, consumer: Arc<BaseConsumer<C>> },
}

/// Topics the sink writes and commits for.
#[derive(Clone, Debug)]
pub struct SinkSpec {
    pub input_topic: String,
    pub predictions_topic: String,
    pub dead_letter_topic: String,
    /// Where each predicted record's features go too, if anywhere.
    /// The CNN every prediction and features message names.
    pub model: ModelId,
    /// The features topic: one message per predicted record, after its prediction.
    pub features_topic: Option<String>,
    /// Where this run starts each of the worker's partitions, emitted at epoch 0.
    pub starts: Vec<Position>,
    /// How long exactly-once delivery retries a failing transaction before it stops the
    /// worker (at-least-once, the producer retries each message itself).
    pub give_up_after: Duration,
    /// Exactly-once: the producer's `transaction.timeout.ms`. A transaction open longer than
    /// this that is fenced was aborted by the broker (`transactions::outlived`).
    pub transaction_timeout: Duration,
    /// Exactly-once: once an output of an epoch that is still open has waited this long, the
    /// outputs that can be (every record before them in their partition is published) are
    /// committed in a transaction of their own, with their offsets, before the epoch closes
    /// (a quiet partition holds an offset epoch open). `None`: only whole epochs.
    pub partial_commit_after: Option<Duration>,
}

/// What one step of a delivery mode did: the epochs it retired, each with its hold and the
/// positions to give at it, and when to look again (`None`: when input comes).
pub(crate) struct Step<H> {
    pub(crate) retired: Vec<(H, Vec<Position>)>,
    pub(crate) again: Option<Duration>,
}

/// The delivery mode and its state.
enum Mode<C: ConsumerContext + 'static> {
    AtLeastOnce(AtLeastOnce<C>),
    ExactlyOnce(Box<ExactlyOnce<C>>),
}

/// Publishes a stream of outcomes to Kafka; see the module doc.
pub trait KafkaSink<'scope> {
    /// Publishes each outcome with `delivery`; returns the positions of the worker's
    /// partitions as epochs are published.
    ///
    /// ```no_run
    /// use dlpipe_operators::{KafkaSink, Delivery, ModelId, SharedBacklog, SinkContext, SinkSpec};
    /// use dlpipe_operators::records::Outcome;
    /// use rdkafka::config::ClientConfig;
    /// use rdkafka::consumer::{BaseConsumer, DefaultConsumerContext};
    /// use rdkafka::producer::BaseProducer;
    /// use std::time::Duration;
    /// use timely::dataflow::operators::ToStream;
    ///
    /// timely::execute_directly(|worker| {
    ///     let producer: BaseProducer<SinkContext> = ClientConfig::new()
    ///         .set("bootstrap.servers", "127.0.0.1:9092")
    ///         .create_with_context(SinkContext::default())
    ///         .expect("a producer");
    ///     let delivery = Delivery::<DefaultConsumerContext>::AtLeastOnce { producer, committer: None };
    ///     let spec = SinkSpec {
    ///         input_topic: "images".into(),
    ///         predictions_topic: "predictions".into(),
    ///         dead_letter_topic: "dead-letters".into(),
    ///         model: ModelId { name: "efficientnet_lite0".into(), sha256: String::new() },
    ///         features_topic: None,
    ///         starts: Vec::new(),
    ///         give_up_after: Duration::from_secs(60),
    ///         transaction_timeout: Duration::from_secs(60),
    ///         partial_commit_after: None,
    ///     };
    ///     worker.dataflow::<u64, _, _>(|scope| {
    ///         let outcomes = Vec::<Outcome>::new().to_stream(scope);
    ///         outcomes.kafka_sink(delivery, spec, SharedBacklog::default(), Default::default(), Default::default());
    ///     });
    /// });
    /// ```
    fn kafka_sink<C: ConsumerContext + 'static>(
        self,
        delivery: Delivery<C>,
        spec: SinkSpec,
        backlog: SharedBacklog,
        fatal: Fatal,
        metrics: SinkMetrics,
    ) -> StreamVec<'scope, Epoch, Position>;
}

impl<'scope> KafkaSink<'scope> for StreamVec<'scope, Epoch, Outcome> {
    fn kafka_sink<C: ConsumerContext + 'static>(
        self,
        delivery: Delivery<C>,
        spec: SinkSpec,
        backlog: SharedBacklog,
        fatal: Fatal,
        metrics: SinkMetrics,
    ) -> StreamVec<'scope, Epoch, Position> {
        kafka_sink(self, delivery, spec, backlog, fatal, metrics)
    }
}

pub fn kafka_sink<'scope, C: ConsumerContext + 'static>(
    outcomes: StreamVec<'scope, Epoch, Outcome>,
    delivery: Delivery<C>,
    spec: SinkSpec,
    backlog: SharedBacklog,
    fatal: Fatal,
    mut metrics: SinkMetrics,
) -> StreamVec<'scope, Epoch, Position> {
    let scope = outcomes.scope();
    let (name, mut mode) = match delivery {
        Delivery::AtLeastOnce { producer, committer } => {
            ("KafkaSink", Mode::AtLeastOnce(AtLeastOnce { producer, committer }))
        }
        Delivery::ExactlyOnce { producer, consumer } => {
            ("KafkaTxnSink", Mode::ExactlyOnce(Box::new(ExactlyOnce::new(producer, consumer, &spec))))
        }
    };
    outcomes.unary_frontier::<CapacityContainerBuilder<Vec<Position>>, _, _, _>(
        Pipeline,
        name,
        move |default_cap, info| {
            let activator = scope.activator_for(info.address);
            let mut starts = Some((default_cap, spec.starts.clone()));
            let mut ledger: Ledger<Capability<Epoch>> = Ledger::new(&spec.starts);
            // Set once the mode fails for good: from then on nothing is sent or committed (the
            // worker stops on `fatal`), so the failed records are read again after a restart.
            let mut failed = false;
            move |(input, frontier), output| {
                if let Some((cap, positions)) = starts.take() {
                    output.session(&cap).give_iterator(positions.into_iter());
                }
                let mut backlog = backlog.borrow_mut();
                input.for_each_stamp(|cap, data| {
                    let Some(cap) = cap.retain_least(0) else { return };
                    let epoch = *cap.time();
                    ledger.entry(epoch, || cap);
                    for outcome in data.flat_map(|batch| batch.drain(..)) {
                        if ledger.record(epoch, outcome.input_position(), &mut backlog) {
                            continue;
                        }
                        let waiting = &mut ledger.epochs.get_mut(&epoch).expect("opened above").waiting;
                        Outgoing::encode(epoch, outcome, &spec, &mut metrics, |message| waiting.push_back(message));
                    }
                });
                if failed {
                    return;
                }
                let open = |epoch: &Epoch| frontier.frontier().less_equal(epoch);
                let step = match &mut mode {
                    Mode::AtLeastOnce(m) => m.step(&mut ledger, open, &spec, &mut backlog, &mut metrics),
                    Mode::ExactlyOnce(m) => m.step(&mut ledger, open, &spec, &mut backlog, &mut metrics),
                };
                match step {
                    Ok(Step { retired, again }) => {
                        for (hold, positions) in retired {
                            output.session(&hold).give_iterator(positions.into_iter());
                        }
                        if let Some(after) = again {
                            activator.activate_after(after);
                        }
                    }
                    Err(error) => {
                        failed = true;
                        *fatal.borrow_mut() = Some(error);
                    }
                }
            }
        },
    )
}
