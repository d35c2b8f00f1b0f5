//! The one body type that crosses the proxy, in both directions.
//!
//! A streamed hyper body, nothing, or a short message Strait wrote itself. An enum
//! rather than a boxed trait object: no allocation per request on the hot path.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;

/// A request or response body handled by Strait.
#[derive(Debug, Default)]
pub enum Body {
    /// Streamed from a client, frame by frame, never buffered whole.
    Incoming(Incoming),
    /// Streamed from a client to an upstream; the flag is set once the body was sent
    /// to its end (a connection whose request body was cut short is not reused).
    Watched(Incoming, std::sync::Arc<std::sync::atomic::AtomicBool>),
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

impl From<Incoming> for Body {
    fn from(b: Incoming) -> Body {
        Body::Incoming(b)
    }
}

impl From<String> for Body {
    fn from(s: String) -> Body {
        Body::Full(Some(Bytes::from(s)))
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Body::Incoming(b) => Pin::new(b).poll_frame(cx),
            Body::Upstream(b) => Pin::new(b).poll_frame(cx),
            Body::Watched(b, done) => {
                let polled = Pin::new(&mut *b).poll_frame(cx);
                if matches!(polled, Poll::Ready(None)) || b.is_end_stream() {
                    done.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                polled
            }
            Body::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Body::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Incoming(b) => b.is_end_stream(),
            Body::Upstream(b) => b.is_end_stream(),
            Body::Watched(b, _) => b.is_end_stream(),
            Body::Full(data) => data.is_none(),
            Body::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Incoming(b) => b.size_hint(),
            Body::Upstream(b) => b.size_hint(),
            Body::Watched(b, _) => b.size_hint(),
            Body::Full(Some(d)) => SizeHint::with_exact(d.len() as u64),
            Body::Full(None) | Body::Empty => SizeHint::with_exact(0),
        }
    }
}
