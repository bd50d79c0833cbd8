//! `close_wait_leak`: connections the peer closed and the process never did,
//! from the scan of the kernel's CLOSE_WAIT table.

use std::time::SystemTime;

use serde_json::json;

use crate::{
    diagnosis::{
        Diagnoser, Occurrence,
        figures::{endpoint, human_ms, ms},
        finding::{Finding, FindingKind, Severity},
    },
    event::DestinationKey,
    kernel::tables::CloseWaitEntry,
};

impl Diagnoser {
    /// Takes in one scan of the connections now in CLOSE_WAIT; returns the leak
    /// findings that are new or changed materially.
    pub fn close_wait_scan(&mut self, now: SystemTime, entries: &[CloseWaitEntry]) -> Vec<Finding> {
        let threshold = self.config.close_wait_threshold;
        let stuck: Vec<&CloseWaitEntry> =
            entries.iter().filter(|e| e.waiting >= threshold).collect();
        // Each stuck connection counts once as a leak, while it lasts.
        self.leaked
            .retain(|sock| entries.iter().any(|e| e.sock == *sock));
        for entry in &stuck {
            if self.leaked.insert(entry.sock) {
                self.occurrences.push(Occurrence {
                    kind: FindingKind::CloseWaitLeak,
                    pid: entry.pid,
                    comm: entry.comm,
                    remote: Some((entry.raddr, entry.rport)),
                    lport: None,
                    amount: 1.0,
                });
            }
        }
        let mut per_destination: std::collections::BTreeMap<DestinationKey, Vec<&CloseWaitEntry>> =
            Default::default();
        let mut per_process: std::collections::HashMap<u32, u64> = Default::default();
        for entry in &stuck {
            let key = DestinationKey {
                pid: entry.pid,
                raddr: entry.raddr,
                rport: entry.rport,
            };
            per_destination.entry(key).or_default().push(entry);
            *per_process.entry(entry.pid).or_default() += 1;
        }
        let mut findings = Vec::new();
        for (key, entries) in per_destination {
            let oldest = entries.iter().map(|e| e.waiting).max().unwrap_or_default();
            let count = entries.len() as u64;
            let in_process = per_process[&key.pid];
            let comm = entries[0].comm;
            let severity = if count >= 10 {
                Severity::Error
            } else {
                Severity::Warning
            };
            let finding = Finding {
                count,
                evidence: json!({
                    "connections_to_destination": count,
                    "connections_in_process": in_process,
                    "oldest_close_wait_s": oldest.as_secs_f64().round(),
                    "threshold_s": threshold.as_secs_f64(),
                    "local_ports": entries.iter().map(|e| e.lport).collect::<Vec<_>>(),
                }),
                recommendation: format!(
                    "{comm} (pid {}) holds {count} connection{} to {} that the peer closed \
                     {} ago and never closed its side ({in_process} in the process): each \
                     one keeps a socket and a pool slot. The application must close a \
                     connection when a read returns end-of-file (0 bytes); check the pool's \
                     eviction of dead connections and the error paths that skip close().",
                    key.pid,
                    if count == 1 { "" } else { "s" },
                    endpoint(key.raddr, key.rport),
                    human_ms(ms(oldest)),
                ),
                ..Finding::about_destination(FindingKind::CloseWaitLeak, severity, now, &key, comm)
            };
            let materiality = finding.materiality(count, Vec::new());
            findings.extend(self.book.update(finding, materiality));
        }
        findings
    }
}
