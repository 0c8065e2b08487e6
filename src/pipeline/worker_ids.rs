//! The transactional ids of a group's workers under exactly-once delivery,
//! `dlpipe-<group id>-worker-<index>`, and the fencing of those a rescaled run no longer has.
//!
//! A worker index that a run does not have (the group ran with more workers before) would
//! keep the transaction it had open when its process died: nothing initialises its id again,
//! so `read_committed` readers of the output topics wait behind it until the broker aborts it
//! at `transaction.timeout.ms` (a minute by default; 64 s measured after a 3 to 1 rescale).
//!
//! **Registry:** how many worker indexes the group's exactly-once runs have used is recorded in
//! the model topic, keyed `workers/<group id>`, the count in decimal as payload (the newest
//! record counts; compaction keeps it). Every worker, before it makes its transactional
//! producer, reads the newest record and, if that does not cover its run's worker count,
//! writes one that does and waits for the broker's acknowledgement (idempotent, acks=all): so
//! no index ever has a transaction the registry does not know of, whichever process starts
//! first. Worker 0 then fences every registered index at or above the run's count
//! (initialises, then drops, a producer of its id: that aborts its open transaction) and
//! records the run's count. Worker 0's checkpoint transactions repeat the record, so that the
//! newest one stays within the last few messages of the topic and start-up reads little.
//! Readers of the model topic (checkpoints, promotions) go by key and skip these records.

use super::PipelineError;
use crate::config::{Config, KafkaConfig};
use crate::kafka::{client_config, topic_partitions, with_retry, Publisher, ReadsToEnd};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, Producer};
use rdkafka::{Offset, TopicPartitionList};
use std::ops::Range;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(10);

/// The transactional id of worker `index` of `group_id`'s runs.
pub fn transactional_id(group_id: &str, index: usize) -> String {
    format!("dlpipe-{group_id}-worker-{index}")
}

/// The key of a group's worker count in the model topic.
pub fn registry_key(group_id: &str) -> String {
    format!("workers/{group_id}")
}

/// Why the registry of worker indexes could not be read.
#[derive(Debug, thiserror::Error)]
pub enum WorkerIdsError {
    #[error("timed out reading the worker registrations in model topic {topic} (offsets {start}..{end})")]
    ReadTimeout { topic: String, start: i64, end: i64 },
    #[error(
        "the worker registration at offset {offset} of model topic {topic} is {payload:?}, not a worker count: \
         another program writes under dlpipe's key {key:?}"
    )]
    NotACount { topic: String, offset: i64, key: String, payload: String },
}

/// Before worker `index` of `peers` makes its transactional producer: registers the run's
/// worker count if the group's registry does not cover it, and (worker 0) fences the indexes
/// the group used before that this run does not have (see the module's doc).
pub(super) fn prepare(config: &Config, index: usize, peers: usize) -> Result<(), PipelineError> {
    let (kafka, p) = (&config.kafka, &config.pipeline);
    let registered = registered(kafka, &p.model_topic, &p.group_id, p.create_topics)?;
    if registered < peers {
        register(kafka, &p.model_topic, &p.group_id, peers)?;
    }
    if index == 0 && registered > peers {
        fence(kafka, &p.group_id, peers..registered)?;
        // Nothing of the removed indexes is open any more: the next start need not fence them.
        register(kafka, &p.model_topic, &p.group_id, peers)?;
    }
    Ok(())
}

/// How many transactional ids are fenced at once: fencing one whose transaction is open takes
/// about 2 s (the coordinator aborts it first), mostly waiting.
const FENCE_AT_ONCE: usize = 8;

