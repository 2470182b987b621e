//! End to end: secrets whose values live in a real OpenBao (`bao server`,
//! the Vault API) KV v2 mount, rotated by the real `rekey-backend`, read
//! back with the real `bao` CLI, delivered by the real `rekey-sidecar`, and
//! rendered by OpenBao Agent. Kubernetes auth runs against a stand-in of
//! the TokenReview endpoint (there is no Kubernetes API server here).

use std::path::Path;
use std::time::Duration;

use rekey_testkit::*;
use serde_json::Value;

/// What rekey needs on its prefix, and nothing else.
const POLICY: &str = r#"
path "secret/data/rekey/*" { capabilities = ["create", "read", "update"] }
path "secret/metadata/rekey/*" { capabilities = ["create", "read", "update"] }
path "secret/destroy/rekey/*" { capabilities = ["update"] }
path "secret/delete/rekey/*" { capabilities = ["update"] }
"#;

/// A `[[providers]]` entry for `bao` with these auth lines.
fn provider(bao: &Bao, auth: &str, extra: &str) -> String {
    format!(
        "[[providers]]\nname = \"vault-main\"\ntype = \"vault\"\naddress = \"{}\"\nmount = \"secret\"\npath_prefix = \"rekey/\"\n{auth}\n{extra}\n",
        bao.addr
    )
}

fn token_auth(dir: &Path, token: &str) -> String {
    let f = write_file(dir, "vault-token", token);
    format!("auth = \"token\"\ntoken_file = \"{}\"", f.display())
}

fn backend(dir: &Path, providers: &str) -> Backend {
    Backend::start(
        dir,
        BackendOpts {
            extra_toml: providers.to_string(),
            ..BackendOpts::default()
        },
    )
}

/// A backend whose `vault-main` provider logs in with a token limited to
/// [`POLICY`]; and that token.
fn with_token(dir: &Path, bao: &Bao) -> (Backend, String) {
    bao.policy("rekey", POLICY);
    let token = bao.token(&["rekey"], "1h");
    let b = backend(dir, &provider(bao, &token_auth(dir, &token), ""));
    (b, token)
}

/// `rekey create ID --kind KIND --provider vault-main`, which must succeed.
fn create_in_vault(b: &Backend, id: &str, kind: &str) -> Value {
    b.cli_json(&["create", id, "--kind", kind, "--provider", "vault-main"])
}

/// `rekey create ID --kind random --provider PROVIDER`, however it ends.
fn try_create(b: &Backend, id: &str, provider: &str) -> std::process::Output {
    b.cli(&["create", id, "--kind", "random", "--provider", provider])
}

fn reveal(b: &Backend, id: &str) -> String {
    b.cli_json(&["get", id, "--reveal"])["value"]
        .as_str()
        .unwrap()
        .to_string()
}

/// `bao kv get`: the latest version's `value` and its KV version.
fn kv_get(bao: &Bao, path: &str) -> (String, u64) {
    let j = bao.json(&["kv", "get", path]);
    (
        j["data"]["data"]["value"].as_str().unwrap().to_string(),
        j["data"]["metadata"]["version"].as_u64().unwrap(),
    )
}

fn kv_metadata(bao: &Bao, path: &str) -> Value {
    bao.json(&["kv", "metadata", "get", path])["data"].clone()
}

fn failed(o: &std::process::Output) -> String {
    assert!(!o.status.success(), "expected a failure: {}", stdout(o));
    stderr(o)
}

