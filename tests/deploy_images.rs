//! The container images (`deploy/docker/*.Dockerfile`): the backend with
//! the CLI, the sidecar, and `rekey-lambda` as a Lambda container image.
//!
//! There is no Docker daemon where these tests run, so no image is built.
//! Instead each Dockerfile is checked with hadolint, its final stage is
//! parsed (`USER`, `ENTRYPOINT`, `CMD`, `ENV`, `WORKDIR`, `EXPOSE`,
//! `VOLUME`), and each binary is run the way its image runs it:
//!
//! - In a private mount namespace (`unshare --mount --propagation
//!   private`), a tmpfs becomes the image's root filesystem: the host's
//!   `/usr/bin`, `/usr/sbin`, `/usr/lib`, `/usr/lib64` and `/etc/ssl`
//!   stand in for the base image's system files (glibc, libgcc, CA
//!   certificates), read-only, with `/dev`, `/proc` and `/sys` and an
//!   `/etc/passwd` like distroless's; the fresh build of each binary the
//!   image ships is bound read-only at the path the image puts it
//!   (`/usr/local/bin/rekey-backend`, `/var/runtime/bootstrap`, ...); the
//!   image's `VOLUME`s are bound to temporary directories owned by the
//!   image's user, and a pod's secrets (a token, read-only) where a test
//!   needs them. Then the root is remounted read-only, as with
//!   `readOnlyRootFilesystem: true` or `docker run --read-only`: the
//!   volumes are the only places the process can write (besides
//!   `/dev/shm`, as in a container).
//! - The process is started with `chroot` into that root, in the image's
//!   `WORKDIR`, as the image's numeric `USER` (`setpriv --reuid --regid
//!   --clear-groups --no-new-privs`: no capabilities, no supplementary
//!   groups), with the image's `ENTRYPOINT` and only the image's `ENV` (and
//!   the base image's `PATH`, `SSL_CERT_FILE` and `HOME`), plus what a
//!   deployment adds: its arguments and variables.
//! - The one setting a test always changes is the listening address: the
//!   tests share the host's network, so each binds 127.0.0.1 on a free port
//!   instead of the image's `0.0.0.0:<EXPOSE>` (that the two agree is
//!   checked from the Dockerfile).
//!
//! The mount namespace dies with the process, and with it every mount;
//! `unshare`, `sh`, `chroot`, `env` and `setpriv` each exec the next, so
//! the child's pid is the binary's and killing it leaves nothing behind.
//! The tests need root, `unshare` and `setpriv` (util-linux), as
//! `./scripts/test` runs them, and hadolint (`./scripts/test` installs it).

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rekey_testkit::*;

/// The runtime base of every image: glibc and libgcc, which the binaries
/// link against, and nothing that runs a shell.
const BASE_IMAGE: &str = "gcr.io/distroless/cc-debian12:nonroot";

/// What the base image's configuration puts in every container's
/// environment, and the `HOME` Docker derives from its `/etc/passwd` for
/// uid 65532.
const BASE_ENV: [(&str, &str); 3] = [
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt"),
    ("HOME", "/home/nonroot"),
];

/// The base image's `/etc/passwd`.
const BASE_PASSWD: &str = "root:x:0:0:root:/root:/sbin/nologin\n\
    nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n\
    nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n";

/// The host's directories that stand in for the base image's system files
/// (bound read-only); nothing of an image may be mounted inside them.
const SYSTEM_DIRS: [&str; 5] = [
    "/usr/bin",
    "/usr/sbin",
    "/usr/lib",
    "/usr/lib64",
    "/etc/ssl",
];

/// Builds the image's root in a private mount namespace and execs the
/// entrypoint in it. Arguments: ROOT UID GID WORKDIR PASSWD, then
/// `MODE HOST_PATH IMAGE_PATH` for each mount (MODE `rw` or `ro`), `--`,
/// and the command. The environment is the container's, passed through.
const START_IN_IMAGE_ROOT: &str = r#"set -eu
root=$1 uid=$2 gid=$3 workdir=$4 passwd=$5
shift 5
mount -t tmpfs -o mode=0755 image-root "$root"
for d in /usr/bin /usr/sbin /usr/lib /usr/lib64 /etc/ssl; do
    mkdir -p "$root$d"
    mount --bind -o ro "$d" "$root$d"
done
for f in /etc/hosts /etc/resolv.conf /etc/nsswitch.conf; do
    if [ -e "$f" ]; then
        touch "$root$f"
        mount --bind -o ro "$f" "$root$f"
    fi
done
for d in bin sbin lib lib64; do
    ln -s "usr/$d" "$root/$d"
