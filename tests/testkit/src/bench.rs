//! What the benchmarks share: the program's frame (settings, a runtime, an
//! overall time limit, the report or a failure), sample statistics
//! (nearest-rank percentiles over durations, milliseconds for tables), and
//! one table printer for every report.

use std::fmt::Write as _;
use std::time::Duration;

/// Summary of a set of duration samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub n: usize,
    pub mean: Duration,
    pub p50: Duration,
    pub p99: Duration,
    pub min: Duration,
    pub max: Duration,
}

/// Nearest-rank percentile of sorted samples: the sample at 1-based rank
/// ⌈p/100 · n⌉. For p99 that is the slowest of up to 99 samples, the
/// second-slowest of 100 to 199, and the third-slowest of 200 (rank
/// ⌈0.99 · 200⌉ = 198).
///
/// # Panics
///
/// When `sorted` is empty.
#[must_use]
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let n = sorted.len();
    assert!(n > 0, "no samples");
    // p · n first, then / 100: exact for whole p and n, so a rank that is
    // a whole number cannot become the next one through rounding.
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "sample counts are small; the rank is clamped to 1..=n"
    )]
    let rank = (p * n as f64 / 100.0).ceil() as usize;
    sorted[rank.clamp(1, n) - 1]
}

/// Sorts the samples and summarises them.
///
/// # Panics
///
/// When there are no samples, or more than `u32::MAX`.
#[must_use]
pub fn stats(mut v: Vec<Duration>) -> Stats {
    assert!(!v.is_empty(), "no samples");
    v.sort_unstable();
    let sum: Duration = v.iter().sum();
    let n = u32::try_from(v.len()).expect("fewer than 2^32 samples");
    Stats {
        n: v.len(),
        mean: sum / n,
        p50: percentile(&v, 50.0),
        p99: percentile(&v, 99.0),
        min: v[0],
        max: v[v.len() - 1],
    }
}

/// Milliseconds with two decimals, for tables.
#[must_use]
pub fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

/// The headers of the statistics columns that [`stats_cells`] fills.
pub const STATS_HEADERS: [&str; 6] = ["samples", "p50 ms", "p99 ms", "mean ms", "min ms", "max ms"];

/// samples, p50, p99, mean, min and max (ms) of `s`, for a table row.
#[must_use]
pub fn stats_cells(s: &Stats) -> [String; 6] {
    [
        s.n.to_string(),
        ms(s.p50),
        ms(s.p99),
        ms(s.mean),
        ms(s.min),
        ms(s.max),
    ]
}

/// How a column's cells line up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// Rows of text cells printed as aligned columns (or as a Markdown table).
/// Widths follow the content. A note is a line of its own between rows,
/// outside the columns.
#[derive(Debug, Clone, Default)]
pub struct Table {
    headers: Vec<(String, Align)>,
    lines: Vec<Line>,
}

#[derive(Debug, Clone)]
enum Line {
    Row(Vec<String>),
    Note(String),
}

impl Table {
    /// A table with a left-aligned first column (the labels) named `first`.
    #[must_use]
    pub fn new(first: &str) -> Table {
        Table::default().left(first)
    }

    /// A table whose columns after `first` are the statistics columns.
    #[must_use]
    pub fn stats(first: &str) -> Table {
        STATS_HEADERS
            .iter()
            .fold(Table::new(first), |t, h| t.right(h))
    }

    /// Adds a left-aligned column.
    #[must_use]
    pub fn left(mut self, header: &str) -> Table {
        self.headers.push((header.to_string(), Align::Left));
        self
    }

    /// Adds a right-aligned column (numbers).
    #[must_use]
    pub fn right(mut self, header: &str) -> Table {
        self.headers.push((header.to_string(), Align::Right));
        self
    }

