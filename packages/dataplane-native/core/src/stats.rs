//! I/O statistics recorded on the hot path without locks: op and byte counters and a latency
//! histogram with power-of-two microsecond buckets.

use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Trim,
    Zero,
    Flush,
}

const BUCKETS: usize = 32;

#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS],
}

impl Histogram {
    pub fn record(&self, latency: Duration) {
        let us = latency.as_micros().min(u64::MAX as u128) as u64;
        // bucket i holds latencies in [2^(i-1), 2^i) µs; bucket 0 holds < 1 µs.
        let i = (64 - us.leading_zeros() as usize).min(BUCKETS - 1);
        self.buckets[i].fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        let pct = |p: f64| -> u64 {
            if total == 0 {
                return 0;
            }
            let want = (total as f64 * p).ceil() as u64;
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= want {
                    return if i == 0 { 1 } else { 1u64 << i };
                }
            }
            1u64 << (BUCKETS - 1)
        };
        HistogramSnapshot {
            count: total,
            p50_us: pct(0.50),
            p99_us: pct(0.99),
            p999_us: pct(0.999),
            buckets_us: counts
                .iter()
                .enumerate()
                .filter(|(_, c)| **c > 0)
                .map(|(i, c)| (if i == 0 { 1 } else { 1u64 << i }, *c))
                .collect(),
        }
    }
}

/// Percentiles are upper bounds of their bucket (within a factor of two).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HistogramSnapshot {
    pub count: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    /// `(upper bound in µs, count)` for every non-empty bucket.
    pub buckets_us: Vec<(u64, u64)>,
}

#[derive(Default)]
pub struct Stats {
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub trims: AtomicU64,
    pub zeroes: AtomicU64,
    pub flushes: AtomicU64,
    pub read_latency: Histogram,
    pub write_latency: Histogram,
}

impl Stats {
    pub fn record(&self, op: Op, bytes: u64, latency: Duration) {
        match op {
            Op::Read => {
                self.reads.fetch_add(1, Relaxed);
                self.bytes_read.fetch_add(bytes, Relaxed);
                self.read_latency.record(latency);
            }
            Op::Write => {
                self.writes.fetch_add(1, Relaxed);
                self.bytes_written.fetch_add(bytes, Relaxed);
                self.write_latency.record(latency);
            }
            Op::Trim => {
                self.trims.fetch_add(1, Relaxed);
            }
            Op::Zero => {
                self.zeroes.fetch_add(1, Relaxed);
            }
            Op::Flush => {
                self.flushes.fetch_add(1, Relaxed);
            }
        }
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            bytes_read: self.bytes_read.load(Relaxed),
            bytes_written: self.bytes_written.load(Relaxed),
            reads: self.reads.load(Relaxed),
            writes: self.writes.load(Relaxed),
            trims: self.trims.load(Relaxed),
            zeroes: self.zeroes.load(Relaxed),
            flushes: self.flushes.load(Relaxed),
            read_latency: self.read_latency.snapshot(),
            write_latency: self.write_latency.snapshot(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatsSnapshot {
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub reads: u64,
    pub writes: u64,
    pub trims: u64,
    pub zeroes: u64,
    pub flushes: u64,
    pub read_latency: HistogramSnapshot,
    pub write_latency: HistogramSnapshot,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_land_in_the_right_bucket() {
        let h = Histogram::default();
        for _ in 0..99 {
            h.record(Duration::from_micros(10));
        }
        h.record(Duration::from_millis(5));
        let s = h.snapshot();
        assert_eq!(s.count, 100);
        assert_eq!(s.p50_us, 16);
        assert_eq!(s.p99_us, 16);
        assert_eq!(s.p999_us, 8192);
    }
}
