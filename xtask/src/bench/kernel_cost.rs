//! Kernel time per program run, from `kernel.bpf_stats_enabled`, in runs of
//! their own, and what an almost empty program costs on this machine.

use std::{
    collections::BTreeMap,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::ensure;

use super::{
    Plan, Tools, check_interrupted,
    measure::{ProgramStats, program_delta, program_stats},
    workload::{Peer, Running, TracerKind, Workload, wrk},
};

pub(super) struct KernelCost {
    pub(super) workload: Workload,
    /// Per tracer: requests during the measurement and per-program deltas.
    pub(super) tracers: Vec<(TracerKind, u64, f64, BTreeMap<String, ProgramStats>)>,
}

impl KernelCost {
    pub(super) fn average_ns(&self, tracer: TracerKind) -> Option<f64> {
        let (_, _, _, programs) = self.tracers.iter().find(|(t, ..)| *t == tracer)?;
        let time: u64 = programs.values().map(|p| p.run_time_ns).sum();
        let count: u64 = programs.values().map(|p| p.run_count).sum();
        (count > 0).then(|| time as f64 / count as f64)
    }
}

/// What an almost empty program costs per run on this machine, for scale:
/// bpftrace counting getppid() calls (one per-CPU map update), a million of
/// them. Virtual machines in particular make every program run dearer.
pub(super) fn reference_cost(tools: &Tools) -> anyhow::Result<f64> {
    check_interrupted()?;
    let peer = Peer::spawn(Command::new("bpftrace").args([
        "-e",
        "tracepoint:syscalls:sys_enter_getppid { @calls = count(); }",
    ]))?;
    tools.stats.set(true)?;
    let before = program_stats(peer.pid());
    for _ in 0..1_000_000 {
        std::hint::black_box(nix::unistd::getppid());
    }
    let after = program_stats(peer.pid());
    tools.stats.set(false)?;
    peer.stop();
    let delta = program_delta(&before?, &after?);
    let time: u64 = delta.values().map(|p| p.run_time_ns).sum();
    let runs: u64 = delta.values().map(|p| p.run_count).sum();
    ensure!(runs >= 1_000_000, "the reference program ran {runs} times");
    let ns = time as f64 / runs as f64;
    println!("bench: reference program (bpftrace count()): {ns:.0} ns/run");
    Ok(ns)
}

pub(super) fn kernel_cost(
    plan: &Plan,
    tools: &Tools,
    workload: Workload,
) -> anyhow::Result<KernelCost> {
    let mut tracers = Vec::new();
    for tracer in [TracerKind::Agent, TracerKind::Bpftrace] {
        check_interrupted()?;
        let running = Running::start(tracer, tools)?;
        thread::sleep(Duration::from_secs(1));
        let pid = running.pid().expect("a tracer runs");
        tools.stats.set(true)?;
        let before = program_stats(pid)?;
        let started = Instant::now();
        let result = wrk(workload, &tools.url()?, plan.duration);
        let seconds = started.elapsed().as_secs_f64();
        let after = program_stats(pid);
        tools.stats.set(false)?;
        running.stop();
        let result = result?;
        let delta = program_delta(&before, &after?);
        let total_time: u64 = delta.values().map(|p| p.run_time_ns).sum();
        let total_runs: u64 = delta.values().map(|p| p.run_count).sum();
        println!(
            "bench: {} kernel cost, {}: {} program runs, {:.0} ns/run, {:.0} ns/request",
            workload.short(),
            tracer.name(),
            total_runs,
            total_time as f64 / total_runs.max(1) as f64,
            total_time as f64 / result.requests.max(1) as f64
        );
        tracers.push((tracer, result.requests, seconds, delta));
        thread::sleep(Duration::from_secs(1));
    }
    Ok(KernelCost { workload, tracers })
}
