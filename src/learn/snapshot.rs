//! Model snapshots in the safetensors format, as files or as bytes (e.g. Kafka messages).
//!
//! Tensors (little-endian, `K` classes, `D` features):
//! - `weight` f32 `[K, D]`, `bias` f32 `[K]`;
//! - the optimizer's state: AdaGrad `optimizer.sum_sq_weight` `[K, D]` and
//!   `optimizer.sum_sq_bias` `[K]`; FTRL `optimizer.{z,n}_weight` `[K, D]` and
//!   `optimizer.{z,n}_bias` `[K]`; nothing for SGD;
//! - with standardisation, `standardizer.mean` and `standardizer.m2` f32 `[D]` and
//!   `standardizer.count` u64 `[]`;
//! - with replay, the `N` examples kept: `replay.features` f32 `[N, D]`, `replay.labels` u32
//!   `[N]`, and `replay.state` u64 `[3]` (ring position, generator, replays owed as f64 bits).
//!   A snapshot without them (written before replay) loads with nothing kept.
//! - `class_counts` u64 `[K]`: the examples learned of each class, behind balanced class
//!   weights. Snapshots written before it existed load with zero counts.
//!
//! Metadata (strings): `dlpipe.format` = `softmax_regression`, `dlpipe.format_version`,
//! `dlpipe.classes` (JSON array), `dlpipe.config` (the [`LearnerConfig`] as JSON),
//! `dlpipe.updates`, `dlpipe.schedule_start` (the update count at which SGD's schedule last
//! restarted; absent in older snapshots, read as 0); plus the caller's own entries, whose keys
//! must not start with `dlpipe.`.
//!
//! A snapshot holds the complete state, so a loaded model predicts the same bits and continues
//! learning exactly as the saved one would have.

use super::config::LearnerConfig;
use super::kernels::SimdPath;
use super::model::{PendingStep, SoftmaxRegression};
use super::optimizer::Optimizer;
use super::replay::ReplayBuffer;
use super::standardize::RunningStandardizer;
use super::LearnError;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensorError, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

/// The version of the snapshot layout this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Metadata keys with this prefix are the model's own.
pub const RESERVED_PREFIX: &str = "dlpipe.";
const FORMAT: &str = "softmax_regression";

const KEY_FORMAT: &str = "dlpipe.format";
const KEY_VERSION: &str = "dlpipe.format_version";
const KEY_CLASSES: &str = "dlpipe.classes";
const KEY_CONFIG: &str = "dlpipe.config";
const KEY_UPDATES: &str = "dlpipe.updates";
/// The tensor of class counts.
const CLASS_COUNTS: &str = "class_counts";
const KEY_SCHEDULE_START: &str = "dlpipe.schedule_start";

