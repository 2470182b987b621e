//! End to end: the sidecar's part of the hardening (issue #11), with the
//! real `rekey-sidecar` and `rekey-backend` binaries. The Watch client
//! decodes the largest event the backend can send; an event over
//! `max_event_bytes` is named in `/readyz` and the log and reconnects back
//! off instead of spinning; an HTTP validation value holding CR/LF reaches
//! the validation host as nothing at all; output directories reached
//! through a symlink are refused at start-up and never written through
//! later.
//!
//! No assertion bounds a duration: waits are generous, and the reconnect
//! test bounds a count by the time that actually passed.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rekey_testkit::*;

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A counter or gauge from the sidecar's `/metrics` (first sample whose
/// line starts with `name`).
fn metric(sc: &Sidecar, name: &str) -> Option<f64> {
    let (_, body) = sc.get("/metrics");
    body.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

const RECONNECTS: &str = "rekey_sidecar_backend_reconnects_total";

/// The most reconnects the sidecar's backoff allows within `elapsed`: the
/// k-th failed attempt comes after k-1 waits, the i-th of them at least
/// half of min(200ms * 2^i, `backoff_max`) (the least the jitter gives).
/// Without backoff (about six attempts a second) the count is far above
/// this after a few seconds.
fn most_reconnects_with_backoff(elapsed: Duration, backoff_max: Duration) -> u64 {
    let mut waited = Duration::ZERO;
    let mut attempts = 1;
    for i in 0..64u32 {
        let cap = Duration::from_millis(200)
            .saturating_mul(1 << i.min(16))
            .min(backoff_max);
        waited += cap / 2;
        if waited > elapsed {
            break;
        }
        attempts += 1;
    }
    attempts
}

/// Waits until the sidecar has failed at least three times, keeps watching
/// a few seconds longer, then checks that the count stays within what the
/// backoff allows for the time that really passed since `started` (taken
/// before the sidecar started, so it can only overstate the time).
fn assert_reconnects_back_off(sc: &Sidecar, started: Instant, backoff_max: Duration) -> u64 {
    wait_for("three reconnects", Duration::from_secs(60), || {
        metric(sc, RECONNECTS).is_some_and(|n| n >= 3.0)
    });
    std::thread::sleep(Duration::from_secs(4));
    let elapsed = started.elapsed();
    let n = metric(sc, RECONNECTS).unwrap();
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a counter of a few dozen at most"
    )]
    let n = n as u64;
    let most = most_reconnects_with_backoff(elapsed, backoff_max);
    assert!(
        n <= most,
        "{n} reconnects in {elapsed:?}: the backoff allows at most {most}"
    );
    n
}

/// `len` bytes of text made of `word` repeated: a value that is easy to
/// recognise in a file and costs nothing to compare.
fn value_of(word: &str, len: usize) -> Vec<u8> {
    word.bytes().cycle().take(len).collect()
}

