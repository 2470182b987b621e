//! End to end: the real `rekey-backend` and `rekey` binaries on the embedded
//! SQLite store: the CLI lifecycle, restarts, crashes mid-rotation, Watch,
//! consumer reports and every bad input an operator is likely to type.

use std::time::Duration;

use rekey_proto::v1 as pb;
use rekey_testkit::*;
use serde_json::Value;
use tokio_stream::StreamExt;

fn ok(o: &std::process::Output) {
    assert!(o.status.success(), "command failed: {}", stderr(o));
}

/// Asserts a refusal or failure of the backend (exit status 1) with one
/// clear stderr line containing `needle`.
fn fails_with(o: &std::process::Output, needle: &str) {
    fails_with_status(o, 1, needle);
}

/// Asserts a usage error (exit status 2): something typed on the command
/// line was wrong, and nothing was sent.
fn usage_error(o: &std::process::Output, needle: &str) {
    fails_with_status(o, 2, needle);
}

fn fails_with_status(o: &std::process::Output, code: i32, needle: &str) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "expected exit status {code}: {}{}",
        stdout(o),
        stderr(o)
    );
    let err = stderr(o);
    assert!(err.starts_with("error: "), "stderr: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line expected: {err}"
    );
    assert!(err.contains(needle), "expected {needle:?} in {err}");
}

#[tokio::test]
async fn cli_lifecycle_create_rotate_rollback_revoke() {
    let dir = TempDir::new("life");
    let b = Backend::start(dir.path(), BackendOpts::default());

    let v1 = b.cli_json(&[
        "create",
        "prod/api/jwt",
        "--kind",
        "random",
        "--length",
        "16",
        "--encoding",
        "hex",
        "--window",
        "0s",
    ]);
    assert_eq!(v1["version"], 1);
    assert_eq!(v1["stages"], serde_json::json!(["current"]));
    assert_eq!(v1["state"], "active");
    assert!(v1.get("value").is_none(), "create must not print the value");

    let v2 = b.cli_json(&["rotate", "prod/api/jwt"]);
    assert_eq!(v2["version"], 2);
    assert_eq!(v2["stages"], serde_json::json!(["current"]));
    let created = v2["created_at"].as_str().unwrap();
    assert!(created.ends_with('Z') && created.len() == 24, "{created}");

    let versions = b.cli_json(&["versions", "prod/api/jwt"]);
    let arr = versions.as_array().unwrap();
    assert_eq!(arr.len(), 2);
    assert_eq!(arr[0]["version"], 2);
    assert_eq!(arr[1]["stages"], serde_json::json!(["previous"]));

    let cur = b.cli_json(&["get", "prod/api/jwt", "--reveal"]);
    let cur_val = cur["value"].as_str().unwrap().to_string();
    assert_eq!(cur_val.len(), 32);
    assert!(cur_val.chars().all(|c| c.is_ascii_hexdigit()));
    let prev = b.cli_json(&["get", "prod/api/jwt", "--stage", "previous", "--reveal"]);
    assert_ne!(prev["value"], cur["value"]);
    assert_eq!(prev["version"], 1);
    let meta = b.cli_json(&["get", "prod/api/jwt", "--version", "1"]);
    assert!(meta.get("value").is_none());

    // The human `get --reveal` prints only the value, for piping.
    let o = b.cli(&["get", "prod/api/jwt", "--reveal"]);
    ok(&o);
    assert_eq!(stdout(&o).trim(), cur_val);

    let rb = b.cli_json(&["rollback", "prod/api/jwt"]);
    assert_eq!(rb["version"], 1);
    assert_eq!(rb["stages"], serde_json::json!(["current"]));
    let after = b.cli_json(&["get", "prod/api/jwt", "--reveal"]);
    assert_eq!(after["value"], prev["value"]);

    // Window 0 and no consumers: previous (v2) may be revoked.
    let rv = b.cli_json(&["revoke", "prod/api/jwt", "--version", "2"]);
    assert_eq!(rv["state"], "revoked");
    let versions = b.cli_json(&["versions", "prod/api/jwt"]);
    assert_eq!(versions[0]["state"], "revoked");
    assert_eq!(versions[0]["stages"], serde_json::json!([]));

    let status = b.cli_json(&["status", "prod/api/jwt"]);
    assert_eq!(status[0]["current_version"], 1);
    assert_eq!(status[0]["previous_version"], Value::Null);
    assert_eq!(status[0]["rotation"]["step"], "finished");

    let o = b.cli(&["audit", "--verify"]);
    ok(&o);
    assert!(stdout(&o).contains("audit log intact"), "{}", stdout(&o));
    let audit = b.cli_json(&["audit", "--secret", "prod/api/jwt"]);
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "create", "rotate", "reveal", "reveal", "reveal", "rollback", "reveal", "revoke"
        ]
    );
    for e in audit.as_array().unwrap() {
        assert_eq!(e["actor"], "admin");
        assert!(!e["request_id"].as_str().unwrap().is_empty());
    }

    // Human tables.
    let o = b.cli(&["versions", "prod/api/jwt"]);
    ok(&o);
    let out = stdout(&o);
    assert!(out.starts_with("VERSION"), "{out}");
    assert!(out.contains("v1") && out.contains("current"), "{out}");
    let o = b.cli(&["status"]);
    ok(&o);
    assert!(
        stdout(&o).contains("prod/api/jwt (random)"),
        "{}",
        stdout(&o)
    );
}

