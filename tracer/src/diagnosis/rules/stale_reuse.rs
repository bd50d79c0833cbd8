//! `stale_reuse`: a request sent on a connection the peer had already closed,
//! or closed as it arrived.

use std::time::Duration;

use serde_json::json;

use crate::{
    diagnosis::{
        Diagnoser, destination,
        figures::{capitalize, endpoint, human_ms, safe_below},
        finding::{Finding, FindingKind, Severity},
    },
    event::{Event, Role},
};

/// How close a peer's reset or FIN must follow (or, on loopback, precede: the
/// answer can be processed inside the send call) a reuse to be its answer.
const STALE_WINDOW: Duration = Duration::from_secs(1);
/// A peer end recorded this long before the reuse event still counts: the reuse
/// event is written after the send returns, the peer's answer during the send.
const ANSWER_BEFORE_REUSE: Duration = Duration::from_millis(100);

impl Diagnoser {
    /// A reuse that the peer answered with a reset or FIN within the window, or
    /// that went to a connection the peer had already closed.
    pub(in crate::diagnosis) fn check_stale(&mut self, event: &Event, findings: &mut Vec<Finding>) {
        // A server's sends are replies: it reuses nothing.
        if event.role == Role::Server {
            return;
        }
        let min_idle = self.config.min_idle;
        let track = self.track(event);
        let Some((reused_at, reuse)) = track.reuse.clone() else {
            return;
        };
        if track.stale_counted {
            return;
        }
        let answer = track.peer_end.filter(|(at, _)| {
            let after = at.duration_since(reused_at).unwrap_or_default() <= STALE_WINDOW;
            let before = reused_at.duration_since(*at).unwrap_or_default() <= ANSWER_BEFORE_REUSE;
            after && before
        });
        let after_idle = Duration::from_millis(reuse.idle_ms) >= min_idle;
        if !(reuse.peer_closed || (after_idle && answer.is_some())) {
            return;
        }
        track.stale_counted = true;
        let came_back = match answer {
            Some((_, end)) => end.name(),
            None => "FIN",
        };
        let jiffy = self.config.jiffy;
        let stats = self.stats(event);
        stats.stale_reuses += 1;
        let count = stats.stale_reuses;
        let peer_timeout = stats.peer_idle_timeout(jiffy);
        let max_idle = stats.reuse_idle.max().unwrap_or(reuse.idle_ms as f64);
        self.occurred(FindingKind::StaleReuse, event, 1.0);
        let advice = match peer_timeout {
            Some(estimate) => format!(
                "the peer closes connections idle for {}: close pooled connections idle \
                 longer than {}",
                human_ms(estimate.timeout_ms),
                human_ms(safe_below(estimate.timeout_ms))
            ),
            None => format!(
                "close pooled connections before they sit idle {}",
                human_ms(reuse.idle_ms as f64)
            ),
        };
        let finding = Finding {
            count,
            evidence: json!({
                "idle_before_reuse_ms": reuse.idle_ms,
                "max_idle_before_reuse_ms": max_idle,
                "peer_closed_before_send": reuse.peer_closed,
                "came_back": came_back,
                "peer_idle_timeout_ms": peer_timeout.map(|e| e.timeout_ms),
            }),
            recommendation: format!(
                "{} sent requests on connections to {} that the peer had already closed or \
                 closed as they arrived (after {} idle; the peer answered with {}): those \
                 requests fail (ECONNRESET, EPIPE, \"socket hang up\", 502). {}, or retry \
                 idempotent requests once on a new connection.",
                event.comm,
                endpoint(event.raddr, event.rport),
                human_ms(reuse.idle_ms as f64),
                came_back,
                capitalize(&advice),
            ),
            ..Finding::about_destination(
                FindingKind::StaleReuse,
                Severity::Error,
                event.ts,
                &destination(event),
                event.comm,
            )
        };
        let materiality = finding.materiality(
            count,
            peer_timeout.map(|e| e.timeout_ms).into_iter().collect(),
        );
        findings.extend(self.book.update(finding, materiality));
        // A failure upgrades the mismatch on the same pair.
        if event.role == Role::Client {
            findings.extend(self.mismatch(event));
        }
    }
}
