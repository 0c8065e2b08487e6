//! dlpipe's configuration: one TOML file, one struct per section, every key optional with the
//! default documented in `configs/local.toml`. Unknown keys are errors, so a typo never silently
//! falls back to a default.
//!
//! Relative paths in a config file (`model.dir`, `pipeline.snapshot_dir`, `train.feature_cache`,
//! `fetch.file_root(s)`, a `model.name` that is a file: [`PATH_KEYS`]) are relative to the
//! file's folder, never the working directory: `configs/local.toml` says `dir = "../models"`,
//! and `dlpipe -c /opt/dlpipe/configs/local.toml` finds `/opt/dlpipe/models` from anywhere.
//! The built-in defaults (no file, or a key the file leaves out) and `DLPIPE__*` variables are
//! relative to the working directory, as command-line flags are: the defaults suit a run from
//! the clone (or a release's root), and a variable is set where relative means the working
//! directory.

use crate::fetch::address::NetworkError;
use crate::fetch::FetchConfig;
use crate::image::ImageLimits;
use crate::learn::{AdagradConfig, ClassWeights, DriftConfig, LearnError, LearnerConfig, OptimizerConfig};
use dlpipe_operators::records::InputFormat;
use dlpipe_operators::EpochPolicy;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

mod layers;
mod paths;
pub use layers::{is_secret_key, Layered, Source, ENV_PREFIX};
pub use paths::PATH_KEYS;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub model: ModelConfig,
    pub image: ImageLimits,
    pub kafka: KafkaConfig,
    pub pipeline: PipelineConfig,
    pub fetch: FetchConfig,
    pub learner: LearnerConfig,
    pub drift: DriftConfig,
    pub train: TrainConfig,
    pub metrics: MetricsConfig,
    pub cluster: ClusterConfig,
}

/// Defaults of `dlpipe train` (each has a command-line flag too).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Share of each class held out for testing, in [0, 1).
    pub test_split: f64,
    /// Seed of the split and of the epochs' shuffles.
    pub seed: u64,
    /// Passes over the training set.
    pub epochs: usize,
    /// The optimizer `dlpipe train` uses in place of `learner.optimizer` (the rest of
    /// `[learner]` applies as it is). Many passes over a fixed set want smaller steps than one
    /// pass over a stream.
    pub optimizer: OptimizerConfig,
    /// "none", "balanced" (n / (classes × n_c)), or "class=weight,class=weight", in place of
    /// `learner.class_weights` (as `optimizer`).
    pub class_weights: ClassWeights,
    /// Folder of the feature cache; empty turns it off.
    pub feature_cache: PathBuf,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            test_split: 0.2,
            seed: 42,
            epochs: 10,
            optimizer: OptimizerConfig::Adagrad(AdagradConfig { learning_rate: 0.01, ..AdagradConfig::default() }),
            class_weights: ClassWeights::None,
            feature_cache: ".cache/features".into(),
        }
    }
}

/// Which classifier produces the predictions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadKind {
    /// Online logistic regression on the CNN's features, learning from labelled records.
    OnlineLr,
    /// The pretrained model's own (ImageNet) classes.
    Imagenet,
}

/// What a consumer of dlpipe's output topics sees after a crash.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum DeliveryGuarantee {
    /// Every record's output at least once: after a crash, outputs since the last checkpoint
    /// (or commit) are published again. Outputs are sent as soon as they are ready.
    AtLeastOnce,
    /// Every record's output exactly once for consumers reading committed messages
    /// (`isolation.level=read_committed`): each worker publishes an epoch's outputs and commits
    /// its input offsets in one Kafka transaction.
    ExactlyOnce,
}

impl std::fmt::Display for DeliveryGuarantee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeliveryGuarantee::AtLeastOnce => "at_least_once",
            DeliveryGuarantee::ExactlyOnce => "exactly_once",
        })
    }
}

/// Where records are read from: the committed offsets of the group, or an end of the topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartFrom {
    /// The group's committed offsets; the earliest offset for partitions without one.
    Committed,
    Earliest,
    Latest,
}

/// How long the feedback join keeps what waits for its other half.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Retention {
    /// Wall-clock seconds (time epochs only: rounded up to whole epochs).
    Seconds(u64),
    /// Epochs.
    Epochs(u64),
}