/// Why a snapshot could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("safetensors: {0}")]
    Safetensors(#[from] SafeTensorError),
    #[error("extra metadata key {key:?} uses the prefix {RESERVED_PREFIX:?}, reserved for the model's own")]
    ReservedKey { key: String },
    #[error("metadata key {0:?} is missing")]
    MissingMetadata(&'static str),
    #[error("metadata key {key:?}: {reason}")]
    Metadata { key: &'static str, reason: String },
    #[error("the replay buffer does not fit replay.capacity = {capacity} and the model's {classes} classes")]
    ReplayMisfit { capacity: usize, classes: usize },
    #[error("not a dlpipe softmax regression (metadata {KEY_FORMAT:?} is {0:?})")]
    NotAModel(String),
    #[error("format version {found} is not supported (this build reads version {FORMAT_VERSION})")]
    Version { found: String },
    #[error("tensor {name:?} has dtype {got:?}, expected {expected:?}")]
    Dtype { name: &'static str, got: Dtype, expected: Dtype },
    #[error("tensor {name:?} has shape {got:?}, expected {expected:?}")]
    Shape { name: &'static str, got: Vec<usize>, expected: Vec<usize> },
    #[error("tensor {name:?} is present but the config does not use it")]
    UnexpectedTensor { name: String },
    #[error("the learner config in the metadata is invalid: {0}")]
    Config(Box<LearnError>),
}

/// The name of a snapshot's source in errors: a file, or bytes.
const IN_MEMORY: &str = "(in-memory snapshot)";

impl SoftmaxRegression {
    /// The model as safetensors bytes, with `extra_metadata` stored alongside.
    pub fn to_bytes(&self, extra_metadata: &BTreeMap<String, String>) -> Result<Vec<u8>, LearnError> {
        self.serialize(extra_metadata).map_err(|source| LearnError::Snapshot { origin: IN_MEMORY.into(), source })
    }

    /// Writes the model to a safetensors file at `path`, atomically: it is written and synced
    /// next to `path`, then renamed over it, so that neither readers nor a crash leave a partial
    /// snapshot behind.
    pub fn save(&self, path: &Path, extra_metadata: &BTreeMap<String, String>) -> Result<(), LearnError> {
        let bytes = self
            .serialize(extra_metadata)
            .map_err(|source| LearnError::Snapshot { origin: path.display().to_string(), source })?;
        let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
        tmp_name.push(format!(".tmp{}", std::process::id()));
        let tmp = path.with_file_name(tmp_name);
        let io = |source, path: &Path| LearnError::Io { path: path.to_path_buf(), source };
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&bytes)?;
            file.sync_all()
        };
        let renamed =
            write().map_err(|e| io(e, &tmp)).and_then(|()| std::fs::rename(&tmp, path).map_err(|e| io(e, path)));
        if renamed.is_err() {
            // Best effort: the temporary file is useless now, and the error above is the news.
            let _ = std::fs::remove_file(&tmp);
        }
        renamed
    }

    /// A model from safetensors bytes made by [`to_bytes`](Self::to_bytes) or
    /// [`save`](Self::save), with the extra metadata stored with it.
    pub fn from_bytes(bytes: &[u8]) -> Result<(SoftmaxRegression, BTreeMap<String, String>), LearnError> {
        deserialize(bytes).map_err(|source| LearnError::Snapshot { origin: IN_MEMORY.into(), source })
    }

    /// A model from a safetensors file made by [`save`](Self::save), with the extra metadata
    /// stored with it.
    pub fn load(path: &Path) -> Result<(SoftmaxRegression, BTreeMap<String, String>), LearnError> {
        let bytes = std::fs::read(path).map_err(|source| LearnError::Io { path: path.to_path_buf(), source })?;
        deserialize(&bytes).map_err(|source| LearnError::Snapshot { origin: path.display().to_string(), source })
    }

    fn serialize(&self, extra_metadata: &BTreeMap<String, String>) -> Result<Vec<u8>, SnapshotError> {
        let mut metadata = HashMap::new();
        for (key, value) in extra_metadata {
            if key.starts_with(RESERVED_PREFIX) {
                return Err(SnapshotError::ReservedKey { key: key.clone() });
            }
            metadata.insert(key.clone(), value.clone());
        }
        metadata.insert(KEY_FORMAT.into(), FORMAT.into());
        metadata.insert(KEY_VERSION.into(), FORMAT_VERSION.to_string());
        metadata.insert(KEY_CLASSES.into(), to_json(&self.classes));
        metadata.insert(KEY_CONFIG.into(), to_json(&self.config));
        metadata.insert(KEY_UPDATES.into(), self.updates.to_string());
        metadata.insert(KEY_SCHEDULE_START.into(), self.schedule_start.to_string());

        let (k, d) = (self.classes.len(), self.dim);
        let mut tensors: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = vec![
            // With any pending SGD step applied.
            ("weight", Dtype::F32, vec![k, d], f32_bytes(&self.weights())),
            ("bias", Dtype::F32, vec![k], f32_bytes(&self.bias)),
        ];
        for (name, data, matrix) in self.optimizer.tensors() {
            let shape = if matrix { vec![k, d] } else { vec![k] };
            tensors.push((name, Dtype::F32, shape, f32_bytes(data)));
        }
        if let Some(s) = &self.standardizer {
            tensors.push(("standardizer.mean", Dtype::F32, vec![d], f32_bytes(s.mean())));
            tensors.push(("standardizer.m2", Dtype::F32, vec![d], f32_bytes(s.m2())));
            tensors.push(("standardizer.count", Dtype::U64, vec![], s.count().to_le_bytes().to_vec()));
        }
        if self.config.replay.is_on() {
            let (features, labels, state) = self.replay.parts();
            tensors.push(("replay.features", Dtype::F32, vec![labels.len(), d], f32_bytes(features)));
            tensors.push((
                "replay.labels",
                Dtype::U32,
                vec![labels.len()],
                labels.iter().flat_map(|l| l.to_le_bytes()).collect(),
            ));
            tensors.push(("replay.state", Dtype::U64, vec![3], state.iter().flat_map(|v| v.to_le_bytes()).collect()));
        }
        let counts = self.class_counts.iter().flat_map(|c| c.to_le_bytes()).collect();
        tensors.push((CLASS_COUNTS, Dtype::U64, vec![k], counts));
        let views = tensors
            .iter()
            .map(|(name, dtype, shape, data)| Ok((*name, TensorView::new(*dtype, shape.clone(), data)?)))
            .collect::<Result<Vec<_>, SafeTensorError>>()?;
        Ok(safetensors::serialize(views, Some(metadata))?)
    }
}

/// Our own types always serialise to JSON: string keys, and no non-finite floats in a
/// validated config.
fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("serialising a config or class list to JSON cannot fail")
}

/// What a snapshot's own metadata says, checked against itself.
struct Header {
    classes: Vec<String>,
    class_ids: HashMap<String, usize>,
    config: LearnerConfig,
    updates: u64,
    schedule_start: u64,
}

fn header_of(metadata: &HashMap<String, String>) -> Result<Header, SnapshotError> {
    let get = |key: &'static str| metadata.get(key).ok_or(SnapshotError::MissingMetadata(key));
    let format = get(KEY_FORMAT)?;
    if format != FORMAT {
        return Err(SnapshotError::NotAModel(format.clone()));
    }
    let version = get(KEY_VERSION)?;
    if version.parse::<u32>().ok() != Some(FORMAT_VERSION) {
        return Err(SnapshotError::Version { found: version.clone() });
    }
    let bad = |key: &'static str| move |e: serde_json::Error| SnapshotError::Metadata { key, reason: e.to_string() };
    let classes: Vec<String> = serde_json::from_str(get(KEY_CLASSES)?).map_err(bad(KEY_CLASSES))?;
    let config: LearnerConfig = serde_json::from_str(get(KEY_CONFIG)?).map_err(bad(KEY_CONFIG))?;
    config.validate().map_err(|e| SnapshotError::Config(Box::new(e)))?;
    let updates: u64 = get(KEY_UPDATES)?
        .parse()
        .map_err(|e| SnapshotError::Metadata { key: KEY_UPDATES, reason: format!("not a count: {e}") })?;
    let schedule_start = schedule_start(metadata.get(KEY_SCHEDULE_START), updates)?;
    if !config.classes.is_empty() && config.classes != classes {
        return Err(SnapshotError::Metadata {
            key: KEY_CLASSES,
            reason: "differ from the classes fixed in the config".into(),
        });
    }
    if classes.len() > config.max_classes {
        return Err(SnapshotError::Metadata {
            key: KEY_CLASSES,
            reason: format!("{} classes exceed max_classes = {}", classes.len(), config.max_classes),
        });
    }
    let mut class_ids = HashMap::with_capacity(classes.len());
    for (i, class) in classes.iter().enumerate() {
        if class_ids.insert(class.clone(), i).is_some() {
            return Err(SnapshotError::Metadata { key: KEY_CLASSES, reason: format!("lists {class:?} twice") });
        }
    }
    Ok(Header { classes, class_ids, config, updates, schedule_start })
}

fn deserialize(bytes: &[u8]) -> Result<(SoftmaxRegression, BTreeMap<String, String>), SnapshotError> {
    let (_, header) = SafeTensors::read_metadata(bytes)?;
    let tensors = SafeTensors::deserialize(bytes)?;
    let metadata: HashMap<String, String> = header.metadata().clone().unwrap_or_default();
    let Header { classes, class_ids, config, updates, schedule_start } = header_of(&metadata)?;

    // The weight tensor's shape gives D; every other shape must agree with it.
    let weight = tensors.tensor("weight")?;
    check_dtype("weight", &weight, Dtype::F32)?;
    let k = classes.len();
    let d = match *weight.shape() {
        [rows, d] if rows == k && d > 0 => d,
        _ => {
            return Err(SnapshotError::Shape { name: "weight", got: weight.shape().to_vec(), expected: vec![k, 1] });
        }
    };
    let mut used = vec!["weight"];
    let mut f32_tensor = |name: &'static str, shape: Vec<usize>| -> Result<Vec<f32>, SnapshotError> {
        used.push(name);
        let view = tensors.tensor(name)?;
        check_dtype(name, &view, Dtype::F32)?;
        check_shape(name, &view, &shape)?;
        Ok(view.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect())
    };
    let weights = f32_tensor("weight", vec![k, d])?;
    let bias = f32_tensor("bias", vec![k])?;
    let optimizer = Optimizer::from_tensors(&config.optimizer, |name, matrix| {
        f32_tensor(name, if matrix { vec![k, d] } else { vec![k] })
    })?;
    let standardizer = if config.standardize {
        let mean = f32_tensor("standardizer.mean", vec![d])?;
        let m2 = f32_tensor("standardizer.m2", vec![d])?;
        used.push("standardizer.count");
        let view = tensors.tensor("standardizer.count")?;
        check_dtype("standardizer.count", &view, Dtype::U64)?;
        check_shape("standardizer.count", &view, &[])?;
        let count = u64::from_le_bytes(view.data().try_into().expect("a u64 scalar is 8 bytes"));
        Some(RunningStandardizer::from_parts(count, mean, m2))
    } else {
        None
    };
    let replay = if config.replay.is_on() && tensors.names().contains(&"replay.labels") {
        replay_buffer(&tensors, &mut used, d, &config, k)?
    } else {
        // Replay off, or a snapshot from before replay: nothing kept yet.
        ReplayBuffer::new(d, config.replay)
    };
    let class_counts = class_counts(&tensors, k, &mut used)?;
    // A tensor the config does not explain means the snapshot and config disagree (say, the
    // config was edited): refuse rather than silently drop state.
    if let Some(name) = tensors.names().into_iter().find(|name| !used.contains(name)) {
        return Err(SnapshotError::UnexpectedTensor { name: name.to_owned() });
    }

    let extra: BTreeMap<String, String> =
        metadata.into_iter().filter(|(key, _)| !key.starts_with(RESERVED_PREFIX)).collect();
    let model = SoftmaxRegression {
        dim: d,
        classes,
        class_ids,
        weights,
        pending: PendingStep::with_classes(d, k),
        bias,
        optimizer,
        scratch_features: vec![0.0; if standardizer.is_some() { d } else { 0 }],
        standardizer,
        updates,
        class_counts,
        schedule_start,
        simd: SimdPath::detect(),
        scratch_classes: vec![0.0; k],
        replay,
        config,
    };
    Ok((model, extra))
}

