//! Atomic writes: an app that reads a file at any moment sees either the
//! old content or the new, never a mix.
//!
//! A plain file is written to a temporary file in the same directory,
//! fsynced, then renamed over the target. A directory is updated the way
//! kubelet updates Secret volumes: a new timestamped `..<time>` directory
//! holds every file, a `..data` symlink is swapped to it with one rename,
//! and each visible name is a symlink through `..data`.
//!
//! Output directories usually sit in a volume the app's container can
//! write too. Whoever can write there can swap a directory on the way to
//! an output for a symlink, and have the sidecar (often with more rights
//! than the app: it may `chown`) write a secret, or replace a file, where
//! the link points. So the directory is opened once per write, one
//! component at a time from `/` without following any symlink, and
//! everything after that happens relative to that open directory; a
//! symlink found on the way fails the write ([`Error::SymlinkedDir`])
//! unless the config allows symlinked directories ([`Dirs`]). Inside a
//! kubelet-style directory nothing is followed either: `..data` must name
//! a generation beside it, and only regular files are carried over.

use std::ffi::{CStr, OsStr};
use std::fs::{File, Permissions};
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

use crate::error::Error;

const DATA: &str = "..data";

/// How the directory of an output is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dirs {
    /// No symlink anywhere on the way from `/` (the default).
    NoSymlinks,
    /// Symlinks are followed (`allow_symlinked_dirs = true`).
    FollowSymlinks,
}

fn unique_suffix() -> String {
    let r = rekey_keyring::random_bytes(6)
        .map(|b| hex::encode(b.expose()))
        .unwrap_or_default();
    format!("{}-{r}", std::process::id())
}

/// The first directory on the way from `/` to `dir` (`dir` included)
/// that is a symlink. A part that does not exist ends the search: the
/// caller reports a missing directory on its own.
///
/// # Errors
/// The current directory cannot be read (for a relative `dir`), or a part
/// cannot be examined.
pub fn first_symlink(dir: &Path) -> io::Result<Option<PathBuf>> {
    let abs = std::path::absolute(dir)?;
    let mut at = PathBuf::new();
    for c in abs.components() {
        at.push(c);
        if !matches!(c, Component::Normal(_)) {
            continue;
        }
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => return Ok(Some(at)),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// Opens `dir` for writing entries into it. `path` is the output, for
/// messages.
fn open_dir(dir: &Path, dirs: Dirs, path: &Path) -> Result<OwnedFd, Error> {
    let failed = |reason: io::Error| Error::Write {
        path: path.to_path_buf(),
        reason,
    };
    let read = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    if dirs == Dirs::FollowSymlinks {
        return rustix::fs::open(dir, read, Mode::empty()).map_err(|e| failed(e.into()));
    }
    let abs = std::path::absolute(dir).map_err(failed)?;
    let parts: Vec<&OsStr> = abs
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n),
            Component::ParentDir => Some(OsStr::new("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect();
    // Every part but the last is only passed through (O_PATH needs no
    // read permission); the last is read, for fsync.
    let mut fd = rustix::fs::open(
        "/",
        if parts.is_empty() {
            read
        } else {
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC
        },
        Mode::empty(),
    )
    .map_err(|e| failed(e.into()))?;
    let mut at = PathBuf::from("/");
    for (i, part) in parts.iter().enumerate() {
        at.push(part);
        let flags = if i + 1 == parts.len() {
            read
        } else {
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC
        } | OFlags::NOFOLLOW;
        fd = match rustix::fs::openat(&fd, *part, flags, Mode::empty()) {
            Ok(next) => next,
            Err(e) => {
                let is_link = rustix::fs::statat(&fd, *part, AtFlags::SYMLINK_NOFOLLOW)
                    .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink);
                return Err(if is_link {
                    Error::SymlinkedDir {
                        path: path.to_path_buf(),
                        dir: at,
                    }
                } else {
                    failed(e.into())
                });
            }
        };
    }
    Ok(fd)
}

/// Creates `name` in `dir` with `data`, never through a symlink.
fn write_new(
    dir: &OwnedFd,
    name: &str,
    data: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> io::Result<()> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode),
    )?;
    let mut f = File::from(fd);
    f.write_all(data)?;
    // `mode` on open is filtered by the umask; set it exactly.
    f.set_permissions(Permissions::from_mode(mode))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
    }
    f.sync_all()
}

