//! Which Kafka errors are worth waiting out, and a bounded retry loop that says what it waits for.
//!
//! A cluster that is starting, electing a leader or loading a group coordinator answers with
//! errors that mean "not yet" (NotCoordinator, CoordinatorLoadInProgress, LeaderNotAvailable, a
//! timeout, a refused connection). dlpipe's start-up calls wait those out, with exponential
//! backoff up to `kafka.retry_timeout_secs`, logging what they await. Everything else (a wrong
//! password, a missing ACL, a replication factor larger than the cluster) fails at once with
//! a message that says what to do.

use super::KafkaError;
use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode as Code};
use std::time::{Duration, Instant};

/// How long and how often to retry.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Give up after this long.
    pub timeout: Duration,
    /// First pause; it doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl RetryPolicy {
    pub fn new(timeout: Duration) -> RetryPolicy {
        RetryPolicy { timeout, initial_backoff: Duration::from_millis(100), max_backoff: Duration::from_secs(2) }
    }
}

pub use dlpipe_operators::retry::is_retriable_code;
use dlpipe_operators::retry::Backoff;

/// Whether a client error is worth waiting out (see [`is_retriable_code`]).
pub fn is_retriable(error: &RdKafkaError) -> bool {
    match error {
        RdKafkaError::Transaction(e) => e.is_retriable() || error.rdkafka_error_code().is_some_and(is_retriable_code),
        other => other.rdkafka_error_code().is_some_and(is_retriable_code),
    }
}

/// What a user can do about a non-retriable error, when there is something to say.
pub fn hint(code: Code) -> Option<&'static str> {
    Some(match code {
        Code::Authentication | Code::SaslAuthenticationFailed | Code::IllegalSASLState => {
            "the brokers refused the credentials: check sasl.mechanism, sasl.username and sasl.password \
             (set the password with DLPIPE_KAFKA__SASL_PASSWORD or \"${ENV_VAR}\", not in the file)"
        }
        Code::UnsupportedSASLMechanism => {
            "the brokers do not enable this sasl.mechanism on the listener: ask for the enabled ones \
             (sasl.enabled.mechanisms) and set kafka.properties.\"sasl.mechanism\""
        }
        Code::SSL => {
            "the TLS handshake failed: check security.protocol matches the listener, and that \
             ssl.ca.location names the CA that signed the brokers' certificates"
        }
        Code::TopicAuthorizationFailed => {
            "the principal lacks a topic ACL: grant Read on the input and feedback topics, Write on \
             the output topics (and Create if pipeline.create_topics is true)"
        }
        Code::GroupAuthorizationFailed => "the principal lacks Read on the consumer group pipeline.group_id",
        Code::ClusterAuthorizationFailed => {
            "the principal lacks a cluster ACL (IdempotentWrite, or Create when dlpipe creates topics)"
        }
        Code::TransactionalIdAuthorizationFailed => "the principal lacks Write on the transactional id",
        Code::InvalidReplicationFactor => {
            "pipeline.topic_replication_factor is larger than the number of brokers: lower it, or create \
             the topics yourself and set pipeline.create_topics = false"
        }
        Code::PolicyViolation | Code::InvalidConfig | Code::InvalidPartitions => {
            "the cluster refuses the topic settings: create the topics yourself and set \
             pipeline.create_topics = false"
        }
        Code::MessageSizeTooLarge | Code::InvalidMessageSize => {
            "the message is larger than the broker's or topic's max.message.bytes"
        }
        Code::InvalidGroupId => "pipeline.group_id is not a valid consumer group id",
        Code::UnsupportedVersion | Code::UnsupportedFeature => {
            "the brokers are too old for this request (dlpipe needs Kafka 2.5 or newer)"
        }
        _ => return None,
    })
}

