//! Strait's own HTTP/1.1 server for plain client connections.
//!
//! The common request is served here, in the connection's task, with nothing between
//! the socket and the proxy: HTTP/1.1, origin or absolute form, no body or a
//! Content-Length body of at most [`MAX_BODY`] bytes already in hand with its head (taken
//! whole), no `Expect`, no upgrade. Its head is parsed with httparse straight
//! into the request, with field values sharing the read buffer, and its response head
//! goes out together with the start of its body in one write. Between requests a
//! connection holds its socket and nothing else (it is *parked*).
//!
//! Everything else is handed, with every byte read so far, to a hyper session
//! ([`super::HyperSide`]): HTTP/1.0, CONNECT, upgrades, `Expect`, chunked or longer
//! bodies, short bodies still on their way (hyper streams them), a missing, repeated or
//! malformed `Host` (the proxy answers 400), heads that do not parse (hyper answers
//! 400), heads longer than [`MAX_HEAD`] or with more than [`MAX_FIELDS`] fields (hyper,
//! given the same limits, answers 431). hyper serves that connection as before and
//! gives the socket back once it sits idle between requests (park.rs).
//!
//! Framing fields are judged here for every head, before any hand-over
//! (`http1::framing::RequestFraming`): hyper normalises what nginx refuses (a length
//! beside `Transfer-Encoding`, repeated lengths), and after it the proxy could not tell.

use std::future::{Future, poll_fn};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, DATE, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri};
use http_body::Body as _;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, Sleep};
use tokio_util::io::poll_read_buf;

use super::handover::IDLE_LINGER;
use super::shutdown::Signal;
use super::{HyperSide, PlainIo, Shared, Shutdown, account_connection_end};
use crate::body::RequestBody;
use crate::http1::framing::{self, RequestFraming};
use crate::http1::{self, Framing, MAX_FIELDS, MAX_HEAD, chunked, decimal, list_has};
use crate::io::{CountingIo, IdleTimeoutIo, Slots};
use crate::proxy::{ConnBytes, ConnInfo, Tracked};
/// Request bodies of at most this many bytes (by Content-Length) that are in hand with
/// their head are taken whole; longer ones, and ones still on their way, stream
/// through hyper.
pub const MAX_BODY: usize = 64 * 1024;
/// At most this many parked connections keep their buffers (an 8 KiB read buffer, the
/// response head's buffer and a header map: about 10 KiB each) for their next request;
/// the others hold their socket alone. Busy keep-alive clients then allocate nothing
/// per request, and idle ones cost at most about 2.5 MiB in all.
pub const KEEP_BUFFERS: usize = 256;
/// What a read asks the socket for at least.
const READ_SIZE: usize = 8 * 1024;