impl Retention {
    /// The retention in epochs of `policy`, or why it has none.
    pub fn epochs(self, policy: EpochPolicy) -> Result<u64, ConfigError> {
        let epochs = match (self, policy) {
            (Retention::Epochs(n), _) => n,
            (Retention::Seconds(s), EpochPolicy::Time { millis }) => s.saturating_mul(1000).div_ceil(millis.max(1)),
            (Retention::Seconds(_), EpochPolicy::Offsets { .. }) => {
                return Err(invalid_value(
                    "pipeline.feedback_retention is in seconds, but offset epochs have no duration: give it in \
                     epochs, e.g. feedback_retention = { epochs = 100 }",
                ))
            }
        };
        if epochs == 0 {
            return Err(invalid_value("pipeline.feedback_retention must be at least one epoch"));
        }
        Ok(epochs)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineConfig {
    /// Topic of image records (`{"id","uri","label"?}` or bare URIs).
    pub input_topic: String,
    /// How the input topic carries images: `json` (records with a `uri` to fetch or a base64
    /// `image`, or bare URIs) or `raw` (the message value is the image's bytes, the id and label
    /// are the `dlpipe-id` and `dlpipe-label` headers).
    pub input_format: InputFormat,
    /// Topic predictions are published to, keyed by record id.
    pub predictions_topic: String,
    /// Topic of inputs that could not be processed.
    pub dead_letter_topic: String,
    /// Topic that also gets each predicted record's features (`{"id","uri","model",
    /// "model_sha256","dim","features":[...],...}`), keyed by id; "" for none.
    pub features_topic: String,
    /// Topic of labels that arrive after (or before) their images, `{"id","label","ts"?}`,
    /// joined to the images' features on id (online learner only); "" for none.
    pub feedback_topic: String,
    /// How long an image's features wait for their label, and a label for its image:
    /// `{ seconds = 600 }` (time epochs) or `{ epochs = 600 }`.
    pub feedback_retention: Retention,
    /// Compacted topic of the learner's checkpoints (key `checkpoint/<group_id>`).
    pub model_topic: String,
    /// Consumer group whose offsets record what has been published; also names the
    /// checkpoints a restart continues from.
    pub group_id: String,
    pub start_from: StartFrom,
    /// Stop once every partition is read up to the end offset it had at start-up.
    pub stop_at_end: bool,
    /// `at_least_once` or `exactly_once` (transactions; see [`DeliveryGuarantee`]).
    pub delivery: DeliveryGuarantee,
    /// Exactly-once: the longest an output waits for its epoch to close before it is
    /// committed in a transaction of its own (with the offsets below it), in milliseconds; 0
    /// commits whole epochs only. Bounds how long a quiet partition, which holds an offset
    /// epoch open, hides other records' predictions from read_committed readers.
    pub partial_commit_ms: u64,
    /// Epochs: `{ by = "time", millis = 1000 }` or `{ by = "offsets", records = 64 }`.
    pub epochs: EpochPolicy,
    pub head: HeadKind,
    /// Classes per prediction.
    pub top_k: usize,
    /// Records of one worker in the pipeline at once (read but not yet published).
    pub max_backlog: usize,
    /// Records of one worker being fetched and decoded at once, in each lane (labelled and
    /// unlabelled records are prepared apart).
    pub max_decoding: usize,
    /// Niceness of the decoding threads (rayon's pool), 0-19: below the model's threads, so
    /// that decoding takes the cores the model leaves rather than stalling its parallel
    /// regions; 0 treats them alike.
    pub decode_nice: i32,
    /// Encoded bytes held between fetching and decoding, by all workers of a process together;
    /// fetch threads wait for room beyond it (one larger input still goes through, alone).
    pub max_fetched_bytes: u64,
    /// Longest a record waits for its micro-batch to fill, in milliseconds.
    pub max_batch_wait_ms: u64,
    /// Create missing topics (input, outputs, model) at start-up. Off for clusters whose topics
    /// are managed elsewhere: then a missing (say, misspelt) input topic is an error, never a
    /// new empty topic.
    pub create_topics: bool,
    /// Partitions of the topics dlpipe creates (not the model topic: it has one).
    pub topic_partitions: i32,
    /// Replication factor of the topics dlpipe creates: 1 for the local single broker, 3 for a
    /// production cluster.
    pub topic_replication_factor: i32,
    /// `min.insync.replicas` of the topics dlpipe creates: how many replicas must have a write
    /// before the broker acknowledges it (dlpipe's producers all wait for every in-sync replica).
    /// 0 leaves the cluster's default; 2 with 3 replicas survives one broker down without
    /// losing an acknowledged record.
    pub topic_min_insync_replicas: i32,
    /// Checkpoint the online learner (model topic, snapshot file, the group's offsets) every
    /// this many epochs. 0 turns checkpoints off: a restart then starts a new classifier at
    /// the group's committed offsets.
    #[serde(alias = "snapshot_every_epochs")]
    pub checkpoint_every_epochs: u64,
    /// Folder of classifier snapshot files (one per checkpoint with a new version, and
    /// `latest.safetensors`); empty for none.
    pub snapshot_dir: PathBuf,
    /// Snapshot files kept (the newest versions).
    pub snapshot_retain: usize,
    /// Seconds between one-line status logs.
    pub status_interval_secs: u64,
    /// Labelled records in the learner's recent prequential window (the "recent" accuracy and
    /// log-loss beside the whole run's); 0 keeps no window.
    pub prequential_window: usize,
    /// A worker whose published frontier has not moved for this many seconds while it has
    /// records in flight is stalled: `dlpipe_pipeline_stalled_seconds` says so, `/readyz`
    /// answers 503 and the status line names what it waits for. 0 turns the check off.
    pub stall_after_secs: u64,
}

impl PipelineConfig {
    /// Properties every topic dlpipe creates gets from this section (beside a topic's own).
    pub fn topic_properties(&self) -> Vec<(&'static str, String)> {
        let mut properties = Vec::new();
        if self.topic_min_insync_replicas > 0 {
            properties.push(("min.insync.replicas", self.topic_min_insync_replicas.to_string()));
        }
        properties
    }
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            input_topic: "images".into(),
            input_format: InputFormat::Json,
            predictions_topic: "predictions".into(),
            dead_letter_topic: "dead-letters".into(),
            features_topic: String::new(),
            feedback_topic: String::new(),
            feedback_retention: Retention::Seconds(600),
            model_topic: "models".into(),
            group_id: "dlpipe".into(),
            start_from: StartFrom::Committed,
            stop_at_end: false,
            delivery: DeliveryGuarantee::AtLeastOnce,
            partial_commit_ms: 1000,
            epochs: EpochPolicy::Time { millis: 1000 },
            head: HeadKind::OnlineLr,
            top_k: 3,
            max_backlog: 1024,
            max_decoding: 64,
            decode_nice: 10,
            max_fetched_bytes: 512 << 20,
            max_batch_wait_ms: 20,
            create_topics: true,
            topic_partitions: 4,
            topic_replication_factor: 1,
            topic_min_insync_replicas: 0,
            checkpoint_every_epochs: 10,
            snapshot_dir: "out/snapshots".into(),
            snapshot_retain: 5,
            status_interval_secs: 10,
            prequential_window: 1000,
            stall_after_secs: 120,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Model name (a manifest `NAME.json` in `dir`) or a path to a manifest or `.pt` file.
    pub name: String,
    /// Folder of exported models.
    pub dir: PathBuf,
    /// Devices to run the model on: "cpu", "cuda:0", ... Timely workers take them round-robin.
    pub devices: Vec<String>,
    /// Images per forward pass.
    pub batch_size: usize,
    /// libtorch intra-op threads per model; 0 shares libtorch's default (one per core) among the
    /// process's workers ([`crate::model::set_intra_op_threads`]).
    pub intra_op_threads: usize,
    /// Arithmetic of the forward pass: "auto" picks bf16 where the CPU computes it natively
    /// (AVX-512 BF16 or AMX) or on CUDA, f32 elsewhere; an explicit precision always wins.
    pub precision: Precision,
    /// Where images are resized and centre-cropped: "auto" is the model's device when every
    /// device is CUDA, the host elsewhere; see [`ResizeOn`].
    pub resize_on: ResizeOn,
    /// With `resize_on` at the device, the largest image (decoded pixels) sent to it as
    /// decoded; larger ones are resized on the host. The default, 256 x 256, sends every image
    /// that is upscaled and keeps a record's bytes in the backlog near a crop's.
    pub device_resize_max_pixels: u64,
}

/// `model.resize_on`: where an image is resized and centre-cropped to the model's input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResizeOn {
    /// The device when every model device is CUDA (one place for all, so that features do not
    /// depend on the worker), the host elsewhere.
    #[default]
    Auto,
    /// On the decoding threads, with SIMD (fast_image_resize): the stream carries crops.
    Host,
    /// On the model's device, for images up to `device_resize_max_pixels`: the stream carries
    /// them as decoded.
    Device,
}

impl std::fmt::Display for ResizeOn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ResizeOn::Auto => "auto",
            ResizeOn::Host => "host",
            ResizeOn::Device => "device",
        })
    }
}

