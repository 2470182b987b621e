//! Benchmark of `rekey-vault-plugin` in a real OpenBao dev server
//! (`bao server -dev` with a `plugin_directory`) in front of one real
//! `rekey-backend` (SQLite store), all on the same machine.
//!
//! 1. Rotate latency, four ways in one run, taking turns on two `random`
//!    secrets (one rotated through OpenBao, one directly), after a few
//!    warm-up rotations of each:
//!    - `bao write -f rekey/rotate/ID` against `rekey rotate ID`: each a
//!      whole CLI process, as an operator or a script runs it;
//!    - the same two without the CLIs: an HTTP `PUT /v1/rekey/rotate/ID`
//!      to OpenBao (one keep-alive connection) against a `Rotate` call over
//!      gRPC to the backend (one connection). The difference is the
//!      plugin's cost: OpenBao's request handling, the host-to-plugin gRPC
//!      call and the plugin's own call to the backend.
//! 2. Plugin start: the binary started as go-plugin's host starts it (the
//!    magic cookie, `PLUGIN_PROTOCOL_VERSIONS=5`, a P-521 certificate in
//!    `PLUGIN_CLIENT_CERT`); the time until its handshake line is read
//!    from its stdout. And in OpenBao: the first request after the
//!    plugin was killed (OpenBao starts it again, sets it up, then serves
//!    the request) beside a request to the running plugin.
//! 3. The plugin's resident memory (VmRSS, VmHWM from /proc) after the
//!    rotations.
//!
//! Run (release build): `cargo bench -p rekey-e2e --bench vault_plugin`
//!
//! Environment overrides (defaults in brackets):
//! `REKEY_BENCH_PLUGIN_ROTATIONS` (200) measured rotations per way,
//! `REKEY_BENCH_PLUGIN_STARTS` (20) measured plugin starts.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use rekey_testkit::bench::{Table, env_usize, rotate, stats};
use rekey_testkit::{Backend, BackendOpts, Bao, TempDir, VAULT_PLUGIN};

const WARMUP: usize = 5;
const OVERALL_TIMEOUT: Duration = Duration::from_secs(30 * 60);

struct Settings {
    rotations: usize,
    starts: usize,
}

fn main() {
    let settings = (|| {
        Ok(Settings {
            rotations: env_usize("REKEY_BENCH_PLUGIN_ROTATIONS", 200, 1)?,
            starts: env_usize("REKEY_BENCH_PLUGIN_STARTS", 20, 1)?,
        })
    })();
    rekey_testkit::bench::main_with(settings, OVERALL_TIMEOUT, |s| async move { run(&s).await });
}

fn progress(msg: &str) {
    eprintln!("[bench] {msg}");
}

/// Runs a command to completion: its wall time.
fn timed(cmd: &mut Command) -> Result<Duration> {
    let t = Instant::now();
    let out = cmd.output().context("spawn")?;
    let d = t.elapsed();
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(d)
}

/// One keep-alive HTTP/1.1 connection to OpenBao.
struct Http {
    stream: BufReader<TcpStream>,
    host: String,
    token: String,
}

impl Http {
    fn connect(addr: &str, token: &str) -> Result<Http> {
        let host = addr.trim_start_matches("http://").to_string();
        let s = TcpStream::connect(&host)?;
        s.set_nodelay(true)?;
        Ok(Http {
            stream: BufReader::new(s),
            host,
            token: token.to_string(),
        })
    }

    /// `METHOD path` with an empty JSON body: (status, wall time).
    fn call(&mut self, method: &str, path: &str) -> Result<(u16, Duration)> {
        self.call_body(method, path).map(|(c, d, _)| (c, d))
    }

    /// `METHOD path` with an empty JSON body: (status, wall time, body).
    fn call_body(&mut self, method: &str, path: &str) -> Result<(u16, Duration, String)> {
        let t = Instant::now();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nX-Vault-Token: {}\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}",
            self.host, self.token
        );
        self.stream.get_mut().write_all(req.as_bytes())?;
        let mut status = String::new();
        self.stream.read_line(&mut status)?;
        let code: u16 = status
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("no status in {status:?}"))?;
        let mut len = 0usize;
        let mut chunked = false;
        loop {
            let mut line = String::new();
            self.stream.read_line(&mut line)?;
            let l = line.trim_end().to_ascii_lowercase();
            if l.is_empty() {
                break;
            }
            if let Some(v) = l.strip_prefix("content-length:") {
                len = v.trim().parse()?;
            }
            if l.starts_with("transfer-encoding:") && l.contains("chunked") {
                chunked = true;
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                let mut size = String::new();
                self.stream.read_line(&mut size)?;
                let n = usize::from_str_radix(size.trim(), 16)?;
                let mut chunk = vec![0; n + 2];
                self.stream.read_exact(&mut chunk)?;
                body.extend_from_slice(&chunk[..n]);
                if n == 0 {
                    break;
                }
            }
        } else {
            body.resize(len, 0);
            self.stream.read_exact(&mut body)?;
        }
        Ok((
            code,
            t.elapsed(),
            String::from_utf8_lossy(&body).into_owned(),
        ))
    }
}

/// `VmRSS` and `VmHWM` of a process, in KiB.
fn memory_kib(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// A P-521 certificate, as go-plugin's host makes for itself.
fn host_certificate(dir: &std::path::Path) -> Result<String> {
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-521",
            "-nodes",
            "-keyout",
            "host.key",
            "-out",
            "host.pem",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ])
        .current_dir(dir)
        .output()?;
    ensure!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(std::fs::read_to_string(dir.join("host.pem"))?)
}

