//! The HTTP side of upstream connections: what the pool keeps ([`Http`]: Strait's
//! HTTP/1.1 connections and hyper's HTTP/2 senders), and an exchange on a checked-out
//! one: [`Checkout::send`] drives an HTTP/1.1 exchange in the caller's task (`h1.rs`)
//! or hands the request to an HTTP/2 connection's task (`h2.rs`), and [`Reply`] is the
//! response body as it comes off the connection, with its deadlines.

pub mod h1;
pub mod h2;
#[cfg(test)]
mod tests;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use hyper::client::conn::http2;
use tokio::time::Instant;

use super::pool::{Checkout, Protocol, Sender};
use crate::body::{BoxError, RequestBody};
use crate::io::Slots;
use h1::{Due, H1Conn, h1_exchange};
use h2::{H2Reply, StallTimer, h2_unprocessed};

/// Strait's upstream HTTP: HTTP/1.1 connections of its own, HTTP/2 through hyper.
pub struct Http;

impl Protocol for Http {
    type H1 = H1Conn;
    type H2 = http2::SendRequest<RequestBody>;
    type Driver = h2::Driver;

    fn is_alive(conn: &mut H1Conn) -> bool {
        conn.is_alive()
    }

    fn is_clean(conn: &H1Conn) -> bool {
        conn.is_clean()
    }

    fn rest(conn: &mut H1Conn, kept: &Arc<Slots>) {
        conn.rest(kept)
    }

    fn is_ready(sender: &Self::H2) -> bool {
        sender.is_ready()
    }

    fn max_streams(driver: &h2::Driver) -> usize {
        driver.max_send_streams()
    }

    fn end(driver: &h2::Driver) {
        driver.end()
    }
}

/// The pool of Strait's upstream connections.
pub type Pool = super::pool::Pool<Http>;
/// A connection (or an HTTP/2 stream slot) lent to one request.
pub type Lent = Checkout<Http>;

/// An HTTP/1.1 response body that went `read_timeout` without a byte.
#[derive(Debug)]
pub struct BodyStalled(pub Duration);

impl fmt::Display for BodyStalled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the upstream sent no byte of the response body for {} (timeouts.upstream_response)",
            humantime::format_duration(self.0)
        )
    }
}

impl std::error::Error for BodyStalled {}

/// What `send` on a checked-out connection gave back.
pub enum SendError {
    /// The request never left: hyper handed it back (HTTP/2). Safe to send anywhere.
    Unsent(Box<http::Request<RequestBody>>, BoxError),
    /// The request (or part of it) may have been written. `unprocessed` is true when the
    /// peer surely did not act on it: an HTTP/2 stream it refused or never took, or an
    /// HTTP/1.1 connection that closed or reset before any response byte.
    Failed {
        error: BoxError,
        unprocessed: bool,
        /// HTTP/1.1, unprocessed, body empty or in memory: the request as written.
        replay: Option<h1::Written>,
    },
    /// No response head by the deadline.
    TimedOut,
}

/// A response body as it comes off a checked-out connection.
#[derive(Debug)]
pub enum Reply {
    /// An HTTP/2 stream: hyper's connection task feeds it. Boxed: HTTP/1.1 replies,
    /// the common case, move through the exchange smaller.
    H2(Box<H2Reply>),
    /// Read from the HTTP/1.1 connection by whoever polls it.
    H1(crate::http1::Framing),
    /// A whole HTTP/1.1 body that came with its head (`None` once taken); the
    /// connection is already back in the pool.
    Buffered(Option<Bytes>),
}

impl Reply {
    pub fn is_end_stream(&self) -> bool {
        match self {
            Reply::H2(b) => http_body::Body::is_end_stream(&b.body),
            Reply::H1(f) => f.is_end(),
            Reply::Buffered(b) => b.is_none(),
        }
    }

    /// The next frame of the body. An HTTP/1.1 body is read from `conn`, which also
    /// moves the rest of its request body along; without one (released at the body's
    /// end) it has ended. HTTP/2 and buffered bodies need no connection.
    pub fn poll_frame(
        &mut self,
        conn: Option<&mut Lent>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        use std::task::Poll;
        match self {
            Reply::H2(h2) => {
                let H2Reply { body, stall } = &mut **h2;
                let polled = http_body::Body::poll_frame(Pin::new(body), cx)
                    .map(|f| f.map(|r| r.map_err(BoxError::from)));
                if polled.is_ready() {
                    if let Some(t) = stall {
                        t.armed = false;
                    }
                    return polled;
                }
                let Some(timeout) = conn.map(|c| c.read_timeout()) else {
                    return polled;
                };
                let t = stall.get_or_insert_with(|| StallTimer {
                    sleep: Box::pin(tokio::time::sleep(timeout)),
                    armed: true,
                });
                if !t.armed {
                    t.armed = true;
                    t.sleep
                        .as_mut()
                        .reset(tokio::time::Instant::now() + timeout);
                }
                match t.sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyStalled(timeout))))),
                    Poll::Pending => Poll::Pending,
                }
            }
            Reply::Buffered(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Reply::H1(framing) => match conn {
                Some(c) => c.poll_h1_body(framing, cx),
                None => Poll::Ready(None),
            },
        }
    }

    pub fn size_hint(&self) -> http_body::SizeHint {
        match self {
            Reply::H2(b) => http_body::Body::size_hint(&b.body),
            Reply::H1(f) => f.size_hint(),
            Reply::Buffered(Some(b)) => http_body::SizeHint::with_exact(b.len() as u64),
            Reply::Buffered(None) => http_body::SizeHint::with_exact(0),
        }
    }
}

