//! Forwarding: read the pin, ask the routing snapshot for candidates, and try them in order with
//! a bounded number of attempts. Failover is simply a later candidate answering.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use http::header::COOKIE;
use http::request::Parts;
use http::{Method, Request, Response};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;

use crate::affinity;
use crate::backend::Mode;
use crate::body::{BodyTooLarge, ProxyBody, Replayable};
use crate::error::{chain, ProxyError};
use crate::headers;
use crate::metrics::Metrics;
use crate::routing::{Member, Pin, Routing};
use crate::transport::{self, Attempt, Hyper, Transport, Wire};
use crate::upstream::{Upstream, UpstreamError};

/// How the affinity cookie was honoured, for the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AffinityOutcome {
    /// No usable pin: the policy chose, and the response pins the client.
    New,
    /// Served by the pinned backend.
    Hit,
    /// Pinned backend unusable: served elsewhere, response re-pins.
    Failover,
}

impl AffinityOutcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::New => "new",
            Self::Hit => "hit",
            Self::Failover => "failover",
        }
    }
}

#[derive(Debug)]
pub struct Proxy {
    routing: Arc<ArcSwap<Routing>>,
    client: Upstream,
    metrics: Arc<Metrics>,
}

/// Facts about one exchange, filled in as it goes, logged once at the end.
struct Exchange {
    backend: Option<Arc<crate::backend::Backend>>,
    affinity: AffinityOutcome,
}

/// Why a pin could not be honoured, for the failover audit event.
fn unusable_pin_reason(routing: &Routing, pin: &Pin) -> &'static str {
    match pin {
        Pin::Member { index, .. }
            if routing.members[*index].backend.mode() == Mode::Maintenance =>
        {
            "maintenance"
        }
        Pin::Retired(_) => "removed",
        _ => "down",
    }
}

impl Proxy {
    pub fn new(routing: Arc<ArcSwap<Routing>>, client: Upstream, metrics: Arc<Metrics>) -> Self {
        Self {
            routing,
            client,
            metrics,
        }
    }

