//! The wire: the lane's requests (no body, no upgrade) go to backends without hyper's client. The
//! request head is written from the prepared parts in one write, the response head is read with
//! httparse into the buffer the body is then read from, and the body is framed as RFC 9112 says
//! (`body`). hyper's client, on the pooled connection's own task, cost about 12,800 of the
//! proxy's 31,000 instructions per request (PERFORMANCE.md); here the exchange runs on the
//! client's task, with no channel, no task wake-up and no second parse of the head.
//!
//! Each backend keeps a stack of idle wire connections beside hyper's ([`Pool`]), with no task
//! per connection: one sweeper task per pool closes those idle for `timeouts.backend_idle`, and
//! one the backend closed is seen closed from the readiness tokio already holds for it (no
//! system call), so a request is not sent into it.

pub mod body;
pub mod head;

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use bytes::BytesMut;
use http::request::Parts;
use http::uri::Authority;
use http::{Method, Response};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::io::poll_read_buf;

use crate::headers::Forwarding;
use crate::upstream::{Upstream, UpstreamError};
use crate::uring::Sender;
use crate::woken::Timer;
use body::WireBody;
use head::Head;

/// Room made in a connection's buffer before a read, at first; a read that fills it doubles it
/// for the next (up to [`MAX_READ`]), one that fills less than a quarter halves it. A large body
/// is read in few system calls, and a connection that serves small answers keeps a small buffer.
const READ_CHUNK: usize = 4 * 1024;
const MAX_READ: usize = 256 * 1024;
/// A response head longer than this is refused (502).
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// One connection to a backend, with its read buffer and the buffer request heads are written
/// from, both kept from one request to the next (a read buffer grown for large bodies is not).
#[derive(Debug)]
pub struct Conn {
    io: TcpStream,
    /// On a single io_uring worker, where request heads are sent (module `uring`).
    sender: Option<Sender>,
    buf: BytesMut,
    out: Vec<u8>,
    /// Closed once idle this long (`timeouts.backend_idle`).
    idle_for: Duration,
    read_size: usize,
    /// The response-head timer (see [`until`]), made with the first exchange and kept. Taken
    /// out while an exchange runs.
    timer: Option<Timer>,
}

/// Resolves once `deadline` has passed, on a connection's response-head timer, which costs
/// nothing per exchange. Deadlines only move later (each is the time sent plus the same
/// timeout), so the timer is left where an earlier exchange put it: when it fires before the
/// exchange's own deadline, it is moved there and waits again, about once per timeout per
/// connection; an earlier deadline (a reload shortened the timeout) brings it forward. Where it
/// was reset for each exchange and polled on each of the exchange's wakes, that cost about 350
/// instructions per request. Left armed between exchanges, it wakes the task that last polled it
/// once when it fires: one wake, for nothing, per connection and timeout.
async fn until(timer: &mut Timer, deadline: Instant) {
    if timer.deadline() > deadline {
        timer.reset(deadline);
    }
    loop {
        timer.fired().await;
        if timer.deadline() >= deadline {
            return;
        }
        timer.reset(deadline);
    }
}

fn next_read_size(size: usize, read: usize, room: usize) -> usize {
    if read == room {
        (size * 2).min(MAX_READ)
    } else if read < size / 4 {
        (size / 2).max(READ_CHUNK)
    } else {
        size
    }
}

/// How an exchange on a connection failed.
enum Failed {
    /// Nothing of the request went out.
    Unsent(io::Error),
    Io(io::Error),
    Malformed(head::Malformed),
}

