//! raw_floor (an HTTP/1 proxy on httparse alone) plus the per-request work stickylb does, for
//! `RAW=1 bench/run.sh`: what an HTTP/1 engine of stickylb's own could reach with that work,
//! before anyone writes one. The routing is stickylb's own: its routing snapshot behind an
//! `ArcSwap`, its pins, candidates, in-flight count and metrics; only the HTTP handling is raw.
//!
//! Per request: the request line, Host and header bytes checked; the pin cookie taken out of the
//! `Cookie` line and looked up (`Routing::pin`); hop-by-hop headers and those `Connection` names
//! dropped; the four forwarding headers replaced; the first candidate's pooled connection (one
//! pool per backend), with the response head awaited under `timeouts.backend_response`; the
//! request counted in flight, its latency and outcome in the metrics, a `request` log event (off
//! at the bench's log level, as in stickylb); the response's hop-by-hop headers dropped and
//! `Set-Cookie` added when the pin is new or renewed. It leaves out what the bench never
//! exercises (retries, chunked bodies, upgrades, parking): not a proxy to deploy.
//!
//!     cargo run --release --example raw_work -- -c config.toml

mod common;
#[path = "common/raw.rs"]
mod raw;

use std::io::{Error, ErrorKind};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use arc_swap::ArcSwap;
use http::HeaderValue;
use raw::invalid;
use stickylb::backend::unix_ms;
use stickylb::config::Config;
use stickylb::headers::names_hop_by_hop;
use stickylb::metrics::Metrics;
use stickylb::routing::{Member, Pin, Routing};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const FORWARDING: [&str; 4] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-real-ip",
];

/// What every connection shares: stickylb's routing and metrics, and a pool per backend.
struct Shared {
    routing: ArcSwap<Routing>,
    metrics: Metrics,
    pools: Vec<Mutex<Vec<TcpStream>>>,
}

fn shared(config: &Config) -> Option<Arc<Shared>> {
    let routing = Routing::build(config, None);
    let pools = routing.members.iter().map(|_| Mutex::default()).collect();
    (!routing.members.is_empty()).then(|| {
        Arc::new(Shared {
            routing: ArcSwap::from_pointee(routing),
            metrics: Metrics::default(),
            pools,
        })
    })
}

fn main() -> ExitCode {
    common::main("raw_work", shared, relay)
}

/// A connection's buffers, kept across its requests.
#[derive(Default)]
struct Buffers {
    from_client: Vec<u8>,
    from_backend: Vec<u8>,
    out: Vec<u8>,
}

async fn relay(mut client: TcpStream, shared: Arc<Shared>) -> std::io::Result<()> {
    client.set_nodelay(true)?;
    let peer = client.peer_addr()?.ip().to_string();
    let mut b = Buffers::default();
    loop {
        let read = raw::read_message(&mut client, &mut b.from_client, raw::request_frame).await?;
        let Some((head, len)) = read else {
            return Ok(());
        };
        exchange(&shared, &peer, &mut b, head, len).await?;
        client.write_all(&b.out).await?;
    }
}

/// Sends the request in `b.from_client` to its backend and leaves the response in `b.out`.
async fn exchange(
    shared: &Shared,
    peer: &str,
    b: &mut Buffers,
    head: usize,
    len: usize,
) -> std::io::Result<()> {
    let started = Instant::now();
    let routing = shared.routing.load_full();
    let now = unix_ms() / 1000;
    b.out.clear();
    let pin = request_out(&b.from_client[..head], &routing, now, peer, &mut b.out)?;
    b.out.extend_from_slice(&b.from_client[head..len]);
    b.from_client.drain(..len);
    let idx = routing
        .candidates(&pin)
        .next()
        .ok_or_else(|| invalid("no backend"))?;
    let hit = matches!(pin, Pin::Member { index, .. } if index == idx);
    let member = &routing.members[idx];
    let guard = member.backend.start_request(hit.then_some(now));
    let (head, len) = timed_send(shared, &routing, idx, b).await?;
    let renew = matches!(pin, Pin::Member { renew: true, .. });
    let set_cookie = (!hit || renew).then(|| routing.set_cookie(idx, now));
    b.out.clear();
    let status = response_out(&b.from_backend[..head], set_cookie.as_ref(), &mut b.out)?;
    b.out.extend_from_slice(&b.from_backend[head..len]);
    b.from_backend.drain(..len);
    drop(guard);
    let outcome = outcome(&pin, hit);
    shared
        .metrics
        .request(Some(&member.backend), status, outcome);
    let took = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    tracing::info!(status, backend = %member.backend.id, duration_us = took, "request");
    Ok(())
}

