//! End-to-end behaviour of the proxy over real loopback sockets.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{
    config, eventually, jar, pin_to, read_response, throughout, Clientele, Proxy, Upstream,
};

const QUIET_HEALTH: &str = "[health]\ninterval = \"1h\"\n";
const FAST_HEALTH: &str =
    "[health]\ninterval = \"20ms\"\ntimeout = \"200ms\"\nrise = 2\nfall = 2\n";

#[tokio::test]
async fn a_pinned_client_always_reaches_the_same_backend() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let proxy = Proxy::start(&config(&[&a, &b], QUIET_HEALTH)).await;
    let client = Clientele::new(proxy.addr);

    let first = client.get("/", None).await;
    let pin = first.pin().expect("a new client is pinned");
    let owner = first.served_by().to_string();
    for i in 0..100 {
        let r = client.get(&format!("/page/{i}"), Some(&jar(&pin))).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.served_by(), owner, "request {i} left the pinned backend");
        assert!(r.pin().is_none(), "an unchanged pin must not be set again");
    }
    let other = if owner == "a" { &b } else { &a };
    assert_eq!(other.hits(), 0);
}

async fn spread(algorithm: &str) -> HashMap<String, usize> {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let mut cfg = config(
        &[&a, &b],
        &format!("{QUIET_HEALTH}[balancer]\nalgorithm = \"{algorithm}\"\n"),
    );
    cfg = cfg.replacen(
        &format!("address = \"{}\"\n", b.addr),
        &format!("address = \"{}\"\nweight = 3\n", b.addr),
        1,
    );
    let proxy = Proxy::start(&cfg).await;
    let client = Clientele::new(proxy.addr);
    let mut counts = HashMap::new();
    for _ in 0..400 {
        let r = client.get("/", None).await;
        assert!(r.pin().is_some());
        *counts.entry(r.served_by().to_string()).or_insert(0) += 1;
    }
    counts
}

#[tokio::test]
async fn new_clients_spread_by_weight_with_round_robin() {
    let counts = spread("round_robin").await;
    assert_eq!((counts["a"], counts["b"]), (100, 300));
}

#[tokio::test]
async fn pinned_requests_between_new_sessions_leave_the_round_robin_alone() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let proxy = Proxy::start(&config(&[&a, &b], QUIET_HEALTH)).await;
    let client = Clientele::new(proxy.addr);
    let pin = client
        .get("/", None)
        .await
        .pin()
        .expect("a new client is pinned");
    let mut counts = HashMap::new();
    for _ in 0..20 {
        let fresh = client.get("/", None).await;
        assert!(fresh.pin().is_some());
        *counts.entry(fresh.served_by().to_string()).or_insert(0) += 1;
        // One pinned request after each new session: if it moved the cursor, every new
        // session would land on the same backend.
        assert_eq!(client.get("/", Some(&jar(&pin))).await.status, 200);
    }
    let count = |id: &str| counts.get(id).copied().unwrap_or(0);
    assert_eq!(
        (count("a"), count("b")),
        (10, 10),
        "new sessions per backend"
    );
}

#[tokio::test]
async fn new_clients_spread_by_weight_with_idle_least_connections() {
    let counts = spread("least_connections").await;
    assert_eq!((counts["a"], counts["b"]), (100, 300));
}

#[tokio::test]
async fn the_cookie_reveals_neither_address_nor_id() {
    let a = Upstream::start("alpha-node").await;
    let proxy = Proxy::start(&config(&[&a], QUIET_HEALTH)).await;
    let r = Clientele::new(proxy.addr).get("/", None).await;
    let header = r
        .set_cookies()
        .into_iter()
        .find(|c| c.starts_with("stickylb="))
        .unwrap();
    let value = r.pin().unwrap();
    for secret in ["alpha", "node", "127.0.0.1", &a.addr.port().to_string()] {
        assert!(
            !header.contains(secret),
            "Set-Cookie {header:?} reveals {secret:?}"
        );
    }
    assert!(
        value.len() >= 22
            && value
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
    );
    assert!(
        header.contains("HttpOnly") && header.contains("SameSite=Lax") && header.contains("Path=/")
    );
}

