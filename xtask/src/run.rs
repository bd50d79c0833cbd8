//! `cargo xtask run`: build, then run the agent as root.

use std::process::Command;

use anyhow::bail;

use crate::{build, exec};

#[derive(clap::Args)]
pub struct Options {
    /// Build without optimizations.
    #[arg(long)]
    pub debug: bool,
    /// Arguments for the agent.
    #[arg(last = true)]
    pub args: Vec<String>,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    let binary = build::run(&build::Options {
        release: !options.debug,
    })?;
    let mut cmd = if exec::is_root() {
        Command::new(&binary)
    } else {
        if Command::new("sudo").arg("--version").output().is_err() {
            bail!("the agent needs root (or CAP_BPF and CAP_PERFMON), and sudo is not installed");
        }
        let mut sudo = Command::new("sudo");
        sudo.arg("-E").arg(&binary);
        sudo
    };
    cmd.args(&options.args);
    exec::run(&mut cmd)
}
