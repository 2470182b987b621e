//! What the benchmarks share: the program's frame (settings, a runtime, an
//! overall time limit, the report or a failure), and sample statistics
//! (nearest-rank percentiles over durations, milliseconds for tables).
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

/// Runs a benchmark: `run` gets the settings and returns the report to
/// print. A settings error, a failure or the overall time limit ends the
/// program with status 1 and a message. Everything `run` started is
/// stopped when it returns or is dropped.
pub fn main_with<S, F, Fut>(settings: anyhow::Result<S>, overall: Duration, run: F)
where
    F: FnOnce(S) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<String>>,
{
    // `cargo bench` passes `--bench`; there is nothing else to parse.
    let settings = match settings {
        Ok(s) => s,
        Err(e) => {
            eprintln!("benchmark failed: {e:#}");
            std::process::exit(1);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = rt.block_on(async {
        match tokio::time::timeout(overall, run(settings)).await {
            Ok(r) => r,
            Err(_) => Err(anyhow::anyhow!(
                "the benchmark did not finish within {overall:?}"
            )),
        }
    });
    rt.shutdown_timeout(Duration::from_secs(5));
    match result {
        Ok(report) => print!("{report}"),
        Err(e) => {
            eprintln!("benchmark failed: {e:#}");
            std::process::exit(1);
        }
    }
}

/// A whole number from the environment, `default` when unset.
pub fn env_usize(name: &str, default: usize, min: usize) -> anyhow::Result<usize> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(s) => {
            let v: usize = s
                .trim()
                .parse()
                .map_err(|_| anyhow::anyhow!("{name}={s:?}: expected a whole number"))?;
            anyhow::ensure!(v >= min, "{name}={v}: must be at least {min}");
            Ok(v)
        }
    }
}