#[tokio::test]
async fn forged_garbage_and_removed_backend_cookies_get_a_fresh_pin() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let proxy = Proxy::start(&config(&[&a, &b], QUIET_HEALTH)).await;
    let client = Clientele::new(proxy.addr);
    let removed = stickylb::affinity::token(b"test-secret-0123456789", "c");
    let forged = stickylb::affinity::token(b"another-secret-000000", "a");
    let cases = [
        "garbage",
        "",
        "a",
        "127.0.0.1:9001",
        &removed,
        &forged,
        "%00%ff",
        "x\"y",
    ];
    for value in cases {
        let r = client.get("/", Some(&jar(value))).await;
        assert_eq!(r.status, 200, "cookie {value:?}");
        let pin = r
            .pin()
            .unwrap_or_else(|| panic!("cookie {value:?} must get a fresh pin"));
        assert_ne!(pin, value);
        assert!(r.headers.get("x-stickylb-failover").is_none());
    }
    let seen: Vec<_> = a.seen().into_iter().chain(b.seen()).collect();
    assert!(seen
        .iter()
        .all(|s| !s.headers.contains_key("x-stickylb-failover")));
}

#[tokio::test]
async fn the_affinity_cookie_never_reaches_the_backend_and_others_pass_untouched() {
    let a = Upstream::start("a").await;
    let proxy = Proxy::start(&config(&[&a], QUIET_HEALTH)).await;
    let client = Clientele::new(proxy.addr);
    let pin = client.get("/", None).await.pin().unwrap();
    let r = client
        .get(
            "/x",
            Some(&format!(
                "theme=dark; stickylb={pin}; sid=\"abc def\"; stickylb=junk"
            )),
        )
        .await;
    assert_eq!(r.status, 200);
    let seen = a.seen().pop().unwrap();
    let cookies: Vec<_> = seen
        .headers
        .get_all("cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(cookies, vec!["theme=dark; sid=\"abc def\""]);

    client.get("/only", Some(&jar(&pin))).await;
    assert!(a.seen().pop().unwrap().headers.get("cookie").is_none());
}

#[tokio::test]
async fn backend_set_cookie_headers_stay_separate_and_forwarding_headers_are_set() {
    let a = Upstream::start("a").await;
    let proxy = Proxy::start(&config(&[&a], QUIET_HEALTH)).await;
    let client = Clientele::new(proxy.addr);
    let r = client.get("/cookies", None).await;
    let cookies = r.set_cookies();
    assert_eq!(cookies.len(), 3, "{cookies:?}");
    assert!(
        cookies.contains(&"app=1; Path=/".to_string())
            && cookies.contains(&"theme=dark; Path=/".to_string())
    );

    let spoofed = [
        ("x-forwarded-for", "6.6.6.6"),
        ("x-forwarded-host", "evil.test"),
        ("connection", "x-drop-me"),
        ("x-drop-me", "1"),
        ("proxy-authorization", "Basic Zm9vOmJhcg=="),
        ("x-kept", "yes"),
    ];
    assert_eq!(
        client.send_with("GET", "/h", &spoofed, "").await.status,
        200
    );
    let seen = a.seen().pop().unwrap();
    for gone in ["connection", "x-drop-me", "proxy-authorization"] {
        assert!(
            !seen.headers.contains_key(gone),
            "{gone} must not be forwarded"
        );
    }
    assert_eq!(seen.headers["x-kept"], "yes");
    assert_eq!(seen.headers["host"], "app.test");
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert_eq!(seen.headers["x-forwarded-host"], "app.test");
}

