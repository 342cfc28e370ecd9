//! Writing a response for the lane as hyper's server would: the status line, the headers (with
//! `Date` when the backend sent none), then the body framed by its length, or chunked when the
//! length is not known. A head goes out with the body's first bytes in one write when they are
//! already there, and alone when they are not (a stream that starts later is not held back).

use std::cell::Cell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::Poll;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes};
use http::header::{CONNECTION, CONTENT_LENGTH, DATE, TRANSFER_ENCODING};
use http::{HeaderMap, Response, StatusCode};
use http_body::{Body, Frame};
use hyper::ext::ReasonPhrase;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::body::ProxyBody;
use crate::headers::tokens;
use crate::wire::head::Lines;

/// Body data up to this size is copied behind the head (or a chunk's size line) and sent with
/// it; larger data is sent as it is.
const WITH_HEAD: usize = 4 * 1024;

/// What the request says about writing its response.
#[derive(Debug, Clone, Copy)]
pub struct Asked {
    /// A `HEAD` request: the response has no body, whatever its headers say.
    pub head: bool,
    /// The client asked to close after this response.
    pub close: bool,
}

/// How the body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// Writes `resp` to the client; true if the connection may serve another request. An error or a
/// body that ends short of its length ends the connection (the client cannot tell otherwise).
pub async fn write<W: AsyncWrite + Unpin>(
    io: &mut W,
    resp: Box<Response<ProxyBody>>,
    asked: Asked,
    out: &mut Vec<u8>,
) -> io::Result<bool> {
    let (parts, mut body) = (*resp).into_parts();
    let relayed = body.wire_lines();
    let facts = Facts::of(&parts.headers, relayed, &body);
    let close = asked.close || facts.close;
    let framing = framing(parts.status, &facts, &body, asked.head);
    out.clear();
    let add_close = asked.close && !facts.close;
    let reason = parts.extensions.get::<ReasonPhrase>();
    let lines = relayed.map_or(&[][..], |l| &l.bytes[..]);
    let status = (parts.status, reason, lines, &parts.headers);
    head(out, status, framing, &facts, add_close);
    if framing == Framing::None {
        io.write_all(out).await?;
        return Ok(!close);
    }
    send_body(io, &mut body, framing, out)
        .await
        .map(|()| !close)
}

/// The body, after the head `out` holds: its first frame, if it is already there, goes with the
/// head.
async fn send_body<W: AsyncWrite + Unpin>(
    io: &mut W,
    body: &mut ProxyBody,
    framing: Framing,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    let mut sent = 0;
    if let Poll::Ready(frame) = poll_fn(|cx| Poll::Ready(Pin::new(&mut *body).poll_frame(cx))).await
    {
        let Some(frame) = frame.transpose().map_err(io::Error::other)? else {
            return finish(io, out, framing, sent).await;
        };
        sent = put(io, out, framing, (sent, frame)).await?;
    }
    if !out.is_empty() && !body.is_end_stream() {
        io.write_all(out).await?;
        out.clear();
    }
    while !body.is_end_stream() {
        let polled = poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await;
        let Some(frame) = polled.transpose().map_err(io::Error::other)? else {
            break;
        };
        sent = put(io, out, framing, (sent, frame)).await?;
        if !out.is_empty() {
            io.write_all(out).await?;
            out.clear();
        }
    }
    finish(io, out, framing, sent).await
}

/// Puts a frame's data behind what `out` holds, framed; `sent` before and after. Small data is
/// copied into `out`, to go with what is there (the head); large data, or data with nothing to
/// go with, is sent at once, in one vectored write with what `out` holds, never copied. Trailers
/// are dropped, as hyper does for a client that did not ask for them.
async fn put<W: AsyncWrite + Unpin>(
    io: &mut W,
    out: &mut Vec<u8>,
    framing: Framing,
    (sent, frame): (u64, Frame<Bytes>),
) -> io::Result<u64> {
    let Ok(data) = frame.into_data() else {
        return Ok(sent);
    };
    let total = sent + data.len() as u64;
    if matches!(framing, Framing::Length(n) if total > n) {
        return Err(io::Error::other("response body longer than its length"));
    }
    if data.is_empty() {
        return Ok(total);
    }
    let (chunked, alone) = (framing == Framing::Chunked, out.is_empty());
    if chunked {
        chunk_size(out, data.len());
    }
    let tail: &[u8] = if chunked { b"\r\n" } else { b"" };
    if alone || data.len() > WITH_HEAD {
        io.write_all_buf(&mut (&out[..]).chain(data).chain(tail))
            .await?;
        out.clear();
    } else {
        out.extend_from_slice(&data);
        out.extend_from_slice(tail);
    }
    Ok(total)
}

/// Ends the body: the last chunk, or a check that the promised length was sent.
async fn finish<W: AsyncWrite + Unpin>(
    io: &mut W,
    out: &mut Vec<u8>,
    framing: Framing,
    sent: u64,
) -> io::Result<()> {
    match framing {
        Framing::Chunked => out.extend_from_slice(b"0\r\n\r\n"),
        Framing::Length(n) if n != sent => {
            return Err(io::Error::other("response body ended short of its length"))
        }
        _ => {}
    }
    if !out.is_empty() {
        io.write_all(out).await?;
        out.clear();
    }
    Ok(())
}

