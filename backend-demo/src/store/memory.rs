//! In-process store: one node, or several nodes inside one test process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::{Loaded, Saved, SessionStore, StoreError};
use crate::session::Record;

struct Entry {
    record: Record,
    tag: u64,
    expires: Instant,
}

#[derive(Clone, Default)]
pub struct MemoryStore {
    map: Arc<Mutex<HashMap<String, Entry>>>,
}

impl MemoryStore {
    /// Runs `f` on the live entries (expired ones are removed first).
    fn with<T>(&self, f: impl FnOnce(&mut HashMap<String, Entry>) -> T) -> T {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        map.retain(|_, e| e.expires > now);
        f(&mut map)
    }
}

impl SessionStore for MemoryStore {
    async fn load(&self, id: &str) -> Result<Option<Loaded>, StoreError> {
        let now = Instant::now();
        Ok(self.with(|m| {
            let e = m.get(id)?;
            Some(Loaded {
                record: e.record,
                tag: e.tag,
                ttl_left: e.expires - now,
            })
        }))
    }

    async fn save(
        &self,
        id: &str,
        record: &Record,
        tag: u64,
        expected: u64,
        ttl: Duration,
    ) -> Result<Saved, StoreError> {
        let expires = Instant::now() + ttl;
        Ok(self.with(|m| {
            if m.get(id).map_or(0, |e| e.record.version) != expected {
                return Saved::Conflict;
            }
            m.insert(
                id.to_string(),
                Entry {
                    record: *record,
                    tag,
                    expires,
                },
            );
            Saved::Written
        }))
    }

    async fn delete(&self, id: &str) -> Result<(), StoreError> {
        self.with(|m| m.remove(id));
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn sweep(&self) -> Result<u64, StoreError> {
        Ok(0) // `with` drops expired entries on every access
    }
}