done
for d in dev proc sys; do
    mkdir "$root/$d"
    mount --rbind "/$d" "$root/$d"
done
mkdir -m 1777 "$root/tmp"
mkdir -p "$root/home/nonroot"
printf '%s' "$passwd" > "$root/etc/passwd"
while [ "$1" != -- ]; do
    mode=$1 src=$2 dst=$3
    shift 3
    if [ -d "$src" ]; then
        mkdir -p "$root$dst"
    else
        mkdir -p "$(dirname "$root$dst")"
        touch "$root$dst"
    fi
    mount --bind "$src" "$root$dst"
    if [ "$mode" = ro ]; then
        mount -o remount,bind,ro "$root$dst"
    fi
done
shift
mkdir -p "$root$workdir"
mount -o remount,bind,ro "$root"
exec chroot "$root" /usr/bin/env -u PWD -C "$workdir" \
    /usr/bin/setpriv --reuid="$uid" --regid="$gid" --clear-groups --no-new-privs -- "$@"
"#;

/// Numbers the logs of the processes a test starts.
static LOGS: AtomicU32 = AtomicU32::new(0);

/// How long a process of an image gets to start or to finish.
const START: Duration = Duration::from_secs(60);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_path_buf()
}

// ---------------------------------------------------------------------------
// Dockerfiles

/// One stage of a Dockerfile, as far as these tests read it.
#[derive(Debug, Default)]
struct Stage {
    from: String,
    user: Option<String>,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    env: Vec<(String, String)>,
    workdir: Option<String>,
    expose: Vec<u16>,
    volumes: Vec<String>,
    labels: Vec<(String, String)>,
    runs: Vec<String>,
}

/// A Dockerfile of `deploy/docker/`, parsed.
struct Image {
    file: &'static str,
    path: PathBuf,
    stages: Vec<Stage>,
    /// What the image ships: (path in the image, the workspace binary).
    ships: Vec<(&'static str, Binary)>,
}

impl Image {
    fn backend() -> Image {
        Image::load(
            "backend.Dockerfile",
            vec![
                ("/usr/local/bin/rekey-backend", BACKEND),
                ("/usr/local/bin/rekey", CLI),
            ],
        )
    }

    fn sidecar() -> Image {
        Image::load(
            "sidecar.Dockerfile",
            vec![("/usr/local/bin/rekey-sidecar", SIDECAR)],
        )
    }

    fn lambda() -> Image {
        Image::load(
            "lambda.Dockerfile",
            vec![("/var/runtime/bootstrap", LAMBDA)],
        )
    }

    fn all() -> [Image; 3] {
        [Image::backend(), Image::sidecar(), Image::lambda()]
    }

    fn load(file: &'static str, ships: Vec<(&'static str, Binary)>) -> Image {
        let path = workspace().join("deploy/docker").join(file);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        Image {
            file,
            path,
            stages: parse_stages(&text),
            ships,
        }
    }

    /// The stage that becomes the image.
    fn last(&self) -> &Stage {
        self.stages
            .last()
            .unwrap_or_else(|| panic!("{}: no FROM", self.file))
    }

    /// The numeric `USER uid:gid` of the final stage.
    fn user(&self) -> (u32, u32) {
        let u = self
            .last()
            .user
            .as_deref()
            .unwrap_or_else(|| panic!("{}: the final stage sets no USER", self.file));
        // Without a group, the group would come from the image's
        // /etc/passwd, and be 0 for a uid it does not list.
        let (uid, gid) = u
            .split_once(':')
            .unwrap_or_else(|| panic!("{}: USER {u} names no group", self.file));
        let num = |s: &str| {
            s.parse::<u32>().unwrap_or_else(|_| {
                panic!(
                    "{}: USER {u} is not numeric (Kubernetes cannot check runAsNonRoot against a name)",
                    self.file
                )
            })
        };
        (num(uid), num(gid))
    }

    fn workdir(&self) -> &str {
        self.last()
            .workdir
            .as_deref()
            .unwrap_or_else(|| panic!("{}: the final stage sets no WORKDIR", self.file))
    }

    fn entrypoint(&self) -> Vec<String> {
        self.last()
            .entrypoint
            .clone()
            .unwrap_or_else(|| panic!("{}: no ENTRYPOINT", self.file))
    }