    /// Adds a row; missing cells are blank, extra cells are dropped.
    pub fn row<I, S>(&mut self, cells: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut cells: Vec<String> = cells.into_iter().map(Into::into).collect();
        cells.resize(self.headers.len(), String::new());
        self.lines.push(Line::Row(cells));
    }

    /// Adds a row of `label` and the statistics of `s` (for [`Table::stats`]).
    pub fn stats_row(&mut self, label: &str, s: &Stats) {
        self.row(std::iter::once(label.to_string()).chain(stats_cells(s)));
    }

    /// Adds a line of text between rows.
    pub fn note(&mut self, text: &str) {
        self.lines.push(Line::Note(text.to_string()));
    }

    fn widths(&self) -> Vec<usize> {
        let mut w: Vec<usize> = self
            .headers
            .iter()
            .map(|(h, _)| h.chars().count())
            .collect();
        for line in &self.lines {
            if let Line::Row(cells) = line {
                for (w, c) in w.iter_mut().zip(cells) {
                    *w = (*w).max(c.chars().count());
                }
            }
        }
        w
    }

    /// Aligned columns, two spaces apart, one line per row.
    #[must_use]
    pub fn render(&self) -> String {
        let widths = self.widths();
        let line = |cells: Vec<&str>| {
            let mut s = String::new();
            for (i, ((c, w), (_, align))) in
                cells.iter().zip(&widths).zip(&self.headers).enumerate()
            {
                if i > 0 {
                    s.push_str("  ");
                }
                let pad = w.saturating_sub(c.chars().count());
                match align {
                    Align::Left => {
                        s.push_str(c);
                        s.push_str(&" ".repeat(pad));
                    }
                    Align::Right => {
                        s.push_str(&" ".repeat(pad));
                        s.push_str(c);
                    }
                }
            }
            s.trim_end().to_string() + "\n"
        };
        let mut out = line(self.headers.iter().map(|(h, _)| h.as_str()).collect());
        for l in &self.lines {
            match l {
                Line::Row(cells) => out.push_str(&line(cells.iter().map(String::as_str).collect())),
                Line::Note(text) => {
                    out.push_str(text);
                    out.push('\n');
                }
            }
        }
        out
    }

    /// The same table in Markdown (numbers right-aligned); notes become
    /// paragraphs after it.
    #[must_use]
    pub fn render_markdown(&self) -> String {
        let row = |cells: Vec<&str>| format!("| {} |\n", cells.join(" | "));
        let mut out = row(self.headers.iter().map(|(h, _)| h.as_str()).collect());
        out.push_str(&row(self
            .headers
            .iter()
            .map(|(_, a)| match a {
                Align::Left => "---",
                Align::Right => "---:",
            })
            .collect()));
        let mut notes = String::new();
        for l in &self.lines {
            match l {
                Line::Row(cells) => out.push_str(&row(cells.iter().map(String::as_str).collect())),
                Line::Note(text) => {
                    let _ = write!(notes, "\n{text}\n");
                }
            }
        }
        out + &notes
    }
}