/// How the request's pin was honoured, as stickylb's metrics name it.
fn outcome(pin: &Pin, hit: bool) -> &'static str {
    match (pin, hit) {
        (Pin::None, _) => "new",
        (_, true) => "hit",
        _ => "failover",
    }
}

/// Sends `b.out` to `members[idx]` and reads its response into `b.from_backend` within
/// `timeouts.backend_response`, recording the latency.
async fn timed_send(
    shared: &Shared,
    routing: &Routing,
    idx: usize,
    b: &mut Buffers,
) -> std::io::Result<(usize, usize)> {
    let member = &routing.members[idx];
    let sent = Instant::now();
    let deadline = tokio::time::Instant::from_std(sent) + routing.timeouts.backend_response;
    let sending = send(&shared.pools[idx], member, &b.out, &mut b.from_backend);
    let framed = tokio::time::timeout_at(deadline, sending)
        .await
        .map_err(|_| Error::new(ErrorKind::TimedOut, "backend response"))??;
    shared
        .metrics
        .upstream_latency(&member.backend, sent.elapsed());
    Ok(framed)
}

/// Writes `request` on a pooled connection to `member` (a new one if none is idle) and reads
/// the response into `buf`: its head and whole length.
async fn send(
    pool: &Mutex<Vec<TcpStream>>,
    member: &Member,
    request: &[u8],
    buf: &mut Vec<u8>,
) -> std::io::Result<(usize, usize)> {
    let idle = pool.lock().unwrap_or_else(PoisonError::into_inner).pop();
    let mut backend = match idle {
        Some(backend) => backend,
        None => {
            let backend = TcpStream::connect(member.backend.address.as_str()).await?;
            backend.set_nodelay(true)?;
            backend
        }
    };
    backend.write_all(request).await?;
    let read = raw::read_message(&mut backend, buf, raw::response_frame).await?;
    let framed = read.ok_or_else(|| invalid("backend closed"))?;
    pool.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(backend);
    Ok(framed)
}

/// Writes the head to send to the backend; returns the request's pin.
fn request_out(
    head: &[u8],
    routing: &Routing,
    now: u64,
    peer: &str,
    out: &mut Vec<u8>,
) -> std::io::Result<Pin> {
    let mut headers = [httparse::EMPTY_HEADER; raw::MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    req.parse(head).map_err(|_| invalid("request head"))?;
    let method = req.method.ok_or_else(|| invalid("method"))?;
    let path = req.path.ok_or_else(|| invalid("path"))?;
    if req.version != Some(1) || !path.starts_with('/') || method == "CONNECT" {
        return Err(invalid("request line"));
    }
    for part in [method.as_bytes(), b" ", path.as_bytes(), b" HTTP/1.1\r\n"] {
        out.extend_from_slice(part);
    }
    let mut pin = None;
    let mut honour = |value: &str| pin = pin.take().or_else(|| routing.pin(value, now));
    let host = request_headers(
        req.headers,
        routing.cookie_name.as_bytes(),
        &mut honour,
        out,
    )?;
    header(out, b"X-Forwarded-For", peer.as_bytes());
    header(out, b"X-Forwarded-Proto", b"http");
    header(out, b"X-Forwarded-Host", host);
    header(out, b"X-Real-IP", peer.as_bytes());
    out.extend_from_slice(b"\r\n");
    Ok(pin.unwrap_or(Pin::None))
}

/// Copies the request's end-to-end headers, each `Cookie` line without the pin cookie (whose
/// values go to `honour`); returns the one Host.
fn request_headers<'a>(
    headers: &[httparse::Header<'a>],
    cookie: &[u8],
    honour: &mut impl FnMut(&str),
    out: &mut Vec<u8>,
) -> std::io::Result<&'a [u8]> {
    let mut host = None;
    for h in headers {
        if !h
            .value
            .iter()
            .all(|b| (0x20..0x7f).contains(b) || *b == b'\t')
        {
            return Err(invalid("header value"));
        }
        let hop = names_hop_by_hop(h.name.as_bytes()) || named_by_connection(headers, h.name);
        if hop || is_any(h.name, &FORWARDING) {
            continue;
        }
        if h.name.eq_ignore_ascii_case("cookie") {
            cookie_out(h.value, cookie, honour, out);
            continue;
        }
        if h.name.eq_ignore_ascii_case("host") && host.replace(h.value).is_some() {
            return Err(invalid("two Host headers"));
        }
        header(out, h.name.as_bytes(), h.value);
    }
    host.ok_or_else(|| invalid("no Host"))
}

