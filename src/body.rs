//! The body types that cross the proxy: [`RequestBody`] on the way to an upstream,
//! [`Body`] on the way back to a client.
//!
//! Enums rather than boxed trait objects: no allocation per request on the hot path.
//! Two types rather than one so a request does not carry the size of a response body's
//! pool bookkeeping through every move.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;

use crate::upstream::BoxError;

/// A response body on its way to a client.
#[derive(Debug, Default)]
pub enum Body {
    /// Streamed from an upstream; returns its connection to the pool at the end.
    Upstream(crate::upstream::ResponseBody),
    /// A complete short body (`None` once sent).
    Full(Option<Bytes>),
    #[default]
    Empty,
}

impl Body {
    pub fn text(s: &'static str) -> Body {
        Body::Full(Some(Bytes::from_static(s.as_bytes())))
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Body::Upstream(b) => Pin::new(b).poll_frame(cx),
            Body::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Body::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Upstream(b) => b.is_end_stream(),
            Body::Full(data) => data.is_none(),
            Body::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Upstream(b) => b.size_hint(),
            Body::Full(Some(d)) => SizeHint::with_exact(d.len() as u64),
            Body::Full(None) | Body::Empty => SizeHint::with_exact(0),
        }
    }
}

/// A request body on its way to an upstream.
#[derive(Debug, Default)]
pub enum RequestBody {
    /// Streamed from a client, frame by frame, never buffered whole. Only requests hyper
    /// parsed carry it (the proxy checks their `Host` for that reason).
    Incoming(Incoming),
    /// Streamed from a client; the flag is set once the body was sent to its end (a
    /// connection whose request body was cut short is not reused).
    Watched(Incoming, Arc<AtomicBool>),
    /// Complete in memory (small bodies are read whole so they can be replayed).
    Full(Option<Bytes>),
    #[default]
    Empty,
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RequestBody::Incoming(b) => Pin::new(b).poll_frame(cx),
            RequestBody::Watched(b, done) => {
                let polled = Pin::new(&mut *b).poll_frame(cx);
                if matches!(polled, Poll::Ready(None)) || b.is_end_stream() {
                    done.store(true, Ordering::Relaxed);
                }
                polled
            }
            RequestBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            RequestBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Incoming(b) | RequestBody::Watched(b, _) => b.is_end_stream(),
            RequestBody::Full(data) => data.is_none(),
            RequestBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Incoming(b) | RequestBody::Watched(b, _) => b.size_hint(),
            RequestBody::Full(Some(d)) => SizeHint::with_exact(d.len() as u64),
            RequestBody::Full(None) | RequestBody::Empty => SizeHint::with_exact(0),
        }
    }
}
