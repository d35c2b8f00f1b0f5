//! [`RequestBody`]: a request body on its way to an upstream, with the limits a client's
//! body is held to ([`ClientBody`]). The response's body type is the proxy's
//! (`proxy::body`): a request does not carry the size of a response body's pool
//! bookkeeping through every move.
//!
//! An enum rather than a boxed trait object: no allocation per request on the hot
//! path.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::io::{LazySleep, Stamp, coarse_now};

/// Any error a body or an exchange may end with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body on its way to an upstream.
#[derive(Debug, Default)]
pub enum RequestBody {
    /// Streamed from a client, frame by frame, never buffered whole. Only requests hyper
    /// parsed carry it (the proxy checks their `Host` for that reason).
    Incoming(ClientBody),
    /// Complete in memory (small bodies are read whole so they can be replayed).
    Full(Option<Bytes>),
    #[default]
    Empty,
}

impl From<Incoming> for RequestBody {
    fn from(b: Incoming) -> RequestBody {
        RequestBody::Incoming(ClientBody {
            inner: b,
            checks: None,
        })
    }
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::Incoming(b) => Pin::new(b).poll_frame(cx),
            RequestBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            RequestBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Incoming(b) => b.is_end_stream(),
            RequestBody::Full(data) => data.is_none(),
            RequestBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Incoming(b) => b.size_hint(),
            RequestBody::Full(Some(d)) => SizeHint::with_exact(d.len() as u64),
            RequestBody::Full(None) | RequestBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// A client's request body as hyper streams it, with the proxy's limits on it once
/// set ([`ClientBody::limit`]): `max_body` and `timeouts.body_read`.
#[derive(Debug)]
pub struct ClientBody {
    inner: Incoming,
    /// Boxed, and only for a body that is streamed: most requests carry none.
    checks: Option<Box<Checks>>,
}

#[derive(Debug)]
struct Checks {
    /// Most bytes the body may have; 0 = no limit.
    max: u64,
    read: u64,
    /// Longest wait for the client's next bytes.
    within: Option<Duration>,
    /// Since when the body has waited for the client (`None`: it is not waiting).
    waiting_since: Option<Instant>,
    /// Armed while the body waits for the client, lazily as the idle timer is.
    timer: Option<LazySleep>,
    progress: Option<Arc<BodyProgress>>,
    /// Set once the body was sent to its end ([`ClientBody::watch`]).
    sent_whole: Option<Arc<AtomicBool>>,
    /// Touched as bytes come: the exchange is making progress ([`ClientBody::touch`]).
    touch: Option<Arc<Stamp>>,
}

impl Checks {
    fn new() -> Checks {
        Checks {
            max: 0,
            read: 0,
            within: None,
            waiting_since: None,
            timer: None,
            progress: None,
            sent_whole: None,
            touch: None,
        }
    }
}

/// What the proxy and the upstream exchange learn of a limited body as it streams:
/// whether it was cut for its size or its pace (the upstream's error may not carry the
/// body's own: hyper's HTTP/2 client resets the stream and reports that), and whether
/// the client is the one being waited for, so a slow upload is never taken for a slow
/// upstream.
#[derive(Debug, Default)]
pub struct BodyProgress {
    cut: AtomicU8,
    /// The body waits for the client's next bytes.
    waiting: AtomicBool,
    /// The body was read to its end.
    ended: AtomicBool,
    /// When bytes last came.
    last: Stamp,
}

impl BodyProgress {
    const TOO_LARGE: u8 = 1;
    const TIMED_OUT: u8 = 2;

    /// 413 or 408 when the body was cut for its size or its pace; `None` otherwise.
    pub fn status(&self) -> Option<http::StatusCode> {
        match self.cut.load(Ordering::Relaxed) {
            Self::TOO_LARGE => Some(http::StatusCode::PAYLOAD_TOO_LARGE),
            Self::TIMED_OUT => Some(http::StatusCode::REQUEST_TIMEOUT),
            _ => None,
        }
    }

    /// When an exchange whose response deadline just passed is due instead, if the
    /// body is why it is late: the client is being waited for (its own limit is
    /// `body_read`), or body bytes moved within `timeout` (`upstream_response` runs
    /// from the last of them, so from the body's end once it is whole).
    pub fn later_deadline(&self, timeout: Duration) -> Option<Instant> {
        let now = Instant::now();
        if self.waiting.load(Ordering::Relaxed) && !self.ended.load(Ordering::Relaxed) {
            return Some(now + timeout);
        }
        Some(self.last.get() + timeout).filter(|&due| due > now)
    }

