//! The wire (module `wire`), which carries the lane's requests to backends, held to hyper's
//! client, which carries the rest: for the same backend answer, the client gets the same
//! response whichever of the two read it, and the backend the same request bytes. Each lane
//! request is sent twice: in origin form (the lane, then the wire) and in absolute form (hyper's
//! server, then hyper's client).
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/raw.rs"]
mod raw;

use std::net::SocketAddr;
use std::time::Duration;

use raw::{proxy_for_raw, RawBackend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Everything the proxy sends back to `request` (which asks to close) until it closes.
async fn whole_answer(addr: SocketAddr, request: &str) -> String {
    let mut conn = TcpStream::connect(addr).await.unwrap();
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut got));
    read.await.expect("closed within 5 s").unwrap();
    String::from_utf8_lossy(&got).into_owned()
}

/// The answer's lines, sorted, `Date` left out (it moves with the clock), header names in lower
/// case (hyper writes them so; the wire as the backend sent them).
fn comparable(answer: &str) -> Vec<String> {
    let lower_name = |l: &str| match l.split_once(": ") {
        Some((name, value)) => format!("{}: {value}", name.to_ascii_lowercase()),
        None => l.to_string(),
    };
    let mut lines: Vec<String> = answer
        .split("\r\n")
        .filter(|l| !l.to_ascii_lowercase().starts_with("date:"))
        .map(lower_name)
        .collect();
    lines.sort();
    lines
}

/// The lane's request and hyper's for the same thing; both ask to close, so an answer is
/// everything read until the close.
fn both(method: &str, path: &str) -> [String; 2] {
    let close = "Host: app.test\r\nConnection: close\r\n\r\n";
    [
        format!("{method} {path} HTTP/1.1\r\n{close}"),
        format!("{method} http://app.test{path} HTTP/1.1\r\n{close}"),
    ]
}

async fn compare(backend: &RawBackend, method: &str, shown: &str) -> (String, String) {
    let proxy = proxy_for_raw(backend, "").await;
    let [lane, hyper] = both(method, "/x");
    let by_wire = whole_answer(proxy.addr, &lane).await;
    let by_hyper = whole_answer(proxy.addr, &hyper).await;
    assert_eq!(comparable(&by_wire), comparable(&by_hyper), "{shown}");
    assert_eq!(by_wire.lines().next(), by_hyper.lines().next(), "{shown}");
    (by_wire, by_hyper)
}

#[tokio::test]
async fn every_framing_a_backend_may_use_is_read_as_hyper_reads_it() {
    let cases: [(&[u8], &str); 11] = [
        (
            b"HTTP/1.1 200 OK\r\nconnection: x-private, close\r\nx-private: secret\r\nx-kept: 1\r\ncontent-length: 2\r\n\r\nok",
            "ok",
        ),
        (
            b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
            "ok",
        ),
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;x=1\r\nhello\r\n6\r\n world\r\n0\r\nx-t: 1\r\n\r\n",
            "\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        ),
        (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
            "ok",
        ),
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
            "ok",
        ),
        (b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok", "ok"),
        (
            b"HTTP/1.1 201 Created\r\nset-cookie: app=1\r\nx-a: 1\r\nx-a: 2\r\ncontent-length: 4\r\n\r\nmade",
            "made",
        ),
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nkeep-alive: timeout=5\r\nconnection: keep-alive\r\n\r\nok",
            "ok",
        ),
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
            "0\r\n\r\n",
        ),
        (
            b"HTTP/1.1 200 OK\r\nServer: Raw\r\nx-a:1\nContent-Length: 2\r\nConnection: Keep-Alive\r\n\r\nok",
            "ok",
        ),
        (
            b"HTTP/1.1 200 OK\r\nconnection: content-length\r\ncontent-length: 2\r\n\r\nok",
            "ok",
        ),
    ];
    for (reply, body) in cases {
        let backend = RawBackend::answering(reply).await;
        let shown = format!("{:?}", String::from_utf8_lossy(reply));
        let (by_wire, _) = compare(&backend, "GET", &shown).await;
        assert!(by_wire.ends_with(body), "{shown}: {by_wire:?}");
        assert!(
            !by_wire.to_ascii_lowercase().contains("keep-alive"),
            "{shown}: hop-by-hop relayed"
        );
        assert!(
            !by_wire.contains("secret"),
            "{shown}: a header Connection names relayed"
        );
        if shown.contains("Raw") {
            let as_sent = "\r\nServer: Raw\r\nx-a: 1\r\n";
            assert!(
                by_wire.contains(as_sent),
                "{shown}: names as sent: {by_wire:?}"
            );
        }
    }
}