#[tokio::test]
async fn killing_the_pinned_backend_fails_over_on_the_very_next_request() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let proxy = Proxy::start(&config(&[&a, &b], QUIET_HEALTH)).await;
    let client = Clientele::new(proxy.addr);
    let first = client.get("/", None).await;
    let (pin, owner) = (first.pin().unwrap(), first.served_by().to_string());
    let (victim, survivor) = if owner == "a" { (a, b) } else { (b, a) };
    let victim_id = victim.id.clone();
    victim.kill().await;

    let r = client
        .send("POST", "/cart", Some(&jar(&pin)), "item=42")
        .await;
    assert_eq!(r.status, 200, "no client-visible error: {}", r.body);
    assert_eq!(r.served_by(), survivor.id);
    let new_pin = r.pin().expect("the cookie is re-pinned");
    assert_ne!(new_pin, pin);
    let seen = survivor.seen().pop().unwrap();
    assert_eq!(seen.headers["x-stickylb-failover"], victim_id.as_str());
    assert_eq!(
        seen.body, "item=42",
        "the POST body reached the new backend whole"
    );
    assert!(
        !proxy.is_up(&victim_id),
        "a refused connect marks the backend down at once"
    );

    let next = client.get("/", Some(&jar(&new_pin))).await;
    assert_eq!(next.served_by(), survivor.id);
    assert!(next.pin().is_none());
    assert!(!survivor
        .seen()
        .pop()
        .unwrap()
        .headers
        .contains_key("x-stickylb-failover"));

    let old = client.get("/", Some(&jar(&pin))).await;
    assert_eq!(
        (old.served_by(), old.pin()),
        (survivor.id.as_str(), Some(new_pin))
    );
}

#[tokio::test]
async fn heartbeats_take_a_backend_down_after_fall_and_up_after_rise() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let proxy = Proxy::start(&config(&[&a, &b], FAST_HEALTH)).await;
    let client = Clientele::new(proxy.addr);
    let pin_a = pin_to(&client, "a").await;
    a.set_health(500);
    eventually(Duration::from_secs(5), "a marked down", || {
        !proxy.is_up("a")
    })
    .await;
    let r = client.get("/", Some(&jar(&pin_a))).await;
    assert_eq!((r.status.as_u16(), r.served_by()), (200, "b"));
    assert!(r.pin().is_some());
    let hits_a = a.hits();
    for _ in 0..20 {
        assert_eq!(
            client.get("/", None).await.served_by(),
            "b",
            "no new session may reach a down backend"
        );
    }
    assert_eq!(a.hits(), hits_a);

    a.set_health(200);
    eventually(Duration::from_secs(5), "a marked up", || proxy.is_up("a")).await;
    let served: Vec<_> = futures_served(&client, 4).await;
    assert!(
        served.contains(&"a".to_string()),
        "a takes new sessions again: {served:?}"
    );
}

async fn futures_served(client: &Clientele, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(client.get("/", None).await.served_by().to_string());
    }
    out
}

#[tokio::test]
async fn one_bad_heartbeat_is_not_enough_with_fall_two() {
    use stickylb::config::Config;
    let a = Upstream::start("a").await;
    let cfg = Config::parse(&config(&[&a], FAST_HEALTH), std::path::Path::new("t"), None).unwrap();
    let backend = stickylb::backend::Backend::new(&cfg.backends[0], &cfg.health);
    backend.record_heartbeat(Err("boom".into()), Duration::ZERO);
    assert!(backend.is_up());
    backend.record_heartbeat(Ok(()), Duration::ZERO);
    backend.record_heartbeat(Err("boom".into()), Duration::ZERO);
    assert!(backend.is_up());
    backend.record_heartbeat(Err("boom".into()), Duration::ZERO);
    assert!(!backend.is_up());
}

