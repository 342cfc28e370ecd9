//! Real `backend-demo` processes behind an in-process stickylb.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::{Clientele, Proxy, Reply};
use crate::support::TestRedis;

/// One `backend-demo` OS process.
pub struct Node {
    pub id: String,
    pub addr: SocketAddr,
    args: Vec<String>,
    child: Child,
    /// Its stderr, one file per start: removed with the node unless the test failed.
    logs: Vec<PathBuf>,
}

impl Node {
    /// Starts a node on any free port; `args` are extra command-line arguments.
    pub fn start(id: &str, args: &[&str]) -> Self {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let (child, addr, log) = spawn(id, "127.0.0.1:0", &args);
        Self {
            id: id.to_string(),
            addr,
            args,
            child,
            logs: vec![log],
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A real SIGKILL: no flush, no goodbye.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Starts the node again on its old address. Waiting for it runs on the blocking pool, so
    /// an in-process proxy on the test's runtime keeps serving meanwhile.
    pub async fn restart(&mut self) {
        let (id, listen, args) = (self.id.clone(), self.addr.to_string(), self.args.clone());
        let (child, addr, log) = tokio::task::spawn_blocking(move || spawn(&id, &listen, &args))
            .await
            .unwrap();
        assert_eq!(addr, self.addr);
        self.child = child;
        self.logs.push(log);
    }

    /// Waits for the process to exit; true if it exited cleanly.
    pub fn wait(&mut self) -> bool {
        self.child.wait().unwrap().success()
    }

    /// Sends a signal by name (STOP, CONT, TERM) with the system's `kill`.
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(ok.success(), "kill -{name} failed");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
        // A failed test keeps the logs it names; a passing one leaves nothing behind.
        if !std::thread::panicking() {
            for log in &self.logs {
                if let Err(e) = std::fs::remove_file(log) {
                    eprintln!("cannot remove {}: {e}", log.display());
                }
            }
        }
    }
}

fn spawn(id: &str, listen: &str, args: &[String]) -> (Child, SocketAddr, PathBuf) {
    let tag = &backend_demo::session::new_id()[..8];
    let log = std::env::temp_dir().join(format!(
        "backend-demo-{id}-{}-{tag}.log",
        std::process::id()
    ));
    let mut child = Command::new(env!("CARGO_BIN_EXE_backend-demo"))
        .args(["--id", id, "--listen", listen])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.trim().rsplit(' ').next().and_then(|a| a.parse().ok());
    let addr =
        addr.unwrap_or_else(|| panic!("node {id} did not start: {line:?}; log: {}", log.display()));
    (child, addr, log)
}

/// Heartbeats fast enough that tests wait milliseconds, not seconds.
pub const HEALTH: &str = "[health]\ninterval = \"25ms\"\ntimeout = \"250ms\"\nrise = 1\nfall = 2\n\
                          [timeouts]\nbackend_response = \"3s\"\n";

pub fn proxy_config(nodes: &[&Node]) -> String {
    let mut s = format!(
        "[listener]\naddress = \"127.0.0.1:0\"\n[affinity]\nsecret = \"e2e-secret-0123456789\"\n{HEALTH}"
    );
    for n in nodes {
        s.push_str(&format!(
            "\n[[backends]]\nid = \"{}\"\naddress = \"{}\"\n",
            n.id, n.addr
        ));
    }
    s
}

/// A browser's cookie jar, reduced to what these tests need.
#[derive(Default, Clone)]
pub struct Jar(HashMap<String, String>);

impl Jar {
    pub fn header(&self) -> Option<String> {
        let pairs: Vec<String> = self.0.iter().map(|(k, v)| format!("{k}={v}")).collect();
        (!pairs.is_empty()).then(|| pairs.join("; "))
    }

