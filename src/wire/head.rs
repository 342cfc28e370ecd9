//! Heads on the wire to a backend: the request head written from the prepared request's parts,
//! and the response head read with httparse into the status the proxy relays and the header
//! lines the lane writes to the client as they are ([`Lines`]): no header map is built for a
//! response nothing in between reads the headers of (about 2,000 instructions per request,
//! PERFORMANCE.md).

use std::mem::{replace, MaybeUninit};

use bytes::{Buf, Bytes, BytesMut};
use http::{StatusCode, Version};
use hyper::ext::ReasonPhrase;

use crate::framing::{content_length, last_coding_is_chunked, status_has_no_body};
use crate::headers::{byte_tokens, names_hop_by_hop, FAILOVER};
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
///
/// Status, version and reason apart, not in a `response::Parts`: its empty header map made the
/// head 168 bytes, and each of its eight or so moves a call to `memcpy`.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub version: Version,
    /// The backend's reason phrase, when not the status's usual one.
    pub reason: Option<ReasonPhrase>,
    pub lines: Lines,
    pub framing: Framing,
    /// The connection may carry another request once the body is read.
    pub reusable: bool,
}

/// The response's header lines to relay, each `Name: value\r\n` as the backend sent it, without
/// the hop-by-hop ones (and those `Connection` names), and without `Content-Length` when the body
/// is not framed by it.
#[derive(Debug, Default)]
pub struct Lines {
    pub bytes: Vec<u8>,
    /// `Content-Length` lines are among them (the lane adds none of its own). Two flags, not the
    /// length: a head of more than 128 bytes is moved with a call to `memcpy` (+450 instructions
    /// per request), and the body knows its length.
    pub length: bool,
    /// A `Date` line is among them.
    pub date: bool,
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
/// headers as they are, then the forwarding headers, and the failover header when the client
/// moved (the order hyper's client sends them in). A request without a body goes as the client
/// sent it, without `Content-Length` (as hyper's client sends it).
pub fn write_request(out: &mut Vec<u8>, req: &super::Request<'_>) {
    let parts = req.parts;
    out.clear();
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in parts.headers.iter().chain(req.forwarding.iter()) {
        line(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if let Some(from) = req.from {
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
        let mut kinds = [Kind::Other; MAX_HEADERS];
        for ((line, kind), h) in lines.iter_mut().zip(&mut kinds).zip(resp.headers.iter()) {
            *line = request::line(buf, h);
            *kind = Kind::of(h.name.as_bytes());
        }
        let found = Found {
            code,
            reason: request::range(buf, resp.reason.unwrap_or("").as_bytes()),
            v11: resp.version == Some(1),
            lines: resp.headers.len(),
        };
        let bytes = buf.split_to(len).freeze();
        let head = Read {
            bytes: &bytes,
            lines: &lines[..found.lines],
            kinds: &kinds[..found.lines],
        };
        return build(&head, &found, head_request).map(Some);
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

/// The relayed status and lines, the body's framing, and whether the connection stays open.
fn build(head: &Read<'_>, found: &Found, head_request: bool) -> Result<Head, Malformed> {
    let status = StatusCode::from_u16(found.code).map_err(|_| Malformed::Invalid)?;
    let v11 = found.v11;
    let version = if v11 {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    let phrase = &head.bytes[found.reason.clone()];
    let reason = if status.canonical_reason().map(str::as_bytes) == Some(phrase) {
        None
    } else {
        let phrase = head.bytes.slice_ref(phrase);
        Some(ReasonPhrase::try_from(phrase).map_err(|_| Malformed::Invalid)?)
    };
    let connection = head.connection();
    let framed = head.framing(status, head_request)?;
    let lines = head.relayed(&connection, &framed);
    Ok(Head {
        status,
        version,
        reason,
        lines,
        framing: framed.framing,
        reusable: framed.reusable && v11 && !connection.close,
    })
}

/// A response head's bytes and where its header lines lie in them. httparse took only names
/// and values `http`'s types take too (test `httparse_takes_what_http_takes`), so the lines are
/// relayed as they are.
struct Read<'a> {
    bytes: &'a Bytes,
    lines: &'a [Line],
    /// Each line's [`Kind`], told once: the passes below compare no names but these.
    kinds: &'a [Kind],
}

/// What a response line is to the proxy, by its name. (Each pass comparing names again, in any
/// case, cost about 350 instructions per request: bench/instructions.sh.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Connection,
    TransferEncoding,
    ContentLength,
    Date,
    /// Any other hop-by-hop name (`Keep-Alive`, say).
    HopByHop,
    Other,
}

impl Kind {
    fn of(name: &[u8]) -> Self {
        let is = |known: &str| name.eq_ignore_ascii_case(known.as_bytes());
        match name.len() {
            4 if is("date") => Self::Date,
            10 if is("connection") => Self::Connection,
            14 if is("content-length") => Self::ContentLength,
            17 if is("transfer-encoding") => Self::TransferEncoding,
            _ if names_hop_by_hop(name) => Self::HopByHop,
            _ => Self::Other,
        }
    }
}

/// What a response's `Connection` lines say.
#[derive(Default)]
struct Connection {
    close: bool,
    /// They name headers to drop besides the hop-by-hop ones.
    names_others: bool,
}

/// How the body is framed, and what that means for the lines and the connection.
struct Framed {
    framing: Framing,
    reusable: bool,
    /// `Content-Length` is not relayed: a transfer coding frames the body.
    drop_length: bool,
}

impl Read<'_> {
    fn name(&self, line: &Line) -> &[u8] {
        &self.bytes[line.0.clone()]
    }

    fn value(&self, line: &Line) -> &[u8] {
        &self.bytes[line.1.clone()]
    }

    /// The values of the lines of one kind, in order.
    fn values(&self, kind: Kind) -> impl DoubleEndedIterator<Item = &[u8]> {
        let lines = self.lines.iter().zip(self.kinds);
        lines
            .filter(move |(_, k)| **k == kind)
            .map(|(l, _)| self.value(l))
    }

    /// The `Connection` tokens, as bytes: a line with bytes that are not text still names the
    /// tokens it spells (hyper's client skips such a line; closing or dropping more is the safe
    /// side), and no UTF-8 check is made on every response (about 270 instructions
    /// per request with the `str` split it needed).
    fn connection_tokens(&self) -> impl Iterator<Item = &[u8]> {
        self.values(Kind::Connection).flat_map(byte_tokens)
    }

    fn connection(&self) -> Connection {
        let mut connection = Connection::default();
        for token in self.connection_tokens() {
            let close = token.eq_ignore_ascii_case(b"close");
            connection.close |= close;
            connection.names_others |= !close && !names_hop_by_hop(token);
        }
        connection
    }

    /// RFC 9112 section 6.3: no body for HEAD, 1xx, 204 and 304; chunked if that is the last
    /// coding; any other coding is read until the close; else the length; else until the
    /// close. With a coding, a length is dropped (and the connection closed after), as the RFC
    /// asks.
    fn framing(&self, status: StatusCode, head_request: bool) -> Result<Framed, Malformed> {
        let framed = |framing, reusable, drop_length| Framed {
            framing,
            reusable,
            drop_length,
        };
        if head_request || status_has_no_body(status) {
            return Ok(framed(Framing::Empty, true, false));
        }
        let coding = self.values(Kind::TransferEncoding).next_back();
        if let Some(chunked) = coding.map(last_coding_is_chunked) {
            let alone = self.values(Kind::ContentLength).next().is_none();
            return Ok(match chunked {
                true => framed(Framing::Chunked, alone, true),
                false => framed(Framing::Close, false, true),
            });
        }
        let mut length = None;
        for value in self.values(Kind::ContentLength) {
            let n = content_length(value).ok_or(Malformed::Length)?;
            if length.replace(n).is_some_and(|m| m != n) {
                return Err(Malformed::Length);
            }
        }
        Ok(match length {
            Some(n) => framed(Framing::Length(n), true, false),
            None => framed(Framing::Close, false, false),
        })
    }

    /// The lines the client gets: the hop-by-hop ones left out (`Transfer-Encoding` too: the
    /// lane frames the body itself), and those `Connection` names.
    fn relayed(&self, connection: &Connection, framed: &Framed) -> Lines {
        let mut out = Lines {
            bytes: Vec::with_capacity(self.bytes.len()),
            length: false,
            date: false,
        };
        // Lines already as the client gets them are copied in runs: one copy for most heads.
        let mut run = 0..0;
        for (l, &kind) in self.lines.iter().zip(self.kinds) {
            let name = self.name(l);
            if !self.kept(name, kind, connection, framed) {
                continue;
            }
            out.date |= kind == Kind::Date;
            out.length |= kind == Kind::ContentLength;
            match self.as_sent(l) {
                Some(span) if span.start == run.end => run.end = span.end,
                Some(span) => out
                    .bytes
                    .extend_from_slice(&self.bytes[replace(&mut run, span)]),
                None => {
                    out.bytes
                        .extend_from_slice(&self.bytes[replace(&mut run, 0..0)]);
                    line(&mut out.bytes, name, self.value(l));
                }
            }
        }
        out.bytes.extend_from_slice(&self.bytes[run]);
        out
    }

    fn kept(&self, name: &[u8], kind: Kind, connection: &Connection, framed: &Framed) -> bool {
        match kind {
            Kind::Connection | Kind::TransferEncoding | Kind::HopByHop => false,
            Kind::ContentLength if framed.drop_length => false,
            _ => !(connection.names_others && self.named_by_connection(name)),
        }
    }

    /// Where line `l` lies in the head, if it is there as the client gets it: `Name: value` and
    /// CRLF.
    fn as_sent(&self, (name, value): &Line) -> Option<Range> {
        let end = value.end + 2;
        let canonical = self.bytes.get(name.end..value.start) == Some(b": ")
            && self.bytes.get(value.end..end) == Some(b"\r\n");
        canonical.then_some(name.start..end)
    }

    fn named_by_connection(&self, name: &[u8]) -> bool {
        let mut tokens = self.connection_tokens();
        tokens.any(|t| t.eq_ignore_ascii_case(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderValue, Method};

    fn lines(head: &Head) -> &str {
        std::str::from_utf8(&head.lines.bytes).expect("text")
    }

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
            assert_eq!(lines(&head), "X-A: 1\r\n", "HEAD: {head_request}");
        }
    }

    #[test]
    fn connection_tokens_count_on_a_line_that_is_not_text() {
        let wire = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close, X-A, \xff\r\nX-A: 1\r\nX-B: 2\r\n\r\n";
        let head = read(wire, false).expect("valid").expect("whole");
        assert!(!head.reusable, "close is read");
        assert_eq!(
            lines(&head),
            "Content-Length: 0\r\nX-B: 2\r\n",
            "X-A is dropped"
        );
    }

    #[test]
    fn lines_are_relayed_as_sent_but_for_the_hop_by_hop_ones() {
        // (the backend's lines, the lines relayed, `Date` among them, framed by the length)
        let table = [
            (
                "Server: n\r\nDate: d\r\nContent-Length: 2\r\nConnection: keep-alive\r\n",
                "Server: n\r\nDate: d\r\nContent-Length: 2\r\n",
                true,
                true,
            ),
            (
                "X-Private: s\r\nconnection: X-PRIVATE\r\nKeep-Alive: timeout=5\r\nX-Kept: 1\r\n",
                "X-Kept: 1\r\n",
                false,
                false,
            ),
            (
                "date: d\r\nCONTENT-length: 2\r\nKEEP-ALIVE: 1\r\n",
                "date: d\r\nCONTENT-length: 2\r\n",
                true,
                true,
            ),
            (
                "x-a:1\r\nX-B:  two\r\nx-c: 3\nX-D: \r\nx-e: 5\r\n",
                "x-a: 1\r\nX-B: two\r\nx-c: 3\r\nX-D: \r\nx-e: 5\r\n",
                false,
                false,
            ),
            (
                "Connection: Content-Length\r\nContent-Length: 2\r\nX: 1\r\n",
                "X: 1\r\n",
                false,
                false,
            ),
            (
                "Transfer-Encoding: chunked\r\nContent-Length: 9\r\nTE: x\r\nTrailer: y\r\nUpgrade: z\r\nProxy-Connection: k\r\nX: 1\r\n",
                "X: 1\r\n",
                false,
                false,
            ),
        ];
        for (sent, relayed, date, length) in table {
            let wire = format!("HTTP/1.1 200 OK\r\n{sent}\r\n");
            let head = read(wire.as_bytes(), false).expect("valid").expect("whole");
            let got = (lines(&head), head.lines.date, head.lines.length);
            assert_eq!(got, (relayed, date, length), "{sent:?}");
        }
    }

    /// The lines are relayed without `http`'s checks: httparse refuses every name and value they
    /// refuse, and takes every one they take.
    #[test]
    fn httparse_takes_what_http_takes() {
        let whole = |wire: &[u8]| read(wire, false).is_ok_and(|head| head.is_some());
        // A colon ends the name: it is the start of the value then.
        for b in (0..=255u8).filter(|b| *b != b':') {
            let name = [b'x', b];
            let wire = [b"HTTP/1.1 200 OK\r\n", &name[..], b": v\r\n\r\n"].concat();
            let http = http::HeaderName::from_bytes(&name).is_ok();
            assert_eq!(whole(&wire), http, "name byte {b}");
            let value = [b'v', b, b'v'];
            let wire = [b"HTTP/1.1 200 OK\r\nx: ", &value[..], b"\r\n\r\n"].concat();
            let http = HeaderValue::from_bytes(&value).is_ok();
            assert_eq!(whole(&wire), http, "value byte {b}");
        }
    }

    #[test]
    fn a_chunked_body_loses_its_length_header_and_interim_heads_are_skipped() {
        let wire = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Made\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\nX-A: b\r\n\r\n3\r\n";
        let mut buf = BytesMut::from(&wire[..]);
        let head = read_response(&mut buf, false, 8192)
            .expect("valid")
            .expect("whole");
        assert_eq!(head.status, StatusCode::CREATED);
        assert_eq!(lines(&head), "X-A: b\r\n");
        let reason = head.reason.as_ref().expect("an unusual reason is kept");
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
        let forwarding = crate::headers::Forwarding::default();
        let req = crate::wire::Request {
            parts: &parts,
            forwarding: &forwarding,
            from: Some("a"),
        };
        write_request(&mut out, &req);
        let expected = "POST /visit?x=1 HTTP/1.1\r\nhost: app\r\nx-stickylb-failover: a\r\n\r\n";
        assert_eq!(String::from_utf8_lossy(&out), expected);
        parts.method = Method::GET;
        let req = crate::wire::Request {
            parts: &parts,
            forwarding: &forwarding,
            from: None,
        };
        write_request(&mut out, &req);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "GET /visit?x=1 HTTP/1.1\r\nhost: app\r\n\r\n"
        );
    }
}
