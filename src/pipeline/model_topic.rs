//! Checkpoints of the streaming learner: the classifier's state at a learned frontier, with the
//! input offsets it has learned up to and the offsets whose outputs are published.
//!
//! A checkpoint is a classifier file (safetensors, readable by `dlpipe evaluate` and `predict`
//! and by `--init-model`) whose metadata also holds a [`CheckpointInfo`] as JSON under the key
//! `checkpoint`. Worker 0 writes them (every worker holds the same classifier) to the model
//! topic, a compacted topic, under the key `checkpoint/<group id>`, in a Kafka transaction that
//! also commits the published offsets for the consumer group (at-least-once delivery; with
//! exactly-once the sinks commit them with their outputs), and then to files in `snapshot_dir`.
//! The group's offsets never run ahead of a checkpoint. The writer's transactional id is the
//! group's, so a second pipeline of the same group fences the first.
//!
//! With a shadow classifier (`dlpipe promote --shadow`), its state goes in the same transaction,
//! right after the checkpoint, under `checkpoint/<group id>/shadow`; under exactly-once delivery
//! the run's worker count follows, under `workers/<group id>` ([`super::worker_ids`]).
//!
//! `dlpipe run` reads the newest checkpoint of its group at start-up ([`read_latest`]) and
//! resumes from it: the classifier and its prequential metrics continue, each partition is
//! read again from the checkpoint's learned offset, and records before the group's committed
//! offset are learned but not published again. So every labelled record is learned exactly
//! once across restarts, however the run stopped.

use super::heads::{LearnerState, Shadow};
use super::PipelineError;
use crate::config::KafkaConfig;
use crate::kafka::{client_config, with_retry, ReadsToEnd};
use crate::learn::{DriftConfig, PageHinkley, PageHinkleyState, Prequential, PrequentialState, SoftmaxRegression};
use crate::metrics::kafka::LagContext;
use crate::model::Manifest;
use crate::transfer::classifier::KEY_FEATURIZER_SHA256;
use dlpipe_operators::transactions::{
    abort_retrying, bounded, commit_retrying, is_fenced, is_fenced_or_fatal, outlived, outlived_message,
};
use dlpipe_operators::{CheckpointStore, ClassifierId, Epoch, WriteError};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The version of [`CheckpointInfo`] this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The metadata key holding the [`CheckpointInfo`] JSON.
pub const KEY_CHECKPOINT: &str = "checkpoint";
/// Largest checkpoint message, in bytes: the model topic is created to accept it (a classifier
/// of 1000 classes over 1280 features with AdaGrad is about 10 MiB).
pub const MAX_CHECKPOINT_BYTES: usize = 64 << 20;

/// What a checkpoint records besides the classifier.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointInfo {
    pub format_version: u32,
    pub group_id: String,
    pub input_topic: String,
    /// The learned frontier: every labelled record of the epochs before it is learned, none
    /// of later epochs (`u64::MAX` when written at the end of a run).
    pub frontier: Epoch,
    /// Per partition, the offset from which records are not yet learned.
    pub learned_offsets: BTreeMap<i32, i64>,
    /// Per partition, the offset from which outputs are not yet known to be published.
    pub published_offsets: BTreeMap<i32, i64>,
    pub prequential: PrequentialState,
    /// The drift detector's state, when it was on (absent in checkpoints written before there
    /// was one: the detector then starts afresh).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<PageHinkleyState>,
    /// Where the classifier started (older checkpoints: a new learner).
    #[serde(default = "ClassifierId::new_learner")]
    pub classifier: ClassifierId,
    /// The model-topic offset of the last promotion taken: a restart reads those after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promoted_through: Option<i64>,
    /// The shadow classifier, whose state is the message after this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowInfo>,
    pub written_at_ms: i64,
}

/// What a checkpoint records of its shadow besides the classifier.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShadowInfo {
    pub classifier: ClassifierId,
    pub prequential: PrequentialState,
}

