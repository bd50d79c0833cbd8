//! `idle_timeout_mismatch`: a client pool that relies on the server to close
//! its idle connections, with the server's idle timeout inferred from the
//! closes.

use std::time::{Duration, SystemTime};

use serde_json::json;

use crate::{
    diagnosis::{
        Diagnoser, destination,
        figures::{endpoint, human_ms, safe_below},
        finding::{Finding, FindingKey, FindingKind, Materiality, Severity},
        stats::ConnectionStats,
    },
    event::{DestinationKey, Event},
};

impl Diagnoser {
    /// The peer keeps closing this client's idle connections after the same time.
    /// Checked on every idle close by the peer, so the finding is built only
    /// when its evidence changed materially (and for the report).
    pub(in crate::diagnosis) fn mismatch(&mut self, event: &Event) -> Option<Finding> {
        let key = destination(event);
        let stats = self.destinations.get(&key)?;
        let peer = stats.peer_idle_timeout(self.config.jiffy)?;
        let materiality = Materiality {
            severity: mismatch_severity(stats),
            count: stats.peer_close_idle.total(),
            figures: vec![peer.timeout_ms],
        };
        let finding_key = FindingKey {
            kind: FindingKind::IdleTimeoutMismatch,
            pid: key.pid,
            remote: Some((key.raddr, key.rport)),
            lport: None,
        };
        let (destinations, jiffy, ts) = (&self.destinations, self.config.jiffy, event.ts);
        self.book.update_with(finding_key, materiality, ts, || {
            let stats = destinations.peek(&key).expect("looked up above");
            mismatch_finding(stats, jiffy, &key, ts).expect("estimated above")
        })
    }
}

fn mismatch_severity(stats: &ConnectionStats) -> Severity {
    if stats.stale_reuses > 0 {
        Severity::Error
    } else {
        Severity::Warning
    }
}

/// The idle_timeout_mismatch finding of a destination as of `ts`, once its
/// peer's idle timeout is inferred.
pub(in crate::diagnosis) fn mismatch_finding(
    stats: &ConnectionStats,
    jiffy: Duration,
    key: &DestinationKey,
    ts: SystemTime,
) -> Option<Finding> {
    let peer = stats.peer_idle_timeout(jiffy)?;
    let timeout = peer.timeout_ms;
    let pool_timeout = stats
        .local_idle_timeout(jiffy)
        .map(|e| e.timeout_ms)
        .filter(|&local| local > timeout);
    let max_reuse = stats.reuse_idle.max();
    // What the client side is known to do beyond the peer's timeout.
    let client_idle = pool_timeout.or(max_reuse.filter(|&reuse| reuse > timeout));
    let target = endpoint(key.raddr, key.rport);
    let mut recommendation = format!(
        "{} relies on {target} to end its idle pooled connections: the peer closed {} of \
         them after {} idle, and every such close races the next request{}. Set the pool's \
         idle timeout below {}",
        stats.comm,
        peer.samples,
        human_ms(timeout),
        if stats.stale_reuses > 0 {
            format!(" ({} requests already hit it)", stats.stale_reuses)
        } else {
            String::new()
        },
        human_ms(safe_below(timeout)),
    );
    if let Some(knob) = pool_idle_knob(&stats.comm) {
        recommendation.push_str(&format!(" ({knob})"));
    }
    match (pool_timeout, max_reuse.filter(|&reuse| reuse > timeout)) {
        (Some(pool), _) => recommendation.push_str(&format!(
            " (it closes them only after {}), or raise the peer's keep-alive timeout \
             above {}.",
            human_ms(pool),
            human_ms(pool)
        )),
        (None, Some(reuse)) => recommendation.push_str(&format!(
            " (it reuses connections idle for up to {}), or raise the peer's keep-alive \
             timeout above {}.",
            human_ms(reuse),
            human_ms(reuse)
        )),
        (None, None) => {
            recommendation.push_str(", or raise the peer's keep-alive timeout above the pool's.")
        }
    }
    Some(Finding {
        count: stats.peer_close_idle.total(),
        evidence: json!({
            "peer_idle_timeout_ms": timeout,
            "peer_idle_closes": peer.samples,
            "peer_closes_considered": peer.considered,
            "pool_idle_timeout_ms": pool_timeout,
            "max_reuse_idle_ms": max_reuse,
            "client_idle_ms": client_idle,
            "stale_reuses": stats.stale_reuses,
        }),
        recommendation,
        ..Finding::about_destination(
            FindingKind::IdleTimeoutMismatch,
            mismatch_severity(stats),
            ts,
            key,
            stats.comm,
        )
    })
}

/// Where well-known clients set how long they keep idle pooled connections.
fn pool_idle_knob(comm: &str) -> Option<&'static str> {
    match comm {
        "nginx" => Some("nginx: `keepalive_timeout` in the `upstream` block, default 60 s"),
        "haproxy" => Some("HAProxy: `pool-purge-delay`, default 5 s"),
        _ => None,
    }
}
