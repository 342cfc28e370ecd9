//! The client-facing listener: accepts connections on an already-bound socket, serves HTTP/1.1
//! and HTTP/2 on each (h2c, or over TLS with ALPN), and on shutdown stops accepting and lets
//! in-flight requests finish within the grace period.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::proxy::Proxy;

/// Pause after a failed accept (for example out of file descriptors), so the loop neither dies
/// nor spins while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

pub struct ServerSettings {
    pub client_header_timeout: Duration,
    pub shutdown_grace: Duration,
    pub max_connections: usize,
    pub max_header_bytes: usize,
    /// TLS termination; the handshake must finish within `client_header_timeout`.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    settings: ServerSettings,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.client_header_timeout)
        .max_buf_size(settings.max_header_bytes);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let tls = settings.tls.clone().map(TlsAcceptor::from);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    // Back-pressure: at the connection limit, stop accepting until a connection closes; new
    // clients wait in the kernel's backlog instead of being refused or crashing anything.
    let slots = Arc::new(tokio::sync::Semaphore::new(settings.max_connections));
    let mut failed_accepts: u64 = 0;
    loop {
        let slot = tokio::select! {
            permit = Arc::clone(&slots).acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break, // the semaphore is never closed
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => {
                    if failed_accepts > 0 {
                        tracing::info!(failed = failed_accepts, "accepting again");
                        failed_accepts = 0;
                    }
                    conn
                }
                Err(e) => {
                    // One line when it starts, then one every 100 attempts (5 s): starved of
                    // descriptors, the loop must not flood the log either.
                    if failed_accepts % 100 == 0 {
                        tracing::warn!(error = %e, failed = failed_accepts + 1, "accept failed");
                    }
                    failed_accepts += 1;
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "set_nodelay failed");
        }
        let conn = Conn {
            proxy: Arc::clone(&proxy),
            builder: Arc::clone(&builder),
            watcher: graceful.watcher(),
            peer,
        };
        let (tls, handshake) = (tls.clone(), settings.client_header_timeout);
        tokio::spawn(async move {
            match tls {
                None => conn.serve(stream, "http").await,
                Some(acceptor) => conn.serve_tls(acceptor, stream, handshake).await,
            }
            drop(slot);
        });
    }
    drop(listener);
    tracing::info!(
        connections = graceful.count(),
        "shutting down: draining connections"
    );
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(settings.shutdown_grace) => tracing::warn!("grace period over; closing the remaining connections"),
    }
}

/// One accepted client connection and what serving it needs.
struct Conn {
    proxy: Arc<Proxy>,
    builder: Arc<Builder<TokioExecutor>>,
    watcher: Watcher,
    peer: std::net::SocketAddr,
}

impl Conn {
    async fn serve_tls(self, acceptor: TlsAcceptor, stream: TcpStream, limit: Duration) {
        match tokio::time::timeout(limit, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => self.serve(tls, "https").await,
            Ok(Err(e)) => tracing::debug!(peer = %self.peer, error = %e, "TLS handshake failed"),
            Err(_) => tracing::debug!(peer = %self.peer, "TLS handshake timed out"),
        }
    }

    /// Serves HTTP/1.1 or HTTP/2 (by preface; under TLS ALPN has agreed on it) with upgrades.
    async fn serve<I>(self, io: I, proto: &'static str)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (proxy, peer) = (self.proxy, self.peer);
        let svc = service_fn(move |req| {
            let proxy = Arc::clone(&proxy);
            async move { proxy.handle(req, peer, proto).await }
        });
        let conn = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(io), svc);
        if let Err(e) = self.watcher.watch(conn.into_owned()).await {
            tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
        }
    }
}