#[test]
fn the_default_decode_limit_takes_the_largest_event_the_backend_can_send() {
    let dir = TempDir::new("sch-big");
    // The backend's ceiling: two 4 MiB values (current and previous) in
    // one event, about 8 MiB with metadata; tonic's default is 4 MiB.
    let b = Backend::start(
        dir.path(),
        BackendOpts {
            extra_toml: "[limits]\nmax_value_bytes = 4194304\n".into(),
            ..Default::default()
        },
    );
    let max = 4 << 20;
    let v1 = write_file(dir.path(), "v1", value_of("first-value-", max));
    let v2 = write_file(dir.path(), "v2", value_of("second-value-", max));
    let v3 = write_file(dir.path(), "v3", value_of("third-value-", max));
    b.cli_json(&[
        "create",
        "prod/api/big",
        "--kind",
        "static",
        "--value-file",
        v1.to_str().unwrap(),
    ]);
    b.cli_json(&[
        "rotate",
        "prod/api/big",
        "--value-file",
        v2.to_str().unwrap(),
    ]);
    let out = dir.path().join("big");
    let keyring = dir.path().join("big.keyring.json");
    let cfg = write_file(
        dir.path(),
        "sidecar.toml",
        format!(
            r#"
backend = "{backend}"
token_file = "{token}"
listen = "127.0.0.1:0"
backoff_max = "500ms"
[[secrets]]
id = "prod/api/big"
path = "{out}"
keyring_path = "{keyring}"
"#,
            backend = b.grpc,
            token = b.token_path().display(),
            out = out.display(),
            keyring = keyring.display(),
        ),
    );
    let sc = Sidecar::start(dir.path(), &["--config", cfg.to_str().unwrap()], &[]);
    // The snapshot (v2 current, v1 previous) arrived whole.
    wait_for("the snapshot", Duration::from_secs(60), || {
        std::fs::read(&out).is_ok_and(|b| b == std::fs::read(&v2).unwrap())
    });
    let (code, body) = sc.get("/readyz");
    assert_eq!(code, 200, "{body}");
    // A live event of the same size.
    b.cli_json(&[
        "rotate",
        "prod/api/big",
        "--value-file",
        v3.to_str().unwrap(),
    ]);
    wait_for("the rotated value", Duration::from_secs(60), || {
        std::fs::read(&out).is_ok_and(|b| b == std::fs::read(&v3).unwrap())
    });
    // The keyring is written after the file.
    let read_keyring = || -> Option<serde_json::Value> {
        serde_json::from_slice(&std::fs::read(&keyring).ok()?).ok()
    };
    wait_for("the rotated keyring", Duration::from_secs(60), || {
        read_keyring().is_some_and(|k| k["current"]["version"] == 3)
    });
    let k = read_keyring().unwrap();
    assert_eq!(k["previous"]["version"], 2);
    assert_eq!(k["previous"]["value"].as_str().unwrap().len(), max);
    assert!(!sc.log().contains("max_event_bytes"), "{}", sc.log());
}

