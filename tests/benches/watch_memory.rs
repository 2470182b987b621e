//! Benchmark of what idle Watch streams on a large secret cost the
//! backend: the real `rekey-backend` release binary (SQLite store), a
//! `static` secret whose current and previous values are 1 MiB each (one
//! Watch event of a little over 2 MiB), and N clients that open a Watch
//! stream on it and never read. Each stream's connection holds what it
//! could not send yet; the backend shares one encoded copy of each event
//! among them, so its resident memory must grow by far less than N copies.
//!
//! Reported: the backend's VmRSS before the idle streams (after one stream
//! that read the snapshot) and after them, settled (read every 100 ms until
//! two readings agree), the growth, and N copies of the event beside it.
//!
//! Run (release build): `cargo bench -p rekey-e2e --bench watch_memory`
//!
//! Environment overrides (defaults in brackets):
//! `REKEY_BENCH_IDLE_STREAMS` (100) idle streams.

use std::time::Duration;

use anyhow::{Context as _, Result};
use rekey_proto::v1 as pb;
use rekey_testkit::bench::{Table, env_usize};
use rekey_testkit::{Backend, BackendOpts, TempDir};

const OVERALL_TIMEOUT: Duration = Duration::from_secs(10 * 60);
const VALUE: usize = 1 << 20;

struct Settings {
    streams: usize,
}

fn main() {
    let settings = (|| {
        Ok(Settings {
            streams: env_usize("REKEY_BENCH_IDLE_STREAMS", 100, 1)?,
        })
    })();
    rekey_testkit::bench::main_with(settings, OVERALL_TIMEOUT, |s| async move { run(&s).await });
}

fn rss_kib(pid: u32) -> Result<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")
}

/// VmRSS once two readings 100 ms apart agree within 1 %.
async fn settled_rss_kib(pid: u32) -> Result<u64> {
    let mut last = rss_kib(pid)?;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = rss_kib(pid)?;
        if now.abs_diff(last) * 100 <= last {
            return Ok(now);
        }
        last = now;
    }
    Ok(last)
}

fn raw(fill: u8) -> pb::SecretValue {
    pb::SecretValue {
        value: Some(pb::secret_value::Value::Raw(vec![fill; VALUE])),
    }
}

async fn run(s: &Settings) -> Result<String> {
    let dir = TempDir::new("bench-watch-mem");
    let b = Backend::start(
        dir.path(),
        BackendOpts {
            extra_toml: format!("[limits]\nmax_value_bytes = {VALUE}\n"),
            ..Default::default()
        },
    );
    let mut admin = b.client().await;
    admin
        .create_secret(pb::CreateSecretRequest {
            id: "bench/blob".into(),
            kind: "static".into(),
            value: Some(raw(b'a')),
            validation_window_ms: Some(3_600_000),
            ..Default::default()
        })
        .await?;
    admin
        .rotate(pb::RotateRequest {
            secret_id: "bench/blob".into(),
            value: Some(raw(b'b')),
            ..Default::default()
        })
        .await?;
    let req = || pb::WatchRequest {
        secret_ids: vec!["bench/blob".into()],
    };
    // The first stream loads the snapshot into the backend.
    let mut warm = b.client().await;
    let mut w = warm.watch(req()).await?.into_inner();
    w.message().await?.context("no snapshot")?;
    let before = settled_rss_kib(b.pid()).await?;
    let mut idle = Vec::new();
    for _ in 0..s.streams {
        let mut c = b.client().await;
        let stream = c.watch(req()).await?;
        idle.push((c, stream));
    }
    let after = settled_rss_kib(b.pid()).await?;
    let grew = after.saturating_sub(before);
    let copies = s.streams as u64 * (2 * VALUE as u64) / 1024;
    let mut t = Table::new("backend VmRSS").right("KiB");
    t.row(["before the idle streams", &before.to_string()]);
    t.row([
        format!("after {} idle streams", s.streams),
        after.to_string(),
    ]);
    t.row(["growth".to_string(), grew.to_string()]);
    t.row([
        format!("{} copies of the event (for scale)", s.streams),
        copies.to_string(),
    ]);
    drop(idle);
    Ok(format!(
        "\nidle Watch streams on one 2 MiB event (current and previous 1 MiB each)\n\n{}",
        t.render()
    ))
}
