//! Request and response header hygiene for a proxy hop: hop-by-hop headers out, forwarding
//! headers in.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;

/// Tells the backend that the client was pinned to another backend that is now unusable, so it
/// can pull the session from the shared store before handling the request.
pub const FAILOVER: HeaderName = HeaderName::from_static("x-stickylb-failover");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Headers that describe one connection, not the message (RFC 9110 section 7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers, including every header the `Connection` header names.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// Prepares a client request for the backend: Host preserved (taken from the HTTP/2 authority if
/// needed), hop-by-hop headers removed, and `X-Forwarded-*` set to what this proxy saw. Incoming
/// `X-Forwarded-*` values are replaced, not extended: a client could write anything there.
pub fn prepare_request(parts: &mut Parts, peer: IpAddr) {
    remove_hop_by_hop(&mut parts.headers);
    if !parts.headers.contains_key(header::HOST) {
        if let Some(v) = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            parts.headers.insert(header::HOST, v);
        }
    }
    match parts.headers.get(header::HOST).cloned() {
        Some(host) => parts.headers.insert(X_FORWARDED_HOST, host),
        None => parts.headers.remove(X_FORWARDED_HOST),
    };
    parts
        .headers
        .insert(X_FORWARDED_FOR, HeaderValue::from(IpHeader(peer)));
    parts
        .headers
        .insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
}

struct IpHeader(IpAddr);

impl From<IpHeader> for HeaderValue {
    fn from(ip: IpHeader) -> Self {
        // An IP address prints as ASCII digits, dots, colons and hex: always a valid value.
        HeaderValue::from_str(&ip.0.to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn parts(headers: &[(&str, &str)], uri: &str) -> Parts {
        let mut b = Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("valid request").into_parts().0
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut p = parts(
            &[
                ("connection", "keep-alive, X-Secret, close"),
                ("x-secret", "1"),
                ("keep-alive", "timeout=5"),
                ("transfer-encoding", "chunked"),
                ("upgrade", "websocket"),
                ("te", "trailers"),
                ("x-kept", "yes"),
            ],
            "/",
        );
        remove_hop_by_hop(&mut p.headers);
        let left: Vec<_> = p.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["x-kept"]);
    }

    #[test]
    fn forwarded_headers_replace_what_the_client_claimed() {
        let mut p = parts(
            &[
                ("host", "shop.example"),
                ("x-forwarded-for", "6.6.6.6"),
                ("x-forwarded-proto", "https"),
            ],
            "/",
        );
        prepare_request(&mut p, "10.1.2.3".parse().expect("ip"));
        assert_eq!(p.headers["host"], "shop.example");
        assert_eq!(p.headers["x-forwarded-host"], "shop.example");
        assert_eq!(p.headers["x-forwarded-for"], "10.1.2.3");
        assert_eq!(p.headers["x-forwarded-proto"], "http");
        assert_eq!(p.headers.get_all("x-forwarded-for").iter().count(), 1);
    }

    #[test]
    fn http2_authority_becomes_host() {
        let mut p = parts(&[], "http://shop.example:8080/cart");
        prepare_request(&mut p, "::1".parse().expect("ip"));
        assert_eq!(p.headers["host"], "shop.example:8080");
        assert_eq!(p.headers["x-forwarded-for"], "::1");
    }
}
