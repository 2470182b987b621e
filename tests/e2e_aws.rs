//! End to end: AWS Secrets Manager (ASM). moto's server stands in for ASM;
//! the stages are checked with the AWS SDK after every step.
//! - the `aws-secrets-manager` provider: the real `rekey-backend` keeps a
//!   secret's versions as ASM versions and moves `AWSCURRENT` /
//!   `AWSPREVIOUS`; a sidecar and an app reading ASM directly both see each
//!   new value; an outside `PutSecretValue` is delivered and audited;
//! - `rekey-lambda`, the rotation function, driven through the four steps
//!   by a stand-in of the Lambda Runtime API (there is no Lambda here),
//!   each step again, then every bad input; for the random, postgres (a
//!   private Postgres with password authentication) and redis kinds.
//!
//! moto differs from ASM in one way that matters here: after stage moves,
//! a read without a version id may see an older value, so every read
//! names the version.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use aws_sdk_secretsmanager::Client;
use rekey_testkit::*;
use serde_json::{Value, json};

const STEP: Duration = Duration::from_secs(60);

/// An SDK client for moto, as an app in the same account would have.
async fn sdk(moto: &Moto) -> Client {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(http)
        .region(aws_config::Region::new("eu-west-1"))
        .endpoint_url(moto.endpoint())
        .credentials_provider(aws_sdk_secretsmanager::config::Credentials::new(
            "testing", "testing", None, None, "test",
        ))
        .load()
        .await;
    Client::new(&conf)
}

/// `VersionIdsToStages`, sorted, without versions that carry no label.
async fn stages(c: &Client, name: &str) -> BTreeMap<String, Vec<String>> {
    let d = c.describe_secret().secret_id(name).send().await.unwrap();
    d.version_ids_to_stages
        .unwrap_or_default()
        .into_iter()
        .filter(|(_, s)| !s.is_empty())
        .map(|(v, mut s)| {
            s.sort();
            (v, s)
        })
        .collect()
}

/// Creates `name` in ASM with `value` as its first version, as an operator
/// would.
async fn new_secret(c: &Client, name: &str, value: impl Into<String>) {
    c.create_secret()
        .name(name)
        .secret_string(value)
        .send()
        .await
        .unwrap();
}

/// `PutSecretValue` by hand: a new `AWSCURRENT`.
async fn put_value(c: &Client, name: &str, value: impl Into<String>) {
    c.put_secret_value()
        .secret_id(name)
        .secret_string(value)
        .send()
        .await
        .unwrap();
}

/// The version holding `label`.
async fn holder(c: &Client, name: &str, label: &str) -> Option<String> {
    stages(c, name)
        .await
        .into_iter()
        .find(|(_, s)| s.iter().any(|l| l == label))
        .map(|(v, _)| v)
}

/// The value of one version.
async fn value(c: &Client, name: &str, version: &str) -> String {
    c.get_secret_value()
        .secret_id(name)
        .version_id(version)
        .send()
        .await
        .unwrap()
        .secret_string()
        .unwrap()
        .to_string()
}

/// What an app reading ASM directly gets: the `AWSCURRENT` version's value.
async fn current(c: &Client, name: &str) -> String {
    let v = holder(c, name, "AWSCURRENT").await.expect("an AWSCURRENT");
    value(c, name, &v).await
}

fn provider(moto: &Moto, poll: &str) -> String {
    format!(
        "[[providers]]\nname = \"aws-main\"\ntype = \"aws-secrets-manager\"\nregion = \"eu-west-1\"\nendpoint_url = \"{}\"\nname_prefix = \"rekey/\"\npoll_interval = \"{poll}\"\n",
        moto.endpoint()
    )
}

fn backend(dir: &Path, moto: &Moto, poll: &str) -> Backend {
    Backend::start(
        dir,
        BackendOpts {
            extra_toml: provider(moto, poll),
            env: moto.env(),
            ..BackendOpts::default()
        },
    )
}

fn reveal(b: &Backend, id: &str) -> String {
    b.cli_json(&["get", id, "--reveal"])["value"]
        .as_str()
        .unwrap()
        .to_string()
}

fn failed(o: &std::process::Output) -> String {
    assert!(!o.status.success(), "expected a failure: {}", stdout(o));
    stderr(o)
}

/// Waits until `f` holds, off the async workers.
fn settle(what: &str, timeout: Duration, f: impl FnMut() -> bool) {
    tokio::task::block_in_place(|| wait_for(what, timeout, f));
}

