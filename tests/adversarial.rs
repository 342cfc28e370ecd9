//! The adversarial suite: raw TCP to stickylb, a raw-TCP capture backend behind it, and for each
//! case the status the client gets and the exact bytes (if any) that reached the backend.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/raw.rs"]
mod raw;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{eventually, read_response};
use raw::{proxy_for, proxy_for_raw, RawBackend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `bytes` and reads until the proxy closes the connection (or 5 s pass).
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> (String, bool) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut reply = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut reply))
        .await
        .is_ok();
    (String::from_utf8_lossy(&reply).into_owned(), closed)
}

/// Refused requests: the status, `Connection: close`, no address in the reply, and not one byte at
/// the backend.
#[tokio::test]
async fn hostile_requests_get_the_right_4xx_and_not_one_byte_reaches_the_backend() {
    let backend = RawBackend::start().await;
    let proxy = proxy_for_raw(&backend, "[limits]\nmax_header_bytes = 8192\n").await;
    let big = format!(
        "GET / HTTP/1.1\r\nHost: app.test\r\nX-Big: {}\r\n\r\n",
        "x".repeat(9000)
    );
    let cases: &[(&str, &[u8], &str)] = &[
        ("disguised chunked", b"POST / HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: xchunked\r\n\r\n", "400"),
        ("chunked twice", b"POST / HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", "400"),
        ("chunked on two lines", b"POST / HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "400"),
        ("chunked not last", b"POST / HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", "400"),
        ("Content-Length then chunked", b"POST / HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "400"),
        ("chunked then Content-Length", b"POST / HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n", "400"),
        ("two Content-Lengths", b"POST / HTTP/1.1\r\nHost: app.test\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", "400"),
        ("bad Content-Length", b"POST / HTTP/1.1\r\nHost: app.test\r\nContent-Length: +3\r\n\r\nabc", "400"),
        ("no Host", b"GET / HTTP/1.1\r\n\r\n", "400"),
        ("two Hosts", b"GET / HTTP/1.1\r\nHost: app.test\r\nHost: evil.test\r\n\r\n", "400"),
        ("malformed Host", b"GET / HTTP/1.1\r\nHost: user@app.test\r\n\r\n", "400"),
        ("absolute-form elsewhere", b"GET http://evil.test/ HTTP/1.1\r\nHost: app.test\r\n\r\n", "400"),
        ("CONNECT", b"CONNECT app.test:443 HTTP/1.1\r\nHost: app.test:443\r\n\r\n", "405"),
        ("asterisk outside OPTIONS", b"GET * HTTP/1.1\r\nHost: app.test\r\n\r\n", "400"),
        ("Connection names framing", b"GET / HTTP/1.1\r\nHost: app.test\r\nConnection: Content-Length\r\n\r\n", "400"),
        ("Connection names Transfer-Encoding", b"GET / HTTP/1.1\r\nHost: app.test\r\nConnection: transfer-encoding\r\n\r\n", "400"),
        ("h2c upgrade", b"GET / HTTP/1.1\r\nHost: app.test\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n", "400"),
        ("non-ASCII cookie", b"GET / HTTP/1.1\r\nHost: app.test\r\nCookie: a=\xff\xfe\r\n\r\n", "400"),
        ("non-ASCII header", b"GET / HTTP/1.1\r\nHost: app.test\r\nX-Name: caf\xc3\xa9\r\n\r\n", "400"),
        ("obsolete line folding", b"GET / HTTP/1.1\r\nHost: app.test\r\nX-A: 1\r\n folded\r\n\r\n", "400"),
        ("space before colon", b"GET / HTTP/1.1\r\nHost : app.test\r\n\r\n", "400"),
        ("oversized head", big.as_bytes(), "431"),
    ];
    for (name, bytes, status) in cases {
        let (reply, closed) = exchange(proxy.addr, bytes).await;
        assert!(
            reply.starts_with(&format!("HTTP/1.1 {status}")),
            "{name}: {reply}"
        );
        assert!(closed, "{name}: the connection is closed after a refusal");
        assert!(
            !reply.contains(&backend.addr.to_string()),
            "{name}: {reply}"
        );
        assert!(
            !reply.contains("127.0.0.1"),
            "{name}: no addresses in replies"
        );
        assert_eq!(backend.received(), b"", "{name}: bytes reached the backend");
    }
}

/// hyper settles Content-Length with chunked itself (chunked wins) before the service runs;
/// stickylb follows the framing of the raw stream to refuse such a head anyway. On one keep-alive
/// connection, bodies that merely look like ambiguous heads pass, and the real one is refused.
#[tokio::test]
async fn an_ambiguous_head_is_refused_even_behind_bodies_that_look_like_one() {
    let backend = RawBackend::start().await;
    let proxy = proxy_for_raw(&backend, "").await;
    let fake = "GET /fake HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
    let pipelined = format!(
        "POST /a HTTP/1.1\r\nHost: app.test\r\nContent-Length: {}\r\n\r\n{fake}\
         POST /b HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n\
         {:x}\r\n{fake}\r\n0\r\n\r\n\
         POST /c HTTP/1.1\r\nHost: app.test\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n\
         3\r\nabc\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: app.test\r\n\r\n",
        fake.len(),
        fake.len()
    );
    let (reply, closed) = exchange(proxy.addr, pipelined.as_bytes()).await;
    let statuses: Vec<&str> = reply
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &reply[i + 9..i + 12])
        .collect();
    assert_eq!(statuses, ["200", "200", "400"], "{reply}");
    assert!(closed, "the connection is closed after the refusal");
    let paths: Vec<String> = backend
        .connections()
        .iter()
        .flat_map(|c| c.requests.iter().map(|(path, _)| path.clone()))
        .collect();
    assert_eq!(
        paths,
        ["/a", "/b"],
        "the refused head never reached the backend"
    );
    let got = String::from_utf8_lossy(&backend.received()).into_owned();
    assert!(!got.contains("/c") && !got.contains("smuggled"), "{got}");
}

/// What a well-formed request looks like at the backend: hop-by-hop headers and the affinity
/// cookie gone, other cookies verbatim, forwarding headers replaced.
#[tokio::test]
async fn the_backend_receives_exactly_the_cleaned_request() {
    let backend = RawBackend::start().await;
    let proxy = proxy_for_raw(&backend, "").await;
    let request = b"GET /page?q=1 HTTP/1.1\r\nHost: app.test\r\nConnection: close, X-Secret\r\n\
                    X-Secret: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: Basic eA==\r\n\
                    X-Forwarded-For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\n\
                    Cookie: app=1; stickylb=forged; theme=\"dark\"\r\nX-Kept: yes\r\n\r\n";
    let (reply, _) = exchange(proxy.addr, request).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let got = String::from_utf8(backend.received()).unwrap();
    let head: Vec<&str> = got.split("\r\n").collect();
    assert_eq!(head[0], "GET /page?q=1 HTTP/1.1");
    let lower = got.to_ascii_lowercase();
    for gone in [
        "x-secret",
        "keep-alive",
        "\r\nte:",
        "proxy-authorization",
        "forwarded:",
        "stickylb",
    ] {
        assert!(!lower.contains(gone), "{gone} reached the backend: {got}");
    }
    for line in [
        "cookie: app=1; theme=\"dark\"",
        "x-forwarded-for: 127.0.0.1",
        "x-real-ip: 127.0.0.1",
        "x-kept: yes",
        "\r\nhost: app.test",
    ] {
        assert_eq!(lower.matches(line).count(), 1, "{line} once: {got}");
    }
}

/// A client that goes away mid-body: the upstream request is aborted (its connection closed,
/// since the backend is mid-message) and that connection is never used again.
#[tokio::test]
async fn a_client_abort_mid_body_aborts_the_upstream_request_and_its_connection() {
    let backend = RawBackend::start().await;
    let proxy = proxy_for_raw(&backend, "").await;
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    let head = b"POST /upload HTTP/1.1\r\nHost: app.test\r\nContent-Length: 100000\r\n\r\n";
    client.write_all(head).await.unwrap();
    client.write_all(&[b'x'; 1000]).await.unwrap();
    let started = Instant::now();
    eventually(Duration::from_secs(5), "upload reached the backend", || {
        backend.received().windows(7).any(|w| w == b"/upload")
    })
    .await;
    drop(client);
    eventually(Duration::from_secs(5), "upstream connection closed", || {
        backend
            .connections()
            .iter()
            .any(|c| c.closed && !c.bytes.is_empty())
    })
    .await;
    let aborted_after = started.elapsed();
    let (reply, _) = exchange(
        proxy.addr,
        b"GET /next HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let conns = backend.connections();
    let upload = conns
        .iter()
        .position(|c| c.bytes.windows(7).any(|w| w == b"/upload"));
    let next = conns
        .iter()
        .position(|c| c.requests.iter().any(|(p, _)| p == "/next"));
    assert_ne!(upload, next, "the aborted connection was reused");
    assert!(
        conns[upload.unwrap()].requests.is_empty(),
        "the upload never completed"
    );
    println!("FIGURE client abort: upstream connection closed within {aborted_after:?}");
}

/// Idle upstream connections are reused while fresh and closed after `timeouts.backend_idle`, so
/// stickylb lets go first rather than racing a backend's own keep-alive timeout with a reuse.
#[tokio::test]
async fn idle_upstream_connections_are_reused_then_closed_after_backend_idle() {
    let backend = RawBackend::start().await;
    let proxy = proxy_for_raw(&backend, "[timeouts]\nbackend_idle = \"300ms\"\n").await;
    let get = b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    for _ in 0..2 {
        let (reply, _) = exchange(proxy.addr, get).await;
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    }
    let idle_from = std::time::Instant::now();
    let conns = backend.connections();
    assert_eq!(
        conns.len(),
        1,
        "the second request reused the pooled connection"
    );
    assert_eq!(conns[0].requests.len(), 2);
    eventually(
        Duration::from_secs(5),
        "the idle upstream connection is closed",
        || backend.connections()[0].closed,
    )
    .await;
    let idle = idle_from.elapsed();
    assert!(
        idle >= Duration::from_millis(250) && idle < Duration::from_millis(1500),
        "closed after {idle:?}, not about 300 ms"
    );
    println!("FIGURE idle upstream connection closed {idle:?} after its last use");
}

/// A backend that closes a keep-alive connection right after answering, without saying
/// `Connection: close`, leaves a dead connection in the pool: the next request passes it over
/// and is served on a new connection, with no error for the client.
#[tokio::test]
async fn a_pooled_connection_the_backend_closed_is_passed_over() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (closed_tx, mut closed) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(answer_once_and_close(stream, closed_tx.clone()));
        }
    });
    let proxy = proxy_for(addr, "").await;
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    for i in 0..5 {
        let path = format!("/n{i}");
        let get = format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n");
        client.write_all(get.as_bytes()).await.unwrap();
        let reply = read_response(&mut client).await;
        assert_eq!(reply, (200, "ok".to_string()), "request {i}");
        // The connection that answered is closed before the next request is sent.
        loop {
            let answered = tokio::time::timeout(Duration::from_secs(5), closed.recv())
                .await
                .expect("the backend closes the connection it answered on")
                .unwrap();
            if answered == path {
                break;
            }
        }
    }
}

