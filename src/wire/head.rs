//! Heads on the wire to a backend: the request head written from the prepared request's parts,
//! and the response head read with httparse into the parts the proxy relays, their values
//! sharing the bytes they were read into.

use std::mem::MaybeUninit;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::request::Parts;
use http::response;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Version};
use hyper::ext::ReasonPhrase;

use crate::framing::{content_length, last_coding_is_chunked, status_has_no_body};
use crate::headers::{is_hop_by_hop, names_hop_by_hop, remove_hop_by_hop, tokens, FAILOVER};
use crate::lane::request::{self, Line};
use crate::lane::response::line;

/// hyper's client refuses a response with more header lines.
const MAX_HEADERS: usize = 100;

/// How a response's body is delimited (RFC 9112 section 6.3, from the client's side).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body: a HEAD request, 1xx, 204 or 304.
    Empty,
    Length(u64),
    Chunked,
    /// Until the backend closes the connection.
    Close,
}

/// A response head, read.
#[derive(Debug)]
pub struct Head {
    pub parts: response::Parts,
    pub framing: Framing,
    /// The connection may carry another request once the body is read.
    pub reusable: bool,
}

/// Why a response head cannot be relayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("response head refused by the parser")]
    Parse,
    #[error("response head too long")]
    TooLong,
    #[error("response head with an invalid status, header name or value")]
    Invalid,
    #[error("response with an invalid or conflicting Content-Length")]
    Length,
}

