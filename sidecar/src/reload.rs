//! Tells the app that a file changed: a signal to a process (found by pid
//! file or by name, in a shared process namespace), an HTTP POST, or a
//! command. Requests are debounced: several secrets delivered together
//! trigger each action once.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use rekey_probe::http::Method;

use crate::config::{Reload, ReloadKind};
use crate::error::Error;
use crate::metrics::Metrics;

/// Queues reload actions by name.
#[derive(Clone)]
pub struct Reloader {
    tx: mpsc::UnboundedSender<String>,
}

impl Reloader {
    /// Starts the task that runs queued actions; it ends when every
    /// `Reloader` clone is dropped.
    pub fn spawn(actions: Vec<Reload>, debounce: Duration, metrics: Arc<Metrics>) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut due = BTreeSet::from([first]);
                let deadline = tokio::time::sleep(debounce);
                tokio::pin!(deadline);
                loop {
                    tokio::select! {
                        more = rx.recv() => match more {
                            Some(n) => { due.insert(n); }
                            None => break,
                        },
                        _ = &mut deadline => break,
                    }
                }
                for name in due {
                    let Some(action) = actions.iter().find(|a| a.name == name) else {
                        continue;
                    };
                    let outcome = match tokio::time::timeout(action.timeout, run(action)).await {
                        Ok(Ok(())) => {
                            tracing::info!(action = %name, "reload action done");
                            "ok"
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(action = %name, error = %e, "reload action failed");
                            "error"
                        }
                        Err(_) => {
                            tracing::warn!(action = %name, timeout = ?action.timeout, "reload action timed out");
                            "timeout"
                        }
                    };
                    metrics.reload(&name, outcome);
                }
            }
        });
        Self { tx }
    }

    pub fn request(&self, names: &[String]) {
        for n in names {
            let _ = self.tx.send(n.clone());
        }
    }
}

/// Pids whose command name (`/proc/PID/comm`) or program file name is
/// `name`.
fn pids_by_name(name: &str) -> Vec<i32> {
    let mut out = Vec::new();
    let me = std::process::id() as i32;
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        let exe = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let argv0 = exe.split(|b| *b == 0).next().unwrap_or_default();
        let base = Path::new(std::str::from_utf8(argv0).unwrap_or_default())
            .file_name()
            .map(|f| f.to_string_lossy().to_string())
            .unwrap_or_default();
        if comm.trim() == name || base == name {
            out.push(pid);
        }
    }
    out
}

async fn run(action: &Reload) -> Result<(), Error> {
    match &action.kind {
        ReloadKind::Signal {
            signal,
            name,
            pid_file,
            process_name,
        } => {
            let pids = match (pid_file, process_name) {
                (Some(f), _) => {
                    let text = std::fs::read_to_string(f).map_err(|reason| Error::PidFile {
                        path: f.clone(),
                        reason,
                    })?;
                    vec![
                        text.trim()
                            .parse::<i32>()
                            .map_err(|_| Error::NotAPid { path: f.clone() })?,
                    ]
                }
                (None, Some(n)) => pids_by_name(n),
                (None, None) => vec![],
            };
            if pids.is_empty() {
                return Err(Error::NoProcess);
            }
            for pid in pids {
                let p = rustix::process::Pid::from_raw(pid).ok_or(Error::InvalidPid { pid })?;
                rustix::process::kill_process(p, *signal).map_err(|reason| Error::Signal {
                    signal: name.clone(),
                    pid,
                    reason,
                })?;
            }
            Ok(())
        }
        ReloadKind::HttpPost(url) => {
            let status = rekey_probe::http::request(
                &Method::POST,
                url,
                None,
                b"",
                rekey_probe::http::DEFAULT_TIMEOUT,
            )
            .await?;
            if status.is_success() {
                Ok(())
            } else {
                Err(Error::HttpStatus {
                    target: rekey_probe::http::target(url),
                    status: status.as_u16(),
                })
            }
        }
        ReloadKind::Command(argv) => {
            let (program, rest) = argv.split_first().ok_or(Error::EmptyCommand)?;
            // No secret value is passed: the app reads the file it was told
            // about.
            let status = tokio::process::Command::new(program)
                .args(rest)
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .status()
                .await
                .map_err(|reason| Error::Spawn {
                    program: program.clone(),
                    reason,
                })?;
            if status.success() {
                Ok(())
            } else {
                Err(Error::CommandFailed {
                    program: program.clone(),
                    status,
                })
            }
        }
    }
}
