//! `port_exhaustion`: connect() out of local ports (EADDRNOTAVAIL).

use std::time::SystemTime;

use serde_json::json;

use crate::{
    comm::Comm,
    diagnosis::{
        Diagnoser,
        figures::endpoint,
        finding::{Finding, FindingKind, Severity},
        stats::ConnectionStats,
    },
    event::DestinationKey,
};

impl Diagnoser {
    /// A connect() failed for want of a local port: report it at once.
    pub(in crate::diagnosis) fn address_not_available(
        &mut self,
        key: DestinationKey,
        comm: Comm,
        now: SystemTime,
    ) -> Option<Finding> {
        let stats = self
            .destinations
            .get_or_insert_mut(key.clone(), ConnectionStats::default);
        let count = stats
            .connect_errors
            .get("EADDRNOTAVAIL")
            .copied()
            .unwrap_or(0);
        let finding = Finding {
            count,
            evidence: json!({
                "eaddrnotavail": count,
                "new_connections_per_s": stats.history.recent_rate(5),
            }),
            recommendation: format!(
                "{comm} could not connect to {} {count} time{}: no local port was free \
                 (EADDRNOTAVAIL). Every connection it closes first holds its port in \
                 TIME_WAIT for 60 s. Reuse connections (keep-alive, a pool) instead of \
                 opening one per request; widening net.ipv4.ip_local_port_range only \
                 postpones it.",
                endpoint(key.raddr, key.rport),
                if count == 1 { "" } else { "s" },
            ),
            ..Finding::about_destination(
                FindingKind::PortExhaustion,
                Severity::Error,
                now,
                &key,
                comm,
            )
        };
        let materiality = finding.materiality(count, Vec::new());
        self.book.update(finding, materiality)
    }
}
