//! Kafka clients as dlpipe configures them, topic administration, start-up waits, and a publisher.
//!
//! Every call dlpipe makes while it starts (metadata, topic creation, committed offsets,
//! watermarks) goes through [`retry`]: a cluster that is still starting or electing
//! coordinators is waited for, a cluster that refuses dlpipe is reported with what to do.

pub mod retry;

use crate::config::KafkaConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};
use rdkafka::metadata::Metadata;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
pub use retry::{is_retriable, RetryPolicy};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    #[error("cannot create a Kafka client for {brokers}: {error}")]
    Client { brokers: String, error: RdKafkaError },
    // The Kafka error is part of the message (not a `source`), so it is not printed twice.
    #[error(
        "gave up waiting for {awaiting} at {brokers} after {waited:.1?} and {attempts} attempts; the last \
         error was {error}. Is the cluster up and reachable from here? (`scripts/kafka start` runs one \
         locally; DLPIPE_KAFKA_BROKERS points at another; kafka.retry_timeout_secs waits longer)"
    )]
    GaveUp { brokers: String, awaiting: String, waited: Duration, attempts: u32, error: Box<RdKafkaError> },
    #[error("Kafka at {brokers} refused dlpipe while it waited for {what}: {error}{hint}")]
    Refused {
        brokers: String,
        what: String,
        error: Box<RdKafkaError>,
        /// ": what to do", or empty.
        hint: String,
    },
    #[error("cannot create topic {topic}: {reason}")]
    CreateTopic { topic: String, reason: String },
    #[error(
        "topic {topic:?} does not exist on {brokers}: create it (with the partitions and replication \
         your cluster needs), or set pipeline.create_topics = true to let dlpipe create it"
    )]
    NoSuchTopic { topic: String, brokers: String },
    #[error("cannot produce to {topic}: {reason}")]
    Produce { topic: String, reason: String },
}

/// The base client configuration every dlpipe client starts from: brokers, client id, and the
/// user's extra librdkafka properties (which win).
///
/// With TLS and no CA configured, the CA bundle is probed at the system's usual places
/// (`ssl.ca.location = probe`): dlpipe's OpenSSL is built in and does not know where this
/// system keeps its CAs, which a managed cluster with a public certificate relies on.
pub fn client_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &kafka.brokers).set("client.id", &kafka.client_id);
    let tls = kafka.properties.get("security.protocol").is_some_and(|p| p.to_ascii_uppercase().ends_with("SSL"));
    let ca_given = ["ssl.ca.location", "ssl.ca.pem", "ssl.ca.certificate.stores"]
        .iter()
        .any(|key| kafka.properties.contains_key(*key));
    if tls && !ca_given {
        config.set("ssl.ca.location", "probe");
    }
    for (key, value) in &kafka.properties {
        config.set(key, value);
    }
    config
}

/// The transactional producers' `transaction.timeout.ms`: as `[kafka.properties]` sets it, else
/// librdkafka's default, a minute. (librdkafka refuses a value that is not a number.)
pub fn transaction_timeout(kafka: &KafkaConfig) -> Duration {
    let millis = kafka.properties.get("transaction.timeout.ms").and_then(|v| v.trim().parse().ok());
    Duration::from_millis(millis.unwrap_or(60_000))
}

/// The retry policy of `kafka`'s start-up calls.
pub fn retry_policy(kafka: &KafkaConfig) -> RetryPolicy {
    RetryPolicy::new(Duration::from_secs(kafka.retry_timeout_secs))
}

/// Runs one Kafka call under `kafka`'s retry policy (see [`retry::retry`]).
pub fn with_retry<T>(
    kafka: &KafkaConfig,
    awaiting: &str,
    attempt: impl FnMut() -> Result<T, RdKafkaError>,
) -> Result<T, KafkaError> {
    retry::retry(&retry_policy(kafka), &kafka.brokers, awaiting, attempt)
}

