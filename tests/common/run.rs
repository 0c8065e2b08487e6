//! `dlpipe run` in tests: a config with its own topics and group, records of Fashion-MNIST
//! images, and reading an output topic back.

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::Message;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub fn record(id: &str, path: &Path, label: Option<&str>) -> String {
    let mut v = serde_json::json!({"id": id, "uri": format!("file://{}", path.display())});
    if let Some(label) = label {
        v["label"] = label.into();
    }
    v.to_string()
}

/// `messages` (as [`messages`] makes them) with each record's `uri` replaced by the next of
/// `uris`: the same stream, its images read from elsewhere.
pub fn with_uris(
    messages: &[(i32, String, String)],
    uris: impl IntoIterator<Item = String>,
) -> Vec<(i32, String, String)> {
    messages
        .iter()
        .zip(uris)
        .map(|((partition, id, payload), uri)| {
            let mut record: serde_json::Value = serde_json::from_str(payload).unwrap();
            record["uri"] = uri.into();
            (*partition, id.clone(), record.to_string())
        })
        .collect()
}

/// One record per image: id `{prefix}{i}`, partition i mod `partitions`, labelled where
/// `labelled(i)`; as `(partition, key, payload)` for [`produce`].
pub fn messages(
    images: &[(PathBuf, &str)],
    prefix: &str,
    partitions: i32,
    labelled: impl Fn(usize) -> bool,
) -> Vec<(i32, String, String)> {
    images
        .iter()
        .enumerate()
        .map(|(i, (path, label))| {
            let id = format!("{prefix}{i}");
            let payload = record(&id, path, labelled(i).then_some(*label));
            (i as i32 % partitions, id, payload)
        })
        .collect()
}

/// Reads a topic of the shared broker from the beginning until `want` messages arrived or
/// `idle` passed without one.
pub fn read_topic(topic: &str, want: usize, idle: Duration) -> Vec<Value> {
    read_topic_on(&super::kafka_config(), topic, want, idle)
}

/// [`read_topic`] on the cluster of `kafka`.
///
/// The partitions are assigned, not subscribed to: joining a group can take seconds on a busy
/// broker, which `idle` would count as silence.
pub fn read_topic_on(kafka: &dlpipe::config::KafkaConfig, topic: &str, want: usize, idle: Duration) -> Vec<Value> {
    let consumer: BaseConsumer = dlpipe::kafka::client_config(kafka)
        .set("group.id", super::unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    // The pipeline creates its output topics at start-up; until then there is nothing to read.
    let deadline = Instant::now() + idle.max(Duration::from_secs(30));
    let partitions = loop {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10));
        let partitions: Vec<i32> = metadata
            .iter()
            .flat_map(|m| m.topics())
            .filter(|t| t.name() == topic && t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if !partitions.is_empty() || Instant::now() > deadline {
            break partitions;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut assignment = rdkafka::TopicPartitionList::new();
    for partition in partitions {
        assignment.add_partition_offset(topic, partition, rdkafka::Offset::Beginning).unwrap();
    }
    consumer.assign(&assignment).unwrap();
    let mut out = Vec::new();
    let mut last = Instant::now();
    while out.len() < want && last.elapsed() < idle {
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            let Ok(message) = message else { continue };
            out.push(serde_json::from_slice(message.payload().unwrap()).unwrap());
            last = Instant::now();
        }
    }
    out
}

/// A config for one test run: its own topics and group, the given extra TOML appended.
pub struct Run {
    pub dir: tempfile::TempDir,
    pub predictions: String,
    pub dead: String,
    pub group: String,
    pub model_topic: String,
    pub brokers: String,
}

impl Run {
    /// A run on the shared broker.
    pub fn new(name: &str, input: &str, extra: &str) -> Run {
        Run::on(&super::kafka_brokers(), name, input, extra)
    }

    /// A run on the cluster of `brokers`.
    pub fn on(brokers: &str, name: &str, input: &str, extra: &str) -> Run {
        let dir = tempfile::tempdir().unwrap();
        let (predictions, dead) = (super::unique(&format!("{name}-pred")), super::unique(&format!("{name}-dead")));
        let group = super::unique(&format!("{name}-group"));
        let model_topic = super::unique(&format!("{name}-models"));
        let toml = format!(
            "[model]\ndir = \"{models}\"\nbatch_size = 16\n\n[kafka]\nbrokers = \"{brokers}\"\n\n\
             [metrics]\nlisten = \"127.0.0.1:0\"\n\n[fetch]\nallowed_networks = [\"127.0.0.0/8\"]\nfile_roots = [{data:?}, {tmp:?}]\n\n[pipeline]\n\
             input_topic = \"{input}\"\npredictions_topic = \"{predictions}\"\ndead_letter_topic = \"{dead}\"\n\
             model_topic = \"{models_topic}\"\ngroup_id = \"{group}\"\nsnapshot_dir = \"{snapshots}\"\n\
             topic_partitions = 2\nstatus_interval_secs = 2\n{extra}\n",
            models = super::root().join("models").display(),
            models_topic = model_topic,
            group = group,
            snapshots = dir.path().join("snapshots").display(),
            // The shipped default, data/, and the temporary folder tests write hostile files to.
            data = super::root().join("data").display().to_string(),
            tmp = std::env::temp_dir().display().to_string(),
        );
        std::fs::write(dir.path().join("config.toml"), toml).unwrap();
        Run { dir, predictions, dead, group, model_topic, brokers: brokers.to_owned() }
    }

    /// This run with `lines` added to its config's `[model]` section.
    pub fn with_model(self, lines: &str) -> Run {
        let path = self.config();
        let toml = std::fs::read_to_string(&path).unwrap().replacen("[model]\n", &format!("[model]\n{lines}\n"), 1);
        std::fs::write(&path, toml).unwrap();
        self
    }

    /// A Kafka config section for this run's cluster.
    pub fn kafka(&self) -> dlpipe::config::KafkaConfig {
        super::kafka_config_for(&self.brokers)
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_dlpipe"));
        command.arg("-c").arg(self.config()).arg("run").args(args).current_dir(super::root());
        command
    }

    /// Starts `dlpipe run ARGS` in the background, its log in a file of the run's folder. The
    /// process is killed when the handle is dropped.
    pub fn spawn(&self, args: &[&str]) -> (super::KillOnDrop, PathBuf) {
        let log = self.dir.path().join(format!("run-{}.log", super::unique("run")));
        let child =
            self.command(args).stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap()).spawn().unwrap();
        (super::KillOnDrop(child), log)
    }

    /// Runs to the end of the input and checks the exit status. A run that has not ended after
    /// five minutes (a stalled dataflow) is killed and fails the test, rather than hanging it.
    /// Returns the run's log.
    pub fn to_end(&self, args: &[&str]) -> String {
        let (mut child, log) = self.spawn(&[&["--stop-at-end"], args].concat());
        let stderr = succeeds(&mut child, &log, Duration::from_secs(300));
        eprintln!("{}", stderr.lines().filter(|l| l.contains("worker finished")).collect::<Vec<_>>().join("\n"));
        stderr
    }

    pub fn latest_snapshot(&self) -> PathBuf {
        self.dir.path().join("snapshots/latest.safetensors")
    }
}

