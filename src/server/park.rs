//! Parking, on the hyper side: a plain HTTP/1.1 connection that Strait's own server
//! ([`super::h1`]) handed to hyper comes back once hyper sits idle, so that waiting for
//! its next request it holds its socket and nothing else.
//!
//! hyper keeps an 8 KiB write buffer and a read buffer of 8-16 KiB for as long as it
//! serves a connection, plus its dispatcher state: about 28 KiB per idle client. So a
//! plain HTTP/1.1 connection is served by a hyper connection only while it is busy.
//! Once no request is in flight and none has started for [`PARK_AFTER`], the serving
//! loop asks hyper to finish ([`graceful_shutdown`] while hyper sits between requests:
//! nothing is cut short, and no `Connection: close` is sent because no response head is
//! pending), keeps hyper from shutting the socket down ([`Lent`]), takes the socket and
//! any bytes hyper had already read back with `into_parts`, and drops the rest. The
//! socket and those bytes go back to Strait's own server, which hands the connection to
//! a new hyper connection only if a later request needs hyper again.
//!
//! A connection parks only after an exchange that leaves it reusable exactly as hyper
//! would: no request body (a body hyper has not read to its end would be taken for the
//! next request), keep-alive wanted by the request, no `Connection: close` in the
//! response, no CONNECT or upgrade. Anything else keeps hyper serving until it closes
//! the connection itself or a later exchange allows parking.
//!
//! [`graceful_shutdown`]: hyper::server::conn::http1::UpgradeableConnection::graceful_shutdown

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{Method, Request, Response, StatusCode, Version, header};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::http1::connection_has;
use crate::proxy::Tracked;

/// How long a connection stays with hyper after its last response before it parks.
/// Long enough that a busy keep-alive client never parks between two requests (each
/// park and resume costs hyper's buffers anew); short enough that idle clients cost
/// little within a second or two.
pub const PARK_AFTER: Duration = Duration::from_secs(1);

/// With more plain HTTP/1.1 connections than this served by hyper at once, a
/// connection parks as soon as its response ends rather than after [`PARK_AFTER`]:
/// a burst of clients then holds at most this many sets of hyper's buffers (about
/// 28 KiB each) instead of one per client. Below it, busy keep-alive clients pay
/// nothing for parking.
pub const EAGER_ABOVE: usize = 256;

/// How many plain HTTP/1.1 connections hyper serves right now (the rest are parked).
#[derive(Debug, Default)]
pub struct Sessions(std::sync::atomic::AtomicUsize);

impl Sessions {
    /// Counts a hyper session in until the guard drops; true when parking should be
    /// eager.
    pub fn enter(&self) -> (SessionGuard<'_>, bool) {
        let n = self.0.fetch_add(1, Ordering::Relaxed) + 1;
        (SessionGuard(self), n > EAGER_ABOVE)
    }

    /// True when parking should be eager now.
    pub fn crowded(&self) -> bool {
        self.0.load(Ordering::Relaxed) > EAGER_ABOVE
    }
}

/// One hyper session's place in [`Sessions`].
pub struct SessionGuard<'a>(&'a Sessions);

impl Drop for SessionGuard<'_> {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the serving loop and the service share about one connection.
#[derive(Debug, Default)]
pub struct Parking {
    /// Requests started; the loop parks only when this did not move for a whole tick.
    started: AtomicU64,
    /// Requests whose response has not finished (0 or 1 on HTTP/1.1).
    in_flight: AtomicU64,
    /// The last finished exchange left the connection reusable.
    reusable: AtomicBool,
    /// hyper is finishing because the loop takes the socket back: keep it open.
    keep_open: AtomicBool,
    /// Park as soon as a response ends (many connections are busy at once).
    eager: AtomicBool,
    /// Wakes the serving loop when a response ends, in eager mode.
    ended: tokio::sync::Notify,
}

impl Parking {
    /// Counts a request in; its [`Exchange`] counts it out when the response ends.
    pub fn begin(self: &Arc<Self>, req: &Request<Incoming>) -> Exchange {
        self.started.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Exchange {
            parking: self.clone(),
            reusable: request_allows_parking(req),
        }
    }

