//! Sessions on one node: a local cache in front of the shared store, and replication to it.
//!
//! The local view of a session is `base + pending`: `base` is the record as the store last
//! confirmed it, `pending` the increments not yet written (async mode only; always empty in sync
//! mode). Every store write is a compare-and-set on `base.version`; on conflict the node reloads
//! and re-applies its increments, so no update is lost and no stale copy overwrites newer state.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::session::{is_well_formed, new_id, Record};
use crate::store::{Saved, SessionStore, Store, StoreError};

/// Compare-and-set rounds before a write gives up (only under extreme contention).
const MAX_CAS_ROUNDS: usize = 32;
/// Pause before retrying write-behind after a store error.
const WRITE_BEHIND_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Replication {
    /// The store write completes before the response.
    Sync,
    /// The response returns at once; a background task writes behind.
    Async,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("session store unavailable")]
    Store(#[from] StoreError),
    #[error("session too contended")]
    Contention,
}

/// A session as a response shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    pub id: String,
    pub record: Record,
    /// A new id was issued: the response must set the cookie.
    pub created: bool,
}

#[derive(Debug, Clone, Copy, Default)]
struct Delta {
    visits: u64,
    ops: u64,
}

impl Delta {
    fn apply(self, r: Record) -> Record {
        Record {
            visits: r.visits + self.visits,
            version: r.version + self.ops,
        }
    }
}

struct Cached {
    base: Record,
    expires: Instant,
}

/// The last queued write sent for a session whose outcome is not yet settled.
#[derive(Clone, Copy)]
struct Inflight {
    tag: u64,
    delta: Delta,
}

#[derive(Default)]
struct State {
    cache: HashMap<String, Cached>,
    pending: HashMap<String, Delta>,
    inflight: HashMap<String, Inflight>,
}

pub struct Sessions {
    store: Store,
    mode: Replication,
    ttl: Duration,
    queue_limit: usize,
    state: Mutex<State>,
    wake: Notify,
}

