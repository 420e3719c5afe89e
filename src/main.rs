//! The `portcullis` binary: parse the command line, start logging, run, map errors to exit codes
//! (bad configuration exits 64 with a plain message).

use std::process::ExitCode;

use clap::Parser;
use portcullis::app::{self, RunError};
use portcullis::cli::{self, Cli, Command, CommandError};
use portcullis::config::Config;

const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let args = Cli::parse();
    init_logging();
    match args.command {
        Command::Run { config } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(problems) => return config_error(&problems.to_string()),
            };
            serve(app::run(config))
        }
        Command::Demo { listen } => serve(portcullis::demo::run(listen)),
        Command::Check(files) => command_result(cli::check::run(&files)),
        Command::Keys(command) => command_result(cli::keys::run(&command)),
        Command::Explain {
            files,
            key_id,
            method,
            path,
        } => command_result(cli::explain::run(&files, &key_id, &method, &path)),
    }
}

fn serve(future: impl std::future::Future<Output = Result<(), RunError>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("portcullis: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(future) {
        Ok(()) => ExitCode::SUCCESS,
        Err(RunError::Config(message)) => config_error(&message),
        Err(RunError::Other(e)) => {
            eprintln!("portcullis: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn command_result(result: Result<(), CommandError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(CommandError::Usage(message)) => config_error(&message),
        Err(CommandError::Problems(n)) => {
            eprintln!("portcullis: {n} problem(s) found");
            ExitCode::FAILURE
        }
    }
}

fn config_error(message: &str) -> ExitCode {
    eprintln!("{message}");
    ExitCode::from(EXIT_CONFIG)
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PORTCULLIS_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
