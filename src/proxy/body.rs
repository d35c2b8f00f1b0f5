//! [`Body`]: a response body on its way back to a client: an upstream's, streamed, or
//! one Strait makes itself. An enum rather than a boxed trait object: no allocation per
//! request on the hot path.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};

use crate::body::BoxError;
use crate::upstream::ResponseBody;

/// A response body on its way to a client.
#[derive(Debug, Default)]
pub enum Body {
    /// Streamed from an upstream; returns its connection to the pool at the end.
    Upstream(ResponseBody),
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
