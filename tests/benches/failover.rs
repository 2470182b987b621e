//! Benchmark of leader failover in the sidecars' re-encryption task: how
//! long after the leading sidecar stops another one leads, for each way of
//! electing (`advisory-lock`, `kubernetes-lease`) and each way of stopping
//! (SIGKILL, as in a crash or an OOM kill; SIGTERM, as in a rollout).
//!
//! Setup: the real backend (`[consumers] ttl = "1h"`), a fresh database per
//! case on the machine's Postgres with one table of 100 rows under the
//! rekey codec, an `encryption-key` secret per case, and three real
//! `rekey-sidecar` processes configured to re-encrypt it with the default
//! `poll` (1s). Before the rotation a consumer reports that it serves v1
//! and then stays silent, so the fleet never converges: after its first
//! pass the leader keeps leading while it waits for the final sweep, which
//! is the state every sample starts from. The Lease cases use
//! `tests/testkit/lease_apiserver.py`, a stand-in for the API server's
//! Lease endpoints over HTTPS (no Kubernetes API server runs on this
//! machine), with the Lease's `duration` set to
//! `REKEY_BENCH_LEASE_SECONDS`.
//!
//! One sample: find the sidecar whose `/metrics` has
//! `rekey_sidecar_reencrypt_leader 1`; wait so that the stop falls at a
//! different point of the candidates' 1s poll cycle each time (sample k of
//! n waits (k + 0.5) / n s, since candidates started together poll in
//! step); take the time; send it SIGKILL (or
//! SIGTERM and wait for its exit); poll the two others' `/metrics` every
//! 20 ms until one reports `rekey_sidecar_reencrypt_leader 1`. The sample
//! is the time from the signal to that observation. A new sidecar then
//! replaces the stopped one, and the next sample starts once it answers.
//!
//! Run (release build): `cargo bench -p rekey-e2e --bench failover`
//!
//! Environment overrides (defaults in brackets):
//! `REKEY_BENCH_FAILOVER_SAMPLES` (5) samples per case,
//! `REKEY_BENCH_LEASE_SECONDS` (15) the Lease's duration (Kubernetes'
//! usual value).
//!
//! Requirements: as for the tests (Postgres on 127.0.0.1:5432, python3,
//! openssl). The program prints a table and exits 0, or prints what failed
//! and exits non-zero. Every wait is bounded.

use rekey_testkit::bench::{Stats, Table, env_usize, ms, stats};

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rekey_keyring::MasterKey;
use rekey_proto::v1 as pb;
use rekey_reencrypt::Codec;
use rekey_testkit::*;

const OVERALL_TIMEOUT: Duration = Duration::from_secs(1800);

struct Settings {
    samples: usize,
    lease_seconds: usize,
}