#[tokio::test]
async fn all_backends_down_gives_503_with_retry_after_and_a_generic_body() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let proxy = Proxy::start(&config(&[&a, &b], QUIET_HEALTH)).await;
    let addrs = [a.addr.to_string(), b.addr.to_string()];
    a.kill().await;
    b.kill().await;
    let client = Clientele::new(proxy.addr);
    let r = client.get("/", None).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.headers.contains_key("retry-after"));
    let again = client.get("/", None).await;
    assert_eq!(again.status, 503);
    for reply in [&r, &again] {
        let shown = format!("{:?}{}", reply.headers, reply.body);
        assert!(
            addrs.iter().all(|a| !shown.contains(a)) && !shown.contains("127.0.0.1"),
            "{shown}"
        );
        assert!(reply.pin().is_none());
    }
}

#[tokio::test]
async fn a_silent_backend_gives_504_after_the_response_timeout() {
    let a = Upstream::start("a").await;
    let proxy = Proxy::start(&config(
        &[&a],
        &format!("{QUIET_HEALTH}[timeouts]\nbackend_response = \"200ms\"\n"),
    ))
    .await;
    let client = Clientele::new(proxy.addr);
    // Once on a new upstream connection, once on the pooled one, most of a timeout after its
    // last exchange: the timer that exchange left must not cut this one short. (The pause is
    // the case under test, not a wait for something to happen.)
    for pooled in [false, true] {
        if pooled {
            assert_eq!(client.get("/", None).await.status, 200);
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        let started = std::time::Instant::now();
        let r = client.get("/never", None).await;
        let took = started.elapsed();
        assert_eq!(r.status, 504);
        assert!(
            took >= Duration::from_millis(195) && took < Duration::from_secs(1),
            "pooled {pooled}: 504 after {took:?}"
        );
        assert!(!r.body.contains("127.0.0.1"));
        println!("FIGURE backend_response 200ms, pooled {pooled}: 504 after {took:?}");
    }
}

#[tokio::test]
async fn two_instances_sharing_a_secret_route_a_cookie_the_same_way() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let cfg = config(&[&a, &b], QUIET_HEALTH);
    let (one, two) = (Proxy::start(&cfg).await, Proxy::start(&cfg).await);
    let (c1, c2) = (Clientele::new(one.addr), Clientele::new(two.addr));
    for _ in 0..4 {
        let r = c1.get("/", None).await;
        let pin = r.pin().unwrap();
        let via_two = c2.get("/", Some(&jar(&pin))).await;
        assert_eq!(via_two.served_by(), r.served_by());
        assert!(via_two.pin().is_none());
    }
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish_and_stops_accepting() {
    let a = Upstream::start("a").await;
    let mut proxy = Proxy::start(&config(&[&a], QUIET_HEALTH)).await;
    let client = Clientele::new(proxy.addr);
    let in_flight = tokio::spawn(async move { client.get("/hold", None).await });
    eventually(
        Duration::from_secs(5),
        "request reached the backend",
        || a.holding() == 1,
    )
    .await;
    let addr = proxy.addr;
    let server = proxy.shutdown();
    let refused = async {
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), refused)
        .await
        .expect("listener closes");
    a.release(1);
    let r = in_flight.await.unwrap();
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "a"));
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("server exits")
        .unwrap();
}

#[tokio::test]
async fn after_bytes_were_sent_only_idempotent_bodyless_requests_are_retried() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let proxy = Proxy::start(&config(&[&a, &b], QUIET_HEALTH)).await;
    let client = Clientele::new(proxy.addr);
    let pin_a = pin_to(&client, "a").await;
    a.set_broken(true);
    let (a_before, b_before) = (a.hits(), b.hits());

    let r = client.get("/read", Some(&jar(&pin_a))).await;
    assert_eq!(
        (r.status.as_u16(), r.served_by()),
        (200, "b"),
        "a GET is replayed elsewhere"
    );
    assert!(r.pin().is_some());
    assert_eq!(b.seen().pop().unwrap().headers["x-stickylb-failover"], "a");
    assert!(
        proxy.is_up("a"),
        "only a refused connect marks down; heartbeats judge the rest"
    );

    let r = client
        .send("POST", "/write", Some(&jar(&pin_a)), "once")
        .await;
    assert_eq!(
        r.status, 502,
        "a POST that reached a backend must not be sent twice"
    );
    assert!(!r.body.contains("127.0.0.1"));
    assert_eq!(a.hits(), a_before + 2);
    assert_eq!(b.hits(), b_before + 1, "the POST never reached b");
}

