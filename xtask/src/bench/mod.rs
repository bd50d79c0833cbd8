//! `cargo xtask bench`: what the agent costs and how much it holds, measured on
//! this machine, printed and written to `bench/results.md`.
//!
//! - Throughput: `wrk` against a local nginx, keep-alive (the send/receive path)
//!   and a new connection per request (the state-change path), each without a
//!   tracer, with the agent, and with a peer tracer (`bench/peer.bt`, bpftrace on
//!   the same tracepoint, one line per closed connection, like tcplife),
//!   interleaved over rounds; medians, ratios, and CPU per request.
//! - Kernel cost per program run (`kernel.bpf_stats_enabled`), in separate runs:
//!   the statistics cost two clock reads per run, which the throughput runs
//!   must not pay; beside it, what an almost empty program costs here.
//! - Connection rates from a loopback client: events lost, agent CPU.
//! - RSS with many tracked connections held open, by helper processes (this
//!   binary with `--hold N`), as one process's descriptor limit may be capped
//!   below what 100,000 connections with both ends local need.
//! - The userspace pipeline micro-benchmark (`tracer/benches/pipeline.rs`).
//! - With `--soak`: a million connections over about ten minutes, RSS sampled.
//!
//! Every part that fails is reported as failed and the others still run;
//! `--only` runs some parts (written to `bench/results-partial.md`).
//!
//! Throughput on a small machine is noisy: rounds are interleaved (the order
//! rotates each round) so that drift hits every configuration alike, and CPU per
//! request is reported beside requests per second.
//!
//! This file holds the options, the plan they make and the run of the parts,
//! which measure in modules of their own (`throughput`, `kernel_cost`, `rates`,
//! `rss`, `soak`, `pipeline`) from what they share: `workload` (nginx, wrk and
//! the tracers under test), `measure` (/proc, the kernel's program statistics,
//! the agent's metrics) and `loopback` (a trivial server and a paced client).
//! `report` renders what they measured.

mod kernel_cost;
mod loopback;
mod measure;
// The one definition of the agent's metric names; the xtask cannot depend on
// the agent's crate (that builds the kernel programs).
#[path = "../../../tracer/src/sinks/metrics/names.rs"]
#[expect(dead_code, reason = "the bench reads only some of the agent's metrics")]
mod metric_names;
mod pipeline;
mod rates;
mod report;
mod rss;
mod soak;
mod throughput;
mod workload;

use std::{
    fs,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use nix::sys::signal::{self, Signal};

use self::{
    kernel_cost::{kernel_cost, reference_cost},
    measure::{BpfStats, Machine, time_wait_sockets},
    pipeline::pipeline_benchmark,
    rates::{connection_rate, rate_name},
    report::Report,
    rss::{held_connections, hold_helper},
    soak::soak,
    throughput::throughput,
    workload::{Nginx, Workload},
};
use crate::{build, exec, setup};

#[derive(clap::Args)]
pub struct Options {
    /// Interleaved rounds per workload (each runs no tracer, the agent and
    /// bpftrace once) [default: 5, 1 with --quick].
    #[arg(long, value_name = "N")]
    pub rounds: Option<u32>,
    /// Seconds per wrk run and per connection-rate run [default: 10, 3 with --quick].
    #[arg(long, value_name = "SECS")]
    pub duration: Option<u64>,
    /// Also run the soak test: a million connections over about ten minutes
    /// with the agent running (with --quick: 30,000 over 30 s).
    #[arg(long)]
    pub soak: bool,
    /// A short smoke run: one round of a few seconds, fewer connections held;
    /// written to bench/results-quick.md, not bench/results.md.
    #[arg(long)]
    pub quick: bool,
    /// Run only these parts (comma-separated), written to
    /// bench/results-partial.md.
    #[arg(long, value_enum, value_delimiter = ',', value_name = "PART")]
    pub only: Vec<Part>,
    /// Measure this agent binary instead of building one.
    #[arg(long, value_name = "PATH")]
    pub tracer: Option<PathBuf>,
    /// Internal: hold N loopback connections open (both ends) until stdin
    /// closes. The held-connections test runs several such processes, as one
    /// process's descriptor limit may not fit them all.
    #[arg(long, value_name = "N", hide = true)]
    pub hold: Option<usize>,
}

/// The parts of the benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// The criterion micro-benchmark of the userspace pipeline.
    Pipeline,
    /// wrk against nginx: no tracer, agent, bpftrace.
    Throughput,
    /// Kernel time per program run (bpf_stats_enabled).
    Cost,
    /// Connection rates: lost events, agent CPU.
    Rate,
    /// Agent RSS with connections held open.
    Held,
    /// A million connections over about ten minutes.
    Soak,
}

