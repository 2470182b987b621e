//! End to end: the real `rekey-sidecar` next to the real `rekey-backend`.
//! Hot reload with SIGHUP, honest readiness, fail static across a backend
//! outage, the AWS Secrets Manager Agent read API, file sources swapped the
//! way kubelet does, and start-up errors listed before the port is bound.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rekey_testkit::*;

const API_TOKEN: &str = "api-token-for-tests-0123";

/// A stand-in app: writes its pid, and a line per SIGHUP.
struct App {
    child: std::process::Child,
    pid_file: PathBuf,
    hups: PathBuf,
}

impl App {
    fn start(dir: &Path) -> App {
        let pid_file = dir.join("app.pid");
        let hups = dir.join("hups");
        let script = format!(
            "echo $$ > {pid}; trap 'echo hup >> {hups}' HUP; while true; do sleep 0.02; done",
            pid = pid_file.display(),
            hups = hups.display()
        );
        let child = std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(&pid_file).map_or(true, |s| s.trim().is_empty()) {
            assert!(Instant::now() < deadline, "app did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        App {
            child,
            pid_file,
            hups,
        }
    }

    fn hup_count(&self) -> usize {
        std::fs::read_to_string(&self.hups)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn reveal(b: &Backend, id: &str) -> String {
    b.cli_json(&["get", id, "--reveal"])["value"]
        .as_str()
        .unwrap()
        .to_string()
}

/// How fast a rotation reaches the file is measured by the sidecar
/// benchmark (BENCHMARKS.md, "Sidecar propagation"); here only that it
/// does, with the right content, and that the app is told.
#[test]
fn a_rotation_reaches_the_file_and_the_app_gets_sighup() {
    let dir = TempDir::new("sc-hup");
    let b = Backend::start(dir.path(), BackendOpts::default());
    b.cli_json(&["create", "prod/api/jwt", "--kind", "random"]);
    let app = App::start(dir.path());
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let cfg = write_file(
        dir.path(),
        "sidecar.toml",
        format!(
            r#"
backend = "{backend}"
token_file = "{token}"
listen = "127.0.0.1:0"
consumer_id = "api-0"

[[secrets]]
id = "prod/api/jwt"
path = "{out}/jwt"
keyring_path = "{out}/jwt.keyring.json"
reload = ["app"]

[[reload]]
name = "app"
signal = "SIGHUP"
pid_file = "{pid}"
"#,
            backend = b.grpc,
            token = b.token_path().display(),
            out = out.display(),
            pid = app.pid_file.display()
        ),
    );
    let sc = Sidecar::start(dir.path(), &["--config", cfg.to_str().unwrap()], &[]);
    let file = out.join("jwt");
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        reveal(&b, "prod/api/jwt")
    );
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&file).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o400);
    wait_for("the first reload", Duration::from_secs(5), || {
        app.hup_count() == 1
    });

    for round in 2..=4u64 {
        let before = std::fs::read_to_string(&file).unwrap();
        b.cli_json(&["rotate", "prod/api/jwt"]);
        wait_for("the rotated file", Duration::from_secs(10), || {
            std::fs::read_to_string(&file).unwrap() != before
        });
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            reveal(&b, "prod/api/jwt")
        );
        let keyring: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("jwt.keyring.json")).unwrap())
                .unwrap();
        assert_eq!(keyring["current"]["version"], round);
        assert_eq!(keyring["previous"]["version"], round - 1);
        wait_for("SIGHUP", Duration::from_secs(5), || {
            app.hup_count() == round as usize
        });
    }
    // The backend knows what the pod serves (the report after a delivery
    // waits a random part of report_spread, 1 s by default).
    wait_for("the report of v4", Duration::from_secs(10), || {
        b.cli_json(&["status", "prod/api/jwt"])[0]["consumers"][0]["version"] == 4
    });
    let st = b.cli_json(&["status", "prod/api/jwt"]);
    let consumers = st[0]["consumers"].as_array().unwrap();
    assert_eq!(consumers.len(), 1);
    assert_eq!(consumers[0]["consumer_id"], "api-0");
    assert_eq!(consumers[0]["version"], 4);
    let (code, m) = sc.get("/metrics");
    assert_eq!(code, 200);
    assert!(
        m.contains("rekey_sidecar_secret_version{secret=\"prod/api/jwt\"} 4"),
        "{m}"
    );
    assert!(
        m.contains("rekey_sidecar_reloads_total{action=\"app\",outcome=\"ok\"} 4"),
        "{m}"
    );
    assert!(m.contains("rekey_sidecar_delivery_seconds_count 3"), "{m}");
    assert!(m.contains("rekey_sidecar_backend_connected 1"), "{m}");
}

