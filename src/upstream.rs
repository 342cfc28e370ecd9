//! Connections to backends. Each backend keeps a stack of idle HTTP/1 keep-alive connections
//! (its [`Pool`]); an exchange borrows the most recently used one, or opens a new one, and the
//! connection goes back once its response has been read whole. A connection left idle for
//! `timeouts.backend_idle` is closed by its own driver task, before a backend's keep-alive timeout
//! can race a reuse.
//!
//! This replaces hyper-util's pooled client, whose pool bookkeeping (a hashed key per request,
//! a checkout future, a task per request to wait for the connection to be ready again) measured
//! about a tenth of the proxy's instructions per request (README, Performance). Here the pool is
//! found through the backend itself.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use http::uri::Authority;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::activity::{Activity, Busy};
use crate::body::UpstreamBody;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect failed")]
    Connect(#[source] std::io::Error),
    #[error("connect timed out after {0:?}")]
    ConnectTimeout(Duration),
    #[error("upstream exchange failed")]
    Exchange(#[source] hyper::Error),
}

impl UpstreamError {
    /// No byte of the request reached the backend.
    pub fn is_connect(&self) -> bool {
        matches!(self, Self::Connect(_) | Self::ConnectTimeout(_))
    }

    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::ConnectTimeout(_))
    }
}

/// Idle connections to one backend, most recently used last.
#[derive(Default)]
pub struct Pool {
    idle: Mutex<Vec<Idle>>,
}

struct Idle {
    tx: SendRequest<UpstreamBody>,
    activity: Arc<Activity>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("idle", &self.lock().len())
            .finish()
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
        let Idle { tx, activity } = idle.swap_remove(ready);
        Some(Lease {
            tx,
            _busy: Activity::begin(&activity),
            activity,
            pool: Arc::clone(self),
        })
    }
}

/// One connection lent to one exchange. Dropped without [`Lease::release`] (an error, a client
/// that went away mid-body, an upgrade), the connection is closed, never reused.
pub struct Lease {
    tx: SendRequest<UpstreamBody>,
    activity: Arc<Activity>,
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
        let Lease {
            tx, activity, pool, ..
        } = self;
        pool.lock().push(Idle { tx, activity });
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
    /// Sends `req` (origin-form URI, `Host` set) on a pooled connection or a new one. A pooled
    /// connection found closed before the request went out is passed over.
    pub async fn send(
        &self,
        pool: &Arc<Pool>,
        address: &Authority,
        mut req: Request<UpstreamBody>,
    ) -> Result<(Response<Incoming>, Lease), UpstreamError> {
        while let Some(mut lease) = pool.checkout() {
            match lease.tx.try_send_request(req).await {
                Ok(resp) => return Ok((resp, lease)),
                Err(mut e) => match e.take_message() {
                    Some(unsent) => req = unsent,
                    None => return Err(UpstreamError::Exchange(e.into_error())),
                },
            }
        }
        let mut lease = self.connect(pool, address).await?;
        match lease.tx.send_request(req).await {
            Ok(resp) => Ok((resp, lease)),
            Err(e) => Err(UpstreamError::Exchange(e)),
        }
    }

    async fn connect(&self, pool: &Arc<Pool>, address: &Authority) -> Result<Lease, UpstreamError> {
        // An IPv6 literal keeps its brackets in an authority; the resolver wants it bare.
        let host = address.host().trim_start_matches('[').trim_end_matches(']');
        let port = address.port_u16().unwrap_or(80);
        let connecting = TcpStream::connect((host, port));
        let stream = match tokio::time::timeout(self.connect_timeout, connecting).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(UpstreamError::Connect(e)),
            Err(_elapsed) => return Err(UpstreamError::ConnectTimeout(self.connect_timeout)),
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "set_nodelay failed");
        }
        let (tx, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(UpstreamError::Exchange)?;
        let activity = Arc::new(Activity::new());
        let lease = Lease {
            tx,
            _busy: Activity::begin(&activity),
            activity: Arc::clone(&activity),
            pool: Arc::clone(pool),
        };
        let idle = self.idle_timeout;
        tokio::spawn(async move {
            tokio::select! {
                ended = conn.with_upgrades() => if let Err(e) = ended {
                    tracing::debug!(error = %e, "upstream connection ended with an error");
                },
                () = activity.idle_for(idle) => tracing::debug!("closing idle upstream connection"),
            }
        });
        Ok(lease)
    }
}