/// Runs `attempt` until it succeeds, fails with a non-retriable error, or `policy.timeout`
/// passes. `awaiting` names what a retriable failure means dlpipe is waiting for, e.g. "the
/// group coordinator of group dlpipe"; it appears in the log lines and the final error.
pub fn retry<T>(
    policy: &RetryPolicy,
    brokers: &str,
    awaiting: &str,
    mut attempt: impl FnMut() -> Result<T, RdKafkaError>,
) -> Result<T, KafkaError> {
    let started = Instant::now();
    let mut backoff = Backoff::new(policy.initial_backoff, policy.max_backoff);
    let mut attempts = 0u32;
    let mut last_log: Option<Instant> = None;
    loop {
        attempts += 1;
        let error = match attempt() {
            Ok(value) => {
                if attempts > 1 {
                    tracing::info!(
                        awaiting,
                        attempts,
                        waited_secs = format!("{:.1}", started.elapsed().as_secs_f64()),
                        "Kafka is ready"
                    );
                }
                return Ok(value);
            }
            Err(error) => error,
        };
        if !is_retriable(&error) {
            let hint = error.rdkafka_error_code().and_then(hint).map(|h| format!(": {h}")).unwrap_or_default();
            return Err(KafkaError::Refused {
                brokers: brokers.into(),
                what: awaiting.into(),
                error: Box::new(error),
                hint,
            });
        }
        let waited = started.elapsed();
        if waited + backoff.peek() > policy.timeout {
            return Err(KafkaError::GaveUp {
                brokers: brokers.into(),
                awaiting: awaiting.into(),
                waited,
                attempts,
                error: Box::new(error),
            });
        }
        // One line when the wait starts and then every few seconds: enough to see what a
        // slow start-up waits for without a line per attempt.
        if last_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
            last_log = Some(Instant::now());
            tracing::info!(
                awaiting,
                %error,
                attempts,
                waited_secs = format!("{:.1}", waited.as_secs_f64()),
                "Kafka is not ready yet (a retriable error); retrying"
            );
        } else {
            tracing::debug!(awaiting, %error, attempts, "retrying");
        }
        std::thread::sleep(backoff.next_pause());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn policy(timeout_ms: u64) -> RetryPolicy {
        RetryPolicy {
            timeout: Duration::from_millis(timeout_ms),
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(4),
        }
    }

    #[test]
    fn coordinator_and_leader_errors_are_waited_out_and_the_answer_returned() {
        let calls = Cell::new(0);
        let codes = [Code::NotCoordinator, Code::CoordinatorLoadInProgress, Code::LeaderNotAvailable];
        let value = retry(&policy(10_000), "b:9092", "the group coordinator", || {
            let n = calls.get();
            calls.set(n + 1);
            match codes.get(n) {
                Some(code) => Err(RdKafkaError::MetadataFetch(*code)),
                None => Ok(42),
            }
        })
        .unwrap();
        assert_eq!((value, calls.get()), (42, 4));
    }

    #[test]
    fn a_refused_password_fails_at_once_and_says_what_to_do() {
        let calls = Cell::new(0);
        let err = retry(&policy(10_000), "b:9092", "metadata", || -> Result<(), _> {
            calls.set(calls.get() + 1);
            Err(RdKafkaError::MetadataFetch(Code::SaslAuthenticationFailed))
        })
        .unwrap_err();
        assert_eq!(calls.get(), 1);
        let message = err.to_string();
        assert!(message.contains("sasl.password") && message.contains("DLPIPE_KAFKA__SASL_PASSWORD"), "{message}");
    }

    #[test]
    fn retries_end_at_the_timeout_naming_what_was_awaited() {
        let err = retry(&policy(30), "b:9092", "the partitions of topic x", || -> Result<(), _> {
            Err(RdKafkaError::MetadataFetch(Code::LeaderNotAvailable))
        })
        .unwrap_err();
        let message = err.to_string();
        assert!(message.contains("the partitions of topic x") && message.contains("b:9092"), "{message}");
        assert!(matches!(err, KafkaError::GaveUp { attempts, .. } if attempts > 1));
    }

    #[test]
    fn classification_of_the_errors_the_issue_names() {
        for code in [
            Code::NotCoordinator,
            Code::CoordinatorLoadInProgress,
            Code::LeaderNotAvailable,
            Code::UnknownTopicOrPartition,
            Code::RequestTimedOut,
            Code::BrokerTransportFailure,
            Code::AllBrokersDown,
        ] {
            assert!(is_retriable_code(code), "{code:?}");
        }
        for code in [
            Code::SaslAuthenticationFailed,
            Code::TopicAuthorizationFailed,
            Code::InvalidReplicationFactor,
            Code::SSL,
            Code::MessageSizeTooLarge,
        ] {
            assert!(!is_retriable_code(code), "{code:?}");
            assert!(hint(code).is_some(), "{code:?} has no hint");
        }
    }
}