/// Fences the transactional ids of worker `indexes` of `group_id`: initialising a producer
/// with an id aborts its open transaction and stops its earlier producers for good.
fn fence(kafka: &KafkaConfig, group_id: &str, indexes: Range<usize>) -> Result<(), PipelineError> {
    let started = Instant::now();
    let (count, span) = (indexes.len(), tracing::Span::current());
    let indexes: Vec<usize> = indexes.collect();
    for chunk in indexes.chunks(FENCE_AT_ONCE) {
        std::thread::scope(|scope| {
            let fencing: Vec<_> = chunk
                .iter()
                .map(|&index| {
                    let span = span.clone();
                    scope.spawn(move || span.in_scope(|| fence_one(kafka, group_id, index)))
                })
                .collect();
            fencing.into_iter().try_for_each(|f| f.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
        })?;
    }
    tracing::info!(count, seconds = started.elapsed().as_secs_f64(), "fenced the removed worker indexes");
    Ok(())
}

fn fence_one(kafka: &KafkaConfig, group_id: &str, index: usize) -> Result<(), PipelineError> {
    let id = transactional_id(group_id, index);
    let producer: BaseProducer = client_config(kafka).set("transactional.id", &id).create()?;
    let awaiting = format!("the transaction coordinator of {id} (to fence a removed worker index)");
    with_retry(kafka, &awaiting, || producer.init_transactions(TIMEOUT))?;
    tracing::info!(
        transactional_id = id,
        "fenced the transactional id of a worker index this run does not have (its open transaction is aborted)"
    );
    Ok(())
}

/// Records in the model `topic` that `group_id`'s runs have used `workers` worker indexes, and
/// waits for the broker to acknowledge it.
fn register(kafka: &KafkaConfig, topic: &str, group_id: &str, workers: usize) -> Result<(), PipelineError> {
    let publisher = Publisher::new(kafka)?;
    publisher.send(topic, &registry_key(group_id), &workers.to_string())?;
    publisher.finish(Duration::from_secs(kafka.retry_timeout_secs.max(10)))?;
    tracing::info!(topic, workers, "registered the run's worker indexes");
    Ok(())
}

/// The newest worker count registered for `group_id` in the model `topic` (0 if none). Waits
/// for the topic while another worker may be creating it (`may_appear`). Reads the topic
/// backwards from its end, in growing windows, until a registration is found.
pub fn registered(kafka: &KafkaConfig, topic: &str, group_id: &str, may_appear: bool) -> Result<usize, PipelineError> {
    let consumer: BaseConsumer<ReadsToEnd> = client_config(kafka)
        .set("group.id", "dlpipe-worker-registry-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("receive.message.max.bytes", (super::model_topic::MAX_CHECKPOINT_BYTES * 2).to_string())
        .create_with_context(ReadsToEnd)?;
    topic_partitions(&consumer, kafka, topic, may_appear)?;
    let awaiting = format!("the offsets of model topic {topic} (its leader)");
    let (low, high) = with_retry(kafka, &awaiting, || consumer.fetch_watermarks(topic, 0, TIMEOUT))?;
    let key = registry_key(group_id);
    let deadline = Instant::now() + Duration::from_secs(kafka.retry_timeout_secs.max(10));
    // Checkpoint transactions end with a registration: the newest is usually in the first window.
    let (mut end, mut window) = (high, 4);
    while end > low {
        let start = (end - window).max(low);
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(topic, 0, Offset::Offset(start))?;
        consumer.assign(&assignment)?;
        let mut newest: Option<(i64, Vec<u8>)> = None;
        let read = super::model_topic::read_window(&consumer, end, deadline, |offset, message_key, payload| {
            if message_key == Some(key.as_bytes()) {
                newest = Some((offset, payload.to_vec()));
            }
        })?;
        if !read {
            return Err(WorkerIdsError::ReadTimeout { topic: topic.to_owned(), start, end }.into());
        }
        if let Some((offset, payload)) = newest {
            let payload = String::from_utf8_lossy(&payload).into_owned();
            return payload.trim().parse().map_err(|_| {
                WorkerIdsError::NotACount { topic: topic.to_owned(), offset, key: key.clone(), payload }.into()
            });
        }
        (end, window) = (start, (window * 2).min(64));
    }
    Ok(0)
}