impl std::str::FromStr for ResizeOn {
    type Err = String;
    fn from_str(s: &str) -> Result<ResizeOn, String> {
        match s.trim() {
            "auto" => Ok(ResizeOn::Auto),
            "host" => Ok(ResizeOn::Host),
            "device" => Ok(ResizeOn::Device),
            other => Err(format!("resize_on {other:?} is not one of auto, host, device")),
        }
    }
}

impl ResizeOn {
    /// Host or Device: what "auto" means where every device is CUDA (`all_cuda`) or not.
    pub fn resolve(self, all_cuda: bool) -> ResizeOn {
        match self {
            ResizeOn::Auto if all_cuda => ResizeOn::Device,
            ResizeOn::Auto => ResizeOn::Host,
            explicit => explicit,
        }
    }
}

/// `model.precision`: which export of a model runs (`NAME` for f32, `NAME_bf16`, `NAME_f16`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Auto,
    F32,
    Bf16,
    F16,
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::Auto => "auto",
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        })
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Precision, String> {
        match s.trim() {
            "auto" => Ok(Precision::Auto),
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            "f16" => Ok(Precision::F16),
            other => Err(format!("precision {other:?} is not one of auto, f32, bf16, f16")),
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            name: "efficientnet_lite0".into(),
            dir: "models".into(),
            devices: vec!["cpu".into()],
            batch_size: 8,
            intra_op_threads: 0,
            precision: Precision::Auto,
            resize_on: ResizeOn::Auto,
            device_resize_max_pixels: 256 * 256,
        }
    }
}

#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers. The environment variable DLPIPE_KAFKA_BROKERS overrides it.
    pub brokers: String,
    /// client.id sent to the brokers (visible in broker logs and quotas).
    pub client_id: String,
    /// How long start-up calls wait out retriable errors (broker starting, coordinator loading,
    /// leader election) before giving up, in seconds.
    pub retry_timeout_secs: u64,
    /// Any other librdkafka property, e.g. `"security.protocol" = "SASL_SSL"`, applied to every
    /// client dlpipe creates. Values may name environment variables as `${NAME}`, and the
    /// variable `DLPIPE_KAFKA__SASL_PASSWORD` sets `sasl.password` (any property likewise:
    /// upper case, dots as underscores), so secrets need not be in the file.
    pub properties: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            client_id: "dlpipe".into(),
            retry_timeout_secs: 120,
            properties: BTreeMap::new(),
        }
    }
}

/// Whether a librdkafka property holds a secret (never logged).
pub fn is_secret_property(key: &str) -> bool {
    ["password", "secret", "token", "key.pem", "keystore", ".key"].iter().any(|word| key.contains(word))
        || key == "sasl.oauthbearer.config"
}

// Written out so that a config printed with `{:?}` never shows a password.
impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let properties: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| (k.as_str(), if is_secret_property(k) { "<redacted>" } else { v.as_str() }))
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("client_id", &self.client_id)
            .field("retry_timeout_secs", &self.retry_timeout_secs)
            .field("properties", &properties)
            .finish()
    }
}

/// Environment variables that set librdkafka properties: `DLPIPE_KAFKA__SASL_PASSWORD` is
/// `sasl.password`.
pub const KAFKA_PROPERTY_ENV_PREFIX: &str = "DLPIPE_KAFKA__";

impl KafkaConfig {
    /// Applies `DLPIPE_KAFKA_BROKERS` and `DLPIPE_KAFKA__*` from `env`, then expands `${NAME}`
    /// in brokers and property values. An unset variable is an error naming it.
    pub fn resolve_env(&mut self, env: impl IntoIterator<Item = (String, String)>) -> Result<(), ConfigError> {
        let env: BTreeMap<String, String> = env.into_iter().collect();
        if let Some(brokers) = env.get("DLPIPE_KAFKA_BROKERS").filter(|b| !b.trim().is_empty()) {
            self.brokers = brokers.clone();
        }
        for (name, value) in &env {
            if let Some(property) = name.strip_prefix(KAFKA_PROPERTY_ENV_PREFIX) {
                if !property.is_empty() {
                    self.properties.insert(property.to_ascii_lowercase().replace('_', "."), value.clone());
                }
            }
        }
        self.brokers = expand_env("kafka.brokers", &self.brokers, &env)?;
        for (key, value) in self.properties.iter_mut() {
            *value = expand_env(&format!("kafka.properties.{key:?}"), value, &env)?;
        }
        Ok(())
    }
}