#[tokio::test]
async fn retries_are_bounded_by_the_setting() {
    let ups = [
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    ];
    for u in &ups {
        u.set_broken(true);
    }
    let refs: Vec<&Upstream> = ups.iter().collect();
    let proxy = Proxy::start(&config(
        &refs,
        &format!("{QUIET_HEALTH}[balancer]\nretries = 1\n"),
    ))
    .await;
    let r = Clientele::new(proxy.addr).get("/", None).await;
    assert_eq!(r.status, 502);
    assert_eq!(
        ups.iter().map(Upstream::hits).sum::<usize>(),
        2,
        "one attempt plus one retry"
    );
}

/// HTTP/2 has no idle timeout of its own in hyper: a connection with no request in flight for
/// `client_header` gets a GOAWAY and is closed; one with a request in flight still takes new
/// streams.
#[tokio::test]
async fn idle_http2_connections_are_closed_and_busy_ones_are_not() {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use std::time::Instant;

    let a = Upstream::start("a").await;
    let timeouts = "[timeouts]\nclient_header = \"300ms\"\nbackend_response = \"10s\"\n";
    let proxy = Proxy::start(&config(&[&a], &format!("{QUIET_HEALTH}{timeouts}"))).await;
    let stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let mut conn = tokio::spawn(conn);
    let get = |path: &str| {
        let uri = format!("http://{}{path}", proxy.addr);
        http::Request::get(uri)
            .body(Empty::<bytes::Bytes>::new())
            .unwrap()
    };
    let held = tokio::spawn(send.send_request(get("/hold")));
    eventually(Duration::from_secs(5), "the request is held", || {
        a.holding() == 1
    })
    .await;
    let busy = tokio::time::timeout(Duration::from_millis(900), &mut conn).await;
    assert!(busy.is_err(), "closed with a request in flight: {busy:?}");
    let meanwhile = send.send_request(get("/meanwhile")).await;
    assert_eq!(
        meanwhile.map(|r| r.status()).ok(),
        Some(http::StatusCode::OK),
        "a busy connection past the idle time still takes new streams (no GOAWAY)"
    );
    a.release(1);
    let resp = held.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"a");
    let idle_from = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(5), &mut conn).await;
    let idle = idle_from.elapsed();
    assert!(closed.is_ok(), "an idle HTTP/2 connection stays open");
    assert!(
        idle >= Duration::from_millis(250) && idle < Duration::from_secs(2),
        "closed after {idle:?}, not about 300 ms"
    );
    println!("FIGURE h2 idle connection closed {idle:?} after its last response");
}

