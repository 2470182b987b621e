//! Benchmark of the `vault` value provider against a real OpenBao dev
//! server (`bao server -dev`, in-memory storage) on the same machine.
//!
//! 1. Rotate latency: one real `rekey-backend` (SQLite store) with a
//!    `[[providers]]` entry of type `vault` (token auth, KV v2 at
//!    `secret/`), and two `random` secrets: one in the embedded store, one
//!    in OpenBao. A few warm-up rotations of each (not counted), then N
//!    rotations of each, alternating, each the client-side time of one
//!    Rotate call over gRPC (create, set, test, finish; for the vault
//!    secret finish writes a KV version with check-and-set and updates its
//!    `custom_metadata`).
//! 2. Outside changes: the backend polls OpenBao every second
//!    (`poll_interval = "1s"`), a real `rekey-sidecar` writes the vault
//!    secret to a file, and OpenBao Agent (`bao agent`, token auto-auth,
//!    its default template settings) renders the same KV path to a file of
//!    its own. Per change: `bao kv put` with a new value; the time runs from
//!    the moment the put returned (the version is written) until the
//!    sidecar's file holds the new value (checked every 2 ms); between two
//!    changes a pause of 0 to 999 ms (379·i mod 1000), so that the puts
//!    fall at different points of the poll's second. After M
//!    changes (p50/p99), the program waits for the agent's file to show the
//!    last value, up to REKEY_BENCH_AGENT_WAIT_S seconds.
//!
//! Run (release build): `cargo bench -p rekey-e2e --bench vault`
//!
//! Environment overrides (defaults in brackets):
//! `REKEY_BENCH_VAULT_ROTATIONS` (200) measured rotations per store,
//! `REKEY_BENCH_OUTSIDE_CHANGES` (20) measured outside changes,
//! `REKEY_BENCH_AGENT_WAIT_S` (100) how long to wait for the agent.
//! A quick smoke run:
//! `REKEY_BENCH_VAULT_ROTATIONS=5 REKEY_BENCH_OUTSIDE_CHANGES=3 REKEY_BENCH_AGENT_WAIT_S=5 cargo bench -p rekey-e2e --bench vault`

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use rekey_testkit::bench::{Table, env_usize, ms, rotate_beside_embedded, stats};
use rekey_testkit::{Backend, BackendOpts, Bao, Sidecar, TempDir};

const WARMUP: usize = 5;
const OVERALL_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Bound on one change reaching the sidecar's file.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(20);

struct Settings {
    rotations: usize,
    changes: usize,
    agent_wait: Duration,
}

impl Settings {
    fn from_env() -> Result<Self> {
        Ok(Settings {
            rotations: env_usize("REKEY_BENCH_VAULT_ROTATIONS", 200, 1)?,
            changes: env_usize("REKEY_BENCH_OUTSIDE_CHANGES", 20, 1)?,
            agent_wait: Duration::from_secs(
                env_usize("REKEY_BENCH_AGENT_WAIT_S", 100, 1)?
                    .try_into()
                    .unwrap_or(100),
            ),
        })
    }
}

fn main() {
    rekey_testkit::bench::main_with(Settings::from_env(), OVERALL_TIMEOUT, |s| async move {
        run(&s).await
    });
}

fn progress(msg: &str) {
    eprintln!("[bench] {msg}");
}

fn wait_file(path: &Path, want: &str, timeout: Duration) -> Result<Duration> {
    let t = Instant::now();
    loop {
        if std::fs::read_to_string(path).is_ok_and(|s| s.trim_end() == want) {
            return Ok(t.elapsed());
        }
        ensure!(
            t.elapsed() < timeout,
            "{} did not show the new value within {timeout:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

async fn run(s: &Settings) -> Result<String> {
    let dir = TempDir::new("bench-vault");
    let bao = Bao::dev(dir.path());
    let token_file = dir.path().join("vault-token");
    std::fs::write(&token_file, &bao.root_token)?;
    let providers = format!(
        "[[providers]]\nname = \"vault-main\"\ntype = \"vault\"\naddress = \"{}\"\nauth = \"token\"\ntoken_file = \"{}\"\npoll_interval = \"1s\"\n",
        bao.addr,
        token_file.display()
    );
    let b = Backend::start(
        dir.path(),
        BackendOpts {
            extra_toml: providers,
            rust_log: Some("warn".into()),
            ..BackendOpts::default()
        },
    );
    progress(&format!("{} rotations per store", s.rotations));
    let t1 = rotate_beside_embedded(
        &b,
        "bench/vault",
        "vault-main",
        "vault (OpenBao KV v2)",
        WARMUP,
        s.rotations,
    )
    .await?;

    progress(&format!("{} outside changes", s.changes));
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out)?;
    let file = out.join("value");
    let _sc = Sidecar::watching(
        dir.path(),
        &b,
        "bench/vault",
        &file,
        &[("RUST_LOG", "warn")],
    );
    let agent_file = dir.path().join("agent-rendered");
    let agent = bao.agent_with(
        dir.path(),
        r#"{{ with secret "secret/data/rekey/bench/vault" }}{{ .Data.data.value }}{{ end }}"#,
        &agent_file,
        &bao.root_token,
        None,
    );
    let before = agent.wait_rendered();
    ensure!(!before.is_empty(), "the agent rendered nothing");
    let mut delivered = Vec::new();
    let mut last = String::new();
    let mut last_put = Instant::now();
    for i in 0..s.changes {
        last = format!("outside-change-{i}-{}", std::process::id());
        bao.ok(&[
            "kv",
            "put",
            "secret/rekey/bench/vault",
            &format!("value={last}"),
        ]);
        last_put = Instant::now();
        delivered.push(wait_file(&file, &last, DELIVERY_TIMEOUT)?);
        // Spread the puts over the poll's phase: a pause of 0 to 999 ms,
        // a different fraction of the interval each time.
        std::thread::sleep(Duration::from_millis((i as u64 * 379) % 1000));
    }
    let mut t2 = Table::stats("from `bao kv put` to the file");
    t2.stats_row("rekey-sidecar (poll_interval 1s)", &stats(delivered));
    let agent_line = match wait_file(&agent_file, &last, s.agent_wait) {
        Ok(_) => format!(
            "OpenBao Agent (default template settings): rendered the last change {} after its put",
            ms(last_put.elapsed())
        ),
        Err(_) => format!(
            "OpenBao Agent (default template settings): had not re-rendered {} s after the last put (its static-secret re-render interval is 5 minutes)",
            last_put.elapsed().as_secs()
        ),
    };
    Ok(format!(
        "Rotate latency, client side ({} rotations each):\n{}\nOutside change to file ({} changes):\n{}\n{agent_line}\n",
        s.rotations,
        t1.render(),
        s.changes,
        t2.render()
    ))
}
