//! The leanest HTTP/1 proxy httparse allows, for `RAW=1 bench/run.sh`: how fast a proxy with an
//! HTTP/1 engine of its own (httparse for the heads, the rest ours) could be on the machine, so
//! the case for leaving hyper is measured, not guessed.
//!
//! Each client connection gets one connection to the first backend of the config. A request's
//! head and body go there byte for byte; the response comes back with one `Set-Cookie` line put
//! before its blank line (the bench checks for a `stickylb` cookie; the head must end in CRLF
//! CRLF, as nginx writes it). Bodies are framed by Content-Length only: a chunked message ends
//! the connection. No validation, pin, health,
//! pool, timers, forwarding headers or hop-by-hop removal: not a proxy to deploy. One thread.
//!
//!     cargo run --release --example raw_floor -- -c config.toml

mod common;
#[path = "common/raw.rs"]
mod raw;

use std::io::{Error, ErrorKind};
use std::process::ExitCode;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    common::main("raw_floor", common::first_backend, relay)
}

async fn relay(mut client: TcpStream, upstream: String) -> std::io::Result<()> {
    client.set_nodelay(true)?;
    let mut backend = TcpStream::connect(&upstream).await?;
    backend.set_nodelay(true)?;
    let (mut from_client, mut from_backend) = (Vec::with_capacity(8192), Vec::with_capacity(8192));
    let mut out = Vec::with_capacity(8192);
    loop {
        let Some((_, len)) =
            raw::read_message(&mut client, &mut from_client, raw::request_frame).await?
        else {
            return Ok(());
        };
        backend.write_all(&from_client[..len]).await?;
        from_client.drain(..len);
        let Some((head, len)) =
            raw::read_message(&mut backend, &mut from_backend, raw::response_frame).await?
        else {
            return Err(Error::new(ErrorKind::UnexpectedEof, "backend closed"));
        };
        raw::with_cookie(&mut out, &from_backend[..len], head);
        client.write_all(&out).await?;
        from_backend.drain(..len);
    }
}