impl CheckpointInfo {
    /// The checkpoint of `state` at the learned `frontier`, written now.
    pub fn new(
        state: &LearnerState,
        group_id: &str,
        input_topic: &str,
        frontier: Epoch,
        learned_offsets: BTreeMap<i32, i64>,
        published_offsets: BTreeMap<i32, i64>,
    ) -> CheckpointInfo {
        CheckpointInfo {
            format_version: FORMAT_VERSION,
            group_id: group_id.to_owned(),
            input_topic: input_topic.to_owned(),
            frontier,
            learned_offsets,
            published_offsets,
            prequential: state.prequential.state(),
            drift: state.drift.as_ref().map(PageHinkley::state),
            classifier: state.classifier.clone(),
            promoted_through: state.promoted_through,
            shadow: state
                .shadow
                .as_ref()
                .map(|s| ShadowInfo { classifier: s.classifier.clone(), prequential: s.metrics.state() }),
            written_at_ms: dlpipe_operators::records::now_ms(),
        }
    }
}

/// A checkpoint read back.
pub struct Checkpoint {
    pub info: CheckpointInfo,
    pub model: SoftmaxRegression,
    /// The shadow's classifier (when `info.shadow` says there is one).
    pub shadow_model: Option<SoftmaxRegression>,
    /// The classifier file's own metadata (featurizer, the checkpoint JSON, ...).
    pub metadata: BTreeMap<String, String>,
}

/// The key of a group's checkpoints in the model topic.
pub fn message_key(group_id: &str) -> String {
    format!("checkpoint/{group_id}")
}

/// The key of the shadow's state that follows a checkpoint.
pub fn shadow_key(group_id: &str) -> String {
    format!("checkpoint/{group_id}/shadow")
}

/// The metadata key of a shadow message: the frontier and time of its checkpoint.
const KEY_SHADOW_OF: &str = "shadow_of";

/// The bytes of the shadow's state written with the checkpoint `info`.
pub fn encode_shadow(shadow: &Shadow, info: &CheckpointInfo) -> Result<Vec<u8>, crate::learn::LearnError> {
    let of = BTreeMap::from([(KEY_SHADOW_OF.to_owned(), format!("{}@{}", info.frontier, info.written_at_ms))]);
    shadow.model.to_bytes(&of)
}

/// A checkpoint's bytes: the classifier file of `state` with `info` and `featurizer` in its
/// metadata.
pub fn encode(
    state: &LearnerState,
    info: &CheckpointInfo,
    featurizer: &BTreeMap<String, String>,
) -> Result<Vec<u8>, crate::learn::LearnError> {
    let mut metadata = featurizer.clone();
    metadata.insert("trained_by".into(), "stream".into());
    if let Some(accuracy) = state.prequential.accuracy() {
        metadata.insert("prequential_accuracy".into(), format!("{accuracy:.6}"));
    }
    metadata.insert(KEY_CHECKPOINT.into(), serde_json::to_string(info).expect("serialisable"));
    state.model.to_bytes(&metadata)
}

/// Why a checkpoint cannot be read, or cannot continue this run.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Classifier(#[from] crate::learn::LearnError),
    #[error("a classifier without checkpoint metadata ({KEY_CHECKPOINT:?})")]
    NoMetadata,
    #[error("the checkpoint metadata is not valid: {0}")]
    Metadata(serde_json::Error),
    #[error("checkpoint format version {0} is not supported (this build reads version {FORMAT_VERSION})")]
    Version(u32),
    /// Learned from another topic or model: its offsets or weights mean nothing here.
    #[error("{0}; start over with `dlpipe run --fresh`, or use another pipeline.group_id")]
    Mismatch(String),
    #[error("timed out reading the checkpoints in model topic {topic} (offsets {start}..{end})")]
    ReadTimeout { topic: String, start: i64, end: i64 },
    #[error("the newest checkpoint of group {group_id:?} in topic {topic}: {error}")]
    Newest { group_id: String, topic: String, error: Box<CheckpointError> },
}

impl Checkpoint {
    pub fn decode(bytes: &[u8]) -> Result<Checkpoint, CheckpointError> {
        let (model, metadata) = SoftmaxRegression::from_bytes(bytes)?;
        let json = metadata.get(KEY_CHECKPOINT).ok_or(CheckpointError::NoMetadata)?;
        let info: CheckpointInfo = serde_json::from_str(json).map_err(CheckpointError::Metadata)?;
        if info.format_version != FORMAT_VERSION {
            return Err(CheckpointError::Version(info.format_version));
        }
        Ok(Checkpoint { info, model, shadow_model: None, metadata })
    }