#[tokio::test]
async fn static_and_encryption_key_imports_and_idempotent_rotate() {
    let dir = TempDir::new("import");
    let b = Backend::start(dir.path(), BackendOpts::default());
    let f1 = dir.path().join("v1");
    std::fs::write(&f1, "postgres://app:first@db/app").unwrap();
    b.cli_json(&[
        "create",
        "prod/api/database-url",
        "--kind",
        "static",
        "--value-file",
        f1.to_str().unwrap(),
    ]);
    let f2 = dir.path().join("v2");
    std::fs::write(&f2, "postgres://app:second@db/app").unwrap();
    let r1 = b.cli_json(&[
        "rotate",
        "prod/api/database-url",
        "--request-token",
        "t-1",
        "--value-file",
        f2.to_str().unwrap(),
    ]);
    assert_eq!(r1["version"], 2);
    assert_eq!(r1["replayed"], false);
    // A retry with the same token and input: same version, nothing new.
    let r2 = b.cli_json(&[
        "rotate",
        "prod/api/database-url",
        "--request-token",
        "t-1",
        "--value-file",
        f2.to_str().unwrap(),
    ]);
    assert_eq!(r2["version"], 2);
    assert_eq!(r2["replayed"], true);
    // Same token, different input: ALREADY_EXISTS.
    let o = b.cli(&[
        "rotate",
        "prod/api/database-url",
        "--request-token",
        "t-1",
        "--value-file",
        f1.to_str().unwrap(),
    ]);
    fails_with(&o, "already exists");
    assert_eq!(
        b.cli_json(&["versions", "prod/api/database-url"])
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let v = b.cli_json(&["get", "prod/api/database-url", "--reveal"]);
    assert_eq!(v["value"], "postgres://app:second@db/app");

    // A static secret needs a value to rotate to.
    let o = b.cli(&["rotate", "prod/api/database-url"]);
    fails_with(&o, "invalid argument");

    // Encryption keys: generated, or imported as base64 of 32 bytes.
    b.cli_json(&["create", "prod/enc/master", "--kind", "encryption-key"]);
    let k = b.cli_json(&["get", "prod/enc/master", "--reveal"]);
    let key = k["value"].as_str().unwrap();
    assert_eq!(key.len(), 44, "{key}");
    let good = dir.path().join("good.key");
    std::fs::write(&good, "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n").unwrap();
    let r = b.cli_json(&[
        "rotate",
        "prod/enc/master",
        "--value-file",
        good.to_str().unwrap(),
    ]);
    assert_eq!(r["version"], 2);
    let k = b.cli_json(&["get", "prod/enc/master", "--reveal"]);
    assert_eq!(k["value"], "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=");
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let dir = TempDir::new("bad");
    let b = Backend::start(dir.path(), BackendOpts::default());
    b.cli_json(&["create", "prod/x", "--kind", "random"]);
    let before = b.cli_json(&["versions", "prod/x"]);

    fails_with(
        &b.cli(&["rotate", "prod/unknown"]),
        "not found: secret prod/unknown",
    );
    fails_with(
        &b.cli(&["get", "prod/x", "--version", "9"]),
        "not found: version 9 of secret prod/x",
    );
    fails_with(
        &b.cli(&["revoke", "prod/x", "--version", "1"]),
        "v1 is the current version of prod/x",
    );
    fails_with(
        &b.cli(&["rollback", "prod/x"]),
        "prod/x has no previous version to roll back to",
    );
    usage_error(
        &b.cli(&["create", "prod/y", "--kind", "random", "--length", "0"]),
        "--length must be at least 1",
    );
    fails_with(
        &b.cli(&["create", "prod/y", "--kind", "random", "--length", "999999"]),
        "length must be between 1 and 4096",
    );
    fails_with(
        &b.cli(&[
            "create",
            "prod/y",
            "--kind",
            "random",
            "--encoding",
            "rot13",
        ]),
        "unknown encoding \"rot13\"",
    );
    fails_with(
        &b.cli(&["create", "prod/x", "--kind", "random"]),
        "already exists: secret prod/x",
    );
    fails_with(
        &b.cli(&["create", "../etc", "--kind", "random"]),
        "secret id",
    );
    fails_with(
        &b.cli(&[
            "create",
            "prod/y",
            "--kind",
            "random",
            "--schedule",
            "sometimes",
        ]),
        "five-field cron",
    );
    let short = dir.path().join("short.key");
    std::fs::write(&short, "c2hvcnQta2V5LW1hdGVyaWFs").unwrap();
    let o = b.cli(&[
        "create",
        "prod/enc",
        "--kind",
        "encryption-key",
        "--value-file",
        short.to_str().unwrap(),
    ]);
    fails_with(&o, "32 bytes");
    assert!(
        !stderr(&o).contains("c2hvcnQta2V5"),
        "the key must not be echoed"
    );
    usage_error(
        &b.cli(&[
            "create",
            "prod/enc",
            "--kind",
            "encryption-key",
            "--value-file",
            "/nonexistent/key",
        ]),
        "cannot read --value-file",
    );

    // Nothing changed.
    assert_eq!(b.cli_json(&["versions", "prod/x"]), before);
    let all = b.cli_json(&["list"]);
    assert_eq!(all.as_array().unwrap().len(), 1, "{all}");
    // Refusals are audited; the chain still verifies.
    let audit = b.cli_json(&["audit"]);
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["outcome"] == "not_found")
    );
    ok(&b.cli(&["audit", "--verify"]));

    // No backend at the address: a clear line, non-zero.
    let o = std::process::Command::new(CLI.path())
        .args(["--addr", "http://127.0.0.1:1", "--token", "x", "list"])
        .output()
        .unwrap();
    fails_with(&o, "unavailable: cannot reach rekey-backend");
}

