//! The hyper side of a connection: hyper serves TLS connections and HTTP/2 throughout
//! ([`serve`]: keep-alive, trims, the HTTP/2 watch's drain), and the plain HTTP/1.1
//! requests Strait's own server hands over ([`HyperSide`], [`drive_h1`]: the socket is
//! lent and taken back when idle, `park.rs`). Each request goes to the proxy through
//! [`ConnService`].

use std::convert::Infallible;
use std::future::Future;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use super::guard::Guarded;
use super::h2watch::{self, H2Watch};
use super::park::{self, Lent, PARK_AFTER, Parking, ServerBody};
use super::{PlainIo, Shared, Shutdown, TRIM_EVERY, shutdown};
use crate::body::RequestBody;
use crate::io::{CountingIo, IdleTimeoutIo, Stamp};
use crate::proxy::{ConnBytes, ConnInfo};

/// How one hyper connection over a lent socket ended.
pub(super) enum Served {
    /// Parked between requests: the socket, bytes read but not yet parsed, and since
    /// when those bytes (part of a head) have been waiting for the rest.
    Parked(PlainIo, Bytes, Option<Instant>),
    /// hyper closed the connection, or it was upgraded (a tunnel owns it now).
    Ended(Result<(), hyper::Error>),
}

/// The hyper side of a plain HTTP/1.1 connection, made when the connection first
/// sends something Strait's own server leaves to hyper ([`h1`]).
pub(super) struct HyperSide {
    service: ConnService,
    parking: Arc<Parking>,
    bytes: Arc<ConnBytes>,
}

impl HyperSide {
    pub(super) fn new(shared: &Arc<Shared>, info: ConnInfo, bytes: &Arc<ConnBytes>) -> HyperSide {
        let parking = Arc::new(Parking::default());
        HyperSide {
            service: ConnService {
                shared: shared.clone(),
                info,
                bytes: bytes.clone(),
                parking: Some(parking.clone()),
                activity: None,
            },
            parking,
            bytes: bytes.clone(),
        }
    }

    /// Serves the connection with hyper, `unread` first, until hyper sits idle
    /// between requests ([`park`]); then hands back the socket, the bytes hyper read
    /// but did not use, and since when those (part of a head) have been waiting. None
    /// once the connection ended.
    pub(super) async fn serve(
        &self,
        io: PlainIo,
        unread: Bytes,
        head_since: Option<Instant>,
        shared: &Shared,
        shutdown: &Shutdown,
    ) -> Option<(PlainIo, Bytes, Option<Instant>)> {
        let parking = &self.parking;
        parking.set_keep_open(false);
        let fd = io.get_ref().get_ref().as_raw_fd();
        // Guarded from the first byte hyper gets (the head Strait's server read):
        // every request of the session meets Strait's wire rules before hyper's.
        let lent = TokioIo::new(Guarded::new(
            Lent::new(io, unread, parking.clone()),
            self.bytes.clone(),
            shared.settings.load().header_read,
        ));
        let conn = Box::pin(
            shared
                .h1
                .serve_connection(lent, self.service.clone())
                .with_upgrades(),
        );
        let driving = drive_h1(conn, parking, &self.bytes, shared, shutdown, head_since, fd);
        match driving.await {
            Served::Parked(io, rest, since) => Some((io, rest, since)),
            Served::Ended(result) => {
                if let Err(e) = result {
                    tracing::debug!(client = %self.service.info.peer, "connection ended: {e}");
                }
                None
            }
        }
    }
}

pub(super) type HyperH1 =
    hyper::server::conn::http1::UpgradeableConnection<TokioIo<Guarded<Lent<PlainIo>>>, ConnService>;

