//! CONNECT tunnels: after a 200, bytes flow both ways until either side closes or
//! `timeouts.idle` passes with no byte moving.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::forward::Access;

use tokio::time::Instant;

use super::{ConnBytes, ConnInfo, Meta, Proxy, Refusal, attribute_bytes, protocol_name};
use crate::access::{AccessLog, Entry};
use crate::body::{Body, RequestBody};
use crate::io::{IdleTimeoutIo, Slot, Slots};
use crate::metrics::{Kind, Label, Metrics};
use crate::upstream::UpstreamError;
use crate::upstream::connect::connect_tcp;

impl Proxy {
    /// Opens a tunnel to the authority a CONNECT request names (RFC 9110 §9.3.6).
    pub(super) async fn connect(
        &self,
        mut req: Request<RequestBody>,
        conn: ConnInfo,
        meta: &mut Meta,
        bytes: &Arc<ConnBytes>,
    ) -> Result<Response<Body>, Refusal> {
        meta.kind = Kind::Connect;
        let Some(policy) = &self.forward else {
            return Err(Refusal::BadRequest(
                "CONNECT with forward proxying off".into(),
            ));
        };
        match policy.check(req.headers()) {
            Access::Granted(user) => {
                if let Some(user) = user {
                    meta.user = Label(user);
                }
            }
            Access::Challenge => return Err(Refusal::AuthRequired),
            // A plain web server does not know CONNECT.
            Access::Hidden => {
                return Err(Refusal::BadRequest("CONNECT without credentials".into()));
            }
        }
        let Some(authority) = req.uri().authority() else {
            return Err(Refusal::BadRequest(
                "CONNECT target is not host:port".into(),
            ));
        };
        // Extended CONNECT (RFC 9113 §8.5) names a scheme, whose default port applies.
        let extended = req.extensions().get::<hyper::ext::Protocol>().is_some();
        let default_port = match req.uri().scheme_str() {
            Some("https") | Some("wss") if extended => Some(443),
            Some("http") | Some("ws") if extended => Some(80),
            _ => None,
        };
        let Some(port) = authority.port_u16().or(default_port) else {
            return Err(Refusal::BadRequest("CONNECT target has no port".into()));
        };
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let target: Arc<str> = Arc::from(authority.as_str());
        meta.upstream = Some(target.clone());
        if !policy.connect_ports.is_empty() && !policy.connect_ports.contains(&port) {
            return Err(Refusal::Denied(format!(
                "port {port} is not in connect_ports"
            )));
        }
        let upstream = connect_tcp(&host, port, &policy.deny, policy.profile.connect_timeout())
            .await
            .map_err(|e| Refusal::Upstream(UpstreamError::Connect(e)))?;

        let on_upgrade = hyper::upgrade::on(&mut req);
        let idle = self.idle_timeout;
        let account = TunnelEnd {
            metrics: self.metrics.clone(),
            access: self.access.clone(),
            bytes: bytes.clone(),
            user: meta.user.clone(),
            target,
            client: conn.peer,
            version: req.version(),
            start: Instant::now(),
        };
        self.metrics.tunnels_active.inc();
        self.tasks.spawn(async move {
            let mut client = match on_upgrade.await {
                Ok(upgraded) => TokioIo::new(upgraded),
                Err(e) => {
                    tracing::debug!(client = %account.client, "CONNECT upgrade failed: {e}");
                    return;
                }
            };
            let mut upstream = IdleTimeoutIo::new(upstream, idle);
            match relay(&mut client, &mut upstream).await {
                Ok((rx, tx)) => {
                    tracing::debug!(client = %account.client, target = %account.target, rx, tx, "tunnel closed")
                }
                Err(e) => {
                    tracing::debug!(client = %account.client, target = %account.target, "tunnel ended: {e}")
                }
            }
            // `account` drops here: the tunnel's bytes and log line.
        });
        let mut resp = Response::new(Body::Empty);
        *resp.status_mut() = StatusCode::OK;
        Ok(resp)
    }
}

