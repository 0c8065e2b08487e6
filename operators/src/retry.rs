//! Retrying, one way everywhere: which Kafka error codes mean "not yet", and the [`Backoff`]
//! between attempts. Shared by the operators (the sinks' commits and transactions, the
//! featurizer's forward passes) and the library's start-up retries, so all of them wait out
//! the same things at the same pace.

use rdkafka::error::RDKafkaErrorCode as Code;
use std::time::Duration;

/// Exponential backoff: each pause doubles (or grows by another factor), up to a maximum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    next: Duration,
    initial: Duration,
    max: Duration,
    factor: u32,
}

impl Backoff {
    /// Pauses from `initial`, doubling up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff { next: initial, initial, max, factor: 2 }
    }

    /// The same, each pause `factor` times the last.
    pub fn growing_by(self, factor: u32) -> Backoff {
        Backoff { factor, ..self }
    }

    /// The pace of dlpipe's Kafka retries: 100 ms doubling to 2 s.
    pub fn kafka() -> Backoff {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(2))
    }

    /// The pause to take now; the next one is twice as long (up to the maximum).
    pub fn next_pause(&mut self) -> Duration {
        let pause = self.next;
        self.next = (self.next * self.factor).min(self.max);
        pause
    }

    /// The pause `next_pause` would give, without taking it.
    pub fn peek(&self) -> Duration {
        self.next
    }

    /// Back to the first pause (after a success).
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_the_maximum_and_reset() {
        let mut backoff = Backoff::kafka();
        let pauses: Vec<u64> = (0..7).map(|_| backoff.next_pause().as_millis() as u64).collect();
        assert_eq!(pauses, vec![100, 200, 400, 800, 1600, 2000, 2000]);
        backoff.reset();
        assert_eq!(backoff.peek(), Duration::from_millis(100));
        let mut quadrupling = Backoff::new(Duration::from_millis(100), Duration::from_secs(1)).growing_by(4);
        let pauses: Vec<u64> = (0..4).map(|_| quadrupling.next_pause().as_millis() as u64).collect();
        assert_eq!(pauses, vec![100, 400, 1000, 1000]);
    }
}