    fn env(&self, key: &str) -> Option<&str> {
        self.last()
            .env
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The image's single `VOLUME`.
    fn volume(&self) -> &str {
        match self.last().volumes.as_slice() {
            [v] => v,
            other => panic!("{}: expected one VOLUME, found {other:?}", self.file),
        }
    }
}

/// The instructions of a Dockerfile: (keyword in capitals, the rest), with
/// continuation lines joined and comment lines dropped.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || t.is_empty() {
            continue;
        }
        if let Some(body) = t.strip_suffix('\\') {
            cur.push_str(body.trim_end());
            cur.push(' ');
            continue;
        }
        cur.push_str(t);
        let all = std::mem::take(&mut cur);
        let (k, rest) = all.split_once(char::is_whitespace).unwrap_or((&all, ""));
        out.push((k.to_ascii_uppercase(), rest.trim().to_string()));
    }
    out
}

fn parse_stages(text: &str) -> Vec<Stage> {
    let mut stages: Vec<Stage> = Vec::new();
    for (k, rest) in instructions(text) {
        if k == "FROM" {
            stages.push(Stage {
                from: rest.split_whitespace().next().unwrap_or_default().into(),
                ..Stage::default()
            });
            continue;
        }
        let Some(s) = stages.last_mut() else {
            assert!(k == "ARG", "{k} before the first FROM");
            continue;
        };
        match k.as_str() {
            "USER" => s.user = Some(rest),
            "ENTRYPOINT" => s.entrypoint = Some(exec_form("ENTRYPOINT", &rest)),
            "CMD" => s.cmd = Some(exec_form("CMD", &rest)),
            "ENV" => s.env.extend(key_values(&rest)),
            "LABEL" => s.labels.extend(key_values(&rest)),
            "WORKDIR" => {
                assert!(rest.starts_with('/'), "WORKDIR {rest} is not absolute");
                s.workdir = Some(rest);
            }
            "EXPOSE" => s.expose.extend(rest.split_whitespace().map(|p| {
                p.trim_end_matches("/tcp")
                    .parse::<u16>()
                    .unwrap_or_else(|_| panic!("EXPOSE {p}"))
            })),
            "VOLUME" => s.volumes.extend(exec_form("VOLUME", &rest)),
            "RUN" => s.runs.push(rest),
            _ => {}
        }
    }
    stages
}

/// A JSON array of strings (the exec form: no shell in between).
fn exec_form(what: &str, rest: &str) -> Vec<String> {
    assert!(
        rest.starts_with('['),
        "{what} {rest} is in shell form; use the exec form"
    );
    serde_json::from_str(rest).unwrap_or_else(|e| panic!("{what} {rest}: {e}"))
}

