//! The demo's processes. Each pod has two containers, a `rekey-sidecar` and
//! the app; a [`Supervisor`] watches them as kubelet does with
//! `restartPolicy: Always`: a container whose process exits is started
//! again, and every such restart is recorded. Nothing in a rotation should
//! ever cause one; the demo reports the real count.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::CliError;

/// How long a process may take to print its first line.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the supervisor looks at each process.
const SUPERVISE_EVERY: Duration = Duration::from_millis(20);

/// A child process, killed if it is still running when dropped.
pub struct Proc(Child);

impl Proc {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// The exit status, if the process has exited.
    fn exited(&mut self) -> Option<String> {
        match self.0.try_wait() {
            Ok(Some(st)) => Some(st.to_string()),
            Ok(None) => None,
            Err(e) => Some(format!("unknown ({e})")),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Starts a binary (stderr appended to `log`) and returns it with the
/// first line it printed; the rest of its stdout is drained.
pub fn spawn(bin: &Path, args: &[String], log: &Path) -> Result<(Proc, String), CliError> {
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| CliError::failed(format!("demo: {}: {e}", log.display())))?;
    let mut child = Command::new(bin)
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(logf)
        .spawn()
        .map_err(|e| CliError::failed(format!("demo: cannot start {}: {e}", bin.display())))?;
    let out = child.stdout.take();
    let proc_ = Proc(child);
    let out = out.ok_or_else(|| CliError::failed("demo: no stdout"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(out).lines();
        if let Some(Ok(l)) = lines.next() {
            let _ = tx.send(l);
        }
        for _ in lines {}
    });
    match rx.recv_timeout(START_TIMEOUT) {
        Ok(line) => Ok((proc_, line)),
        Err(_) => Err(CliError::failed(format!(
            "demo: {} did not start; see {}",
            bin.display(),
            log.display()
        ))),
    }
}

/// SIGTERM to every process (the last started first), then up to 5 s for
/// them to exit.
pub async fn stop_all(mut procs: Vec<Proc>) {
    procs.reverse();
    for p in &procs {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(p.pid().to_string())
            .status();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if procs.iter_mut().all(|p| p.exited().is_some()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One container of a pod: how to start it, and its current process.
pub struct Container {
    /// `pod-0 sidecar`, `pod-1 app`, ...
    pub name: String,
    bin: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    proc_: Proc,
}

/// A container's process that exited during the demo and was started
/// again.
pub struct Restart {
    pub container: String,
    pub old_pid: u32,
    pub status: String,
    /// The new process, or why it could not be started.
    pub new_pid: Result<u32, String>,
    /// Since the demo started.
    pub at: Duration,
}

impl Container {
    /// Starts the container's process; also returns its first line.
    pub fn start(
        name: String,
        bin: &Path,
        args: Vec<String>,
        log: PathBuf,
    ) -> Result<(Container, String), CliError> {
        let (proc_, line) = spawn(bin, &args, &log)?;
        Ok((
            Container {
                name,
                bin: bin.to_path_buf(),
                args,
                log,
                proc_,
            },
            line,
        ))
    }

    pub fn pid(&self) -> u32 {
        self.proc_.pid()
    }

    /// Arguments for later starts (e.g. the port the first start bound).
    pub fn restart_with(&mut self, args: Vec<String>) {
        self.args = args;
    }

    /// If the process has exited, starts it again and says so.
    fn check(&mut self, t0: Instant) -> Option<Restart> {
        let status = self.proc_.exited()?;
        let old_pid = self.pid();
        let new_pid = match spawn(&self.bin, &self.args, &self.log) {
            Ok((p, _)) => {
                let pid = p.pid();
                self.proc_ = p;
                Ok(pid)
            }
            Err(e) => Err(e.to_string()),
        };
        Some(Restart {
            container: self.name.clone(),
            old_pid,
            status,
            new_pid,
            at: t0.elapsed(),
        })
    }

    pub fn into_proc(self) -> Proc {
        self.proc_
    }
}

impl Restart {
    /// One line for the timeline.
    pub fn describe(&self) -> String {
        match &self.new_pid {
            Ok(pid) => format!(
                "{}: pid {} exited ({}), started again as pid {pid}",
                self.container, self.old_pid, self.status
            ),
            Err(e) => format!(
                "{}: pid {} exited ({}), and could not be started again: {e}",
                self.container, self.old_pid, self.status
            ),
        }
    }
}

/// Watches containers on a thread of its own until [`Supervisor::finish`]
/// (or until dropped, which stops and kills them).
pub struct Supervisor {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<(Vec<Container>, Vec<Restart>)>>,
}

impl Supervisor {
    /// Starts watching; each restart is printed as it happens, stamped
    /// with the time since `t0`.
    pub fn watch(mut containers: Vec<Container>, t0: Instant) -> Supervisor {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut restarts = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                for c in &mut containers {
                    if let Some(r) = c.check(t0) {
                        println!("[{:>7.3}s]   restart: {}", r.at.as_secs_f64(), r.describe());
                        restarts.push(r);
                    }
                }
                std::thread::sleep(SUPERVISE_EVERY);
            }
            (containers, restarts)
        });
        Supervisor {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops watching. A process that exited since the last look counts
    /// as a restart too (it would have been started again), but is not.
    pub async fn finish(mut self, t0: Instant) -> Result<(Vec<Container>, Vec<Restart>), CliError> {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take();
        let joined = tokio::task::spawn_blocking(move || thread.map(JoinHandle::join)).await;
        let Ok(Some(Ok((mut containers, mut restarts)))) = joined else {
            return Err(CliError::failed(
                "demo: the pod supervisor stopped unexpectedly",
            ));
        };
        for c in &mut containers {
            if let Some(status) = c.proc_.exited() {
                restarts.push(Restart {
                    container: c.name.clone(),
                    old_pid: c.pid(),
                    status,
                    new_pid: Err("the demo was ending".into()),
                    at: t0.elapsed(),
                });
            }
        }
        Ok((containers, restarts))
    }
}

impl Drop for Supervisor {
    /// On an early return the containers must not outlive the demo: stop
    /// the thread, and its containers are killed as they drop.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
