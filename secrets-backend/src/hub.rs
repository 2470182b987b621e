//! Fan-out of secret changes to Watch streams.
//!
//! One `tokio::sync::watch` channel per watched secret holds its latest
//! snapshot (current and previous, decrypted once and shared through an
//! `Arc`). The engine loads a snapshot once per change and publishes it
//! here; every stream then reads the same `Arc`. Streams hold no database
//! connection and run no query per event. Because a watch channel keeps
//! only the latest value, a slow stream skips intermediate versions instead
//! of falling behind: a sidecar only ever needs the newest one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rekey_proto::v1 as pb;
use tokio::sync::watch;

/// What Watch streams deliver for one secret.
#[derive(Debug)]
pub(crate) struct Snapshot {
    pub(crate) secret: pb::Secret,
    pub(crate) current: pb::Version,
    pub(crate) previous: Option<pb::Version>,
    /// When this replica loaded and published it (Unix ms).
    pub(crate) published_at_ms: i64,
}

impl Snapshot {
    fn key(&self) -> (u64, u64) {
        (
            self.current.version,
            self.previous.as_ref().map_or(0, |p| p.version),
        )
    }
}

pub(crate) type Receiver = watch::Receiver<Option<Arc<Snapshot>>>;
type Slot = watch::Sender<Option<Arc<Snapshot>>>;

#[derive(Default)]
pub(crate) struct Hub {
    slots: Mutex<HashMap<String, Slot>>,
    /// Serializes first loads, so that thousands of streams opening at once
    /// on a secret nobody watched yet cause one load, not thousands.
    first_load: tokio::sync::Mutex<()>,
}

impl Hub {
    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A receiver on the channel of `id` (created when missing), taken
    /// under the lock so the slot cannot be pruned in between. Its value is
    /// `None` until a first snapshot is published.
    pub(crate) fn subscribe(&self, id: &str) -> Receiver {
        let mut slots = self.slots();
        // Drop slots nobody watches any more, so the map does not grow with
        // every secret ever watched.
        slots.retain(|k, s| k == id || s.receiver_count() > 0);
        slots
            .entry(id.to_string())
            .or_insert_with(|| watch::channel(None).0)
            .subscribe()
    }

    /// Held while a first snapshot loads.
    pub(crate) async fn first_load(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.first_load.lock().await
    }

    /// True when some stream watches `id` and so wants its changes.
    pub(crate) fn watched(&self, id: &str) -> bool {
        self.slots().get(id).is_some_and(|s| s.receiver_count() > 0)
    }

    /// Every secret some stream watches.
    pub(crate) fn watched_ids(&self) -> Vec<String> {
        self.slots()
            .iter()
            .filter(|(_, s)| s.receiver_count() > 0)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Hands `snap` to the streams of `id`, unless they already have this
    /// revision or the same current and previous versions.
    pub(crate) fn publish(&self, id: &str, snap: Snapshot) {
        let Some(slot) = self.slots().get(id).cloned() else {
            return;
        };
        let snap = Arc::new(snap);
        slot.send_if_modified(|cur| match cur {
            Some(old) if old.secret.revision >= snap.secret.revision || old.key() == snap.key() => {
                false
            }
            _ => {
                *cur = Some(snap);
                true
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(revision: u64, current: u64) -> Snapshot {
        Snapshot {
            secret: pb::Secret {
                revision,
                ..Default::default()
            },
            current: pb::Version {
                version: current,
                ..Default::default()
            },
            previous: None,
            published_at_ms: 0,
        }
    }

    #[test]
    fn publishes_newer_revisions_only_to_watched_secrets() {
        let hub = Hub::default();
        hub.publish("a", snap(1, 1));
        assert!(!hub.watched("a"));
        let mut rx = hub.subscribe("a");
        assert!(rx.borrow().is_none());
        hub.publish("a", snap(2, 2));
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().as_ref().unwrap().current.version, 2);
        hub.publish("a", snap(1, 1));
        assert!(!rx.has_changed().unwrap(), "an older revision is dropped");
        hub.publish("a", snap(3, 2));
        assert!(
            !rx.has_changed().unwrap(),
            "the same versions are not resent"
        );
        assert_eq!(hub.watched_ids(), ["a"]);
        drop(rx);
        assert!(!hub.watched("a"));
    }
}
