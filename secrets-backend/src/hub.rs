//! Fan-out of secret changes to Watch streams.
//!
//! One `tokio::sync::watch` channel per watched secret holds its latest
//! snapshot: the Watch event (current and previous, read once) already
//! encoded as gRPC frames. The engine loads a snapshot once per change and
//! publishes it here; every stream then sends clones of the same `Bytes`,
//! so a thousand streams waiting on a slow client hold one copy of a value,
//! not a thousand. Streams hold no database connection and run no query
//! per event. Because a watch channel keeps only the latest value, a slow
//! stream skips intermediate versions instead of falling behind: a sidecar
//! only ever needs the newest one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use rekey_proto::v1 as pb;
use tokio::sync::watch;

/// What Watch streams deliver for one secret.
pub(crate) struct Snapshot {
    /// The secret's revision when it was read.
    revision: u64,
    /// (current, previous) version numbers.
    versions: (u64, u64),
    /// The event as a stream's first message (`snapshot` set).
    pub(crate) first: Bytes,
    /// The event as any later message.
    pub(crate) change: Bytes,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("revision", &self.revision)
            .field("versions", &self.versions)
            .finish_non_exhaustive()
    }
}

/// One message as a gRPC frame: no compression, length, protobuf.
fn frame(m: &impl Message) -> Bytes {
    let len = m.encoded_len();
    let mut b = BytesMut::with_capacity(5 + len);
    b.put_u8(0);
    b.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    // Encoding into a buffer of the exact size cannot fail.
    let _ = m.encode(&mut b);
    b.freeze()
}

impl Snapshot {
    /// The current and previous version numbers it carries (0: none).
    pub(crate) fn versions(&self) -> (u64, u64) {
        self.versions
    }

    /// Encodes an event once, in both forms a stream sends.
    pub(crate) fn new(mut event: pb::WatchEvent) -> Self {
        let revision = event.secret.as_ref().map_or(0, |s| s.revision);
        let versions = (
            event.current.as_ref().map_or(0, |c| c.version),
            event.previous.as_ref().map_or(0, |p| p.version),
        );
        event.snapshot = true;
        let first = frame(&event);
        event.snapshot = false;
        let change = frame(&event);
        Self {
            revision,
            versions,
            first,
            change,
        }
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
            Some(old) if old.revision >= snap.revision || old.versions == snap.versions => false,
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
        Snapshot::new(pb::WatchEvent {
            secret: Some(pb::Secret {
                revision,
                ..Default::default()
            }),
            current: Some(pb::Version {
                version: current,
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    #[test]
    fn an_event_is_encoded_once_as_grpc_frames() {
        let s = snap(4, 2);
        for (bytes, first) in [(&s.first, true), (&s.change, false)] {
            assert_eq!(bytes[0], 0, "not compressed");
            let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
            assert_eq!(len, bytes.len() - 5);
            let ev = pb::WatchEvent::decode(&bytes[5..]).unwrap();
            assert_eq!(ev.snapshot, first);
            assert_eq!(ev.current.unwrap().version, 2);
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
        assert_eq!(rx.borrow_and_update().as_ref().unwrap().versions, (2, 0));
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