/// The replay buffer's three tensors, which must agree with each other, the config and the
/// `d` features and `k` classes of the model.
fn replay_buffer(
    tensors: &SafeTensors<'_>,
    used: &mut Vec<&'static str>,
    d: usize,
    config: &LearnerConfig,
    k: usize,
) -> Result<ReplayBuffer, SnapshotError> {
    let mut read = |name: &'static str, dtype: Dtype| -> Result<(Vec<usize>, &[u8]), SnapshotError> {
        used.push(name);
        let view = tensors.tensor(name)?;
        check_dtype(name, &view, dtype)?;
        Ok((view.shape().to_vec(), view.data()))
    };
    let (label_shape, label_bytes) = read("replay.labels", Dtype::U32)?;
    let n = match label_shape[..] {
        [n] => n,
        _ => return Err(SnapshotError::Shape { name: "replay.labels", got: label_shape, expected: vec![0] }),
    };
    let (feature_shape, feature_bytes) = read("replay.features", Dtype::F32)?;
    if feature_shape != [n, d] {
        return Err(SnapshotError::Shape { name: "replay.features", got: feature_shape, expected: vec![n, d] });
    }
    let (state_shape, state_bytes) = read("replay.state", Dtype::U64)?;
    if state_shape != [3] {
        return Err(SnapshotError::Shape { name: "replay.state", got: state_shape, expected: vec![3] });
    }
    let u32s = label_bytes.chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes"))).collect();
    let f32s = feature_bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect();
    let u64s: Vec<u64> =
        state_bytes.chunks_exact(8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))).collect();
    let state = [u64s[0], u64s[1], u64s[2]];
    ReplayBuffer::from_parts(d, config.replay, f32s, u32s, state, k)
        .ok_or(SnapshotError::ReplayMisfit { capacity: config.replay.capacity, classes: k })
}

