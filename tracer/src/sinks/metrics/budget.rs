//! The cardinality budget: which processes, destinations and listening ports
//! get series of their own. The first ones seen keep them; the rest are counted
//! under `other`, so no traffic pattern can grow the series count without bound.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    num::NonZeroUsize,
    sync::{Arc, LazyLock},
};

use foldhash::fast::RandomState;
use lru::LruCache;

use crate::{comm::Comm, diagnosis::figures::endpoint, host::containers::Containers};

/// A label value decided once and shared by every series and event that
/// carries it: handing it out is a reference count, not an allocation and a
/// copy per label per event.
pub type Label = Arc<str>;

/// The empty label value (a server connection's `remote`, a client's `port`),
/// shared like any other.
pub fn no_label() -> Label {
    static EMPTY: LazyLock<Label> = LazyLock::new(|| "".into());
    EMPTY.clone()
}

/// What identifies a process in metrics: never a pid, which changes on every
/// restart and would leave series behind.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ProcessLabels {
    pub comm: Label,
    pub container: Label,
    pub pod_uid: Label,
}

pub const OTHER: &str = "other";

#[derive(Default)]
struct Allowance {
    remotes: HashSet<(IpAddr, u16), RandomState>,
    ports: HashSet<u16, RandomState>,
}

/// Decisions already made, per process and per destination. A decision never
/// changes once made (budgets only fill), and making it again costs a /proc
/// lookup, string formatting and hashing. (Opens, closes and resets ask through
/// the series cache, see `series`, which keeps their labels.)
const CACHED_DECISIONS: NonZeroUsize = NonZeroUsize::new(4096).unwrap();

pub struct Budget {
    max_processes: usize,
    max_per_process: usize,
    processes: HashMap<ProcessLabels, Allowance, RandomState>,
    containers: Containers,
    process_decisions: LruCache<(u32, Comm), ProcessLabels, RandomState>,
    remote_decisions: LruCache<(u32, Comm, IpAddr, u16), Label, RandomState>,
    port_decisions: LruCache<(u32, Comm, u16), Label, RandomState>,
}

impl Budget {
    pub fn new(max_processes: usize, max_per_process: usize) -> Self {
        Self {
            max_processes,
            max_per_process,
            processes: HashMap::default(),
            containers: Containers::default(),
            process_decisions: LruCache::with_hasher(CACHED_DECISIONS, RandomState::default()),
            remote_decisions: LruCache::with_hasher(CACHED_DECISIONS, RandomState::default()),
            port_decisions: LruCache::with_hasher(CACHED_DECISIONS, RandomState::default()),
        }
    }

    /// The labels of process `pid` named `comm`, or `other` once the budget of
    /// processes is spent.
    pub fn process(&mut self, pid: u32, comm: Comm) -> ProcessLabels {
        let key = (pid, comm);
        if let Some(labels) = self.process_decisions.get(&key) {
            return labels.clone();
        }
        let labels = self.decide_process(pid, comm);
        self.process_decisions.put(key, labels.clone());
        labels
    }

    fn decide_process(&mut self, pid: u32, comm: Comm) -> ProcessLabels {
        let container = if pid == 0 {
            Default::default()
        } else {
            self.containers.of(pid)
        };
        let labels = ProcessLabels {
            comm: if comm.is_empty() {
                "unknown".into()
            } else {
                comm.as_str().into()
            },
            container: container.container.into(),
            pod_uid: container.pod_uid.into(),
        };
        if self.processes.contains_key(&labels) || self.processes.len() < self.max_processes {
            self.processes.entry(labels.clone()).or_default();
            labels
        } else {
            ProcessLabels {
                comm: OTHER.into(),
                container: no_label(),
                pod_uid: no_label(),
            }
        }
    }

    /// The labels of process `pid` named `comm` and of its destination
    /// `addr:port`, which is `other` once the process's budget of destinations
    /// is spent.
    pub fn remote(
        &mut self,
        pid: u32,
        comm: Comm,
        addr: IpAddr,
        port: u16,
    ) -> (ProcessLabels, Label) {
        let process = self.process(pid, comm);
        let key = (pid, comm, addr, port);
        if let Some(remote) = self.remote_decisions.get(&key) {
            return (process, remote.clone());
        }
        let limit = self.max_per_process;
        let allowance = self.processes.entry(process.clone()).or_default();
        let remote: Label =
            if allowance.remotes.contains(&(addr, port)) || allowance.remotes.len() < limit {
                allowance.remotes.insert((addr, port));
                endpoint(addr, port).into()
            } else {
                OTHER.into()
            };
        self.remote_decisions.put(key, remote.clone());
        (process, remote)
    }

    /// The labels of process `pid` named `comm` and of its listening port, which
    /// is `other` once the process's budget of ports is spent.
    pub fn port(&mut self, pid: u32, comm: Comm, port: u16) -> (ProcessLabels, Label) {
        let process = self.process(pid, comm);
        let key = (pid, comm, port);
        if let Some(label) = self.port_decisions.get(&key) {
            return (process, label.clone());
        }
        let limit = self.max_per_process;
        let allowance = self.processes.entry(process.clone()).or_default();
        let label: Label = if allowance.ports.contains(&port) || allowance.ports.len() < limit {
            allowance.ports.insert(port);
            port.to_string().into()
        } else {
            OTHER.into()
        };
        self.port_decisions.put(key, label.clone());
        (process, label)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));
    const C: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 3));

    #[test]
    fn destinations_beyond_the_budget_are_other() {
        let mut budget = Budget::new(10, 2);
        assert_eq!(budget.remote(0, "curl".into(), A, 1).1, "10.0.0.1:1".into());
        assert_eq!(budget.remote(0, "curl".into(), B, 1).1, "10.0.0.2:1".into());
        assert_eq!(budget.remote(0, "curl".into(), C, 1).1, OTHER.into());
        // Known ones keep their series, also when asked by another pid of the
        // same process labels.
        assert_eq!(budget.remote(0, "curl".into(), A, 1).1, "10.0.0.1:1".into());
        assert_eq!(budget.remote(0, "curl".into(), A, 1).0.comm, "curl".into());
        assert_eq!(budget.port(0, "curl".into(), 80).1, "80".into());
        assert_eq!(budget.port(0, "curl".into(), 443).1, "443".into());
        assert_eq!(budget.port(0, "curl".into(), 8080).1, OTHER.into());
    }

    #[test]
    fn decisions_outlive_their_cache() {
        let mut budget = Budget::new(10, 1);
        assert_eq!(budget.remote(0, "curl".into(), A, 1).1, "10.0.0.1:1".into());
        // Push the decision out of the cache: it is made again, the same way.
        for port in 0..=CACHED_DECISIONS.get() as u16 {
            budget.remote(0, "curl".into(), B, port);
        }
        assert_eq!(budget.remote(0, "curl".into(), A, 1).1, "10.0.0.1:1".into());
        assert_eq!(budget.remote(0, "curl".into(), B, 1).1, OTHER.into());
    }

    #[test]
    fn processes_beyond_the_budget_are_other() {
        let mut budget = Budget::new(2, 5);
        assert_eq!(budget.process(0, "a".into()).comm, "a".into());
        assert_eq!(budget.process(0, "b".into()).comm, "b".into());
        assert_eq!(budget.process(0, "c".into()).comm, OTHER.into());
        assert_eq!(budget.process(0, "a".into()).comm, "a".into());
        assert_eq!(budget.process(0, "".into()).comm, OTHER.into());
    }
}
