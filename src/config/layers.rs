//! The layers of a configuration, lowest first: the defaults, the file, `DLPIPE__SECTION__KEY`
//! environment variables, then the Kafka variables (`DLPIPE_KAFKA_BROKERS`,
//! `DLPIPE_KAFKA__<PROPERTY>`), and where each value of the result comes from. The file's
//! relative paths are made relative to its folder as it is read (see [`super::paths`]).

use super::{Config, ConfigError, KAFKA_PROPERTY_ENV_PREFIX};
use std::collections::BTreeMap;
use std::path::Path;

/// Environment variables that set any config key: `DLPIPE__PIPELINE__INPUT_TOPIC` is
/// `pipeline.input_topic`, `DLPIPE__LEARNER__REPLAY__CAPACITY` is `learner.replay.capacity`.
pub const ENV_PREFIX: &str = "DLPIPE__";

/// Where one value of the effective configuration comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Default,
    File,
    /// The environment variable of that name.
    Env(String),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Default => f.write_str("default"),
            Source::File => f.write_str("file"),
            Source::Env(name) => write!(f, "env {name}"),
        }
    }
}

/// A loaded configuration and what set its keys.
#[derive(Clone, Debug)]
pub struct Layered {
    pub config: Config,
    /// The config file's own table (empty without a file), before the environment.
    file: toml::Table,
    /// The key paths `DLPIPE__*` variables set, with each variable's name.
    env_keys: Vec<(Vec<String>, String)>,
    /// Every variable that took part (`DLPIPE__*`, `DLPIPE_KAFKA_BROKERS`, `DLPIPE_KAFKA__*`).
    pub env_names: Vec<String>,
}

/// One `DLPIPE__*` variable: the key path it names and its value.
struct EnvOverride<'a> {
    name: &'a str,
    path: Vec<String>,
    raw: &'a str,
}

impl Config {
    /// Defaults, then the file at `path` (if any), then the environment `env`, validated.
    pub fn load_layered(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Layered, ConfigError> {
        let env: BTreeMap<String, String> = env.into_iter().collect();
        let label = path.unwrap_or(Path::new("(defaults and environment)"));
        let file = match path {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
                // Parsed as a Config first, so that the file's own mistakes name its lines.
                toml::from_str::<Config>(&text).map_err(|error| ConfigError::Parse { path: path.into(), error })?;
                let mut table = toml::from_str::<toml::Table>(&text)
                    .map_err(|error| ConfigError::Parse { path: path.into(), error })?;
                super::paths::resolve_against(&mut table, &super::paths::base_of(path)?)
                    .map_err(|error| ConfigError::Invalid { path: path.into(), error: Box::new(error) })?;
                table
            }
            None => toml::Table::new(),
        };
        let mut table = file.clone();
        let mut env_keys = Vec::new();
        for over in env_overrides(&env)? {
            apply_override(&mut table, &over)?;
            env_keys.push((over.path, over.name.to_owned()));
        }
        let mut config: Config = toml::Value::Table(table).try_into().map_err(ConfigError::Toml)?;
        let invalid = |error| ConfigError::Invalid { path: label.into(), error: Box::new(error) };
        config.kafka.resolve_env(env.clone()).map_err(invalid)?;
        config.fetch.stores.resolve_env(&env).map_err(invalid)?;
        config.validate().map_err(invalid)?;
        let env_names = env
            .iter()
            .filter(|(name, value)| {
                name.starts_with(ENV_PREFIX)
                    || name.starts_with(KAFKA_PROPERTY_ENV_PREFIX) && name.len() > KAFKA_PROPERTY_ENV_PREFIX.len()
                    || *name == "DLPIPE_KAFKA_BROKERS" && !value.trim().is_empty()
            })
            .map(|(name, _)| name.clone())
            .collect();
        Ok(Layered { config, file, env_keys, env_names })
    }
}

/// How the whole `[kafka.properties]` table is set from the environment, for the error that
/// refuses one property at a time.
const PROPERTIES_TABLE_EXAMPLE: &str = r#"DLPIPE__KAFKA__PROPERTIES='{ "security.protocol" = "SSL" }'"#;

/// The `DLPIPE__*` variables of `env`, in name order, with the key paths they name.
fn env_overrides(env: &BTreeMap<String, String>) -> Result<Vec<EnvOverride<'_>>, ConfigError> {
    let mut overrides = Vec::new();
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else { continue };
        let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
        let env_error = |reason: String| ConfigError::Env { name: name.clone(), reason };
        if path.iter().any(String::is_empty) {
            return Err(env_error("names an empty key (levels are separated by exactly two underscores)".into()));
        }
        if path.len() > 2 && path[0] == "kafka" && path[1] == "properties" {
            // Property names have dots, which variable names cannot: they have their own rule.
            return Err(env_error(format!(
                "set librdkafka properties with {KAFKA_PROPERTY_ENV_PREFIX}<PROPERTY> (e.g. \
                 DLPIPE_KAFKA__SASL_PASSWORD for sasl.password), or the whole table as {PROPERTIES_TABLE_EXAMPLE}"
            )));
        }
        overrides.push(EnvOverride { name, path, raw });
    }
    Ok(overrides)
}

