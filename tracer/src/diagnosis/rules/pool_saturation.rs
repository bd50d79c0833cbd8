//! `pool_saturation`: every pooled connection to a destination busy, and
//! requests queued in the application for one.

use std::time::SystemTime;

use serde_json::json;

use crate::{
    diagnosis::{
        Config,
        figures::{endpoint, human_ms, human_us, round2},
        finding::{Finding, FindingKind, Materiality, Severity},
        pools::PoolSample,
        stats::ConnectionStats,
    },
    event::DestinationKey,
};

/// Every connection of the pool busy for the whole window, the pool not growing,
/// and each request following a response on the same connection at once:
/// callers were waiting for a free connection.
pub(in crate::diagnosis) fn saturation(
    config: &Config,
    key: &DestinationKey,
    stats: &mut ConnectionStats,
    now: SystemTime,
) -> Option<(Finding, Materiality)> {
    let window = config.window_samples();
    let recent: Vec<&PoolSample> = stats.history.samples.iter().rev().take(window).collect();
    if recent.len() < window {
        return None;
    }
    let size = recent[0].open;
    let saturated = size > 0
        && recent.iter().all(|s| {
            s.open == size
                && s.responses > 0
                && s.busy_fraction >= config.saturation_busy
                && s.median_gap_us
                    .is_some_and(|gap| gap <= config.saturation_gap_us)
        });
    if !saturated {
        return None;
    }
    stats.history.saturated_s += 1.0;
    let busy = recent.iter().map(|s| s.busy_fraction).sum::<f64>() / window as f64;
    let responses: u64 = recent.iter().map(|s| s.responses).sum();
    let response_ms = recent
        .iter()
        .filter_map(|s| s.mean_response_ms.map(|ms| ms * s.responses as f64))
        .sum::<f64>()
        / responses.max(1) as f64;
    let gap_us = recent[0].median_gap_us.unwrap_or(0.0);
    let rate = responses as f64 / window as f64;
    let cap = size as f64 * 1000.0 / response_ms.max(0.001);
    let finding = Finding {
        count: stats.history.saturated_s as u64,
        evidence: json!({
            "pool_size": size,
            "busy_fraction": round2(busy),
            "median_gap_us": gap_us,
            "window_s": window,
            "mean_response_ms": round2(response_ms),
            "requests_per_s": round2(rate),
            "max_requests_per_s": round2(cap),
        }),
        recommendation: format!(
            "{}'s {size} connections to {} were all busy {:.0}% of the last {window} s, and \
             each next request went out {} after a response landed: requests queue for a \
             free connection, and throughput is capped at {size} / {} = {:.0} requests/s. \
             Raise the pool above {size} (to {}, say), unless {} is longer than {} \
             normally takes — then the destination is the bottleneck.",
            stats.comm,
            endpoint(key.raddr, key.rport),
            busy * 100.0,
            human_us(gap_us),
            human_ms(response_ms),
            cap,
            size * 2,
            human_ms(response_ms),
            endpoint(key.raddr, key.rport),
        ),
        ..Finding::about_destination(
            FindingKind::PoolSaturation,
            Severity::Warning,
            now,
            key,
            stats.comm,
        )
    };
    let materiality = finding.materiality(1, vec![size as f64]);
    Some((finding, materiality))
}