#[tokio::test]
async fn a_body_until_the_close_is_relayed_whole() {
    let backend = RawBackend::closing(b"HTTP/1.1 200 OK\r\nx-a: 1\r\n\r\nall of it").await;
    let (by_wire, _) = compare(&backend, "GET", "until the close").await;
    assert!(
        by_wire.ends_with("\r\n\r\n9\r\nall of it\r\n0\r\n\r\n"),
        "{by_wire:?}"
    );
}

/// Answers that cannot be relayed (a switch nobody asked for among them) are a 502 from both,
/// with the generic body.
#[tokio::test]
async fn broken_answers_are_a_502_from_both() {
    let cases: [&[u8]; 5] = [
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\ncontent-length: 0\r\n\r\n",
    ];
    for reply in cases {
        let backend = RawBackend::answering(reply).await;
        let shown = format!("{:?}", String::from_utf8_lossy(reply));
        let (by_wire, _) = compare(&backend, "GET", &shown).await;
        assert!(by_wire.starts_with("HTTP/1.1 502 "), "{shown}: {by_wire:?}");
    }
}

/// A body cut short by the backend ends the client's connection before the answer is whole:
/// the client can tell.
#[tokio::test]
async fn a_body_cut_short_is_never_passed_off_as_whole() {
    let backend = RawBackend::closing(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort").await;
    let proxy = proxy_for_raw(&backend, "").await;
    let [lane, _] = both("GET", "/x");
    let by_wire = whole_answer(proxy.addr, &lane).await;
    assert!(by_wire.starts_with("HTTP/1.1 200 "), "{by_wire:?}");
    assert!(by_wire.contains("content-length: 10\r\n"), "{by_wire:?}");
    assert!(by_wire.ends_with("\r\n\r\nshort"), "{by_wire:?}");
}

/// The request bytes the backend gets from the wire are hyper's client's, whatever the method.
#[tokio::test]
async fn the_backend_gets_the_bytes_hyper_would_send() {
    for method in ["GET", "POST", "DELETE", "HEAD"] {
        let backend = RawBackend::start().await;
        let proxy = proxy_for_raw(&backend, "").await;
        for request in both(method, "/same") {
            whole_answer(proxy.addr, &request).await;
        }
        let sent: Vec<String> = backend
            .connections()
            .into_iter()
            .flat_map(|c| c.requests)
            .map(|(_, bytes)| String::from_utf8(bytes).unwrap())
            .collect();
        assert_eq!(sent.len(), 2, "{method}: {sent:?}");
        assert_eq!(sent[0], sent[1], "{method}");
    }
}

/// A connection goes back to the pool only after an answer that leaves it usable.
#[tokio::test]
async fn only_a_connection_left_usable_is_used_again() {
    let cases: [(&[u8], usize); 3] = [
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", 1),
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
            3,
        ),
        (b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok", 3),
    ];
    for (reply, connections) in cases {
        let backend = RawBackend::answering(reply).await;
        let proxy = proxy_for_raw(&backend, "").await;
        let [lane, _] = both("GET", "/x");
        for _ in 0..3 {
            let answer = whole_answer(proxy.addr, &lane).await;
            assert!(answer.ends_with("\r\n\r\nok"), "{answer:?}");
        }
        let shown = String::from_utf8_lossy(reply);
        assert_eq!(backend.connections().len(), connections, "{shown:?}");
    }
}