    fn stamp(&self) {
        self.last.touch();
    }
}

/// A request body longer than `max_body`.
#[derive(Debug)]
pub struct BodyTooLarge(pub u64);

impl std::fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the request body is longer than max_body ({} bytes)",
            self.0
        )
    }
}

impl std::error::Error for BodyTooLarge {}

/// A request body that stalled for `timeouts.body_read`.
#[derive(Debug)]
pub struct ClientBodyStalled(pub Duration);

impl std::fmt::Display for ClientBodyStalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the client sent no request body bytes for {} (timeouts.body_read)",
            humantime::format_duration(self.0)
        )
    }
}

impl std::error::Error for ClientBodyStalled {}

impl ClientBody {
    /// Puts `max` (bytes; 0 = none) and `within` (the longest wait for the client's
    /// next bytes) on a body still to come; its progress is shared from then on.
    pub fn limit(&mut self, max: u64, within: Duration) -> Option<Arc<BodyProgress>> {
        if http_body::Body::is_end_stream(&self.inner) {
            return None;
        }
        let progress = Arc::new(BodyProgress::default());
        progress.stamp();
        let c = self.checks.get_or_insert_with(|| Box::new(Checks::new()));
        c.max = max;
        c.within = Some(within);
        c.progress = Some(progress.clone());
        Some(progress)
    }

    /// The body's progress, once limited.
    pub fn progress(&self) -> Option<Arc<BodyProgress>> {
        self.checks.as_ref().and_then(|c| c.progress.clone())
    }

    /// A stamp touched whenever the body's bytes come (the connection's own look at
    /// whether its exchanges move).
    pub fn touch(&mut self, stamp: Arc<Stamp>) {
        if !http_body::Body::is_end_stream(&self.inner) {
            self.checks
                .get_or_insert_with(|| Box::new(Checks::new()))
                .touch = Some(stamp);
        }
    }

    /// A flag set once the body was sent to its end (a connection whose request body
    /// was cut short is not reused); `None` stops the watch.
    pub fn watch(&mut self, flag: Option<Arc<AtomicBool>>) {
        if flag.is_none() && self.checks.is_none() {
            return;
        }
        self.checks
            .get_or_insert_with(|| Box::new(Checks::new()))
            .sent_whole = flag;
    }
}

impl RequestBody {
    /// A streamed body's progress, once limited ([`ClientBody::limit`]).
    pub fn progress(&self) -> Option<Arc<BodyProgress>> {
        match self {
            RequestBody::Incoming(b) => b.progress(),
            RequestBody::Full(_) | RequestBody::Empty => None,
        }
    }
}

impl Checks {
    /// The limits' look at what the client's body gave.
    fn look(
        &mut self,
        polled: Poll<Option<Result<Frame<Bytes>, hyper::Error>>>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let (Some(t), Poll::Ready(Some(Ok(_)))) = (&self.touch, &polled) {
            t.touch();
        }
        let Some(progress) = &self.progress else {
            return polled.map(|f| f.map(|r| r.map_err(BoxError::from)));
        };
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                self.waiting_since = None;
                progress.waiting.store(false, Ordering::Relaxed);
                progress.stamp();
                if let Some(data) = frame.data_ref() {
                    self.read += data.len() as u64;
                    if self.max > 0 && self.read > self.max {
                        progress
                            .cut
                            .store(BodyProgress::TOO_LARGE, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge(self.max)))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(other) => {
                self.waiting_since = None;
                progress.waiting.store(false, Ordering::Relaxed);
                progress.ended.store(true, Ordering::Relaxed);
                progress.stamp();
                Poll::Ready(other.map(|r| r.map_err(BoxError::from)))
            }
            Poll::Pending => {
                progress.waiting.store(true, Ordering::Relaxed);
                let Some(within) = self.within else {
                    return Poll::Pending;
                };
                // The clock runs from the first wait after bytes came: a body the
                // upstream kept Strait from reading is not the client's delay.
                let due = *self.waiting_since.get_or_insert_with(coarse_now) + within;
                let timer = self.timer.get_or_insert_with(|| LazySleep::new(due));
                loop {
                    ready!(timer.poll_elapsed(cx));
                    if due <= Instant::now() {
                        progress
                            .cut
                            .store(BodyProgress::TIMED_OUT, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(Box::new(ClientBodyStalled(within)))));
                    }
                    // A later wait than the one the timer was armed for.
                    timer.reset(due);
                }
            }
        }
    }
}

impl http_body::Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let Some(c) = this.checks.as_deref_mut() else {
            return polled.map(|f| f.map(|r| r.map_err(BoxError::from)));
        };
        let polled = c.look(polled, cx);
        if let Some(flag) = &c.sent_whole
            && (matches!(polled, Poll::Ready(None)) || this.inner.is_end_stream())
        {
            flag.store(true, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
