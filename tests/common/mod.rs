//! Shared helpers of the integration tests: the repository's own services, data and models.
//! Nothing here is a mock: Kafka is a real broker (started by `scripts/kafka start`, or the
//! cluster DLPIPE_KAFKA_BROKERS names), models are the exported TorchScript files.
#![allow(dead_code)]

pub mod broker;
pub mod run;
pub mod s3;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Condvar, Mutex, OnceLock};

pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Bootstrap servers of a running broker, starting the local one on first use.
pub fn kafka_brokers() -> String {
    static BROKERS: OnceLock<String> = OnceLock::new();
    BROKERS
        .get_or_init(|| {
            let status = Command::new(root().join("scripts/kafka")).arg("start").status().expect("run scripts/kafka");
            assert!(status.success(), "scripts/kafka start failed; see its output above");
            let out = Command::new(root().join("scripts/kafka")).arg("bootstrap").output().expect("run scripts/kafka");
            String::from_utf8(out.stdout).unwrap().trim().to_owned()
        })
        .clone()
}

/// A Kafka config section pointing at the test broker.
pub fn kafka_config() -> dlpipe::config::KafkaConfig {
    kafka_config_for(&kafka_brokers())
}

/// A Kafka config section with defaults for the cluster of `brokers`.
pub fn kafka_config_for(brokers: &str) -> dlpipe::config::KafkaConfig {
    dlpipe::config::KafkaConfig { brokers: brokers.to_owned(), ..Default::default() }
}

/// A name no other test run uses (topics, consumer groups).
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

/// The manifest of an exported model in models/ (written by `make setup`).
pub fn model_manifest(name: &str) -> PathBuf {
    let path = root().join("models").join(format!("{name}.json"));
    assert!(path.is_file(), "{} is missing: run `make setup` first", path.display());
    path
}

/// A sample photo in data/samples/ (written by `make setup`).
pub fn sample(name: &str) -> PathBuf {
    let path = root().join("data/samples").join(name);
    assert!(path.is_file(), "{} is missing: run `make setup` first", path.display());
    path
}

/// The project's Python (with torch and torchvision), for reference outputs.
pub fn python() -> PathBuf {
    let path = root().join(".venv/bin/python");
    assert!(path.exists(), "{} is missing: run `make setup` first", path.display());
    path
}

/// Runs the dlpipe binary in the repository root.
pub fn dlpipe(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dlpipe"))
        .args(args)
        .current_dir(root())
        .env_remove("DLPIPE_CONFIG")
        .output()
        .expect("run dlpipe")
}

/// The ten Fashion-MNIST classes, as named by the class folders of data/fashion-mnist.
pub const FASHION_CLASSES: [&str; 10] =
    ["tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot"];

/// `n` Fashion-MNIST training images from the `skip`-th on, classes interleaved (image i is of
/// class i mod 10), with their class.
pub fn fashion(n: usize, skip: usize) -> Vec<(PathBuf, &'static str)> {
    let root = root().join("data/fashion-mnist/train");
    let lists: Vec<Vec<PathBuf>> = FASHION_CLASSES
        .iter()
        .map(|c| {
            let mut files: Vec<PathBuf> = std::fs::read_dir(root.join(c))
                .unwrap_or_else(|e| panic!("{}: {e} (run `make setup`)", root.join(c).display()))
                .map(|e| e.unwrap().path())
                .collect();
            files.sort();
            files
        })
        .collect();
    (skip..skip + n).map(|i| (lists[i % 10][i / 10].clone(), FASHION_CLASSES[i % 10])).collect()
}

/// Publishes `(partition, key, payload)` messages in order (creating the topic with
/// `partitions` if needed) and waits for their acknowledgement.
pub fn produce(topic: &str, partitions: i32, messages: &[(i32, String, String)]) {
    produce_on(&kafka_config(), topic, partitions, messages)
}

/// [`produce`] on the cluster of `kafka`.
pub fn produce_on(
    kafka: &dlpipe::config::KafkaConfig,
    topic: &str,
    partitions: i32,
    messages: &[(i32, String, String)],
) {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let spec = dlpipe::kafka::TopicSpec { partitions, replication_factor: 1, configs: &[] };
    dlpipe::kafka::ensure_topic(kafka, topic, spec).unwrap();
    let producer: BaseProducer =
        dlpipe::kafka::client_config(kafka).set("enable.idempotence", "true").create().unwrap();
    for (partition, key, payload) in messages {
        producer.send(BaseRecord::to(topic).partition(*partition).key(key).payload(payload)).unwrap();
        producer.poll(std::time::Duration::ZERO);
    }
    producer.flush(std::time::Duration::from_secs(30)).unwrap();
}

/// An HTTP server on loopback that answers every request with `body`, except that requests
/// for `/slow...` get no answer until `release` is set: a tarpit the test controls
/// ([`release`] sets it).
pub fn tarpit_server(body: Vec<u8>, release: Arc<(Mutex<bool>, Condvar)>) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let body = Arc::new(body);
    std::thread::spawn(move || {
        for stream in listener.incoming().take(64) {
            let Ok(mut stream) = stream else { continue };
            let (body, release) = (Arc::clone(&body), Arc::clone(&release));
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                if String::from_utf8_lossy(&head).starts_with("GET /slow") {
                    let (released, changed) = &*release;
                    let _held = changed.wait_while(released.lock().unwrap(), |r| !*r).unwrap();
                }
                let header = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(header.as_bytes()).and_then(|_| stream.write_all(&body));
            });
        }
    });
    format!("http://{address}")
}

/// Lets the requests a [`tarpit_server`] holds go.
pub fn release(release: &(Mutex<bool>, Condvar)) {
    let (released, changed) = release;
    *released.lock().unwrap() = true;
    changed.notify_all();
}

/// A free TCP port on loopback (free when asked; another process could take it before use).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A child process that a failing test does not leave running.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// EfficientNet-Lite0's manifest and the features of `uris` (file paths or URIs), in order, from
/// the project's feature cache (the model computes those it lacks, on the CPU, and fills it).
pub fn cached_features(uris: &[String]) -> (dlpipe::model::Manifest, dlpipe::transfer::Features) {
    // One at a time: a binary's tests ask for the same images at once, and the second then reads
    // what the first wrote to the cache instead of computing it again beside it.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let config = dlpipe::config::Config::default();
    let device = dlpipe::model::parse_device("cpu").unwrap();
    let featurizer = dlpipe::model::Featurizer::load(&model_manifest("efficientnet_lite0"), device).unwrap();
    let manifest = featurizer.manifest().clone();
    let fetcher = dlpipe::fetch::Fetcher::new(config.fetch.clone()).unwrap();
    let cache = root().join(&config.train.feature_cache);
    let options = dlpipe::transfer::FeaturizeOptions {
        fetcher: &fetcher,
        limits: config.image,
        batch_size: config.model.batch_size,
        cache_dir: Some(&cache),
        progress: false,
        resizing: dlpipe::batch::Resizing::ON_HOST,
    };
    let features = dlpipe::transfer::extract_features(vec![featurizer], uris, &options).unwrap();
    (manifest, features)
}
