//! The client-facing listener: accepts connections on an already-bound socket, serves HTTP/1.1
//! and HTTP/2 on each (h2c, or over TLS with ALPN), parks quiet HTTP/1 connections, and on
//! shutdown stops accepting and lets in-flight requests finish within the grace period.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::activity::{Activity, Busy};
use crate::coalesce::Coalesce;
use crate::framing::{self, Conflicts, Watch};
use crate::headers::Peer;
use crate::lane::{Lane, Next};
use crate::park::{Home, Parkable};
use crate::proxy::Proxy;
use crate::woken::Woken;

/// Pause after a failed accept (for example out of file descriptors), so the loop neither dies
/// nor spins while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

pub struct ServerSettings {
    pub client_header_timeout: Duration,
    /// An HTTP/1 connection quiet this long is parked: its hyper state and buffers are freed
    /// while the socket waits for the next request (see `park`).
    pub park_after: Duration,
    /// Counts the parked connections.
    pub parked: Gauge,
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
    let builder = Arc::new(http_builder(&settings));
    let tls = settings.tls.clone().map(TlsAcceptor::from);
    let (stop, stopped) = watch::channel(());
    // Back-pressure: at the connection limit, stop accepting until a connection closes; new
    // clients wait in the kernel's backlog instead of being refused or crashing anything. Each
    // connection holds a slot until it is closed, so taking every slot back means all are closed.
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    tokio::pin!(shutdown);
    let mut accepts = Accepts::default();
    while let Some((slot, stream, peer)) =
        next_client(&slots, &mut accepts, &listener, shutdown.as_mut()).await
    {
        let conn = Conn::boxed(&proxy, &builder, &stopped, peer, &settings);
        let (tls, handshake) = (tls.clone(), settings.client_header_timeout);
        tokio::spawn(async move {
            let stream = Coalesce::new(stream);
            match tls {
                None => conn.serve(stream, "http", true).await,
                // Boxed: its larger state would otherwise size every plaintext connection's task.
                Some(acceptor) => Box::pin(conn.serve_tls(acceptor, stream, handshake)).await,
            }
            drop(slot);
        });
    }
    drop(listener);
    drain(stop, &slots, &settings).await;
}

/// The next client and the connection slot it holds, or None once shutdown is asked for.
async fn next_client(
    slots: &Arc<Semaphore>,
    accepts: &mut Accepts,
    listener: &TcpListener,
    mut shutdown: Pin<&mut impl Future<Output = ()>>,
) -> Option<(OwnedSemaphorePermit, TcpStream, SocketAddr)> {
    let slot = tokio::select! {
        // The semaphore is never closed.
        permit = Arc::clone(slots).acquire_owned() => permit.ok()?,
        () = &mut shutdown => return None,
    };
    let (stream, peer) = tokio::select! {
        accepted = accepts.next(listener) => accepted,
        () = &mut shutdown => return None,
    };
    Some((slot, stream, peer))
}

/// HTTP/1.1 and HTTP/2 by preface (or ALPN). The head of an HTTP/1 request is bounded by the
/// connection's own timer (`Quiet::check`), so HTTP/1 needs no hyper timer: hyper's header timer
/// armed a new timer for every request, about 1,500 instructions of each (PERFORMANCE.md).
fn http_builder(settings: &ServerSettings) -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .header_read_timeout(None::<Duration>)
        .max_buf_size(settings.max_header_bytes);
    builder.http2().timer(TokioTimer::new());
    builder
}

/// Asks every connection to finish its requests and close, and waits for that within the grace.
async fn drain(stop: watch::Sender<()>, slots: &Semaphore, settings: &ServerSettings) {
    let open = settings.max_connections - slots.available_permits();
    tracing::info!(connections = open, "shutting down: draining connections");
    stop.send_replace(());
    let all = u32::try_from(settings.max_connections).unwrap_or(u32::MAX);
    tokio::select! {
        _ = slots.acquire_many(all) => tracing::info!("all connections closed"),
        () = tokio::time::sleep(settings.shutdown_grace) => tracing::warn!("grace period over; closing the remaining connections"),
    }
}

