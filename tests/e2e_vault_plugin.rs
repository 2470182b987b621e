//! End to end: rekey as an OpenBao / Vault secrets engine. The real
//! `rekey-vault-plugin` registered in a real OpenBao (`bao server` with a
//! `plugin_directory`), enabled at `rekey/`, in front of the real
//! `rekey-backend`; every call made with the real `bao` CLI, as an
//! operator would.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use rekey_testkit::*;
use serde_json::Value;

/// A server with the plugin enabled and configured, and the plugin's token.
fn ready(dir: &Path) -> (Bao, Backend, String) {
    ready_with(Bao::dev_with_plugins(dir), dir)
}

fn ready_with(bao: Bao, dir: &Path) -> (Bao, Backend, String) {
    let b = Backend::start(dir, BackendOpts::default());
    let token = bao.enable_rekey_plugin(&b);
    (bao, b, token)
}

/// `bao ARGS` that must fail; its stderr.
fn fails(bao: &Bao, args: &[&str]) -> String {
    let o = bao.bao(args);
    assert!(
        !o.status.success(),
        "bao {args:?} succeeded: {}",
        stdout(&o)
    );
    stderr(&o)
}

/// `bao ARGS` with `token` instead of the root token.
fn as_token(bao: &Bao, token: &str, args: &[&str]) -> Output {
    bao.command()
        .env("BAO_TOKEN", token)
        .args(args)
        .output()
        .expect("bao")
}

fn value_of(bao: &Bao, args: &[&str]) -> String {
    let v = bao.json(args);
    v["data"]["value"]
        .as_str()
        .unwrap_or_else(|| panic!("no value in {v}"))
        .to_string()
}

