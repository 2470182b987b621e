//! Fan-out of secret changes to Watch streams.
//!
//! One `tokio::sync::watch` channel per watched secret holds its latest
//! snapshot (current and previous, decrypted once and shared through an
//! `Arc`). A change loads the snapshot once; every stream then reads the same
//! `Arc`. Streams hold no database connection and run no query per event.
//! Because a watch channel keeps only the latest value, a slow stream skips
//! intermediate versions instead of falling behind: a sidecar only ever
//! needs the newest one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rekey_proto::v1 as pb;
use tokio::sync::watch;

use crate::convert;
use crate::error::Result;
use crate::store::{ACTIVE, Store};

/// What Watch streams deliver for one secret.
#[derive(Debug)]
pub struct Snapshot {
    pub secret: pb::Secret,
    pub current: pb::Version,
    pub previous: Option<pb::Version>,
    /// When this replica loaded and published it (Unix ms).
    pub published_at_ms: i64,
}

impl Snapshot {
    fn key(&self) -> (u64, u64) {
        (
            self.current.version,
            self.previous.as_ref().map_or(0, |p| p.version),
        )
    }
}

type Slot = watch::Sender<Option<Arc<Snapshot>>>;

pub struct Hub {
    store: Arc<Store>,
    slots: Mutex<HashMap<String, Slot>>,
    /// Serializes first loads, so that thousands of streams opening at once
    /// on a secret nobody watched yet cause one load, not thousands.
    first_load: tokio::sync::Mutex<()>,
}

impl Hub {
    pub fn new(store: Arc<Store>) -> Self {
        Self {
            store,
            slots: Mutex::new(HashMap::new()),
            first_load: tokio::sync::Mutex::new(()),
        }
    }

    /// The channel of `id` (created when missing) and a receiver on it,
    /// taken under the lock so the slot cannot be pruned in between.
    fn slot(&self, id: &str) -> (Slot, watch::Receiver<Option<Arc<Snapshot>>>) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        // Drop slots nobody watches any more, so the map does not grow with
        // every secret ever watched.
        slots.retain(|k, s| k == id || s.receiver_count() > 0);
        let slot = slots
            .entry(id.to_string())
            .or_insert_with(|| watch::channel(None).0)
            .clone();
        let rx = slot.subscribe();
        (slot, rx)
    }

    /// A receiver that yields the secret's current snapshot at once, then
    /// each change.
    pub async fn subscribe(&self, id: &str) -> Result<watch::Receiver<Option<Arc<Snapshot>>>> {
        let (slot, rx) = self.slot(id);
        if slot.borrow().is_none() {
            let _one = self.first_load.lock().await;
            if slot.borrow().is_none() {
                self.load_into(id, &slot).await?;
            }
        }
        Ok(rx)
    }

    /// Reloads a secret after a change (local, or NOTIFY from another
    /// replica) if anybody watches it.
    pub async fn refresh(&self, id: &str) {
        let slot = {
            let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots.get(id).filter(|s| s.receiver_count() > 0).cloned()
        };
        if let Some(slot) = slot
            && let Err(e) = self.load_into(id, &slot).await
        {
            tracing::warn!(secret = id, error = %e, "cannot reload secret for watchers");
        }
    }

    /// Reloads every watched secret (after a lost NOTIFY connection).
    pub async fn refresh_all(&self) {
        let ids: Vec<String> = {
            let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots.keys().cloned().collect()
        };
        for id in ids {
            self.refresh(&id).await;
        }
    }

    async fn load_into(&self, id: &str, slot: &Slot) -> Result<()> {
        let snap = Arc::new(self.load(id).await?);
        slot.send_if_modified(|cur| match cur {
            // Newer revision with a different current/previous: publish.
            Some(old) if old.secret.revision >= snap.secret.revision || old.key() == snap.key() => {
                false
            }
            _ => {
                *cur = Some(snap);
                true
            }
        });
        Ok(())
    }

    async fn load(&self, id: &str) -> Result<Snapshot> {
        let mut c = self.store.conn().await?;
        let s = self.store.require_secret(&mut c, id).await?;
        let cur_row = self
            .store
            .require_version(&mut c, id, s.current_version)
            .await?;
        let cur_val = self
            .store
            .version_value(&mut c, id, s.current_version)
            .await?;
        let previous = if s.previous_version > 0 {
            match self
                .store
                .get_version(&mut c, id, s.previous_version)
                .await?
            {
                Some(row) if row.state == ACTIVE => {
                    let v = self
                        .store
                        .version_value(&mut c, id, s.previous_version)
                        .await?;
                    Some(convert::version(&s, &row, Some(&v)))
                }
                _ => None,
            }
        } else {
            None
        };
        Ok(Snapshot {
            secret: convert::secret(&s),
            current: convert::version(&s, &cur_row, Some(&cur_val)),
            previous,
            published_at_ms: crate::engine::now_ms(),
        })
    }
}
