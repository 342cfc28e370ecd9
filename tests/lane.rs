//! The HTTP/1 lane (module `lane`) held to hyper's path: the same request gives the backend the
//! same bytes and the client the same answer whichever of the two serves it. And what the lane
//! does on its own: pipelined requests, `Connection: close`, chunked answers re-framed, a `Date`
//! where the backend sent none, and a client that leaves mid-exchange.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/raw.rs"]
mod raw;

use std::time::Duration;

use common::{config, eventually, read_response, Clientele, Proxy, Upstream};
use raw::{proxy_for_raw, RawBackend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until `n` whole responses with `Content-Length` bodies have come; their texts.
async fn responses(conn: &mut TcpStream, n: usize) -> Vec<String> {
    let (mut got, mut texts) = (Vec::new(), Vec::new());
    let mut buf = [0u8; 4096];
    while texts.len() < n {
        if let Some(len) = whole_response(&got) {
            texts.push(String::from_utf8_lossy(&got[..len]).into_owned());
            got.drain(..len);
            continue;
        }
        let read = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf));
        let k = read.await.expect("a response within 5 s").unwrap();
        assert!(k > 0, "closed after {texts:?} and {got:?}");
        got.extend_from_slice(&buf[..k]);
    }
    texts
}

/// One response to `request`, sent on a connection of its own; `bodiless` for HEAD, 204, 304.
async fn answer(addr: std::net::SocketAddr, request: &str, bodiless: bool) -> String {
    let mut conn = TcpStream::connect(addr).await.unwrap();
    conn.write_all(request.as_bytes()).await.unwrap();
    let (mut got, mut buf) = (Vec::new(), [0u8; 4096]);
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(head) = resp.parse(&got).unwrap() {
            let whole = if bodiless {
                Some(head)
            } else {
                whole_response(&got)
            };
            if let Some(len) = whole {
                return String::from_utf8_lossy(&got[..len]).into_owned();
            }
        }
        let read = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf));
        let k = read.await.expect("an answer within 5 s").unwrap();
        assert!(k > 0, "closed after {got:?}");
        got.extend_from_slice(&buf[..k]);
    }
}

fn whole_response(data: &[u8]) -> Option<usize> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(head) = resp.parse(data).unwrap() else {
        return None;
    };
    let length = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map_or(0, |h| {
            std::str::from_utf8(h.value).unwrap().parse().unwrap()
        });
    (data.len() >= head + length).then_some(head + length)
}

/// The response's lines, sorted, without `Date` (it moves with the clock) and the pin's value.
fn comparable(response: &str) -> Vec<String> {
    let mut lines: Vec<String> = response
        .split("\r\n")
        .filter(|l| !l.to_ascii_lowercase().starts_with("date:"))
        .map(|l| match l.split_once("stickylb=") {
            Some((before, _)) => format!("{before}stickylb=<pin>"),
            None => l.to_string(),
        })
        .collect();
    lines.sort();
    lines
}

/// A request a browser might send: a cookie, a hop-by-hop header named in `Connection`, a forged
/// forwarding header.
const GET: &str = "GET /same?q=1 HTTP/1.1\r\nHost: app.test\r\nUser-Agent: t/1\r\n\
    Cookie: a=b\r\nConnection: keep-alive, X-Hop\r\nX-Hop: gone\r\n\
    X-Forwarded-For: 6.6.6.6\r\nAccept: */*\r\n\r\n";

