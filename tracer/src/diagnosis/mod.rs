//! Keep-alive diagnosis: events correlated per process and remote endpoint (and
//! per process and listening port for servers), idle timeouts inferred from when
//! connections close, and the findings that follow, with their numbers.
//!
//! Everything here is pure: it consumes decoded events and scan results, so the
//! rules are tested with hand-built sequences (see the tests below).

pub mod estimate;
pub mod finding;
pub mod gauges;
pub mod pools;
pub mod report;
pub mod samples;

use std::{
    net::IpAddr,
    num::NonZeroUsize,
    time::{Duration, SystemTime},
};

use foldhash::fast::RandomState;
use lru::LruCache;
use serde_json::json;

use self::{
    estimate::{Estimate, GRACEFUL_MS, idle_timeout},
    finding::{Finding, FindingBook, FindingKey, FindingKind, Materiality, Severity},
    samples::{OrderedSamples, Samples},
};
use crate::{
    comm::Comm,
    event::{
        Close, ClosedBy, DestinationKey, Detail, Direction, Event, ListenerKey, Reset, Reuse, Role,
    },
    kernel::tables::CloseWaitEntry,
};

/// How close a peer's reset or FIN must follow (or, on loopback, precede: the
/// answer can be processed inside the send call) a reuse to be its answer.
pub const STALE_WINDOW: Duration = Duration::from_secs(1);
/// A peer end recorded this long before the reuse event still counts: the reuse
/// event is written after the send returns, the peer's answer during the send.
const ANSWER_BEFORE_REUSE: Duration = Duration::from_millis(100);

#[derive(Clone, Debug)]
pub struct Config {
    /// Sends after this much idleness are reuses (the agent's `--min-idle`).
    pub min_idle: Duration,
    /// CLOSE_WAIT longer than this is a leak.
    pub close_wait_threshold: Duration,
    /// One jiffy, the resolution of idle times.
    pub jiffy: Duration,
    /// Destinations (and listening ports) tracked at once; the least recently
    /// active are forgotten beyond it.
    pub max_destinations: NonZeroUsize,
    /// Connections followed at once for reuse/reset correlation.
    pub max_connections: NonZeroUsize,
    /// How often the pipeline scans pools and listeners.
    pub scan_interval: Duration,
    /// How long a pool must stay saturated, or a destination churn, to be reported.
    pub window: Duration,
    /// Busy fraction at which every connection counts as busy.
    pub saturation_busy: f64,
    /// A median gap from response to next request at most this long means
    /// requests were queued for a connection.
    pub saturation_gap_us: f64,
    /// New connections per second to one destination that count as churn.
    pub churn_rate: f64,
    /// Scans in a row with connections queued for a worker.
    pub starvation_samples: usize,
}

impl Config {
    /// Scans in one window.
    pub fn window_samples(&self) -> usize {
        ((self.window.as_secs_f64() / self.scan_interval.as_secs_f64()).round() as usize).max(1)
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            min_idle: Duration::from_millis(250),
            close_wait_threshold: Duration::from_secs(10),
            jiffy: Duration::from_millis(4),
            max_destinations: NonZeroUsize::new(10_000).unwrap(),
            max_connections: NonZeroUsize::new(65_536).unwrap(),
            scan_interval: Duration::from_secs(1),
            window: Duration::from_secs(5),
            saturation_busy: 0.9,
            saturation_gap_us: 1000.0,
            churn_rate: 100.0,
            starvation_samples: 3,
        }
    }
}

/// Closes by who ended the connection.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CloseCounts {
    pub local: u64,
    pub peer: u64,
    pub reset_local: u64,
    pub reset_peer: u64,
    pub timeout: u64,
    pub unknown: u64,
}

impl CloseCounts {
    pub fn total(&self) -> u64 {
        self.local + self.peer + self.reset_local + self.reset_peer + self.timeout + self.unknown
    }
}

impl CloseCounts {
    fn count(&mut self, closed_by: ClosedBy) {
        *match closed_by {
            ClosedBy::Local => &mut self.local,
            ClosedBy::Peer => &mut self.peer,
            ClosedBy::ResetLocal => &mut self.reset_local,
            ClosedBy::ResetPeer => &mut self.reset_peer,
            ClosedBy::Timeout => &mut self.timeout,
            ClosedBy::Unknown => &mut self.unknown,
        } += 1;
    }
}

