//! The leanest HTTP/1 proxy hyper allows, for `FLOOR=1 bench/run.sh`: how fast any proxy built
//! on hyper can be on the machine, so stickylb's own cost is measured against hyper's, not only
//! against HAProxy's.
//!
//! Each client connection gets one connection to the first backend of the config, and every
//! request goes there as hyper parsed it, its response back with one `Set-Cookie` added (the
//! bench checks for a `stickylb` cookie). No validation, pin, health, pool, timers, forwarding
//! headers or hop-by-hop removal: not a proxy to deploy. One thread, as the bench runs stickylb.
//!
//!     cargo run --release --example hyper_floor -- -c config.toml

mod common;

use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};

use http::header::SET_COOKIE;
use http::HeaderValue;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const COOKIE: HeaderValue = HeaderValue::from_static("stickylb=floor; Path=/");

fn main() -> ExitCode {
    common::main("hyper_floor", common::first_backend, relay)
}

async fn relay(client: TcpStream, upstream: String) -> Result<(), Box<dyn std::error::Error>> {
    client.set_nodelay(true)?;
    let backend = TcpStream::connect(&upstream).await?;
    backend.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(backend)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("backend connection ended: {e}");
        }
    });
    // hyper's HTTP/1 server hands over one request at a time: the lock is never contended.
    let sender: Arc<Mutex<SendRequest<Incoming>>> = Arc::new(Mutex::new(sender));
    let service = service_fn(move |req| {
        let sent = sender
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .send_request(req);
        async move {
            let mut resp = sent.await?;
            resp.headers_mut().append(SET_COOKIE, COOKIE);
            Ok::<_, hyper::Error>(resp)
        }
    });
    hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(client), service)
        .await?;
    Ok(())
}
