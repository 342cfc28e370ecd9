//! The `stickylb` binary's command line.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

fn stickylb(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stickylb"))
        .args(args)
        .env_remove("STICKYLB_SECRET")
        .output()
        .unwrap()
}

fn write(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("stickylb-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

const GOOD: &str = "[listener]\naddress = \"127.0.0.1:8080\"\n\n[[backends]]\nid = \"a\"\naddress = \"127.0.0.1:9001\"\n";

#[test]
fn check_accepts_the_shipped_config_and_prints_a_summary() {
    let out = stickylb(&[
        "check",
        "--config",
        concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml"),
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{text}");
    for needle in [
        "OK",
        "listener  127.0.0.1:8080",
        "cookie    stickylb",
        "round_robin",
        "GET /healthz",
        "127.0.0.1:9002",
    ] {
        assert!(text.contains(needle), "summary lacks {needle:?}:\n{text}");
    }
}

#[test]
fn check_warns_about_a_missing_secret() {
    let path = write("nosecret.toml", GOOD);
    let out = stickylb(&["check", "-c", path.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(String::from_utf8(out.stdout).unwrap().contains("NOT SET"));
}

#[test]
fn check_rejects_bad_configs_naming_file_line_key_and_valid_values() {
    let cases = [
        (
            "algo.toml",
            format!("{GOOD}\n[balancer]\nalgorithm = \"random\"\n"),
            ":9: key `balancer.algorithm`",
            "expected `round_robin` or `least_connections`",
        ),
        (
            "unknown.toml",
            format!("{GOOD}weigth = 2\n"),
            ":7: key `backends[0].weigth`",
            "expected one of `id`, `address`, `weight`",
        ),
        (
            "dup.toml",
            format!("{GOOD}\n[[backends]]\nid = \"a\"\naddress = \"127.0.0.1:9002\"\n"),
            ":9: key `backends[1].id`",
            "duplicate id",
        ),
        (
            "addr.toml",
            GOOD.replace("127.0.0.1:9001", "no-port"),
            ":6: key `backends[0].address`",
            "host:port",
        ),
        (
            "dur.toml",
            format!("{GOOD}\n[health]\ninterval = \"soon\"\n"),
            ":9: key `health.interval`",
            "500ms",
        ),
    ];
    for (name, text, location, valid) in cases {
        let path = write(name, &text);
        let out = stickylb(&["check", "--config", path.to_str().unwrap()]);
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(!out.status.success(), "{name} must be rejected");
        assert!(
            err.contains(&format!("{}{location}", path.display())),
            "{name}: {err}"
        );
        assert!(err.contains(valid), "{name}: {err}");
    }
}

#[test]
fn a_missing_file_is_a_clear_error() {
    let out = stickylb(&["check", "--config", "/nonexistent/stickylb.toml"]);
    assert!(!out.status.success());
    assert!(String::from_utf8(out.stderr)
        .unwrap()
        .contains("/nonexistent/stickylb.toml: cannot read file"));
}

#[test]
fn help_and_version() {
    let help = stickylb(&["--help"]);
    let text = String::from_utf8(help.stdout).unwrap();
    assert!(help.status.success() && text.contains("check") && text.contains("--config"));
    let version = stickylb(&["--version"]);
    assert!(String::from_utf8(version.stdout)
        .unwrap()
        .starts_with("stickylb "));
}

/// A port that was free a moment ago (the OS picks it).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn status_backends(admin: u16) -> Option<usize> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", admin)).ok()?;
    s.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let json: serde_json::Value = serde_json::from_str(text.split("\r\n\r\n").nth(1)?).ok()?;
    Some(json["backends"].as_array()?.len())
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn sighup_reloads_the_configuration() {
    let (port, admin) = (free_port(), free_port());
    let base = format!(
        "[listener]\naddress = \"127.0.0.1:{port}\"\n[admin]\naddress = \"127.0.0.1:{admin}\"\n[health]\ninterval = \"1h\"\n\
         [[backends]]\nid = \"a\"\naddress = \"127.0.0.1:1\"\n"
    );
    let path = write("sighup.toml", &base);
    let log = path.with_extension("log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_stickylb"))
        .args(["--config", path.to_str().unwrap()])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_for("admin up", || status_backends(admin) == Some(1));
    std::fs::write(
        &path,
        format!("{base}[[backends]]\nid = \"b\"\naddress = \"127.0.0.1:2\"\n"),
    )
    .unwrap();
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    // The file watcher may notice the change too; the log says which trigger reloaded.
    let reloaded_by_hup = || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.lines()
            .any(|l| l.contains("configuration reloaded") && l.contains("trigger=\"SIGHUP\""))
    };
    wait_for("a reload triggered by SIGHUP", reloaded_by_hup);
    assert_eq!(status_backends(admin), Some(2));
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    assert!(child.wait().unwrap().success(), "SIGTERM is a clean exit");
}

/// Kills the process when the test ends, even by a failed assertion.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

/// A plain GET with `Connection: close`; the reply text, or None if nothing answered in 2 s.
fn get(port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .ok()?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    Some(text)
}

/// User plus system CPU time of a process, in clock ticks (`/proc/PID/stat` fields 14 and 15).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_name.split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn running_out_of_file_descriptors_neither_kills_nor_spins_the_accept_loop() {
    let port = free_port();
    let cfg = format!(
        "[listener]\naddress = \"127.0.0.1:{port}\"\n[health]\ninterval = \"1h\"\n\
         [[backends]]\nid = \"a\"\naddress = \"127.0.0.1:1\"\n"
    );
    let path = write("fds.toml", &cfg);
    let log = path.with_extension("log");
    // 64 descriptors: enough to start, far too few for 120 clients.
    let mut child = Reaped(
        Command::new("sh")
            .args(["-c", "ulimit -n 64 && exec \"$0\" --config \"$1\""])
            .arg(env!("CARGO_BIN_EXE_stickylb"))
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let child = &mut child.0;
    wait_for("the proxy answers", || get(port).is_some());
    // Connections past the kernel's accept backlog may time out; enough get through to starve.
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let clients: Vec<std::net::TcpStream> = (0..120)
        .filter_map(|_| {
            std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(500)).ok()
        })
        .collect();
    assert!(
        clients.len() > 64,
        "only {} clients connected",
        clients.len()
    );
    let exhausted = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("accept failed")
    };
    wait_for("accept failing for lack of descriptors", exhausted);
    let before = cpu_ticks(child.id());
    // A measurement window, not a synchronisation: how much CPU the loop burns while starved.
    std::thread::sleep(std::time::Duration::from_secs(1));
    let used = cpu_ticks(child.id()) - before;
    assert!(child.try_wait().unwrap().is_none(), "the proxy died");
    assert!(
        used < 20,
        "the accept loop spins: {used} ticks of CPU in one second"
    );
    drop(clients);
    wait_for("serving again once descriptors are free", || {
        get(port).is_some_and(|r| r.starts_with("HTTP/1.1 503"))
    });
    let text = std::fs::read_to_string(&log).unwrap();
    let warnings = text.matches("accept failed").count();
    assert!(
        warnings <= 3,
        "{warnings} accept warnings: the log is flooded"
    );
    assert!(text.contains("accepting again"), "{text}");
    println!("FIGURE fd exhaustion: {used} CPU ticks (1/100 s) in 1 s while starved; recovered");
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    assert!(child.wait().unwrap().success());
}

#[test]
fn check_summarises_forwarding_and_pin_lifetime() {
    let text = GOOD
        .replace(
            "address = \"127.0.0.1:8080\"\n",
            "address = \"127.0.0.1:8080\"\ntrusted_proxies = [\"10.0.0.0/8\"]\nforwarded = true\n",
        )
        .replace(
            "\n[[backends]]",
            "\n[affinity]\nsecret = \"0123456789abcdef\"\nmax_age = \"1h\"\nprevious_secrets = [\"old-secret-0123456789\"]\n\n[[backends]]",
        );
    let path = write("summary.toml", &text);
    let out = stickylb(&["check", "-c", path.to_str().unwrap()]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{text}");
    for needle in [
        "(HTTP/1.1 and h2c)",
        "extended from 10.0.0.0/8, replaced from others (+ Forwarded)",
        "pins expire after 1h, checked by the proxy",
        "1 previous secret(s) accepted and re-issued",
    ] {
        assert!(text.contains(needle), "summary lacks {needle:?}:\n{text}");
    }
}

/// Resident memory of a process in KiB (`VmRSS` in `/proc/PID/status`).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Lets this process hold as many sockets as it may.
fn raise_open_file_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let raised = Rlimit {
        current: limit.maximum,
        ..limit
    };
    setrlimit(Resource::Nofile, raised).unwrap();
}

/// `n` keep-alive clients, opened `wave` at a time, each with one request answered and then idle.
async fn idle_clients(port: u16, n: usize, wave: usize) -> Vec<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let mut open = Vec::with_capacity(n);
    while open.len() < n {
        let batch = (0..wave.min(n - open.len())).map(|_| async move {
            let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            conn.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
                .await
                .unwrap();
            assert_eq!(common::read_response(&mut conn).await.0, 200);
            conn
        });
        open.extend(futures_util::future::join_all(batch).await);
    }
    open
}

/// A burst of clients makes the proxy allocate request state and upstream connections by the
/// hundred; once the clients idle (parked) and the upstream connections are closed, that memory
/// must go back to the OS, not stay resident: at most 3.5 KiB per idle client above the RSS the
/// proxy started with (HAProxy measures about 2 KB per idle client in `bench/idle_rss.sh`).
#[tokio::test(flavor = "multi_thread")]
async fn memory_a_burst_of_clients_used_goes_back_to_the_os_once_they_idle() {
    idle_memory_goes_back("").await;
}

/// The same with one worker, on io_uring: no park hooks there, a timer collects instead.
#[tokio::test(flavor = "multi_thread")]
async fn memory_goes_back_with_a_single_io_uring_worker_too() {
    let log = idle_memory_goes_back("[runtime]\nworkers = 1\n").await;
    assert!(
        log.contains("requests to backends go through io_uring"),
        "{log}"
    );
}

/// Runs the burst with `runtime` added to the config; the proxy's log.
async fn idle_memory_goes_back(runtime: &str) -> String {
    const CLIENTS: u64 = 3000;
    raise_open_file_limit();
    let up = common::Upstream::start("a").await;
    let port = free_port();
    let cfg = format!(
        "[listener]\naddress = \"127.0.0.1:{port}\"\n[affinity]\nsecret = \"test-secret-0123456789\"\n\
         [timeouts]\nclient_park = \"200ms\"\nbackend_idle = \"500ms\"\n{runtime}\
         [[backends]]\nid = \"a\"\naddress = \"{}\"\n",
        up.addr
    );
    let path = write(&format!("idle-memory-{port}.toml"), &cfg);
    let child = Reaped(
        Command::new("sh")
            .args([
                "-c",
                "ulimit -n \"$(ulimit -Hn)\" && exec \"$0\" --config \"$1\"",
            ])
            .arg(env!("CARGO_BIN_EXE_stickylb"))
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(path.with_extension("log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id();
    common::eventually(Duration::from_secs(10), "the proxy answers", || {
        get(port).is_some_and(|r| r.starts_with("HTTP/1.1 200"))
    })
    .await;
    let base = rss_kib(pid);
    let clients = idle_clients(port, CLIENTS as usize, 500).await;
    let peak = rss_kib(pid);
    let bound = CLIENTS * 7 / 2;
    common::eventually(
        Duration::from_secs(30),
        &format!("RSS within {bound} KiB of the {base} KiB before {CLIENTS} idle clients"),
        || rss_kib(pid).saturating_sub(base) <= bound,
    )
    .await;
    let added = rss_kib(pid).saturating_sub(base);
    println!(
        "FIGURE idle memory: {base} KiB before, {peak} KiB after the burst, {added} KiB above \
         the start with {CLIENTS} idle clients ({:.1} KiB each)",
        added as f64 / CLIENTS as f64
    );
    drop(clients);
    std::fs::read_to_string(path.with_extension("log")).unwrap()
}
