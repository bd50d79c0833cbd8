//! Pools and listeners over time: per second, how many connections a process
//! holds to a destination and how busy they are, how fast it opens new ones,
//! and how full its listening sockets' accept queues are. The rules that
//! read these histories run from `scans`.

use std::{collections::VecDeque, time::SystemTime};

use serde::Serialize;

use crate::{
    event::ListenerKey,
    host::listeners::ListenerSample,
    kernel::tables::{PoolCounters, PoolRef},
};

/// Samples kept per pool: enough for the longest window a rule looks at.
const HISTORY: usize = 30;

/// One second of a pool.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PoolSample {
    #[serde(skip)]
    pub at: Option<SystemTime>,
    /// Connections open at the sample.
    pub open: u64,
    /// Connections busy at the sample.
    pub busy: u64,
    /// Busy time over open-connection time, in the interval.
    pub busy_fraction: f64,
    pub requests: u64,
    pub responses: u64,
    pub mean_response_ms: Option<f64>,
    /// Median gap between a response and the next request on a connection.
    pub median_gap_us: Option<f64>,
    pub opened: u64,
    pub closed: u64,
}

/// Per-pool state the samples are computed from.
#[derive(Clone, Debug, Default)]
pub struct PoolHistory {
    last: Option<(SystemTime, PoolCounters)>,
    last_opened: u64,
    last_closed: u64,
    pub samples: VecDeque<PoolSample>,
    /// Seconds the pool was saturated in all.
    pub saturated_s: f64,
}

/// One second of a listener.
#[derive(Clone, Debug, Default)]
pub struct ListenerHistory {
    pub samples: VecDeque<ListenerSample>,
    pub peak_depth: u32,
    pub drops_while_full: u64,
}

impl ListenerHistory {
    pub(super) fn push(&mut self, sample: ListenerSample) {
        self.samples.push_back(sample);
        if self.samples.len() > HISTORY {
            self.samples.pop_front();
        }
    }
}

impl PoolHistory {
    /// The sample for the interval since the previous scan. The first scan only
    /// sets the baseline.
    pub(super) fn sample(
        &mut self,
        now: SystemTime,
        counters: Option<&PoolCounters>,
        open: u64,
        opened: u64,
        closed: u64,
    ) -> Option<PoolSample> {
        let counters = counters.cloned().unwrap_or_else(|| PoolCounters {
            pool: PoolRef::Listener(ListenerKey { pid: 0, lport: 0 }),
            busy: 0,
            requests: 0,
            responses: 0,
            busy_ns: 0,
            gaps: Vec::new(),
        });
        let previous = self.last.replace((now, counters.clone()));
        let (opened_delta, closed_delta) = (
            opened.saturating_sub(self.last_opened),
            closed.saturating_sub(self.last_closed),
        );
        self.last_opened = opened;
        self.last_closed = closed;
        let (then, before) = previous?;
        let interval = now.duration_since(then).unwrap_or_default().as_secs_f64();
        if interval <= 0.0 {
            return None;
        }
        let responses = counters.responses.saturating_sub(before.responses);
        let busy_ns = counters.busy_ns.saturating_sub(before.busy_ns);
        let gaps: Vec<u64> = counters
            .gaps
            .iter()
            .enumerate()
            .map(|(i, n)| n.saturating_sub(before.gaps.get(i).copied().unwrap_or(0)))
            .collect();
        let open_time = open.max(1) as f64 * interval * 1e9;
        Some(PoolSample {
            at: Some(now),
            open,
            busy: counters.busy.min(open.max(counters.busy)),
            busy_fraction: (busy_ns as f64 / open_time).min(1.0),
            requests: counters.requests.saturating_sub(before.requests),
            responses,
            mean_response_ms: (responses > 0).then(|| busy_ns as f64 / responses as f64 / 1e6),
            median_gap_us: median_bucket(&gaps),
            opened: opened_delta,
            closed: closed_delta,
        })
    }

    pub(super) fn push(&mut self, sample: PoolSample) {
        self.samples.push_back(sample);
        if self.samples.len() > HISTORY {
            self.samples.pop_front();
        }
    }

    /// New connections per second over the last `seconds` samples.
    pub fn recent_rate(&self, seconds: usize) -> f64 {
        let recent: Vec<&PoolSample> = self.samples.iter().rev().take(seconds).collect();
        if recent.is_empty() {
            return 0.0;
        }
        recent.iter().map(|s| s.opened).sum::<u64>() as f64 / recent.len() as f64
    }
}

/// The middle of the log2 bucket holding the median gap.
fn median_bucket(gaps: &[u64]) -> Option<f64> {
    let total: u64 = gaps.iter().sum();
    if total == 0 {
        return None;
    }
    let mut seen = 0;
    for (i, n) in gaps.iter().enumerate() {
        seen += n;
        if seen * 2 >= total {
            // Bucket i holds [2^i, 2^(i+1)) µs; bucket 0 also holds < 1 µs.
            return Some(if i == 0 {
                1.0
            } else {
                1.5 * (1u64 << i) as f64
            });
        }
    }
    None
}
