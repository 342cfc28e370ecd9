//! hyper settles a request head that carries both `Content-Length` and `Transfer-Encoding` before
//! the service runs (chunked wins, the length is dropped), so the proxy never sees the ambiguity it
//! must refuse. [`Watch`] follows the HTTP/1 framing of the raw bytes as hyper reads them and
//! numbers the requests whose head carried both; [`Conflicts::mark`] tags those requests for
//! `validate`. Anything it cannot follow (HTTP/2, a tunnel, a head hyper refuses) ends the watch.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};

use http::header;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// hyper's own default limit on request header lines.
const MAX_HEADERS: usize = 100;
/// Ambiguous heads remembered at once; more means hostile read-ahead, and the watch ends.
const MAX_CONFLICTS: usize = 8;

/// Request extension: the head carried both `Content-Length` and `Transfer-Encoding`.
#[derive(Debug, Clone, Copy)]
pub struct FramingConflict;

/// Shared by the watched stream (which finds ambiguous heads) and the service (which numbers the
/// requests hyper hands it, in the same order).
#[derive(Debug, Default)]
pub struct Conflicts {
    served: AtomicU64,
    ambiguous: Mutex<Vec<u64>>,
    /// Heads the watch has seen complete.
    seen: AtomicU64,
    /// The watch stands between two requests with no byte of the next one read.
    between: AtomicBool,
    /// The watch could not follow the stream (HTTP/2, a tunnel, a refused head) and has stopped.
    lost: AtomicBool,
}

impl Conflicts {
    /// Counts a request and tags it if its head was ambiguous. Only a request that still shows
    /// `Transfer-Encoding` can be one, so the common case takes no lock.
    pub fn mark<B>(&self, req: &mut http::Request<B>) {
        let n = self.served.fetch_add(1, Ordering::Relaxed);
        if req.headers().contains_key(header::TRANSFER_ENCODING) && self.take(n) {
            req.extensions_mut().insert(FramingConflict);
        }
    }

    /// Requests handed to the service so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// True when every byte read so far belongs to requests already handed to the service, whose
    /// bodies have been read whole: whoever reads this stream holds nothing unprocessed.
    pub fn at_rest(&self) -> bool {
        self.between.load(Ordering::Relaxed)
            && self.seen.load(Ordering::Relaxed) == self.served.load(Ordering::Relaxed)
    }

    /// True once the watch has stopped following the stream, for good.
    pub fn lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }

    fn take(&self, n: u64) -> bool {
        let mut list = self
            .ambiguous
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let found = list.iter().position(|&m| m == n);
        found.map(|i| list.swap_remove(i)).is_some()
    }

    /// Remembers request `n` as ambiguous; false when too many are pending.
    fn add(&self, n: u64) -> bool {
        let mut list = self
            .ambiguous
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        list.push(n);
        list.len() <= MAX_CONFLICTS
    }
}

/// Wraps a client stream; see the module docs.
pub struct Watch<I> {
    io: I,
    scanner: Scanner,
}

pub fn watch<I>(io: I, max_head: usize) -> (Watch<I>, Arc<Conflicts>) {
    let conflicts = Arc::new(Conflicts::default());
    let scanner = Scanner::new(max_head, Arc::clone(&conflicts));
    (Watch { io, scanner }, conflicts)
}

impl<I> Watch<I> {
    /// Follows bytes read from the stream before it was watched.
    pub fn saw(&mut self, bytes: &[u8]) {
        self.scanner.feed(bytes);
    }