/// The accept side: a failed accept (for example out of file descriptors) is retried after a
/// pause, so the loop neither dies nor spins, and the log is not flooded while it lasts.
#[derive(Default)]
struct Accepts {
    failed: u64,
}

impl Accepts {
    async fn next(&mut self, listener: &TcpListener) -> (TcpStream, SocketAddr) {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    if self.failed > 0 {
                        tracing::info!(failed = self.failed, "accepting again");
                        self.failed = 0;
                    }
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(error = %e, "set_nodelay failed");
                    }
                    return (stream, peer);
                }
                Err(e) => {
                    // One line when it starts, then one every 100 attempts (5 s).
                    if self.failed % 100 == 0 {
                        tracing::warn!(error = %e, failed = self.failed + 1, "accept failed");
                    }
                    self.failed += 1;
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
    }
}

/// One accepted client connection and what serving it needs.
struct Conn {
    proxy: Arc<Proxy>,
    builder: Arc<Builder<TokioExecutor>>,
    stop: watch::Receiver<()>,
    peer: SocketAddr,
    max_head: usize,
    /// A connection with no request in flight for this long is closed gracefully.
    idle: Duration,
    park_after: Duration,
    parked: Gauge,
}

impl Conn {
    /// Boxed: a task's future keeps a moved-in value's slot for its whole life, so an inline
    /// `Conn` would be held twice by every connection's task, parked ones included.
    fn boxed(
        proxy: &Arc<Proxy>,
        builder: &Arc<Builder<TokioExecutor>>,
        stop: &watch::Receiver<()>,
        peer: SocketAddr,
        settings: &ServerSettings,
    ) -> Box<Self> {
        Box::new(Conn {
            proxy: Arc::clone(proxy),
            builder: Arc::clone(builder),
            stop: stop.clone(),
            peer,
            max_head: settings.max_header_bytes,
            idle: settings.client_header_timeout,
            park_after: settings.park_after,
            parked: settings.parked.clone(),
        })
    }

    async fn serve_tls(
        self: Box<Self>,
        acceptor: TlsAcceptor,
        stream: Coalesce<TcpStream>,
        limit: Duration,
    ) {
        match tokio::time::timeout(limit, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => {
                // HTTP/1 unless ALPN agreed on HTTP/2 (a client with no ALPN speaks HTTP/1).
                let http1 = tls.get_ref().1.alpn_protocol() != Some(b"h2");
                self.serve(tls, "https", http1).await
            }
            Ok(Err(e)) => tracing::debug!(peer = %self.peer, error = %e, "TLS handshake failed"),
            Err(_) => tracing::debug!(peer = %self.peer, "TLS handshake timed out"),
        }
    }

    /// Serves HTTP/1.1 or HTTP/2 (by preface; under TLS ALPN has agreed on it) with upgrades,
    /// until the peer closes, the connection idles out, or the server stops: the common HTTP/1
    /// requests in the lane (when `lane`: not on an HTTP/2 connection), the rest with hyper. A
    /// quiet HTTP/1 connection is parked and served afresh when bytes arrive.
    async fn serve<I>(mut self: Box<Self>, mut io: I, proto: &'static str, lane: bool)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Arc::new(Activity::new());
        let client = Arc::new(Peer::new(self.peer.ip()));
        let mut parked = None;
        loop {
            // Waiting costs no lane or hyper state: it is made, boxed, when bytes arrive.
            let Some(first) = self.first_byte(&mut io, &activity).await else {
                return;
            };
            drop(parked.take());
            let first = if lane {
                let mut lane = self.lane(&client, &activity, proto);
                match Box::pin(lane.serve(&mut io, first)).await {
                    Next::Hyper(first) => first,
                    Next::Park => {
                        tracing::trace!(peer = %self.peer, "parking connection");
                        parked = Some(Parked::new(&self.parked));
                        continue;
                    }
                    Next::Closed => return,
                }
            } else {
                Bytes::copy_from_slice(&[first])
            };
            // Boxed with the hyper connection it drives, so that a parked connection's task is
            // only as large as waiting for a first byte needs.
            match Box::pin(self.hyper(io, first, proto, &activity, &client)).await {
                Some(back) => io = back,
                None => return,
            }
            parked = Some(Parked::new(&self.parked));
        }
    }

