//! Redis as production runs it, with real servers the tests start: TLS
//! only, a primary with replicas behind three Sentinels (over TLS), and a
//! Redis Cluster of three primaries and three replicas. Redis keeps an ACL
//! per server, so every step must reach every server: these tests rotate
//! under load from the real redis-py client (writes through the primary,
//! reads from replicas) and check each server's ACL afterwards.

use std::path::Path;
use std::time::Duration;

use rekey_testkit::*;
use serde_json::{Value, json};

/// The app user, as an operator's redis.conf would declare it: all
/// permissions, no password until rekey gives it one.
const APP_USER: &str = "user app on ~* &* +@all\n";

/// A backend that decommissions quickly and gives up on a step soon.
fn backend(dir: &Path) -> Backend {
    Backend::start(
        dir,
        BackendOpts {
            extra_toml: "[scheduler]\ntick = \"100ms\"\n[consumers]\nttl = \"10s\"\n\
                         [engine]\nstep_attempts = 2\nstep_backoff = \"100ms\"\n"
                .into(),
            ..Default::default()
        },
    )
}

/// `write_file`, as a path for a command line.
fn write(dir: &Path, name: &str, text: &str) -> String {
    write_file(dir, name, text).display().to_string()
}

/// `rekey create ID --kind redis` for the user `app` with the admin URL
/// in `admin`, a validation window and `more` flags.
fn create_redis(
    b: &Backend,
    id: &str,
    admin: &str,
    window: &str,
    more: &[&str],
) -> std::process::Output {
    let mut args = vec![
        "-o",
        "json",
        "create",
        id,
        "--kind",
        "redis",
        "--admin-url-file",
        admin,
        "--username",
        "app",
        "--window",
        window,
    ];
    args.extend_from_slice(more);
    b.cli(&args)
}