    /// The checkpoint with its shadow's state, if `bytes` (the shadow message that followed it)
    /// is the one written with it; a warning and no shadow otherwise.
    pub fn with_shadow(mut self, bytes: Option<&[u8]>) -> Checkpoint {
        if self.info.shadow.is_none() {
            return self;
        }
        let want = format!("{}@{}", self.info.frontier, self.info.written_at_ms);
        match bytes.map(SoftmaxRegression::from_bytes) {
            Some(Ok((model, metadata))) if metadata.get(KEY_SHADOW_OF) == Some(&want) => {
                self.shadow_model = Some(model)
            }
            found => {
                let found = found.map(|r| r.map(|(_, m)| m.get(KEY_SHADOW_OF).cloned()).map_err(|e| e.to_string()));
                tracing::warn!(
                    ?found,
                    checkpoint = want,
                    "the checkpoint's shadow is missing: the run goes on without one"
                );
                self.info.shadow = None;
            }
        }
        self
    }

    /// The restored shadow, with a prequential window of `window` outcomes.
    pub fn shadow(&self, window: usize) -> Option<Shadow> {
        let (info, model) = (self.info.shadow.as_ref()?, self.shadow_model.clone()?);
        let metrics = Prequential::from_state(&info.prequential, window);
        Some(Shadow { classifier: info.classifier.clone(), model, metrics })
    }

    /// Checks that this checkpoint can continue a run of `group_id` on `input_topic` with the
    /// features of `manifest`'s model.
    pub fn check(&self, group_id: &str, input_topic: &str, manifest: &Manifest) -> Result<(), CheckpointError> {
        if self.info.group_id != group_id || self.info.input_topic != input_topic {
            return Err(CheckpointError::Mismatch(format!(
                "the newest checkpoint of group {group_id:?} was learned from topic {:?} (group {:?}), not {input_topic:?}: \
                 its offsets mean nothing here",
                self.info.input_topic, self.info.group_id
            )));
        }
        let trained = self.metadata.get(KEY_FEATURIZER_SHA256).filter(|s| !s.is_empty());
        if let (Some(trained), Some(given)) = (trained, &manifest.sha256) {
            if trained != given {
                return Err(CheckpointError::Mismatch(format!(
                    "the checkpoint of group {group_id:?} was learned on features of another model (sha256 {trained}) \
                     than {} (sha256 {given})",
                    manifest.name
                )));
            }
        }
        if self.model.dim() != manifest.feature_dim {
            return Err(CheckpointError::Mismatch(format!(
                "the checkpoint of group {group_id:?} has {} features, model {} gives {}",
                self.model.dim(),
                manifest.name,
                manifest.feature_dim
            )));
        }
        Ok(())
    }

    /// The restored learner state's prequential metrics, with a window of `window` outcomes.
    pub fn prequential(&self, window: usize) -> Prequential {
        Prequential::from_state(&self.info.prequential, window)
    }

    /// The restored drift detector with `config`'s parameters: none when `config` turns it
    /// off, a new one when the checkpoint has none (written with the detector off).
    pub fn drift(&self, config: &DriftConfig) -> Option<PageHinkley> {
        let restored = |state| PageHinkley::from_state(state, config);
        config.detector().map(|new| self.info.drift.as_ref().map_or(new, restored))
    }
}

/// Messages read back per step when searching the model topic from its end.
const WINDOW: i64 = 64;