fn create_client<C: rdkafka::config::FromClientConfig>(
    config: &ClientConfig,
    kafka: &KafkaConfig,
) -> Result<C, KafkaError> {
    config.create().map_err(|error| KafkaError::Client { brokers: kafka.brokers.clone(), error })
}

/// Waits until the cluster answers a metadata request (all topics, or one), retrying while it
/// is unreachable or starting; fails at once when it refuses dlpipe's credentials or TLS.
pub fn metadata(kafka: &KafkaConfig, topic: Option<&str>) -> Result<Metadata, KafkaError> {
    let consumer: BaseConsumer = create_client(&client_config(kafka), kafka)?;
    with_retry(kafka, "a metadata answer from the brokers", || {
        // A refused password or certificate does not fail the request (it just times out): it
        // arrives as an error event, which polling serves (and librdkafka's log line with it).
        while let Some(event) = consumer.poll(Duration::ZERO) {
            if let Err(error) = event {
                if !is_retriable(&error) {
                    return Err(error);
                }
            }
        }
        consumer.fetch_metadata(topic, Duration::from_secs(2))
    })
}

/// Waits for the cluster (see [`metadata`]); the first thing every command that talks to Kafka
/// does, so that an unreachable or misconfigured cluster is one clear error.
pub fn wait_for_cluster(kafka: &KafkaConfig) -> Result<(), KafkaError> {
    let metadata = metadata(kafka, None)?;
    tracing::debug!(brokers = metadata.brokers().len(), "Kafka cluster answers");
    Ok(())
}

/// How dlpipe creates a topic it needs.
#[derive(Clone, Copy, Debug)]
pub struct TopicSpec<'a> {
    pub partitions: i32,
    pub replication_factor: i32,
    /// Topic properties such as `cleanup.policy = compact`.
    pub configs: &'a [(&'a str, &'a str)],
}

/// Creates `topic` as `spec` says unless it exists (then leaves it as it is), and waits until
/// its partitions have leaders.
pub fn ensure_topic(kafka: &KafkaConfig, topic: &str, spec: TopicSpec) -> Result<(), KafkaError> {
    ensure_topics(kafka, &[(topic, spec)])
}

/// [`ensure_topic`] for several topics, with one admin client and one request.
pub fn ensure_topics(kafka: &KafkaConfig, topics: &[(&str, TopicSpec)]) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = create_client(&client_config(kafka), kafka)?;
    let new_topics: Vec<NewTopic> = topics
        .iter()
        .map(|(topic, spec)| {
            let replication = TopicReplication::Fixed(spec.replication_factor);
            spec.configs.iter().fold(NewTopic::new(topic, spec.partitions, replication), |t, (k, v)| t.set(k, v))
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let names: Vec<&str> = topics.iter().map(|(topic, _)| *topic).collect();
    let awaiting = format!("the creation of topics {}", names.join(", "));
    with_retry(kafka, &awaiting, || {
        // The admin client drives its futures from its own background thread; no runtime needed.
        let results = futures_executor::block_on(admin.create_topics(&new_topics, &options))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => return Err(RdKafkaError::AdminOp(code)),
            }
        }
        Ok(())
    })?;
    let consumer: BaseConsumer = create_client(&client_config(kafka), kafka)?;
    for topic in names {
        topic_partitions(&consumer, kafka, topic, true)?;
    }
    Ok(())
}