/// Serves a plain HTTP/1.1 client connection until it closes, times out or shutdown
/// asks it to finish.
///
/// One loop, and every wait a `poll_fn` over this function's own state: the request's
/// future is the only one built per request (boxed), so nothing else is moved or
/// copied from one future into another (helper futures cost copies per request:
/// bench/proxy-instructions).
pub(super) async fn serve(
    stream: crate::net::Stream,
    info: ConnInfo,
    shared: Arc<Shared>,
    shutdown: Shutdown,
) {
    let bytes = Arc::new(ConnBytes::default());
    let (idle, keepalive) = {
        let settings = shared.settings.load();
        (settings.idle, settings.keepalive)
    };
    let mut io: PlainIo =
        IdleTimeoutIo::new(CountingIo::new(stream, bytes.clone()), idle).with_keepalive(keepalive);
    let mut buf = BytesMut::new();
    // The response head's bytes, and a header map for the next request (the last
    // response's, emptied): kept while the connection is busy.
    let mut out = Vec::new();
    let mut spare = HeaderMap::new();
    // `serve_plain` saw the first bytes arrive: the first head's clock runs from now.
    let mut head_since = Some(Instant::now());
    let mut head_timer: Option<Pin<Box<Sleep>>> = None;
    let mut signal: Option<Signal> = None;
    let mut hyper: Option<HyperSide> = None;
    /// What a head in hand, not yet served, leads to.
    enum Then {
        ReadMore,
        /// A whole head whose body (this many bytes with it) is not all in hand.
        TryBody(usize),
        Hyper,
    }
    'conn: loop {
        // A request: one already in hand, or read until one is.
        let (mut handling, head_only, close) = {
            let (req, close) = loop {
                if !buf.is_empty() {
                    // Decided before any await: a parse result is not kept across one.
                    let mut then = match parse(&mut buf, &mut spare) {
                        Parsed::Request { req, close, .. } => break (req, close),
                        Parsed::Partial => {
                            head_since.get_or_insert_with(Instant::now);
                            Then::ReadMore
                        }
                        Parsed::Body(n) => Then::TryBody(n),
                        Parsed::Hyper => Then::Hyper,
                    };
                    // A short body already in the socket (the last read stopped short of
                    // it) is read at once; one still on its way is not waited for: hyper
                    // streams it.
                    if let Then::TryBody(n) = then {
                        buf.reserve(n.saturating_sub(buf.len()));
                        let read = poll_fn(|cx| {
                            Poll::Ready(poll_read_buf(Pin::new(&mut io), cx, &mut buf))
                        });
                        match read.await {
                            Poll::Ready(Ok(n)) if n > 0 => continue,
                            Poll::Ready(_) => break 'conn,
                            Poll::Pending => then = Then::Hyper,
                        }
                    }
                    if let Then::Hyper = then {
                        let side =
                            hyper.get_or_insert_with(|| HyperSide::new(&shared, info, &bytes));
                        let unread = buf.split().freeze();
                        // Boxed: hyper's connection state is large and rarely needed
                        // (tests/parking.rs measures what a connection costs).
                        let session = side.serve(io, unread, head_since, &shared, &shutdown);
                        let Some((back, rest, since)) = Box::pin(session).await else {
                            break 'conn;
                        };
                        io = back;
                        buf = BytesMut::from(&rest[..]);
                        head_since = since;
                        continue;
                    }
                } else if head_since.is_none() {
                    // Nothing in hand: park until the client sends its next bytes. A
                    // connection without a place for its buffers holds its socket alone.
                    let kept = Slots::try_take(&shared.kept_buffers);
                    if kept.is_none() {
                        buf = BytesMut::new();
                        out = Vec::new();
                        spare = HeaderMap::new();
                    } else if buf.capacity() - buf.len() < READ_SIZE / 4 {
                        buf.reserve(READ_SIZE);
                    }
                    let parked = &shared.metrics.client_connections_parked;
                    parked.inc();
                    // The drain and trim signal is registered once, not once per park:
                    // it stays registered with this task (whose waker never changes),
                    // and the count tells whether one came. A drain already under way
                    // is seen by its flag.
                    let signal = signal.get_or_insert_with(|| Signal::new(&shutdown));
                    let signals = shutdown.signals();
                    let draining = shutdown.is_triggered();
                    let keep = kept.is_some();
                    io.set_between(true);
                    let resume = poll_fn(|cx| {
                        signal.arm(&shutdown, cx);
                        // A drain or a trim: either closes a parked connection.
                        if draining || shutdown.signals() != signals {
                            return Poll::Ready(false);
                        }
                        poll_parked(&mut io, &mut buf, keep, cx)
                    })
                    .await;
                    // After a handover, the client may be sending its next request
                    // right now: it gets an answer (`Connection: close`), not a reset.
                    let resume = resume
                        || (shutdown.is_triggered()
                            && shared.leaving.shared()
                            && Box::pin(last_request(&mut io, &mut buf, keep)).await);
                    io.set_between(false);
                    parked.dec();
                    drop(kept);
                    if !resume {
                        break 'conn;
                    }
                    // The next request's first bytes are in hand.
                    continue;
                }
                if buf.capacity() - buf.len() < READ_SIZE / 4 {
                    buf.reserve(READ_SIZE);
                }
                let read = poll_fn(|cx| {
                    if let Poll::Ready(r) = poll_read_buf(Pin::new(&mut io), cx, &mut buf) {
                        return Poll::Ready(Some(r));
                    }
                    // A head on its way: `header_read` bounds it, and shutdown ends it.
                    let Some(since) = head_since else {
                        return Poll::Pending;
                    };
                    let deadline = since + shared.settings.load().header_read;
                    let timer = head_timer
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                    if timer.deadline() != deadline {
                        timer.as_mut().reset(deadline);
                    }
                    if timer.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(None);
                    }
                    // A trim leaves a connection with a head on its way alone.
                    let signal = signal.get_or_insert_with(|| Signal::new(&shutdown));
                    signal.arm(&shutdown, cx);
                    if shutdown.is_triggered() {
                        return Poll::Ready(None);
                    }
                    Poll::Pending
                })
                .await;
                match read {
                    Some(Ok(n)) if n > 0 => {}
                    None if !shutdown.is_triggered() => {
                        tracing::debug!("request head not complete within header_read: closing");
                        break 'conn;
                    }
                    _ => break 'conn,
                }
            };
            head_since = None;
            let head_only = req.method() == Method::HEAD;
            // Boxed: a request's future is a few KiB, and a parked connection's task would
            // otherwise keep room for it (tests/parking.rs, bench/proxy-instructions).
            (
                Box::pin(shared.proxy.load_full().handle(req, info, bytes.clone())),
                head_only,
                close,
            )
        };
        // The blocks here and below keep the request and the response out of the
        // connection's future: what an await does not cross takes no room in it.
        let (framing, close, mut body) = {
            let resp = poll_fn(|cx| {
                if let Poll::Ready(resp) = handling.as_mut().poll(cx) {
                    return Poll::Ready(Some(resp));
                }
                // A client that leaves while its request is in flight cancels it (hyper
                // does the same); bytes it sends meanwhile are its next request.
                client_left(&mut io, &mut buf, cx).map(|()| None)
            })
            .await;
            drop(handling);
            let Some(resp) = resp else { break 'conn };
            // The head is encoded and its map kept for the next request at once.
            let (
                http::response::Parts {
                    status, headers, ..
                },
                body,
            ) = resp.into_parts();
            out.clear();
            // Near the connection cap, a connection closes rather than waits for more.
            let close = close || shutdown.is_triggered() || shared.limit.is_crowded();
            let (framing, close) = encode_head(&mut out, status, &headers, &body, head_only, close);
            spare = headers;
            spare.clear();
            (framing, close, body)
        };
        let mut sending = Sending::new(framing);
        let sent = poll_fn(|cx| sending.poll(&mut io, &out, &mut body, cx)).await;
        // The body's end (or its drop) does the request's accounting.
        drop(body);
        if !sent {
            // The response was cut short (the upstream's body failed or broke its
            // framing, or the client went away): a reset, so no client can take what
            // it got for a whole response that ended cleanly (RFC 9112 §6.3 rule 5).
            let _ = io.get_ref().get_ref().set_zero_linger();
            break;
        }
        if close {
            // FIN rather than a reset: the response's tail may still be on its way.
            let _ = io.shutdown().await;
            // Boxed: its read buffer would otherwise be room in every connection's
            // future (tests/parking.rs measures what a parked connection costs).
            Box::pin(linger(&mut io)).await;
            break;
        }
    }
    account_connection_end(&bytes);
}

