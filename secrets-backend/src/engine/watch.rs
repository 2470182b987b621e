//! Snapshots for Watch streams: the engine loads a secret's current and
//! previous values once per change and publishes them to the hub, whose
//! streams share them.

use super::Engine;
use crate::clock::now_ms;
use crate::convert;
use crate::error::Result;
use crate::hub::{Receiver, Snapshot};
use crate::store::{SecretRow, VersionState};

impl Engine {
    /// A receiver that yields the secret's current snapshot at once, then
    /// each change.
    pub(crate) async fn subscribe(&self, id: &str) -> Result<Receiver> {
        let rx = self.hub.subscribe(id);
        if rx.borrow().is_none() {
            let _one = self.hub.first_load().await;
            if rx.borrow().is_none() {
                // Boxed: the store read happens once per secret, and a
                // Watch future holding it inline would be as large for
                // every stream that merely subscribes.
                let snap = Box::pin(self.snapshot(id)).await?;
                self.hub.publish(id, snap);
            }
        }
        Ok(rx)
    }

    /// Reloads a secret after a change (local, or NOTIFY from another
    /// replica) if anybody watches it.
    pub(crate) async fn refresh(&self, id: &str) {
        if !self.hub.watched(id) {
            return;
        }
        match self.snapshot(id).await {
            Ok(snap) => self.hub.publish(id, snap),
            Err(e) => tracing::warn!(secret = id, error = %e, "cannot reload secret for watchers"),
        }
    }

    /// Reloads every watched secret (after a lost NOTIFY connection).
    pub(crate) async fn refresh_all(&self) {
        for id in self.hub.watched_ids() {
            self.refresh(&id).await;
        }
    }

    /// The secret's current and previous values as one consistent event:
    /// the secret row and its version rows are read by separate
    /// statements, so a change committed in between (a rotation finishing
    /// on another replica, revoking the old previous) would tear the
    /// snapshot; it is read again until the row's revision held still.
    async fn snapshot(&self, id: &str) -> Result<Snapshot> {
        let mut attempts = 0;
        loop {
            let s = self.require_secret(id).await?;
            let event = self.event_of(&s).await?;
            attempts += 1;
            if attempts >= 5 || self.require_secret(id).await?.revision == s.revision {
                return Ok(Snapshot::new(event));
            }
        }
    }

    async fn event_of(&self, s: &SecretRow) -> Result<rekey_proto::v1::WatchEvent> {
        let (cur_row, cur_val) = self.version_and_value(s, s.current_version).await?;
        let previous = match s.previous_version {
            0 => None,
            n => {
                let row = {
                    let mut c = self.store.conn().await?;
                    self.store.require_version(&mut c, &s.id, n).await?
                };
                if row.state == VersionState::Active {
                    let value = self.value_of(s, &row).await?;
                    Some(convert::version(s, &row, Some(&value)))
                } else {
                    None
                }
            }
        };
        Ok(rekey_proto::v1::WatchEvent {
            secret: Some(convert::secret(s)),
            current: Some(convert::version(s, &cur_row, Some(&cur_val))),
            previous,
            snapshot: false,
            published_at_ms: now_ms(),
        })
    }
}