/// What is known of one process's connections to one destination (or, for a
/// server, to one of its listening ports).
#[derive(Clone, Debug, Default)]
pub struct ConnectionStats {
    pub comm: Comm,
    pub role: Option<Role>,
    pub opened: u64,
    pub closes: CloseCounts,
    /// Idle time at close, for idle connections the peer closed.
    pub peer_close_idle: OrderedSamples,
    /// Peer closes right after a response (`Connection: close`, request limits).
    pub graceful_peer_closes: u64,
    /// Peer closes while a request was outstanding.
    pub mid_request_peer_closes: u64,
    /// Idle time at close, for connections this side closed.
    pub local_close_idle: OrderedSamples,
    /// Idle time before each reuse.
    pub reuse_idle: Samples,
    /// Time from the peer's FIN to this side's close.
    pub close_wait: Samples,
    pub stale_reuses: u64,
    pub silent_drops: u64,
    pub late_request_resets: u64,
    /// Connection lifetimes (ESTABLISHED to CLOSE) of connections whose open was seen.
    pub lifetimes: Samples,
    /// Closes of connections whose open was seen: what is still open is
    /// `opened - closed_seen`.
    pub closed_seen: u64,
    /// Client: SYN to ESTABLISHED.
    pub connect_time: Samples,
    /// Server: handshake to accept().
    pub accept_wait: Samples,
    pub connect_errors: std::collections::BTreeMap<String, u64>,
    /// Per-second samples of the pool.
    pub history: pools::PoolHistory,
    /// Per-second samples of the listening socket (server side).
    pub listener: pools::ListenerHistory,
}

impl ConnectionStats {
    fn touch(&mut self, event: &Event) {
        if !event.comm.is_empty() {
            self.comm = event.comm;
        }
        if event.role != Role::Unknown {
            self.role = Some(event.role);
        }
    }

    pub fn peer_idle_timeout(&self, jiffy: Duration) -> Option<Estimate> {
        idle_timeout(self.peer_close_idle.sorted(), ms(jiffy))
    }

    pub fn local_idle_timeout(&self, jiffy: Duration) -> Option<Estimate> {
        idle_timeout(self.local_close_idle.sorted(), ms(jiffy))
    }

    /// Connections opened since the agent started that are still open.
    pub fn open_now(&self) -> u64 {
        self.opened.saturating_sub(self.closed_seen)
    }

    pub fn closed_total(&self) -> u64 {
        self.closes.total()
    }
}

/// How the peer answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PeerEnd {
    Reset,
    Fin,
}

impl PeerEnd {
    fn name(self) -> &'static str {
        match self {
            Self::Reset => "RST",
            Self::Fin => "FIN",
        }
    }
}

/// One connection, followed for as long as reuses, resets and retransmissions on
/// it need to be put together.
#[derive(Clone, Debug, Default)]
struct ConnectionTrack {
    reuse: Option<(SystemTime, Reuse)>,
    peer_end: Option<(SystemTime, PeerEnd)>,
    retransmits_after_reuse: u32,
    stale_counted: bool,
    drop_counted: bool,
}

/// A connection: process, local port, remote endpoint.
type ConnectionKey = (u32, u16, IpAddr, u16);

/// Something the metrics count every time it happens (findings themselves are
/// reported only when they change materially).
#[derive(Clone, Debug, PartialEq)]
pub struct Occurrence {
    pub kind: FindingKind,
    pub pid: u32,
    pub comm: Comm,
    /// Client side: the destination.
    pub remote: Option<(IpAddr, u16)>,
    /// Server side: the listening port.
    pub lport: Option<u16>,
    /// How much: 1 for an event, seconds for saturation, attempts for drops.
    pub amount: f64,
}

pub struct Diagnoser {
    config: Config,
    destinations: LruCache<DestinationKey, ConnectionStats, RandomState>,
    listeners: LruCache<ListenerKey, ConnectionStats, RandomState>,
    /// Live connections.
    connections: LruCache<ConnectionKey, ConnectionTrack, RandomState>,
    /// Connections that just closed: kept apart so that the live ones (which may
    /// sit idle for minutes before a silent drop shows) are never evicted by them.
    closed: LruCache<ConnectionKey, ConnectionTrack, RandomState>,
    book: FindingBook,
    occurrences: Vec<Occurrence>,
    /// CLOSE_WAIT sockets already counted as leaks.
    leaked: std::collections::HashSet<u64>,
}