#[test]
fn an_event_over_max_event_bytes_is_named_and_reconnects_back_off() {
    let dir = TempDir::new("sch-over");
    let b = Backend::start(
        dir.path(),
        BackendOpts {
            extra_toml: "[limits]\nmax_value_bytes = 4194304\n".into(),
            ..Default::default()
        },
    );
    // Two 3 MiB values make a 6 MiB event: over a sidecar limit of 4 MiB,
    // which is also what tonic decoded by default, so a sidecar without
    // the backoff fix spins on this very event. A small secret in the same
    // stream gets through, and must not reset the backoff.
    let v1 = write_file(dir.path(), "v1", value_of("oversized-secret-", 3 << 20));
    let v2 = write_file(dir.path(), "v2", value_of("oversized-again-", 3 << 20));
    b.cli_json(&[
        "create",
        "prod/api/big",
        "--kind",
        "static",
        "--value-file",
        v1.to_str().unwrap(),
    ]);
    b.cli_json(&[
        "rotate",
        "prod/api/big",
        "--value-file",
        v2.to_str().unwrap(),
    ]);
    b.cli_json(&["create", "prod/api/small", "--kind", "random"]);
    let started = Instant::now();
    let sc = Sidecar::start(
        dir.path(),
        &[
            "--backend",
            &b.grpc,
            "--token-file",
            b.token_path().to_str().unwrap(),
            "--secret",
            &format!("prod/api/big:{}", dir.path().join("big.out").display()),
            "--secret",
            &format!("prod/api/small:{}", dir.path().join("small.out").display()),
            "--listen",
            "127.0.0.1:0",
        ],
        &[("REKEY_MAX_EVENT_BYTES", "4MiB")],
    );
    let n = assert_reconnects_back_off(&sc, started, Duration::from_secs(30));

    let (code, body) = sc.get("/readyz");
    assert_eq!(code, 503, "never delivered, so not ready: {body}");
    assert!(body.contains("prod/api/big: not delivered yet"), "{body}");
    let named = body
        .lines()
        .find_map(|l| l.strip_prefix("backend: the backend sent an event of "))
        .unwrap_or_else(|| panic!("/readyz does not name the oversized event: {body}"));
    let size: usize = named
        .split(' ')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no size in {named:?}"));
    assert!(size > 6 << 20 && size < (6 << 20) + (64 << 10), "{size}");
    assert!(
        named.starts_with(&format!("{size} bytes; max_event_bytes is 4194304")),
        "{named}"
    );
    assert!(!dir.path().join("big.out").exists());

    let log = sc.log();
    assert!(
        log.contains(&format!(
            "the backend sent an event of {size} bytes; max_event_bytes is 4194304"
        )),
        "{log}"
    );
    assert!(log.matches("max_event_bytes is 4194304").count() as u64 >= n);
    for text in [&body, &log] {
        assert!(
            !text.contains("oversized-secret") && !text.contains("oversized-again"),
            "a value leaked: {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_refused_under_the_stream_limits_backs_off_until_a_place_frees() {
    let dir = TempDir::new("sch-limit");
    let pod_token = "pod-a-token-for-limits-0123";
    let b = Backend::start(
        dir.path(),
        BackendOpts {
            extra_toml: format!(
                "[[auth.tokens]]\nidentity = \"pod-a\"\nsha256 = \"{}\"\n\
                 [[auth.policies]]\nidentity = \"pod-a\"\nprefixes = [\"prod/api/\"]\noperations = [\"watch\", \"report\"]\n\
                 [limits]\nmax_watch_streams_per_identity = 1\n",
                sha256_hex(pod_token)
            ),
            ..Default::default()
        },
    );
    b.cli_json(&["create", "prod/api/jwt", "--kind", "random"]);
    // Another process of the same identity holds its one stream.
    let mut holder = client(&b.grpc, pod_token).await;
    let mut held = holder
        .watch(rekey_proto::v1::WatchRequest {
            secret_ids: vec!["prod/api/jwt".into()],
        })
        .await
        .expect("the first stream is allowed")
        .into_inner();
    held.message()
        .await
        .expect("a snapshot")
        .expect("a snapshot");

    let token = write_file(dir.path(), "pod.token", pod_token);
    let out = dir.path().join("jwt");
    let started = Instant::now();
    let sc = Sidecar::start(
        dir.path(),
        &[
            "--backend",
            &b.grpc,
            "--token-file",
            token.to_str().unwrap(),
            "--secret",
            &format!("prod/api/jwt:{}", out.display()),
            "--listen",
            "127.0.0.1:0",
        ],
        &[("REKEY_BACKOFF_MAX", "2s")],
    );
    let sc = tokio::task::spawn_blocking(move || {
        assert_reconnects_back_off(&sc, started, Duration::from_secs(2));
        sc
    })
    .await
    .unwrap();
    let (code, body) = sc.get("/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains(
            "backend: resource exhausted: pod-a already holds 1 Watch streams (limits.max_watch_streams_per_identity)"
        ),
        "{body}"
    );

    // The place frees: the sidecar gets in on a later attempt and the
    // reason is gone.
    drop(held);
    drop(holder);
    let (code, body) = eventually(Duration::from_secs(60), "readiness", || {
        let r = sc.get("/readyz");
        std::future::ready((r.0 == 200).then_some(r))
    })
    .await;
    assert_eq!(code, 200);
    assert!(!body.contains("backend:"), "{body}");
    assert!(out.exists());
}

/// A stand-in validation host: records every byte of every connection and
/// answers 204 to each request head it sees.
struct Host {
    addr: String,
    bytes: Arc<Mutex<Vec<u8>>>,
    connections: Arc<Mutex<usize>>,
}

impl Host {
    fn start() -> Host {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(Mutex::new(0));
        let (all, n) = (bytes.clone(), connections.clone());
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                *n.lock().unwrap() += 1;
                let all = all.clone();
                std::thread::spawn(move || serve(s, &all));
            }
        });
        Host {
            addr,
            bytes,
            connections,
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes.lock().unwrap()).into_owned()
    }

    fn connections(&self) -> usize {
        *self.connections.lock().unwrap()
    }
}

/// Reads a connection to its end (a smuggled request would follow the
/// first), answering 204 after each blank line that ends a head.
fn serve(mut s: std::net::TcpStream, all: &Mutex<Vec<u8>>) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut mine = Vec::new();
    let mut answered = 0;
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        mine.extend_from_slice(&buf[..n]);
        all.lock().unwrap().extend_from_slice(&buf[..n]);
        let heads = mine.windows(4).filter(|w| *w == b"\r\n\r\n").count();
        while answered < heads {
            answered += 1;
            let _ = s.write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n");
        }
    }
}