/// Runs a benchmark: `run` gets the settings and returns the report to
/// print. A settings error, a failure or the overall time limit ends the
/// program with status 1 and a message. Everything `run` started is
/// stopped when it returns or is dropped.
///
/// # Panics
///
/// When no tokio runtime can be built.
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
        if let Ok(r) = tokio::time::timeout(overall, run(settings)).await {
            r
        } else {
            Err(anyhow::anyhow!(
                "the benchmark did not finish within {overall:?}"
            ))
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
///
/// # Errors
///
/// When it is not a whole number, or less than `min`.
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

/// The client-side time of one Rotate call.
///
/// # Errors
///
/// When the backend refuses or fails it.
pub async fn rotate(c: &mut crate::Client, id: &str) -> anyhow::Result<Duration> {
    let t = std::time::Instant::now();
    c.rotate(rekey_proto::v1::RotateRequest {
        secret_id: id.into(),
        ..Default::default()
    })
    .await
    .map_err(|s| anyhow::anyhow!("rotate {id}: {}", s.message()))?;
    Ok(t.elapsed())
}

/// Rotate latency with a provider beside the embedded store, in one run:
/// creates `bench/embedded` and `id` (both `random`, the second with
/// `--provider provider`), then `warmup` rotations of each
/// (not counted) and `n` of each, taking turns so that both sides see the
/// same machine. The table has a row per store; `label` names the
/// provider's.
///
/// # Errors
///
/// When a rotation fails.
pub async fn rotate_beside_embedded(
    b: &crate::Backend,
    id: &str,
    provider: &str,
    label: &str,
    warmup: usize,
    n: usize,
) -> anyhow::Result<Table> {
    b.cli_json(&["create", "bench/embedded", "--kind", "random"]);
    b.cli_json(&["create", id, "--kind", "random", "--provider", provider]);
    let mut c = b.client().await;
    let (mut embedded, mut theirs) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..warmup + n {
        let e = rotate(&mut c, "bench/embedded").await?;
        let t = rotate(&mut c, id).await?;
        if i >= warmup {
            embedded.push(e);
            theirs.push(t);
        }
    }
    let mut t = Table::stats("store");
    t.stats_row("embedded (SQLite)", &stats(embedded));
    t.stats_row(label, &stats(theirs));
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms_samples(n: u64) -> Vec<Duration> {
        (1..=n).map(Duration::from_millis).collect()
    }

    #[test]
    fn p99_is_the_nearest_rank() {
        // 200 samples: rank 198, the third-slowest (BENCHMARKS.md).
        let v = ms_samples(200);
        assert_eq!(percentile(&v, 99.0), Duration::from_millis(198));
        assert_eq!(percentile(&v, 50.0), Duration::from_millis(100));
        // Up to 99 samples: the slowest.
        for n in [20, 50, 99] {
            assert_eq!(percentile(&ms_samples(n), 99.0), Duration::from_millis(n));
        }
        // 100 to 199: the second-slowest.
        for n in [100, 101, 199] {
            assert_eq!(
                percentile(&ms_samples(n), 99.0),
                Duration::from_millis(n - 1)
            );
        }
        assert_eq!(percentile(&ms_samples(1), 50.0), Duration::from_millis(1));
    }

    #[test]
    fn stats_sort_first() {
        let mut v = ms_samples(200);
        v.reverse();
        let s = stats(v);
        assert_eq!(s.n, 200);
        assert_eq!(s.min, Duration::from_millis(1));
        assert_eq!(s.max, Duration::from_millis(200));
        assert_eq!(s.p99, Duration::from_millis(198));
        assert_eq!(s.mean, Duration::from_micros(100_500));
        assert_eq!(stats_cells(&s)[2], "198.00");
    }

    #[test]
    fn tables_align_by_content() {
        let mut t = Table::new("kind").right("n").left("note");
        t.row(["random", "7", "ok"]);
        t.note("a line of its own");
        t.row(["postgres", "12345"]);
        assert_eq!(
            t.render(),
            "kind          n  note\nrandom        7  ok\na line of its own\npostgres  12345\n"
        );
        assert_eq!(
            t.render_markdown(),
            "| kind | n | note |\n| --- | ---: | --- |\n| random | 7 | ok |\n| postgres | 12345 |  |\n\na line of its own\n"
        );
    }

    #[test]
    fn stats_tables_have_the_six_columns() {
        let mut t = Table::stats("store");
        t.stats_row("sqlite", &stats(ms_samples(3)));
        let out = t.render();
        let mut lines = out.lines();
        assert_eq!(
            lines.next(),
            Some("store   samples  p50 ms  p99 ms  mean ms  min ms  max ms")
        );
        assert_eq!(
            lines.next(),
            Some("sqlite        3    2.00    3.00     2.00    1.00    3.00")
        );
    }
}
