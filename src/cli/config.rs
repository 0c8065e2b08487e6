//! `dlpipe config show | check`: the configuration a process would run with.

use dlpipe::config::{is_secret_key, Config, Layered};
use std::fmt::Write;
use std::path::Path;

#[derive(clap::Args, Debug)]
pub struct ConfigArgs {
    #[command(subcommand)]
    action: ConfigAction,
}

#[derive(clap::Subcommand, Debug)]
enum ConfigAction {
    /// Print the effective configuration (defaults, then -c FILE, then the environment) as TOML,
    /// each value followed by its source; secrets are redacted.
    Show,
    /// Check the configuration as `dlpipe run` would: exit 1 naming the key and the reason, or
    /// print a one-line summary.
    Check {
        /// Check as for `dlpipe run --stop-at-end`.
        #[arg(long)]
        stop_at_end: bool,
    },
}

pub fn run(path: Option<&Path>, args: ConfigArgs) -> anyhow::Result<()> {
    let mut layered = Config::load_layered(path, std::env::vars())?;
    let label = path.map_or("no config file".to_owned(), |p| p.display().to_string());
    match args.action {
        ConfigAction::Show => print!("{}", show(&layered, path)),
        ConfigAction::Check { stop_at_end } => {
            layered.config.pipeline.stop_at_end |= stop_at_end;
            layered.config.validate_run().map_err(|error| anyhow::anyhow!("{label}: {error}"))?;
            println!("{}", summary(&layered, &label));
        }
    }
    Ok(())
}

/// The effective configuration as TOML, a comment after each value naming its source.
fn show(layered: &Layered, path: Option<&Path>) -> String {
    let file = path.map_or(String::new(), |p| format!(", then {}", p.display()));
    let mut out = format!(
        "# dlpipe's effective configuration: the defaults{file}, then the environment.\n\
         # After each value, where it comes from; secrets are \"<redacted>\".\n"
    );
    write_table(layered, &layered.table(), &mut Vec::new(), &mut out);
    out
}

/// Writes the plain values of `table` (at `path`), then its tables as `[sections]`.
fn write_table(layered: &Layered, table: &toml::Table, path: &mut Vec<String>, out: &mut String) {
    for (key, value) in table.iter().filter(|(_, v)| !v.is_table()) {
        path.push(key.clone());
        let shown = if is_secret_key(path) { "\"<redacted>\"".to_owned() } else { shortest(value).to_string() };
        writeln!(out, "{} = {shown}  # {}", toml_key(key), layered.source(path)).unwrap();
        path.pop();
    }
    for (key, value) in table {
        if let Some(sub) = value.as_table() {
            path.push(key.clone());
            let header: Vec<String> = path.iter().map(|k| toml_key(k)).collect();
            writeln!(out, "\n[{}]", header.join(".")).unwrap();
            write_table(layered, sub, path, out);
            path.pop();
        }
    }
}

/// `value` with each float that is an f32 (most of the learner's) written as the f32's shortest
/// decimal: 0.005, not 0.004999999888241291.
fn shortest(value: &toml::Value) -> toml::Value {
    match value {
        toml::Value::Float(x) if (*x as f32) as f64 == *x => {
            toml::Value::Float((*x as f32).to_string().parse().unwrap_or(*x))
        }
        toml::Value::Array(items) => toml::Value::Array(items.iter().map(shortest).collect()),
        toml::Value::Table(table) => toml::Value::Table(table.iter().map(|(k, v)| (k.clone(), shortest(v))).collect()),
        other => other.clone(),
    }
}

/// A key as TOML writes it: bare where it can be, else quoted (`"sasl.password"`).
fn toml_key(key: &str) -> String {
    let bare = !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        key.to_owned()
    } else {
        toml::Value::String(key.to_owned()).to_string()
    }
}

/// One line: what was read, and what `dlpipe run` would do with it.
fn summary(layered: &Layered, label: &str) -> String {
    let c = &layered.config;
    let env = match layered.env_names.as_slice() {
        [] => "no environment variables".to_owned(),
        names => format!("environment {}", names.join(", ")),
    };
    format!(
        "configuration OK ({label}, {env}): model {} on {}, {} -> {} (group {}, {}), head {}, brokers {}",
        c.model.name,
        c.model.devices.join(","),
        c.pipeline.input_topic,
        c.pipeline.predictions_topic,
        c.pipeline.group_id,
        c.pipeline.delivery,
        toml::Value::try_from(c.pipeline.head).map_or(String::new(), |v| v.as_str().unwrap_or_default().to_owned()),
        c.kafka.brokers
    )
}
