//! Timely dataflow operators of dlpipe, one per file:
//!
//! | operator | in | out |
//! |---|---|---|
//! | [`kafka_source()`] | Kafka partitions | a [`FromMessage`] record (`ImageRecord`) or `DeadLetter` |
//! | [`fetch_decode()`] | `ImageRecord` | `Decoded` or `DeadLetter` |
//! | [`featurize()`] | `Decoded` | `Featured` or `DeadLetter` |
//! | [`kafka_feedback_source()`] | the feedback topic's partitions | `Feedback` or `DeadLetter` |
//! | [`feedback_join()`] | unlabelled `Featured`, `Feedback` | `LabelledExample`, `DeadLetter` |
//! | [`learn_predict()`] | `Featured`, broadcast `LabelledExample` | `Prediction`; the learner's states ([`learn_predict_states()`]) |
//! | [`kafka_sink()`] | `Outcome` | `Position`s as epochs are published, at least or exactly once ([`Delivery`]) |
//! | [`checkpoint()`] | `Position` (to worker 0), the learner's states | checkpointed progress; writes checkpoints |
//!
//! Beside the operators:
//!
//! | file | what it owns |
//! |---|---|
//! | [`records`] | the records between operators and their Kafka encodings: the `dlpipe-records` crate |
//! | `backlog.rs` | a worker's records read and not yet published: bounded by its source, emptied by its sink |
//! | `transactions.rs` | committing and aborting Kafka transactions, fencing (the txn sink and the library's checkpoint writer) |
//! | `retry.rs` | which Kafka errors mean "not yet", and the one [`retry::Backoff`] |
//! | `metrics.rs` | the handles each operator updates |
//! | `error.rs` | [`OperatorError`]: why an operator stops its worker |
//!
//! Operators are generic over the work they schedule (closures and the [`Head`] trait): the
//! image, model and learning code lives in the `dlpipe` library, which builds the dataflow from
//! these pieces. Timestamps are epochs (`u64`); each operator's docs say how it moves progress.
//! Each operator also takes a struct of [`metrics`] handles, which it updates and the caller
//! exports.

pub mod backlog;
pub mod checkpoint;
pub mod error;
pub mod featurize;
pub mod feedback_join;
pub mod fetch_decode;
pub mod kafka_sink;
pub mod kafka_source;
pub mod learn_predict;
pub mod metrics;
/// The records between operators (the `dlpipe-records` crate).
pub use dlpipe_records as records;
pub mod retry;
pub mod transactions;

pub use backlog::{Backlog, SharedBacklog, Waiting};
pub use checkpoint::{checkpoint, CheckpointStore, WriteCheckpoints, WriteError};
pub use error::OperatorError;
pub use featurize::{featurize, Batching, Featurize, ModelRow};
pub use feedback_join::{feedback_join, FeedbackJoin, Joined};
pub use fetch_decode::{fetch_decode, ByteBudget, FetchDecode, Prepare, PrepareError};
pub use kafka_sink::{kafka_sink, Delivery, KafkaSink, SinkContext, SinkSpec, TxnProducer};
pub use kafka_source::{
    kafka_feedback_source, kafka_source, AssignedConsumer, EpochPolicy, FromMessage, PartitionRange, SourceSpec,
};
pub use learn_predict::{learn_predict, learn_predict_states, Head, LearnPredict, Learned, Learner, Predict};
pub use metrics::{
    CounterByLabel, FeaturizeMetrics, FeedbackJoinMetrics, FetchDecodeMetrics, LearnPredictMetrics, SinkMetrics,
    SourceMetrics,
};
pub use records::{
    ClassScore, ClassifierId, DeadLetter, Decoded, Epoch, Featured, Feedback, ImageRecord, LabelledExample, ModelId,
    Outcome, Pixels, Position, Prediction, Promotion, PromotionRole,
};

/// A fatal error the worker loop must stop on: a message the broker refused for good (dropping
/// it would lose a record, committing past it would lie), a model that keeps failing. Set by
/// an operator, read by the loop that steps the worker (one thread).
pub type Fatal = std::rc::Rc<std::cell::RefCell<Option<OperatorError>>>;