/// The class counts of a snapshot, or zeros for one written before they were kept (adding
/// the name to `used` when present).
fn class_counts(tensors: &SafeTensors<'_>, k: usize, used: &mut Vec<&str>) -> Result<Vec<u64>, SnapshotError> {
    if !tensors.names().contains(&CLASS_COUNTS) {
        return Ok(vec![0; k]);
    }
    used.push(CLASS_COUNTS);
    let view = tensors.tensor(CLASS_COUNTS)?;
    check_dtype(CLASS_COUNTS, &view, Dtype::U64)?;
    check_shape(CLASS_COUNTS, &view, &[k])?;
    Ok(view.data().chunks_exact(8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))).collect())
}

/// The snapshot's `dlpipe.schedule_start`: 0 where it has none (written before schedules
/// could restart), else a count of at most `updates`.
fn schedule_start(text: Option<&String>, updates: u64) -> Result<u64, SnapshotError> {
    let Some(text) = text else { return Ok(0) };
    text.parse::<u64>().ok().filter(|&start| start <= updates).ok_or_else(|| SnapshotError::Metadata {
        key: KEY_SCHEDULE_START,
        reason: format!("{text:?} is not a count of at most dlpipe.updates = {updates}"),
    })
}

fn check_dtype(name: &'static str, view: &TensorView<'_>, expected: Dtype) -> Result<(), SnapshotError> {
    if view.dtype() == expected {
        Ok(())
    } else {
        Err(SnapshotError::Dtype { name, got: view.dtype(), expected })
    }
}