#[test]
fn readyz_turns_200_once_every_secret_is_written() {
    let dir = TempDir::new("sc-ready");
    let port = free_port();
    let mut b = Backend::start(
        dir.path(),
        BackendOpts {
            listen: Some(format!("127.0.0.1:{port}")),
            ..Default::default()
        },
    );
    b.cli_json(&["create", "prod/api/key", "--kind", "random"]);
    b.stop();
    let out = dir.path().join("key");
    let sc = Sidecar::start(
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
        &[("REKEY_BACKOFF_MAX", "300ms")],
    );
    let (code, body) = sc.get("/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("prod/api/key: not delivered yet"), "{body}");
    assert_eq!(sc.get("/livez").0, 200);
    b.restart();
    wait_for("readiness", Duration::from_secs(15), || {
        sc.get("/readyz").0 == 200
    });
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        reveal(&b, "prod/api/key")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_static_through_a_backend_outage_then_catch_up_without_a_duplicate_reload() {
    let dir = TempDir::new("sc-static");
    let db = PgDb::create("sidecar").await;
    let kek = write_file(
        dir.path(),
        "kek",
        "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n",
    );
    let token = write_file(
        dir.path(),
        "admin.token",
        "rk_sidecar_test_token_0123456789\n",
    );
    let port = free_port();
    let opts = |listen: Option<String>| BackendOpts {
        store_url: Some(db.url.clone()),
        kek_file: Some(kek.clone()),
        admin_token_file: Some(token.clone()),
        listen,
        ..Default::default()
    };
    let (da, db_dir) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&da).unwrap();
    std::fs::create_dir_all(&db_dir).unwrap();
    let mut a = Backend::start(&da, opts(Some(format!("127.0.0.1:{port}"))));
    let other = Backend::start(&db_dir, opts(None));
    a.cli_json(&["create", "prod/api/key", "--kind", "random"]);
    let app = App::start(dir.path());
    let out = dir.path().join("key");
    let cfg = write_file(
        dir.path(),
        "sidecar.toml",
        format!(
            r#"
backend = "{backend}"
token_file = "{token}"
api_token_file = "{api}"
listen = "127.0.0.1:0"
backoff_max = "300ms"
[[secrets]]
id = "prod/api/key"
path = "{out}"
reload = ["app"]
[[reload]]
name = "app"
signal = "HUP"
pid_file = "{pid}"
"#,
            backend = a.grpc,
            token = token.display(),
            api = write_file(dir.path(), "api.token", API_TOKEN).display(),
            out = out.display(),
            pid = app.pid_file.display()
        ),
    );
    let sc = Sidecar::start(dir.path(), &["--config", cfg.to_str().unwrap()], &[]);
    wait_for("first reload", Duration::from_secs(5), || {
        app.hup_count() == 1
    });
    let v1 = std::fs::read_to_string(&out).unwrap();

    // The backend the sidecar talks to dies.
    a.kill9();
    wait_for("the sidecar to notice", Duration::from_secs(10), || {
        sc.get("/metrics")
            .1
            .contains("rekey_sidecar_backend_connected 0")
    });
    let (code, body) = sc.get("/readyz");
    assert_eq!(code, 200, "fail static stays ready: {body}");
    assert!(body.contains("unreachable"), "{body}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), v1);
    let (code, api) = http_request(
        &sc.http,
        "/v1/prod/api/key",
        &[("X-Aws-Parameters-Secrets-Token", API_TOKEN)],
    );
    assert_eq!(code, 200, "{api}");

    // Meanwhile the secret rotates through the other replica.
    other.cli_json(&["rotate", "prod/api/key"]);
    let v2 = reveal(&other, "prod/api/key");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        v1,
        "nothing new while cut off"
    );

    a.restart();
    wait_for("catch-up", Duration::from_secs(15), || {
        std::fs::read_to_string(&out).unwrap() == v2
    });
    wait_for("the reload for v2", Duration::from_secs(5), || {
        app.hup_count() == 2
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        app.hup_count(),
        2,
        "one reload per new version, none for the reconnect"
    );
    let m = sc.get("/metrics").1;
    assert!(m.contains("rekey_sidecar_backend_connected 1"), "{m}");
    assert!(
        m.contains("rekey_sidecar_deliveries_total{secret=\"prod/api/key\",outcome=\"ok\"} 2"),
        "{m}"
    );
}

#[test]
fn the_read_api_behaves_like_the_aws_secrets_manager_agent() {
    let dir = TempDir::new("sc-api");
    let b = Backend::start(dir.path(), BackendOpts::default());
    let f = write_file(dir.path(), "v", "first-static-value");
    b.cli_json(&[
        "create",
        "prod/api/static",
        "--kind",
        "static",
        "--value-file",
        f.to_str().unwrap(),
    ]);
    let f2 = write_file(dir.path(), "v2", "second-static-value");
    b.cli_json(&[
        "rotate",
        "prod/api/static",
        "--value-file",
        f2.to_str().unwrap(),
    ]);
    let api = write_file(dir.path(), "api.token", API_TOKEN);
    let sc = Sidecar::start(
        dir.path(),
        &[
            "--backend",
            &b.grpc,
            "--token-file",
            b.token_path().to_str().unwrap(),
            "--secret",
            &format!(
                "prod/api/static:{}:json",
                dir.path().join("static.json").display()
            ),
            "--api-token-file",
            api.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("static.json")).unwrap())
            .unwrap();
    assert_eq!(json, serde_json::json!({"value": "second-static-value"}));

    let tok = [("X-Aws-Parameters-Secrets-Token", API_TOKEN)];
    let (code, body) = http_request(
        &sc.http,
        "/secretsmanager/get?secretId=prod/api/static",
        &tok,
    );
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["Name"], "prod/api/static");
    assert_eq!(v["SecretString"], "second-static-value");
    assert_eq!(v["VersionId"], "2");
    assert_eq!(v["VersionStages"], serde_json::json!(["AWSCURRENT"]));
    let created = v["CreatedDate"].as_str().expect("CreatedDate is a string");
    let secs: f64 = created.parse().unwrap();
    assert!(secs > 1.7e9 && secs < 1e11, "epoch seconds: {created}");
    assert!(v["ARN"].as_str().unwrap().contains("prod/api/static"));

    let (code, body) = http_request(
        &sc.http,
        "/secretsmanager/get?secretId=prod/api/static&versionStage=AWSPREVIOUS",
        &tok,
    );
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("first-static-value"));
    let (code, body) = http_request(&sc.http, "/v1/prod/api/static?versionId=1", &tok);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"AWSPREVIOUS\""));
    let (code, _) = http_request(&sc.http, "/v1/prod/api/static", &tok);
    assert_eq!(code, 200);

    // Token checks: none, wrong; proxies refused; ping is open.
    let (code, body) = http_request(
        &sc.http,
        "/secretsmanager/get?secretId=prod/api/static",
        &[],
    );
    assert_eq!(code, 403);
    assert!(!body.contains("static-value"));
    let (code, _) = http_request(
        &sc.http,
        "/v1/prod/api/static",
        &[("X-Aws-Parameters-Secrets-Token", "api-token-for-tests-0124")],
    );
    assert_eq!(code, 403);
    let (code, body) = http_request(
        &sc.http,
        "/v1/prod/api/static",
        &[
            ("X-Aws-Parameters-Secrets-Token", API_TOKEN),
            ("X-Forwarded-For", "10.0.0.1"),
        ],
    );
    assert_eq!(code, 400);
    assert!(!body.contains("static-value"));
    assert_eq!(sc.get("/ping"), (200, "healthy".to_string()));
    let (code, _) = http_request(&sc.http, "/v1/prod/other", &tok);
    assert_eq!(code, 404);
    let (code, _) = http_request(
        &sc.http,
        "/v1/prod/api/static?versionStage=AWSPENDING",
        &tok,
    );
    assert_eq!(code, 400);
    // No value in the sidecar's log.
    assert!(!sc.log().contains("static-value"));
}

