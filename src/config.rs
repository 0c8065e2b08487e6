//! dlpipe's configuration: one TOML file, one struct per section, every key optional with the
//! default documented in `configs/local.toml`. Unknown keys are errors, so a typo never silently
//! falls back to a default.

use crate::image::ImageLimits;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub model: ModelConfig,
    pub image: ImageLimits,
    pub kafka: KafkaConfig,
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
    /// libtorch intra-op threads per process; 0 leaves libtorch's default (one per core).
    pub intra_op_threads: usize,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            name: "efficientnet_lite0".into(),
            dir: "models".into(),
            devices: vec!["cpu".into()],
            batch_size: 32,
            intra_op_threads: 0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers. The environment variable DLPIPE_KAFKA_BROKERS overrides it.
    pub brokers: String,
    /// client.id sent to the brokers (visible in broker logs and quotas).
    pub client_id: String,
    /// Any other librdkafka property, e.g. `"security.protocol" = "SSL"`, applied to every
    /// client dlpipe creates.
    pub properties: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig { brokers: "127.0.0.1:9092".into(), client_id: "dlpipe".into(), properties: BTreeMap::new() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is invalid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl Config {
    /// Reads a TOML file, then applies environment overrides (DLPIPE_KAFKA_BROKERS).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let config = Config::from_toml(&text).map_err(|message| ConfigError::Parse { path: path.into(), message })?;
        config.validate().map_err(|message| ConfigError::Invalid { path: path.into(), message })?;
        Ok(config.with_env())
    }

    /// Defaults plus environment overrides: what dlpipe uses without `-c`.
    pub fn from_env() -> Config {
        Config::default().with_env()
    }

    pub fn from_toml(text: &str) -> Result<Config, String> {
        // toml's message names the line, the column and the offending key.
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())
    }

    fn with_env(mut self) -> Config {
        if let Ok(brokers) = std::env::var("DLPIPE_KAFKA_BROKERS") {
            if !brokers.trim().is_empty() {
                self.kafka.brokers = brokers;
            }
        }
        self
    }

    fn validate(&self) -> Result<(), String> {
        if self.model.batch_size == 0 {
            return Err("model.batch_size must be at least 1".into());
        }
        if self.model.devices.is_empty() {
            return Err("model.devices is empty: list at least one device, e.g. [\"cpu\"]".into());
        }
        if self.kafka.brokers.trim().is_empty() {
            return Err("kafka.brokers is empty".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_configs_parse_and_document_the_defaults() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let local = Config::from_toml(&std::fs::read_to_string(dir.join("local.toml")).unwrap()).unwrap();
        // local.toml spells out every default, so that it doubles as the reference.
        assert_eq!(local, Config::default());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors_naming_them() {
        let err = Config::from_toml("[model]\nbatch_sise = 3\n").unwrap_err();
        assert!(err.contains("batch_sise"), "{err}");
        let err = Config::from_toml("[model]\nbatch_size = \"big\"\n").unwrap_err();
        assert!(err.contains("batch_size") || err.contains("line 2"), "{err}");
        let partial = Config::from_toml("[image]\nmax_pixels = 10\n").unwrap();
        assert_eq!(partial.image.max_pixels, 10);
        assert_eq!(partial.image.max_side, ImageLimits::default().max_side);
    }
}
