//! The real `stickylb` binary as an OS process, for drills about signals (SIGHUP, SIGTERM).
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct LbProcess {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub config: PathBuf,
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl LbProcess {
    /// Starts `stickylb --config <file>`; the config must listen on port 0 and have an admin
    /// listener. The bound addresses are read from the "listening" log line.
    pub fn start(config_text: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "stickylb-drill-{}",
            backend_demo::session::new_id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("config.toml");
        std::fs::write(&config, config_text).unwrap();
        let mut child = Command::new(binary())
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening") {
                    tx.send(line.clone()).ok();
                }
                sink.lock().unwrap().push(line);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("stickylb printed its listening line");
        Self {
            addr: field(&line, "address=").parse().unwrap(),
            admin: field(&line, "admin=Some(").parse().unwrap(),
            config,
            child,
            log,
        }
    }

    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(ok.success(), "kill -{name} failed");
    }

    /// Log lines containing `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        let log = self.log.lock().unwrap();
        log.iter().filter(|l| l.contains(needle)).count()
    }

    /// Waits for the process to exit, at most `limit`.
    pub async fn exit_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        None
    }
}

impl Drop for LbProcess {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// The value after `key` up to the next space or `)`. stickylb writes no colour codes when
/// stderr is not a terminal, as here.
fn field(line: &str, key: &str) -> String {
    let start = line
        .find(key)
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
        + key.len();
    line[start..]
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != ')')
        .collect()
}

/// `stickylb` lives next to `backend-demo` in the target directory. `cargo test --workspace`
/// has built it already; a run of this package alone builds it here (a no-op when fresh).
fn binary() -> PathBuf {
    let demo = Path::new(env!("CARGO_BIN_EXE_backend-demo"));
    let dir = demo.parent().unwrap();
    let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    build.args(["build", "--quiet", "--bin", "stickylb", "--manifest-path"]);
    build.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml"));
    if dir.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    }
    assert!(build.status().unwrap().success(), "cannot build stickylb");
    dir.join("stickylb")
}
