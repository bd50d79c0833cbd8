//! The agent's Prometheus metrics (docs/metrics.md): one registry, updated from
//! events, findings and the per-second scans, rendered for `/metrics`.
//!
//! Cardinality is bounded by the budget (`budget.rs`): processes by command name and
//! container, destinations and listening ports per process, the rest counted
//! under `other`.

mod budget;
pub mod format;
mod labels;
pub mod names;
mod series;

use std::{
    collections::{HashMap, HashSet},
    io,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, AtomicU64},
    },
    time::Duration,
};

use prometheus_client::{
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use self::{
    budget::{Budget, no_label},
    labels::{
        AttachLabels, BuildLabels, CloseLabels, ConnLabels, ErrnoLabels, FindingLabels, PortLabels,
        RemoteLabels, ResetLabels,
    },
};
use super::Sink;
use crate::{
    comm::Comm,
    diagnosis::{
        Occurrence,
        finding::{Finding, FindingKind},
        gauges::Gauges,
    },
    event::{Detail, Event, Role},
    kernel::loader::AttachReport,
    kernel::session::Stats,
    kernel::tables::{PoolCounters, PoolRef},
    pipeline::{Batch, Scan},
};

pub use format::MetricsFormat;

/// Settings of the metrics.
#[derive(Clone, Debug)]
pub struct MetricsOptions {
    /// Destinations (and listening ports) with their own series per process.
    pub max_destinations: usize,
    /// Processes with their own series.
    pub max_processes: usize,
    /// Retransmissions after at least this much peer silence count as "after idle".
    pub min_idle: Duration,
    pub ring_buffer_bytes: u64,
    pub tracked_limit: u64,
}

type SecondsHistogram<L> = Family<L, Histogram, fn() -> Histogram>;
type SecondsGauge<L> = Family<L, Gauge<f64, AtomicU64>>;
type CountGauge<L> = Family<L, Gauge<i64, AtomicI64>>;

/// Idle times and timeouts span from milliseconds to an hour.
fn idle_histogram() -> Histogram {
    Histogram::new([
        0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 75.0, 90.0, 120.0, 300.0,
        600.0, 1800.0, 3600.0,
    ])
}

/// Handshakes and accept waits: 50 µs to about 3 s.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.00005, 3.0, 11))
}

pub struct Metrics {
    registry: Registry,
    options: MetricsOptions,
    labels: Mutex<Budget>,
    /// Kernel request counters at the previous scan, per pool.
    last_requests: Mutex<HashMap<PoolRef, u64>>,
    /// Label sets of the gauges set at the previous scan: those not set again
    /// are removed, so a destination that went away leaves no stale value.
    gauge_sets: Mutex<GaugeSets>,
    agent_last: Mutex<Stats>,

    /// Handles of the series below, per process and endpoint, see [`series`]:
    /// these families must never remove a series, or a kept handle would
    /// count outside the registry.
    series: Mutex<series::SeriesCache>,
    connections_opened: Family<ConnLabels, Counter>,
    connections_closed: Family<CloseLabels, Counter>,
    idle_at_close: SecondsHistogram<CloseLabels>,
    connect_duration: SecondsHistogram<RemoteLabels>,
    connect_errors: Family<ErrnoLabels, Counter>,
    resets: Family<ResetLabels, Counter>,
    retransmits_after_idle: Family<RemoteLabels, Counter>,

    peer_idle_timeout: SecondsGauge<RemoteLabels>,
    local_idle_timeout: SecondsGauge<ConnLabels>,
    stale_reuses: Family<RemoteLabels, Counter>,
    idle_timeout_mismatches: Family<RemoteLabels, Counter>,
    silent_drops: Family<RemoteLabels, Counter>,
    close_wait_connections: CountGauge<RemoteLabels>,
    close_wait_leaks: Family<RemoteLabels, Counter>,
    late_request_resets: Family<PortLabels, Counter>,

