//! A single worker's requests to backends sent through io_uring (module `uring`): stickylb on
//! `uring::Runtime`, on a thread of its own as the binary runs it with `workers = 1`, carries
//! every request whole under concurrency and with a head larger than one send may take, fails
//! over when the pinned backend dies, and sends each request through io_uring.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;

use common::{config, jar, pin_to, read_response, Clientele, Upstream};
use std::time::Duration;
use stickylb::config::Config;
use stickylb::Stickylb;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

const CLIENTS: usize = 50;
const REQUESTS: usize = 20;

/// Runs stickylb on `uring::Runtime` on a new thread until `stop` is sent.
fn start(toml: &str) -> (SocketAddr, oneshot::Sender<()>, std::thread::JoinHandle<()>) {
    let config = Config::parse(toml, Path::new("test.toml"), None).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let runtime = stickylb::uring::Runtime::new().expect("io_uring is allowed here");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let shutdown = async move { drop(stopped.await) };
            Stickylb::new(config).serve(listener, None, shutdown).await;
        });
    });
    (addr, stop, thread)
}

/// One keep-alive client's requests, each path its own; the bodies (the node ids) it got.
async fn client(proxy: SocketAddr, n: usize) -> Vec<String> {
    let mut conn = TcpStream::connect(proxy).await.unwrap();
    let mut bodies = Vec::new();
    for i in 0..REQUESTS {
        let request = format!("GET /c{n}/r{i} HTTP/1.1\r\nHost: t\r\n\r\n");
        conn.write_all(request.as_bytes()).await.unwrap();
        let (status, body) = read_response(&mut conn).await;
        assert_eq!(status, 200, "client {n}, request {i}");
        bodies.push(body);
    }
    bodies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_worker_sends_every_request_whole_through_io_uring() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let toml = config(&[&a, &b], "[health]\ninterval = \"1h\"\n");
    let (proxy, stop, thread) = start(&toml);
    let before = stickylb::uring::sends();

    let clients = (0..CLIENTS).map(|n| tokio::spawn(client(proxy, n)));
    for done in futures_util::future::join_all(clients).await {
        assert_eq!(done.unwrap().len(), REQUESTS);
    }
    let paths: BTreeSet<String> = [a.seen(), b.seen()]
        .concat()
        .into_iter()
        .map(|s| s.path)
        .collect();
    let expected: BTreeSet<String> = (0..CLIENTS)
        .flat_map(|n| (0..REQUESTS).map(move |i| format!("/c{n}/r{i}")))
        .collect();
    assert_eq!(paths, expected, "each request reached a backend once");
    assert_eq!(a.hits() + b.hits(), CLIENTS * REQUESTS);
    let sent = stickylb::uring::sends() - before;
    assert!(
        sent >= (CLIENTS * REQUESTS) as u64,
        "{sent} sends through io_uring for {} requests",
        CLIENTS * REQUESTS
    );

    // A head of 60,000 bytes: more than a new connection's send buffer may take in one send.
    let big = "x".repeat(60_000);
    let mut conn = TcpStream::connect(proxy).await.unwrap();
    let request = format!("GET /big HTTP/1.1\r\nHost: t\r\nX-Big: {big}\r\n\r\n");
    conn.write_all(request.as_bytes()).await.unwrap();
    let (status, node) = read_response(&mut conn).await;
    assert_eq!(status, 200);
    let up = if node == "a" { &a } else { &b };
    let seen = up.seen().into_iter().find(|s| s.path == "/big").unwrap();
    assert_eq!(seen.headers["x-big"], big.as_str());

    // The pinned node dies: the client's next request is answered by the other, and re-pinned.
    let clientele = Clientele::new(proxy);
    let pin = pin_to(&clientele, "a").await;
    a.kill().await;
    let reply = clientele.get("/after", Some(&jar(&pin))).await;
    assert_eq!((reply.status.as_u16(), reply.served_by()), (200, "b"));
    assert!(reply.pin().is_some_and(|p| p != pin), "re-pinned to b");

    stop.send(()).unwrap();
    thread.join().unwrap();
}

/// Whether any descriptor of this process still refers to `socket` (a `socket:[inode]` link).
fn still_open(socket: &std::path::Path) -> bool {
    let fds = std::fs::read_dir("/proc/self/fd").unwrap();
    fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .any(|target| target == socket)
}

/// A send into a full socket waits for room; when its request is dropped meanwhile (the head
/// was late, or the client left) and the backend never reads, dropping the connection must still
/// close it: no descriptor of it is left open, waiting for a backend that may never read.
#[test]
fn a_send_waiting_for_room_does_not_keep_a_dropped_connection_open() {
    use std::os::fd::AsRawFd;
    let runtime = stickylb::uring::Runtime::new().expect("io_uring is allowed here");
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let conn = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (_never_reads, _) = listener.accept().await.unwrap();
        let socket = std::fs::read_link(format!("/proc/self/fd/{}", conn.as_raw_fd())).unwrap();
        let chunk = vec![7u8; 64 * 1024];
        while conn.try_write(&chunk).is_ok() {}
        let sender = stickylb::uring::Sender::for_stream(&conn).expect("on the io_uring runtime");
        let mut sending = Box::pin(sender.send(vec![8u8; 1024]));
        assert!(
            futures_util::poll!(&mut sending).is_pending(),
            "no room: it waits"
        );
        drop(sending);
        drop(sender);
        drop(conn);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while still_open(&socket) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{socket:?} is still open"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
}