/// Replaces `path` with `data` atomically.
///
/// # Errors
/// [`Error::SymlinkedDir`] when a directory on the way is a symlink and
/// `dirs` does not allow it; [`Error::Write`] for anything else.
pub fn write_file(
    path: &Path,
    data: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
    dirs: Dirs,
) -> Result<(), Error> {
    let failed = |reason: io::Error| Error::Write {
        path: path.to_path_buf(),
        reason,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| failed(io::Error::new(io::ErrorKind::InvalidInput, "no file name")))?;
    let dir_fd = open_dir(dir, dirs, path)?;
    let tmp = format!(".{}.rekey-{}", name.to_string_lossy(), unique_suffix());
    // A rename replaces whatever `name` is, a symlink included, and never
    // writes through it.
    let r = write_new(&dir_fd, &tmp, data, mode, owner)
        .and_then(|()| rustix::fs::renameat(&dir_fd, &tmp, &dir_fd, name).map_err(Into::into));
    if let Err(e) = r {
        let _ = rustix::fs::unlinkat(&dir_fd, &tmp, AtFlags::empty());
        return Err(failed(e));
    }
    rustix::fs::fsync(&dir_fd).map_err(|e| failed(e.into()))
}

/// The generation `..data` points to, when it is one: a name beside it
/// that starts with `..`, not `..data` itself, `.` or `..`.
fn generation_of(target: &CStr) -> Option<String> {
    let t = target.to_str().ok()?;
    let ok = t.len() > 2
        && t.starts_with("..")
        && !t.contains('/')
        && t != DATA
        && !t.starts_with("..data_tmp");
    ok.then(|| t.to_string())
}

/// Copies the regular file `name` from `from` into `to` with its mode and
/// owner. Anything else (a symlink, a FIFO, a directory) is left behind:
/// a generation holds only what the sidecar wrote.
fn carry_over(from: &OwnedFd, to: &OwnedFd, name: &CStr) -> io::Result<()> {
    // NONBLOCK: opening a FIFO must not wait for a writer.
    let src = match rustix::fs::openat(
        from,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => File::from(fd),
        Err(Errno::LOOP) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let meta = src.metadata()?;
    if !meta.is_file() {
        return Ok(());
    }
    let mode = meta.mode() & 0o777;
    let dst = rustix::fs::openat(
        to,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode),
    )?;
    let mut dst = File::from(dst);
    io::copy(&mut &src, &mut dst)?;
    dst.set_permissions(Permissions::from_mode(mode))?;
    let mine = dst.metadata()?;
    if (mine.uid(), mine.gid()) != (meta.uid(), meta.gid()) {
        std::os::unix::fs::fchown(&dst, Some(meta.uid()), Some(meta.gid()))?;
    }
    dst.sync_all()
}

/// Removes a generation directory and the files in it (best effort: what
/// is left is harmless and removed with a later generation's cleanup).
fn remove_generation(dir: &OwnedFd, name: &str) {
    if let Ok(g) = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) && let Ok(entries) = rustix::fs::Dir::read_from(&g)
    {
        for e in entries.flatten() {
            let n = e.file_name();
            if n.to_bytes() != b"." && n.to_bytes() != b".." {
                let _ = rustix::fs::unlinkat(&g, n, AtFlags::empty());
            }
        }
    }
    let _ = rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR);
}

