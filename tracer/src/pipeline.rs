//! The agent's pipeline: kernel events through the diagnosis, plus the periodic
//! scan of connections stuck in CLOSE_WAIT. Every command runs one.

use std::{
    collections::{HashMap, hash_map::Entry},
    time::{Duration, SystemTime},
};

use tokio::time::{Interval, MissedTickBehavior};
use tracer_common::state::Owner;

use crate::{
    comm::Comm,
    diagnosis::{
        self, CloseWaitEntry, Diagnoser, Occurrence,
        finding::Finding,
        pools::{ListenerSample, PoolCounters, Surroundings},
    },
    event::Event,
    host::listen_queue::{self, ListenCounters, ListenerQueue},
    host::owners,
    kernel::loader::Options,
    kernel::session::{MAX_BATCH, Session, SessionError, Stats},
};

/// How often connections in CLOSE_WAIT, pools and listeners are sampled.
pub const SCAN_INTERVAL: Duration = Duration::from_secs(1);

/// The agent's network namespace, as the kernel numbers it (`ns.inum`, the
/// inode of /proc/self/ns/net).
fn own_netns() -> Option<u32> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self/ns/net")
        .ok()
        .map(|meta| meta.ino() as u32)
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

pub struct Pipeline {
    session: Session,
    diagnoser: Diagnoser,
    scan: Interval,
    started: SystemTime,
    /// ListenOverflows/ListenDrops per network namespace at the previous scan.
    netns_drops: HashMap<u32, ListenCounters>,
    /// Owners of socket inodes, for listeners that predate the agent.
    inode_owners: HashMap<u64, owners::ProcOwner>,
    inode_owners_read: Option<std::time::Instant>,
    /// The latest look at the churning destinations' surroundings, and when.
    surroundings: Option<(std::time::Instant, Surroundings)>,
}

/// How long TIME_WAIT counts are reused: a dump walks the kernel's whole
/// connection table (tens of ms with 100k sockets; at 10k connections/s, with
/// a 5 s age, 12–15% of the agent's CPU), and the counts feed findings about
/// minutes-long trends. A destination that starts churning is counted at once.
const SURROUNDINGS_MAX_AGE: Duration = Duration::from_secs(15);

/// What one step produced.
#[derive(Debug, Default)]
pub struct Batch {
    pub events: Vec<Event>,
    pub findings: Vec<Finding>,
    /// What the metrics count each time it happens.
    pub occurrences: Vec<Occurrence>,
    /// What the latest periodic scan read, when one ran.
    pub scan: Option<Scan>,
}

/// The kernel tables a periodic scan read.
#[derive(Debug, Default)]
pub struct Scan {
    pub pools: Vec<PoolCounters>,
    pub close_waits: Vec<CloseWaitEntry>,
    /// The ring buffer's fill peak since the previous scan.
    pub ring_buffer_peak: u64,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.findings.is_empty()
    }

    pub fn clear(&mut self) {
        self.events.clear();
        self.findings.clear();
        self.occurrences.clear();
        self.scan = None;
    }
}

impl Pipeline {
    /// Loads the programs and starts diagnosing. Must run inside a tokio runtime.
    /// `diagnosis.jiffy` and `diagnosis.min_idle` are taken from the kernel and
    /// `options`.
    pub fn start(
        options: &Options,
        mut diagnosis: diagnosis::Config,
    ) -> Result<Self, SessionError> {
        let session = Session::start(options)?;
        diagnosis.jiffy = session.jiffies().to_duration(1);
        diagnosis.min_idle = options.min_idle;
        diagnosis.scan_interval = SCAN_INTERVAL;
        let mut scan = tokio::time::interval(SCAN_INTERVAL);
        scan.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Ok(Self {
            session,
            diagnoser: Diagnoser::new(diagnosis),
            scan,
            started: SystemTime::now(),
            netns_drops: HashMap::new(),
            inode_owners: HashMap::new(),
            inode_owners_read: None,
            surroundings: None,
        })
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    pub fn diagnoser(&self) -> &Diagnoser {
        &self.diagnoser
    }

    pub fn stats(&self) -> Stats {
        self.session.stats()
    }

    /// How long the pipeline has been running.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed().unwrap_or_default()
    }

