//! Atomic writes: an app that reads a file at any moment sees either the
//! old content or the new, never a mix.
//!
//! A plain file is written to a temporary file in the same directory,
//! fsynced, then renamed over the target. A directory is updated the way
//! kubelet updates Secret volumes: a new timestamped `..<time>` directory
//! holds every file, a `..data` symlink is swapped to it with one rename,
//! and each visible name is a symlink through `..data`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt, symlink};
use std::path::Path;

const DATA: &str = "..data";

fn unique_suffix() -> String {
    let r = rekey_keyring::random_bytes(6)
        .map(|b| hex::encode(b.expose()))
        .unwrap_or_default();
    format!("{}-{r}", std::process::id())
}

fn write_new(path: &Path, data: &[u8], mode: u32, owner: Option<(u32, u32)>) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    f.write_all(data)?;
    // `mode` on open is filtered by the umask; set it exactly.
    f.set_permissions(fs::Permissions::from_mode(mode))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
    }
    f.sync_all()
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Replaces `path` with `data` atomically.
pub fn write_file(
    path: &Path,
    data: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let tmp = dir.join(format!(
        ".{}.rekey-{}",
        name.to_string_lossy(),
        unique_suffix()
    ));
    if let Err(e) = write_new(&tmp, data, mode, owner).and_then(|_| fs::rename(&tmp, path)) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir)
}

/// Updates one file in a kubelet-style directory; the other files in it
/// are carried over into the new generation.
pub fn write_in_data_dir(
    dir: &Path,
    name: &str,
    data: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> io::Result<()> {
    let generation = format!("..{}", unique_suffix());
    let gen_path = dir.join(&generation);
    fs::create_dir(&gen_path)?;
    fs::set_permissions(&gen_path, fs::Permissions::from_mode(0o755))?;
    let result = (|| {
        let old_gen = fs::read_link(dir.join(DATA)).ok();
        if let Some(old) = &old_gen {
            for e in fs::read_dir(dir.join(old))?.flatten() {
                let n = e.file_name();
                if n.to_string_lossy() != name {
                    fs::copy(e.path(), gen_path.join(&n))?;
                }
            }
        }
        write_new(&gen_path.join(name), data, mode, owner)?;
        sync_dir(&gen_path)?;
        let tmp_link = dir.join(format!("..data_tmp-{}", unique_suffix()));
        symlink(&generation, &tmp_link)?;
        fs::rename(&tmp_link, dir.join(DATA))?;
        let visible = dir.join(name);
        if fs::symlink_metadata(&visible)
            .map(|m| !m.file_type().is_symlink())
            .unwrap_or(true)
        {
            let tmp = dir.join(format!(".{name}.rekey-{}", unique_suffix()));
            symlink(format!("{DATA}/{name}"), &tmp)?;
            fs::rename(&tmp, &visible)?;
        }
        sync_dir(dir)?;
        if let Some(old) = old_gen {
            let _ = fs::remove_dir_all(dir.join(old));
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&gen_path);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("rekey-sc-write-{}", unique_suffix()));
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn file_is_replaced_with_its_mode() {
        let d = tmp();
        let p = d.join("secret");
        write_file(&p, b"one", 0o400, None).unwrap();
        write_file(&p, b"two", 0o440, None).unwrap();
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
        write_in_data_dir(&d, "a", b"a1", 0o400, None).unwrap();
        write_in_data_dir(&d, "b", b"b1", 0o400, None).unwrap();
        write_in_data_dir(&d, "a", b"a2", 0o400, None).unwrap();
        assert_eq!(fs::read(d.join("a")).unwrap(), b"a2");
        assert_eq!(fs::read(d.join("b")).unwrap(), b"b1");
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
}