fn is_any(name: &str, set: &[&str]) -> bool {
    set.iter().any(|n| name.eq_ignore_ascii_case(n))
}

/// Whether a `Connection` header of the message names `name` (so it is hop-by-hop too).
fn named_by_connection(headers: &[httparse::Header], name: &str) -> bool {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .flat_map(|h| h.value.split(|b| *b == b','))
        .any(|token| token.trim_ascii().eq_ignore_ascii_case(name.as_bytes()))
}

fn header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    for part in [name, b": ", value, b"\r\n"] {
        out.extend_from_slice(part);
    }
}

/// Writes the `Cookie` line without the cookies called `name` (no line if nothing is left),
/// offering their values to `honour`.
fn cookie_out(line: &[u8], name: &[u8], honour: &mut impl FnMut(&str), out: &mut Vec<u8>) {
    let (at, mut kept) = (out.len(), 0);
    out.extend_from_slice(b"Cookie: ");
    for pair in line.split(|b| *b == b';').map(<[u8]>::trim_ascii) {
        let mut halves = pair.splitn(2, |b| *b == b'=');
        if halves.next().map(<[u8]>::trim_ascii_end) == Some(name) {
            let value = halves.next().unwrap_or_default().trim_ascii_start();
            if let Ok(value) = std::str::from_utf8(value) {
                honour(value);
            }
            continue;
        }
        if kept > 0 {
            out.extend_from_slice(b"; ");
        }
        out.extend_from_slice(pair);
        kept += 1;
    }
    match kept {
        0 => out.truncate(at),
        _ => out.extend_from_slice(b"\r\n"),
    }
}

/// Writes the head to send to the client; returns its status.
fn response_out(
    head: &[u8],
    set_cookie: Option<&HeaderValue>,
    out: &mut Vec<u8>,
) -> std::io::Result<u16> {
    let mut headers = [httparse::EMPTY_HEADER; raw::MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    resp.parse(head).map_err(|_| invalid("response head"))?;
    let code = resp.code.ok_or_else(|| invalid("status"))?;
    let digits = [100, 10, 1].map(|unit| b'0' + u8::try_from(code / unit % 10).unwrap_or(0));
    let reason = resp.reason.unwrap_or("").as_bytes();
    for part in [b"HTTP/1.1 ".as_slice(), &digits, b" ", reason, b"\r\n"] {
        out.extend_from_slice(part);
    }
    for h in resp.headers.iter() {
        if !names_hop_by_hop(h.name.as_bytes()) && !named_by_connection(resp.headers, h.name) {
            header(out, h.name.as_bytes(), h.value);
        }
    }
    if let Some(value) = set_cookie {
        header(out, b"Set-Cookie", value.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    Ok(code)
}
