//! `connection_churn`: a new connection per request or two (keep-alive not
//! in effect), with the TIME_WAIT count and the local port range.

use std::time::SystemTime;

use serde_json::json;

use crate::{
    diagnosis::{
        Config,
        figures::{endpoint, round2},
        finding::{Finding, FindingKind, Materiality, Severity},
        pools::PoolSample,
        stats::ConnectionStats,
    },
    event::DestinationKey,
    host::surroundings::Surroundings,
};

/// Many new connections to one destination, each for one or two requests.
pub(in crate::diagnosis) fn churn(
    config: &Config,
    key: &DestinationKey,
    stats: &ConnectionStats,
    now: SystemTime,
    around: &Surroundings,
) -> Option<(Finding, Materiality)> {
    let window = config.window_samples();
    let recent: Vec<&PoolSample> = stats.history.samples.iter().rev().take(window).collect();
    if recent.len() < window {
        return None;
    }
    let opened: u64 = recent.iter().map(|s| s.opened).sum();
    let rate = opened as f64 / window as f64;
    if rate < config.churn_rate {
        return None;
    }
    let requests: u64 = recent.iter().map(|s| s.requests).sum();
    // Without request accounting (older kernels), a short life is the sign.
    let per_connection = (requests > 0).then(|| requests as f64 / opened as f64);
    let lifetime = stats.lifetimes.summary().map(|s| s.p50_ms);
    let few_requests = match per_connection {
        Some(per) => per <= 2.0,
        None => lifetime.is_some_and(|ms| ms < 1000.0),
    };
    if !few_requests {
        return None;
    }
    let time_wait = around.time_wait.get(key).copied();
    let port_range = around.port_range.get(&key.pid).copied();
    let closed_first_here = stats.closes.local + stats.closes.reset_local;
    let finding = Finding {
        count: opened,
        evidence: json!({
            "new_connections_per_s": round2(rate),
            "requests_per_connection": per_connection.map(round2),
            "median_lifetime_ms": lifetime,
            "time_wait": time_wait,
            "local_port_range": port_range,
            "closed_by_this_side": closed_first_here,
            "closed_by_peer": stats.closes.peer + stats.closes.reset_peer,
            "window_s": window,
        }),
        recommendation: format!(
            "{} opens {rate:.0} new connections per second to {}{}: keep-alive is not in \
             effect (the pool is disabled, responses say `Connection: close`, or the pool is \
             too small and discards connections). Each connection costs a handshake and, on \
             the side that closes first, a port in TIME_WAIT for 60 s{}. Enable connection \
             reuse: a pool of a few connections serves this rate.",
            stats.comm,
            endpoint(key.raddr, key.rport),
            match per_connection {
                Some(per) => format!(", {per:.1} requests on each"),
                None => String::new(),
            },
            match (time_wait, port_range) {
                (Some(tw), Some(range)) =>
                    format!(" ({tw} in TIME_WAIT now, of {range} local ports)"),
                (Some(tw), None) => format!(" ({tw} in TIME_WAIT now)"),
                _ => String::new(),
            },
        ),
        ..Finding::about_destination(
            FindingKind::ConnectionChurn,
            Severity::Warning,
            now,
            key,
            stats.comm,
        )
    };
    let materiality = finding.materiality(1, vec![rate]);
    Some((finding, materiality))
}
