//! Why a streaming run could not start or had to stop.

use super::model_topic::CheckpointError;
use dlpipe_operators::OperatorError;

/// What `dlpipe run` tells its user. Most variants are another layer's error as it is; the
/// pipeline's own say which worker failed and how.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Topic administration, metadata, or a call retried until the cluster's timeout.
    #[error(transparent)]
    Kafka(#[from] crate::kafka::KafkaError),
    /// A Kafka client could not be made, or refused a call outright.
    #[error(transparent)]
    Client(#[from] rdkafka::error::KafkaError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Learn(#[from] crate::learn::LearnError),
    #[error(transparent)]
    Classifier(#[from] crate::transfer::classifier::ClassifierError),
    #[error(transparent)]
    Serve(#[from] crate::metrics::ServeError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    WorkerIds(#[from] super::worker_ids::WorkerIdsError),
    /// The configured head cannot work with the model.
    #[error("head {head} needs {needs}, and model {model} has none")]
    Head { head: &'static str, needs: &'static str, model: String },
    /// Timely's arguments or start-up failed.
    #[error("timely: {0}")]
    Timely(String),
    /// An operator stopped this worker.
    #[error("worker {index}: {error}")]
    Worker { index: usize, error: OperatorError },
    /// Another worker of the process failed, so this one stopped.
    #[error("worker {index}: stopped because another worker of this process failed")]
    AnotherWorkerFailed { index: usize },
    /// A process of the cluster was lost (see `cluster`): this one stops too.
    #[error(
        "lost process {process} of the cluster ({address}): {loss}. This process stops too: restart the \
         whole cluster, which continues from the newest checkpoint"
    )]
    PeerLost { process: usize, address: String, loss: super::cluster::Loss },
    #[error(transparent)]
    Cluster(#[from] super::cluster::ClusterError),
    /// A worker thread panicked.
    #[error("a worker panicked: {0}")]
    Panicked(String),
}

impl PipelineError {
    /// Whether a restart continues the run (the process then exits with
    /// [`RESTART_EXIT_CODE`](dlpipe_operators::transactions::RESTART_EXIT_CODE)): a
    /// transaction expired while the brokers were away.
    pub fn wants_restart(&self) -> bool {
        matches!(self, PipelineError::Worker { error: OperatorError::TransactionExpired(_), .. })
    }

    pub(super) fn lost(loss: super::cluster::PeerLoss) -> PipelineError {
        PipelineError::PeerLost { process: loss.process, address: loss.address, loss: loss.loss }
    }
}
