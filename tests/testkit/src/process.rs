//! Small helpers for running processes and talking to them: a temporary
//! directory per test, starting a process and waiting for its first line,
//! commands that must succeed, the text of an output, polling until
//! something holds, plain HTTP/1.1 requests, free ports.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Numbers the directories and log files this process creates.
static SEQ: AtomicU32 = AtomicU32::new(0);

/// The next number of this process's sequence (unique per process).
pub(crate) fn next_seq() -> u32 {
    SEQ.fetch_add(1, Ordering::Relaxed)
}

/// A fresh directory under the system temp dir, removed on drop (kept
/// when the test failed and `REKEY_TEST_KEEP` is set).
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// # Panics
    ///
    /// When the directory cannot be created.
    #[must_use]
    pub fn new(tag: &str) -> Self {
        Self::new_in(&std::env::temp_dir(), tag)
    }

    /// A fresh directory under `base`.
    ///
    /// # Panics
    ///
    /// When the directory cannot be created.
    #[must_use]
    pub fn new_in(base: &Path, tag: &str) -> Self {
        let p = base.join(format!(
            "rekey-{tag}-{}-{}-{}",
            std::process::id(),
            next_seq(),
            rand_u32()
        ));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // REKEY_TEST_KEEP=1 keeps the logs and data of a failed test.
        if std::thread::panicking() && std::env::var_os("REKEY_TEST_KEEP").is_some() {
            eprintln!("kept {}", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Four random bytes from the kernel, for names that must not collide
/// between processes.
#[must_use]
pub(crate) fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut b);
    }
    u32::from_le_bytes(b)
}

/// `n` random bytes as hex.
pub(crate) fn random_hex(n: usize) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(2 * n);
    for _ in 0..n.div_ceil(4) {
        let _ = write!(s, "{:08x}", rand_u32());
    }
    s.truncate(2 * n);
    s
}

/// A random UUID-shaped string.
pub(crate) fn random_uuid() -> String {
    let h = random_hex(16);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A test tool that `./scripts/test` installs into the tools venv: the
/// path in `$ENV_VAR` when set; else `target/tools/venv/bin/NAME` in the
/// workspace (`venv/bin/NAME` under `$REKEY_TOOLS_DIR` when that is set);
/// else `NAME` on the `PATH`.
///
/// # Panics
///
/// When there is none.
pub fn tool_binary(name: &str, env_var: &str) -> PathBuf {
    if let Some(b) = std::env::var_os(env_var).filter(|b| !b.is_empty()) {
        return PathBuf::from(b);
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let workspace = manifest.parent().and_then(Path::parent).unwrap_or(manifest);
    let tools = std::env::var_os("REKEY_TOOLS_DIR")
        .filter(|d| !d.is_empty())
        .map_or_else(|| workspace.join("target/tools"), |d| workspace.join(d));
    let venv = tools.join("venv/bin").join(name);
    if venv.is_file() {
        return venv;
    }
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "`{name}` not found: {} is missing and there is none on PATH; \
                 run ./scripts/test once (it installs {name} there) or set {env_var} to a {name} binary",
                venv.display()
            )
        })
}

/// Spawns `cmd` (stdout piped) and waits up to `secs` for the first line
/// it prints; the rest of stdout is drained so the child never blocks.
///
/// # Panics
///
/// When it cannot start or prints nothing in time (with `log` attached).
#[must_use]
pub(crate) fn spawn_until_first_line(
    mut cmd: Command,
    log: &Path,
    what: &str,
    secs: u64,
) -> (Child, String) {
    cmd.stdout(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(l)) = lines.next() {
            let _ = tx.send(l);
        }
        for _ in lines {}
    });
    if let Ok(l) = rx.recv_timeout(Duration::from_secs(secs)) {
        (child, l)
    } else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "{what} did not start; log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
}