    pub fn into_inner(self) -> I {
        self.io
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Watch<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        this.scanner.feed(&buf.filled()[before..]);
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watch<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The numbers of the requests a watch flags when this stream arrives in these reads. Public for
/// the fuzz target, which checks that where the reads split never changes the answer.
#[doc(hidden)]
pub fn flagged(reads: &[&[u8]], max_head: usize) -> Vec<u64> {
    let conflicts = Arc::new(Conflicts::default());
    let mut scanner = Scanner::new(max_head, Arc::clone(&conflicts));
    for read in reads {
        scanner.feed(read);
    }
    let mut list = conflicts
        .ambiguous
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    list.sort_unstable();
    list
}

/// Where the byte stream is, in HTTP/1 request framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Head,
    /// Bytes of a body (or of a chunk with its CRLF) still to pass.
    Skip(u64, Then),
    ChunkSize,
    Trailers,
    /// Nothing more can be followed: HTTP/2, a tunnel, or a head hyper will refuse.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    Head,
    ChunkSize,
}

/// A complete element (head, chunk-size line, trailer section): its length and what follows.
struct Element {
    len: usize,
    next: State,
    ambiguous: bool,
}

struct Scanner {
    state: State,
    /// An element split across reads; empty (and unallocated) in the common case.
    pending: Vec<u8>,
    heads: u64,
    max_head: usize,
    conflicts: Arc<Conflicts>,
}

impl Scanner {
    fn new(max_head: usize, conflicts: Arc<Conflicts>) -> Self {
        Self {
            state: State::Head,
            pending: Vec::new(),
            heads: 0,
            max_head,
            conflicts,
        }
    }

    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let used = match self.state {
                State::Done => break,
                State::Skip(n, then) => self.skip(n, then, bytes.len()),
                State::Head | State::ChunkSize | State::Trailers => self.element(bytes),
            };
            bytes = &bytes[used..];
        }
        let between = self.state == State::Head && self.pending.is_empty();
        self.conflicts.between.store(between, Ordering::Relaxed);
        if self.state == State::Done {
            self.conflicts.lost.store(true, Ordering::Relaxed);
        }
    }

    fn skip(&mut self, n: u64, then: Then, available: usize) -> usize {
        let used = n.min(available as u64);
        self.state = match (n - used, then) {
            (0, Then::Head) => State::Head,
            (0, Then::ChunkSize) => State::ChunkSize,
            (left, then) => State::Skip(left, then),
        };
        // `used` is at most `available`, a usize.
        usize::try_from(used).unwrap_or(available)
    }

    /// Parses the element that starts in `pending` and goes on in `bytes`; returns how much of
    /// `bytes` it used.
    fn element(&mut self, bytes: &[u8]) -> usize {
        let old = self.pending.len();
        let was_head = self.state == State::Head;
        let parsed = if old == 0 {
            parse(self.state, bytes)
        } else {
            self.pending.extend_from_slice(bytes);
            parse(self.state, &self.pending)
        };
        match parsed {
            Ok(Some(e)) => {
                self.pending = Vec::new();
                let len = e.len;
                self.finish(e, was_head);
                len - old
            }
            Ok(None) => {
                if old == 0 {
                    self.pending.extend_from_slice(bytes);
                }
                if self.pending.len() > self.max_head {
                    self.state = State::Done;
                }
                bytes.len()
            }
            Err(()) => {
                self.state = State::Done;
                bytes.len()
            }
        }
    }

    fn finish(&mut self, e: Element, was_head: bool) {
        self.state = e.next;
        if !was_head {
            return;
        }
        if e.ambiguous && !self.conflicts.add(self.heads) {
            self.state = State::Done;
        }
        self.heads += 1;
        self.conflicts.seen.store(self.heads, Ordering::Relaxed);
    }
}

fn parse(state: State, buf: &[u8]) -> Result<Option<Element>, ()> {
    match state {
        State::Head => parse_head(buf),
        State::ChunkSize => parse_chunk_size(buf),
        State::Trailers => Ok(parse_trailers(buf)),
        State::Skip(..) | State::Done => Err(()),
    }
}

fn parse_head(buf: &[u8]) -> Result<Option<Element>, ()> {
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req
        .parse_with_uninit_headers(buf, &mut headers)
        .map_err(drop)?
    {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial => return Ok(None),
    };
    let (mut length, mut chunked, mut te) = (None, false, false);
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            length = Some(content_length(h.value).ok_or(())?);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            te = true;
            chunked = last_coding_is_chunked(h.value);
        }
    }
    let next = match (te, length) {
        (true, _) if chunked => State::ChunkSize,
        // hyper refuses any other coding.
        (true, _) => State::Done,
        (false, Some(0) | None) => State::Head,
        (false, Some(n)) => State::Skip(n, Then::Head),
    };
    let ambiguous = te && length.is_some();
    Ok(Some(Element {
        len,
        next,
        ambiguous,
    }))
}