/// Runs one hyper connection until it ends, or until it has waited [`PARK_AFTER`]
/// with nothing in flight after a reusable exchange (in eager mode: until such an
/// exchange ends); then takes the socket back.
///
/// It also enforces `timeouts.header_read`, lazily: every check it looks whether bytes
/// arrived while no request began and none was in flight. That is a request head on
/// its way; once one has been arriving for `header_read`, the connection is closed.
/// A connection with part of a head in hand parks only when a response ends (eager
/// mode), and then carries the head's start into its next session (`head_since`), so
/// parking never restarts that clock.
pub(super) async fn drive_h1(
    mut conn: Pin<Box<HyperH1>>,
    parking: &Parking,
    bytes: &ConnBytes,
    shared: &Shared,
    shutdown: &Shutdown,
    mut head_since: Option<Instant>,
    fd: std::os::fd::RawFd,
) -> Served {
    let (_session, eager) = shared.sessions.enter();
    parking.set_eager(eager);
    let header_read = shared.settings.load().header_read;
    let every = PARK_AFTER
        .min(header_read / 2)
        .max(Duration::from_millis(10));
    // Polled on every wake of the task, so a timer that is polled only when due.
    let mut tick = crate::io::LazySleep::new(Instant::now() + every);
    let mut seen = parking.started();
    let mut read_seen = bytes.read_total();
    // For how long nothing happened.
    let mut quiet = Duration::ZERO;
    let mut draining = false;
    // Only the connection and the tick are polled on every wake of this task (several
    // per request); the end-of-response signal only in eager mode, and shutdown is
    // noticed at the next tick: a busy connection finishes within `every` of a drain.
    loop {
        let eager = parking.eager() && !draining;
        tokio::select! {
            biased;
            r = conn.as_mut() => {
                // A response body that failed (the upstream's broke or was cut short)
                // ends the connection with a reset rather than a FIN: to an HTTP/1.0
                // client, or one reading until close, a FIN would pass a truncated
                // body off as whole (RFC 9112 §6.3 rule 8). The socket is still open
                // here: the connection holding it is dropped on return.
                if r.as_ref().is_err_and(hyper::Error::is_user) {
                    reset_on_close(fd);
                }
                return Served::Ended(r);
            }
            () = parking.response_ended(), if eager => {
                if parking.may_park() {
                    break;
                }
            }
            () = std::future::poll_fn(|cx| tick.poll_elapsed(cx)) => {
                if !draining && shutdown.is_triggered() {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
                let now = Instant::now();
                tick.reset(now + every);
                let (started, read) = (parking.started(), bytes.read_total());
                if started != seen || parking.busy() {
                    head_since = None;
                    quiet = Duration::ZERO;
                } else if read != read_seen {
                    head_since.get_or_insert(now);
                    quiet = Duration::ZERO;
                } else {
                    quiet += every;
                }
                (seen, read_seen) = (started, read);
                if head_since.is_some_and(|since| now - since >= header_read) {
                    tracing::debug!("request head not complete within header_read: closing");
                    return Served::Ended(Ok(()));
                }
                if !draining && head_since.is_none() && quiet >= PARK_AFTER && parking.may_park() {
                    break;
                }
                parking.set_eager(shared.sessions.crowded());
            }
        }
    }
    // hyper sits between requests: finishing now sends nothing more and cuts nothing
    // short; the socket stays open for the loop.
    parking.set_keep_open(true);
    conn.as_mut().graceful_shutdown();
    if let Err(e) = conn.as_mut().await {
        return Served::Ended(Err(e));
    }
    let Some(parts) = Pin::into_inner(conn).into_parts() else {
        return Served::Ended(Ok(()));
    };
    let (lent, held) = parts.io.into_inner().into_inner();
    let (io, prefix) = lent.into_inner();
    // Copied: the `Bytes` hyper hands back keeps its whole read buffer alive, even
    // when empty. Pipelined bytes are rare and short. In stream order: what hyper
    // read, what the guard held back, what the socket's lender still had.
    let unread = if parts.read_buf.is_empty() && held.is_empty() {
        prefix
    } else {
        let mut all = Vec::with_capacity(parts.read_buf.len() + held.len() + prefix.len());
        all.extend_from_slice(&parts.read_buf);
        all.extend_from_slice(&held);
        all.extend_from_slice(&prefix);
        Bytes::from(all)
    };
    // Bytes in hand are part of a head (a whole one would have been served).
    if !unread.is_empty() {
        tracing::debug!(
            bytes = unread.len(),
            "parked holding part of the next request head"
        );
    }
    let since = (!unread.is_empty()).then(|| head_since.unwrap_or_else(Instant::now));
    Served::Parked(io, unread, since)
}

/// Sets `SO_LINGER` to zero on an open socket, so its close sends a reset.
pub(super) fn reset_on_close(fd: std::os::fd::RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `fd` is an open socket owned by the caller's connection for the whole
    // call, and `linger` outlives it; a failure only leaves the FIN in place.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// The tail of the last response was written after its request was accounted: it goes
/// to the connection's last owner. A connection a tunnel or switched connection took
/// over is theirs to account (hyper ends its side as it hands the socket over).
pub(super) fn account_connection_end(bytes: &ConnBytes) {
    if bytes.is_handed_over() {
        return;
    }
    let (rx, tx) = bytes.take();
    if let Some(owner) = bytes.take_owner() {
        owner.count(rx, tx);
    }
}

/// Serves one client connection (TLS, or HTTP/2 by prior knowledge) with hyper until
/// it closes, or until it is asked to finish: by shutdown; by `timeouts.keepalive`
/// with no request in flight; by a trim, or the connection cap being near, with none
/// in flight; by its HTTP/2 request limit ([`h2watch`]). Asking is hyper's graceful
/// shutdown: a GOAWAY on HTTP/2, a close between requests on HTTP/1.1.
pub(super) async fn serve<S>(stream: S, info: ConnInfo, shared: Arc<Shared>, shutdown: Shutdown)
where
    S: AsyncRead + AsyncWrite + AsRawFd + Unpin + Send + 'static,
{
    let fd = stream.as_raw_fd();
    let bytes = Arc::new(ConnBytes::default());
    let counted = CountingIo::new(stream, bytes.clone());
    let settings = shared.settings.load_full();
    let watch = Arc::new(h2watch::Watch::default());
    // Guarded: the HTTP/1.1 requests hyper reads here (over TLS) meet Strait's wire
    // rules first; an HTTP/2 preface ends the guard's watch at once, and the HTTP/2
    // watch's begins.
    let io = TokioIo::new(Guarded::new(
        H2Watch::new(
            IdleTimeoutIo::new(counted, settings.idle),
            settings.header_read,
            settings.h2_max_requests,
            watch.clone(),
        ),
        bytes.clone(),
        settings.header_read,
    ));
    let activity = Arc::new(Activity::default());
    let service = ConnService {
        shared: shared.clone(),
        info,
        bytes: bytes.clone(),
        parking: None,
        activity: Some(activity.clone()),
    };
    let conn = settings.http.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    let keepalive = settings.keepalive;
    // The keep-alive and stall checks' period: the connection closes within a quarter
    // of `keepalive` (or `idle`) after it passed; a drain or trim wakes it at once.
    let every = (keepalive.min(settings.idle) / 4)
        .clamp(Duration::from_millis(10), Duration::from_secs(15));
    let mut tick = crate::io::LazySleep::new(Instant::now() + every);
    let mut signal = shutdown::Signal::new(&shutdown);
    let mut signals = shutdown.signals();
    // A trim came while requests were in flight: the connection goes once idle.
    let mut trim_pending = false;
    let idle_limit = settings.idle;
    let mut asked: Option<Instant> = None;
    let result = loop {
        let why = tokio::select! {
            biased;
            r = conn.as_mut() => break r,
            () = watch.drain_wanted(), if asked.is_none() => "request limit",
            () = std::future::poll_fn(|cx| {
                if asked.is_none() {
                    signal.arm(&shutdown, cx);
                    if shutdown.signals() != signals {
                        return Poll::Ready(());
                    }
                }
                tick.poll_elapsed(cx)
            }) => {
                // A drain is seen below; any other signal is a trim.
                let now = shutdown.signals();
                if now != signals {
                    signals = now;
                    trim_pending = true;
                }
                // Exchanges in flight that have not moved for `idle` (an HTTP/2
                // client that opens no window, its pings keeping the socket busy).
                if activity.stalled_for().is_some_and(|d| d >= idle_limit) {
                    tracing::debug!(client = %info.peer, "exchanges in flight stalled for timeouts.idle: closing");
                    break Ok(());
                }
                let idle = activity.idle_for();
                if let Some(at) = asked {
                    // Asked, and nothing in flight: a client that does not answer
                    // hyper's GOAWAY ping would hold the connection open.
                    if idle.is_some() && at.elapsed() >= ASKED_GRACE {
                        tracing::debug!(client = %info.peer, "closing a connection asked to go");
                        break Ok(());
                    }
                    tick.reset(Instant::now() + ASKED_GRACE / 4);
                    continue;
                }
                if shutdown.is_triggered() {
                    "shutdown"
                } else if idle.is_some_and(|d| d >= keepalive) {
                    "keepalive"
                } else if idle.is_some() && (trim_pending || shared.limit.is_crowded()) {
                    "connection cap"
                } else {
                    let next = if trim_pending { TRIM_EVERY } else { every };
                    tick.reset(Instant::now() + next);
                    continue;
                }
            }
        };
        tracing::debug!(client = %info.peer, "asking the connection to close: {why}");
        asked = Some(Instant::now());
        tick.reset(Instant::now() + ASKED_GRACE / 4);
        conn.as_mut().graceful_shutdown();
    };
    if let Err(e) = result {
        tracing::debug!(client = %info.peer, "connection ended: {e}");
        // As on the plain path (`drive_h1`): a response body that failed must not end
        // with what looks like a clean close. `conn` still holds the socket here.
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_user)
        {
            reset_on_close(fd);
        }
    }
    account_connection_end(&bytes);
}

/// How long a connection asked to go (with nothing in flight) may take to close
/// before it is closed: hyper's HTTP/2 GOAWAY waits for the client to answer a ping.
pub(super) const ASKED_GRACE: Duration = Duration::from_secs(1);

/// The requests in flight on a connection hyper serves throughout, since when none
/// has been, and when an exchange last moved.
#[derive(Debug)]
pub(super) struct Activity {
    in_flight: std::sync::atomic::AtomicUsize,
    /// When the last exchange ended (or the connection began).
    quiet_since: Stamp,
    /// When a request began, a response frame went to hyper or a request body's bytes
    /// came: what a connection busy with exchanges that do not move lacks.
    progress: Arc<Stamp>,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            in_flight: Default::default(),
            quiet_since: Stamp::now(),
            progress: Arc::new(Stamp::now()),
        }
    }
}

