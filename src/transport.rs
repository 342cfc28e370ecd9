//! How one attempt reaches a backend, behind one trait: hyper's client carries the requests
//! hyper's server read (a body to stream, a protocol switch); the wire carries the lane's (no
//! body, no upgrade). The forwarding loop, its failover and its errors are the same for both.

use std::future::Future;
use std::time::Duration;

use http::header::{SET_COOKIE, UPGRADE};
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{HeaderValue, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use tokio::time::Instant;

use crate::backend::{Backend, InFlight};
use crate::body::{ProxyBody, Replayable, UpstreamBody};
use crate::error::ProxyError;
use crate::headers::{self, Forwarding, FAILOVER};
use crate::upstream::{Lease, Upstream, UpstreamError};
use crate::wire::body::WireBody;

/// One attempt's request.
pub struct Attempt<'a> {
    pub parts: &'a Parts,
    pub forwarding: &'a Forwarding,
    pub body: &'a Replayable,
    /// The backend a failing-over client was pinned to, named to the new one.
    pub from: Option<&'a str>,
    /// When the response head is due, connecting included.
    pub deadline: Instant,
}

/// A way to backends.
pub trait Transport {
    /// A response body as the transport reads it, with what it holds of the connection.
    type Body: Send;

    fn send(
        &self,
        backend: &Backend,
        attempt: Attempt<'_>,
    ) -> impl Future<Output = Result<Response<Self::Body>, UpstreamError>> + Send;

    /// The response for the client, its body keeping the backend's in-flight count up.
    fn respond(resp: Response<Self::Body>, guard: InFlight) -> Response<ProxyBody>;

    /// A 101 the client asked for: the two connections are relayed as a tunnel.
    fn switch(
        resp: Response<Self::Body>,
        guard: InFlight,
        client: OnUpgrade,
        idle: Duration,
    ) -> Result<Response<ProxyBody>, ProxyError>;
}

/// hyper's client, on hyper's pooled connections.
pub struct Hyper<'a>(pub &'a Upstream);

/// A body from hyper's client, and the connection it is read from.
pub struct Leased(Incoming, Lease);

impl Transport for Hyper<'_> {
    type Body = Leased;

    async fn send(
        &self,
        backend: &Backend,
        a: Attempt<'_>,
    ) -> Result<Response<Leased>, UpstreamError> {
        let request = || upstream_request(a.parts, a.forwarding, a.from, a.body.attempt());
        let sent = self
            .0
            .send(&backend.pool, &backend.address, request, a.deadline);
        let (resp, lease) = sent.await?;
        Ok(resp.map(|body| Leased(body, lease)))
    }

    fn respond(resp: Response<Leased>, guard: InFlight) -> Response<ProxyBody> {
        let (mut parts, Leased(body, lease)) = resp.into_parts();
        // Our own version, not an HTTP/1.0 backend's (RFC 9110 section 6.2), as the lane writes.
        parts.version = Version::HTTP_11;
        headers::remove_hop_by_hop(&mut parts.headers);
        Response::from_parts(parts, ProxyBody::upstream(body, guard, lease))
    }

    fn switch(
        resp: Response<Leased>,
        guard: InFlight,
        client: OnUpgrade,
        idle: Duration,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        // The lease ends here: the connection now belongs to the tunnel.
        let resp = resp.map(|Leased(body, _lease)| body);
        Ok(switch(resp, guard, client, idle))
    }
}

/// The wire, for requests without a body or upgrade.
pub struct Wire<'a>(pub &'a Upstream);

impl Transport for Wire<'_> {
    type Body = WireBody;

    async fn send(
        &self,
        backend: &Backend,
        a: Attempt<'_>,
    ) -> Result<Response<WireBody>, UpstreamError> {
        let req = crate::wire::Request {
            parts: a.parts,
            forwarding: a.forwarding,
            from: a.from,
        };
        let sent = self
            .0
            .send_wire(&backend.wire, &backend.address, req, a.deadline);
        sent.await
    }

    /// The wire's response head comes without its hop-by-hop headers (`wire::head`).
    fn respond(resp: Response<WireBody>, guard: InFlight) -> Response<ProxyBody> {
        resp.map(|body| ProxyBody::Wire(body, guard))
    }

    /// The wire carries no upgrade (the lane leaves those to hyper).
    fn switch(
        _resp: Response<WireBody>,
        _guard: InFlight,
        _client: OnUpgrade,
        _idle: Duration,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        Err(ProxyError::UnaskedSwitch)
    }
}

/// Adds the pin to a relayed response.
pub fn pin(resp: &mut Response<ProxyBody>, set_cookie: Option<HeaderValue>) {
    if let Some(value) = set_cookie {
        resp.headers_mut().append(SET_COOKIE, value);
    }
}

/// The request for one attempt, in origin form (`/path?query`): the connection already goes to
/// the backend, and `Host` is the client's.
fn upstream_request(
    parts: &Parts,
    forwarding: &Forwarding,
    from: Option<&str>,
    body: UpstreamBody,
) -> Request<UpstreamBody> {
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = Uri::from(path);
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = parts.headers.clone();
    forwarding.add_to(req.headers_mut());
    if let Some(old) = from {
        // Ids are validated as header-safe characters.
        if let Ok(v) = HeaderValue::from_str(old) {
            req.headers_mut().insert(FAILOVER, v);
        }
    }
    req
}

/// Answers 101 to the client and relays the two upgraded connections in their own task, which
/// keeps the backend's in-flight count up while the tunnel lives.
fn switch(
    mut resp: Response<Incoming>,
    guard: InFlight,
    client: OnUpgrade,
    idle: Duration,
) -> Response<ProxyBody> {
    let upstream = hyper::upgrade::on(&mut resp);
    let (mut parts, _empty) = resp.into_parts();
    let protocol = parts.headers.get(UPGRADE).cloned();
    headers::remove_hop_by_hop(&mut parts.headers);
    if let Some(protocol) = protocol {
        headers::keep_upgrade(&mut parts.headers, protocol);
    }
    tokio::spawn(async move {
        let backend = guard.backend_id().to_string();
        crate::tunnel::relay(client, upstream, idle, backend).await;
        drop(guard);
    });
    Response::from_parts(parts, ProxyBody::local(""))
}
