//! `raw_floor` on io_uring (tokio-uring), for `URING=1 bench/run.sh`: whether handing the kernel
//! a whole turn's sends and receives in one entry, instead of one system call each, buys the
//! microsecond per request that kernel-bound machines ask for, measured before the runtime of
//! stickylb itself is changed.
//!
//! The same relay as `raw_floor` (one upstream connection per client, heads by httparse, one
//! `Set-Cookie` line added, Content-Length framing only); only the I/O differs: tokio-uring
//! queues each read and write and submits the queue once, when the thread has nothing left to
//! run. Not a proxy to deploy. One thread.
//!
//!     cargo run --release --example uring_floor -- -c config.toml

mod common;
#[path = "common/raw.rs"]
#[allow(
    dead_code,
    reason = "its reading is tokio's; only the framing serves here"
)]
mod raw;

use std::io::{Error, ErrorKind};
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::AsFd;
use std::process::ExitCode;

use stickylb::config::Config;
use tokio::io::AsyncWriteExt;
use tokio_uring::buf::BoundedBuf;
use tokio_uring::net::TcpStream;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CHUNK: usize = 8192;

fn main() -> ExitCode {
    let (config, upstream) = match common::load("uring_floor", first_address) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    match tokio_uring::start(serve(config.listener.address, upstream)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn first_address(config: &Config) -> Option<SocketAddr> {
    common::first_backend(config)?
        .to_socket_addrs()
        .ok()?
        .next()
}

async fn serve(listen: SocketAddr, upstream: SocketAddr) -> std::io::Result<()> {
    let sends_only = std::env::var_os("URING_SENDS_ONLY").is_some();
    let listener = tokio::net::TcpListener::bind(listen).await?;
    loop {
        let (client, _) = listener.accept().await?;
        tokio_uring::spawn(async move {
            let relayed = match sends_only {
                true => relay_sends(client, upstream).await,
                false => relay(client, upstream).await,
            };
            if let Err(e) = relayed {
                eprintln!("connection ended: {e}");
            }
        });
    }
}

/// A socket tokio accepted, for io_uring: made blocking, as tokio-uring's own sockets are.
fn uring_stream(io: tokio::net::TcpStream) -> std::io::Result<TcpStream> {
    let io = io.into_std()?;
    io.set_nonblocking(false)?;
    Ok(TcpStream::from_std(io))
}

async fn relay(client: tokio::net::TcpStream, upstream: SocketAddr) -> std::io::Result<()> {
    let client = uring_stream(client)?;
    client.set_nodelay(true)?;
    let backend = TcpStream::connect(upstream).await?;
    backend.set_nodelay(true)?;
    let (mut from_client, mut from_backend) =
        (Vec::with_capacity(CHUNK), Vec::with_capacity(CHUNK));
    let (mut request, mut out) = (Vec::with_capacity(CHUNK), Vec::with_capacity(CHUNK));
    loop {
        let len;
        (len, from_client) = read_message(&client, from_client, raw::request_frame).await?;
        let Some((_, len)) = len else {
            return Ok(());
        };
        request.clear();
        request.extend_from_slice(&from_client[..len]);
        from_client.drain(..len);
        request = write_all(&backend, request).await?;
        let message;
        (message, from_backend) = read_message(&backend, from_backend, raw::response_frame).await?;
        let Some((head, len)) = message else {
            return Err(Error::new(ErrorKind::UnexpectedEof, "backend closed"));
        };
        raw::with_cookie(&mut out, &from_backend[..len], head);
        from_backend.drain(..len);
        out = write_all(&client, out).await?;
    }
}

/// `URING_SENDS_ONLY` set: only the requests to the upstream go through io_uring (on a second
/// descriptor of the socket); everything else is tokio's readiness and one system call each, as
/// in `raw_floor`. Tells whether batching the sends that wake the upstream is the whole effect.
async fn relay_sends(
    mut client: tokio::net::TcpStream,
    upstream: SocketAddr,
) -> std::io::Result<()> {
    client.set_nodelay(true)?;
    let mut backend = tokio::net::TcpStream::connect(upstream).await?;
    backend.set_nodelay(true)?;
    // A second descriptor of the socket for io_uring. It shares the first's non-blocking flag,
    // which io_uring does not honour on sockets: a send that finds the buffer full waits for
    // room (tests/uring.rs), as a blocking one would.
    let sender = TcpStream::from_std(backend.as_fd().try_clone_to_owned()?.into());
    let (mut from_client, mut from_backend) =
        (Vec::with_capacity(CHUNK), Vec::with_capacity(CHUNK));
    let (mut request, mut out) = (Vec::with_capacity(CHUNK), Vec::with_capacity(CHUNK));
    loop {
        let Some((_, len)) =
            raw::read_message(&mut client, &mut from_client, raw::request_frame).await?
        else {
            return Ok(());
        };
        request.clear();
        request.extend_from_slice(&from_client[..len]);
        from_client.drain(..len);
        request = write_all(&sender, request).await?;
        let Some((head, len)) =
            raw::read_message(&mut backend, &mut from_backend, raw::response_frame).await?
        else {
            return Err(Error::new(ErrorKind::UnexpectedEof, "backend closed"));
        };
        raw::with_cookie(&mut out, &from_backend[..len], head);
        from_backend.drain(..len);
        client.write_all(&out).await?;
    }
}

async fn write_all(io: &TcpStream, buf: Vec<u8>) -> std::io::Result<Vec<u8>> {
    let (written, buf) = io.write_all(buf).await;
    written.map(|()| buf)
}

/// `raw::read_message` with owned buffers: the buffer goes to the kernel and comes back.
async fn read_message(
    io: &TcpStream,
    mut buf: Vec<u8>,
    frame: fn(&[u8]) -> std::io::Result<raw::Frame>,
) -> std::io::Result<(Option<(usize, usize)>, Vec<u8>)> {
    loop {
        if let Some((head, body)) = frame(&buf)? {
            if buf.len() >= head + body {
                return Ok((Some((head, head + body)), buf));
            }
        }
        buf.reserve(CHUNK);
        let start = buf.len();
        let (read, slice) = io.read(buf.slice(start..)).await;
        buf = slice.into_inner();
        if read? == 0 {
            return match buf.is_empty() {
                true => Ok((None, buf)),
                false => Err(Error::new(ErrorKind::UnexpectedEof, "closed mid-message")),
            };
        }
    }
}