impl Diagnoser {
    pub fn new(config: Config) -> Self {
        Self {
            destinations: LruCache::with_hasher(config.max_destinations, RandomState::default()),
            listeners: LruCache::with_hasher(config.max_destinations, RandomState::default()),
            connections: LruCache::with_hasher(config.max_connections, RandomState::default()),
            closed: LruCache::with_hasher(
                NonZeroUsize::new(4096).expect("non-zero"),
                RandomState::default(),
            ),
            book: FindingBook::new(config.max_destinations),
            occurrences: Vec::new(),
            leaked: Default::default(),
            config,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// What happened since the previous call, for the metrics.
    pub fn take_occurrences(&mut self) -> Vec<Occurrence> {
        std::mem::take(&mut self.occurrences)
    }

    fn occurred(&mut self, kind: FindingKind, event: &Event, amount: f64) {
        let (remote, lport) = if event.role == Role::Server {
            (None, Some(event.lport))
        } else {
            (Some((event.raddr, event.rport)), None)
        };
        self.occurrences.push(Occurrence {
            kind,
            pid: event.pid,
            comm: event.comm,
            remote,
            lport,
            amount,
        });
    }

    /// Takes in one event; returns the findings it made new or changed materially.
    pub fn observe(&mut self, event: &Event) -> Vec<Finding> {
        let mut findings = Vec::new();
        match &event.detail {
            Detail::Open(open) => {
                // A new connection on a 4-tuple used before starts afresh.
                let key = connection(event);
                self.connections.pop(&key);
                self.closed.pop(&key);
                let stats = self.stats(event);
                stats.opened += 1;
                if let Some(us) = open.connect_us {
                    stats.connect_time.push(us as f64 / 1000.0);
                }
                if let Some(us) = open.accept_wait_us {
                    stats.accept_wait.push(us as f64 / 1000.0);
                }
            }
            Detail::Close(close) => self.on_close(event, close, &mut findings),
            Detail::Reset(reset) => self.on_reset(event, reset, &mut findings),
            Detail::Reuse(reuse) => self.on_reuse(event, reuse, &mut findings),
            Detail::Retransmit(_) => {
                if self.has_track(event) {
                    let track = self.track(event);
                    if track.reuse.is_some() {
                        track.retransmits_after_reuse += 1;
                    }
                }
            }
            Detail::ConnectError(error) => {
                let stats = self.stats(event);
                *stats.connect_errors.entry(error.error.clone()).or_default() += 1;
                if error.error == "EADDRNOTAVAIL" {
                    findings.extend(self.address_not_available(
                        destination(event),
                        event.comm,
                        event.ts,
                    ));
                }
            }
        }
        findings
    }

    /// Server connections are grouped by listening port (their remote ports are
    /// ephemeral); everything else by remote endpoint.
    fn stats(&mut self, event: &Event) -> &mut ConnectionStats {
        let stats = if event.role == Role::Server {
            let key = ListenerKey {
                pid: event.pid,
                lport: event.lport,
            };
            self.listeners
                .get_or_insert_mut(key, ConnectionStats::default)
        } else {
            self.destinations
                .get_or_insert_mut(destination(event), ConnectionStats::default)
        };
        stats.touch(event);
        stats
    }

    fn has_track(&self, event: &Event) -> bool {
        let key = connection(event);
        self.connections.contains(&key) || self.closed.contains(&key)
    }

    /// The live connection's track, or, for events that come just after its
    /// close (on loopback a reuse event follows the close it caused), the track
    /// it had.
    fn track(&mut self, event: &Event) -> &mut ConnectionTrack {
        let key = connection(event);
        if !self.connections.contains(&key) && self.closed.contains(&key) {
            return self.closed.get_mut(&key).expect("checked above");
        }
        self.connections
            .get_or_insert_mut(key, ConnectionTrack::default)
    }

    fn on_close(&mut self, event: &Event, close: &Close, findings: &mut Vec<Finding>) {
        let stats = self.stats(event);
        stats.closes.count(close.closed_by);
        if let Some(duration) = close.duration_ms {
            stats.closed_seen += 1;
            stats.lifetimes.push(duration);
        }
        match (close.closed_by, close.idle_ms) {
            (ClosedBy::Peer, Some(idle)) => {
                let idle = idle as f64;
                if close.awaiting_reply {
                    stats.mid_request_peer_closes += 1;
                } else if idle < GRACEFUL_MS {
                    stats.graceful_peer_closes += 1;
                } else {
                    stats.peer_close_idle.push(idle);
                }
            }
            // Closing right after a reply (a request limit, `Connection: close`)
            // is no idle timeout, nor is a client giving up on a request. (A
            // server's idle connections always end with its own reply, so
            // `awaiting_reply` says nothing there.)
            (ClosedBy::Local, Some(idle))
                if idle as f64 >= GRACEFUL_MS
                    && !(close.awaiting_reply && event.role != Role::Server) =>
            {
                stats.local_close_idle.push(idle as f64)
            }
            _ => {}
        }
        if let Some(wait) = close.close_wait_ms {
            stats.close_wait.push(wait);
        }

        // The peer's FIN came while a request sent after idle was outstanding:
        // the request crossed the peer's close.
        let fin_at = event
            .ts
            .checked_sub(Duration::from_secs_f64(
                close.close_wait_ms.unwrap_or(0.0) / 1000.0,
            ))
            .unwrap_or(event.ts);
        let peer_end = match close.closed_by {
            ClosedBy::ResetPeer if close.awaiting_reply => Some((event.ts, PeerEnd::Reset)),
            ClosedBy::Peer if close.awaiting_reply => Some((fin_at, PeerEnd::Fin)),
            _ => None,
        };
        // Most connections never had a reuse, reset or retransmission to put
        // together, nor end in a way a later reuse event must see.
        if peer_end.is_some() || self.has_track(event) {
            self.close_track(event, close, peer_end, findings);
        }
        if event.role == Role::Client && close.closed_by == ClosedBy::Peer {
            findings.extend(self.mismatch(event));
        }
    }

    /// The part of a close that puts the connection's track together: a stale
    /// reuse the close answered, a silent drop; then the track moves to the
    /// closed ones.
    fn close_track(
        &mut self,
        event: &Event,
        close: &Close,
        peer_end: Option<(SystemTime, PeerEnd)>,
        findings: &mut Vec<Finding>,
    ) {
        let min_idle = self.config.min_idle;
        let track = self.track(event);
        if track.peer_end.is_none() {
            track.peer_end = peer_end;
        }
        self.check_stale(event, findings);

        // An idle flow's first send went unanswered until the kernel gave up (or
        // a reset came back much later): the path dropped the flow.
        let track = self.track(event);
        let dropped = matches!(close.closed_by, ClosedBy::Timeout | ClosedBy::ResetPeer)
            && close.awaiting_reply
            && track.retransmits_after_reuse > 0
            && !track.drop_counted
            && track
                .reuse
                .as_ref()
                .is_some_and(|(_, reuse)| Duration::from_millis(reuse.idle_ms) >= min_idle);
        if dropped {
            track.drop_counted = true;
            let (reused_at, reuse) = track.reuse.clone().expect("checked above");
            let retransmits = track.retransmits_after_reuse;
            let ended_with = close.error.clone().unwrap_or_else(|| "RST".to_string());
            let failed_after = event.ts.duration_since(reused_at).unwrap_or_default();
            let stats = self.stats(event);
            stats.silent_drops += 1;
            let count = stats.silent_drops;
            self.occurred(FindingKind::SilentDrop, event, 1.0);
            let finding = Finding {
                ts: event.ts,
                event_type: "finding",
                kind: FindingKind::SilentDrop,
                severity: Severity::Error,
                pid: event.pid,
                comm: event.comm,
                raddr: Some(event.raddr),
                rport: Some(event.rport),
                lport: None,
                count,
                evidence: json!({
                    "idle_before_send_ms": reuse.idle_ms,
                    "retransmits": retransmits,
                    "ended_with": ended_with,
                    "failed_after_ms": ms(failed_after).round(),
                }),
                recommendation: format!(
                    "Something on the path to {} (a NAT, firewall or load balancer) forgot the \
                     flow after it sat idle {}: the first request after the idle period was \
                     retransmitted {} times unanswered and the connection ended with {}. \
                     Close pooled connections idle longer than {}, or enable TCP keep-alive \
                     (SO_KEEPALIVE) with probes more often than that; cloud defaults drop idle \
                     flows after 350 s (AWS NLB/NAT) or 4 min (Azure).",
                    endpoint(event.raddr, event.rport),
                    human_ms(reuse.idle_ms as f64),
                    retransmits,
                    ended_with,
                    human_ms(safe_below(reuse.idle_ms as f64)),
                ),
            };
            let materiality = Materiality {
                severity: Severity::Error,
                count,
                figures: vec![reuse.idle_ms as f64],
            };
            findings.extend(self.book.update(finding, materiality));
        }
        let key = connection(event);
        if let Some(track) = self.connections.pop(&key) {
            self.closed.put(key, track);
        }
    }

    fn on_reset(&mut self, event: &Event, reset: &Reset, findings: &mut Vec<Finding>) {
        match reset.direction {
            // A reset while nothing was outstanding answered no request.
            Direction::In if reset.awaiting_reply => {
                let track = self.track(event);
                track.peer_end = Some((event.ts, PeerEnd::Reset));
                self.check_stale(event, findings);
            }
            Direction::In => {}
            Direction::Out
                if event.role == Role::Server && reset.closed_by == Some(ClosedBy::Local) =>
            {
                findings.extend(self.late_request(event, reset));
            }
            Direction::Out => {}
        }
    }

    fn on_reuse(&mut self, event: &Event, reuse: &Reuse, findings: &mut Vec<Finding>) {
        if Duration::from_millis(reuse.idle_ms) >= self.config.min_idle {
            self.stats(event).reuse_idle.push(reuse.idle_ms as f64);
        }
        let track = self.track(event);
        track.reuse = Some((event.ts, reuse.clone()));
        track.retransmits_after_reuse = 0;
        self.check_stale(event, findings);
    }

    /// A reuse that the peer answered with a reset or FIN within the window, or
    /// that went to a connection the peer had already closed.
    fn check_stale(&mut self, event: &Event, findings: &mut Vec<Finding>) {
        // A server's sends are replies: it reuses nothing.
        if event.role == Role::Server {
            return;
        }
        let min_idle = self.config.min_idle;
        let track = self.track(event);
        let Some((reused_at, reuse)) = track.reuse.clone() else {
            return;
        };
        if track.stale_counted {
            return;
        }
        let answer = track.peer_end.filter(|(at, _)| {
            let after = at.duration_since(reused_at).unwrap_or_default() <= STALE_WINDOW;
            let before = reused_at.duration_since(*at).unwrap_or_default() <= ANSWER_BEFORE_REUSE;
            after && before
        });
        let after_idle = Duration::from_millis(reuse.idle_ms) >= min_idle;
        if !(reuse.peer_closed || (after_idle && answer.is_some())) {
            return;
        }
        track.stale_counted = true;
        let came_back = match answer {
            Some((_, end)) => end.name(),
            None => "FIN",
        };
        let jiffy = self.config.jiffy;
        let stats = self.stats(event);
        stats.stale_reuses += 1;
        let count = stats.stale_reuses;
        let peer_timeout = stats.peer_idle_timeout(jiffy);
        let max_idle = stats.reuse_idle.max().unwrap_or(reuse.idle_ms as f64);
        self.occurred(FindingKind::StaleReuse, event, 1.0);
        let advice = match peer_timeout {
            Some(estimate) => format!(
                "the peer closes connections idle for {}: close pooled connections idle \
                 longer than {}",
                human_ms(estimate.timeout_ms),
                human_ms(safe_below(estimate.timeout_ms))
            ),
            None => format!(
                "close pooled connections before they sit idle {}",
                human_ms(reuse.idle_ms as f64)
            ),
        };
        let finding = Finding {
            ts: event.ts,
            event_type: "finding",
            kind: FindingKind::StaleReuse,
            severity: Severity::Error,
            pid: event.pid,
            comm: event.comm,
            raddr: Some(event.raddr),
            rport: Some(event.rport),
            lport: None,
            count,
            evidence: json!({
                "idle_before_reuse_ms": reuse.idle_ms,
                "max_idle_before_reuse_ms": max_idle,
                "peer_closed_before_send": reuse.peer_closed,
                "came_back": came_back,
                "peer_idle_timeout_ms": peer_timeout.map(|e| e.timeout_ms),
            }),
            recommendation: format!(
                "{} sent requests on connections to {} that the peer had already closed or \
                 closed as they arrived (after {} idle; the peer answered with {}): those \
                 requests fail (ECONNRESET, EPIPE, \"socket hang up\", 502). {}, or retry \
                 idempotent requests once on a new connection.",
                event.comm,
                endpoint(event.raddr, event.rport),
                human_ms(reuse.idle_ms as f64),
                came_back,
                capitalize(&advice),
            ),
        };
        let materiality = Materiality {
            severity: Severity::Error,
            count,
            figures: peer_timeout.map(|e| e.timeout_ms).into_iter().collect(),
        };
        findings.extend(self.book.update(finding, materiality));
        // A failure upgrades the mismatch on the same pair.
        if event.role == Role::Client {
            findings.extend(self.mismatch(event));
        }
    }

    /// The peer keeps closing this client's idle connections after the same time.
    /// Checked on every idle close by the peer, so the finding is built only
    /// when its evidence changed materially (and for the report).
    fn mismatch(&mut self, event: &Event) -> Option<Finding> {
        let key = destination(event);
        let stats = self.destinations.get(&key)?;
        let peer = stats.peer_idle_timeout(self.config.jiffy)?;
        let materiality = Materiality {
            severity: mismatch_severity(stats),
            count: stats.peer_close_idle.total(),
            figures: vec![peer.timeout_ms],
        };
        let finding_key = FindingKey {
            kind: FindingKind::IdleTimeoutMismatch,
            pid: key.pid,
            remote: Some((key.raddr, key.rport)),
            lport: None,
        };
        let (destinations, jiffy, ts) = (&self.destinations, self.config.jiffy, event.ts);
        self.book.update_with(finding_key, materiality, ts, || {
            let stats = destinations.peek(&key).expect("looked up above");
            mismatch_finding(stats, jiffy, &key, ts).expect("estimated above")
        })
    }

    /// A server answered data on a connection it had closed with a reset: the
    /// client reused a connection this server had ended.
    fn late_request(&mut self, event: &Event, reset: &Reset) -> Option<Finding> {
        self.occurred(FindingKind::LateRequestReset, event, 1.0);
        let jiffy = self.config.jiffy;
        let key = ListenerKey {
            pid: event.pid,
            lport: event.lport,
        };
        let stats = self
            .listeners
            .get_or_insert_mut(key, ConnectionStats::default);
        stats.touch(event);
        stats.late_request_resets += 1;
        let server_timeout = stats.local_idle_timeout(jiffy).map(|e| e.timeout_ms);
        let count = stats.late_request_resets;
        let after_close = reset.since_close_ms.unwrap_or(0.0);
        let comm = if stats.comm.is_empty() {
            "this server"
        } else {
            stats.comm.as_str()
        };
        let knob = server_idle_knob(comm)
            .map(|knob| format!(" ({knob})"))
            .unwrap_or_default();
        let recommendation = match server_timeout {
            Some(timeout) => format!(
                "Clients sent requests on connections {comm} had closed after {} idle; {comm} \
                 answered them with a reset ({count} so far). Clients behind port {} must \
                 close idle pooled connections before {}, or raise {comm}'s keep-alive \
                 timeout{knob} above the clients' pool idle timeout.",
                human_ms(timeout),
                event.lport,
                human_ms(safe_below(timeout)),
            ),
            None => format!(
                "Clients sent requests on connections {comm} had already closed; {comm} \
                 answered them with a reset ({count} so far). Clients of port {} must close \
                 idle pooled connections before the server does, or the server's keep-alive \
                 timeout{knob} must be longer than theirs.",
                event.lport
            ),
        };
        let finding = Finding {
            ts: event.ts,
            event_type: "finding",
            kind: FindingKind::LateRequestReset,
            severity: Severity::Warning,
            pid: event.pid,
            comm: stats.comm,
            raddr: Some(event.raddr),
            rport: Some(event.rport),
            lport: Some(event.lport),
            count,
            evidence: json!({
                "local_port": event.lport,
                "last_client": endpoint(event.raddr, event.rport),
                "after_close_ms": after_close,
                "server_idle_timeout_ms": server_timeout,
            }),
            recommendation,
        };
        let materiality = Materiality {
            severity: Severity::Warning,
            count,
            figures: server_timeout.into_iter().collect(),
        };
        self.book.update(finding, materiality)
    }

    /// Takes in one scan of the connections now in CLOSE_WAIT; returns the leak
    /// findings that are new or changed materially.
    pub fn close_wait_scan(&mut self, now: SystemTime, entries: &[CloseWaitEntry]) -> Vec<Finding> {
        let threshold = self.config.close_wait_threshold;
        let stuck: Vec<&CloseWaitEntry> =
            entries.iter().filter(|e| e.waiting >= threshold).collect();
        // Each stuck connection counts once as a leak, while it lasts.
        self.leaked
            .retain(|sock| entries.iter().any(|e| e.sock == *sock));
        for entry in &stuck {
            if self.leaked.insert(entry.sock) {
                self.occurrences.push(Occurrence {
                    kind: FindingKind::CloseWaitLeak,
                    pid: entry.pid,
                    comm: entry.comm,
                    remote: Some((entry.raddr, entry.rport)),
                    lport: None,
                    amount: 1.0,
                });
            }
        }
        let mut per_destination: std::collections::BTreeMap<DestinationKey, Vec<&CloseWaitEntry>> =
            Default::default();
        let mut per_process: std::collections::HashMap<u32, u64> = Default::default();
        for entry in &stuck {
            let key = DestinationKey {
                pid: entry.pid,
                raddr: entry.raddr,
                rport: entry.rport,
            };
            per_destination.entry(key).or_default().push(entry);
            *per_process.entry(entry.pid).or_default() += 1;
        }
        let mut findings = Vec::new();
        for (key, entries) in per_destination {
            let oldest = entries.iter().map(|e| e.waiting).max().unwrap_or_default();
            let count = entries.len() as u64;
            let in_process = per_process[&key.pid];
            let comm = entries[0].comm;
            let severity = if count >= 10 {
                Severity::Error
            } else {
                Severity::Warning
            };
            let finding = Finding {
                ts: now,
                event_type: "finding",
                kind: FindingKind::CloseWaitLeak,
                severity,
                pid: key.pid,
                comm,
                raddr: Some(key.raddr),
                rport: Some(key.rport),
                lport: None,
                count,
                evidence: json!({
                    "connections_to_destination": count,
                    "connections_in_process": in_process,
                    "oldest_close_wait_s": oldest.as_secs_f64().round(),
                    "threshold_s": threshold.as_secs_f64(),
                    "local_ports": entries.iter().map(|e| e.lport).collect::<Vec<_>>(),
                }),
                recommendation: format!(
                    "{comm} (pid {}) holds {count} connection{} to {} that the peer closed \
                     {} ago and never closed its side ({in_process} in the process): each \
                     one keeps a socket and a pool slot. The application must close a \
                     connection when a read returns end-of-file (0 bytes); check the pool's \
                     eviction of dead connections and the error paths that skip close().",
                    key.pid,
                    if count == 1 { "" } else { "s" },
                    endpoint(key.raddr, key.rport),
                    human_ms(ms(oldest)),
                ),
            };
            let materiality = Materiality {
                severity,
                count,
                figures: Vec::new(),
            };
            findings.extend(self.book.update(finding, materiality));
        }
        findings
    }

    /// Every finding currently known, most severe first.
    pub fn findings(&self) -> Vec<Finding> {
        self.book.all(|key, ts| match (key.kind, key.remote) {
            (FindingKind::IdleTimeoutMismatch, Some((raddr, rport))) => {
                let destination = DestinationKey {
                    pid: key.pid,
                    raddr,
                    rport,
                };
                let stats = self.destinations.peek(&destination)?;
                mismatch_finding(stats, self.config.jiffy, &destination, ts)
            }
            _ => None,
        })
    }

    pub fn destinations(&self) -> impl Iterator<Item = (&DestinationKey, &ConnectionStats)> {
        self.destinations.iter()
    }

    pub fn listeners(&self) -> impl Iterator<Item = (&ListenerKey, &ConnectionStats)> {
        self.listeners.iter()
    }
}

fn connection(event: &Event) -> ConnectionKey {
    (event.pid, event.lport, event.raddr, event.rport)
}

fn mismatch_severity(stats: &ConnectionStats) -> Severity {
    if stats.stale_reuses > 0 {
        Severity::Error
    } else {
        Severity::Warning
    }
}

/// The idle_timeout_mismatch finding of a destination as of `ts`, once its
/// peer's idle timeout is inferred.
fn mismatch_finding(
    stats: &ConnectionStats,
    jiffy: Duration,
    key: &DestinationKey,
    ts: SystemTime,
) -> Option<Finding> {
    let peer = stats.peer_idle_timeout(jiffy)?;
    let timeout = peer.timeout_ms;
    let pool_timeout = stats
        .local_idle_timeout(jiffy)
        .map(|e| e.timeout_ms)
        .filter(|&local| local > timeout);
    let max_reuse = stats.reuse_idle.max();
    // What the client side is known to do beyond the peer's timeout.
    let client_idle = pool_timeout.or(max_reuse.filter(|&reuse| reuse > timeout));
    let target = endpoint(key.raddr, key.rport);
    let mut recommendation = format!(
        "{} relies on {target} to end its idle pooled connections: the peer closed {} of \
         them after {} idle, and every such close races the next request{}. Set the pool's \
         idle timeout below {}",
        stats.comm,
        peer.samples,
        human_ms(timeout),
        if stats.stale_reuses > 0 {
            format!(" ({} requests already hit it)", stats.stale_reuses)
        } else {
            String::new()
        },
        human_ms(safe_below(timeout)),
    );
    if let Some(knob) = pool_idle_knob(&stats.comm) {
        recommendation.push_str(&format!(" ({knob})"));
    }
    match (pool_timeout, max_reuse.filter(|&reuse| reuse > timeout)) {
        (Some(pool), _) => recommendation.push_str(&format!(
            " (it closes them only after {}), or raise the peer's keep-alive timeout \
             above {}.",
            human_ms(pool),
            human_ms(pool)
        )),
        (None, Some(reuse)) => recommendation.push_str(&format!(
            " (it reuses connections idle for up to {}), or raise the peer's keep-alive \
             timeout above {}.",
            human_ms(reuse),
            human_ms(reuse)
        )),
        (None, None) => {
            recommendation.push_str(", or raise the peer's keep-alive timeout above the pool's.")
        }
    }
    Some(Finding {
        ts,
        event_type: "finding",
        kind: FindingKind::IdleTimeoutMismatch,
        severity: mismatch_severity(stats),
        pid: key.pid,
        comm: stats.comm,
        raddr: Some(key.raddr),
        rport: Some(key.rport),
        lport: None,
        count: stats.peer_close_idle.total(),
        evidence: json!({
            "peer_idle_timeout_ms": timeout,
            "peer_idle_closes": peer.samples,
            "peer_closes_considered": peer.considered,
            "pool_idle_timeout_ms": pool_timeout,
            "max_reuse_idle_ms": max_reuse,
            "client_idle_ms": client_idle,
            "stale_reuses": stats.stale_reuses,
        }),
        recommendation,
    })
}

fn destination(event: &Event) -> DestinationKey {
    DestinationKey {
        pid: event.pid,
        raddr: event.raddr,
        rport: event.rport,
    }
}

pub fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// A pool idle timeout safely below a peer's `timeout_ms`: 10% under it, at
/// least a jiffy-proof 100 ms under for short timeouts, rounded down to a figure
/// people write in configuration files.
pub fn safe_below(timeout_ms: f64) -> f64 {
    let target = (timeout_ms * 0.9)
        .min(timeout_ms - 100.0)
        .max(timeout_ms / 2.0);
    let step = if target >= 10_000.0 {
        1000.0
    } else if target >= 1000.0 {
        100.0
    } else {
        10.0
    };
    (target / step).floor() * step
}

/// `950 ms`, `1.2 s`, `75 s`, `5 min`.
pub fn human_ms(value_ms: f64) -> String {
    if value_ms < 1000.0 {
        format!("{value_ms:.0} ms")
    } else if value_ms < 10_000.0 {
        format!("{:.1} s", value_ms / 1000.0)
    } else if value_ms < 600_000.0 {
        format!("{:.0} s", value_ms / 1000.0)
    } else {
        format!("{:.0} min", value_ms / 60_000.0)
    }
}

pub fn endpoint(addr: IpAddr, port: u16) -> String {
    match addr {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

/// Where well-known clients set how long they keep idle pooled connections.
fn pool_idle_knob(comm: &str) -> Option<&'static str> {
    match comm {
        "nginx" => Some("nginx: `keepalive_timeout` in the `upstream` block, default 60 s"),
        "haproxy" => Some("HAProxy: `pool-purge-delay`, default 5 s"),
        _ => None,
    }
}

/// Where well-known servers set their keep-alive timeout.
fn server_idle_knob(comm: &str) -> Option<&'static str> {
    match comm {
        "nginx" => Some("nginx: `keepalive_timeout`, default 75 s"),
        "haproxy" => Some("HAProxy: `timeout http-keep-alive`"),
        "apache2" | "httpd" => Some("Apache: `KeepAliveTimeout`, default 5 s"),
        _ => None,
    }
}

fn capitalize(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests;