/// Replaces every `${NAME}` in `text`, the value of `key`, with the variable's value; `$$` is a
/// literal `$`.
pub(crate) fn expand_env(key: &str, text: &str, env: &BTreeMap<String, String>) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        if let Some(after) = rest.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some(after) = rest.strip_prefix("${") {
            let end =
                after.find('}').ok_or_else(|| ConfigError::UnclosedVariable { key: key.into(), text: text.into() })?;
            let name = &after[..end];
            let value =
                env.get(name).ok_or_else(|| ConfigError::UnsetVariable { key: key.into(), name: name.into() })?;
            out.push_str(value);
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// The Prometheus endpoint of `dlpipe run` (`/metrics`, `/healthz`, `/readyz`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// host:port to listen on; process N of a multi-process run listens on port + N. Port 0
    /// picks a free port (logged at start-up); an empty string serves no metrics.
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { listen: "127.0.0.1:9898".into() }
    }
}

/// The processes of a cluster (`dlpipe run -n`): how soon a lost peer stops them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// A peer process that neither answers nor acknowledges for this long is lost (its host is
    /// down or cut off), and so is one that left before the dataflow was done: every process
    /// then stops, naming it. A killed peer is noticed at once.
    pub peer_timeout_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig { peer_timeout_ms: 10_000 }
    }
}

/// Why a configuration cannot be used. The messages name the file (where there is one) and the
/// key, and say what would work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not TOML, an unknown key, or a value of the wrong type.
    #[error("config file {path} is invalid: {}", toml_message(error))]
    Parse { path: PathBuf, error: toml::de::Error },
    /// The file parses, but what it says cannot be used: `error` says why (never a `Read`,
    /// `Parse` or `Invalid` itself).
    #[error("config file {path}: {error}")]
    Invalid { path: PathBuf, error: Box<ConfigError> },
    /// [`Config::from_toml`]'s text is not TOML, has an unknown key, or a value of the wrong type.
    #[error("{}", toml_message(.0))]
    Toml(toml::de::Error),
    /// A value that cannot work, or values that cannot work together. Callers only report these,
    /// so one variant holds them; the message names the keys and says what would work.
    #[error("{0}")]
    Value(String),
    /// `${NAME}` in the value of `key` names an environment variable that is not set.
    #[error("{key}: environment variable {name} is not set (the value refers to it as ${{{name}}})")]
    UnsetVariable { key: String, name: String },
    /// `${` in the value of `key` without its `}`.
    #[error("{key}: unclosed ${{ in {text:?}")]
    UnclosedVariable { key: String, text: String },
    /// A `DLPIPE__*` variable names no key, or a value the key cannot take.
    #[error("environment variable {name}: {reason}")]
    Env { name: String, reason: String },
    /// `[learner]` is out of range.
    #[error(transparent)]
    Learner(LearnError),
    /// An entry of `fetch.allowed_networks` is not a network.
    #[error("fetch.allowed_networks: {0}")]
    AllowedNetwork(NetworkError),
    /// A folder of `fetch.file_roots` cannot be resolved (it must exist).
    #[error(
        "fetch.file_roots: {} cannot be used: {error}; name folders that exist (relative to the config \
         file), or set file_roots = [] to allow any local file",
        path.display()
    )]
    FileRoot { path: PathBuf, error: std::io::Error },
}

/// toml's message names the line, the column and the offending key; it ends in a newline.
fn toml_message(error: &toml::de::Error) -> String {
    error.to_string().trim_end().to_owned()
}

