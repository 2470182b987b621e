//! Group commit: many callers' writes in one store transaction.
//!
//! A caller queues its item and waits for the writer's turn. Whoever gets
//! the turn takes every item queued by then and writes them together;
//! the others find theirs answered. Every caller returns only once the
//! transaction holding its item has committed. Items taken by a writer
//! that is cancelled (its caller went away) before answering go back to
//! the queue for the next one, so nothing is lost with it.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{MutexGuard, oneshot};

use crate::error::{Error, Result};

type Answer = std::result::Result<(), String>;

struct Queued<T> {
    item: T,
    done: oneshot::Sender<Answer>,
}

/// Items waiting to be written, and the writer's turn.
pub(super) struct GroupCommit<T> {
    queued: Mutex<Vec<Queued<T>>>,
    writer: tokio::sync::Mutex<()>,
}

impl<T> Default for GroupCommit<T> {
    fn default() -> Self {
        Self {
            queued: Mutex::default(),
            writer: tokio::sync::Mutex::default(),
        }
    }
}

/// What a caller of [`GroupCommit::join`] does next.
pub(super) enum Turn<'a, T> {
    /// Another writer wrote the item: its result.
    Done(Result<()>),
    /// This caller writes the group (its own item included), then hands
    /// the result to [`Group::finish`].
    Write(Group<'a, T>),
}

/// The items one writer took, with the writer's turn.
pub(super) struct Group<'a, T> {
    commit: &'a GroupCommit<T>,
    items: Vec<Queued<T>>,
    _turn: MutexGuard<'a, ()>,
}

impl<T> Group<'_, T> {
    pub(super) fn items(&self) -> impl Iterator<Item = &T> {
        self.items.iter().map(|q| &q.item)
    }

    /// Answers every item with the group's result and ends the turn;
    /// returns that result, which is also the writer's own (its item is
    /// in the group).
    pub(super) fn finish(mut self, r: Result<()>) -> Result<()> {
        let shared: Answer = r.as_ref().map(|_| ()).map_err(ToString::to_string);
        for q in self.items.drain(..) {
            // The caller may have gone (a cancelled RPC); its item is
            // written all the same.
            let _ = q.done.send(shared.clone());
        }
        r
    }
}

impl<T> Drop for Group<'_, T> {
    fn drop(&mut self) {
        if !self.items.is_empty() {
            self.commit.queue().append(&mut self.items);
        }
    }
}

impl<T> GroupCommit<T> {
    fn queue(&self) -> std::sync::MutexGuard<'_, Vec<Queued<T>>> {
        self.queued
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues `item` and waits for the writer's turn. With fewer than
    /// `enough` items queued by then, the writer first waits `window` for
    /// more to join.
    pub(super) async fn join(&self, item: T, enough: usize, window: Duration) -> Turn<'_, T> {
        let (done, mut answer) = oneshot::channel();
        self.queue().push(Queued { item, done });
        let turn = self.writer.lock().await;
        // A writer before this one may have taken the item already.
        if let Ok(r) = answer.try_recv() {
            return Turn::Done(r.map_err(Error::Internal));
        }
        if !window.is_zero() && self.queue().len() < enough {
            tokio::time::sleep(window).await;
        }
        // Not answered, so the item is still queued (a cancelled writer
        // puts back what it took): it is in the group taken here.
        let items = std::mem::take(&mut *self.queue());
        Turn::Write(Group {
            commit: self,
            items,
            _turn: turn,
        })
    }
}
