//! One connection's events put together: a reuse, the peer's answer to it
//! (a reset or FIN), retransmissions after it and the close, kept for as long
//! as the rules need them, and each close and reset counted per destination.

use std::{
    net::IpAddr,
    time::{Duration, SystemTime},
};

use super::{Diagnoser, estimate::GRACEFUL_MS, finding::Finding};
use crate::event::{Close, ClosedBy, Direction, Event, Reset, Reuse, Role};

/// How the peer answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum PeerEnd {
    Reset,
    Fin,
}

impl PeerEnd {
    pub(super) fn name(self) -> &'static str {
        match self {
            Self::Reset => "RST",
            Self::Fin => "FIN",
        }
    }
}

/// One connection, followed for as long as reuses, resets and retransmissions on
/// it need to be put together.
#[derive(Clone, Debug, Default)]
pub(super) struct ConnectionTrack {
    pub(super) reuse: Option<(SystemTime, Reuse)>,
    pub(super) peer_end: Option<(SystemTime, PeerEnd)>,
    pub(super) retransmits_after_reuse: u32,
    pub(super) stale_counted: bool,
    pub(super) drop_counted: bool,
}

/// A connection: process, local port, remote endpoint.
pub(super) type ConnectionKey = (u32, u16, IpAddr, u16);

impl Diagnoser {
    pub(super) fn has_track(&self, event: &Event) -> bool {
        let key = connection(event);
        self.connections.contains(&key) || self.closed.contains(&key)
    }

    /// The live connection's track, or, for events that come just after its
    /// close (on loopback a reuse event follows the close it caused), the track
    /// it had.
    pub(super) fn track(&mut self, event: &Event) -> &mut ConnectionTrack {
        let key = connection(event);
        if !self.connections.contains(&key) && self.closed.contains(&key) {
            return self.closed.get_mut(&key).expect("checked above");
        }
        self.connections
            .get_or_insert_mut(key, ConnectionTrack::default)
    }

    pub(super) fn on_close(&mut self, event: &Event, close: &Close, findings: &mut Vec<Finding>) {
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
            // is no idle timeout, nor is giving up on a request.
            (ClosedBy::Local, Some(idle))
                if idle as f64 >= GRACEFUL_MS && !close.awaiting_reply =>
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
        let track = self.track(event);
        if track.peer_end.is_none() {
            track.peer_end = peer_end;
        }
        self.check_stale(event, findings);

        findings.extend(self.silent_drop(event, close));
        let key = connection(event);
        if let Some(track) = self.connections.pop(&key) {
            self.closed.put(key, track);
        }
    }

    pub(super) fn on_reset(&mut self, event: &Event, reset: &Reset, findings: &mut Vec<Finding>) {
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

    pub(super) fn on_reuse(&mut self, event: &Event, reuse: &Reuse, findings: &mut Vec<Finding>) {
        if Duration::from_millis(reuse.idle_ms) >= self.config.min_idle {
            self.stats(event).reuse_idle.push(reuse.idle_ms as f64);
        }
        let track = self.track(event);
        track.reuse = Some((event.ts, reuse.clone()));
        track.retransmits_after_reuse = 0;
        self.check_stale(event, findings);
    }
}

pub(super) fn connection(event: &Event) -> ConnectionKey {
    (event.pid, event.lport, event.raddr, event.rport)
}
