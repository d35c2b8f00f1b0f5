//! [`Guarded`]: the IO hyper's HTTP/1.1 server reads through, so that every request it
//! serves has met Strait's wire rules first (`http1::guard`).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;
use tokio_util::io::poll_read_buf;

use crate::http1::guard::RequestGuard;
use crate::proxy::ConnBytes;

/// Reads through a [`RequestGuard`]: bytes reach the reader once judged, and where the
/// stream breaks the rules the reader meets its end instead (hyper answers what came
/// before, a broken body with 400, then closes the connection). Bodies of known length,
/// and everything once the guard is off, are read straight into the reader's buffer.
pub struct Guarded<T> {
    inner: T,
    guard: RequestGuard,
    /// Where the proxy says whether a request that may switch protocols did.
    conn: Arc<ConnBytes>,
    /// Read from `inner`, not yet handed on: the front `cleared` bytes are judged.
    pending: BytesMut,
    cleared: usize,
    refused: Option<crate::http1::Error>,
    /// Bytes handed to the reader.
    handed: u64,
    hold: Duration,
    /// Runs while a refused head is held behind requests hyper still answers.
    holding: Option<Pin<Box<Sleep>>>,
    /// Bytes of the answer to a refused first head written.
    answered: usize,
    /// Runs while part of a head is held: `hold` after its first bytes, the stream ends.
    head_timer: Option<Pin<Box<Sleep>>>,
}

impl<T> Guarded<T> {
    /// `hold`: the connection's `header_read`: how long part of a head may take to
    /// become whole, and how long a refused head behind other requests is held, before
    /// the stream ends.
    pub fn new(inner: T, conn: Arc<ConnBytes>, hold: Duration) -> Guarded<T> {
        Guarded {
            inner,
            guard: RequestGuard::default(),
            conn,
            pending: BytesMut::new(),
            cleared: 0,
            refused: None,
            handed: 0,
            hold,
            holding: None,
            answered: 0,
            head_timer: None,
        }
    }

    /// The stream, and bytes read from it that the reader has not had.
    pub fn into_inner(self) -> (T, BytesMut) {
        (self.inner, self.pending)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.cleared > 0 {
                let n = this.cleared.min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                this.cleared -= n;
                this.handed += n as u64;
                return Poll::Ready(Ok(()));
            }
            if this.guard.is_switching() {
                // Nothing more passes until the proxy has answered the request that may
                // switch protocols: a refused CONNECT, or an `Upgrade` not taken up,
                // leaves the connection HTTP, and still judged.
                let switched = ready!(this.conn.poll_switch(cx));
                this.guard.switched(switched);
                continue;
            }
            if this.refused.is_some() {
                // Never an error, which would drop the connection with the responses
                // still owed to the requests before. A body that breaks ends the
                // stream: hyper fails that body (400) and closes after its response.
                // A refused head after others waits unread: hyper answers the
                // requests before it; the stream ends `hold` later (or when the client
                // leaves). One with nothing before it ends the stream at once.
                if this.handed > 0 && this.guard.is_between_messages() {
                    return this.poll_hold(cx);
                }
                if this.handed == 0
                    && let Some(status) = this.guard.refused_head()
                {
                    // The first head: hyper has read nothing and owes nothing, so the
                    // answer nginx gives goes out here, then the end of the stream.
                    ready!(this.poll_answer(cx, status))?;
                }
                return Poll::Ready(Ok(()));
            }
            if !this.pending.is_empty() {
                match this.guard.check(&this.pending) {
                    Ok(0) => {
                        // Part of a head, held until whole: hyper (and hyper-util's
                        // protocol sniffing before it) sees none of it, so its own
                        // `header_read` timer may not be running. This one is.
                        let hold = this.hold;
                        let timer = this
                            .head_timer
                            .get_or_insert_with(|| Box::pin(tokio::time::sleep(hold)));
                        if timer.as_mut().poll(cx).is_ready() {
                            tracing::debug!(
                                "request head not complete within header_read: closing"
                            );
                            return Poll::Ready(Ok(()));
                        }
                    }
                    Ok(n) => {
                        this.head_timer = None;
                        this.cleared = n;
                        continue;
                    }
                    Err(e) => {
                        tracing::debug!("request stream refused before hyper read it: {e}");
                        this.refused = Some(e);
                        continue;
                    }
                }
            } else if let Some(limit) = this.direct() {
                // Nothing to look at: straight into the reader's buffer, no copy.
                let before = buf.filled().len();
                if limit >= buf.remaining() {
                    ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
                } else {
                    let mut part = buf.take(limit);
                    ready!(Pin::new(&mut this.inner).poll_read(cx, &mut part))?;
                    let n = part.filled().len();
                    // SAFETY: the read just initialised these `n` bytes of `buf`'s
                    // unfilled part (`part` is a view of it).
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                }
                let n = buf.filled().len() - before;
                this.guard.passed(n);
                this.handed += n as u64;
                return Poll::Ready(Ok(()));
            }
            // A head, or a chunked body, needs more bytes to be judged.
            if this.pending.capacity() - this.pending.len() < 1024 {
                this.pending.reserve(8 * 1024);
            }
            if ready!(poll_read_buf(
                Pin::new(&mut this.inner),
                cx,
                &mut this.pending
            ))? == 0
            {
                // The peer closed: what is held goes on, for the reader to find it
                // incomplete; then the end.
                if this.pending.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                this.cleared = this.pending.len();
            }
        }
    }
}

