//! The `portcullis` binary: parse the command line, start logging, run, map errors to exit codes
//! (bad configuration exits 64 with a plain message).

use std::process::ExitCode;

use clap::Parser;
use portcullis::app::{self, RunError};
use portcullis::cli::{self, Cli, Command, CommandError};
use portcullis::config::{Config, LogConfig};

const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let args = Cli::parse();
    match args.command {
        Command::Run { config } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(problems) => {
                    init_logging(&Default::default());
                    return config_error(&problems.to_string());
                }
            };
            init_logging(&config.log);
            serve(app::run(config))
        }
        command => {
            init_logging(&Default::default());
            run_command(command)
        }
    }
}

fn run_command(command: Command) -> ExitCode {
    match command {
        Command::Run { .. } => ExitCode::FAILURE,
        Command::Demo { listen } => serve(portcullis::demo::run(listen)),
        Command::Check(files) => command_result(cli::check::run(&files)),
        Command::Keys(args) => command_result(cli::keys::run(&args)),
        Command::Explain {
            files,
            key_id,
            token_file,
            principal,
            scopes,
            method,
            path,
        } => {
            let who = cli::explain::Who {
                key_id,
                token_file,
                principal,
                scopes,
            };
            command_result(cli::explain::run(&files, &who, &method, &path))
        }
        Command::Replay {
            policy,
            keys,
            audit,
        } => command_result(cli::replay::run(&policy, keys.as_deref(), &audit).and_then(
            |changed| match changed {
                0 => Ok(()),
                n => Err(CommandError::Changed(n)),
            },
        )),
        Command::Schema { which } => command_result(cli::schema(which)),
        Command::Inject(args) => command_result(
            portcullis::inject::inject_stdio(&args.into()).map_err(CommandError::from),
        ),
        Command::Injector {
            listen,
            cert,
            key,
            options,
        } => serve(async move {
            portcullis::inject::run_injector(listen, &cert, &key, options.into()).await
        }),
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
        Err(CommandError::Changed(n)) => {
            eprintln!("portcullis: {n} decision(s) would change");
            ExitCode::FAILURE
        }
        Err(CommandError::Arguments(message)) => {
            eprintln!("portcullis: {message}");
            ExitCode::from(2)
        }
    }
}

fn config_error(message: &str) -> ExitCode {
    eprintln!("{message}");
    ExitCode::from(EXIT_CONFIG)
}

/// Logs go to stderr: human-readable on a terminal, JSON when `log.format: json`. The filter comes
/// from `PORTCULLIS_LOG`, then `RUST_LOG`, then `log.level`, then `info`.
fn init_logging(log: &LogConfig) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("PORTCULLIS_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(log.level.as_deref().unwrap_or("info"))
        });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if log.format.as_deref() == Some("json") {
        builder.json().init();
    } else {
        builder.with_ansi(std::io::stderr().is_terminal()).init();
    }
}
