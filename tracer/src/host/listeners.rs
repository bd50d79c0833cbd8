//! The listening sockets' accept queues, sampled each scan in every network
//! namespace the agent can reach, with the namespace's drop counters and the
//! owner of each listener.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    time::{Duration, Instant},
};

use tracer_common::state::Owner;

use super::{
    listen_queue::{self, ListenCounters, ListenerQueue},
    owners,
};
use crate::comm::Comm;

/// One listening socket's accept queue at a scan.
#[derive(Clone, Debug, PartialEq)]
pub struct ListenerSample {
    pub pid: u32,
    pub comm: Comm,
    pub lport: u16,
    pub depth: u32,
    pub limit: u32,
    /// The network namespace's ListenOverflows + ListenDrops since the previous
    /// scan (shared by every listener of the namespace).
    pub netns_drops: u64,
    /// `net.core.somaxconn` of the namespace, which caps the backlog.
    pub somaxconn: Option<u32>,
}

/// What a scan needs from the previous ones.
#[derive(Default)]
pub struct Listeners {
    /// ListenOverflows/ListenDrops per network namespace at the previous scan.
    netns_drops: HashMap<u32, ListenCounters>,
    /// Owners of socket inodes, for listeners that predate the agent.
    inode_owners: HashMap<u64, owners::ProcOwner>,
    inode_owners_read: Option<Instant>,
}

impl Listeners {
    /// Accept queues of listening sockets, read in each one's network namespace,
    /// with the namespace's drop counters: every listener of the agent's own
    /// namespace, and in other namespaces those the programs saw opened
    /// (`seen`: owner, network namespace inode, port), whose owner leads into
    /// the namespace.
    pub fn samples(&mut self, seen: Vec<(Owner, u32, u16)>) -> Vec<ListenerSample> {
        let mut by_netns: HashMap<u32, Vec<(Owner, u16)>> = HashMap::new();
        for (owner, netns, port) in seen {
            by_netns.entry(netns).or_default().push((owner, port));
        }
        let own_netns = own_netns();
        if let Some(own) = own_netns {
            by_netns.entry(own).or_default();
        }
        let mut samples = Vec::new();
        for (netns, known) in by_netns {
            let pid = if Some(netns) == own_netns {
                std::process::id()
            } else {
                // Owners that have exited lead nowhere.
                match known.iter().find(|(owner, _)| {
                    std::path::Path::new(&format!("/proc/{}/ns/net", owner.pid)).exists()
                }) {
                    Some((owner, _)) => owner.pid,
                    None => continue,
                }
            };
            let Ok(Ok(queues)) = listen_queue::in_netns_of(pid, listen_queue::listening_sockets)
            else {
                continue;
            };
            let counters = listen_queue::listen_counters(pid).ok();
            let drops = match (counters, self.netns_drops.get(&netns)) {
                (Some(now), Some(before)) => {
                    (now.overflows + now.drops).saturating_sub(before.overflows + before.drops)
                }
                _ => 0,
            };
            if let Some(counters) = counters {
                self.netns_drops.insert(netns, counters);
            }
            let somaxconn = listen_queue::in_netns_of(pid, || {
                std::fs::read_to_string("/proc/sys/net/core/somaxconn")
                    .ok()
                    .and_then(|text| text.trim().parse().ok())
            })
            .ok()
            .flatten();
            // A port may be served by several sockets (SO_REUSEPORT, IPv4 and
            // IPv6): the fullest speaks for it.
            let mut fullest: HashMap<u16, &ListenerQueue> = HashMap::new();
            for queue in &queues {
                let slot = fullest.entry(queue.port).or_insert(queue);
                if queue.depth > slot.depth {
                    *slot = queue;
                }
            }
            for (port, queue) in fullest {
                let owner = match known.iter().find(|(_, p)| *p == port) {
                    Some((owner, _)) => Some((owner.pid, Comm::from_kernel(&owner.comm))),
                    None if Some(netns) == own_netns => self
                        .listener_owner(queue.inode)
                        .map(|owner| (owner.pid, owner.comm)),
                    None => None,
                };
                let Some((pid, comm)) = owner else {
                    continue;
                };
                samples.push(ListenerSample {
                    pid,
                    comm,
                    lport: port,
                    depth: queue.depth,
                    limit: queue.limit,
                    netns_drops: drops,
                    somaxconn,
                });
            }
        }
        samples
    }

    /// The process holding a listening socket that predates the agent, from
    /// /proc; re-read at most every 10 s when a socket is not known yet.
    fn listener_owner(&mut self, inode: u64) -> Option<owners::ProcOwner> {
        if let Some(owner) = self.inode_owners.get(&inode) {
            return Some(owner.clone());
        }
        if self
            .inode_owners_read
            .is_some_and(|at| at.elapsed() < Duration::from_secs(10))
        {
            return None;
        }
        self.inode_owners = owners::socket_inode_owners();
        self.inode_owners_read = Some(std::time::Instant::now());
        self.inode_owners.get(&inode).cloned()
    }
}

/// The agent's network namespace, as the kernel numbers it (`ns.inum`, the
/// inode of /proc/self/ns/net).
fn own_netns() -> Option<u32> {
    std::fs::metadata("/proc/self/ns/net")
        .ok()
        .map(|meta| meta.ino() as u32)
}
