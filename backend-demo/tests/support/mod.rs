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
    /// How to start the private server again (same port, same data directory).
    args: Vec<String>,
}

impl TestRedis {
    /// The `backend-demo` arguments that point a node at this Redis.
    pub fn node_args(&self) -> Vec<String> {
        let args = ["--store", &self.url, "--redis-prefix", &self.prefix];
        args.map(String::from).to_vec()
    }

    /// Stops a private server (an outage); panics for a shared `REDIS_URL` one.
    pub fn stop(&mut self) {
        let child = self
            .child
            .as_mut()
            .expect("only a private redis-server can be stopped");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Starts a stopped private server again on its old port; a durable one keeps its data.
    pub async fn start(&mut self) {
        self.child = Some(launch_redis(&self.args).unwrap());
        await_redis(&self.url).await.unwrap();
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
    if let Ok(url) = std::env::var("REDIS_URL") {
        return Some(TestRedis {
            url,
            prefix: format!("stickylb-test:{}:", rand_tag()),
            child: None,
            args: Vec::new(),
        });
    }
    private_redis(test, false).await
}

/// A private `redis-server` that this test may stop and start (never a shared `REDIS_URL`
/// one). Durable means every write is fsynced to an append-only file before it is
/// acknowledged, so a restart comes back with the data, as a production store would.
pub async fn private_redis(test: &str, durable: bool) -> Option<TestRedis> {
    match spawn_redis(durable).await {
        Ok(r) => Some(r),
        Err(why) if std::env::var("STICKYLB_REQUIRE_REDIS").as_deref() == Ok("1") => {
            panic!("{test}: Redis required (STICKYLB_REQUIRE_REDIS=1) but unavailable: {why}")
        }
        Err(why) => {
            println!("SKIPPED {test} on redis: {why} (install redis-server, or set REDIS_URL)");
            None
        }
    }
}

async fn spawn_redis(durable: bool) -> Result<TestRedis, String> {
    let port = free_port().to_string();
    let mut args: Vec<String> = ["--port", &port, "--bind", "127.0.0.1", "--save", ""]
        .map(String::from)
        .to_vec();
    if durable {
        let dir = std::env::temp_dir().join(format!("stickylb-redis-{port}-{}", rand_tag()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let dir = dir.display().to_string();
        args.extend(
            [
                "--dir",
                &dir,
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ]
            .map(String::from),
        );
    } else {
        args.extend(["--appendonly", "no"].map(String::from));
    }
    let child = launch_redis(&args)?;
    let url = format!("redis://127.0.0.1:{port}");
    let redis = TestRedis {
        url: url.clone(),
        prefix: format!("stickylb-test:{}:", rand_tag()),
        child: Some(child),
        args,
    };
    await_redis(&url).await?;
    Ok(redis)
}

fn rand_tag() -> String {
    backend_demo::session::new_id()[..12].to_string()
}

fn launch_redis(args: &[String]) -> Result<Child, String> {
    Command::new("redis-server")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start redis-server: {e}"))
}

async fn await_redis(url: &str) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(store) = Store::open(url, "probe:").await {
            if store.ping().await.is_ok() {
                return Ok(());
            }
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("{url} did not answer within 10s"));
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