/// The password of `id`'s current version.
fn current_password(b: &Backend, id: &str) -> String {
    b.cli_json(&["get", id, "--reveal"])["value"]["password"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The servers `rekey status` says current's password is on.
fn current_nodes(b: &Backend, id: &str) -> Vec<String> {
    let st = b.cli_json(&["status", id]);
    let current = st[0]["current_version"].clone();
    let v = st[0]["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["version"] == current)
        .unwrap_or_else(|| panic!("no current version in {st}"))
        .clone();
    let mut nodes: Vec<String> = v["nodes"]
        .as_array()
        .map(|a| a.iter().map(|n| n.as_str().unwrap().to_string()).collect())
        .unwrap_or_default();
    nodes.sort();
    nodes
}

/// Rotates `id` `n` times, each after the previous one was
/// decommissioned; `during(i)` runs after rotation `i` finished, inside
/// its validation window. Returns every password current had, oldest
/// first.
fn rotate_times(b: &Backend, id: &str, n: usize, mut during: impl FnMut(usize)) -> Vec<String> {
    let mut passwords = vec![current_password(b, id)];
    for i in 0..n {
        let o = b.cli(&["-o", "json", "rotate", id, "--wait"]);
        assert!(o.status.success(), "rotation {i}: {}", stderr(&o));
        passwords.push(current_password(b, id));
        during(i);
    }
    wait_for("the last decommission", Duration::from_secs(30), || {
        b.cli_json(&["status", id])[0]["previous_version"] == Value::Null
    });
    passwords
}

/// A sidecar that writes `id` as JSON to `file`, reporting quickly.
fn sidecar(dir: &Path, b: &Backend, id: &str, file: &Path) -> Sidecar {
    Sidecar::start(
        dir,
        &[
            "--backend",
            &b.grpc,
            "--token-file",
            &b.token_path().display().to_string(),
            "--secret",
            &format!("{id}:{}:json", file.display()),
            "--listen",
            "127.0.0.1:0",
        ],
        &[
            ("REKEY_REPORT_INTERVAL", "1s"),
            ("REKEY_REPORT_SPREAD", "100ms"),
        ],
    )
}

/// On every one of `servers`, the app user signs in with `current` and
/// with none of `old`.
fn assert_only_current<'a>(
    servers: impl IntoIterator<Item = &'a RedisServer>,
    current: &str,
    old: &[String],
) {
    for s in servers {
        assert!(s.auth("app", current), "current works on {}", s.addr());
        for p in old {
            assert!(
                !s.auth("app", p),
                "an old password still works on {}",
                s.addr()
            );
        }
    }
}

/// The SHA-256 digests of the app user's passwords on `server`, as
/// `ACL GETUSER` lists them.
fn password_digests(server: &RedisServer) -> Vec<String> {
    server
        .cli(&["ACL", "GETUSER", "app"])
        .lines()
        .skip_while(|l| *l != "passwords")
        .skip(1)
        .take_while(|l| l.len() == 64 && l.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_string)
        .collect()
}

/// The app saw no failure, and used every password it was given.
fn assert_clean(summary: &Value, passwords: usize) {
    assert_eq!(summary["failed"], 0, "failed commands: {summary}");
    assert_eq!(summary["errors"], json!([]), "{summary}");
    assert!(summary["ok"].as_u64().unwrap() > 100, "{summary}");
    assert_eq!(
        summary["by_password"].as_object().unwrap().len(),
        passwords,
        "the app moved to every new password: {summary}"
    );
}

#[test]
fn tls_only_redis_rotates_and_a_wrong_ca_or_missing_certificate_is_named() {
    let dir = TempDir::new("redis-tls");
    let pki = dir.path().join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    redis_pki(&pki);
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    server_pki(&other);
    // TLS only (`port 0`), and a client certificate required.
    let server = RedisServer::start(
        "tls",
        RedisOpts {
            tls: Some(pki.clone()),
            tls_auth_clients: Some("yes"),
            extra: APP_USER.into(),
            ..RedisOpts::default()
        },
    );
    let b = backend(dir.path());
    let admin = write(dir.path(), "admin", &server.admin_url());
    let ca = pki.join("ca.pem").display().to_string();
    let cert = pki.join("client.pem").display().to_string();
    let key = pki.join("client.key").display().to_string();
    let create = |id: &str, extra: &[&str]| create_redis(&b, id, &admin, "1s", extra);
    let full = [
        "--tls-ca-file",
        &ca,
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
    ];

    // A CA that did not sign the server's certificate: refused, and said so.
    let wrong_ca = other.join("ca.pem").display().to_string();
    let o = create(
        "prod/cache",
        &[
            "--tls-ca-file",
            &wrong_ca,
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
        ],
    );
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains(&format!(
            "the server's certificate is not signed by the CA file {wrong_ca}"
        )),
        "{e}"
    );
    // No client certificate for a server that wants one.
    let o = create("prod/cache", &["--tls-ca-file", &ca]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("client certificate"), "{}", stderr(&o));
    // redis:// to a port that takes only TLS.
    let plain = write(
        dir.path(),
        "plain",
        &server.admin_url().replacen("rediss://", "redis://", 1),
    );
    let o = b.cli(&[
        "create",
        "prod/cache",
        "--kind",
        "redis",
        "--admin-url-file",
        &plain,
        "--username",
        "app",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("use rediss://"), "{}", stderr(&o));
    assert!(
        b.cli_json(&["list"]).as_array().unwrap().is_empty(),
        "nothing was created"
    );

    // The name certificates are checked against (and sent as SNI): one
    // the certificate lacks is refused, one it has is taken although the
    // connection goes to an address.
    let mut named = full.to_vec();
    named.extend(["--tls-server-name", "cache.wrong.example"]);
    let o = create("prod/cache", &named);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("not valid for the host name cache.wrong.example"),
        "{}",
        stderr(&o)
    );
    named.pop();
    named.push("localhost");
    let o = create("prod/named", &named);
    assert!(o.status.success(), "{}", stderr(&o));

    let v1 = create("prod/cache", &full);
    assert!(v1.status.success(), "{}", stderr(&v1));
    let value = b.cli_json(&["get", "prod/cache", "--reveal"])["value"].clone();
    assert!(
        value["url"].as_str().unwrap().starts_with("rediss://app:"),
        "apps reach the server over TLS too: {value}"
    );
    let first = current_password(&b, "prod/cache");
    assert!(server.auth("app", &first));

    // The sidecar validates each version over TLS before serving it.
    let out = dir.path().join("cache.json");
    let validate = |ca: &str| {
        format!(
            "format = \"json\"\nvalidate = {{ kind = \"redis\", tls_ca_file = \"{ca}\", tls_cert_file = \"{cert}\", tls_key_file = \"{key}\" }}"
        )
    };
    let cfg = sidecar_config(
        dir.path(),
        "sidecar.toml",
        &b,
        "prod/cache",
        &out,
        &validate(&ca),
    );
    let sc = Sidecar::start(
        dir.path(),
        &["--config", cfg.to_str().unwrap()],
        &[("REKEY_REPORT_SPREAD", "100ms")],
    );
    wait_for("the sidecar ready", Duration::from_secs(10), || {
        sc.get("/readyz").0 == 200
    });
    let passwords = rotate_times(&b, "prod/cache", 2, |_| {});
    assert_eq!(current_nodes(&b, "prod/cache"), [server.addr()]);
    let (last, old) = passwords.split_last().unwrap();
    assert_only_current([&server], last, old);

    // A sidecar that checks with the wrong CA rejects the value, says
    // why, and serves nothing it could not check.
    let wrong_out = dir.path().join("wrong.json");
    let wrong = sidecar_config(
        dir.path(),
        "wrong.toml",
        &b,
        "prod/cache",
        &wrong_out,
        &validate(&wrong_ca),
    );
    let bad = Sidecar::start(dir.path(), &["--config", wrong.to_str().unwrap()], &[]);
    wait_for("the rejection", Duration::from_secs(10), || {
        bad.get("/readyz").1.contains("not signed by the CA file")
    });
    assert_ne!(bad.get("/readyz").0, 200);
    assert!(!wrong_out.exists());
    assert!(!b.log().contains(last.as_str()) && !sc.log().contains(last.as_str()));
}

#[test]
fn sentinel_ten_rotations_and_a_failover_in_a_window_fail_no_command() {
    let dir = TempDir::new("redis-sentinel");
    let pki = dir.path().join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    redis_pki(&pki);
    let set = SentinelSet::start(
        "sentinel",
        2,
        &RedisOpts {
            tls: Some(pki.clone()),
            extra: APP_USER.into(),
            ..RedisOpts::default()
        },
    );
    let b = backend(dir.path());
    let admin = write(dir.path(), "admin", &set.primary.admin_url());
    let ca = pki.join("ca.pem").display().to_string();
    let sentinels = set.sentinel_addrs().join(",");
    let o = create_redis(
        &b,
        "prod/cache",
        &admin,
        "2s",
        &[
            "--topology",
            "sentinel",
            "--sentinel",
            &sentinels,
            "--master-name",
            MASTER_NAME,
            "--tls-ca-file",
            &ca,
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let mut all: Vec<String> = set.servers().map(RedisServer::addr).collect();
    all.sort();
    assert_eq!(
        current_nodes(&b, "prod/cache"),
        all,
        "v1 is on every server"
    );

    let creds = dir.path().join("cache.json");
    let _sc = sidecar(dir.path(), &b, "prod/cache", &creds);
    let app = RedisApp::start(
        dir.path(),
        json!({
            "mode": "sentinel",
            "creds": creds,
            "sentinels": set.sentinel_addrs(),
            "master": MASTER_NAME,
            "key": "rekey:sentinel",
            "tls": {"ca": ca, "cert": pki.join("client.pem"), "key": pki.join("client.key")},
        }),
    );
    let before = set.primary_port();
    let mut failed_over = false;
    let passwords = rotate_times(&b, "prod/cache", 10, |i| {
        if i != 4 {
            return;
        }
        // Inside the fifth rotation's validation window, both passwords
        // on every server: the Sentinels promote a replica.
        let answer = set.sentinels[0].sentinel_cli(&["SENTINEL", "FAILOVER", MASTER_NAME]);
        assert_eq!(answer, "OK");
        wait_for("the failover", Duration::from_secs(30), || {
            set.primary_port() != before
        });
        let now = set.primary_port();
        let primary = set.servers().find(|s| s.port == now).unwrap();
        assert!(
            primary.cli(&["ROLE"]).starts_with("master"),
            "the promoted replica serves as primary"
        );
        let pw = current_password(&b, "prod/cache");
        assert!(
            primary.auth("app", &pw),
            "the new password works on the new primary"
        );
        failed_over = true;
    });
    assert!(failed_over);
    let summary = app.stop();
    assert_clean(&summary, passwords.len());

    let (last, old) = passwords.split_last().unwrap();
    assert_only_current(set.servers(), last, old);
    assert_eq!(current_nodes(&b, "prod/cache"), all);
}

#[test]
fn a_cluster_of_six_rotates_on_every_node_and_never_finishes_without_one() {
    let dir = TempDir::new("redis-cluster");
    let mut cluster = RedisCluster::start("cluster", 3, 1, APP_USER);
    let b = backend(dir.path());
    let admin = write(dir.path(), "admin", &cluster.nodes[0].admin_url());
    let o = create_redis(&b, "prod/cache", &admin, "1s", &["--topology", "cluster"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut all = cluster.addrs();
    all.sort();
    assert_eq!(current_nodes(&b, "prod/cache"), all, "found from one seed");

    let creds = dir.path().join("cache.json");
    let _sc = sidecar(dir.path(), &b, "prod/cache", &creds);
    let app = RedisApp::start(
        dir.path(),
        json!({
            "mode": "cluster",
            "creds": creds,
            "nodes": cluster.addrs(),
            "key": "rekey:cluster",
        }),
    );
    let passwords = rotate_times(&b, "prod/cache", 10, |_| {});
    let summary = app.stop();
    assert_clean(&summary, passwords.len());
    let (last, old) = passwords.split_last().unwrap();
    assert_only_current(&cluster.nodes, last, old);

    // One node down (it answers no command) during set: the rotation
    // does not finish, says which node, and leaves nothing behind.
    let down = cluster.a_replica();
    let down_addr = down.addr();
    down.signal("STOP");
    let o = b.cli(&["rotate", "prod/cache"]);
    assert!(!o.status.success(), "the rotation cannot finish");
    let st = b.cli_json(&["status", "prod/cache"]);
    assert_eq!(st[0]["rotation"]["step"], "needs-attention", "{st}");
    let error = st[0]["rotation"]["error"].as_str().unwrap();
    assert!(
        error.contains(&down_addr),
        "the error names the node: {error}"
    );
    assert!(error.contains("5 of 6 servers done"), "{error}");
    assert_eq!(
        current_password(&b, "prod/cache"),
        *last,
        "current did not move"
    );
    let parked = b.cli_json(&["versions", "prod/cache"])[0].clone();
    assert_eq!(parked["state"], "revoked", "{parked}");
    cluster
        .nodes
        .iter()
        .find(|n| n.addr() == down_addr)
        .unwrap()
        .signal("CONT");
    cluster.wait_ok();
    for n in &cluster.nodes {
        assert!(n.auth("app", last), "current still works on {}", n.addr());
        assert_eq!(
            password_digests(n),
            [sha256_hex(last)],
            "only current is left on {}: the parked password was taken back",
            n.addr()
        );
    }
    // With the node back, a rotation goes through to all six.
    let o = b.cli(&["rotate", "prod/cache"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let newest = current_password(&b, "prod/cache");
    for n in &cluster.nodes {
        assert!(
            n.auth("app", &newest),
            "the new password is on {}",
            n.addr()
        );
    }
    assert_eq!(current_nodes(&b, "prod/cache"), all);
}

#[test]
fn a_replica_added_later_is_found_at_the_next_step() {
    let dir = TempDir::new("redis-nodes");
    let primary = RedisServer::start(
        "nodes",
        RedisOpts {
            extra: APP_USER.into(),
            ..RedisOpts::default()
        },
    );
    let replica = |tag: &str| {
        let r = RedisServer::replica_of(
            tag,
            &primary,
            RedisOpts {
                extra: APP_USER.into(),
                ..RedisOpts::default()
            },
        );
        // Discovery finds the replicas the primary names (`ROLE`).
        wait_for(
            "the primary to name the replica",
            Duration::from_secs(20),
            || {
                primary
                    .cli(&["ROLE"])
                    .lines()
                    .any(|l| l == r.port.to_string())
            },
        );
        r
    };
    let first = replica("nodes-r1");
    let b = backend(dir.path());
    let admin = write(dir.path(), "admin", &primary.admin_url());
    let o = create_redis(&b, "prod/cache", &admin, "1h", &["--topology", "nodes"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut two = vec![primary.addr(), first.addr()];
    two.sort();
    assert_eq!(current_nodes(&b, "prod/cache"), two, "found with ROLE");
    let v1 = current_password(&b, "prod/cache");
    assert!(first.auth("app", &v1), "the replica has the password too");

    let second = replica("nodes-r2");
    assert!(
        !second.auth("app", &v1),
        "a new replica has no password yet"
    );
    let o = b.cli(&["rotate", "prod/cache"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut three = vec![primary.addr(), first.addr(), second.addr()];
    three.sort();
    assert_eq!(current_nodes(&b, "prod/cache"), three);
    let v2 = current_password(&b, "prod/cache");
    for s in [&primary, &first, &second] {
        assert!(s.auth("app", &v2), "{}", s.addr());
        assert!(
            s.auth("app", &v1),
            "set gave previous to the new replica too: {}",
            s.addr()
        );
    }

    // One more, added inside the window: decommission finds it, gives it
    // current and takes previous away everywhere.
    let third = replica("nodes-r3");
    assert!(!third.auth("app", &v2));
    b.cli_json(&[
        "revoke",
        "prod/cache",
        "--version",
        "1",
        "--force",
        "--reason",
        "the window is an hour; the test does not wait",
    ]);
    let mut four = vec![primary.addr(), first.addr(), second.addr(), third.addr()];
    four.sort();
    assert_eq!(current_nodes(&b, "prod/cache"), four);
    for s in [&primary, &first, &second, &third] {
        assert!(s.auth("app", &v2), "current is on {}", s.addr());
        assert!(!s.auth("app", &v1), "previous is gone from {}", s.addr());
    }

    // A rollback restores previous on every server, also where it went
    // missing (a replica whose ACL was reloaded, say).
    let o = b.cli(&["rotate", "prod/cache"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v3 = current_password(&b, "prod/cache");
    assert_eq!(
        third.cli(&["ACL", "SETUSER", "app", &format!("<{v2}")]),
        "OK"
    );
    assert!(!third.auth("app", &v2));
    b.cli_json(&["rollback", "prod/cache"]);
    assert_eq!(current_password(&b, "prod/cache"), v2);
    for s in [&primary, &first, &second, &third] {
        assert!(s.auth("app", &v2), "previous is restored on {}", s.addr());
        assert!(s.auth("app", &v3), "{}", s.addr());
    }
    assert_eq!(current_nodes(&b, "prod/cache"), four);
}
