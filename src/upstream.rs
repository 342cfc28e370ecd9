//! Connections to backends. Each backend keeps a stack of idle HTTP/1 keep-alive connections
//! (its [`Pool`]); an exchange borrows the most recently used one, or opens a new one, and the
//! connection goes back once its response has been read whole. A connection left idle for
//! `timeouts.backend_idle` is closed by its own driver task, before a backend's keep-alive timeout
//! can race a reuse, and leaves the pool as it ends: a closed connection's request channel alone
//! holds about 11 KB, and a burst can leave hundreds of them behind.
//!
//! This replaces hyper-util's pooled client, whose pool bookkeeping (a hashed key per request,
//! a checkout future, a task per request to wait for the connection to be ready again) measured
//! about a tenth of the proxy's instructions per request (PERFORMANCE.md). Here the pool is
//! found through the backend itself.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use http::uri::Authority;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::activity::Busy;
use crate::body::UpstreamBody;
use crate::coalesce::Coalesce;
use crate::link::{Ending, Link};

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect failed")]
    Connect(#[source] std::io::Error),
    #[error("connect timed out after {0:?}")]
    ConnectTimeout(Duration),
    #[error("upstream exchange failed")]
    Exchange(#[source] hyper::Error),
    #[error("no response head by the deadline")]
    Late,
    #[error("a new connection closed before the request was written")]
    Unsent,
    #[error("upstream exchange failed")]
    Wire(#[source] std::io::Error),
    #[error("upstream response malformed")]
    Malformed(#[source] crate::wire::head::Malformed),
}

impl UpstreamError {
    /// The backend could not be reached.
    pub fn is_connect(&self) -> bool {
        matches!(self, Self::Connect(_) | Self::ConnectTimeout(_))
    }

    /// No byte of the request reached the backend, so any request may go elsewhere.
    pub fn is_unsent(&self) -> bool {
        self.is_connect() || matches!(self, Self::Unsent)
    }

    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::ConnectTimeout(_))
    }

    /// The response head did not come in time (`timeouts.backend_response`): the request may
    /// have been acted on, so it is answered 504 and not retried.
    pub fn is_late(&self) -> bool {
        matches!(self, Self::Late)
    }
}

/// Idle connections to one backend, most recently used last.
#[derive(Default)]
pub struct Pool {
    idle: Mutex<Vec<Idle>>,
}

struct Idle {
    tx: SendRequest<UpstreamBody>,
    link: Arc<Link>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("idle", &self.idle()).finish()
    }
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, Vec<Idle>> {
        // A plain stack of connections: a panic elsewhere cannot leave it inconsistent.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The most recently used connection ready for a request. Closed ones are dropped; one
    /// still finishing its last exchange stays for later.
    fn checkout(self: &Arc<Self>) -> Option<Lease> {
        let mut idle = self.lock();
        idle.retain(|c| !c.tx.is_closed());
        let ready = idle.iter().rposition(|c| c.tx.is_ready())?;
        let Idle { tx, link } = idle.swap_remove(ready);
        Some(self.lend(tx, link))
    }

    /// Lends a connection to one exchange; it counts as busy until the lease ends.
    fn lend(self: &Arc<Self>, tx: SendRequest<UpstreamBody>, link: Arc<Link>) -> Lease {
        Lease {
            tx,
            _busy: link.begin(),
            link,
            pool: Arc::clone(self),
        }
    }

    /// The connection behind `link` has ended: it is no longer offered.
    fn forget(&self, link: &Arc<Link>) {
        self.lock().retain(|c| !Arc::ptr_eq(&c.link, link));
    }

    /// How many connections wait for a request.
    fn idle(&self) -> usize {
        self.lock().len()
    }
}

/// One connection lent to one exchange. Dropped without [`Lease::release`] (an error, a client
/// that went away mid-body, an upgrade), the connection is closed, never reused.
pub struct Lease {
    tx: SendRequest<UpstreamBody>,
    link: Arc<Link>,
    _busy: Busy,
    pool: Arc<Pool>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").finish_non_exhaustive()
    }
}

impl Lease {
    /// The response was read whole: the connection may carry the next exchange.
    pub fn release(self) {
        let Lease { tx, link, pool, .. } = self;
        if !tx.is_closed() {
            pool.lock().push(Idle { tx, link });
        }
    }

    /// Ends the wait for the head: what the exchange came to, given whether the driver had
    /// already found the head late (then a head that came anyway is dropped with the connection).
    fn settle(
        self,
        sent: Result<Response<Incoming>, hyper::Error>,
    ) -> Result<(Response<Incoming>, Lease), UpstreamError> {
        match (self.link.settle(), sent) {
            (true, Ok(resp)) => Ok((resp, self)),
            (true, Err(e)) => Err(UpstreamError::Exchange(e)),
            (false, _) => Err(UpstreamError::Late),
        }
    }
}

/// Opens and drives connections to backends.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub connect_timeout: Duration,
    /// An idle connection is closed after this long (`timeouts.backend_idle`).
    pub idle_timeout: Duration,
}