#[test]
fn an_operator_manages_a_secret_through_openbao() {
    let dir = TempDir::new("plugin-flow");
    let (bao, b, token) = ready(dir.path());

    // Help on every path.
    let help = bao.ok(&["path-help", "rekey/rotate/app/db"]);
    assert!(help.contains("request_token (string)"), "{help}");
    assert!(bao.ok(&["path-help", "rekey/"]).contains("creds/<id>"));

    // The token is stored, never shown.
    let cfg = bao.json(&["read", "rekey/config"]);
    assert_eq!(cfg["data"]["address"], b.grpc.as_str());
    assert_eq!(cfg["data"]["token_set"], true);
    assert!(!cfg.to_string().contains(&token), "{cfg}");

    // Create, list, read: metadata, no values.
    let created = bao.json(&[
        "write",
        "rekey/secrets/app/db",
        "kind=random",
        "window=45m",
        "schedule=30d",
    ]);
    assert_eq!(created["data"]["current_version"], 1, "{created}");
    assert_eq!(created["data"]["validation_window"], "45m");
    let listed = bao.json(&["list", "rekey/secrets"]);
    assert_eq!(listed, serde_json::json!(["app/db"]));
    let listed = bao.json(&["list", "rekey/secrets/app/"]);
    assert_eq!(listed, serde_json::json!(["db"]));
    let read = bao.json(&["read", "rekey/secrets/app/db"]);
    assert_eq!(read["data"]["kind"], "random");
    assert_eq!(read["data"]["schedule"], "30d");
    assert_eq!(
        read["data"]["versions"][0]["stages"],
        serde_json::json!(["current"])
    );
    assert!(read["data"]["versions"][0].get("value").is_none(), "{read}");

    // Creds: the same value the backend holds.
    let v1 = value_of(&bao, &["read", "rekey/creds/app/db"]);
    let direct = b.cli_json(&["get", "app/db", "--reveal"]);
    assert_eq!(direct["value"], v1.as_str(), "{direct}");

    // Rotate: v2 current, v1 previous; a retry with the same token repeats.
    let rotated = bao.json(&["write", "rekey/rotate/app/db", "request_token=deploy-42"]);
    assert_eq!(rotated["data"]["current_version"], 2, "{rotated}");
    assert_eq!(rotated["data"]["replayed"], false);
    let again = bao.json(&["write", "rekey/rotate/app/db", "request_token=deploy-42"]);
    assert_eq!(again["data"]["current_version"], 2, "{again}");
    assert_eq!(again["data"]["replayed"], true);
    let v2 = value_of(&bao, &["read", "rekey/creds/app/db"]);
    assert_ne!(v1, v2);
    assert_eq!(
        value_of(&bao, &["read", "rekey/creds/app/db", "stage=previous"]),
        v1
    );
    assert_eq!(
        value_of(&bao, &["read", "rekey/creds/app/db", "version=1"]),
        v1
    );

    // Status, then rollback and a forced revoke.
    let status = bao.json(&["read", "rekey/status/app/db"]);
    assert_eq!(status["data"]["rotation"]["target_version"], 2, "{status}");
    assert_eq!(status["data"]["previous_version"], 1);
    let back = bao.json(&["write", "-f", "rekey/rollback/app/db"]);
    assert_eq!(back["data"]["current_version"], 1, "{back}");
    assert_eq!(value_of(&bao, &["read", "rekey/creds/app/db"]), v1);
    let revoked = bao.json(&[
        "write",
        "rekey/revoke/app/db",
        "version=2",
        "force=true",
        "reason=leaked in a ticket",
    ]);
    assert_eq!(revoked["data"]["version"]["state"], "revoked", "{revoked}");

    // The backend's answers keep their meaning as HTTP statuses.
    let (code, body) = bao.api_get("rekey/creds/app/nope").expect("an answer");
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("app/nope"), "{body}");
    let e = fails(&bao, &["write", "rekey/secrets/app/db", "kind=random"]);
    assert!(e.contains("Code: 400") && e.contains("app/db"), "{e}");
    let e = fails(
        &bao,
        &["write", "rekey/secrets/app/x", "kind=random", "windw=1h"],
    );
    assert!(e.contains("Code: 400") && e.contains("\"windw\""), "{e}");
    let e = fails(&bao, &["write", "-f", "rekey/rollback/app/db"]);
    assert!(e.contains("Code: 412"), "{e}");

    // rekey's own audit log names the plugin's token, the Vault caller and
    // the Vault request.
    let audit = b.cli_json(&["audit", "--secret", "app/db"]);
    let events = audit.as_array().expect("events");
    let rotate = events
        .iter()
        .find(|e| e["action"] == "rotate")
        .unwrap_or_else(|| panic!("no rotate in {audit}"));
    // The root token's display name is "token"; it has no entity.
    assert_eq!(rotate["actor"], "vault-plugin for vault:token", "{rotate}");

    // The plugin's log (the server's) holds no value and no token, and
    // the host's own requests to the mount are answered as it expects.
    let log = bao.log();
    assert!(!log.contains("error rolling back"), "{log}");
    for secret in [&v1, &v2, &token] {
        assert!(!log.contains(secret.as_str()), "a secret in the server log");
    }
}

