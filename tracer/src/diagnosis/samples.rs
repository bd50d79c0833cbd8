//! A bounded window of recent measurements, with the summaries reports need.

use std::collections::VecDeque;

use serde::Serialize;

/// How many recent values a window keeps. Older ones only count in `total`.
pub const WINDOW: usize = 256;

/// The most recent values of one measurement (milliseconds), and how many there
/// were in all.
#[derive(Clone, Debug, Default)]
pub struct Samples {
    recent: VecDeque<f64>,
    total: u64,
    max: f64,
}

/// p50/p90/max of a window, for reports.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Summary {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub max_ms: f64,
}

impl Samples {
    pub fn push(&mut self, value_ms: f64) {
        if self.recent.len() == WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back(value_ms);
        self.total += 1;
        self.max = self.max.max(value_ms);
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// The largest value ever seen, not only in the window.
    pub fn max(&self) -> Option<f64> {
        (self.total > 0).then_some(self.max)
    }

    fn recent(&self) -> Vec<f64> {
        self.recent.iter().copied().collect()
    }

    pub fn summary(&self) -> Option<Summary> {
        let mut sorted = self.recent();
        sorted.sort_by(f64::total_cmp);
        self.summary_of(&sorted)
    }

    /// The summary, given the window in ascending order.
    fn summary_of(&self, sorted: &[f64]) -> Option<Summary> {
        (!sorted.is_empty()).then(|| Summary {
            count: self.total,
            p50_ms: quantile(sorted, 0.5),
            p90_ms: quantile(sorted, 0.9),
            max_ms: self.max,
        })
    }
}

/// A window also kept in ascending order, for the idle times the idle-timeout
/// estimate clusters: it runs on every idle close a peer makes, and sorting a
/// copy of the window each time is an allocation and some 2,000 comparisons
/// (bench/notes.md). Keeping the order costs two binary
/// searches and moves of at most `WINDOW` values per close; the other windows,
/// pushed on every event and summarized only for reports, stay unordered.
#[derive(Clone, Debug, Default)]
pub struct OrderedSamples {
    samples: Samples,
    /// The values of `samples.recent`, ascending.
    sorted: Vec<f64>,
}

impl OrderedSamples {
    pub fn push(&mut self, value_ms: f64) {
        if self.samples.recent.len() == WINDOW
            && let Some(&oldest) = self.samples.recent.front()
        {
            let at = self.position(oldest);
            self.sorted.remove(at);
        }
        self.samples.push(value_ms);
        let at = self.position(value_ms);
        self.sorted.insert(at, value_ms);
    }

    pub fn total(&self) -> u64 {
        self.samples.total
    }

    /// The window, ascending.
    pub fn sorted(&self) -> &[f64] {
        &self.sorted
    }

    /// Where `value_ms` is, or goes, in `sorted`.
    fn position(&self, value_ms: f64) -> usize {
        self.sorted
            .partition_point(|v| v.total_cmp(&value_ms).is_lt())
    }

    pub fn summary(&self) -> Option<Summary> {
        self.samples.summary_of(&self.sorted)
    }
}

/// Nearest-rank quantile of sorted values.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_a_window() {
        let mut samples = Samples::default();
        assert_eq!(samples.summary(), None);
        for value in 1..=10 {
            samples.push(value as f64);
        }
        let summary = samples.summary().unwrap();
        assert_eq!(summary.count, 10);
        assert_eq!(summary.p50_ms, 5.0);
        assert_eq!(summary.p90_ms, 9.0);
        assert_eq!(summary.max_ms, 10.0);
    }

    #[test]
    fn window_is_bounded_but_totals_are_not() {
        let mut samples = Samples::default();
        for value in 0..(WINDOW + 10) {
            samples.push(value as f64);
        }
        assert_eq!(samples.recent().len(), WINDOW);
        assert_eq!(samples.total(), WINDOW as u64 + 10);
        assert_eq!(samples.recent()[0], 10.0);
        assert_eq!(samples.max(), Some((WINDOW + 9) as f64));
    }

    #[test]
    fn an_ordered_window_stays_sorted_as_old_values_leave() {
        let mut ordered = OrderedSamples::default();
        let mut plain = Samples::default();
        // Out of order and repeated, enough to cycle the window twice.
        let values: Vec<f64> = (0..WINDOW * 2 + 7)
            .map(|i| ((i * 37) % 101) as f64)
            .collect();
        for &value in &values {
            ordered.push(value);
            plain.push(value);
        }
        let mut expected = values[values.len() - WINDOW..].to_vec();
        expected.sort_by(f64::total_cmp);
        assert_eq!(ordered.sorted(), expected.as_slice());
        assert_eq!(ordered.summary(), plain.summary());
        assert_eq!(ordered.total(), plain.total());
    }
}