impl Settings {
    fn from_env() -> Result<Self> {
        Ok(Settings {
            samples: env_usize("REKEY_BENCH_FAILOVER_SAMPLES", 5, 1)?,
            lease_seconds: env_usize("REKEY_BENCH_LEASE_SECONDS", 15, 1)?,
        })
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Stop {
    Kill,
    Term,
}

fn main() {
    rekey_testkit::bench::main_with(Settings::from_env(), OVERALL_TIMEOUT, |s| async move {
        let dir = TempDir::new("failover");
        let b = Backend::start(
            dir.path(),
            BackendOpts {
                extra_toml: "[scheduler]\ntick = \"100ms\"\n[consumers]\nttl = \"1h\"\n".into(),
                ..Default::default()
            },
        );
        let api = LeaseApiServer::start(dir.path());
        let lease = api.election(&format!("duration = \"{}s\"\n", s.lease_seconds));
        let cases = [
            ("advisory-lock", "", Stop::Kill),
            ("advisory-lock", "", Stop::Term),
            ("kubernetes-lease", lease.as_str(), Stop::Kill),
            ("kubernetes-lease", lease.as_str(), Stop::Term),
        ];
        let mut rows = Vec::new();
        for (i, (method, election, stop)) in cases.into_iter().enumerate() {
            let st = case(&dir, &b, i, election, stop, s.samples)
                .await
                .with_context(|| format!("{method}, {}", stop_name(stop)))?;
            rows.push((method, stop, st));
        }
        Ok(report(&s, &rows))
    });
}

fn stop_name(s: Stop) -> &'static str {
    match s {
        Stop::Kill => "SIGKILL",
        Stop::Term => "SIGTERM",
    }
}

/// Which of `sidecars` reports itself leader, if one does.
fn leader_of(sidecars: &[Option<Sidecar>]) -> Option<usize> {
    sidecars.iter().position(|s| {
        s.as_ref().is_some_and(|s| {
            s.get("/metrics")
                .1
                .lines()
                .any(|l| l == "rekey_sidecar_reencrypt_leader 1")
        })
    })
}

async fn case(
    dir: &TempDir,
    b: &Backend,
    i: usize,
    election: &str,
    stop: Stop,
    samples: usize,
) -> Result<Stats> {
    let secret = format!("bench/failover/{i}");
    let db = PgDb::create(&format!("failover{i}")).await;
    let db_url_file = dir.path().join(format!("db-url-{i}"));
    std::fs::write(&db_url_file, &db.url)?;
    b.cli_json(&[
        "create",
        &secret,
        "--kind",
        "encryption-key",
        "--window",
        "0s",
    ]);
    let v = b.cli_json(&["get", &secret, "--reveal"]);
    let old = MasterKey::from_base64(v["value"].as_str().context("no value")?)?;
    let pool = sqlx::PgPool::connect(&db.url).await?;
    sqlx::raw_sql("CREATE TABLE tokens (id bigint PRIMARY KEY, secret text)")
        .execute(&pool)
        .await?;
    for id in 0..100i64 {
        sqlx::query("INSERT INTO tokens VALUES ($1, $2)")
            .bind(id)
            .bind(Codec::Rekey.seal(&old, format!("t{id}").as_bytes())?)
            .execute(&pool)
            .await?;
    }
    pool.close().await;
    // A pod that never moves to the new key: the leader waits for it.
    b.client()
        .await
        .report_status(pb::ReportStatusRequest {
            consumer_id: format!("stale-{i}"),
            pod: format!("stale-{i}"),
            namespace: String::new(),
            secrets: vec![pb::ServedSecret {
                secret_id: secret.clone(),
                version: 1,
                healthy: true,
                error: String::new(),
            }],
            leaving: false,
        })
        .await?;

    let reencrypt = format!(
        "columns = [{{ table = \"tokens\", column = \"secret\", codec = \"rekey\" }}]\n{election}"
    );
    let start = |n: usize| {
        let cfg = reencrypt_sidecar_config(
            dir.path(),
            &format!("c{i}-{n}"),
            b,
            &secret,
            &db_url_file,
            &reencrypt,
        );
        Sidecar::start(dir.path(), &["--config", cfg.to_str().unwrap()], &[])
    };
    let mut sidecars: Vec<Option<Sidecar>> = (0..3).map(|n| Some(start(n))).collect();
    b.cli_json(&["rotate", &secret]);

    let mut times = Vec::new();
    // Replacements are numbered on from the first three.
    for (k, next) in (3..3 + samples).enumerate() {
        let deadline = Instant::now() + Duration::from_secs(60);
        let leader = loop {
            if let Some(l) = leader_of(&sidecars) {
                break l;
            }
            if Instant::now() > deadline {
                bail!("no leader within 60s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        tokio::time::sleep(Duration::from_secs_f64((k as f64 + 0.5) / samples as f64)).await;
        let mut s = sidecars[leader].take().context("leader gone")?;
        let t0 = Instant::now();
        match stop {
            Stop::Kill => drop(s),
            Stop::Term => {
                s.stop();
            }
        }
        let deadline = t0 + Duration::from_secs(120);
        loop {
            if leader_of(&sidecars).is_some() {
                times.push(t0.elapsed());
                break;
            }
            if Instant::now() > deadline {
                bail!("no new leader within 120s of the stop");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        sidecars[leader] = Some(start(next));
    }
    drop(sidecars);
    Ok(stats(times))
}

fn report(s: &Settings, rows: &[(&str, Stop, Stats)]) -> String {
    let mut t = ["samples", "mean ms", "p50 ms", "min ms", "max ms"]
        .iter()
        .fold(Table::new("election").left("leader stopped by"), |t, h| {
            t.right(h)
        });
    for (method, stop, st) in rows {
        t.row([
            (*method).to_string(),
            stop_name(*stop).to_string(),
            st.n.to_string(),
            ms(st.mean),
            ms(st.p50),
            ms(st.min),
            ms(st.max),
        ]);
    }
    format!(
        "Leader failover, {} samples per case; Lease duration {}s; poll 1s\n\n{}",
        s.samples,
        s.lease_seconds,
        t.render_markdown()
    )
}