/// A `Content-Length` value: ASCII digits only (no sign, no list), surrounding whitespace
/// ignored; None past `u64`. Public so code reading raw heads (the bench's
/// `examples/common/raw.rs`) frames the same way. Read as bytes: a `str` parse after the UTF-8
/// check and a Unicode trim cost about 200 instructions per response.
pub fn content_length(value: &[u8]) -> Option<u64> {
    let digits = value.trim_ascii();
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, b| {
        let digit = char::from(*b).to_digit(10)?;
        n.checked_mul(10)?.checked_add(digit.into())
    })
}

/// Whether a response with this status has no body whatever its headers say (RFC 9112 section
/// 6.3): 1xx, 204 and 304.
pub(crate) fn status_has_no_body(status: http::StatusCode) -> bool {
    status.is_informational()
        || status == http::StatusCode::NO_CONTENT
        || status == http::StatusCode::NOT_MODIFIED
}

/// Whether `chunked` is the last coding a `Transfer-Encoding` line names.
pub(crate) fn last_coding_is_chunked(value: &[u8]) -> bool {
    let text = String::from_utf8_lossy(value);
    text.rsplit(',')
        .next()
        .is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"))
}

fn parse_chunk_size(buf: &[u8]) -> Result<Option<Element>, ()> {
    let (len, size) = match httparse::parse_chunk_size(buf).map_err(drop)? {
        httparse::Status::Complete(done) => done,
        httparse::Status::Partial => return Ok(None),
    };
    let next = match size {
        0 => State::Trailers,
        // The chunk's data, then its CRLF.
        n => State::Skip(n.checked_add(2).ok_or(())?, Then::ChunkSize),
    };
    Ok(Some(Element {
        len,
        next,
        ambiguous: false,
    }))
}

/// The trailer section after the last chunk ends with an empty line.
fn parse_trailers(buf: &[u8]) -> Option<Element> {
    Some(Element {
        len: trailer_section_len(buf)?,
        next: State::Head,
        ambiguous: false,
    })
}