impl Activity {
    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.progress.touch();
        InFlight(self.clone())
    }

    /// For how long no request has been in flight; `None` while one is.
    fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(self.quiet_since.elapsed())
    }

    /// For how long the exchanges in flight have not moved; `None` with none in flight.
    fn stalled_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::Acquire) == 0 {
            return None;
        }
        Some(self.progress.elapsed())
    }
}

/// One request in flight, until its response body is dropped.
pub(super) struct InFlight(Arc<Activity>);

impl InFlight {
    /// A response frame went to hyper.
    pub(super) fn moved(&self) {
        self.0.progress.touch();
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        a.quiet_since.touch();
        a.in_flight.fetch_sub(1, Ordering::Release);
    }
}

/// The hyper service for one connection: hands each request to the proxy.
#[derive(Clone)]
pub(super) struct ConnService {
    shared: Arc<Shared>,
    info: ConnInfo,
    bytes: Arc<ConnBytes>,
    /// Present on connections that park between requests.
    parking: Option<Arc<Parking>>,
    /// Present on connections hyper serves throughout ([`serve`]).
    activity: Option<Arc<Activity>>,
}

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<ServerBody>;
    type Error = Infallible;
    type Future = Serve;

    fn call(&self, req: Request<Incoming>) -> Serve {
        let exchange = self.parking.as_ref().map(|p| p.begin(&req));
        let in_flight = self.activity.as_ref().map(Activity::begin);
        let mut req = req.map(RequestBody::from);
        if let (Some(a), RequestBody::Incoming(body)) = (&self.activity, req.body_mut()) {
            body.touch(a.progress.clone());
        }
        let proxy = self.shared.proxy.load_full();
        Serve {
            in_flight,
            handling: Box::pin(proxy.handle(req, self.info, self.bytes.clone())),
            exchange,
        }
    }
}

/// One request being handled, and its place in the connection's parking bookkeeping.
pub(super) struct Serve {
    handling: Pin<Box<dyn Future<Output = Response<crate::proxy::Tracked>> + Send>>,
    exchange: Option<park::Exchange>,
    in_flight: Option<InFlight>,
}

impl Future for Serve {
    type Output = Result<Response<ServerBody>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let resp = std::task::ready!(self.handling.as_mut().poll(cx));
        let mut exchange = self.exchange.take();
        if let Some(e) = &mut exchange {
            e.response(&resp);
        }
        let in_flight = self.in_flight.take();
        Poll::Ready(Ok(
            resp.map(|body| ServerBody::new(body, exchange, in_flight))
        ))
    }
}
