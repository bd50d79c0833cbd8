//! What the diagnosis knows of each destination and listening port at a scan,
//! as plain values: what the metrics sink shows as gauges.

use super::Diagnoser;
use crate::{
    comm::Comm,
    event::{DestinationKey, ListenerKey, Role},
};

/// Everything the diagnosis holds, at one scan.
#[derive(Clone, Debug, Default)]
pub struct Gauges {
    pub destinations: Vec<DestinationGauges>,
    pub listeners: Vec<ListenerGauges>,
}

/// One process's connections to one destination.
#[derive(Clone, Debug)]
pub struct DestinationGauges {
    pub key: DestinationKey,
    pub comm: Comm,
    pub role: Option<Role>,
    /// The idle timeout inferred for the peer, from its closes.
    pub peer_idle_timeout_ms: Option<f64>,
    /// The idle timeout inferred for this side, from its own closes.
    pub local_idle_timeout_ms: Option<f64>,
    /// Connections open now, of those whose open was seen.
    pub open: u64,
    /// Connections with a request in progress at the latest sample.
    pub busy: u64,
}

/// One process's listening port.
#[derive(Clone, Debug)]
pub struct ListenerGauges {
    pub key: ListenerKey,
    pub comm: Comm,
    /// The accept queue's depth and limit at the latest sample.
    pub queue: Option<(u32, u32)>,
    /// The idle timeout inferred for this server, from its own closes.
    pub local_idle_timeout_ms: Option<f64>,
}

impl Diagnoser {
    pub fn gauges(&self) -> Gauges {
        let jiffy = self.config().jiffy;
        Gauges {
            destinations: self
                .destinations()
                .map(|(key, stats)| DestinationGauges {
                    key: key.clone(),
                    comm: stats.comm,
                    role: stats.role,
                    peer_idle_timeout_ms: stats.peer_idle_timeout(jiffy).map(|e| e.timeout_ms),
                    local_idle_timeout_ms: stats.local_idle_timeout(jiffy).map(|e| e.timeout_ms),
                    open: stats.open_now(),
                    busy: stats.history.samples.back().map_or(0, |s| s.busy),
                })
                .collect(),
            listeners: self
                .listeners()
                .map(|(key, stats)| ListenerGauges {
                    key: key.clone(),
                    comm: stats.comm,
                    queue: stats
                        .listener
                        .samples
                        .back()
                        .map(|sample| (sample.depth, sample.limit)),
                    local_idle_timeout_ms: stats.local_idle_timeout(jiffy).map(|e| e.timeout_ms),
                })
                .collect(),
        }
    }
}
