//! Test servers and clients on real loopback sockets bound to port 0.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use stickylb::config::Config;
use stickylb::Stickylb;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

/// What an upstream received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Default)]
struct Shared {
    seen: Mutex<Vec<Seen>>,
    health: AtomicU16,
    holding: AtomicUsize,
    broken: std::sync::atomic::AtomicBool,
    hold: Option<Arc<Semaphore>>,
}

/// A real HTTP server standing in for an application node.
///
/// Paths: `/healthz` answers the status set with [`Upstream::set_health`]; `/cookies` sets two
/// cookies; `/hold` waits for [`Upstream::release`]; `/never` never answers; anything else
/// answers 200 with the node id as body. Every non-health request is recorded.
pub struct Upstream {
    pub id: String,
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    hold: Arc<Semaphore>,
    task: JoinHandle<()>,
}

impl Upstream {
    pub async fn start(id: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(id, listener)
    }

    /// Serves on an existing listener (to restart a killed node on its old port).
    pub fn serve(id: &str, listener: TcpListener) -> Self {
        let addr = listener.local_addr().unwrap();
        let hold = Arc::new(Semaphore::new(0));
        let shared = Arc::new(Shared {
            health: AtomicU16::new(200),
            hold: Some(hold.clone()),
            ..Default::default()
        });
        let task = tokio::spawn(accept_loop(id.to_string(), listener, shared.clone()));
        Self {
            id: id.to_string(),
            addr,
            shared,
            hold,
            task,
        }
    }

    pub fn set_health(&self, status: u16) {
        self.shared.health.store(status, Ordering::SeqCst);
    }

    /// When set, every non-health request is read and then the connection is dropped without a
    /// response: bytes were sent, nothing came back.
    pub fn set_broken(&self, broken: bool) {
        self.shared.broken.store(broken, Ordering::SeqCst);
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }

    pub fn hits(&self) -> usize {
        self.shared.seen.lock().unwrap().len()
    }

    /// Requests currently waiting in `/hold`.
    pub fn holding(&self) -> usize {
        self.shared.holding.load(Ordering::SeqCst)
    }

    pub fn release(&self, n: usize) {
        self.hold.add_permits(n);
    }

    /// Closes the listener and every open connection, as a crashed process would.
    pub async fn kill(self) {
        self.task.abort();
        let _aborted = self.task.await;
    }
}

async fn accept_loop(id: String, listener: TcpListener, shared: Arc<Shared>) {
    // Owning the connection tasks here means aborting this task closes them all.
    let mut conns = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (id, shared) = (id.clone(), shared.clone());
        conns.spawn(async move {
            let svc = service_fn(move |req| handle(id.clone(), shared.clone(), req));
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            let _closed = conn.await;
        });
        while conns.try_join_next().is_some() {}
    }
}

/// The path the proxy's heartbeats ask for (its default `health.path`).
pub const HEARTBEAT: &str = "/healthz";

type Reject = Box<dyn std::error::Error + Send + Sync>;

async fn handle(
    id: String,
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Reject> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    if path == HEARTBEAT {
        let status = StatusCode::from_u16(shared.health.load(Ordering::SeqCst)).unwrap();
        return Ok(Response::builder()
            .status(status)
            .body(Full::new(Bytes::from("health")))
            .unwrap());
    }
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let seen = Seen {
        method: parts.method.to_string(),
        path: path.clone(),
        headers: parts.headers,
        body,
    };
    shared.seen.lock().unwrap().push(seen);
    if shared.broken.load(Ordering::SeqCst) {
        return Err("broken on purpose: hyper closes the connection".into());
    }
    let mut resp = Response::builder().header("x-served-by", &id);
    match path.as_str() {
        "/cookies" => {
            resp = resp
                .header("set-cookie", "app=1; Path=/")
                .header("set-cookie", "theme=dark; Path=/")
        }
        "/hold" => {
            shared.holding.fetch_add(1, Ordering::SeqCst);
            let permit = shared.hold.as_ref().unwrap().acquire().await.unwrap();
            permit.forget();
        }
        "/never" => std::future::pending::<()>().await,
        _ => {}
    }
    Ok(resp.body(Full::new(Bytes::from(id))).unwrap())
}

/// A stickylb instance serving on its own port-0 listener.
pub struct Proxy {
    pub addr: SocketAddr,
    /// The admin listener's address, when started with one.
    pub admin: Option<SocketAddr>,
    pub lb: Stickylb,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(toml: &str) -> Self {
        let config =
            Config::parse(toml, Path::new("test.toml"), None).expect("test config is valid");
        Self::launch(config, false).await
    }

    /// Starts from a real file (so reloads re-read it), with an admin listener.
    pub async fn start_file(path: &Path) -> Self {
        let config = Config::load(path, None).expect("test config is valid");
        Self::launch(config, true).await
    }