/// Most a closing connection reads and drops, and for how long, before it closes.
const LINGER_BYTES: usize = 1 << 20;
const LINGER_TIME: std::time::Duration = std::time::Duration::from_secs(2);

/// Reads and drops what the client still sends after the last response, until it
/// closes its side (or [`LINGER_BYTES`] or [`LINGER_TIME`] pass): closing a socket with
/// unread bytes sends a reset, which can destroy the response before the client reads
/// it (a refused request's body still on its way). nginx's `lingering_close` does the
/// same.
async fn linger(io: &mut PlainIo) {
    let mut drop_buf = [0u8; 4096];
    let mut left = LINGER_BYTES;
    let drain = async {
        while left > 0 {
            match tokio::io::AsyncReadExt::read(io.get_mut(), &mut drop_buf).await {
                Ok(n) if n > 0 => left = left.saturating_sub(n),
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_TIME, drain).await;
}

/// A parked connection's wait: ready with true once the client's next bytes are in
/// `buf`, with false when it closed, failed or stayed idle for `timeouts.idle`.
///
/// With its buffer kept, the connection reads as soon as bytes arrive. Without, it
/// waits for readiness, then reads into a buffer made for that read; a readiness that
/// was a false positive drops the buffer again, and the wait goes on.
fn poll_parked(
    io: &mut PlainIo,
    buf: &mut BytesMut,
    keep: bool,
    cx: &mut Context<'_>,
) -> Poll<bool> {
    if !keep {
        match io.get_ref().get_ref().poll_read_ready(cx) {
            Poll::Ready(Ok(())) => buf.reserve(READ_SIZE),
            Poll::Ready(Err(_)) => return Poll::Ready(false),
            Poll::Pending => return io.poll_idle(cx).map(|()| false),
        }
    }
    // Through the idle wrapper: it ends the wait after `timeouts.idle`.
    match poll_read_buf(Pin::new(io), cx, buf) {
        Poll::Ready(r) => Poll::Ready(matches!(r, Ok(n) if n > 0)),
        Poll::Pending => {
            if !keep {
                *buf = BytesMut::new();
            }
            Poll::Pending
        }
    }
}

/// Waits up to [`IDLE_LINGER`] for a parked connection's next request (true: its
/// first bytes are in hand).
async fn last_request(io: &mut PlainIo, buf: &mut BytesMut, keep: bool) -> bool {
    let next = poll_fn(|cx| poll_parked(io, buf, keep, cx));
    tokio::time::timeout(IDLE_LINGER, next)
        .await
        .unwrap_or(false)
}

/// Ready when the client closed its side or its connection failed.
fn client_left(io: &mut PlainIo, buf: &mut BytesMut, cx: &mut Context<'_>) -> Poll<()> {
    loop {
        // With a head's worth in hand, stop reading: the rest waits in the socket.
        if buf.len() >= MAX_HEAD {
            return Poll::Pending;
        }
        if buf.capacity() == buf.len() {
            buf.reserve(READ_SIZE);
        }
        // Under the idle wrapper: waiting on a slow upstream is no client idleness.
        match poll_read_buf(Pin::new(io.get_mut()), cx, buf) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(()),
            Poll::Ready(Ok(_)) => {}
            Poll::Pending => return Poll::Pending,
        }
    }
}

/// A response on its way out: the head, then each body frame in its framing, one frame
/// at a time (the next is polled once the last is written; the first goes out with
/// the head when it is ready at once).
struct Sending {
    framing: Framing,
    /// How much of the head is written.
    head_at: usize,
    /// A chunk's size line, and how much of it is written.
    line: Vec<u8>,
    line_at: usize,
    data: Bytes,
    tail: &'static [u8],
    sent: u64,
    ended: bool,
}

impl Sending {
    fn new(framing: Framing) -> Sending {
        Sending {
            framing,
            head_at: 0,
            line: Vec::new(),
            line_at: 0,
            data: Bytes::new(),
            tail: b"",
            sent: 0,
            ended: framing == Framing::Done,
        }
    }

    /// Ready(true) once the whole response is written; Ready(false) when it cannot be
    /// (the client is gone, or the body failed or broke its length).
    fn poll(
        &mut self,
        io: &mut PlainIo,
        head: &[u8],
        body: &mut Tracked,
        cx: &mut Context<'_>,
    ) -> Poll<bool> {
        loop {
            let frame_out =
                self.line_at == self.line.len() && self.data.is_empty() && self.tail.is_empty();
            let all_out = frame_out && self.head_at == head.len();
            if frame_out && !self.ended {
                match Pin::new(&mut *body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        // Trailers are dropped: the client was never told of any
                        // (`Trailer` is hop-by-hop).
                        let Ok(d) = frame.into_data() else { continue };
                        if d.is_empty() {
                            continue;
                        }
                        self.sent += d.len() as u64;
                        if let Framing::Length(n) = self.framing
                            && self.sent > n
                        {
                            return Poll::Ready(false);
                        }
                        self.ended = body.is_end_stream();
                        if matches!(self.framing, Framing::Chunked(_)) {
                            self.line.clear();
                            self.line_at = 0;
                            chunked::size_line(&mut self.line, d.len());
                            self.tail = if self.ended {
                                b"\r\n0\r\n\r\n"
                            } else {
                                b"\r\n"
                            };
                        }
                        self.data = d;
                        continue;
                    }
                    Poll::Ready(Some(Err(_))) => return Poll::Ready(false),
                    Poll::Ready(None) => {
                        self.ended = true;
                        if matches!(self.framing, Framing::Chunked(_)) {
                            self.tail = chunked::LAST;
                        }
                        continue;
                    }
                    Poll::Pending if all_out => return Poll::Pending,
                    Poll::Pending => {}
                }
            } else if all_out {
                // Everything is written and the body has ended.
                let short = matches!(self.framing, Framing::Length(n) if self.sent < n);
                return Poll::Ready(!short);
            }
            let bufs = [
                std::io::IoSlice::new(&head[self.head_at..]),
                std::io::IoSlice::new(&self.line[self.line_at..]),
                std::io::IoSlice::new(&self.data),
                std::io::IoSlice::new(self.tail),
            ];
            let mut n = match Pin::new(&mut *io).poll_write_vectored(cx, &bufs) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(false),
                Poll::Ready(Ok(n)) => n,
                Poll::Pending => return Poll::Pending,
            };
            let h = n.min(head.len() - self.head_at);
            self.head_at += h;
            n -= h;
            let l = n.min(self.line.len() - self.line_at);
            self.line_at += l;
            n -= l;
            let d = n.min(self.data.len());
            self.data.advance(d);
            n -= d;
            self.tail = &self.tail[n..];
        }
    }
}

