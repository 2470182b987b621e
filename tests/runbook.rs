//! `docs/runbook.md`, the key-rotation runbook, runs as written: every
//! `console` block in order, against a real backend, the machine's
//! Postgres and Redis, and data encrypted the way the platform stores it,
//! printing what the document shows (times and `…` aside). What the
//! document declares as environment-specific (its `export` lines) gets
//! this machine's values: a fresh database, group and login roles, a Redis
//! ACL user and files, all with names of their own, removed afterwards.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use rekey_testkit::console::{Console, Step, sessions};
use rekey_testkit::*;

fn runbook() -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/runbook.md");
    std::fs::read_to_string(p).expect("docs/runbook.md")
}

/// A name no other test (or run) uses: lowercase, a valid SQL identifier.
fn unique_tag() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("rb{}_{nanos}", std::process::id())
}

/// `psql` as the superuser on `url`; panics with its error.
fn psql(url: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args([url, "-v", "ON_ERROR_STOP=1", "-qAtc", sql])
        .stdin(Stdio::null())
        .output()
        .expect("psql");
    assert!(out.status.success(), "psql {sql}: {}", stderr(&out));
    stdout(&out).trim().to_string()
}

/// Roles are global to the Postgres server, unlike the database: dropped
/// on the way out (declared before the [`PgDb`], so after it is gone).
struct PgRoles {
    admin_url: String,
    names: Vec<String>,
}

