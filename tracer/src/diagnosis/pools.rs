//! Pools and listeners over time: per second, how many connections a process
//! holds to a destination and how busy they are, how fast it opens new ones, and
//! how full its listening sockets' accept queues are. From these samples come
//! `pool_saturation`, `connection_churn`, `port_exhaustion`,
//! `accept_queue_overflow` and `keepalive_worker_starvation`.

use std::{
    collections::{HashMap, VecDeque},
    time::SystemTime,
};

use serde::Serialize;
use serde_json::json;

use super::{
    ConnectionStats, Diagnoser, Occurrence, endpoint,
    finding::{Finding, FindingKind, Materiality, Severity},
    human_ms,
};
use crate::{
    comm::Comm,
    event::{DestinationKey, ListenerKey},
    host::{listeners::ListenerSample, surroundings::Surroundings},
    kernel::tables::{PoolCounters, PoolRef},
};

/// Samples kept per pool: enough for the longest window a rule looks at.
const HISTORY: usize = 30;

/// One second of a pool.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PoolSample {
    #[serde(skip)]
    pub at: Option<SystemTime>,
    /// Connections open at the sample.
    pub open: u64,
    /// Connections busy at the sample.
    pub busy: u64,
    /// Busy time over open-connection time, in the interval.
    pub busy_fraction: f64,
    pub requests: u64,
    pub responses: u64,
    pub mean_response_ms: Option<f64>,
    /// Median gap between a response and the next request on a connection.
    pub median_gap_us: Option<f64>,
    pub opened: u64,
    pub closed: u64,
}

/// Per-pool state the samples are computed from.
#[derive(Clone, Debug, Default)]
pub struct PoolHistory {
    last: Option<(SystemTime, PoolCounters)>,
    last_opened: u64,
    last_closed: u64,
    pub samples: VecDeque<PoolSample>,
    /// Seconds the pool was saturated in all.
    pub saturated_s: f64,
}

/// One second of a listener.
#[derive(Clone, Debug, Default)]
pub struct ListenerHistory {
    pub samples: VecDeque<ListenerSample>,
    pub peak_depth: u32,
    pub drops_while_full: u64,
}

impl Diagnoser {
    /// Destinations that opened connections fast in the last window: the ones
    /// whose TIME_WAIT count and port range are worth looking up.
    pub fn churn_candidates(&self) -> Vec<DestinationKey> {
        let window = self.config.window_samples();
        self.destinations()
            .filter(|(_, stats)| {
                let recent = stats.history.samples.iter().rev().take(window);
                let opened: u64 = recent.map(|s| s.opened).sum();
                opened as f64 / window as f64 >= self.config.churn_rate
            })
            .map(|(key, _)| key.clone())
            .collect()
    }

    /// Takes in one scan of the kernel's pool counters (and what the pipeline
    /// found around the churning destinations); returns the findings that are
    /// new or changed materially.
    pub fn pool_scan(
        &mut self,
        now: SystemTime,
        counters: &[PoolCounters],
        around: &Surroundings,
    ) -> Vec<Finding> {
        let by_pool: HashMap<&PoolRef, &PoolCounters> =
            counters.iter().map(|c| (&c.pool, c)).collect();
        let mut findings = Vec::new();
        let destinations: Vec<DestinationKey> =
            self.destinations.iter().map(|(k, _)| k.clone()).collect();
        for key in destinations {
            let pool = PoolRef::Destination(key.clone());
            let Some(stats) = self.destinations.peek_mut(&key) else {
                continue;
            };
            stats.record_sample(now, by_pool.get(&pool).copied());
            let saturation = saturation(&self.config, &key, stats, now);
            let churn = churn(&self.config, &key, stats, now, around);
            if saturation.is_some() {
                let comm = stats.comm;
                self.occurrences.push(Occurrence {
                    kind: FindingKind::PoolSaturation,
                    pid: key.pid,
                    comm,
                    remote: Some((key.raddr, key.rport)),
                    lport: None,
                    amount: self.config.scan_interval.as_secs_f64(),
                });
            }
            findings.extend(
                saturation
                    .into_iter()
                    .chain(churn)
                    .filter_map(|(finding, materiality)| self.book.update(finding, materiality)),
            );
        }
        let listeners: Vec<ListenerKey> = self.listeners.iter().map(|(k, _)| k.clone()).collect();
        for key in listeners {
            let pool = PoolRef::Listener(key.clone());
            if let Some(stats) = self.listeners.peek_mut(&key) {
                stats.record_sample(now, by_pool.get(&pool).copied());
            }
        }
        findings
    }

