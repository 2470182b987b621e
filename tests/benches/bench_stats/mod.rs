//! Sample statistics shared by the benchmarks: nearest-rank percentiles
//! over durations, and milliseconds for tables.
#![allow(dead_code, reason = "each benchmark uses a different part")]

use std::time::Duration;

pub struct Stats {
    pub n: usize,
    pub mean: Duration,
    pub p50: Duration,
    pub p99: Duration,
    pub min: Duration,
    pub max: Duration,
}

/// Nearest-rank percentile of sorted samples.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let n = sorted.len();
    let rank = ((p / 100.0) * n as f64).ceil() as usize;
    sorted[rank.clamp(1, n) - 1]
}

pub fn stats(mut v: Vec<Duration>) -> Stats {
    assert!(!v.is_empty(), "no samples");
    v.sort_unstable();
    let sum: Duration = v.iter().sum();
    Stats {
        n: v.len(),
        mean: sum / v.len() as u32,
        p50: percentile(&v, 50.0),
        p99: percentile(&v, 99.0),
        min: v[0],
        max: v[v.len() - 1],
    }
}

pub fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}
