//! `stickylb demo`: the whole cluster with one command. Starts one `backend-demo` process per
//! configured backend (sharing the embedded SQLite store), prints their PIDs and a curl
//! walkthrough, runs the proxy in this process, and stops the nodes on Ctrl-C.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::config::Config;

/// The store the demo nodes share: a SQLite file in the current directory.
pub const STORE: &str = "sqlite:stickylb-sessions.db";

pub struct Node {
    pub id: String,
    pub child: Child,
    pub command: String,
}

/// How long a node may take to report that it listens.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// Finds `backend-demo` next to this executable. Under `cargo run` it is (re)built first, which
/// is a no-op when it is fresh, so the demo never runs a stale node.
pub fn backend_binary() -> Result<PathBuf, String> {
    let me = std::env::current_exe().map_err(|e| format!("cannot locate this executable: {e}"))?;
    let bin = me.with_file_name("backend-demo");
    match std::env::var("CARGO") {
        Ok(cargo) => build(&cargo, &me, &bin),
        Err(_) if bin.exists() => Ok(bin),
        Err(_) => Err(format!(
            "backend-demo is not at {}: build it with `cargo build --release -p backend-demo`",
            bin.display()
        )),
    }
}

fn build(cargo: &str, me: &Path, bin: &Path) -> Result<PathBuf, String> {
    let release = me
        .parent()
        .and_then(Path::file_name)
        .is_some_and(|d| d == "release");
    let mut build = Command::new(cargo);
    build.args(["build", "-p", "backend-demo"]);
    if release {
        build.arg("--release");
    }
    eprintln!(
        "building backend-demo ({})...",
        if release { "release" } else { "debug" }
    );
    let status = build
        .status()
        .map_err(|e| format!("cannot run cargo to build backend-demo: {e}"))?;
    if !status.success() || !bin.exists() {
        return Err(format!(
            "building backend-demo into {} failed",
            bin.display()
        ));
    }
    Ok(bin.to_path_buf())
}

/// Starts one node per backend and waits until each is listening.
pub fn start_nodes(bin: &Path, config: &Config, replication: &str) -> Result<Vec<Node>, String> {
    let mut nodes = Vec::new();
    for b in &config.backends {
        let args = [
            "--id",
            &b.id,
            "--listen",
            b.address.as_str(),
            "--store",
            STORE,
            "--replication",
            replication,
        ];
        let command = format!("{} {}", bin.display(), args.join(" "));
        let mut child = Command::new(bin)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {command}: {e}"))?;
        let line = child.stdout.take().map(first_line).unwrap_or_default();
        if !line.contains("listening on") {
            child.kill().ok();
            child.wait().ok();
            stop(&mut nodes);
            return Err(format!(
                "node {} did not start (is {} free?)",
                b.id, b.address
            ));
        }
        nodes.push(Node {
            id: b.id.clone(),
            child,
            command,
        });
    }
    Ok(nodes)
}

/// The first line a node prints, or "" if it exits or stays silent past [`START_TIMEOUT`].
fn first_line(out: std::process::ChildStdout) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        // EOF or an error leaves the line empty, which the caller reports.
        if BufReader::new(out).read_line(&mut line).is_ok() {
            tx.send(line).ok();
        }
    });
    rx.recv_timeout(START_TIMEOUT).unwrap_or_default()
}

pub fn walkthrough(config: &Config, nodes: &[Node], replication: &str) -> String {
    let proxy = config.listener.address;
    let mut out = format!(
        "\nstickylb demo: proxy on http://{proxy}, replication {replication}, store {STORE}\n"
    );
    for n in nodes {
        out.push_str(&format!(
            "  node {:<4} pid {:<8} restart with: {}\n",
            n.id,
            n.child.id(),
            n.command
        ));
    }
    out.push_str(&format!(
        "\nTry it:\n\
         \x20 curl -c jar -b jar -X POST {proxy}/visit     # a few times: visits 1, 2, 3 on one node\n\
         \x20 kill -9 <pid of that node>\n\
         \x20 curl -c jar -b jar -X POST {proxy}/visit     # the other node answers with visits 4\n\
         \x20 <restart command of the killed node>          # it rejoins; your session stays where it is\n\
         \x20 curl -c jar -b jar -X POST {proxy}/visit     # still the other node: visits 5\n\
         Open http://{proxy}/ in a browser for the same with a button. Ctrl-C stops everything.\n\n"
    ));
    out
}

/// Asks every node to stop (SIGTERM: async nodes flush their queue), then makes sure.
pub fn stop(nodes: &mut [Node]) {
    for n in nodes.iter() {
        let pid = n.child.id().to_string();
        if let Err(e) = Command::new("kill").args(["-TERM", &pid]).status() {
            eprintln!("cannot signal node {}: {e}", n.id);
        }
    }
    for n in nodes.iter_mut() {
        if !exited_within(&mut n.child, Duration::from_secs(6)) {
            eprintln!("node {} did not stop; killing it", n.id);
            n.child.kill().ok();
            n.child.wait().ok();
        }
    }
}

fn exited_within(child: &mut Child, limit: Duration) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_)) | Err(_)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}