/// The newest checkpoint of `group_id` in the model `topic`, if the topic and one exist.
/// Reads the topic backwards from its end, a window of messages at a time (compaction keeps
/// the newest message of each key, so the search ends soon after the last compaction).
pub fn read_latest(kafka: &KafkaConfig, topic: &str, group_id: &str) -> Result<Option<Checkpoint>, PipelineError> {
    let consumer: BaseConsumer<ReadsToEnd> = client_config(kafka)
        .set("group.id", "dlpipe-checkpoint-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("receive.message.max.bytes", (MAX_CHECKPOINT_BYTES * 2).to_string())
        .create_with_context(ReadsToEnd)?;
    let metadata = crate::kafka::metadata(kafka, Some(topic))?;
    let exists =
        metadata.topics().iter().any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty());
    if !exists {
        return Ok(None);
    }
    let awaiting = format!("the offsets of model topic {topic} (its leader)");
    let (low, high) = with_retry(kafka, &awaiting, || consumer.fetch_watermarks(topic, 0, Duration::from_secs(10)))?;
    let (key, shadow_key) = (message_key(group_id), shadow_key(group_id));
    let deadline = Instant::now() + Duration::from_secs(kafka.retry_timeout_secs.max(10));
    let mut end = high;
    // The earliest shadow message of the windows already searched (after this one).
    let mut later_shadow: Option<Vec<u8>> = None;
    while end > low {
        let start = (end - WINDOW).max(low);
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(topic, 0, Offset::Offset(start))?;
        consumer.assign(&assignment)?;
        let mut newest: Option<(i64, Vec<u8>)> = None;
        let mut shadows: Vec<(i64, Vec<u8>)> = Vec::new();
        let read = read_window(&consumer, end, deadline, |offset, message_key, payload| {
            if message_key == Some(key.as_bytes()) {
                newest = Some((offset, payload.to_vec()));
            } else if message_key == Some(shadow_key.as_bytes()) {
                shadows.push((offset, payload.to_vec()));
            }
        })?;
        if !read {
            return Err(CheckpointError::ReadTimeout { topic: topic.to_owned(), start, end }.into());
        }
        if let Some((offset, bytes)) = newest {
            let checkpoint = Checkpoint::decode(&bytes).map_err(|e| CheckpointError::Newest {
                group_id: group_id.to_owned(),
                topic: topic.to_owned(),
                error: Box::new(e),
            })?;
            // Its shadow is the first shadow message after it (written in its transaction).
            let shadow = shadows.into_iter().find(|(o, _)| *o > offset).map(|(_, b)| b).or(later_shadow);
            return Ok(Some(checkpoint.with_shadow(shadow.as_deref())));
        }
        later_shadow = shadows.into_iter().next().map(|(_, b)| b).or(later_shadow);
        end = start;
    }
    Ok(None)
}

/// Reads the assigned window of a model topic up to offset `end` (exclusive) or its last stable
/// offset, handing each message's offset, key and payload to `each`. False if `deadline` passed
/// first (each caller names its own timeout).
pub(super) fn read_window(
    consumer: &BaseConsumer<ReadsToEnd>,
    end: i64,
    deadline: Instant,
    mut each: impl FnMut(i64, Option<&[u8]>, &[u8]),
) -> Result<bool, PipelineError> {
    loop {
        if Instant::now() > deadline {
            return Ok(false);
        }
        let message = match consumer.poll(Duration::from_millis(200)) {
            None => continue,
            // With read_committed, at the last stable offset.
            Some(Err(KafkaError::PartitionEOF(_))) => return Ok(true),
            Some(Err(error)) if crate::kafka::retry::is_retriable(&error) => continue,
            Some(Err(error)) => return Err(error.into()),
            Some(Ok(message)) => message,
        };
        if message.offset() >= end {
            return Ok(true);
        }
        each(message.offset(), message.key(), message.payload().unwrap_or_default());
        if message.offset() >= end - 1 {
            return Ok(true);
        }
    }
}

/// The model topic's settings: compacted (the newest checkpoint of each group is kept), segments
/// rolled every 10 minutes so that compaction can run, and room for a large classifier.
pub fn topic_configs() -> [(&'static str, &'static str); 3] {
    const MAX: &str = "67108864";
    const _: () = assert!(MAX_CHECKPOINT_BYTES == 67108864);
    [("cleanup.policy", "compact"), ("segment.ms", "600000"), ("max.message.bytes", MAX)]
}

/// Classifier files written next to the model topic: `classifier-v<updates>.safetensors`
/// for each new version, `latest.safetensors`, and the newest `retain` versions kept.
pub struct SnapshotFiles {
    pub dir: PathBuf,
    pub retain: usize,
}

/// The transactional id of a group's checkpoint writer: one per group, so that a second
/// pipeline of the same group fences the first (whose next checkpoint then fails for good).
pub fn writer_transactional_id(group_id: &str) -> String {
    format!("dlpipe-checkpoints-{group_id}")
}

/// A transactional producer for a group's checkpoints, initialised (which fences any earlier
/// writer of the group and aborts its open transaction).
pub fn writer_producer(kafka: &KafkaConfig, group_id: &str) -> Result<BaseProducer, PipelineError> {
    let id = writer_transactional_id(group_id);
    let producer: BaseProducer = client_config(kafka)
        .set("transactional.id", &id)
        .set("message.max.bytes", (MAX_CHECKPOINT_BYTES + (1 << 20)).to_string())
        .create()?;
    let awaiting = format!("the transaction coordinator of {id} (to fence earlier writers)");
    with_retry(kafka, &awaiting, || producer.init_transactions(Duration::from_secs(10)))?;
    Ok(producer)
}

