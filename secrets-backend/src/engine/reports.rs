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
use std::time::Duration;

use super::Engine;
use super::group::{GroupCommit, Turn};
use crate::error::Result;
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
        /// Only the identity that owns the row may remove it.
        identity: String,
    },
}

impl Change {
    /// (consumer, secret): the row this change is about.
    fn key(&self) -> (&str, &str) {
        match self {
            Change::Upsert(r) => (&r.consumer_id, &r.secret_id),
            Change::Delete {
                consumer_id,
                secret_id,
                ..
            } => (consumer_id, secret_id),
        }
    }
}

/// Reports waiting to be committed together.
pub(super) type ReportQueue = GroupCommit<Vec<Change>>;

impl Engine {
    /// Commits `changes` with whatever other reports are waiting; returns
    /// once they are in the store.
    pub(super) async fn commit_report(&self, changes: Vec<Change>) -> Result<()> {
        // Sidecars spread their reports over a second or so after a
        // rotation: waiting a moment lets the ones close behind join this
        // transaction instead of each paying for its own.
        match self
            .reports
            .join(changes, crate::store::CONSUMERS_PER_STATEMENT, GROUP_WINDOW)
            .await
        {
            Turn::Done(r) => r,
            Turn::Write(group) => {
                let r = self.write_reports(group.items().flatten()).await;
                group.finish(r)
            }
        }
    }

    /// One transaction for a group of reports. Within the group the latest
    /// change to each (consumer, secret) wins, as it would one by one.
    async fn write_reports(&self, group: impl Iterator<Item = &Change>) -> Result<()> {
        let mut latest: BTreeMap<(&str, &str), &Change> = BTreeMap::new();
        for c in group {
            latest.insert(c.key(), c);
        }
        let live_since = crate::clock::now_ms() - self.consumer_ttl_ms();
        let mut upserts = Vec::new();
        let mut deletes = Vec::new();
        for (key, c) in latest {
            match c {
                Change::Upsert(r) => upserts.push(r),
                Change::Delete { identity, .. } => deletes.push((key, identity.as_str())),
            }
        }
        if deletes.is_empty() && upserts.len() <= crate::store::CONSUMERS_PER_STATEMENT {
            // One statement is its own transaction.
            let mut c = self.store.conn().await?;
            return self
                .store
                .upsert_consumers(&mut c, &upserts, live_since)
                .await;
        }
        let mut tx = self.store.begin().await?;
        for ((consumer, secret), identity) in deletes {
            self.store
                .delete_consumer(&mut tx, consumer, secret, identity)
                .await?;
        }
        self.store
            .upsert_consumers(&mut tx, &upserts, live_since)
            .await?;
        tx.commit().await?;
        Ok(())
    }
}