/// The logs of a run and of its restarts, in order, one after the other.
pub fn logs(files: &[PathBuf]) -> String {
    let each = files.iter().map(|f| std::fs::read_to_string(f).unwrap_or_default());
    each.collect::<Vec<_>>().join("\n--- the run restarted ---\n")
}

/// Waits for a process that [`Run::spawn`] started to exit successfully; fails the test with
/// its log if it fails or has not ended within `limit` (a stalled dataflow). Returns the log.
pub fn succeeds(child: &mut super::KillOnDrop, log: &Path, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.0.kill().unwrap();
            child.0.wait().unwrap();
            panic!("dlpipe run did not finish within {limit:?}:\n{}", std::fs::read_to_string(log).unwrap());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stderr = std::fs::read_to_string(log).unwrap();
    assert!(status.success(), "dlpipe run failed:\n{stderr}");
    stderr
}

/// Asserts two checkpoints hold the same learner: every byte of the classifier's state
/// (weights, optimizer, standardiser, classes, updates), its prequential metrics, and the
/// offsets it learned up to.
pub fn assert_same_learner(got: &dlpipe::pipeline::Checkpoint, want: &dlpipe::pipeline::Checkpoint, what: &str) {
    assert_eq!(got.model.updates(), want.model.updates(), "{what}: examples learned");
    assert_eq!(got.model.classes(), want.model.classes(), "{what}: classes");
    assert_eq!(got.model.config(), want.model.config(), "{what}: learner config");
    // Every tensor of the snapshot format, byte for byte (the metadata's key order may differ).
    let (got_bytes, want_bytes) =
        (got.model.to_bytes(&BTreeMap::new()).unwrap(), want.model.to_bytes(&BTreeMap::new()).unwrap());
    let (got_tensors, want_tensors) = (
        safetensors::SafeTensors::deserialize(&got_bytes).unwrap(),
        safetensors::SafeTensors::deserialize(&want_bytes).unwrap(),
    );
    let mut names = want_tensors.names();
    names.sort();
    let mut got_names = got_tensors.names();
    got_names.sort();
    assert_eq!(got_names, names, "{what}: tensors");
    for name in names {
        let (g, w) = (got_tensors.tensor(name).unwrap(), want_tensors.tensor(name).unwrap());
        assert!(g.shape() == w.shape() && g.data() == w.data(), "{what}: tensor {name} differs");
    }
    assert_eq!(got.info.prequential, want.info.prequential, "{what}: prequential metrics");
    assert_eq!(got.info.learned_offsets, want.info.learned_offsets, "{what}: learned offsets");
}

/// `id → (top_k, model version)` of the predictions on `topic`: the scores, bit for bit.
pub fn predictions_by_id(topic: &str, n: usize) -> BTreeMap<String, (String, u64)> {
    read_topic(topic, n, Duration::from_secs(5))
        .into_iter()
        .map(|p| (p["id"].as_str().unwrap().to_owned(), (p["top_k"].to_string(), p["model_version"].as_u64().unwrap())))
        .collect()
}

/// The file name of `path`, for object keys.
pub fn file_name(path: &std::path::Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}
