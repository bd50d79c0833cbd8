//! Findings: a diagnosis with its evidence and what to change, and the book that
//! decides when one is worth reporting again.

use std::{net::IpAddr, num::NonZeroUsize, time::SystemTime};

use foldhash::fast::RandomState;
use lru::LruCache;
use serde::Serialize;

use crate::{
    comm::Comm,
    event::{DestinationKey, ListenerKey, serde_name},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    /// A request went out on a connection the peer had already closed, or the
    /// peer reset/closed it right after a reuse that followed an idle period.
    StaleReuse,
    /// The peer keeps closing this process's idle pooled connections: the pool
    /// relies on the peer to end them.
    IdleTimeoutMismatch,
    /// Connections the peer closed stay open on this side.
    CloseWaitLeak,
    /// The path dropped an idle flow: the first send after idle was never answered.
    SilentDrop,
    /// Server side: requests arrived on connections this server had closed.
    LateRequestReset,
    /// Every connection of a pool busy, requests queued for a free one.
    PoolSaturation,
    /// New connections for one or two requests each, at a high rate.
    ConnectionChurn,
    /// connect() found no free local port.
    PortExhaustion,
    /// A listener's accept queue filled up or dropped connections.
    AcceptQueueOverflow,
    /// Connections wait to be accepted while idle keep-alive connections hold
    /// the server's workers.
    KeepaliveWorkerStarvation,
}

impl FindingKind {
    pub fn name(self) -> &'static str {
        serde_name(&self)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Requests will fail (a race is open) but none has been seen failing yet.
    Warning,
    /// Requests failed.
    Error,
}

impl Severity {
    /// The name the JSON stream and the metrics' `finding_severity` label use.
    pub fn name(self) -> &'static str {
        serde_name(&self)
    }
}

/// One diagnosis, as the `finding` event of the stream and the report carry it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Finding {
    #[serde(serialize_with = "crate::event::rfc3339_micros")]
    pub ts: SystemTime,
    #[serde(rename = "type")]
    pub event_type: &'static str,
    pub kind: FindingKind,
    pub severity: Severity,
    pub pid: u32,
    pub comm: Comm,
    /// The remote endpoint (client-side findings), or the latest client
    /// (server-side findings).
    pub raddr: Option<IpAddr>,
    pub rport: Option<u16>,
    /// Server-side findings: the listening port they are about.
    pub lport: Option<u16>,
    /// How many times the condition was seen (connections, closes, resets).
    pub count: u64,
    pub evidence: serde_json::Value,
    pub recommendation: String,
}

impl Finding {
    /// A finding about process `key.pid`'s connections to a destination, for
    /// the rule to complete with its count, evidence and advice.
    pub fn about_destination(
        kind: FindingKind,
        severity: Severity,
        ts: SystemTime,
        key: &DestinationKey,
        comm: Comm,
    ) -> Self {
        Self {
            raddr: Some(key.raddr),
            rport: Some(key.rport),
            ..Self::about(kind, severity, ts, key.pid, comm)
        }
    }

    /// A finding about the clients of a process's listening port, for the rule
    /// to complete.
    pub fn about_port(
        kind: FindingKind,
        severity: Severity,
        ts: SystemTime,
        key: &ListenerKey,
        comm: Comm,
    ) -> Self {
        Self {
            lport: Some(key.lport),
            ..Self::about(kind, severity, ts, key.pid, comm)
        }
    }

    /// What decides whether this finding is worth reporting again: its own
    /// severity, with `count` and `figures` from its evidence.
    pub fn materiality(&self, count: u64, figures: Vec<f64>) -> Materiality {
        Materiality {
            severity: self.severity,
            count,
            figures,
        }
    }

    fn about(kind: FindingKind, severity: Severity, ts: SystemTime, pid: u32, comm: Comm) -> Self {
        Self {
            ts,
            event_type: "finding",
            kind,
            severity,
            pid,
            comm,
            raddr: None,
            rport: None,
            lport: None,
            count: 0,
            evidence: serde_json::Value::Null,
            recommendation: String::new(),
        }
    }

    /// Where the finding is: the listening port, or the remote endpoint.
    pub fn place(&self) -> String {
        match (self.lport, self.raddr, self.rport) {
            (Some(lport), _, _) => format!("port {lport}"),
            (None, Some(addr), Some(port)) => super::figures::endpoint(addr, port),
            _ => String::new(),
        }
    }

