//! The workspace's binaries, as the tests and benchmarks run them.
//!
//! A test of one package cannot name another package's binary through
//! `env!("CARGO_BIN_EXE_...")`, and whatever file happens to sit in the
//! target directory may be older than the sources (`cargo test -p
//! rekey-e2e` builds no binary of another package). So a [`Binary`] is
//! looked up in the target directory of the running test or benchmark (the
//! same profile), and checked against cargo's dep-info for it
//! (`target/<profile>/<bin>.d`): it is fresh when no file listed there is
//! newer than it. A missing or stale binary is built once per process with
//! `cargo build -p <package> --bin <bin>` in that profile and checked
//! again; if it is still not fresh, the test fails and says why.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

/// A binary of the workspace: the package that builds it and its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binary {
    pub package: &'static str,
    pub name: &'static str,
}

/// The server.
pub const BACKEND: Binary = Binary {
    package: "rekey-backend",
    name: "rekey-backend",
};
/// The operator CLI.
pub const CLI: Binary = Binary {
    package: "rekey-cli",
    name: "rekey",
};
/// The per-pod agent.
pub const SIDECAR: Binary = Binary {
    package: "rekey-sidecar",
    name: "rekey-sidecar",
};
/// The rotation function AWS Secrets Manager calls (a Lambda bootstrap).
pub const LAMBDA: Binary = Binary {
    package: "rekey-backend",
    name: "rekey-lambda",
};

/// The OpenBao / Vault secrets-engine plugin.
pub const VAULT_PLUGIN: Binary = Binary {
    package: "rekey-vault-plugin",
    name: "rekey-vault-plugin",
};

/// What each binary resolved to in this process (a path, or why not).
static RESOLVED: Mutex<BTreeMap<&'static str, Result<PathBuf, String>>> =
    Mutex::new(BTreeMap::new());

impl Binary {
    /// The path of a fresh build of this binary, built first if needed.
    ///
    /// # Panics
    ///
    /// When it cannot be found or built fresh; the message says why.
    #[must_use]
    pub fn path(&self) -> PathBuf {
        // Held across the build: two threads of one test process never run
        // cargo at the same time.
        let mut resolved = RESOLVED.lock().unwrap_or_else(PoisonError::into_inner);
        let r = resolved
            .entry(self.name)
            .or_insert_with(|| self.resolve())
            .clone();
        drop(resolved);
        r.unwrap_or_else(|e| panic!("{e}"))
    }

    fn resolve(&self) -> Result<PathBuf, String> {
        let layout = Layout::of_current_exe()?;
        let bin = layout.profile_dir.join(self.name);
        let dep_info = layout.profile_dir.join(format!("{}.d", self.name));
        let why = match freshness(&bin, &dep_info) {
            Freshness::Fresh => return Ok(bin),
            Freshness::Stale(why) => why,
        };
        eprintln!(
            "rekey-testkit: {} needs a build ({why}): {}",
            self.name,
            layout.describe_build(self)
        );
        let status = layout
            .build_command(self)
            .status()
            .map_err(|e| format!("cannot run {}: {e}", layout.describe_build(self)))?;
        if !status.success() {
            return Err(format!(
                "{} failed ({status}); the tests need a fresh {}",
                layout.describe_build(self),
                self.name
            ));
        }
        match freshness(&bin, &dep_info) {
            Freshness::Fresh => Ok(bin),
            Freshness::Stale(why) => Err(format!(
                "{} is still not fresh after {}: {why}",
                bin.display(),
                layout.describe_build(self)
            )),
        }
    }
}

/// Whether a binary may be used as the build of the current sources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Freshness {
    Fresh,
    /// Missing, or older than a file it was built from; the reason.
    Stale(String),
}

/// Compares `bin` with every file its dep-info lists: fresh when the
/// binary, its dep-info and every listed file exist and none of those files
/// is newer than the binary.
#[must_use]
pub fn freshness(bin: &Path, dep_info: &Path) -> Freshness {
    let stale = |why: String| Freshness::Stale(why);
    let Some(built) = modified(bin) else {
        return stale(format!("{} does not exist", bin.display()));
    };
    let Ok(text) = std::fs::read_to_string(dep_info) else {
        return stale(format!("its dep-info {} is missing", dep_info.display()));
    };
    let sources = dep_info_sources(&text);
    if sources.is_empty() {
        return stale(format!("its dep-info {} lists no file", dep_info.display()));
    }
    for src in sources {
        match modified(&src) {
            None => return stale(format!("{} (a source) no longer exists", src.display())),
            Some(t) if t > built => return stale(format!("{} is newer", src.display())),
            Some(_) => {}
        }
    }
    Freshness::Fresh
}

