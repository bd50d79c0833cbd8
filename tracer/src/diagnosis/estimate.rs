//! Inferring an idle timeout from the idle times at which connections were
//! closed.
//!
//! A server (or pool) that closes connections after T of idleness produces
//! closes whose measured idle time is T plus a little: the timer's slack, and
//! the kernel's idle stamps being jiffies (one jiffy, 4 ms at HZ=250, either
//! way). Closes for other reasons — a request limit, a shutdown, an error —
//! fall anywhere. So the estimator looks for the tightest cluster:
//!
//! 1. Only samples that can be idle-timeout closes are given to it: the caller
//!    drops closes that came while a request was outstanding (the peer did not
//!    close an idle connection) and graceful closes right after a response
//!    (`Connection: close`, a request limit), see `GRACEFUL_MS`.
//! 2. Take the samples in order. For each sample x, count the samples within
//!    [x, x + width(x)], width(x) = max(3 jiffies, 5% of x): the timer's slack
//!    grows with the timeout, the measurement's jitter does not.
//! 3. The window with the most samples is the cluster (the earliest wins ties).
//! 4. It is a timeout when the cluster holds at least `MIN_SAMPLES` samples and at
//!    least half of all samples. Its value is the cluster's median.

use serde::Serialize;

use super::samples::quantile;

/// Fewer closes than this cannot tell a timeout from a coincidence.
pub const MIN_SAMPLES: usize = 3;

/// Peer closes this soon after the last payload are graceful ends (the response
/// said `Connection: close`, or the server's request limit was reached), not idle
/// timeouts.
pub const GRACEFUL_MS: f64 = 50.0;

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Estimate {
    /// The inferred timeout.
    pub timeout_ms: f64,
    /// Closes in the cluster.
    pub samples: usize,
    /// Closes considered.
    pub considered: usize,
}

/// The idle timeout behind `sorted` (samples in ascending order), if they
/// cluster (see the module docs).
pub fn idle_timeout(sorted: &[f64], jiffy_ms: f64) -> Option<Estimate> {
    if sorted.len() < MIN_SAMPLES {
        return None;
    }
    debug_assert!(sorted.is_sorted_by(|a, b| a.total_cmp(b).is_le()));
    let mut best = (0, 0);
    let mut end = 0;
    for start in 0..sorted.len() {
        let limit = sorted[start] + (3.0 * jiffy_ms).max(0.05 * sorted[start]);
        end = end.max(start);
        while end + 1 < sorted.len() && sorted[end + 1] <= limit {
            end += 1;
        }
        let count = end - start + 1;
        if count > best.1 - best.0 {
            best = (start, end + 1);
        }
    }
    let cluster = &sorted[best.0..best.1];
    if cluster.len() < MIN_SAMPLES || cluster.len() * 2 < sorted.len() {
        return None;
    }
    Some(Estimate {
        timeout_ms: quantile(cluster, 0.5),
        samples: cluster.len(),
        considered: sorted.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const JIFFY: f64 = 4.0;

    /// The estimate of samples in any order.
    fn idle_timeout(samples_ms: &[f64], jiffy_ms: f64) -> Option<Estimate> {
        let mut sorted = samples_ms.to_vec();
        sorted.sort_by(f64::total_cmp);
        super::idle_timeout(&sorted, jiffy_ms)
    }

    #[test]
    fn clustered_closes_give_the_timeout() {
        // nginx keepalive_timeout 1s, measured in 4 ms jiffies.
        let closes = [1000.0, 1004.0, 1000.0, 996.0, 1004.0];
        let estimate = idle_timeout(&closes, JIFFY).unwrap();
        assert_eq!(estimate.timeout_ms, 1000.0);
        assert_eq!((estimate.samples, estimate.considered), (5, 5));
    }

    #[test]
    fn a_single_sample_or_two_are_not_enough() {
        assert_eq!(idle_timeout(&[1000.0], JIFFY), None);
        assert_eq!(idle_timeout(&[1000.0, 1000.0], JIFFY), None);
        assert!(idle_timeout(&[1000.0, 1000.0, 1004.0], JIFFY).is_some());
    }

    #[test]
    fn one_jiffy_of_jitter_stays_in_the_cluster() {
        let closes = [5000.0, 4996.0, 5004.0, 5000.0];
        let estimate = idle_timeout(&closes, JIFFY).unwrap();
        assert_eq!(estimate.samples, 4);
        assert!((estimate.timeout_ms - 5000.0).abs() <= JIFFY);
    }

    #[test]
    fn scattered_closes_are_no_timeout() {
        let closes = [120.0, 900.0, 3000.0, 4500.0, 7000.0, 15000.0];
        assert_eq!(idle_timeout(&closes, JIFFY), None);
    }

    #[test]
    fn outliers_do_not_move_the_timeout() {
        // Mostly a 60 s load-balancer timeout, plus a few closes for other reasons.
        let closes = [60000.0, 60004.0, 59996.0, 60000.0, 60008.0, 1200.0, 30500.0];
        let estimate = idle_timeout(&closes, JIFFY).unwrap();
        assert_eq!(estimate.timeout_ms, 60000.0);
        assert_eq!((estimate.samples, estimate.considered), (5, 7));
    }

    #[test]
    fn a_minority_cluster_is_not_a_timeout() {
        let closes = [
            1000.0, 1000.0, 1000.0, 200.0, 2500.0, 4000.0, 7000.0, 9000.0,
        ];
        assert_eq!(idle_timeout(&closes, JIFFY), None);
    }

    #[test]
    fn two_timeouts_pick_the_larger_cluster() {
        let closes = [2000.0, 2000.0, 2004.0, 2000.0, 75000.0, 75000.0, 75004.0];
        assert_eq!(idle_timeout(&closes, JIFFY).unwrap().timeout_ms, 2000.0);
    }
}