    /// Waits for kernel events or the next CLOSE_WAIT scan, and appends what they
    /// produced to `batch`.
    pub async fn next(&mut self, batch: &mut Batch) -> Result<(), SessionError> {
        let first = batch.events.len();
        let scan = tokio::select! {
            result = self.session.next_batch(&mut batch.events) => {
                result?;
                false
            }
            _ = self.scan.tick() => {
                // The scan compares the kernel's counters, which are current,
                // with counts from events, read every 25 ms: events first.
                self.session.drain(&mut batch.events, MAX_BATCH);
                true
            }
        };
        self.diagnose(first, batch);
        if scan {
            self.scan_once(batch);
        }
        Ok(())
    }

    /// Detaches the programs and appends what was still in the ring buffer.
    pub fn finish(&mut self, batch: &mut Batch) {
        self.session.detach();
        let first = batch.events.len();
        self.session.drain(&mut batch.events, usize::MAX);
        self.diagnose(first, batch);
    }

    /// The periodic look at what events do not show: connections stuck in
    /// CLOSE_WAIT, the pools' request counters, the listeners' accept queues.
    fn scan_once(&mut self, batch: &mut Batch) {
        let now = SystemTime::now();
        let waiting = self.session.close_waits();
        batch
            .findings
            .extend(self.diagnoser.close_wait_scan(now, &waiting));
        let counters = self.session.pools();
        let around = self.cached_surroundings();
        batch
            .findings
            .extend(self.diagnoser.pool_scan(now, &counters, &around));
        let listeners = self.listener_samples();
        batch
            .findings
            .extend(self.diagnoser.listener_scan(now, &listeners));
        batch.occurrences.extend(self.diagnoser.take_occurrences());
        batch.scan = Some(Scan {
            pools: counters,
            close_waits: waiting,
            ring_buffer_peak: self.session.take_ring_buffer_peak(),
        });
    }

    /// [`surroundings`](Self::surroundings), looked at again when they are
    /// older than [`SURROUNDINGS_MAX_AGE`] or a destination started churning.
    fn cached_surroundings(&mut self) -> Surroundings {
        let candidates = self.diagnoser.churn_candidates();
        let fresh = self.surroundings.as_ref().is_some_and(|(at, around)| {
            at.elapsed() < SURROUNDINGS_MAX_AGE
                && candidates
                    .iter()
                    .all(|key| around.time_wait.contains_key(key))
        });
        if !fresh {
            let around = self.surroundings(candidates);
            self.surroundings = Some((std::time::Instant::now(), around));
        }
        self.surroundings
            .as_ref()
            .map(|(_, around)| around.clone())
            .unwrap_or_default()
    }

    /// TIME_WAIT counts and port ranges for the destinations that churn. TIME_WAIT
    /// sockets belong to no process, only to a network namespace: one dump per
    /// namespace counts them for all its destinations.
    fn surroundings(&self, candidates: Vec<diagnosis::DestinationKey>) -> Surroundings {
        use std::os::unix::fs::MetadataExt as _;
        let mut around = Surroundings::default();
        let mut by_netns: HashMap<u64, Vec<diagnosis::DestinationKey>> = HashMap::new();
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
            let Ok(Ok(counts)) = listen_queue::in_netns_of(keys[0].pid, || {
                crate::host::sock_diag::time_wait_towards(destinations)
            }) else {
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

    /// Accept queues of listening sockets, read in each one's network namespace,
    /// with the namespace's drop counters: every listener of the agent's own
    /// namespace, and in other namespaces those the programs saw opened (whose
    /// owner leads into the namespace).
    fn listener_samples(&mut self) -> Vec<ListenerSample> {
        let mut by_netns: HashMap<u32, Vec<(Owner, u16)>> = HashMap::new();
        for (owner, netns, port) in self.session.listeners() {
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

    fn diagnose(&mut self, first: usize, batch: &mut Batch) {
        for event in &batch.events[first..] {
            batch.findings.extend(self.diagnoser.observe(event));
        }
        batch.occurrences.extend(self.diagnoser.take_occurrences());
    }
}
