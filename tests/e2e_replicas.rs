//! End to end on Postgres: several backend replicas on one database (Watch
//! fan-out through LISTEN/NOTIFY, one scheduler firing per due time), and
//! crash recovery on the Postgres store. Each test gets a fresh database on
//! the machine's server at 127.0.0.1:5432.

use std::time::Duration;

use rekey_proto::v1 as pb;
use rekey_testkit::*;
use serde_json::Value;
use tokio_stream::StreamExt;

/// Two replicas sharing one database, KEK and admin token.
fn replicas(dir: &TempDir, db: &PgDb, extra: &str) -> (Backend, Backend) {
    let mut both = Backend::start_replicas(dir.path(), db, 2, extra);
    let b = both.pop().expect("two replicas");
    let a = both.pop().expect("two replicas");
    (a, b)
}

async fn next_current(s: &mut tonic::Streaming<pb::WatchEvent>) -> u64 {
    let ev = tokio::time::timeout(Duration::from_secs(10), s.next())
        .await
        .expect("a Watch event within 10s")
        .expect("stream open")
        .expect("event");
    ev.current.unwrap().version
}

#[tokio::test]
async fn a_rotation_through_one_replica_reaches_watch_streams_on_both() {
    let dir = TempDir::new("replicas");
    let db = PgDb::create("fanout").await;
    let (a, b) = replicas(&dir, &db, "");
    a.cli_json(&["create", "prod/api/key", "--kind", "random"]);
    let mut ca = a.client().await;
    let mut cb = b.client().await;
    let req = || pb::WatchRequest {
        secret_ids: vec!["prod/api/key".into()],
    };
    let mut sa = ca.watch(req()).await.unwrap().into_inner();
    let mut sb = cb.watch(req()).await.unwrap().into_inner();
    assert_eq!(next_current(&mut sa).await, 1);
    assert_eq!(next_current(&mut sb).await, 1);

    a.cli_json(&["rotate", "prod/api/key"]);
    assert_eq!(next_current(&mut sa).await, 2);
    assert_eq!(
        next_current(&mut sb).await,
        2,
        "NOTIFY carried the change to replica b"
    );

    b.cli_json(&["rotate", "prod/api/key"]);
    assert_eq!(next_current(&mut sb).await, 3);
    assert_eq!(next_current(&mut sa).await, 3);

    // Both replicas see one history, and one hash chain.
    assert_eq!(
        a.cli_json(&["versions", "prod/api/key"]),
        b.cli_json(&["versions", "prod/api/key"])
    );
    let o = b.cli(&["audit", "--verify"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[tokio::test]
async fn a_scheduled_rotation_fires_exactly_once_across_replicas() {
    let dir = TempDir::new("sched");
    let db = PgDb::create("sched").await;
    let (a, b) = replicas(&dir, &db, "[scheduler]\ntick = \"50ms\"\n");
    let at = chrono_like_now_plus(1500);
    a.cli_json(&[
        "create",
        "prod/api/cron",
        "--kind",
        "random",
        "--schedule",
        "manual",
        "--next-rotation-at",
        &at,
    ]);
    eventually(Duration::from_secs(20), "the scheduled rotation", || {
        let v = a.cli_json(&["versions", "prod/api/cron"]);
        async move { (v.as_array().unwrap().len() >= 2).then_some(()) }
    })
    .await;
    // Give the other replica every chance to fire a second time.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let versions = b.cli_json(&["versions", "prod/api/cron"]);
    assert_eq!(versions.as_array().unwrap().len(), 2, "{versions}");
    let audit = a.cli_json(&["audit", "--secret", "prod/api/cron"]);
    let rotations: Vec<&Value> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "rotate")
        .collect();
    assert_eq!(rotations.len(), 1, "{audit}");
    assert_eq!(rotations[0]["actor"], "scheduler");
    let st = a.cli_json(&["status", "prod/api/cron"]);
    assert_eq!(
        st[0]["next_rotation_at"],
        Value::Null,
        "manual after the one-off time"
    );
}

#[tokio::test]
async fn postgres_store_keeps_versions_across_restart_and_recovers_from_kill_9() {
    let dir = TempDir::new("pgkill");
    let db = PgDb::create("kill").await;
    let mut b = Backend::start(
        dir.path(),
        BackendOpts {
            store_url: Some(db.url.clone()),
            env: vec![("REKEY_ENGINE_STEP_DELAY".into(), "400ms".into())],
            ..Default::default()
        },
    );
    b.cli_json(&["create", "prod/db/key", "--kind", "random"]);
    let v1 = b.cli_json(&["get", "prod/db/key", "--reveal"])["value"].clone();
    let mut rot = b.spawn_cli(&["rotate", "prod/db/key"]);
    std::thread::sleep(Duration::from_millis(600));
    b.kill9();
    let _ = rot.wait();
    b.opts.env.clear();
    b.restart();
    let st = eventually(Duration::from_secs(20), "recovery", || {
        let s = b.cli_json(&["status", "prod/db/key"]);
        async move { (s[0]["pending_version"] == Value::Null).then_some(s) }
    })
    .await;
    assert_eq!(st[0]["current_version"], 2, "{st}");
    assert_eq!(
        b.cli_json(&["get", "prod/db/key", "--stage", "previous", "--reveal"])["value"],
        v1
    );
    b.cli_json(&["rotate", "prod/db/key"]);
    let versions = b.cli_json(&["versions", "prod/db/key"]);
    b.restart();
    assert_eq!(b.cli_json(&["versions", "prod/db/key"]), versions);
    // v1 was displaced from previous by the back-to-back rotation.
    assert_eq!(versions[2]["state"], "revoked", "{versions}");
}

/// RFC 3339 for now + `ms`, computed without a date library.
fn chrono_like_now_plus(ms: u64) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        + Duration::from_millis(ms);
    let out = std::process::Command::new("date")
        .args([
            "-u",
            "-d",
            &format!("@{}", t.as_secs()),
            "+%Y-%m-%dT%H:%M:%SZ",
        ])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}