/// Starts the plugin as a host would: the time until its handshake line.
fn start_once(cert: &str) -> Result<Duration> {
    let t = Instant::now();
    let mut child = Command::new(VAULT_PLUGIN.path())
        .env(
            "VAULT_BACKEND_PLUGIN",
            "6669da05-b1c8-4f49-97d9-c8e5bed98e20",
        )
        .env("PLUGIN_PROTOCOL_VERSIONS", "3,4,5")
        .env("PLUGIN_CLIENT_CERT", cert)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let d = t.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    ensure!(
        line.starts_with("1|5|unix|"),
        "unexpected handshake {line:?}"
    );
    Ok(d)
}

async fn run(s: &Settings) -> Result<String> {
    let dir = TempDir::new("bench-vault-plugin");
    let bao = Bao::dev_with_plugins(dir.path());
    let b = Backend::start(
        dir.path(),
        BackendOpts {
            rust_log: Some("warn".into()),
            ..BackendOpts::default()
        },
    );
    bao.enable_rekey_plugin(&b);
    bao.ok(&["write", "rekey/secrets/bench/plugin", "kind=random"]);
    b.cli_json(&["create", "bench/direct", "--kind", "random"]);

    progress(&format!("{} rotations per way", s.rotations));
    let mut http = Http::connect(&bao.addr, &bao.root_token)?;
    let mut grpc = b.client().await;
    let (mut bao_cli, mut rekey_cli, mut http_t, mut grpc_t) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..WARMUP + s.rotations {
        let a = timed(
            bao.command()
                .args(["write", "-f", "rekey/rotate/bench/plugin"]),
        )?;
        let t = Instant::now();
        let out = b.cli(&["rotate", "bench/direct"]);
        let c = t.elapsed();
        ensure!(out.status.success(), "rekey rotate failed");
        let (code, h) = http.call("PUT", "/v1/rekey/rotate/bench/plugin")?;
        ensure!(code == 200, "PUT rotate answered {code}");
        let g = rotate(&mut grpc, "bench/direct").await?;
        if i >= WARMUP {
            bao_cli.push(a);
            rekey_cli.push(c);
            http_t.push(h);
            grpc_t.push(g);
        }
    }
    let mut rot = Table::stats("rotation");
    rot.stats_row("`bao write -f rekey/rotate/ID` (process)", &stats(bao_cli));
    rot.stats_row("`rekey rotate ID` (process)", &stats(rekey_cli));
    rot.stats_row(
        "HTTP PUT /v1/rekey/rotate/ID (OpenBao + plugin)",
        &stats(http_t),
    );
    rot.stats_row("gRPC Rotate (backend directly)", &stats(grpc_t));

    let pid = bao.plugin_pid().context("no plugin process")?;
    let (rss, hwm) = memory_kib(pid)?;

    progress(&format!("{} plugin starts", s.starts));
    let cert = host_certificate(dir.path())?;
    let mut starts = Vec::new();
    for i in 0..2 + s.starts {
        let d = start_once(&cert)?;
        if i >= 2 {
            starts.push(d);
        }
    }
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    let (mut attempts, mut failed_first) = (Vec::new(), String::new());
    for _ in 0..5 {
        let (_, w) = http.call("GET", "/v1/rekey/secrets/bench/plugin")?;
        warm.push(w);
        let pid = bao.plugin_pid().context("no plugin process")?;
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(i32::try_from(pid)?).context("pid")?,
            rustix::process::Signal::KILL,
        )?;
        let t = Instant::now();
        while bao.plugin_pid() == Some(pid) && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
        // Until OpenBao has seen the process exit, a request goes to the
        // dead connection and fails (500); `bao` and Vault's Go client
        // send it again, as this loop does, at once.
        let t = Instant::now();
        let mut tries = 0;
        loop {
            tries += 1;
            let (code, _, body) = http.call_body("GET", "/v1/rekey/secrets/bench/plugin")?;
            if code == 200 {
                break;
            }
            ensure!(tries < 10, "the read after a kill answered {code}: {body}");
            if failed_first.is_empty() {
                failed_first = format!("{code}: {}", body.trim());
            }
        }
        cold.push(t.elapsed());
        attempts.push(tries);
    }
    let mut start = Table::stats("plugin start");
    start.stats_row("process start → handshake line", &stats(starts));
    start.stats_row("read, plugin running", &stats(warm));
    start.stats_row(
        "read, plugin killed before (OpenBao restarts it; until the read succeeds)",
        &stats(cold),
    );
    start.note(&format!(
        "requests per read after a kill: {attempts:?}{}",
        if failed_first.is_empty() {
            String::new()
        } else {
            format!("; a failed one answered {failed_first}")
        }
    ));

    let mut mem = Table::new("plugin process").right("VmRSS").right("VmHWM");
    mem.row([
        format!("after {} rotations", 2 * (WARMUP + s.rotations)),
        format!("{:.1} MiB", rss as f64 / 1024.0),
        format!("{:.1} MiB", hwm as f64 / 1024.0),
    ]);
    Ok(format!(
        "{}\n{}\n{}",
        rot.render_markdown(),
        start.render_markdown(),
        mem.render_markdown()
    ))
}
