//! Parking idle HTTP/1 connections. hyper keeps a connection's read and write buffers (8 KiB
//! each) and its per-connection state for the connection's whole life, so thousands of idle
//! keep-alive clients would hold tens of KiB each. A connection that has been quiet for a while
//! is parked instead: its hyper connection is ended without closing the socket, which frees all of
//! that, and the socket goes back to waiting for its next first byte, as a fresh one does. A new
//! hyper connection is made when that byte arrives.
//!
//! [`Parkable`] is the socket as hyper sees it: it hands hyper the byte that woke the connection
//! first; when parking, it turns hyper's shutdown into a no-op and, when hyper drops it, hands
//! the socket back through its [`Home`] instead of closing it. Parking is only asked for when no
//! byte of a next request has been read (the framing watch knows), so nothing hyper had buffered
//! is lost.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Where a parked socket goes when hyper lets go of it.
pub struct Home<I> {
    parking: AtomicBool,
    io: Mutex<Option<I>>,
}

impl<I> Home<I> {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            parking: AtomicBool::new(false),
            io: Mutex::new(None),
        })
    }

    /// From now on, hyper's shutdown leaves the socket open and dropping hands it back.
    pub fn park(&self) {
        self.parking.store(true, Ordering::Relaxed);
    }

    /// The socket, once hyper has dropped it after [`Home::park`]; clears the request to park.
    pub fn take(&self) -> Option<I> {
        self.parking.store(false, Ordering::Relaxed);
        self.io
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    fn parking(&self) -> bool {
        self.parking.load(Ordering::Relaxed)
    }
}

/// A socket lent to one hyper connection; see the module docs.
pub struct Parkable<I> {
    /// Always `Some` until dropped.
    io: Option<I>,
    /// Read from `io` before hyper took over; hyper gets it before anything else.
    first: Bytes,
    home: Arc<Home<I>>,
}

impl<I> Parkable<I> {
    pub fn new(io: I, first: Bytes, home: &Arc<Home<I>>) -> Self {
        Self {
            io: Some(io),
            first,
            home: Arc::clone(home),
        }
    }

    fn io(&mut self) -> io::Result<Pin<&mut I>>
    where
        I: Unpin,
    {
        self.io
            .as_mut()
            .map(Pin::new)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }
}

impl<I> Drop for Parkable<I> {
    fn drop(&mut self) {
        if self.home.parking() {
            *self.home.io.lock().unwrap_or_else(PoisonError::into_inner) = self.io.take();
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Parkable<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if buf.remaining() > 0 && !self.first.is_empty() {
            let n = buf.remaining().min(self.first.len());
            buf.put_slice(&self.first.split_to(n));
            return Poll::Ready(Ok(()));
        }
        self.io()?.poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Parkable<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.io()?.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.io()?.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.as_ref().is_some_and(I::is_write_vectored)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io()?.poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.home.parking() {
            return Poll::Ready(Ok(()));
        }
        self.io()?.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_parked_socket_survives_shutdown_and_drop_and_an_unparked_one_closes(
    ) -> io::Result<()> {
        let (near, mut far) = tokio::io::duplex(64);
        let home = Home::new();
        far.write_all(b"ET /").await?;
        let mut lent = Parkable::new(near, Bytes::from_static(b"G"), &home);
        let mut head = [0; 5];
        lent.read_exact(&mut head).await?;
        assert_eq!(&head, b"GET /", "the waking byte comes first");
        home.park();
        lent.shutdown().await?;
        drop(lent);
        let mut back = home.take().expect("the socket came home");
        back.write_all(b"still open").await?;
        let mut got = [0; 10];
        far.read_exact(&mut got).await?;
        assert_eq!(&got, b"still open");

        let lent = Parkable::new(back, Bytes::from_static(b"G"), &home);
        drop(lent);
        assert!(home.take().is_none(), "not parking: the socket is dropped");
        assert_eq!(far.read(&mut got).await?, 0, "and the peer sees EOF");
        Ok(())
    }
}