#[tokio::test]
async fn the_lane_and_hyper_send_the_backend_the_same_bytes_and_answer_alike() {
    let backend = RawBackend::start().await;
    let proxy = proxy_for_raw(&backend, "").await;
    // The lane serves a connection's common requests.
    let mut lane = TcpStream::connect(proxy.addr).await.unwrap();
    lane.write_all(GET.as_bytes()).await.unwrap();
    let by_lane = responses(&mut lane, 1).await;
    // A request with a body is hyper's, with the connection: so is the GET pipelined behind it.
    let post = "POST /body HTTP/1.1\r\nHost: app.test\r\nContent-Length: 2\r\n\r\nhi";
    let mut hyper = TcpStream::connect(proxy.addr).await.unwrap();
    hyper
        .write_all(format!("{post}{GET}").as_bytes())
        .await
        .unwrap();
    let by_hyper = responses(&mut hyper, 2).await;

    assert_eq!(comparable(&by_lane[0]), comparable(&by_hyper[1]));
    assert!(by_lane[0].to_ascii_lowercase().contains("\r\ndate: "));
    let same: Vec<String> = backend
        .connections()
        .into_iter()
        .flat_map(|c| c.requests)
        .filter(|(path, _)| path == "/same?q=1")
        .map(|(_, bytes)| String::from_utf8(bytes).unwrap())
        .collect();
    assert_eq!(same.len(), 2, "{same:?}");
    assert_eq!(same[0], same[1], "the backend got the same bytes");
    assert!(!same[0].contains("6.6.6.6") && !same[0].to_ascii_lowercase().contains("x-hop"));
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let backend = RawBackend::start().await;
    let proxy = proxy_for_raw(&backend, "").await;
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: app.test\r\n\r\n");
    let mut conn = TcpStream::connect(proxy.addr).await.unwrap();
    let all = format!("{}{}{}", get("/1"), get("/2"), get("/3"));
    conn.write_all(all.as_bytes()).await.unwrap();
    let answers = responses(&mut conn, 3).await;
    assert!(answers.iter().all(|a| a.starts_with("HTTP/1.1 200 OK\r\n")));
    let paths: Vec<String> = backend
        .connections()
        .into_iter()
        .flat_map(|c| c.requests)
        .map(|(path, _)| path)
        .collect();
    assert_eq!(paths, ["/1", "/2", "/3"]);
}

#[tokio::test]
async fn connection_close_is_answered_in_kind_and_the_connection_ends() {
    let backend = RawBackend::start().await;
    let proxy = proxy_for_raw(&backend, "").await;
    let mut conn = TcpStream::connect(proxy.addr).await.unwrap();
    let get = "GET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n";
    conn.write_all(get.as_bytes()).await.unwrap();
    let mut all = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut all));
    read.await.expect("closed within 5 s").unwrap();
    let text = String::from_utf8(all).unwrap();
    assert!(text.contains("\r\nconnection: close\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\nraw"), "one response, whole: {text}");
}

#[tokio::test]
async fn a_chunked_answer_is_re_framed_and_the_connection_kept() {
    let chunked =
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
    let backend = RawBackend::answering(chunked).await;
    let proxy = proxy_for_raw(&backend, "").await;
    let client = Clientele::new(proxy.addr);
    for _ in 0..2 {
        let reply = client.get("/stream", None).await;
        assert_eq!((reply.status.as_u16(), reply.body.as_str()), (200, "abcde"));
    }
    let conns = backend.connections();
    assert_eq!(conns.iter().map(|c| c.requests.len()).sum::<usize>(), 2);
}

/// The exchange held is the connection's second: the lane's watch on the client's socket is
/// made anew for each exchange.
#[tokio::test]
async fn a_client_that_leaves_mid_exchange_frees_the_backend_at_once() {
    let a = Upstream::start("a").await;
    let proxy = Proxy::start(&config(&[&a], "[health]\ninterval = \"1h\"\n")).await;
    let backend = proxy.lb.backend("a").unwrap();
    let mut conn = TcpStream::connect(proxy.addr).await.unwrap();
    let first = "GET / HTTP/1.1\r\nHost: app.test\r\n\r\n";
    conn.write_all(first.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut conn).await.0, 200);
    let get = "GET /hold HTTP/1.1\r\nHost: app.test\r\n\r\n";
    conn.write_all(get.as_bytes()).await.unwrap();
    eventually(Duration::from_secs(5), "the request is held", || {
        a.holding() == 1 && backend.active() == 1
    })
    .await;
    drop(conn);
    eventually(Duration::from_secs(5), "the exchange is dropped", || {
        backend.active() == 0
    })
    .await;
    a.release(1);
}

