//! The leanest HTTP/1 proxy httparse allows, for `RAW=1 bench/run.sh`: how fast a proxy with an
//! HTTP/1 engine of its own (httparse for the heads, the rest ours) could be on the machine, so
//! the case for leaving hyper is measured, not guessed.
//!
//! Each client connection gets one connection to the first backend of the config. A request's
//! head and body go there byte for byte; the response comes back with one `Set-Cookie` line put
//! before its blank line (the bench checks for a `stickylb` cookie). Bodies are framed by
//! Content-Length only: a chunked message ends the connection. No validation, pin, health,
//! pool, timers, forwarding headers or hop-by-hop removal: not a proxy to deploy. One thread.
//!
//!     cargo run --release --example raw_floor -- -c config.toml

mod common;

use std::io::{Error, ErrorKind};
use std::process::ExitCode;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const COOKIE: &[u8] = b"Set-Cookie: stickylb=floor; Path=/\r\n";
const MAX_HEADERS: usize = 64;

fn main() -> ExitCode {
    common::main("raw_floor", relay)
}

async fn relay(mut client: TcpStream, upstream: String) -> std::io::Result<()> {
    client.set_nodelay(true)?;
    let mut backend = TcpStream::connect(&upstream).await?;
    backend.set_nodelay(true)?;
    let (mut from_client, mut from_backend) = (Vec::with_capacity(8192), Vec::with_capacity(8192));
    let mut out = Vec::with_capacity(8192);
    loop {
        let Some((_, len)) = read_message(&mut client, &mut from_client, request_head).await?
        else {
            return Ok(());
        };
        backend.write_all(&from_client[..len]).await?;
        from_client.drain(..len);
        let Some((head, len)) =
            read_message(&mut backend, &mut from_backend, response_head).await?
        else {
            return Err(Error::new(ErrorKind::UnexpectedEof, "backend closed"));
        };
        out.clear();
        out.extend_from_slice(&from_backend[..head - 2]);
        out.extend_from_slice(COOKIE);
        out.extend_from_slice(&from_backend[head - 2..len]);
        client.write_all(&out).await?;
        from_backend.drain(..len);
    }
}

/// A head's length and its body's, once the head is whole.
type Frame = Option<(usize, usize)>;

/// Reads until `buf` holds one whole message: Some((head length, message length)), or None
/// when the peer closed between messages.
async fn read_message(
    io: &mut TcpStream,
    buf: &mut Vec<u8>,
    frame: fn(&[u8]) -> std::io::Result<Frame>,
) -> std::io::Result<Option<(usize, usize)>> {
    loop {
        if let Some((head, body)) = frame(buf)? {
            if buf.len() >= head + body {
                return Ok(Some((head, head + body)));
            }
        }
        if io.read_buf(buf).await? == 0 {
            return match buf.is_empty() {
                true => Ok(None),
                false => Err(Error::new(ErrorKind::UnexpectedEof, "closed mid-message")),
            };
        }
    }
}

fn request_head(buf: &[u8]) -> std::io::Result<Frame> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req
        .parse(buf)
        .map_err(|e| Error::new(ErrorKind::InvalidData, e))?
    {
        httparse::Status::Complete(n) => Ok(Some((n, body_length(req.headers)?))),
        httparse::Status::Partial => Ok(None),
    }
}

fn response_head(buf: &[u8]) -> std::io::Result<Frame> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    match resp
        .parse(buf)
        .map_err(|e| Error::new(ErrorKind::InvalidData, e))?
    {
        httparse::Status::Complete(n) => Ok(Some((n, body_length(resp.headers)?))),
        httparse::Status::Partial => Ok(None),
    }
}

fn body_length(headers: &[httparse::Header]) -> std::io::Result<usize> {
    let mut length = 0;
    for h in headers {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "chunked: not in this floor",
            ));
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            length = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| Error::new(ErrorKind::InvalidData, "bad Content-Length"))?;
        }
    }
    Ok(length)
}
