//! Benchmark of what production databases cost a rotation, against the
//! real `rekey-backend` binary (SQLite store) from a gRPC client on the
//! same machine, all in one run:
//!
//! 1. The `postgres` kind on two private PostgreSQL servers made with
//!    `initdb`: one plain (password authentication over TCP), one that
//!    takes only TLS (`hostssl ... scram-sha-256`; the admin URL with
//!    `sslmode=verify-full` and the test CA), so the admin connection, the
//!    test login and the app URL all use TLS.
//! 2. The `redis` kind on one private `redis-server` (topology `single`)
//!    and on a Redis Cluster of six nodes (three primaries, three
//!    replicas; topology `cluster`, found from one seed at every step),
//!    where set, test and decommission reach all six.
//!
//! Per secret, a few warm-up rotations (not counted), then N rotations,
//! taking turns between the two sides of each pair so both see the same
//! machine. Each is the client-side time of one Rotate call (create, set,
//! test, finish). These kinds rotate one at a time, so previous is revoked
//! after each rotation with a forced Revoke, timed apart (it is the
//! decommission step: for the cluster, `<old` on six nodes).
//!
//! Run (release build): `cargo bench -p rekey-e2e --bench tls_topologies`
//!
//! Environment overrides (defaults in brackets):
//! `REKEY_BENCH_TLS_ROTATIONS` (100) measured rotations per secret.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use rekey_proto::v1 as pb;
use rekey_testkit::bench::{Table, env_usize, rotate, stats};
use rekey_testkit::{
    Backend, BackendOpts, Client, PgServer, RedisCluster, RedisOpts, RedisServer, TempDir,
    server_pki,
};

const WARMUP: usize = 3;
const OVERALL_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// The app user every Redis server declares; rekey gives it passwords.
const APP_USER: &str = "user app on ~* &* +@all\n";

struct Settings {
    rotations: usize,
}

fn main() {
    let settings = (|| {
        Ok(Settings {
            rotations: env_usize("REKEY_BENCH_TLS_ROTATIONS", 100, 1)?,
        })
    })();
    rekey_testkit::bench::main_with(settings, OVERALL_TIMEOUT, |s| async move { run(&s).await });
}

fn progress(msg: &str) {
    eprintln!("[bench] {msg}");
}

/// Revokes previous (forced); the client-side time.
async fn revoke_previous(c: &mut Client, id: &str) -> Result<Duration> {
    let s = c
        .get_secret(pb::GetSecretRequest {
            secret_id: id.into(),
            ..Default::default()
        })
        .await
        .context("GetSecret")?
        .into_inner()
        .secret
        .context("no secret")?;
    let t = Instant::now();
    c.revoke(pb::RevokeRequest {
        secret_id: id.into(),
        version: s.previous_version,
        force: true,
        reason: "benchmark: rotation time is measured one rotation at a time".into(),
    })
    .await
    .with_context(|| format!("revoke {id}"))?;
    Ok(t.elapsed())
}

/// `n` rotations of each of `ids`, taking turns, after the warm-up: the
/// rotation times and the revoke times per secret.
async fn take_turns(
    c: &mut Client,
    ids: &[&str],
    n: usize,
) -> Result<Vec<(Vec<Duration>, Vec<Duration>)>> {
    let mut out = vec![(Vec::with_capacity(n), Vec::with_capacity(n)); ids.len()];
    for i in 0..WARMUP + n {
        for (k, id) in ids.iter().enumerate() {
            let r = rotate(c, id).await?;
            let v = revoke_previous(c, id).await?;
            if i >= WARMUP {
                out[k].0.push(r);
                out[k].1.push(v);
            }
        }
    }
    Ok(out)
}

fn write(dir: &TempDir, name: &str, text: &str) -> String {
    rekey_testkit::write_file(dir.path(), name, text)
        .display()
        .to_string()
}

async fn run(s: &Settings) -> Result<String> {
    let dir = TempDir::new("bench-tls");
    let pki = dir.path().join("pki");
    std::fs::create_dir_all(&pki)?;
    server_pki(&pki);
    progress("starting two private PostgreSQL servers (plain, TLS only)");
    let plain = tokio::task::spawn_blocking(|| PgServer::start("bench-plain")).await?;
    let pki2 = pki.clone();
    let tls = tokio::task::spawn_blocking(move || PgServer::start_tls("bench-tls", &pki2)).await?;
    plain.app_database().await;
    tls.app_database().await;
    progress("starting one Redis server and a cluster of six");
    let single = tokio::task::spawn_blocking(|| {
        RedisServer::start(
            "bench-single",
            RedisOpts {
                extra: APP_USER.into(),
                ..RedisOpts::default()
            },
        )
    })
    .await?;
    let cluster =
        tokio::task::spawn_blocking(|| RedisCluster::start("bench-cluster", 3, 1, APP_USER))
            .await?;

    let b = Backend::start(dir.path(), BackendOpts::default());
    let pg_create = |id: &str, admin: &str| {
        b.cli_json(&[
            "create",
            id,
            "--kind",
            "postgres",
            "--admin-url-file",
            admin,
            "--group-role",
            "app_owner",
            "--role-base",
            "bench",
            "--database",
            "appdb",
            "--window",
            "30m",
        ]);
    };
    pg_create(
        "bench/pg-plain",
        &write(&dir, "pg-plain", &plain.admin_url("appdb")),
    );
    pg_create(
        "bench/pg-tls",
        &write(&dir, "pg-tls", &tls.admin_url("appdb")),
    );
    let redis_create = |id: &str, admin: &str, topology: &str| {
        b.cli_json(&[
            "create",
            id,
            "--kind",
            "redis",
            "--admin-url-file",
            admin,
            "--username",
            "app",
            "--topology",
            topology,
            "--window",
            "30m",
        ]);
    };
    redis_create(
        "bench/redis-1",
        &write(&dir, "redis-1", &single.admin_url()),
        "single",
    );
    redis_create(
        "bench/redis-6",
        &write(&dir, "redis-6", &cluster.nodes[0].admin_url()),
        "cluster",
    );

    let mut c = b.client().await;
    progress(&format!(
        "{} rotations of each Postgres secret, taking turns",
        s.rotations
    ));
    let pg = take_turns(&mut c, &["bench/pg-plain", "bench/pg-tls"], s.rotations).await?;
    progress(&format!(
        "{} rotations of each Redis secret, taking turns",
        s.rotations
    ));
    let redis = take_turns(&mut c, &["bench/redis-1", "bench/redis-6"], s.rotations).await?;

    let mut t = Table::stats("Rotate (create, set, test, finish)");
    t.stats_row("postgres, plain TCP", &stats(pg[0].0.clone()));
    t.stats_row("postgres, TLS (verify-full)", &stats(pg[1].0.clone()));
    t.stats_row("redis, 1 node", &stats(redis[0].0.clone()));
    t.stats_row("redis, cluster of 6 nodes", &stats(redis[1].0.clone()));
    let mut r = Table::stats("forced Revoke of previous (decommission)");
    r.stats_row("postgres, plain TCP", &stats(pg[0].1.clone()));
    r.stats_row("postgres, TLS (verify-full)", &stats(pg[1].1.clone()));
    r.stats_row("redis, 1 node", &stats(redis[0].1.clone()));
    r.stats_row("redis, cluster of 6 nodes", &stats(redis[1].1.clone()));
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    Ok(format!(
        "\nrekey rotation over TLS and across a Redis cluster, one run ({cpus} CPUs)\n\n{}\n{}",
        t.render(),
        r.render()
    ))
}