#[test]
fn policies_and_audit_devices_apply_to_the_mount() {
    let dir = TempDir::new("plugin-policy");
    let (bao, b, _) = ready_with(Bao::dev_with_plugins_audited(dir.path()), dir.path());
    let audit_log = bao.audit_log();
    bao.ok(&["write", "rekey/secrets/app/api", "kind=random"]);

    // A token that may only read metadata: Vault itself refuses the rest.
    bao.policy(
        "rekey-reader",
        r#"path "rekey/secrets/*" { capabilities = ["read"] }"#,
    );
    let reader = bao.token(&["rekey-reader"], "1h");
    let o = as_token(
        &bao,
        &reader,
        &["read", "-format=json", "rekey/secrets/app/api"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    for args in [
        &["write", "-f", "rekey/rotate/app/api"][..],
        &["read", "rekey/creds/app/api"][..],
    ] {
        let o = as_token(&bao, &reader, args);
        assert!(!o.status.success(), "{args:?} was allowed");
        assert!(stderr(&o).contains("Code: 403"), "{args:?}: {}", stderr(&o));
    }
    let st = b.cli_json(&["get", "app/api"]);
    assert_eq!(st["version"], 1, "a refused rotate rotated: {st}");

    // The audit device: the rotate is there, the value only as an HMAC.
    let rotated = bao.json(&["write", "-f", "rekey/rotate/app/api"]);
    let value = value_of(&bao, &["read", "rekey/creds/app/api"]);
    let text = std::fs::read_to_string(&audit_log).expect("the audit log");
    assert!(
        !text.contains(&value),
        "the value in clear in the audit log"
    );
    let entries: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let response = |path: &str| {
        entries
            .iter()
            .find(|e| {
                e["type"] == "response" && e["request"]["path"] == path && e.get("error").is_none()
            })
            .unwrap_or_else(|| panic!("no response to {path} in the audit log:\n{text}"))
    };
    let rotate = response("rekey/rotate/app/api");
    assert_eq!(rotate["request"]["operation"], "update");
    let creds = response("rekey/creds/app/api");
    let hmac = creds["response"]["data"]["value"].as_str().expect("value");
    assert!(hmac.starts_with("hmac-sha256:"), "{hmac}");

    // A person with an identity entity: rekey's audit log names both.
    bao.policy(
        "rekey-rotator",
        r#"path "rekey/rotate/*" { capabilities = ["update"] }"#,
    );
    bao.ok(&["auth", "enable", "userpass"]);
    bao.ok(&[
        "write",
        "auth/userpass/users/alice",
        "password=correct-horse",
        "token_policies=rekey-rotator",
    ]);
    let login = bao.json(&[
        "login",
        "-method=userpass",
        "-no-store",
        "username=alice",
        "password=correct-horse",
    ]);
    let alice = login["auth"]["client_token"].as_str().expect("token");
    let entity = login["auth"]["entity_id"].as_str().expect("entity id");
    assert!(!entity.is_empty(), "{login}");
    let o = as_token(&bao, alice, &["write", "-f", "rekey/rotate/app/api"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let events = b.cli_json(&["audit", "--secret", "app/api"]);
    let want = format!("vault-plugin for vault:userpass-alice/entity={entity}");
    assert!(
        events
            .as_array()
            .expect("events")
            .iter()
            .any(|e| e["action"] == "rotate" && e["actor"] == want.as_str()),
        "no rotate by {want} in {events}"
    );

    // The rotate's Vault request id reached rekey's audit log.
    let request_id = rotate["request"]["id"].as_str().expect("request id");
    let events = b.cli_json(&["audit", "--secret", "app/api"]);
    let ours = events
        .as_array()
        .expect("events")
        .iter()
        .find(|e| e["action"] == "rotate" && e["request_id"] == request_id)
        .unwrap_or_else(|| panic!("no rotate with request id {request_id} in {events}"));
    assert_eq!(ours["version"], rotated["data"]["current_version"]);
}

/// A user who may only change secrets gets no value from any answer, and
/// one who may only update the config cannot move the stored token.
#[test]
fn a_user_who_may_only_rotate_sees_no_value_and_a_config_writer_cannot_move_the_token() {
    let dir = TempDir::new("plugin-rights");
    let (bao, b, _) = ready(dir.path());
    bao.ok(&["write", "rekey/secrets/app/api", "kind=random"]);
    // A user who may rotate, roll back and revoke, and nothing else: Vault
    // refuses them creds, and none of their answers carries a value.
    bao.policy(
        "rekey-changes-only",
        r#"path "rekey/rotate/*" { capabilities = ["update"] }
path "rekey/rollback/*" { capabilities = ["update"] }
path "rekey/revoke/*" { capabilities = ["update"] }"#,
    );
    let rotator = bao.token(&["rekey-changes-only"], "1h");
    let o = as_token(&bao, &rotator, &["read", "rekey/creds/app/api"]);
    assert!(stderr(&o).contains("Code: 403"), "{}", stderr(&o));
    let reveal = || {
        b.cli_json(&["get", "app/api", "--reveal"])["value"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let mut values = vec![reveal()];
    let mut answers = String::new();
    for (i, args) in [
        &["write", "-format=json", "-f", "rekey/rotate/app/api"][..],
        &["write", "-format=json", "-f", "rekey/rollback/app/api"],
        &["write", "-format=json", "-f", "rekey/rotate/app/api"],
        &[
            "write",
            "-format=json",
            "rekey/revoke/app/api",
            "version=1",
            "force=true",
            "reason=the rotator cleans up",
        ],
    ]
    .into_iter()
    .enumerate()
    {
        let o = as_token(&bao, &rotator, args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        answers.push_str(&stdout(&o));
        if i == 0 || i == 2 {
            values.push(reveal());
        }
    }
    assert_eq!(values.len(), 3);
    for v in &values {
        assert!(
            !answers.contains(v.as_str()),
            "a value in an answer: {answers}"
        );
    }

    // A user who may only update the config cannot send the stored token
    // to an address of theirs: a new address needs the token in the same
    // write.
    bao.policy(
        "rekey-config-writer",
        r#"path "rekey/config" { capabilities = ["update"] }"#,
    );
    let writer = bao.token(&["rekey-config-writer"], "1h");
    let o = as_token(
        &bao,
        &writer,
        &["write", "rekey/config", "address=http://127.0.0.1:9"],
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("Code: 400") && stderr(&o).contains("must give token too"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        bao.json(&["read", "rekey/config"])["data"]["address"],
        b.grpc.as_str()
    );
}

#[test]
fn an_unreachable_backend_is_a_502_that_says_so() {
    let dir = TempDir::new("plugin-down");
    let (bao, mut b, _) = ready(dir.path());
    bao.ok(&["write", "rekey/secrets/app/q", "kind=random"]);
    b.kill9();
    let e = fails(&bao, &["write", "-f", "rekey/rotate/app/q"]);
    assert!(e.contains("Code: 502"), "{e}");
    assert!(
        e.contains(&format!("the rekey backend at {} is unreachable", b.grpc)),
        "{e}"
    );
    // Not configured at all is the operator's to fix, and says how.
    bao.ok(&["delete", "rekey/config"]);
    let e = fails(&bao, &["read", "rekey/status/app/q"]);
    assert!(
        e.contains("Code: 412") && e.contains("not configured"),
        "{e}"
    );
}

#[test]
fn the_mount_survives_kills_reloads_remounts_and_restarts() {
    let dir = TempDir::new("plugin-life");
    let mut bao = Bao::file_backed_with_plugins(dir.path());
    let b = Backend::start(dir.path(), BackendOpts::default());
    let token = bao.enable_rekey_plugin(&b);
    bao.ok(&["write", "rekey/secrets/app/k", "kind=random"]);
    let current =
        |bao: &Bao| bao.json(&["read", "rekey/secrets/app/k"])["data"]["current_version"].clone();

    // SIGKILL: the host starts the plugin again on the next request.
    let pid = bao.plugin_pid().expect("a plugin process");
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(i32::try_from(pid).unwrap()).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    wait_for(
        "the killed plugin to be gone",
        Duration::from_secs(10),
        || bao.plugin_pid() != Some(pid),
    );
    assert_eq!(current(&bao), 1);
    let after_kill = bao.plugin_pid().expect("a new plugin process");
    assert_ne!(after_kill, pid);

    // `bao plugin reload`: a new process, same mount.
    bao.ok(&["plugin", "reload", "-plugin=rekey-vault-plugin"]);
    bao.ok(&["write", "-f", "rekey/rotate/app/k"]);
    assert_eq!(current(&bao), 2);

    // A server restart: the plugin comes back with the stored config.
    bao.restart();
    bao.unseal();
    assert_eq!(current(&bao), 2);

    // Disable and enable: Vault drops the mount's storage (the config),
    // the secrets stay in rekey.
    bao.ok(&["secrets", "disable", "rekey"]);
    bao.ok(&["secrets", "enable", "-path=rekey", "rekey-vault-plugin"]);
    let e = fails(&bao, &["read", "rekey/secrets/app/k"]);
    assert!(e.contains("not configured"), "{e}");
    bao.configure_rekey_plugin(&b, &token);
    assert_eq!(current(&bao), 2);
    // Disabling rolls the mount back first; the plugin has nothing to
    // roll back and says so as the host expects.
    assert!(!bao.log().contains("error rolling back"), "{}", bao.log());
}