    /// The lane, to serve this connection's common HTTP/1 requests.
    fn lane<'a>(
        &'a mut self,
        client: &'a Peer,
        activity: &'a Arc<Activity>,
        proto: &'static str,
    ) -> Lane<'a> {
        Lane {
            proxy: &self.proxy,
            peer: client,
            activity,
            stop: &mut self.stop,
            idle: self.idle,
            park_after: self.park_after,
            max_head: self.max_head,
            proto,
        }
    }

    /// One hyper connection on the socket, `first` read before it; the socket back if the
    /// connection was parked.
    async fn hyper<I>(
        &mut self,
        io: I,
        first: Bytes,
        proto: &'static str,
        activity: &Arc<Activity>,
        client: &Arc<Peer>,
    ) -> Option<I>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut io, conflicts) = framing::watch(io, self.max_head);
        io.saw(&first);
        let (proxy, seen, marks) = (
            Arc::clone(&self.proxy),
            Arc::clone(activity),
            Arc::clone(&conflicts),
        );
        let client = Arc::clone(client);
        let svc = service_fn(move |mut req| {
            marks.mark(&mut req);
            let (proxy, busy) = (Arc::clone(&proxy), Activity::begin(&seen));
            let client = Arc::clone(&client);
            async move {
                let resp = proxy.handle(req, &client, proto).await;
                resp.map(|r| r.map(|body| Tracked { body, _busy: busy }))
            }
        });
        let home = Home::new();
        let lent = TokioIo::new(Parkable::new(io, first, &home));
        let builder = Arc::clone(&self.builder);
        let conn = Box::pin(builder.serve_connection_with_upgrades(lent, svc));
        if !self.until_quiet(conn, activity, &conflicts, &home).await {
            return None;
        }
        home.take().map(Watch::into_inner)
    }

    /// The first byte of the next request, or None when the peer closes, the connection idles
    /// out or the server stops first.
    async fn first_byte<I: AsyncRead + Unpin>(
        &mut self,
        io: &mut I,
        activity: &Activity,
    ) -> Option<u8> {
        let mut byte = [0; 1];
        tokio::select! {
            read = io.read(&mut byte) => match read {
                Ok(1) => Some(byte[0]),
                Ok(_) => None,
                Err(e) => {
                    tracing::debug!(peer = %self.peer, error = %e, "read failed");
                    None
                }
            },
            _ = self.stop.changed() => None,
            () = activity.idle_for(self.idle) => None,
        }
    }

    /// Drives one hyper connection until it ends, the server stops or the connection idles out
    /// (then it is closed gracefully), or it is quiet and at rest (then it is parked: true).
    async fn until_quiet<I, F>(
        &mut self,
        mut conn: Pin<Box<F>>,
        activity: &Activity,
        conflicts: &Conflicts,
        home: &Home<Watch<I>>,
    ) -> bool
    where
        F: Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>> + Graceful,
    {
        let mut quiet = Quiet {
            served: conflicts.served(),
            not_before: Instant::now(),
            park_after: self.park_after,
            idle: self.idle,
        };
        // One timer for both idling out and parking. It and the shutdown signal are polled only
        // when they woke, not on each wake the connection has for its requests.
        let check = tokio::time::sleep(self.park_after.min(self.idle));
        tokio::pin!(check);
        let (mut timer, mut signal) = (Woken::new(), Woken::new());
        let park = loop {
            let stop = std::pin::pin!(self.stop.changed());
            // In order, the connection first: no random draw on every wake of a busy connection.
            tokio::select! {
                biased;
                ended = conn.as_mut() => {
                    log_end(self.peer, ended);
                    return false;
                }
                _ = signal.guard(stop) => break false,
                () = timer.guard(check.as_mut()) => match quiet.check(Seen::now(activity, conflicts)) {
                    Verdict::Abort => {
                        tracing::debug!(peer = %self.peer, "request head timed out");
                        return false;
                    }
                    Verdict::Close => break false,
                    Verdict::Park => break true,
                    Verdict::CheckAt(at) => check.as_mut().reset(at),
                },
            }
        };
        if park {
            tracing::trace!(peer = %self.peer, "parking connection");
            home.park();
        }
        // Finishes the requests in flight (HTTP/2: GOAWAY), then closes or parks.
        conn.as_mut().graceful();
        let ended = conn.await;
        let parked = park && ended.is_ok();
        log_end(self.peer, ended);
        parked
    }
}

