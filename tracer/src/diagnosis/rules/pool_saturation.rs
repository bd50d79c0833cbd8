//! `pool_saturation`: every pooled connection to a destination in use back to
//! back, so that requests queue in the application for one.

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

/// The pool's own timing over the window says whether it is the limit. Each
/// connection cycles through an exchange (`R`, the mean from a request's first
/// byte out to its answer's last byte in) and a turnaround (`G`, the median
/// gap until the next request goes out on it). It is saturated when, every
/// second of the window, its size held still and:
/// - every open connection was in continuous use: busy at least
///   `saturation_use` of the `R / (R + G)` that back-to-back exchanges give
///   (a connection left idle, as when callers are fewer than connections,
///   pulls the pool below it);
/// - the turnaround was the client's own, not a wait for demand: `G` at most
///   `saturation_turnaround` of `R` (a caller that thinks between requests,
///   or a pool busy 50–70% of the time, has gaps of the order of `R`).
///
/// A client needs some time of its own between reading a response and
/// sending the next request (Python a millisecond or more, Rust microseconds);
/// comparing `G` with `R` rather than with a fixed figure serves both.
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
    if size == 0
        || !recent
            .iter()
            .all(|s| s.open == size && s.responses > 0 && s.median_gap_us.is_some())
    {
        return None;
    }
    let timing = Timing::of(&recent);
    let back_to_back = timing.response_ms / (timing.response_ms + timing.gap_ms());
    let saturated = timing.busy >= config.saturation_use * back_to_back
        && timing.gap_ms() <= config.saturation_turnaround * timing.response_ms;
    if !saturated {
        return None;
    }
    stats.history.saturated_s += 1.0;
    let Timing {
        busy,
        response_ms,
        gap_us,
        rate,
    } = timing;
    // Capacity: each connection carries one exchange at a time.
    let cap = size as f64 * 1000.0 / response_ms.max(0.001);
    // A request that finds every connection busy waits for the first to come
    // free: with the pool's cycles spread evenly, a cycle over size + 1 on
    // average, and a cycle more for every size callers queued ahead of it.
    let queued_ms = (response_ms + gap_us / 1000.0) / (size as f64 + 1.0);
    let destination = endpoint(key.raddr, key.rport);
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
            "min_queued_ms": round2(queued_ms),
        }),
        recommendation: format!(
            "{comm}'s pool of {size} connections to {destination} was in use without a \
             pause for the last {window} s: busy {busy:.0}% of the time, each connection \
             sending its next request {gap} after a response that took {response}. That is \
             the pool's ceiling: {size} connections × 1 / {response} = {cap:.0} requests/s \
             at most; it carried {rate:.1}/s, and a request that finds every connection \
             busy waits {queued} or more for one. Connections needed = peak requests/s × \
             {response}. Raise the pool above {size} ({double} carries {double_cap:.0}/s), \
             unless {response} is longer than {destination} normally takes — then the \
             destination is the bottleneck, and more connections add to its load. Where \
             {destination} speaks HTTP/2, one multiplexed connection carries many requests \
             at once and this per-connection cap goes away.",
            comm = stats.comm,
            busy = busy * 100.0,
            gap = human_us(gap_us),
            response = human_ms(response_ms),
            queued = human_ms(queued_ms),
            double = size * 2,
            double_cap = cap * 2.0,
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

/// A pool's timing over a window of samples.
struct Timing {
    /// Busy time over open-connection time.
    busy: f64,
    /// Mean exchange, weighted by responses.
    response_ms: f64,
    /// Median of the samples' median turnarounds.
    gap_us: f64,
    /// Responses per second.
    rate: f64,
}

impl Timing {
    fn of(samples: &[&PoolSample]) -> Self {
        let n = samples.len() as f64;
        let responses: u64 = samples.iter().map(|s| s.responses).sum();
        let response_ms = samples
            .iter()
            .filter_map(|s| s.mean_response_ms.map(|ms| ms * s.responses as f64))
            .sum::<f64>()
            / responses.max(1) as f64;
        let mut gaps: Vec<f64> = samples.iter().filter_map(|s| s.median_gap_us).collect();
        gaps.sort_by(f64::total_cmp);
        Self {
            busy: samples.iter().map(|s| s.busy_fraction).sum::<f64>() / n,
            response_ms,
            gap_us: gaps.get(gaps.len() / 2).copied().unwrap_or(0.0),
            rate: responses as f64 / n,
        }
    }

    fn gap_ms(&self) -> f64 {
        self.gap_us / 1000.0
    }
}
