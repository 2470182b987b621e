//! File sources: secrets that a mounted Kubernetes Secret or CSI volume
//! delivers. The directory holding each source is watched (inotify), which
//! sees kubelet's `..data` symlink swap as well as plain writes; a changed
//! content goes through the same pipeline as a backend version.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use notify::{RecursiveMode, Watcher};
use rekey_keyring::{SecretBytes, SecretValue};
use tokio::sync::{mpsc, watch};

use crate::config::FileSource;
use crate::reload::Reloader;
use crate::state::{Served, State, Versioned};

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Reads each source and delivers it when its content changed.
async fn sync(sources: &[FileSource], state: &State, reloader: &Reloader) {
    for s in sources {
        let Ok(bytes) = std::fs::read(&s.source) else {
            // Missing during a swap, or not mounted yet: try again on the
            // next event.
            continue;
        };
        let value = SecretValue::Raw(SecretBytes::new(bytes));
        let prev = state.served(&s.id);
        if prev.as_ref().is_some_and(|p| p.current.value == value) {
            continue;
        }
        let version = prev.as_ref().map_or(1, |p| p.current.version + 1);
        let offered = Served {
            current: Versioned {
                version,
                created_at_ms: now_ms(),
                value,
            },
            previous: prev.map(|p| p.current.clone()),
        };
        state.deliver(&s.id, &s.out, offered, None, reloader).await;
    }
}

/// Runs until shutdown.
pub async fn run(
    sources: Vec<FileSource>,
    state: Arc<State>,
    reloader: Reloader,
    mut shutdown: watch::Receiver<bool>,
) {
    if sources.is_empty() {
        return;
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let mut watcher =
        match notify::recommended_watcher(move |_res: notify::Result<notify::Event>| {
            let _ = tx.send(());
        }) {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, "cannot watch file sources");
                return;
            }
        };
    let dirs: BTreeMap<PathBuf, ()> = sources
        .iter()
        .filter_map(|s| s.source.parent().map(|p| (p.to_path_buf(), ())))
        .collect();
    for dir in dirs.keys() {
        if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
            tracing::error!(dir = %dir.display(), error = %e, "cannot watch directory");
        }
    }
    sync(&sources, &state, &reloader).await;
    loop {
        tokio::select! {
            ev = rx.recv() => {
                if ev.is_none() {
                    return;
                }
                // Coalesce a burst (a swap is several events).
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                while rx.try_recv().is_ok() {}
                sync(&sources, &state, &reloader).await;
            }
            _ = crate::stopped(&mut shutdown) => return,
        }
    }
}