/// The partitions of `topic`, once each has a leader. A topic the cluster does not know is
/// waited for while `may_appear` (another worker or process is creating it), else an error.
pub fn topic_partitions<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    kafka: &KafkaConfig,
    topic: &str,
    may_appear: bool,
) -> Result<Vec<i32>, KafkaError> {
    let awaiting = format!("the partition leaders of topic {topic}");
    // A topic nobody creates may still take a moment to show in every broker's metadata.
    let grace = std::time::Instant::now() + Duration::from_secs(10);
    let result = with_retry(kafka, &awaiting, || {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))?;
        let t = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .ok_or(RdKafkaError::MetadataFetch(RDKafkaErrorCode::UnknownTopicOrPartition))?;
        if let Some(error) = t.error() {
            let code = RDKafkaErrorCode::from(error);
            if code == RDKafkaErrorCode::UnknownTopicOrPartition && !may_appear && std::time::Instant::now() > grace {
                return Err(RdKafkaError::MetadataFetch(RDKafkaErrorCode::UnknownTopic));
            }
            return Err(RdKafkaError::MetadataFetch(code));
        }
        if t.partitions().is_empty() {
            return Err(RdKafkaError::MetadataFetch(RDKafkaErrorCode::UnknownTopicOrPartition));
        }
        if let Some(p) = t.partitions().iter().find(|p| p.leader() < 0 || p.error().is_some()) {
            let code = p.error().map(RDKafkaErrorCode::from).unwrap_or(RDKafkaErrorCode::LeaderNotAvailable);
            return Err(RdKafkaError::MetadataFetch(code));
        }
        Ok(t.partitions().iter().map(|p| p.id()).collect())
    });
    match result {
        // librdkafka's "unknown topic" (as opposed to the broker's UnknownTopicOrPartition) is
        // how the closure above says "missing, and nobody will create it".
        Err(KafkaError::Refused { error, .. })
            if matches!(*error, RdKafkaError::MetadataFetch(RDKafkaErrorCode::UnknownTopic)) =>
        {
            Err(KafkaError::NoSuchTopic { topic: topic.into(), brokers: kafka.brokers.clone() })
        }
        other => other,
    }
}

/// Counts broker acknowledgements of a [`Publisher`]'s messages.
#[derive(Clone, Default)]
pub struct DeliveryCounts {
    pub acked: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
}

impl ClientContext for DeliveryCounts {}

/// The context of consumers that read to a partition's end (`enable.partition.eof`): librdkafka
/// reports each end as an error event, which the default context logs at error level; here it
/// is news the caller handles, and other errors are logged as the default context does.
pub struct ReadsToEnd;

impl ClientContext for ReadsToEnd {
    fn error(&self, error: RdKafkaError, reason: &str) {
        if error.rdkafka_error_code() != Some(RDKafkaErrorCode::PartitionEOF) {
            tracing::error!(target: "librdkafka", "librdkafka: {error} {reason}");
        }
    }
}

impl ConsumerContext for ReadsToEnd {}

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
            .map_err(|error| KafkaError::Client { brokers: kafka.brokers.clone(), error })?;
        Ok(Publisher { producer, counts })
    }

    /// Queues one message, waiting while the producer's queue is full.
    pub fn send(&self, topic: &str, key: &str, payload: &str) -> Result<(), KafkaError> {
        self.send_with_headers(topic, key, payload.as_bytes(), &[])
    }

    /// Queues one message with any payload and headers (name, value).
    pub fn send_with_headers(
        &self,
        topic: &str,
        key: &str,
        payload: &[u8],
        headers: &[(&str, &str)],
    ) -> Result<(), KafkaError> {
        let mut record = BaseRecord::to(topic).key(key).payload(payload);
        if !headers.is_empty() {
            let owned = headers.iter().fold(rdkafka::message::OwnedHeaders::new(), |all, (key, value)| {
                all.insert(rdkafka::message::Header { key, value: Some(*value) })
            });
            record = record.headers(owned);
        }
        self.enqueue(topic, record)
    }

    /// Queues one message to `partition` rather than the key's: the benchmarks spread a backlog
    /// evenly over the workers with it.
    pub fn send_to_partition(&self, topic: &str, partition: i32, key: &str, payload: &str) -> Result<(), KafkaError> {
        self.enqueue(topic, BaseRecord::to(topic).partition(partition).key(key).payload(payload.as_bytes()))
    }

    fn enqueue(&self, topic: &str, mut record: BaseRecord<'_, str, [u8]>) -> Result<(), KafkaError> {
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