/// A quiet HTTP/1 connection is parked (hyper's state and buffers freed, the socket kept) and
/// serves its next request as if nothing happened. One holding part of a next head is never
/// parked: hyper's buffer, and those bytes with it, would be lost.
#[tokio::test]
async fn quiet_http1_connections_are_parked_and_keep_serving() {
    use tokio::io::AsyncWriteExt;
    let a = Upstream::start("a").await;
    let park = "[timeouts]\nclient_park = \"50ms\"\n";
    let proxy = Proxy::start(&config(&[&a], &format!("{QUIET_HEALTH}{park}"))).await;
    let parked = || proxy.lb.parked_connections();
    let mut conn = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");

    conn.write_all(get("/one").as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut conn).await, (200, "a".to_string()));
    eventually(
        Duration::from_secs(5),
        "the quiet connection is parked",
        || parked() == 1,
    )
    .await;
    conn.write_all(get("/two").as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut conn).await, (200, "a".to_string()));
    assert_eq!(
        parked(),
        0,
        "a connection serving again is not counted as parked"
    );

    let three = get("/three");
    let (start, rest) = three.split_at(9);
    conn.write_all(start.as_bytes()).await.unwrap();
    // Six park periods with part of a head read: the connection must stay with hyper.
    let window = Duration::from_millis(300);
    throughout(window, "parked while holding part of a head", || {
        parked() == 0
    })
    .await;
    conn.write_all(rest.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut conn).await, (200, "a".to_string()));
    let paths: Vec<String> = a.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(paths, ["/one", "/two", "/three"]);

    eventually(Duration::from_secs(5), "parked again", || parked() == 1).await;
    drop(conn);
    eventually(
        Duration::from_secs(5),
        "a parked connection closed by its client is gone",
        || parked() == 0,
    )
    .await;
}

#[tokio::test]
async fn http2_cleartext_clients_are_served_and_pinned() {
    let a = Upstream::start("a").await;
    let proxy = Proxy::start(&config(&[&a], QUIET_HEALTH)).await;
    let client = Clientele::h2c(proxy.addr);
    let r = client.get("/h2", None).await;
    assert_eq!((r.status.as_u16(), r.served_by()), (200, "a"));
    let pin = r.pin().unwrap();
    assert!(client.get("/h2", Some(&jar(&pin))).await.pin().is_none());
    let host = proxy.addr.to_string();
    assert_eq!(
        a.seen().pop().unwrap().headers["host"],
        host.as_str(),
        ":authority becomes Host"
    );
}

#[tokio::test]
async fn large_bodies_stream_through_intact() {
    let a = Upstream::start("a").await;
    let proxy = Proxy::start(&config(&[&a], QUIET_HEALTH)).await;
    let body: String = (0..4 * 1024 * 1024)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let r = Clientele::new(proxy.addr)
        .send("POST", "/upload", None, &body)
        .await;
    assert_eq!(r.status, 200);
    assert!(
        a.seen().pop().unwrap().body == body.as_bytes(),
        "the body arrived byte for byte"
    );
}

async fn raw_request(addr: std::net::SocketAddr, head: &str) -> String {
    raw_bytes(addr, head.as_bytes()).await
}

