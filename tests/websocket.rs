//! WebSocket through stickylb: routed by the affinity cookie, failed over with a re-pin on the
//! handshake when the pinned backend is gone, and closed after the tunnel idle timeout.
#![allow(clippy::unwrap_used)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{config, Proxy};
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// A backend that answers `/healthz` and echoes WebSocket messages as `ID:message`.
struct WsBackend {
    id: &'static str,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl WsBackend {
    async fn start(id: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                conns.spawn(async move {
                    let svc = service_fn(move |req| answer(id, req));
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades();
                    let _closed = conn.await;
                });
            }
        });
        Self { id, addr, task }
    }

    /// Closes the listener and every connection, as a crash would.
    async fn kill(self) {
        self.task.abort();
        let _aborted = self.task.await;
    }
}

async fn answer(
    id: &'static str,
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        return Ok(Response::new(Full::new(Bytes::from(id))));
    };
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let io = TokioIo::new(upgrade.await.unwrap());
        let mut ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
        while let Some(Ok(Message::Text(text))) = ws.next().await {
            let reply = format!("{id}:{}", text.as_str());
            if ws.send(Message::text(reply)).await.is_err() {
                break;
            }
        }
    });
    let resp = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-accept", derive_accept_key(key.as_bytes()))
        .body(Full::new(Bytes::new()))
        .unwrap();
    Ok(resp)
}

type Ws = WebSocketStream<TcpStream>;

/// Opens a WebSocket through the proxy with `pin` (if any); returns it and the pin it was given.
async fn open(proxy: SocketAddr, pin: Option<&str>) -> (Ws, Option<String>) {
    let mut req = "ws://app.test/chat".into_client_request().unwrap();
    if let Some(pin) = pin {
        req.headers_mut()
            .insert("cookie", format!("stickylb={pin}").parse().unwrap());
    }
    let tcp = TcpStream::connect(proxy).await.unwrap();
    let (ws, resp) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
    let new_pin = resp.headers().get("set-cookie").map(|v| {
        let c = cookie::Cookie::parse(v.to_str().unwrap().to_string()).unwrap();
        c.value().to_string()
    });
    (ws, new_pin)
}

async fn echo(ws: &mut Ws, text: &str) -> String {
    ws.send(Message::text(text)).await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
    match reply.expect("echo in time").unwrap().unwrap() {
        Message::Text(t) => t.as_str().to_string(),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn websockets_are_sticky_and_fail_over_with_a_re_pin() {
    let (a, b) = (WsBackend::start("a").await, WsBackend::start("b").await);
    let toml = config(&[], "[health]\ninterval = \"1h\"\n")
        + &format!("\n[[backends]]\nid = \"a\"\naddress = \"{}\"\n", a.addr)
        + &format!("\n[[backends]]\nid = \"b\"\naddress = \"{}\"\n", b.addr);
    let proxy = Proxy::start(&toml).await;

    let (mut first, pin) = open(proxy.addr, None).await;
    let pin = pin.expect("a new client is pinned on the handshake");
    let owner = echo(&mut first, "hello").await;
    let owner_id = owner.split(':').next().unwrap().to_string();
    for i in 0..5 {
        let (mut ws, again) = open(proxy.addr, Some(&pin)).await;
        assert_eq!(again, None, "an honoured pin is not re-issued");
        assert_eq!(
            echo(&mut ws, &format!("m{i}")).await,
            format!("{owner_id}:m{i}")
        );
    }

    let (dead, survivor) = if owner_id == a.id { (a, b) } else { (b, a) };
    dead.kill().await;
    let (mut moved, repin) = open(proxy.addr, Some(&pin)).await;
    assert_eq!(
        echo(&mut moved, "again").await,
        format!("{}:again", survivor.id)
    );
    let repin = repin.expect("the handshake re-pinned the client");
    assert_ne!(repin, pin);
    let (mut back, none) = open(proxy.addr, Some(&repin)).await;
    assert_eq!(none, None);
    assert_eq!(echo(&mut back, "x").await, format!("{}:x", survivor.id));
}

#[tokio::test]
async fn an_idle_tunnel_is_closed_after_the_idle_timeout() {
    let a = WsBackend::start("a").await;
    let toml = config(
        &[],
        "[health]\ninterval = \"1h\"\n[timeouts]\ntunnel_idle = \"300ms\"\n",
    ) + &format!("\n[[backends]]\nid = \"a\"\naddress = \"{}\"\n", a.addr);
    let proxy = Proxy::start(&toml).await;
    let (mut ws, _) = open(proxy.addr, None).await;
    assert_eq!(echo(&mut ws, "hi").await, "a:hi");
    let quiet = Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
    let end = end.expect("the proxy closed the idle tunnel");
    assert!(!matches!(end, Some(Ok(Message::Text(_)))), "{end:?}");
    let after = quiet.elapsed();
    assert!(
        after >= Duration::from_millis(300),
        "closed after {after:?}"
    );
}
