//! Strait's HTTP/1.1 client side: one upstream connection, driven by the request that
//! holds it.
//!
//! hyper's client runs each connection in a task of its own and passes requests,
//! responses and body chunks across channels: two task wake-ups and a handful of channel
//! operations per exchange, which was the largest share of Strait's CPU per request
//! that was not HTTP itself. Here the request's own task writes the head, reads the
//! response head and, through the response body, the body; an idle connection is plain
//! data on the pool's list. Parsing is httparse's (the parser hyper uses); framing
//! follows RFC 9112 §6 and §7.
//!
//! A request body keeps streaming after the response head arrived (an origin may answer
//! before it read the whole body, or echo it as it reads): [`H1Conn::poll_body`] moves
//! both directions. A connection is reusable only when both messages ended cleanly and
//! nothing is left over ([`H1Conn::is_clean`]).

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, PROXY_AUTHORIZATION, TE, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, Method, Request, Response};
use http_body::{Body as _, Frame};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use super::{Http, Reply, SendError};
use crate::body::RequestBody;
use crate::http1::chunked::{self, Chunk};
use crate::http1::response::Hop;
use crate::http1::{self, Framing};
use crate::io::{Slot, Slots};
use crate::upstream::connect::Stream;
use crate::upstream::pool::{ConnShared, Inner};
use crate::upstream::via::AbsoluteForm;

/// Room made for the response head (and, usually, a small body with it).
const READ_HEAD: usize = 8 * 1024;
/// Most bytes asked of the socket by one read of a body.
const READ_BODY: usize = 64 * 1024;
/// Request body bytes gathered (what the client already sent) before a write, so a
/// small body leaves in the same segment as its head.
const UPLOAD_BATCH: usize = 64 * 1024;

/// Why an exchange on an HTTP/1.1 connection failed.
#[derive(Debug)]
pub enum Error {
    Io(io::Error),
    /// The upstream closed the connection before the response head was complete.
    ClosedBeforeHead,
    /// The upstream closed the connection before the response body's end.
    ClosedMidBody,
    /// The response broke the wire format (`http1`), or was too large.
    Wire(http1::Error),
    /// The client's request body failed (it went away or broke its framing).
    RequestBody(crate::body::BoxError),
    /// The request body ended before the length its `Content-Length` announced.
    ShortRequestBody,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(e) => write!(f, "upstream connection: {e}"),
            Error::ClosedBeforeHead => {
                f.write_str("upstream closed the connection before a response")
            }
            Error::ClosedMidBody => {
                f.write_str("upstream closed the connection before the response body's end")
            }
            Error::Wire(http1::Error::TooLarge) => f.write_str("upstream response head too large"),
            Error::Wire(e) => write!(f, "malformed response from upstream: {e}"),
            Error::RequestBody(e) => write!(f, "reading the request body: {e}"),
            Error::ShortRequestBody => f.write_str("request body shorter than its Content-Length"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io(e) => Some(e),
            Error::RequestBody(e) => Some(&**e),
            _ => None,
        }
    }
}

impl From<http1::Error> for Error {
    fn from(e: http1::Error) -> Self {
        Error::Wire(e)
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}

/// A failed exchange, and whether the upstream surely did not act on the request: no
/// response byte came before the connection closed or reset (RFC 9110 §9.2.2 allows an
/// idempotent request to be sent again then).
#[derive(Debug)]
pub struct ExchangeFailure {
    pub error: Error,
    pub no_response: bool,
    /// The request as written, when it had no body or one in memory and got no
    /// response byte: it can go again, byte for byte, on another HTTP/1.1 connection.
    pub replay: Option<Written>,
}

/// A request as it went on the wire (head, and a body that was in memory). Sending it
/// again costs no copy of its fields.
#[derive(Debug, Clone)]
pub struct Written {
    head: Bytes,
    body: Option<Bytes>,
    head_only: bool,
    upgrade: bool,
}

/// Bytes waiting to be written, in order (a head, then body pieces with their chunk
/// framing), written with vectored writes and never copied together.
#[derive(Default)]
struct WriteQueue {
    parts: VecDeque<Bytes>,
    /// Bytes queued.
    len: usize,
}

impl WriteQueue {
    fn push(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.len += b.len();
            self.parts.push_back(b);
        }
    }

    fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// Writes until the queue is empty or the socket is full.
    fn poll_write(&mut self, io: &mut Stream, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.parts.is_empty() {
            let mut slices = [IoSlice::new(&[]); 8];
            let n_slices = self.parts.len().min(slices.len());
            for (slot, part) in slices.iter_mut().zip(self.parts.iter()) {
                *slot = IoSlice::new(part);
            }
            let mut n = ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices[..n_slices]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.len -= n;
            while n > 0 {
                let front = self.parts.front_mut().expect("written bytes were queued");
                if n >= front.len() {
                    n -= front.len();
                    self.parts.pop_front();
                } else {
                    front.advance(n);
                    n = 0;
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// How a request body is put on the wire.
#[derive(Debug, Clone, Copy)]
enum Encoder {
    /// Exactly this many bytes still to write (`Content-Length`).
    Length(u64),
    Chunked,
}

impl Encoder {
    fn encode(&mut self, data: Bytes, q: &mut WriteQueue) {
        match self {
            Encoder::Length(left) => {
                // More than announced would be taken for the next request: cut it.
                let n = (data.len() as u64).min(*left) as usize;
                *left -= n as u64;
                q.push(data.slice(..n));
            }
            Encoder::Chunked => {
                if data.is_empty() {
                    return;
                }
                let mut line = Vec::with_capacity(18);
                http1::chunked::size_line(&mut line, data.len());
                q.push(Bytes::from(line));
                q.push(data);
                q.push(Bytes::from_static(b"\r\n"));
            }
        }
    }

    fn finish(&self, q: &mut WriteQueue) -> Result<(), Error> {
        match self {
            Encoder::Length(0) => Ok(()),
            Encoder::Length(_) => Err(Error::ShortRequestBody),
            Encoder::Chunked => {
                q.push(Bytes::from_static(http1::chunked::LAST));
                Ok(())
            }
        }
    }
}

/// A request body on its way: what is queued, what is still to be read from the client.
struct Upload {
    queue: WriteQueue,
    body: RequestBody,
    encoder: Encoder,
    /// The client's body ended and its end is queued.
    ended: bool,
}

/// One HTTP/1.1 connection to an upstream.
pub struct H1Conn {
    io: Stream,
    /// Bytes read and not yet consumed: a partial head, or body bytes.
    buf: BytesMut,
    /// The request body still being sent, if any.
    upload: Option<Upload>,
    /// Set when anything left the connection in an unknown state.
    broken: bool,
    /// A response byte arrived for the current request.
    answered: bool,
    /// The current request as written, while it could be sent again.
    written: Option<Written>,
    /// What the last response head said about the connection.
    hop: Hop,
    /// The current request carries `Upgrade`: a 101 may answer it.
    asks_upgrade: bool,
    /// Room kept from one exchange for the next: the written request's header map
    /// (emptied) takes the response's fields, and the write queue's slots are reused.
    spare_headers: HeaderMap,
    spare_queue: VecDeque<Bytes>,
    head_buf: BytesMut,
    /// Set while idle with its read buffer kept.
    kept: Option<Slot<Arc<Slots>>>,
    /// A read reserved more than a head's room: the buffer is not worth keeping.
    big_reads: bool,
    /// Set on a connection to another proxy: requests go in absolute form, with its
    /// credentials.
    absolute: Option<Box<AbsoluteForm>>,
}

impl H1Conn {
    pub fn new(io: Stream) -> H1Conn {
        H1Conn {
            io,
            buf: BytesMut::new(),
            upload: None,
            broken: false,
            answered: false,
            written: None,
            hop: Hop::default(),
            asks_upgrade: false,
            spare_headers: HeaderMap::new(),
            spare_queue: VecDeque::new(),
            head_buf: BytesMut::new(),
            kept: None,
            big_reads: false,
            absolute: None,
        }
    }

    /// Writes requests in absolute form, for a proxy in between.
    pub fn set_absolute_form(&mut self, form: AbsoluteForm) {
        self.absolute = Some(Box::new(form));
    }

    /// What the last response head said about the connection.
    pub fn hop(&self) -> Hop {
        self.hop
    }

    /// True when the connection may carry another request: the last request and
    /// response ended cleanly and no stray byte is buffered.
    pub fn is_clean(&self) -> bool {
        !self.broken && self.upload.is_none() && self.buf.is_empty()
    }

    /// Ready for the idle list: keeps the read buffer while a place in `kept` is free
    /// and this one's reads were head-sized; drops it otherwise (the connection then
    /// holds no memory beyond its socket).
    pub fn rest(&mut self, kept: &Arc<Slots>) {
        if !self.big_reads {
            self.kept = Slots::try_take(kept.clone());
            if self.kept.is_some() {
                return;
            }
        }
        self.shed();
    }

    /// The connection after a 101: its stream, and the bytes of the new protocol that
    /// came with the response head.
    pub fn into_io(self) -> (Stream, BytesMut) {
        (self.io, self.buf)
    }

    /// Drops the read buffer.
    pub fn shed(&mut self) {
        self.buf = BytesMut::new();
        self.head_buf = BytesMut::new();
        self.big_reads = false;
    }

    /// The rest of a body of known length when all of it is already buffered and the
    /// request was sent whole: the connection is then done with this exchange.
    pub fn take_whole(&mut self, framing: Framing) -> Option<Bytes> {
        match framing {
            Framing::Length(n) if n > 0 && self.buf.len() as u64 == n && self.upload.is_none() => {
                Some(self.buf.split().freeze())
            }
            _ => None,
        }
    }

    /// Checks, without waiting, that an idle connection is still open: the upstream
    /// neither closed it nor sent anything (no byte may arrive between exchanges).
    pub fn is_alive(&mut self) -> bool {
        let mut probe = [0u8; 64];
        // Answered from the socket's known readiness when nothing arrived (the usual
        // case): no system call, no waker to register.
        let idle =
            |r: io::Result<usize>| matches!(r, Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        match &self.io {
            Stream::Plain(tcp) => return idle(tcp.try_read(&mut probe)),
            Stream::Unix(unix) => return idle(unix.try_read(&mut probe)),
            _ => {}
        }
        // TLS: a session ticket may arrive while idle, which the TLS layer takes without
        // handing any byte up.
        let mut cx = Context::from_waker(Waker::noop());
        let mut rb = ReadBuf::new(&mut probe);
        matches!(
            Pin::new(&mut self.io).poll_read(&mut cx, &mut rb),
            Poll::Pending
        )
    }

    /// Queues a request (origin form, `Host` set); [`H1Conn::poll_exchange`] then sends
    /// it and reads the response head. A streamed request body goes on being sent while
    /// the response body is read ([`H1Conn::poll_body`]). Returns whether the response
    /// has a head only (a `HEAD` request).
    pub fn begin(&mut self, req: Request<RequestBody>) -> bool {
        self.kept = None;
        let head_only = req.method() == Method::HEAD;
        self.start(req);
        head_only
    }

    /// Queues a request written before (on a connection that failed it) to go once
    /// more, as [`H1Conn::begin`] does.
    pub fn begin_written(&mut self, w: Written) -> bool {
        self.kept = None;
        let head_only = w.head_only;
        let mut queue = WriteQueue::default();
        queue.push(w.head.clone());
        if let Some(body) = &w.body {
            queue.push(body.clone());
        }
        self.upload = Some(Upload {
            queue,
            body: RequestBody::Empty,
            encoder: Encoder::Length(0),
            ended: true,
        });
        self.answered = false;
        self.asks_upgrade = w.upgrade;
        self.written = Some(w);
        head_only
    }

    /// Queues the request head (with a body already in memory).
    fn start(&mut self, req: Request<RequestBody>) {
        let (parts, mut body) = req.into_parts();
        // The head is written into room kept from the last one: once the last head's
        // bytes are gone (written, and no replay copy left), that room is reused.
        self.written = None;
        let mut head = std::mem::take(&mut self.head_buf);
        head.reserve(256);
        head.extend_from_slice(parts.method.as_str().as_bytes());
        head.extend_from_slice(b" ");
        // Origin form: `http://h?x=1` has an empty path, which goes as `/` (RFC 9112
        // §3.2.1); the proxy's URIs always carry a path otherwise.
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        if let Some(form) = &self.absolute {
            head.extend_from_slice(&form.origin);
        }
        if !target.starts_with('/') && target != "*" {
            head.extend_from_slice(b"/");
        }
        head.extend_from_slice(target.as_bytes());
        head.extend_from_slice(b" HTTP/1.1\r\n");
        let mut has_length = None;
        self.asks_upgrade = false;
        for (name, value) in &parts.headers {
            self.asks_upgrade |= name == UPGRADE;
            if name == TRANSFER_ENCODING || name == TE {
                // Framing is this side's choice; a client's coding never crosses. `TE`
                // comes only from an HTTP/2 client (its `trailers`, for an HTTP/2 hop).
                continue;
            }
            if self.absolute.is_some() && name == PROXY_AUTHORIZATION {
                // The proxy in between gets its own credentials, never a client's.
                continue;
            }
            if name == CONTENT_LENGTH {
                // Written below, canonical, from the value the client's server checked.
                has_length = has_length.or(http1::framing::parse_length(value.as_bytes()));
                continue;
            }
            head.extend_from_slice(name.as_str().as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        if let Some(auth) = self.absolute.as_ref().and_then(|f| f.auth.as_ref()) {
            head.extend_from_slice(b"proxy-authorization: ");
            head.extend_from_slice(auth.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        let mut queue = WriteQueue {
            parts: std::mem::take(&mut self.spare_queue),
            len: 0,
        };
        let mut full = None;
        let (encoder, ended) = match &mut body {
            RequestBody::Empty => {
                if has_length.is_some() || method_wants_length(&parts.method) {
                    head.extend_from_slice(b"content-length: 0\r\n");
                }
                (Encoder::Length(0), true)
            }
            RequestBody::Full(data) => {
                let data = data.take().unwrap_or_default();
                write_length(&mut head, data.len() as u64);
                full = Some(data);
                (Encoder::Length(0), true)
            }
            b => match (has_length, b.size_hint().exact()) {
                (Some(n), _) => {
                    write_length(&mut head, n);
                    (Encoder::Length(n), false)
                }
                (None, Some(n)) => {
                    write_length(&mut head, n);
                    (Encoder::Length(n), false)
                }
                (None, None) => {
                    head.extend_from_slice(b"transfer-encoding: chunked\r\n");
                    (Encoder::Chunked, false)
                }
            },
        };
        head.extend_from_slice(b"\r\n");
        self.spare_headers = parts.headers;
        self.spare_headers.clear();
        self.head_buf = head.split_off(head.len());
        let head = head.freeze();
        queue.push(head.clone());
        if let Some(data) = &full {
            queue.push(data.clone());
        }
        // Kept only where a replay can happen: an idempotent request whose body was in
        // memory (a non-idempotent one is never sent twice).
        self.written =
            (ended && crate::upstream::retry::is_idempotent(&parts.method)).then(|| Written {
                head,
                body: full,
                head_only: parts.method == Method::HEAD,
                upgrade: self.asks_upgrade,
            });
        self.upload = Some(Upload {
            queue,
            body: if ended { RequestBody::Empty } else { body },
            encoder,
            ended,
        });
        self.answered = false;
    }

    /// Moves the request body as far as it goes without waiting. A failure ends the
    /// upload and marks the connection broken; the response may still come (an origin
    /// that refuses a body often answers, then closes).
    fn poll_upload(&mut self, cx: &mut Context<'_>) -> Result<(), Error> {
        let H1Conn {
            io,
            upload,
            broken,
            spare_queue,
            ..
        } = self;
        let Some(up) = upload else {
            return Ok(());
        };
        let result = 'upload: loop {
            // What the client already sent joins what is queued, up to a bound.
            let mut body_waits = false;
            while !up.ended && up.queue.len < UPLOAD_BATCH {
                match Pin::new(&mut up.body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        // Trailers of a client's chunked body are not forwarded.
                        if let Ok(data) = frame.into_data() {
                            up.encoder.encode(data, &mut up.queue);
                        }
                    }
                    Poll::Ready(Some(Err(e))) => break 'upload Err(Error::RequestBody(e)),
                    Poll::Ready(None) => {
                        if let Err(e) = up.encoder.finish(&mut up.queue) {
                            break 'upload Err(e);
                        }
                        up.ended = true;
                    }
                    Poll::Pending => {
                        body_waits = true;
                        break;
                    }
                }
            }
            if !up.queue.is_empty() {
                match up.queue.poll_write(io, cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(e)) => break Err(Error::Io(e)),
                    Poll::Pending => return Ok(()),
                }
            }
            if up.ended {
                match Pin::new(&mut *io).poll_flush(cx) {
                    Poll::Ready(Ok(())) => break Ok(()),
                    Poll::Ready(Err(e)) => break Err(Error::Io(e)),
                    Poll::Pending => return Ok(()),
                }
            }
            if body_waits {
                return Ok(());
            }
        };
        if let Some(up) = upload.take() {
            *spare_queue = up.queue.parts;
            spare_queue.clear();
        }
        if result.is_err() {
            *broken = true;
        }
        result
    }

    /// Moves a begun exchange along: the request out, the response head in.
    pub fn poll_exchange(
        &mut self,
        cx: &mut Context<'_>,
        head_only: bool,
    ) -> Poll<Result<Response<Framing>, ExchangeFailure>> {
        // A failed upload is reported only if no response explains it.
        let upload_error = self.poll_upload(cx).err();
        let polled = self.poll_head(cx, head_only);
        match polled {
            Poll::Ready(Ok(resp)) => {
                self.written = None;
                // A final response before the whole request went out: the origin may
                // not read the rest (RFC 9110 §10.1.1 lets it answer first), and what
                // it leaves unread it would parse as the next request, another
                // client's. The body goes on being sent; the connection is not reused.
                if self.upload.is_some() {
                    self.broken = true;
                }
                Poll::Ready(Ok(resp))
            }
            Poll::Ready(Err(e)) => {
                self.broken = true;
                let no_response = !self.answered
                    && matches!(&e, Error::ClosedBeforeHead | Error::Io(_))
                    && upload_error.as_ref().is_none_or(|u| {
                        !matches!(u, Error::RequestBody(_) | Error::ShortRequestBody)
                    });
                let error = match (upload_error, e) {
                    (Some(u @ (Error::RequestBody(_) | Error::ShortRequestBody)), _) => u,
                    (_, e) => e,
                };
                let replay = if no_response {
                    self.written.take()
                } else {
                    None
                };
                Poll::Ready(Err(ExchangeFailure {
                    error,
                    no_response,
                    replay,
                }))
            }
            Poll::Pending => {
                if let Some(e @ (Error::RequestBody(_) | Error::ShortRequestBody)) = upload_error {
                    // The client's body broke before any answer: the exchange is over.
                    self.broken = true;
                    return Poll::Ready(Err(ExchangeFailure {
                        error: e,
                        no_response: false,
                        replay: None,
                    }));
                }
                Poll::Pending
            }
        }
    }

    /// Reads until a final response head is complete (1xx heads are passed over).
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        head_only: bool,
    ) -> Poll<Result<Response<Framing>, Error>> {
        loop {
            // `parse` answers `None` for an empty buffer.
            if let Some((resp, hop)) = http1::response::parse(
                &mut self.buf,
                head_only,
                self.asks_upgrade,
                &mut self.spare_headers,
            )? {
                self.hop = hop;
                return Poll::Ready(Ok(resp));
            }
            let n = ready!(self.poll_fill(cx, READ_HEAD))?;
            if n == 0 {
                return Poll::Ready(Err(Error::ClosedBeforeHead));
            }
            self.answered = true;
        }
    }

    /// One read into the buffer, making room for `want` bytes when it has little.
    fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.big_reads |= want > READ_HEAD;
            self.buf.reserve(want.max(1024));
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }

    /// The next piece of the response body, moving the request body along too.
    pub fn poll_body(
        &mut self,
        framing: &mut Framing,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        if self.upload.is_some() {
            // An upload failure leaves the connection broken (not reused); the response
            // goes on as long as the upstream sends it.
            let _ = self.poll_upload(cx);
        }
        let polled = self.poll_body_frame(framing, cx);
        if let Poll::Ready(Some(Err(_))) = &polled {
            self.broken = true;
            *framing = Framing::Done;
        }
        polled
    }

    fn poll_body_frame(
        &mut self,
        framing: &mut Framing,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        loop {
            match framing {
                Framing::Done => return Poll::Ready(None),
                Framing::Length(0) => {
                    *framing = Framing::Done;
                    return Poll::Ready(None);
                }
                Framing::Length(left) => {
                    if !self.buf.is_empty() {
                        let n = (self.buf.len() as u64).min(*left);
                        *left -= n;
                        let data = self.buf.split_to(n as usize).freeze();
                        if *left == 0 {
                            *framing = Framing::Done;
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    let want = (*left).min(READ_BODY as u64) as usize;
                    if ready!(self.poll_fill(cx, want))? == 0 {
                        return Poll::Ready(Some(Err(Error::ClosedMidBody)));
                    }
                }
                Framing::Close => {
                    if !self.buf.is_empty() {
                        let data = self.buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    if ready!(self.poll_fill(cx, READ_BODY))? == 0 {
                        *framing = Framing::Done;
                        // The connection ended with the body: it is not reused.
                        self.broken = true;
                        return Poll::Ready(None);
                    }
                }
                Framing::Chunked(state) => {
                    match chunked::decode(&mut self.buf, state) {
                        Ok(chunked::Decoded::Data(data)) => {
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                        Ok(chunked::Decoded::End(trailers)) => {
                            *framing = Framing::Done;
                            return Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))));
                        }
                        Ok(chunked::Decoded::More) => {}
                        Err(e) => return Poll::Ready(Some(Err(e.into()))),
                    }
                    let want = match state {
                        Chunk::Data(n) => (*n).clamp(1024, READ_BODY as u64) as usize,
                        _ => READ_HEAD,
                    };
                    if ready!(self.poll_fill(cx, want))? == 0 {
                        return Poll::Ready(Some(Err(Error::ClosedMidBody)));
                    }
                }
            }
        }
    }
}

/// `Content-Length: 0` is sent for an empty body only where a body is expected (as
/// hyper and curl do); a GET carries no length.
fn method_wants_length(m: &Method) -> bool {
    !matches!(
        *m,
        Method::GET
            | Method::HEAD
            | Method::DELETE
            | Method::OPTIONS
            | Method::TRACE
            | Method::CONNECT
    )
}

fn write_length(head: &mut BytesMut, n: u64) {
    head.extend_from_slice(b"content-length: ");
    head.extend_from_slice(http1::decimal(n, &mut [0; 20]));
    head.extend_from_slice(b"\r\n");
}

// ---- an exchange on a lent connection, under the response deadline ----

/// When an exchange's response head is due: `deadline`, or later while a streamed
/// request body is why it is late ([`BodyProgress::later_deadline`]).
pub(super) struct Due {
    pub(super) deadline: Instant,
    pub(super) progress: Option<Arc<crate::body::BodyProgress>>,
    pub(super) timeout: Duration,
}

/// Drives a begun HTTP/1.1 exchange to its response head, or to its deadline: the sweep
/// marks the connection timed out and wakes this task (no timer per request).
pub(super) async fn h1_exchange(
    pool: &Weak<Inner<Http>>,
    shared: &ConnShared,
    conn: &mut H1Conn,
    head_only: bool,
    due: Due,
) -> Result<http::Response<Reply>, SendError> {
    let Some(inner) = pool.upgrade() else {
        return Err(SendError::TimedOut);
    };
    let deadline_ms = inner.ms_at(due.deadline);
    drop(inner);
    shared.timed_out.store(false, Ordering::Relaxed);
    shared.head_deadline.store(deadline_ms, Ordering::Relaxed);
    let mut registered = false;
    let result = std::future::poll_fn(|cx| {
        if shared.timed_out.load(Ordering::Relaxed) {
            let later = due
                .progress
                .as_ref()
                .and_then(|p| p.later_deadline(due.timeout));
            match (later, pool.upgrade()) {
                // The client's body is why: the deadline moves, the wait goes on.
                (Some(later), Some(inner)) => {
                    shared.timed_out.store(false, Ordering::Relaxed);
                    shared
                        .head_deadline
                        .store(inner.ms_at(later), Ordering::Relaxed);
                }
                // The checkout is dropped, not released: the connection closes.
                _ => return std::task::Poll::Ready(Err(SendError::TimedOut)),
            }
        }
        let polled = conn.poll_exchange(cx, head_only);
        if polled.is_pending() {
            shared.wake_on_deadline(cx);
            registered = true;
        }
        polled.map(|r| match r {
            Ok(resp) => Ok(resp.map(Reply::H1)),
            Err(f) => Err(SendError::Failed {
                error: Box::new(f.error),
                unprocessed: f.no_response,
                replay: f.replay,
            }),
        })
    })
    .await;
    shared.head_deadline.store(0, Ordering::Relaxed);
    if registered {
        // A waker keeps its task's memory alive: an idle connection holds none.
        shared.waiter.lock().expect("waiter lock").take();
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn conn() -> (H1Conn, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (
            H1Conn::new(crate::upstream::connect::Stream::Plain(client.unwrap())),
            accepted.unwrap().0,
        )
    }

    /// Idle connections keep their read buffers up to the bound, and give their place
    /// back when taken for a request or dropped.
    #[tokio::test]
    async fn kept_read_buffers_are_bounded() {
        let kept = Arc::new(Slots::new(2));
        let mut conns = Vec::new();
        for _ in 0..3 {
            let (mut c, peer) = conn().await;
            c.buf.reserve(READ_HEAD);
            c.rest(&kept);
            conns.push((c, peer));
        }
        assert_eq!(kept.taken(), 2);
        let held: Vec<usize> = conns.iter().map(|(c, _)| c.buf.capacity()).collect();
        assert!(held[0] >= READ_HEAD && held[1] >= READ_HEAD, "{held:?}");
        assert_eq!(held[2], 0, "the third kept its buffer");
        // Taken for a request: its place frees.
        conns[0].0.begin(Request::new(RequestBody::Empty));
        assert_eq!(kept.taken(), 1);
        // Dropped while idle: the same.
        conns.truncate(1);
        assert_eq!(kept.taken(), 0);
        // A connection that read a large body does not keep its buffer.
        let (mut c, _peer) = conn().await;
        c.big_reads = true;
        c.buf.reserve(READ_BODY);
        c.rest(&kept);
        assert_eq!((kept.taken(), c.buf.capacity()), (0, 0));
    }

    #[test]
    fn request_bodies_are_framed() {
        let mut q = WriteQueue::default();
        let mut e = Encoder::Chunked;
        e.encode(Bytes::from_static(b"hello"), &mut q);
        e.finish(&mut q).unwrap();
        let wire: Vec<u8> = q.parts.iter().flat_map(|b| b.iter().copied()).collect();
        assert_eq!(wire, b"5\r\nhello\r\n0\r\n\r\n");

        let mut q = WriteQueue::default();
        let mut e = Encoder::Length(3);
        e.encode(Bytes::from_static(b"abcdef"), &mut q);
        assert!(e.finish(&mut q).is_ok());
        let mut e = Encoder::Length(3);
        e.encode(Bytes::from_static(b"ab"), &mut q);
        assert!(matches!(e.finish(&mut q), Err(Error::ShortRequestBody)));
    }
}