/// SIGTERM, then up to 20 s for the exit (SIGKILL after that); the exit
/// code (`None` when killed).
#[must_use]
pub fn terminate(mut c: Child) -> Option<i32> {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(c.id().to_string())
        .status();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(st)) = c.try_wait() {
            return st.code();
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            let _ = c.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a command to its end.
///
/// # Panics
///
/// When it cannot run or fails; with its output.
pub fn succeed(cmd: &mut Command) -> Output {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// Text of a run's stderr.
#[must_use]
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Text of a run's stdout.
#[must_use]
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// Polls `f` every 50 ms until it returns `Some`.
///
/// # Panics
///
/// After `timeout`, naming `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() <= deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `f` every 5 ms until it holds, blocking the thread.
///
/// # Panics
///
/// After `timeout`, naming `what`.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A minimal HTTP/1.1 GET over a plain TCP socket; the whole response.
///
/// # Panics
///
/// When the connection fails.
#[must_use]
pub fn http_get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}

/// GET with extra headers: (status, body).
///
/// # Panics
///
/// When the connection fails.
#[must_use]
pub fn http_request(addr: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    use std::fmt::Write as _;
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        let _ = write!(req, "{k}: {v}\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Hex SHA-256 of a token, as `[[auth.tokens]]` wants it.
///
/// # Panics
///
/// When `sha256sum` cannot run.
#[must_use]
pub fn sha256_hex(s: &str) -> String {
    sha256_hex_of(s.as_bytes())
}

/// Hex SHA-256 of bytes (a plugin binary, as `bao plugin register`
/// wants it).
///
/// # Panics
///
/// When `sha256sum` cannot run.
#[must_use]
pub fn sha256_hex_of(bytes: &[u8]) -> String {
    let out = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().expect("stdin").write_all(bytes)?;
            c.wait_with_output()
        })
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("digest")
        .to_string()
}

/// A free TCP port on 127.0.0.1 (bound, then released).
///
/// # Panics
///
/// When no port can be bound.
#[must_use]
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The value of the first sample of a Prometheus text exposition whose
/// line starts with `name` (name plus labels, e.g. `rekey_up{a="b"}`).
#[must_use]
pub fn metric(exposition: &str, name: &str) -> Option<f64> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Opens HYVVE envelopes with Python's `cryptography` (`hyvve_open.py`, in
/// the tools venv `./scripts/test` makes, where moto brings it): the
/// plaintext of each, `None` where `master_key` (base64) does not open it.
///
/// # Panics
///
/// When the script cannot run.
#[must_use]
pub fn hyvve_open_in_python(master_key: &str, envelopes: &[String]) -> Vec<Option<String>> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("hyvve_open.py");
    let mut child = Command::new(tool_binary("python3", "REKEY_PYTHON"))
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run hyvve_open.py");
    let input = serde_json::json!({"master_key": master_key, "envelopes": envelopes});
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.to_string().as_bytes())
        .expect("write to hyvve_open.py");
    let o = child.wait_with_output().expect("hyvve_open.py");
    assert!(o.status.success(), "hyvve_open.py: {}", stderr(&o));
    serde_json::from_slice(&o.stdout).expect("hyvve_open.py prints JSON")
}

/// Writes `content` to `dir/name`; the path.
///
/// # Panics
///
/// When the file cannot be written.
pub fn write_file(dir: &Path, name: &str, content: impl AsRef<[u8]>) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
    p
}

/// An `exec` kind's create hook: a new `key-<nanoseconds>` each time.
pub const KEY_HOOK: &str = r#"cat > /dev/null; echo "\"key-$(date +%s%N)\"""#;

/// [`write_exec`] as `dir/name`; the path, as `--hook-*` takes it.
#[must_use]
pub fn write_hook(dir: &Path, name: &str, body: &str) -> String {
    let p = dir.join(name);
    write_exec(&p, body);
    p.display().to_string()
}

/// Writes an executable `/bin/sh` script (a hook) at `path`.
///
/// # Panics
///
/// When it cannot be written.
pub fn write_exec(path: &Path, body: &str) {
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    let mut p = std::fs::metadata(path).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut p, 0o755);
    std::fs::set_permissions(path, p).unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_finds_the_sample_by_its_full_name() {
        let text = "# HELP x\nrekey_a{b=\"c\"} 3\nrekey_a 1\nrekey_ab 9\n";
        assert_eq!(metric(text, "rekey_a{b=\"c\"}"), Some(3.0));
        assert_eq!(metric(text, "rekey_a"), Some(1.0));
        assert_eq!(metric(text, "rekey_zz"), None);
    }
}
