//! Project tasks: `cargo xtask setup|build|run|test|bench`.

mod bench;
mod build;
mod exec;
mod run;
mod setup;
mod test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Tasks for the TCP connection tracer")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what building and testing need: rust-src, bpf-linker (built
    /// against the Rust toolchain's own LLVM), and the Debian packages the tests
    /// use. Idempotent: what is already there is skipped.
    Setup,
    /// Build the agent with its kernel programs embedded (target/<profile>/tracer).
    Build(build::Options),
    /// Build and run the agent (as root: re-executed under sudo when needed).
    /// Arguments after `--` go to the agent, e.g. `cargo xtask run -- trace --format json`.
    Run(run::Options),
    /// Run the unit tests, then the integration tests as root (they load the real
    /// programs and drive real TCP traffic).
    Test(test::Options),
    /// Measure what the agent costs and holds (as root): throughput against a
    /// local nginx without a tracer, with the agent and with bpftrace; kernel
    /// time per program run; lost events and agent CPU at high connection
    /// rates; RSS with many connections open; the userspace pipeline
    /// micro-benchmark. Prints a table and writes bench/results.md. About 20
    /// minutes; --soak adds 10, --quick is a smoke run of a few minutes.
    Bench(bench::Options),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::run(),
        Command::Build(options) => build::run(&options).map(|_| ()),
        Command::Run(options) => run::run(&options),
        Command::Test(options) => test::run(&options),
        Command::Bench(options) => bench::run(&options),
    }
}