    pub fn update(&mut self, reply: &Reply) {
        for raw in reply.set_cookies() {
            let c = cookie::Cookie::parse(raw).unwrap();
            if c.max_age() == Some(cookie::time::Duration::ZERO) {
                self.0.remove(c.name());
            } else {
                self.0.insert(c.name().to_string(), c.value().to_string());
            }
        }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    pub fn set(&mut self, name: &str, value: &str) {
        self.0.insert(name.to_string(), value.to_string());
    }
}

/// The JSON a session endpoint answers, reduced to what the tests check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub node: String,
    pub id: Option<String>,
    pub visits: u64,
    pub version: u64,
}

pub fn session(reply: &Reply) -> Session {
    let v: serde_json::Value =
        serde_json::from_str(&reply.body).unwrap_or_else(|_| panic!("not JSON: {}", reply.body));
    Session {
        node: v["node"].as_str().unwrap_or_default().to_string(),
        id: v["session"].as_str().map(str::to_string),
        visits: v["visits"].as_u64().unwrap_or(0),
        version: v["version"].as_u64().unwrap_or(0),
    }
}

/// A browser: a client plus its jar.
pub struct Browser {
    pub client: Clientele,
    pub jar: Jar,
}

impl Browser {
    pub fn new(proxy: &Proxy) -> Self {
        Self {
            client: Clientele::new(proxy.addr),
            jar: Jar::default(),
        }
    }

    pub async fn send(&mut self, method: &str, path: &str) -> Reply {
        self.try_send(method, path)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// A transport failure is returned (and counted by load generators), not a panic.
    pub async fn try_send(&mut self, method: &str, path: &str) -> Result<Reply, String> {
        let cookie = self.jar.header();
        let headers: Vec<(&str, &str)> = cookie.iter().map(|c| ("cookie", c.as_str())).collect();
        let r = self
            .client
            .try_send_with(method, path, &headers, "")
            .await?;
        self.jar.update(&r);
        Ok(r)
    }
}

pub async fn wait_up(proxy: &Proxy, id: &str) {
    crate::support::eventually(Duration::from_secs(10), &format!("{id} up"), || async {
        proxy.is_up(id)
    })
    .await;
}

/// Store arguments for a node, and the private Redis (if any) that must outlive the test.
pub async fn store(kind: &str, test: &str) -> Option<(Vec<String>, Option<TestRedis>)> {
    match kind {
        "sqlite" => Some((
            vec![
                "--store".into(),
                format!("sqlite:{}", crate::support::sqlite_path(test)),
            ],
            None,
        )),
        _ => {
            let redis = crate::support::redis(test).await?;
            Some((redis.node_args(), Some(redis)))
        }
    }
}

pub fn nodes(store: &[String], extra: &[&str]) -> [Node; 2] {
    let args: Vec<&str> = store
        .iter()
        .map(String::as_str)
        .chain(extra.iter().copied())
        .collect();
    [Node::start("a", &args), Node::start("b", &args)]
}

pub fn index(nodes: &[Node; 2], id: &str) -> usize {
    nodes
        .iter()
        .position(|n| n.id == id)
        .unwrap_or_else(|| panic!("unknown node {id:?}"))
}

/// write -> 200 -> SIGKILL of the node that acknowledged it -> read through the other node.
/// Returns (trials, acknowledged writes lost).
pub async fn kill_trials(kind: &str, replication: &str, trials: usize) -> Option<(usize, usize)> {
    let (args, _redis) = store(kind, &format!("trials-{kind}-{replication}")).await?;
    let mut nodes = nodes(&args, &["--replication", replication]);
    let proxy = crate::common::Proxy::start(&proxy_config(&[&nodes[0], &nodes[1]])).await;
    let mut browser = Browser::new(&proxy);
    let mut lost = 0;
    for trial in 0..trials {
        let r = browser.send("POST", "/visit").await;
        assert_eq!(r.status, 200, "trial {trial}: {}", r.body);
        let acked = session(&r);
        let owner = index(&nodes, &acked.node);
        nodes[owner].kill9();
        let read = browser.send("GET", "/session").await;
        // 404 means the whole session was lost (its first write never reached the store).
        assert!(
            read.status == 200 || read.status == 404,
            "trial {trial}: {} {}",
            read.status,
            read.body
        );
        let got = session(&read);
        assert_ne!(
            got.node, acked.node,
            "trial {trial}: read must come from the other node"
        );
        assert!(
            got.visits <= acked.visits,
            "trial {trial}: more visits than acknowledged"
        );
        if got.visits < acked.visits {
            lost += 1;
        }
        nodes[owner].restart().await;
        wait_up(&proxy, &nodes[owner].id).await;
    }
    Some((trials, lost))
}
