//! The shared session store: one trait, three implementations. Every write is a compare-and-set
//! on the session's version, so concurrent writers on several nodes never silently lose an
//! update: the loser sees a conflict, reloads and re-applies.

mod memory;
mod redis;
mod sqlite;

use std::future::Future;
use std::time::Duration;

pub use self::memory::MemoryStore;
pub use self::redis::RedisStore;
pub use self::sqlite::SqliteStore;

use crate::session::Record;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("store operation timed out")]
    Timeout,
    #[error("stored session is corrupt: {0}")]
    Corrupt(String),
    #[error("store task failed: {0}")]
    Task(String),
}

/// A record as loaded, with its remaining idle time, so a local copy never outlives the
/// shared one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loaded {
    pub record: Record,
    /// The tag of the write that stored this record (see [`SessionStore::save`]).
    pub tag: u64,
    pub ttl_left: Duration,
}

/// Result of a compare-and-set write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Saved {
    Written,
    /// The stored version was not the expected one: reload and re-apply.
    Conflict,
}

/// A place nodes share sessions through.
pub trait SessionStore: Send + Sync {
    /// The live (unexpired) record, if any, with the time it has left.
    fn load(&self, id: &str) -> impl Future<Output = Result<Option<Loaded>, StoreError>> + Send;
    /// Writes `record` only if the stored version is `expected` (0: no live record), and
    /// (re)starts its idle expiry at `ttl`. `tag` is stored with the record, so a writer whose
    /// earlier attempt had an unknown outcome (timeout, cancellation) can recognise it landed.
    fn save(
        &self,
        id: &str,
        record: &Record,
        tag: u64,
        expected: u64,
        ttl: Duration,
    ) -> impl Future<Output = Result<Saved, StoreError>> + Send;
    fn delete(&self, id: &str) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Cheap round trip, for health reporting.
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Removes expired records; returns how many (stores with native expiry return 0).
    fn sweep(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;
}

/// The store chosen on the command line.
#[derive(Clone)]
pub enum Store {
    Memory(MemoryStore),
    Sqlite(SqliteStore),
    Redis(RedisStore),
}

impl Store {
    /// Opens `memory`, `sqlite:PATH` or `redis://HOST:PORT[/DB]`; `prefix` namespaces Redis keys.
    pub async fn open(spec: &str, prefix: &str) -> Result<Self, String> {
        if spec == "memory" {
            return Ok(Self::Memory(MemoryStore::default()));
        }
        if let Some(path) = spec.strip_prefix("sqlite:") {
            if path.is_empty() {
                return Err(
                    "--store sqlite:PATH needs a file path, e.g. sqlite:stickylb-sessions.db"
                        .into(),
                );
            }
            return SqliteStore::open(path)
                .map(Self::Sqlite)
                .map_err(|e| format!("cannot open {path}: {e}"));
        }
        if spec.starts_with("redis://") {
            return RedisStore::open(spec, prefix)
                .await
                .map(Self::Redis)
                .map_err(|e| format!("cannot use {spec}: {e}"));
        }
        Err(format!(
            "unknown store {spec:?}: expected memory, sqlite:PATH or redis://HOST:PORT[/DB]"
        ))
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Self::Memory(_) => "memory",
            Self::Sqlite(_) => "sqlite",
            Self::Redis(_) => "redis",
        }
    }
}

/// Bound on any single store operation, so a hung store turns into an error, not a hung request.
pub const OP_TIMEOUT: Duration = Duration::from_secs(2);

async fn bounded<T>(op: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
    tokio::time::timeout(OP_TIMEOUT, op)
        .await
        .unwrap_or(Err(StoreError::Timeout))
}

/// Runs the same call on whichever store this is, bounded by [`OP_TIMEOUT`].
macro_rules! on_store {
    ($store:expr, $s:ident => $call:expr) => {
        match $store {
            Store::Memory($s) => bounded($call).await,
            Store::Sqlite($s) => bounded($call).await,
            Store::Redis($s) => bounded($call).await,
        }
    };
}

impl SessionStore for Store {
    async fn load(&self, id: &str) -> Result<Option<Loaded>, StoreError> {
        on_store!(self, s => s.load(id))
    }

    async fn save(
        &self,
        id: &str,
        record: &Record,
        tag: u64,
        expected: u64,
        ttl: Duration,
    ) -> Result<Saved, StoreError> {
        on_store!(self, s => s.save(id, record, tag, expected, ttl))
    }

    async fn delete(&self, id: &str) -> Result<(), StoreError> {
        on_store!(self, s => s.delete(id))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        on_store!(self, s => s.ping())
    }

    async fn sweep(&self) -> Result<u64, StoreError> {
        on_store!(self, s => s.sweep())
    }
}
