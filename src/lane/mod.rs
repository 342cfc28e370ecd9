//! The HTTP/1 lane: an HTTP/1.1 connection's common requests (no body, no upgrade) are
//! read with httparse and answered by writing the response ourselves, around the same `Proxy` as
//! every other request. hyper's server costs about as much per request as all of stickylb's own
//! work (PERFORMANCE.md); here the head is parsed once, into the buffer it was read into.
//! Any other request, and anything the lane cannot read, goes to hyper with the bytes read so
//! far, untouched, so its answers to unusual or hostile input stay hyper's by construction.

pub mod request;
pub mod response;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::Method;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::activity::Activity;
use crate::headers::Peer;
use crate::proxy::Proxy;
use crate::server::{Quiet, Seen, Verdict};
use crate::woken::{Timer, Woken};
use request::{Head, Read};
use response::Asked;

/// Room made in the read buffer before a read; a head needs more only when it is long.
const READ_CHUNK: usize = 4096;

/// What became of the connection when the lane let go of it.
pub enum Next {
    /// Ended: the peer closed, it idled out, the server is stopping, or a write failed.
    Closed,
    /// Quiet, with nothing of a next head read: it waits for its next byte holding no buffer.
    Park,
    /// hyper serves it from here, starting with these bytes, already read.
    Hyper(Bytes),
}

/// What the lane needs from the connection it serves.
pub struct Lane<'a> {
    pub proxy: &'a Proxy,
    pub peer: &'a Peer,
    pub activity: &'a Arc<Activity>,
    pub stop: &'a mut watch::Receiver<()>,
    /// The time a client has for its next head, counted from the end of the last response.
    pub idle: Duration,
    /// A connection quiet this long is parked.
    pub park_after: Duration,
    pub max_head: usize,
    /// `http` or `https`, as the client connected.
    pub proto: &'static str,
}

/// The connection's one timer, its wait for the stop signal, its watch on the client's socket
/// during an exchange, and the buffer responses are written from.
struct Waiting<S> {
    check: Timer,
    /// The rules the timer applies: the same as for a hyper connection.
    quiet: Quiet,
    /// One wait for all the connection's reads: made anew for each read, its registration with
    /// the channel cost about 300 instructions per request.
    stop: S,
    signal: Woken,
    /// The client's socket while an exchange runs (see [`gone`]).
    client: Woken,
    out: Vec<u8>,
}

/// What the connection's timer finds: nothing is under way while the lane waits for a head, and
/// its buffer is empty only once a request was taken from it (so one was served).
fn seen(now: Instant, idle_since: Option<Instant>, empty: bool) -> Seen {
    Seen {
        now,
        idle_since,
        lost: false,
        served: 1,
        at_rest: empty,
    }
}

/// A wait for the next head ended.
enum Got {
    Head(Head),
    /// The buffer holds a request for hyper.
    Hyper,
    /// The connection ended or parks.
    Left(Next),
}