/// Answers the lane writes itself, against hyper's for the same request (sent in absolute form,
/// which the lane leaves to hyper): the same status line, headers and body.
#[tokio::test]
async fn the_lane_words_unusual_answers_as_hyper_does() {
    let cases: [(&[u8], &str, bool); 6] = [
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n",
            "HEAD",
            true,
        ),
        (b"HTTP/1.1 204 No Content\r\nx-a: 1\r\n\r\n", "GET", true),
        (
            b"HTTP/1.1 304 Not Modified\r\netag: \"v1\"\r\n\r\n",
            "GET",
            true,
        ),
        (
            b"HTTP/1.1 200 Fine\r\ncontent-length: 2\r\n\r\nok",
            "GET",
            false,
        ),
        (b"HTTP/1.1 599 \r\ncontent-length: 0\r\n\r\n", "GET", false),
        (
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 4\r\n\r\ngone",
            "GET",
            false,
        ),
    ];
    for (reply, method, bodiless) in cases {
        let backend = RawBackend::answering(reply).await;
        let proxy = proxy_for_raw(&backend, "").await;
        let lane = format!("{method} /x HTTP/1.1\r\nHost: app.test\r\n\r\n");
        let hyper = format!("{method} http://app.test/x HTTP/1.1\r\nHost: app.test\r\n\r\n");
        let by_lane = answer(proxy.addr, &lane, bodiless).await;
        let by_hyper = answer(proxy.addr, &hyper, bodiless).await;
        let shown = String::from_utf8_lossy(reply);
        assert_eq!(comparable(&by_lane), comparable(&by_hyper), "{shown:?}");
        assert_eq!(by_lane.lines().next(), by_hyper.lines().next(), "{shown:?}");
    }
}

#[tokio::test]
async fn on_shutdown_the_request_in_flight_is_answered_and_a_pipelined_one_is_not_taken() {
    let a = Upstream::start("a").await;
    let mut proxy = Proxy::start(&config(&[&a], "[health]\ninterval = \"1h\"\n")).await;
    let mut conn = TcpStream::connect(proxy.addr).await.unwrap();
    let two =
        "GET /hold HTTP/1.1\r\nHost: app.test\r\n\r\nGET /two HTTP/1.1\r\nHost: app.test\r\n\r\n";
    conn.write_all(two.as_bytes()).await.unwrap();
    eventually(Duration::from_secs(5), "the first request is held", || {
        a.holding() == 1
    })
    .await;
    let server = proxy.shutdown();
    a.release(1);
    let mut all = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut all));
    read.await.expect("closed within 5 s").unwrap();
    let text = String::from_utf8(all).unwrap();
    assert_eq!(text.matches("HTTP/1.1 200").count(), 1, "{text}");
    let paths: Vec<String> = a.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(paths, ["/hold"]);
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("the server stops")
        .unwrap();
}

/// A kept-alive connection waiting for its next request is closed at once on shutdown, not at
/// the end of the grace period (10 s by default).
#[tokio::test]
async fn on_shutdown_a_connection_waiting_for_its_next_request_is_closed() {
    let a = Upstream::start("a").await;
    // Not parked meanwhile: a parked connection is closed on shutdown by other means.
    let quiet = "[health]\ninterval = \"1h\"\n[timeouts]\nclient_park = \"1h\"\n";
    let mut proxy = Proxy::start(&config(&[&a], quiet)).await;
    let mut conn = TcpStream::connect(proxy.addr).await.unwrap();
    for _ in 0..2 {
        conn.write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
            .await
            .unwrap();
        assert!(responses(&mut conn, 1).await[0].starts_with("HTTP/1.1 200"));
    }
    let server = proxy.shutdown();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut rest));
    read.await.expect("closed within 5 s").unwrap();
    assert!(rest.is_empty(), "{rest:?}");
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("the server stops")
        .unwrap();
}

/// The connection's timer is reset each time it finds part of a head and the park time over:
/// reset, it must still fire (a timer that fired gives up its waker until polled again).
#[tokio::test]
async fn a_slow_head_is_cut_off_on_time_across_timer_resets() {
    let backend = RawBackend::start().await;
    let timeouts = "[timeouts]\nclient_header = \"300ms\"\nclient_park = \"50ms\"\n";
    let proxy = proxy_for_raw(&backend, timeouts).await;
    let mut slow = TcpStream::connect(proxy.addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: app.te")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut rest));
    read.await.expect("cut off within 5 s").ok();
    let after = started.elapsed();
    assert!(
        after >= Duration::from_millis(290) && after < Duration::from_secs(3),
        "{after:?}"
    );
    assert!(backend.connections().is_empty(), "nothing was forwarded");
}

#[tokio::test]
async fn a_large_answer_arrives_intact_and_the_connection_is_kept() {
    let body: String = (0..300_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let reply = format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let backend = RawBackend::answering(Box::leak(reply.into_bytes().into_boxed_slice())).await;
    let proxy = proxy_for_raw(&backend, "").await;
    let client = Clientele::new(proxy.addr);
    for _ in 0..2 {
        let got = client.get("/big", None).await;
        assert_eq!(got.status.as_u16(), 200);
        assert!(
            got.body == body,
            "{} bytes, not byte for byte",
            got.body.len()
        );
    }
}