/// Writes worker 0's checkpoints, of the learner's states the `checkpoint` operator cuts: in
/// one Kafka transaction sends each to the model topic and (at-least-once delivery) commits the
/// group's published offsets; then writes the files.
pub struct CheckpointWriter {
    /// Transactional, from [`writer_producer`]; made again from `kafka` when a transaction
    /// can be neither committed nor aborted.
    pub producer: BaseProducer,
    pub kafka: KafkaConfig,
    pub committer: Arc<BaseConsumer<LagContext>>,
    /// Whether the checkpoint's transaction commits the group's offsets (at-least-once); with
    /// exactly-once delivery the sinks commit them with the outputs.
    pub commit_offsets: bool,
    pub model_topic: String,
    pub group_id: String,
    pub input_topic: String,
    /// The featurizer's name and sha256, stored with each checkpoint.
    pub featurizer: BTreeMap<String, String>,
    pub files: Option<SnapshotFiles>,
    pub written: prometheus::IntCounter,
    pub write_seconds: prometheus::Histogram,
    /// Exactly-once: the run's worker count, registered again in every checkpoint transaction
    /// (see [`super::worker_ids`]).
    pub registered_workers: Option<usize>,
    last_file_version: Option<u64>,
}

impl CheckpointWriter {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        producer: BaseProducer,
        kafka: KafkaConfig,
        committer: Arc<BaseConsumer<LagContext>>,
        commit_offsets: bool,
        model_topic: String,
        group_id: String,
        input_topic: String,
        featurizer: BTreeMap<String, String>,
        files: Option<SnapshotFiles>,
        written: prometheus::IntCounter,
        write_seconds: prometheus::Histogram,
    ) -> CheckpointWriter {
        CheckpointWriter {
            producer,
            kafka,
            committer,
            commit_offsets,
            model_topic,
            group_id,
            input_topic,
            featurizer,
            files,
            written,
            write_seconds,
            registered_workers: None,
            last_file_version: None,
        }
    }

    /// Sends a checkpoint (and its shadow's state), and `offsets` for the group, in one
    /// transaction.
    fn send(
        &mut self,
        bytes: &[u8],
        shadow: Option<&[u8]>,
        offsets: Option<&TopicPartitionList>,
    ) -> Result<(), WriteError> {
        let timeout = Duration::from_secs(30);
        let group_id = self.group_id.clone();
        let (began, transaction_timeout) = (Instant::now(), crate::kafka::transaction_timeout(&self.kafka));
        let fenced = |what: &str, error: &KafkaError| {
            let open_for = began.elapsed();
            if outlived(error, open_for, transaction_timeout) {
                return WriteError::Expired(outlived_message(what, error, open_for, transaction_timeout));
            }
            WriteError::Fatal(format!(
                "{what}: {error}. Another `dlpipe run` of group {group_id:?} has started and fenced this one (two \
                 pipelines must not share a group_id); this one stops"
            ))
        };
        let classify = |what: &str, error: KafkaError| -> WriteError {
            if is_fenced_or_fatal(&error) {
                fenced(what, &error)
            } else {
                WriteError::Retry(format!("{what}: {error}"))
            }
        };
        self.producer.begin_transaction().map_err(|e| classify("cannot begin a checkpoint transaction", e))?;
        let (key, shadow_key) = (message_key(&self.group_id), shadow_key(&self.group_id));
        let send = |key: &String, payload: &[u8]| {
            self.producer.send(BaseRecord::to(&self.model_topic).key(key).payload(payload)).map_err(|(e, _)| e)
        };
        let registration =
            self.registered_workers.map(|w| (super::worker_ids::registry_key(&self.group_id), w.to_string()));
        let sent = send(&key, bytes)
            .and_then(|()| shadow.map_or(Ok(()), |shadow| send(&shadow_key, shadow)))
            .and_then(|()| registration.as_ref().map_or(Ok(()), |(key, workers)| send(key, workers.as_bytes())))
            .map_err(|e| classify(&format!("cannot send a checkpoint to {}", self.model_topic), e))
            .and_then(|()| match offsets {
                Some(list) => {
                    let group = self.committer.group_metadata().ok_or_else(|| {
                        WriteError::Fatal(format!("the consumer of group {:?} has no group metadata", self.group_id))
                    })?;
                    let what = "adding the group's offsets to a checkpoint";
                    bounded(what, timeout, || self.producer.send_offsets_to_transaction(list, &group, timeout))
                        .map_err(|e| classify("cannot add the group's offsets to the checkpoint", e))
                }
                None => Ok(()),
            })
            .and_then(|()| {
                commit_retrying(&self.producer, timeout)
                    .map_err(|e| classify(&format!("topic {} did not take the checkpoint", self.model_topic), e))
            });
        if let Err(WriteError::Retry(error)) = &sent {
            // Nothing of it becomes visible; the next cut tries again. A transaction that
            // cannot be aborted (a coordinator back from a crash without it) is left to a new
            // producer of the group's transactional id, whose initialisation aborts it.
            if let Err(abort) = abort_retrying(&self.producer, timeout) {
                let error = format!("{error}; aborting its transaction failed too");
                if is_fenced(&abort) {
                    return Err(fenced(&error, &abort));
                }
                tracing::warn!(%error, %abort, "renewing the checkpoint writer's producer");
                self.producer = writer_producer(&self.kafka, &self.group_id).map_err(|e| {
                    WriteError::Fatal(format!("{error}: {abort}; and no new producer could be made: {e:#}"))
                })?;
            }
        }
        sent
    }

    fn write_files(&mut self, version: u64, bytes: &[u8]) {
        let Some(files) = &self.files else { return };
        if self.last_file_version == Some(version) {
            return;
        }
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(&files.dir)?;
            std::fs::write(files.dir.join(format!("classifier-v{version:012}.safetensors")), bytes)?;
            let tmp = files.dir.join(format!("latest.safetensors.tmp{}", std::process::id()));
            std::fs::write(&tmp, bytes)?;
            std::fs::rename(&tmp, files.dir.join("latest.safetensors"))?;
            // The newest `retain` versions stay; names sort by version (zero-padded).
            let mut versions: Vec<PathBuf> = std::fs::read_dir(&files.dir)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("classifier-v") && n.ends_with(".safetensors"))
                })
                .collect();
            versions.sort();
            let excess = versions.len().saturating_sub(files.retain.max(1));
            for old in &versions[..excess] {
                std::fs::remove_file(old)?;
            }
            Ok(())
        };
        match write() {
            Ok(()) => self.last_file_version = Some(version),
            Err(error) => tracing::warn!(%error, dir = %files.dir.display(), "cannot write a classifier snapshot file"),
        }
    }
}