/// Copies bytes both ways between `a` and `b` until each side has ended its half (the
/// other's write half is then shut down) or either fails: `copy_bidirectional`, with
/// buffers held only while bytes are in flight (see [`Held`]). Returns the bytes moved
/// from `a` to `b` and from `b` to `a`.
pub(super) async fn relay<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut forth = Pipe::default();
    let mut back = Pipe::default();
    poll_fn(|cx| {
        let forth_done = forth.poll(cx, &mut *a, &mut *b)?.is_ready();
        let back_done = back.poll(cx, &mut *b, &mut *a)?.is_ready();
        if forth_done && back_done {
            Poll::Ready(Ok((forth.moved, back.moved)))
        } else {
            Poll::Pending
        }
    })
    .await
}

/// One direction of a relay.
#[derive(Default)]
struct Pipe {
    /// The buffer, while it holds bytes or a read is being tried.
    held: Option<Held>,
    /// The bytes in `held` not yet written: `start..end`.
    start: usize,
    end: usize,
    /// Bytes written since the last flush.
    unflushed: bool,
    read_done: bool,
    done: bool,
    moved: u64,
}

impl Pipe {
    /// Ready once the source ended and the destination's write half is shut down.
    fn poll<R, W>(&mut self, cx: &mut Context<'_>, src: &mut R, dst: &mut W) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if let Some(held) = &self.held {
                while self.start < self.end {
                    let n = ready!(
                        Pin::new(&mut *dst).poll_write(cx, &held.buf[self.start..self.end])
                    )?;
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    self.start += n;
                    self.moved += n as u64;
                    self.unflushed = true;
                }
            }
            (self.start, self.end) = (0, 0);
            if self.read_done {
                ready!(Pin::new(&mut *dst).poll_shutdown(cx))?;
                self.done = true;
                continue;
            }
            let held = self.held.get_or_insert_with(Held::take);
            let mut read = ReadBuf::new(&mut held.buf);
            match Pin::new(&mut *src).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) if read.filled().is_empty() => {
                    self.read_done = true;
                    self.held = None;
                }
                Poll::Ready(Ok(())) => self.end = read.filled().len(),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Nothing to move: the buffer goes back, and what was written is
                    // flushed (a TLS stream may still hold it).
                    self.held = None;
                    if self.unflushed {
                        ready!(Pin::new(&mut *dst).poll_flush(cx))?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// A relay's buffer, taken when a direction tries to read and given back when it has
/// nothing left to move, so an idle tunnel holds none.
///
/// Large buffers make a bulk tunnel fast: a read takes all the source has queued, and
/// the destination's reader wakes once per write, not once per 32 KiB. Measured on a
/// loopback 512 MiB download (bench/compare, scenario 5b), against a direct one: 32 KiB
/// buffers ran at about 0.78 of direct, 256 KiB at about 0.90, 128 KiB and 1 MiB in
/// between. At most [`LARGE_MAX`] are in use at once; past that a direction copies
/// through [`SMALL`] bytes.
struct Held {
    buf: Box<[u8]>,
    _large: Option<Slot<&'static Slots>>,
}

/// The large buffer's size.
const LARGE: usize = 256 * 1024;
/// At most this many large buffers are in use at once (64 MiB).
const LARGE_MAX: usize = 256;
/// The buffer's size once [`LARGE_MAX`] are in use.
const SMALL: usize = 16 * 1024;
/// Buffers of each size kept for reuse by each thread, when given back: a direction
/// takes one each time it tries a read, so a busy thread reuses rather than allocates.
const SPARE_MAX: usize = 4;

static LARGE_IN_USE: Slots = Slots::new(LARGE_MAX);

thread_local! {
    /// This thread's given-back buffers: large ones, then small ones.
    static SPARE: RefCell<[Vec<Box<[u8]>>; 2]> = const { RefCell::new([Vec::new(), Vec::new()]) };
}

/// Where buffers of `len` bytes are kept in [`SPARE`].
fn spare_index(len: usize) -> usize {
    usize::from(len != LARGE)
}

impl Held {
    fn take() -> Held {
        let large = Slots::try_take(&LARGE_IN_USE);
        let len = if large.is_some() { LARGE } else { SMALL };
        let buf = SPARE
            .with_borrow_mut(|spare| spare[spare_index(len)].pop())
            .unwrap_or_else(|| vec![0; len].into_boxed_slice());
        Held { buf, _large: large }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        // `try_with`: a tunnel's task may be dropped while its thread is ending.
        let _ = SPARE.try_with(|spare| {
            let kept = &mut spare.borrow_mut()[spare_index(buf.len())];
            if kept.len() < SPARE_MAX {
                kept.push(buf);
            }
        });
    }
}

/// A tunnel's accounting, done when it closes (or its task ends any other way): the
/// connection's bytes since the CONNECT request, one access log line, the gauge.
struct TunnelEnd {
    metrics: Arc<Metrics>,
    access: Option<AccessLog>,
    bytes: Arc<ConnBytes>,
    user: Label,
    target: Arc<str>,
    client: std::net::SocketAddr,
    version: http::Version,
    start: Instant,
}

impl Drop for TunnelEnd {
    fn drop(&mut self) {
        self.metrics.tunnels_active.dec();
        let (rx, tx) = attribute_bytes(&self.bytes, Some(&self.metrics), Kind::Connect, &self.user);
        if let Some(log) = &self.access {
            log.log(&Entry {
                client: self.client,
                user: &self.user.0,
                method: "CONNECT",
                target: &self.target,
                protocol: protocol_name(self.version),
                status: 200,
                bytes_in: rx,
                bytes_out: tx,
                duration: self.start.elapsed(),
                kind: Kind::Connect.as_str(),
                route: "-",
                upstream: &self.target,
                referer: "-",
                user_agent: "-",
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The tests here count the process's large buffers: one at a time.
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    /// Bytes cross both ways, each half-close is passed on, and a tunnel with nothing
    /// to move holds no buffer.
    #[tokio::test]
    async fn relay_moves_both_ways_passes_half_closes_and_idles_without_a_buffer() {
        let _alone = ONE_AT_A_TIME.lock().await;
        let (mut client, mut near) = tokio::io::duplex(64 * 1024);
        let (mut far, mut origin) = tokio::io::duplex(64 * 1024);
        let relaying = tokio::spawn(async move { relay(&mut near, &mut far).await });

        client.write_all(b"hello").await.unwrap();
        let mut got = [0; 5];
        origin.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        // Idle now: both directions gave their buffers back.
        for _ in 0..100 {
            if LARGE_IN_USE.taken() == 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(LARGE_IN_USE.taken(), 0, "an idle tunnel holds a buffer");

        // A transfer larger than any buffer on the way, read while it is written.
        let big: Vec<u8> = (0..3 << 20).map(|i| (i % 251) as u8).collect();
        let sent = big.clone();
        let writer = tokio::spawn(async move {
            origin.write_all(&sent).await.unwrap();
            origin
        });
        let mut back = vec![0; big.len()];
        client.read_exact(&mut back).await.unwrap();
        assert!(back == big, "the bytes changed on the way");
        let mut origin = writer.await.unwrap();

        // The client ends its half: the origin sees the end and may still answer.
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        origin.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        origin.write_all(b"bye").await.unwrap();
        origin.shutdown().await.unwrap();
        let mut tail = Vec::new();
        client.read_to_end(&mut tail).await.unwrap();
        assert_eq!(tail, b"bye");

        let (forth, back) = relaying.await.unwrap().unwrap();
        assert_eq!((forth, back), (5, big.len() as u64 + 3));
        assert_eq!(LARGE_IN_USE.taken(), 0);
    }

    /// Past [`LARGE_MAX`] large buffers in use, a direction copies through a small one;
    /// the count goes back to zero as they are given back, and a thread keeps at most
    /// [`SPARE_MAX`] of each size for reuse.
    #[tokio::test]
    async fn large_buffers_are_bounded() {
        let _alone = ONE_AT_A_TIME.lock().await;
        let held: Vec<Held> = (0..LARGE_MAX).map(|_| Held::take()).collect();
        assert!(held.iter().all(|h| h.buf.len() == LARGE));
        let past = Held::take();
        assert_eq!(past.buf.len(), SMALL);
        assert_eq!(LARGE_IN_USE.taken(), LARGE_MAX);
        drop(past);
        drop(held);
        assert_eq!(LARGE_IN_USE.taken(), 0);
        // Only SPARE_MAX of those given back are kept; the next take reuses one.
        let large_kept = || SPARE.with_borrow(|spare| spare[spare_index(LARGE)].len());
        assert_eq!(large_kept(), SPARE_MAX);
        let again = Held::take();
        assert_eq!(again.buf.len(), LARGE);
        assert_eq!(large_kept(), SPARE_MAX - 1);
    }
}
