//! Consumer reports, committed in groups.
//!
//! A rotation makes every sidecar of a fleet write its file and report at
//! once. One store transaction per report would queue hundreds of commits
//! in front of the rotation's own last writes (SQLite has one writer).
//! Instead, a report joins a queue; whoever holds the writer takes the
//! whole queue and commits it in one transaction, as multi-row upserts.
//! Every caller returns only after the transaction holding its report has
//! committed, so an acknowledged report is in the store. A writer with
//! few reports waits [`GROUP_WINDOW`] for more first: a report costs its
//! sender up to that much, and the store one statement per group.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::oneshot;

use super::Engine;
use crate::error::{Error, Result};
use crate::store::ConsumerRow;

/// How long a writer waits for more reports before it commits a group
/// smaller than one statement holds.
const GROUP_WINDOW: Duration = Duration::from_millis(10);

/// A report's changes: rows to write, or (for a goodbye) rows to forget.
pub(super) enum Change {
    Upsert(ConsumerRow),
    Delete {
        consumer_id: String,
        secret_id: String,
    },
}

impl Change {
    fn key(&self) -> (String, String) {
        match self {
            Change::Upsert(r) => (r.consumer_id.clone(), r.secret_id.clone()),
            Change::Delete {
                consumer_id,
                secret_id,
            } => (consumer_id.clone(), secret_id.clone()),
        }
    }
}

struct Queued {
    changes: Vec<Change>,
    done: oneshot::Sender<std::result::Result<(), String>>,
}

/// The queue of reports not yet committed, and the right to commit them.
#[derive(Default)]
pub(super) struct ReportQueue {
    queued: Mutex<Vec<Queued>>,
    writer: tokio::sync::Mutex<()>,
}

impl ReportQueue {
    fn len(&self) -> usize {
        self.queued
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    fn take(&self) -> Vec<Queued> {
        std::mem::take(
            &mut *self
                .queued
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

/// Reports taken for one transaction. If the writer is cancelled (its
/// caller went away) before answering them, they go back to the queue for
/// the next writer, so no report is lost with it.
struct Group<'a> {
    queue: &'a ReportQueue,
    items: Vec<Queued>,
}

impl Drop for Group<'_> {
    fn drop(&mut self) {
        if !self.items.is_empty() {
            self.queue
                .queued
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .append(&mut self.items);
        }
    }
}

impl Engine {
    /// Commits `changes` with whatever other reports are waiting; returns
    /// once they are in the store.
    pub(super) async fn commit_report(&self, changes: Vec<Change>) -> Result<()> {
        let (done, mut answer) = oneshot::channel();
        self.reports
            .queued
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Queued { changes, done });
        let writer = self.reports.writer.lock().await;
        // A writer before this one may have taken this report already.
        if let Ok(r) = answer.try_recv() {
            return r.map_err(Error::Internal);
        }
        // Sidecars spread their reports over a second or so after a
        // rotation: waiting a moment lets the ones close behind join this
        // transaction instead of each paying for its own.
        if self.reports.len() < crate::store::CONSUMERS_PER_STATEMENT {
            tokio::time::sleep(GROUP_WINDOW).await;
        }
        let mut group = Group {
            queue: &self.reports,
            items: self.reports.take(),
        };
        let r = self.write_reports(&group.items).await;
        let shared = r.as_ref().map(|_| ()).map_err(ToString::to_string);
        for q in group.items.drain(..) {
            // The caller may have gone (a cancelled RPC); its report is
            // written all the same.
            let _ = q.done.send(shared.clone());
        }
        drop(writer);
        match answer.try_recv() {
            Ok(r) => r.map_err(Error::Internal),
            Err(_) => Err(Error::Internal("a consumer report was not answered".into())),
        }
    }

    /// One transaction for a group of reports. Within the group the latest
    /// change to each (consumer, secret) wins, as it would one by one.
    async fn write_reports(&self, group: &[Queued]) -> Result<()> {
        let mut latest: BTreeMap<(String, String), &Change> = BTreeMap::new();
        for c in group.iter().flat_map(|q| &q.changes) {
            latest.insert(c.key(), c);
        }
        let mut upserts = Vec::new();
        let mut deletes = Vec::new();
        for ((consumer, secret), c) in &latest {
            match c {
                Change::Upsert(r) => upserts.push(r),
                Change::Delete { .. } => deletes.push((consumer.as_str(), secret.as_str())),
            }
        }
        if deletes.is_empty() && upserts.len() <= crate::store::CONSUMERS_PER_STATEMENT {
            // One statement is its own transaction.
            let mut c = self.store.conn().await?;
            return self.store.upsert_consumers(&mut c, &upserts).await;
        }
        let mut tx = self.store.begin().await?;
        for (consumer, secret) in deletes {
            self.store
                .delete_consumer(&mut tx, consumer, secret)
                .await?;
        }
        self.store.upsert_consumers(&mut tx, &upserts).await?;
        tx.commit().await?;
        Ok(())
    }
}