impl Sessions {
    pub fn new(store: Store, mode: Replication, ttl: Duration, queue_limit: usize) -> Self {
        Self {
            store,
            mode,
            ttl,
            queue_limit,
            state: Mutex::default(),
            wake: Notify::new(),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sessions with writes not yet in the store.
    pub fn pending(&self) -> usize {
        self.lock().pending.len()
    }

    /// Drops every cached copy (pending increments stay: they are deltas, merged on write).
    pub fn invalidate(&self) -> usize {
        let mut state = self.lock();
        let dropped = state.cache.len();
        state.cache.clear();
        dropped
    }

    /// The session `sid` names, without changing it. `fresh` forces a store read (failover).
    pub async fn get(&self, sid: Option<&str>, fresh: bool) -> Result<Option<View>, SessionError> {
        let Some(id) = sid.filter(|s| is_well_formed(s)) else {
            return Ok(None);
        };
        if !self.resolve(id, fresh).await? {
            return Ok(None);
        }
        let state = self.lock();
        let base = state.cache.get(id).map_or(Record::default(), |c| c.base);
        let record = state
            .pending
            .get(id)
            .copied()
            .unwrap_or_default()
            .apply(base);
        Ok(Some(View {
            id: id.to_string(),
            record,
            created: false,
        }))
    }

    /// Counts a visit, creating the session if `sid` names none (an unknown id is never adopted).
    pub async fn visit(&self, sid: Option<&str>, fresh: bool) -> Result<View, SessionError> {
        let known = match sid.filter(|s| is_well_formed(s)) {
            Some(id) if self.resolve(id, fresh).await? => Some(id.to_string()),
            _ => None,
        };
        let created = known.is_none();
        let id = known.unwrap_or_else(new_id);
        match self.mode {
            Replication::Async => match self.queue(&id) {
                Some(record) => Ok(View {
                    id,
                    record,
                    created,
                }),
                None => self.write_through(id, created).await,
            },
            Replication::Sync => self.write_through(id, created).await,
        }
    }

    /// Ends a session in the store and on this node.
    pub async fn end(&self, sid: &str) -> Result<(), SessionError> {
        self.store.delete(sid).await?;
        let mut state = self.lock();
        state.cache.remove(sid);
        state.pending.remove(sid);
        state.inflight.remove(sid);
        Ok(())
    }

    /// Makes sure the cache holds `id` if it exists anywhere; false if it does not.
    async fn resolve(&self, id: &str, fresh: bool) -> Result<bool, SessionError> {
        {
            let mut state = self.lock();
            let now = Instant::now();
            if state.cache.get(id).is_some_and(|c| c.expires <= now) {
                state.cache.remove(id); // expired here means expired there: never resurrect it
            }
            if !fresh && state.cache.contains_key(id) {
                return Ok(true);
            }
        }
        let loaded = self.store.load(id).await?;
        let mut state = self.lock();
        match loaded {
            Some(l) => {
                let cached = Cached {
                    base: l.record,
                    expires: Instant::now() + l.ttl_left,
                };
                state.cache.insert(id.to_string(), cached);
                Ok(true)
            }
            // Created here and not yet written behind: it exists, in our pending writes only.
            None => Ok(state.pending.contains_key(id)),
        }
    }

    /// Async mode: counts the visit locally and queues it. None when the queue is full and this
    /// session has nothing queued: the caller then writes through instead (back-pressure).
    fn queue(&self, id: &str) -> Option<Record> {
        let mut state = self.lock();
        if !state.pending.contains_key(id) && state.pending.len() >= self.queue_limit {
            return None;
        }
        let expires = Instant::now() + self.ttl;
        let base = state.cache.entry(id.to_string()).or_insert(Cached {
            base: Record::default(),
            expires,
        });
        base.expires = expires;
        let base = base.base;
        let delta = state.pending.entry(id.to_string()).or_default();
        delta.visits += 1;
        delta.ops += 1;
        let record = delta.apply(base);
        drop(state);
        self.wake.notify_one();
        Some(record)
    }

    /// Writes one visit to the store before answering.
    async fn write_through(&self, mut id: String, mut created: bool) -> Result<View, SessionError> {
        let one = Delta { visits: 1, ops: 1 };
        for _ in 0..MAX_CAS_ROUNDS {
            match self.apply(&id, one, false).await? {
                Applied::Done(record) => {
                    return Ok(View {
                        id,
                        record,
                        created,
                    })
                }
                Applied::Retry => {}
                // Deleted or expired meanwhile: the visit starts a new session.
                Applied::Gone => (id, created) = (new_id(), true),
            }
        }
        Err(SessionError::Contention)
    }

    /// One compare-and-set round applying `delta` on top of what the cache believes is stored.
    /// `queued`: the delta comes from the write-behind queue and leaves it once written.
    async fn apply(&self, id: &str, delta: Delta, queued: bool) -> Result<Applied, SessionError> {
        let tag = rand::random::<u64>() >> 1; // stays within SQLite's signed integers
        let (base, earlier) = {
            let mut state = self.lock();
            let base = state.cache.get(id).map_or(Record::default(), |c| c.base);
            let sent = Inflight { tag, delta };
            (
                base,
                queued
                    .then(|| state.inflight.insert(id.to_string(), sent))
                    .flatten(),
            )
        };
        let next = delta.apply(base);
        match self
            .store
            .save(id, &next, tag, base.version, self.ttl)
            .await?
        {
            Saved::Written => {
                if self.settle(id, next, delta, queued) {
                    // Ended while the write was in flight: end it again, or the write resurrects it.
                    self.store.delete(id).await?;
                }
                Ok(Applied::Done(next))
            }
            Saved::Conflict => self.on_conflict(id, earlier).await,
        }
    }

    /// The store held another version than the cache's base: learn what it holds. `earlier` is
    /// the queued write this one replaced in flight, if any.
    async fn on_conflict(
        &self,
        id: &str,
        earlier: Option<Inflight>,
    ) -> Result<Applied, SessionError> {
        match self.store.load(id).await? {
            // An earlier queued write whose outcome was unknown (cancelled or timed out) did
            // land: count it once, then apply what is left.
            Some(l) if earlier.is_some_and(|e| e.tag == l.tag) => {
                let landed = earlier.map_or(Delta::default(), |e| e.delta);
                if self.settle(id, l.record, landed, true) {
                    self.store.delete(id).await?;
                }
                Ok(Applied::Retry)
            }
            Some(l) => {
                let expires = Instant::now() + l.ttl_left;
                self.lock().cache.insert(
                    id.to_string(),
                    Cached {
                        base: l.record,
                        expires,
                    },
                );
                Ok(Applied::Retry)
            }
            None => {
                self.lock().cache.remove(id);
                Ok(Applied::Gone)
            }
        }
    }

    /// Records a successful write: the new base, and (for a queued delta) the delta leaves the
    /// queue in the same critical section, so no reader sees it counted twice. Returns true if
    /// the session was ended while the write was in flight.
    fn settle(&self, id: &str, written: Record, delta: Delta, queued: bool) -> bool {
        let mut state = self.lock();
        if queued {
            state.inflight.remove(id);
            let Some(left) = state.pending.get_mut(id) else {
                state.cache.remove(id);
                return true;
            };
            left.visits -= delta.visits;
            left.ops -= delta.ops;
            if left.ops == 0 {
                state.pending.remove(id);
            }
        }
        let expires = Instant::now() + self.ttl;
        state.cache.insert(
            id.to_string(),
            Cached {
                base: written,
                expires,
            },
        );
        false
    }

    /// The write-behind task (async mode): writes queued increments, coalesced per session.
    /// Returns when `stop` changes, never in the middle of a write: a write abandoned half way
    /// could land without being counted as landed.
    pub async fn write_behind(&self, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            tokio::select! {
                () = self.wake.notified() => {}
                _ = stop.changed() => return,
            }
            while self.flush_once().await.is_err() {
                tokio::select! {
                    () = tokio::time::sleep(WRITE_BEHIND_BACKOFF) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    }

    /// Writes everything queued now; Err if the store failed (what is left stays queued).
    pub async fn flush_once(&self) -> Result<(), StoreError> {
        let batch: Vec<(String, Delta)> = self
            .lock()
            .pending
            .iter()
            .map(|(k, d)| (k.clone(), *d))
            .collect();
        for (id, delta) in batch {
            self.flush_session(&id, delta).await?;
        }
        Ok(())
    }

    async fn flush_session(&self, id: &str, batched: Delta) -> Result<(), StoreError> {
        let mut delta = batched;
        for round in 0..MAX_CAS_ROUNDS {
            if round > 0 {
                // A retry writes what is still queued now: an earlier write found to have landed
                // has been settled, and re-sending the batched delta would count it twice (and,
                // with nothing left queued, read as "ended meanwhile" and delete the session).
                let Some(left) = self.lock().pending.get(id).copied() else {
                    return Ok(());
                };
                delta = left;
            }
            let outcome = match self.apply(id, delta, true).await {
                Ok(o) => o,
                Err(SessionError::Store(e)) => return Err(e),
                Err(SessionError::Contention) => return Ok(()),
            };
            match outcome {
                Applied::Done(_) => return Ok(()),
                Applied::Retry => {}
                Applied::Gone => {
                    tracing::info!(session = %short(id), "queued writes dropped: the session ended meanwhile");
                    self.lock().pending.remove(id);
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Flushes the queue before shutdown, giving up at `deadline`; returns what is left.
    pub async fn drain(&self, deadline: Duration) -> usize {
        let until = Instant::now() + deadline;
        while self.pending() > 0 && Instant::now() < until {
            if let Err(e) = self.flush_once().await {
                tracing::warn!(error = %e, "flush failed; retrying");
                tokio::time::sleep(WRITE_BEHIND_BACKOFF).await;
            }
        }
        self.pending()
    }

    /// Drops expired local copies; the store expires its own.
    pub fn expire_local(&self) -> usize {
        let now = Instant::now();
        let mut state = self.lock();
        let before = state.cache.len();
        state.cache.retain(|_, c| c.expires > now);
        before - state.cache.len()
    }
}

enum Applied {
    Done(Record),
    Retry,
    Gone,
}

/// A short, non-reversible tag for logs: never log a whole session id.
pub fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    fn node(store: &MemoryStore, mode: Replication, queue: usize) -> Sessions {
        Sessions::new(
            Store::Memory(store.clone()),
            mode,
            Duration::from_secs(60),
            queue,
        )
    }

    async fn stored(store: &MemoryStore, id: &str) -> Option<Record> {
        store
            .load(id)
            .await
            .map(|l| l.map(|l| l.record))
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn failover_pull_continues_the_stored_session() {
        let store = MemoryStore::default();
        let (a, b) = (
            node(&store, Replication::Sync, 10),
            node(&store, Replication::Sync, 10),
        );
        let id = a.visit(None, false).await.unwrap().id;
        a.visit(Some(&id), false).await.unwrap();
        let v = b.visit(Some(&id), true).await.unwrap();
        assert_eq!((v.record.visits, v.created), (3, false));
    }

    #[tokio::test]
    async fn async_writes_coalesce_and_leave_the_queue_once_stored() {
        let store = MemoryStore::default();
        let a = node(&store, Replication::Async, 10);
        let id = a.visit(None, false).await.unwrap().id;
        for _ in 0..4 {
            a.visit(Some(&id), false).await.unwrap();
        }
        assert_eq!(a.pending(), 1, "five visits, one queued write");
        assert_eq!(stored(&store, &id).await, None);
        a.flush_once().await.unwrap();
        assert_eq!(a.pending(), 0);
        assert_eq!(
            stored(&store, &id).await,
            Some(Record {
                visits: 5,
                version: 5
            })
        );
        let v = a.get(Some(&id), false).await.unwrap().unwrap();
        assert_eq!(
            v.record.visits, 5,
            "the view did not double count after the flush"
        );
    }

    /// A queued write whose outcome was lost (the store died before answering) but that landed:
    /// the next flush finds its tag, counts it once, and neither re-sends it nor drops the session.
    #[tokio::test]
    async fn a_write_that_landed_unacknowledged_is_counted_once_and_the_session_kept() {
        let store = MemoryStore::default();
        let a = node(&store, Replication::Async, 10);
        let id = a.visit(None, false).await.unwrap().id;
        let one = Delta { visits: 1, ops: 1 };
        let lost_tag = 7;
        a.lock().inflight.insert(
            id.clone(),
            Inflight {
                tag: lost_tag,
                delta: one,
            },
        );
        let landed = one.apply(Record::default());
        let ttl = Duration::from_secs(60);
        store.save(&id, &landed, lost_tag, 0, ttl).await.unwrap();

        a.flush_once().await.unwrap();
        assert_eq!(a.pending(), 0);
        assert_eq!(
            stored(&store, &id).await,
            Some(Record {
                visits: 1,
                version: 1
            }),
            "counted once, and the session still exists"
        );
    }

    #[tokio::test]
    async fn a_full_queue_writes_through() {
        let store = MemoryStore::default();
        let a = node(&store, Replication::Async, 1);
        let first = a.visit(None, false).await.unwrap().id;
        let second = a.visit(None, false).await.unwrap().id;
        assert_eq!(a.pending(), 1);
        assert_eq!(stored(&store, &first).await, None, "queued");
        assert_eq!(
            stored(&store, &second).await,
            Some(Record {
                visits: 1,
                version: 1
            }),
            "written through"
        );
    }

    #[tokio::test]
    async fn queued_increments_merge_with_newer_state_from_another_node() {
        let store = MemoryStore::default();
        let (a, b) = (
            node(&store, Replication::Async, 10),
            node(&store, Replication::Sync, 10),
        );
        let id = b.visit(None, false).await.unwrap().id;
        a.visit(Some(&id), true).await.unwrap();
        b.visit(Some(&id), false).await.unwrap();
        b.visit(Some(&id), false).await.unwrap();
        a.flush_once().await.unwrap();
        assert_eq!(
            stored(&store, &id).await.map(|r| r.visits),
            Some(4),
            "no increment lost either way"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_session_is_never_resurrected_from_the_local_copy() {
        let store = MemoryStore::default();
        let a = node(&store, Replication::Sync, 10);
        let id = a.visit(None, false).await.unwrap().id;
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(a.get(Some(&id), false).await.unwrap().is_none());
        let v = a.visit(Some(&id), false).await.unwrap();
        assert!(v.created && v.id != id && v.record.visits == 1, "{v:?}");
    }

    #[tokio::test]
    async fn ending_a_session_removes_it_everywhere() {
        let store = MemoryStore::default();
        let (a, b) = (
            node(&store, Replication::Sync, 10),
            node(&store, Replication::Sync, 10),
        );
        let id = a.visit(None, false).await.unwrap().id;
        b.get(Some(&id), true).await.unwrap();
        a.end(&id).await.unwrap();
        assert!(a.get(Some(&id), false).await.unwrap().is_none());
        assert!(b.get(Some(&id), true).await.unwrap().is_none());
    }
}