    /// Takes in one scan of the listening sockets; returns the findings that are
    /// new or changed materially.
    pub fn listener_scan(&mut self, now: SystemTime, samples: &[ListenerSample]) -> Vec<Finding> {
        let mut findings = Vec::new();
        for sample in samples {
            let key = ListenerKey {
                pid: sample.pid,
                lport: sample.lport,
            };
            let stats = self
                .listeners
                .get_or_insert_mut(key.clone(), ConnectionStats::default);
            if stats.comm.is_empty() {
                stats.comm.clone_from(&sample.comm);
            }
            let history = &mut stats.listener;
            let full = sample.depth >= sample.limit && sample.limit > 0;
            history.peak_depth = history.peak_depth.max(sample.depth);
            if (full || sample.depth > 0) && sample.netns_drops > 0 {
                history.drops_while_full += sample.netns_drops;
                self.occurrences.push(Occurrence {
                    kind: FindingKind::AcceptQueueOverflow,
                    pid: sample.pid,
                    comm: sample.comm,
                    remote: None,
                    lport: Some(sample.lport),
                    amount: sample.netns_drops as f64,
                });
            }
            history.samples.push_back(sample.clone());
            if history.samples.len() > HISTORY {
                history.samples.pop_front();
            }
            let candidates = [
                overflow(&key, stats, now),
                worker_starvation(&self.config, &key, stats, now),
            ];
            for (finding, materiality) in candidates.into_iter().flatten() {
                findings.extend(self.book.update(finding, materiality));
            }
        }
        findings
    }

    /// A connect() failed for want of a local port: report it at once.
    pub(super) fn address_not_available(
        &mut self,
        key: DestinationKey,
        comm: Comm,
        now: SystemTime,
    ) -> Option<Finding> {
        let stats = self
            .destinations
            .get_or_insert_mut(key.clone(), ConnectionStats::default);
        let count = stats
            .connect_errors
            .get("EADDRNOTAVAIL")
            .copied()
            .unwrap_or(0);
        let finding = Finding {
            ts: now,
            event_type: "finding",
            kind: FindingKind::PortExhaustion,
            severity: Severity::Error,
            pid: key.pid,
            comm,
            raddr: Some(key.raddr),
            rport: Some(key.rport),
            lport: None,
            count,
            evidence: json!({
                "eaddrnotavail": count,
                "new_connections_per_s": stats.history.recent_rate(5),
            }),
            recommendation: format!(
                "{comm} could not connect to {} {count} time{}: no local port was free \
                 (EADDRNOTAVAIL). Every connection it closes first holds its port in \
                 TIME_WAIT for 60 s. Reuse connections (keep-alive, a pool) instead of \
                 opening one per request; widening net.ipv4.ip_local_port_range only \
                 postpones it.",
                endpoint(key.raddr, key.rport),
                if count == 1 { "" } else { "s" },
            ),
        };
        let materiality = Materiality {
            severity: Severity::Error,
            count,
            figures: Vec::new(),
        };
        self.book.update(finding, materiality)
    }
}

impl ConnectionStats {
    /// Adds the sample of the interval since the previous scan to the history.
    fn record_sample(&mut self, now: SystemTime, counters: Option<&PoolCounters>) {
        let (open, opened, closed) = (self.open_now(), self.opened, self.closed_total());
        if let Some(sample) = self.history.sample(now, counters, open, opened, closed) {
            self.history.push(sample);
        }
    }
}