/// Updates one file in a kubelet-style directory; the other files in it
/// are carried over into the new generation.
///
/// # Errors
/// [`Error::SymlinkedDir`] when a directory on the way is a symlink and
/// `dirs` does not allow it; [`Error::DataLink`] when `..data` does not
/// name a generation in `dir`; [`Error::Write`] for anything else.
pub fn write_in_data_dir(
    dir: &Path,
    name: &str,
    data: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
    dirs: Dirs,
) -> Result<(), Error> {
    let path = dir.join(name);
    let failed = |reason: io::Error| Error::Write {
        path: path.clone(),
        reason,
    };
    let dir_fd = open_dir(dir, dirs, &path)?;
    let generation = format!("..{}", unique_suffix());
    rustix::fs::mkdirat(&dir_fd, &generation, Mode::from_raw_mode(0o755))
        .map_err(|e| failed(e.into()))?;
    let result = (|| -> Result<(), Error> {
        let io = |e: Errno| failed(e.into());
        let gen_fd = rustix::fs::openat(
            &dir_fd,
            &generation,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(io)?;
        rustix::fs::fchmod(&gen_fd, Mode::from_raw_mode(0o755)).map_err(io)?;
        let old_gen = match rustix::fs::readlinkat(&dir_fd, DATA, Vec::new()) {
            Ok(target) => Some(generation_of(&target).ok_or_else(|| Error::DataLink {
                dir: dir.to_path_buf(),
            })?),
            Err(Errno::NOENT) => None,
            // Not a symlink.
            Err(Errno::INVAL) => {
                return Err(Error::DataLink {
                    dir: dir.to_path_buf(),
                });
            }
            Err(e) => return Err(io(e)),
        };
        if let Some(old) = &old_gen {
            let old_fd = rustix::fs::openat(
                &dir_fd,
                old.as_str(),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| match e {
                Errno::LOOP | Errno::NOTDIR => Error::DataLink {
                    dir: dir.to_path_buf(),
                },
                e => io(e),
            })?;
            for entry in rustix::fs::Dir::read_from(&old_fd).map_err(io)? {
                let entry = entry.map_err(io)?;
                let n = entry.file_name();
                if n.to_bytes() == b"." || n.to_bytes() == b".." || n.to_bytes() == name.as_bytes()
                {
                    continue;
                }
                carry_over(&old_fd, &gen_fd, n).map_err(&failed)?;
            }
        }
        write_new(&gen_fd, name, data, mode, owner).map_err(&failed)?;
        rustix::fs::fsync(&gen_fd).map_err(io)?;
        let tmp_link = format!("..data_tmp-{}", unique_suffix());
        rustix::fs::symlinkat(generation.as_str(), &dir_fd, tmp_link.as_str()).map_err(io)?;
        if let Err(e) = rustix::fs::renameat(&dir_fd, tmp_link.as_str(), &dir_fd, DATA) {
            let _ = rustix::fs::unlinkat(&dir_fd, tmp_link.as_str(), AtFlags::empty());
            return Err(io(e));
        }
        // The visible name must be the link through ..data, and nothing
        // else: a link someone pointed elsewhere is put back.
        let through = format!("{DATA}/{name}");
        let visible_ok = rustix::fs::readlinkat(&dir_fd, name, Vec::new())
            .is_ok_and(|t| t.to_bytes() == through.as_bytes());
        if !visible_ok {
            let tmp = format!(".{name}.rekey-{}", unique_suffix());
            rustix::fs::symlinkat(through.as_str(), &dir_fd, tmp.as_str()).map_err(io)?;
            if let Err(e) = rustix::fs::renameat(&dir_fd, tmp.as_str(), &dir_fd, name) {
                let _ = rustix::fs::unlinkat(&dir_fd, tmp.as_str(), AtFlags::empty());
                return Err(io(e));
            }
        }
        rustix::fs::fsync(&dir_fd).map_err(io)?;
        if let Some(old) = old_gen {
            remove_generation(&dir_fd, &old);
        }
        Ok(())
    })();
    if result.is_err() {
        remove_generation(&dir_fd, &generation);
    }
    result
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::symlink;

    use super::*;

    fn tmp() -> PathBuf {
        let d = std::env::temp_dir().join(format!("rekey-sc-write-{}", unique_suffix()));
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn file_is_replaced_with_its_mode() {
        let d = tmp();
        let p = d.join("secret");
        write_file(&p, b"one", 0o400, None, Dirs::NoSymlinks).unwrap();
        write_file(&p, b"two", 0o440, None, Dirs::NoSymlinks).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o440
        );
        let leftovers: Vec<_> = fs::read_dir(&d).unwrap().flatten().collect();
        assert_eq!(leftovers.len(), 1, "no temporary files left behind");
    }

    #[test]
    fn data_dir_swaps_and_keeps_other_files() {
        let d = tmp();
        let w = |name: &str, data: &[u8]| {
            write_in_data_dir(&d, name, data, 0o400, None, Dirs::NoSymlinks).unwrap();
        };
        w("a", b"a1");
        w("b", b"b1");
        w("a", b"a2");
        assert_eq!(fs::read(d.join("a")).unwrap(), b"a2");
        assert_eq!(fs::read(d.join("b")).unwrap(), b"b1");
        assert_eq!(
            fs::metadata(d.join("b")).unwrap().permissions().mode() & 0o777,
            0o400,
            "a carried-over file keeps its mode"
        );
        assert!(
            fs::symlink_metadata(d.join("a"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        let gens: Vec<_> = fs::read_dir(&d)
            .unwrap()
            .flatten()
            .filter(|e| {
                let n = e.file_name().to_string_lossy().to_string();
                n.starts_with("..") && n != DATA
            })
            .collect();
        assert_eq!(gens.len(), 1, "old generations are removed");
    }

    #[test]
    fn a_symlinked_directory_is_not_followed_unless_allowed() {
        let d = tmp();
        let real = d.join("real");
        fs::create_dir(&real).unwrap();
        symlink(&real, d.join("link")).unwrap();
        fs::create_dir(real.join("sub")).unwrap();

        // The parent itself, and a directory further up.
        for (path, link) in [
            (d.join("link/secret"), d.join("link")),
            (d.join("link/sub/secret"), d.join("link")),
        ] {
            let e = write_file(&path, b"v", 0o400, None, Dirs::NoSymlinks).unwrap_err();
            assert!(
                matches!(&e, Error::SymlinkedDir { dir, .. } if *dir == link),
                "{e:?}"
            );
            assert_eq!(
                e.to_string(),
                format!(
                    "cannot write {}: {} is a symlink, which is not followed (allow_symlinked_dirs is off)",
                    path.display(),
                    link.display()
                )
            );
            assert_eq!(first_symlink(path.parent().unwrap()).unwrap(), Some(link));
        }
        assert!(!real.join("secret").exists() && !real.join("sub/secret").exists());
        let e = write_in_data_dir(&d.join("link"), "a", b"v", 0o400, None, Dirs::NoSymlinks)
            .unwrap_err();
        assert!(matches!(e, Error::SymlinkedDir { .. }), "{e:?}");

        write_file(
            &d.join("link/secret"),
            b"v",
            0o400,
            None,
            Dirs::FollowSymlinks,
        )
        .unwrap();
        assert_eq!(fs::read(real.join("secret")).unwrap(), b"v");
        assert_eq!(first_symlink(&real).unwrap(), None);
        assert_eq!(first_symlink(&d.join("missing/x")).unwrap(), None);
    }

    #[test]
    fn a_file_replaced_by_a_symlink_is_replaced_not_written_through() {
        let d = tmp();
        let elsewhere = d.join("elsewhere");
        fs::write(&elsewhere, b"keep").unwrap();
        symlink(&elsewhere, d.join("secret")).unwrap();
        write_file(&d.join("secret"), b"v", 0o400, None, Dirs::NoSymlinks).unwrap();
        assert_eq!(fs::read(&elsewhere).unwrap(), b"keep");
        assert!(
            !fs::symlink_metadata(d.join("secret"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }

    #[test]
    fn nothing_in_a_data_dir_is_followed_out_of_it() {
        let d = tmp();
        let outside = tmp();
        fs::write(outside.join("stolen"), b"outside-content").unwrap();
        write_in_data_dir(&d, "a", b"a1", 0o400, None, Dirs::NoSymlinks).unwrap();

        // A link planted in the current generation is not copied (nor read).
        let generation = fs::read_link(d.join(DATA)).unwrap();
        symlink(outside.join("stolen"), d.join(&generation).join("planted")).unwrap();
        write_in_data_dir(&d, "a", b"a2", 0o400, None, Dirs::NoSymlinks).unwrap();
        assert!(!d.join(DATA).join("planted").exists());
        assert_eq!(fs::read(d.join("a")).unwrap(), b"a2");

        // A visible name pointed elsewhere is put back.
        fs::remove_file(d.join("a")).unwrap();
        symlink(outside.join("stolen"), d.join("a")).unwrap();
        write_in_data_dir(&d, "a", b"a3", 0o400, None, Dirs::NoSymlinks).unwrap();
        assert_eq!(fs::read_link(d.join("a")).unwrap(), Path::new("..data/a"));
        assert_eq!(
            fs::read(outside.join("stolen")).unwrap(),
            b"outside-content"
        );

        // ..data pointed outside the directory: refused, nothing copied.
        for target in [outside.as_path(), Path::new(".."), Path::new("../x")] {
            fs::remove_file(d.join(DATA)).unwrap();
            symlink(target, d.join(DATA)).unwrap();
            let e = write_in_data_dir(&d, "b", b"b1", 0o400, None, Dirs::NoSymlinks).unwrap_err();
            assert!(matches!(e, Error::DataLink { .. }), "{target:?}: {e:?}");
        }
        assert!(!outside.join("b").exists());
        let leftovers = fs::read_dir(&d)
            .unwrap()
            .flatten()
            .filter(|e| {
                let n = e.file_name().to_string_lossy().to_string();
                n.starts_with("..") && n != DATA
            })
            .count();
        assert_eq!(leftovers, 1, "the refused generation is removed");
    }
}
