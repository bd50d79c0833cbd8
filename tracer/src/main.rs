mod allocator;
mod cli;
mod commands;

use std::process::ExitCode;

use clap::Parser;

use crate::{
    cli::{Cli, Command},
    commands::stream::{self, Show},
};

fn main() -> ExitCode {
    allocator::pin_mmap_threshold();
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        _ => log::LevelFilter::Debug,
    };
    env_logger::Builder::new()
        .filter_level(level)
        .format_target(false)
        .parse_default_env()
        .init();

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("tracer: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let command = cli.command.unwrap_or(Command::Agent(cli.agent));
    let result = runtime.block_on(async {
        match &command {
            Command::Agent(args) => commands::agent::run(&cli.kernel, args).await,
            Command::Trace(args) => {
                let show = Show {
                    format: args.format,
                    events: true,
                    findings: true,
                };
                stream::run(&cli.kernel, &args.filter, &args.diagnosis, show, None)
                    .await
                    .map(drop)
            }
            Command::Diagnose(args) => commands::diagnose::run(&cli.kernel, args).await,
            Command::Probe(args) => commands::probe::run(&cli.kernel, args),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tracer: {e:#}");
            ExitCode::FAILURE
        }
    }
}