impl PoolHistory {
    /// The sample for the interval since the previous scan. The first scan only
    /// sets the baseline.
    fn sample(
        &mut self,
        now: SystemTime,
        counters: Option<&PoolCounters>,
        open: u64,
        opened: u64,
        closed: u64,
    ) -> Option<PoolSample> {
        let counters = counters.cloned().unwrap_or_else(|| PoolCounters {
            pool: PoolRef::Listener(ListenerKey { pid: 0, lport: 0 }),
            busy: 0,
            requests: 0,
            responses: 0,
            busy_ns: 0,
            gaps: Vec::new(),
        });
        let previous = self.last.replace((now, counters.clone()));
        let (opened_delta, closed_delta) = (
            opened.saturating_sub(self.last_opened),
            closed.saturating_sub(self.last_closed),
        );
        self.last_opened = opened;
        self.last_closed = closed;
        let (then, before) = previous?;
        let interval = now.duration_since(then).unwrap_or_default().as_secs_f64();
        if interval <= 0.0 {
            return None;
        }
        let responses = counters.responses.saturating_sub(before.responses);
        let busy_ns = counters.busy_ns.saturating_sub(before.busy_ns);
        let gaps: Vec<u64> = counters
            .gaps
            .iter()
            .enumerate()
            .map(|(i, n)| n.saturating_sub(before.gaps.get(i).copied().unwrap_or(0)))
            .collect();
        let open_time = open.max(1) as f64 * interval * 1e9;
        Some(PoolSample {
            at: Some(now),
            open,
            busy: counters.busy.min(open.max(counters.busy)),
            busy_fraction: (busy_ns as f64 / open_time).min(1.0),
            requests: counters.requests.saturating_sub(before.requests),
            responses,
            mean_response_ms: (responses > 0).then(|| busy_ns as f64 / responses as f64 / 1e6),
            median_gap_us: median_bucket(&gaps),
            opened: opened_delta,
            closed: closed_delta,
        })
    }

    fn push(&mut self, sample: PoolSample) {
        self.samples.push_back(sample);
        if self.samples.len() > HISTORY {
            self.samples.pop_front();
        }
    }

    /// New connections per second over the last `seconds` samples.
    pub fn recent_rate(&self, seconds: usize) -> f64 {
        let recent: Vec<&PoolSample> = self.samples.iter().rev().take(seconds).collect();
        if recent.is_empty() {
            return 0.0;
        }
        recent.iter().map(|s| s.opened).sum::<u64>() as f64 / recent.len() as f64
    }
}

/// The middle of the log2 bucket holding the median gap.
fn median_bucket(gaps: &[u64]) -> Option<f64> {
    let total: u64 = gaps.iter().sum();
    if total == 0 {
        return None;
    }
    let mut seen = 0;
    for (i, n) in gaps.iter().enumerate() {
        seen += n;
        if seen * 2 >= total {
            // Bucket i holds [2^i, 2^(i+1)) µs; bucket 0 also holds < 1 µs.
            return Some(if i == 0 {
                1.0
            } else {
                1.5 * (1u64 << i) as f64
            });
        }
    }
    None
}

/// Every connection of the pool busy for the whole window, the pool not growing,
/// and each request following a response on the same connection at once:
/// callers were waiting for a free connection.
fn saturation(
    config: &super::Config,
    key: &DestinationKey,
    stats: &mut ConnectionStats,
    now: SystemTime,
) -> Option<(Finding, Materiality)> {
    let window = config.window_samples();
    let recent: Vec<&PoolSample> = stats.history.samples.iter().rev().take(window).collect();
    if recent.len() < window {
        return None;
    }
    let size = recent[0].open;
    let saturated = size > 0
        && recent.iter().all(|s| {
            s.open == size
                && s.responses > 0
                && s.busy_fraction >= config.saturation_busy
                && s.median_gap_us
                    .is_some_and(|gap| gap <= config.saturation_gap_us)
        });
    if !saturated {
        return None;
    }
    stats.history.saturated_s += 1.0;
    let busy = recent.iter().map(|s| s.busy_fraction).sum::<f64>() / window as f64;
    let responses: u64 = recent.iter().map(|s| s.responses).sum();
    let response_ms = recent
        .iter()
        .filter_map(|s| s.mean_response_ms.map(|ms| ms * s.responses as f64))
        .sum::<f64>()
        / responses.max(1) as f64;
    let gap_us = recent[0].median_gap_us.unwrap_or(0.0);
    let rate = responses as f64 / window as f64;
    let cap = size as f64 * 1000.0 / response_ms.max(0.001);
    let finding = Finding {
        ts: now,
        event_type: "finding",
        kind: FindingKind::PoolSaturation,
        severity: Severity::Warning,
        pid: key.pid,
        comm: stats.comm,
        raddr: Some(key.raddr),
        rport: Some(key.rport),
        lport: None,
        count: stats.history.saturated_s as u64,
        evidence: json!({
            "pool_size": size,
            "busy_fraction": round2(busy),
            "median_gap_us": gap_us,
            "window_s": window,
            "mean_response_ms": round2(response_ms),
            "requests_per_s": round2(rate),
            "max_requests_per_s": round2(cap),
        }),
        recommendation: format!(
            "{}'s {size} connections to {} were all busy {:.0}% of the last {window} s, and \
             each next request went out {} after a response landed: requests queue for a \
             free connection, and throughput is capped at {size} / {} = {:.0} requests/s. \
             Raise the pool above {size} (to {}, say), unless {} is longer than {} \
             normally takes — then the destination is the bottleneck.",
            stats.comm,
            endpoint(key.raddr, key.rport),
            busy * 100.0,
            human_us(gap_us),
            human_ms(response_ms),
            cap,
            size * 2,
            human_ms(response_ms),
            endpoint(key.raddr, key.rport),
        ),
    };
    let materiality = Materiality {
        severity: Severity::Warning,
        count: 1,
        figures: vec![size as f64],
    };
    Some((finding, materiality))
}

