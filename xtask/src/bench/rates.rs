//! Connection rates from the loopback client, with and without the agent:
//! events lost, the agent's CPU, the ring buffer's fill.

use std::{
    sync::atomic::Ordering,
    thread,
    time::{Duration, Instant},
};

use super::{
    Plan, Tools, check_interrupted,
    loopback::{ClientCounters, Server, drive_connections},
    measure::{CpuTimes, process_cpu_seconds, time_wait_sockets},
    metric_names::{EVENTS, EVENTS_LOST, RINGBUF_PENDING, RINGBUF_SIZE, UNTRACKED},
    thousands,
    workload::Agent,
};

#[derive(Default)]
pub(super) struct RateResult {
    pub(super) target: Option<f64>,
    pub(super) with_agent: bool,
    pub(super) achieved: f64,
    connections: u64,
    pub(super) errors: u64,
    pub(super) events: f64,
    pub(super) lost: f64,
    pub(super) untracked: f64,
    pub(super) agent_cpu_seconds: f64,
    /// Busy CPU seconds, all CPUs.
    cpu_seconds: f64,
    seconds: f64,
    /// Sockets in TIME_WAIT when the run started.
    pub(super) time_wait_before: u64,
    pub(super) ringbuf_peak: f64,
    pub(super) ringbuf_size: f64,
}

impl RateResult {
    pub(super) fn agent_cpu_percent(&self) -> f64 {
        self.agent_cpu_seconds / self.seconds * 100.0
    }

    pub(super) fn cpu_us_per_connection(&self) -> f64 {
        self.cpu_seconds * 1e6 / self.connections.max(1) as f64
    }

    pub(super) fn reached(&self) -> bool {
        self.target.is_none_or(|t| self.achieved >= 0.95 * t)
    }
}

pub(super) fn rate_name(rate: Option<f64>) -> String {
    rate.map_or("as fast as possible".into(), |r| {
        format!("{}/s", thousands(r as u64))
    })
}

pub(super) fn connection_rate(
    plan: &Plan,
    tools: &Tools,
    rate: Option<f64>,
    with_agent: bool,
) -> anyhow::Result<RateResult> {
    check_interrupted()?;
    let server = Server::start(4, false)?;
    let agent = with_agent.then(|| Agent::start(tools.tracer)).transpose()?;
    thread::sleep(Duration::from_secs(1));
    let before = agent.as_ref().map(Agent::scrape).transpose()?;
    let agent_cpu_before = agent
        .as_ref()
        .map(|a| process_cpu_seconds(a.pid()))
        .transpose()?;
    let counters = ClientCounters::default();
    let time_wait_before = time_wait_sockets();
    let cpu_before = CpuTimes::read()?;
    let started = Instant::now();
    let mut ringbuf_peak = 0.0_f64;
    thread::scope(|scope| {
        let client =
            scope.spawn(|| drive_connections(&server.addrs, rate, plan.duration, None, &counters));
        while !client.is_finished() {
            thread::sleep(Duration::from_millis(500));
            if let Some(Ok(now)) = agent.as_ref().map(Agent::scrape) {
                ringbuf_peak = ringbuf_peak.max(now.get(RINGBUF_PENDING));
            }
        }
    });
    let seconds = started.elapsed().as_secs_f64();
    let cpu_seconds = CpuTimes::read()?.busy_seconds_since(&cpu_before);
    let mut result = RateResult {
        target: rate,
        with_agent,
        achieved: counters.done.load(Ordering::Relaxed) as f64 / seconds,
        connections: counters.done.load(Ordering::Relaxed),
        errors: counters.errors.load(Ordering::Relaxed),
        cpu_seconds,
        seconds,
        time_wait_before,
        ..RateResult::default()
    };
    if let (Some(agent), Some(before), Some(agent_cpu_before)) = (agent, before, agent_cpu_before) {
        thread::sleep(Duration::from_millis(500));
        let after = agent.scrape()?;
        result.agent_cpu_seconds = process_cpu_seconds(agent.pid())? - agent_cpu_before;
        result.events = after.delta(&before, EVENTS);
        result.lost = after.delta(&before, EVENTS_LOST);
        result.untracked = after.delta(&before, UNTRACKED);
        result.ringbuf_peak = ringbuf_peak.max(after.get(RINGBUF_PENDING));
        result.ringbuf_size = after.get(RINGBUF_SIZE);
        agent.stop();
    }
    server.stop();
    println!(
        "bench: connections at {}, {}: achieved {}/s, {:.1} µs CPU/connection{}",
        rate_name(rate),
        if with_agent { "agent" } else { "no tracer" },
        thousands(result.achieved as u64),
        result.cpu_us_per_connection(),
        if with_agent {
            format!(
                ", {} events, {} lost, agent CPU {:.1}% of one core",
                thousands(result.events as u64),
                result.lost,
                result.agent_cpu_percent()
            )
        } else {
            String::new()
        }
    );
    thread::sleep(Duration::from_secs(1));
    Ok(result)
}
