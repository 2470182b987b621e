//! What probing the running backend from outside broke, each case checked
//! with the real binary: anonymous calls that cost storage and time, Watch
//! as an unaudited read, unbounded values and requests, hostile ids in
//! logs, an audit chain anyone with database access could rewrite, a lost
//! development KEK replaced by a new one, and metrics open to anyone.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rekey_proto::v1 as pb;
use rekey_testkit::*;
use serde_json::Value;
use sqlx::Connection;

/// A sample of the backend's `/metrics` matching `series` exactly (name
/// and labels).
fn backend_metric(b: &Backend, series: &str) -> Option<f64> {
    metric(&http_get(&b.metrics, "/metrics"), series)
}

async fn audit_events(b: &Backend) -> Vec<pb::AuditEvent> {
    b.client()
        .await
        .list_audit(pb::ListAuditRequest {
            limit: 10_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events
}

fn static_value(n: usize, fill: u8) -> pb::SecretValue {
    pb::SecretValue {
        value: Some(pb::secret_value::Value::Raw(vec![fill; n])),
    }
}

fn create_static(id: &str, value: pb::SecretValue) -> pb::CreateSecretRequest {
    pb::CreateSecretRequest {
        id: id.into(),
        kind: "static".into(),
        value: Some(value),
        validation_window_ms: Some(3_600_000),
        ..Default::default()
    }
}

/// A backend config that fails validation or start-up: its exit code and
/// stderr.
fn start_refused(dir: &std::path::Path, config: &str) -> (Option<i32>, String) {
    let cfg = dir.join("refused.toml");
    std::fs::write(&cfg, config).unwrap();
    let mut child = Command::new(BACKEND.path())
        .arg("--config")
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (st.code(), err);
        }
        assert!(Instant::now() < deadline, "the backend kept running");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn calls_without_a_token_are_counted_and_summarized_not_stored_one_by_one() {
    let dir = TempDir::new("anon");
    let b = Backend::start(
        dir.path(),
        BackendOpts {
            extra_toml: "[audit]\nrefusal_summary_interval = \"1s\"\n".into(),
            ..Default::default()
        },
    );
    b.cli_json(&["create", "prod/x", "--kind", "random"]);
    let mut wrong = client(&b.grpc, "not-a-token").await;
    for _ in 0..300 {
        let e = wrong
            .rotate(pb::RotateRequest {
                secret_id: "prod/x".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
    }
    for _ in 0..20 {
        wrong
            .get_secret(pb::GetSecretRequest {
                secret_id: "prod/x".into(),
                reveal: true,
                ..Default::default()
            })
            .await
            .unwrap_err();
    }
    // An id the size of the old 4 MiB message limit never gets that far.
    let e = wrong
        .rotate(pb::RotateRequest {
            secret_id: "a".repeat(1 << 20),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");

    let rotate = "rekey_unauthenticated_total{method=\"Rotate\"}";
    let reveal = "rekey_unauthenticated_total{method=\"GetSecret\"}";
    assert_eq!(backend_metric(&b, rotate), Some(300.0));
    assert_eq!(backend_metric(&b, reveal), Some(20.0));

    // A summary or two in the audit log, that together count every call.
    let summaries = eventually(Duration::from_secs(10), "the refusal summaries", || async {
        let rows: Vec<pb::AuditEvent> = audit_events(&b)
            .await
            .into_iter()
            .filter(|e| e.actor == "anonymous")
            .collect();
        let counted: u64 = rows
            .iter()
            .map(|e| {
                e.detail
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .parse::<u64>()
                    .unwrap()
            })
            .sum();
        (counted == 320).then_some(rows)
    })
    .await;
    assert!(summaries.len() <= 3, "{summaries:?}");
    for s in &summaries {
        assert_eq!(s.action, "refused-unauthenticated");
        assert!(s.secret_id.is_empty());
    }
    let log = b.log();
    let lines = log.matches("call refused before authentication").count();
    assert!(
        (1..=3).contains(&lines),
        "{lines} log lines for 321 refusals"
    );
    assert!(log.len() < 200_000, "the log holds what the callers sent");
    // Those with a token are not held up.
    b.cli_json(&["rotate", "prod/x"]);
}

#[tokio::test]
async fn requests_are_limited_per_method_and_values_by_max_value_bytes() {
    let dir = TempDir::new("sizes");
    let b = Backend::start(dir.path(), BackendOpts::default());
    let mut c = b.client().await;
    let e = c
        .create_secret(create_static("prod/big", static_value(65_537, b'x')))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        e.message(),
        "the value of prod/big is 65537 bytes; values are limited to 65536 bytes (limits.max_value_bytes)"
    );
    c.create_secret(create_static("prod/big", static_value(65_536, b'x')))
        .await
        .unwrap();
    let e = c
        .rotate(pb::RotateRequest {
            secret_id: "prod/big".into(),
            value: Some(static_value(100 << 10, b'y')),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    assert!(e.message().contains("limit of"), "{e:?}");
    let e = c
        .get_secret(pb::GetSecretRequest {
            secret_id: "a".repeat(20 << 10),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");

    let (code, err) = start_refused(
        dir.path(),
        "metrics_listen = \"off\"\nlisten = \"127.0.0.1:0\"\n[limits]\nmax_value_bytes = 5242880\n",
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("limits.max_value_bytes: must be between 1 and 4194304"),
        "{err}"
    );
}

fn sidecar_identity() -> String {
    format!(
        "[[auth.tokens]]\nidentity = \"sidecar\"\nsha256 = \"{}\"\n\
         [[auth.policies]]\nidentity = \"sidecar\"\nprefixes = [\"prod/\"]\noperations = [\"watch\"]\n",
        sha256_hex("sidecar-token")
    )
}

#[tokio::test]
async fn watch_is_audited_and_its_streams_are_limited() {
    let dir = TempDir::new("watch");
    let b = Backend::start(
        dir.path(),
        BackendOpts {
            extra_toml: format!(
                "[limits]\nmax_watch_streams_per_connection = 5\nmax_watch_streams_per_identity = 8\n{}",
                sidecar_identity()
            ),
            ..Default::default()
        },
    );
    let mut admin = b.client().await;
    admin
        .create_secret(create_static("prod/k", static_value(10, b'a')))
        .await
        .unwrap();
    admin
        .rotate(pb::RotateRequest {
            secret_id: "prod/k".into(),
            value: Some(static_value(10, b'b')),
            ..Default::default()
        })
        .await
        .unwrap();
    let req = || pb::WatchRequest {
        secret_ids: vec!["prod/k".into()],
    };
    let mut first = client(&b.grpc, "sidecar-token").await;
    let mut s = first.watch(req()).await.unwrap().into_inner();
    let ev = s.message().await.unwrap().unwrap();
    assert!(ev.snapshot && ev.current.unwrap().value.is_some());
    let watch: Vec<pb::AuditEvent> = audit_events(&b)
        .await
        .into_iter()
        .filter(|e| e.action == "watch")
        .collect();
    assert_eq!(watch.len(), 1, "{watch:?}");
    assert_eq!(
        (
            watch[0].actor.as_str(),
            watch[0].secret_id.as_str(),
            watch[0].detail.as_str()
        ),
        (
            "sidecar",
            "prod/k",
            "stream opened; values sent: current v2, previous v1"
        )
    );

    // Five streams on one connection, then the connection is full.
    let mut held = vec![s];
    for _ in 0..4 {
        held.push(first.watch(req()).await.unwrap().into_inner());
    }
    let e = first.watch(req()).await.err().unwrap();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    assert!(
        e.message().contains("max_watch_streams_per_connection"),
        "{e:?}"
    );
    // Three more on another connection, then the identity is full.
    let mut second = client(&b.grpc, "sidecar-token").await;
    for _ in 0..3 {
        held.push(second.watch(req()).await.unwrap().into_inner());
    }
    let e = second.watch(req()).await.err().unwrap();
    assert!(
        e.message().contains("max_watch_streams_per_identity"),
        "{e:?}"
    );
    // Closing streams gives their places back.
    held.truncate(6);
    eventually(Duration::from_secs(5), "a freed place", || {
        let mut c = second.clone();
        async move { c.watch(req()).await.ok() }
    })
    .await;
}

#[tokio::test]
async fn hostile_ids_are_refused_before_anything_is_logged() {
    let dir = TempDir::new("ids");
    let b = Backend::start(dir.path(), BackendOpts::default());
    let mut c = b.client().await;
    let forged = "nope\n2026-11-30T00:00:00.000000Z  INFO rekey_backend: forged-entry";
    let e = c
        .get_secret(pb::GetSecretRequest {
            secret_id: forged.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let mut anon = client(&b.grpc, "nope").await;
    let e = anon
        .rotate(pb::RotateRequest {
            secret_id: "prod/\u{1b}[2K\rok".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let e = c
        .report_status(pb::ReportStatusRequest {
            consumer_id: "pod\r\nforged".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let log = b.log();
    assert!(!log.contains("forged"), "{log}");
    assert!(!log.contains('\u{1b}'), "{log}");
    for ev in audit_events(&b).await {
        let text = format!("{} {} {}", ev.actor, ev.secret_id, ev.detail);
        assert!(!text.chars().any(char::is_control), "{ev:?}");
    }
}

async fn verify(b: &Backend, expect: Option<(u64, &str)>) -> pb::VerifyAuditResponse {
    b.client()
        .await
        .verify_audit(pb::VerifyAuditRequest {
            expect_head_seq: expect.map_or(0, |e| e.0),
            expect_head_mac: expect.map(|e| e.1.to_string()).unwrap_or_default(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// One audit row as the store keeps it.
type AuditRow = (
    i64,
    i64,
    String,
    String,
    String,
    i64,
    String,
    String,
    String,
    String,
);

/// The plain SHA-256 of an event, as anyone who can read the source and
/// write the store can compute it: over its fields in the order the chain
/// covers them (the backend's canonical JSON), with `prev_hash`.
fn plain_digest(r: &AuditRow, prev_hash: &str) -> String {
    let q = |s: &str| serde_json::to_string(s).unwrap();
    let canonical = format!(
        r#"{{"seq":{},"time_ms":{},"actor":{},"action":{},"secret_id":{},"version":{},"outcome":{},"request_id":{},"detail":{},"prev_hash":{}}}"#,
        r.0,
        r.1,
        q(&r.2),
        q(&r.3),
        q(&r.4),
        r.5,
        q(&r.6),
        q(&r.7),
        q(&r.8),
        q(prev_hash)
    );
    sha256_hex(&canonical)
}

const AUDIT_ROW: &str = "SELECT seq, time_ms, actor, action, secret_id, version, outcome, request_id, detail, prev_hash FROM audit";

/// Rebuilds the whole chain with plain SHA-256 digests; the newest seq.
async fn rebuild_plain_chain(conn: &mut sqlx::SqliteConnection) -> i64 {
    let rows: Vec<AuditRow> = sqlx::query_as(&format!("{AUDIT_ROW} ORDER BY seq"))
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    let mut prev = "0".repeat(64);
    for r in &rows {
        let hash = plain_digest(r, &prev);
        sqlx::query("UPDATE audit SET prev_hash = $1, hash = $2 WHERE seq = $3")
            .bind(&prev)
            .bind(&hash)
            .bind(r.0)
            .execute(&mut *conn)
            .await
            .unwrap();
        prev = hash;
    }
    rows.last().map_or(0, |r| r.0)
}

/// With write access to the stopped store and no KEK: edit an event,
/// rebuild the chain with plain SHA-256, then make it pass as an old
/// chain (`audit_legacy_through` at the newest event) or as one to re-key
/// (`audit_chain = 'sha256'`). After a restart the forgery is reported,
/// by `--verify` and by `rekey_audit_tampered`, and nothing re-keyed it.
/// A deleted `kek_check` stops the backend.
#[tokio::test]
async fn a_rebuilt_plain_chain_is_caught_after_a_restart_and_a_lost_kek_check_stops_the_backend() {
    for (attack, meta, problem) in [
        (
            "legacy-through",
            "INSERT INTO meta (key, value) VALUES ('audit_legacy_through', '$N') \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            "meta.audit_legacy_through was altered",
        ),
        (
            "chain-sha256",
            "UPDATE meta SET value = 'sha256' WHERE key = 'audit_chain'",
            "meta.audit_chain says \"sha256\"",
        ),
    ] {
        let dir = TempDir::new("downgrade");
        let mut b = Backend::start(dir.path(), BackendOpts::default());
        b.cli_json(&["create", "prod/a", "--kind", "random"]);
        for _ in 0..3 {
            b.cli_json(&["rotate", "prod/a"]);
        }
        assert!(verify(&b, None).await.ok);
        b.stop();
        let db = format!("sqlite://{}", dir.path().join("data/rekey.db").display());
        let mut conn = sqlx::SqliteConnection::connect(&db).await.unwrap();
        sqlx::query("UPDATE audit SET actor = 'mallory' WHERE seq = 2")
            .execute(&mut conn)
            .await
            .unwrap();
        let newest = rebuild_plain_chain(&mut conn).await;
        sqlx::query(&meta.replace("$N", &newest.to_string()))
            .execute(&mut conn)
            .await
            .unwrap();
        drop(conn);
        b.restart();
        let v = verify(&b, None).await;
        assert!(!v.ok, "{attack}: the forged chain passed: {v:?}");
        assert!(v.problem.contains(problem), "{attack}: {v:?}");
        assert_eq!(
            backend_metric(&b, "rekey_audit_tampered"),
            Some(1.0),
            "{attack}: reported from the start"
        );
        // Nothing re-keyed the forgery: event 2 still carries its plain digest.
        let mut conn = sqlx::SqliteConnection::connect(&db).await.unwrap();
        let (row, hash): (AuditRow, String) = {
            let r: AuditRow = sqlx::query_as(&format!("{AUDIT_ROW} WHERE seq = 2"))
                .fetch_one(&mut conn)
                .await
                .unwrap();
            let h: String = sqlx::query_scalar("SELECT hash FROM audit WHERE seq = 2")
                .fetch_one(&mut conn)
                .await
                .unwrap();
            (r, h)
        };
        assert_eq!(hash, plain_digest(&row, &row.9), "{attack}");
        if attack == "chain-sha256" {
            // A deleted key check: refused, and no key written over the data.
            b.stop();
            sqlx::query("DELETE FROM meta WHERE key = 'kek_check'")
                .execute(&mut conn)
                .await
                .unwrap();
            drop(conn);
            let kek = std::fs::read(dir.path().join("data/kek")).unwrap();
            let config = std::fs::read_to_string(&b.config_path).unwrap();
            let (code, err) = start_refused(dir.path(), &config);
            assert_eq!(code, Some(1), "{err}");
            assert!(err.contains("meta.kek_check) is gone"), "{err}");
            assert_eq!(std::fs::read(dir.path().join("data/kek")).unwrap(), kek);
        }
    }
}

#[tokio::test]
async fn the_audit_chain_is_keyed_anchored_and_watched_by_the_running_backend() {
    let dir = TempDir::new("chain");
    let mut b = Backend::start(dir.path(), BackendOpts::default());
    b.cli_json(&["create", "prod/a", "--kind", "random"]);
    for _ in 0..4 {
        b.cli_json(&["rotate", "prod/a"]);
    }
    let v = verify(&b, None).await;
    assert!(v.ok && v.checked == 5, "{v:?}");
    let head = (v.head_seq, v.head_mac.clone());
    assert_eq!(head.0, 5);
    // Every audit log line carries the head after it, and so do the metrics.
    assert!(b.log().contains(&format!("\"head\":\"5:{}\"", head.1)));
    let series = format!("rekey_audit_head{{mac=\"{}\"}}", head.1);
    assert_eq!(backend_metric(&b, &series), Some(5.0));

    let db = format!("sqlite://{}", dir.path().join("data/rekey.db").display());
    let mut conn = sqlx::SqliteConnection::connect(&db).await.unwrap();
    // Edit an event and recompute its real plain SHA-256 (over the edited
    // fields, with its prev_hash): refused, since the chain is keyed.
    let (actor, hash): (String, String) =
        sqlx::query_as("SELECT actor, hash FROM audit WHERE seq = 2")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    let mut edited: AuditRow = sqlx::query_as(&format!("{AUDIT_ROW} WHERE seq = 2"))
        .fetch_one(&mut conn)
        .await
        .unwrap();
    edited.2 = "mallory".into();
    sqlx::query("UPDATE audit SET actor = 'mallory', hash = $1 WHERE seq = 2")
        .bind(plain_digest(&edited, &edited.9))
        .execute(&mut conn)
        .await
        .unwrap();
    let v = verify(&b, None).await;
    assert!(!v.ok && v.first_bad_seq == 2, "{v:?}");
    assert_eq!(v.problem, "event 2 was altered");
    sqlx::query("UPDATE audit SET actor = $1, hash = $2 WHERE seq = 2")
        .bind(&actor)
        .bind(&hash)
        .execute(&mut conn)
        .await
        .unwrap();
    assert!(verify(&b, None).await.ok);

    // Drop the newest events: the chain left is consistent, but the running
    // backend saw more.
    sqlx::query("DELETE FROM audit WHERE seq > 3")
        .execute(&mut conn)
        .await
        .unwrap();
    drop(conn);
    let v = verify(&b, None).await;
    assert!(!v.ok, "{v:?}");
    assert!(
        v.problem.contains("event 5 is gone") && v.problem.contains("this backend saw"),
        "{v:?}"
    );
    eventually(Duration::from_secs(5), "the tampered gauge", || async {
        (backend_metric(&b, "rekey_audit_tampered") == Some(1.0)).then_some(())
    })
    .await;

    // After a restart only the copy kept elsewhere shows it.
    b.restart();
    let v = verify(&b, None).await;
    assert!(v.ok && v.head_seq == 3, "{v:?}");
    let v = verify(&b, Some((head.0, &head.1))).await;
    assert!(!v.ok && v.problem.contains("event 5 is gone"), "{v:?}");
    let v = verify(&b, Some((3, &v.head_mac))).await;
    assert!(v.ok, "{v:?}");
}

#[tokio::test]
async fn a_lost_development_kek_is_not_replaced_and_metrics_can_require_a_token() {
    let dir = TempDir::new("kek");
    let token = dir.path().join("metrics.token");
    std::fs::write(&token, "scrape-me\n").unwrap();
    let mut b = Backend::start(
        dir.path(),
        BackendOpts {
            extra_toml: format!(
                "[metrics]\nbearer_token_file = {:?}\n",
                token.display().to_string()
            ),
            ..Default::default()
        },
    );
    assert!(http_get(&b.metrics, "/metrics").starts_with("HTTP/1.1 401"));
    assert!(http_get(&b.metrics, "/livez").starts_with("HTTP/1.1 200"));
    let (code, body) = http_request(
        &b.metrics,
        "/metrics",
        &[("Authorization", "Bearer scrape-me")],
    );
    assert_eq!(code, 200);
    assert!(body.contains("rekey_watch_streams"));

    b.cli_json(&["create", "prod/a", "--kind", "random"]);
    b.stop();
    let kek = dir.path().join("data").join("kek");
    std::fs::remove_file(&kek).unwrap();
    let config = std::fs::read_to_string(&b.config_path).unwrap();
    let (code, err) = start_refused(dir.path(), &config);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("key-encryption key file")
            && err.contains("is missing, but the store already holds data"),
        "{err}"
    );
    assert!(!kek.exists(), "no new key was written over the lost one");
}

/// The audit log lines are one JSON object each, with the head after the
/// event.
#[test]
fn audit_log_lines_name_the_head() {
    let dir = TempDir::new("head-line");
    let b = Backend::start(
        dir.path(),
        BackendOpts {
            extra_toml: String::new(),
            ..Default::default()
        },
    );
    b.cli_json(&["create", "prod/a", "--kind", "random"]);
    let line = b
        .log()
        .lines()
        .find(|l| l.contains("rekey::audit"))
        .map(str::to_string)
        .unwrap();
    let json: Value = serde_json::from_str(&line[line.find('{').unwrap()..]).unwrap();
    assert_eq!(
        json["head"],
        format!("1:{}", json["hash"].as_str().unwrap())
    );
}

#[tokio::test]
async fn the_cli_prints_any_audit_row_safely_and_checks_a_recorded_head() {
    let dir = TempDir::new("cli-audit");
    let b = Backend::start(dir.path(), BackendOpts::default());
    b.cli_json(&["create", "prod/a", "--kind", "random"]);
    let out = b.cli(&["audit", "--verify"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let said = stdout(&out);
    let head = said
        .trim()
        .rsplit_once("head ")
        .map(|(_, h)| h.to_string())
        .unwrap();
    assert!(
        said.starts_with("audit log intact: 1 events verified; head 1:"),
        "{said}"
    );

    // Rows such as a database writer, or an older release, could leave:
    // terminal escapes, and far more text than a message may carry at once.
    let db = format!("sqlite://{}", dir.path().join("data/rekey.db").display());
    let mut conn = sqlx::SqliteConnection::connect(&db).await.unwrap();
    let mut tx = sqlx::Connection::begin(&mut conn).await.unwrap();
    for seq in 2..=400i64 {
        let detail = if seq == 2 {
            "\u{1b}[2K\rforged prompt".to_string()
        } else {
            "d".repeat(200_000)
        };
        sqlx::query("INSERT INTO audit (seq, time_ms, actor, action, secret_id, version, outcome, request_id, detail, prev_hash, hash) VALUES ($1, 0, 'x', 'y', 'prod/a', 0, 'ok', 'r', $2, '', '')")
            .bind(seq)
            .bind(detail)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    drop(conn);
    let out = b.cli(&["audit", "--limit", "400"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        !text.contains('\u{1b}') && !text.contains('\r'),
        "escapes reach the terminal"
    );
    assert!(text.contains("\\u{1b}[2K\\rforged prompt"));
    assert!(
        text.lines().all(|l| l.chars().count() < 300),
        "cells are cut"
    );
    let json = b.cli_json(&["audit", "--limit", "400"]);
    assert_eq!(
        json.as_array().unwrap().len(),
        400,
        "80 MB of events, a page at a time"
    );

    // The rows above broke the chain; the head recorded earlier shows the
    // same log was not merely cut short.
    let out = b.cli(&["audit", "--verify", "--expect-head", &head]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.starts_with("error: audit log broken at event 2"),
        "{err}"
    );
    assert_eq!(err.matches("error:").count(), 1, "{err}");
    let out = b.cli(&["audit", "--verify", "--expect-head", "7:nothex"]);
    assert_eq!(out.status.code(), Some(2), "a usage error");
}

#[tokio::test]
async fn the_cli_says_error_once_for_a_failure_inside_the_backend() {
    let dir = TempDir::new("cli-error");
    let b = Backend::start(dir.path(), BackendOpts::default());
    b.cli_json(&["create", "prod/a", "--kind", "random"]);
    b.cli_json(&["rotate", "prod/a"]);
    let db = format!("sqlite://{}", dir.path().join("data/rekey.db").display());
    let mut conn = sqlx::SqliteConnection::connect(&db).await.unwrap();
    sqlx::query("UPDATE rotations SET step = 'half-done'")
        .execute(&mut conn)
        .await
        .unwrap();
    let out = b.cli(&["status", "prod/a"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out).trim_end(),
        "error: failed: internal error; see the backend log"
    );
}

/// A valid token with rights on nothing it calls: its refusals are
/// bounded. The first ten of an interval are audit events of their own,
/// the rest one summary, and so are the log lines; the admin's calls are
/// not held up behind them.
#[tokio::test]
async fn an_identity_s_refusals_are_audited_ten_at_a_time_then_summarized() {
    let dir = TempDir::new("denied");
    let b = Backend::start(
        dir.path(),
        BackendOpts {
            extra_toml:
                "[scheduler]\ntick = \"100ms\"\n[audit]\nrefusal_summary_interval = \"2s\"\n".into(),
            ..Default::default()
        },
    );
    b.cli_json(&["create", "prod/a", "--kind", "random"]);
    let nosy = b.cli_json(&[
        "token", "create", "nosy", "--prefix", "other/", "--ops", "read",
    ])["token"]
        .as_str()
        .unwrap()
        .to_string();
    let mut c = client(&b.grpc, &nosy).await;
    for _ in 0..300 {
        let e = c
            .rotate(pb::RotateRequest {
                secret_id: "prod/a".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
    }
    // The admin is served as before.
    b.cli_json(&["rotate", "prod/a"]);
    let events = eventually(Duration::from_secs(10), "the summary", || async {
        let events = audit_events(&b).await;
        events
            .iter()
            .any(|e| e.action == "refused-permission")
            .then_some(events)
    })
    .await;
    let by_nosy: Vec<&pb::AuditEvent> = events.iter().filter(|e| e.actor == "nosy").collect();
    let one_by_one = by_nosy.iter().filter(|e| e.action == "rotate").count();
    assert_eq!(one_by_one, 10, "{by_nosy:?}");
    let summary = by_nosy
        .iter()
        .find(|e| e.action == "refused-permission")
        .unwrap();
    assert!(
        summary
            .detail
            .contains("290 more call(s) refused for lack of rights")
            && summary.detail.ends_with("rotate 290"),
        "{summary:?}"
    );
    assert_eq!(summary.outcome, "permission_denied");
    let lines = b
        .log()
        .lines()
        .filter(|l| l.contains("rekey::audit") && l.contains("\"actor\":\"nosy\""))
        .count();
    assert_eq!(lines, 11, "one log line per audit event, no more");
}
