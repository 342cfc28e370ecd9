//! What the httparse examples share: reading one whole HTTP/1 message into a buffer, framed by
//! its head's Content-Length (chunked messages are outside what they measure).

use std::io::{Error, ErrorKind};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

pub const MAX_HEADERS: usize = 64;

/// The one header the floors add: the bench checks for a `stickylb` cookie.
#[allow(dead_code, reason = "raw_work writes its own Set-Cookie")]
const COOKIE: &[u8] = b"Set-Cookie: stickylb=floor; Path=/\r\n";

/// `out` becomes the response `message` (its head `head` bytes long, ending in CRLF CRLF, as
/// nginx writes it) with the cookie line put before the blank line.
#[allow(dead_code, reason = "raw_work writes its own Set-Cookie")]
pub fn with_cookie(out: &mut Vec<u8>, message: &[u8], head: usize) {
    out.clear();
    out.extend_from_slice(&message[..head - 2]);
    out.extend_from_slice(COOKIE);
    out.extend_from_slice(&message[head - 2..]);
}

/// A head's length and its body's, once the head is whole.
pub type Frame = Option<(usize, usize)>;

pub fn invalid(what: &'static str) -> Error {
    Error::new(ErrorKind::InvalidData, what)
}

/// Reads until `buf` holds one whole message: Some((head length, message length)), or None
/// when the peer closed between messages.
pub async fn read_message(
    io: &mut TcpStream,
    buf: &mut Vec<u8>,
    frame: fn(&[u8]) -> std::io::Result<Frame>,
) -> std::io::Result<Option<(usize, usize)>> {
    loop {
        if let Some((head, body)) = frame(buf)? {
            if buf.len() >= head + body {
                return Ok(Some((head, head + body)));
            }
        }
        if io.read_buf(buf).await? == 0 {
            return match buf.is_empty() {
                true => Ok(None),
                false => Err(Error::new(ErrorKind::UnexpectedEof, "closed mid-message")),
            };
        }
    }
}

pub fn request_frame(buf: &[u8]) -> std::io::Result<Frame> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf).map_err(|_| invalid("request head"))? {
        httparse::Status::Complete(n) => Ok(Some((n, body_length(req.headers)?))),
        httparse::Status::Partial => Ok(None),
    }
}

pub fn response_frame(buf: &[u8]) -> std::io::Result<Frame> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf).map_err(|_| invalid("response head"))? {
        httparse::Status::Complete(n) => Ok(Some((n, body_length(resp.headers)?))),
        httparse::Status::Partial => Ok(None),
    }
}

/// The body's length by Content-Length (none: 0); differing lengths or any Transfer-Encoding
/// end the connection.
fn body_length(headers: &[httparse::Header]) -> std::io::Result<usize> {
    let mut length = None;
    for h in headers {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "chunked: not measured here",
            ));
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            let n =
                stickylb::framing::content_length(h.value).and_then(|n| usize::try_from(n).ok());
            if n.is_none() || (length.is_some() && length != n) {
                return Err(invalid("Content-Length"));
            }
            length = n;
        }
    }
    Ok(length.unwrap_or(0))
}