/// The length of the trailer section at the start of `buf` (after the last chunk), through the
/// empty line that ends it; None while that line is not there.
pub(crate) fn trailer_section_len(buf: &[u8]) -> Option<usize> {
    if buf.starts_with(b"\r\n") {
        return Some(2);
    }
    Some(buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_content_length_is_ascii_digits_and_fits_in_u64() {
        let max = u64::MAX.to_string();
        let rows: [(&[u8], Option<u64>); 14] = [
            (b"0", Some(0)),
            (b"12", Some(12)),
            (b" \t7 ", Some(7)),
            (b"007", Some(7)),
            (max.as_bytes(), Some(u64::MAX)),
            (b"18446744073709551616", None),
            (b"", None),
            (b"  ", None),
            (b"+1", None),
            (b"-1", None),
            (b"1,1", None),
            (b"1 1", None),
            ("5\u{a0}".as_bytes(), None),
            ("\u{ff11}".as_bytes(), None),
        ];
        for (value, expected) in rows {
            let shown = String::from_utf8_lossy(value);
            assert_eq!(content_length(value), expected, "{shown:?}");
        }
    }

    /// A chunked POST and a sized POST whose bodies look like ambiguous heads, then a really
    /// ambiguous head, then a GET: only the third request is numbered.
    const STREAM: &[u8] = b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
        42;ext=1\r\nGET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding:\r\n\
        chunked\r\n\r\n\r\n0\r\nX-Trailer: 1\r\n\r\n\
        POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n\
        GET / HTTP/1.1\r\nContent-Length: 1\r\nTE: chunked\r\n\
        \r\nPOST /c HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n\
        5\r\nhello\r\n0\r\n\r\n\
        GET /d HTTP/1.1\r\nHost: x\r\n\r\n";

    fn scan(pieces: &[&[u8]]) -> (Scanner, Vec<u64>) {
        let conflicts = Arc::new(Conflicts::default());
        let mut scanner = Scanner::new(8192, Arc::clone(&conflicts));
        for piece in pieces {
            scanner.feed(piece);
        }
        let found = conflicts
            .ambiguous
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        (scanner, found)
    }

    #[test]
    fn only_the_ambiguous_head_is_numbered_however_the_reads_fall() {
        let (whole, found) = scan(&[STREAM]);
        assert_eq!((whole.heads, whole.state, found), (4, State::Head, vec![2]));
        for split in 0..STREAM.len() {
            let (s, found) = scan(&[&STREAM[..split], &STREAM[split..]]);
            assert_eq!(
                (s.heads, s.state, found),
                (4, State::Head, vec![2]),
                "split at {split}"
            );
        }
        let bytes: Vec<&[u8]> = STREAM.chunks(1).collect();
        let (s, found) = scan(&bytes);
        assert_eq!((s.heads, found), (4, vec![2]));
        assert!(s.pending.capacity() == 0, "no buffer kept between heads");
    }

    #[test]
    fn what_cannot_be_followed_ends_the_watch() {
        let cases: &[&[u8]] = &[
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58",
        ];
        for case in cases {
            let (s, found) = scan(&[case]);
            assert_eq!((s.state, found.len()), (State::Done, 0), "{case:?}");
        }
        let (s, _) = scan(&[b"GET / HTTP/1.1\r\nX: ", &[b'a'; 9000]]);
        assert_eq!(s.state, State::Done, "an endless head is not buffered");
    }

    #[test]
    fn a_flood_of_ambiguous_heads_ends_the_watch() {
        let head =
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        let flood: Vec<&[u8]> = std::iter::repeat_n(&head[..], 20).collect();
        let (s, found) = scan(&flood);
        assert_eq!((s.state, found.len()), (State::Done, MAX_CONFLICTS + 1));
    }

    #[test]
    fn the_service_side_tags_the_numbered_request_only() {
        let conflicts = Conflicts::default();
        assert!(conflicts.add(1));
        let request = |te: bool| {
            let mut b = http::Request::builder();
            if te {
                b = b.header("transfer-encoding", "chunked");
            }
            b.body(()).unwrap_or_default()
        };
        let tagged: Vec<bool> = [true, true, true]
            .into_iter()
            .map(|te| {
                let mut req = request(te);
                conflicts.mark(&mut req);
                req.extensions().get::<FramingConflict>().is_some()
            })
            .collect();
        assert_eq!(tagged, [false, true, false]);
    }

    /// Parking relies on this: "at rest" only when every byte read belongs to requests handed
    /// over whole.
    #[test]
    fn at_rest_only_between_requests_all_handed_over() {
        let conflicts = Arc::new(Conflicts::default());
        let mut scanner = Scanner::new(8192, Arc::clone(&conflicts));
        let hand_over = || conflicts.mark(&mut http::Request::new(()));
        let steps: &[(&[u8], bool, bool)] = &[
            // (bytes read, a request handed to the service after them, at rest)
            (b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n", false, false),
            (b"", true, true),
            (
                b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nab",
                true,
                false,
            ),
            (b"cd", false, true),
            (b"GET /c HT", false, false),
            (b"TP/1.1\r\n\r\nGET /d HTTP/1.1\r\n\r\n", true, false),
            (b"", true, true),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", false, false),
        ];
        for (i, (bytes, handed, rest)) in steps.iter().enumerate() {
            assert!(!conflicts.lost(), "step {i}");
            scanner.feed(bytes);
            if *handed {
                hand_over();
            }
            assert_eq!(conflicts.at_rest(), *rest, "step {i}");
        }
        assert!(conflicts.lost(), "HTTP/2 cannot be followed");
    }
}