    /// Requests started so far.
    pub fn started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    /// True while a request's response has not finished.
    pub fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) > 0
    }

    /// True when the connection may park now: nothing in flight, and the last exchange
    /// left it reusable.
    pub fn may_park(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) == 0 && self.reusable.load(Ordering::Relaxed)
    }

    pub fn set_keep_open(&self, keep: bool) {
        self.keep_open.store(keep, Ordering::Relaxed);
    }

    pub fn set_eager(&self, eager: bool) {
        self.eager.store(eager, Ordering::Relaxed);
    }

    pub fn eager(&self) -> bool {
        self.eager.load(Ordering::Relaxed)
    }

    /// Completes after a response ended in eager mode.
    pub async fn response_ended(&self) {
        self.ended.notified().await
    }
}

/// One request's part in the parking decision; dropped when its response body is.
#[derive(Debug)]
pub struct Exchange {
    parking: Arc<Parking>,
    reusable: bool,
}

impl Exchange {
    /// Takes the response into account: a closing or switching response forbids parking.
    pub fn response(&mut self, resp: &Response<Tracked>) {
        self.reusable &= resp.status() != StatusCode::SWITCHING_PROTOCOLS
            && !connection_has(resp.headers(), "close");
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        self.parking
            .reusable
            .store(self.reusable, Ordering::Relaxed);
        self.parking.in_flight.fetch_sub(1, Ordering::Relaxed);
        if self.reusable && self.parking.eager.load(Ordering::Relaxed) {
            self.parking.ended.notify_one();
        }
    }
}

/// hyper's own keep-alive rule (RFC 9112 §9.3), plus no body and no tunnel.
fn request_allows_parking(req: &Request<Incoming>) -> bool {
    if req.method() == Method::CONNECT
        || req.headers().contains_key(header::UPGRADE)
        || !http_body::Body::is_end_stream(req.body())
    {
        return false;
    }
    match req.version() {
        Version::HTTP_11 => !connection_has(req.headers(), "close"),
        Version::HTTP_10 => connection_has(req.headers(), "keep-alive"),
        _ => false,
    }
}

/// A response body that carries its [`Exchange`] until hyper is done with it.
pub struct ServerBody {
    inner: Tracked,
    _exchange: Option<Exchange>,
    /// The request in flight on a connection hyper serves throughout.
    in_flight: Option<super::InFlight>,
}

impl ServerBody {
    pub(super) fn new(
        inner: Tracked,
        exchange: Option<Exchange>,
        in_flight: Option<super::InFlight>,
    ) -> ServerBody {
        ServerBody {
            inner,
            _exchange: exchange,
            in_flight,
        }
    }
}

impl http_body::Body for ServerBody {
    type Data = Bytes;
    type Error = crate::body::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, crate::body::BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let (Some(f), Poll::Ready(Some(Ok(_)))) = (&self.in_flight, &polled) {
            f.moved();
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

/// A socket lent to one hyper connection: hands out bytes read by the previous one
/// first, and ignores hyper's shutdown while the loop is taking the socket back.
#[derive(Debug)]
pub struct Lent<T> {
    inner: T,
    prefix: Bytes,
    parking: Arc<Parking>,
}

impl<T> Lent<T> {
    pub fn new(inner: T, prefix: Bytes, parking: Arc<Parking>) -> Lent<T> {
        Lent {
            inner,
            prefix,
            parking,
        }
    }

    /// The socket, and bytes read from it that no hyper connection has seen yet.
    pub fn into_inner(self) -> (T, Bytes) {
        (self.inner, self.prefix)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Lent<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Lent<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.parking.keep_open.load(Ordering::Relaxed) {
            // Flushed, not shut: the socket goes back to the loop.
            return Pin::new(&mut self.inner).poll_flush(cx);
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn lent_sockets_hand_out_the_prefix_first() {
        let (a, mut b) = tokio::io::duplex(64);
        let parking = Arc::new(Parking::default());
        let mut lent = Lent::new(a, Bytes::from_static(b"GET / HT"), parking);
        b.write_all(b"TP/1.1\r\n").await.unwrap();
        let mut got = vec![0u8; 16];
        lent.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"GET / HTTP/1.1\r\n");
    }

    #[tokio::test]
    async fn a_parking_connection_is_not_shut_down() {
        let (a, mut b) = tokio::io::duplex(64);
        let parking = Arc::new(Parking::default());
        let mut lent = Lent::new(a, Bytes::new(), parking.clone());
        parking.set_keep_open(true);
        lent.shutdown().await.unwrap();
        let (mut a, rest) = lent.into_inner();
        assert!(rest.is_empty());
        a.write_all(b"still open").await.unwrap();
        let mut got = vec![0u8; 10];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"still open");
    }
}
