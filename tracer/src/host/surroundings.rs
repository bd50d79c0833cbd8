//! What surrounds the destinations a process churns through: TIME_WAIT
//! sockets towards each, and the local port range of the process's network
//! namespace.

use std::{
    collections::{HashMap, hash_map::Entry},
    os::unix::fs::MetadataExt as _,
};

use super::{listen_queue, sock_diag};
use crate::event::DestinationKey;

/// What the pipeline looked up outside the kernel for the destinations that
/// churn (see `Diagnoser::churn_candidates`).
#[derive(Clone, Debug, Default)]
pub struct Surroundings {
    /// TIME_WAIT sockets towards each destination.
    pub time_wait: HashMap<DestinationKey, u64>,
    /// Size of `net.ipv4.ip_local_port_range` in each process's namespace.
    pub port_range: HashMap<u32, u32>,
}

/// TIME_WAIT counts and port ranges for the destinations that churn. TIME_WAIT
/// sockets belong to no process, only to a network namespace: one dump per
/// namespace counts them for all its destinations.
pub fn look(candidates: Vec<DestinationKey>) -> Surroundings {
    let mut around = Surroundings::default();
    let mut by_netns: HashMap<u64, Vec<DestinationKey>> = HashMap::new();
    for key in candidates {
        if let Entry::Vacant(slot) = around.port_range.entry(key.pid)
            && let Some(size) = port_range_size(key.pid)
        {
            slot.insert(size);
        }
        // A process that has exited leads to no namespace.
        if let Ok(netns) = std::fs::metadata(format!("/proc/{}/ns/net", key.pid)) {
            by_netns.entry(netns.ino()).or_default().push(key);
        }
    }
    for keys in by_netns.into_values() {
        let destinations = keys.iter().map(|key| (key.raddr, key.rport));
        let Ok(Ok(counts)) =
            listen_queue::in_netns_of(keys[0].pid, || sock_diag::time_wait_towards(destinations))
        else {
            continue;
        };
        for key in keys {
            if let Some(&count) = counts.get(&(key.raddr, key.rport)) {
                around.time_wait.insert(key, count);
            }
        }
    }
    around
}

/// The size of `net.ipv4.ip_local_port_range` in the network namespace of `pid`.
fn port_range_size(pid: u32) -> Option<u32> {
    let text = listen_queue::in_netns_of(pid, || {
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()
    })
    .ok()??;
    let mut bounds = text
        .split_whitespace()
        .filter_map(|v| v.parse::<u32>().ok());
    let (low, high) = (bounds.next()?, bounds.next()?);
    Some(high.saturating_sub(low) + 1)
}
