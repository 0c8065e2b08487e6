//! Kafka set-up of one worker: the topics, its consumers and producer, and where each of its
//! partitions starts (one [`PartitionOffsets`] look-up for the input and the feedback topic).
//! Every call waits out a cluster that is still electing leaders or loading coordinators
//! (`kafka.retry_timeout_secs`), and fails with what to do otherwise.

use super::model_topic::{self, Checkpoint};
use super::{worker_ids, PipelineError};
use crate::config::{Config, DeliveryGuarantee, KafkaConfig, StartFrom};
use crate::kafka::{client_config, ensure_topics, topic_partitions, with_retry, TopicSpec};
use crate::metrics::kafka::{LagContext, STATISTICS_INTERVAL_MS};
use crate::metrics::Metrics;
use dlpipe_operators::records::InputSpec;
use dlpipe_operators::{
    AssignedConsumer, CounterByLabel, Epoch, EpochPolicy, FeedbackJoinMetrics, PartitionRange, Position, SinkContext,
    SourceMetrics, SourceSpec,
};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::producer::{BaseProducer, Producer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(10);

/// Creates the topics the pipeline uses that do not exist yet (worker 0, with create_topics).
pub(super) fn create_topics(config: &Config) -> Result<(), PipelineError> {
    let p = &config.pipeline;
    let properties = p.topic_properties();
    let shared: Vec<(&str, &str)> = properties.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let spec =
        TopicSpec { partitions: p.topic_partitions, replication_factor: p.topic_replication_factor, configs: &shared };
    let model_configs: Vec<(&str, &str)> = model_topic::topic_configs().into_iter().chain(shared.clone()).collect();
    let model_spec = TopicSpec { partitions: 1, configs: &model_configs, ..spec };
    let mut topics = vec![
        (p.input_topic.as_str(), spec),
        (p.predictions_topic.as_str(), spec),
        (p.dead_letter_topic.as_str(), spec),
        (p.model_topic.as_str(), model_spec),
    ];
    for topic in [&p.features_topic, &p.feedback_topic].into_iter().filter(|t| !t.is_empty()) {
        topics.push((topic.as_str(), spec));
    }
    Ok(ensure_topics(&config.kafka, &topics)?)
}

/// The input consumer of worker `index` of `peers`, and its partitions (p mod peers = index).
/// Topics that worker 0 is creating may take a moment to appear; with create_topics off every
/// topic must already exist (worker 0 checks them here, not at the first send).
pub(super) fn input_consumer(
    config: &Config,
    index: usize,
    peers: usize,
    metrics: &Metrics,
) -> Result<(Arc<BaseConsumer<LagContext>>, Vec<i32>), PipelineError> {
    let p = &config.pipeline;
    let consumer = Arc::new(assigned_consumer(config, &index.to_string(), &p.input_topic, metrics)?);
    let partitions = topic_partitions(&consumer, &config.kafka, &p.input_topic, p.create_topics)?;
    if index == 0 && !p.create_topics {
        let optional = [&p.features_topic, &p.feedback_topic].into_iter().filter(|t| !t.is_empty());
        for topic in [&p.predictions_topic, &p.dead_letter_topic, &p.model_topic].into_iter().chain(optional) {
            topic_partitions(&consumer, &config.kafka, topic, false)?;
        }
    }
    let mine = partitions.into_iter().filter(|p| *p as usize % peers == index).collect();
    Ok((consumer, mine))
}

/// The producer of worker `index` of `peers`' outputs. With exactly-once delivery it is
/// transactional and initialised, which fences an earlier instance of the worker (aborting its
/// open transaction): make it before reading the committed offsets, so no zombie commits behind
/// them. Before it, the worker's index is registered, and worker 0 fences the indexes this run
/// no longer has ([`worker_ids`]).
pub(super) fn output_producer(
    config: &Config,
    index: usize,
    peers: usize,
) -> Result<BaseProducer<SinkContext>, PipelineError> {
    if config.pipeline.delivery == DeliveryGuarantee::ExactlyOnce {
        worker_ids::prepare(config, index, peers)?;
    }
    Ok(match config.pipeline.delivery {
        DeliveryGuarantee::AtLeastOnce => client_config(&config.kafka)
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .create_with_context(SinkContext::default())?,
        DeliveryGuarantee::ExactlyOnce => transactional_producer(&config.kafka, &config.pipeline.group_id, index)?,
    })
}

/// The worker's input partitions, assigned at their starts.
pub(super) struct Input {
    pub assigned: AssignedConsumer<LagContext>,
    /// What the source reads, and how it stamps it.
    pub source: SourceSpec,
    /// Where learning and publishing start in each partition.
    pub starts: Vec<Position>,
}

/// Assigns `consumer` to `partitions` of the input, each from where `learned` and the group's
/// committed offset say (see [`partition_ranges`]), and logs what a restart replays.
pub(super) fn assign_input(
    consumer: &Arc<BaseConsumer<LagContext>>,
    config: &Config,
    index: usize,
    partitions: &[i32],
    learned: LearnFrom,
) -> Result<Input, PipelineError> {
    let (ranges, starts) = partition_ranges(&**consumer, config, partitions, learned)?;
    let assigned = AssignedConsumer::assign(Arc::clone(consumer), &config.pipeline.input_topic, &ranges)?;
    tracing::info!(worker = index, partitions = ?partitions, "assigned partitions");
    for s in starts.iter().filter(|s| s.learned != s.published) {
        let (what, from, to) = if s.learned < s.published {
            ("learned again, not published again", s.learned, s.published)
        } else {
            ("published, not learned again", s.published, s.learned)
        };
        tracing::info!(worker = index, partition = s.partition, from, to, "records before the checkpoint: {what}");
    }
    let p = &config.pipeline;
    let source = SourceSpec {
        topic: p.input_topic.clone(),
        partitions: ranges,
        epochs: p.epochs,
        max_backlog: p.max_backlog,
        max_poll: 256,
        input: InputSpec { format: p.input_format, max_image_bytes: config.image.max_encoded_bytes },
    };
    Ok(Input { assigned, source, starts })
}

/// A partition's offsets: the group's committed offset (if any) and the watermarks.
struct PartitionOffsets {
    partition: i32,
    committed: Option<i64>,
    low: i64,
    high: i64,
}

impl PartitionOffsets {
    /// Of each of `partitions` of `topic`, for group `group`.
    fn of<C: ConsumerContext>(
        consumer: &BaseConsumer<C>,
        kafka: &KafkaConfig,
        topic: &str,
        group: &str,
        partitions: &[i32],
    ) -> Result<Vec<PartitionOffsets>, PipelineError> {
        let mut list = TopicPartitionList::new();
        for partition in partitions {
            list.add_partition(topic, *partition);
        }
        let awaiting = format!("the committed offsets of group {group:?} on {topic} (its group coordinator)");
        let committed = with_retry(kafka, &awaiting, || consumer.committed_offsets(list.clone(), TIMEOUT))?;
        partitions
            .iter()
            .map(|&partition| {
                let awaiting = format!("the offsets of partition {partition} of topic {topic} (its leader)");
                let (low, high) =
                    with_retry(kafka, &awaiting, || consumer.fetch_watermarks(topic, partition, TIMEOUT))?;
                let committed = committed.find_partition(topic, partition).and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o.clamp(low, high)),
                    _ => None,
                });
                Ok(PartitionOffsets { partition, committed, low, high })
            })
            .collect()
    }

    /// Where reading starts by `start_from`: the committed offset (the earliest without
    /// one), the earliest, or the end.
    fn start(&self, start_from: StartFrom) -> i64 {
        match (start_from, self.committed) {
            (StartFrom::Committed, Some(committed)) => committed,
            (StartFrom::Committed | StartFrom::Earliest, _) => self.low,
            (StartFrom::Latest, _) => self.high,
        }
    }
}

