//! A backend's response body read off the wire: a decoder that takes the body's data out of the
//! connection's read buffer as it is framed (length, chunked, until the close), and the body the
//! proxy streams to the client, which gives the connection back once the body was read whole.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http_body::{Frame, SizeHint};

use super::head::{Framing, Lines};
use super::{Conn, Pool};
use crate::framing::trailer_section_len;

/// A chunk-size line or trailer section longer than this is refused.
const MAX_LINE: usize = 8192;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Length(u64),
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    Trailers,
    Close,
    Done,
}

/// What the buffer gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    Data(Bytes),
    /// More bytes are needed.
    More,
    End,
}

#[derive(Debug)]
pub struct Decoder {
    state: State,
}

fn broken(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

impl Decoder {
    pub fn new(framing: Framing) -> Self {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::Size,
            Framing::Close => State::Close,
        };
        Self { state }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// The next piece of the body `buf` holds; data is split off the buffer, not copied.
    pub fn step(&mut self, buf: &mut BytesMut) -> io::Result<Step> {
        loop {
            let next = match self.state {
                State::Done => return Ok(Step::End),
                State::Length(_) | State::Data(_) if buf.is_empty() => return Ok(Step::More),
                State::Length(n) => return Ok(self.data(buf, n, State::Done)),
                State::Data(n) => return Ok(self.data(buf, n, State::DataEnd)),
                State::Close if buf.is_empty() => return Ok(Step::More),
                State::Close => return Ok(Step::Data(buf.split().freeze())),
                State::Size => chunk_size(buf)?,
                State::DataEnd => data_end(buf)?,
                State::Trailers => trailers(buf)?,
            };
            match next {
                Some(state) => self.state = state,
                None => return Ok(Step::More),
            }
        }
    }

    fn data(&mut self, buf: &mut BytesMut, left: u64, then: State) -> Step {
        let take = left.min(buf.len() as u64);
        // `take` is at most the buffer's length, a usize.
        let data = buf
            .split_to(usize::try_from(take).unwrap_or(buf.len()))
            .freeze();
        self.state = match left - take {
            0 => then,
            rest if then == State::Done => State::Length(rest),
            rest => State::Data(rest),
        };
        Step::Data(data)
    }

    /// The backend closed the connection: the end of a body read until the close, or a body cut
    /// short.
    pub fn closed(&mut self) -> io::Result<()> {
        match self.state {
            State::Close | State::Done => {
                self.state = State::Done;
                Ok(())
            }
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "backend closed the connection mid-body",
            )),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(n) => SizeHint::with_exact(n),
            State::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

fn chunk_size(buf: &mut BytesMut) -> io::Result<Option<State>> {
    match httparse::parse_chunk_size(buf) {
        Ok(httparse::Status::Complete((len, size))) => {
            buf.advance(len);
            Ok(Some(if size == 0 {
                State::Trailers
            } else {
                State::Data(size)
            }))
        }
        Ok(httparse::Status::Partial) if buf.len() > MAX_LINE => Err(broken("chunk size too long")),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(_) => Err(broken("invalid chunk size")),
    }
}

fn data_end(buf: &mut BytesMut) -> io::Result<Option<State>> {
    match buf.get(..2) {
        None if buf.first().is_none_or(|b| *b == b'\r') => Ok(None),
        Some(b"\r\n") => {
            buf.advance(2);
            Ok(Some(State::Size))
        }
        _ => Err(broken("chunk data not followed by CRLF")),
    }
}

fn trailers(buf: &mut BytesMut) -> io::Result<Option<State>> {
    match trailer_section_len(buf) {
        Some(len) => {
            buf.advance(len);
            Ok(Some(State::Done))
        }
        None if buf.len() > MAX_LINE => Err(broken("trailer section too long")),
        None => Ok(None),
    }
}

/// A response body streamed from a backend connection. Read whole, the connection goes back to
/// its pool if it may carry another request; dropped before that, the connection is closed.
/// It carries the response's header lines to the lane, which writes them.
#[derive(Debug)]
pub struct WireBody {
    decoder: Decoder,
    lines: Lines,
    /// Boxed: the body, and the response it is in, are moved several times on the way to the
    /// client, and a connection is large.
    conn: Option<Box<Conn>>,
    pool: Arc<Pool>,
    reusable: bool,
}

impl WireBody {
    pub fn new(
        framing: Framing,
        lines: Lines,
        conn: Box<Conn>,
        pool: Arc<Pool>,
        reusable: bool,
    ) -> Self {
        let mut body = Self {
            decoder: Decoder::new(framing),
            lines,
            conn: Some(conn),
            pool,
            reusable,
        };
        if body.decoder.is_done() {
            body.finish();
        }
        body
    }

    /// The response's header lines, to be written before the body.
    pub fn lines(&self) -> &Lines {
        &self.lines
    }

    /// The body was read whole: the connection is pooled if nothing is amiss with it.
    fn finish(&mut self) {
        if let Some(conn) = self.conn.take() {
            if self.reusable && conn.buf.is_empty() {
                self.pool.put(conn);
            }
        }
    }
}

impl http_body::Body for WireBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<io::Result<Frame<Bytes>>>> {
        let this = &mut *self;
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match this.decoder.step(&mut conn.buf)? {
                Step::Data(data) => {
                    if this.decoder.is_done() {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Step::End => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Step::More => {}
            }
            if ready!(conn.poll_fill(cx))? == 0 {
                this.decoder.closed()?;
                this.reusable = false;
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        self.decoder.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `wire` to a decoder in pieces of `piece` bytes; the data it gave, and whether it
    /// ended before the bytes did (the rest is left in the buffer).
    fn decode(framing: Framing, wire: &[u8], piece: usize) -> io::Result<(Vec<u8>, BytesMut)> {
        let mut decoder = Decoder::new(framing);
        let (mut buf, mut data) = (BytesMut::new(), Vec::new());
        let mut pieces = wire.chunks(piece);
        loop {
            match decoder.step(&mut buf)? {
                Step::Data(d) => data.extend_from_slice(&d),
                Step::End => return Ok((data, buf)),
                Step::More => match pieces.next() {
                    Some(p) => buf.extend_from_slice(p),
                    None => {
                        decoder.closed()?;
                        return Ok((data, buf));
                    }
                },
            }
        }
    }

    #[test]
    fn bodies_are_taken_as_framed_whatever_the_reads() {
        let chunked: &[u8] = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        // (framing, the bytes, the body's data, what is left after it)
        type Row = (Framing, &'static [u8], &'static [u8], &'static [u8]);
        let table: [Row; 5] = [
            (Framing::Length(5), b"helloNEXT", b"hello", b"NEXT"),
            (Framing::Chunked, chunked, b"hello world", b"NEXT"),
            (Framing::Chunked, b"0\r\n\r\nNEXT", b"", b"NEXT"),
            (Framing::Close, b"all of it", b"all of it", b""),
            (Framing::Empty, b"NEXT", b"", b""),
        ];
        for (framing, wire, data, rest) in table {
            for piece in 1..=wire.len() {
                let (got, left) = decode(framing, wire, piece).expect("a valid body");
                assert_eq!(got, data, "{framing:?} in pieces of {piece}");
                if piece == wire.len() {
                    assert_eq!(&left[..], rest, "{framing:?}: what follows stays");
                }
            }
        }
    }

    #[test]
    fn broken_bodies_are_errors() {
        let table: [(Framing, &[u8]); 5] = [
            (Framing::Length(5), b"hel"),
            (Framing::Chunked, b"5\r\nhello\r\n"),
            (Framing::Chunked, b"5\r\nhelloXX0\r\n\r\n"),
            (Framing::Chunked, b"zz\r\n"),
            (Framing::Chunked, b"5\r\nhello\r"),
        ];
        for (framing, wire) in table {
            let got = decode(framing, wire, wire.len());
            assert!(
                got.is_err(),
                "{framing:?} {:?}: {got:?}",
                String::from_utf8_lossy(wire)
            );
        }
    }
}
