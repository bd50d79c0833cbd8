//! The series a connection's open, close and reset events update, found once
//! per process and endpoint and then kept.
//!
//! Finding them from scratch takes the cardinality budget's decisions (cache
//! lookups under a lock) and, per family, a hash of six or seven label
//! strings with the standard library's SipHash (prometheus-client's families
//! use it) under the family's lock: most of what the metrics cost per event.
//! A connection-churning workload repeats the same process and endpoint for
//! every connection, so the handles (reference-counted, like the families'
//! own) are kept here, keyed by numbers. The per-event families never remove
//! a series, so a kept handle always counts into the registry.

use std::{net::IpAddr, num::NonZeroUsize};

use foldhash::fast::RandomState;
use lru::LruCache;
use prometheus_client::metrics::{counter::Counter, histogram::Histogram};

use super::{ConnLabels, Metrics};
use crate::{
    comm::Comm,
    diagnosis::estimate::GRACEFUL_MS,
    event::{ClosedBy, Detail, Direction, Event, Role},
};

/// Processes and endpoints whose series are kept; the least recently used
/// are found again when they come back.
const KEPT: NonZeroUsize = NonZeroUsize::new(4096).unwrap();

/// A process and the endpoint its connections are counted under: the
/// destination for client connections, the listening port for server ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct SeriesKey {
    pid: u32,
    comm: Comm,
    role: Role,
    addr: Option<IpAddr>,
    port: u16,
}

impl SeriesKey {
    fn of(event: &Event) -> Self {
        let (addr, port) = match event.role {
            Role::Server => (None, event.lport),
            _ => (Some(event.raddr), event.rport),
        };
        Self {
            pid: event.pid,
            comm: event.comm,
            role: event.role,
            addr,
            port,
        }
    }
}

/// One process and endpoint's series, each created when first needed.
pub(super) struct ConnSeries {
    labels: ConnLabels,
    opened: Option<Counter>,
    connect: Option<Histogram>,
    accept_wait: Option<Histogram>,
    /// `connections_closed` and `idle_at_close`, by [`closed_by_index`].
    closed: [Option<(Counter, Histogram)>; 6],
    /// By [`Direction`]: in, out.
    resets: [Option<Counter>; 2],
    idle_timeout_mismatches: Option<Counter>,
}

fn closed_by_index(closed_by: ClosedBy) -> usize {
    match closed_by {
        ClosedBy::Local => 0,
        ClosedBy::Peer => 1,
        ClosedBy::ResetLocal => 2,
        ClosedBy::ResetPeer => 3,
        ClosedBy::Timeout => 4,
        ClosedBy::Unknown => 5,
    }
}

pub(super) type SeriesCache = LruCache<SeriesKey, ConnSeries, RandomState>;

pub(super) fn cache() -> SeriesCache {
    LruCache::with_hasher(KEPT, RandomState::default())
}

impl Metrics {
    /// Counts an open, close or reset into its connection's series.
    pub(super) fn observe_connection(&self, event: &Event) {
        let mut cache = self.series.lock().expect("metrics series");
        let series = cache.get_or_insert_mut(SeriesKey::of(event), || self.conn_series(event));
        match &event.detail {
            Detail::Open(open) => {
                series
                    .opened
                    .get_or_insert_with(|| self.first_open(&series.labels, event.role))
                    .inc();
                if let Some(us) = open.connect_us {
                    series
                        .connect
                        .get_or_insert_with(|| {
                            (*self
                                .connect_duration
                                .get_or_create(&series.labels.remote_labels()))
                            .clone()
                        })
                        .observe(us as f64 / 1e6);
                }
                if let Some(us) = open.accept_wait_us {
                    series
                        .accept_wait
                        .get_or_insert_with(|| {
                            (*self.accept_wait.get_or_create(&series.labels.port_labels())).clone()
                        })
                        .observe(us as f64 / 1e6);
                }
            }
            Detail::Close(close) => {
                let labels = &series.labels;
                let (closed, idle_at_close) = series.closed[closed_by_index(close.closed_by)]
                    .get_or_insert_with(|| {
                        let labels = labels.closed(close.closed_by);
                        (
                            (*self.connections_closed.get_or_create(&labels)).clone(),
                            (*self.idle_at_close.get_or_create(&labels)).clone(),
                        )
                    });
                closed.inc();
                if let Some(idle) = close.idle_ms {
                    idle_at_close.observe(idle as f64 / 1000.0);
                    // The race window of idle_timeout_mismatch: the destination
                    // closed an idle connection this process opened.
                    if event.role == Role::Client
                        && close.closed_by == ClosedBy::Peer
                        && !close.awaiting_reply
                        && idle as f64 >= GRACEFUL_MS
                    {
                        let remote = series.labels.remote_labels();
                        series
                            .idle_timeout_mismatches
                            .get_or_insert_with(|| {
                                (*self.idle_timeout_mismatches.get_or_create(&remote)).clone()
                            })
                            .inc();
                    }
                }
            }
            Detail::Reset(reset) => {
                let labels = &series.labels;
                let index = match reset.direction {
                    Direction::In => 0,
                    Direction::Out => 1,
                };
                let direction = reset.direction.name();
                series.resets[index]
                    .get_or_insert_with(|| {
                        (*self.resets.get_or_create(&labels.reset(direction))).clone()
                    })
                    .inc();
            }
            // `observe_event` hands over only opens, closes and resets.
            Detail::Reuse(_) | Detail::Retransmit(_) | Detail::ConnectError(_) => {}
        }
    }

    /// A process and endpoint seen for the first time (or again after its
    /// series left the cache): its labels, as the budget decides them.
    fn conn_series(&self, event: &Event) -> ConnSeries {
        ConnSeries {
            labels: self.conn_labels(event),
            opened: None,
            connect: None,
            accept_wait: None,
            closed: Default::default(),
            resets: Default::default(),
            idle_timeout_mismatches: None,
        }
    }

    /// The first open of a process and endpoint: its `connections_opened`
    /// series, and the problem counters it could raise created at zero, so
    /// that their first increment shows in `increase()` rather than being the
    /// series' first sample (which rate functions cannot see grow).
    fn first_open(&self, labels: &ConnLabels, role: Role) -> Counter {
        match role {
            Role::Server => {
                let port = labels.port_labels();
                self.late_request_resets.get_or_create(&port).inc_by(0);
                self.listen_drops.get_or_create(&port).inc_by(0);
            }
            _ => {
                let remote = labels.remote_labels();
                for family in [
                    &self.stale_reuses,
                    &self.idle_timeout_mismatches,
                    &self.silent_drops,
                    &self.close_wait_leaks,
                ] {
                    family.get_or_create(&remote).inc_by(0);
                }
            }
        }
        (*self.connections_opened.get_or_create(labels)).clone()
    }
}