/// Where the classifier's learning starts in each partition.
#[derive(Clone, Copy)]
pub(super) enum LearnFrom<'a> {
    /// A checkpoint's learned offsets (a partition it does not know, added since, from its
    /// earliest offset).
    Checkpoint(&'a BTreeMap<i32, i64>),
    /// Each partition's earliest offset.
    Earliest,
    /// Where publishing starts.
    Published,
}

impl LearnFrom<'_> {
    /// Where a run that `continues` (from `restored`, if found) learns from.
    pub(super) fn of(restored: Option<&Checkpoint>, continues: bool, start_from: StartFrom) -> LearnFrom<'_> {
        match restored {
            Some(checkpoint) => LearnFrom::Checkpoint(&checkpoint.info.learned_offsets),
            // Continuing, with no checkpoint: offsets the group committed are not in any
            // classifier (an older dlpipe's, or a run that stopped before its first
            // checkpoint), so learning starts at the beginning.
            None if continues && start_from == StartFrom::Committed => LearnFrom::Earliest,
            None => LearnFrom::Published,
        }
    }
}

/// A consumer of the group for partitions the caller assigns (no subscription, no automatic
/// commits), reporting `topic`'s lag for `worker`.
fn assigned_consumer(
    config: &Config,
    worker: &str,
    topic: &str,
    metrics: &Metrics,
) -> Result<BaseConsumer<LagContext>, PipelineError> {
    let lag = LagContext { lag: metrics.consumer_lag.clone(), worker: worker.to_owned(), topic: topic.to_owned() };
    Ok(client_config(&config.kafka)
        .set("group.id", &config.pipeline.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("statistics.interval.ms", STATISTICS_INTERVAL_MS)
        .create_with_context(lag)?)
}

/// What the feedback source and join of one worker need.
pub(super) struct FeedbackReader {
    pub consumer: AssignedConsumer<LagContext>,
    pub spec: SourceSpec,
    pub retention: Epoch,
    pub source_metrics: SourceMetrics,
    pub join_metrics: FeedbackJoinMetrics,
}

/// Worker `index`'s share of the feedback topic (partition p to worker p mod `peers`, as the
/// input's). Continuing from a checkpoint with time epochs, it starts at the feedback that
/// came within the retention before the checkpoint's cut (found by Kafka timestamp): what the
/// join still held then, so that labels waiting for images read again after the restart are
/// not lost, and older feedback is not processed again. Otherwise from where `start_from`
/// says: the group's committed offset of the feedback topic (the earliest where it has none),
/// the earliest, or the end.
pub(super) fn feedback_reader(
    config: &Config,
    index: usize,
    peers: usize,
    worker_label: &str,
    metrics: &Metrics,
    restored: Option<&Checkpoint>,
) -> Result<FeedbackReader, PipelineError> {
    let (kafka, p) = (&config.kafka, &config.pipeline);
    let topic = p.feedback_topic.as_str();
    let consumer = assigned_consumer(config, worker_label, topic, metrics)?;
    let partitions: Vec<i32> = topic_partitions(&consumer, kafka, topic, p.create_topics)?
        .into_iter()
        .filter(|partition| *partition as usize % peers == index)
        .collect();
    let retention = p.feedback_retention.epochs(p.epochs)?;
    let offsets = PartitionOffsets::of(&consumer, kafka, topic, &p.group_id, &partitions)?;
    let retained_from = match (restored, p.epochs) {
        (Some(checkpoint), EpochPolicy::Time { millis }) if !partitions.is_empty() => {
            // The cut's time: its frontier's epoch start (`Epoch::MAX` for the final checkpoint
            // of a run that ended: then when it was written).
            let cut_ms =
                checkpoint.info.frontier.saturating_mul(millis).min(checkpoint.info.written_at_ms.max(0) as u64);
            let from_ms = cut_ms.saturating_sub(retention.saturating_mul(millis));
            let mut times = TopicPartitionList::new();
            for partition in &partitions {
                times.add_partition_offset(topic, *partition, Offset::Offset(from_ms.min(i64::MAX as u64) as i64))?;
            }
            let awaiting = format!("the offsets of {topic} by time (its leaders)");
            Some(with_retry(kafka, &awaiting, || consumer.offsets_for_times(times.clone(), TIMEOUT))?)
        }
        _ => None,
    };
    let ranges: Vec<PartitionRange> = offsets
        .iter()
        .map(|o| {
            let by_time =
                retained_from.as_ref().and_then(|l| l.find_partition(topic, o.partition)).map(|e| match e.offset() {
                    Offset::Offset(at) => at.clamp(o.low, o.high),
                    // No message at or after that time.
                    _ => o.high,
                });
            let start = by_time.unwrap_or_else(|| o.start(p.start_from));
            PartitionRange { partition: o.partition, start, end: p.stop_at_end.then_some(o.high) }
        })
        .collect();
    let consumer = AssignedConsumer::assign(Arc::new(consumer), topic, &ranges)?;
    tracing::info!(worker = index, partitions = ?partitions, topic, "assigned feedback partitions");
    let consumed = CounterByLabel::new(metrics.records_consumed.clone(), vec![worker_label.to_owned(), topic.into()]);
    Ok(FeedbackReader {
        consumer,
        spec: SourceSpec {
            topic: topic.into(),
            partitions: ranges,
            epochs: p.epochs,
            max_backlog: 1,
            max_poll: 256,
            input: InputSpec::JSON_URIS,
        },
        retention,
        source_metrics: SourceMetrics { consumed },
        join_metrics: metrics.feedback_join(index),
    })
}

/// Worker `index`'s transactional producer for exactly-once delivery, initialised: that fences
/// an earlier instance of the worker (aborting its open transaction).
pub(super) fn transactional_producer(
    kafka: &KafkaConfig,
    group_id: &str,
    index: usize,
) -> Result<BaseProducer<SinkContext>, PipelineError> {
    let id = worker_ids::transactional_id(group_id, index);
    let producer: BaseProducer<SinkContext> = client_config(kafka)
        .set("transactional.id", &id)
        .set("linger.ms", "5")
        .create_with_context(SinkContext::default())?;
    let awaiting = format!("the transaction coordinator of {id}");
    with_retry(kafka, &awaiting, || producer.init_transactions(TIMEOUT))?;
    Ok(producer)
}

/// Where each partition starts and (with stop-at-end: the high watermark) ends.
///
/// Publishing starts at the group's committed offset (else the end `start_from` chooses),
/// learning where `learned` says; reading starts at the lower of the two.
fn partition_ranges<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    config: &Config,
    partitions: &[i32],
    learned: LearnFrom,
) -> Result<(Vec<PartitionRange>, Vec<Position>), PipelineError> {
    let p = &config.pipeline;
    let offsets = PartitionOffsets::of(consumer, &config.kafka, &p.input_topic, &p.group_id, partitions)?;
    Ok(offsets
        .iter()
        .map(|o| {
            let published = o.start(p.start_from);
            let learned = match learned {
                LearnFrom::Checkpoint(offsets) => {
                    offsets.get(&o.partition).map_or(o.low, |at| (*at).clamp(o.low, o.high))
                }
                LearnFrom::Earliest => o.low,
                LearnFrom::Published => published,
            };
            let range = PartitionRange {
                partition: o.partition,
                start: learned.min(published),
                end: p.stop_at_end.then_some(o.high),
            };
            (range, Position { partition: o.partition, learned, published })
        })
        .unzip())
}
