//! `silent_drop`: an idle flow that something on the path (a NAT, firewall
//! or load balancer) forgot: the first request after the idle period
//! retransmitted unanswered until the connection ended.

use std::time::Duration;

use serde_json::json;

use crate::{
    diagnosis::{
        Diagnoser, destination,
        figures::{endpoint, human_ms, ms, safe_below},
        finding::{Finding, FindingKind, Severity},
    },
    event::{Close, ClosedBy, Event},
};

impl Diagnoser {
    /// Checked as a connection that has a track closes.
    pub(in crate::diagnosis) fn silent_drop(
        &mut self,
        event: &Event,
        close: &Close,
    ) -> Option<Finding> {
        let min_idle = self.config.min_idle;
        // An idle flow's first send went unanswered until the kernel gave up (or
        // a reset came back much later): the path dropped the flow.
        let track = self.track(event);
        let dropped = matches!(close.closed_by, ClosedBy::Timeout | ClosedBy::ResetPeer)
            && close.awaiting_reply
            && track.retransmits_after_reuse > 0
            && !track.drop_counted
            && track
                .reuse
                .as_ref()
                .is_some_and(|(_, reuse)| Duration::from_millis(reuse.idle_ms) >= min_idle);
        if !dropped {
            return None;
        }
        track.drop_counted = true;
        let (reused_at, reuse) = track.reuse.clone().expect("checked above");
        let retransmits = track.retransmits_after_reuse;
        let ended_with = close.error.clone().unwrap_or_else(|| "RST".to_string());
        let failed_after = event.ts.duration_since(reused_at).unwrap_or_default();
        let stats = self.stats(event);
        stats.silent_drops += 1;
        let count = stats.silent_drops;
        self.occurred(FindingKind::SilentDrop, event, 1.0);
        let finding = Finding {
            count,
            evidence: json!({
                "idle_before_send_ms": reuse.idle_ms,
                "retransmits": retransmits,
                "ended_with": ended_with,
                "failed_after_ms": ms(failed_after).round(),
            }),
            recommendation: format!(
                "Something on the path to {} (a NAT, firewall or load balancer) forgot the \
                     flow after it sat idle {}: the first request after the idle period was \
                     retransmitted {} times unanswered and the connection ended with {}. \
                     Close pooled connections idle longer than {}, or enable TCP keep-alive \
                     (SO_KEEPALIVE) with probes more often than that; cloud defaults drop idle \
                     flows after 350 s (AWS NLB/NAT) or 4 min (Azure).",
                endpoint(event.raddr, event.rport),
                human_ms(reuse.idle_ms as f64),
                retransmits,
                ended_with,
                human_ms(safe_below(reuse.idle_ms as f64)),
            ),
            ..Finding::about_destination(
                FindingKind::SilentDrop,
                Severity::Error,
                event.ts,
                &destination(event),
                event.comm,
            )
        };
        let materiality = finding.materiality(count, vec![reuse.idle_ms as f64]);
        self.book.update(finding, materiality)
    }
}