/// A chunk's size line: the size in hex.
fn chunk_size(out: &mut Vec<u8>, n: usize) {
    let digits = (usize::BITS - n.leading_zeros()).div_ceil(4).max(1);
    for i in (0..digits).rev() {
        out.push(b"0123456789abcdef"[(n >> (4 * i)) & 0xf]);
    }
    out.extend_from_slice(b"\r\n");
}

/// What the lane needs to know of a response's headers, gathered in one pass: each map lookup
/// would hash a name again.
#[derive(Default)]
struct Facts {
    /// There is a `Content-Length`, and the length it gives if it reads as one.
    length: Option<Option<u64>>,
    date: bool,
    /// `Connection: close` (stickylb's own error responses; a backend's was removed).
    close: bool,
}

impl Facts {
    /// From the map, and from the lines a wire response carries beside it (whose body knows the
    /// length they give).
    fn of(headers: &HeaderMap, relayed: Option<&Lines>, body: &ProxyBody) -> Self {
        let mut facts = Self::default();
        if let Some(lines) = relayed {
            facts.length = lines.length.then(|| body.size_hint().exact());
            facts.date = lines.date;
        }
        for (name, value) in headers {
            if name == CONTENT_LENGTH {
                let length = crate::framing::content_length(value.as_bytes());
                facts.length.get_or_insert(length);
            } else if name == DATE {
                facts.date = true;
            } else if name == CONNECTION {
                let line = value.to_str().unwrap_or_default();
                facts.close |= tokens(line).any(|t| t.eq_ignore_ascii_case("close"));
            }
        }
        facts
    }
}

/// RFC 9112 section 6.3 from the server's side: no body for HEAD, 1xx, 204 and 304; else the
/// length the headers give, or the body knows, or chunked.
fn framing(status: StatusCode, facts: &Facts, body: &ProxyBody, head: bool) -> Framing {
    if head || crate::framing::status_has_no_body(status) {
        return Framing::None;
    }
    match facts.length {
        Some(Some(n)) => Framing::Length(n),
        Some(None) => Framing::Chunked,
        None => body
            .size_hint()
            .exact()
            .map_or(Framing::Chunked, Framing::Length),
    }
}

/// The status, the backend's reason if unusual, the relayed lines of a wire response, the map.
type Status<'a> = (
    StatusCode,
    Option<&'a ReasonPhrase>,
    &'a [u8],
    &'a HeaderMap,
);

/// The status line and headers, with what the framing and the lane add.
fn head(
    out: &mut Vec<u8>,
    (status, reason, lines, headers): Status<'_>,
    framing: Framing,
    facts: &Facts,
    add_close: bool,
) {
    status_line(out, status, reason);
    out.extend_from_slice(lines);
    for (name, value) in headers {
        if name == TRANSFER_ENCODING || (name == CONTENT_LENGTH && framing == Framing::Chunked) {
            continue;
        }
        line(out, name.as_str().as_bytes(), value.as_bytes());
    }
    match framing {
        Framing::Length(n) if facts.length.is_none() => {
            line(
                out,
                b"content-length",
                itoa::Buffer::new().format(n).as_bytes(),
            );
        }
        Framing::Chunked => line(out, b"transfer-encoding", b"chunked"),
        _ => {}
    }
    if add_close {
        line(out, b"connection", b"close");
    }
    if !facts.date {
        DATE_NOW.with(|d| line(out, b"date", &now(d)));
    }
    out.extend_from_slice(b"\r\n");
}

/// As hyper's server writes it: the backend's own reason if it was not the usual one.
fn status_line(out: &mut Vec<u8>, status: StatusCode, reason: Option<&ReasonPhrase>) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    match reason {
        Some(reason) => out.extend_from_slice(reason.as_bytes()),
        None => out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes()),
    }
    out.extend_from_slice(b"\r\n");
}

/// One header line, as the lane and the wire write them.
pub(crate) fn line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

thread_local! {
    /// The `Date` value, formatted once a second.
    static DATE_NOW: Cell<(u64, [u8; 29])> = const { Cell::new((0, [0; 29])) };
}