impl<T: AsyncRead + Unpin> Guarded<T> {
    /// The wait behind a refused head: ends (an end of stream for hyper, which then
    /// closes once its responses are out) when `hold` has passed, and at once when the
    /// client closes or fails. The socket is still read meanwhile, what arrives
    /// dropped: that keeps its idle timer and its close in view.
    fn poll_hold(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let hold = self.hold;
        let timer = self
            .holding
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(hold)));
        if timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Ok(()));
        }
        let mut scratch = [0u8; 1024];
        // Bounded per wake: a client pouring bytes in cannot keep this task busy.
        for _ in 0..64 {
            let mut rb = ReadBuf::new(&mut scratch);
            ready!(Pin::new(&mut self.inner).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                return Poll::Ready(Ok(()));
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl<T: AsyncWrite + Unpin> Guarded<T> {
    /// Writes the short answer to a refused first head (once), as Strait's own server
    /// would give it: 400 or 501, `Connection: close`.
    fn poll_answer(
        &mut self,
        cx: &mut Context<'_>,
        status: http::StatusCode,
    ) -> Poll<io::Result<()>> {
        let answer: &[u8] = if status == http::StatusCode::NOT_IMPLEMENTED {
            b"HTTP/1.1 501 Not Implemented\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 20\r\nconnection: close\r\n\r\n501 not implemented\n"
        } else {
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 16\r\nconnection: close\r\n\r\n400 bad request\n"
        };
        while self.answered < answer.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &answer[self.answered..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.answered += n;
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }
}

impl<T> Guarded<T> {
    /// How many bytes may be read without a look: all once the guard is off, the rest
    /// of a body of known length.
    fn direct(&self) -> Option<usize> {
        if self.guard.is_off() {
            return Some(usize::MAX);
        }
        self.guard
            .body_left()
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
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
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn judged_bytes_pass_and_the_stream_ends_where_it_breaks_the_rules() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut guarded = Guarded::new(server, Arc::default(), Duration::from_secs(15));
        let good = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 70\r\n\r\n";
        let body = [b'b'; 70];
        let bad = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let writer = tokio::spawn(async move {
            client.write_all(good).await.unwrap();
            client.write_all(&body).await.unwrap();
            client.write_all(bad).await.unwrap();
            client
        });
        let mut got = vec![0u8; good.len() + body.len()];
        guarded.read_exact(&mut got).await.unwrap();
        assert!(got.starts_with(good) && got.ends_with(&body));
        // The refused head waits unread: hyper still owes the first a response.
        let mut more = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_millis(100), guarded.read(&mut more));
        assert!(read.await.is_err(), "a refused head was handed on");
        let (_, held) = guarded.into_inner();
        assert_eq!(&held[..], &bad[..], "the refused head is held, not lost");
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn a_refused_first_head_is_answered_then_the_stream_ends() {
        let (mut client, server) = tokio::io::duplex(256);
        let mut guarded = Guarded::new(server, Arc::default(), Duration::from_secs(15));
        client
            .write_all(
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
            )
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(guarded.read(&mut buf).await.unwrap(), 0);
        let mut answer = [0u8; 24];
        client.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"HTTP/1.1 400 Bad Request");
    }

    #[tokio::test]
    async fn a_broken_chunked_body_ends_the_stream_after_what_passed() {
        let (mut client, server) = tokio::io::duplex(256);
        let mut guarded = Guarded::new(server, Arc::default(), Duration::from_secs(15));
        let head = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
        client.write_all(head).await.unwrap();
        client
            .write_all(b"0\r\nX: 1\n\nGET /hidden HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        guarded.read_to_end(&mut got).await.unwrap();
        assert!(got.starts_with(head), "{got:?}");
        assert!(!String::from_utf8_lossy(&got).contains("hidden"), "{got:?}");
    }
}
