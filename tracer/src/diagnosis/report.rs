//! The `diagnose` report: per process, then per destination (and listening
//! port), what the connections did and what to change. It serializes as the
//! JSON report; `sinks::report` writes it for people.

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use serde::Serialize;

use super::{
    Diagnoser,
    estimate::Estimate,
    finding::Finding,
    pools::PoolSample,
    samples::Summary,
    stats::{CloseCounts, ConnectionStats},
};
use crate::{comm::Comm, event::Role};

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub duration_s: f64,
    pub processes: Vec<ProcessReport>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ProcessReport {
    pub pid: u32,
    pub comm: Comm,
    pub destinations: Vec<Traffic>,
    pub listeners: Vec<Traffic>,
    pub findings: Vec<Finding>,
}

/// Connections of one process to one destination, or on one listening port.
#[derive(Clone, Debug, Serialize)]
pub struct Traffic {
    /// Destination address (client side); absent for listening ports.
    pub raddr: Option<IpAddr>,
    pub rport: Option<u16>,
    /// Listening port (server side).
    pub lport: Option<u16>,
    pub role: Option<Role>,
    pub connections_opened: u64,
    pub closed: CloseCounts,
    pub peer_close_idle: Option<Summary>,
    pub local_close_idle: Option<Summary>,
    pub reuse_idle: Option<Summary>,
    pub close_wait: Option<Summary>,
    pub graceful_peer_closes: u64,
    pub mid_request_peer_closes: u64,
    /// The peer's idle timeout, inferred from its closes.
    pub peer_idle_timeout: Option<Estimate>,
    /// This side's idle timeout, inferred from its own closes.
    pub local_idle_timeout: Option<Estimate>,
    pub lifetime: Option<Summary>,
    /// Client: SYN to ESTABLISHED.
    pub connect_time: Option<Summary>,
    /// Server: handshake to accept().
    pub accept_wait: Option<Summary>,
    pub connect_errors: BTreeMap<String, u64>,
    /// The pool over its latest samples.
    pub pool: Option<PoolSummary>,
}

/// A pool (or a server's connections on a port) over its latest samples.
#[derive(Clone, Debug, Serialize)]
pub struct PoolSummary {
    pub seconds: usize,
    pub open_now: u64,
    pub busy_now: u64,
    pub busy_fraction: f64,
    pub requests_per_s: f64,
    pub new_connections_per_s: f64,
    pub mean_response_ms: Option<f64>,
    pub median_gap_us: Option<f64>,
    pub saturated_s: f64,
}

impl PoolSummary {
    fn new(history: &super::pools::PoolHistory, window: usize) -> Option<Self> {
        let recent: Vec<&PoolSample> = history.samples.iter().rev().take(window).collect();
        let latest = recent.first()?;
        let n = recent.len() as f64;
        let responses: u64 = recent.iter().map(|s| s.responses).sum();
        let weighted: f64 = recent
            .iter()
            .filter_map(|s| s.mean_response_ms.map(|ms| ms * s.responses as f64))
            .sum();
        Some(Self {
            seconds: recent.len(),
            open_now: latest.open,
            busy_now: latest.busy,
            busy_fraction: recent.iter().map(|s| s.busy_fraction).sum::<f64>() / n,
            requests_per_s: recent.iter().map(|s| s.requests).sum::<u64>() as f64 / n,
            new_connections_per_s: recent.iter().map(|s| s.opened).sum::<u64>() as f64 / n,
            mean_response_ms: (responses > 0).then(|| weighted / responses as f64),
            median_gap_us: latest.median_gap_us,
            saturated_s: history.saturated_s,
        })
    }
}

impl Traffic {
    fn new(stats: &ConnectionStats, jiffy: Duration, window: usize) -> Self {
        Self {
            raddr: None,
            rport: None,
            lport: None,
            role: stats.role,
            connections_opened: stats.opened,
            closed: stats.closes.clone(),
            peer_close_idle: stats.peer_close_idle.summary(),
            local_close_idle: stats.local_close_idle.summary(),
            reuse_idle: stats.reuse_idle.summary(),
            close_wait: stats.close_wait.summary(),
            graceful_peer_closes: stats.graceful_peer_closes,
            mid_request_peer_closes: stats.mid_request_peer_closes,
            peer_idle_timeout: stats.peer_idle_timeout(jiffy),
            local_idle_timeout: stats.local_idle_timeout(jiffy),
            lifetime: stats.lifetimes.summary(),
            connect_time: stats.connect_time.summary(),
            accept_wait: stats.accept_wait.summary(),
            connect_errors: stats.connect_errors.clone(),
            pool: PoolSummary::new(&stats.history, window),
        }
    }
}

impl Diagnoser {
    pub fn report(&self, duration: Duration) -> Report {
        let jiffy = self.config.jiffy;
        let window = self.config.window_samples();
        let mut processes: BTreeMap<u32, ProcessReport> = BTreeMap::new();
        for (key, stats) in self.destinations() {
            let mut traffic = Traffic::new(stats, jiffy, window);
            traffic.raddr = Some(key.raddr);
            traffic.rport = Some(key.rport);
            process(&mut processes, key.pid, stats.comm)
                .destinations
                .push(traffic);
        }
        for (key, stats) in self.listeners() {
            let mut traffic = Traffic::new(stats, jiffy, window);
            traffic.lport = Some(key.lport);
            process(&mut processes, key.pid, stats.comm)
                .listeners
                .push(traffic);
        }
        for finding in self.findings() {
            process(&mut processes, finding.pid, finding.comm)
                .findings
                .push(finding);
        }
        let mut processes: Vec<ProcessReport> = processes.into_values().collect();
        for process in &mut processes {
            process
                .destinations
                .sort_by_key(|t| std::cmp::Reverse(t.connections_opened + t.closed.total()));
            process.listeners.sort_by_key(|t| t.lport);
        }
        // Processes with findings first, then the busiest.
        processes.sort_by_key(|p| {
            let worst = p.findings.iter().map(|f| f.severity).max();
            let busy: u64 = p
                .destinations
                .iter()
                .chain(&p.listeners)
                .map(|t| t.closed.total())
                .sum();
            (std::cmp::Reverse(worst), std::cmp::Reverse(busy), p.pid)
        });
        Report {
            duration_s: duration.as_secs_f64(),
            processes,
        }
    }
}

/// The report entry of process `pid`, created on first use.
fn process(
    processes: &mut BTreeMap<u32, ProcessReport>,
    pid: u32,
    comm: Comm,
) -> &mut ProcessReport {
    let entry = processes.entry(pid).or_insert_with(|| ProcessReport {
        pid,
        comm: Comm::default(),
        destinations: Vec::new(),
        listeners: Vec::new(),
        findings: Vec::new(),
    });
    if entry.comm.is_empty() {
        entry.comm = comm;
    }
    entry
}