impl Config {
    /// Reads a TOML file, then applies the environment (see [`Config::load_layered`]).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Ok(Config::load_layered(Some(path), std::env::vars())?.config)
    }

    /// Defaults plus the environment: what dlpipe uses without `-c`.
    pub fn from_env() -> Result<Config, ConfigError> {
        Ok(Config::load_layered(None, std::env::vars())?.config)
    }

    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(ConfigError::Toml)
    }

    /// What `dlpipe run` checks on top of [`Config::validate`], once its flags are applied
    /// (`--stop-at-end` sets `pipeline.stop_at_end`).
    pub fn validate_run(&self) -> Result<(), ConfigError> {
        self.validate()?;
        let p = &self.pipeline;
        if !p.feedback_topic.is_empty() && matches!(p.epochs, EpochPolicy::Offsets { .. }) && !p.stop_at_end {
            // An offset epoch of feedback is its own offsets: while the feedback topic is
            // idle its epoch stands still, and so would every prediction after it.
            return Err(invalid_value(
                "pipeline.feedback_topic with offset epochs would stall whenever the feedback topic is idle: use time \
                 epochs on a live stream (epochs = { by = \"time\", millis = 1000 }), or offset epochs only to \
                 replay topics to their end (stop_at_end, --stop-at-end)",
            ));
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.model.batch_size == 0 {
            return Err(invalid_value("model.batch_size must be at least 1"));
        }
        if self.model.devices.is_empty() {
            return Err(invalid_value("model.devices is empty: list at least one device, e.g. [\"cpu\"]"));
        }
        if self.kafka.brokers.trim().is_empty() {
            return Err(invalid_value("kafka.brokers is empty"));
        }
        if self.kafka.retry_timeout_secs == 0 {
            return Err(invalid_value("kafka.retry_timeout_secs must be at least 1"));
        }
        self.validate_pipeline()?;
        let image = &self.image;
        if image.max_encoded_bytes == 0 || image.max_pixels == 0 || image.max_side == 0 || image.max_aspect_ratio == 0 {
            return Err(invalid_value(
                "image.max_encoded_bytes, max_pixels, max_side and max_aspect_ratio must be at least 1",
            ));
        }
        if self.fetch.timeout_ms == 0 || self.fetch.connect_timeout_ms == 0 || self.fetch.total_timeout_ms == 0 {
            return Err(invalid_value(
                "fetch.timeout_ms, connect_timeout_ms and total_timeout_ms must be at least 1: without them one \
                 stalled server holds a fetch thread forever",
            ));
        }
        if self.cluster.peer_timeout_ms < 1000 {
            return Err(invalid_value(
                "cluster.peer_timeout_ms must be at least 1000: TCP keepalive probes a silent peer once a second",
            ));
        }
        if self.fetch.max_per_host == 0 {
            return Err(invalid_value("fetch.max_per_host must be at least 1"));
        }
        crate::fetch::auth::Credentials::check(&self.fetch.http_auth)?;
        self.learner.validate().map_err(ConfigError::Learner)?;
        self.drift.validate().map_err(|e| match e {
            LearnError::Config { field, reason } => invalid_value(format!("{field} {reason}")),
            other => ConfigError::Learner(other),
        })?;
        let listen = self.metrics.listen.trim();
        let host_port =
            listen.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !listen.is_empty() && !host_port {
            return Err(invalid_value(format!(
                "metrics.listen {listen:?} is not host:port (or \"\" to serve no metrics)"
            )));
        }
        if !(0.0..1.0).contains(&self.train.test_split) {
            return Err(invalid_value(format!("train.test_split must be in [0, 1), got {}", self.train.test_split)));
        }
        // The optimizer's checks name its fields relative to `[learner]`: here they are in `[train]`.
        self.train.optimizer.validate().map_err(|e| match e {
            LearnError::Config { field, reason } => invalid_value(format!("train.{field} {reason}")),
            other => ConfigError::Learner(other),
        })?;
        if self.train.epochs == 0 {
            return Err(invalid_value("train.epochs must be at least 1"));
        }
        Ok(())
    }

    /// The `[pipeline]` section's checks: sizes, epochs, and topics that are named and distinct.
    fn validate_pipeline(&self) -> Result<(), ConfigError> {
        let p = &self.pipeline;
        if p.topic_partitions < 1 || p.topic_replication_factor < 1 {
            return Err(invalid_value(format!(
                "pipeline.topic_partitions ({}) and pipeline.topic_replication_factor ({}) must be at least 1",
                p.topic_partitions, p.topic_replication_factor
            )));
        }
        if !(0..=p.topic_replication_factor).contains(&p.topic_min_insync_replicas) {
            return Err(invalid_value(format!(
                "pipeline.topic_min_insync_replicas ({}) must be 0 (the cluster's default) up to \
                 pipeline.topic_replication_factor ({}): more in-sync replicas than replicas refuse every write",
                p.topic_min_insync_replicas, p.topic_replication_factor
            )));
        }
        match p.epochs {
            EpochPolicy::Time { millis: 0 } => return Err(invalid_value("pipeline.epochs.millis must be at least 1")),
            EpochPolicy::Offsets { records: 0 } => {
                return Err(invalid_value("pipeline.epochs.records must be at least 1"))
            }
            _ => {}
        }
        if p.max_backlog == 0 || p.max_decoding == 0 {
            return Err(invalid_value("pipeline.max_backlog and pipeline.max_decoding must be at least 1"));
        }
        if !(0..=19).contains(&p.decode_nice) {
            return Err(invalid_value("pipeline.decode_nice must be 0 to 19 (a niceness; 0 is the model's)"));
        }
        if p.max_fetched_bytes == 0 {
            return Err(invalid_value("pipeline.max_fetched_bytes must be at least 1"));
        }
        if p.top_k == 0 {
            return Err(invalid_value("pipeline.top_k must be at least 1"));
        }
        if p.group_id.trim().is_empty() {
            return Err(invalid_value(
                "pipeline.group_id is empty: name the consumer group whose offsets record progress",
            ));
        }
        let mut topics = vec![
            ("input_topic", &p.input_topic),
            ("predictions_topic", &p.predictions_topic),
            ("dead_letter_topic", &p.dead_letter_topic),
            ("model_topic", &p.model_topic),
        ];
        if !p.features_topic.is_empty() {
            topics.push(("features_topic", &p.features_topic));
        }
        if !p.feedback_topic.is_empty() {
            topics.push(("feedback_topic", &p.feedback_topic));
            if p.head != HeadKind::OnlineLr {
                return Err(invalid_value(
                    "pipeline.feedback_topic needs head = \"online_lr\": labels are for the online learner",
                ));
            }
            p.feedback_retention.epochs(p.epochs)?;
        }
        for (i, (key, topic)) in topics.iter().enumerate() {
            if topic.trim().is_empty() {
                return Err(invalid_value(format!("pipeline.{key} is empty")));
            }
            if let Some((other, _)) = topics[..i].iter().find(|(_, t)| t == topic) {
                // Reading its own output would feed predictions back in as input, forever.
                return Err(invalid_value(format!(
                    "pipeline.{key} and pipeline.{other} are the same topic {topic:?}: give each its own"
                )));
            }
        }
        Ok(())
    }
}