/// Writes the request head for one attempt into `out`: origin form, HTTP/1.1, the prepared
/// headers as they are, the failover header when the client moved. A request without a body
/// goes as the client sent it, without `Content-Length` (as hyper's client sends it).
pub fn write_request(out: &mut Vec<u8>, parts: &Parts, from: Option<&str>) {
    out.clear();
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        line(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if let Some(from) = from {
        line(out, FAILOVER.as_str().as_bytes(), from.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

/// Takes the next final response head out of `buf` (1xx other than 101 are skipped, as hyper's
/// client does); Ok(None) while it is not all there. `head_request`: the request was HEAD.
pub fn read_response(
    buf: &mut BytesMut,
    head_request: bool,
    max: usize,
) -> Result<Option<Head>, Malformed> {
    loop {
        // Looked at before the first read too: nothing to parse yet.
        if buf.is_empty() {
            return Ok(None);
        }
        let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        // httparse's defaults, which are hyper's client's.
        let parser = httparse::ParserConfig::default();
        let parsed = parser.parse_response_with_uninit_headers(&mut resp, buf, &mut headers);
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() > max => return Err(Malformed::TooLong),
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err(Malformed::Parse),
        };
        let code = resp.code.unwrap_or_default();
        if (100..200).contains(&code) && code != 101 {
            buf.advance(len);
            continue;
        }
        let mut lines = [const { (0..0, 0..0) }; MAX_HEADERS];
        for (line, h) in lines.iter_mut().zip(resp.headers.iter()) {
            *line = request::line(buf, h);
        }
        let found = Found {
            code,
            reason: request::range(buf, resp.reason.unwrap_or("").as_bytes()),
            v11: resp.version == Some(1),
            lines: resp.headers.len(),
        };
        let bytes = buf.split_to(len).freeze();
        return build(&bytes, &found, &lines[..found.lines], head_request).map(Some);
    }
}

type Range = std::ops::Range<usize>;

/// What the parser found of a head, as places in its bytes.
struct Found {
    code: u16,
    reason: Range,
    v11: bool,
    lines: usize,
}

/// The relayed parts, the body's framing, and whether the connection stays open.
fn build(
    bytes: &Bytes,
    found: &Found,
    lines: &[Line],
    head_request: bool,
) -> Result<Head, Malformed> {
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = StatusCode::from_u16(found.code).map_err(|_| Malformed::Invalid)?;
    let v11 = found.v11;
    parts.version = if v11 {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    let reason = &bytes[found.reason.clone()];
    if parts.status.canonical_reason().map(str::as_bytes) != Some(reason) {
        let phrase =
            ReasonPhrase::try_from(bytes.slice_ref(reason)).map_err(|_| Malformed::Invalid)?;
        parts.extensions.insert(phrase);
    }
    let (mut headers, connection) = relayed_headers(bytes, lines)?;
    let (framing, mut reusable) = framing(parts.status, &mut headers, head_request)?;
    reusable &= v11 && !connection.close;
    if connection.names_others {
        remove_hop_by_hop(&mut headers);
    }
    parts.headers = headers;
    Ok(Head {
        parts,
        framing,
        reusable,
    })
}

/// What a response's `Connection` lines say.
#[derive(Default)]
struct Connection {
    close: bool,
    /// They name headers to drop besides the hop-by-hop ones (or cannot be read).
    names_others: bool,
}

/// The headers to relay, the hop-by-hop ones left out as they are met (a removal from the map
/// costs a lookup each); `Transfer-Encoding` stays for the framing to read. `Connection` lines
/// that name other headers stay too, for [`remove_hop_by_hop`] to take out with those.
fn relayed_headers(bytes: &Bytes, lines: &[Line]) -> Result<(HeaderMap, Connection), Malformed> {
    // Room for the pin's `Set-Cookie`, added on the way out.
    let mut headers = HeaderMap::with_capacity(lines.len() + 1);
    let mut connection = Connection::default();
    for (name, value) in lines {
        let name = HeaderName::from_bytes(&bytes[name.clone()]).map_err(|_| Malformed::Invalid)?;
        let value = HeaderValue::from_maybe_shared(bytes.slice(value.clone()))
            .map_err(|_| Malformed::Invalid)?;
        if name == CONNECTION {
            connection.read(&value);
        }
        let keep = name == TRANSFER_ENCODING || (name == CONNECTION && connection.names_others);
        if keep || !is_hop_by_hop(&name) {
            headers.append(name, value);
        }
    }
    Ok((headers, connection))
}

impl Connection {
    fn read(&mut self, line: &HeaderValue) {
        let Ok(line) = line.to_str() else {
            self.names_others = true;
            return;
        };
        for token in tokens(line) {
            let close = token.eq_ignore_ascii_case("close");
            self.close |= close;
            self.names_others |= !close && !names_hop_by_hop(token);
        }
    }
}

/// RFC 9112 section 6.3: no body for HEAD, 1xx, 204 and 304; chunked if that is the last coding;
/// any other coding is read until the close; else the length; else until the close. With a
/// coding, a length is dropped (and the connection closed after), as the RFC asks.
fn framing(
    status: StatusCode,
    headers: &mut HeaderMap,
    head_request: bool,
) -> Result<(Framing, bool), Malformed> {
    // Hop-by-hop: kept in the map only for this reading.
    let chunked = headers
        .get_all(TRANSFER_ENCODING)
        .iter()
        .next_back()
        .map(|te| last_coding_is_chunked(te.as_bytes()));
    if chunked.is_some() {
        headers.remove(TRANSFER_ENCODING);
    }
    if head_request || status_has_no_body(status) {
        return Ok((Framing::Empty, true));
    }
    if let Some(chunked) = chunked {
        let alone = !headers.contains_key(CONTENT_LENGTH);
        headers.remove(CONTENT_LENGTH);
        return Ok(match chunked {
            true => (Framing::Chunked, alone),
            false => (Framing::Close, false),
        });
    }
    let mut length = None;
    for value in headers.get_all(CONTENT_LENGTH) {
        let n = content_length(value.as_bytes()).ok_or(Malformed::Length)?;
        if length.replace(n).is_some_and(|m| m != n) {
            return Err(Malformed::Length);
        }
    }
    Ok(match length {
        Some(n) => (Framing::Length(n), true),
        None => (Framing::Close, false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    fn read(wire: &[u8], head_request: bool) -> Result<Option<Head>, Malformed> {
        read_response(&mut BytesMut::from(wire), head_request, 8192)
    }

    fn framed(wire: &str) -> (Framing, bool) {
        let head = read(wire.as_bytes(), false).expect("valid").expect("whole");
        (head.framing, head.reusable)
    }

    #[test]
    fn the_body_is_framed_as_rfc_9112_says() {
        let table = [
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
                Framing::Length(5),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\n",
                Framing::Length(5),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                Framing::Chunked,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                Framing::Chunked,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n",
                Framing::Chunked,
                false,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
                Framing::Close,
                false,
            ),
            ("HTTP/1.1 200 OK\r\n\r\n", Framing::Close, false),
            (
                "HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
                Framing::Empty,
                true,
            ),
            (
                "HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
                Framing::Empty,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\n",
                Framing::Length(5),
                false,
            ),
            (
                "HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\n",
                Framing::Length(5),
                false,
            ),
        ];
        for (wire, framing, reusable) in table {
            assert_eq!(framed(wire), (framing, reusable), "{wire:?}");
        }
        let head = read(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true);
        assert_eq!(
            head.expect("valid").expect("whole").framing,
            Framing::Empty,
            "HEAD"
        );
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n";
        for head_request in [true, false] {
            let head = read(chunked, head_request).expect("valid").expect("whole");
            let names: Vec<_> = head.parts.headers.keys().map(|k| k.as_str()).collect();
            assert_eq!(names, ["x-a"], "HEAD: {head_request}");
        }
    }

    #[test]
    fn a_chunked_body_loses_its_length_header_and_interim_heads_are_skipped() {
        let wire = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Made\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\nX-A: b\r\n\r\n3\r\n";
        let mut buf = BytesMut::from(&wire[..]);
        let head = read_response(&mut buf, false, 8192)
            .expect("valid")
            .expect("whole");
        assert_eq!(head.parts.status, StatusCode::CREATED);
        assert!(!head.parts.headers.contains_key(CONTENT_LENGTH));
        assert_eq!(head.parts.headers["x-a"], "b");
        let reason = head
            .parts
            .extensions
            .get::<ReasonPhrase>()
            .expect("an unusual reason is kept");
        assert_eq!(reason.as_bytes(), b"Made");
        assert_eq!(&buf[..], b"3\r\n", "the body stays in the buffer");
    }

    #[test]
    fn bad_heads_are_refused_and_partial_ones_wait() {
        assert!(matches!(
            read(b"HTTP/1.1 200 OK\r\nContent-Le", false),
            Ok(None)
        ));
        let refused: [(&[u8], Malformed); 4] = [
            (b"HTTP/1.1 2000 OK\r\n\r\n", Malformed::Parse),
            (b"SSH-2.0-OpenSSH\r\n\r\n", Malformed::Parse),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
                Malformed::Length,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n",
                Malformed::Length,
            ),
        ];
        for (wire, why) in refused {
            assert_eq!(
                read(wire, false).err(),
                Some(why),
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
        let long = format!("HTTP/1.1 200 OK\r\nX: {}", "a".repeat(9000));
        assert_eq!(read(long.as_bytes(), false).err(), Some(Malformed::TooLong));
    }

    #[test]
    fn a_request_head_is_written_in_origin_form_with_the_failover_header() {
        let (mut parts, ()) = http::Request::new(()).into_parts();
        parts.method = Method::POST;
        parts.uri = "/visit?x=1".parse().expect("a path");
        parts
            .headers
            .insert("host", HeaderValue::from_static("app"));
        let mut out = Vec::new();
        write_request(&mut out, &parts, Some("a"));
        let expected = "POST /visit?x=1 HTTP/1.1\r\nhost: app\r\nx-stickylb-failover: a\r\n\r\n";
        assert_eq!(String::from_utf8_lossy(&out), expected);
        parts.method = Method::GET;
        write_request(&mut out, &parts, None);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "GET /visit?x=1 HTTP/1.1\r\nhost: app\r\n\r\n"
        );
    }
}