    /// Serves one client request; never fails, errors become responses here. `proto` is how the
    /// client connected: `http` or `https`.
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        peer: &headers::Peer,
        proto: &'static str,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let (parts, body) = req.into_parts();
        let hyper = Hyper(&self.client);
        Ok(*self
            .exchange(hyper, Box::new(parts), Some(body), peer, proto)
            .await)
    }

    /// Serves a request that has no body (the lane's), as [`Proxy::handle`] does.
    pub async fn handle_bodiless(
        &self,
        parts: Box<Parts>,
        peer: &headers::Peer,
        proto: &'static str,
    ) -> Box<Response<ProxyBody>> {
        self.exchange(Wire(&self.client), parts, None, peer, proto)
            .await
    }

    async fn exchange<T: Transport>(
        &self,
        transport: T,
        parts: Box<Parts>,
        body: Option<Incoming>,
        peer: &headers::Peer,
        proto: &'static str,
    ) -> Box<Response<ProxyBody>> {
        // Only the access log reads it: with the log off, one clock read per request fewer.
        let started = tracing::enabled!(tracing::Level::INFO).then(Instant::now);
        // For the log: a clone shares the target's bytes, where a copy of the path allocated.
        let (method, uri) = (parts.method.clone(), parts.uri.clone());
        let routing = self.routing.load_full();
        let mut ex = Exchange {
            backend: None,
            affinity: AffinityOutcome::New,
        };
        let hop = headers::Hop {
            peer,
            proto,
            forwarding: &routing.forwarding,
        };
        let forwarded = self.forward(&transport, &routing, (parts, body), &hop, &mut ex);
        let resp = match forwarded.await {
            Ok(resp) => resp,
            Err(e) => {
                tracing::warn!(method = %method, path = uri.path(), error = %chain(&e), "request failed");
                Box::new(e.into_response(&routing.retry_after))
            }
        };
        let backend = ex.backend.as_ref().map_or("-", |b| b.id.as_str());
        let status = resp.status().as_u16();
        self.metrics
            .request(ex.backend.as_deref(), status, ex.affinity.as_str());
        tracing::info!(
            method = %method,
            path = uri.path(),
            status,
            backend,
            affinity = ex.affinity.as_str(),
            duration_us = started.map_or(0, |t| t.elapsed().as_micros() as u64),
            "request"
        );
        resp
    }

    async fn forward<T: Transport>(
        &self,
        transport: &T,
        routing: &Routing,
        (parts, body): (Box<Parts>, Option<Incoming>),
        hop: &headers::Hop<'_>,
        ex: &mut Exchange,
    ) -> Result<Box<Response<ProxyBody>>, ProxyError> {
        let mut out = Outgoing::prepare(routing, parts, body, hop)?;
        let mut last = ProxyError::NoBackend;
        let mut reason = unusable_pin_reason(routing, &out.pin);
        for idx in routing.candidates(&out.pin) {
            let hit = matches!(out.pin, Pin::Member { index, .. } if index == idx);
            ex.affinity = out.outcome(hit);
            let member = &routing.members[idx];
            let backend = &member.backend;
            ex.backend = Some(Arc::clone(backend));
            let from = moved_from(routing, &out.pin, hit);
            let guard = backend.start_request(hit.then_some(out.now));
            let (sent, timeout) = (Instant::now(), routing.timeouts.backend_response);
            let attempt = Attempt {
                parts: &out.parts,
                forwarding: &out.forwarding,
                body: &out.body,
                from,
                deadline: tokio::time::Instant::from_std(sent) + timeout,
            };
            let err = match transport.send(backend, attempt).await {
                Ok(resp) => {
                    self.metrics.upstream_latency(backend, sent.elapsed());
                    if let Some(old) = from {
                        self.audit(routing, &out.parts, old, member, reason);
                    }
                    return out.relay::<T>(routing, (idx, hit), resp, guard);
                }
                Err(e) if e.is_late() => return Err(ProxyError::Timeout(timeout)),
                Err(e) => e,
            };
            failed(member, &err)?;
            if hit {
                reason = failure_reason(&err);
            }
            let may_retry = out.may_retry(&err);
            last = ProxyError::Upstream(err);
            if !may_retry {
                break;
            }
        }
        if !routing.any_takes_new() {
            return Err(ProxyError::NoBackend);
        }
        Err(last)
    }

    /// One structured event per broken pin: never the cookie, only a keyed tag of the session.
    fn audit(
        &self,
        routing: &Routing,
        parts: &Parts,
        from: &str,
        to: &Member,
        reason: &'static str,
    ) {
        let cookies: Vec<u8> = parts
            .headers
            .get_all(COOKIE)
            .iter()
            .flat_map(|v| v.as_bytes().to_vec())
            .collect();
        let session = affinity::session_tag(&routing.audit_key, &cookies);
        self.metrics.failover(reason);
        tracing::info!(from, to = %to.backend.id, reason, session, "session failed over");
    }
}

/// A request made ready for its attempts: validated, its pin taken out of the cookies, its
/// headers rewritten once for every attempt.
struct Outgoing {
    /// Boxed from the start (the lane's reader, hyper's `handle`): about 220 bytes, moved into
    /// each future down to here, each move a call to `memcpy`.
    parts: Box<Parts>,
    body: Replayable,
    pin: Pin,
    /// Added to the request by each attempt's transport.
    forwarding: headers::Forwarding,
    /// Unix seconds when the request arrived: pins are checked and issued against it.
    now: u64,
    client_upgrade: Option<OnUpgrade>,
    /// Replaying after bytes went out is safe only for idempotent requests without a body.
    replayable: bool,
}