/// What this run measures, from the options.
struct Plan {
    quick: bool,
    parts: Vec<Part>,
    rounds: u32,
    duration: Duration,
    /// New connections per second for the rate tests (`None` is as fast as
    /// the machine goes), and whether the agent runs.
    rates: Vec<(Option<f64>, bool)>,
    /// Connections held open at each RSS checkpoint.
    held: Vec<usize>,
    soak: Option<SoakPlan>,
    output: PathBuf,
}

struct SoakPlan {
    connections: u64,
    duration: Duration,
    warm_up: Duration,
    sample_every: Duration,
}

impl Plan {
    fn new(options: &Options) -> anyhow::Result<Self> {
        let rounds = options.rounds.unwrap_or(if options.quick { 1 } else { 5 });
        let seconds = options
            .duration
            .unwrap_or(if options.quick { 3 } else { 10 });
        ensure!(rounds >= 1, "--rounds must be at least 1");
        ensure!(seconds >= 1, "--duration must be at least 1 s");
        let parts = if options.only.is_empty() {
            let mut parts = vec![
                Part::Pipeline,
                Part::Throughput,
                Part::Cost,
                Part::Rate,
                Part::Held,
            ];
            if options.soak {
                parts.push(Part::Soak);
            }
            parts
        } else {
            options.only.clone()
        };
        let soak = parts.contains(&Part::Soak).then(|| {
            if options.quick {
                SoakPlan {
                    connections: 30_000,
                    duration: Duration::from_secs(30),
                    warm_up: Duration::from_secs(10),
                    sample_every: Duration::from_secs(5),
                }
            } else {
                SoakPlan {
                    connections: 1_000_000,
                    duration: Duration::from_secs(600),
                    warm_up: Duration::from_secs(60),
                    sample_every: Duration::from_secs(10),
                }
            }
        });
        let name = if options.quick {
            "results-quick.md"
        } else if !options.only.is_empty() {
            "results-partial.md"
        } else {
            "results.md"
        };
        Ok(Self {
            quick: options.quick,
            parts,
            rounds,
            duration: Duration::from_secs(seconds),
            rates: vec![
                (None, false),
                (Some(10_000.0), true),
                (Some(20_000.0), true),
                (None, true),
            ],
            held: if options.quick {
                vec![5_000, 10_000]
            } else {
                vec![10_000, 25_000, 50_000, 100_000]
            },
            soak,
            output: exec::workspace_root().join("bench").join(name),
        })
    }

    fn runs(&self, part: Part) -> bool {
        self.parts.contains(&part)
    }
}

