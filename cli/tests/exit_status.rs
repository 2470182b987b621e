//! The real `rekey` binary's exit status: 2 for what the user typed, 1 for
//! what the backend or the database said. No backend runs here: the
//! address is a closed port, so a command that got as far as connecting
//! exits 1 ("unavailable"), and a 2 proves the mistake was caught before.
//! Refusals from a live backend or database (exit 1) are tested end to end
//! in `tests/e2e_backend.rs` and `tests/e2e_reencrypt.rs`.

use std::process::{Command, Output};

const CLOSED: &str = "http://127.0.0.1:1";

fn rekey(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rekey"))
        .args(args)
        .env_remove("REKEY_ADDR")
        .env_remove("REKEY_TOKEN")
        .env_remove("REKEY_TOKEN_FILE")
        .env_remove("ENCRYPTION_MASTER_KEY_OLD")
        .env_remove("ENCRYPTION_MASTER_KEY_NEW")
        .env_remove("DATABASE_URL")
        .current_dir(std::env::temp_dir())
        .output()
        .expect("run rekey")
}

/// Asserts the exit status and one `error: ` line on stderr naming `needle`.
fn exits(o: &Output, code: i32, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    assert!(err.contains(needle), "expected {needle:?} in {err}");
    assert!(err.starts_with("error: "), "stderr: {err}");
    // clap's own usage errors add hints; ours are one line.
    if !err.contains("--help") {
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    }
}

#[test]
fn flag_values_that_do_not_parse_exit_2_before_connecting() {
    let base = ["--addr", CLOSED, "--token", "t"];
    let with = |args: &[&str]| rekey(&[&base[..], args].concat());
    exits(
        &with(&["create", "prod/x", "--kind", "random", "--window", "soon"]),
        2,
        "error: invalid argument: --window \"soon\" is not a duration",
    );
    exits(
        &with(&["create", "prod/x", "--kind", "random", "--length", "0"]),
        2,
        "--length must be at least 1",
    );
    exits(
        &with(&[
            "create",
            "prod/x",
            "--kind",
            "random",
            "--next-rotation-at",
            "tomorrow",
        ]),
        2,
        "is not an RFC 3339 time",
    );
    exits(
        &with(&["demo", "--interval", "soon"]),
        2,
        "--interval \"soon\" is not a duration",
    );
    // clap's own checks: a missing argument, an unknown value.
    exits(&with(&["rotate"]), 2, "SECRET");
    exits(&with(&["-o", "yaml", "list"]), 2, "yaml");
}

#[test]
fn files_named_on_the_command_line_that_cannot_be_read_exit_2() {
    let base = ["--addr", CLOSED, "--token", "t"];
    let with = |args: &[&str]| rekey(&[&base[..], args].concat());
    exits(
        &with(&[
            "create",
            "prod/x",
            "--kind",
            "static",
            "--value-file",
            "/nonexistent/value",
        ]),
        2,
        "cannot read --value-file /nonexistent/value",
    );
    exits(
        &with(&["rotate", "prod/x", "--value-file", "/nonexistent/value"]),
        2,
        "cannot read --value-file /nonexistent/value",
    );
    exits(
        &rekey(&["--addr", CLOSED, "--token-file", "/nonexistent/t", "list"]),
        2,
        "cannot read token file /nonexistent/t",
    );
    exits(
        &rekey(&[
            "--addr",
            "https://127.0.0.1:1",
            "--ca-file",
            "/nonexistent/ca.pem",
            "--token",
            "t",
            "list",
        ]),
        2,
        "cannot read --ca-file /nonexistent/ca.pem",
    );
    exits(
        &rekey(&[
            "reencrypt",
            "--preset",
            "hyvve",
            "--old-key-file",
            "/nonexistent/old",
            "--database-url",
            "postgres://127.0.0.1:1/x",
        ]),
        2,
        "cannot read --old-key-file /nonexistent/old",
    );
}

#[test]
fn a_bad_address_or_missing_settings_exit_2() {
    exits(
        &rekey(&["--addr", "http://not a url", "--token", "t", "list"]),
        2,
        "--addr \"http://not a url\" is not a URL",
    );
    exits(
        &rekey(&["reencrypt", "--preset", "hyvve"]),
        2,
        "set ENCRYPTION_MASTER_KEY_OLD or --old-key-file",
    );
    let key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    let o = Command::new(env!("CARGO_BIN_EXE_rekey"))
        .args(["reencrypt", "--column", "no-dot", "--database-url", CLOSED])
        .env("ENCRYPTION_MASTER_KEY_OLD", key)
        .env(
            "ENCRYPTION_MASTER_KEY_NEW",
            "ZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXp7fH1+f4CBgoM=",
        )
        .output()
        .expect("run rekey");
    exits(&o, 2, "--column \"no-dot\": expected TABLE.COLUMN");
}

#[test]
fn an_unreachable_backend_or_database_exits_1() {
    exits(
        &rekey(&["--addr", CLOSED, "--token", "t", "list"]),
        1,
        "error: unavailable: cannot reach rekey-backend at http://127.0.0.1:1",
    );
}