#[test]
fn a_file_source_swapped_like_kubelet_goes_through_the_same_pipeline() {
    let dir = TempDir::new("sc-files");
    let vol = dir.path().join("volume");
    std::fs::create_dir_all(vol.join("..gen1")).unwrap();
    std::fs::write(vol.join("..gen1/api-key"), "key-one").unwrap();
    std::os::unix::fs::symlink("..gen1", vol.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/api-key", vol.join("api-key")).unwrap();
    let app = App::start(dir.path());
    let out = dir.path().join("api-key.env");
    let cfg = write_file(
        dir.path(),
        "sidecar.toml",
        format!(
            r#"
listen = "127.0.0.1:0"
[[file_sources]]
id = "mounted/api-key"
source = "{src}"
path = "{out}"
format = "env"
env_name = "AGNO_API_KEY"
reload = ["app-by-pid"]
[[reload]]
name = "app-by-pid"
signal = "SIGHUP"
pid_file = "{pid}"
"#,
            src = vol.join("api-key").display(),
            out = out.display(),
            pid = app.pid_file.display()
        ),
    );
    let sc = Sidecar::start(dir.path(), &["--config", cfg.to_str().unwrap()], &[]);
    wait_for("the first delivery", Duration::from_secs(5), || {
        std::fs::read_to_string(&out).is_ok_and(|s| s == "AGNO_API_KEY=\"key-one\"\n")
    });
    assert_eq!(sc.get("/readyz").0, 200);
    wait_for("the first reload", Duration::from_secs(5), || {
        app.hup_count() == 1
    });

    // kubelet's update: a new generation, then one rename of ..data.
    std::fs::create_dir_all(vol.join("..gen2")).unwrap();
    std::fs::write(vol.join("..gen2/api-key"), "key-two").unwrap();
    std::os::unix::fs::symlink("..gen2", vol.join("..data_tmp")).unwrap();
    std::fs::rename(vol.join("..data_tmp"), vol.join("..data")).unwrap();
    std::fs::remove_dir_all(vol.join("..gen1")).unwrap();
    wait_for("the swapped value", Duration::from_secs(5), || {
        std::fs::read_to_string(&out).is_ok_and(|s| s == "AGNO_API_KEY=\"key-two\"\n")
    });
    wait_for("the second reload", Duration::from_secs(5), || {
        app.hup_count() == 2
    });
    let m = sc.get("/metrics").1;
    assert!(
        m.contains("rekey_sidecar_secret_version{secret=\"mounted/api-key\"} 2"),
        "{m}"
    );
}

#[test]
fn start_up_problems_are_listed_together_before_the_port_is_bound() {
    let dir = TempDir::new("sc-bad");
    let (code, out, err) = Sidecar::refuse(&[
        "--token-file",
        "/nonexistent/token",
        "--secret",
        "prod/a:/nonexistent-dir/a",
        "--secret",
        "malformed",
    ]);
    assert_eq!(code, Some(2));
    assert!(out.is_empty(), "nothing listened: {out}");
    for needle in [
        "token_file: cannot read /nonexistent/token",
        "cannot write in /nonexistent-dir",
        "--secret \"malformed\"",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in {err}");
    }

    let cfg = write_file(
        dir.path(),
        "bad.toml",
        format!(
            r#"
token_file = "{tok}"
[[secrets]]
id = "prod/a"
path = "{out}/a"
reload = ["app"]
[[reload]]
name = "app"
signal = "SIGBOGUS"
pid_file = "/run/app.pid"
"#,
            tok = write_file(dir.path(), "tok", "x").display(),
            out = dir.path().display()
        ),
    );
    let (code, _, err) = Sidecar::refuse(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(code, Some(2));
    assert!(err.contains("unknown signal \"SIGBOGUS\""), "{err}");

    // Against a live backend: an identity outside its policy, and a template
    // naming a field the value lacks, both refused before binding.
    let extra = format!(
        "[[auth.tokens]]\nidentity = \"pod-a\"\nsha256 = \"{}\"\n[[auth.policies]]\nidentity = \"pod-a\"\nprefixes = [\"prod/api/\"]\noperations = [\"watch\", \"report\"]\n",
        sha256_hex("pod-a-token-0123456789")
    );
    let b = Backend::start(
        dir.path(),
        BackendOpts {
            extra_toml: extra,
            ..Default::default()
        },
    );
    b.cli_json(&["create", "prod/api/jwt", "--kind", "random"]);
    b.cli_json(&["create", "prod/billing/jwt", "--kind", "random"]);
    let pod_token = write_file(dir.path(), "pod.token", "pod-a-token-0123456789");
    let cfg = write_file(
        dir.path(),
        "tmpl.toml",
        format!(
            r#"
backend = "{backend}"
token_file = "{tok}"
listen = "127.0.0.1:0"
[[secrets]]
id = "prod/api/jwt"
path = "{out}/jwt.url"
template = "https://{{{{username}}}}:{{{{value}}}}@api"
[[secrets]]
id = "prod/billing/jwt"
path = "{out}/billing"
"#,
            backend = b.grpc,
            tok = pod_token.display(),
            out = dir.path().display()
        ),
    );
    let (code, out, err) = Sidecar::refuse(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(out.is_empty());
    assert!(
        err.contains("prod/billing/jwt: permission denied: pod-a may not watch prod/billing/jwt"),
        "{err}"
    );
    assert!(
        err.contains("prod/api/jwt: the template names field(s) the value lacks: username"),
        "{err}"
    );
    assert!(!dir.path().join("jwt.url").exists());
}

#[test]
fn an_idle_sidecar_stays_small_and_sigterm_stops_it_with_status_0() {
    let dir = TempDir::new("sc-term");
    let b = Backend::start(dir.path(), BackendOpts::default());
    b.cli_json(&["create", "prod/api/jwt", "--kind", "random"]);
    let mut sc = Sidecar::start(
        dir.path(),
        &[
            "--backend",
            &b.grpc,
            "--token-file",
            b.token_path().to_str().unwrap(),
            "--secret",
            &format!("prod/api/jwt:{}", dir.path().join("jwt").display()),
            "--listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    assert_eq!(sc.get("/readyz").0, 200);
    // Its memory is measured by the sidecar benchmark (BENCHMARKS.md), not
    // bounded here: a test's build and machine say little about it.
    assert_eq!(sc.stop(), Some(0));
    assert!(sc.log().contains("stopped"));
}

#[test]
fn a_version_that_fails_validation_is_reported_and_not_served() {
    let dir = TempDir::new("sc-valid");
    let b = Backend::start(dir.path(), BackendOpts::default());
    let good = write_file(dir.path(), "good", "redis://127.0.0.1:6379");
    b.cli_json(&[
        "create",
        "prod/api/redis-url",
        "--kind",
        "static",
        "--value-file",
        good.to_str().unwrap(),
    ]);
    let out = dir.path().join("redis-url");
    let ran = dir.path().join("ran");
    let cfg = write_file(
        dir.path(),
        "sidecar.toml",
        format!(
            r#"
backend = "{backend}"
token_file = "{token}"
listen = "127.0.0.1:0"
consumer_id = "worker-0"
[[secrets]]
id = "prod/api/redis-url"
path = "{out}"
validate = {{ kind = "redis" }}
reload = ["notify"]
[[reload]]
name = "notify"
command = ["sh", "-c", "echo ran >> {ran}"]
"#,
            backend = b.grpc,
            token = b.token_path().display(),
            out = out.display(),
            ran = ran.display()
        ),
    );
    let sc = Sidecar::start(dir.path(), &["--config", cfg.to_str().unwrap()], &[]);
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "redis://127.0.0.1:6379"
    );
    wait_for("the command reload", Duration::from_secs(5), || {
        std::fs::read_to_string(&ran).is_ok_and(|s| s.lines().count() == 1)
    });

    let bad = write_file(
        dir.path(),
        "bad",
        "redis://nobody:not-the-password-42@127.0.0.1:6379",
    );
    b.cli_json(&[
        "rotate",
        "prod/api/redis-url",
        "--value-file",
        bad.to_str().unwrap(),
    ]);
    wait_for("the rejection", Duration::from_secs(10), || {
        sc.get("/metrics")
            .1
            .contains("outcome=\"validation_failed\"} 1")
    });
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "redis://127.0.0.1:6379",
        "the last good value stays"
    );
    let (code, body) = sc.get("/readyz");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("serving v1 (last good); newer version rejected: v2: validation failed: redis: AUTH refused"), "{body}");
    assert!(!body.contains("not-the-password-42"), "{body}");
    // The sidecar reports the failure at once; the backend stores it
    // with the reports that arrive beside it.
    wait_for("the failure in status", Duration::from_secs(10), || {
        b.cli_json(&["status", "prod/api/redis-url"])[0]["consumers"][0]["healthy"] == false
    });
    let st = b.cli_json(&["status", "prod/api/redis-url"]);
    let c = &st[0]["consumers"][0];
    assert_eq!(c["version"], 1);
    assert_eq!(c["healthy"], false);
    assert!(c["error"].as_str().unwrap().contains("AUTH refused"), "{c}");
    assert_eq!(
        std::fs::read_to_string(&ran).unwrap().lines().count(),
        1,
        "no reload for a rejected version"
    );
    assert!(!sc.log().contains("not-the-password-42"));
}

/// `rekey demo` runs as the README says and prints what it promises. Its
/// "0 failed" line is the demo's own count of its own load, so it proves
/// that the demo works, not that rotation drops no request: that proof is
/// `e2e_zero_downtime.rs` and `e2e_redis.rs`, whose apps are clients
/// independent of rekey (sqlx, redis-py) counting their own failures.
#[test]
fn rekey_demo_rotates_under_load_without_a_failed_request() {
    let dir = TempDir::new("demo");
    let o = std::process::Command::new(CLI.path())
        .args([
            "demo",
            "--rotations",
            "3",
            "--interval",
            "300ms",
            "--rate",
            "100",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let out = stdout(&o);
    assert!(o.status.success(), "{out}\n{}", stderr(&o));
    assert!(out.contains("rotate -> v4"), "{out}");
    assert_eq!(
        out.matches("on disk").count(),
        6,
        "both pods got every version: {out}"
    );
    let summary = out.lines().find(|l| l.starts_with("requests:")).unwrap();
    assert!(
        summary.ends_with("0 failed; pods restarted: 0"),
        "{summary}"
    );
    assert!(!summary.starts_with("requests: 0 sent"), "{summary}");
    assert!(
        out.contains("pod-0 v4") && out.contains("pod-1 v4"),
        "the apps took the last version: {out}"
    );
}

/// The demo counts restarts instead of printing a fixed 0: a sidecar killed
/// mid-run is started again, counted, and fails the demo.
#[test]
fn rekey_demo_counts_a_pod_container_that_had_to_be_restarted() {
    use std::io::{BufRead, BufReader};
    let dir = TempDir::new("demo-kill");
    let mut demo = std::process::Command::new(CLI.path())
        .args([
            "demo",
            "--rotations",
            "3",
            "--interval",
            "300ms",
            "--rate",
            "50",
        ])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(demo.stdout.take().unwrap()).lines();
    let mut out = String::new();
    let mut sidecar_pid = None;
    let mut killed = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        out.push_str(&line);
        out.push('\n');
        // "pod-1: sidecar (pid N) wrote v1 to ..."
        if let Some(rest) = line.split("pod-1: sidecar (pid ").nth(1) {
            sidecar_pid = rest.split(')').next().map(str::to_string);
        }
        if killed.is_none() && line.contains("rotate -> v2") {
            let pid = sidecar_pid
                .clone()
                .expect("the demo names pod-1's sidecar pid");
            succeed(std::process::Command::new("kill").args(["-KILL", &pid]));
            killed = Some(pid);
        }
    }
    let o = demo.wait_with_output().unwrap();
    let err = stderr(&o);
    let pid = killed.unwrap_or_else(|| panic!("no rotation to v2: {out}"));
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    assert!(
        out.contains(&format!(
            "restart: pod-1 sidecar: pid {pid} exited (signal: 9 (SIGKILL)), started again as pid"
        )),
        "{out}"
    );
    let summary = out.lines().find(|l| l.starts_with("requests:")).unwrap();
    assert!(summary.ends_with("; pods restarted: 1"), "{summary}");
    assert!(
        err.contains("1 pod container restarts; zero downtime means none of either"),
        "{err}"
    );
    // The restarted sidecar caught up: both pods got the last version.
    assert!(out.contains("pod-1: v4 on disk"), "{out}");
}

/// Sends a signal (`-STOP`, `-CONT`, ...) to the sidecar.
fn signal(sc: &Sidecar, sig: &str) {
    succeed(
        std::process::Command::new("kill")
            .arg(sig)
            .arg(sc.pid().to_string()),
    );
}

/// A reload endpoint on the test's side: counts POSTs to /-/reload.
fn reload_endpoint() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h = hits.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let mut s = s;
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).unwrap_or(0);
            if String::from_utf8_lossy(&buf[..n]).starts_with("POST /-/reload ") {
                h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            let _ = s.write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n");
        }
    });
    (addr, hits)
}

