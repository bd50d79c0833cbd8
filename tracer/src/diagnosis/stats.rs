//! What is known of one process's connections to one destination, or to one
//! of its listening ports: counts, idle times, lifetimes and the samples the
//! rules and the report read.

use std::time::{Duration, SystemTime};

use super::{
    estimate::{Estimate, idle_timeout},
    figures::ms,
    pools,
    samples::{OrderedSamples, Samples},
};
use crate::{
    comm::Comm,
    event::{ClosedBy, Event, Role},
    kernel::tables::PoolCounters,
};

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

    pub(super) fn count(&mut self, closed_by: ClosedBy) {
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
    pub(super) fn touch(&mut self, event: &Event) {
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

    /// Adds the sample of the interval since the previous scan to the history.
    pub(super) fn record_sample(&mut self, now: SystemTime, counters: Option<&PoolCounters>) {
        let (open, opened, closed) = (self.open_now(), self.opened, self.closed_total());
        if let Some(sample) = self.history.sample(now, counters, open, opened, closed) {
            self.history.push(sample);
        }
    }
}
