//! Shared helpers of the integration tests: the repository's own services, data and models.
//! Nothing here is a mock: Kafka is a real broker (started by `scripts/kafka start`, or the
//! cluster DLPIPE_KAFKA_BROKERS names), models are the exported TorchScript files.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

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
    dlpipe::config::KafkaConfig { brokers: kafka_brokers(), ..Default::default() }
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
