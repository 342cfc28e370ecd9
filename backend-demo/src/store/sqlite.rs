//! The embedded default: a SQLite file that several nodes on one machine share. WAL mode lets
//! readers and the writer proceed together; a busy timeout queues writers from other processes;
//! `synchronous = FULL` makes an acknowledged write survive even a power cut.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};

use super::{Loaded, Saved, SessionStore, StoreError};
use crate::session::Record;

#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    pub path: PathBuf,
}

const SCHEMA: &str = "
    PRAGMA journal_mode = WAL;
    PRAGMA synchronous = FULL;
    CREATE TABLE IF NOT EXISTS sessions (
        id         TEXT PRIMARY KEY,
        visits     INTEGER NOT NULL,
        version    INTEGER NOT NULL,
        tag        INTEGER NOT NULL,
        expires_ms INTEGER NOT NULL
    );
    CREATE INDEX IF NOT EXISTS sessions_expiry ON sessions (expires_ms);
";

const SCHEMA_ATTEMPTS: u32 = 250;

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

fn now_ms() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn as_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl SqliteStore {
    pub fn open(path: &str) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        // Switching to WAL takes an exclusive lock and does not wait on the busy handler, so two
        // nodes starting together can see SQLITE_BUSY here: retry for a bounded time.
        let mut attempts = 0;
        loop {
            match conn.execute_batch(SCHEMA) {
                Ok(()) => break,
                Err(e) if is_busy(&e) && attempts < SCHEMA_ATTEMPTS => attempts += 1,
                Err(e) => return Err(e.into()),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            path: PathBuf::from(path),
        })
    }

    /// Runs blocking SQLite work off the async threads.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            f(&mut conn.lock().unwrap_or_else(PoisonError::into_inner))
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }
}

impl SessionStore for SqliteStore {
    async fn load(&self, id: &str) -> Result<Option<Loaded>, StoreError> {
        let id = id.to_string();
        self.run(move |c| {
            let now = now_ms();
            let row = c
                .query_row(
                    "SELECT visits, version, expires_ms, tag FROM sessions WHERE id = ?1 AND expires_ms > ?2",
                    params![id, now],
                    |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?, r.get::<_, i64>(3)?)),
                )
                .optional()?;
            let Some((visits, version, expires, tag)) = row else { return Ok(None) };
            let left = Duration::from_millis(u64::try_from(expires - now).unwrap_or(0));
            let tag = u64::try_from(tag).map_err(|_| StoreError::Corrupt(format!("tag={tag}")))?;
            Ok(Some(Loaded { record: record(visits, version)?, tag, ttl_left: left }))
        })
        .await
    }

    async fn save(
        &self,
        id: &str,
        rec: &Record,
        tag: u64,
        expected: u64,
        ttl: Duration,
    ) -> Result<Saved, StoreError> {
        let (id, rec) = (id.to_string(), *rec);
        self.run(move |c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let now = now_ms();
            let current: i64 = tx
                .query_row(
                    "SELECT version FROM sessions WHERE id = ?1 AND expires_ms > ?2",
                    params![id, now],
                    |r| r.get(0),
                )
                .optional()?
                .unwrap_or(0);
            if current != as_i64(expected) {
                return Ok(Saved::Conflict);
            }
            tx.execute(
                "INSERT INTO sessions (id, visits, version, expires_ms, tag) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (id) DO UPDATE SET visits = ?2, version = ?3, expires_ms = ?4, tag = ?5",
                params![
                    id,
                    as_i64(rec.visits),
                    as_i64(rec.version),
                    now.saturating_add(ms(ttl)),
                    as_i64(tag)
                ],
            )?;
            tx.commit()?;
            Ok(Saved::Written)
        })
        .await
    }

    async fn delete(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_string();
        self.run(move |c| {
            c.execute("DELETE FROM sessions WHERE id = ?1", params![id])?;
            Ok(())
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.run(|c| {
            Ok(c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))
                .map(drop)?)
        })
        .await
    }

    async fn sweep(&self) -> Result<u64, StoreError> {
        self.run(|c| {
            Ok(c.execute(
                "DELETE FROM sessions WHERE expires_ms <= ?1",
                params![now_ms()],
            )? as u64)
        })
        .await
    }
}

fn record(visits: i64, version: i64) -> Result<Record, StoreError> {
    let bad = || StoreError::Corrupt(format!("visits={visits} version={version}"));
    Ok(Record {
        visits: u64::try_from(visits).map_err(|_| bad())?,
        version: u64::try_from(version).map_err(|_| bad())?,
    })
}