/// The one rule of a forced revoke: it needs a reason. Tested on previous,
/// the only version a forced revoke is for (current is refused for another
/// reason), while the validation window still holds it back.
#[tokio::test]
async fn a_forced_revoke_needs_a_reason() {
    let dir = TempDir::new("force");
    let b = Backend::start(dir.path(), BackendOpts::default());
    b.cli_json(&["create", "prod/x", "--kind", "random", "--window", "1h"]);
    b.cli_json(&["rotate", "prod/x"]);
    let before = b.cli_json(&["versions", "prod/x"]);
    assert_eq!(before[1]["stages"], serde_json::json!(["previous"]));

    // Without --force, the window holds previous back.
    fails_with(
        &b.cli(&["revoke", "prod/x", "--version", "1"]),
        "previous v1 of prod/x cannot be decommissioned yet",
    );
    // --force with a blank reason: refused with exactly this line.
    let o = b.cli(&[
        "revoke",
        "prod/x",
        "--version",
        "1",
        "--force",
        "--reason",
        " ",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(
        stderr(&o),
        "error: invalid argument: a forced revoke needs a reason (--reason) for the audit log\n"
    );
    assert_eq!(
        b.cli_json(&["versions", "prod/x"]),
        before,
        "nothing changed"
    );

    // With a reason it goes through, and the reason is in the audit log.
    let rv = b.cli_json(&[
        "revoke",
        "prod/x",
        "--version",
        "1",
        "--force",
        "--reason",
        "key leaked in ticket 42",
    ]);
    assert_eq!(rv["state"], "revoked");
    let audit = b.cli_json(&["audit", "--secret", "prod/x"]);
    let revoke = audit
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "revoke" && e["outcome"] == "ok")
        .expect("the forced revoke is audited");
    assert!(
        revoke["detail"]
            .as_str()
            .unwrap()
            .contains("key leaked in ticket 42"),
        "{revoke}"
    );
}

#[tokio::test]
async fn bad_config_and_unreadable_kek_stop_the_backend_before_it_listens() {
    let dir = TempDir::new("cfg");
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "listen = \"nowhere\"\n[store]\nurll = \"x\"\n").unwrap();
    let o = std::process::Command::new(BACKEND.path())
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(err.contains("urll"), "{err}");
    assert!(stdout(&o).is_empty(), "must not listen");

    std::fs::write(
        &cfg,
        "listen = \"nowhere\"\nmetrics_listen = \"also-nowhere\"\n",
    )
    .unwrap();
    let o = std::process::Command::new(BACKEND.path())
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    let err = stderr(&o);
    // One "- setting: problem" item per line; "listen:" alone would also
    // match inside "metrics_listen:".
    let items: Vec<&str> = err
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- "))
        .collect();
    assert!(
        items.iter().any(|i| i.starts_with("listen: \"nowhere\"")),
        "listen is listed: {err}"
    );
    assert!(
        items
            .iter()
            .any(|i| i.starts_with("metrics_listen: \"also-nowhere\"")),
        "metrics_listen is listed: {err}"
    );

    let kek = dir.path().join("kek");
    std::fs::write(&kek, "bm90LTMyLWJ5dGVz").unwrap();
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\nmetrics_listen = \"off\"\ndata_dir = {:?}\n[kek]\nfile = {:?}\n",
            dir.path().join("d").display().to_string(),
            kek.display().to_string()
        ),
    )
    .unwrap();
    let o = std::process::Command::new(BACKEND.path())
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("kek.file") && err.contains("32 bytes"),
        "{err}"
    );
    assert!(!err.contains("bm90LTMy"), "{err}");
    assert!(stdout(&o).is_empty());

    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\nmetrics_listen = \"off\"\ndata_dir = {:?}\n[kek]\nfile = \"/nonexistent/kek\"\n",
            dir.path().join("d").display().to_string()
        ),
    )
    .unwrap();
    let o = std::process::Command::new(BACKEND.path())
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        stderr(&o).contains("cannot read kek.file /nonexistent/kek"),
        "{}",
        stderr(&o)
    );
}