/// The response head, how its body is framed, and whether the connection closes
/// after it. The same choices as hyper's: a known length is sent as Content-Length,
/// an unknown one chunked; `Date` is added when missing.
fn encode_head(
    out: &mut Vec<u8>,
    status: StatusCode,
    headers: &HeaderMap,
    body: &Tracked,
    head_only: bool,
    mut close: bool,
) -> (Framing, bool) {
    out.reserve(128 + headers.len() * 40);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let bodiless = head_only
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let no_length = status.is_informational() || status == StatusCode::NO_CONTENT;
    let mut length = None;
    let mut has_date = false;
    let mut says_close = false;
    for (name, value) in headers {
        if *name == CONTENT_LENGTH {
            if no_length || length.is_some() {
                continue;
            }
            // Written canonical (digits only), whatever the upstream's spelling.
            if let Some(n) = http1::framing::parse_length(value.as_bytes()) {
                length = Some(n);
                out.extend_from_slice(b"content-length: ");
                out.extend_from_slice(decimal(n, &mut [0; 20]));
                out.extend_from_slice(b"\r\n");
            }
            continue;
        } else if *name == TRANSFER_ENCODING {
            // Strait frames the body itself.
            continue;
        } else if *name == DATE {
            has_date = true;
        } else if *name == CONNECTION {
            says_close |= list_has(value.as_bytes(), b"close");
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let framing = if bodiless {
        Framing::Done
    } else if let Some(n) = length {
        Framing::Length(n)
    } else if let Some(n) = body.size_hint().exact() {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(decimal(n, &mut [0; 20]));
        out.extend_from_slice(b"\r\n");
        Framing::Length(n)
    } else {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        Framing::CHUNKED
    };
    if !has_date {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(&crate::date::http_now());
        out.extend_from_slice(b"\r\n");
    }
    close |= says_close;
    if close && !says_close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    let framing = match framing {
        Framing::Length(0) => Framing::Done,
        f => f,
    };
    (framing, close)
}

/// What the bytes at the start of the read buffer hold.
// Only ever returned, never stored: boxing the request would cost an allocation each.
#[allow(clippy::large_enum_variant)]
enum Parsed {
    /// A whole request Strait serves (its body in hand, sharing the buffer too), its
    /// length, and whether the client asked to close after it.
    Request {
        req: Request<RequestBody>,
        len: usize,
        close: bool,
    },
    /// Not a whole head yet.
    Partial,
    /// A whole head whose body is not all in hand: the bytes head and body need.
    Body(usize),
    /// A head for hyper.
    Hyper,
}

/// Takes a whole head off the front of `buf` as a request, its field values sharing
/// the buffer (`headers` is emptied into it, keeping its room). Leaves `buf` as it was
/// unless the head is one Strait serves.
fn parse(buf: &mut BytesMut, headers: &mut HeaderMap) -> Parsed {
    // Everything in hand is frozen first, so the fields can share it; what follows the
    // head (a body, a pipelined request), or a head that is not served here, is copied
    // back: rare, or short.
    let held = buf.split().freeze();
    let parsed = parse_frozen(&held, headers);
    let from = match &parsed {
        Parsed::Request { len, .. } => *len,
        Parsed::Partial | Parsed::Body(_) | Parsed::Hyper => 0,
    };
    if from < held.len() {
        buf.extend_from_slice(&held[from..]);
    }
    parsed
}

/// Parses the head at the start of `b` and decides who serves it.
///
/// Every head read here has its framing fields judged by [`RequestFraming`] first,
/// whoever goes on to serve it: a head refused there is answered (400 or 501, then the
/// connection closes) even when hyper would have taken it, because hyper normalises
/// what nginx refuses (it drops a `Content-Length` beside `Transfer-Encoding` and
/// merges repeated lengths) and the proxy could no longer tell.
fn parse_frozen(b: &Bytes, spare: &mut HeaderMap) -> Parsed {
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_FIELDS];
    let mut parsed = httparse::Request::new(&mut []);
    let len = match parsed.parse_with_uninit_headers(b, &mut fields) {
        Ok(httparse::Status::Complete(n)) if n <= MAX_HEAD => n,
        Ok(httparse::Status::Partial) if b.len() < MAX_HEAD => return Parsed::Partial,
        // Too long, too many fields or no parse: hyper answers 431 or 400 by the same
        // limits (`super::http_builder`).
        _ => return Parsed::Hyper,
    };
    let (Some(version), Some(method), Some(target)) = (parsed.version, parsed.method, parsed.path)
    else {
        return Parsed::Hyper;
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::Hyper;
    };
    let mut framing = RequestFraming::default();
    let mut close = false;
    let mut host = false;
    let mut hyper = version != 1 || method == Method::CONNECT;
    let mut underscores = false;
    for f in parsed.headers.iter() {
        let name = f.name.as_bytes();
        // By length first: most fields are none of these.
        match name.len() {
            // One Host, a host[:port] (RFC 9112 §3.2); otherwise hyper takes the request
            // and the proxy answers 400.
            4 if name.eq_ignore_ascii_case(b"host") => {
                hyper |= host || !http1::is_host_port(f.value);
                host = true;
            }
            14 if name.eq_ignore_ascii_case(b"content-length") => {
                framing.content_length(f.value);
            }
            17 if name.eq_ignore_ascii_case(b"transfer-encoding") => {
                framing.transfer_encoding(f.value);
            }
            6 if name.eq_ignore_ascii_case(b"expect") => hyper = true,
            7 if name.eq_ignore_ascii_case(b"upgrade") => hyper = true,
            10 if name.eq_ignore_ascii_case(b"connection") => {
                hyper |= list_has(f.value, b"upgrade");
                close |= list_has(f.value, b"close");
            }
            _ => underscores |= !http1::is_forwarded_name(name),
        }
    }
    let (body, refused) = match framing.finish(version == 0) {
        Ok(framing::RequestBody::None) => (0, None),
        Ok(framing::RequestBody::Length(n)) if n <= MAX_BODY as u64 => (n as usize, None),
        // Longer, or chunked: hyper streams it.
        Ok(_) => {
            hyper = true;
            (0, None)
        }
        Err(refused) => (0, Some(refused)),
    };
    if refused.is_none() && (hyper || !host) {
        return Parsed::Hyper;
    }
    let absolute = |scheme: &str| {
        target
            .get(..scheme.len())
            .is_some_and(|s| s.eq_ignore_ascii_case(scheme))
    };
    // A refused head is answered here whatever its target (`*`, authority form): the
    // answer only needs one the log can show.
    if refused.is_none()
        && !(target.starts_with('/') || absolute("http://") || absolute("https://"))
    {
        return Parsed::Hyper;
    }
    let uri = match Uri::from_maybe_shared(b.slice_ref(target.as_bytes())) {
        Ok(uri) => uri,
        Err(_) if refused.is_some() => Uri::from_static("/"),
        Err(_) => return Parsed::Hyper,
    };
    if b.len() < len + body {
        return Parsed::Body(len + body);
    }
    let mut req = Request::new(match body {
        0 => RequestBody::Empty,
        n => RequestBody::Full(Some(b.slice(len..len + n))),
    });
    // The spare map (with its room) goes into the request, the request's new empty
    // one into the spare slot: nothing is made or dropped for it.
    let headers = req.headers_mut();
    std::mem::swap(headers, spare);
    // Room for the X-Forwarded-* fields the proxy adds.
    headers.reserve(parsed.headers.len() + 3);
    for f in parsed.headers.iter() {
        // Names with `_` are dropped, as nginx drops them (`http1::is_forwarded_name`).
        if underscores && !http1::is_forwarded_name(f.name.as_bytes()) {
            continue;
        }
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(f.name.as_bytes()),
            HeaderValue::from_maybe_shared(b.slice_ref(f.value)),
        ) else {
            headers.clear();
            std::mem::swap(headers, spare);
            return Parsed::Hyper;
        };
        headers.append(name, value);
    }
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    if let Some(refused) = refused {
        // The proxy answers it (logged and counted as any refusal); the connection
        // closes after, as what follows the head cannot be told from a body.
        req.extensions_mut().insert(refused);
        return Parsed::Request {
            req,
            len: b.len(),
            close: true,
        };
    }
    Parsed::Request {
        req,
        len: len + body,
        close,
    }
}

