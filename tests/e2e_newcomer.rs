//! What a newcomer's first hour ran into, checked with the real binaries:
//! consumers that stopped cleanly holding decommission back, and the
//! other walls of the first real setup.

use std::time::Duration;

use rekey_testkit::*;

/// A sidecar that stops cleanly says goodbye: it no longer counts as a
/// live consumer, and decommission goes ahead at once instead of waiting
/// for its reports to expire.
#[tokio::test]
async fn a_stopped_sidecar_is_not_a_live_consumer() {
    let dir = TempDir::new("leaving");
    let b = Backend::start(
        dir.path(),
        BackendOpts {
            extra_toml: "[consumers]\nttl = \"1h\"\n".into(),
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
    let out = dir.path().join("key");
    let mut sidecars: Vec<Sidecar> = (0..2)
        .map(|i| {
            let out = dir.path().join(format!("key-{i}"));
            Sidecar::start(
                dir.path(),
                &[
                    "--backend",
                    &b.grpc,
                    "--token-file",
                    b.token_path().to_str().unwrap(),
                    "--secret",
                    &format!("prod/api/key:{}", out.display()),
                    "--listen",
                    "127.0.0.1:0",
                ],
                &[("REKEY_CONSUMER_ID", &format!("pod-{i}"))],
            )
        })
        .collect();
    drop(out);
    eventually(Duration::from_secs(10), "both pods reporting", || async {
        let st = b.cli_json(&["status", "prod/api/key"]);
        (st[0]["live_consumers"] == 2).then_some(())
    })
    .await;
    // One pod stops while it still serves v1: a live consumer on v1 would
    // hold v1 back for the whole hour of the consumer TTL.
    let code = sidecars.remove(0).stop();
    assert_eq!(code, Some(0));
    b.cli_json(&["rotate", "prod/api/key"]);
    let st = eventually(Duration::from_secs(15), "v1 decommissioned", || async {
        let st = b.cli_json(&["status", "prod/api/key"]);
        st[0]["previous_version"].is_null().then_some(st)
    })
    .await;
    let consumers = st[0]["consumers"].as_array().unwrap();
    assert_eq!(consumers.len(), 1, "{st}");
    assert_eq!(consumers[0]["consumer_id"], "pod-1");
    assert!(
        b.log().contains("consumer left"),
        "the backend took the goodbye"
    );
}

fn read_db(dir: &std::path::Path) -> Vec<u8> {
    let mut all = Vec::new();
    for e in std::fs::read_dir(dir.join("data")).unwrap().flatten() {
        if e.file_name().to_string_lossy().starts_with("rekey.db") {
            all.extend(std::fs::read(e.path()).unwrap());
        }
    }
    all
}

/// `rekey token create` issues a token for an identity without editing
/// the backend's configuration or restarting it; the token is printed once,
/// only its digest is stored, it can do what it was given and nothing
/// more, and a revocation applies at once.
#[tokio::test]
async fn tokens_are_issued_used_and_revoked_without_a_restart() {
    use rekey_proto::v1 as pb;
    let dir = TempDir::new("tokens");
    let b = Backend::start(dir.path(), BackendOpts::default());
    b.cli_json(&["create", "prod/api/key", "--kind", "random"]);
    b.cli_json(&["create", "prod/billing/key", "--kind", "random"]);
    let out = b.cli(&[
        "token",
        "create",
        "api-sidecar",
        "--prefix",
        "prod/api/",
        "--ops",
        "watch,report",
        "--expires",
        "90d",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let token = stdout(&out).trim().to_string();
    assert!(token.starts_with("rk_") && token.len() == 67, "{token}");
    assert!(stderr(&out).contains("shown once"));

    // It watches what it was given, nothing else, and reveals nothing.
    let mut c = client(&b.grpc, &token).await;
    let mut s = c
        .watch(pb::WatchRequest {
            secret_ids: vec!["prod/api/key".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(s.message().await.unwrap().is_some());
    let e = c
        .watch(pb::WatchRequest {
            secret_ids: vec!["prod/billing/key".into()],
        })
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    let e = c
        .get_secret(pb::GetSecretRequest {
            secret_id: "prod/api/key".into(),
            reveal: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);

    // Listed by id and identity, never with the token; only its digest
    // reaches the store.
    let list = b.cli_json(&["token", "list"]);
    let listed = &list.as_array().unwrap()[0];
    assert_eq!(listed["identity"], "api-sidecar");
    assert_eq!(listed["operations"], serde_json::json!(["watch", "report"]));
    assert!(listed["expires_at"].is_string());
    assert!(!list.to_string().contains(&token));
    let db = read_db(dir.path());
    assert!(!db.windows(token.len()).any(|w| w == token.as_bytes()));
    assert!(!b.log().contains(&token));

    // An identity that may issue tokens cannot grant more than it has.
    let narrow = b.cli(&[
        "token",
        "create",
        "ci",
        "--prefix",
        "prod/api/",
        "--ops",
        "tokens,rotate",
    ]);
    let narrow = stdout(&narrow).trim().to_string();
    let mut n = client(&b.grpc, &narrow).await;
    let e = n
        .create_token(pb::CreateTokenRequest {
            identity: "escalate".into(),
            prefixes: vec!["prod/".into()],
            operations: vec!["reveal".into()],
            expires_at_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().starts_with("ci may not"), "{e:?}");
    let e = n
        .create_token(pb::CreateTokenRequest {
            identity: "escalate".into(),
            prefixes: vec!["prod/api/".into()],
            operations: vec!["reveal".into()],
            expires_at_ms: 0,
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("cannot grant"), "{e:?}");
    n.create_token(pb::CreateTokenRequest {
        identity: "deploy".into(),
        prefixes: vec!["prod/api/".into()],
        operations: vec!["rotate".into()],
        expires_at_ms: 0,
    })
    .await
    .expect("within its own rights");
    // Nor may it issue tokens under a name another issuer's tokens carry
    // (the admin issued api-sidecar's), to pass for it in the audit log
    // or use up its Watch limit; names of its own it may issue again.
    let e = n
        .create_token(pb::CreateTokenRequest {
            identity: "api-sidecar".into(),
            prefixes: vec!["prod/api/".into()],
            operations: vec!["rotate".into()],
            expires_at_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("belongs to another issuer"), "{e:?}");
    n.create_token(pb::CreateTokenRequest {
        identity: "deploy".into(),
        prefixes: vec!["prod/api/".into()],
        operations: vec!["rotate".into()],
        expires_at_ms: 0,
    })
    .await
    .expect("a second token of its own identity");

    // Revoked: refused at once, on this replica.
    let id = listed["id"].as_str().unwrap();
    let out = b.cli(&["token", "revoke", id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let e = client(&b.grpc, &token)
        .await
        .watch(pb::WatchRequest {
            secret_ids: vec!["prod/api/key".into()],
        })
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let audit = b.cli_json(&["audit"]);
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert!(actions.contains(&"token-create") && actions.contains(&"token-revoke"));
    assert!(!audit.to_string().contains(&token));
}

/// A token issued through one replica works on the other, and its
/// revocation reaches it within seconds.
#[tokio::test]
async fn issued_tokens_reach_every_replica() {
    use rekey_proto::v1 as pb;
    let dir = TempDir::new("token-replicas");
    let db = PgDb::create("tokens").await;
    let kek = dir.path().join("kek");
    std::fs::write(&kek, "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n").unwrap();
    let admin = dir.path().join("admin.token");
    std::fs::write(&admin, "rk_shared_admin\n").unwrap();
    let opts = BackendOpts {
        store_url: Some(db.url.clone()),
        kek_file: Some(kek),
        admin_token_file: Some(admin),
        ..Default::default()
    };
    let (da, dbb) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&da).unwrap();
    std::fs::create_dir_all(&dbb).unwrap();
    let a = Backend::start(&da, opts.clone());
    let b = Backend::start(&dbb, opts);
    a.cli_json(&["create", "prod/x", "--kind", "random"]);
    let t = a.cli_json(&[
        "token", "create", "reader", "--prefix", "prod/", "--ops", "read",
    ]);
    let token = t["token"].as_str().unwrap().to_string();
    let read = |addr: String, token: String| async move {
        client(&addr, &token)
            .await
            .list_versions(pb::ListVersionsRequest {
                secret_id: "prod/x".into(),
            })
            .await
            .map(|_| ())
            .map_err(|e| e.code())
    };
    eventually(Duration::from_secs(10), "the token on replica b", || {
        let f = read(b.grpc.clone(), token.clone());
        async move { f.await.ok() }
    })
    .await;
    a.cli_json(&["token", "revoke", t["id"].as_str().unwrap()]);
    eventually(
        Duration::from_secs(10),
        "the revocation on replica b",
        || {
            let f = read(b.grpc.clone(), token.clone());
            async move { (f.await == Err(tonic::Code::Unauthenticated)).then_some(()) }
        },
    )
    .await;
}

/// `rekey seal` makes the rows an app would store, in either envelope, so a
/// user can try `rekey reencrypt` on test data.
#[test]
fn seal_makes_envelopes_the_codecs_open() {
    use rekey_keyring::MasterKey;
    use rekey_reencrypt::Codec;
    let key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    for codec in [Codec::Hyvve, Codec::Rekey] {
        let mut cmd = std::process::Command::new(CLI.path());
        cmd.args(["seal", "--codec", codec.name()])
            .env("ENCRYPTION_MASTER_KEY", key)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"sk-test-123")
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let envelope = stdout(&out).trim().to_string();
        let opened = codec
            .open(&MasterKey::from_base64(key).unwrap(), &envelope)
            .unwrap();
        assert_eq!(opened.expose(), b"sk-test-123", "{}", codec.name());
    }
}

/// `--secret ID:PATH:env=NAME` names the variable; without a name it comes
/// from the id's last segment.
#[test]
fn the_env_format_takes_its_variable_name_from_the_flag() {
    let dir = TempDir::new("env-name");
    let b = Backend::start(dir.path(), BackendOpts::default());
    let value = dir.path().join("v");
    std::fs::write(&value, "postgres://app:pw@db/app").unwrap();
    b.cli_json(&[
        "create",
        "prod/api/database",
        "--kind",
        "static",
        "--value-file",
        value.to_str().unwrap(),
    ]);
    let named = dir.path().join("named.env");
    let derived = dir.path().join("derived.env");
    let sc = Sidecar::start(
        dir.path(),
        &[
            "--backend",
            &b.grpc,
            "--token-file",
            b.token_path().to_str().unwrap(),
            "--secret",
            &format!("prod/api/database:{}:env=DATABASE_URL", named.display()),
            "--listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    wait_for("the named file", Duration::from_secs(10), || named.exists());
    assert_eq!(
        std::fs::read_to_string(&named).unwrap(),
        "DATABASE_URL=\"postgres://app:pw@db/app\"\n"
    );
    drop(sc);
    let _sc = Sidecar::start(
        dir.path(),
        &[
            "--backend",
            &b.grpc,
            "--token-file",
            b.token_path().to_str().unwrap(),
            "--secret",
            &format!("prod/api/database:{}:env", derived.display()),
            "--listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    wait_for("the derived file", Duration::from_secs(10), || {
        derived.exists()
    });
    assert!(
        std::fs::read_to_string(&derived)
            .unwrap()
            .starts_with("DATABASE=\"")
    );
}

/// Messages say what happened and what to do: a repeated rotation reports
/// its version as it stands now, a connection error names its cause, a
/// missing token says where one is looked for.
#[test]
fn messages_are_honest_and_specific() {
    let dir = TempDir::new("messages");
    let b = Backend::start(dir.path(), BackendOpts::default());
    b.cli_json(&["create", "prod/k", "--kind", "random"]);
    b.cli_json(&["rotate", "prod/k", "--request-token", "first"]);
    b.cli_json(&["rotate", "prod/k"]);
    b.cli_json(&["rotate", "prod/k"]);
    let out = b.cli(&["rotate", "prod/k", "--request-token", "first"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let said = stdout(&out);
    assert!(
        said.starts_with("repeated request: prod/k was rotated to v2 (")
            && said.contains("it is now revoked; current is v4"),
        "{said}"
    );

    let cli = |addr: &str| {
        std::process::Command::new(CLI.path())
            .args(["--addr", addr, "--token", "x", "list"])
            .output()
            .unwrap()
    };
    let out = cli(b.grpc.trim_start_matches("http://"));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("needs a scheme: http://"),
        "{}",
        stderr(&out)
    );
    let out = cli(&format!("http://{}", b.metrics));
    assert!(
        stderr(&out).contains("not as rekey-backend's gRPC port"),
        "{}",
        stderr(&out)
    );
    let out = cli(&b.grpc.replace("http://", "https://"));
    assert!(
        stderr(&out).contains("does not speak TLS; use http://"),
        "{}",
        stderr(&out)
    );
    let out = cli(&format!("http://127.0.0.1:{}", free_port()));
    assert!(
        stderr(&out).contains("nothing listens there"),
        "{}",
        stderr(&out)
    );
    for out in [
        cli(b.grpc.trim_start_matches("http://")),
        cli(&format!("http://{}", b.metrics)),
    ] {
        assert_eq!(
            stderr(&out).matches("error:").count(),
            1,
            "{}",
            stderr(&out)
        );
    }

    let empty = TempDir::new("no-token");
    let out = std::process::Command::new(CLI.path())
        .args(["--addr", &b.grpc, "list"])
        .current_dir(empty.path())
        .env_remove("REKEY_TOKEN")
        .env_remove("REKEY_TOKEN_FILE")
        .output()
        .unwrap();
    assert!(
        stderr(&out).contains("give --token or --token-file")
            && stderr(&out).contains("./rekey-data/admin.token"),
        "{}",
        stderr(&out)
    );
    assert!(
        !b.log().contains("Some("),
        "the ready line prints addresses, not Options"
    );

    // Help offers the backend options where they apply, apart from each
    // command's own, and not on the demo, which starts its own backend.
    let help = |args: &[&str]| {
        let out = std::process::Command::new(CLI.path())
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    };
    let status = help(&["status", "--help"]);
    assert!(
        status.contains("Backend options") && status.contains("--addr"),
        "{status}"
    );
    assert!(status.contains("[SECRET]  One secret's id"), "{status}");
    let demo = help(&["demo", "--help"]);
    for option in [
        "--addr",
        "--token",
        "--ca-file",
        "--cert-file",
        "Backend options",
    ] {
        assert!(!demo.contains(option), "demo offers {option}: {demo}");
    }
    assert!(demo.contains("--rotations"), "{demo}");
    let seal = help(&["seal", "--help"]);
    assert_eq!(seal.matches("--key-file").count(), 1, "{seal}");
}

/// A port clash stops the backend before it writes anything, and says so
/// once.
#[test]
fn a_port_clash_writes_nothing_and_is_said_once() {
    let dir = TempDir::new("clash");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let data = dir.path().join("data");
    let cfg = dir.path().join("rekey.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:{port}\"\nmetrics_listen = \"off\"\ndata_dir = {:?}\n",
            data.display().to_string()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(BACKEND.path())
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert_eq!(err.matches("cannot listen on").count(), 1, "{err}");
    assert!(!data.exists(), "nothing written to the data directory");
    drop(taken);
}

/// One documented step puts every binary on the PATH, and `rekey demo`
/// then works from there.
#[test]
fn one_install_step_puts_every_binary_on_the_path() {
    let root = TempDir::new("install");
    let target = CLI.path().parent().unwrap().parent().unwrap().to_path_buf();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install");
    let mut cmd = std::process::Command::new(script);
    cmd.args(["--debug", "--root"])
        .arg(root.path())
        .env("CARGO_TARGET_DIR", &target);
    rekey_testkit::bins::without_package_vars(&mut cmd);
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let bin = root.path().join("bin");
    for name in ["rekey", "rekey-backend", "rekey-sidecar"] {
        assert!(bin.join(name).exists(), "{name} installed");
    }
    let work = TempDir::new("install-demo");
    let out = std::process::Command::new(bin.join("rekey"))
        .args([
            "demo",
            "--rotations",
            "1",
            "--interval",
            "300ms",
            "--rate",
            "50",
        ])
        .current_dir(work.path())
        .env("PATH", &bin)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains("0 failed; pods restarted: 0"),
        "{}",
        stdout(&out)
    );
}

/// A sidecar that cannot start lists every problem in one go: a bad local
/// path and a secret the backend does not have are reported together, so
/// that fixing one does not reveal the other only on the next start.
#[test]
fn sidecar_start_up_lists_every_problem_at_once() {
    let dir = TempDir::new("all-problems");
    let b = Backend::start(dir.path(), BackendOpts::default());
    b.cli_json(&["create", "prod/api/key", "--kind", "random"]);
    let good = dir.path().join("key");
    let bad = dir.path().join("no-such-dir").join("key");
    let token = b.token_path();
    let (code, _, stderr) = Sidecar::refuse(&[
        "--backend",
        &b.grpc,
        "--token-file",
        token.to_str().unwrap(),
        "--secret",
        &format!("prod/api/key:{}", good.display()),
        "--secret",
        &format!("prod/api/typo:{}", bad.display()),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(stderr.matches("error:").count(), 1, "{stderr}");
    assert!(
        stderr.contains("no-such-dir"),
        "the local problem: {stderr}"
    );
    assert!(
        stderr.contains("secret prod/api/typo") && stderr.contains("not found"),
        "the backend's problem: {stderr}"
    );
    assert!(
        !stderr.contains("secret prod/api/key"),
        "a secret without problems is not listed: {stderr}"
    );
    assert!(
        !good.exists(),
        "nothing is written when start-up is refused"
    );

    // A template that names a field the value lacks is a backend-side
    // problem too, listed beside a local one.
    let cfg = dir.path().join("sidecar.toml");
    std::fs::write(
        &cfg,
        format!(
            "backend = {:?}\ntoken_file = {:?}\nlisten = \"127.0.0.1:0\"\n\n\
             [[secrets]]\nid = \"prod/api/key\"\npath = {:?}\n\
             template = \"user={{{{username}}}}\"\n\n\
             [[secrets]]\nid = \"prod/api/typo\"\npath = {:?}\n",
            b.grpc,
            token.display().to_string(),
            good.display().to_string(),
            bad.display().to_string(),
        ),
    )
    .unwrap();
    let (code, _, stderr) = Sidecar::refuse(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("no-such-dir"), "{stderr}");
    assert!(
        stderr.contains("secret prod/api/key") && stderr.contains("username"),
        "the template's problem: {stderr}"
    );
    assert!(stderr.contains("secret prod/api/typo"), "{stderr}");

    // With the backend down the local problems are still listed, and the
    // operator learns the secrets were not checked.
    drop(b);
    let (code, _, stderr) = Sidecar::refuse(&[
        "--backend",
        "http://127.0.0.1:1",
        "--token-file",
        token.to_str().unwrap(),
        "--secret",
        &format!("prod/api/typo:{}", bad.display()),
    ]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("no-such-dir"), "{stderr}");
    assert!(stderr.contains("could not be checked"), "{stderr}");
}