    async fn launch(config: Config, with_admin: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admin_listener = match with_admin {
            true => Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
            false => None,
        };
        let admin = admin_listener.as_ref().map(|l| l.local_addr().unwrap());
        let lb = Stickylb::new(config);
        let (stop, stopped) = oneshot::channel::<()>();
        let server = lb.clone();
        let task = tokio::spawn(async move {
            let shutdown = async move { drop(stopped.await) };
            server.serve(listener, admin_listener, shutdown).await;
        });
        Self {
            addr,
            admin,
            lb,
            stop: Some(stop),
            task,
        }
    }

    pub fn is_up(&self, id: &str) -> bool {
        self.lb.backend(id).unwrap().is_up()
    }

    /// Signals shutdown; returns the server task to await.
    pub fn shutdown(&mut self) -> &mut JoinHandle<()> {
        if let Some(stop) = self.stop.take() {
            // Err means the server already stopped: nothing is left to signal.
            stop.send(()).ok();
        }
        &mut self.task
    }
}

/// A config with the given upstreams; `extra` is appended (more tables).
pub fn config(upstreams: &[&Upstream], extra: &str) -> String {
    let mut s = String::from(
        "[listener]\naddress = \"127.0.0.1:0\"\n[affinity]\nsecret = \"test-secret-0123456789\"\n",
    );
    s.push_str(extra);
    for u in upstreams {
        s.push_str(&format!(
            "\n[[backends]]\nid = \"{}\"\naddress = \"{}\"\n",
            u.id, u.addr
        ));
    }
    s
}

/// A reply as a client sees it.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn served_by(&self) -> &str {
        self.headers
            .get("x-served-by")
            .map_or("", |v| v.to_str().unwrap())
    }

    /// The value of the affinity cookie this reply sets, if any.
    pub fn pin(&self) -> Option<String> {
        self.set_cookies().into_iter().find_map(|c| {
            let c = cookie::Cookie::parse(c).ok()?;
            (c.name() == "stickylb").then(|| c.value().to_string())
        })
    }

    pub fn set_cookies(&self) -> Vec<String> {
        self.headers
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    }
}

pub struct Clientele {
    client: Client<HttpConnector, Full<Bytes>>,
    pub proxy: SocketAddr,
    /// The Host header sent; None for HTTP/2, where `:authority` carries it.
    host: Option<&'static str>,
}

impl Clientele {
    pub fn new(proxy: SocketAddr) -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
            proxy,
            host: Some("app.test"),
        }
    }

    /// A client that speaks HTTP/2 over cleartext (prior knowledge), as gRPC clients do.
    pub fn h2c(proxy: SocketAddr) -> Self {
        Self {
            client: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build_http(),
            proxy,
            host: None,
        }
    }

    pub async fn send(&self, method: &str, path: &str, cookie: Option<&str>, body: &str) -> Reply {
        let headers: Vec<(&str, &str)> = cookie.map(|c| ("cookie", c)).into_iter().collect();
        self.send_with(method, path, &headers, body).await
    }

    pub async fn send_with(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Reply {
        self.try_send_with(method, path, headers, body)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// Like `send_with`, but a transport failure or a 10 s silence is returned, not a panic: load
    /// generators count them.
    pub async fn try_send_with(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Result<Reply, String> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{}{}", self.proxy, path));
        if let Some(host) = self.host {
            req = req.header("host", host);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::from(body.to_string()))).unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), self.client.request(req))
            .await
            .map_err(|_| "no reply within 10s".to_string())?
            .map_err(|e| format!("request failed: {e:?}"))?;
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("body failed: {e:?}"))?
            .to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    pub async fn get(&self, path: &str, cookie: Option<&str>) -> Reply {
        self.send("GET", path, cookie, "").await
    }
}

/// Polls `cond` every 5 ms until it holds, failing the test after `limit`.
pub async fn eventually(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Polls `cond` every 5 ms for all of `window`, failing the test the first time it does not
/// hold: for what must not happen within a time.
pub async fn throughout(window: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + window;
    while tokio::time::Instant::now() < end {
        assert!(cond(), "{what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The `Cookie` header that presents an affinity pin.
pub fn jar(pin: &str) -> String {
    format!("stickylb={pin}")
}

/// Opens new sessions until one is pinned to `id`; returns that pin.
pub async fn pin_to(client: &Clientele, id: &str) -> String {
    for _ in 0..100 {
        let r = client.get("/", None).await;
        if r.served_by() == id {
            return r.pin().unwrap();
        }
    }
    panic!("no new session was pinned to {id}");
}

/// Reads one HTTP/1 response with a `Content-Length` body: (status, body).
pub async fn read_response(conn: &mut tokio::net::TcpStream) -> (u16, String) {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = Duration::from_secs(5);
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let head = text[..end].to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if got.len() >= end + 4 + length {
                let status = text[9..12].parse().unwrap();
                return (status, text[end + 4..end + 4 + length].to_string());
            }
        }
        let n = tokio::time::timeout(deadline, conn.read(&mut buf))
            .await
            .expect("a response within 5 s")
            .unwrap();
        assert!(n > 0, "closed before a whole response: {text:?}");
        got.extend_from_slice(&buf[..n]);
    }
}
