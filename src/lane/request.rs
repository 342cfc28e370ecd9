//! Reading a request head for the lane: httparse finds the head, and only the common request is
//! taken (HTTP/1.1, origin form, no body, no upgrade or `Expect`); anything else is left in the
//! buffer, untouched, for hyper.

use std::mem::MaybeUninit;
use std::ops::Range;

use bytes::{Bytes, BytesMut};
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri, Version};

/// hyper's own limit on request header lines: past it hyper answers 431, so the lane defers.
pub const MAX_HEADERS: usize = 100;

/// What the buffer holds.
// Not boxed: a head is moved once, and a box would be an allocation per request.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Read {
    /// Not a whole head yet.
    Partial,
    /// A request the lane serves, its head taken out of the buffer.
    Lane(Head),
    /// Anything else (another version, a body, an upgrade, a head httparse refuses): hyper serves
    /// it from the bytes as they are, so its answers stay what they are.
    Hyper,
}

#[derive(Debug)]
pub struct Head {
    /// Boxed: moved from here into the exchange's futures, see `proxy::Outgoing`.
    pub parts: Box<Parts>,
    /// The client asked to close after this request (`Connection: close`).
    pub close: bool,
}

/// Where one header's name and value lie in the head.
pub(crate) type Line = (Range<usize>, Range<usize>);

/// The lane's verdict on a parsed head, before anything is built from it.
struct Shape {
    len: usize,
    method: Range<usize>,
    target: Range<usize>,
    lines: usize,
    close: bool,
}

/// Takes the next request's head out of `buf` if the lane serves it.
pub fn read(buf: &mut BytesMut) -> Read {
    // Looked at before every read, when the last request left nothing behind: the parse below
    // sets up room for 100 header lines first.
    if buf.is_empty() {
        return Read::Partial;
    }
    let mut lines = [const { (0..0, 0..0) }; MAX_HEADERS];
    let shape = match shape(buf, &mut lines) {
        Ok(Some(shape)) => shape,
        Ok(None) => return Read::Partial,
        Err(()) => return Read::Hyper,
    };
    // The head's bytes are taken, not copied: the request's values share them.
    let head = buf.split_to(shape.len).freeze();
    let Some(parts) = build(&head, &shape, &lines[..shape.lines]) else {
        let mut whole = BytesMut::from(&head[..]);
        whole.extend_from_slice(buf);
        *buf = whole;
        return Read::Hyper;
    };
    Read::Lane(Head {
        parts,
        close: shape.close,
    })
}

/// Parses the head in place; Err when the lane leaves the request to hyper.
fn shape(buf: &[u8], lines: &mut [Line; MAX_HEADERS]) -> Result<Option<Shape>, ()> {
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(()),
    };
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Err(());
    };
    if method == "CONNECT" || !target.starts_with('/') {
        return Err(());
    }
    let mut close = false;
    for (line, h) in lines.iter_mut().zip(req.headers.iter()) {
        close |= lane_header(h)?;
        *line = self::line(buf, h);
    }
    Ok(Some(Shape {
        len,
        method: range(buf, method.as_bytes()),
        target: range(buf, target.as_bytes()),
        lines: req.headers.len(),
        close,
    }))
}

/// Err for a header that takes the request out of the lane; Ok(true) for `Connection: close`.
fn lane_header(h: &httparse::Header<'_>) -> Result<bool, ()> {
    let name = h.name.as_bytes();
    let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
    if is("content-length") || is("transfer-encoding") || is("expect") || is("upgrade") {
        return Err(());
    }
    if !is("connection") {
        return Ok(false);
    }
    // A line that is not text is validate's to refuse, on hyper's path.
    let line = std::str::from_utf8(h.value).map_err(|_| ())?;
    let mut close = false;
    for token in crate::headers::tokens(line) {
        if token.eq_ignore_ascii_case("upgrade") {
            return Err(());
        }
        close |= token.eq_ignore_ascii_case("close");
    }
    Ok(close)
}

/// Where header `h` lies in `whole`, which it was parsed from (the wire's response heads too).
pub(crate) fn line(whole: &[u8], h: &httparse::Header<'_>) -> Line {
    (range(whole, h.name.as_bytes()), range(whole, h.value))
}

/// `part`'s place in `whole`, which it was parsed from.
pub(crate) fn range(whole: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - whole.as_ptr() as usize;
    start..start + part.len()
}