fn modified(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// The files a Makefile-style dep-info (`target: dep dep ...`, spaces in
/// paths escaped as `\ `) lists as prerequisites.
#[must_use]
pub fn dep_info_sources(text: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for line in text.lines() {
        let deps = match line.find(": ") {
            Some(i) => &line[i + 2..],
            None => continue,
        };
        let mut cur = String::new();
        let mut chars = deps.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some(' ') => cur.push(' '),
                    Some(other) => {
                        cur.push('\\');
                        cur.push(other);
                    }
                    None => cur.push('\\'),
                },
                ' ' => {
                    if !cur.is_empty() {
                        out.push(PathBuf::from(std::mem::take(&mut cur)));
                    }
                }
                c => cur.push(c),
            }
        }
        if !cur.is_empty() {
            out.push(PathBuf::from(cur));
        }
    }
    out
}

/// Where the running test executable was built, and how to build into the
/// same place.
struct Layout {
    /// `target/debug`, `target/release`, or `target/<triple>/<profile>`.
    profile_dir: PathBuf,
    target_dir: PathBuf,
    /// The cargo profile whose output goes to `profile_dir`.
    profile: String,
    /// `--target`, when the target dir has a triple level.
    triple: Option<String>,
}

impl Layout {
    fn of_current_exe() -> Result<Layout, String> {
        let exe = std::env::current_exe()
            .map_err(|e| format!("cannot locate the test executable: {e}"))?;
        let mut dir = exe
            .parent()
            .ok_or_else(|| format!("{} has no parent directory", exe.display()))?;
        // Tests and benchmarks are built into <profile>/deps.
        if dir.file_name().is_some_and(|n| n == "deps") {
            dir = dir.parent().unwrap_or(dir);
        }
        Layout::of_profile_dir(dir)
    }

    fn of_profile_dir(dir: &Path) -> Result<Layout, String> {
        let name = |p: &Path| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let dir_name = name(dir);
        let profile = match dir_name.as_str() {
            "debug" => "dev".to_string(),
            // `cargo bench` builds with the bench profile, which inherits
            // release and shares its directory.
            other => other.to_string(),
        };
        let parent = dir
            .parent()
            .ok_or_else(|| format!("{} has no parent directory", dir.display()))?;
        // cargo marks the root of a target directory with CACHEDIR.TAG
        // when it creates it, and keeps .rustc_info.json there (the only
        // mark when the directory existed before cargo's first build).
        let is_root =
            |d: &Path| d.join("CACHEDIR.TAG").exists() || d.join(".rustc_info.json").exists();
        let (target_dir, triple) = if is_root(parent) {
            (parent.to_path_buf(), None)
        } else {
            let root = parent.parent().filter(|r| is_root(r)).ok_or_else(|| {
                format!("{} is not inside a cargo target directory", dir.display())
            })?;
            (root.to_path_buf(), Some(name(parent)))
        };
        Ok(Layout {
            profile_dir: dir.to_path_buf(),
            target_dir,
            profile,
            triple,
        })
    }

    fn build_command(&self, bin: &Binary) -> Command {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.arg("build")
            .arg("--manifest-path")
            .arg(workspace_manifest())
            .args(["-p", bin.package, "--bin", bin.name, "--profile"])
            .arg(&self.profile)
            .arg("--target-dir")
            .arg(&self.target_dir);
        if let Some(t) = &self.triple {
            cmd.args(["--target", t]);
        }
        without_package_vars(&mut cmd);
        cmd
    }

    fn describe_build(&self, bin: &Binary) -> String {
        format!(
            "cargo build -p {} --bin {} --profile {}{}",
            bin.package,
            bin.name,
            self.profile,
            self.triple
                .as_deref()
                .map(|t| format!(" --target {t}"))
                .unwrap_or_default()
        )
    }
}