#[tokio::test]
async fn a_restart_keeps_every_version_and_value() {
    let dir = TempDir::new("restart");
    let mut b = Backend::start(dir.path(), BackendOpts::default());
    b.cli_json(&["create", "prod/api/token", "--kind", "random"]);
    for _ in 0..3 {
        b.cli_json(&["rotate", "prod/api/token"]);
    }
    let versions = b.cli_json(&["versions", "prod/api/token"]);
    let cur = b.cli_json(&["get", "prod/api/token", "--reveal"]);
    let prev = b.cli_json(&["get", "prod/api/token", "--stage", "previous", "--reveal"]);
    assert_eq!(b.stop(), Some(0), "SIGTERM must exit 0");
    b.restart();
    assert_eq!(b.cli_json(&["versions", "prod/api/token"]), versions);
    assert_eq!(
        b.cli_json(&["get", "prod/api/token", "--reveal"])["value"],
        cur["value"]
    );
    assert_eq!(
        b.cli_json(&["get", "prod/api/token", "--stage", "previous", "--reveal"])["value"],
        prev["value"]
    );
    let next = b.cli_json(&["rotate", "prod/api/token"]);
    assert_eq!(
        next["version"], 5,
        "version numbers keep growing after a restart"
    );
}

/// kill -9 at each step of a rotation; after a restart the secret is
/// consistent: one current, no pending left behind, versions intact, and a
/// retry with the same request token returns the same version. The engine
/// pauses before each step (3 s); the test kills the backend once status
/// shows the rotation at the step it wants, and the restarted backend's log
/// confirms the step it resumed from.
#[tokio::test]
async fn kill_9_during_a_rotation_then_restart_leaves_a_consistent_secret() {
    for (round, step) in ["created", "set", "tested"].into_iter().enumerate() {
        let dir = TempDir::new("kill9");
        let mut b = Backend::start(
            dir.path(),
            BackendOpts {
                env: vec![("REKEY_ENGINE_STEP_DELAY".into(), "3s".into())],
                ..Default::default()
            },
        );
        b.cli_json(&["create", "prod/k", "--kind", "random"]);
        let v1 = b.cli_json(&["get", "prod/k", "--reveal"])["value"].clone();
        let mut rot = b.spawn_cli(&["rotate", "prod/k", "--request-token", "crash-1"]);
        let client = b.client().await;
        eventually(
            Duration::from_secs(30),
            &format!("the rotation to reach {step}"),
            || {
                let mut client = client.clone();
                async move {
                    let st = client
                        .get_status(pb::GetStatusRequest {
                            secret_id: "prod/k".into(),
                        })
                        .await
                        .ok()?
                        .into_inner();
                    let rot = st.secrets.first()?.rotation.as_ref()?;
                    (rot.target_version == 2 && rot.step == step).then_some(())
                }
            },
        )
        .await;
        drop(client);
        b.kill9();
        let _ = rot.wait();

        // Restart without the pause.
        b.opts.env.clear();
        b.restart();
        let status = eventually(Duration::from_secs(20), "recovery", || {
            let s = b.cli_json(&["status", "prod/k"]);
            async move { (s[0]["pending_version"] == Value::Null).then_some(s) }
        })
        .await;
        assert_eq!(
            status[0]["current_version"], 2,
            "round {round}: the interrupted rotation resumes: {status}"
        );
        assert_eq!(status[0]["previous_version"], 1, "round {round}");
        assert_eq!(status[0]["rotation"]["step"], "finished", "round {round}");
        let versions = b.cli_json(&["versions", "prod/k"]);
        let arr = versions.as_array().unwrap();
        assert_eq!(arr.len(), 2, "round {round}: {versions}");
        let currents = arr
            .iter()
            .filter(|v| {
                v["stages"]
                    .as_array()
                    .unwrap()
                    .contains(&Value::from("current"))
            })
            .count();
        assert_eq!(currents, 1);
        assert_eq!(
            b.cli_json(&["get", "prod/k", "--stage", "previous", "--reveal"])["value"],
            v1
        );
        // The client's retry gets the same version back.
        let retry = b.cli_json(&["rotate", "prod/k", "--request-token", "crash-1"]);
        assert_eq!(retry["version"], 2);
        assert_eq!(retry["replayed"], true);
        let log = b.log();
        assert!(
            log.lines()
                .any(|l| l.contains("resuming interrupted rotation")
                    && l.contains(&format!("step={step}"))),
            "round {round}: the kill landed at {step}: {log}"
        );
        ok(&b.cli(&["audit", "--verify"]));
    }
}

