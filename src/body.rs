//! Body types at both edges of the proxy. Bodies stream frame by frame; nothing buffers a whole
//! body.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::backend::InFlight;
use crate::upstream::Lease;
use crate::wire::body::WireBody;
use crate::wire::head::Lines;

type Slot = Arc<Mutex<Option<Incoming>>>;

/// A request body that can be handed to another backend if the first attempt never read it
/// (a failed connect), so even a POST fails over when nothing was sent. Most requests have no
/// body: then it is one null pointer, since a request is moved several times on its way to the
/// backend's connection (the streaming state made each move 96 bytes longer).
#[derive(Debug, Default)]
pub struct UpstreamBody(Option<Box<Streaming>>);

#[derive(Debug)]
struct Streaming {
    slot: Option<Slot>,
    taken: Option<Incoming>,
    hint: SizeHint,
    limit: Option<u64>,
    sent: u64,
}

/// The request body grew past `limits.max_body_bytes` while streaming.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds limits.max_body_bytes")]
pub struct BodyTooLarge;

pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// Owns a client's request body across attempts.
#[derive(Debug)]
pub struct Replayable {
    slot: Option<Slot>,
    hint: SizeHint,
    limit: Option<u64>,
}

impl Replayable {
    /// `limit` bounds the bytes streamed upstream; beyond it the attempt fails with
    /// [`BodyTooLarge`].
    pub fn new(body: Incoming, limit: Option<u64>) -> Self {
        let hint = body.size_hint();
        let slot = (!body.is_end_stream()).then(|| Arc::new(Mutex::new(Some(body))));
        Self { slot, hint, limit }
    }

    /// A request that has no body.
    pub fn empty() -> Self {
        Self {
            slot: None,
            hint: SizeHint::with_exact(0),
            limit: None,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.slot.is_none()
    }

    /// The body for one attempt. It takes the client's stream out of the slot on first read.
    pub fn attempt(&self) -> UpstreamBody {
        UpstreamBody(self.slot.as_ref().map(|slot| {
            Box::new(Streaming {
                slot: Some(Arc::clone(slot)),
                taken: None,
                hint: self.hint,
                limit: self.limit,
                sent: 0,
            })
        }))
    }

    /// True while no attempt has read from the stream, so another attempt can still send it whole.
    pub fn unread(&self) -> bool {
        self.slot
            .as_ref()
            .is_none_or(|s| s.lock().unwrap_or_else(PoisonError::into_inner).is_some())
    }
}

impl UpstreamBody {
    pub fn empty() -> Self {
        Self(None)
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.0.as_deref_mut() {
            Some(streaming) => streaming.poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.as_deref().is_none_or(Streaming::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.0
            .as_deref()
            .map_or_else(|| SizeHint::with_exact(0), Streaming::size_hint)
    }
}

impl Streaming {
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if self.taken.is_none() {
            let Some(slot) = self.slot.take() else {
                return Poll::Ready(None);
            };
            self.taken = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
        }
        let Some(body) = self.taken.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = match Pin::new(body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        self.sent += frame.data_ref().map_or(0, |d| d.len() as u64);
        if self.limit.is_some_and(|max| self.sent > max) {
            return Poll::Ready(Some(Err(Box::new(BodyTooLarge))));
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.slot.is_none() && self.taken.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.taken
            .as_ref()
            .map_or_else(|| self.hint, Body::size_hint)
    }
}

/// What the proxy answers with: a backend's streaming body, or a short local one (errors).
#[derive(Debug)]
pub enum ProxyBody {
    /// Keeps the backend's in-flight count up until the body is fully sent or dropped, and
    /// gives the connection back for reuse once the body has been read whole.
    Upstream(Incoming, InFlight, Option<Lease>),
    /// A body read off the wire (the lane's requests); it holds its connection.
    Wire(WireBody, InFlight),
    Local(Full<Bytes>),
}

impl ProxyBody {
    pub fn local(text: &'static str) -> Self {
        Self::Local(Full::new(Bytes::from_static(text.as_bytes())))
    }
}

impl ProxyBody {
    /// The header lines a wire response carries with its body (its header map is empty).
    pub fn wire_lines(&self) -> Option<&Lines> {
        match self {
            Self::Wire(body, _) => Some(body.lines()),
            _ => None,
        }
    }

    /// A backend's body. An empty one is never polled, so its connection goes back at once.
    pub fn upstream(body: Incoming, in_flight: InFlight, lease: Lease) -> Self {
        let mut lease = Some(lease);
        release_at_end(false, &body, &mut lease);
        Self::Upstream(body, in_flight, lease)
    }
}

/// Gives the connection back once its body has been read whole (`ended`, or nothing left).
fn release_at_end(ended: bool, body: &Incoming, lease: &mut Option<Lease>) {
    if ended || body.is_end_stream() {
        if let Some(lease) = lease.take() {
            lease.release();
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            Self::Upstream(body, _, lease) => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                release_at_end(matches!(polled, Poll::Ready(None)), body, lease);
                polled.map_err(Into::into)
            }
            Self::Wire(body, _) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Self::Local(full) => Pin::new(full)
                .poll_frame(cx)
                .map_err(|never| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Upstream(body, ..) => body.is_end_stream(),
            Self::Wire(body, _) => body.is_end_stream(),
            Self::Local(full) => full.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Upstream(body, ..) => body.size_hint(),
            Self::Wire(body, _) => body.size_hint(),
            Self::Local(full) => full.size_hint(),
        }
    }
}