/// Clears what cargo told the test about its own package from a command
/// that runs cargo. cargo describes the test's package to the test process
/// (`CARGO_PKG_NAME`, `CARGO_MANIFEST_DIR`, ...); passed on, they would
/// count as changed inputs of build scripts that watch them (ring's does),
/// and cargo would rebuild half the dependency tree.
pub fn without_package_vars(cmd: &mut Command) -> &mut Command {
    for (k, _) in std::env::vars_os() {
        if k.to_str().is_some_and(is_package_var) {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// Whether cargo sets `var` to describe the package of the process it
/// runs (rather than taking it from the user's configuration).
fn is_package_var(var: &str) -> bool {
    var.starts_with("CARGO_PKG_")
        || matches!(
            var,
            "CARGO_MANIFEST_DIR"
                | "CARGO_MANIFEST_PATH"
                | "CARGO_MANIFEST_LINKS"
                | "CARGO_CRATE_NAME"
                | "CARGO_BIN_NAME"
                | "CARGO_PRIMARY_PACKAGE"
                | "CARGO_TARGET_TMPDIR"
                | "CARGO_RUSTC_CURRENT_DIR"
        )
}

/// The workspace's Cargo.toml (this crate lives in `tests/testkit`).
fn workspace_manifest() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn touch(p: &Path, at: SystemTime) {
        std::fs::write(p, b"x").unwrap();
        std::fs::File::options()
            .write(true)
            .open(p)
            .unwrap()
            .set_modified(at)
            .unwrap();
    }

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn dir(tag: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("rekey-testkit-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }

    #[test]
    fn dep_info_lists_sources_with_escaped_spaces() {
        let text = "/t/debug/rekey: /src/a.rs /src/my\\ dir/b.rs  /src/c.rs\n\n/src/a.rs:\n";
        assert_eq!(
            dep_info_sources(text),
            [
                PathBuf::from("/src/a.rs"),
                PathBuf::from("/src/my dir/b.rs"),
                PathBuf::from("/src/c.rs")
            ]
        );
        assert!(dep_info_sources("").is_empty());
    }

    #[test]
    fn a_binary_is_fresh_until_a_source_is_newer() {
        let d = dir("fresh");
        let t0 = SystemTime::now() - Duration::from_hours(1);
        let (src, bin, info) = (d.0.join("main rs"), d.0.join("bin"), d.0.join("bin.d"));
        touch(&src, t0);
        touch(&bin, t0 + Duration::from_mins(1));
        std::fs::write(
            &info,
            format!(
                "{}: {}\n",
                bin.display(),
                src.display().to_string().replace(' ', "\\ ")
            ),
        )
        .unwrap();
        assert_eq!(freshness(&bin, &info), Freshness::Fresh);

        // Same time as the binary: still fresh (cargo built it from that).
        touch(&src, t0 + Duration::from_mins(1));
        assert_eq!(freshness(&bin, &info), Freshness::Fresh);

        touch(&src, t0 + Duration::from_mins(2));
        match freshness(&bin, &info) {
            Freshness::Stale(why) => assert!(why.ends_with("main rs is newer"), "{why}"),
            Freshness::Fresh => panic!("a newer source must make the binary stale"),
        }
    }

    #[test]
    fn a_missing_binary_dep_info_or_source_is_stale() {
        let d = dir("missing");
        let t0 = SystemTime::now() - Duration::from_hours(1);
        let (src, bin, info) = (d.0.join("a.rs"), d.0.join("bin"), d.0.join("bin.d"));
        let stale = |why: &str| {
            let f = freshness(&bin, &info);
            assert!(
                matches!(&f, Freshness::Stale(w) if w.contains(why)),
                "{f:?}, expected {why:?}"
            );
        };
        stale("does not exist");
        touch(&bin, t0);
        stale("dep-info");
        std::fs::write(&info, format!("{}:\n", bin.display())).unwrap();
        stale("lists no file");
        std::fs::write(&info, format!("{}: {}\n", bin.display(), src.display())).unwrap();
        stale("no longer exists");
        touch(&src, t0);
        assert_eq!(freshness(&bin, &info), Freshness::Fresh);
    }

    #[test]
    fn the_profile_and_target_dir_come_from_the_executable_location() {
        let d = dir("layout");
        std::fs::write(d.0.join("CACHEDIR.TAG"), "").unwrap();
        let l = Layout::of_profile_dir(&d.0.join("debug")).unwrap();
        assert_eq!(l.profile, "dev");
        assert_eq!(l.target_dir, d.0);
        assert_eq!(l.triple, None);
        let l = Layout::of_profile_dir(&d.0.join("release")).unwrap();
        assert_eq!(l.profile, "release");
        let l = Layout::of_profile_dir(&d.0.join("x86_64-unknown-linux-gnu/debug")).unwrap();
        assert_eq!(l.target_dir, d.0);
        assert_eq!(l.triple.as_deref(), Some("x86_64-unknown-linux-gnu"));
        assert_eq!(
            l.describe_build(&SIDECAR),
            "cargo build -p rekey-sidecar --bin rekey-sidecar --profile dev --target x86_64-unknown-linux-gnu"
        );
        assert!(Layout::of_profile_dir(Path::new("/nowhere/debug")).is_err());
    }

    #[test]
    fn the_test_package_description_is_not_passed_to_cargo() {
        assert!(is_package_var("CARGO_PKG_NAME"));
        assert!(is_package_var("CARGO_MANIFEST_DIR"));
        assert!(!is_package_var("CARGO_HOME"));
        assert!(!is_package_var("CARGO_TARGET_DIR"));
        assert!(!is_package_var("CARGO_PROFILE_DEV_DEBUG"));
    }
}