    /// What identifies "the same finding" across updates.
    pub fn key(&self) -> FindingKey {
        FindingKey {
            kind: self.kind,
            pid: self.pid,
            remote: match self.lport {
                Some(_) => None,
                None => self.raddr.zip(self.rport),
            },
            lport: self.lport,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FindingKey {
    pub kind: FindingKind,
    pub pid: u32,
    pub remote: Option<(IpAddr, u16)>,
    pub lport: Option<u16>,
}

/// The numbers of a finding whose change makes it worth reporting again.
#[derive(Clone, Debug, PartialEq)]
pub struct Materiality {
    pub severity: Severity,
    pub count: u64,
    /// Headline measurements (a timeout, an idle time).
    pub figures: Vec<f64>,
}

impl Materiality {
    /// A material change: a new severity, the count doubled, or a figure moved by
    /// more than 10%.
    fn changed_from(&self, before: &Materiality) -> bool {
        self.severity != before.severity
            || self.count >= before.count.saturating_mul(2).max(before.count + 1)
            || self.figures.len() != before.figures.len()
            || self
                .figures
                .iter()
                .zip(&before.figures)
                .any(|(now, then)| (now - then).abs() > 0.1 * then.abs().max(1.0))
    }
}

/// Every finding currently known, and what was last reported of each.
pub struct FindingBook {
    current: LruCache<FindingKey, Entry, RandomState>,
}

struct Entry {
    /// The latest evidence, unless `stale_since` says it has moved on.
    finding: Finding,
    /// What was last reported.
    reported: Materiality,
    /// When the evidence last changed without being rebuilt (see
    /// [`FindingBook::update_with`]).
    stale_since: Option<SystemTime>,
}

impl FindingBook {
    pub fn new(capacity: NonZeroUsize) -> Self {
        Self {
            current: LruCache::with_hasher(capacity, RandomState::default()),
        }
    }

    /// Records `finding`. Returns it when it should be reported: it is new, or
    /// its evidence changed materially since it was last reported.
    pub fn update(&mut self, finding: Finding, materiality: Materiality) -> Option<Finding> {
        let key = finding.key();
        match self.current.get_mut(&key) {
            // Keep the latest evidence for the report, but measure future
            // changes against what was reported.
            Some(entry) if !materiality.changed_from(&entry.reported) => {
                entry.finding = finding;
                entry.stale_since = None;
                None
            }
            _ => self.report(key, finding, materiality),
        }
    }

    /// As [`update`](Self::update), for findings that are dear to build and
    /// change with every event: `build` runs only when the change is material.
    /// Otherwise the entry is marked stale, and [`all`](Self::all) has it
    /// rebuilt.
    pub fn update_with(
        &mut self,
        key: FindingKey,
        materiality: Materiality,
        ts: SystemTime,
        build: impl FnOnce() -> Finding,
    ) -> Option<Finding> {
        match self.current.get_mut(&key) {
            Some(entry) if !materiality.changed_from(&entry.reported) => {
                entry.stale_since = Some(ts);
                None
            }
            _ => self.report(key, build(), materiality),
        }
    }

    fn report(
        &mut self,
        key: FindingKey,
        finding: Finding,
        reported: Materiality,
    ) -> Option<Finding> {
        self.current.put(
            key,
            Entry {
                finding: finding.clone(),
                reported,
                stale_since: None,
            },
        );
        Some(finding)
    }

    /// All current findings, most severe first. `rebuild` gives the latest
    /// evidence of a stale one as of the time it is given (None keeps the
    /// evidence last built).
    pub fn all(
        &self,
        rebuild: impl Fn(&FindingKey, SystemTime) -> Option<Finding>,
    ) -> Vec<Finding> {
        let mut findings: Vec<Finding> = self
            .current
            .iter()
            .map(|(key, entry)| {
                entry
                    .stale_since
                    .and_then(|ts| rebuild(key, ts))
                    .unwrap_or_else(|| entry.finding.clone())
            })
            .collect();
        findings.sort_by(|a, b| b.severity.cmp(&a.severity).then(a.key().cmp(&b.key())));
        findings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn severity_names_are_the_streams() {
        for severity in [Severity::Warning, Severity::Error] {
            assert_eq!(serde_json::to_value(severity).unwrap(), severity.name());
        }
    }

    fn finding(count: u64) -> Finding {
        Finding {
            ts: SystemTime::UNIX_EPOCH,
            event_type: "finding",
            kind: FindingKind::IdleTimeoutMismatch,
            severity: Severity::Warning,
            pid: 1,
            comm: "client".into(),
            raddr: Some(IpAddr::from([10, 0, 0, 1])),
            rport: Some(80),
            lport: None,
            count,
            evidence: serde_json::json!({}),
            recommendation: String::new(),
        }
    }

    fn materiality(severity: Severity, count: u64, timeout: f64) -> Materiality {
        Materiality {
            severity,
            count,
            figures: vec![timeout],
        }
    }

    #[test]
    fn reported_when_new_and_when_evidence_changes_materially() {
        let mut book = FindingBook::new(NonZeroUsize::new(16).unwrap());
        let warn = Severity::Warning;
        assert!(
            book.update(finding(3), materiality(warn, 3, 1000.0))
                .is_some()
        );
        // Same evidence, one more close: not again.
        assert!(
            book.update(finding(4), materiality(warn, 4, 1004.0))
                .is_none()
        );
        assert!(
            book.update(finding(5), materiality(warn, 5, 1000.0))
                .is_none()
        );
        // Count doubled since the last report.
        assert!(
            book.update(finding(6), materiality(warn, 6, 1000.0))
                .is_some()
        );
        // The timeout moved by more than 10%.
        assert!(
            book.update(finding(7), materiality(warn, 7, 1500.0))
                .is_some()
        );
        // Severity rose.
        assert!(
            book.update(finding(7), materiality(Severity::Error, 7, 1500.0))
                .is_some()
        );
        assert_eq!(book.all(|_, _| None).len(), 1);
        assert_eq!(book.all(|_, _| None)[0].count, 7);
    }

    #[test]
    fn the_book_keeps_the_latest_evidence() {
        let mut book = FindingBook::new(NonZeroUsize::new(16).unwrap());
        book.update(finding(3), materiality(Severity::Warning, 3, 1000.0));
        book.update(finding(4), materiality(Severity::Warning, 4, 1000.0));
        assert_eq!(book.all(|_, _| None)[0].count, 4);
    }

    #[test]
    fn json_shape() {
        let json = serde_json::to_value(finding(3)).unwrap();
        assert_eq!(json["type"], "finding");
        assert_eq!(json["kind"], "idle_timeout_mismatch");
        assert_eq!(json["severity"], "warning");
        assert_eq!(json["raddr"], "10.0.0.1");
        for key in [
            "pid",
            "comm",
            "rport",
            "count",
            "evidence",
            "recommendation",
        ] {
            assert!(json.get(key).is_some(), "{key}");
        }
    }
}
