//! In-process store: one node, or several nodes inside one test process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::{Loaded, Saved, SessionStore, StoreError};
use crate::session::Record;

#[derive(Clone, Default)]
pub struct MemoryStore {
    map: Arc<Mutex<HashMap<String, (Record, Instant)>>>,
}

impl MemoryStore {
    fn with<T>(&self, f: impl FnOnce(&mut HashMap<String, (Record, Instant)>) -> T) -> T {
        f(&mut self.map.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl SessionStore for MemoryStore {
    async fn load(&self, id: &str) -> Result<Option<Loaded>, StoreError> {
        let now = Instant::now();
        Ok(self.with(|m| {
            let (record, expires) = m.get(id).filter(|(_, exp)| *exp > now)?;
            Some(Loaded {
                record: *record,
                ttl_left: *expires - now,
            })
        }))
    }

    async fn save(
        &self,
        id: &str,
        record: &Record,
        expected: u64,
        ttl: Duration,
    ) -> Result<Saved, StoreError> {
        let now = Instant::now();
        Ok(self.with(|m| {
            let current = m
                .get(id)
                .filter(|(_, exp)| *exp > now)
                .map_or(0, |(r, _)| r.version);
            if current != expected {
                return Saved::Conflict;
            }
            m.insert(id.to_string(), (*record, now + ttl));
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
        let now = Instant::now();
        Ok(self.with(|m| {
            let before = m.len();
            m.retain(|_, (_, exp)| *exp > now);
            (before - m.len()) as u64
        }))
    }
}