async fn raw_bytes(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn an_oversized_request_head_gets_431_and_is_never_forwarded() {
    let a = Upstream::start("a").await;
    let proxy = Proxy::start(&config(
        &[&a],
        &format!("{QUIET_HEALTH}[limits]\nmax_header_bytes = 16384\n"),
    ))
    .await;
    let big = "x".repeat(20_000);
    let reply = raw_request(
        proxy.addr,
        &format!("GET / HTTP/1.1\r\nHost: app.test\r\nX-Big: {big}\r\n\r\n"),
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply}");
    assert_eq!(a.hits(), 0, "nothing reached the backend");
    let fits = "y".repeat(10_000);
    let reply = raw_request(
        proxy.addr,
        &format!("GET / HTTP/1.1\r\nHost: app.test\r\nX-Fits: {fits}\r\n\r\n"),
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
}

#[tokio::test]
async fn at_the_connection_limit_new_clients_wait_instead_of_failing() {
    let a = Upstream::start("a").await;
    let proxy = Proxy::start(&config(
        &[&a],
        &format!("{QUIET_HEALTH}[limits]\nmax_connections = 2\n"),
    ))
    .await;
    let idle_one = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let _idle_two = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let client = Clientele::new(proxy.addr);
    let waiting = tokio::spawn(async move { client.get("/", None).await });
    // A negative check needs a bound: the third client must not be served while both slots are taken.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "a third connection was served beyond the limit"
    );
    assert_eq!(a.hits(), 0);
    drop(idle_one);
    let r = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("served once a slot frees")
        .unwrap();
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn bodies_over_the_limit_get_413() {
    let a = Upstream::start("a").await;
    let proxy = Proxy::start(&config(
        &[&a],
        &format!("{QUIET_HEALTH}[limits]\nmax_body_bytes = 1000\n"),
    ))
    .await;
    let client = Clientele::new(proxy.addr);
    let r = client
        .send("POST", "/upload", None, &"x".repeat(1001))
        .await;
    assert_eq!(r.status, 413, "declared too large");
    assert_eq!(a.hits(), 0, "a body declared too large is never forwarded");

    let fits = client
        .send("POST", "/upload", None, &"y".repeat(1000))
        .await;
    assert_eq!(fits.status, 200);
    assert_eq!(a.seen().pop().unwrap().body.len(), 1000);

    let chunk = "z".repeat(600);
    let chunked = format!(
        "POST /stream HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n258\r\n{chunk}\r\n258\r\n{chunk}\r\n0\r\n\r\n"
    );
    let reply = raw_request(proxy.addr, &chunked).await;
    assert!(
        reply.starts_with("HTTP/1.1 413"),
        "a chunked body that grows too large: {reply}"
    );
    assert!(
        a.seen().iter().all(|s| s.body.len() <= 1000),
        "the backend never got more than the limit"
    );
}

fn unix_now() -> u64 {
    stickylb::backend::unix_ms() / 1000
}

#[tokio::test]
async fn with_max_age_the_proxy_refuses_expired_pins_and_renews_old_ones() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let toml = config(&[&a, &b], "").replace("[affinity]\n", "[affinity]\nmax_age = \"1h\"\n");
    let proxy = Proxy::start(&format!("{toml}{QUIET_HEALTH}")).await;
    let client = Clientele::new(proxy.addr);
    let key = b"test-secret-0123456789";
    let tag = stickylb::affinity::token(key, "b");
    let stamped = |age: u64| stickylb::affinity::stamp(key, &tag, unix_now() - age);

    let fresh = client.get("/", Some(&jar(&stamped(60)))).await;
    assert_eq!(
        (fresh.served_by(), fresh.pin()),
        ("b", None),
        "honoured, not renewed"
    );

    let old = client.get("/", Some(&jar(&stamped(40 * 60)))).await;
    assert_eq!(old.served_by(), "b");
    let renewed = old.pin().expect("past half its max_age: renewed");
    let (renewed_tag, issued) = stickylb::affinity::unstamp(&renewed).unwrap();
    assert_eq!(renewed_tag, tag);
    assert!(issued + 5 >= unix_now());

    let expired = stamped(2 * 60 * 60);
    let tampered = stamped(2 * 60 * 60).replacen(
        &format!(".{:x}.", unix_now() - 2 * 60 * 60),
        &format!(".{:x}.", unix_now()),
        1,
    );
    assert_ne!(tampered, expired);
    // Draining b keeps honoured pins on b and sends new sessions to a: a refused pin shows.
    let draining = stickylb::backend::Mode::Draining;
    proxy.lb.backend("b").unwrap().set_mode(draining, "test");
    assert_eq!(
        client.get("/", Some(&jar(&stamped(60)))).await.served_by(),
        "b"
    );
    for value in [expired, tampered, tag.clone()] {
        let r = client.get("/", Some(&jar(&value))).await;
        assert_eq!(r.served_by(), "a", "{value}: refused, so a new session");
        let pin = r.pin().unwrap_or_else(|| panic!("{value}: re-pinned"));
        assert_ne!(pin, value);
        assert!(r.headers.get("x-stickylb-failover").is_none());
    }
    let set_cookie = fresh_cookie(&client).await;
    assert!(set_cookie.contains("Max-Age=3600"), "{set_cookie}");
}

async fn fresh_cookie(client: &Clientele) -> String {
    let r = client.get("/", None).await;
    r.set_cookies().into_iter().next().unwrap()
}

#[tokio::test]
async fn rotated_secrets_accept_old_pins_and_reissue_them_under_the_new_key() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let old_key = "test-secret-0123456789";
    let rotated = config(&[&a, &b], QUIET_HEALTH).replace(
        &format!("secret = \"{old_key}\""),
        &format!("secret = \"new-secret-9876543210\"\nprevious_secrets = [\"{old_key}\"]"),
    );
    let proxy = Proxy::start(&rotated).await;
    let client = Clientele::new(proxy.addr);
    let old_pin = stickylb::affinity::token(old_key.as_bytes(), "b");
    let r = client.get("/", Some(&jar(&old_pin))).await;
    assert_eq!(r.served_by(), "b", "an old-key pin still routes");
    let new_pin = stickylb::affinity::token(b"new-secret-9876543210", "b");
    assert_eq!(
        r.pin(),
        Some(new_pin.clone()),
        "and is re-issued under the new key"
    );
    let again = client.get("/", Some(&jar(&new_pin))).await;
    assert_eq!((again.served_by(), again.pin()), ("b", None));

    let unrotated = config(&[&a, &b], QUIET_HEALTH).replace(old_key, "new-secret-9876543210");
    let strict = Proxy::start(&unrotated).await;
    let r = Clientele::new(strict.addr)
        .get("/", Some(&jar(&old_pin)))
        .await;
    assert_ne!(
        r.pin(),
        None,
        "without previous_secrets the old pin is ignored"
    );
    assert_ne!(r.pin(), Some(old_pin));
}