impl Drop for PgRoles {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("psql")
                .args([&self.admin_url, "-qc", &format!("DROP ROLE IF EXISTS {n}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// The platform's values encrypted under `key` as the app stores them.
fn hyvve_seal(key: &str, plaintext: &str) -> String {
    let mut child = Command::new(CLI.path())
        .args(["seal", "--codec", "hyvve"])
        .env("ENCRYPTION_MASTER_KEY", key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("rekey seal");
    {
        use std::io::Write as _;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(plaintext.as_bytes())
            .expect("write the plaintext");
    }
    let out = child.wait_with_output().expect("rekey seal");
    assert!(out.status.success(), "rekey seal: {}", stderr(&out));
    stdout(&out).trim().to_string()
}

/// 32 random bytes in base64, as `ENCRYPTION_MASTER_KEY` is.
fn master_key() -> String {
    let out = succeed(Command::new("sh").args(["-c", "head -c 32 /dev/urandom | base64"]));
    stdout(&out).trim().to_string()
}

/// The provider keys the platform stores encrypted: (table, id, plaintext).
const ROWS: [(&str, &str, Option<&str>); 5] = [
    (
        "ai_provider_configs",
        "7d3c0a52-1f0e-4c55-9b0a-000000000001",
        Some("sk-openai-1"),
    ),
    (
        "ai_provider_configs",
        "7d3c0a52-1f0e-4c55-9b0a-000000000002",
        Some("sk-anthropic-2"),
    ),
    (
        "ai_provider_configs",
        "7d3c0a52-1f0e-4c55-9b0a-000000000003",
        Some("sk-gemini-3"),
    ),
    (
        "mcp_server_configs",
        "5e8f2b61-8a1d-4a6e-8c3b-000000000001",
        Some("mcp-key-1"),
    ),
    (
        "mcp_server_configs",
        "5e8f2b61-8a1d-4a6e-8c3b-000000000002",
        None,
    ),
];

#[test]
fn the_runbook_runs_as_written_against_a_local_backend() {
    let sessions = sessions(&runbook());
    assert!(sessions.len() >= 9, "the runbook has a session per step");
    let dir = TempDir::new("runbook");
    let tag = unique_tag();

    // The platform as the runbook finds it: an app database owned by a
    // group role, the encrypted provider keys, a Redis ACL user.
    let group = format!("{tag}_app_owner");
    let base = format!("{tag}_app");
    let redis_user = format!("{tag}_app");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let _roles = PgRoles {
        admin_url: std::env::var("REKEY_TEST_PG_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into()),
        names: vec![format!("{base}_a"), format!("{base}_b"), group.clone()],
    };
    let db = rt.block_on(PgDb::create("runbook"));
    psql(
        &db.url,
        &format!(
            "CREATE ROLE {group} NOLOGIN; ALTER DATABASE {} OWNER TO {group}; \
             SET ROLE {group}; {HYVVE_TABLES}",
            db.name
        ),
    );
    let old_key = master_key();
    for (table, id, plaintext) in ROWS {
        let value = plaintext.map_or("NULL".to_string(), |p| {
            format!("'{}'", hyvve_seal(&old_key, p))
        });
        psql(
            &db.url,
            &format!("INSERT INTO {table} (id, api_key_encrypted) VALUES ('{id}', {value})"),
        );
    }
    let _redis = RedisUsers(vec![redis_user.clone()]);
    assert_eq!(
        redis_cli(&[
            "ACL",
            "SETUSER",
            &redis_user,
            "on",
            ">before-rekey",
            "~*",
            "+@all"
        ]),
        "OK"
    );

    // What the operator holds: admin URLs, today's keys, the new agent key.
    let ops = dir.path().join("operator");
    std::fs::create_dir_all(&ops).unwrap();
    let file = |name: &str, content: &str| -> String {
        let p: PathBuf = ops.join(name);
        std::fs::write(&p, content).unwrap();
        p.display().to_string()
    };
    let pg_admin = file("pg-admin-url", &db.url);
    let redis_admin = file("redis-admin-url", "redis://127.0.0.1:6379");
    let agno_old = file("agno-old", "agno-key-in-use-today-0123456789");
    let agno_new = file("agno-new", &format!("agno-key-issued-for-{tag}"));
    let master_file = file("master-key", &old_key);

    let b = Backend::start(dir.path(), BackendOpts::default());
    let bin_dir = CLI.path().parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut console = Console::new("docs/runbook.md", &ops)
        .env("PATH", &path)
        .env_remove("REKEY_TOKEN")
        .env_remove("REKEY_ADDR")
        .env_remove("REKEY_TOKEN_FILE")
        .set("REKEY_ADDR", &b.grpc)
        .set("REKEY_TOKEN_FILE", &b.token_path().display().to_string())
        .set("REKEY_METRICS_URL", &format!("http://{}", b.metrics))
        .set("PG_ADMIN_URL_FILE", &pg_admin)
        .set("APP_DATABASE", &db.name)
        .set("APP_GROUP_ROLE", &group)
        .set("APP_ROLE_BASE", &base)
        .set("REDIS_ADMIN_URL_FILE", &redis_admin)
        .set("REDIS_USER", &redis_user)
        .set("AGNO_API_KEY_FILE", &agno_old)
        .set("AGNO_API_KEY_NEW_FILE", &agno_new)
        .set("ENCRYPTION_MASTER_KEY_FILE", &master_file)
        .set("DATABASE_URL", &db.url);
    for steps in &sessions {
        console.run_session(steps);
    }
    console.finish();

    // What the runbook did is real: the provider keys open under the
    // master key that is current now, and under no other.
    let current = b.cli_json(&["get", "prod/enc/master", "--reveal"])["value"]
        .as_str()
        .expect("the master key")
        .to_string();
    assert_ne!(current, old_key, "the master key was rotated");
    let mut stored = Vec::new();
    let mut plain = Vec::new();
    for (table, id, plaintext) in ROWS {
        if let Some(p) = plaintext {
            stored.push(psql(
                &db.url,
                &format!("SELECT api_key_encrypted FROM {table} WHERE id = '{id}'"),
            ));
            plain.push(Some(p.to_string()));
        }
    }
    assert_eq!(hyvve_open_in_python(&current, &stored), plain);
    assert!(
        hyvve_open_in_python(&old_key, &stored)
            .iter()
            .all(Option::is_none),
        "no row is left under the decommissioned key"
    );
    // The agent key that was rotated out is revoked, the new one current.
    let agno = b.cli_json(&["get", "prod/agent/agno-api-key", "--reveal"]);
    assert_eq!(agno["value"], format!("agno-key-issued-for-{tag}"));
    let v1 = b.cli_json(&["get", "prod/agent/agno-api-key", "--version", "1"]);
    assert_eq!(v1["state"], "revoked");
}

/// The runbook's steps, as its `## N. Title` sections.
fn steps_of(markdown: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in markdown.lines() {
        if let Some(title) = line.strip_prefix("## ") {
            out.extend(current.take());
            if title.starts_with(|c: char| c.is_ascii_digit()) {
                current = Some((title.to_string(), String::new()));
            }
        } else if let Some((_, body)) = &mut current {
            body.push_str(line);
            body.push('\n');
        }
    }
    out.extend(current);
    out
}

#[test]
fn every_step_has_commands_and_says_what_to_do_if_it_fails() {
    let doc = runbook();
    let steps = steps_of(&doc);
    let titles: Vec<&str> = steps.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        titles,
        [
            "1. Prepare",
            "2. Stage",
            "3. Rotate",
            "4. Re-encrypt",
            "5. Validate",
            "6. Decommission",
            "7. Audit",
            "8. Verify",
            "9. Roll back",
        ]
    );
    for (title, body) in &steps {
        assert!(body.contains("```console"), "step {title} has no commands");
        assert!(
            body.contains("**If it fails**"),
            "step {title} does not say what to do if it fails"
        );
    }
    // Environment-specific values are declared once, in step 1, and every
    // command takes them from there.
    let all: Vec<Step> = sessions(&doc).into_iter().flatten().collect();
    let prepare: Vec<Step> = sessions(&steps[0].1).into_iter().flatten().collect();
    for step in &all {
        let is_export = step.command.starts_with("export ");
        assert!(
            !is_export || prepare.contains(step),
            "`{}`: exports belong in step 1 and nowhere else",
            step.command
        );
        if !is_export {
            for literal in [
                "127.0.0.1",
                "/run/secrets",
                "postgres://",
                "redis://",
                "7700",
            ] {
                assert!(
                    !step.command.contains(literal),
                    "`{}` names {literal} instead of a variable from step 1",
                    step.command
                );
            }
        }
    }
    // The window of the manual runbook (30–60 minutes) on every secret.
    for step in all.iter().filter(|s| s.command.starts_with("rekey create")) {
        assert!(
            step.command.contains("--window 45m"),
            "`{}` has no 45-minute validation window",
            step.command
        );
    }
    for kind in ["postgres", "redis", "random", "static", "encryption-key"] {
        assert!(
            all.iter()
                .any(|s| s.command.contains(&format!("--kind {kind}"))),
            "no secret of kind {kind}"
        );
    }
    for command in [
        "rekey reencrypt --secret prod/enc/master --preset hyvve --dry-run",
        "rekey audit --verify",
        "rekey rollback",
        "--force --reason",
    ] {
        assert!(
            all.iter().any(|s| s.command.contains(command)),
            "the runbook never runs {command}"
        );
    }
}