#[tokio::test]
async fn watch_sends_the_snapshot_then_each_change_and_status_shows_consumers() {
    let dir = TempDir::new("watch");
    let b = Backend::start(dir.path(), BackendOpts::default());
    b.cli_json(&[
        "create",
        "prod/api/key",
        "--kind",
        "random",
        "--window",
        "0s",
    ]);
    let mut client = b.client().await;
    let mut stream = client
        .watch(pb::WatchRequest {
            secret_ids: vec!["prod/api/key".into()],
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.unwrap().unwrap();
    assert!(first.snapshot);
    assert_eq!(first.current.as_ref().unwrap().version, 1);
    assert!(first.current.as_ref().unwrap().value.is_some());
    assert!(first.previous.is_none());

    b.cli_json(&["rotate", "prod/api/key"]);
    let ev = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("change within 5s")
        .unwrap()
        .unwrap();
    assert!(!ev.snapshot);
    assert_eq!(ev.current.as_ref().unwrap().version, 2);
    assert_eq!(
        ev.previous.as_ref().unwrap().version,
        1,
        "keyrings need previous"
    );
    assert!(ev.previous.as_ref().unwrap().value.is_some());

    // A consumer still on v1 holds decommission back.
    client
        .report_status(pb::ReportStatusRequest {
            consumer_id: "pod-a".into(),
            pod: "api-7d9f".into(),
            namespace: "prod".into(),
            secrets: vec![pb::ServedSecret {
                secret_id: "prod/api/key".into(),
                version: 1,
                healthy: true,
                error: String::new(),
            }],
            leaving: false,
        })
        .await
        .unwrap();
    let st = b.cli_json(&["status", "prod/api/key"]);
    assert_eq!(st[0]["live_consumers"], 1);
    assert_eq!(st[0]["converged_consumers"], 0);
    let blockers = st[0]["decommission_blockers"].to_string();
    assert!(blockers.contains("pod-a serves v1"), "{blockers}");
    let o = b.cli(&["revoke", "prod/api/key", "--version", "1"]);
    fails_with(&o, "pod-a serves v1");
    let o = b.cli(&["status", "prod/api/key"]);
    assert!(
        stdout(&o).contains("decommission held back by"),
        "{}",
        stdout(&o)
    );

    // Once it reports v2, previous is decommissioned automatically.
    client
        .report_status(pb::ReportStatusRequest {
            consumer_id: "pod-a".into(),
            pod: "api-7d9f".into(),
            namespace: "prod".into(),
            secrets: vec![pb::ServedSecret {
                secret_id: "prod/api/key".into(),
                version: 2,
                healthy: true,
                error: String::new(),
            }],
            leaving: false,
        })
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "automatic decommission", || {
        let v = b.cli_json(&["versions", "prod/api/key"]);
        async move { (v[1]["state"] == "revoked").then_some(()) }
    })
    .await;
    let ev = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("decommission reaches watchers")
        .unwrap()
        .unwrap();
    assert!(
        ev.previous.is_none(),
        "a revoked previous leaves the keyring"
    );
    let audit = b.cli_json(&["audit", "--secret", "prod/api/key"]);
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["actor"] == "decommission" && e["action"] == "revoke")
    );

    // Metrics: rotations, open streams, consumers per version (the gauges
    // follow reports at the next scheduler pass).
    let m = eventually(Duration::from_secs(10), "the consumer gauge", || {
        let m = http_get(&b.metrics, "/metrics");
        async move {
            m.contains("rekey_consumers{secret=\"prod/api/key\",version=\"2\"} 1")
                .then_some(m)
        }
    })
    .await;
    assert!(
        m.contains("rekey_rotations_total{kind=\"random\",outcome=\"ok\"} 1"),
        "{m}"
    );
    assert!(m.contains("rekey_watch_streams 1"), "{m}");
    assert!(
        m.contains("rekey_consumers{secret=\"prod/api/key\",version=\"2\"} 1"),
        "{m}"
    );
    assert!(m.contains("rekey_rotation_step_seconds_bucket"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_watch_streams_and_exits_zero() {
    let dir = TempDir::new("term");
    let mut b = Backend::start(dir.path(), BackendOpts::default());
    b.cli_json(&["create", "prod/api/key", "--kind", "random"]);
    let mut client = b.client().await;
    let mut stream = client
        .watch(pb::WatchRequest {
            secret_ids: vec!["prod/api/key".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(stream.next().await.unwrap().unwrap().snapshot);
    let code = tokio::task::spawn_blocking(move || {
        let code = b.stop();
        (code, b)
    });
    // The open stream ends instead of holding the server.
    let end = tokio::time::timeout(Duration::from_secs(15), stream.next())
        .await
        .expect("the stream ends at shutdown");
    assert!(!matches!(end, Some(Ok(_))), "no event after shutdown");
    let (code, b) = code.await.unwrap();
    assert_eq!(code, Some(0), "{}", b.log());
    assert!(b.log().contains("shutting down"));
    // Drained, not cut off: the backend says when the grace period ran
    // out and it closed connections still open.
    assert!(
        !b.log().contains("grace period over"),
        "the open stream held the server until the grace period ran out"
    );
}

#[tokio::test]
async fn grpc_health_and_reflection_answer_on_the_api_port() {
    let dir = TempDir::new("health");
    let b = Backend::start(dir.path(), BackendOpts::default());
    let ch = tonic::transport::Endpoint::from_shared(b.grpc.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    let r = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "rekey.v1.Rekey".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut refl = ServerReflectionClient::new(ch);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = refl
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let msg = resp.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"rekey.v1.Rekey".to_string()), "{names:?}");
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );
}

#[tokio::test]
async fn audit_verify_reports_an_edited_or_deleted_event() {
    let dir = TempDir::new("audit");
    let mut b = Backend::start(dir.path(), BackendOpts::default());
    b.cli_json(&["create", "prod/a", "--kind", "random"]);
    b.cli_json(&["rotate", "prod/a"]);
    b.cli_json(&["rotate", "prod/a"]);
    let v = b.cli_json(&["audit", "--verify"]);
    assert_eq!(v["ok"], true);
    assert_eq!(v["checked"], 3);
    b.stop();

    // Someone with database access rewrites who rotated.
    let db = dir.path().join("data").join("rekey.db");
    let edit = |sql: &str| {
        let url = format!("sqlite://{}", db.display());
        let sql = sql.to_string();
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async move {
                    use sqlx::Connection;
                    let mut c = sqlx::SqliteConnection::connect(&url).await.unwrap();
                    sqlx::query(&sql).execute(&mut c).await.unwrap();
                })
        })
        .join()
        .unwrap();
    };
    edit("UPDATE audit SET actor = 'someone-else' WHERE seq = 2");
    b.restart();
    let o = b.cli(&["audit", "--verify"]);
    assert_eq!(o.status.code(), Some(1));
    fails_with(&o, "audit log broken at event 2: event 2 was altered");
    b.stop();

    edit("UPDATE audit SET actor = 'admin' WHERE seq = 2");
    edit("DELETE FROM audit WHERE seq = 2");
    b.restart();
    let o = b.cli(&["audit", "--verify"]);
    fails_with(&o, "audit log broken at event 2: event 2 is missing");
}