/// Answers one request with `200 ok`, keep-alive implied, then closes; reports the path.
async fn answer_once_and_close(
    mut stream: TcpStream,
    closed: tokio::sync::mpsc::UnboundedSender<String>,
) {
    let mut head = Vec::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut buf = [0u8; 4096];
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let path = head
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string();
    stream
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        .await
        .unwrap();
    drop(stream);
    closed.send(path).unwrap();
}

/// `timeouts.client_header` bounds both a slow request head (slowloris) and an idle keep-alive
/// connection: the clock runs from the end of the last request (or the connection's start)
/// until the next head is whole. A head begun and not finished is dropped, not closed
/// gracefully, which would wait for the rest of it.
#[tokio::test]
async fn slow_heads_and_idle_keep_alive_connections_are_closed_after_client_header() {
    let backend = RawBackend::start().await;
    let proxy = proxy_for_raw(&backend, "[timeouts]\nclient_header = \"300ms\"\n").await;

    let mut slow = TcpStream::connect(proxy.addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: app.te")
        .await
        .unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut rest))
        .await
        .expect("a slow head is cut off")
        .ok();
    let slow_after = started.elapsed();

    let mut idle = TcpStream::connect(proxy.addr).await.unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
        .await
        .unwrap();
    let mut reply = vec![0u8; 1024];
    let n = idle.read(&mut reply).await.unwrap();
    assert!(reply[..n].starts_with(b"HTTP/1.1 200"));
    let answered = Instant::now();
    let mut tail = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut tail))
        .await
        .expect("an idle keep-alive connection is closed")
        .unwrap();
    let idle_after = answered.elapsed();
    println!("FIGURE client_header 300ms: slow head closed after {slow_after:?}, idle keep-alive after {idle_after:?}");
    for after in [slow_after, idle_after] {
        assert!(
            after >= Duration::from_millis(290) && after < Duration::from_secs(3),
            "{after:?}"
        );
    }
    let forwarded: usize = backend.connections().iter().map(|c| c.requests.len()).sum();
    assert_eq!(forwarded, 1, "only the complete request was forwarded");
}