fn read_file(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asm_keeps_the_stages_through_rotate_rollback_decommission_and_outside_changes() {
    let dir = TempDir::new("asm-stages");
    let moto = Moto::start(dir.path());
    let c = sdk(&moto).await;
    let b = backend(dir.path(), &moto, "300ms");
    let name = "rekey/prod/api/key";

    let created = b.cli_json(&[
        "create",
        "prod/api/key",
        "--kind",
        "random",
        "--provider",
        "aws-main",
    ]);
    assert_eq!(created["provider"], "aws-main", "{created}");
    assert_eq!(created["provider_path"], name);
    let v1 = reveal(&b, "prod/api/key");
    let s = stages(&c, name).await;
    assert_eq!(s.len(), 1, "{s:?}");
    let (id1, labels) = s.into_iter().next().unwrap();
    assert_eq!(labels, ["AWSCURRENT"]);
    assert!(id1.starts_with("rekey-v1-0-"), "{id1}");
    assert_eq!(current(&c, name).await, v1);
    let d = c.describe_secret().secret_id(name).send().await.unwrap();
    assert!(
        d.tags()
            .iter()
            .any(|t| t.key() == Some("managed-by") && t.value() == Some("rekey"))
    );

    // An app reading through the sidecar.
    let file = dir.path().join("api-key");
    let _sidecar = Sidecar::watching(dir.path(), &b, "prod/api/key", &file, &[]);
    settle("the sidecar writes v1", Duration::from_secs(10), || {
        read_file(&file) == v1
    });

    let v2 = b.cli_json(&["rotate", "prod/api/key"]);
    assert_eq!(v2["version"], 2);
    let v2 = reveal(&b, "prod/api/key");
    let s = stages(&c, name).await;
    let id2 = holder(&c, name, "AWSCURRENT").await.unwrap();
    assert!(id2.starts_with("rekey-v2-0-"), "{s:?}");
    assert_eq!(s[&id1], ["AWSPREVIOUS"], "ASM moved AWSPREVIOUS: {s:?}");
    assert_eq!(s.len(), 2, "no AWSPENDING is left behind: {s:?}");
    assert_eq!(current(&c, name).await, v2);
    settle("the sidecar writes v2", Duration::from_secs(10), || {
        read_file(&file) == v2
    });

    // Rollback moves AWSCURRENT back.
    let rb = b.cli_json(&["rollback", "prod/api/key"]);
    assert_eq!(rb["version"], 1);
    let s = stages(&c, name).await;
    assert_eq!(s[&id1], ["AWSCURRENT"], "{s:?}");
    assert_eq!(s[&id2], ["AWSPREVIOUS"], "{s:?}");
    assert_eq!(current(&c, name).await, v1);
    settle("the sidecar is back on v1", Duration::from_secs(10), || {
        read_file(&file) == v1
    });

    // Decommission removes the old version's labels.
    b.cli_json(&[
        "revoke",
        "prod/api/key",
        "--version",
        "2",
        "--force",
        "--reason",
        "rolled back",
    ]);
    let s = stages(&c, name).await;
    assert!(!s.contains_key(&id2), "v2 keeps no label: {s:?}");
    assert_eq!(s[&id1], ["AWSCURRENT"]);

    // A new value put in ASM by hand (the console, the CLI) is delivered.
    put_value(&c, name, "set-by-hand-in-the-console").await;
    settle(
        "the outside change reaches the sidecar",
        Duration::from_secs(15),
        || read_file(&file) == "set-by-hand-in-the-console",
    );
    assert_eq!(reveal(&b, "prod/api/key"), "set-by-hand-in-the-console");
    let audit = b.cli_json(&["audit", "--secret", "prod/api/key"]);
    let ev = audit
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "outside-change")
        .unwrap_or_else(|| panic!("no outside-change in {audit}"));
    assert_eq!(ev["actor"], format!("external:aws-main:{name}"), "{ev}");
    assert!(
        ev["detail"]
            .as_str()
            .unwrap()
            .contains("became AWSCURRENT outside rekey"),
        "{ev}"
    );

    // The next rotation starts from the outside value and stages as usual.
    b.cli_json(&["rotate", "prod/api/key"]);
    let v = reveal(&b, "prod/api/key");
    assert_eq!(current(&c, name).await, v);

    // A secret scheduled for deletion in ASM is a problem shown in status,
    // not a value: the sidecar keeps the last good one.
    c.delete_secret()
        .secret_id(name)
        .recovery_window_in_days(7)
        .send()
        .await
        .unwrap();
    settle(
        "the problem shows in status",
        Duration::from_secs(15),
        || {
            b.cli_json(&["status", "prod/api/key"])[0]["provider_problem"]
                .as_str()
                .is_some_and(|p| p.contains("scheduled for deletion"))
        },
    );
    assert_eq!(read_file(&file), v);

    // No value in the backend's log.
    let log = b.all_logs();
    for secret in [
        v1.as_str(),
        v2.as_str(),
        v.as_str(),
        "set-by-hand-in-the-console",
    ] {
        assert!(!log.contains(secret), "a value in the log");
    }
}