/// Many new connections to one destination, each for one or two requests.
fn churn(
    config: &super::Config,
    key: &DestinationKey,
    stats: &ConnectionStats,
    now: SystemTime,
    around: &Surroundings,
) -> Option<(Finding, Materiality)> {
    let window = config.window_samples();
    let recent: Vec<&PoolSample> = stats.history.samples.iter().rev().take(window).collect();
    if recent.len() < window {
        return None;
    }
    let opened: u64 = recent.iter().map(|s| s.opened).sum();
    let rate = opened as f64 / window as f64;
    if rate < config.churn_rate {
        return None;
    }
    let requests: u64 = recent.iter().map(|s| s.requests).sum();
    // Without request accounting (older kernels), a short life is the sign.
    let per_connection = (requests > 0).then(|| requests as f64 / opened as f64);
    let lifetime = stats.lifetimes.summary().map(|s| s.p50_ms);
    let few_requests = match per_connection {
        Some(per) => per <= 2.0,
        None => lifetime.is_some_and(|ms| ms < 1000.0),
    };
    if !few_requests {
        return None;
    }
    let time_wait = around.time_wait.get(key).copied();
    let port_range = around.port_range.get(&key.pid).copied();
    let closed_first_here = stats.closes.local + stats.closes.reset_local;
    let finding = Finding {
        ts: now,
        event_type: "finding",
        kind: FindingKind::ConnectionChurn,
        severity: Severity::Warning,
        pid: key.pid,
        comm: stats.comm,
        raddr: Some(key.raddr),
        rport: Some(key.rport),
        lport: None,
        count: opened,
        evidence: json!({
            "new_connections_per_s": round2(rate),
            "requests_per_connection": per_connection.map(round2),
            "median_lifetime_ms": lifetime,
            "time_wait": time_wait,
            "local_port_range": port_range,
            "closed_by_this_side": closed_first_here,
            "closed_by_peer": stats.closes.peer + stats.closes.reset_peer,
            "window_s": window,
        }),
        recommendation: format!(
            "{} opens {rate:.0} new connections per second to {}{}: keep-alive is not in \
             effect (the pool is disabled, responses say `Connection: close`, or the pool is \
             too small and discards connections). Each connection costs a handshake and, on \
             the side that closes first, a port in TIME_WAIT for 60 s{}. Enable connection \
             reuse: a pool of a few connections serves this rate.",
            stats.comm,
            endpoint(key.raddr, key.rport),
            match per_connection {
                Some(per) => format!(", {per:.1} requests on each"),
                None => String::new(),
            },
            match (time_wait, port_range) {
                (Some(tw), Some(range)) =>
                    format!(" ({tw} in TIME_WAIT now, of {range} local ports)"),
                (Some(tw), None) => format!(" ({tw} in TIME_WAIT now)"),
                _ => String::new(),
            },
        ),
    };
    let materiality = Materiality {
        severity: Severity::Warning,
        count: 1,
        figures: vec![rate],
    };
    Some((finding, materiality))
}

