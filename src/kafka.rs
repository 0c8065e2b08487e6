//! Kafka clients as dlpipe configures them, and topic administration.

use crate::config::KafkaConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};
use rdkafka::metadata::Metadata;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    #[error("cannot create a Kafka client for {brokers}: {source}")]
    Client {
        brokers: String,
        #[source]
        source: RdKafkaError,
    },
    #[error("Kafka at {brokers} did not answer a metadata request within {timeout:?}: {source}. Is a broker running there? (`scripts/kafka start` runs one locally; DLPIPE_KAFKA_BROKERS points at another)")]
    Unreachable {
        brokers: String,
        timeout: Duration,
        #[source]
        source: RdKafkaError,
    },
    #[error("cannot create topic {topic}: {reason}")]
    CreateTopic { topic: String, reason: String },
}

/// The base client configuration every dlpipe client starts from: brokers, client id, and the
/// user's extra librdkafka properties (which win).
pub fn client_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &kafka.brokers).set("client.id", &kafka.client_id);
    for (key, value) in &kafka.properties {
        config.set(key, value);
    }
    config
}

/// Asks the cluster for its metadata (all topics, or one).
pub fn metadata(kafka: &KafkaConfig, topic: Option<&str>, timeout: Duration) -> Result<Metadata, KafkaError> {
    let consumer: BaseConsumer = client_config(kafka)
        .create()
        .map_err(|source| KafkaError::Client { brokers: kafka.brokers.clone(), source })?;
    consumer.fetch_metadata(topic, timeout).map_err(|source| KafkaError::Unreachable {
        brokers: kafka.brokers.clone(),
        timeout,
        source,
    })
}

/// Creates `topic` with `partitions` partitions unless it exists (then leaves it as it is).
/// `configs` are topic properties such as `cleanup.policy = compact`.
pub fn ensure_topic(
    kafka: &KafkaConfig,
    topic: &str,
    partitions: i32,
    replication: i32,
    configs: &[(&str, &str)],
) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = client_config(kafka)
        .create()
        .map_err(|source| KafkaError::Client { brokers: kafka.brokers.clone(), source })?;
    let mut new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(replication));
    for (key, value) in configs {
        new_topic = new_topic.set(key, value);
    }
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    // The admin client drives its futures from its own background thread; no runtime needed.
    let results = futures_executor::block_on(admin.create_topics([&new_topic], &options))
        .map_err(|e| KafkaError::CreateTopic { topic: topic.into(), reason: e.to_string() })?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => return Err(KafkaError::CreateTopic { topic: name, reason: code.to_string() }),
        }
    }
    Ok(())
}
