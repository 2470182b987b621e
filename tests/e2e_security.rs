//! End to end: no value in any log (at RUST_LOG=trace), in the database
//! file, in metrics or in the audit log; tokens, policy and mTLS.

use std::process::Command;

use rekey_proto::v1 as pb;
use rekey_testkit::*;
use tokio_stream::StreamExt;

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_value_reaches_logs_the_database_metrics_or_the_audit_log() {
    let dir = TempDir::new("leak");
    let mut b = Backend::start(
        dir.path(),
        BackendOpts {
            rust_log: Some("trace".into()),
            ..Default::default()
        },
    );
    let mut needles = vec![
        "NEEDLE-static-5f3a9c71".to_string(),
        "NEEDLE-second-8b1d2e44".to_string(),
    ];
    let f1 = dir.path().join("v1");
    std::fs::write(&f1, &needles[0]).unwrap();
    let f2 = dir.path().join("v2");
    std::fs::write(&f2, &needles[1]).unwrap();
    b.cli_json(&[
        "create",
        "prod/api/static",
        "--kind",
        "static",
        "--value-file",
        f1.to_str().unwrap(),
    ]);
    b.cli_json(&[
        "rotate",
        "prod/api/static",
        "--request-token",
        "leak-1",
        "--value-file",
        f2.to_str().unwrap(),
    ]);
    b.cli_json(&[
        "create",
        "prod/api/token",
        "--kind",
        "random",
        "--length",
        "24",
        "--encoding",
        "alnum",
    ]);
    b.cli_json(&["rotate", "prod/api/token"]);
    b.cli_json(&["create", "prod/enc/master", "--kind", "encryption-key"]);
    for id in ["prod/api/token", "prod/enc/master"] {
        let v = b.cli_json(&["get", id, "--reveal"]);
        needles.push(v["value"].as_str().unwrap().to_string());
    }
    let prev = b.cli_json(&["get", "prod/api/token", "--stage", "previous", "--reveal"]);
    needles.push(prev["value"].as_str().unwrap().to_string());
    // A failed call carrying a value must not echo it either.
    let bad = dir.path().join("bad.key");
    std::fs::write(&bad, "NEEDLE-not-a-key-77aa").unwrap();
    let o = b.cli(&[
        "rotate",
        "prod/enc/master",
        "--value-file",
        bad.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(!stderr(&o).contains("NEEDLE"), "{}", stderr(&o));
    needles.push("NEEDLE-not-a-key-77aa".into());

    // Watch and report, so the streaming path runs at trace level too.
    let mut client = b.client().await;
    let mut s = client
        .watch(pb::WatchRequest {
            secret_ids: vec!["prod/api/static".into(), "prod/api/token".into()],
        })
        .await
        .unwrap()
        .into_inner();
    let _ = s.next().await.unwrap().unwrap();
    let _ = s.next().await.unwrap().unwrap();
    b.cli_json(&["rotate", "prod/api/token"]);
    let ev = s.next().await.unwrap().unwrap();
    let SomeRaw(v) = raw(ev.current.unwrap().value.unwrap());
    needles.push(v);
    drop(s);
    drop(client);

    let metrics = http_get(&b.metrics, "/metrics");
    // Each search below must look at a real answer: an empty one (a failed
    // command) would pass it.
    let audit = b.cli(&["-o", "json", "audit"]);
    let status = b.cli(&["-o", "json", "status"]);
    let versions = b.cli(&["-o", "json", "versions", "prod/api/token"]);
    for (what, o) in [
        ("audit", &audit),
        ("status", &status),
        ("versions", &versions),
    ] {
        assert!(o.status.success(), "{what}: {}", stderr(o));
    }
    assert!(metrics.starts_with("HTTP/1.1 200") && metrics.contains("rekey_watch_streams"));
    let count = |o: &std::process::Output| {
        serde_json::from_slice::<serde_json::Value>(&o.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .len()
    };
    assert!(count(&audit) >= 9, "every call above is in the audit log");
    assert_eq!(count(&status), 3, "one status per secret");
    assert_eq!(count(&versions), 3, "v1 to v3 of prod/api/token");
    let code = b.stop();
    let logs = b.all_logs();
    if code != Some(0) {
        let tail: Vec<&str> = logs.lines().rev().take(40).collect();
        panic!(
            "SIGTERM did not stop the backend cleanly ({code:?}); log tail:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    assert!(logs.contains("TRACE"), "trace logging was on");
    let mut files: Vec<(String, Vec<u8>)> = vec![
        ("logs".into(), logs.into_bytes()),
        ("metrics".into(), metrics.into_bytes()),
        ("audit".into(), audit.stdout),
        ("status".into(), status.stdout),
        ("versions".into(), versions.stdout),
    ];
    for e in std::fs::read_dir(dir.path().join("data"))
        .unwrap()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with("rekey.db") {
            files.push((name, std::fs::read(e.path()).unwrap()));
        }
    }
    assert!(files.iter().any(|(n, _)| n == "rekey.db"));
    for needle in &needles {
        assert!(needle.len() >= 16, "needles must be distinctive: {needle}");
        for (name, bytes) in &files {
            assert!(
                !contains(bytes, needle),
                "a secret value was found in {name}"
            );
        }
    }
}

struct SomeRaw(String);
fn raw(v: pb::SecretValue) -> SomeRaw {
    match v.value {
        Some(pb::secret_value::Value::Raw(b)) => SomeRaw(String::from_utf8(b).unwrap()),
        _ => panic!("expected a raw value"),
    }
}

#[tokio::test]
async fn tokens_are_checked_and_policy_limits_identities_to_prefixes() {
    let dir = TempDir::new("policy");
    let extra = format!(
        r#"
[[auth.tokens]]
identity = "ci"
sha256 = "{}"

[[auth.tokens]]
identity = "old-ci"
sha256 = "{}"
expires_at = "2020-01-01T00:00:00Z"

[[auth.policies]]
identity = "ci"
prefixes = ["prod/api/"]
operations = ["rotate", "read"]

[[auth.policies]]
identity = "old-ci"
prefixes = [""]
operations = ["read"]
"#,
        sha256_hex("ci-token-0123456789"),
        sha256_hex("old-token-0123456789")
    );
    let b = Backend::start(
        dir.path(),
        BackendOpts {
            extra_toml: extra,
            ..Default::default()
        },
    );
    b.cli_json(&["create", "prod/api/key", "--kind", "random"]);
    b.cli_json(&["create", "prod/billing/key", "--kind", "random"]);
    let ci_token = dir.path().join("ci.token");
    std::fs::write(&ci_token, "ci-token-0123456789\n").unwrap();
    let as_ci = |args: &[&str]| b.cli_with(args, Some(&ci_token));

    let o = as_ci(&["rotate", "prod/api/key"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = as_ci(&["rotate", "prod/billing/key"]);
    assert!(!o.status.success());
    assert_eq!(
        stderr(&o).trim(),
        "error: permission denied: ci may not rotate prod/billing/key"
    );
    let o = as_ci(&["get", "prod/api/key", "--reveal"]);
    assert!(
        stderr(&o).contains("permission denied: ci may not reveal prod/api/key"),
        "{}",
        stderr(&o)
    );
    let o = as_ci(&["create", "prod/api/new", "--kind", "random"]);
    assert!(stderr(&o).contains("permission denied"), "{}", stderr(&o));
    let o = as_ci(&["versions", "prod/billing/key"]);
    assert!(stderr(&o).contains("permission denied"), "{}", stderr(&o));
    // Listing shows only what the identity may read.
    let o = as_ci(&["-o", "json", "list"]);
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);

    let o = b.cli_with(&["list"], None);
    assert!(
        stderr(&o).starts_with("error: unauthenticated: no bearer token: none was found;"),
        "{}",
        stderr(&o)
    );
    let wrong = dir.path().join("wrong.token");
    std::fs::write(&wrong, "nope").unwrap();
    let o = b.cli_with(&["list"], Some(&wrong));
    assert_eq!(stderr(&o).trim(), "error: unauthenticated: unknown token");
    let old = dir.path().join("old.token");
    std::fs::write(&old, "old-token-0123456789").unwrap();
    let o = b.cli_with(&["list"], Some(&old));
    assert!(
        stderr(&o).contains("unauthenticated: the token for old-ci has expired"),
        "{}",
        stderr(&o)
    );

    // Nothing changed by the refusals; they are in the audit log.
    let v = b.cli_json(&["versions", "prod/billing/key"]);
    assert_eq!(v.as_array().unwrap().len(), 1);
    let audit = b.cli_json(&["audit"]);
    let denied: Vec<_> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["outcome"] == "permission_denied")
        .collect();
    assert!(denied.iter().any(|e| e["actor"] == "ci"
        && e["action"] == "rotate"
        && e["secret"] == "prod/billing/key"));
    assert!(denied.iter().any(|e| e["action"] == "reveal"));
    // The tokens themselves appear nowhere in the log.
    let log = b.log();
    assert!(!log.contains("ci-token-0123456789"));
    assert!(
        !log.contains(&b.token()),
        "the admin token must never be logged"
    );
    assert!(log.contains("admin.token"), "its path is logged");
}

/// CA, server certificate for 127.0.0.1, and client certificates.
fn make_pki(dir: &std::path::Path) {
    server_pki(dir);
    for cn in ["ci-bot", "intruder"] {
        issue_cert(
            dir,
            cn,
            &format!("/O=rekey tests/CN={cn}"),
            "extendedKeyUsage=clientAuth\n",
        );
    }
    // Certificates the CA signed whose common names are no identity:
    // two of them (which one would be the caller?), and one that would
    // write a line of its own into a log.
    issue_cert(
        dir,
        "two-cns",
        "/CN=ci-bot/CN=admin",
        "extendedKeyUsage=clientAuth\n",
    );
    issue_cert(
        dir,
        "newline",
        "/CN=ci-bot\nlevel=ERROR forged",
        "extendedKeyUsage=clientAuth\n",
    );
}

#[tokio::test]
async fn mtls_client_certificates_name_the_identity() {
    let dir = TempDir::new("mtls");
    let pki = dir.path().join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    make_pki(&pki);
    let p = |f: &str| pki.join(f).display().to_string();
    let extra = format!(
        r#"
[tls]
cert_file = {:?}
key_file = {:?}
client_ca_file = {:?}

[[auth.policies]]
identity = "ci-bot"
prefixes = ["prod/api/"]
operations = ["create", "rotate", "read"]
"#,
        p("server.pem"),
        p("server.key"),
        p("ca.pem")
    );
    let b = Backend::start(
        dir.path(),
        BackendOpts {
            extra_toml: extra,
            ..Default::default()
        },
    );
    let addr = b.grpc.replace("http://", "https://");
    let run = |cn: Option<&str>, args: &[&str]| {
        let mut cmd = Command::new(CLI.path());
        cmd.args(["--addr", &addr, "--ca-file", &p("ca.pem")]);
        if let Some(cn) = cn {
            cmd.args([
                "--cert-file",
                &p(&format!("{cn}.pem")),
                "--key-file",
                &p(&format!("{cn}.key")),
            ]);
        }
        cmd.args(args).env_remove("REKEY_TOKEN").output().unwrap()
    };
    let o = run(
        Some("ci-bot"),
        &["-o", "json", "create", "prod/api/key", "--kind", "random"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(Some("ci-bot"), &["rotate", "prod/api/key"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(
        Some("ci-bot"),
        &["create", "prod/db/key", "--kind", "random"],
    );
    assert_eq!(
        stderr(&o).trim(),
        "error: permission denied: ci-bot may not create prod/db/key"
    );
    let o = run(Some("intruder"), &["versions", "prod/api/key"]);
    assert!(
        stderr(&o).contains("permission denied: intruder may not read"),
        "{}",
        stderr(&o)
    );
    for (cn, why) in [
        ("two-cns", "it has several common names"),
        ("newline", "its common name is not 1 to 128 letters"),
    ] {
        let o = run(Some(cn), &["versions", "prod/api/key"]);
        let e = stderr(&o);
        assert!(
            e.contains("unauthenticated: the client certificate names no identity")
                && e.contains(why),
            "{cn}: {e}"
        );
    }
    assert!(
        !b.log().contains("\nlevel=ERROR forged") && !b.log().contains("ci-bot\nlevel"),
        "the common name reached the log as it is"
    );
    // A valid token (the admin's) but no client certificate: the TLS
    // handshake is refused, so the token is never even looked at.
    let token = b.token_path();
    let token = token.to_str().unwrap();
    let o = run(None, &["--token-file", token, "versions", "prod/api/key"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.starts_with("error: ")
            && !err.contains("unauthenticated")
            && !err.contains("permission"),
        "refused at the connection, not by the token check: {err}"
    );
    // The same token with a certificate goes through: the certificate was
    // the only thing missing.
    let o = run(
        Some("ci-bot"),
        &["--token-file", token, "versions", "prod/api/key"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let audit = run(
        Some("ci-bot"),
        &[
            "--token-file",
            b.token_path().to_str().unwrap(),
            "-o",
            "json",
            "audit",
        ],
    );
    // ci-bot has no audit right; the admin token does not override a
    // certificate's identity.
    assert!(
        stderr(&audit).contains("permission denied: ci-bot may not audit"),
        "{}",
        stderr(&audit)
    );
}

/// A consumer's reports belong to the identity that made it: another
/// identity with `report` on the same secret can neither say it left nor
/// overwrite what it serves, and only an identity that gets a secret's
/// keys may report its re-encryption finished.
#[tokio::test]
async fn a_consumer_belongs_to_its_identity_and_only_a_key_holder_reports_reencryption() {
    let dir = TempDir::new("reports");
    let b = Backend::start(
        dir.path(),
        BackendOpts {
            extra_toml: "[scheduler]\ntick = \"100ms\"\n".into(),
            ..Default::default()
        },
    );
    b.cli_json(&[
        "create",
        "prod/shared",
        "--kind",
        "random",
        "--window",
        "0s",
    ]);
    b.cli_json(&[
        "create",
        "prod/enc",
        "--kind",
        "encryption-key",
        "--window",
        "0s",
    ]);
    let token = |name: &str, ops: &str| {
        b.cli_json(&["token", "create", name, "--prefix", "prod/", "--ops", ops])["token"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let mut a = client(&b.grpc, &token("sidecar-a", "watch,report,read")).await;
    let mut other = client(&b.grpc, &token("reporter-b", "report,read")).await;
    let report = |consumer: &str, version: u64, leaving: bool| pb::ReportStatusRequest {
        consumer_id: consumer.into(),
        pod: "api-0".into(),
        namespace: "prod".into(),
        secrets: vec![pb::ServedSecret {
            secret_id: "prod/shared".into(),
            version,
            healthy: true,
            error: String::new(),
        }],
        leaving,
    };
    a.report_status(report("api-0", 1, false)).await.unwrap();

    let consumers = || {
        let st = b.cli_json(&["status", "prod/shared"]);
        st[0]["consumers"].as_array().unwrap().clone()
    };
    for (version, leaving) in [(1, true), (7, false)] {
        let e = other
            .report_status(report("api-0", version, leaving))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
        assert!(e.message().contains("belongs to another identity"), "{e}");
    }
    let rows = consumers();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["identity"], "sidecar-a");
    assert_eq!(rows[0]["version"], 1, "the owner's report stands");
    // Under a consumer id of its own, the other identity reports freely.
    other
        .report_status(report("batch-0", 1, false))
        .await
        .unwrap();
    assert_eq!(consumers().len(), 2);

    // Re-encryption finished: refused to an identity without the keys,
    // audited, and decommission still waits.
    b.cli_json(&["rotate", "prod/enc"]);
    let finished = |consumer: &str| pb::ReportReencryptionRequest {
        secret_id: "prod/enc".into(),
        version: 2,
        consumer_id: consumer.into(),
        rows_done: 0,
        rows_total: 0,
        rate: 0.0,
        finished: true,
        phase: "done".into(),
    };
    let e = other
        .report_reencryption(finished("batch-0"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    let audit = b.cli_json(&["audit", "--secret", "prod/enc"]);
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "reencrypt"
                && e["actor"] == "reporter-b"
                && e["outcome"] == "permission_denied"),
        "{audit}"
    );
    let st = b.cli_json(&["status", "prod/enc"]);
    assert_eq!(st[0]["previous_version"], 1, "not decommissioned: {st}");
    assert!(
        st[0]["decommission_blockers"]
            .to_string()
            .contains("has not been reported finished"),
        "held back by the re-encryption the refused report claimed: {st}"
    );
    a.report_reencryption(finished("api-0")).await.unwrap();
    eventually(
        std::time::Duration::from_secs(10),
        "the decommission",
        || async {
            (b.cli_json(&["status", "prod/enc"])[0]["previous_version"].is_null()).then_some(())
        },
    )
    .await;
}
