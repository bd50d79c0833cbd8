//! The `diagnose` report: per process, then per destination (and listening
//! port), what the connections did and what to change. Text for people, JSON for
//! tools.

use std::{collections::BTreeMap, fmt::Write as _, net::IpAddr, time::Duration};

use serde::Serialize;

use super::{
    CloseCounts, ConnectionStats, Diagnoser,
    estimate::Estimate,
    finding::{Finding, Severity},
    human_ms,
    pools::PoolSample,
    samples::Summary,
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
                .sort_by_key(|t| std::cmp::Reverse(t.connections_opened + total(&t.closed)));
            process.listeners.sort_by_key(|t| t.lport);
        }
        // Processes with findings first, then the busiest.
        processes.sort_by_key(|p| {
            let worst = p.findings.iter().map(|f| f.severity).max();
            let busy: u64 = p
                .destinations
                .iter()
                .chain(&p.listeners)
                .map(|t| total(&t.closed))
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

fn total(closes: &CloseCounts) -> u64 {
    closes.local
        + closes.peer
        + closes.reset_local
        + closes.reset_peer
        + closes.timeout
        + closes.unknown
}

impl Report {
    /// The report as people read it.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let findings: usize = self.processes.iter().map(|p| p.findings.len()).sum();
        let _ = writeln!(
            out,
            "Connection report: {:.0} s, {} process{}, {} finding{}",
            self.duration_s,
            self.processes.len(),
            if self.processes.len() == 1 { "" } else { "es" },
            findings,
            if findings == 1 { "" } else { "s" }
        );
        for process in &self.processes {
            let _ = writeln!(out, "\n{} (pid {})", process.comm, process.pid);
            for finding in &process.findings {
                let severity = match finding.severity {
                    Severity::Error => "ERROR",
                    Severity::Warning => "WARNING",
                };
                let place = match (finding.lport, finding.raddr, finding.rport) {
                    (Some(lport), _, _) => format!("port {lport}"),
                    (None, Some(addr), Some(port)) => super::endpoint(addr, port),
                    _ => String::new(),
                };
                let _ = writeln!(
                    out,
                    "  {severity} {} {place} (×{})\n    {}",
                    finding.kind.name(),
                    finding.count,
                    wrap(&finding.recommendation, 4, 88)
                );
            }
            for traffic in &process.destinations {
                let target = match (traffic.raddr, traffic.rport) {
                    (Some(addr), Some(port)) => super::endpoint(addr, port),
                    _ => "?".into(),
                };
                let role = match traffic.role {
                    Some(Role::Client) => "client",
                    Some(Role::Server) => "server",
                    _ => "pre-existing",
                };
                let _ = writeln!(out, "  → {target} ({role})");
                write_traffic(&mut out, traffic);
            }
            for traffic in &process.listeners {
                let _ = writeln!(
                    out,
                    "  ← clients on port {} (server)",
                    traffic.lport.unwrap_or(0)
                );
                write_traffic(&mut out, traffic);
            }
        }
        out
    }
}

fn write_traffic(out: &mut String, traffic: &Traffic) {
    let closed = &traffic.closed;
    let _ = writeln!(
        out,
        "      {} opened, {} closed: by peer {}, by this side {}, reset by peer {}, reset by \
         this side {}, timed out {}",
        traffic.connections_opened,
        total(closed),
        closed.peer,
        closed.local,
        closed.reset_peer,
        closed.reset_local,
        closed.timeout
    );
    let line = |out: &mut String, label: &str, summary: &Option<Summary>| {
        if let Some(s) = summary {
            let _ = writeln!(
                out,
                "      {label:<28} p50 {}  p90 {}  max {}  (n={})",
                human_ms(s.p50_ms),
                human_ms(s.p90_ms),
                human_ms(s.max_ms),
                s.count
            );
        }
    };
    line(out, "idle when the peer closed", &traffic.peer_close_idle);
    line(out, "idle when this side closed", &traffic.local_close_idle);
    line(out, "idle before reuse", &traffic.reuse_idle);
    line(out, "in CLOSE_WAIT", &traffic.close_wait);
    line(out, "connection lifetime", &traffic.lifetime);
    line(out, "connect (SYN to established)", &traffic.connect_time);
    line(out, "wait to be accepted", &traffic.accept_wait);
    if !traffic.connect_errors.is_empty() {
        let errors: Vec<String> = traffic
            .connect_errors
            .iter()
            .map(|(name, n)| format!("{name} ×{n}"))
            .collect();
        let _ = writeln!(out, "      connect errors: {}", errors.join(", "));
    }
    if let Some(pool) = &traffic.pool {
        let _ = writeln!(
            out,
            "      last {} s: {} open, {} busy now, busy {:.0}% of the time, {:.1} requests/s, \
             {:.1} new connections/s{}{}{}",
            pool.seconds,
            pool.open_now,
            pool.busy_now,
            pool.busy_fraction * 100.0,
            pool.requests_per_s,
            pool.new_connections_per_s,
            pool.mean_response_ms
                .map(|ms| format!(", response {}", human_ms(ms)))
                .unwrap_or_default(),
            pool.median_gap_us
                .map(|us| format!(", next request {us:.0} µs after a response"))
                .unwrap_or_default(),
            if pool.saturated_s > 0.0 {
                format!(", saturated {:.0} s in all", pool.saturated_s)
            } else {
                String::new()
            },
        );
    }
    if traffic.graceful_peer_closes > 0 {
        let _ = writeln!(
            out,
            "      {} graceful peer closes right after a response (Connection: close, request limits)",
            traffic.graceful_peer_closes
        );
    }
    if traffic.mid_request_peer_closes > 0 {
        let _ = writeln!(
            out,
            "      {} peer closes while a request was outstanding",
            traffic.mid_request_peer_closes
        );
    }
    if let Some(e) = traffic.peer_idle_timeout {
        let _ = writeln!(
            out,
            "      peer idle timeout: {} (from {} of {} idle closes)",
            human_ms(e.timeout_ms),
            e.samples,
            e.considered
        );
    }
    if let Some(e) = traffic.local_idle_timeout {
        let _ = writeln!(
            out,
            "      this side's idle timeout: {} (from {} of {} closes)",
            human_ms(e.timeout_ms),
            e.samples,
            e.considered
        );
    }
}

/// Wraps `text` at `width` columns, indenting continuation lines by `indent`.
/// A unit stays with its number ("1.5 s" never breaks).
fn wrap(text: &str, indent: usize, width: usize) -> String {
    let mut words: Vec<String> = Vec::new();
    for word in text.split_whitespace() {
        let unit = matches!(
            word.trim_end_matches([',', '.', ')', ';', ':']),
            "s" | "ms" | "min"
        );
        match words.last_mut() {
            Some(last) if unit && last.ends_with(|c: char| c.is_ascii_digit()) => {
                last.push(' ');
                last.push_str(word);
            }
            _ => words.push(word.to_string()),
        }
    }
    let mut out = String::new();
    let mut column = indent;
    for word in words {
        if column + word.len() + 1 > width && column > indent {
            out.push('\n');
            out.push_str(&" ".repeat(indent));
            column = indent;
        } else if column > indent {
            out.push(' ');
            column += 1;
        }
        column += word.len();
        out.push_str(&word);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_long_recommendations() {
        let text = "one two three four five six seven eight nine ten";
        assert_eq!(
            wrap(text, 2, 16),
            "one two three\n  four five six\n  seven eight\n  nine ten"
        );
    }
}