#[tokio::test]
async fn json_logs_are_one_object_per_line_and_audit_events_are_logged() {
    let dir = TempDir::new("jsonlog");
    let b = Backend::start(
        dir.path(),
        BackendOpts {
            env: vec![("REKEY_LOG_FORMAT".into(), "json".into())],
            ..Default::default()
        },
    );
    b.cli_json(&["create", "prod/a", "--kind", "random"]);
    b.cli_json(&["rotate", "prod/a"]);
    let log = b.log();
    let mut audit_lines = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if v["target"] == "rekey::audit" {
            let ev: Value = serde_json::from_str(v["message"].as_str().unwrap()).unwrap();
            assert!(ev["hash"].as_str().unwrap().len() == 64);
            audit_lines += 1;
        }
    }
    assert_eq!(audit_lines, 2, "{log}");
}

/// A consumer that reports holds decommission back while it is live; once
/// it stops reporting for longer than the TTL it no longer counts, and
/// previous is decommissioned. While the test looks, a heartbeat keeps the
/// consumer live (every 200 ms against a 3 s TTL), so what it sees does not
/// depend on how fast the machine is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_that_stop_reporting_stop_counting() {
    let dir = TempDir::new("ttl");
    let b = Backend::start(
        dir.path(),
        BackendOpts {
            extra_toml: "[consumers]\nttl = \"3s\"\n[scheduler]\ntick = \"100ms\"\n".into(),
            ..Default::default()
        },
    );
    b.cli_json(&[
        "create",
        "prod/api/key",
        "--kind",
        "random",
        "--window",
        "0s",
    ]);
    b.cli_json(&["rotate", "prod/api/key"]);
    let client = b.client().await;
    let report = pb::ReportStatusRequest {
        consumer_id: "pod-gone".into(),
        pod: "api-1".into(),
        namespace: "prod".into(),
        secrets: vec![pb::ServedSecret {
            secret_id: "prod/api/key".into(),
            version: 1,
            healthy: true,
            error: String::new(),
        }],
        leaving: false,
    };
    let beating = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let heartbeat = {
        let (mut client, report, beating) = (client.clone(), report.clone(), beating.clone());
        tokio::spawn(async move {
            while beating.load(std::sync::atomic::Ordering::Relaxed) {
                client
                    .report_status(report.clone())
                    .await
                    .expect("report_status");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    // The gauge is set by a scheduler pass that saw the consumer live; the
    // same pass would have decommissioned previous (window 0) if nothing
    // held it back.
    eventually(Duration::from_secs(10), "the consumer gauge", || {
        let m = http_get(&b.metrics, "/metrics");
        async move {
            m.contains("rekey_consumers{secret=\"prod/api/key\",version=\"1\"} 1")
                .then_some(())
        }
    })
    .await;
    let st = b.cli_json(&["status", "prod/api/key"]);
    assert_eq!(st[0]["previous_version"], 1, "held back: {st}");
    assert_eq!(st[0]["consumers"][0]["consumer_id"], "pod-gone");
    assert_eq!(st[0]["consumers"][0]["live"], true, "{st}");
    let blockers = st[0]["decommission_blockers"].to_string();
    assert!(blockers.contains("pod-gone serves v1"), "{blockers}");
    let versions = b.cli_json(&["versions", "prod/api/key"]);
    assert_eq!(versions[1]["version"], 1);
    assert_eq!(versions[1]["state"], "active", "{versions}");

    // Silence: after the TTL the consumer stops counting.
    beating.store(false, std::sync::atomic::Ordering::Relaxed);
    heartbeat.await.unwrap();
    eventually(Duration::from_secs(20), "the silent consumer to stop counting", || {
        let v = b.cli_json(&["versions", "prod/api/key"]);
        let m = http_get(&b.metrics, "/metrics");
        async move {
            (v[1]["state"] == "revoked" && !m.contains("rekey_consumers{")).then_some(())
        }
    })
    .await;
    let st = b.cli_json(&["status", "prod/api/key"]);
    assert_eq!(st[0]["previous_version"], Value::Null, "{st}");
    assert_eq!(st[0]["consumers"][0]["live"], false);
    assert_eq!(st[0]["live_consumers"], 0);
    let audit = b.cli_json(&["audit", "--secret", "prod/api/key"]);
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["actor"] == "decommission" && e["action"] == "revoke"),
        "{audit}"
    );
}