#[tokio::test]
async fn forwarding_headers_are_extended_only_for_trusted_proxies() {
    let a = Upstream::start("a").await;
    let claims = [
        ("x-forwarded-for", "203.0.113.9"),
        ("x-real-ip", "203.0.113.9"),
        ("forwarded", "for=203.0.113.9"),
    ];
    let seen = |trusted: &'static str| {
        let a = &a;
        async move {
            let toml = config(&[a], QUIET_HEALTH).replace(
                "address = \"127.0.0.1:0\"\n",
                &format!(
                    "address = \"127.0.0.1:0\"\ntrusted_proxies = [{trusted}]\nforwarded = true\n"
                ),
            );
            let proxy = Proxy::start(&toml).await;
            Clientele::new(proxy.addr)
                .send_with("GET", "/", &claims, "")
                .await;
            a.seen().pop().unwrap().headers
        }
    };
    let h = seen("").await;
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-real-ip"], "127.0.0.1");
    assert_eq!(h["forwarded"], "for=127.0.0.1;proto=http;host=app.test");
    let h = seen("\"127.0.0.0/8\"").await;
    assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(h["x-real-ip"], "203.0.113.9");
    assert_eq!(
        h["forwarded"],
        "for=203.0.113.9, for=127.0.0.1;proto=http;host=app.test"
    );
}

/// A log sink the test reads back.
#[derive(Clone, Default)]
struct LogSink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The clock is read for the access log only when the log is on; on, each line says how long
/// the request took.
#[tokio::test]
async fn the_access_log_line_says_how_long_the_request_took() {
    let sink = LogSink::default();
    let writer = sink.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _log = tracing::subscriber::set_default(subscriber);
    let a = Upstream::start("a").await;
    let proxy = Proxy::start(&config(&[&a], QUIET_HEALTH)).await;
    assert_eq!(Clientele::new(proxy.addr).get("/", None).await.status, 200);

    // The line is written once the answer has gone out, so it may come after the client has it.
    let logged = || String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
    eventually(Duration::from_secs(5), "an access log line", || {
        logged().contains(" request ")
    })
    .await;
    let text = logged();
    let line = text
        .lines()
        .find(|l| l.contains(" request ") && l.contains("path=\"/\" "))
        .unwrap_or_else(|| panic!("no access log line in {text:?}"));
    let us: u64 = line
        .split("duration_us=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no duration in {line:?}"));
    assert!(us > 0, "{line}");
}