/// A listener's accept queue filled up, or the namespace dropped connection
/// attempts while it was filling.
fn overflow(
    key: &ListenerKey,
    stats: &ConnectionStats,
    now: SystemTime,
) -> Option<(Finding, Materiality)> {
    let history = &stats.listener;
    let latest = history.samples.back()?;
    let full = history
        .samples
        .iter()
        .any(|s| s.limit > 0 && s.depth >= s.limit);
    if !full && history.drops_while_full == 0 {
        return None;
    }
    let waits = stats.accept_wait.summary();
    let finding = Finding {
        ts: now,
        event_type: "finding",
        kind: FindingKind::AcceptQueueOverflow,
        severity: if history.drops_while_full > 0 {
            Severity::Error
        } else {
            Severity::Warning
        },
        pid: key.pid,
        comm: stats.comm,
        raddr: None,
        rport: None,
        lport: Some(key.lport),
        count: history.drops_while_full,
        evidence: json!({
            "backlog_limit": latest.limit,
            "peak_depth": history.peak_depth,
            "depth_now": latest.depth,
            "dropped": history.drops_while_full,
            "accept_wait_p90_ms": waits.map(|w| w.p90_ms),
            "accept_wait_max_ms": waits.map(|w| w.max_ms),
            "somaxconn": latest.somaxconn,
        }),
        recommendation: format!(
            "{}'s accept queue on port {} reached its limit of {} ({} connection attempts \
             dropped meanwhile): the process accepts connections more slowly than they \
             arrive, and clients whose SYN or handshake is dropped retry after 1 s, 3 s, 7 s. \
             Accept faster (more acceptor threads or workers), and raise the listen backlog{}.",
            stats.comm,
            key.lport,
            latest.limit,
            history.drops_while_full,
            match latest.somaxconn {
                Some(max) => format!(" (listen(2); it is capped by net.core.somaxconn = {max})"),
                None => " (listen(2), capped by net.core.somaxconn)".to_string(),
            },
        ),
    };
    let materiality = Materiality {
        severity: finding.severity,
        count: history.drops_while_full,
        figures: vec![history.peak_depth as f64],
    };
    Some((finding, materiality))
}

/// New connections wait in the accept queue while the server's connections are
/// idle keep-alive connections, each holding a worker.
fn worker_starvation(
    config: &super::Config,
    key: &ListenerKey,
    stats: &ConnectionStats,
    now: SystemTime,
) -> Option<(Finding, Materiality)> {
    let window = config.starvation_samples;
    let recent: Vec<&ListenerSample> = stats.listener.samples.iter().rev().take(window).collect();
    if recent.len() < window || recent.iter().any(|s| s.depth == 0) {
        return None;
    }
    let pool = stats.history.samples.back()?;
    let open = pool.open;
    let idle = open.saturating_sub(pool.busy);
    if open == 0 || idle * 2 < open {
        return None;
    }
    let queued = recent[0].depth;
    let idle_timeout = stats.local_idle_timeout(config.jiffy).map(|e| e.timeout_ms);
    let finding = Finding {
        ts: now,
        event_type: "finding",
        kind: FindingKind::KeepaliveWorkerStarvation,
        severity: Severity::Error,
        pid: key.pid,
        comm: stats.comm,
        raddr: None,
        rport: None,
        lport: Some(key.lport),
        count: queued as u64,
        evidence: json!({
            "queued": queued,
            "queued_for_s": window,
            "idle_keepalive_connections": idle,
            "open_connections": open,
            "server_idle_timeout_ms": idle_timeout,
        }),
        recommendation: format!(
            "{} on port {} has {queued} connection{} waiting to be accepted for {window} s \
             while {idle} of its {open} open connections are idle keep-alive connections: \
             with a worker (thread or process) per connection, idle clients hold every \
             worker. Shorten the keep-alive timeout{} so idle connections free their workers \
             sooner, or run more workers than {open}.",
            stats.comm,
            key.lport,
            if queued == 1 { "" } else { "s" },
            match idle_timeout {
                Some(ms) => format!(" (now {})", human_ms(ms)),
                None => String::new(),
            },
        ),
    };
    let materiality = Materiality {
        severity: Severity::Error,
        count: 1,
        figures: vec![idle as f64],
    };
    Some((finding, materiality))
}

fn round2(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

fn human_us(value_us: f64) -> String {
    if value_us < 1000.0 {
        format!("{value_us:.0} µs")
    } else {
        human_ms(value_us / 1000.0)
    }
}