/// `k=v k2="v 2"` (ENV, LABEL), and the old `ENV k v`.
fn key_values(rest: &str) -> Vec<(String, String)> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let (mut quoted, mut chars) = (false, rest.chars());
    while let Some(c) = chars.next() {
        match c {
            '"' => quoted = !quoted,
            '\\' if quoted => cur.extend(chars.next()),
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    if words.first().is_some_and(|w| !w.contains('=')) {
        let (k, v) = words.split_first().expect("a key");
        return vec![(k.clone(), v.join(" "))];
    }
    words
        .into_iter()
        .map(|w| {
            let (k, v) = w.split_once('=').expect("key=value");
            (k.to_string(), v.to_string())
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Running a binary the way its image does

/// A file or directory of the host mounted into the image's root.
struct Mount {
    host: PathBuf,
    at: String,
    writable: bool,
}

/// How one process of an image is started: the image's entrypoint (or, as
/// `docker exec` does, another of its binaries), with what a deployment
/// adds.
struct Run<'a> {
    image: &'a Image,
    dir: PathBuf,
    command: Vec<String>,
    env: Vec<(String, String)>,
    mounts: Vec<Mount>,
}

impl<'a> Run<'a> {
    /// The image's `ENTRYPOINT` and `CMD`; temporary files under `dir`.
    fn new(image: &'a Image, dir: &Path) -> Run<'a> {
        let mut command = image.entrypoint();
        command.extend(image.last().cmd.clone().unwrap_or_default());
        Run {
            image,
            dir: dir.to_path_buf(),
            command,
            env: Vec::new(),
            mounts: Vec::new(),
        }
    }

    /// Arguments in place of `CMD` (a pod's `args`).
    fn args(mut self, args: &[&str]) -> Self {
        self.command = self.image.entrypoint();
        self.command.extend(args.iter().map(ToString::to_string));
        self
    }

    /// Another command of the image, as `docker exec` runs it.
    fn exec(mut self, command: &[&str]) -> Self {
        self.command = command.iter().map(ToString::to_string).collect();
        self
    }

    /// A variable a deployment sets (it replaces the image's).
    fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.to_string(), v.to_string()));
        self
    }

    /// A volume: `host` (owned by the image's user) at `at`, writable.
    fn volume(mut self, at: &str, host: &Path) -> Self {
        self.mounts.push(Mount {
            host: host.to_path_buf(),
            at: at.to_string(),
            writable: true,
        });
        self
    }

    /// A file or directory mounted read-only (a Secret or ConfigMap).
    fn read_only(mut self, at: &str, host: &Path) -> Self {
        self.mounts.push(Mount {
            host: host.to_path_buf(),
            at: at.to_string(),
            writable: false,
        });
        self
    }

    /// The environment the process gets: the base image's, the image's,
    /// then the deployment's.
    fn environment(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = Vec::new();
        let all = BASE_ENV
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .chain(self.image.last().env.iter().cloned())
            .chain(self.env.iter().cloned());
        for (k, v) in all {
            env.retain(|(e, _)| *e != k);
            env.push((k, v));
        }
        env
    }

    fn command(&self) -> (Command, TempDir) {
        let (uid, gid) = self.image.user();
        let root = TempDir::new_in(&self.dir, "image-root");
        let mut mounts: Vec<&Mount> = Vec::new();
        let shipped: Vec<Mount> = self
            .image
            .ships
            .iter()
            .map(|(at, bin)| Mount {
                host: bin.path(),
                at: (*at).to_string(),
                writable: false,
            })
            .collect();
        mounts.extend(shipped.iter());
        mounts.extend(self.mounts.iter());
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "--", "/bin/sh", "-c"])
            .arg(START_IN_IMAGE_ROOT)
            .arg("image-root")
            .arg(root.path())
            .arg(uid.to_string())
            .arg(gid.to_string())
            .arg(self.image.workdir())
            .arg(BASE_PASSWD);
        for m in mounts {
            assert!(
                m.at.starts_with('/')
                    && !SYSTEM_DIRS.iter().any(|d| Path::new(&m.at).starts_with(d)),
                "{} cannot be mounted in the image's root",
                m.at
            );
            cmd.arg(if m.writable { "rw" } else { "ro" })
                .arg(&m.host)
                .arg(&m.at);
        }
        cmd.arg("--")
            .args(&self.command)
            .env_clear()
            .envs(self.environment())
            .current_dir("/")
            .stdin(Stdio::null());
        (cmd, root)
    }

    /// Starts it; its stdout comes line by line, its stderr goes to a log.
    fn start(self) -> Container {
        let (mut cmd, root) = self.command();
        let log = self.dir.join(format!(
            "{}-{}.log",
            self.image.file.trim_end_matches(".Dockerfile"),
            LOGS.fetch_add(1, Ordering::Relaxed)
        ));
        let err = std::fs::File::create(&log).expect("create the log");
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {:?}: {e}", self.command));
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Container {
            child: Some(child),
            log,
            lines,
            root,
            workdir: self.image.workdir().to_string(),
            user: self.image.user(),
        }
    }

    /// Runs it to its end (at most [`START`]): (exit code, stdout,
    /// stderr).
    fn run(self) -> (Option<i32>, String, String) {
        let (mut cmd, _root) = self.command();
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {:?}: {e}", self.command));
        let drain = |r: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut s = String::new();
                if let Some(mut r) = r {
                    let _ = r.read_to_string(&mut s);
                }
                s
            })
        };
        let out = drain(child.stdout.take().map(|r| Box::new(r) as _));
        let err = drain(child.stderr.take().map(|r| Box::new(r) as _));
        let deadline = Instant::now() + START;
        let status = loop {
            if let Some(st) = child.try_wait().expect("wait") {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{:?} did not finish within {START:?}", self.command);
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let (out, err) = (out.join().unwrap(), err.join().unwrap());
        (status.code(), out, err)
    }
}

/// A process running in an image's root; killed on drop, and its mount
/// namespace with it.
struct Container {
    child: Option<Child>,
    log: PathBuf,
    lines: mpsc::Receiver<String>,
    /// Where the image's root is mounted (in the process's namespace only).
    root: TempDir,
    workdir: String,
    user: (u32, u32),
}

impl Container {
    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The next line it prints, within `timeout`.
    fn line(&self, timeout: Duration) -> String {
        self.lines
            .recv_timeout(timeout)
            .unwrap_or_else(|e| panic!("no line on stdout ({e}); stderr:\n{}", self.log()))
    }

