mod cli;
mod commands;

use std::process::ExitCode;

use clap::Parser;

use tracer::sinks::stream::Stream;

use crate::{
    cli::{Cli, Command},
    commands::stream,
};

fn main() -> ExitCode {
    pin_malloc_mmap_threshold();
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
                let pipeline = stream::start(&cli.kernel, &args.filter, &args.diagnosis)?;
                let stdout = std::io::BufWriter::new(std::io::stdout().lock());
                let mut out = Stream::new(stdout, args.format, true, true);
                stream::run(pipeline, None, &mut [&mut out]).await.map(drop)
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

/// Keeps glibc's mmap threshold at its default of 128 KiB for the whole run.
/// Left dynamic, glibc raises it to the size of the largest mmap'd block freed,
/// and parsing the kernel's BTF at start frees a 13 MiB one; from then on every
/// block up to that size comes from the brk heap, whose RSS grew under steady
/// churn while the memory in use stayed flat (bench/notes.md has the
/// measurements).
fn pin_malloc_mmap_threshold() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes an allocator parameter; glibc allows it at
    // any time.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}