impl Upstream {
    /// Sends the request `make` builds (origin-form URI, `Host` set) on a pooled connection or
    /// a new one; its response head is due by `deadline`, connecting included. A pooled
    /// connection found closed before the request went out is passed over. `make` is called
    /// again only when a request was lost unsent in a closing connection's channel.
    pub async fn send(
        &self,
        pool: &Arc<Pool>,
        address: &Authority,
        make: impl Fn() -> Request<UpstreamBody>,
        deadline: Instant,
    ) -> Result<(Response<Incoming>, Lease), UpstreamError> {
        let mut req = make();
        loop {
            // The deadline is set and cleared around each send here, not in a helper: a nested
            // future moved every request once more (240 instructions per request).
            let (mut lease, pooled) = match pool.checkout() {
                Some(lease) => (lease, true),
                None => (self.connect(pool, address, deadline).await?, false),
            };
            lease.link.expect_by(deadline);
            let sending = lease.tx.try_send_request(req);
            tokio::pin!(sending);
            // Unsent: handed back by hyper, or None when it was left in the ended connection's
            // queue (then it is built again, only if it is retried).
            let unsent = match lease.link.unless_ended(sending.as_mut()).await {
                Some(Ok(resp)) => return lease.settle(Ok(resp)),
                Some(Err(mut e)) => match e.take_message() {
                    Some(unsent) => Some(unsent),
                    None => return lease.settle(Err(e.into_error())),
                },
                None => None,
            };
            // Not sent: the connection had closed. The next pooled one gets the same deadline,
            // unless it has passed: then the request is not sent anywhere. A new connection
            // closing at once is the backend's failure, left to the caller.
            if !lease.link.settle() || Instant::now() >= deadline {
                return Err(UpstreamError::Late);
            }
            if !pooled {
                return Err(UpstreamError::Unsent);
            }
            req = unsent.unwrap_or_else(&make);
        }
    }

    async fn connect(
        &self,
        pool: &Arc<Pool>,
        address: &Authority,
        deadline: Instant,
    ) -> Result<Lease, UpstreamError> {
        let stream = self.dial(address, deadline).await?;
        let (tx, conn) = http1::handshake(TokioIo::new(Coalesce::new(stream)))
            .await
            .map_err(UpstreamError::Exchange)?;
        let link = Arc::new(Link::new());
        let lease = pool.lend(tx, Arc::clone(&link));
        let (idle, pool) = (self.idle_timeout, Arc::clone(pool));
        tokio::spawn(async move {
            // In order: the connection's progress comes first, and an unbiased select draws a
            // random number on each of the three wakes an exchange gives this task.
            tokio::select! {
                biased;
                ended = conn.with_upgrades() => if let Err(e) = ended {
                    tracing::debug!(error = %e, "upstream connection ended with an error");
                },
                ending = link.watch(idle) => match ending {
                    Ending::Idle => tracing::debug!("closing idle upstream connection"),
                    Ending::Late => tracing::debug!("closing upstream connection: response head late"),
                },
            }
            // The connection is dropped by now: requests it had taken are answered.
            pool.forget(&link);
            link.end();
        });
        Ok(lease)
    }

    /// A TCP connection to `address` within the connect timeout, or by `deadline` if that comes
    /// first (then the error says the request ran out of time, not the connect).
    pub(crate) async fn dial(
        &self,
        address: &Authority,
        deadline: Instant,
    ) -> Result<TcpStream, UpstreamError> {
        // An IPv6 literal keeps its brackets in an authority; the resolver wants it bare.
        let host = address.host().trim_start_matches('[').trim_end_matches(']');
        let port = address.port_u16().unwrap_or(80);
        let connecting = TcpStream::connect((host, port));
        let limit = (Instant::now() + self.connect_timeout).min(deadline);
        let stream = match tokio::time::timeout_at(limit, connecting).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(UpstreamError::Connect(e)),
            Err(_elapsed) if limit == deadline => return Err(UpstreamError::Late),
            Err(_elapsed) => return Err(UpstreamError::ConnectTimeout(self.connect_timeout)),
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "set_nodelay failed");
        }
        Ok(stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty};
    use hyper::service::service_fn;
    use tokio::net::TcpListener;

    /// A backend answering 200 with an empty body on every connection it accepts.
    async fn backend() -> std::io::Result<Authority> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let answer = service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(Response::new(Empty::<bytes::Bytes>::new()))
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), answer);
                tokio::spawn(conn);
            }
        });
        Ok(address
            .to_string()
            .parse()
            .expect("a socket address is an authority"))
    }

    #[test]
    fn only_a_request_that_never_went_out_may_go_anywhere_and_only_a_refusal_marks_down() {
        let refused = || std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let table = [
            // (error, backend unreachable, nothing sent, late)
            (UpstreamError::Connect(refused()), true, true, false),
            (
                UpstreamError::ConnectTimeout(Duration::ZERO),
                true,
                true,
                false,
            ),
            (UpstreamError::Unsent, false, true, false),
            (UpstreamError::Late, false, false, true),
        ];
        for (err, connect, unsent, late) in table {
            assert_eq!(
                (err.is_connect(), err.is_unsent(), err.is_late()),
                (connect, unsent, late),
                "{err}"
            );
        }
    }

    #[tokio::test]
    async fn a_connection_closed_for_idling_leaves_the_pool(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let address = backend().await?;
        let upstream = Upstream {
            connect_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_millis(50),
        };
        let pool = Arc::new(Pool::default());
        let req = || Request::new(UpstreamBody::default());
        let deadline = Instant::now() + Duration::from_secs(5);
        let (resp, lease) = upstream.send(&pool, &address, req, deadline).await?;
        resp.into_body().collect().await?;
        lease.release();
        assert_eq!(
            pool.idle(),
            1,
            "the answered connection is kept for the next request"
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while pool.idle() > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "a connection closed for idling is still pooled"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }
}
