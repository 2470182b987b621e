//! End to end: credentials that live in real systems. `postgres` against a
//! private Postgres with password authentication, `redis` against the
//! machine's Redis (ACL), `exec` with operator hooks; decommission,
//! rollback, one rotation at a time, and every failure stopping a rotation
//! before finish with current still working.

use std::time::Duration;

use rekey_testkit::*;
use serde_json::Value;

fn fails_with(o: &std::process::Output, needle: &str) {
    assert!(!o.status.success(), "expected failure: {}", stdout(o));
    let e = stderr(o);
    assert!(e.contains(needle), "expected {needle:?} in {e}");
}

fn fields(b: &Backend, id: &str, stage: &str) -> Value {
    b.cli_json(&["get", id, "--stage", stage, "--reveal"])["value"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_alternating_users_rotate_decommission_and_roll_back() {
    let dir = TempDir::new("pgkind");
    let pg = PgServer::start("kind");
    pg.app_database().await;
    let admin = dir.path().join("admin-url");
    std::fs::write(&admin, pg.admin_url("appdb")).unwrap();
    let b = Backend::start(
        dir.path(),
        BackendOpts {
            extra_toml: "[scheduler]\ntick = \"100ms\"\n".into(),
            ..Default::default()
        },
    );
    let v1 = b.cli_json(&[
        "create",
        "prod/api/database",
        "--kind",
        "postgres",
        "--admin-url-file",
        admin.to_str().unwrap(),
        "--group-role",
        "app_owner",
        "--role-base",
        "app",
        "--database",
        "appdb",
        "--window",
        "1h",
    ]);
    assert_eq!(v1["version"], 1);
    let cur = fields(&b, "prod/api/database", "current");
    assert_eq!(cur["username"], "app_a");
    assert_eq!(cur["database"], "appdb");
    assert_eq!(cur["port"], pg.port.to_string());
    let pw1 = cur["password"].as_str().unwrap().to_string();
    assert!(
        cur["url"]
            .as_str()
            .unwrap()
            .starts_with("postgres://app_a:")
    );
    pg.login("app_a", &pw1, "appdb").await.unwrap();
    // Sessions act as the group, which owns the objects.
    {
        use sqlx::Connection;
        let mut c = sqlx::PgConnection::connect(cur["url"].as_str().unwrap())
            .await
            .unwrap();
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM items")
            .fetch_one(&mut c)
            .await
            .unwrap();
        assert_eq!(n, 1);
    }

    let v2 = b.cli_json(&["rotate", "prod/api/database"]);
    assert_eq!(v2["version"], 2);
    let cur = fields(&b, "prod/api/database", "current");
    assert_eq!(cur["username"], "app_b");
    let pw2 = cur["password"].as_str().unwrap().to_string();
    // During the validation window both credentials work.
    pg.login("app_b", &pw2, "appdb").await.unwrap();
    pg.login("app_a", &pw1, "appdb").await.unwrap();
    // One rotation at a time while previous may be in use.
    let o = b.cli(&["rotate", "prod/api/database"]);
    fails_with(
        &o,
        "failed precondition: previous v1 of prod/api/database is not decommissioned yet",
    );

    // The admin connection rekey keeps between steps is checked before
    // use: one the server dropped is replaced.
    pg.sql(
        "postgres",
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'postgres' AND pid <> pg_backend_pid()",
    )
    .await;
    // Rollback makes previous work again before current moves: shown on
    // an app_a that has lost its login and password meanwhile.
    pg.sql("postgres", "ALTER ROLE app_a WITH NOLOGIN PASSWORD NULL")
        .await;
    assert!(pg.login("app_a", &pw1, "appdb").await.is_err());
    let rb = b.cli_json(&["rollback", "prod/api/database"]);
    assert_eq!(rb["version"], 1);
    assert_eq!(
        fields(&b, "prod/api/database", "current")["username"],
        "app_a"
    );
    pg.login("app_a", &pw1, "appdb")
        .await
        .expect("the rollback restored app_a's login and password");

    // Force the decommission of previous (app_b): its password is gone.
    let o = b.cli(&["revoke", "prod/api/database", "--version", "2"]);
    fails_with(&o, "validation window ends at");
    b.cli_json(&[
        "revoke",
        "prod/api/database",
        "--version",
        "2",
        "--force",
        "--reason",
        "rolled back; app_b unused",
    ]);
    let e = pg.login("app_b", &pw2, "appdb").await.unwrap_err();
    assert!(
        e.contains("not permitted to log in") || e.contains("password authentication failed"),
        "{e}"
    );
    pg.login("app_a", &pw1, "appdb").await.unwrap();
    let audit = b.cli_json(&["audit", "--secret", "prod/api/database"]);
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["detail"] == "forced: rolled back; app_b unused")
    );

    // The idle role is dropped behind rekey's back. The admin connection
    // rekey keeps had already found it, so set learns of it from the failed
    // change, creates the role again and goes on.
    pg.sql("postgres", "DROP ROLE app_b").await;

    // The next rotation goes to app_b again, with a new password.
    let v3 = b.cli_json(&["rotate", "prod/api/database"]);
    assert_eq!(v3["version"], 3);
    let cur = fields(&b, "prod/api/database", "current");
    assert_eq!(cur["username"], "app_b");
    assert_ne!(cur["password"].as_str().unwrap(), pw2);
    pg.login("app_b", cur["password"].as_str().unwrap(), "appdb")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_failures_stop_before_finish_and_current_keeps_working() {
    let dir = TempDir::new("pgbad");
    let pg = PgServer::start("bad");
    pg.app_database().await;
    let admin = dir.path().join("admin-url");
    std::fs::write(&admin, pg.admin_url("appdb")).unwrap();
    let b = Backend::start(
        dir.path(),
        BackendOpts {
            env: vec![
                ("REKEY_ENGINE_STEP_ATTEMPTS".into(), "2".into()),
                ("REKEY_ENGINE_STEP_BACKOFF".into(), "50ms".into()),
            ],
            ..Default::default()
        },
    );
    // A group role that does not exist: refused at create, nothing stored.
    let o = b.cli(&[
        "create",
        "prod/x",
        "--kind",
        "postgres",
        "--admin-url-file",
        admin.to_str().unwrap(),
        "--group-role",
        "nobody_owns",
        "--role-base",
        "x",
        "--database",
        "appdb",
    ]);
    fails_with(&o, "group role nobody_owns does not exist");
    assert!(b.cli_json(&["list"]).as_array().unwrap().is_empty());

    b.cli_json(&[
        "create",
        "prod/db",
        "--kind",
        "postgres",
        "--admin-url-file",
        admin.to_str().unwrap(),
        "--group-role",
        "app_owner",
        "--role-base",
        "app",
        "--database",
        "appdb",
        "--window",
        "0s",
    ]);
    let cur = fields(&b, "prod/db", "current");
    let pw1 = cur["password"].as_str().unwrap().to_string();

    // A wrong admin credential.
    std::fs::write(
        &admin,
        format!("postgres://postgres:wrong@127.0.0.1:{}/appdb", pg.port),
    )
    .unwrap();
    let o = b.cli(&["rotate", "prod/db"]);
    fails_with(
        &o,
        "set failed for prod/db: postgres: cannot connect to postgres@127.0.0.1",
    );
    assert!(!stderr(&o).contains("wrong@"), "no URL in errors");
    let st = b.cli_json(&["status", "prod/db"]);
    assert_eq!(st[0]["current_version"], 1);
    assert_eq!(st[0]["pending_version"], Value::Null);
    assert_eq!(st[0]["rotation"]["step"], "needs-attention");
    assert!(
        st[0]["rotation"]["error"]
            .as_str()
            .unwrap()
            .contains("cannot connect")
    );
    pg.login("app_a", &pw1, "appdb").await.unwrap();
    let audit = b.cli_json(&["audit", "--secret", "prod/db"]);
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "rotate" && e["outcome"] == "failed")
    );

    // Postgres unreachable.
    std::fs::write(
        &admin,
        format!("postgres://postgres:x@127.0.0.1:{}/appdb", free_port()),
    )
    .unwrap();
    let o = b.cli(&["rotate", "prod/db"]);
    fails_with(
        &o,
        "set failed for prod/db: postgres: cannot connect to postgres@127.0.0.1",
    );

    // Fixed: a manual rotation works, and --cancel has nothing to clear.
    std::fs::write(&admin, pg.admin_url("appdb")).unwrap();
    let v = b.cli_json(&["rotate", "prod/db"]);
    assert_eq!(v["version"], 4, "failed versions keep their numbers");
    let o = b.cli(&["rotate", "prod/db", "--cancel"]);
    fails_with(&o, "no rotation in flight or waiting for attention");
    let versions = b.cli_json(&["versions", "prod/db"]);
    assert_eq!(versions[1]["state"], "revoked");
    assert_eq!(versions[2]["state"], "revoked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_acl_user_holds_two_passwords_during_the_window() {
    let dir = TempDir::new("redis");
    let user = format!("rk_test_{}", std::process::id());
    let weak = format!("rk_weak_{}", std::process::id());
    let _cleanup = RedisUsers(vec![user.clone(), weak.clone()]);
    assert_eq!(
        redis_cli(&[
            "ACL",
            "SETUSER",
            &user,
            "on",
            ">initial-password-1",
            "~*",
            "+@all"
        ]),
        "OK"
    );
    let admin = dir.path().join("admin-url");
    std::fs::write(&admin, "redis://127.0.0.1:6379").unwrap();
    let b = Backend::start(dir.path(), BackendOpts::default());
    b.cli_json(&[
        "create",
        "prod/api/redis",
        "--kind",
        "redis",
        "--admin-url-file",
        admin.to_str().unwrap(),
        "--username",
        &user,
        "--window",
        "1h",
    ]);
    let v1 = fields(&b, "prod/api/redis", "current");
    let p1 = v1["password"].as_str().unwrap().to_string();
    assert!(
        v1["url"]
            .as_str()
            .unwrap()
            .starts_with(&format!("redis://{user}:"))
    );
    assert!(redis_auth(&user, &p1));
    b.cli_json(&["rotate", "prod/api/redis"]);
    let p2 = fields(&b, "prod/api/redis", "current")["password"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        redis_auth(&user, &p1) && redis_auth(&user, &p2),
        "both work in the window"
    );
    b.cli_json(&[
        "revoke",
        "prod/api/redis",
        "--version",
        "1",
        "--force",
        "--reason",
        "test",
    ]);
    assert!(!redis_auth(&user, &p1), "the old password is gone");
    assert!(redis_auth(&user, &p2));
    assert!(
        redis_auth(&user, "initial-password-1"),
        "rekey removes only passwords it set"
    );
    // Rollback adds previous's password back before current moves: shown
    // on a user that lost it meanwhile.
    b.cli_json(&["rotate", "prod/api/redis"]);
    let p3 = fields(&b, "prod/api/redis", "current")["password"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        redis_cli(&["ACL", "SETUSER", &user, &format!("<{p2}")]),
        "OK"
    );
    assert!(!redis_auth(&user, &p2));
    b.cli_json(&["rollback", "prod/api/redis"]);
    assert!(
        redis_auth(&user, &p2),
        "the rollback restored previous's password"
    );
    assert!(redis_auth(&user, &p3));

    // An admin without ACL permissions: the rotation stops before finish.
    assert_eq!(
        redis_cli(&[
            "ACL",
            "SETUSER",
            &weak,
            "on",
            ">weak-pass-123",
            "~*",
            "+@all",
            "-acl"
        ]),
        "OK"
    );
    b.cli_json(&[
        "revoke",
        "prod/api/redis",
        "--version",
        "3",
        "--force",
        "--reason",
        "test",
    ]);
    std::fs::write(
        &admin,
        format!("redis://{weak}:weak-pass-123@127.0.0.1:6379"),
    )
    .unwrap();
    let o = b.cli(&["rotate", "prod/api/redis"]);
    fails_with(&o, "the admin user lacks ACL permissions");
    assert!(redis_auth(&user, &p2), "current keeps working");
    redis_cli(&["ACL", "DELUSER", &user, &weak]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_hooks_get_values_on_stdin_and_failures_park_the_rotation() {
    let dir = TempDir::new("exec");
    let log = dir.path().join("hooks.log");
    let mode = dir.path().join("mode");
    std::fs::write(&mode, "ok").unwrap();
    let hook = |name: &str, body: &str| write_hook(dir.path(), name, body);
    let create = hook("create", KEY_HOOK);
    let set = hook(
        "set",
        &format!(
            r#"input=$(cat); echo "set $input" >> {log}
case "$(cat {mode})" in
  fail) exit 3 ;;
  slow) sleep 5 ;;
  badjson) echo "not json"; exit 0 ;;
esac
echo '{{"ok": true}}'"#,
            log = log.display(),
            mode = mode.display()
        ),
    );
    let test = hook(
        "test",
        &format!(r#"echo "test $(cat)" >> {}; echo '{{}}'"#, log.display()),
    );
    let revoke = hook(
        "revoke",
        &format!(r#"echo "revoke $(cat)" >> {}; echo '{{}}'"#, log.display()),
    );
    let b = Backend::start(
        dir.path(),
        BackendOpts {
            env: vec![
                ("REKEY_ENGINE_STEP_ATTEMPTS".into(), "1".into()),
                ("REKEY_SCHEDULER_TICK".into(), "100ms".into()),
            ],
            ..Default::default()
        },
    );
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
        &test,
        "--hook-revoke",
        &revoke,
        "--hook-timeout",
        "1s",
        "--window",
        "0s",
    ]);
    let v1 = b.cli_json(&["get", "prod/agent/key", "--reveal"])["value"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(v1.starts_with("key-"));
    b.cli_json(&["rotate", "prod/agent/key"]);
    let v2 = b.cli_json(&["get", "prod/agent/key", "--reveal"])["value"]
        .as_str()
        .unwrap()
        .to_string();
    eventually(Duration::from_secs(10), "decommission", || {
        let l = std::fs::read_to_string(&log).unwrap_or_default();
        async move { l.contains("revoke").then_some(()) }
    })
    .await;
    let l = std::fs::read_to_string(&log).unwrap();
    // Values arrive on stdin as JSON, never in argv.
    assert!(l.contains(&format!("\"new\":\"{v2}\"")), "{l}");
    // The revoke hook's own input names the old value (the set hook's
    // input holds it too, so look at the revoke line only).
    let revoke_input: Value = l
        .lines()
        .find_map(|line| line.strip_prefix("revoke "))
        .map(|json| serde_json::from_str(json).expect("the revoke hook got JSON"))
        .unwrap_or_else(|| panic!("the revoke hook ran: {l}"));
    assert_eq!(revoke_input["step"], "revoke", "{revoke_input}");
    assert_eq!(revoke_input["old"], v1.as_str(), "{revoke_input}");
    assert!(revoke_input.get("new").is_none(), "{revoke_input}");

    for (m, needle) in [
        ("fail", "exited with exit status: 3"),
        ("slow", "did not finish within 1s"),
        ("badjson", "did not print valid JSON"),
    ] {
        std::fs::write(&mode, m).unwrap();
        let o = b.cli(&["rotate", "prod/agent/key"]);
        fails_with(&o, needle);
        let st = b.cli_json(&["status", "prod/agent/key"]);
        assert_eq!(st[0]["rotation"]["step"], "needs-attention", "{m}");
        assert_eq!(st[0]["pending_version"], Value::Null, "{m}");
        assert_eq!(
            b.cli_json(&["get", "prod/agent/key", "--reveal"])["value"],
            v2.as_str(),
            "{m}: current unchanged"
        );
        let o = b.cli(&["status", "prod/agent/key"]);
        assert!(stdout(&o).contains("needs-attention"), "{}", stdout(&o));
    }
    let o = b.cli(&["rotate", "prod/agent/key", "--cancel"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("cancelled: prod/agent/key stays at v2"),
        "{}",
        stdout(&o)
    );
    let st = b.cli_json(&["status", "prod/agent/key"]);
    assert_eq!(st[0]["rotation"]["step"], "cancelled");
    // A hook that is not executable is refused at create.
    let not_exec = dir.path().join("plain");
    std::fs::write(&not_exec, "x").unwrap();
    let o = b.cli(&[
        "create",
        "prod/agent/other",
        "--kind",
        "exec",
        "--hook-create",
        not_exec.to_str().unwrap(),
        "--hook-set",
        &set,
        "--hook-test",
        &test,
        "--hook-revoke",
        &revoke,
    ]);
    fails_with(&o, "is not an executable file");
    assert!(!b.log().contains(&v2), "no value in the backend log");
}

/// Rollback of an `exec` secret runs the set hook with `step: restore` and
/// previous's value; a failing hook refuses the rollback and current stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_rollback_runs_the_set_hook_with_previous() {
    let dir = TempDir::new("exec-restore");
    let log = dir.path().join("hooks.log");
    let mode = dir.path().join("mode");
    std::fs::write(&mode, "ok").unwrap();
    let set = write_hook(
        dir.path(),
        "set",
        &format!(
            r#"input=$(cat); echo "set $input" >> {log}
[ "$(cat {mode})" = fail ] && exit 4
echo '{{}}'"#,
            log = log.display(),
            mode = mode.display()
        ),
    );
    let create = write_hook(dir.path(), "create", KEY_HOOK);
    let nothing = write_hook(dir.path(), "nothing", "cat > /dev/null; echo '{}'");
    let b = Backend::start(dir.path(), BackendOpts::default());
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
        &nothing,
        "--hook-revoke",
        &nothing,
        "--window",
        "1h",
    ]);
    let value = |stage: &str| {
        b.cli_json(&["get", "prod/agent/key", "--stage", stage, "--reveal"])["value"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let v1 = value("current");
    b.cli_json(&["rotate", "prod/agent/key"]);
    let v2 = value("current");

    std::fs::write(&mode, "fail").unwrap();
    fails_with(
        &b.cli(&["rollback", "prod/agent/key"]),
        "exited with exit status: 4",
    );
    assert_eq!(value("current"), v2, "a failed restore moved nothing");

    std::fs::write(&mode, "ok").unwrap();
    b.cli_json(&["rollback", "prod/agent/key"]);
    assert_eq!(value("current"), v1);
    let restores: Vec<Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("set "))
        .map(|j| serde_json::from_str(j).unwrap())
        .filter(|j: &Value| j["step"] == "restore")
        .collect();
    assert_eq!(restores.len(), 2, "the failed one and the one that worked");
    for r in &restores {
        assert_eq!(r["new"], v1.as_str(), "{r}");
        assert_eq!(r["secret_id"], "prod/agent/key", "{r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_wait_waits_for_decommission() {
    let dir = TempDir::new("wait");
    let user = format!("rk_wait_{}", std::process::id());
    let _cleanup = RedisUsers(vec![user.clone()]);
    assert_eq!(
        redis_cli(&["ACL", "SETUSER", &user, "on", "~*", "+@all"]),
        "OK"
    );
    let admin = dir.path().join("admin-url");
    std::fs::write(&admin, "redis://127.0.0.1:6379").unwrap();
    let b = Backend::start(
        dir.path(),
        BackendOpts {
            extra_toml: "[scheduler]\ntick = \"100ms\"\n".into(),
            ..Default::default()
        },
    );
    b.cli_json(&[
        "create",
        "prod/r",
        "--kind",
        "redis",
        "--admin-url-file",
        admin.to_str().unwrap(),
        "--username",
        &user,
        "--window",
        "2s",
    ]);
    b.cli_json(&["rotate", "prod/r"]);
    fails_with(&b.cli(&["rotate", "prod/r"]), "not decommissioned yet");
    let started = std::time::Instant::now();
    let o = b.cli(&["rotate", "prod/r", "--wait"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("waiting: previous v1 of prod/r is not decommissioned yet"),
        "{}",
        stderr(&o)
    );
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert_eq!(b.cli_json(&["get", "prod/r"])["version"], 3);
    redis_cli(&["ACL", "DELUSER", &user]);
}

/// A revoke hook that takes 20 s on one secret holds up neither another
/// secret's decommission nor another's scheduled rotation: each secret's
/// scheduler work runs on its own (`scheduler.concurrency` at a time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_hook_on_one_secret_delays_no_other_secret() {
    let dir = TempDir::new("slow-hook");
    let started = dir.path().join("revoke-started");
    let ended = dir.path().join("revoke-ended");
    let hook = |name: &str, body: &str| write_hook(dir.path(), name, body);
    let create = hook("create", KEY_HOOK);
    let quick = hook("quick", "cat > /dev/null; echo '{}'");
    let revoke = hook(
        "revoke",
        &format!(
            "cat > /dev/null; touch {}; sleep 20; touch {}; echo '{{}}'",
            started.display(),
            ended.display()
        ),
    );
    let b = Backend::start(
        dir.path(),
        BackendOpts {
            env: vec![
                ("REKEY_SCHEDULER_TICK".into(), "100ms".into()),
                ("REKEY_SCHEDULER_CONCURRENCY".into(), "4".into()),
            ],
            ..Default::default()
        },
    );
    b.cli_json(&[
        "create",
        "slow/agent",
        "--kind",
        "exec",
        "--hook-create",
        &create,
        "--hook-set",
        &quick,
        "--hook-test",
        &quick,
        "--hook-revoke",
        &revoke,
        "--hook-timeout",
        "30s",
        "--window",
        "0s",
    ]);
    b.cli_json(&["create", "fast/jwt", "--kind", "random", "--window", "0s"]);
    // The slow secret's decommission starts and sleeps in its hook.
    b.cli_json(&["rotate", "slow/agent"]);
    eventually(Duration::from_secs(10), "the slow revoke hook", || {
        let s = started.exists();
        async move { s.then_some(()) }
    })
    .await;
    // Meanwhile: another secret's decommission ...
    b.cli_json(&["rotate", "fast/jwt"]);
    eventually(Duration::from_secs(5), "fast/jwt's decommission", || {
        let v = b.cli_json(&["versions", "fast/jwt"]);
        async move { (v[1]["state"] == "revoked").then_some(()) }
    })
    .await;
    // ... and a due scheduled rotation of a third.
    b.cli_json(&[
        "create",
        "fast/due",
        "--kind",
        "random",
        "--schedule",
        "every 1s",
    ]);
    eventually(
        Duration::from_secs(5),
        "fast/due's scheduled rotation",
        || {
            let s = b.cli_json(&["status", "fast/due"]);
            async move { (s[0]["current_version"].as_u64() >= Some(2)).then_some(()) }
        },
    )
    .await;
    // The slow hook is still running: the others did not wait for it.
    assert!(
        !ended.exists(),
        "the other secrets waited for the slow hook"
    );
    // The slow decommission still completes.
    eventually(Duration::from_secs(30), "slow/agent's decommission", || {
        let v = b.cli_json(&["versions", "slow/agent"]);
        async move { (v[1]["state"] == "revoked").then_some(()) }
    })
    .await;
}
