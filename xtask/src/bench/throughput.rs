//! Throughput: wrk under each tracer in interleaved rounds (the order rotates
//! each round), with the machine's CPU per request and what the agent did.

use std::{
    thread,
    time::{Duration, Instant},
};

use super::{
    Plan, Tools, check_interrupted,
    measure::{CpuTimes, Memory, process_cpu_seconds, process_memory},
    median,
    metric_names::{EVENTS, EVENTS_LOST, UNTRACKED},
    workload::{Running, TracerKind, Workload, WrkResult, wrk},
};

/// One wrk run under one tracer.
#[derive(Clone, Debug)]
pub(super) struct Run {
    pub(super) round: u32,
    pub(super) tracer: TracerKind,
    pub(super) wrk: WrkResult,
    /// Busy CPU seconds, all CPUs, during the wrk run.
    cpu_seconds: f64,
    pub(super) agent: Option<AgentRun>,
    /// Lines the peer printed (closed connections).
    pub(super) peer_lines: Option<u64>,
}

impl Run {
    pub(super) fn cpu_us_per_request(&self) -> f64 {
        self.cpu_seconds * 1e6 / self.wrk.requests as f64
    }
}

/// What the agent did during one run.
#[derive(Clone, Debug, Default)]
pub(super) struct AgentRun {
    pub(super) events: f64,
    pub(super) lost: f64,
    pub(super) untracked: f64,
    pub(super) cpu_seconds: f64,
    pub(super) seconds: f64,
    pub(super) memory: Memory,
}

pub(super) struct Throughput {
    pub(super) workload: Workload,
    pub(super) runs: Vec<Run>,
}

impl Throughput {
    pub(super) fn of(&self, tracer: TracerKind) -> impl Iterator<Item = &Run> {
        self.runs.iter().filter(move |r| r.tracer == tracer)
    }

    pub(super) fn median_rps(&self, tracer: TracerKind) -> f64 {
        median(self.of(tracer).map(|r| r.wrk.requests_per_sec).collect())
    }

    pub(super) fn median_cpu_us(&self, tracer: TracerKind) -> f64 {
        median(self.of(tracer).map(Run::cpu_us_per_request).collect())
    }

    pub(super) fn ratio(&self, tracer: TracerKind) -> f64 {
        self.median_rps(tracer) / self.median_rps(TracerKind::None)
    }

    /// The median of the per-round ratios against the no-tracer run of the same
    /// round: less sensitive to drift over the whole run.
    pub(super) fn paired_ratio(&self, tracer: TracerKind) -> f64 {
        let ratios = self
            .of(tracer)
            .filter_map(|run| {
                self.of(TracerKind::None)
                    .find(|none| none.round == run.round)
                    .map(|none| run.wrk.requests_per_sec / none.wrk.requests_per_sec)
            })
            .collect();
        median(ratios)
    }

    pub(super) fn agent_runs(&self) -> impl Iterator<Item = &AgentRun> {
        self.runs.iter().filter_map(|r| r.agent.as_ref())
    }
}

pub(super) fn throughput(
    plan: &Plan,
    tools: &Tools,
    workload: Workload,
) -> anyhow::Result<Throughput> {
    let mut runs = Vec::new();
    // Warm nginx and the page cache up; not measured.
    wrk(workload, &tools.url()?, Duration::from_secs(1))?;
    for round in 0..plan.rounds {
        // The order rotates, so each tracer runs first, second and third.
        let mut order = TracerKind::ALL;
        order.rotate_left(round as usize % TracerKind::ALL.len());
        for tracer in order {
            check_interrupted()?;
            let run = throughput_run(plan, tools, workload, tracer, round)?;
            println!(
                "bench: {} round {}/{}: {:<20} {:>10.0} req/s, {:.1} µs CPU/request{}",
                workload.short(),
                round + 1,
                plan.rounds,
                tracer.name(),
                run.wrk.requests_per_sec,
                run.cpu_us_per_request(),
                match &run.agent {
                    Some(agent) => format!(
                        ", {:.0} events/s, {} lost",
                        agent.events / agent.seconds,
                        agent.lost
                    ),
                    None => String::new(),
                }
            );
            runs.push(run);
        }
    }
    Ok(Throughput { workload, runs })
}

fn throughput_run(
    plan: &Plan,
    tools: &Tools,
    workload: Workload,
    tracer: TracerKind,
    round: u32,
) -> anyhow::Result<Run> {
    let running = Running::start(tracer, tools)?;
    // Let start-up work (BTF parsing, the first scans) finish.
    thread::sleep(Duration::from_secs(1));
    let agent_before = match &running {
        Running::Agent(agent) => Some((agent.scrape()?, process_cpu_seconds(agent.pid())?)),
        _ => None,
    };
    let cpu_before = CpuTimes::read()?;
    let started = Instant::now();
    let result = wrk(workload, &tools.url()?, plan.duration)?;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_after = CpuTimes::read()?;
    let agent = match (&running, agent_before) {
        (Running::Agent(agent), Some((scrape_before, cpu_before))) => {
            // The agent reads the ring buffer continuously; give it a moment
            // to count the last events.
            thread::sleep(Duration::from_millis(300));
            let scrape_after = agent.scrape()?;
            Some(AgentRun {
                events: scrape_after.delta(&scrape_before, EVENTS),
                lost: scrape_after.delta(&scrape_before, EVENTS_LOST),
                untracked: scrape_after.delta(&scrape_before, UNTRACKED),
                cpu_seconds: process_cpu_seconds(agent.pid())? - cpu_before,
                seconds: elapsed,
                memory: process_memory(agent.pid())?,
            })
        }
        _ => None,
    };
    let peer_lines = match &running {
        Running::Peer(peer) => Some(peer.lines()),
        _ => None,
    };
    running.stop();
    // Let the connections of this run close before the next one starts.
    thread::sleep(Duration::from_secs(1));
    Ok(Run {
        round,
        tracer,
        wrk: result,
        cpu_seconds: cpu_after.busy_seconds_since(&cpu_before),
        agent,
        peer_lines,
    })
}
