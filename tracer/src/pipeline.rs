//! The agent's pipeline: kernel events through the diagnosis, plus the periodic
//! scan of connections stuck in CLOSE_WAIT. Every command runs one.

use std::time::{Duration, SystemTime};

use tokio::time::{Interval, MissedTickBehavior};

use crate::{
    diagnosis::{self, Diagnoser, finding::Finding},
    event::Event,
    loader::Options,
    session::{Session, SessionError, Stats},
};

/// How often connections in CLOSE_WAIT are checked against the leak threshold.
pub const SCAN_INTERVAL: Duration = Duration::from_secs(1);

pub struct Pipeline {
    session: Session,
    diagnoser: Diagnoser,
    scan: Interval,
    started: SystemTime,
}

/// What one step produced.
#[derive(Debug, Default)]
pub struct Batch {
    pub events: Vec<Event>,
    pub findings: Vec<Finding>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.findings.is_empty()
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
        let mut scan = tokio::time::interval(SCAN_INTERVAL);
        scan.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Ok(Self {
            session,
            diagnoser: Diagnoser::new(diagnosis),
            scan,
            started: SystemTime::now(),
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
        tokio::select! {
            result = self.session.next_batch(&mut batch.events) => result?,
            _ = self.scan.tick() => {
                let waiting = self.session.close_waits();
                batch
                    .findings
                    .extend(self.diagnoser.close_wait_scan(SystemTime::now(), &waiting));
            }
        }
        self.diagnose(first, batch);
        Ok(())
    }

    /// Detaches the programs and appends what was still in the ring buffer.
    pub fn finish(&mut self, batch: &mut Batch) {
        self.session.detach();
        let first = batch.events.len();
        self.session.drain(&mut batch.events);
        self.diagnose(first, batch);
    }

    fn diagnose(&mut self, first: usize, batch: &mut Batch) {
        for event in &batch.events[first..] {
            batch.findings.extend(self.diagnoser.observe(event));
        }
    }
}
