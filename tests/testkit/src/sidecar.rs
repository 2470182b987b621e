//! A real `rekey-sidecar` process, and the config of a re-encrypting one.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::backend::Backend;
use crate::bins::SIDECAR;
use crate::process::{http_request, next_seq, spawn_until_first_line, stderr, stdout, terminate};

/// A running `rekey-sidecar`, killed (SIGKILL) on drop.
pub struct Sidecar {
    child: Option<Child>,
    /// `ADDR` of its HTTP server.
    pub http: String,
    pub log_path: PathBuf,
}

impl Sidecar {
    /// Starts the sidecar with `args` and waits for its listening line.
    ///
    /// # Panics
    ///
    /// When it does not start (with its log).
    #[must_use]
    pub fn start(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Sidecar {
        let log_path = dir.join(format!("sidecar-{}.log", next_seq()));
        let log = std::fs::File::create(&log_path).expect("log file");
        let mut cmd = Command::new(SIDECAR.path());
        cmd.args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let (child, line) = spawn_until_first_line(cmd, &log_path, "rekey-sidecar", 30);
        let http = line
            .strip_prefix("listening http=")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        Sidecar {
            child: Some(child),
            http,
            log_path,
        }
    }

    /// A sidecar that writes one secret of backend `b` to `file`, with the
    /// backend's admin token, on a free port.
    ///
    /// # Panics
    ///
    /// When it does not start (with its log).
    #[must_use]
    pub fn watching(
        dir: &Path,
        b: &crate::Backend,
        secret: &str,
        file: &Path,
        env: &[(&str, &str)],
    ) -> Sidecar {
        let token = b.token_path();
        Sidecar::start(
            dir,
            &[
                "--backend",
                &b.grpc,
                "--token-file",
                &token.to_string_lossy(),
                "--secret",
                &format!("{secret}:{}", file.display()),
                "--listen",
                "127.0.0.1:0",
            ],
            env,
        )
    }

    /// Runs the sidecar expecting it to refuse to start: (exit code,
    /// stdout, stderr).
    ///
    /// # Panics
    ///
    /// When it cannot run.
    #[must_use]
    pub fn refuse(args: &[&str]) -> (Option<i32>, String, String) {
        let o = Command::new(SIDECAR.path())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run rekey-sidecar");
        (o.status.code(), stdout(&o), stderr(&o))
    }

    /// GET on its HTTP server: (status, body).
    #[must_use]
    pub fn get(&self, path: &str) -> (u16, String) {
        http_request(&self.http, path, &[])
    }

    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The process id (0 once stopped).
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGTERM and wait; the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        terminate(self.child.take()?)
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A sidecar config (`CONSUMER.toml` in `dir`) that serves `secret` from
/// `b` and re-encrypts the database named in `db_url_file`; `reencrypt`
/// holds the rest of the `[[reencrypt]]` table (columns, batch size, poll,
/// election).
///
/// # Panics
///
/// When the file cannot be written.
#[must_use]
pub fn reencrypt_sidecar_config(
    dir: &Path,
    consumer: &str,
    b: &Backend,
    secret: &str,
    db_url_file: &Path,
    reencrypt: &str,
) -> PathBuf {
    let p = dir.join(format!("{consumer}.toml"));
    std::fs::write(
        &p,
        format!(
            r#"
backend = "{backend}"
token_file = "{token}"
listen = "127.0.0.1:0"
consumer_id = "{consumer}"
report_interval = "1s"
backoff_max = "500ms"
[[secrets]]
id = "{secret}"
path = "{out}"
[[reencrypt]]
secret = "{secret}"
database_url_file = "{db}"
{reencrypt}
"#,
            backend = b.grpc,
            token = b.token_path().display(),
            out = dir.join(format!("{consumer}.key")).display(),
            db = db_url_file.display(),
        ),
    )
    .expect("write the sidecar config");
    p
}

/// A sidecar configuration for `b` (`dir/name`) with one `[[secrets]]`
/// entry for `id` written to `out`; `entry` adds lines to it (`format`,
/// `validate`, ...).
///
/// # Panics
///
/// When the file cannot be written.
#[must_use]
pub fn sidecar_config(
    dir: &Path,
    name: &str,
    b: &Backend,
    id: &str,
    out: &Path,
    entry: &str,
) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(
        &p,
        format!(
            "backend = \"{backend}\"\ntoken_file = \"{token}\"\nlisten = \"127.0.0.1:0\"\n\
             [[secrets]]\nid = \"{id}\"\npath = \"{out}\"\n{entry}\n",
            backend = b.grpc,
            token = b.token_path().display(),
            out = out.display(),
        ),
    )
    .expect("write the sidecar config");
    p
}