/// Set by SIGINT: the run stops at the next step and cleans up.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: std::ffi::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    if let Some(count) = options.hold {
        return hold_helper(count);
    }
    let plan = Plan::new(options)?;
    if !exec::is_root() {
        bail!(
            "the benchmark loads BPF programs and sets kernel.bpf_stats_enabled: run it as \
             root (e.g. sudo -E env PATH=\"$PATH\" cargo xtask bench)"
        );
    }
    let tracer = match &options.tracer {
        Some(path) => path.clone(),
        None => agent_binary()?,
    };
    ensure!(tracer.is_file(), "no agent binary at {}", tracer.display());
    setup::bench_packages()?;

    let handler = signal::SigHandler::Handler(on_sigint);
    // SAFETY: the handler only stores to an atomic.
    unsafe { signal::signal(Signal::SIGINT, handler) }.context("installing a SIGINT handler")?;

    let machine = Machine::read(&tracer);
    println!("bench: {}", machine.summary());
    let mut report = Report::new(machine, &plan, options);

    // A part that fails is reported as such; the others still run.
    let attempt = |report: &mut Report, part: &str, result: anyhow::Result<()>| {
        if let Err(error) = result {
            if INTERRUPTED.load(Ordering::SeqCst) {
                return Err(error);
            }
            eprintln!("bench: {part} failed: {error:#}");
            report
                .failures
                .push((part.to_string(), format!("{error:#}")));
        }
        Ok(())
    };

    if plan.runs(Part::Pipeline) {
        println!("bench: userspace pipeline micro-benchmark (criterion)");
        let result = pipeline_benchmark(&plan).map(|p| report.pipeline = Some(p));
        attempt(&mut report, "pipeline micro-benchmark", result)?;
    }

    let stats = BpfStats::save()?;
    let nginx = if plan.runs(Part::Throughput) || plan.runs(Part::Cost) {
        Some(Nginx::start().context("starting nginx")?)
    } else {
        None
    };
    let peer_script = exec::workspace_root().join("bench").join("peer.bt");
    let tools = Tools {
        tracer: &tracer,
        peer_script: &peer_script,
        nginx: nginx.as_ref(),
        stats: &stats,
    };

    if plan.runs(Part::Throughput) {
        for workload in [Workload::KeepAlive, Workload::Churn] {
            let result = throughput(&plan, &tools, workload).map(|t| report.throughput.push(t));
            attempt(
                &mut report,
                &format!("{} throughput", workload.short()),
                result,
            )?;
        }
    }
    if plan.runs(Part::Cost) {
        let result = reference_cost(&tools).map(|ns| report.reference_ns = Some(ns));
        attempt(&mut report, "reference program cost", result)?;
        for workload in [Workload::KeepAlive, Workload::Churn] {
            let result = kernel_cost(&plan, &tools, workload).map(|c| report.costs.push(c));
            attempt(
                &mut report,
                &format!("{} kernel cost", workload.short()),
                result,
            )?;
        }
    }
    if plan.runs(Part::Rate) {
        for &(rate, with_agent) in &plan.rates {
            let result = settle(&plan)
                .and_then(|()| connection_rate(&plan, &tools, rate, with_agent))
                .map(|r| report.rates.push(r));
            attempt(
                &mut report,
                &format!("connection rate {}", rate_name(rate)),
                result,
            )?;
        }
    }
    if plan.runs(Part::Held) {
        let result = settle(&plan)
            .and_then(|()| held_connections(&plan, &tools))
            .map(|h| report.held = Some(h));
        attempt(&mut report, "held connections", result)?;
    }
    if let Some(soak_plan) = &plan.soak {
        let result = settle(&plan)
            .and_then(|()| soak(soak_plan, &tools))
            .map(|s| report.soak = Some(s));
        attempt(&mut report, "soak", result)?;
    }
    drop(nginx);
    drop(stats);

    let text = report.render();
    println!("\n{text}");
    fs::write(&plan.output, &text).with_context(|| format!("writing {}", plan.output.display()))?;
    println!("bench: written to {}", plan.output.display());
    ensure!(
        report.failures.is_empty(),
        "{} part(s) of the benchmark failed (see above)",
        report.failures.len()
    );
    Ok(())
}

/// Builds the optimized agent. `build::run` names the binary under the
/// workspace's `target/`; a CARGO_TARGET_DIR puts it elsewhere.
fn agent_binary() -> anyhow::Result<PathBuf> {
    let default = build::run(&build::Options { release: true })?;
    Ok(match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => exec::workspace_root()
            .join(dir)
            .join("release")
            .join("tracer"),
        None => default,
    })
}

/// What the measurements use.
struct Tools<'a> {
    tracer: &'a Path,
    peer_script: &'a Path,
    /// Running when the throughput or kernel-cost parts run.
    nginx: Option<&'a Nginx>,
    stats: &'a BpfStats,
}

impl Tools<'_> {
    fn url(&self) -> anyhow::Result<String> {
        Ok(self.nginx.context("nginx is not running")?.url())
    }
}

/// Waits (up to 70 s) for the TIME_WAIT sockets earlier parts left behind to
/// expire, so that each connection-heavy part starts from the same state: the
/// agent's scans read the kernel's socket tables. Not in quick runs.
fn settle(plan: &Plan) -> anyhow::Result<()> {
    if plan.quick || time_wait_sockets() < 1_000 {
        return Ok(());
    }
    println!(
        "bench: waiting for {} TIME_WAIT sockets to expire",
        thousands(time_wait_sockets())
    );
    let deadline = Instant::now() + Duration::from_secs(70);
    while time_wait_sockets() >= 1_000 && Instant::now() < deadline {
        check_interrupted()?;
        thread::sleep(Duration::from_secs(1));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Formatting

fn median(mut values: Vec<f64>) -> f64 {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn percent(ratio: f64) -> String {
    if ratio.is_finite() {
        format!("{:.1}%", ratio * 100.0)
    } else {
        "n/a".into()
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(Vec::new()).is_nan());
    }
}
