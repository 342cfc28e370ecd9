//! hyper writes a message as separate buffers (the head, then each body chunk) with one vectored
//! write, and a socket's `writev` costs the kernel more than `send` (the iovec import and the
//! file layer: about 0.3 us per request in `bench/run.sh`). [`Coalesce`] gathers a small vectored
//! write into one buffer and sends that; a large one (a big body) goes out vectored, uncopied.

use std::cell::Cell;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Vectored writes up to this many bytes are copied and sent as one buffer: copying this much
/// costs less than the vectored path saves.
pub const LIMIT: usize = 4096;

thread_local! {
    /// Taken, not borrowed, while in use: a nested write (none is expected) would start an empty
    /// one rather than fail.
    static GATHER: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// Wraps a stream (a client's or a backend's socket); reads pass through untouched.
pub struct Coalesce<I> {
    io: I,
}

impl<I> Coalesce<I> {
    pub fn new(io: I) -> Self {
        Self { io }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Coalesce<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Coalesce<I> {
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
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let io = Pin::new(&mut self.io);
        let mut filled = bufs.iter().filter(|b| !b.is_empty());
        match (filled.next(), filled.next()) {
            (None, _) => io.poll_write(cx, &[]),
            (Some(only), None) => io.poll_write(cx, only),
            _ if bufs.iter().map(|b| b.len()).sum::<usize>() > LIMIT => {
                io.poll_write_vectored(cx, bufs)
            }
            _ => {
                let mut gathered = GATHER.take();
                gathered.clear();
                bufs.iter().for_each(|b| gathered.extend_from_slice(b));
                let sent = io.poll_write(cx, &gathered);
                GATHER.set(gathered);
                sent
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records each write it is given (`true` when vectored, with what it took) and takes at most
    /// `room` bytes per write, as a socket with a nearly full buffer does.
    struct Recorder {
        calls: Vec<(bool, Vec<u8>)>,
        room: usize,
    }

    impl Recorder {
        fn take(&mut self, vectored: bool, bytes: impl Iterator<Item = u8>) -> usize {
            let taken: Vec<u8> = bytes.take(self.room).collect();
            let n = taken.len();
            self.calls.push((vectored, taken));
            n
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(self.take(false, buf.iter().copied())))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let all = bufs.iter().flat_map(|b| b.iter().copied());
            Poll::Ready(Ok(self.take(true, all)))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Writes these buffers once, vectored, through a `Coalesce`: what the stream below was
    /// asked to do, and the count reported back.
    fn write(bufs: &[&[u8]], room: usize) -> (Vec<(bool, Vec<u8>)>, usize) {
        let mut wrapped = Coalesce::new(Recorder {
            calls: Vec::new(),
            room,
        });
        let slices: Vec<IoSlice<'_>> = bufs.iter().map(|b| IoSlice::new(b)).collect();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let Poll::Ready(Ok(n)) = Pin::new(&mut wrapped).poll_write_vectored(&mut cx, &slices)
        else {
            panic!("the recorder is always ready");
        };
        (wrapped.io.calls, n)
    }

    #[test]
    fn small_writes_go_out_as_one_buffer_in_order() {
        let (calls, n) = write(&[b"HTTP/1.1 200 OK\r\n\r\n", b"", b"body"], usize::MAX);
        assert_eq!(calls, [(false, b"HTTP/1.1 200 OK\r\n\r\nbody".to_vec())]);
        assert_eq!(n, 23);
        // Twice on one thread: the reused buffer starts empty.
        let (calls, _) = write(&[b"ab", b"cd"], usize::MAX);
        assert_eq!(calls, [(false, b"abcd".to_vec())]);
    }

    #[test]
    fn one_filled_buffer_is_sent_without_a_copy_of_the_rest() {
        let (calls, n) = write(&[b"", b"head", b""], usize::MAX);
        assert_eq!((calls, n), (vec![(false, b"head".to_vec())], 4));
    }

    #[test]
    fn large_writes_stay_vectored() {
        let body = vec![b'x'; LIMIT];
        let (calls, n) = write(&[b"head", &body], usize::MAX);
        assert_eq!(calls.len(), 1);
        assert!(calls[0].0, "a write over the limit must not be copied");
        assert_eq!(n, LIMIT + 4);
        let (calls, _) = write(&[b"he", &body[..LIMIT - 2]], usize::MAX);
        assert!(!calls[0].0, "a write of exactly the limit is gathered");
    }

    #[test]
    fn a_partial_send_reports_what_went_out() {
        let (calls, n) = write(&[b"head", b"body"], 6);
        assert_eq!((calls, n), (vec![(false, b"headbo".to_vec())], 6));
    }
}