impl Checkout<Http> {
    /// The longest a response body may go without a byte (nginx's
    /// `proxy_read_timeout`): the profile's `upstream_response`.
    fn read_timeout(&self) -> Duration {
        self.key.profile.response_timeout()
    }

    /// The next frame of an HTTP/1.1 body. While it waits for the upstream, the body's
    /// next byte is due within `read_timeout`: the sweep marks a late one and wakes this
    /// reader, which then fails the body (no timer per response).
    fn poll_h1_body(
        &mut self,
        framing: &mut crate::http1::Framing,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        use std::task::Poll;
        let Some(Sender::H1(conn)) = self.sender.as_mut() else {
            return Poll::Ready(None);
        };
        let shared = &*self.shared;
        if shared.timed_out.load(Ordering::Relaxed) {
            let waited = self.read_timeout();
            return Poll::Ready(Some(Err(Box::new(BodyStalled(waited)))));
        }
        let polled = conn
            .poll_body(framing, cx)
            .map(|f| f.map(|r| r.map_err(|e| Box::new(e) as BoxError)));
        if polled.is_pending() {
            if shared.head_deadline.load(Ordering::Relaxed) == 0
                && let Some(pool) = self.pool.upgrade()
            {
                let due = pool.now_ms() + self.read_timeout().as_millis() as u64;
                shared.head_deadline.store(due, Ordering::Relaxed);
            }
            shared.wake_on_deadline(cx);
        } else if shared.head_deadline.load(Ordering::Relaxed) != 0 {
            // Bytes came: nothing is due until the reader waits again.
            shared.disarm();
        }
        polled
    }

    /// Sends a request on this connection and waits for the response head until
    /// `deadline`.
    ///
    /// HTTP/1.1 is driven right here, in the caller's task; the response body is read
    /// through [`Reply::poll_frame`]. HTTP/2 streams go through hyper's connection
    /// task.
    // Not an `async fn`: an `async fn` keeps each argument and its moved-in copy in its
    // future; this future is moved per request (bench/proxy-instructions counts it).
    #[allow(clippy::manual_async_fn)]
    pub fn send(
        &mut self,
        req: http::Request<RequestBody>,
        deadline: Instant,
    ) -> impl Future<Output = Result<http::Response<Reply>, SendError>> + Send + '_ {
        // An `async move` block: the request lives in the future once.
        async move {
            let sender = self
                .sender
                .as_mut()
                .expect("a checkout has its sender until released");
            // A streamed body's pace moves the response deadline (`BodyProgress`).
            let progress = req.body().progress();
            let timeout = self.key.profile.response_timeout();
            match sender {
                Sender::H1(conn) => {
                    let head_only = conn.begin(req);
                    let due = Due {
                        deadline,
                        progress,
                        timeout,
                    };
                    h1_exchange(&self.pool, &self.shared, conn, head_only, due).await
                }
                Sender::H2(sender) => {
                    let exchange = async {
                        if let Err(e) = sender.ready().await {
                            return Err(SendError::Unsent(Box::new(req), Box::new(e)));
                        }
                        sender
                            .try_send_request(req)
                            .await
                            .map(|resp| {
                                resp.map(|body| Reply::H2(Box::new(H2Reply { body, stall: None })))
                            })
                            .map_err(|mut e| match e.take_message() {
                                Some(req) => {
                                    SendError::Unsent(Box::new(req), Box::new(e.into_error()))
                                }
                                None => {
                                    let e = e.into_error();
                                    SendError::Failed {
                                        unprocessed: h2_unprocessed(&e),
                                        error: Box::new(e),
                                        replay: None,
                                    }
                                }
                            })
                    };
                    // Boxed: its state is several times the HTTP/1.1 path's, and every
                    // request's future would otherwise reserve room for it
                    // (bench/proxy-instructions).
                    Box::pin(async move {
                        let mut exchange = std::pin::pin!(exchange);
                        let mut deadline = deadline;
                        loop {
                            match tokio::time::timeout_at(deadline, exchange.as_mut()).await {
                                Ok(r) => return r,
                                Err(_) => {
                                    match progress.as_ref().and_then(|p| p.later_deadline(timeout))
                                    {
                                        Some(later) => deadline = later,
                                        None => return Err(SendError::TimedOut),
                                    }
                                }
                            }
                        }
                    })
                    .await
                }
            }
        }
    }

    /// Sends an HTTP/1.1 request exactly as it was written on a connection that failed
    /// it ([`SendError::Failed`]'s `replay`).
    pub async fn resend(
        &mut self,
        written: h1::Written,
        deadline: Instant,
    ) -> Result<http::Response<Reply>, SendError> {
        match self.sender.as_mut() {
            Some(Sender::H1(conn)) => {
                let head_only = conn.begin_written(written);
                let due = Due {
                    deadline,
                    progress: None,
                    timeout: self.key.profile.response_timeout(),
                };
                h1_exchange(&self.pool, &self.shared, conn, head_only, due).await
            }
            _ => Err(SendError::Failed {
                error: "a written HTTP/1.1 request cannot go on an HTTP/2 connection".into(),
                unprocessed: false,
                replay: None,
            }),
        }
    }

    /// What the HTTP/1.1 response head just read said about its connection.
    pub fn h1_hop(&self) -> Option<crate::http1::response::Hop> {
        match &self.sender {
            Some(Sender::H1(conn)) => Some(conn.hop()),
            _ => None,
        }
    }

    /// Takes the whole body of an HTTP/1.1 response when it is already buffered, so
    /// the connection can go back before the client has it.
    pub fn take_buffered(&mut self, reply: &mut Reply) {
        if let (Reply::H1(framing), Some(Sender::H1(conn))) = (&*reply, &mut self.sender)
            && let Some(data) = conn.take_whole(*framing)
        {
            *reply = Reply::Buffered(Some(data));
        }
    }
}
