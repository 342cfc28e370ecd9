//! A raw-TCP capture backend: records the exact bytes each connection delivers and answers every
//! complete request (head parsed by `httparse`, body by `Content-Length`) with the same bytes
//! (by default `200` and the body `raw`).
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use std::time::Duration;

use crate::common::{eventually, Proxy, HEARTBEAT};

const QUIET_HEALTH: &str = "[health]\ninterval = \"1h\"\n";

/// stickylb in front of the one backend at `backend`, heartbeats out of the way.
pub async fn proxy_for(backend: SocketAddr, extra: &str) -> Proxy {
    let toml = format!(
        "[listener]\naddress = \"127.0.0.1:0\"\n[affinity]\nsecret = \"test-secret-0123456789\"\n\
         {QUIET_HEALTH}{extra}\n[[backends]]\nid = \"raw\"\naddress = \"{backend}\"\n"
    );
    Proxy::start(&toml).await
}

/// The proxy for a capture backend, once the heartbeat it sends at start has arrived: a probe
/// still on its way would count as a client's connection (or its bytes as a client's).
pub async fn proxy_for_raw(backend: &RawBackend, extra: &str) -> Proxy {
    let proxy = proxy_for(backend.addr, extra).await;
    eventually(Duration::from_secs(5), "the first heartbeat", || {
        backend.heartbeats() > 0
    })
    .await;
    proxy
}

/// One connection as the backend saw it.
#[derive(Debug, Default, Clone)]
pub struct Capture {
    pub bytes: Vec<u8>,
    /// Each complete request: (path, raw head + body).
    pub requests: Vec<(String, Vec<u8>)>,
    /// The peer closed (or reset) the connection.
    pub closed: bool,
}

pub struct RawBackend {
    pub addr: SocketAddr,
    conns: Arc<Mutex<Vec<Capture>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RawBackend {
    pub async fn start() -> Self {
        Self::answering(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nraw").await
    }

    /// A backend that answers every request with `reply`, as it is.
    pub async fn answering(reply: &'static [u8]) -> Self {
        Self::serving(reply, false).await
    }

    /// A backend that answers a connection's first request with `reply`, then closes it.
    pub async fn closing(reply: &'static [u8]) -> Self {
        Self::serving(reply, true).await
    }

    async fn serving(reply: &'static [u8], close: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = Arc::new(Mutex::new(Vec::new()));
        let shared = Arc::clone(&conns);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let index = {
                    let mut c = shared.lock().unwrap();
                    c.push(Capture::default());
                    c.len() - 1
                };
                tokio::spawn(serve(stream, index, Arc::clone(&shared), (reply, close)));
            }
        });
        Self { addr, conns, task }
    }

    /// Every connection, heartbeat connections left out.
    pub fn connections(&self) -> Vec<Capture> {
        let all = self.conns.lock().unwrap().clone();
        all.into_iter()
            .filter(|c| !c.requests.iter().any(|(p, _)| p == HEARTBEAT))
            .collect()
    }

    /// How many heartbeat requests arrived.
    pub fn heartbeats(&self) -> usize {
        let all = self.conns.lock().unwrap();
        all.iter()
            .flat_map(|c| &c.requests)
            .filter(|(p, _)| p == HEARTBEAT)
            .count()
    }

    /// Every byte that reached the backend, heartbeats left out.
    pub fn received(&self) -> Vec<u8> {
        self.connections()
            .into_iter()
            .flat_map(|c| c.bytes)
            .collect()
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    mut stream: TcpStream,
    index: usize,
    conns: Arc<Mutex<Vec<Capture>>>,
    (reply, close): (&'static [u8], bool),
) {
    let (mut pending, mut buf) = (Vec::new(), vec![0u8; 64 * 1024]);
    'conn: loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break 'conn,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        conns.lock().unwrap()[index]
            .bytes
            .extend_from_slice(&buf[..n]);
        while let Some((path, len)) = complete_request(&pending) {
            let request: Vec<u8> = pending.drain(..len).collect();
            conns.lock().unwrap()[index].requests.push((path, request));
            if stream.write_all(reply).await.is_err() || close {
                break 'conn;
            }
        }
    }
    conns.lock().unwrap()[index].closed = true;
}

/// The path and total length of the first complete request in `data`, if there is one.
fn complete_request(data: &[u8]) -> Option<(String, usize)> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(head) = req.parse(data).ok()? else {
        return None;
    };
    let body = req
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| {
            std::str::from_utf8(h.value)
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()
        })
        .unwrap_or(0);
    let path = req.path.unwrap_or_default().to_string();
    (data.len() >= head + body).then_some((path, head + body))
}