/// A rotation whose finish finds `AWSCURRENT` moved by someone else moves
/// nothing: it is parked, its `AWSPENDING` is dropped, and the outside
/// value is taken at the next poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_that_races_an_outside_change_is_parked_and_the_change_taken() {
    let dir = TempDir::new("asm-race");
    let moto = Moto::start(dir.path());
    let c = sdk(&moto).await;
    let b = backend(dir.path(), &moto, "300ms");
    let (started, go) = (dir.path().join("set-started"), dir.path().join("go"));
    let hook = |name: &str, body: &str| write_hook(dir.path(), name, body);
    let create = hook("create", KEY_HOOK);
    let quick = hook("quick", "cat > /dev/null; echo '{}'");
    // set waits until the test says go.
    let set = hook(
        "set",
        &format!(
            "cat > /dev/null; touch {}; while [ ! -f {} ]; do sleep 0.05; done; echo '{{}}'",
            started.display(),
            go.display()
        ),
    );
    std::fs::write(&go, "").unwrap();
    b.cli_json(&[
        "create",
        "prod/agent/key",
        "--kind",
        "exec",
        "--hook-create",
        &create,
        "--hook-set",
        &set,
        "--hook-test",
        &quick,
        "--hook-revoke",
        &quick,
        "--hook-timeout",
        "30s",
        "--provider",
        "aws-main",
    ]);
    let name = "rekey/prod/agent/key";
    let v1 = holder(&c, name, "AWSCURRENT").await.unwrap();
    std::fs::remove_file(&go).unwrap();
    std::fs::remove_file(&started).unwrap();

    let rotating = b.spawn_cli(&["rotate", "prod/agent/key"]);
    settle("the set hook runs", Duration::from_secs(10), || {
        started.exists()
    });
    assert!(
        stages(&c, name)
            .await
            .values()
            .any(|l| l.iter().any(|x| x == "AWSPENDING")),
        "the new value waits as AWSPENDING"
    );
    put_value(&c, name, "moved-by-hand").await;
    std::fs::write(&go, "").unwrap();
    let o = tokio::task::block_in_place(|| rotating.wait_with_output()).unwrap();
    assert!(!o.status.success(), "the rotation failed");
    let st = b.cli_json(&["status", "prod/agent/key"]);
    let rotation = &st[0]["rotation"];
    assert_eq!(rotation["step"], "needs-attention", "{st}");
    let e = rotation["error"].as_str().unwrap();
    assert!(e.contains("changed outside rekey"), "{e}");
    assert!(e.contains("nothing was moved"), "{e}");

    // Parked, its pending value no longer AWSPENDING; the hand-made value
    // becomes current at the next poll.
    settle(
        "the outside change is taken",
        Duration::from_secs(10),
        || reveal(&b, "prod/agent/key") == "moved-by-hand",
    );
    let s = stages(&c, name).await;
    assert!(
        !s.values().any(|l| l.iter().any(|x| x == "AWSPENDING")),
        "{s:?}"
    );
    assert_eq!(current(&c, name).await, "moved-by-hand");
    let st = b.cli_json(&["status", "prod/agent/key"]);
    assert_eq!(st[0]["previous_version"], 1, "{st}");
    assert_ne!(holder(&c, name, "AWSCURRENT").await.unwrap(), v1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_adopts_an_existing_asm_secret_and_names_what_it_refuses() {
    let dir = TempDir::new("asm-adopt");
    let moto = Moto::start(dir.path());
    let c = sdk(&moto).await;
    let b = backend(dir.path(), &moto, "1h");

    new_secret(&c, "legacy/jwt", "the-jwt-secret-apps-use-today").await;
    let before = holder(&c, "legacy/jwt", "AWSCURRENT").await.unwrap();
    let o = b.cli(&[
        "create",
        "prod/jwt",
        "--kind",
        "random",
        "--provider",
        "aws-main",
        "--provider-path",
        "legacy/jwt",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(reveal(&b, "prod/jwt"), "the-jwt-secret-apps-use-today");
    assert_eq!(
        holder(&c, "legacy/jwt", "AWSCURRENT").await.unwrap(),
        before
    );
    let audit = b.cli_json(&["audit", "--secret", "prod/jwt"]);
    assert!(
        audit[0]["detail"].as_str().unwrap().contains(&format!(
            "adopted from aws-main: adopted version {before} of legacy/jwt"
        )),
        "{audit}"
    );
    // The first rotation leaves the adopted value as AWSPREVIOUS.
    b.cli_json(&["rotate", "prod/jwt"]);
    let s = stages(&c, "legacy/jwt").await;
    assert_eq!(s[&before], ["AWSPREVIOUS"], "{s:?}");

    // The backend polls hourly; `rekey sync` takes a change now.
    put_value(&c, "legacy/jwt", "set-in-the-console").await;
    let o = b.cli(&["sync", "prod/jwt"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o).trim(),
        "prod/jwt took a change made in aws-main: v3 is current"
    );
    assert_eq!(reveal(&b, "prod/jwt"), "set-in-the-console");
    let o = b.cli(&["sync", "prod/jwt"]);
    assert_eq!(
        stdout(&o).trim(),
        "prod/jwt is unchanged in aws-main (v3 is current)"
    );
    b.cli_json(&["create", "local/key", "--kind", "random"]);
    let e = failed(&b.cli(&["sync", "local/key"]));
    assert!(e.contains("lives in rekey's own store"), "{e}");
    // By provider path, as rekey-lambda asks: a caller that may not rotate
    // the secret there learns nothing about it.
    let by_path = |token: String, path: &'static str| {
        let grpc = b.grpc.clone();
        async move {
            client(&grpc, &token)
                .await
                .sync(rekey_proto::v1::SyncRequest {
                    secret_id: String::new(),
                    provider_path: path.into(),
                })
                .await
                .map(|r| r.into_inner().secret.unwrap().id)
                .map_err(|s| (s.code(), s.message().to_string()))
        }
    };
    assert_eq!(by_path(b.token(), "legacy/jwt").await.unwrap(), "prod/jwt");
    let other = b.cli_json(&[
        "token",
        "create",
        "other-team",
        "--prefix",
        "other/",
        "--ops",
        "rotate",
    ])["token"]
        .as_str()
        .unwrap()
        .to_string();
    let kept = by_path(other.clone(), "legacy/jwt").await.unwrap_err();
    let none = by_path(other, "nowhere/at/all").await.unwrap_err();
    assert_eq!(kept.0, tonic::Code::NotFound, "{kept:?}");
    assert_eq!(
        (kept.0, kept.1.replace("legacy/jwt", "P")),
        (none.0, none.1.replace("nowhere/at/all", "P")),
        "the same answer whether or not a secret is kept there"
    );

    // An identity that may create under other/ cannot adopt ASM secrets
    // rekey does not manage: one outside the provider's prefix, or one
    // under it that stands for a secret id it may not create. Nothing is
    // read or written there, and the kept path names no secret.
    new_secret(&c, "legacy/payments-key", "the-owners-key").await;
    new_secret(&c, "rekey/prod/payments", "the-owners-other-key").await;
    let squatter = dir.path().join("squatter.token");
    std::fs::write(
        &squatter,
        b.cli_json(&[
            "token",
            "create",
            "squatter",
            "--prefix",
            "other/",
            "--ops",
            "create,read,reveal,rotate",
        ])["token"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let before_squat = (
        holder(&c, "legacy/payments-key", "AWSCURRENT").await,
        holder(&c, "rekey/prod/payments", "AWSCURRENT").await,
    );
    for (path, want) in [
        (
            "legacy/payments-key",
            "outside the provider's prefix \"rekey/\"",
        ),
        ("rekey/prod/payments", "may not create prod/payments"),
        ("legacy/jwt", "outside the provider's prefix"),
    ] {
        let o = b.cli_with(
            &[
                "create",
                "other/mine",
                "--kind",
                "random",
                "--provider",
                "aws-main",
                "--provider-path",
                path,
            ],
            Some(&squatter),
        );
        let e = failed(&o);
        assert!(
            e.contains("permission denied") && e.contains(want),
            "{path}: {e}"
        );
        assert!(!e.contains("prod/jwt"), "{path}: names a secret: {e}");
    }
    assert_eq!(
        before_squat,
        (
            holder(&c, "legacy/payments-key", "AWSCURRENT").await,
            holder(&c, "rekey/prod/payments", "AWSCURRENT").await,
        ),
        "the owner's values stay"
    );
    failed(&b.cli(&["status", "other/mine"]));
    // Where rekey keeps a secret already, the answer names none.
    let e = failed(&b.cli(&[
        "create",
        "prod/jwt2",
        "--kind",
        "random",
        "--provider",
        "aws-main",
        "--provider-path",
        "legacy/jwt",
    ]));
    assert!(
        e.contains("keeps another rekey secret at legacy/jwt"),
        "{e}"
    );
    assert!(!e.contains("prod/jwt "), "{e}");

    // A structured value is a JSON object in SecretString; a value beside
    // an adopted one is refused.
    new_secret(&c, "legacy/db", r#"{"username": "app", "host": "db"}"#).await;
    let value_file = dir.path().join("value");
    std::fs::write(&value_file, "x").unwrap();
    let e = failed(&b.cli(&[
        "create",
        "prod/db",
        "--kind",
        "static",
        "--provider",
        "aws-main",
        "--provider-path",
        "legacy/db",
        "--value-file",
        value_file.to_str().unwrap(),
    ]));
    assert!(
        e.contains("already holds a value in aws-main; create adopts it"),
        "{e}"
    );
    let static_ok = b.cli_json(&[
        "create",
        "prod/db",
        "--kind",
        "static",
        "--provider",
        "aws-main",
        "--provider-path",
        "legacy/db",
    ]);
    assert_eq!(static_ok["version"], 1);
    let got = b.cli_json(&["get", "prod/db", "--reveal"]);
    assert_eq!(
        got["value"],
        json!({"username": "app", "host": "db"}),
        "{got}"
    );

    // A name ASM would refuse is refused before anything is written.
    let e = failed(&b.cli(&[
        "create",
        "x/y",
        "--kind",
        "random",
        "--provider",
        "aws-main",
        "--provider-path",
        "has space",
    ]));
    assert!(e.contains("is not a Secrets Manager secret name"), "{e}");

    // ASM out of reach: one clear line, nothing created.
    let dir2 = TempDir::new("asm-down");
    let down = Backend::start(
        dir2.path(),
        BackendOpts {
            extra_toml: format!(
                "[[providers]]\nname = \"aws-main\"\ntype = \"aws-secrets-manager\"\nregion = \"eu-west-1\"\nendpoint_url = \"http://127.0.0.1:{}\"\nrequest_timeout = \"2s\"\n",
                free_port()
            ),
            env: moto.env(),
            ..BackendOpts::default()
        },
    );
    let e = failed(&down.cli(&[
        "create",
        "a/b",
        "--kind",
        "random",
        "--provider",
        "aws-main",
    ]));
    assert!(e.contains("aws-main"), "{e}");
    assert!(
        e.contains("cannot reach Secrets Manager at http://127.0.0.1:"),
        "{e}"
    );
    let o = down.cli(&["get", "a/b"]);
    assert!(!o.status.success());
}

/// A secret in ASM with `value` as its `AWSCURRENT`, rotation enabled
/// with `ROTATION_LAMBDA_ARN`, and a rotation started under `token` (moto
/// then tries to invoke a function it does not have, after it labelled
/// the token `AWSPENDING`, as ASM does before it calls `createSecret`).
async fn rotation_ready(c: &Client, name: &str, value: &str, token: &str) {
    if c.describe_secret().secret_id(name).send().await.is_err() {
        new_secret(c, name, value).await;
    }
    start_rotation(c, name, token).await;
}

async fn start_rotation(c: &Client, name: &str, token: &str) {
    let r = c
        .rotate_secret()
        .secret_id(name)
        .client_request_token(token)
        .rotation_lambda_arn(ROTATION_LAMBDA_ARN)
        .rotation_rules(
            aws_sdk_secretsmanager::types::RotationRulesType::builder()
                .automatically_after_days(30)
                .build(),
        )
        .send()
        .await;
    // moto has no such function; ASM would invoke it now.
    assert!(r.is_err());
    let s = stages(c, name).await;
    assert_eq!(
        s.get(token).map(Vec::as_slice),
        Some(&["AWSPENDING".to_string()][..]),
        "{s:?}"
    );
}

fn event(step: &str, name: &str, token: &str) -> Value {
    json!({"Step": step, "SecretId": name, "ClientRequestToken": token})
}

/// Runs one step through the Runtime API stand-in.
fn invoke(rt: &LambdaRuntime, step: &str, name: &str, token: &str) -> Result<Value, LambdaError> {
    tokio::task::block_in_place(|| rt.invoke(event(step, name, token), STEP))
}

fn ok(rt: &LambdaRuntime, step: &str, name: &str, token: &str) -> String {
    match invoke(rt, step, name, token) {
        Ok(v) => v["Result"].as_str().unwrap_or_default().to_string(),
        Err(e) => panic!("{step} failed: {e:?}"),
    }
}

fn refused(rt: &LambdaRuntime, step: &str, name: &str, token: &str) -> LambdaError {
    match invoke(rt, step, name, token) {
        Ok(v) => panic!("{step} should fail: {v}"),
        Err(e) => e,
    }
}

const STEPS: [&str; 4] = ["createSecret", "setSecret", "testSecret", "finishSecret"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lambda_rotates_a_random_token_and_refuses_every_bad_input() {
    let dir = TempDir::new("lambda-random");
    let moto = Moto::start(dir.path());
    let c = sdk(&moto).await;
    let rt = LambdaRuntime::start();
    let f = LambdaFunction::start(
        dir.path(),
        &rt,
        &moto,
        &[
            ("REKEY_KIND", "random"),
            ("REKEY_LENGTH", "24"),
            ("REKEY_ENCODING", "hex"),
        ],
    );
    let name = "svc/agent-token";
    let t1 = "11111111-1111-4111-8111-111111111111";
    rotation_ready(&c, name, "the-first-token", t1).await;
    let first = holder(&c, name, "AWSCURRENT").await.unwrap();

    // The four steps in ASM's order, with the stages checked after each.
    ok(&rt, "createSecret", name, t1);
    let pending = value(&c, name, t1).await;
    assert_eq!(pending.len(), 48, "24 bytes as hex");
    assert!(pending.bytes().all(|b| b.is_ascii_hexdigit()));
    let s = stages(&c, name).await;
    assert_eq!(s[t1], ["AWSPENDING"], "{s:?}");
    assert_eq!(s[&first], ["AWSCURRENT"], "{s:?}");
    // Repeated: the pending value is kept.
    assert!(ok(&rt, "createSecret", name, t1).contains("there already"));
    assert_eq!(value(&c, name, t1).await, pending);
    for step in ["setSecret", "testSecret"] {
        ok(&rt, step, name, t1);
        assert_eq!(current(&c, name).await, "the-first-token", "{step}");
        assert_eq!(stages(&c, name).await[t1], ["AWSPENDING"]);
    }
    ok(&rt, "finishSecret", name, t1);
    let s = stages(&c, name).await;
    assert_eq!(s[t1], ["AWSCURRENT"], "{s:?}");
    assert_eq!(s[&first], ["AWSPREVIOUS"], "{s:?}");
    assert_eq!(current(&c, name).await, pending);
    // Each step again: the version is AWSCURRENT, nothing to do.
    for step in STEPS {
        assert_eq!(ok(&rt, step, name, t1), "already AWSCURRENT", "{step}");
    }
    assert_eq!(stages(&c, name).await, s);

    // Bad input: a clear error, and nothing moved.
    let e = refused(&rt, "rotateEverything", name, t1);
    assert_eq!(e.error_type, "UnknownStep", "{e:?}");
    let e = refused(
        &rt,
        "createSecret",
        name,
        "22222222-2222-4222-8222-222222222222",
    );
    assert_eq!(e.error_type, "UnknownToken", "{e:?}");
    assert!(
        e.message.contains("is not a version of svc/agent-token"),
        "{e:?}"
    );
    let e = refused(&rt, "setSecret", name, &first);
    assert_eq!(e.error_type, "NotPending", "{e:?}");
    // AWSPENDING moved to another version: the first token is no longer
    // the rotation's.
    let t2 = "33333333-3333-4333-8333-333333333333";
    let t3 = "44444444-4444-4444-8444-444444444444";
    start_rotation(&c, name, t2).await;
    start_rotation(&c, name, t3).await;
    let e = refused(&rt, "createSecret", name, t2);
    assert_eq!(e.error_type, "NotPending", "{e:?}");
    assert_eq!(stages(&c, name).await[t1], ["AWSCURRENT"]);

    // Rotation not enabled.
    new_secret(&c, "svc/unrotated", "x").await;
    let id = holder(&c, "svc/unrotated", "AWSCURRENT").await.unwrap();
    let e = refused(&rt, "createSecret", "svc/unrotated", &id);
    assert_eq!(e.error_type, "RotationNotEnabled", "{e:?}");

    // No AWSCURRENT anywhere.
    let t4 = "55555555-5555-4555-8555-555555555555";
    rotation_ready(&c, "svc/headless", "y", t4).await;
    let cur = holder(&c, "svc/headless", "AWSCURRENT").await.unwrap();
    c.update_secret_version_stage()
        .secret_id("svc/headless")
        .version_stage("AWSCURRENT")
        .remove_from_version_id(&cur)
        .send()
        .await
        .unwrap();
    let e = refused(&rt, "createSecret", "svc/headless", t4);
    assert_eq!(e.error_type, "NoCurrentVersion", "{e:?}");
    assert!(stages(&c, "svc/headless").await.contains_key(t4));

    // The log names steps and versions, never a value.
    let log = f.log();
    assert!(log.contains("finishSecret"), "{log}");
    assert!(!log.contains(&pending) && !log.contains("the-first-token"));

    // A function configured wrong fails every invocation, saying why.
    let rt2 = LambdaRuntime::start();
    let _bad = LambdaFunction::start(
        dir.path(),
        &rt2,
        &moto,
        &[("REKEY_KIND", "random"), ("REKEY_GROUP_ROLE", "app")],
    );
    let e = refused(&rt2, "createSecret", name, t3);
    assert_eq!(e.error_type, "Configuration", "{e:?}");
    assert!(
        e.message.contains("REKEY_GROUP_ROLE does not apply"),
        "{e:?}"
    );
}

/// Logs in with the credential JSON an app read from ASM.
async fn pg_login(pg: &PgServer, credential: &str) -> Result<(), String> {
    let v: Value = serde_json::from_str(credential).unwrap();
    pg.login(
        v["username"].as_str().unwrap(),
        v["password"].as_str().unwrap(),
        "appdb",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lambda_rotates_postgres_alternating_users_and_tells_the_backend() {
    let dir = TempDir::new("lambda-pg");
    let moto = Moto::start(dir.path());
    let c = sdk(&moto).await;
    let pg = PgServer::start("lambda");
    pg.app_database().await;
    pg.sql(
        "postgres",
        "CREATE ROLE app_b LOGIN PASSWORD 'initial-b-password' IN ROLE app_owner",
    )
    .await;
    // The admin credential as AWS's own templates keep it.
    let admin = json!({
        "engine": "postgres", "host": "127.0.0.1", "port": pg.port.to_string(),
        "username": "postgres", "password": pg.admin_password, "dbname": "appdb"
    });
    new_secret(&c, "admin/pg", admin.to_string()).await;
    let name = "app/db";
    let initial = json!({"username": "app_b", "password": "initial-b-password"}).to_string();

    // A backend delivers the secret to a sidecar; it polls ASM only hourly,
    // so only the function's call can bring the new value quickly.
    let b = backend(dir.path(), &moto, "1h");
    new_secret(&c, name, &initial).await;
    b.cli_json(&[
        "create",
        "app/db",
        "--kind",
        "static",
        "--provider",
        "aws-main",
        "--provider-path",
        name,
    ]);
    let file = dir.path().join("db.json");
    let _sidecar = Sidecar::start(
        dir.path(),
        &[
            "--backend",
            &b.grpc,
            "--token-file",
            &b.token_path().to_string_lossy(),
            "--secret",
            &format!("app/db:{}:json", file.display()),
            "--listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    settle(
        "the sidecar writes the initial credential",
        Duration::from_secs(10),
        || read_file(&file).contains("initial-b-password"),
    );
    // The backend token lives in ASM too.
    new_secret(&c, "rekey/backend-token", b.token()).await;

    let rt = LambdaRuntime::start();
    let port = pg.port.to_string();
    let settings = [
        ("REKEY_KIND", "postgres"),
        ("REKEY_ADMIN_SECRET_ID", "admin/pg"),
        ("REKEY_GROUP_ROLE", "app_owner"),
        ("REKEY_ROLE_BASE", "app"),
        ("REKEY_DATABASE", "appdb"),
        ("REKEY_PORT", port.as_str()),
        ("REKEY_BACKEND", b.grpc.as_str()),
        ("REKEY_BACKEND_TOKEN_SECRET_ID", "rekey/backend-token"),
    ];
    let f = LambdaFunction::start(dir.path(), &rt, &moto, &settings);
    let t1 = "aaaaaaaa-1111-4111-8111-111111111111";
    rotation_ready(&c, name, &initial, t1).await;
    let old = holder(&c, name, "AWSCURRENT").await.unwrap();

    ok(&rt, "createSecret", name, t1);
    let pending: Value = serde_json::from_str(&value(&c, name, t1).await).unwrap();
    assert_eq!(pending["username"], "app_a", "the idle user");
    assert_eq!(pending["database"], "appdb");
    ok(&rt, "setSecret", name, t1);
    // Both work while AWSCURRENT is still the old one.
    pg_login(&pg, &pending.to_string()).await.unwrap();
    pg_login(&pg, &current(&c, name).await).await.unwrap();
    ok(&rt, "testSecret", name, t1);
    ok(&rt, "setSecret", name, t1);
    let finished = ok(&rt, "finishSecret", name, t1);
    assert!(finished.contains("the rekey backend has it"), "{finished}");
    let s = stages(&c, name).await;
    assert_eq!(s[t1], ["AWSCURRENT"], "{s:?}");
    assert_eq!(s[&old], ["AWSPREVIOUS"], "{s:?}");
    // The app reading ASM directly and the one reading the sidecar's file
    // both have a working credential; the old one keeps working too.
    pg_login(&pg, &current(&c, name).await).await.unwrap();
    pg_login(&pg, &initial).await.unwrap();
    settle(
        "the sidecar has app_a at once",
        Duration::from_secs(5),
        || read_file(&file).contains("\"app_a\""),
    );
    pg_login(&pg, &read_file(&file)).await.unwrap();
    let audit = b.cli_json(&["audit", "--secret", "app/db"]);
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "outside-change" && e["actor"] == "external:aws-main:app/db"),
        "{audit}"
    );

    // A rotation whose set fails (the admin credential is wrong) leaves
    // AWSCURRENT alone and AWSPENDING where ASM's retry expects it.
    let t2 = "bbbbbbbb-2222-4222-8222-222222222222";
    start_rotation(&c, name, t2).await;
    ok(&rt, "createSecret", name, t2);
    let mut wrong = admin.clone();
    wrong["password"] = json!("not-the-admin-password");
    put_value(&c, "admin/pg", wrong.to_string()).await;
    let e = refused(&rt, "setSecret", name, t2);
    assert_eq!(e.error_type, "SetFailed", "{e:?}");
    assert!(!e.message.contains("not-the-admin-password"), "{e:?}");
    let s = stages(&c, name).await;
    assert_eq!(s[t1], ["AWSCURRENT"], "{s:?}");
    assert_eq!(s[t2], ["AWSPENDING"], "{s:?}");
    pg_login(&pg, &current(&c, name).await).await.unwrap();
    // ASM retries once the credential is fixed.
    put_value(&c, "admin/pg", admin.to_string()).await;
    for step in ["setSecret", "testSecret", "finishSecret"] {
        ok(&rt, step, name, t2);
    }
    let now: Value = serde_json::from_str(&current(&c, name).await).unwrap();
    assert_eq!(now["username"], "app_b", "users alternate");
    pg_login(&pg, &now.to_string()).await.unwrap();

    // A test step that fails (the probe cannot run) moves nothing.
    let rt2 = LambdaRuntime::start();
    let mut probing = settings.to_vec();
    probing.retain(|(k, _)| !k.starts_with("REKEY_BACKEND"));
    probing.push(("REKEY_PROBE", "SELECT * FROM no_such_table"));
    let _f2 = LambdaFunction::start(dir.path(), &rt2, &moto, &probing);
    let t3 = "cccccccc-3333-4333-8333-333333333333";
    start_rotation(&c, name, t3).await;
    ok(&rt2, "createSecret", name, t3);
    ok(&rt2, "setSecret", name, t3);
    let e = refused(&rt2, "testSecret", name, t3);
    assert_eq!(e.error_type, "TestFailed", "{e:?}");
    assert!(e.message.contains("no_such_table"), "{e:?}");
    let s = stages(&c, name).await;
    assert_eq!(s[t2], ["AWSCURRENT"], "{s:?}");
    assert_eq!(s[t3], ["AWSPENDING"], "{s:?}");
    pg_login(&pg, &current(&c, name).await).await.unwrap();

    let log = f.log();
    for secret in [pending["password"].as_str().unwrap(), &pg.admin_password] {
        assert!(!log.contains(secret), "a secret in the function's log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lambda_rotates_a_redis_user_keeping_two_passwords_at_most() {
    let dir = TempDir::new("lambda-redis");
    let moto = Moto::start(dir.path());
    let c = sdk(&moto).await;
    let user = format!("rk_lambda_{}", std::process::id());
    let _cleanup = RedisUsers(vec![user.clone()]);
    assert_eq!(
        redis_cli(&[
            "ACL",
            "SETUSER",
            &user,
            "on",
            ">first-password",
            "~*",
            "+@all"
        ]),
        "OK"
    );
    new_secret(
        &c,
        "admin/redis",
        json!({"url": "redis://127.0.0.1:6379"}).to_string(),
    )
    .await;
    let rt = LambdaRuntime::start();
    let f = LambdaFunction::start(
        dir.path(),
        &rt,
        &moto,
        &[
            ("REKEY_KIND", "redis"),
            ("REKEY_ADMIN_SECRET_ID", "admin/redis"),
            ("REKEY_USERNAME", &user),
            ("REKEY_ADDRESS", "127.0.0.1:6379"),
            // A backend that is down: the rotation still completes in ASM.
            (
                "REKEY_BACKEND",
                &format!("http://127.0.0.1:{}", free_port()),
            ),
            ("REKEY_BACKEND_TOKEN", "backend-token-never-logged"),
        ],
    );
    let name = "app/redis";
    let first = json!({"username": user, "password": "first-password"}).to_string();
    let mut passwords = vec!["first-password".to_string()];
    for (i, token) in [
        "dddddddd-1111-4111-8111-111111111111",
        "dddddddd-2222-4222-8222-222222222222",
    ]
    .iter()
    .enumerate()
    {
        rotation_ready(&c, name, &first, token).await;
        for step in STEPS {
            ok(&rt, step, name, token);
            // What an app reading ASM has works at every step.
            let cur: Value = serde_json::from_str(&current(&c, name).await).unwrap();
            assert!(
                redis_auth(&user, cur["password"].as_str().unwrap()),
                "{step}"
            );
        }
        let cur: Value = serde_json::from_str(&current(&c, name).await).unwrap();
        passwords.push(cur["password"].as_str().unwrap().to_string());
        // The previous password still works; the one before it is gone.
        assert!(redis_auth(&user, &passwords[i]), "previous works");
        if i > 0 {
            assert!(!redis_auth(&user, &passwords[i - 1]), "two back is removed");
        }
    }
    let log = f.log();
    assert!(
        log.contains("the rekey backend takes the new version at its next poll"),
        "{log}"
    );
    for p in passwords
        .iter()
        .map(String::as_str)
        .chain(["backend-token-never-logged"])
    {
        assert!(!log.contains(p), "a secret in the function's log");
    }
}

/// A Lambda custom runtime on `provided.al2023` has glibc 2.34: the
/// function must need nothing newer, and no library beyond libc, libm and
/// libgcc_s.
#[test]
fn rekey_lambda_runs_on_provided_al2023() {
    let bin = LAMBDA.path();
    let o = std::process::Command::new("objdump")
        .arg("-T")
        .arg(&bin)
        .output()
        .expect("objdump (binutils) is needed to read the binary's symbol versions");
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    let newest = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
        .filter_map(|w| w.strip_prefix("GLIBC_"))
        .filter_map(|v| {
            let mut p = v.split('.').map(|n| n.parse::<u32>().ok());
            Some((p.next()??, p.next().flatten().unwrap_or(0)))
        })
        .max()
        .expect("glibc symbols");
    assert!(newest <= (2, 34), "needs GLIBC_{}.{}", newest.0, newest.1);
    let o = std::process::Command::new("objdump")
        .arg("-p")
        .arg(&bin)
        .output()
        .unwrap();
    for line in stdout(&o)
        .lines()
        .filter(|l| l.trim_start().starts_with("NEEDED"))
    {
        let lib = line.split_whitespace().nth(1).unwrap_or_default();
        assert!(
            [
                "libc.so.6",
                "libm.so.6",
                "libgcc_s.so.1",
                "ld-linux-x86-64.so.2"
            ]
            .contains(&lib),
            "{lib} is not on provided.al2023"
        );
    }
}
