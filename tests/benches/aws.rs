//! Benchmark of AWS Secrets Manager support against moto's server (an ASM
//! stand-in, in-memory, on the same machine).
//!
//! 1. Rotate latency: one real `rekey-backend` (SQLite store) with an
//!    `aws-secrets-manager` provider pointing at moto, and two `random`
//!    secrets: one in the embedded store, one in ASM. A few warm-up
//!    rotations of each (not counted), then N rotations of each,
//!    alternating, each the client-side time of one Rotate call over gRPC
//!    (for the ASM secret: `PutSecretValue` as `AWSPENDING`, then
//!    `DescribeSecret` and `UpdateSecretVersionStage` at finish).
//! 2. `rekey-lambda` cold start: K times, a new `rekey-lambda` process
//!    against a new stand-in of the Lambda Runtime API, with a
//!    `createSecret` event queued as the process starts; the time from
//!    spawning the process to its first poll of the Runtime API, and to its
//!    first response (which includes that `createSecret`).
//! 3. Step times: M rotations through one warm `rekey-lambda` per kind,
//!    each step the time from queueing the event to the function's
//!    response, for the `random` kind and the `postgres` kind (alternating
//!    users on a private Postgres with SCRAM password authentication; the
//!    admin credential read from ASM at each step).
//!
//! Run (release build): `cargo bench -p rekey-e2e --bench aws`
//!
//! Environment overrides (defaults in brackets):
//! `REKEY_BENCH_AWS_ROTATIONS` (200) measured rotations per store,
//! `REKEY_BENCH_LAMBDA_STARTS` (20) cold starts,
//! `REKEY_BENCH_LAMBDA_ROTATIONS` (30) rotations per kind through the function.
//! A quick smoke run:
//! `REKEY_BENCH_AWS_ROTATIONS=5 REKEY_BENCH_LAMBDA_STARTS=2 REKEY_BENCH_LAMBDA_ROTATIONS=2 cargo bench -p rekey-e2e --bench aws`

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};
use rekey_testkit::bench::{Table, env_usize, rotate_beside_embedded, stats};
use rekey_testkit::{
    Backend, BackendOpts, LambdaFunction, LambdaRuntime, Moto, PgServer, ROTATION_LAMBDA_ARN,
    TempDir,
};
use serde_json::{Value, json};

const WARMUP: usize = 5;
const OVERALL_TIMEOUT: Duration = Duration::from_secs(30 * 60);
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
const STEPS: [&str; 4] = ["createSecret", "setSecret", "testSecret", "finishSecret"];

struct Settings {
    rotations: usize,
    starts: usize,
    lambda_rotations: usize,
}

