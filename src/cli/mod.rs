//! Subcommands, one file each, and what they share: configuration, logging, model loading.

mod batch_features;
mod bench;
mod bench_learning;
mod config;
#[cfg(test)]
mod deploy_checks;
mod evaluate;
mod featurize;
mod predict;
mod produce;
mod promote;
mod run;
mod tail;
mod train;

use clap::{Parser, Subcommand};
use dlpipe::config::Config;
use dlpipe::model::Featurizer;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "dlpipe",
    version,
    about = "Deep learning on streams of images: Kafka → timely → TorchScript CNN → online logistic regression → Kafka"
)]
pub struct Cli {
    /// Configuration file (TOML; see configs/local.toml for every key and its default).
    #[arg(short = 'c', long, global = true, env = "DLPIPE_CONFIG")]
    pub config: Option<PathBuf>,
    /// More logging (-v debug, -vv trace). DLPIPE_LOG takes a full tracing filter.
    #[arg(short = 'v', long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Log lines as plain text, or as one JSON object per line (level, target, fields, spans)
    /// for a log pipeline.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true, env = "DLPIPE_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Name what is in images with a pretrained model's own classes (ImageNet top-k).
    Predict(predict::PredictArgs),
    /// Write the pooled CNN features of images to a .npy file (transfer learning's input).
    Featurize(featurize::FeaturizeArgs),
    /// Print throughput tables: decode + preprocess per core, forward pass per model and batch.
    Bench(bench::BenchArgs),
    /// Run the streaming pipeline: Kafka → fetch/decode → featurize → learn/predict → Kafka.
    Run(run::RunArgs),
    /// Train a classifier on a pretrained model's features of labelled images (transfer learning).
    Train(train::TrainArgs),
    /// Score a classifier on labelled images: accuracy, per-class F1, log-loss, confusion matrix.
    Evaluate(evaluate::EvaluateArgs),
    /// Publish image records for files (or class folders) to a topic.
    Produce(produce::ProduceArgs),
    /// Print predictions or dead letters from a topic.
    Tail(tail::TailArgs),
    /// Make a running pipeline switch to a classifier at an epoch, or run one beside it in shadow.
    Promote(promote::PromoteArgs),
    /// Show the effective configuration with each value's source, or check it.
    Config(config::ConfigArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    let command = match cli.command {
        Command::Config(args) => return config::run(cli.config.as_deref(), args),
        command => command,
    };
    let config = match &cli.config {
        Some(path) => Config::load(path)?,
        None => Config::from_env()?,
    };
    match command {
        Command::Config(_) => unreachable!("handled above"),
        Command::Predict(args) => predict::run(&config, args),
        Command::Featurize(args) => featurize::run(&config, args),
        Command::Bench(args) => bench::run(&config, args),
        Command::Run(args) => run::run(config, args),
        Command::Train(args) => train::run(&config, args),
        Command::Evaluate(args) => evaluate::run(&config, args),
        Command::Produce(args) => produce::run(&config, args),
        Command::Tail(args) => tail::run(&config, args),
        Command::Promote(args) => promote::run(&config, args),
    }
}

/// The process's exit status for `error`: EX_TEMPFAIL where a restart continues the run (see
/// [`PipelineError::wants_restart`](dlpipe::pipeline::PipelineError::wants_restart)), else 1.
pub fn exit_code(error: &anyhow::Error) -> std::process::ExitCode {
    let restart = error
        .chain()
        .filter_map(|cause| cause.downcast_ref::<dlpipe::pipeline::PipelineError>())
        .any(|e| e.wants_restart());
    match restart {
        true => std::process::ExitCode::from(dlpipe_operators::transactions::RESTART_EXIT_CODE as u8),
        false => std::process::ExitCode::FAILURE,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

pub fn init_logging(verbose: u8, format: LogFormat) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("DLPIPE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{default},rdkafka=warn")));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        // A log pipeline indexes the target and the span fields (worker, partition, ...).
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(true).init(),
        // Colours only for a terminal: logs captured to files or CI stay plain text.
        LogFormat::Text => {
            builder.with_target(false).with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init()
        }
    }
}

/// Loads the model named on the command line (or in the config) onto one device (the given
/// one, or the first of `model.devices`).
pub fn load_featurizer(config: &Config, model: Option<&str>, device: Option<&str>) -> anyhow::Result<Featurizer> {
    let flags = batch_features::FeaturizeFlags {
        devices: vec![device.unwrap_or(&config.model.devices[0]).to_owned()],
        batch_size: None,
        feature_cache: None,
        no_cache: true,
    };
    let mut featurizers = batch_features::load_featurizers(config, model.unwrap_or(&config.model.name), &flags)?;
    Ok(featurizers.remove(0))
}

#[cfg(test)]
mod tests {
    use super::exit_code;
    use dlpipe::pipeline::PipelineError;
    use dlpipe_operators::OperatorError;
    use std::process::ExitCode;

    #[test]
    fn an_expired_transaction_exits_for_a_restart_and_other_failures_with_1() {
        let stopped = |error: OperatorError| anyhow::Error::new(PipelineError::Worker { index: 1, error });
        let expired = stopped(OperatorError::TransactionExpired("expired".into())).context("dlpipe run");
        assert_eq!(exit_code(&expired), ExitCode::from(75));
        assert_eq!(exit_code(&stopped(OperatorError::Transaction("fenced".into()))), ExitCode::FAILURE);
        assert_eq!(exit_code(&anyhow::anyhow!("bad config")), ExitCode::FAILURE);
    }
}