fn now(cell: &Cell<(u64, [u8; 29])>) -> [u8; 29] {
    let wall = SystemTime::now();
    let secs = wall.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (at, text) = cell.get();
    if at == secs {
        return text;
    }
    let mut fresh = [0; 29];
    fresh.copy_from_slice(httpdate::fmt_http_date(wall).as_bytes());
    cell.set((secs, fresh));
    fresh
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    const PLAIN: Asked = Asked {
        head: false,
        close: false,
    };

    async fn written(resp: Response<ProxyBody>, asked: Asked) -> (String, bool) {
        let (mut wire, mut out) = (Vec::new(), Vec::new());
        let keep = write(&mut wire, Box::new(resp), asked, &mut out)
            .await
            .expect("written");
        (String::from_utf8(wire).expect("text"), keep)
    }

    fn local(status: u16, text: &'static str) -> Response<ProxyBody> {
        let mut resp = Response::new(ProxyBody::local(text));
        *resp.status_mut() = StatusCode::from_u16(status).expect("a status");
        resp
    }

    fn without_date(wire: &str) -> String {
        let date = wire
            .lines()
            .find(|l| l.starts_with("date: "))
            .expect("a date");
        assert_eq!(date.len(), "date: Sun, 06 Nov 1994 08:49:37 GMT".len());
        wire.replace(&format!("{date}\r\n"), "")
    }

    #[tokio::test]
    async fn a_known_length_is_declared_and_the_body_follows_the_head() {
        let (wire, keep) = written(local(200, "hi"), PLAIN).await;
        assert_eq!(
            without_date(&wire),
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi"
        );
        assert!(keep);
    }

    #[tokio::test]
    async fn head_204_and_304_answers_have_no_body() {
        let mut resp = local(200, "");
        resp.headers_mut()
            .insert(CONTENT_LENGTH, HeaderValue::from_static("5"));
        let head = Asked {
            head: true,
            ..PLAIN
        };
        let (wire, _) = written(resp, head).await;
        assert_eq!(
            without_date(&wire),
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"
        );
        for status in [204, 304] {
            let (wire, keep) = written(local(status, ""), PLAIN).await;
            assert!(
                wire.ends_with("\r\n\r\n") && !wire.contains("content-length"),
                "{wire}"
            );
            assert!(keep);
        }
    }

    #[tokio::test]
    async fn a_close_asked_by_either_side_is_said_once_and_ends_the_connection() {
        let asked = Asked {
            close: true,
            ..PLAIN
        };
        let (wire, keep) = written(local(200, "x"), asked).await;
        assert!(
            wire.contains("\r\nconnection: close\r\n") && !keep,
            "{wire}"
        );
        let mut refused = local(400, "no");
        refused
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
        let (wire, keep) = written(refused, asked).await;
        assert_eq!(wire.matches("connection: close").count(), 1, "{wire}");
        assert!(!keep);
    }

    #[tokio::test]
    async fn a_backend_date_is_kept_and_no_other_is_added() {
        let mut resp = local(200, "");
        let date = "Sun, 06 Nov 1994 08:49:37 GMT";
        resp.headers_mut()
            .insert(DATE, HeaderValue::from_static(date));
        let (wire, _) = written(resp, PLAIN).await;
        assert_eq!(
            wire,
            format!("HTTP/1.1 200 OK\r\ndate: {date}\r\ncontent-length: 0\r\n\r\n")
        );
    }

    #[tokio::test]
    async fn chunks_are_sized_in_hex_trailers_dropped_and_large_data_sent_uncopied() {
        let (mut wire, mut out) = (Vec::new(), b"head;".to_vec());
        let small = (0, Frame::data(Bytes::from(vec![b'z'; 26])));
        let sent = put(&mut wire, &mut out, Framing::Chunked, small).await;
        assert_eq!(sent.expect("kept"), 26);
        assert!(wire.is_empty(), "kept to go with the head");
        let trailers = (26, Frame::trailers(HeaderMap::new()));
        let sent = put(&mut wire, &mut out, Framing::Chunked, trailers).await;
        assert_eq!(sent.expect("dropped"), 26);
        let kept = [&b"head;1a\r\n"[..], &[b'z'; 26], b"\r\n"].concat();
        assert_eq!(out, kept);
        let big = vec![b'y'; WITH_HEAD + 1];
        let frame = (26, Frame::data(Bytes::from(big.clone())));
        let sent = put(&mut wire, &mut out, Framing::Chunked, frame).await;
        assert_eq!(sent.expect("sent"), 26 + big.len() as u64);
        let size = format!("{:x}\r\n", big.len());
        let chunk = [&kept[..], size.as_bytes(), &big, b"\r\n"].concat();
        assert_eq!(wire, chunk, "what was kept went first, in the same write");
        assert!(out.is_empty());
        let alone = (0, Frame::data(Bytes::from_static(b"abc")));
        put(&mut wire, &mut out, Framing::Chunked, alone)
            .await
            .expect("sent");
        assert!(
            wire.ends_with(b"3\r\nabc\r\n"),
            "nothing to go with: sent at once"
        );
        assert!(out.is_empty());
        let over = (2, Frame::data(Bytes::from_static(b"ab")));
        let sent = put(&mut wire, &mut out, Framing::Length(3), over).await;
        assert!(
            sent.is_err(),
            "more than the length is refused before it is written"
        );
        for (n, line) in [
            (0, "0\r\n"),
            (15, "f\r\n"),
            (16, "10\r\n"),
            (65_536, "10000\r\n"),
        ] {
            out.clear();
            chunk_size(&mut out, n);
            assert_eq!(out, line.as_bytes());
        }
    }
}