#[test]
fn an_http_validation_value_with_crlf_injects_no_header_and_no_request() {
    let dir = TempDir::new("sch-crlf");
    let b = Backend::start(dir.path(), BackendOpts::default());
    let host = Host::start();
    let good = write_file(dir.path(), "good", "tok-good-0001");
    b.cli_json(&[
        "create",
        "prod/api/token",
        "--kind",
        "static",
        "--value-file",
        good.to_str().unwrap(),
    ]);
    let out = dir.path().join("token");
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
id = "prod/api/token"
path = "{out}"
validate = {{ kind = "http", url = "http://{host}/check" }}
"#,
            backend = b.grpc,
            token = b.token_path().display(),
            out = out.display(),
            host = host.addr,
        ),
    );
    let sc = Sidecar::start(dir.path(), &["--config", cfg.to_str().unwrap()], &[]);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "tok-good-0001");
    assert_eq!(host.connections(), 1);
    assert!(
        host.text()
            .contains("\r\nauthorization: Bearer tok-good-0001\r\n"),
        "{}",
        host.text()
    );

    let hostile = write_file(
        dir.path(),
        "hostile",
        "tok\r\nX-Injected: 1\r\n\r\nPOST /admin/delete-all HTTP/1.1",
    );
    b.cli_json(&[
        "rotate",
        "prod/api/token",
        "--value-file",
        hostile.to_str().unwrap(),
    ]);
    wait_for("the rejection", Duration::from_secs(30), || {
        sc.get("/metrics")
            .1
            .contains("rekey_sidecar_deliveries_total{secret=\"prod/api/token\",outcome=\"validation_failed\"} 1")
    });
    let (code, body) = sc.get("/readyz");
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains(
            "prod/api/token: serving v1 (last good); newer version rejected: v2: validation failed: http: the bearer token holds bytes not allowed in a header; nothing was sent"
        ),
        "{body}"
    );
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "tok-good-0001");
    // The sidecar reports the failure at once; the backend stores it
    // with the reports that arrive beside it.
    wait_for("the failure in status", Duration::from_secs(10), || {
        b.cli_json(&["status", "prod/api/token"])[0]["consumers"][0]["healthy"] == false
    });
    let st = b.cli_json(&["status", "prod/api/token"]);
    let c = &st[0]["consumers"][0];
    assert_eq!(c["version"], 1, "{c}");
    assert_eq!(c["healthy"], false, "{c}");

    // Nothing of v2 reached the host: no new connection, no header, no
    // second request.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(host.connections(), 1, "{}", host.text());
    let seen = host.text();
    assert!(!seen.contains("X-Injected"), "{seen}");
    assert!(!seen.contains("delete-all"), "{seen}");
    assert_eq!(seen.matches(" HTTP/1.1\r\n").count(), 1, "{seen}");
    assert!(!sc.log().contains("delete-all"), "{}", sc.log());
}

#[test]
fn a_symlinked_output_directory_is_refused_at_start_up() {
    let dir = TempDir::new("sch-link");
    let token = write_file(dir.path(), "token", "t");
    let real = dir.path().join("real");
    std::fs::create_dir_all(real.join("sub")).unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();

    for out in [link.join("jwt"), link.join("sub/jwt")] {
        let (code, stdout, err) = Sidecar::refuse(&[
            "--token-file",
            token.to_str().unwrap(),
            "--secret",
            &format!("prod/api/jwt:{}", out.display()),
            "--secret",
            "malformed",
        ]);
        assert_eq!(code, Some(2), "{err}");
        assert!(stdout.is_empty(), "nothing listened: {stdout}");
        assert!(
            err.contains(&format!(
                "secrets[0] (prod/api/jwt).path: {} is a symlink (to {})",
                link.display(),
                real.display()
            )),
            "{err}"
        );
        assert!(
            err.contains(&format!("give the real directory, {}", real.display())),
            "{err}"
        );
        assert!(err.contains("allow_symlinked_dirs = true"), "{err}");
        assert!(
            err.contains("--secret \"malformed\""),
            "listed together: {err}"
        );
    }
    assert!(!real.join("jwt").exists() && !real.join("sub/jwt").exists());

    // Allowed on purpose: written through the link.
    let b = Backend::start(dir.path(), BackendOpts::default());
    b.cli_json(&["create", "prod/api/jwt", "--kind", "random"]);
    let cfg = write_file(
        dir.path(),
        "allowed.toml",
        format!(
            "backend = \"{}\"\ntoken_file = \"{}\"\nlisten = \"127.0.0.1:0\"\nallow_symlinked_dirs = true\n\
             [[secrets]]\nid = \"prod/api/jwt\"\npath = \"{}\"\n",
            b.grpc,
            b.token_path().display(),
            link.join("sub/jwt").display()
        ),
    );
    let sc = Sidecar::start(dir.path(), &["--config", cfg.to_str().unwrap()], &[]);
    assert_eq!(sc.get("/readyz").0, 200);
    assert!(real.join("sub/jwt").exists());
}