/// The request's parts, their values sharing the head's bytes (as hyper's do); None for what
/// `http` refuses, which hyper then answers.
fn build(head: &Bytes, shape: &Shape, lines: &[Line]) -> Option<Box<Parts>> {
    let mut parts = Box::new(http::Request::new(()).into_parts().0);
    parts.method = Method::from_bytes(&head[shape.method.clone()]).ok()?;
    parts.uri = Uri::from_maybe_shared(head.slice(shape.target.clone())).ok()?;
    parts.version = Version::HTTP_11;
    let mut headers = HeaderMap::with_capacity(lines.len());
    for (name, value) in lines {
        let name = HeaderName::from_bytes(&head[name.clone()]).ok()?;
        let value = HeaderValue::from_maybe_shared(head.slice(value.clone())).ok()?;
        headers.append(name, value);
    }
    parts.headers = headers;
    Some(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lane(bytes: &[u8]) -> (Head, BytesMut) {
        let mut buf = BytesMut::from(bytes);
        match read(&mut buf) {
            Read::Lane(head) => (head, buf),
            other => panic!("{:?} not taken: {other:?}", String::from_utf8_lossy(bytes)),
        }
    }

    #[test]
    fn the_common_request_is_taken_with_its_headers_in_order() {
        let wire = b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-Two: 1\r\nx-two: 2\r\nCookie: c=d\r\n\r\nGET /next";
        let (head, rest) = lane(wire);
        let p = &head.parts;
        assert_eq!(
            (p.method.as_str(), p.uri.to_string()),
            ("GET", "/a?b=1".into())
        );
        assert_eq!(p.version, Version::HTTP_11);
        let two: Vec<_> = p.headers.get_all("x-two").iter().collect();
        assert_eq!(two, ["1", "2"]);
        assert_eq!(
            (p.headers["host"].as_bytes(), p.headers.len()),
            (&b"x"[..], 4)
        );
        assert!(!head.close);
        assert_eq!(
            &rest[..],
            b"GET /next",
            "the next request stays in the buffer"
        );
    }

    #[test]
    fn connection_close_is_noticed_among_other_tokens() {
        let (head, _) =
            lane(b"HEAD / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Close\r\n\r\n");
        assert!(head.close);
        assert_eq!(head.parts.method, Method::HEAD);
    }

    #[test]
    fn every_prefix_of_a_head_waits_untouched_and_the_whole_is_taken() {
        let wire = b"GET /p HTTP/1.1\r\nHost: x\r\nCookie: stickylb=v; a=b\r\n\r\n";
        for end in 0..wire.len() {
            let mut buf = BytesMut::from(&wire[..end]);
            assert!(matches!(read(&mut buf), Read::Partial), "{end} bytes");
            assert_eq!(&buf[..], &wire[..end]);
        }
        let (head, rest) = lane(wire);
        assert!(rest.is_empty());
        assert_eq!(head.parts.headers["cookie"], "stickylb=v; a=b");
    }

    /// Heads with bytes changed at random: never a panic; a head is taken whole or the bytes
    /// are left as they came.
    #[test]
    fn damaged_heads_are_taken_whole_or_left_alone() {
        use rand::{Rng, SeedableRng};
        let wire = b"GET /a/b?c=d HTTP/1.1\r\nHost: app.test\r\nAccept: */*\r\nX-Y: z\r\n\r\n";
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..20_000 {
            let mut bytes = wire.to_vec();
            for _ in 0..rng.gen_range(1..4) {
                let at = rng.gen_range(0..bytes.len());
                bytes[at] = rng.gen();
            }
            let mut buf = BytesMut::from(&bytes[..]);
            match read(&mut buf) {
                Read::Lane(taken_head) => {
                    let taken = bytes.len() - buf.len();
                    let head = &bytes[..taken];
                    // An empty line ends it; httparse, as hyper, takes a bare LF for CRLF.
                    let ended = head.ends_with(b"\n\n") || head.ends_with(b"\n\r\n");
                    assert!(ended, "{:?}", String::from_utf8_lossy(head));
                    assert_eq!(&buf[..], &bytes[taken..]);
                    assert_eq!(taken_head.parts.version, Version::HTTP_11);
                }
                Read::Partial | Read::Hyper => assert_eq!(&buf[..], &bytes[..]),
            }
        }
    }

    #[test]
    fn a_partial_head_waits_and_everything_else_is_left_to_hyper_untouched() {
        let mut partial = BytesMut::from(&b"GET / HTTP/1.1\r\nHost: x\r\n"[..]);
        assert!(matches!(read(&mut partial), Read::Partial));
        assert_eq!(partial.len(), 25);
        let many: String = (0..=MAX_HEADERS).map(|i| format!("h{i}: v\r\n")).collect();
        let too_many = format!("GET / HTTP/1.1\r\n{many}\r\n");
        let for_hyper: [&[u8]; 14] = [
            b"GET / HTTP/1.0\r\nHost: x\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"PUT / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, upgrade\r\n\r\n",
            b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n",
            b"GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
            b"GET /\x7f HTTP/1.1\r\nHost: x\r\n\r\n",
            too_many.as_bytes(),
        ];
        for wire in for_hyper {
            let mut buf = BytesMut::from(wire);
            let got = read(&mut buf);
            let shown = String::from_utf8_lossy(wire);
            assert!(matches!(got, Read::Hyper), "{shown:?}: {got:?}");
            assert_eq!(&buf[..], wire, "{shown:?}: the bytes are left as they came");
        }
    }
}