fn audit_actions(b: &Backend, id: &str) -> Vec<(String, String, String)> {
    b.cli_json(&["audit", "--secret", id])
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["actor"].as_str().unwrap_or_default().to_string(),
                e["action"].as_str().unwrap_or_default().to_string(),
                e["outcome"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[test]
fn vault_holds_current_through_rotate_rollback_and_decommission() {
    let dir = TempDir::new("vault-stages");
    let bao = Bao::dev(dir.path());
    let (b, token) = with_token(dir.path(), &bao);
    let path = "secret/rekey/prod/api/key";

    let created = create_in_vault(&b, "prod/api/key", "random");
    assert_eq!(created["provider"], "vault-main", "{created}");
    assert_eq!(created["provider_path"], "rekey/prod/api/key");
    let v1 = reveal(&b, "prod/api/key");
    assert_eq!(kv_get(&bao, path), (v1.clone(), 1));
    let m = kv_metadata(&bao, path);
    assert_eq!(m["custom_metadata"]["managed-by"], "rekey", "{m}");
    assert_eq!(m["custom_metadata"]["rekey-secret-id"], "prod/api/key");
    assert_eq!(m["custom_metadata"]["rekey-current-version"], "1");
    let status = b.cli(&["status", "prod/api/key"]);
    assert!(
        stdout(&status).contains("vault-main (rekey/prod/api/key)"),
        "{}",
        stdout(&status)
    );

    // Rotate: the new value is the latest KV version, the old one previous.
    b.cli_json(&["rotate", "prod/api/key"]);
    let v2 = reveal(&b, "prod/api/key");
    assert_ne!(v1, v2);
    assert_eq!(kv_get(&bao, path), (v2.clone(), 2));
    let m = kv_metadata(&bao, path);
    assert_eq!(m["custom_metadata"]["rekey-current-version"], "2");
    assert_eq!(m["custom_metadata"]["rekey-previous-version"], "1");

    // Roll back: previous's data as a new latest version, as `kv rollback`.
    b.cli_json(&["rollback", "prod/api/key"]);
    assert_eq!(reveal(&b, "prod/api/key"), v1);
    assert_eq!(kv_get(&bao, path), (v1.clone(), 3));
    let m = kv_metadata(&bao, path);
    assert_eq!(m["custom_metadata"]["rekey-current-version"], "3");
    assert_eq!(m["custom_metadata"]["rekey-previous-version"], "2");

    // Decommission destroys the old KV version (on_revoke = "destroy").
    b.cli_json(&[
        "revoke",
        "prod/api/key",
        "--version",
        "2",
        "--force",
        "--reason",
        "test",
    ]);
    let m = kv_metadata(&bao, path);
    assert_eq!(m["versions"]["2"]["destroyed"], true, "{m}");
    assert_eq!(m["versions"]["3"]["destroyed"], false);
    assert!(m["custom_metadata"].get("rekey-previous-version").is_none());
    assert_eq!(kv_get(&bao, path), (v1.clone(), 3));

    // A path outside the token's policy: one line naming the provider,
    // and nothing created.
    let o = b.cli(&[
        "create",
        "prod/other",
        "--kind",
        "random",
        "--provider",
        "vault-main",
        "--provider-path",
        "elsewhere/other",
    ]);
    let err = failed(&o);
    assert!(
        err.contains("provider vault-main") && err.contains("permission denied"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    failed(&b.cli(&["status", "prod/other"]));

    // No value in the backend's log.
    let log = b.all_logs();
    for v in [&v1, &v2, &token] {
        assert!(!log.contains(v.as_str()), "a value reached the log");
    }
}

#[test]
fn an_outside_put_reaches_a_sidecar_and_a_deleted_latest_is_reported() {
    let dir = TempDir::new("vault-outside");
    let bao = Bao::dev(dir.path());
    bao.policy("rekey", POLICY);
    // A short token lease: the backend must renew it, or log in again, to
    // keep polling.
    let (role_id, secret_id) = bao.approle("rekey", &["rekey"], "6s");
    let auth = format!(
        "auth = \"approle\"\nrole_id_file = \"{}\"\nsecret_id_file = \"{}\"",
        write_file(dir.path(), "role-id", &role_id).display(),
        write_file(dir.path(), "secret-id", &secret_id).display()
    );
    let b = backend(
        dir.path(),
        &provider(
            &bao,
            &auth,
            "poll_interval = \"1s\"\non_revoke = \"delete\"",
        ),
    );
    create_in_vault(&b, "prod/db/password", "random");
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let file = out.join("password");
    let sc = Sidecar::watching(dir.path(), &b, "prod/db/password", &file, &[]);
    wait_for("the first delivery", Duration::from_secs(10), || {
        std::fs::read_to_string(&file).is_ok_and(|s| s == reveal(&b, "prod/db/password"))
    });

    // Past the token's lease: polling still works.
    std::thread::sleep(Duration::from_secs(8));
    bao.ok(&[
        "kv",
        "put",
        "secret/rekey/prod/db/password",
        "value=set-by-hand-1",
    ]);
    wait_for(
        "the outside change in the file",
        Duration::from_secs(15),
        || std::fs::read_to_string(&file).is_ok_and(|s| s == "set-by-hand-1"),
    );
    let st = b.cli_json(&["status", "prod/db/password"]);
    assert_eq!(st[0]["current_version"], 2, "{st}");
    assert_eq!(st[0]["previous_version"], 1);
    let events = audit_actions(&b, "prod/db/password");
    assert!(
        events.contains(&(
            "external:vault-main:secret/rekey/prod/db/password".into(),
            "outside-change".into(),
            "ok".into()
        )),
        "{events:?}"
    );
    let m = kv_metadata(&bao, "secret/rekey/prod/db/password");
    assert_eq!(m["custom_metadata"]["rekey-current-version"], "2", "{m}");
    let logins = |b: &Backend| b.log().matches("logged in to Vault").count();
    assert_eq!(logins(&b), 1, "the token was renewed, not replaced");

    // Vault revokes every token of the AppRole: the next call is refused,
    // and the backend logs in again.
    bao.ok(&["token", "revoke", "-mode=path", "auth/approle/login"]);
    bao.ok(&[
        "kv",
        "put",
        "secret/rekey/prod/db/password",
        "value=set-by-hand-1b",
    ]);
    wait_for(
        "a change after the revocation",
        Duration::from_secs(15),
        || std::fs::read_to_string(&file).is_ok_and(|s| s == "set-by-hand-1b"),
    );
    assert_eq!(logins(&b), 2);
    // v1 was pushed out of previous: on_revoke = "delete" soft-deleted its
    // KV version.
    let m = kv_metadata(&bao, "secret/rekey/prod/db/password");
    assert_ne!(m["versions"]["1"]["deletion_time"], "", "{m}");
    assert_eq!(m["versions"]["1"]["destroyed"], false);

    // Data that does not fit the kind is not delivered.
    create_in_vault(&b, "prod/enc", "encryption-key");
    let key = reveal(&b, "prod/enc");
    bao.ok(&["kv", "put", "secret/rekey/prod/enc", "value=not-a-key"]);
    let problem = eventually_problem(&b, "prod/enc");
    assert!(
        problem.contains("does not fit the encryption-key kind") && !problem.contains("not-a-key"),
        "{problem}"
    );
    assert_eq!(reveal(&b, "prod/enc"), key);

    // A deleted latest version is not delivered: reported, and the
    // sidecar keeps the last good value.
    bao.ok(&["kv", "delete", "secret/rekey/prod/db/password"]);
    let problem = eventually_problem(&b, "prod/db/password");
    assert!(problem.contains("deleted"), "{problem}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "set-by-hand-1b");
    let table = stdout(&b.cli(&["status", "prod/db/password"]));
    assert!(table.contains("provider problem:"), "{table}");
    let events = audit_actions(&b, "prod/db/password");
    assert!(
        events
            .iter()
            .any(|(a, act, o)| a.starts_with("external:vault-main:")
                && act == "outside-change"
                && o != "ok"),
        "{events:?}"
    );

    // A new put fixes it and is delivered.
    bao.ok(&[
        "kv",
        "put",
        "secret/rekey/prod/db/password",
        "value=set-by-hand-2",
    ]);
    wait_for("the second outside change", Duration::from_secs(15), || {
        std::fs::read_to_string(&file).is_ok_and(|s| s == "set-by-hand-2")
    });
    wait_for("the problem to clear", Duration::from_secs(10), || {
        b.cli_json(&["status", "prod/db/password"])[0]["provider_problem"].is_null()
    });
    drop(sc);
    let log = b.all_logs();
    let metrics = http_get(&b.metrics, "/metrics");
    for v in [
        "set-by-hand-1",
        "set-by-hand-2",
        "not-a-key",
        &key,
        &secret_id,
        &role_id,
    ] {
        assert!(!log.contains(v), "a value reached the log");
        assert!(!metrics.contains(v), "a value reached the metrics");
    }
}

fn eventually_problem(b: &Backend, id: &str) -> String {
    let mut problem = String::new();
    wait_for("a provider problem", Duration::from_secs(15), || {
        let st = b.cli_json(&["status", id]);
        match st[0]["provider_problem"].as_str() {
            Some(p) => {
                problem = p.to_string();
                true
            }
            None => false,
        }
    });
    problem
}

#[test]
fn a_sealed_vault_parks_the_rotation_and_unsealing_lets_it_succeed() {
    let dir = TempDir::new("vault-sealed");
    let bao = Bao::file_backed(dir.path());
    let (b, _) = with_token(dir.path(), &bao);
    create_in_vault(&b, "app/key", "random");
    let v1 = reveal(&b, "app/key");

    bao.seal();
    let err = failed(&b.cli(&["rotate", "app/key"]));
    assert!(
        err.contains("provider vault-main") && err.contains("sealed"),
        "{err}"
    );
    let st = b.cli_json(&["status", "app/key"]);
    assert_eq!(st[0]["rotation"]["step"], "needs-attention", "{st}");
    assert_eq!(st[0]["current_version"], 1);
    assert_eq!(reveal(&b, "app/key"), v1);

    bao.unseal();
    assert_eq!(kv_get(&bao, "secret/rekey/app/key"), (v1.clone(), 1));
    b.cli_json(&["rotate", "app/key"]);
    let v3 = reveal(&b, "app/key");
    assert_ne!(v3, v1);
    assert_eq!(kv_get(&bao, "secret/rekey/app/key"), (v3, 2));
}

#[test]
fn openbao_agent_renders_what_rekey_wrote() {
    let dir = TempDir::new("vault-agent");
    let bao = Bao::dev(dir.path());
    let (b, _) = with_token(dir.path(), &bao);
    create_in_vault(&b, "web/session", "random");
    b.cli_json(&["rotate", "web/session"]);
    let current = reveal(&b, "web/session");
    let dest = dir.path().join("rendered");
    let agent = bao.agent(
        dir.path(),
        r#"{{ with secret "secret/data/rekey/web/session" }}{{ .Data.data.value }}{{ end }}"#,
        &dest,
        &bao.token(&["rekey"], "1h"),
    );
    assert_eq!(agent.wait_rendered(), current);
}

#[test]
fn kubernetes_auth_logs_in_with_the_service_account_token() {
    let dir = TempDir::new("vault-k8s");
    let bao = Bao::dev(dir.path());
    bao.policy("rekey", POLICY);
    let reviewer = TokenReviewServer::start(dir.path());
    bao.kubernetes_auth(
        &reviewer,
        "rekey",
        "rekey-system",
        "rekey-backend",
        &["rekey"],
        "1h",
    );
    let jwt = dir.path().join("sa-token");
    let _ = reviewer.service_account_jwt("rekey-system", "rekey-backend", &jwt);
    let auth = format!(
        "auth = \"kubernetes\"\nrole = \"rekey\"\njwt_file = \"{}\"",
        jwt.display()
    );
    let b = backend(dir.path(), &provider(&bao, &auth, ""));
    create_in_vault(&b, "k8s/key", "random");
    assert_eq!(
        kv_get(&bao, "secret/rekey/k8s/key").0,
        reveal(&b, "k8s/key")
    );
    assert!(
        !reviewer.reviews().is_empty(),
        "Vault asked the TokenReview API"
    );

    // Another service account is refused at login, with the role named.
    let other_dir = dir.path().join("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    let other_jwt = other_dir.join("sa-token");
    let _ = reviewer.service_account_jwt("default", "someone-else", &other_jwt);
    let auth = format!(
        "auth = \"kubernetes\"\nrole = \"rekey\"\njwt_file = \"{}\"",
        other_jwt.display()
    );
    let b2 = backend(&other_dir, &provider(&bao, &auth, ""));
    let err = failed(&try_create(&b2, "k8s/other", "vault-main"));
    assert!(
        err.contains("provider vault-main") && err.contains("Kubernetes login"),
        "{err}"
    );
}

#[test]
fn faults_are_one_line_each_and_leave_nothing_half_done() {
    let dir = TempDir::new("vault-faults");
    let bao = Bao::dev(dir.path());
    bao.policy(
        "rekey",
        &format!(
            "{POLICY}\npath \"kv1/*\" {{ capabilities = [\"create\", \"read\", \"update\"] }}\n"
        ),
    );
    let token = bao.token(&["rekey"], "1h");
    bao.ok(&["secrets", "enable", "-path=kv1", "-version=1", "kv"]);
    let closed = free_port();
    let token_file = write_file(dir.path(), "vault-token", &token);
    let bad_token = write_file(dir.path(), "bad-token", "s.not-a-real-token");
    let entry = |name: &str, addr: &str, mount: &str, tf: &Path, poll: &str| {
        format!(
            "[[providers]]\nname = \"{name}\"\ntype = \"vault\"\naddress = \"{addr}\"\nmount = \"{mount}\"\nauth = \"token\"\ntoken_file = \"{}\"\npoll_interval = \"{poll}\"\n",
            tf.display()
        )
    };
    let cfg = [
        entry("vault-main", &bao.addr, "secret", &token_file, "1h"),
        entry(
            "down",
            &format!("http://127.0.0.1:{closed}"),
            "secret",
            &token_file,
            "1h",
        ),
        entry("v1", &bao.addr, "kv1", &token_file, "1h"),
        entry("badtoken", &bao.addr, "secret", &bad_token, "1h"),
    ]
    .concat();
    let b = backend(dir.path(), &cfg);
    for (id, p, want) in [
        ("f/down", "down", "cannot reach Vault at http://127.0.0.1:"),
        ("f/v1", "v1", "is not a KV v2 mount"),
        ("f/token", "badtoken", "permission denied"),
    ] {
        let err = failed(&try_create(&b, id, p));
        assert!(
            err.contains(&format!("provider {p}")) && err.contains(want),
            "{p}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        failed(&b.cli(&["status", id]));
    }

    // A path that already holds someone's data is not taken over.
    bao.ok(&["kv", "put", "secret/rekey/f/taken", "value=theirs"]);
    let err = failed(&try_create(&b, "f/taken", "vault-main"));
    assert!(err.contains("already holds data"), "{err}");
    assert_eq!(kv_get(&bao, "secret/rekey/f/taken"), ("theirs".into(), 1));

    // custom_metadata that would go over Vault's limits: nothing written.
    let mut args = vec!["kv".to_string(), "metadata".into(), "put".into()];
    for i in 0..62 {
        args.push(format!("-custom-metadata=k{i}=v"));
    }
    args.push("secret/rekey/f/meta".into());
    bao.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let err = failed(&try_create(&b, "f/meta", "vault-main"));
    assert!(
        err.contains("custom_metadata") && err.contains("64"),
        "{err}"
    );
    assert_eq!(
        kv_metadata(&bao, "secret/rekey/f/meta")["current_version"],
        0
    );

    // A write that raced an outside change fails instead of overwriting
    // it (no poll in between: poll_interval is an hour).
    create_in_vault(&b, "f/cas", "random");
    bao.ok(&["kv", "put", "secret/rekey/f/cas", "value=outside"]);
    let err = failed(&b.cli(&["rotate", "f/cas"]));
    assert!(err.contains("check-and-set"), "{err}");
    assert_eq!(kv_get(&bao, "secret/rekey/f/cas"), ("outside".into(), 2));
    let st = b.cli_json(&["status", "f/cas"]);
    assert_eq!(st[0]["rotation"]["step"], "needs-attention", "{st}");
    assert_eq!(st[0]["current_version"], 1);
}

/// A `bao server -dev -dev-tls` process, killed on drop.
struct TlsBao(std::process::Child);

impl Drop for TlsBao {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn https_with_the_ca_file_and_a_clear_error_without_it() {
    let dir = TempDir::new("vault-tls");
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let port = free_port();
    let log = std::fs::File::create(dir.path().join("bao.log")).unwrap();
    let _bao = TlsBao(
        std::process::Command::new(bao_binary())
            .args([
                "server",
                "-dev",
                "-dev-tls",
                &format!("-dev-tls-cert-dir={}", certs.display()),
                "-dev-root-token-id=tls-root",
                &format!("-dev-listen-address=127.0.0.1:{port}"),
            ])
            .env("HOME", dir.path())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let ca = certs.join("vault-ca.pem");
    wait_for("the dev server's CA", Duration::from_secs(20), || {
        ca.exists()
    });
    let token = write_file(dir.path(), "vault-token", "tls-root");
    let entry = |name: &str, ca_line: &str| {
        format!(
            "[[providers]]\nname = \"{name}\"\ntype = \"vault\"\naddress = \"https://127.0.0.1:{port}\"\nauth = \"token\"\ntoken_file = \"{}\"\n{ca_line}\n",
            token.display()
        )
    };
    let b = backend(
        dir.path(),
        &[
            entry("vault-tls", &format!("ca_file = \"{}\"", ca.display())),
            entry("no-ca", ""),
        ]
        .concat(),
    );
    // The server answers once it is up: the create goes through over
    // https, checked against the CA file.
    wait_for("a create over https", Duration::from_secs(20), || {
        try_create(&b, "tls/key", "vault-tls").status.success()
    });
    assert_eq!(
        b.cli_json(&["status", "tls/key"])[0]["provider"],
        "vault-tls"
    );
    // Without the CA the server's certificate is not trusted: one line,
    // naming the provider, and nothing created.
    let err = failed(&try_create(&b, "tls/other", "no-ca"));
    assert!(
        err.contains("provider no-ca") && err.contains("cannot reach Vault at https://127.0.0.1"),
        "{err}"
    );
    assert!(err.contains("invalid peer certificate"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    failed(&b.cli(&["status", "tls/other"]));
}
