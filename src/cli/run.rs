//! `dlpipe run`: the streaming pipeline (see `dlpipe::pipeline`).

use dlpipe::config::Config;
use dlpipe::pipeline::{run as run_pipeline, RunOptions};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Worker threads per process (timely's -w).
    #[arg(short = 'w', long, default_value_t = 1)]
    workers: usize,
    /// Number of processes (timely's -n).
    #[arg(short = 'n', long, default_value_t = 1)]
    processes: usize,
    /// This process's index, 0..n (timely's -p).
    #[arg(short = 'p', long, default_value_t = 0)]
    process: usize,
    /// File of host:port lines, one per process (timely's -h; dlpipe's -h is help).
    #[arg(long, value_name = "HOSTFILE")]
    hostfile: Option<PathBuf>,
    /// Start the online classifier from a classifier file or snapshot (instead of the group's
    /// newest checkpoint).
    #[arg(long, value_name = "FILE", conflicts_with = "fresh")]
    init_model: Option<PathBuf>,
    /// Start a new classifier, ignoring the group's checkpoints (reading starts where
    /// pipeline.start_from says: by default the group's committed offsets).
    #[arg(long)]
    fresh: bool,
    /// Read each partition up to its end offset at start-up, publish, commit, and exit.
    #[arg(long)]
    stop_at_end: bool,
}

pub fn run(mut config: Config, args: RunArgs) -> anyhow::Result<()> {
    if args.workers == 0 || args.processes == 0 {
        anyhow::bail!("-w (workers per process) and -n (processes) must be at least 1");
    }
    if args.process >= args.processes {
        anyhow::bail!(
            "-p {} is not a process index of -n {} (0 to {})",
            args.process,
            args.processes,
            args.processes - 1
        );
    }
    if args.stop_at_end {
        config.pipeline.stop_at_end = true;
    }
    let mut timely_args = vec!["-w".to_string(), args.workers.to_string()];
    if args.processes > 1 {
        timely_args.extend(["-n".into(), args.processes.to_string(), "-p".into(), args.process.to_string()]);
        match &args.hostfile {
            Some(h) => timely_args.extend(["-h".into(), h.display().to_string()]),
            None => anyhow::bail!("-n {} needs --hostfile FILE with one host:port line per process", args.processes),
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // The first signal asks for a graceful stop (publish what is in flight, commit); a
        // second one, while that is under way, exits at once (status 1): an operator's way out
        // when the graceful stop cannot finish. Uncommitted records are read again next time.
        signal_hook::flag::register_conditional_shutdown(signal, 1, Arc::clone(&stop))?;
        signal_hook::flag::register(signal, Arc::clone(&stop))?;
    }
    let summaries =
        run_pipeline(RunOptions { config, timely_args, init_model: args.init_model, fresh: args.fresh, stop })?;
    for s in summaries {
        tracing::info!(
            worker = s.worker,
            partitions = ?s.partitions,
            updates = s.updates,
            accuracy = ?s.accuracy.map(|a| format!("{a:.4}")),
            "worker finished"
        );
    }
    Ok(())
}
