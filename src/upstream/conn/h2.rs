//! HTTP/2 upstream connections: the handshake, and the driver the pool runs for each
//! (hyper's connection task, ended when the pool retires the connection).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hyper::client::conn::http2;
use hyper_util::rt::{TokioIo, TokioTimer};

use crate::body::{BoxError, RequestBody};
use crate::upstream::connect::Stream;
use crate::upstream::pool::CheckoutError;

/// Spawns the tasks of one HTTP/2 connection and remembers the first, the connection
/// task itself (hyper spawns it during the handshake, before any request), so a retired
/// connection can be ended: hyper keeps an h2 connection open after its last handle is
/// dropped (its ping holds a reference). Per-request tasks are spawned plainly.
#[derive(Clone, Default)]
struct ConnExec(Arc<std::sync::OnceLock<tokio::task::AbortHandle>>);

impl<F> hyper::rt::Executor<F> for ConnExec
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        let task = tokio::spawn(fut);
        if self.0.get().is_none() {
            let _ = self.0.set(task.abort_handle());
        }
    }
}

impl ConnExec {
    /// Ends the connection task, which closes the socket.
    fn end(&self) {
        if let Some(task) = self.0.get() {
            task.abort();
        }
    }
}

/// One HTTP/2 connection's hyper task, as the pool drives it.
pub struct Driver {
    conn: http2::Connection<TokioIo<Stream>, RequestBody, ConnExec>,
    exec: ConnExec,
}

impl Driver {
    /// The peer's current `SETTINGS_MAX_CONCURRENT_STREAMS`.
    pub fn max_send_streams(&self) -> usize {
        self.conn.current_max_send_streams()
    }

    /// Ends the connection's tasks, which closes the socket: hyper keeps an HTTP/2
    /// connection open after its last handle is dropped.
    pub fn end(&self) {
        self.exec.end();
    }
}

impl Future for Driver {
    type Output = Result<(), BoxError>;
    fn poll(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        Pin::new(&mut self.get_mut().conn)
            .poll(cx)
            .map(|r| r.map_err(BoxError::from))
    }
}

/// The HTTP/2 handshake on a connected stream: the sender requests go through, and
/// the connection's driver for the pool to run.
pub async fn handshake(
    stream: Stream,
    streams: usize,
) -> Result<(http2::SendRequest<RequestBody>, Driver), CheckoutError> {
    let exec = ConnExec::default();
    let (sender, conn) = http2::Builder::new(exec.clone())
        .timer(TokioTimer::new())
        // PING keepalive: a peer that stops answering is found and dropped.
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(false)
        .initial_max_send_streams(streams)
        // The bound HTTP/1.1 upstreams get (hyper's default would be 16 KiB).
        .max_header_list_size(crate::http1::MAX_HEAD as u32)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| CheckoutError::Handshake(e.to_string()))?;
    Ok((sender, Driver { conn, exec }))
}

/// An HTTP/2 response body, and its stall timer, made when the reader first waits.
#[derive(Debug)]
pub struct H2Reply {
    pub(super) body: hyper::body::Incoming,
    pub(super) stall: Option<StallTimer>,
}

/// How long an HTTP/2 response body has waited for its next frame: armed when the
/// reader waits, disarmed when a frame comes (HTTP/1.1 bodies use the sweep instead).
#[derive(Debug)]
pub struct StallTimer {
    pub(super) sleep: Pin<Box<tokio::time::Sleep>>,
    pub(super) armed: bool,
}

/// True when an HTTP/2 peer did not process the stream (RFC 9113 §8.7): it refused it,
/// or it was above the GOAWAY's last stream id, or it never left hyper's queue because
/// the connection's task ended first ("dispatch task is gone": hyper has no predicate
/// for that one, so its message is matched).
pub(super) fn h2_unprocessed(e: &hyper::Error) -> bool {
    if e.is_user() && e.to_string().contains("dispatch task is gone") {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h2e) = s.downcast_ref::<::h2::Error>() {
            return h2e.reason() == Some(::h2::Reason::REFUSED_STREAM)
                || (h2e.is_go_away() && h2e.is_remote());
        }
        source = s.source();
    }
    false
}
