//! Kafka clients as dlpipe configures them, topic administration, and a publisher.

use crate::config::KafkaConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};
use rdkafka::metadata::Metadata;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
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
    #[error("cannot produce to {topic}: {reason}")]
    Produce { topic: String, reason: String },
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

/// Counts broker acknowledgements of a [`Publisher`]'s messages.
#[derive(Clone, Default)]
pub struct DeliveryCounts {
    pub acked: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
}

impl ClientContext for DeliveryCounts {}

impl ProducerContext for DeliveryCounts {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => self.acked.fetch_add(1, Ordering::Relaxed),
            Err((error, _)) => {
                tracing::error!(%error, "message not delivered");
                self.failed.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

/// Publishes keyed messages with an idempotent producer and counts what the broker
/// acknowledged: `dlpipe produce` and the benchmarks feed topics with it.
pub struct Publisher {
    producer: ThreadedProducer<DeliveryCounts>,
    counts: DeliveryCounts,
}

impl Publisher {
    pub fn new(kafka: &KafkaConfig) -> Result<Publisher, KafkaError> {
        let counts = DeliveryCounts::default();
        let producer = client_config(kafka)
            .set("enable.idempotence", "true")
            .set("linger.ms", "10")
            .create_with_context(counts.clone())
            .map_err(|source| KafkaError::Client { brokers: kafka.brokers.clone(), source })?;
        Ok(Publisher { producer, counts })
    }

    /// Queues one message, waiting while the producer's queue is full.
    pub fn send(&self, topic: &str, key: &str, payload: &str) -> Result<(), KafkaError> {
        let mut record = BaseRecord::to(topic).key(key).payload(payload);
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((RdKafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((error, _)) => return Err(KafkaError::Produce { topic: topic.into(), reason: error.to_string() }),
            }
        }
    }

    /// Waits until every queued message is acknowledged or failed; returns how many were
    /// acknowledged, or an error if any failed.
    pub fn finish(self, timeout: Duration) -> Result<u64, KafkaError> {
        self.producer
            .flush(timeout)
            .map_err(|e| KafkaError::Produce { topic: "(flush)".into(), reason: e.to_string() })?;
        let failed = self.counts.failed.load(Ordering::Relaxed);
        if failed > 0 {
            return Err(KafkaError::Produce {
                topic: "(several)".into(),
                reason: format!("{failed} message(s) not delivered"),
            });
        }
        Ok(self.counts.acked.load(Ordering::Relaxed))
    }
}
