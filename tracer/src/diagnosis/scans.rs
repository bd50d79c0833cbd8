//! The per-second scans: the kernel's pool counters and the listeners' accept
//! queues go into each destination's and listening port's history
//! ([`super::pools`]), then the rules that read those histories run:
//! `pool_saturation`, `connection_churn`, `accept_queue_overflow` and
//! `keepalive_worker_starvation`.

use std::{collections::HashMap, time::SystemTime};

use super::{
    Diagnoser, Occurrence,
    finding::{Finding, FindingKind},
    rules::{
        accept_queue_overflow::overflow, connection_churn::churn,
        keepalive_worker_starvation::worker_starvation, pool_saturation::saturation,
    },
    stats::ConnectionStats,
};
use crate::{
    event::{DestinationKey, ListenerKey},
    host::{listeners::ListenerSample, surroundings::Surroundings},
    kernel::tables::{PoolCounters, PoolRef},
};

impl Diagnoser {
    /// Destinations that opened connections fast in the last window: the ones
    /// whose TIME_WAIT count and port range are worth looking up.
    pub fn churn_candidates(&self) -> Vec<DestinationKey> {
        let window = self.config.window_samples();
        self.destinations()
            .filter(|(_, stats)| {
                let recent = stats.history.samples.iter().rev().take(window);
                let opened: u64 = recent.map(|s| s.opened).sum();
                opened as f64 / window as f64 >= self.config.churn_rate
            })
            .map(|(key, _)| key.clone())
            .collect()
    }

    /// Takes in one scan of the kernel's pool counters (and what the pipeline
    /// found around the churning destinations); returns the findings that are
    /// new or changed materially.
    pub fn pool_scan(
        &mut self,
        now: SystemTime,
        counters: &[PoolCounters],
        around: &Surroundings,
    ) -> Vec<Finding> {
        let by_pool: HashMap<&PoolRef, &PoolCounters> =
            counters.iter().map(|c| (&c.pool, c)).collect();
        let mut findings = Vec::new();
        let destinations: Vec<DestinationKey> =
            self.destinations.iter().map(|(k, _)| k.clone()).collect();
        for key in destinations {
            let pool = PoolRef::Destination(key.clone());
            let Some(stats) = self.destinations.peek_mut(&key) else {
                continue;
            };
            stats.record_sample(now, by_pool.get(&pool).copied());
            let saturation = saturation(&self.config, &key, stats, now);
            let churn = churn(&self.config, &key, stats, now, around);
            if saturation.is_some() {
                let comm = stats.comm;
                self.occurrences.push(Occurrence {
                    kind: FindingKind::PoolSaturation,
                    pid: key.pid,
                    comm,
                    remote: Some((key.raddr, key.rport)),
                    lport: None,
                    amount: self.config.scan_interval.as_secs_f64(),
                });
            }
            findings.extend(
                saturation
                    .into_iter()
                    .chain(churn)
                    .filter_map(|(finding, materiality)| self.book.update(finding, materiality)),
            );
        }
        let listeners: Vec<ListenerKey> = self.listeners.iter().map(|(k, _)| k.clone()).collect();
        for key in listeners {
            let pool = PoolRef::Listener(key.clone());
            if let Some(stats) = self.listeners.peek_mut(&key) {
                stats.record_sample(now, by_pool.get(&pool).copied());
            }
        }
        findings
    }

    /// Takes in one scan of the listening sockets; returns the findings that are
    /// new or changed materially.
    pub fn listener_scan(&mut self, now: SystemTime, samples: &[ListenerSample]) -> Vec<Finding> {
        let mut findings = Vec::new();
        for sample in samples {
            let key = ListenerKey {
                pid: sample.pid,
                lport: sample.lport,
            };
            let stats = self
                .listeners
                .get_or_insert_mut(key.clone(), ConnectionStats::default);
            if stats.comm.is_empty() {
                stats.comm.clone_from(&sample.comm);
            }
            let history = &mut stats.listener;
            let full = sample.depth >= sample.limit && sample.limit > 0;
            history.peak_depth = history.peak_depth.max(sample.depth);
            if (full || sample.depth > 0) && sample.netns_drops > 0 {
                history.drops_while_full += sample.netns_drops;
                self.occurrences.push(Occurrence {
                    kind: FindingKind::AcceptQueueOverflow,
                    pid: sample.pid,
                    comm: sample.comm,
                    remote: None,
                    lport: Some(sample.lport),
                    amount: sample.netns_drops as f64,
                });
            }
            history.push(sample.clone());
            let candidates = [
                overflow(&key, stats, now),
                worker_starvation(&self.config, &key, stats, now),
            ];
            for (finding, materiality) in candidates.into_iter().flatten() {
                findings.extend(self.book.update(finding, materiality));
            }
        }
        findings
    }
}
