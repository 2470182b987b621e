//! What the sidecar serves, and the one pipeline every new version goes
//! through: render, validate, write atomically, publish, reload.
//!
//! A version that fails rendering or validation is recorded and reported,
//! and the last good version stays in place: the app never sees a value
//! that does not work.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use rekey_keyring::SecretValue;

use crate::config::Output;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::reload::Reloader;
use crate::{render, validate, write};

/// One version with its value.
#[derive(Debug, Clone)]
pub struct Versioned {
    pub version: u64,
    pub created_at_ms: i64,
    pub value: SecretValue,
}

/// What is served for one secret.
#[derive(Debug, Clone)]
pub struct Served {
    pub current: Versioned,
    pub previous: Option<Versioned>,
}

#[derive(Debug, Default)]
struct Entry {
    served: Option<Arc<Served>>,
    /// Why the newest version offered is not served (cleared on success).
    error: Option<String>,
}

pub struct State {
    entries: RwLock<BTreeMap<String, Entry>>,
    connected: AtomicBool,
    /// Why the Watch stream is not delivering, as `/readyz` says it;
    /// cleared once a stream delivered every secret.
    backend_problem: RwLock<Option<String>>,
    pub metrics: Arc<Metrics>,
}

impl State {
    pub fn new(ids: impl IntoIterator<Item = String>, metrics: Arc<Metrics>) -> Self {
        Self {
            entries: RwLock::new(ids.into_iter().map(|i| (i, Entry::default())).collect()),
            connected: AtomicBool::new(false),
            backend_problem: RwLock::new(None),
            metrics,
        }
    }

    pub fn served(&self, id: &str) -> Option<Arc<Served>> {
        self.entries
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .and_then(|e| e.served.clone())
    }

    pub fn ids(&self) -> Vec<String> {
        self.entries
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut Entry)) {
        let mut m = self.entries.write().unwrap_or_else(|p| p.into_inner());
        f(m.entry(id.to_string()).or_default());
    }

    pub fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Relaxed);
        self.metrics.backend_connected.set(i64::from(up));
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Records why the backend is not delivering (`None`: it is). The text
    /// comes from an [`Error`], which never holds a value.
    pub fn set_backend_problem(&self, problem: Option<String>) {
        *self
            .backend_problem
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = problem;
    }

    /// `(version served, healthy, error)` per secret, for ReportStatus.
    pub fn report(&self) -> Vec<(String, u64, bool, String)> {
        self.entries
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, e)| {
                (
                    id.clone(),
                    e.served.as_ref().map_or(0, |s| s.current.version),
                    e.served.is_some() && e.error.is_none(),
                    e.error.clone().unwrap_or_default(),
                )
            })
            .collect()
    }

    /// Ready once every secret has a good version written. Failing static
    /// (backend unreachable, or a newer version rejected) stays ready; the
    /// body says so.
    pub fn readiness(&self, backend_needed: bool) -> (bool, String) {
        let m = self.entries.read().unwrap_or_else(|p| p.into_inner());
        let mut ready = true;
        let mut lines = Vec::new();
        for (id, e) in m.iter() {
            match (&e.served, &e.error) {
                (None, None) => {
                    ready = false;
                    lines.push(format!("{id}: not delivered yet"));
                }
                (None, Some(err)) => {
                    ready = false;
                    lines.push(format!("{id}: not served: {err}"));
                }
                (Some(s), Some(err)) => lines.push(format!(
                    "{id}: serving v{} (last good); newer version rejected: {err}",
                    s.current.version
                )),
                (Some(s), None) => lines.push(format!("{id}: serving v{}", s.current.version)),
            }
        }
        let problem = self
            .backend_problem
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if backend_needed {
            match problem {
                Some(p) => lines.push(format!(
                    "backend: {p}; serving the last good versions and reconnecting with backoff"
                )),
                None if !self.connected() => lines.push(
                    "backend: unreachable; serving the last good versions and reconnecting".into(),
                ),
                None => {}
            }
        }
        let head = if ready { "ready" } else { "not ready" };
        (ready, format!("{head}\n{}\n", lines.join("\n")))
    }

    /// Runs one offered version through the pipeline. Returns true when
    /// something new was written.
    pub async fn deliver(
        &self,
        id: &str,
        out: &Output,
        offered: Served,
        published_at_ms: Option<i64>,
        reloader: &Reloader,
    ) -> bool {
        let before = self.served(id);
        let same_current = before
            .as_ref()
            .is_some_and(|s| s.current.version == offered.current.version);
        let same_previous = before
            .as_ref()
            .map(|s| s.previous.as_ref().map(|p| p.version))
            == Some(offered.previous.as_ref().map(|p| p.version));
        if same_current && (same_previous || out.keyring_path.is_none()) {
            // A reconnect's snapshot of what is already served: no write,
            // no reload.
            return false;
        }
        let v = offered.current.version;
        let fail = |outcome: &str, err: &Error| {
            tracing::warn!(secret = id, version = v, error = %err, "version not served");
            self.metrics.delivered(id, outcome);
            self.update(id, |e| e.error = Some(format!("v{v}: {err}")));
            false
        };
        let main = if same_current {
            None
        } else {
            match render::render(out, &offered.current.value) {
                Ok(b) => Some(b),
                Err(e) => return fail("render_failed", &e),
            }
        };
        let keyring = match &out.keyring_path {
            Some(_) => match render::render_keyring(
                (v, &offered.current.value),
                offered.previous.as_ref().map(|p| (p.version, &p.value)),
            ) {
                Ok(b) => Some(b),
                Err(e) => return fail("render_failed", &e),
            },
            None => None,
        };
        if main.is_some()
            && let Err(e) =
                validate::validate(&out.validate, &offered.current.value, out.validate_timeout)
                    .await
        {
            return fail("validation_failed", &Error::Rejected(Box::new(e)));
        }
        // The keyring first: an app that sees the main file change (by
        // watching it) finds the keyring already holding that version.
        if let (Some(p), Some(b)) = (&out.keyring_path, &keyring)
            && let Err(e) = write::write_file(p, b.expose(), out.mode, out.owner, out.dirs)
        {
            return fail("write_failed", &e);
        }
        if let Some(b) = &main {
            let r = match &out.directory {
                Some(dir) => {
                    let name = out
                        .path
                        .file_name()
                        .map(|n| n.to_string_lossy().to_string())
                        .unwrap_or_default();
                    write::write_in_data_dir(dir, &name, b.expose(), out.mode, out.owner, out.dirs)
                }
                None => write::write_file(&out.path, b.expose(), out.mode, out.owner, out.dirs),
            };
            if let Err(e) = r {
                return fail("write_failed", &e);
            }
        }
        if let Some(t) = published_at_ms {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(t);
            self.metrics
                .delivery_seconds
                .observe(((now - t).max(0) as f64) / 1000.0);
        }
        self.metrics.serving(id, v);
        self.metrics.delivered(id, "ok");
        self.update(id, |e| {
            e.served = Some(Arc::new(offered));
            e.error = None;
        });
        tracing::info!(secret = id, version = v, path = %out.path.display(), "version served");
        reloader.request(&out.reload);
        true
    }
}
