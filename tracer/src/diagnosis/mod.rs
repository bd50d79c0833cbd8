//! Keep-alive diagnosis: events correlated per process and remote endpoint (and
//! per process and listening port for servers), idle timeouts inferred from when
//! connections close, and the findings that follow, with their numbers.
//!
//! Everything here is pure: it consumes decoded events and scan results, so the
//! rules are tested with hand-built sequences (see the tests below).
//!
//! - [`Diagnoser::observe`] takes each event: [`stats`] counts it per
//!   destination or listening port, `connections` puts one connection's
//!   reuses, resets, retransmissions and close together;
//! - the periodic scans (`scans` into the histories of [`pools`], and
//!   [`rules::close_wait_leak`]) take what the kernel's tables and the host
//!   held at that moment;
//! - [`rules`] has one file per finding kind: when it holds, its evidence and
//!   its advice;
//! - the [`finding::FindingBook`] decides when a finding is worth reporting
//!   again; [`report`] and [`gauges`] are what the sinks read.

pub mod estimate;
pub mod figures;
pub mod finding;
pub mod gauges;
pub mod pools;
pub mod report;
pub mod rules;
pub mod samples;
pub mod stats;

mod connections;
mod scans;

use std::{net::IpAddr, num::NonZeroUsize, time::Duration};

use foldhash::fast::RandomState;
use lru::LruCache;

use self::{
    connections::{ConnectionKey, ConnectionTrack, connection},
    finding::{Finding, FindingBook, FindingKind},
    rules::idle_timeout_mismatch::mismatch_finding,
    stats::ConnectionStats,
};
use crate::{
    comm::Comm,
    event::{DestinationKey, Detail, Event, ListenerKey, Role},
};

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
    /// A pool is in continuous use when busy at least this share of what
    /// back-to-back exchanges give (`rules::pool_saturation`).
    pub saturation_use: f64,
    /// A turnaround (response to next request) at most this share of the
    /// exchange is the client's own, not a wait for demand.
    pub saturation_turnaround: f64,
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
            saturation_use: 0.9,
            saturation_turnaround: 0.25,
            churn_rate: 100.0,
            starvation_samples: 3,
        }
    }
}

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

fn destination(event: &Event) -> DestinationKey {
    DestinationKey {
        pid: event.pid,
        raddr: event.raddr,
        rport: event.rport,
    }
}

#[cfg(test)]
mod tests;
