//! Request validation at the edge: requests a backend could read differently from this proxy
//! (request smuggling, host confusion) are refused before anything is forwarded.

use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::uri::Authority;
use http::{Method, Version};

use crate::framing::FramingConflict;
use crate::headers::tokens;

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

/// What validation read of the headers that forwarding needs too: gathered in its one pass, as
/// two more map lookups cost about 300 instructions per request.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Checked {
    /// The first `Content-Length`, if it reads as a number.
    pub length: Option<u64>,
    /// The protocol an HTTP/1.1 request asks to switch to: `Upgrade` (the first), with `upgrade`
    /// among the `Connection` tokens.
    pub upgrade: Option<HeaderValue>,
    /// The one `Host` line: forwarding needs it too (two map lookups, about 200 instructions).
    pub host: Option<HeaderValue>,
}

pub fn check(parts: &Parts) -> Result<Checked, Rejection> {
    if parts.method == Method::CONNECT {
        return Err(Rejection::Connect);
    }
    if parts.uri == "*" && parts.method != Method::OPTIONS {
        return Err(Rejection::Asterisk);
    }
    let seen = Seen::scan(&parts.headers);
    let both = seen.content_length && seen.transfer_encoding;
    if both || parts.extensions.get::<FramingConflict>().is_some() {
        return Err(Rejection::AmbiguousFraming);
    }
    if seen.chunked > 1 {
        return Err(Rejection::RepeatedChunked);
    }
    if seen.bad_bytes {
        return Err(Rejection::BadHeaderBytes);
    }
    if seen.connection_names_framing {
        return Err(Rejection::ConnectionNamesFraming);
    }
    if seen.h2c {
        return Err(Rejection::H2cUpgrade);
    }
    check_host(parts, &seen)?;
    let switch = seen.connection_upgrade && parts.version == Version::HTTP_11;
    Ok(Checked {
        length: seen.length,
        upgrade: seen.upgrade.filter(|_| switch).cloned(),
        host: seen.host.cloned(),
    })
}

/// What the checks need from the headers, gathered in one pass: a request has few headers, and
/// each map lookup would hash a name again (six lookups measured about 1,000 instructions).
#[derive(Default)]
struct Seen<'a> {
    content_length: bool,
    length: Option<u64>,
    transfer_encoding: bool,
    /// How often `chunked` appears among the transfer codings, over every line.
    chunked: usize,
    connection_names_framing: bool,
    connection_upgrade: bool,
    upgrade: Option<&'a HeaderValue>,
    h2c: bool,
    hosts: usize,
    host: Option<&'a HeaderValue>,
    /// A value with non-ASCII or control bytes; such lines are not looked into further.
    bad_bytes: bool,
}

impl<'a> Seen<'a> {
    fn scan(h: &'a HeaderMap) -> Self {
        let mut seen = Self::default();
        for (name, value) in h {
            let Ok(text) = value.to_str() else {
                seen.bad_bytes = true;
                continue;
            };
            if name == header::CONTENT_LENGTH {
                if !seen.content_length {
                    seen.length = crate::framing::content_length(value.as_bytes());
                }
                seen.content_length = true;
            } else if name == header::TRANSFER_ENCODING {
                seen.transfer_encoding = true;
                seen.chunked += tokens(text)
                    .filter(|c| c.eq_ignore_ascii_case("chunked"))
                    .count();
            } else if name == header::CONNECTION {
                let framing = ["content-length", "transfer-encoding", "host"];
                for t in tokens(text) {
                    seen.connection_names_framing |=
                        framing.iter().any(|f| t.eq_ignore_ascii_case(f));
                    seen.connection_upgrade |= t.eq_ignore_ascii_case("upgrade");
                }
            } else if name == header::UPGRADE {
                seen.h2c |= text.eq_ignore_ascii_case("h2c");
                seen.upgrade = seen.upgrade.or(Some(value));
            } else if name == header::HOST {
                seen.hosts += 1;
                seen.host = seen.host.or(Some(value));
            }
        }
        seen
    }
}

/// HTTP/1.1 needs exactly one valid Host; an absolute-form target (or HTTP/2 `:authority`)
/// must name the same host.
fn check_host(parts: &Parts, seen: &Seen<'_>) -> Result<(), Rejection> {
    let host = match (seen.hosts, seen.host) {
        (2.., _) => return Err(Rejection::RepeatedHost),
        (_, None) if parts.version == Version::HTTP_11 && parts.uri.authority().is_none() => {
            return Err(Rejection::MissingHost)
        }
        (_, None) => return Ok(()),
        (_, Some(v)) => v,
    };
    let host: Authority = host
        .to_str()
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(Rejection::MalformedHost)?;
    // Without userinfo, the host is empty exactly when the authority starts with its port.
    if host.as_str().contains('@') || host.as_str().starts_with(':') {
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
    fn the_length_the_protocol_asked_for_and_the_host_are_read_in_the_same_pass() {
        let (v10, v11) = (Version::HTTP_10, Version::HTTP_11);
        let host: (&str, &[u8]) = ("host", b"shop.example");
        let ws = ("upgrade", &b"websocket"[..]);
        let asks = ("connection", &b"keep-alive, Upgrade"[..]);
        let rows = [
            (v11, vec![host, ("content-length", b"12")], Some(12), None),
            (v11, vec![host, ("content-length", b"x")], None, None),
            (
                v11,
                vec![host, ("content-length", b"x"), ("content-length", b"3")],
                None,
                None,
            ),
            (
                v11,
                vec![host, asks, ws, ("upgrade", b"h3")],
                None,
                Some("websocket"),
            ),
            (v11, vec![host, ws], None, None),
            (v10, vec![host, asks, ws], None, None),
        ];
        for (i, (version, headers, length, upgrade)) in rows.into_iter().enumerate() {
            let checked = check(&parts("GET", "/", version, &headers)).expect("valid");
            let upgrade = upgrade.map(HeaderValue::from_static);
            let host = Some(HeaderValue::from_static("shop.example"));
            let expected = Checked {
                length,
                upgrade,
                host,
            };
            assert_eq!(checked, expected, "row {i}");
        }
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
                parts("GET", "/", v11, &[("host", b":8080")]),
                Err(MalformedHost),
            ),
            (
                parts("GET", "/", v11, &[("host", b":")]),
                Err(MalformedHost),
            ),
            (parts("GET", "/", v11, &[("host", b"[::1]:8080")]), Ok(())),
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
                parts(
                    "GET",
                    "/",
                    v11,
                    &[
                        host,
                        ("connection", b"Transfer-Encoding"),
                        ("connection", b"keep-alive"),
                    ],
                ),
                Err(ConnectionNamesFraming),
            ),
            (
                parts("GET", "/", v11, &[host, ("upgrade", b"h2c")]),
                Err(H2cUpgrade),
            ),
            (
                parts("GET", "/", v11, &[host, ("upgrade", b"H2C")]),
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
            let got = check(&p).map(|_| ());
            assert_eq!(got, want, "row {i}: {} {}", p.method, p.uri);
        }
    }
}
