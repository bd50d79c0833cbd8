//! The agent's pipeline: kernel events, with their owners found in /proc where
//! the kernel did not know them, through the diagnosis; and once a second the
//! scan of what events do not show (connections stuck in CLOSE_WAIT, the
//! pools' request counters, the listeners' accept queues). Every command runs
//! one and hands its batches to its sinks.

use std::time::{Duration, Instant, SystemTime};

use tokio::time::{Interval, MissedTickBehavior};

use crate::{
    comm::Comm,
    diagnosis::{self, Diagnoser, Occurrence, finding::Finding, gauges::Gauges},
    event::Event,
    host::{
        listeners::Listeners,
        owners::{ConnKey, SocketOwners},
        surroundings::{self, Surroundings},
    },
    kernel::loader::Options,
    kernel::session::{MAX_BATCH, Session, SessionError, Stats},
    kernel::tables::{CloseWaitEntry, PoolCounters},
};

/// How often connections in CLOSE_WAIT, pools and listeners are sampled.
pub const SCAN_INTERVAL: Duration = Duration::from_secs(1);

pub struct Pipeline {
    session: Session,
    diagnoser: Diagnoser,
    scan: Interval,
    started: SystemTime,
    /// Owners from /proc, for connections the kernel met in softirq only.
    owners: SocketOwners,
    listeners: Listeners,
    /// The latest look at the churning destinations' surroundings, and when.
    surroundings: Option<(Instant, Surroundings)>,
}

/// How long TIME_WAIT counts are reused: a dump walks the kernel's whole
/// connection table, which costs under churn, and the counts feed findings
/// about minutes-long trends. A destination that starts churning is counted
/// at once.
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

/// What a periodic scan read: the kernel's tables, what the diagnosis holds
/// now, and the session's own figures.
#[derive(Debug, Default)]
pub struct Scan {
    pub pools: Vec<PoolCounters>,
    pub close_waits: Vec<CloseWaitEntry>,
    pub gauges: Gauges,
    pub stats: Stats,
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
        let mut owners = SocketOwners::default();
        owners.refresh();
        Ok(Self {
            session,
            diagnoser: Diagnoser::new(diagnosis),
            scan,
            started: SystemTime::now(),
            owners,
            listeners: Listeners::default(),
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
        let mut waiting = self.session.close_waits();
        for entry in waiting.iter_mut().filter(|entry| entry.pid == 0) {
            let key = (entry.laddr, entry.lport, entry.raddr, entry.rport);
            adopt(&mut self.owners, &key, &mut entry.pid, &mut entry.comm);
        }
        batch
            .findings
            .extend(self.diagnoser.close_wait_scan(now, &waiting));
        let counters = self.session.pools();
        let around = self.cached_surroundings();
        batch
            .findings
            .extend(self.diagnoser.pool_scan(now, &counters, &around));
        let listeners = self.listeners.samples(self.session.listeners());
        batch
            .findings
            .extend(self.diagnoser.listener_scan(now, &listeners));
        batch.occurrences.extend(self.diagnoser.take_occurrences());
        batch.scan = Some(Scan {
            pools: counters,
            close_waits: waiting,
            gauges: self.diagnoser.gauges(),
            stats: self.session.stats(),
            ring_buffer_peak: self.session.take_ring_buffer_peak(),
        });
    }

    /// The churning destinations' [`Surroundings`], looked at again when they
    /// are older than [`SURROUNDINGS_MAX_AGE`] or a destination started
    /// churning.
    fn cached_surroundings(&mut self) -> Surroundings {
        let candidates = self.diagnoser.churn_candidates();
        let fresh = self.surroundings.as_ref().is_some_and(|(at, around)| {
            at.elapsed() < SURROUNDINGS_MAX_AGE
                && candidates
                    .iter()
                    .all(|key| around.time_wait.contains_key(key))
        });
        if !fresh {
            let around = surroundings::look(candidates);
            self.surroundings = Some((Instant::now(), around));
        }
        self.surroundings
            .as_ref()
            .map(|(_, around)| around.clone())
            .unwrap_or_default()
    }

    fn diagnose(&mut self, first: usize, batch: &mut Batch) {
        // The kernel met these connections in softirq with no owner on
        // record: ones that predate the agent, or accepted ones whose listener
        // does. Their process is found in /proc.
        for event in batch.events[first..].iter_mut().filter(|e| e.pid == 0) {
            let key = (event.laddr, event.lport, event.raddr, event.rport);
            adopt(&mut self.owners, &key, &mut event.pid, &mut event.comm);
        }
        for event in &batch.events[first..] {
            batch.findings.extend(self.diagnoser.observe(event));
        }
        batch.occurrences.extend(self.diagnoser.take_occurrences());
    }
}

/// Names the process /proc says holds connection `key`, if it knows one.
fn adopt(owners: &mut SocketOwners, key: &ConnKey, pid: &mut u32, comm: &mut Comm) {
    if let Some(owner) = owners.lookup(key) {
        *pid = owner.pid;
        *comm = owner.comm;
    }
}