impl CheckpointStore for CheckpointWriter {
    type State = LearnerState;

    fn write(
        &mut self,
        state: &LearnerState,
        frontier: Epoch,
        learned: &BTreeMap<i32, i64>,
        published: &BTreeMap<i32, i64>,
    ) -> Result<(), WriteError> {
        let started = Instant::now();
        let (group, input) = (&self.group_id, &self.input_topic);
        let info = CheckpointInfo::new(state, group, input, frontier, learned.clone(), published.clone());
        let encoding = |e: crate::learn::LearnError| WriteError::Fatal(format!("cannot encode a checkpoint: {e}"));
        let bytes = encode(state, &info, &self.featurizer).map_err(encoding)?;
        let shadow = state.shadow.as_ref().map(|s| encode_shadow(s, &info)).transpose().map_err(encoding)?;
        let biggest = bytes.len().max(shadow.as_ref().map_or(0, Vec::len));
        if biggest > MAX_CHECKPOINT_BYTES {
            return Err(WriteError::Fatal(format!(
                "the checkpoint is {biggest} bytes, over the {MAX_CHECKPOINT_BYTES} the model topic accepts: fewer \
                 classes (learner.max_classes) or another optimizer make it smaller"
            )));
        }
        let mut list = TopicPartitionList::new();
        for (partition, offset) in published {
            list.add_partition_offset(&self.input_topic, *partition, Offset::Offset(*offset)).expect("valid offset");
        }
        let offsets = (self.commit_offsets && !published.is_empty()).then_some(&list);
        self.send(&bytes, shadow.as_deref(), offsets)?;
        self.write_files(state.model.updates(), &bytes);
        self.written.inc();
        self.write_seconds.observe(started.elapsed().as_secs_f64());
        tracing::debug!(frontier, version = state.model.updates(), bytes = bytes.len(), "checkpoint written");
        Ok(())
    }
}