impl Lane<'_> {
    /// Serves requests, `first` the byte that woke the connection, until the connection ends,
    /// parks or has a request for hyper.
    pub async fn serve<I>(&mut self, io: &mut I, first: u8) -> Next
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        let wake = Instant::now() + self.park_after.min(self.idle);
        let mut stop = self.stop.clone();
        let mut waiting = Waiting {
            check: Timer::at(wake),
            quiet: Quiet::new(self.park_after, self.idle),
            stop: std::pin::pin!(async move { stop.changed().await }),
            signal: Woken::new(),
            client: Woken::new(),
            out: Vec::new(),
        };
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        buf.extend_from_slice(&[first]);
        loop {
            let head = match self.next_head(io, &mut buf, &mut waiting).await {
                Got::Head(head) => head,
                Got::Hyper => return Next::Hyper(buf.freeze()),
                Got::Left(next) => return next,
            };
            if let Some(next) = self.answer(io, head, &mut buf, &mut waiting).await {
                return next;
            }
        }
    }

    /// Forwards one request and writes its response; what became of the connection if it is
    /// not ready for the next request.
    async fn answer<I, S>(
        &mut self,
        io: &mut I,
        head: Head,
        buf: &mut BytesMut,
        waiting: &mut Waiting<S>,
    ) -> Option<Next>
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        let asked = Asked {
            head: head.parts.method == Method::HEAD,
            close: head.close,
        };
        let busy = Activity::begin(self.activity);
        let exchange = std::pin::pin!(self
            .proxy
            .handle_bodiless(head.parts, self.peer, self.proto));
        // A client that leaves ends the exchange, as hyper's server does (no backend is kept
        // busy for nobody); bytes of a next request meanwhile wait in the buffer. Guarded: the
        // task wakes two or three times per exchange, and a read of the client's socket each
        // time cost about 150 instructions.
        let resp = {
            let gone = std::pin::pin!(gone(io, buf, self.max_head));
            tokio::select! {
                biased;
                resp = exchange => resp,
                () = waiting.client.guard(gone) => return Some(Next::Closed),
            }
        };
        let written = response::write(io, resp, asked, &mut waiting.out).await;
        drop(busy);
        match written {
            Ok(true) => None,
            Ok(false) => Some(self.close(io).await),
            Err(e) => {
                tracing::debug!(peer = %self.peer.ip, error = %e, "response write failed");
                Some(Next::Closed)
            }
        }
    }

    async fn close<I: AsyncWrite + Unpin>(&self, io: &mut I) -> Next {
        if let Err(e) = io.shutdown().await {
            tracing::debug!(peer = %self.peer.ip, error = %e, "shutdown failed");
        }
        Next::Closed
    }

    /// Reads until `buf` holds a whole head, or the lane lets go of the connection.
    async fn next_head<I: AsyncRead + Unpin, S: Future + Unpin>(
        &mut self,
        io: &mut I,
        buf: &mut BytesMut,
        waiting: &mut Waiting<S>,
    ) -> Got {
        // Stopping: the request in flight was answered, and a next one already read is not
        // taken (as hyper's graceful shutdown does). A closed channel means stopped too.
        if self.stop.has_changed().unwrap_or(true) {
            return Got::Left(Next::Closed);
        }
        loop {
            match request::read(buf) {
                Read::Lane(head) => return Got::Head(head),
                Read::Hyper => return Got::Hyper,
                // Too long a head: hyper answers 431.
                Read::Partial if buf.len() >= self.max_head => return Got::Hyper,
                Read::Partial => {}
            }
            if let Some(next) = self.read_more(io, buf, waiting).await {
                return Got::Left(next);
            }
        }
    }

    /// One read into `buf`, or why the lane lets go: the peer closed, the connection idled out
    /// or parks, or the server is stopping. The timer and the stop signal are polled only when
    /// they woke (or the timer was reset).
    async fn read_more<I: AsyncRead + Unpin, S: Future + Unpin>(
        &mut self,
        io: &mut I,
        buf: &mut BytesMut,
        waiting: &mut Waiting<S>,
    ) -> Option<Next> {
        loop {
            tokio::select! {
                biased;
                read = read_into(io, buf) => return match read {
                    Ok(0) => Some(Next::Closed),
                    Ok(_) => None,
                    Err(e) => {
                        tracing::debug!(peer = %self.peer.ip, error = %e, "read failed");
                        Some(Next::Closed)
                    }
                },
                _ = waiting.signal.again(&mut waiting.stop) => return Some(Next::Closed),
                () = waiting.check.fired() => {
                    let found = seen(Instant::now(), self.activity.idle_since(), buf.is_empty());
                    match waiting.quiet.check(found) {
                        Verdict::Abort | Verdict::Close => return Some(Next::Closed),
                        Verdict::Park => return Some(Next::Park),
                        Verdict::CheckAt(at) => waiting.check.reset(at),
                    }
                }
            }
        }
    }
}

/// Resolves when the client closes the connection or it fails; reads on meanwhile, up to a
/// head's limit. It reads into a small buffer of its own: it almost never reads anything, and
/// making room in `buf` while the request's head still shares it would allocate.
async fn gone<I: AsyncRead + Unpin>(io: &mut I, buf: &mut BytesMut, max_head: usize) {
    let mut early = [0; 256];
    while buf.len() < max_head {
        match io.read(&mut early).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&early[..n]),
        }
    }
    std::future::pending().await
}

async fn read_into<I: AsyncRead + Unpin>(io: &mut I, buf: &mut BytesMut) -> std::io::Result<usize> {
    buf.reserve(READ_CHUNK);
    io.read_buf(buf).await
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_timer_closes_parks_or_says_when_to_look_again() {
        let t0 = Instant::now();
        let at = |ms: u32| t0 + ms * MS;
        // idle 10 s, park after 1 s, quiet since t0.
        let limits = (10_000 * MS, 1000 * MS);
        let table = [
            (
                "quiet briefly: look at the park time",
                500,
                true,
                Verdict::CheckAt(at(1000)),
            ),
            (
                "quiet long enough, nothing read: park",
                1000,
                true,
                Verdict::Park,
            ),
            (
                "part of a head read: a park period later",
                1500,
                false,
                Verdict::CheckAt(at(2500)),
            ),
            ("idle past the limit: close", 10_000, true, Verdict::Close),
            (
                "a head begun and not done in time: dropped",
                10_500,
                false,
                Verdict::Abort,
            ),
        ];
        let look = |limits: (Duration, Duration), now: u32, empty: bool| {
            let (idle, park_after) = limits;
            Quiet::new_at(park_after, idle, t0).check(seen(at(now), Some(t0), empty))
        };
        for (what, now, empty, verdict) in table {
            assert_eq!(look(limits, now, empty), verdict, "{what}");
        }
        let late = look(limits, 9500, false);
        assert_eq!(late, Verdict::CheckAt(at(10_000)), "never past the close");
        let never_parks = (1000 * MS, 1000 * MS);
        assert_eq!(look(never_parks, 500, true), Verdict::CheckAt(at(1000)));
    }
}