/// For fuzzing and differential tests: what Strait's own server makes of the bytes at
/// the start of a connection. Never panics, whatever the bytes.
#[doc(hidden)]
pub fn inspect(bytes: &[u8]) -> Inspected {
    let mut buf = BytesMut::from(bytes);
    match parse(&mut buf, &mut HeaderMap::new()) {
        Parsed::Request { req, len, close } => {
            match req.extensions().get::<http1::framing::Refused>() {
                Some(r) => Inspected::Refused(r.status.as_u16()),
                None => Inspected::Served {
                    len,
                    body: match req.body() {
                        RequestBody::Full(Some(b)) => b.len(),
                        _ => 0,
                    },
                    close,
                },
            }
        }
        Parsed::Partial | Parsed::Body(_) => Inspected::Partial,
        Parsed::Hyper => Inspected::Hyper,
    }
}

/// What [`inspect`] found.
#[doc(hidden)]
#[derive(Debug, PartialEq, Eq)]
pub enum Inspected {
    /// Served here: the message's length (head and body), its body's, and whether the
    /// connection closes after it.
    Served {
        len: usize,
        body: usize,
        close: bool,
    },
    /// Refused with this status; the connection closes.
    Refused(u16),
    /// Not whole yet.
    Partial,
    /// Handed to hyper with every byte.
    Hyper,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(head: &str) -> (Parsed, BytesMut) {
        let mut buf = BytesMut::from(head.as_bytes());
        (parse(&mut buf, &mut HeaderMap::new()), buf)
    }

