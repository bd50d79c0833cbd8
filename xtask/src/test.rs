//! `cargo xtask test`: unit tests, then the integration tests as root.

use std::process::Command;

use anyhow::bail;

use crate::{build, exec, setup};

// The kernel matrix (`--kernels`) lives beside this file.
#[path = "kernels/mod.rs"]
mod kernels;

#[derive(clap::Args)]
pub struct Options {
    /// Only run tests whose name contains this.
    pub filter: Option<String>,
    #[command(flatten)]
    pub kernels: kernels::KernelOptions,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    if options.kernels.enabled() {
        return kernels::run(&options.kernels, options.filter.as_deref());
    }
    setup::run()?;

    println!("test: unit tests");
    let mut unit = exec::cargo();
    unit.args([
        "test",
        "--workspace",
        "--exclude",
        "integration-tests",
        "--exclude",
        "tracer-ebpf",
    ]);
    if let Some(filter) = &options.filter {
        unit.arg(filter);
    }
    exec::run(&mut unit)?;

    println!("test: integration tests (root, real kernel programs, real traffic)");
    // The CLI tests run the agent binary itself.
    let tracer = build::run(&build::Options { release: false })?;
    let mut integration = exec::cargo();
    integration
        .args(["test", "--package", "integration-tests"])
        .env("TRACER_BIN", &tracer);
    if !exec::is_root() {
        if Command::new("sudo").arg("--version").output().is_err() {
            bail!("the integration tests need root, and sudo is not installed: run as root");
        }
        // The test binaries run through sudo; cargo itself stays unprivileged.
        integration.env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER", "sudo -E");
    }
    // One at a time: each test loads its own programs and measures timings that
    // a parallel test's traffic would disturb.
    integration.args(["--", "--test-threads=1"]);
    if let Some(filter) = &options.filter {
        integration.arg(filter);
    }
    exec::run(&mut integration)
}