/// Puts the task at the back of the run queue: it runs again after the tasks already ready,
/// before the runtime polls for new events. Not `yield_now`, which waits for that poll too:
/// the writes of one round then went out behind the next round's reads, and p99 was 1.11x
/// HAProxy's instead of 0.95x (PERFORMANCE.md).
async fn requeue() {
    let mut woken = false;
    poll_fn(|cx| {
        if woken {
            return Poll::Ready(());
        }
        woken = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}

impl Conn {
    fn new(io: TcpStream, idle_for: Duration) -> Self {
        Self {
            sender: Sender::for_stream(&io),
            io,
            buf: BytesMut::new(),
            out: Vec::new(),
            idle_for,
            read_size: READ_CHUNK,
            timer: None,
        }
    }

    /// Whether the backend has closed the connection, as tokio last saw it.
    fn closed(&self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        let ready = std::pin::pin!(self.io.ready(Interest::READABLE));
        match ready.poll(&mut cx) {
            Poll::Ready(Ok(r)) => r.is_read_closed() || r.is_error(),
            Poll::Ready(Err(_)) => true,
            Poll::Pending => false,
        }
    }

    /// Reads what the backend sent into the buffer; Ok(0) when it closed the connection.
    ///
    /// Through `poll_read`, not `try_read_buf`: a read that fills less than the room it was
    /// given drained the socket, and `poll_read` then forgets the readiness, so the next
    /// exchange waits for the backend's answer instead of first trying a read that finds
    /// nothing (a `recvfrom` per request that HAProxy does not make).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.make_room();
        let room = self.buf.capacity() - self.buf.len();
        let n = ready!(poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf))?;
        self.read_size = next_read_size(self.read_size, n, room);
        Poll::Ready(Ok(n))
    }

    /// Room for the next read: the buffer's own, reclaimed once the data split from it has been
    /// sent, or a new buffer. Not `reserve`: it grows the allocation the body's data was split
    /// from, copying everything read into it so far.
    fn make_room(&mut self) {
        let want = self.read_size;
        if self.buf.capacity() - self.buf.len() >= want || self.buf.try_reclaim(want) {
            return;
        }
        let mut fresh = BytesMut::with_capacity(want.max(self.buf.len() * 2));
        fresh.extend_from_slice(&self.buf);
        self.buf = fresh;
    }

    /// Writes the request head `out` holds, then reads the response head.
    ///
    /// Both writes, the request's here and the answer's after, wait behind the other tasks
    /// made ready with this one (`requeue`): the proxy's writes then go out in a burst after
    /// its reads, as HAProxy's loop does, and a backend sharing the proxy's core wakes for
    /// several requests at a time instead of about one (PERFORMANCE.md: "Writes in
    /// bursts").
    async fn exchange(&mut self, head_request: bool) -> Result<Head, Failed> {
        requeue().await;
        self.write_head().await?;
        loop {
            match head::read_response(&mut self.buf, head_request, MAX_RESPONSE_HEAD) {
                Ok(Some(head)) => {
                    requeue().await;
                    return Ok(head);
                }
                Ok(None) => {}
                Err(e) => return Err(Failed::Malformed(e)),
            }
            match poll_fn(|cx| self.poll_fill(cx)).await {
                Ok(0) if self.buf.is_empty() => return Err(Failed::Io(unanswered())),
                Ok(0) => return Err(Failed::Io(io::ErrorKind::UnexpectedEof.into())),
                Ok(_) => {}
                Err(e) => return Err(Failed::Io(e)),
            }
        }
    }

    /// [`Conn::exchange`], or None if the response head is not there by `deadline`.
    async fn exchange_by(
        &mut self,
        deadline: Instant,
        head_request: bool,
    ) -> Option<Result<Head, Failed>> {
        let mut timer = self.timer.take().unwrap_or_else(|| Timer::at(deadline));
        let exchanged = tokio::select! {
            biased;
            done = self.exchange(head_request) => Some(done),
            () = until(&mut timer, deadline) => None,
        };
        self.timer = Some(timer);
        exchanged
    }

    /// On a single io_uring worker the head goes out through io_uring (module `uring`), and
    /// whatever that leaves through tokio's readiness.
    async fn write_head(&mut self) -> Result<(), Failed> {
        let mut written = 0;
        if let Some(sender) = &self.sender {
            let sent;
            (sent, self.out) = sender.send(std::mem::take(&mut self.out)).await;
            match sent {
                Ok(n) => written = n,
                // The buffer was lost with a sender that stopped (shutdown).
                Err(e) if self.out.is_empty() => return Err(Failed::Unsent(e)),
                // An operation io_uring refused, or the socket's own error: the readiness path
                // below tries again and reports what the socket says.
                Err(e) => tracing::trace!(error = %e, "io_uring send failed; sending without it"),
            }
        }
        while written < self.out.len() {
            match self.io.write(&self.out[written..]).await {
                Ok(0) => return Err(Failed::Io(io::ErrorKind::WriteZero.into())),
                Ok(n) => written += n,
                Err(e) if written == 0 => return Err(Failed::Unsent(e)),
                Err(e) => return Err(Failed::Io(e)),
            }
        }
        Ok(())
    }
}

/// Idle wire connections to one backend, most recently used last.
#[derive(Debug, Default)]
pub struct Pool {
    idle: Mutex<Stack>,
}

#[derive(Debug, Default)]
struct Stack {
    conns: Vec<Idle>,
    /// A sweeper task is on its way to the oldest connection's idle limit.
    swept: bool,
}

#[derive(Debug)]
struct Idle {
    conn: Box<Conn>,
    since: Instant,
}

impl Idle {
    /// When the connection has idled for its limit.
    fn expires(&self) -> Instant {
        self.since + self.conn.idle_for
    }
}

