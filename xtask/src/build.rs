//! `cargo xtask build`: the agent, with its kernel programs embedded.

use std::path::PathBuf;

use crate::{exec, setup};

#[derive(clap::Args)]
pub struct Options {
    /// Optimized build (target/release/tracer).
    #[arg(long)]
    pub release: bool,
}

/// Builds and returns the path of the agent binary.
pub fn run(options: &Options) -> anyhow::Result<PathBuf> {
    if !setup::build_ready() {
        println!("build: build tools missing; running setup first");
        setup::run()?;
    }
    let mut cargo = exec::cargo();
    cargo.args(["build", "--package", "tracer"]);
    if options.release {
        cargo.arg("--release");
    }
    exec::run(&mut cargo)?;
    let profile = if options.release { "release" } else { "debug" };
    Ok(exec::workspace_root()
        .join("target")
        .join(profile)
        .join("tracer"))
}