impl Settings {
    fn from_env() -> Result<Self> {
        Ok(Settings {
            rotations: env_usize("REKEY_BENCH_AWS_ROTATIONS", 200, 1)?,
            starts: env_usize("REKEY_BENCH_LAMBDA_STARTS", 20, 1)?,
            lambda_rotations: env_usize("REKEY_BENCH_LAMBDA_ROTATIONS", 30, 1)?,
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

/// A Secrets Manager call to moto; its error as text.
fn asm(moto: &Moto, action: &str, req: &Value) -> Result<Value> {
    moto.secrets_manager(action, req)
        .map_err(|e| anyhow!("{action}: {e}"))
}

/// Starts a rotation of `name` under `token` the way ASM does before it
/// calls the function: moto labels the token `AWSPENDING`, then fails to
/// invoke a function it does not have.
fn start_rotation(moto: &Moto, name: &str, token: &str) -> Result<()> {
    let _ = moto.secrets_manager(
        "RotateSecret",
        &json!({"SecretId": name, "ClientRequestToken": token,
                "RotationLambdaARN": ROTATION_LAMBDA_ARN,
                "RotationRules": {"AutomaticallyAfterDays": 30}}),
    );
    let d = asm(moto, "DescribeSecret", &json!({"SecretId": name}))?;
    ensure!(
        d["VersionIdsToStages"][token]
            .as_array()
            .is_some_and(|s| s.iter().any(|l| l == "AWSPENDING")),
        "moto did not label {token} AWSPENDING: {d}"
    );
    Ok(())
}

fn token(kind: &str, i: usize) -> String {
    format!("rekey-bench-{kind}-{i:06}-0000000000000000")
}

fn invoke(rt: &LambdaRuntime, step: &str, name: &str, token: &str) -> Result<Duration> {
    let ev = json!({"Step": step, "SecretId": name, "ClientRequestToken": token});
    let t = Instant::now();
    rt.invoke(ev, STEP_TIMEOUT)
        .map_err(|e| anyhow!("{step} of {name}: {e:?}"))?;
    Ok(t.elapsed())
}

async fn run(s: &Settings) -> Result<String> {
    let dir = TempDir::new("bench-aws");
    let moto = Moto::start(dir.path());
    let mut out = String::new();

    // 1. Rotate latency beside the embedded store.
    let providers = format!(
        "[[providers]]\nname = \"aws-main\"\ntype = \"aws-secrets-manager\"\nregion = \"eu-west-1\"\nendpoint_url = \"{}\"\npoll_interval = \"1h\"\n",
        moto.endpoint()
    );
    let b = Backend::start(
        dir.path(),
        BackendOpts {
            extra_toml: providers,
            env: moto.env(),
            rust_log: Some("warn".into()),
            ..BackendOpts::default()
        },
    );
    progress(&format!("{} rotations per store", s.rotations));
    let t1 = rotate_beside_embedded(
        &b,
        "bench/asm",
        "aws-main",
        "aws-secrets-manager (moto)",
        WARMUP,
        s.rotations,
    )
    .await?;
    out.push_str(&format!(
        "Rotate latency, client side ({} rotations each):\n{}\n",
        s.rotations,
        t1.render()
    ));

    // 2. Cold starts.
    progress(&format!("{} cold starts", s.starts));
    asm(
        &moto,
        "CreateSecret",
        &json!({"Name": "bench/cold", "SecretString": "initial"}),
    )?;
    let (mut to_poll, mut to_answer) = (Vec::new(), Vec::new());
    for i in 0..s.starts {
        let t = token("cold", i);
        start_rotation(&moto, "bench/cold", &t)?;
        let rt = LambdaRuntime::start();
        let f = LambdaFunction::start(
            dir.path(),
            &rt,
            &moto,
            &[("REKEY_KIND", "random"), ("RUST_LOG", "warn")],
        );
        invoke(&rt, "createSecret", "bench/cold", &t)?;
        let answered = f.started.elapsed();
        let polled = rt
            .first_poll()
            .context("the function never polled")?
            .duration_since(f.started);
        to_poll.push(polled);
        to_answer.push(answered);
    }
    let mut t2 = Table::stats("rekey-lambda, from process start");
    t2.stats_row("to its first poll of the Runtime API", &stats(to_poll));
    t2.stats_row("to its first response (createSecret)", &stats(to_answer));
    out.push_str(&format!(
        "\nCold start ({} starts, random kind):\n{}\n",
        s.starts,
        t2.render()
    ));

    // 3. Step times per kind.
    let pg = PgServer::start("bench-lambda");
    pg.app_database().await;
    let admin = json!({"engine": "postgres", "host": "127.0.0.1", "port": pg.port.to_string(),
                       "username": "postgres", "password": pg.admin_password, "dbname": "appdb"});
    asm(
        &moto,
        "CreateSecret",
        &json!({"Name": "bench/pg-admin", "SecretString": admin.to_string()}),
    )?;
    let port = pg.port.to_string();
    let kinds: [(&str, Vec<(&str, &str)>); 2] = [
        ("random", vec![("REKEY_KIND", "random")]),
        (
            "postgres",
            vec![
                ("REKEY_KIND", "postgres"),
                ("REKEY_ADMIN_SECRET_ID", "bench/pg-admin"),
                ("REKEY_GROUP_ROLE", "app_owner"),
                ("REKEY_ROLE_BASE", "app"),
                ("REKEY_DATABASE", "appdb"),
                ("REKEY_PORT", port.as_str()),
            ],
        ),
    ];
    let mut t3 = Table::stats("kind / step");
    for (kind, settings) in &kinds {
        progress(&format!(
            "{} rotations through rekey-lambda, {kind}",
            s.lambda_rotations
        ));
        let name = format!("bench/{kind}");
        asm(
            &moto,
            "CreateSecret",
            &json!({"Name": name, "SecretString": json!({"username": "none", "password": "none"}).to_string()}),
        )?;
        let rt = LambdaRuntime::start();
        let mut env = settings.clone();
        env.push(("RUST_LOG", "warn"));
        let _f = LambdaFunction::start(dir.path(), &rt, &moto, &env);
        let mut times: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
        for i in 0..(WARMUP + s.lambda_rotations) {
            let t = token(kind, i);
            start_rotation(&moto, &name, &t)?;
            for step in STEPS {
                let d = invoke(&rt, step, &name, &t)?;
                if i >= WARMUP {
                    times.entry(step).or_default().push(d);
                }
            }
        }
        for step in STEPS {
            let v = times.remove(step).unwrap_or_default();
            t3.stats_row(&format!("{kind} {step}"), &stats(v));
        }
    }
    out.push_str(&format!(
        "\nrekey-lambda step times, event queued to response ({} rotations per kind, warm function):\n{}\n",
        s.lambda_rotations,
        t3.render()
    ));
    Ok(out)
}
