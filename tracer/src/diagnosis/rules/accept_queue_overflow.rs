//! `accept_queue_overflow`: a listener's accept queue full, connection
//! attempts dropped.

use std::time::SystemTime;

use serde_json::json;

use crate::{
    diagnosis::{
        finding::{Finding, FindingKind, Materiality, Severity},
        stats::ConnectionStats,
    },
    event::ListenerKey,
};

/// A listener's accept queue filled up, or the namespace dropped connection
/// attempts while it was filling.
pub(in crate::diagnosis) fn overflow(
    key: &ListenerKey,
    stats: &ConnectionStats,
    now: SystemTime,
) -> Option<(Finding, Materiality)> {
    let history = &stats.listener;
    let latest = history.samples.back()?;
    let full = history
        .samples
        .iter()
        .any(|s| s.limit > 0 && s.depth >= s.limit);
    if !full && history.drops_while_full == 0 {
        return None;
    }
    let waits = stats.accept_wait.summary();
    let severity = if history.drops_while_full > 0 {
        Severity::Error
    } else {
        Severity::Warning
    };
    let finding = Finding {
        count: history.drops_while_full,
        evidence: json!({
            "backlog_limit": latest.limit,
            "peak_depth": history.peak_depth,
            "depth_now": latest.depth,
            "dropped": history.drops_while_full,
            "accept_wait_p90_ms": waits.map(|w| w.p90_ms),
            "accept_wait_max_ms": waits.map(|w| w.max_ms),
            "somaxconn": latest.somaxconn,
        }),
        recommendation: format!(
            "{}'s accept queue on port {} reached its limit of {} ({} connection attempts \
             dropped meanwhile): the process accepts connections more slowly than they \
             arrive, and clients whose SYN or handshake is dropped retry after 1 s, 3 s, 7 s. \
             Accept faster (more acceptor threads or workers), and raise the listen backlog{}.",
            stats.comm,
            key.lport,
            latest.limit,
            history.drops_while_full,
            match latest.somaxconn {
                Some(max) => format!(" (listen(2); it is capped by net.core.somaxconn = {max})"),
                None => " (listen(2), capped by net.core.somaxconn)".to_string(),
            },
        ),
        ..Finding::about_port(
            FindingKind::AcceptQueueOverflow,
            severity,
            now,
            key,
            stats.comm,
        )
    };
    let materiality =
        finding.materiality(history.drops_while_full, vec![history.peak_depth as f64]);
    Some((finding, materiality))
}
