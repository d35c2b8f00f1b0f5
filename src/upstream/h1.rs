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
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{
    CONNECTION, CONTENT_LENGTH, PROXY_AUTHENTICATE, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body as _, Frame, SizeHint};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::connect::Stream;
use crate::body::RequestBody;
use crate::io::{Slot, Slots};

/// Largest response head (status line and fields) taken from an upstream; a longer one
/// fails the request with 502.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most fields in a response head (hyper's default is 100).
pub const MAX_FIELDS: usize = 128;
/// Longest chunk-size line (with extensions) of a chunked body.
const MAX_CHUNK_LINE: usize = 4 * 1024;
/// Largest trailer section of a chunked body.
const MAX_TRAILERS: usize = 16 * 1024;
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
    /// The response head broke the protocol.
    Malformed(&'static str),
    /// The response head exceeded [`MAX_HEAD`] or [`MAX_FIELDS`].
    HeadTooLarge,
    /// The client's request body failed (it went away or broke its framing).
    RequestBody(hyper::Error),
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
            Error::Malformed(what) => write!(f, "malformed response from upstream: {what}"),
            Error::HeadTooLarge => f.write_str("upstream response head too large"),
            Error::RequestBody(e) => write!(f, "reading the request body: {e}"),
            Error::ShortRequestBody => f.write_str("request body shorter than its Content-Length"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io(e) => Some(e),
            Error::RequestBody(e) => Some(e),
            _ => None,
        }
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
pub struct Failure {
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

/// What a response head says about its connection. These hop-by-hop fields
/// (`Connection`, `Keep-Alive`) are read while parsing and not kept in the header map,
/// where the proxy would only remove them again; a `Connection` naming other fields is
/// kept, so those are removed with it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hop {
    /// `Connection: close`.
    pub close: bool,
    /// `Connection: keep-alive` (what an HTTP/1.0 response needs to be reused).
    pub keep_alive: bool,
    /// The origin's `Keep-Alive: timeout=N`.
    pub hint: Option<Duration>,
}

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// `timeout=N` in one `Keep-Alive` value.
pub fn keep_alive_timeout(v: &[u8]) -> Option<Duration> {
    v.split(|b| *b == b',').find_map(|part| {
        let (k, n) = std::str::from_utf8(part).ok()?.split_once('=')?;
        if k.trim().eq_ignore_ascii_case("timeout") {
            n.trim().parse::<u64>().ok().map(Duration::from_secs)
        } else {
            None
        }
    })
}

/// How the rest of a response body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// This many bytes still to come.
    Length(u64),
    Chunked(Chunk),
    /// Until the upstream closes the connection (which then cannot be reused).
    Close,
    /// The body ended.
    Done,
}

/// Where a chunked body's decoder stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// Before a chunk-size line.
    Size,
    /// Inside a chunk's data, with this many bytes left.
    Data(u64),
    /// After a chunk's data, before its CRLF.
    DataEnd,
    /// After the last chunk: the trailer section and the final CRLF.
    Trailers,
}

impl Framing {
    pub fn is_end(&self) -> bool {
        matches!(self, Framing::Done | Framing::Length(0))
    }