/// What a quiet connection's timer decides when it fires.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// A request head begun and not finished in time (slowloris): dropped at once, since a
    /// graceful close would wait for the rest of the head.
    Abort,
    Close,
    Park,
    CheckAt(Instant),
}

/// The parking and idling rules of one HTTP/1 connection (hyper's or the lane's), apart from the
/// timer that runs them.
pub(crate) struct Quiet {
    /// Requests the watch had seen when this hyper connection started.
    served: u64,
    /// A connection found holding part of a head is not looked at again before this.
    not_before: Instant,
    park_after: Duration,
    /// Closed after this long with no request in flight.
    idle: Duration,
}

/// The connection as its timer finds it.
pub(crate) struct Seen {
    pub(crate) now: Instant,
    /// When the last request ended; None while one is in flight.
    pub(crate) idle_since: Option<Instant>,
    /// The framing watch has stopped following the stream (HTTP/2, a tunnel).
    pub(crate) lost: bool,
    pub(crate) served: u64,
    /// No byte of a next request has been read.
    pub(crate) at_rest: bool,
}

impl Seen {
    fn now(activity: &Activity, conflicts: &Conflicts) -> Self {
        Self {
            now: Instant::now(),
            idle_since: activity.idle_since(),
            lost: conflicts.lost(),
            served: conflicts.served(),
            at_rest: conflicts.at_rest(),
        }
    }
}

impl Quiet {
    /// Rules for a connection that has served no request yet, from now.
    pub(crate) fn new(park_after: Duration, idle: Duration) -> Self {
        Self::new_at(park_after, idle, Instant::now())
    }

    pub(crate) fn new_at(park_after: Duration, idle: Duration, now: Instant) -> Self {
        Self {
            served: 0,
            not_before: now,
            park_after,
            idle,
        }
    }

    /// Closes a connection idle for `idle` (aborts it if part of a head has come, since `idle`
    /// is also the time a client has for its head); parks one quiet for `park_after` that has
    /// served a request and holds no unread byte; otherwise says when to look again.
    pub(crate) fn check(&mut self, seen: Seen) -> Verdict {
        let Some(since) = seen.idle_since else {
            return Verdict::CheckAt(seen.now + self.park_after.min(self.idle));
        };
        let close_at = since + self.idle;
        if seen.now >= close_at && !seen.lost && !seen.at_rest {
            return Verdict::Abort;
        }
        if seen.now >= close_at {
            return Verdict::Close;
        }
        // HTTP/2 and tunnels are never parked: the watch has lost the stream.
        if seen.lost {
            return Verdict::CheckAt(close_at);
        }
        if seen.now >= (since + self.park_after).max(self.not_before) {
            if seen.served > self.served && seen.at_rest {
                return Verdict::Park;
            }
            self.not_before = seen.now + self.park_after;
        }
        Verdict::CheckAt((since + self.park_after).max(self.not_before).min(close_at))
    }
}

/// Counts a connection as parked while it lives.
struct Parked(Gauge);