fn check_shape(name: &'static str, view: &TensorView<'_>, expected: &[usize]) -> Result<(), SnapshotError> {
    if view.shape() == expected {
        Ok(())
    } else {
        Err(SnapshotError::Shape { name, got: view.shape().to_vec(), expected: expected.to_vec() })
    }
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learn::config::{AdagradConfig, FtrlConfig, OptimizerConfig, ReplayConfig, SgdConfig};
    use crate::learn::testutil::Rng;
    use crate::learn::{ClassWeights, LearningRateSchedule};

    fn configs() -> Vec<LearnerConfig> {
        let optimizers = [
            OptimizerConfig::Sgd(SgdConfig {
                learning_rate: 0.1,
                schedule: LearningRateSchedule::InverseTime { decay: 0.01 },
                l2: 1e-3,
            }),
            OptimizerConfig::Adagrad(AdagradConfig::default()),
            OptimizerConfig::Ftrl(FtrlConfig { l1: 0.5, l2: 0.1, ..FtrlConfig::default() }),
        ];
        let mut configs = Vec::new();
        for optimizer in optimizers {
            for standardize in [true, false] {
                configs.push(LearnerConfig { optimizer: optimizer.clone(), standardize, ..LearnerConfig::default() });
            }
        }
        configs
    }

    /// `n` random labelled examples of `dim` features.
    fn examples(seed: u64, dim: usize, n: usize) -> Vec<(Vec<f32>, String)> {
        let mut rng = Rng::new(seed);
        (0..n)
            .map(|_| {
                let label = rng.below(4);
                let x = (0..dim).map(|i| rng.normal() + if i % 4 == label { 2.0 } else { 0.0 }).collect();
                (x, format!("class {label}"))
            })
            .collect()
    }

    fn bits(values: &[f32]) -> Vec<u32> {
        values.iter().map(|v| v.to_bits()).collect()
    }

    /// Both models predict the same bits, and keep doing so while learning the same examples.
    fn assert_identical_futures(mut a: SoftmaxRegression, mut b: SoftmaxRegression) {
        assert_eq!(a.classes(), b.classes());
        assert_eq!(a.updates(), b.updates());
        assert_eq!(a.config(), b.config());
        assert_eq!(a.class_counts(), b.class_counts());
        for (i, (x, label)) in examples(2, a.dim(), 200).into_iter().enumerate() {
            assert_eq!(bits(&a.predict_proba(&x).unwrap()), bits(&b.predict_proba(&x).unwrap()));
            let (oa, ob) = (a.learn(&x, &label).unwrap(), b.learn(&x, &label).unwrap());
            assert_eq!((oa.loss.to_bits(), oa.correct), (ob.loss.to_bits(), ob.correct));
            // Epochs of 10: the replays owed, the examples kept and the draws carry over.
            if i % 10 == 9 {
                assert_eq!(a.replay().unwrap(), b.replay().unwrap());
            }
        }
        assert_eq!(a.replay, b.replay);
        assert_eq!(bits(&a.weights()), bits(&b.weights()));
        assert_eq!(bits(a.bias()), bits(b.bias()));
        assert_eq!(a.optimizer, b.optimizer);
        assert_eq!(a.standardizer(), b.standardizer());
        assert_eq!(a.class_counts(), b.class_counts());
    }

    #[test]
    fn bytes_round_trip_continues_learning_identically() {
        for config in configs() {
            let mut model = SoftmaxRegression::new(37, config.clone()).unwrap();
            // Three of the four classes so far: learning after the reload discovers the fourth.
            for (x, label) in examples(1, 37, 300).into_iter().filter(|(_, l)| l != "class 3") {
                model.learn(&x, &label).unwrap();
            }
            let extra = BTreeMap::from([("source".to_string(), "topic-a/3@1234".to_string())]);
            let bytes = model.to_bytes(&extra).unwrap();
            let (loaded, loaded_extra) = SoftmaxRegression::from_bytes(&bytes).unwrap();
            assert_eq!(loaded_extra, extra, "{config:?}");
            assert_eq!(loaded.num_classes(), 3);
            // The loaded model's snapshot holds the same tensors. (Not the same bytes: the
            // safetensors crate writes the metadata map in hash order.)
            let again = loaded.to_bytes(&extra).unwrap();
            let (first, second) =
                (SafeTensors::deserialize(&bytes).unwrap(), SafeTensors::deserialize(&again).unwrap());
            let mut names = first.names();
            names.sort();
            let mut names_again = second.names();
            names_again.sort();
            assert_eq!(names, names_again);
            for name in names {
                assert_eq!(first.tensor(name).unwrap(), second.tensor(name).unwrap(), "{config:?}: {name}");
            }
            assert_identical_futures(model, loaded);
        }
    }

    /// A model learning with balanced class weights: its running class counts are part of the
    /// snapshot, and the loaded model weighs the next examples exactly as the saved one.
    #[test]
    fn class_counts_round_trip_and_balanced_learning_continues_identically() {
        let balanced = LearnerConfig { class_weights: ClassWeights::Balanced, ..LearnerConfig::default() };
        let mut model = SoftmaxRegression::new(11, balanced).unwrap();
        // Imbalanced: "class 0" three times as often as the others.
        for (i, (x, label)) in examples(4, 11, 400).into_iter().enumerate() {
            if label == "class 0" || i % 3 == 0 {
                model.learn(&x, &label).unwrap();
            }
        }
        let counts = model.class_counts().to_vec();
        assert_eq!(counts.iter().sum::<u64>(), model.updates());
        assert!(counts[model.find_class("class 0").unwrap()] > 2 * counts.iter().min().unwrap(), "{counts:?}");
        let (loaded, _) = SoftmaxRegression::from_bytes(&model.to_bytes(&BTreeMap::new()).unwrap()).unwrap();
        assert_eq!(loaded.class_counts(), counts);
        assert_eq!(loaded.config().class_weights, ClassWeights::Balanced);
        assert_identical_futures(model, loaded);
    }

    /// A snapshot written before class counts and class weights existed: no `class_counts`
    /// tensor, no `class_weights` in the config. It loads with zero counts and no class weights.
    #[test]
    fn a_snapshot_without_class_counts_loads_with_zero_counts() {
        let mut model = SoftmaxRegression::new(6, LearnerConfig::default()).unwrap();
        for (x, label) in examples(5, 6, 60) {
            model.learn(&x, &label).unwrap();
        }
        let bytes = model.to_bytes(&BTreeMap::new()).unwrap();
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let mut metadata = header.metadata().clone().unwrap();
        let mut config: serde_json::Value = serde_json::from_str(&metadata[KEY_CONFIG]).unwrap();
        assert!(config.as_object_mut().unwrap().remove("class_weights").is_some());
        metadata.insert(KEY_CONFIG.into(), config.to_string());
        let tensors = SafeTensors::deserialize(&bytes).unwrap();
        let old_tensors: Vec<_> = tensors.tensors().into_iter().filter(|(name, _)| name != CLASS_COUNTS).collect();
        assert_eq!(old_tensors.len(), tensors.len() - 1);
        let old = safetensors::serialize(old_tensors, Some(metadata)).unwrap();

        let (loaded, _) = SoftmaxRegression::from_bytes(&old).unwrap();
        assert_eq!(loaded.class_counts(), [0; 4]);
        assert_eq!(loaded.config(), model.config());
        assert_eq!(bits(&loaded.weights()), bits(&model.weights()));
        assert_eq!(loaded.updates(), model.updates());
        // It learns on, counting from zero.
        let mut loaded = loaded;
        loaded.learn(&[0.5; 6], "class 2").unwrap();
        let index = loaded.find_class("class 2").unwrap();
        assert_eq!(loaded.class_counts().iter().sum::<u64>(), 1);
        assert_eq!(loaded.class_counts()[index], 1);

        // A class_counts tensor of the wrong shape is refused.
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let short = [0u8; 8];
        let mut damaged: Vec<(String, TensorView<'_>)> =
            tensors.tensors().into_iter().filter(|(name, _)| name != CLASS_COUNTS).collect();
        damaged.push((CLASS_COUNTS.into(), TensorView::new(Dtype::U64, vec![1], &short).unwrap()));
        let damaged = safetensors::serialize(damaged, header.metadata().clone()).unwrap();
        let err = SoftmaxRegression::from_bytes(&damaged).unwrap_err();
        assert!(
            matches!(&err, LearnError::Snapshot { source: SnapshotError::Shape { name: CLASS_COUNTS, .. }, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn file_round_trip_and_metadata_layout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let mut model = SoftmaxRegression::new(
            5,
            LearnerConfig { optimizer: OptimizerConfig::Sgd(SgdConfig::default()), ..LearnerConfig::default() },
        )
        .unwrap();
        for (x, label) in examples(3, 5, 50) {
            model.learn(&x, &label).unwrap();
        }
        model.save(&path, &BTreeMap::new()).unwrap();
        // Saved over an existing file, atomically, leaving no temporary file behind.
        model.save(&path, &BTreeMap::new()).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

        let bytes = std::fs::read(&path).unwrap();
        let tensors = SafeTensors::deserialize(&bytes).unwrap();
        let mut names = tensors.names();
        names.sort();
        let expected = ["bias", "class_counts", "replay.features", "replay.labels", "replay.state"]
            .into_iter()
            .chain(["standardizer.count", "standardizer.m2", "standardizer.mean", "weight"]);
        assert_eq!(names, expected.collect::<Vec<_>>());
        assert_eq!(tensors.tensor("weight").unwrap().shape(), [4, 5]);
        assert_eq!(tensors.tensor("replay.features").unwrap().shape(), [50, 5]);
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let metadata = header.metadata().clone().unwrap();
        assert_eq!(metadata[KEY_VERSION], "1");
        assert_eq!(metadata[KEY_UPDATES], "50");
        let classes: Vec<String> = serde_json::from_str(&metadata[KEY_CLASSES]).unwrap();
        assert_eq!(classes, model.classes());

        let (loaded, extra) = SoftmaxRegression::load(&path).unwrap();
        assert!(extra.is_empty());
        assert_identical_futures(model, loaded);
    }

    #[test]
    fn a_snapshot_from_before_replay_loads_with_nothing_kept() {
        let mut model =
            SoftmaxRegression::new(6, LearnerConfig { replay: ReplayConfig::OFF, ..LearnerConfig::default() }).unwrap();
        for (x, label) in examples(4, 6, 30) {
            model.learn(&x, &label).unwrap();
        }
        // As written before replay existed: no replay tensors, no "replay" in the config.
        let bytes = model.to_bytes(&BTreeMap::new()).unwrap();
        let tensors = SafeTensors::deserialize(&bytes).unwrap();
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let mut metadata = header.metadata().clone().unwrap();
        let mut config: serde_json::Value = serde_json::from_str(&metadata[KEY_CONFIG]).unwrap();
        config.as_object_mut().unwrap().remove("replay").unwrap();
        metadata.insert(KEY_CONFIG.into(), config.to_string());
        let old = safetensors::serialize(tensors.tensors(), Some(metadata)).unwrap();

        let (mut loaded, _) = SoftmaxRegression::from_bytes(&old).unwrap();
        assert_eq!(loaded.config().replay, ReplayConfig::default());
        assert_eq!(loaded.replay.parts().1.len(), 0, "nothing kept");
        assert_eq!(loaded.replay().unwrap(), 0);
        assert_eq!(bits(&loaded.weights()), bits(&model.weights()));
        let (x, label) = &examples(5, 6, 1)[0];
        loaded.learn(x, label).unwrap();
        let ratio = ReplayConfig::default().ratio as usize;
        assert_eq!(loaded.replay().unwrap(), ratio, "keeps and replays from then on");
    }

    #[test]
    fn a_model_without_classes_round_trips() {
        let model = SoftmaxRegression::new(8, LearnerConfig::default()).unwrap();
        let (loaded, _) = SoftmaxRegression::from_bytes(&model.to_bytes(&BTreeMap::new()).unwrap()).unwrap();
        assert_eq!((loaded.dim(), loaded.num_classes()), (8, 0));
        assert_identical_futures(model, loaded);
    }

    #[test]
    fn a_restarted_schedule_round_trips_and_older_snapshots_read_as_never_restarted() {
        for config in configs() {
            let mut model = SoftmaxRegression::new(11, config.clone()).unwrap();
            for (i, (x, label)) in examples(4, 11, 120).into_iter().enumerate() {
                if i == 100 {
                    model.restart_step_size();
                }
                model.learn(&x, &label).unwrap();
            }
            let bytes = model.to_bytes(&BTreeMap::new()).unwrap();
            let (loaded, _) = SoftmaxRegression::from_bytes(&bytes).unwrap();
            assert_eq!((loaded.schedule_start(), loaded.updates()), (100, 120), "{config:?}");
            assert_identical_futures(model, loaded);
        }
        let mut model = SoftmaxRegression::new(3, LearnerConfig::default()).unwrap();
        model.learn(&[1.0, 2.0, 3.0], "x").unwrap();
        let rewritten = |value: Option<&str>| {
            let bytes = model.to_bytes(&BTreeMap::new()).unwrap();
            let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
            let mut metadata = header.metadata().clone().unwrap();
            match value {
                Some(v) => metadata.insert(KEY_SCHEDULE_START.into(), v.into()),
                None => metadata.remove(KEY_SCHEDULE_START),
            };
            let tensors = SafeTensors::deserialize(&bytes).unwrap();
            SoftmaxRegression::from_bytes(&safetensors::serialize(tensors.tensors(), Some(metadata)).unwrap())
        };
        assert_eq!(rewritten(None).unwrap().0.schedule_start(), 0);
        assert_eq!(rewritten(Some("1")).unwrap().0.schedule_start(), 1);
        let err = rewritten(Some("2")).unwrap_err();
        assert!(err.to_string().contains("dlpipe.schedule_start"), "{err}");
    }

    #[test]
    fn reserved_metadata_keys_are_refused() {
        let model = SoftmaxRegression::new(2, LearnerConfig::default()).unwrap();
        let extra = BTreeMap::from([("dlpipe.updates".to_string(), "7".to_string())]);
        let err = model.to_bytes(&extra).unwrap_err();
        assert!(
            matches!(&err, LearnError::Snapshot { source: SnapshotError::ReservedKey { key }, .. } if key == "dlpipe.updates"),
            "{err:?}"
        );
    }

    #[test]
    fn damaged_and_foreign_snapshots_are_errors_naming_their_source() {
        let mut model = SoftmaxRegression::new(4, LearnerConfig::default()).unwrap();
        model.learn(&[1.0, 2.0, 3.0, 4.0], "x").unwrap();
        let bytes = model.to_bytes(&BTreeMap::new()).unwrap();

        let err = SoftmaxRegression::from_bytes(&bytes[..bytes.len() - 3]).unwrap_err();
        assert!(matches!(&err, LearnError::Snapshot { source: SnapshotError::Safetensors(_), .. }), "{err:?}");
        assert!(err.to_string().starts_with("model snapshot (in-memory snapshot): safetensors:"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        std::fs::write(&path, b"not a snapshot").unwrap();
        let err = SoftmaxRegression::load(&path).unwrap_err();
        assert!(err.to_string().contains("bad.safetensors"), "{err}");
        let err = SoftmaxRegression::load(&dir.path().join("missing")).unwrap_err();
        assert!(matches!(&err, LearnError::Io { path, .. } if path.ends_with("missing")), "{err:?}");

        // A valid safetensors file that is not one of ours.
        let data = [0u8; 4];
        let view = TensorView::new(Dtype::F32, vec![1], &data).unwrap();
        let foreign = safetensors::serialize([("weight", view)], None).unwrap();
        let err = SoftmaxRegression::from_bytes(&foreign).unwrap_err();
        assert!(
            matches!(&err, LearnError::Snapshot { source: SnapshotError::MissingMetadata(KEY_FORMAT), .. }),
            "{err:?}"
        );
    }

    #[test]
    fn snapshots_whose_parts_disagree_are_refused() {
        // SGD: a snapshot with no optimizer state tensors.
        let mut model = SoftmaxRegression::new(
            3,
            LearnerConfig { optimizer: OptimizerConfig::Sgd(SgdConfig::default()), ..LearnerConfig::default() },
        )
        .unwrap();
        model.learn(&[1.0, 2.0, 3.0], "x").unwrap();
        // Rewrites the snapshot's metadata, keeping its tensors.
        let with_metadata = |edit: &dyn Fn(&mut HashMap<String, String>)| {
            let bytes = model.to_bytes(&BTreeMap::new()).unwrap();
            let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
            let mut metadata = header.metadata().clone().unwrap();
            edit(&mut metadata);
            let tensors = SafeTensors::deserialize(&bytes).unwrap();
            let rebuilt = safetensors::serialize(tensors.tensors(), Some(metadata)).unwrap();
            SoftmaxRegression::from_bytes(&rebuilt).unwrap_err()
        };
        let err = with_metadata(&|m| {
            m.insert(KEY_VERSION.into(), "2".into());
        });
        assert!(
            matches!(&err, LearnError::Snapshot { source: SnapshotError::Version { found }, .. } if found == "2"),
            "{err:?}"
        );
        // The config says no standardisation, but the tensors have its statistics.
        let err = with_metadata(&|m| {
            let config = LearnerConfig {
                standardize: false,
                optimizer: OptimizerConfig::Sgd(SgdConfig::default()),
                ..LearnerConfig::default()
            };
            m.insert(KEY_CONFIG.into(), serde_json::to_string(&config).unwrap());
        });
        assert!(matches!(&err, LearnError::Snapshot { source: SnapshotError::UnexpectedTensor { .. }, .. }), "{err:?}");
        // Two classes listed, one row of weights.
        let err = with_metadata(&|m| {
            m.insert(KEY_CLASSES.into(), r#"["x", "y"]"#.into());
        });
        assert!(
            matches!(&err, LearnError::Snapshot { source: SnapshotError::Shape { name: "weight", .. }, .. }),
            "{err:?}"
        );
        // The AdaGrad config needs state tensors the snapshot lacks.
        let err = with_metadata(&|m| {
            let config = LearnerConfig {
                optimizer: OptimizerConfig::Adagrad(AdagradConfig::default()),
                ..LearnerConfig::default()
            };
            m.insert(KEY_CONFIG.into(), serde_json::to_string(&config).unwrap());
        });
        assert!(
            matches!(
                &err,
                LearnError::Snapshot { source: SnapshotError::Safetensors(SafeTensorError::TensorNotFound(_)), .. }
            ),
            "{err:?}"
        );
    }
}
