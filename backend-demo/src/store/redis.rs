//! Redis, for nodes on several machines. Sessions are hashes with a native TTL; the
//! compare-and-set runs as one Lua script, so it is atomic on the server. The connection manager
//! reconnects on its own after an outage.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};

use super::{Loaded, Saved, SessionStore, StoreError};
use crate::session::Record;

#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    cas: Script,
}

/// KEYS[1] = session key; ARGV = expected version, visits, new version, ttl ms, tag.
const CAS: &str = r"
local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if current ~= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'visits', ARGV[2], 'version', ARGV[3], 'tag', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
";

impl RedisStore {
    pub async fn open(url: &str, prefix: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(1))
            .set_response_timeout(Duration::from_secs(1))
            // One reconnect attempt per failed request, no backoff: while Redis is down a
            // request fails fast (503) instead of waiting out the proxy's timeout (the retry
            // backoff adds up to a second of jitter per attempt), and once Redis is back the
            // next request reconnects within milliseconds.
            .set_number_of_retries(0);
        let conn = client.get_connection_manager_with_config(config).await?;
        Ok(Self {
            conn,
            prefix: prefix.to_string(),
            cas: Script::new(CAS),
        })
    }

    fn key(&self, id: &str) -> String {
        format!("{}session:{id}", self.prefix)
    }
}

impl SessionStore for RedisStore {
    async fn load(&self, id: &str) -> Result<Option<Loaded>, StoreError> {
        let mut conn = self.conn.clone();
        let key = self.key(id);
        type Fields = (Option<u64>, Option<u64>, Option<u64>);
        let ((visits, version, tag), pttl): (Fields, i64) = redis::pipe()
            .atomic()
            .cmd("HMGET")
            .arg(&key)
            .arg("visits")
            .arg("version")
            .arg("tag")
            .cmd("PTTL")
            .arg(&key)
            .query_async(&mut conn)
            .await?;
        let (Some(visits), Some(version), Ok(left)) = (visits, version, u64::try_from(pttl)) else {
            return Ok(None); // absent, or (PTTL -1) without expiry, which this store never writes
        };
        Ok(Some(Loaded {
            record: Record { visits, version },
            tag: tag.unwrap_or(0),
            ttl_left: Duration::from_millis(left),
        }))
    }

    async fn save(
        &self,
        id: &str,
        rec: &Record,
        tag: u64,
        expected: u64,
        ttl: Duration,
    ) -> Result<Saved, StoreError> {
        let mut conn = self.conn.clone();
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let written: i64 = self
            .cas
            .key(self.key(id))
            .arg(expected)
            .arg(rec.visits)
            .arg(rec.version)
            .arg(ttl_ms)
            .arg(tag)
            .invoke_async(&mut conn)
            .await?;
        Ok(if written == 1 {
            Saved::Written
        } else {
            Saved::Conflict
        })
    }

    async fn delete(&self, id: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _removed: i64 = conn.del(self.key(id)).await?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _pong: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(())
    }

    async fn sweep(&self) -> Result<u64, StoreError> {
        Ok(0) // Redis expires keys itself.
    }
}
