//! Which Kafka error codes mean "not yet": shared by the operators (the sink's final commit)
//! and the library's start-up retries, so both wait out the same things.

use rdkafka::error::RDKafkaErrorCode as Code;

/// Whether `code` means "not yet": the same call can succeed later without anyone doing anything.
pub fn is_retriable_code(code: Code) -> bool {
    matches!(
        code,
        // The group or transaction coordinator is moving, loading or not elected yet.
        Code::NotCoordinator
            | Code::CoordinatorLoadInProgress
            | Code::CoordinatorNotAvailable
            | Code::WaitingForCoordinator
            // Partition leadership is moving or not elected yet (e.g. right after topic creation).
            | Code::LeaderNotAvailable
            | Code::NotLeaderForPartition
            | Code::ReplicaNotAvailable
            | Code::NotEnoughReplicas
            | Code::NotEnoughReplicasAfterAppend
            | Code::UnknownTopicOrPartition
            | Code::UnknownPartition
            | Code::NotController
            | Code::KafkaStorageError
            | Code::RebalanceInProgress
            | Code::ConcurrentTransactions
            // The network or the brokers: down, restarting, slow.
            | Code::RequestTimedOut
            | Code::OperationTimedOut
            | Code::TimedOutQueue
            | Code::MessageTimedOut
            | Code::NetworkException
            | Code::BrokerNotAvailable
            | Code::BrokerTransportFailure
            | Code::AllBrokersDown
            | Code::Resolve
            | Code::Retry
            | Code::InProgress
            | Code::PreviousInProgress
            | Code::Outdated
    )
}