/// Sets the key `over` names in `table`, its value read as TOML where that works for the key
/// and as a plain string otherwise (so `DLPIPE__PIPELINE__GROUP_ID=2024` is the string "2024").
fn apply_override(table: &mut toml::Table, over: &EnvOverride) -> Result<(), ConfigError> {
    let env_error = |reason: String| ConfigError::Env { name: over.name.to_owned(), reason };
    let raw = toml::Value::String(over.raw.to_owned());
    let candidates = match parse_value(over.raw) {
        Some(value) if value != raw => vec![value, raw],
        _ => vec![raw],
    };
    let mut first_error = None;
    for value in candidates {
        let mut candidate = table.clone();
        set_path(&mut candidate, &over.path, value).map_err(env_error)?;
        match toml::Value::Table(candidate.clone()).try_into::<Config>() {
            Ok(config) => {
                ignored_key(&config, &over.path, &value_of(&candidate, &over.path)).map_err(env_error)?;
                *table = candidate;
                return Ok(());
            }
            Err(error) => {
                first_error.get_or_insert(error);
            }
        }
    }
    let error = first_error.expect("at least one candidate");
    Err(env_error(format!("{} = {:?}: {}", over.path.join("."), over.raw, error.message().trim_end())))
}

/// An error naming a key under `path` (set to `value`) that the configuration does not keep:
/// serde passes over some (an unknown key beside a tagged table's `by`), but a variable that
/// sets nothing is a mistake.
fn ignored_key(config: &Config, path: &[String], value: &toml::Value) -> Result<(), String> {
    let effective = toml::Table::try_from(config).expect("a config serializes to TOML");
    let mut leaves = Vec::new();
    leaf_paths(value, &mut path.to_vec(), &mut leaves);
    match leaves.into_iter().find(|leaf| lookup(&effective, leaf).is_none()) {
        Some(leaf) => Err(format!("{} is not a key of the configuration (it would be ignored)", leaf.join("."))),
        None => Ok(()),
    }
}

fn leaf_paths(value: &toml::Value, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match value.as_table() {
        Some(table) if !table.is_empty() => {
            for (key, sub) in table {
                path.push(key.clone());
                leaf_paths(sub, path, out);
                path.pop();
            }
        }
        _ => out.push(path.clone()),
    }
}

fn value_of(table: &toml::Table, path: &[String]) -> toml::Value {
    lookup(table, path).cloned().expect("the value was just set")
}

/// `raw` as a TOML value (number, boolean, array, inline table, quoted string), if it is one.
/// Dates are kept as text: no key takes one.
fn parse_value(raw: &str) -> Option<toml::Value> {
    let mut table: toml::Table = toml::from_str(&format!("value = {raw}")).ok()?;
    table.remove("value").filter(|value| !matches!(value, toml::Value::Datetime(_)))
}

/// Puts `value` at `path` in `table`. A table on the way that the file leaves out starts as the
/// default's, so that one key of it can be set alone (`DLPIPE__LEARNER__REPLAY__CAPACITY`).
fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let defaults = default_table();
    let mut here = table;
    let mut default_here = Some(&defaults);
    for (depth, key) in path[..path.len() - 1].iter().enumerate() {
        let default_next = default_here.and_then(|d| d.get(key)).and_then(toml::Value::as_table);
        let next =
            here.entry(key.clone()).or_insert_with(|| toml::Value::Table(default_next.cloned().unwrap_or_default()));
        here = next.as_table_mut().ok_or_else(|| format!("{} is not a table of keys", path[..=depth].join(".")))?;
        default_here = default_next;
    }
    here.insert(path[path.len() - 1].clone(), value);
    Ok(())
}

/// The defaults as a TOML table.
pub(super) fn default_table() -> toml::Table {
    toml::Table::try_from(Config::default()).expect("the default config serializes to TOML")
}

impl Layered {
    /// The effective configuration as a TOML table.
    pub fn table(&self) -> toml::Table {
        toml::Table::try_from(&self.config).expect("a loaded config serializes to TOML")
    }

    /// Where the value at `path` (a key of [`Layered::table`]) comes from.
    pub fn source(&self, path: &[String]) -> Source {
        if let [kafka, key, rest @ ..] = path {
            if kafka == "kafka" {
                if let Some(name) = self.kafka_variable(key, rest) {
                    return Source::Env(name);
                }
            }
        }
        if let Some((_, name)) = self.env_keys.iter().rev().find(|(set, _)| path.starts_with(set)) {
            return Source::Env(name.clone());
        }
        // A value the file sets, even to the default, or under an alias of its key.
        if lookup(&self.file, path).is_some() || lookup(&default_table(), path) != lookup(&self.table(), path) {
            return Source::File;
        }
        Source::Default
    }

    /// The Kafka variable that set `kafka.<key>[.<property>]`, if one did.
    fn kafka_variable(&self, key: &str, rest: &[String]) -> Option<String> {
        let name = match (key, rest) {
            ("brokers", []) => "DLPIPE_KAFKA_BROKERS".to_owned(),
            ("properties", [property]) => {
                format!("{KAFKA_PROPERTY_ENV_PREFIX}{}", property.to_ascii_uppercase().replace('.', "_"))
            }
            _ => return None,
        };
        self.env_names.contains(&name).then_some(name)
    }
}

fn lookup<'a>(table: &'a toml::Table, path: &[String]) -> Option<&'a toml::Value> {
    let (last, parents) = path.split_last()?;
    let mut here = table;
    for key in parents {
        here = here.get(key)?.as_table()?;
    }
    here.get(last)
}

/// Whether the config key `path` holds a secret: a key that names a password, secret or token,
/// a key ending in `_key` (an Azure access key, a GCS service account key), and the SASL and
/// private-key properties of Kafka (the SASL mechanism excepted).
pub fn is_secret_key(path: &[String]) -> bool {
    let Some(key) = path.last() else { return false };
    let kafka_property = path.len() == 3 && path[0] == "kafka" && path[1] == "properties";
    ["password", "secret", "token"].iter().any(|word| key.contains(word))
        || key.ends_with("_key")
        || kafka_property
            && (super::is_secret_property(key)
                || key.starts_with("ssl.key")
                || key.starts_with("sasl.") && !matches!(key.as_str(), "sasl.mechanism" | "sasl.mechanisms"))
}