    pool_connections: CountGauge<RemoteLabels>,
    pool_busy: CountGauge<RemoteLabels>,
    pool_requests: Family<RemoteLabels, Counter>,
    pool_saturated: Family<RemoteLabels, Counter<f64, AtomicU64>>,
    listen_depth: CountGauge<PortLabels>,
    listen_limit: CountGauge<PortLabels>,
    listen_drops: Family<PortLabels, Counter>,
    accept_wait: SecondsHistogram<PortLabels>,

    findings: Family<FindingLabels, Counter>,

    events: Counter,
    events_lost: Counter,
    events_undecodable: Counter,
    ringbuf_pending: Gauge,
    tracked: Gauge,
    untracked: Counter,
}

#[derive(Default)]
struct GaugeSets {
    peer_idle_timeout: HashSet<RemoteLabels>,
    local_idle_timeout: HashSet<ConnLabels>,
    close_wait: HashSet<RemoteLabels>,
    pool_connections: HashSet<RemoteLabels>,
    listen: HashSet<PortLabels>,
}

impl Metrics {
    pub fn new(options: MetricsOptions, attach: &AttachReport) -> Self {
        let mut registry = Registry::default();
        let metrics = Self {
            labels: Mutex::new(Budget::new(options.max_processes, options.max_destinations)),
            last_requests: Mutex::default(),
            gauge_sets: Mutex::default(),
            agent_last: Mutex::default(),
            series: Mutex::new(series::cache()),
            connections_opened: Family::default(),
            connections_closed: Family::default(),
            idle_at_close: Family::new_with_constructor(idle_histogram),
            connect_duration: Family::new_with_constructor(latency_histogram),
            connect_errors: Family::default(),
            resets: Family::default(),
            retransmits_after_idle: Family::default(),
            peer_idle_timeout: Family::default(),
            local_idle_timeout: Family::default(),
            stale_reuses: Family::default(),
            idle_timeout_mismatches: Family::default(),
            silent_drops: Family::default(),
            close_wait_connections: Family::default(),
            close_wait_leaks: Family::default(),
            late_request_resets: Family::default(),
            pool_connections: Family::default(),
            pool_busy: Family::default(),
            pool_requests: Family::default(),
            pool_saturated: Family::default(),
            listen_depth: Family::default(),
            listen_limit: Family::default(),
            listen_drops: Family::default(),
            accept_wait: Family::new_with_constructor(latency_histogram),
            findings: Family::default(),
            events: Counter::default(),
            events_lost: Counter::default(),
            events_undecodable: Counter::default(),
            ringbuf_pending: Gauge::default(),
            tracked: Gauge::default(),
            untracked: Counter::default(),
            options,
            registry: Registry::default(),
        };
        let m = &metrics;
        let r = &mut registry;
        r.register(
            family(names::CONNECTIONS_OPENED),
            "Connections that reached ESTABLISHED (clients) or were accepted (servers)",
            m.connections_opened.clone(),
        );
        r.register(
            family(names::CONNECTIONS_CLOSED),
            "Connections that reached CLOSE, by who ended them",
            m.connections_closed.clone(),
        );
        r.register(family(names::IDLE_AT_CLOSE), "How long a connection had carried no payload when the first FIN or RST was sent or received", m.idle_at_close.clone());
        r.register(
            family(names::CONNECT_DURATION),
            "SYN to ESTABLISHED, for connections this host opened",
            m.connect_duration.clone(),
        );
        r.register(
            family(names::CONNECT_ERRORS),
            "connect() failures by errno",
            m.connect_errors.clone(),
        );
        r.register(
            family(names::RESETS),
            "RSTs received and sent on connections",
            m.resets.clone(),
        );
        r.register(
            family(names::RETRANSMITS_AFTER_IDLE),
            "Retransmissions on connections whose peer had been silent for at least --min-idle",
            m.retransmits_after_idle.clone(),
        );
        r.register(
            family(names::PEER_IDLE_TIMEOUT),
            "The destination's idle timeout, inferred from when it closed idle connections",
            m.peer_idle_timeout.clone(),
        );
        r.register(
            family(names::LOCAL_IDLE_TIMEOUT),
            "This process's own idle timeout, inferred from its closes of idle connections",
            m.local_idle_timeout.clone(),
        );
        r.register(
            family(names::STALE_REUSES),
            "Requests sent on connections the peer had already closed",
            m.stale_reuses.clone(),
        );
        r.register(
            family(names::IDLE_TIMEOUT_MISMATCHES),
            "Idle pooled connections the destination closed: each is a race with the next request",
            m.idle_timeout_mismatches.clone(),
        );
        r.register(
            family(names::SILENT_DROPS),
            "Idle flows the network path dropped",
            m.silent_drops.clone(),
        );
        r.register(
            family(names::CLOSE_WAIT_CONNECTIONS),
            "Connections now in CLOSE_WAIT: the peer closed, the process has not",
            m.close_wait_connections.clone(),
        );
        r.register(
            family(names::CLOSE_WAIT_LEAKS),
            "Connections that stayed in CLOSE_WAIT longer than --close-wait-threshold",
            m.close_wait_leaks.clone(),
        );
        r.register(
            family(names::LATE_REQUEST_RESETS),
            "Requests that reached a server after it had closed the connection",
            m.late_request_resets.clone(),
        );
        r.register(
            family(names::POOL_CONNECTIONS),
            "Open connections of the process to the destination",
            m.pool_connections.clone(),
        );
        r.register(
            family(names::POOL_BUSY_CONNECTIONS),
            "Open connections with a request in progress",
            m.pool_busy.clone(),
        );
        r.register(
            family(names::POOL_REQUESTS),
            "Requests sent to the destination",
            m.pool_requests.clone(),
        );
        r.register(
            family(names::POOL_SATURATED),
            "Time every connection of the pool was busy with requests queued",
            m.pool_saturated.clone(),
        );
        r.register(
            family(names::LISTEN_QUEUE_DEPTH),
            "Connections waiting to be accepted",
            m.listen_depth.clone(),
        );
        r.register(
            family(names::LISTEN_QUEUE_LIMIT),
            "The accept queue's limit (the listen backlog)",
            m.listen_limit.clone(),
        );
        r.register(family(names::LISTEN_DROPS), "Connection attempts the network namespace dropped while this listener's queue was not empty", m.listen_drops.clone());
        r.register(
            family(names::ACCEPT_WAIT),
            "Handshake completed to accept() returned the connection",
            m.accept_wait.clone(),
        );
        r.register(
            family(names::FINDINGS),
            "Findings reported: when one first holds, and when its evidence changes materially",
            m.findings.clone(),
        );
        r.register(
            family(names::EVENTS),
            "Events read from the kernel",
            m.events.clone(),
        );
        r.register(
            family(names::EVENTS_LOST),
            "Events the kernel could not write (ring buffer full)",
            m.events_lost.clone(),
        );
        r.register(
            family(names::EVENTS_UNDECODABLE),
            "Ring-buffer records that did not decode",
            m.events_undecodable.clone(),
        );
        r.register(
            family(names::RINGBUF_PENDING),
            "The most data waiting in the ring buffer since the previous scan",
            m.ringbuf_pending.clone(),
        );
        let ringbuf_size: Gauge = Gauge::default();
        ringbuf_size.set(m.options.ring_buffer_bytes as i64);
        r.register(
            family(names::RINGBUF_SIZE),
            "The ring buffer's size",
            ringbuf_size,
        );
        r.register(
            family(names::TRACKED),
            "Connections in the kernel's socket table (an upper bound)",
            m.tracked.clone(),
        );
        let tracked_limit: Gauge = Gauge::default();
        tracked_limit.set(m.options.tracked_limit as i64);
        r.register(
            family(names::TRACKED_LIMIT),
            "The kernel socket table's capacity (--max-connections)",
            tracked_limit,
        );
        r.register(
            family(names::UNTRACKED),
            "Connections the kernel socket table could not take",
            m.untracked.clone(),
        );
        let attach_info: Family<AttachLabels, Gauge> = Family::default();
        attach_info
            .get_or_create(&AttachLabels {
                state_hook: attach.state_mode.to_string(),
                reuse_hook: if attach
                    .attached
                    .iter()
                    .any(|a| a.contains("sock_send_length"))
                {
                    "yes".into()
                } else {
                    "no".into()
                },
            })
            .set(1);
        r.register(
            family(names::ATTACH_INFO),
            "How the kernel programs are attached (always 1)",
            attach_info,
        );
        let build_info: Family<BuildLabels, Gauge> = Family::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_string(),
            })
            .set(1);
        r.register(
            family(names::BUILD_INFO),
            "The agent's version (always 1)",
            build_info,
        );
        Self {
            registry,
            ..metrics
        }
    }

    /// The metrics in `format`, for `/metrics`.
    pub fn render(&self, format: MetricsFormat) -> Vec<u8> {
        format::render(&self.registry, format)
    }

    fn budget(&self) -> std::sync::MutexGuard<'_, Budget> {
        self.labels.lock().expect("metrics labels")
    }

    fn remote_labels(&self, pid: u32, comm: Comm, addr: IpAddr, port: u16) -> RemoteLabels {
        let (process, remote) = self.budget().remote(pid, comm, addr, port);
        RemoteLabels {
            comm: process.comm,
            container_id: process.container,
            pod_uid: process.pod_uid,
            remote,
        }
    }

    fn port_labels(&self, pid: u32, comm: Comm, lport: u16) -> PortLabels {
        let (process, port) = self.budget().port(pid, comm, lport);
        PortLabels {
            comm: process.comm,
            container_id: process.container,
            pod_uid: process.pod_uid,
            port,
        }
    }

    /// Connection labels: client connections by destination, accepted ones by
    /// listening port (their remote ports are ephemeral).
    fn conn_labels(&self, event: &Event) -> ConnLabels {
        let mut budget = self.budget();
        let (process, remote, port) = match event.role {
            Role::Server => {
                let (process, port) = budget.port(event.pid, event.comm, event.lport);
                (process, no_label(), port)
            }
            _ => {
                let (process, remote) =
                    budget.remote(event.pid, event.comm, event.raddr, event.rport);
                (process, remote, no_label())
            }
        };
        ConnLabels {
            comm: process.comm,
            container_id: process.container,
            pod_uid: process.pod_uid,
            role: event.role.name(),
            remote,
            port,
        }
    }

    pub fn observe_event(&self, event: &Event) {
        match &event.detail {
            Detail::Open(_) | Detail::Close(_) | Detail::Reset(_) => {
                self.observe_connection(event);
            }
            Detail::Retransmit(retransmit) => {
                let after_idle = retransmit
                    .idle_ms
                    .is_some_and(|ms| Duration::from_millis(ms) >= self.options.min_idle);
                if after_idle && event.role != Role::Server {
                    self.retransmits_after_idle
                        .get_or_create(&self.remote_labels(
                            event.pid,
                            event.comm,
                            event.raddr,
                            event.rport,
                        ))
                        .inc();
                }
            }
            Detail::ConnectError(error) => {
                let remote = self.remote_labels(event.pid, event.comm, event.raddr, event.rport);
                let labels = ErrnoLabels {
                    comm: remote.comm,
                    container_id: remote.container_id,
                    pod_uid: remote.pod_uid,
                    remote: remote.remote,
                    errno: error.error.clone(),
                };
                self.connect_errors.get_or_create(&labels).inc();
            }
            Detail::Reuse(_) => {}
        }
    }

    pub fn observe_finding(&self, finding: &Finding) {
        let process = self.budget().process(finding.pid, finding.comm);
        let labels = FindingLabels {
            comm: process.comm,
            container_id: process.container,
            pod_uid: process.pod_uid,
            kind: finding.kind.name(),
            finding_severity: finding.severity.name(),
        };
        self.findings.get_or_create(&labels).inc();
    }

    pub fn observe_occurrence(&self, occurrence: &Occurrence) {
        let remote = |o: &Occurrence| {
            o.remote
                .map(|(addr, port)| self.remote_labels(o.pid, o.comm, addr, port))
        };
        let port = |o: &Occurrence| o.lport.map(|port| self.port_labels(o.pid, o.comm, port));
        let amount = occurrence.amount;
        match occurrence.kind {
            FindingKind::StaleReuse => {
                if let Some(labels) = remote(occurrence) {
                    self.stale_reuses
                        .get_or_create(&labels)
                        .inc_by(amount as u64);
                }
            }
            FindingKind::SilentDrop => {
                if let Some(labels) = remote(occurrence) {
                    self.silent_drops
                        .get_or_create(&labels)
                        .inc_by(amount as u64);
                }
            }
            FindingKind::CloseWaitLeak => {
                if let Some(labels) = remote(occurrence) {
                    self.close_wait_leaks
                        .get_or_create(&labels)
                        .inc_by(amount as u64);
                }
            }
            FindingKind::PoolSaturation => {
                if let Some(labels) = remote(occurrence) {
                    self.pool_saturated.get_or_create(&labels).inc_by(amount);
                }
            }
            FindingKind::LateRequestReset => {
                if let Some(labels) = port(occurrence) {
                    self.late_request_resets
                        .get_or_create(&labels)
                        .inc_by(amount as u64);
                }
            }
            FindingKind::AcceptQueueOverflow => {
                if let Some(labels) = port(occurrence) {
                    self.listen_drops
                        .get_or_create(&labels)
                        .inc_by(amount as u64);
                }
            }
            FindingKind::IdleTimeoutMismatch
            | FindingKind::ConnectionChurn
            | FindingKind::PortExhaustion
            | FindingKind::KeepaliveWorkerStarvation => {}
        }
    }

    /// Everything a batch brings.
    pub fn observe(&self, batch: &Batch) {
        for event in &batch.events {
            self.observe_event(event);
        }
        for finding in &batch.findings {
            self.observe_finding(finding);
        }
        for occurrence in &batch.occurrences {
            self.observe_occurrence(occurrence);
        }
        if let Some(scan) = &batch.scan {
            self.observe_scan(scan);
        }
    }

    /// Gauges from the latest scan, the pools' request counters, and the
    /// agent's own figures.
    pub fn observe_scan(&self, scan: &Scan) {
        let mut seen = GaugeSets::default();
        for destination in &scan.gauges.destinations {
            let key = &destination.key;
            let labels = self.remote_labels(key.pid, destination.comm, key.raddr, key.rport);
            if let Some(timeout_ms) = destination.peer_idle_timeout_ms {
                self.peer_idle_timeout
                    .get_or_create(&labels)
                    .set(timeout_ms / 1000.0);
                seen.peer_idle_timeout.insert(labels.clone());
            }
            if let Some(timeout_ms) = destination.local_idle_timeout_ms {
                let conn = ConnLabels {
                    comm: labels.comm.clone(),
                    container_id: labels.container_id.clone(),
                    pod_uid: labels.pod_uid.clone(),
                    role: destination.role.unwrap_or(Role::Unknown).name(),
                    remote: labels.remote.clone(),
                    port: no_label(),
                };
                self.local_idle_timeout
                    .get_or_create(&conn)
                    .set(timeout_ms / 1000.0);
                seen.local_idle_timeout.insert(conn);
            }
            if destination.role == Some(Role::Client) {
                // Several processes' destinations can fold into `other`: add up.
                let first = seen.pool_connections.insert(labels.clone());
                let open = self.pool_connections.get_or_create(&labels);
                let busy_gauge = self.pool_busy.get_or_create(&labels);
                if first {
                    open.set(0);
                    busy_gauge.set(0);
                }
                open.inc_by(destination.open as i64);
                busy_gauge.inc_by(destination.busy as i64);
            }
        }
        for listener in &scan.gauges.listeners {
            let key = &listener.key;
            let labels = self.port_labels(key.pid, listener.comm, key.lport);
            if let Some((depth, limit)) = listener.queue {
                self.listen_depth
                    .get_or_create(&labels)
                    .set(i64::from(depth));
                self.listen_limit
                    .get_or_create(&labels)
                    .set(i64::from(limit));
                seen.listen.insert(labels.clone());
            }
            if let Some(timeout_ms) = listener.local_idle_timeout_ms {
                let conn = ConnLabels {
                    comm: labels.comm.clone(),
                    container_id: labels.container_id.clone(),
                    pod_uid: labels.pod_uid.clone(),
                    role: Role::Server.name(),
                    remote: no_label(),
                    port: labels.port.clone(),
                };
                self.local_idle_timeout
                    .get_or_create(&conn)
                    .set(timeout_ms / 1000.0);
                seen.local_idle_timeout.insert(conn);
            }
        }
        for entry in &scan.close_waits {
            let labels = self.remote_labels(entry.pid, entry.comm, entry.raddr, entry.rport);
            let gauge = self.close_wait_connections.get_or_create(&labels);
            if seen.close_wait.insert(labels.clone()) {
                gauge.set(0);
            }
            gauge.inc();
        }
        self.pool_request_deltas(&scan.pools, &scan.gauges);
        self.forget_gauges(seen);

        let stats = scan.stats;
        self.ringbuf_pending.set(scan.ring_buffer_peak as i64);
        self.tracked.set(stats.tracked as i64);
        let mut last = self.agent_last.lock().expect("agent stats");
        self.events.inc_by(stats.events.saturating_sub(last.events));
        self.events_lost
            .inc_by(stats.lost.saturating_sub(last.lost));
        self.events_undecodable
            .inc_by(stats.undecodable.saturating_sub(last.undecodable));
        self.untracked
            .inc_by(stats.untracked.saturating_sub(last.untracked));
        *last = stats;
    }

    fn pool_request_deltas(&self, pools: &[PoolCounters], gauges: &Gauges) {
        let mut last = self.last_requests.lock().expect("pool counters");
        for pool in pools {
            let PoolRef::Destination(key) = &pool.pool else {
                continue;
            };
            let before = last.insert(pool.pool.clone(), pool.requests).unwrap_or(0);
            let delta = pool.requests.saturating_sub(before);
            if delta == 0 {
                continue;
            }
            let comm = gauges
                .destinations
                .iter()
                .find(|destination| destination.key == *key)
                .map(|destination| destination.comm)
                .unwrap_or_default();
            self.pool_requests
                .get_or_create(&self.remote_labels(key.pid, comm, key.raddr, key.rport))
                .inc_by(delta);
        }
        // Pools the kernel forgot (LRU) are forgotten here too.
        let live: HashSet<&PoolRef> = pools.iter().map(|p| &p.pool).collect();
        last.retain(|pool, _| live.contains(pool));
    }

    fn forget_gauges(&self, seen: GaugeSets) {
        let mut previous = self.gauge_sets.lock().expect("gauge sets");
        for gone in previous
            .peer_idle_timeout
            .difference(&seen.peer_idle_timeout)
        {
            self.peer_idle_timeout.remove(gone);
        }
        for gone in previous
            .local_idle_timeout
            .difference(&seen.local_idle_timeout)
        {
            self.local_idle_timeout.remove(gone);
        }
        for gone in previous.close_wait.difference(&seen.close_wait) {
            self.close_wait_connections.remove(gone);
        }
        for gone in previous.pool_connections.difference(&seen.pool_connections) {
            self.pool_connections.remove(gone);
            self.pool_busy.remove(gone);
        }
        for gone in previous.listen.difference(&seen.listen) {
            self.listen_depth.remove(gone);
            self.listen_limit.remove(gone);
        }
        *previous = seen;
    }
}

/// Shared with the endpoint that renders it.
impl Sink for Arc<Metrics> {
    fn take(&mut self, batch: &Batch) -> io::Result<()> {
        self.observe(batch);
        Ok(())
    }
}

/// The family name to register for a metric `names` gives as a scrape shows
/// it: prometheus-client adds the `_total` of a counter itself.
fn family(name: &'static str) -> &'static str {
    name.strip_suffix("_total").unwrap_or(name)
}

#[cfg(test)]
mod tests;
