//! Shared test support: stores to run against, including a private Redis.
#![allow(dead_code, clippy::unwrap_used)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use backend_demo::store::{SessionStore, Store};

/// A Redis for one test: `REDIS_URL` if set (with a random key prefix), else a private
/// `redis-server` on a free port, stopped on drop.
pub struct TestRedis {
    pub url: String,
    pub prefix: String,
    child: Option<Child>,
}

impl TestRedis {
    /// Stops a private server (an outage); panics for a shared `REDIS_URL` one.
    pub fn stop(&mut self) {
        let child = self
            .child
            .as_mut()
            .expect("only a private redis-server can be stopped");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            child.kill().ok();
            child.wait().ok();
        }
    }
}

/// None (after printing a SKIPPED line) when no Redis can be had; panics instead when
/// `STICKYLB_REQUIRE_REDIS=1`.
pub async fn redis(test: &str) -> Option<TestRedis> {
    let prefix = format!("stickylb-test:{}:", backend_demo::session::new_id());
    if let Ok(url) = std::env::var("REDIS_URL") {
        return Some(TestRedis {
            url,
            prefix,
            child: None,
        });
    }
    match spawn_redis().await {
        Ok(mut r) => {
            r.prefix = prefix;
            Some(r)
        }
        Err(why) if std::env::var("STICKYLB_REQUIRE_REDIS").as_deref() == Ok("1") => {
            panic!("{test}: Redis required (STICKYLB_REQUIRE_REDIS=1) but unavailable: {why}")
        }
        Err(why) => {
            println!("SKIPPED {test} on redis: {why} (set REDIS_URL or install redis-server)");
            None
        }
    }
}

async fn spawn_redis() -> Result<TestRedis, String> {
    let port = free_port();
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start redis-server: {e}"))?;
    let url = format!("redis://127.0.0.1:{port}");
    let redis = TestRedis {
        url: url.clone(),
        prefix: String::new(),
        child: Some(child),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(store) = Store::open(&url, "probe:").await {
            if store.ping().await.is_ok() {
                return Ok(redis);
            }
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "redis-server on port {port} did not answer within 10s"
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A port that was free a moment ago (the OS picks it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A fresh SQLite file path in a private temp directory.
pub fn sqlite_path(tag: &str) -> String {
    let dir = std::env::temp_dir().join(format!(
        "stickylb-{tag}-{}",
        backend_demo::session::new_id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("sessions.db").display().to_string()
}

/// Polls `cond` until it holds, failing after `limit`.
pub async fn eventually<F: std::future::Future<Output = bool>>(
    limit: Duration,
    what: &str,
    mut cond: impl FnMut() -> F,
) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