    #[test]
    fn a_simple_head_becomes_a_request_sharing_the_buffer() {
        let (p, rest) = parsed(
            "GET /a?b=1 HTTP/1.1\r\nHost: example.com\r\nX-Two: 1\r\nx-two: 2\r\n\r\nGET /next",
        );
        let Parsed::Request { req, len, close } = p else {
            panic!("not served here")
        };
        assert_eq!((len, close), (62, false));
        assert!(matches!(req.body(), RequestBody::Empty));
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.uri(), "/a?b=1");
        assert_eq!(req.headers()["host"], "example.com");
        let two: Vec<_> = req.headers().get_all("x-two").iter().collect();
        assert_eq!(two, ["1", "2"]);
        assert_eq!(&rest[..], b"GET /next");
    }

    #[test]
    fn absolute_form_lengths_and_close_are_read() {
        let head = "POST http://example.com/x HTTP/1.1\r\nHost: example.com\r\nContent-Length: 5\r\nConnection: keep-alive, Close\r\n\r\n";
        // Until the body is in hand: the length head and body need, bytes untouched.
        let (p, rest) = parsed(&format!("{head}hel"));
        assert!(matches!(p, Parsed::Body(n) if n == head.len() + 5));
        assert_eq!(rest.len(), head.len() + 3);
        let (p, rest) = parsed(&format!("{head}helloGET"));
        let Parsed::Request { req, len, close } = p else {
            panic!("not served here")
        };
        assert_eq!(req.uri().host(), Some("example.com"));
        assert_eq!((len, close), (head.len() + 5, true));
        assert!(matches!(req.body(), RequestBody::Full(Some(b)) if b == "hello"));
        assert_eq!(&rest[..], b"GET");
    }

    #[test]
    fn names_addresses_ports_and_an_empty_host_are_served() {
        for host in [
            "example.com",
            "127.0.0.1:8080",
            "[::1]:80",
            "xn--bcher-kva.example",
            "",
        ] {
            let head = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
            assert!(
                matches!(parsed(&head).0, Parsed::Request { .. }),
                "{host:?} not served here"
            );
        }
    }

    #[test]
    fn partial_heads_wait_for_more() {
        assert!(matches!(
            parsed("GET / HTTP/1.1\r\nHost: x\r\n").0,
            Parsed::Partial
        ));
        assert!(matches!(parsed("GE").0, Parsed::Partial));
    }

    #[test]
    fn unusual_requests_go_to_hyper_with_their_bytes() {
        for head in [
            "GET / HTTP/1.0\r\nHost: x\r\n\r\n",
            "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 65537\r\n\r\n",
            "PUT / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\n\r\n",
            "GET /\u{1} HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nBad Name: x\r\n\r\n",
            // Host missing, repeated or not a host[:port]: the proxy answers 400.
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nhost: x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: u@x\r\n\r\n",
        ] {
            let (p, rest) = parsed(head);
            assert!(matches!(p, Parsed::Hyper), "{head:?} served here");
            assert_eq!(&rest[..], head.as_bytes(), "{head:?} lost bytes");
        }
        let many: String = (0..=MAX_FIELDS).map(|i| format!("x-{i}: y\r\n")).collect();
        let head = format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n");
        assert!(matches!(parsed(&head).0, Parsed::Hyper));
        let long = format!("GET / HTTP/1.1\r\nHost: x\r\nx: {}", "y".repeat(MAX_HEAD));
        assert!(matches!(parsed(&long).0, Parsed::Hyper));
    }

    #[test]
    fn framing_faults_are_refused_here_whoever_would_serve() {
        for (head, status) in [
            (
                "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                501,
            ),
            (
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                400,
            ),
            (
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
                400,
            ),
            (
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +1\r\n\r\nx",
                400,
            ),
            (
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 18446744073709551615\r\n\r\n",
                400,
            ),
            // With Expect (hyper's otherwise), as HTTP/1.0, with a target hyper would take.
            (
                "POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
                400,
            ),
            (
                "POST / HTTP/1.0\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                400,
            ),
            (
                "POST * HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
                400,
            ),
        ] {
            let (p, rest) = parsed(head);
            let Parsed::Request { req, close, len } = p else {
                panic!("{head:?} not refused here")
            };
            let refused = req.extensions().get::<http1::framing::Refused>().unwrap();
            assert_eq!(refused.status.as_u16(), status, "{head:?}");
            assert!(close, "{head:?} keeps the connection");
            assert_eq!((len, rest.len()), (head.len(), 0), "{head:?}");
        }
    }

    #[test]
    fn underscored_names_are_dropped() {
        let (p, _) =
            parsed("GET / HTTP/1.1\r\nHost: x\r\nX_Forwarded_For: 6.6.6.6\r\nA: b\r\n\r\n");
        let Parsed::Request { req, .. } = p else {
            panic!("not served here")
        };
        assert!(req.headers().get("x_forwarded_for").is_none());
        assert_eq!(req.headers()["a"], "b");
    }
}
