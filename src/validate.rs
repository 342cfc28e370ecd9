//! Request validation at the edge: requests a backend could read differently from this proxy
//! (request smuggling, host confusion) are refused before anything is forwarded.

use http::header::{self, HeaderMap};
use http::request::Parts;
use http::uri::Authority;
use http::{Method, Version};

use crate::framing::FramingConflict;
use crate::headers::list_tokens;

/// Why a request was refused; the status mapping lives in `error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("both Content-Length and Transfer-Encoding")]
    AmbiguousFraming,
    #[error("chunked applied more than once")]
    RepeatedChunked,
    #[error("missing Host")]
    MissingHost,
    #[error("repeated Host")]
    RepeatedHost,
    #[error("malformed Host")]
    MalformedHost,
    #[error("absolute-form target names another host")]
    HostMismatch,
    #[error("CONNECT is not proxied")]
    Connect,
    #[error("asterisk target outside OPTIONS")]
    Asterisk,
    #[error("Connection names a framing header")]
    ConnectionNamesFraming,
    #[error("Upgrade: h2c")]
    H2cUpgrade,
    #[error("header value with non-ASCII or control bytes")]
    BadHeaderBytes,
}

pub fn check(parts: &Parts) -> Result<(), Rejection> {
    let h = &parts.headers;
    if parts.method == Method::CONNECT {
        return Err(Rejection::Connect);
    }
    if parts.uri == "*" && parts.method != Method::OPTIONS {
        return Err(Rejection::Asterisk);
    }
    let both = h.contains_key(header::CONTENT_LENGTH) && h.contains_key(header::TRANSFER_ENCODING);
    if both || parts.extensions.get::<FramingConflict>().is_some() {
        return Err(Rejection::AmbiguousFraming);
    }
    if chunked_codings(h) > 1 {
        return Err(Rejection::RepeatedChunked);
    }
    if h.values().any(|v| v.to_str().is_err()) {
        return Err(Rejection::BadHeaderBytes);
    }
    if connection_names_framing(h) {
        return Err(Rejection::ConnectionNamesFraming);
    }
    if h.get_all(header::UPGRADE)
        .iter()
        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"h2c"))
    {
        return Err(Rejection::H2cUpgrade);
    }
    check_host(parts)
}

/// How often `chunked` appears among the transfer codings, over every `Transfer-Encoding` line.
fn chunked_codings(h: &HeaderMap) -> usize {
    list_tokens(h, &header::TRANSFER_ENCODING)
        .filter(|c| c.eq_ignore_ascii_case("chunked"))
        .count()
}

fn connection_names_framing(h: &HeaderMap) -> bool {
    let framing = ["content-length", "transfer-encoding", "host"];
    list_tokens(h, &header::CONNECTION)
        .any(|name| framing.iter().any(|f| name.eq_ignore_ascii_case(f)))
}

/// HTTP/1.1 needs exactly one valid Host; an absolute-form target (or HTTP/2 `:authority`)
/// must name the same host.
fn check_host(parts: &Parts) -> Result<(), Rejection> {
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let host = match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => return Err(Rejection::RepeatedHost),
        (None, _) if parts.version == Version::HTTP_11 && parts.uri.authority().is_none() => {
            return Err(Rejection::MissingHost)
        }
        (None, _) => return Ok(()),
        (Some(v), None) => v,
    };
    let host: Authority = host
        .to_str()
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(Rejection::MalformedHost)?;
    if host.as_str().contains('@') || host.host().is_empty() {
        return Err(Rejection::MalformedHost);
    }
    match parts.uri.authority() {
        Some(target) if !target.as_str().eq_ignore_ascii_case(host.as_str()) => {
            Err(Rejection::HostMismatch)
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn parts(method: &str, uri: &str, version: Version, headers: &[(&str, &[u8])]) -> Parts {
        let mut b = Request::builder().method(method).uri(uri).version(version);
        for (k, v) in headers {
            b = b.header(*k, http::HeaderValue::from_bytes(v).expect("valid bytes"));
        }
        b.body(()).expect("valid").into_parts().0
    }

    #[test]
    fn table() {
        use Rejection::*;
        let v11 = Version::HTTP_11;
        let host: (&str, &[u8]) = ("host", b"shop.example");
        let rows: Vec<(Parts, Result<(), Rejection>)> = vec![
            (parts("GET", "/", v11, &[host]), Ok(())),
            (
                parts(
                    "POST",
                    "/",
                    v11,
                    &[host, ("transfer-encoding", b"chunked, chunked")],
                ),
                Err(RepeatedChunked),
            ),
            (
                parts(
                    "POST",
                    "/",
                    v11,
                    &[
                        host,
                        ("transfer-encoding", b"chunked"),
                        ("transfer-encoding", b"Chunked"),
                    ],
                ),
                Err(RepeatedChunked),
            ),
            (
                parts(
                    "POST",
                    "/",
                    v11,
                    &[host, ("transfer-encoding", b"gzip, chunked")],
                ),
                Ok(()),
            ),
            (parts("GET", "/", v11, &[]), Err(MissingHost)),
            (parts("GET", "/", Version::HTTP_10, &[]), Ok(())),
            (
                parts("GET", "/", v11, &[host, ("host", b"other.example")]),
                Err(RepeatedHost),
            ),
            (
                parts("GET", "/", v11, &[("host", b"a b")]),
                Err(MalformedHost),
            ),
            (
                parts("GET", "/", v11, &[("host", b"user@shop.example")]),
                Err(MalformedHost),
            ),
            (
                parts("GET", "http://evil.example/", v11, &[host]),
                Err(HostMismatch),
            ),
            (parts("GET", "http://shop.example/", v11, &[host]), Ok(())),
            (
                parts("GET", "http://shop.example/", Version::HTTP_2, &[]),
                Ok(()),
            ),
            (
                parts("CONNECT", "shop.example:443", v11, &[host]),
                Err(Connect),
            ),
            (parts("GET", "*", v11, &[host]), Err(Asterisk)),
            (parts("OPTIONS", "*", v11, &[host]), Ok(())),
            (
                parts(
                    "POST",
                    "/",
                    v11,
                    &[
                        host,
                        ("content-length", b"3"),
                        ("transfer-encoding", b"chunked"),
                    ],
                ),
                Err(AmbiguousFraming),
            ),
            (
                parts(
                    "GET",
                    "/",
                    v11,
                    &[host, ("connection", b"keep-alive, Content-Length")],
                ),
                Err(ConnectionNamesFraming),
            ),
            (
                parts("GET", "/", v11, &[host, ("upgrade", b"h2c")]),
                Err(H2cUpgrade),
            ),
            (
                parts("GET", "/", v11, &[host, ("cookie", b"a=\xff")]),
                Err(BadHeaderBytes),
            ),
            (
                parts("GET", "/", v11, &[host, ("upgrade", b"websocket")]),
                Ok(()),
            ),
        ];
        for (i, (p, want)) in rows.into_iter().enumerate() {
            assert_eq!(check(&p), want, "row {i}: {} {}", p.method, p.uri);
        }
    }
}
