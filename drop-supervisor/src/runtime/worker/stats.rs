//! Per-pool numbers: counters and a latency histogram, lock-free on the hot path.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::Serialize;

/// Upper bounds of the latency buckets, in microseconds (the last bucket is +Inf).
pub const BUCKETS_US: [u64; 16] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 5_000_000, 10_000_000,
];

#[derive(Debug, Default)]
pub struct PoolStats {
    pub ok: AtomicU64,
    pub error: AtomicU64,
    pub timeout: AtomicU64,
    pub rejected: AtomicU64,
    pub restarts: AtomicU64,
    pub out_of_step: AtomicU64,
    pub cache_hits: AtomicU64,
    pub running: AtomicU64,
    buckets: [AtomicU64; BUCKETS_US.len() + 1],
    latency_sum_us: AtomicU64,
}

impl PoolStats {
    pub fn observe(&self, elapsed: Duration) {
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let idx = BUCKETS_US
            .iter()
            .position(|b| us <= *b)
            .unwrap_or(BUCKETS_US.len());
        self.buckets[idx].fetch_add(1, Relaxed);
        self.latency_sum_us.fetch_add(us, Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let buckets: Vec<u64> = self.buckets.iter().map(|b| b.load(Relaxed)).collect();
        StatsSnapshot {
            ok: self.ok.load(Relaxed),
            error: self.error.load(Relaxed),
            timeout: self.timeout.load(Relaxed),
            rejected: self.rejected.load(Relaxed),
            restarts: self.restarts.load(Relaxed),
            out_of_step: self.out_of_step.load(Relaxed),
            cache_hits: self.cache_hits.load(Relaxed),
            running: self.running.load(Relaxed),
            latency_count: buckets.iter().sum(),
            latency_sum_us: self.latency_sum_us.load(Relaxed),
            latency_buckets: buckets,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct StatsSnapshot {
    pub ok: u64,
    pub error: u64,
    pub timeout: u64,
    pub rejected: u64,
    pub restarts: u64,
    pub out_of_step: u64,
    pub cache_hits: u64,
    pub running: u64,
    pub latency_count: u64,
    pub latency_sum_us: u64,
    /// Counts per bucket of [`BUCKETS_US`] (not cumulative), then the +Inf bucket.
    pub latency_buckets: Vec<u64>,
}

impl StatsSnapshot {
    /// Latency at quantile `q` (0..=1), as the upper bound of the bucket it falls in.
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        if self.latency_count == 0 {
            return None;
        }
        let target = ((self.latency_count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.latency_buckets.iter().enumerate() {
            seen += n;
            if seen >= target {
                return Some(BUCKETS_US.get(i).copied().unwrap_or(u64::MAX));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_and_quantiles() {
        let s = PoolStats::default();
        for us in [10, 60, 60, 900, 20_000_000] {
            s.observe(Duration::from_micros(us));
        }
        let snap = s.snapshot();
        assert_eq!(snap.latency_count, 5);
        assert_eq!(snap.latency_buckets[0], 1);
        assert_eq!(snap.latency_buckets[1], 2);
        assert_eq!(snap.latency_buckets[4], 1);
        assert_eq!(*snap.latency_buckets.last().unwrap(), 1);
        assert_eq!(snap.quantile_us(0.5), Some(100));
        assert_eq!(snap.quantile_us(0.8), Some(1_000));
        assert_eq!(snap.quantile_us(1.0), Some(u64::MAX));
    }
}