impl Stack {
    /// Takes out the connections that have idled for their limit (at the bottom), to be closed
    /// once the lock is released.
    fn stale(&mut self, now: Instant) -> Vec<Idle> {
        let stale = self.conns.iter().take_while(|c| now >= c.expires()).count();
        self.conns.drain(..stale).collect()
    }
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, Stack> {
        // A plain stack of connections: a panic elsewhere cannot leave it inconsistent.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The most recently used connection still open and not idle for its limit.
    fn checkout(&self) -> Option<Box<Conn>> {
        let mut stack = self.lock();
        let _closing = stack.stale(Instant::now());
        while let Some(Idle { conn, .. }) = stack.conns.pop() {
            if !conn.closed() {
                return Some(conn);
            }
        }
        None
    }

    /// Keeps an answered connection for the next request; a sweeper task closes it once it has
    /// idled for its limit (one task per pool, started when the first connection comes back).
    fn put(self: &Arc<Self>, mut conn: Box<Conn>) {
        // A buffer grown for large bodies is not kept while the connection waits (the read
        // size it learnt is).
        if conn.read_size > READ_CHUNK {
            conn.buf = BytesMut::new();
        }
        let mut stack = self.lock();
        stack.conns.push(Idle {
            conn,
            since: Instant::now(),
        });
        if !std::mem::replace(&mut stack.swept, true) {
            drop(stack);
            tokio::spawn(Arc::clone(self).sweep());
        }
    }

    /// Closes connections as they reach the idle limit; ends when none is left.
    async fn sweep(self: Arc<Self>) {
        loop {
            let (closing, next) = {
                let mut stack = self.lock();
                let closing = stack.stale(Instant::now());
                let next = stack.conns.first().map(Idle::expires);
                stack.swept = next.is_some();
                (closing, next)
            };
            if !closing.is_empty() {
                tracing::debug!(count = closing.len(), "closing idle upstream connections");
                crate::allocator::worked();
            }
            drop(closing);
            let Some(next) = next else { return };
            tokio::time::sleep_until(next).await;
        }
    }
}

/// One attempt's request, as the wire needs it.
pub struct Request<'a> {
    pub parts: &'a Parts,
    pub forwarding: &'a Forwarding,
    /// The backend a failing-over client was pinned to.
    pub from: Option<&'a str>,
}

impl Upstream {
    /// Sends `req` on a pooled wire connection or a new one; its response head is due by
    /// `deadline`, connecting included. A pooled connection that fails before any of the request
    /// went out is passed over for the next one; one that takes the request and closes without
    /// answering fails the attempt, as with hyper's client (the forwarding loop decides whether
    /// the request may go elsewhere).
    pub async fn send_wire(
        &self,
        pool: &Arc<Pool>,
        address: &Authority,
        req: Request<'_>,
        deadline: Instant,
    ) -> Result<Response<WireBody>, UpstreamError> {
        let head_request = req.parts.method == Method::HEAD;
        loop {
            let (mut conn, pooled) = match pool.checkout() {
                Some(conn) => (conn, true),
                None => {
                    let io = self.dial(address, deadline).await?;
                    (Box::new(Conn::new(io, self.idle_timeout)), false)
                }
            };
            head::write_request(&mut conn.out, &req);
            let failed = match conn.exchange_by(deadline, head_request).await {
                None => return Err(UpstreamError::Late),
                Some(Ok(head)) => {
                    let pool = Arc::clone(pool);
                    let body = WireBody::new(head.framing, head.lines, conn, pool, head.reusable);
                    let mut resp = Response::new(body);
                    *resp.status_mut() = head.status;
                    *resp.version_mut() = head.version;
                    if let Some(phrase) = head.reason {
                        resp.extensions_mut().insert(phrase);
                    }
                    return Ok(resp);
                }
                Some(Err(failed)) => failed,
            };
            match failed {
                Failed::Unsent(e) if pooled => {
                    tracing::debug!(error = %e, "pooled upstream connection failed before the request");
                }
                Failed::Unsent(_) => return Err(UpstreamError::Unsent),
                Failed::Io(e) => return Err(UpstreamError::Wire(e)),
                Failed::Malformed(e) => return Err(UpstreamError::Malformed(e)),
            }
        }
    }
}

fn unanswered() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "backend closed the connection without answering",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_grow_when_they_fill_the_room_and_shrink_when_they_use_little() {
        const K: usize = 1024;
        let table = [
            ("filled: doubled", 16 * K, 16 * K, 16 * K, 32 * K),
            (
                "filled at the top: kept",
                MAX_READ,
                MAX_READ,
                MAX_READ,
                MAX_READ,
            ),
            ("half used: kept", 64 * K, 32 * K, 64 * K, 64 * K),
            ("little used: halved", 64 * K, 2 * K, 64 * K, 32 * K),
            (
                "little used at the bottom: kept",
                READ_CHUNK,
                100,
                READ_CHUNK,
                READ_CHUNK,
            ),
            // The buffer had more room than asked for: filling what was asked is not full.
            ("room to spare", 16 * K, 16 * K, 40 * K, 16 * K),
        ];
        for (what, size, read, room, next) in table {
            assert_eq!(next_read_size(size, read, room), next, "{what}");
        }
    }

    #[tokio::test]
    async fn a_pooled_connection_keeps_no_buffer_grown_for_large_bodies() -> io::Result<()> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let idle_for = Duration::from_secs(60);
        let pool = Arc::new(Pool::default());
        for (read_size, kept) in [(READ_CHUNK, READ_CHUNK), (MAX_READ, 0)] {
            let io = TcpStream::connect(listener.local_addr()?).await?;
            let mut conn = Box::new(Conn::new(io, idle_for));
            conn.read_size = read_size;
            conn.buf = BytesMut::with_capacity(read_size);
            pool.put(conn);
            let back = pool.checkout().expect("the connection is pooled");
            assert_eq!(back.buf.capacity(), kept, "read size {read_size}");
            assert_eq!(back.read_size, read_size, "the size learnt is kept");
        }
        Ok(())
    }
}