/// A [`ConfigError::Value`].
fn invalid_value(message: impl Into<String>) -> ConfigError {
    ConfigError::Value(message.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_configs_parse_and_document_the_defaults() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let mut local = Config::from_toml(&std::fs::read_to_string(dir.join("local.toml")).unwrap()).unwrap();
        // local.toml spells out every default, so that it doubles as the reference; its paths
        // are relative to configs/, the defaults' to the clone's root: the same folders.
        let defaults = Config::default();
        for (given, default) in [
            (&mut local.model.dir, &defaults.model.dir),
            (&mut local.pipeline.snapshot_dir, &defaults.pipeline.snapshot_dir),
            (&mut local.train.feature_cache, &defaults.train.feature_cache),
            (&mut local.fetch.file_roots[0], &defaults.fetch.file_roots[0]),
        ] {
            assert_eq!(*given, Path::new("..").join(default));
            *given = default.clone();
        }
        assert_eq!(local, defaults);
        let loaded = Config::load_layered(Some(&dir.join("local.toml")), env(&[])).unwrap().config;
        assert_eq!(
            loaded.model.dir.canonicalize().unwrap(),
            dir.parent().unwrap().join("models").canonicalize().unwrap(),
            "configs/local.toml finds models/ beside configs/"
        );
        for name in ["gpu.toml", "cluster.toml", "late-labels.toml"] {
            let config = Config::from_toml(&std::fs::read_to_string(dir.join(name)).unwrap()).unwrap();
            config.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn class_weights_parse_and_bad_ones_are_errors_naming_the_key() {
        let learner = |toml: &str| Config::from_toml(&format!("[learner]\n{toml}\n"));
        let given = learner("class_weights = \"shirt=2, coat=1.5\"").unwrap();
        let expected = BTreeMap::from([("coat".to_string(), 1.5), ("shirt".to_string(), 2.0)]);
        assert_eq!(given.learner.class_weights, ClassWeights::Given(expected));
        given.validate().unwrap();
        assert_eq!(learner("class_weights = \"balanced\"").unwrap().learner.class_weights, ClassWeights::Balanced);
        assert_eq!(
            Config::from_toml("[train]\nclass_weights = \"balanced\"").unwrap().train.class_weights,
            ClassWeights::Balanced
        );
        let cases = [
            ("class_weights = \"shirt\"", "is not class=weight"),
            ("class_weights = \"shirt=heavy\"", "not a number"),
            ("class_weights = \"shirt=-1\"", "non-negative"),
            ("class_weights = \"Balanced\"", "is not class=weight"),
            ("class_weights = 2", "invalid type"),
        ];
        for (toml, reason) in cases {
            for section in ["learner", "train"] {
                let err = Config::from_toml(&format!("[{section}]\n{toml}\n")).unwrap_err().to_string();
                assert!(
                    err.contains(reason) && err.contains("class_weights") && err.contains("line 2"),
                    "{toml}: {err}"
                );
            }
        }
        // A fixed weight may name a class still to be discovered, not one outside a fixed list.
        let fixed = learner("classes = [\"coat\", \"bag\"]\nclass_weights = \"shirt=2\"").unwrap();
        let err = fixed.validate().unwrap_err().to_string();
        assert!(err.contains("class_weights") && err.contains("\"shirt\"") && err.contains("learner.classes"), "{err}");
        learner("classes = [\"coat\", \"shirt\"]\nclass_weights = \"shirt=2\"").unwrap().validate().unwrap();
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn secrets_come_from_the_environment_and_never_print() {
        let mut kafka = Config::from_toml(
            "[kafka]\nbrokers = \"${CLUSTER}:9093\"\n[kafka.properties]\n\"sasl.username\" = \"dlpipe\"\n\
             \"sasl.oauthbearer.config\" = \"principal=${USER_ID} cost=$$5\"\n",
        )
        .unwrap()
        .kafka;
        kafka
            .resolve_env(env(&[
                ("CLUSTER", "kafka.example"),
                ("USER_ID", "u1"),
                ("DLPIPE_KAFKA__SASL_PASSWORD", "s3cret"),
                ("DLPIPE_KAFKA__SECURITY_PROTOCOL", "SASL_SSL"),
            ]))
            .unwrap();
        assert_eq!(kafka.brokers, "kafka.example:9093");
        assert_eq!(kafka.properties["sasl.password"], "s3cret");
        assert_eq!(kafka.properties["security.protocol"], "SASL_SSL");
        assert_eq!(kafka.properties["sasl.oauthbearer.config"], "principal=u1 cost=$5");
        let printed = format!("{kafka:?}");
        assert!(!printed.contains("s3cret") && printed.contains("<redacted>"), "{printed}");

        let mut missing = KafkaConfig::default();
        missing.properties.insert("sasl.password".into(), "${NOT_SET_ANYWHERE}".into());
        let err = missing.resolve_env(env(&[])).unwrap_err().to_string();
        assert_eq!(
            err,
            "kafka.properties.\"sasl.password\": environment variable NOT_SET_ANYWHERE is not set (the value refers \
             to it as ${NOT_SET_ANYWHERE})"
        );
    }

    #[test]
    fn every_key_is_settable_from_the_environment() {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "[pipeline]\ninput_topic = \"from-file\"\ntop_k = 5\n").unwrap();
        let layered = Config::load_layered(
            Some(file.path()),
            env(&[
                ("DLPIPE__PIPELINE__INPUT_TOPIC", "from-env"),
                ("DLPIPE__LEARNER__REPLAY__CAPACITY", "256"),
                ("DLPIPE__MODEL__DEVICES", "[\"cuda:0\", \"cuda:1\"]"),
                ("DLPIPE__PIPELINE__EPOCHS", "{ by = \"offsets\", records = 16 }"),
                ("DLPIPE__PIPELINE__GROUP_ID", "2024"),
                ("DLPIPE__PIPELINE__STOP_AT_END", "true"),
                ("DLPIPE__KAFKA__BROKERS", "env-generic:9092"),
                ("DLPIPE_KAFKA_BROKERS", "env-specific:9092"),
                ("DLPIPE__KAFKA__PROPERTIES", "{ \"security.protocol\" = \"SSL\", \"sasl.password\" = \"a\" }"),
                ("DLPIPE_KAFKA__SASL_PASSWORD", "b"),
                ("DLPIPE_LOG", "debug"),
            ]),
        )
        .unwrap();
        let c = &layered.config;
        assert_eq!(c.pipeline.input_topic, "from-env");
        assert_eq!(c.pipeline.top_k, 5);
        assert_eq!(c.learner.replay.capacity, 256);
        assert_eq!(c.learner.replay.ratio, Config::default().learner.replay.ratio, "the rest of the table stays");
        assert_eq!(c.model.devices, ["cuda:0", "cuda:1"]);
        assert_eq!(c.pipeline.epochs, EpochPolicy::Offsets { records: 16 });
        assert_eq!(c.pipeline.group_id, "2024", "a value that is TOML but not for the key is a string");
        assert!(c.pipeline.stop_at_end);
        assert_eq!(c.kafka.brokers, "env-specific:9092", "DLPIPE_KAFKA_BROKERS wins over DLPIPE__KAFKA__BROKERS");
        assert_eq!(c.kafka.properties["security.protocol"], "SSL");
        assert_eq!(c.kafka.properties["sasl.password"], "b", "DLPIPE_KAFKA__<PROPERTY> wins");
        let key = |path: &str| path.split('.').map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(layered.source(&key("pipeline.input_topic")), Source::Env("DLPIPE__PIPELINE__INPUT_TOPIC".into()));
        assert_eq!(layered.source(&key("pipeline.top_k")), Source::File);
        assert_eq!(layered.source(&key("pipeline.max_backlog")), Source::Default);
        assert_eq!(layered.source(&key("learner.replay.ratio")), Source::Default);
        assert_eq!(layered.source(&key("pipeline.epochs.records")), Source::Env("DLPIPE__PIPELINE__EPOCHS".into()));
        assert_eq!(layered.source(&key("kafka.brokers")), Source::Env("DLPIPE_KAFKA_BROKERS".into()));
        let password = vec!["kafka".into(), "properties".into(), "sasl.password".into()];
        assert_eq!(layered.source(&password), Source::Env("DLPIPE_KAFKA__SASL_PASSWORD".into()));
        assert!(is_secret_key(&password) && !is_secret_key(&key("kafka.brokers")));
    }

    #[test]
    fn bad_environment_variables_are_errors_naming_them() {
        let cases = [
            ("DLPIPE__PIPELINE__INPUT_TOPIK", "x", "unknown field `input_topik`"),
            ("DLPIPE__PIPELIN__INPUT_TOPIC", "x", "unknown field `pipelin`"),
            ("DLPIPE__MODEL__BATCH_SIZE", "big", "model.batch_size = \"big\": invalid type: string \"big\""),
            ("DLPIPE__MODEL__DEVICES", "[1, 2]", "invalid type"),
            ("DLPIPE__PIPELINE__INPUT_TOPIC__X", "x", "pipeline.input_topic is not a table"),
            ("DLPIPE__PIPELINE____TOP_K", "3", "empty key"),
            ("DLPIPE__KAFKA__PROPERTIES__SASL_PASSWORD", "x", "DLPIPE_KAFKA__<PROPERTY>"),
            ("DLPIPE__PIPELINE__EPOCHS__RECORDS", "16", "pipeline.epochs.records is not a key"),
            (
                "DLPIPE__PIPELINE__EPOCHS",
                "{ by = \"time\", millis = 500, records = 16 }",
                "pipeline.epochs.records is not a key",
            ),
        ];
        for (name, value, reason) in cases {
            let err = Config::load_layered(None, env(&[(name, value)])).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("environment variable {name}: ")) && err.contains(reason),
                "{name}: {err}"
            );
        }
        // Values that parse but cannot work are refused as a file's would be.
        let err = Config::load_layered(None, env(&[("DLPIPE__PIPELINE__TOP_K", "0")])).unwrap_err().to_string();
        assert!(err.contains("pipeline.top_k must be at least 1"), "{err}");
    }

    #[test]
    fn relative_paths_in_a_file_are_relative_to_its_folder() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("etc");
        std::fs::create_dir(&folder).unwrap();
        let file = folder.join("dlpipe.toml");
        let write = |toml: &str| std::fs::write(&file, toml).unwrap();
        write(
            "[model]\nname = \"../exported/net.json\"\ndir = \"models\"\n[pipeline]\nsnapshot_dir = \"state/snapshots\"\n\
             [train]\nfeature_cache = \"\"\n[fetch]\nfile_root = \"images\"\nfile_roots = [\"images\", \"/srv/images\"]\n",
        );
        let config = Config::load_layered(Some(&file), env(&[])).unwrap().config;
        assert_eq!(config.model.name, folder.join("../exported/net.json").to_str().unwrap());
        assert_eq!(config.model.dir, folder.join("models"));
        assert_eq!(config.pipeline.snapshot_dir, folder.join("state/snapshots"));
        assert_eq!(config.train.feature_cache, PathBuf::new(), "\"\" still turns the cache off");
        assert_eq!(config.fetch.file_root, Some(folder.join("images")));
        assert_eq!(config.fetch.file_roots, [folder.join("images"), PathBuf::from("/srv/images")]);

        // A model name is a name in model.dir, not a path; keys the file leaves out keep the
        // defaults, relative to the working directory.
        write("[model]\nname = \"mobilenet_v2\"\n");
        let config = Config::load_layered(Some(&file), env(&[])).unwrap().config;
        assert_eq!(config.model.name, "mobilenet_v2");
        assert_eq!(config.model.dir, Config::default().model.dir);

        // A file named by a relative path: its folder as seen from the working directory at
        // load time, made absolute so that later changes of directory do not move it.
        let cwd = std::env::current_dir().unwrap();
        let relative = paths::base_of(Path::new("configs/local.toml")).unwrap();
        assert_eq!(relative, cwd.join("configs"));
    }

    #[test]
    fn paths_from_the_environment_are_relative_to_the_working_directory() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("dlpipe.toml");
        std::fs::write(&file, "[model]\ndir = \"models\"\n[train]\nfeature_cache = \"cache\"\n").unwrap();
        let layered = Config::load_layered(
            Some(&file),
            env(&[
                ("DLPIPE__MODEL__DIR", "env-models"),
                ("DLPIPE__PIPELINE__SNAPSHOT_DIR", "env-snapshots"),
                ("DLPIPE__FETCH__FILE_ROOTS", "[\"env-images\"]"),
            ]),
        )
        .unwrap();
        let c = &layered.config;
        assert_eq!(c.model.dir, PathBuf::from("env-models"));
        assert_eq!(c.pipeline.snapshot_dir, PathBuf::from("env-snapshots"));
        assert_eq!(c.fetch.file_roots, [PathBuf::from("env-images")]);
        assert_eq!(c.train.feature_cache, dir.path().join("cache"), "the file's own path is still the file's");
        let key = |path: &str| path.split('.').map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(layered.source(&key("model.dir")), Source::Env("DLPIPE__MODEL__DIR".into()));
        assert_eq!(layered.source(&key("train.feature_cache")), Source::File);
    }

    #[test]
    fn every_path_key_is_a_key_of_the_configuration() {
        for key in PATH_KEYS {
            let (section, name) = (key[0], key[1]);
            let value = if name == "file_roots" { "[\"x\"]" } else { "\"x.json\"" };
            let toml = format!("[{section}]\n{name} = {value}\n");
            Config::from_toml(&toml).unwrap_or_else(|e| panic!("{}: {e}", key.join(".")));
        }
    }

    #[test]
    fn configs_that_cannot_work_are_refused_at_start_up_naming_the_key() {
        let cases = [
            ("[pipeline]\npredictions_topic = \"images\"\n", "predictions_topic and pipeline.input_topic"),
            ("[pipeline]\ndead_letter_topic = \"predictions\"\n", "dead_letter_topic and pipeline.predictions_topic"),
            ("[pipeline]\nfeatures_topic = \"images\"\n", "features_topic and pipeline.input_topic"),
            ("[pipeline]\nfeedback_topic = \"predictions\"\n", "feedback_topic and pipeline.predictions_topic"),
            ("[pipeline]\nfeedback_topic = \"fb\"\nhead = \"imagenet\"\n", "needs head = \"online_lr\""),
            (
                "[pipeline]\nfeedback_topic = \"fb\"\nepochs = { by = \"offsets\", records = 8 }\nstop_at_end = true\n",
                "give it in epochs",
            ),
            ("[pipeline]\nfeedback_topic = \"fb\"\nfeedback_retention = { epochs = 0 }\n", "at least one epoch"),
            ("[pipeline]\ninput_topic = \"\"\n", "pipeline.input_topic is empty"),
            ("[pipeline]\ngroup_id = \" \"\n", "pipeline.group_id is empty"),
            ("[pipeline]\ntop_k = 0\n", "pipeline.top_k"),
            ("[pipeline]\nmax_decoding = 0\n", "pipeline.max_decoding"),
            ("[pipeline]\ndecode_nice = -5\n", "pipeline.decode_nice"),
            ("[pipeline]\ntopic_replication_factor = 0\n", "topic_replication_factor"),
            ("[pipeline]\ntopic_min_insync_replicas = 2\n", "pipeline.topic_min_insync_replicas (2)"),
            ("[pipeline]\ntopic_min_insync_replicas = -1\n", "pipeline.topic_min_insync_replicas (-1)"),
            ("[fetch]\ntimeout_ms = 0\n", "fetch.timeout_ms"),
            ("[image]\nmax_aspect_ratio = 0\n", "max_aspect_ratio"),
            ("[model]\nbatch_size = 0\n", "model.batch_size"),
            ("[kafka]\nretry_timeout_secs = 0\n", "kafka.retry_timeout_secs"),
            ("[drift]\nthreshold = -1.0\n", "drift.threshold must be finite and positive"),
            ("[drift]\ndelta = -0.1\n", "drift.delta"),
        ];
        for (toml, expected) in cases {
            let err = Config::from_toml(toml).unwrap().validate().unwrap_err().to_string();
            assert!(err.contains(expected), "{toml:?}: {err}");
        }
    }

    #[test]
    fn a_feedback_topic_with_offset_epochs_runs_only_to_the_end_of_its_topics() {
        let toml = "[pipeline]\nfeedback_topic = \"fb\"\nepochs = { by = \"offsets\", records = 8 }\n\
                    feedback_retention = { epochs = 5 }\n";
        let mut config = Config::from_toml(toml).unwrap();
        let err = config.validate_run().unwrap_err().to_string();
        assert!(err.contains("would stall whenever the feedback topic is idle"), "{err}");
        config.pipeline.stop_at_end = true;
        config.validate_run().unwrap();
        assert_eq!(config.pipeline.feedback_retention.epochs(config.pipeline.epochs).unwrap(), 5);
        let time = EpochPolicy::Time { millis: 250 };
        assert_eq!(Retention::Seconds(30).epochs(time).unwrap(), 120);
        assert_eq!(Retention::Seconds(u64::MAX).epochs(time).unwrap(), u64::MAX / 250 + 1);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors_naming_them() {
        let err = Config::from_toml("[model]\nbatch_sise = 3\n").unwrap_err().to_string();
        assert!(err.contains("batch_sise"), "{err}");
        let err = Config::from_toml("[model]\nbatch_size = \"big\"\n").unwrap_err().to_string();
        assert!(err.contains("batch_size") || err.contains("line 2"), "{err}");
        let partial = Config::from_toml("[image]\nmax_pixels = 10\n").unwrap();
        assert_eq!(partial.image.max_pixels, 10);
        assert_eq!(partial.image.max_side, ImageLimits::default().max_side);
    }
}