impl Outgoing {
    // Inlined: returned by value, the prepared request was otherwise copied once more into the
    // request's future (132 instructions per request, bench/instructions.sh).
    #[inline(always)]
    fn prepare(
        routing: &Routing,
        mut parts: Box<Parts>,
        body: Option<Incoming>,
        hop: &headers::Hop<'_>,
    ) -> Result<Self, ProxyError> {
        let checked = crate::validate::check(&parts)?;
        if checked
            .length
            .zip(routing.max_body)
            .is_some_and(|(n, max)| n > max)
        {
            return Err(ProxyError::BodyTooLarge);
        }
        let now = crate::backend::unix_ms() / 1000;
        let pin = affinity::take(&mut parts.headers, &routing.cookie_name, |value| {
            routing.pin(value, now)
        })
        .unwrap_or(Pin::None);
        let upgrade = checked.upgrade;
        let client_upgrade = upgrade
            .as_ref()
            .and_then(|_| parts.extensions.remove::<OnUpgrade>());
        let forwarding = headers::prepare_request(&mut parts, hop, checked.host);
        if let Some(protocol) = upgrade {
            headers::keep_upgrade(&mut parts.headers, protocol);
        }
        let body = body.map_or_else(Replayable::empty, |b| Replayable::new(b, routing.max_body));
        let replayable = body.is_empty() && is_idempotent(&parts.method);
        Ok(Self {
            parts,
            body,
            pin,
            now,
            forwarding,
            client_upgrade,
            replayable,
        })
    }

    fn outcome(&self, hit: bool) -> AffinityOutcome {
        match (&self.pin, hit) {
            (Pin::None, _) => AffinityOutcome::New,
            (_, true) => AffinityOutcome::Hit,
            (_, false) => AffinityOutcome::Failover,
        }
    }

    /// Candidate `idx`'s response, relayed, or switched to a tunnel for an upgrade. It pins the
    /// client there unless the pin already said so and is fresh.
    fn relay<T: Transport>(
        &mut self,
        routing: &Routing,
        (idx, hit): (usize, bool),
        resp: Response<T::Body>,
        guard: crate::backend::InFlight,
    ) -> Result<Box<Response<ProxyBody>>, ProxyError> {
        let renew = matches!(self.pin, Pin::Member { renew: true, .. });
        let pin_here = (!hit || renew).then(|| routing.set_cookie(idx, self.now));
        let mut resp = if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            let client = self
                .client_upgrade
                .take()
                .ok_or(ProxyError::UnaskedSwitch)?;
            T::switch(resp, guard, client, routing.timeouts.tunnel_idle)?
        } else {
            T::respond(resp, guard)
        };
        transport::pin(&mut resp, pin_here);
        Ok(Box::new(resp))
    }

    /// Whether the request may go to the next candidate after `err`.
    fn may_retry(&self, err: &UpstreamError) -> bool {
        // Nothing was sent: any request may go elsewhere if its body is unread.
        if err.is_unsent() {
            self.body.unread()
        } else {
            self.replayable
        }
    }
}

/// The backend a failing-over client was pinned to, named in the request to the new one.
fn moved_from<'a>(routing: &'a Routing, pin: &'a Pin, hit: bool) -> Option<&'a str> {
    match pin {
        Pin::Member { index, .. } if !hit => Some(routing.members[*index].backend.id.as_str()),
        Pin::Retired(id) => Some(id.as_str()),
        _ => None,
    }
}

/// Logs a failed attempt and marks a backend that refused the connection down. A body over the
/// limit is the client's doing, not the backend's, and ends the request.
fn failed(member: &Member, err: &UpstreamError) -> Result<(), ProxyError> {
    if caused_by::<BodyTooLarge>(err) {
        return Err(ProxyError::BodyTooLarge);
    }
    let refused = err.is_connect();
    tracing::warn!(backend = %member.backend.id, connect = refused, error = %chain(err), "upstream attempt failed");
    if refused {
        member
            .backend
            .mark_down(&format!("connect failed: {}", chain(err)));
    }
    Ok(())
}

/// Why the pinned backend could not serve, for the failover audit event.
fn failure_reason(err: &UpstreamError) -> &'static str {
    match (err.is_connect(), err.is_timeout()) {
        (true, true) => "timeout",
        (true, false) => "connect_error",
        (false, _) => "upstream_error",
    }
}

/// True if `T` is anywhere in the error's source chain.
fn caused_by<T: std::error::Error + 'static>(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<T>() {
            return true;
        }
        cur = err.source();
    }
    false
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}