impl Parked {
    fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for Parked {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// hyper-util's connection types each have their own `graceful_shutdown`; this names it once.
trait Graceful {
    fn graceful(self: Pin<&mut Self>);
}

impl<I, S, E> Graceful for hyper_util::server::conn::auto::UpgradeableConnection<'_, I, S, E>
where
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: Body + Send + 'static,
    <S::ResBody as Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, S::ResBody>,
{
    fn graceful(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// A response body that keeps its request counted as in flight until hyper has sent it whole
/// or dropped it: a connection is idle, and may be parked, only once its last response is out.
struct Tracked<B> {
    body: B,
    _busy: Busy,
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

fn log_end<E: std::fmt::Display>(peer: SocketAddr, ended: Result<(), E>) {
    if let Err(e) = ended {
        tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// park_after 1 s, idle 10 s; the connection started at `t0` having served 3 requests.
    fn quiet(t0: Instant) -> Quiet {
        Quiet {
            served: 3,
            not_before: t0,
            park_after: 1000 * MS,
            idle: 10_000 * MS,
        }
    }

    fn seen(t0: Instant, now_ms: u32, idle_since_ms: Option<u32>) -> Seen {
        Seen {
            now: t0 + now_ms * MS,
            idle_since: idle_since_ms.map(|ms| t0 + ms * MS),
            lost: false,
            served: 4,
            at_rest: true,
        }
    }

    #[test]
    fn the_timer_closes_parks_or_says_when_to_look_again() {
        let t0 = Instant::now();
        let at = |ms: u32| Verdict::CheckAt(t0 + ms * MS);
        let lost = Seen {
            lost: true,
            ..seen(t0, 1500, Some(0))
        };
        let unserved = Seen {
            served: 3,
            ..seen(t0, 1500, Some(0))
        };
        let head_half_read = Seen {
            at_rest: false,
            ..seen(t0, 1500, Some(0))
        };
        let table = [
            (
                "busy: look again a period later",
                seen(t0, 500, None),
                at(1500),
            ),
            (
                "quiet too briefly: at the park time",
                seen(t0, 500, Some(200)),
                at(1200),
            ),
            (
                "quiet long enough and at rest: park",
                seen(t0, 1500, Some(200)),
                Verdict::Park,
            ),
            (
                "idle past the limit: close",
                seen(t0, 10_200, Some(200)),
                Verdict::Close,
            ),
            ("HTTP/2 or tunnel: only the idle close", lost, at(10_000)),
            ("no request served yet: a period later", unserved, at(2500)),
            (
                "part of a head read: a period later",
                head_half_read,
                at(2500),
            ),
            (
                "part of a head read past the limit: abort",
                Seen {
                    at_rest: false,
                    ..seen(t0, 10_200, Some(200))
                },
                Verdict::Abort,
            ),
            (
                "HTTP/2 or tunnel past the limit: close gracefully",
                Seen {
                    lost: true,
                    at_rest: false,
                    ..seen(t0, 10_200, Some(200))
                },
                Verdict::Close,
            ),
        ];
        for (what, seen, verdict) in table {
            assert_eq!(quiet(t0).check(seen), verdict, "{what}");
        }
    }

    #[test]
    fn a_half_read_head_defers_parking_by_a_period_but_not_the_idle_close() {
        let t0 = Instant::now();
        let mut q = Quiet {
            idle: 2000 * MS,
            ..quiet(t0)
        };
        let half = Seen {
            at_rest: false,
            ..seen(t0, 1000, Some(0))
        };
        assert_eq!(q.check(half), Verdict::CheckAt(t0 + 2000 * MS));
        // At rest again 500 ms later: still deferred until the period is over.
        assert_eq!(
            q.check(seen(t0, 1500, Some(0))),
            Verdict::CheckAt(t0 + 2000 * MS)
        );
        assert_eq!(q.check(seen(t0, 2000, Some(0))), Verdict::Close);
        let still_half = Seen {
            at_rest: false,
            ..seen(t0, 2000, Some(0))
        };
        assert_eq!(q.check(still_half), Verdict::Abort);
    }
}