    pub fn size_hint(&self) -> SizeHint {
        match self {
            Framing::Length(n) => SizeHint::with_exact(*n),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
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
                super::chunk_size_line(&mut line, data.len());
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
                q.push(Bytes::from_static(b"0\r\n\r\n"));
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
        }
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
        if let Stream::Plain(tcp) = &self.io {
            // Answered from the socket's known readiness when nothing arrived (the usual
            // case): no system call, no waker to register.
            return matches!(tcp.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
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
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
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
            if name == CONTENT_LENGTH {
                has_length = value
                    .to_str()
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok());
            }
            head.extend_from_slice(name.as_str().as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        let mut queue = WriteQueue {
            parts: std::mem::take(&mut self.spare_queue),
            len: 0,
        };
        let mut full = None;
        let (encoder, ended) = match &mut body {
            RequestBody::Empty => {
                if has_length.is_none() && method_wants_length(&parts.method) {
                    head.extend_from_slice(b"content-length: 0\r\n");
                }
                (Encoder::Length(0), true)
            }
            RequestBody::Full(data) => {
                let data = data.take().unwrap_or_default();
                if has_length.is_none() {
                    write_length(&mut head, data.len() as u64);
                }
                full = Some(data);
                (Encoder::Length(0), true)
            }
            b => match (has_length, b.size_hint().exact()) {
                (Some(n), _) => (Encoder::Length(n), false),
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
        self.written = (ended && super::is_idempotent(&parts.method)).then(|| Written {
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
    ) -> Poll<Result<Response<Framing>, Failure>> {
        // A failed upload is reported only if no response explains it.
        let upload_error = self.poll_upload(cx).err();
        let polled = self.poll_head(cx, head_only);
        match polled {
            Poll::Ready(Ok(resp)) => {
                self.written = None;
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
                Poll::Ready(Err(Failure {
                    error,
                    no_response,
                    replay,
                }))
            }
            Poll::Pending => {
                if let Some(e @ (Error::RequestBody(_) | Error::ShortRequestBody)) = upload_error {
                    // The client's body broke before any answer: the exchange is over.
                    self.broken = true;
                    return Poll::Ready(Err(Failure {
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
            if !self.buf.is_empty() {
                if let Some((resp, hop)) = parse_head(
                    &mut self.buf,
                    head_only,
                    self.asks_upgrade,
                    &mut self.spare_headers,
                )? {
                    self.hop = hop;
                    return Poll::Ready(Ok(resp));
                }
                if self.buf.len() >= MAX_HEAD {
                    return Poll::Ready(Err(Error::HeadTooLarge));
                }
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
                    match decode_chunked(&mut self.buf, state) {
                        Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                        Ok(Decoded::End(trailers)) => {
                            *framing = Framing::Done;
                            return Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))));
                        }
                        Ok(Decoded::More) => {}
                        Err(e) => return Poll::Ready(Some(Err(e))),
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
    head.extend_from_slice(super::decimal(n, &mut [0; 20]));
    head.extend_from_slice(b"\r\n");
}

/// Parses a response head at the front of `buf`: `None` while incomplete. A 1xx head
/// (other than 101) is consumed and the next one parsed.
fn parse_head(
    buf: &mut BytesMut,
    head_only: bool,
    asks_upgrade: bool,
    spare: &mut HeaderMap,
) -> Result<Option<(Response<Framing>, Hop)>, Error> {
    loop {
        // Field positions, kept while the parser borrows the buffer: on the stack for
        // the usual few fields (zeroing room for all 128 cost more than the rest).
        let mut few = [(0u32, 0u32, 0u32, 0u32); 24];
        let mut many = Vec::new();
        let (len, status, minor, count) = {
            let mut fields =
                [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_FIELDS];
            let mut resp = httparse::Response::new(&mut []);
            let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
                &mut resp,
                buf,
                &mut fields,
            );
            let len = match parsed {
                Ok(httparse::Status::Complete(len)) => len,
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(httparse::Error::TooManyHeaders) => return Err(Error::HeadTooLarge),
                Err(_) => return Err(Error::Malformed("unparsable head")),
            };
            let base = buf.as_ptr() as usize;
            let at = if resp.headers.len() <= few.len() {
                &mut few[..]
            } else {
                many.resize(resp.headers.len(), (0, 0, 0, 0));
                &mut many[..]
            };
            for (slot, h) in at.iter_mut().zip(resp.headers.iter()) {
                let n = h.name.as_ptr() as usize - base;
                let v = h.value.as_ptr() as usize - base;
                *slot = (
                    n as u32,
                    h.name.len() as u32,
                    v as u32,
                    h.value.len() as u32,
                );
            }
            let status = resp.code.ok_or(Error::Malformed("no status"))?;
            (len, status, resp.version.unwrap_or(1), resp.headers.len())
        };
        if status == 101 && !asks_upgrade {
            return Err(Error::Malformed(
                "101 to a request that asked for no upgrade",
            ));
        }
        if (100..200).contains(&status) && status != 101 {
            buf.advance(len);
            if buf.is_empty() {
                return Ok(None);
            }
            continue;
        }
        let head = buf.split_to(len).freeze();
        // The spare map (with its room) goes into the response, the response's new
        // empty one into the spare slot: nothing is made or dropped for it.
        let mut resp = Response::new(Framing::Done);
        std::mem::swap(resp.headers_mut(), spare);
        let headers = resp.headers_mut();
        headers.reserve(count);
        let mut length: Option<u64> = None;
        let mut chunked = false;
        let mut coded = false;
        let mut hop = Hop::default();
        let at = if count <= few.len() {
            &few[..]
        } else {
            &many[..]
        };
        for &(n, nl, v, vl) in &at[..count] {
            let name = HeaderName::from_bytes(&head[n as usize..(n + nl) as usize])
                .map_err(|_| Error::Malformed("invalid field name"))?;
            let raw = head.slice(v as usize..(v + vl) as usize);
            if name == CONTENT_LENGTH {
                let n = std::str::from_utf8(&raw)
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .ok_or(Error::Malformed("invalid Content-Length"))?;
                if length.is_some_and(|l| l != n) {
                    return Err(Error::Malformed("conflicting Content-Length"));
                }
                length = Some(n);
            } else if name == TRANSFER_ENCODING {
                coded = true;
                // Only a final `chunked` coding delimits the body (RFC 9112 §6.3).
                chunked = raw
                    .rsplit(|b| *b == b',')
                    .next()
                    .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
                continue;
            } else if name == CONNECTION {
                let mut names_others = false;
                for token in raw.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                    if token.eq_ignore_ascii_case(b"close") {
                        hop.close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        hop.keep_alive = true;
                    } else if !token.is_empty() {
                        names_others = true;
                    }
                }
                if !names_others {
                    continue;
                }
            } else if name == KEEP_ALIVE {
                if hop.hint.is_none() {
                    hop.hint = keep_alive_timeout(&raw);
                }
                continue;
            } else if name == UPGRADE && status == 101 {
                // The protocol switched to: the proxy passes it on when the client asked.
            } else if name == TE || name == TRAILER || name == UPGRADE || name == PROXY_AUTHENTICATE
            {
                // Hop-by-hop: the proxy would remove them.
                continue;
            }
            // The value shares the head's memory; httparse accepted only bytes a
            // `HeaderValue` allows, so the check here does not fail.
            let value = HeaderValue::from_maybe_shared(raw)
                .map_err(|_| Error::Malformed("invalid field value"))?;
            headers.append(name, value);
        }
        let status =
            StatusCode::from_u16(status).map_err(|_| Error::Malformed("invalid status code"))?;
        let framing = if head_only
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            Framing::Done
        } else if coded {
            if chunked {
                Framing::Chunked(Chunk::Size)
            } else {
                Framing::Close
            }
        } else if let Some(n) = length {
            Framing::Length(n)
        } else {
            Framing::Close
        };
        if coded && length.is_some() {
            // Both framings: Transfer-Encoding wins, the length is dropped (the client
            // must not frame by it), and the connection is not trusted with another
            // request (RFC 9112 §6.3, item 3).
            headers.remove(CONTENT_LENGTH);
            hop.close = true;
        }
        *resp.body_mut() = framing;
        *resp.status_mut() = status;
        *resp.version_mut() = if minor == 0 {
            http::Version::HTTP_10
        } else {
            http::Version::HTTP_11
        };
        return Ok(Some((resp, hop)));
    }
}

enum Decoded {
    Data(Bytes),
    /// The last chunk and its trailers (`None` when there were none).
    End(Option<HeaderMap>),
    /// More bytes are needed.
    More,
}

/// Decodes what `buf` holds of a chunked body (RFC 9112 §7.1).
fn decode_chunked(buf: &mut BytesMut, state: &mut Chunk) -> Result<Decoded, Error> {
    loop {
        match state {
            Chunk::Size => {
                let Some(eol) = buf.iter().position(|b| *b == b'\n') else {
                    if buf.len() > MAX_CHUNK_LINE {
                        return Err(Error::Malformed("chunk-size line too long"));
                    }
                    return Ok(Decoded::More);
                };
                if eol > MAX_CHUNK_LINE || eol == 0 || buf[eol - 1] != b'\r' {
                    return Err(Error::Malformed("invalid chunk-size line"));
                }
                let line = &buf[..eol - 1];
                let digits = line
                    .iter()
                    .position(|b| !b.is_ascii_hexdigit())
                    .unwrap_or(line.len());
                let rest = &line[digits..];
                if digits == 0
                    || digits > 15
                    || !(rest.is_empty() || rest[0] == b';' || rest[0] == b' ' || rest[0] == b'\t')
                {
                    return Err(Error::Malformed("invalid chunk size"));
                }
                let size = u64::from_str_radix(
                    std::str::from_utf8(&line[..digits]).expect("hex digits are ASCII"),
                    16,
                )
                .map_err(|_| Error::Malformed("invalid chunk size"))?;
                buf.advance(eol + 1);
                *state = if size == 0 {
                    Chunk::Trailers
                } else {
                    Chunk::Data(size)
                };
            }
            Chunk::Data(left) => {
                if buf.is_empty() {
                    return Ok(Decoded::More);
                }
                let n = (buf.len() as u64).min(*left) as usize;
                *left -= n as u64;
                let data = buf.split_to(n).freeze();
                if *left == 0 {
                    *state = Chunk::DataEnd;
                }
                return Ok(Decoded::Data(data));
            }
            Chunk::DataEnd => {
                if buf.len() < 2 {
                    return Ok(Decoded::More);
                }
                if &buf[..2] != b"\r\n" {
                    return Err(Error::Malformed("chunk data not followed by CRLF"));
                }
                buf.advance(2);
                *state = Chunk::Size;
            }
            Chunk::Trailers => {
                if buf.len() >= 2 && &buf[..2] == b"\r\n" {
                    buf.advance(2);
                    return Ok(Decoded::End(None));
                }
                let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                    if buf.len() > MAX_TRAILERS {
                        return Err(Error::Malformed("trailer section too large"));
                    }
                    if buf.len() >= 2 && buf[0] == b'\r' && buf[1] != b'\n' {
                        return Err(Error::Malformed("invalid trailer section"));
                    }
                    return Ok(Decoded::More);
                };
                if end + 4 > MAX_TRAILERS {
                    return Err(Error::Malformed("trailer section too large"));
                }
                let section = buf.split_to(end + 4).freeze();
                let mut fields = [httparse::EMPTY_HEADER; 32];
                let parsed = httparse::parse_headers(&section, &mut fields)
                    .map_err(|_| Error::Malformed("invalid trailer section"))?;
                let mut trailers = HeaderMap::new();
                if let httparse::Status::Complete((_, fields)) = parsed {
                    for f in fields {
                        if let (Ok(name), Ok(value)) = (
                            HeaderName::from_bytes(f.name.as_bytes()),
                            HeaderValue::from_bytes(f.value),
                        ) {
                            trailers.append(name, value);
                        }
                    }
                }
                return Ok(Decoded::End(Some(trailers)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn conn() -> (H1Conn, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (
            H1Conn::new(super::super::connect::Stream::Plain(client.unwrap())),
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

    fn parse(raw: &[u8]) -> Result<Option<Response<Framing>>, Error> {
        let mut buf = BytesMut::from(raw);
        Ok(parse_head(&mut buf, false, false, &mut HeaderMap::new())?.map(|(r, _)| r))
    }

    fn hop(raw: &[u8]) -> Hop {
        let mut buf = BytesMut::from(raw);
        parse_head(&mut buf, false, false, &mut HeaderMap::new())
            .unwrap()
            .unwrap()
            .1
    }

    #[test]
    fn heads_are_parsed_with_their_framing() {
        let r = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nX-A: b\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(*r.body(), Framing::Length(12));
        assert_eq!(r.headers()["x-a"], "b");

        let r = parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(*r.body(), Framing::Chunked(Chunk::Size));

        let r = parse(b"HTTP/1.0 200 OK\r\n\r\n").unwrap().unwrap();
        assert_eq!(*r.body(), Framing::Close);
        assert_eq!(r.version(), http::Version::HTTP_10);

        let r = parse(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(*r.body(), Framing::Done);

        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Le").unwrap().is_none());
    }

    #[test]
    fn a_101_is_final_only_for_a_request_that_asked() {
        let raw = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nbytes";
        let mut buf = BytesMut::from(&raw[..]);
        let (r, _) = parse_head(&mut buf, false, true, &mut HeaderMap::new())
            .unwrap()
            .unwrap();
        assert_eq!(r.status(), 101);
        assert_eq!(r.headers()[UPGRADE], "websocket");
        assert_eq!(*r.body(), Framing::Done);
        assert_eq!(&buf[..], b"bytes", "the new protocol's bytes stay buffered");
        let mut buf = BytesMut::from(&raw[..]);
        assert!(matches!(
            parse_head(&mut buf, false, false, &mut HeaderMap::new()),
            Err(Error::Malformed(_))
        ));
    }

    #[test]
    fn informational_heads_are_passed_over() {
        let r = parse(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.status(), 201);
        let mut buf = BytesMut::from(&b"HTTP/1.1 100 Continue\r\n\r\n"[..]);
        assert!(
            parse_head(&mut buf, false, false, &mut HeaderMap::new())
                .unwrap()
                .is_none()
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn bad_heads_are_refused() {
        assert!(matches!(
            parse(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            Err(Error::Malformed(_))
        ));
        assert!(matches!(
            parse(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"),
            Err(Error::Malformed(_))
        ));
        assert!(matches!(
            parse(b"garbage\r\n\r\n"),
            Err(Error::Malformed(_))
        ));
        let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..=MAX_FIELDS {
            many.extend_from_slice(format!("x-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert!(matches!(parse(&many), Err(Error::HeadTooLarge)));
    }

    #[test]
    fn both_framings_mark_the_connection_closing() {
        let r =
            parse(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n")
                .unwrap()
                .unwrap();
        assert_eq!(*r.body(), Framing::Chunked(Chunk::Size));
        assert!(r.headers().get("content-length").is_none());
        assert!(
            hop(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n")
                .close
        );
    }

    #[test]
    fn connection_fields_are_read_not_kept() {
        let raw = b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive\r\nKeep-Alive: timeout=5, max=100\r\nContent-Length: 0\r\n\r\n";
        let h = hop(raw);
        assert!(h.keep_alive && !h.close);
        assert_eq!(h.hint, Some(Duration::from_secs(5)));
        assert_eq!(keep_alive_timeout(b"max=3"), None);
        let r = parse(raw).unwrap().unwrap();
        assert!(r.headers().get("connection").is_none());
        assert!(r.headers().get("keep-alive").is_none());
        // A Connection naming another field stays, so the proxy removes that one too.
        let raw =
            b"HTTP/1.1 200 OK\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\nContent-Length: 0\r\n\r\n";
        assert!(hop(raw).close);
        assert_eq!(
            parse(raw).unwrap().unwrap().headers()["connection"],
            "close, X-Hop"
        );
    }

    fn decode_all(raw: &[u8]) -> Result<(Vec<u8>, Option<HeaderMap>), Error> {
        // Fed one byte at a time: every state must cope with a split anywhere.
        let mut buf = BytesMut::new();
        let mut state = Chunk::Size;
        let mut out = Vec::new();
        let mut input = raw.iter();
        loop {
            match decode_chunked(&mut buf, &mut state)? {
                Decoded::Data(d) => out.extend_from_slice(&d),
                Decoded::End(t) => {
                    assert!(buf.is_empty() && input.next().is_none());
                    return Ok((out, t));
                }
                Decoded::More => match input.next() {
                    Some(b) => buf.extend_from_slice(&[*b]),
                    None => return Err(Error::ClosedMidBody),
                },
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_split_anywhere() {
        let (body, t) = decode_all(b"5\r\nhello\r\n1;ext=1\r\n \r\n0\r\n\r\n").unwrap();
        assert_eq!(body, b"hello ");
        assert!(t.is_none());
        let (body, t) = decode_all(b"3\r\nabc\r\n0\r\nX-Sum: 1\r\n\r\n").unwrap();
        assert_eq!(body, b"abc");
        assert_eq!(t.unwrap()["x-sum"], "1");
    }

    #[test]
    fn bad_chunks_are_refused() {
        assert!(decode_all(b"z\r\n").is_err());
        assert!(decode_all(b"3\r\nabcX\r\n").is_err());
        assert!(decode_all(b"3\nabc\r\n").is_err());
        assert!(decode_all(b"1000000000000000\r\n").is_err());
        let long = [b"1;".as_slice(), &[b'x'; MAX_CHUNK_LINE + 10]].concat();
        assert!(decode_all(&long).is_err());
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