#[test]
fn a_directory_swapped_for_a_symlink_after_start_up_is_not_written_through() {
    let dir = TempDir::new("sch-swap");
    let b = Backend::start(dir.path(), BackendOpts::default());
    b.cli_json(&["create", "prod/api/jwt", "--kind", "random"]);
    b.cli_json(&["create", "prod/api/key", "--kind", "random"]);
    // The volume holds a plain output and a kubelet-style directory.
    let vol = dir.path().join("vol");
    std::fs::create_dir_all(vol.join("app")).unwrap();
    std::fs::create_dir_all(vol.join("keys")).unwrap();
    let cfg = write_file(
        dir.path(),
        "sidecar.toml",
        format!(
            r#"
backend = "{backend}"
token_file = "{token}"
listen = "127.0.0.1:0"
[[secrets]]
id = "prod/api/jwt"
path = "{vol}/app/jwt"
[[secrets]]
id = "prod/api/key"
directory = "{vol}/keys"
path = "key"
"#,
            backend = b.grpc,
            token = b.token_path().display(),
            vol = vol.display(),
        ),
    );
    let sc = Sidecar::start(dir.path(), &["--config", cfg.to_str().unwrap()], &[]);
    assert_eq!(sc.get("/readyz").0, 200);
    let jwt_v1 = std::fs::read(vol.join("app/jwt")).unwrap();
    let key_v1 = std::fs::read(vol.join("keys/key")).unwrap();

    // Someone with write access to the volume's parent swaps it for a
    // link to a tree of their choosing, where following would succeed.
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir_all(elsewhere.join("app")).unwrap();
    std::fs::create_dir_all(elsewhere.join("keys")).unwrap();
    std::fs::rename(&vol, dir.path().join("vol-old")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &vol).unwrap();

    b.cli_json(&["rotate", "prod/api/jwt"]);
    b.cli_json(&["rotate", "prod/api/key"]);
    for id in ["prod/api/jwt", "prod/api/key"] {
        wait_for(&format!("{id} refused"), Duration::from_secs(30), || {
            sc.get("/metrics").1.contains(&format!(
                "rekey_sidecar_deliveries_total{{secret=\"{id}\",outcome=\"write_failed\"}} 1"
            ))
        });
    }
    assert_eq!(
        std::fs::read_dir(elsewhere.join("app")).unwrap().count(),
        0,
        "nothing written through the link"
    );
    assert_eq!(
        std::fs::read_dir(elsewhere.join("keys")).unwrap().count(),
        0
    );
    let old = dir.path().join("vol-old");
    assert_eq!(std::fs::read(old.join("app/jwt")).unwrap(), jwt_v1);
    assert_eq!(std::fs::read(old.join("keys/key")).unwrap(), key_v1);

    let (code, body) = sc.get("/readyz");
    assert_eq!(
        code, 200,
        "failing static on the last good versions: {body}"
    );
    for (id, path) in [
        ("prod/api/jwt", vol.join("app/jwt")),
        ("prod/api/key", vol.join("keys/key")),
    ] {
        assert!(
            body.contains(&format!(
                "{id}: serving v1 (last good); newer version rejected: v2: cannot write {}: {} is a symlink, which is not followed (allow_symlinked_dirs is off)",
                path.display(),
                vol.display()
            )),
            "{body}"
        );
    }
}