    /// It runs as the image's user with no capability, no supplementary
    /// group and no way to gain privileges, in the image's working
    /// directory.
    fn assert_confined(&self) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("the process is running");
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .unwrap_or_default()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        let (uid, gid) = self.user;
        assert_eq!(
            field("Uid:"),
            format!("{uid} {uid} {uid} {uid}"),
            "{status}"
        );
        assert_eq!(
            field("Gid:"),
            format!("{gid} {gid} {gid} {gid}"),
            "{status}"
        );
        assert_eq!(field("Groups:"), "", "{status}");
        assert_eq!(field("CapEff:"), "0000000000000000", "{status}");
        assert_eq!(field("NoNewPrivs:"), "1", "{status}");
        // Seen from outside its namespace, the working directory is under
        // the mount point of its root.
        let cwd = std::fs::read_link(format!("/proc/{}/cwd", self.pid())).expect("cwd");
        assert_eq!(
            cwd,
            self.root.path().join(self.workdir.trim_start_matches('/')),
            "the working directory is the image's WORKDIR"
        );
    }

    /// Its environment, as the kernel holds it.
    fn environ(&self) -> Vec<(String, String)> {
        let raw = std::fs::read(format!("/proc/{}/environ", self.pid())).expect("environ");
        let mut env: Vec<(String, String)> = raw
            .split(|b| *b == 0)
            .filter(|e| !e.is_empty())
            .filter_map(|e| {
                let s = String::from_utf8_lossy(e);
                s.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect();
        env.sort();
        env
    }

    /// The names in a directory of the image, as the process sees it.
    fn ls(&self, dir: &str) -> Vec<String> {
        let p = format!("/proc/{}/root{dir}", self.pid());
        let mut names: Vec<String> = std::fs::read_dir(&p)
            .unwrap_or_else(|e| panic!("{p}: {e}"))
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// SIGTERM, as `docker stop` and kubelet send it; the exit code
    /// (`None` when it had to be killed 20 s later).
    fn stop(&mut self) -> Option<i32> {
        terminate(self.child.take()?)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A directory for a volume, owned by `user` with `mode`, as the image
/// creates it (and as a fresh volume mounted there inherits it).
fn volume_dir(dir: &Path, name: &str, (uid, gid): (u32, u32), mode: u32) -> PathBuf {
    let p = dir.join(name);
    std::fs::create_dir(&p).expect("create the volume");
    std::os::unix::fs::chown(&p, Some(uid), Some(gid)).expect("chown the volume");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    p
}

/// A file only `user` may read, in a directory of its own (a Secret
/// volume with `defaultMode: 0400`).
fn secret_file(dir: &Path, name: &str, content: &str, (uid, gid): (u32, u32)) -> PathBuf {
    let d = dir.join(format!("{name}-secret"));
    std::fs::create_dir(&d).expect("create the secret's directory");
    let p = d.join(name);
    std::fs::write(&p, content).expect("write the secret");
    std::os::unix::fs::chown(&p, Some(uid), Some(gid)).expect("chown the secret");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o400)).expect("chmod");
    p
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("{addr} has no port"))
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

// ---------------------------------------------------------------------------
// The Dockerfiles themselves

#[test]
fn every_dockerfile_passes_hadolint() {
    let hadolint = tool_binary("hadolint", "HADOLINT");
    for img in Image::all() {
        let o = Command::new(&hadolint)
            .arg("--no-color")
            .arg(&img.path)
            .current_dir(workspace())
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", hadolint.display()));
        assert!(
            o.status.success() && o.stdout.is_empty(),
            "hadolint {}: {}\n{}{}",
            img.file,
            o.status,
            stdout(&o),
            stderr(&o)
        );
    }
}

#[test]
fn the_images_share_a_base_a_user_and_the_workspace_toolchain() {
    let toolchain = std::fs::read_to_string(workspace().join("rust-toolchain.toml"))
        .expect("rust-toolchain.toml");
    let channel = toolchain
        .lines()
        .find_map(|l| l.trim().strip_prefix("channel"))
        .and_then(|v| v.split('"').nth(1))
        .expect("rust-toolchain.toml names a channel");
    let minor = channel.rsplit_once('.').map_or(channel, |(m, _)| m);
    let builder = format!("rust:{minor}-bookworm");
    let users: Vec<(u32, u32)> = Image::all().iter().map(Image::user).collect();
    for img in Image::all() {
        let f = img.file;
        let (build, last) = (&img.stages[0], img.last());
        assert_eq!(img.stages.len(), 2, "{f}: a build stage and the image");
        assert_eq!(
            build.from, builder,
            "{f}: builds with rust-toolchain.toml's Rust"
        );
        assert_eq!(last.from, BASE_IMAGE, "{f}");
        let (uid, gid) = img.user();
        assert!(uid != 0 && gid != 0, "{f}: runs as root");
        assert_eq!((uid, gid), users[0], "{f}: every image runs as one user");
        let title = last
            .labels
            .iter()
            .find(|(k, _)| k == "org.opencontainers.image.title");
        assert!(title.is_some(), "{f}: OCI labels");
        for k in ["description", "licenses", "source"] {
            let k = format!("org.opencontainers.image.{k}");
            assert!(last.labels.iter().any(|(l, _)| *l == k), "{f}: no {k}");
        }
        // The build compiles exactly what the image ships, in release mode,
        // and installs each where the image runs it.
        let run = build.runs.join("\n");
        assert!(run.contains("cargo build --locked --release"), "{f}: {run}");
        let bins = run.matches("--bin ").count();
        assert_eq!(bins, img.ships.len(), "{f}: builds only what it ships");
        for (at, bin) in &img.ships {
            assert!(run.contains(&format!("--bin {}", bin.name)), "{f}: {run}");
            assert!(run.contains(&format!("target/release/{}", bin.name)), "{f}");
            let dir = Path::new(at).parent().expect("a directory").display();
            assert!(run.contains(&format!("/out{dir}")), "{f}: installs {at}");
        }
        assert_eq!(
            img.entrypoint().first().map(String::as_str),
            Some(img.ships[0].0),
            "{f}: the entrypoint is the binary it ships"
        );
        // Every volume exists in the image owned by its user, so that a
        // fresh volume mounted there is writable.
        for v in &last.volumes {
            assert!(
                run.contains(&format!("-o {uid} -g {gid} /out{v}")),
                "{f}: VOLUME {v} is not created owned by {uid}:{gid}"
            );
        }
        // The ports it listens on by default are the ones it exposes.
        let listens: Vec<u16> = ["REKEY_LISTEN", "REKEY_METRICS_LISTEN"]
            .into_iter()
            .filter_map(|k| img.env(k))
            .map(|a| {
                assert!(
                    a.starts_with("0.0.0.0:"),
                    "{f}: {a} is unreachable from outside"
                );
                port_of(a)
            })
            .collect();
        assert_eq!(listens, last.expose, "{f}: EXPOSE and the listen addresses");
    }
    assert!(
        !workspace().join("deploy/Dockerfile.backend").exists(),
        "deploy/docker/backend.Dockerfile replaced deploy/Dockerfile.backend"
    );
}

#[test]
fn the_build_context_holds_the_workspace_and_no_local_data() {
    let ignore = std::fs::read_to_string(workspace().join(".dockerignore")).expect(".dockerignore");
    let rules: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(
        rules.first(),
        Some(&"*"),
        "an allow-list: everything is out first"
    );
    let cargo = std::fs::read_to_string(workspace().join("Cargo.toml")).expect("Cargo.toml");
    let members = cargo
        .split_once("members = [")
        .and_then(|(_, r)| r.split_once(']'))
        .map(|(m, _)| m)
        .expect("workspace members");
    let tops = members
        .split(',')
        .map(|m| m.trim().trim_matches('"'))
        .filter(|m| !m.is_empty())
        .map(|m| m.split('/').next().unwrap_or(m).to_string());
    for top in tops.chain(["Cargo.toml", "Cargo.lock", "rust-toolchain.toml"].map(String::from)) {
        let allowed = rules.iter().any(|r| {
            r.strip_prefix('!')
                .is_some_and(|r| r.trim_end_matches('/') == top)
        });
        assert!(allowed, "the build context lacks {top}");
    }
    for out in ["**/rekey-data/", "**/target/"] {
        assert!(rules.contains(&out), "the build context would take {out}");
    }
}

// ---------------------------------------------------------------------------
// The binaries, run as their images run them

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_runs_as_its_user_and_writes_only_its_data_volume() {
    let img = Image::backend();
    let dir = TempDir::new("image-backend");
    let data = volume_dir(dir.path(), "data", img.user(), 0o700);
    let (grpc, metrics) = (free_port(), free_port());
    let grpc_addr = format!("127.0.0.1:{grpc}");
    let metrics_addr = format!("127.0.0.1:{metrics}");
    let mut c = Run::new(&img, dir.path())
        .env("REKEY_LISTEN", &grpc_addr)
        .env("REKEY_METRICS_LISTEN", &metrics_addr)
        .volume(img.volume(), &data)
        .start();
    assert_eq!(
        c.line(START),
        format!("listening grpc={grpc_addr} metrics={metrics_addr}")
    );
    c.assert_confined();
    let mut want = Run::new(&img, dir.path())
        .env("REKEY_LISTEN", &grpc_addr)
        .env("REKEY_METRICS_LISTEN", &metrics_addr)
        .environment();
    want.sort();
    assert_eq!(
        c.environ(),
        want,
        "the image's environment and nothing else"
    );
    // The volume is the backend's default data directory, ./rekey-data,
    // where the CLI run in the working directory looks for the admin
    // token; a config file may still choose another.
    assert_eq!(img.volume(), format!("{}/rekey-data", img.workdir()));
    assert_eq!(img.env("REKEY_DATA_DIR"), None);

    // Everything it wrote is in the volume, its own and private; the
    // working directory holds nothing else.
    let (uid, gid) = img.user();
    let written = files_in(&data);
    for f in ["admin.token", "kek", "rekey.db"] {
        assert!(written.iter().any(|w| w == f), "no {f} in {written:?}");
    }
    for f in &written {
        let m = std::fs::metadata(data.join(f)).expect("metadata");
        assert_eq!((m.uid(), m.gid()), (uid, gid), "{f}");
        assert_eq!(m.mode() & 0o077, 0, "{f} is readable by others");
    }
    assert_eq!(c.ls(img.workdir()), ["rekey-data"]);

    // Kubernetes' probes: liveness is /livez on the metrics port,
    // readiness the gRPC health service on the API port (the backend
    // serves no /readyz).
    let (code, body) = http_request(&metrics_addr, "/livez", &[]);
    assert_eq!((code, body.trim()), (200, "ok"));
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{grpc_addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect to the API port");
    let health = tonic_health::pb::health_client::HealthClient::new(ch)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "rekey.v1.Rekey".into(),
        })
        .await
        .expect("grpc.health.v1")
        .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // `docker exec CONTAINER rekey ...`: the CLI the image ships, in the
    // working directory, finds the admin token by itself.
    let addr = format!("http://{grpc_addr}");
    let cli = |args: &[&str]| {
        let mut command = vec!["/usr/local/bin/rekey", "--addr", addr.as_str()];
        command.extend_from_slice(args);
        let (code, out, err) = Run::new(&img, dir.path())
            .exec(&command)
            .volume(img.volume(), &data)
            .run();
        assert_eq!(code, Some(0), "rekey {args:?}: {out}{err}");
        out
    };
    cli(&["create", "prod/api/jwt", "--kind", "random"]);
    let status = cli(&["status", "prod/api/jwt"]);
    assert!(status.contains("prod/api/jwt"), "{status}");

    assert_eq!(c.stop(), Some(0), "SIGTERM; stderr:\n{}", c.log());
}

#[test]
fn the_backend_cannot_write_outside_its_volume() {
    let img = Image::backend();
    let dir = TempDir::new("image-backend-ro");
    let data = volume_dir(dir.path(), "data", img.user(), 0o700);
    // A data directory in the working directory but not on the volume:
    // the read-only root refuses it, and the backend says where.
    let elsewhere = format!("{}/elsewhere", img.workdir());
    let (code, out, err) = Run::new(&img, dir.path())
        .env("REKEY_LISTEN", &format!("127.0.0.1:{}", free_port()))
        .env(
            "REKEY_METRICS_LISTEN",
            &format!("127.0.0.1:{}", free_port()),
        )
        .env("REKEY_DATA_DIR", &elsewhere)
        .volume(img.volume(), &data)
        .run();
    assert!(code.is_some_and(|c| c != 0), "it started: {out}{err}");
    assert!(err.contains(&elsewhere), "{err}");
    assert!(err.contains("Read-only file system"), "{err}");
    assert!(files_in(&data).is_empty(), "{:?}", files_in(&data));
}

#[test]
fn the_sidecar_runs_as_its_user_and_delivers_into_its_output_volume() {
    let img = Image::sidecar();
    let dir = TempDir::new("image-sidecar");
    let b = Backend::start(dir.path(), BackendOpts::default());
    b.cli_json(&["create", "prod/api/jwt", "--kind", "random"]);
    let value = || {
        b.cli_json(&["get", "prod/api/jwt", "--reveal"])["value"]
            .as_str()
            .expect("a value")
            .to_string()
    };
    let user = img.user();
    let out = volume_dir(dir.path(), "out", user, 0o755);
    let token = secret_file(dir.path(), "token", &b.token(), user);
    let token_dir = token.parent().expect("the secret's directory");
    let listen = format!("127.0.0.1:{}", free_port());
    let target = format!("{}/jwt", img.volume());
    let mut c = Run::new(&img, dir.path())
        .args(&[
            "--backend",
            &b.grpc,
            "--token-file",
            "/run/secrets/rekey/token",
            "--secret",
            &format!("prod/api/jwt:{target}"),
        ])
        .env("REKEY_LISTEN", &listen)
        .volume(img.volume(), &out)
        .read_only("/run/secrets/rekey", token_dir)
        .start();
    assert_eq!(c.line(START), format!("listening http={listen}"));
    c.assert_confined();

    let file = out.join("jwt");
    wait_for("the secret file and /readyz", START, || {
        file.exists() && http_request(&listen, "/readyz", &[]).0 == 200
    });
    assert_eq!(std::fs::read_to_string(&file).expect("the secret"), value());
    let m = std::fs::metadata(&file).expect("metadata");
    assert_eq!((m.uid(), m.gid()), user, "written as the image's user");
    assert_eq!(m.mode() & 0o777, 0o400);
    assert_eq!(http_request(&listen, "/livez", &[]).0, 200);

    // A rotation reaches the file through the same volume.
    b.cli_json(&["rotate", "prod/api/jwt"]);
    let rotated = value();
    wait_for("the rotated value", Duration::from_secs(20), || {
        std::fs::read_to_string(&file).is_ok_and(|v| v == rotated)
    });
    assert_eq!(c.stop(), Some(0), "SIGTERM; stderr:\n{}", c.log());
}

#[test]
fn the_sidecar_refuses_an_output_outside_its_volume() {
    let img = Image::sidecar();
    let dir = TempDir::new("image-sidecar-ro");
    let user = img.user();
    let out = volume_dir(dir.path(), "out", user, 0o755);
    let token = secret_file(dir.path(), "token", "rk_image_test_token_0123456789", user);
    let token_dir = token.parent().expect("the secret's directory");
    let check = |target: &str| {
        Run::new(&img, dir.path())
            .args(&[
                "--backend",
                "http://127.0.0.1:7700",
                "--token-file",
                "/run/secrets/rekey/token",
                "--secret",
                &format!("prod/api/jwt:{target}"),
                "--check-config",
            ])
            .volume(img.volume(), &out)
            .read_only("/run/secrets/rekey", token_dir)
            .run()
    };
    let (code, stdout, stderr) = check(&format!("{}/jwt", img.volume()));
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    // Its working directory, like the rest of the root, is read-only.
    let outside = format!("{}/jwt", img.workdir().trim_end_matches('/'));
    let (code, stdout, stderr) = check(&outside);
    assert_eq!(code, Some(2), "{stdout}{stderr}");
    assert!(stderr.contains("Read-only file system"), "{stderr}");
    assert!(files_in(&out).is_empty());
}

#[test]
fn the_lambda_bootstrap_checks_its_settings_as_its_user() {
    let img = Image::lambda();
    let dir = TempDir::new("image-lambda");
    let (code, out, err) = Run::new(&img, dir.path()).args(&["--version"]).run();
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(
        out.trim(),
        format!("rekey-lambda {}", env!("CARGO_PKG_VERSION"))
    );
    let (code, out, err) = Run::new(&img, dir.path())
        .args(&["--check-config"])
        .env("REKEY_KIND", "random")
        .run();
    assert_eq!(code, Some(0), "{out}{err}");
    // The image sets no REKEY_* variable of its own, so the function's
    // environment is the whole configuration.
    let (code, out, err) = Run::new(&img, dir.path())
        .args(&["--check-config"])
        .env("REKEY_KIND", "random")
        .env("REKEY_GROUP_ROLE", "app")
        .run();
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(err.contains("REKEY_GROUP_ROLE"), "{err}");
}

#[test]
fn the_lambda_bootstrap_serves_the_runtime_api_as_its_user() {
    let img = Image::lambda();
    let dir = TempDir::new("image-lambda-run");
    let rt = LambdaRuntime::start();
    let mut run = Run::new(&img, dir.path())
        .env("REKEY_KIND", "random")
        .env("AWS_REGION", "eu-west-1")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        // Nothing listens there: the invocation fails at Secrets Manager,
        // after the function took it.
        .env(
            "AWS_ENDPOINT_URL",
            &format!("http://127.0.0.1:{}", free_port()),
        );
    for (k, v) in rt.function_env() {
        run = run.env(&k, &v);
    }
    let c = run.start();
    wait_for("the first poll of the Runtime API", START, || {
        rt.first_poll().is_some()
    });
    c.assert_confined();
    let event = serde_json::json!({
        "Step": "createSecret",
        "SecretId": "svc/agent-token",
        "ClientRequestToken": "11111111-1111-4111-8111-111111111111",
    });
    let e = rt
        .invoke(event, START)
        .expect_err("there is no Secrets Manager to answer");
    assert_eq!(
        e.error_type,
        "SecretsManagerError",
        "{e:?}; log:\n{}",
        c.log()
    );
    assert_eq!(c.ls(img.workdir()), Vec::<String>::new());
}
