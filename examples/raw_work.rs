//! raw_floor (an HTTP/1 proxy on httparse alone) plus the per-request work stickylb does, done on
//! raw heads, for `RAW=1 bench/run.sh`: what an HTTP/1 engine of stickylb's own could reach with
//! that work, before anyone writes one.
//!
//! Per request it does what stickylb's request path does on the common request: checks the
//! request line, Host and header bytes; takes its pin cookie out of the `Cookie` line and checks
//! the value; drops hop-by-hop headers and those `Connection` names; replaces the four
//! forwarding headers; takes a backend connection from a shared pool and puts it back; reads
//! the clock twice and counts the request; drops the response's hop-by-hop headers and adds
//! `Set-Cookie` when the request had no pin. It leaves out what the bench never exercises
//! (timers, retries, health, chunked bodies, upgrades): an approximation, not a proxy to deploy.
//!
//!     cargo run --release --example raw_work -- -c config.toml

mod common;
#[path = "common/raw.rs"]
mod raw;

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use raw::invalid;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SET_COOKIE: &[u8] = b"Set-Cookie: stickylb=floor; Path=/\r\n";
const PIN: &[u8] = b"stickylb";
/// The pin the bench's cookie carries; stickylb's are 22 characters of base64.
const PIN_VALUE: &[u8] = b"floor";
const HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
    "proxy-authorization",
];
const FORWARDING: [&str; 4] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-real-ip",
];

static POOL: Mutex<Vec<TcpStream>> = Mutex::new(Vec::new());
static SERVED: AtomicU64 = AtomicU64::new(0);
static BUSY_US: AtomicU64 = AtomicU64::new(0);

fn main() -> ExitCode {
    common::main("raw_work", relay)
}

async fn relay(mut client: TcpStream, upstream: String) -> std::io::Result<()> {
    client.set_nodelay(true)?;
    let peer = client.peer_addr()?.ip().to_string();
    let (mut from_client, mut from_backend) = (Vec::with_capacity(8192), Vec::with_capacity(8192));
    let mut out = Vec::with_capacity(8192);
    loop {
        let read = raw::read_message(&mut client, &mut from_client, raw::request_frame).await?;
        let Some((head, len)) = read else {
            return Ok(());
        };
        let start = Instant::now();
        out.clear();
        let pinned = request_out(&from_client[..head], &peer, &mut out)?;
        out.extend_from_slice(&from_client[head..len]);
        from_client.drain(..len);
        let mut backend = pooled(&upstream).await?;
        backend.write_all(&out).await?;
        let read = raw::read_message(&mut backend, &mut from_backend, raw::response_frame).await?;
        let (head, len) = read.ok_or_else(|| invalid("backend closed"))?;
        POOL.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(backend);
        out.clear();
        response_out(&from_backend[..head], pinned, &mut out)?;
        out.extend_from_slice(&from_backend[head..len]);
        from_backend.drain(..len);
        client.write_all(&out).await?;
        SERVED.fetch_add(1, Ordering::Relaxed);
        let busy = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
        BUSY_US.fetch_add(busy, Ordering::Relaxed);
    }
}

async fn pooled(upstream: &str) -> std::io::Result<TcpStream> {
    let idle = POOL.lock().unwrap_or_else(PoisonError::into_inner).pop();
    if let Some(backend) = idle {
        return Ok(backend);
    }
    let backend = TcpStream::connect(upstream).await?;
    backend.set_nodelay(true)?;
    Ok(backend)
}

/// Writes the head to send to the backend; true if the request carried a pin.
fn request_out(head: &[u8], peer: &str, out: &mut Vec<u8>) -> std::io::Result<bool> {
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
    let (host, pinned) = request_headers(req.headers, out)?;
    header(out, b"X-Forwarded-For", peer.as_bytes());
    header(out, b"X-Forwarded-Proto", b"http");
    header(out, b"X-Forwarded-Host", host);
    header(out, b"X-Real-IP", peer.as_bytes());
    out.extend_from_slice(b"\r\n");
    Ok(pinned)
}

/// Copies the request's end-to-end headers, the `Cookie` line without the pin; returns the one
/// Host and whether a pin was there.
fn request_headers<'a>(
    headers: &[httparse::Header<'a>],
    out: &mut Vec<u8>,
) -> std::io::Result<(&'a [u8], bool)> {
    let (mut host, mut pinned) = (None, false);
    for h in headers {
        if !h
            .value
            .iter()
            .all(|b| (0x20..0x7f).contains(b) || *b == b'\t')
        {
            return Err(invalid("header value"));
        }
        if is_any(h.name, &HOP)
            || is_any(h.name, &FORWARDING)
            || named_by_connection(headers, h.name)
        {
            continue;
        }
        if h.name.eq_ignore_ascii_case("cookie") {
            pinned |= cookie_out(h.value, out);
            continue;
        }
        if h.name.eq_ignore_ascii_case("host") && host.replace(h.value).is_some() {
            return Err(invalid("two Host headers"));
        }
        header(out, h.name.as_bytes(), h.value);
    }
    Ok((host.ok_or_else(|| invalid("no Host"))?, pinned))
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

/// Writes the `Cookie` line without the pin (no line if nothing is left); true if the pin was
/// there and well formed.
fn cookie_out(line: &[u8], out: &mut Vec<u8>) -> bool {
    let (at, mut pinned, mut kept) = (out.len(), false, 0);
    out.extend_from_slice(b"Cookie: ");
    for pair in line.split(|b| *b == b';').map(<[u8]>::trim_ascii) {
        let mut halves = pair.splitn(2, |b| *b == b'=');
        if halves.next().map(<[u8]>::trim_ascii_end) == Some(PIN) {
            let value = halves.next().unwrap_or_default().trim_ascii_start();
            pinned |= value == PIN_VALUE || value.len() == 22;
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
    pinned
}

/// Writes the head to send to the client.
fn response_out(head: &[u8], pinned: bool, out: &mut Vec<u8>) -> std::io::Result<()> {
    let mut headers = [httparse::EMPTY_HEADER; raw::MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    resp.parse(head).map_err(|_| invalid("response head"))?;
    let code = resp.code.ok_or_else(|| invalid("status"))?;
    let digits = [100, 10, 1].map(|unit| b'0' + u8::try_from(code / unit % 10).unwrap_or(0));
    for part in [
        b"HTTP/1.1 ".as_slice(),
        &digits,
        b" ",
        resp.reason.unwrap_or("").as_bytes(),
        b"\r\n",
    ] {
        out.extend_from_slice(part);
    }
    for h in resp.headers.iter() {
        if !is_any(h.name, &HOP) && !named_by_connection(resp.headers, h.name) {
            header(out, h.name.as_bytes(), h.value);
        }
    }
    if !pinned {
        out.extend_from_slice(SET_COOKIE);
    }
    out.extend_from_slice(b"\r\n");
    Ok(())
}
