//! The operators' one error: why a worker must stop. An operator that meets one sets it in the
//! worker's [`Fatal`](crate::Fatal) cell; the loop that steps the worker reads it and stops, so
//! that nothing past the failure is committed and a restart reads it again.

/// Why an operator stopped its worker.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OperatorError {
    /// The broker refused an output for good (dropping it would lose a record, committing
    /// past it would lie).
    #[error("the output of {what} was not delivered: {error}")]
    Undelivered { what: String, error: String },
    /// The producer refused an output for a reason other than its size or a full queue.
    #[error("cannot produce the output of {what} to {topic}: {error}")]
    Unproducible { what: String, topic: String, error: String },
    /// Exactly-once: a transaction kept failing, or the producer was fenced.
    #[error("{0}")]
    Transaction(String),
    /// A transaction (of outputs, or of a checkpoint) stayed open past `transaction.timeout.ms`,
    /// the brokers unreachable, and the broker aborted it: a restart continues from the
    /// committed offsets (the process exits with
    /// [`RESTART_EXIT_CODE`](crate::transactions::RESTART_EXIT_CODE)).
    #[error("{0}")]
    TransactionExpired(String),
    /// The model kept failing on a batch.
    #[error("the model failed {attempts} times on a batch of {images} images: {error}")]
    Model { attempts: u32, images: usize, error: String },
    /// A checkpoint can never be written (another pipeline of the group took over).
    #[error("{0}")]
    Checkpoint(String),
}