#[test]
fn an_http_reload_hook_is_posted_once_per_burst() {
    let dir = TempDir::new("sc-post");
    let b = Backend::start(dir.path(), BackendOpts::default());
    b.cli_json(&["create", "prod/api/a", "--kind", "random"]);
    b.cli_json(&["create", "prod/api/b", "--kind", "random"]);
    let (addr, hits) = reload_endpoint();
    let cfg = write_file(
        dir.path(),
        "sidecar.toml",
        format!(
            r#"
backend = "{backend}"
token_file = "{token}"
listen = "127.0.0.1:0"
debounce = "1500ms"
[[secrets]]
id = "prod/api/a"
path = "{out}/a"
reload = ["app"]
[[secrets]]
id = "prod/api/b"
path = "{out}/b"
format = "env"
reload = ["app"]
[[reload]]
name = "app"
http_post = "http://{addr}/-/reload"
"#,
            backend = b.grpc,
            token = b.token_path().display(),
            out = dir.path().display()
        ),
    );
    let sc = Sidecar::start(dir.path(), &["--config", cfg.to_str().unwrap()], &[]);
    let count = || hits.load(std::sync::atomic::Ordering::SeqCst);
    wait_for("the start-up reload", Duration::from_secs(5), || {
        count() == 1
    });
    // Both secrets rotate while the sidecar is stopped (SIGSTOP), so both
    // changes are waiting for it when it continues, however long the two
    // rotations took: one burst, one POST.
    let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap();
    let (a_before, b_before) = (read("a"), read("b"));
    signal(&sc, "-STOP");
    b.cli_json(&["rotate", "prod/api/a"]);
    b.cli_json(&["rotate", "prod/api/b"]);
    signal(&sc, "-CONT");
    wait_for("both files", Duration::from_secs(10), || {
        read("a") != a_before && read("b") != b_before
    });
    wait_for("the reload", Duration::from_secs(10), || count() == 2);
    // Nothing more once the debounce (1.5 s) has passed again.
    std::thread::sleep(Duration::from_millis(2000));
    assert_eq!(count(), 2, "debounced into one");
    assert!(
        std::fs::read_to_string(dir.path().join("b"))
            .unwrap()
            .starts_with("B=\"")
    );
    let m = sc.get("/metrics").1;
    assert!(
        m.contains("rekey_sidecar_reloads_total{action=\"app\",outcome=\"ok\"} 2"),
        "{m}"
    );
}
