//! The `dlpipe` command line. Each subcommand is a file in `cli/`.

mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    let log_format = args.log_format;
    cli::init_logging(args.verbose, log_format);
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // With JSON logs every line of stderr is JSON, the final error included.
            match log_format {
                cli::LogFormat::Json => tracing::error!(error = format!("{error:#}"), "dlpipe failed"),
                cli::LogFormat::Text => eprintln!("error: {error:#}"),
            }
            cli::exit_code(&error)
        }
    }
}
