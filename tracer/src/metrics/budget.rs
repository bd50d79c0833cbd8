//! The cardinality budget: which processes, destinations and listening ports
//! get series of their own. The first ones seen keep them; the rest are counted
//! under `other`, so no traffic pattern can grow the series count without bound.

use std::collections::{HashMap, HashSet};

use crate::containers::Containers;

/// What identifies a process in metrics: never a pid, which changes on every
/// restart and would leave series behind.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ProcessLabels {
    pub comm: String,
    pub container: String,
    pub pod_uid: String,
}

pub const OTHER: &str = "other";

#[derive(Default)]
struct Allowance {
    remotes: HashSet<String>,
    ports: HashSet<u16>,
}

pub struct Budget {
    max_processes: usize,
    max_per_process: usize,
    processes: HashMap<ProcessLabels, Allowance>,
    containers: Containers,
}

impl Budget {
    pub fn new(max_processes: usize, max_per_process: usize) -> Self {
        Self {
            max_processes,
            max_per_process,
            processes: HashMap::new(),
            containers: Containers::default(),
        }
    }

    /// The labels of process `pid` named `comm`, or `other` once the budget of
    /// processes is spent.
    pub fn process(&mut self, pid: u32, comm: &str) -> ProcessLabels {
        let container = if pid == 0 {
            Default::default()
        } else {
            self.containers.of(pid)
        };
        let labels = ProcessLabels {
            comm: if comm.is_empty() {
                "unknown".into()
            } else {
                comm.to_string()
            },
            container: container.container,
            pod_uid: container.pod_uid,
        };
        if self.processes.contains_key(&labels) || self.processes.len() < self.max_processes {
            self.processes.entry(labels.clone()).or_default();
            labels
        } else {
            ProcessLabels {
                comm: OTHER.into(),
                container: String::new(),
                pod_uid: String::new(),
            }
        }
    }

    /// `remote` for `process`, or `other` once its budget of destinations is spent.
    pub fn remote(&mut self, process: &ProcessLabels, remote: String) -> String {
        let limit = self.max_per_process;
        let allowance = self.processes.entry(process.clone()).or_default();
        if allowance.remotes.contains(&remote) || allowance.remotes.len() < limit {
            allowance.remotes.insert(remote.clone());
            remote
        } else {
            OTHER.into()
        }
    }

    /// `port` for `process`, or `other` once its budget of ports is spent.
    pub fn port(&mut self, process: &ProcessLabels, port: u16) -> String {
        let limit = self.max_per_process;
        let allowance = self.processes.entry(process.clone()).or_default();
        if allowance.ports.contains(&port) || allowance.ports.len() < limit {
            allowance.ports.insert(port);
            port.to_string()
        } else {
            OTHER.into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_beyond_the_budget_are_other() {
        let mut budget = Budget::new(10, 2);
        let process = budget.process(0, "curl");
        assert_eq!(budget.remote(&process, "a:1".into()), "a:1");
        assert_eq!(budget.remote(&process, "b:1".into()), "b:1");
        assert_eq!(budget.remote(&process, "c:1".into()), OTHER);
        // Known ones keep their series.
        assert_eq!(budget.remote(&process, "a:1".into()), "a:1");
        assert_eq!(budget.port(&process, 80), "80");
        assert_eq!(budget.port(&process, 443), "443");
        assert_eq!(budget.port(&process, 8080), OTHER);
    }

    #[test]
    fn processes_beyond_the_budget_are_other() {
        let mut budget = Budget::new(2, 5);
        assert_eq!(budget.process(0, "a").comm, "a");
        assert_eq!(budget.process(0, "b").comm, "b");
        assert_eq!(budget.process(0, "c").comm, OTHER);
        assert_eq!(budget.process(0, "a").comm, "a");
        assert_eq!(budget.process(0, "").comm, OTHER);
    }
}
