//! `keepalive_worker_starvation`: new clients queued while idle keep-alive
//! connections hold a worker-per-connection server's workers.

use std::time::SystemTime;

use serde_json::json;

use crate::{
    diagnosis::{
        Config,
        figures::human_ms,
        finding::{Finding, FindingKind, Materiality, Severity},
        stats::ConnectionStats,
    },
    event::ListenerKey,
    host::listeners::ListenerSample,
};

/// New connections wait in the accept queue while the server's connections are
/// idle keep-alive connections, each holding a worker.
pub(in crate::diagnosis) fn worker_starvation(
    config: &Config,
    key: &ListenerKey,
    stats: &ConnectionStats,
    now: SystemTime,
) -> Option<(Finding, Materiality)> {
    let window = config.starvation_samples;
    let recent: Vec<&ListenerSample> = stats.listener.samples.iter().rev().take(window).collect();
    if recent.len() < window || recent.iter().any(|s| s.depth == 0) {
        return None;
    }
    let pool = stats.history.samples.back()?;
    let open = pool.open;
    let idle = open.saturating_sub(pool.busy);
    if open == 0 || idle * 2 < open {
        return None;
    }
    let queued = recent[0].depth;
    let idle_timeout = stats.local_idle_timeout(config.jiffy).map(|e| e.timeout_ms);
    let finding = Finding {
        count: queued as u64,
        evidence: json!({
            "queued": queued,
            "queued_for_s": window,
            "idle_keepalive_connections": idle,
            "open_connections": open,
            "server_idle_timeout_ms": idle_timeout,
        }),
        recommendation: format!(
            "{} on port {} has {queued} connection{} waiting to be accepted for {window} s \
             while {idle} of its {open} open connections are idle keep-alive connections: \
             with a worker (thread or process) per connection, idle clients hold every \
             worker. Shorten the keep-alive timeout{} so idle connections free their workers \
             sooner, or run more workers than {open}.",
            stats.comm,
            key.lport,
            if queued == 1 { "" } else { "s" },
            match idle_timeout {
                Some(ms) => format!(" (now {})", human_ms(ms)),
                None => String::new(),
            },
        ),
        ..Finding::about_port(
            FindingKind::KeepaliveWorkerStarvation,
            Severity::Error,
            now,
            key,
            stats.comm,
        )
    };
    let materiality = finding.materiality(1, vec![idle as f64]);
    Some((finding, materiality))
}
