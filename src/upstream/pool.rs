//! Strait's upstream connection pool.
//!
//! # Invariants
//!
//! - **Key.** Connections are grouped by [`Target`]: the connection profile (TLS roots,
//!   verification, server name, protocol, address policy), the scheme and the authority.
//!   Never the client or the user: every client shares every connection.
//! - **Ownership.** An HTTP/1.1 connection is owned by exactly one of: the pool's idle
//!   list for its key, or one request ([`Checkout`]). It goes back to the idle list only
//!   when its response body was read to the end and nothing forbids reuse (see
//!   [`Checkout::release`]); any other end drops it, which closes it. An HTTP/2
//!   connection stays listed while it lives; requests take stream slots on it, up to the
//!   peer's `SETTINGS_MAX_CONCURRENT_STREAMS`.
//! - **Order.** Idle HTTP/1.1 connections are reused last-in first-out, so the warmest
//!   is used and the coldest ages out. On checkout a connection is verified open: a
//!   read that must not wait finds neither the upstream's close nor a stray byte.
//! - **Driving.** An HTTP/1.1 connection has no task: the request holding it writes and
//!   reads it ([`super::h1`]), and while idle it is plain data on its key's list. An
//!   HTTP/2 connection runs in hyper's connection task, watched by a driver task.
//! - **Bounds.** `max_idle` (pool-wide, least recently used first) caps idle connections
//!   at once. `max_idle_per_host` caps them within [`SURPLUS_GRACE`]: a check-in beyond it
//!   marks the key's coldest idle connections surplus, and each is retired by its own
//!   timer unless a request takes it first. A burst that returns more connections than
//!   the bound at once (closed-loop clients, responses handled in one batch) thus keeps
//!   the connections its next round needs instead of closing and reopening them.
//!   `idle_timeout` and an origin's `Keep-Alive: timeout` hint retire connections too:
//!   a checkout never takes a connection past either, and one sweeper task per pool
//!   closes idle HTTP/1.1 connections whose time is up (`sweep_every`). An
//!   HTTP/2 connection's own driver task keeps its idle timer.
//!   `max_conns_per_host` caps open connections; requests beyond it wait in a FIFO queue
//!   of at most [`MAX_WAITERS`], for at most `wait_timeout`.
//! - **Locks.** One `std::sync::Mutex` guards the bookkeeping; it is never held across
//!   an `.await` and never while connecting or sending.
//! - **Bursts.** A request that finds nothing idle starts at most one connect and waits
//!   in the queue; whichever connection frees up first (a new one, or one a finished
//!   request checks in) goes to the longest waiter.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::Frame;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::Profile;
use super::connect::{ConnectError, Stream};
use super::h1::{self, H1Conn};
use crate::body::BoxError;
use crate::body::RequestBody;
use crate::config::Scheme;

/// Most requests that may wait for one key's connections; more get 503 at once.
pub const MAX_WAITERS: usize = 1024;
/// Stream slots used per HTTP/2 connection before the peer's own limit is known.
const H2_DEFAULT_STREAMS: usize = 100;
/// How long a connection beyond `max_idle_per_host` may stay idle (see the Bounds
/// invariant).
pub const SURPLUS_GRACE: Duration = Duration::from_secs(1);
/// Retire a connection this long before an origin's `Keep-Alive: timeout` runs out
/// (at most half the hint), so no request races the origin's close.
const HINT_MARGIN: Duration = Duration::from_secs(1);

/// Where one request goes, and the pool's key: scheme, authority (`host[:port]`,
/// exactly as it should appear in the URI) and the [`Profile`] of connection settings,
/// everything that makes two connections interchangeable. Made with [`Target::new`]:
/// a route makes its targets once, the forward path one per request.
#[derive(Debug, Clone)]
pub struct Target {
    /// The connection profile: TLS roots, verification, server name, protocol and
    /// address policy. Compared by identity.
    pub profile: Arc<Profile>,
    pub scheme: Scheme,
    /// `host[:port]`; names the peer and, unless the profile overrides it, SNI. Parsed
    /// once (by the route or the forward path), so HTTP/2's `:authority` costs nothing.
    pub authority: http::uri::Authority,
    /// The key's digest, computed once: a request looks its key up twice (checkout and
    /// check-in), and hashing the authority cost more than the rest of a lookup.
    digest: u64,
}

/// The seed of key digests: random per process (forward-proxy targets are chosen by
/// clients, who must not be able to aim collisions).
static KEY_SEED: std::sync::OnceLock<foldhash::quality::RandomState> = std::sync::OnceLock::new();

impl PartialEq for Target {
    fn eq(&self, other: &Self) -> bool {
        self.profile.id == other.profile.id
            && self.scheme == other.scheme
            // As written (case-sensitive): `Authority`'s own comparison and hash fold
            // case byte by byte, which costs more than the whole key lookup otherwise.
            && self.authority.as_str() == other.authority.as_str()
    }
}

impl Eq for Target {}

impl std::hash::Hash for Target {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.digest);
    }
}

impl Target {
    pub fn new(profile: Arc<Profile>, scheme: Scheme, authority: http::uri::Authority) -> Target {
        use std::hash::BuildHasher;
        let digest = KEY_SEED.get_or_init(Default::default).hash_one((
            profile.id,
            scheme,
            authority.as_str(),
        ));
        Target {
            profile,
            scheme,
            authority,
            digest,
        }
    }

    /// The same scheme and authority under another profile.
    pub fn with_profile(&self, profile: Arc<Profile>) -> Target {
        Target::new(profile, self.scheme, self.authority.clone())
    }

    /// True when every connection for this key speaks HTTP/1.1: `version = "h1"`, or
    /// `auto` over plain http (h2c only when asked for).
    pub fn surely_h1(&self) -> bool {
        match self.profile.version {
            crate::config::Version::H1 => true,
            crate::config::Version::H2 => false,
            crate::config::Version::Auto => self.scheme == Scheme::Http,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme.as_str(), self.authority)
    }
}

/// Pool limits, from `[pool]`.
#[derive(Debug, Clone)]
pub struct Limits {
    pub idle_timeout: Duration,
    pub max_idle_per_host: usize,
    pub max_idle: usize,
    /// 0 = unlimited.
    pub max_conns_per_host: usize,
    pub wait_timeout: Duration,
    /// How often the sweep looks at the response deadlines of HTTP/1.1 requests under
    /// way (a quarter of `upstream_response`): a late head is cut off that much late at
    /// most, and no request arms a timer of its own.
    pub deadline_check: Duration,
}

/// An HTTP/2 response body, and its stall timer, made when the reader first waits.
#[derive(Debug)]
pub struct H2Reply {
    body: hyper::body::Incoming,
    stall: Option<StallTimer>,
}

/// How long an HTTP/2 response body has waited for its next frame: armed when the
/// reader waits, disarmed when a frame comes (HTTP/1.1 bodies use the sweep instead).
#[derive(Debug)]
pub struct StallTimer {
    sleep: Pin<Box<tokio::time::Sleep>>,
    armed: bool,
}

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

/// Opens a connection for a key: returns the stream and whether it speaks HTTP/2.
pub type Connector = Arc<
    dyn Fn(&Target) -> Pin<Box<dyn Future<Output = Result<(Stream, bool), ConnectError>> + Send>>
        + Send
        + Sync,
>;

/// Why a checkout failed.
#[derive(Debug, Clone)]
pub enum CheckoutError {
    Connect(ConnectError),
    /// `max_conns_per_host` reached and no connection freed up within `wait_timeout`,
    /// or the wait queue is full.
    Exhausted,
    /// The HTTP handshake on a new connection failed.
    Handshake(String),
}

impl fmt::Display for CheckoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckoutError::Connect(e) => write!(f, "{e}"),
            CheckoutError::Exhausted => f.write_str("no connection free within wait_timeout"),
            CheckoutError::Handshake(e) => write!(f, "HTTP handshake failed: {e}"),
        }
    }
}

/// Pool counters, as cheap atomics; the metrics module exports them.
#[derive(Debug, Default)]
pub struct Stats {
    pub opened: AtomicU64,
    pub reused: AtomicU64,
    pub retried: AtomicU64,
    pub closed: AtomicU64,
    pub evict_idle: AtomicU64,
    pub evict_lru: AtomicU64,
    pub evict_hint: AtomicU64,
    pub idle: AtomicUsize,
    pub waiting: AtomicUsize,
    /// Told how long each successful connect took (TCP, TLS and HTTP handshake).
    pub on_connect: std::sync::OnceLock<ConnectObserver>,
}

impl Stats {
    /// The counter for a connection retired at its `hint_deadline`: the origin's
    /// keep-alive hint, or the end of its time as surplus (a bound, like LRU).
    fn retired_by_deadline(&self, shared: &ConnShared) -> &AtomicU64 {
        if shared.surplus.load(Ordering::Relaxed) {
            &self.evict_lru
        } else {
            &self.evict_hint
        }
    }
}

/// A callback for connect durations (the metrics module installs one).
pub struct ConnectObserver(pub Box<dyn Fn(Duration) + Send + Sync>);

impl fmt::Debug for ConnectObserver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ConnectObserver")
    }
}

impl Stats {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A sender for one connection's requests.
enum Sender {
    /// Boxed: a TLS connection's state is large, and checkouts move.
    H1(Box<H1Conn>),
    H2(http2::SendRequest<RequestBody>),
}

/// State shared by a connection's driver task, the pool and the request using it.
struct ConnShared {
    id: u64,
    /// Milliseconds (pool clock) since which the connection is idle; 0 while in use.
    idle_since: AtomicU64,
    /// Pool-clock millisecond by which the origin's keep-alive hint says to retire; 0 =
    /// no hint.
    hint_deadline: AtomicU64,
    /// HTTP/2: streams in use, and the peer's current limit.
    streams: AtomicUsize,
    max_streams: AtomicUsize,
    /// Idle beyond `max_idle_per_host`: `hint_deadline` is its retirement; cleared when
    /// it is checked in again.
    surplus: std::sync::atomic::AtomicBool,
    /// HTTP/1.1: pool-clock millisecond by which the response head, or the body's next
    /// byte, must arrive; 0 when nothing waits for the upstream. The sweep enforces it.
    head_deadline: AtomicU64,
    /// Set by the sweep when `head_deadline` passed.
    timed_out: std::sync::atomic::AtomicBool,
    /// The task waiting for the response head, woken by the sweep on a timeout.
    waiter: Mutex<Option<std::task::Waker>>,
}

impl ConnShared {
    /// Lets the sweep wake the task behind `cx` when `head_deadline` passes.
    fn wake_on_deadline(&self, cx: &std::task::Context<'_>) {
        let mut waiter = self.waiter.lock().expect("waiter lock");
        if !waiter.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            *waiter = Some(cx.waker().clone());
        }
    }

    /// Nothing is due any more. The waker goes too: it keeps its task's memory alive,
    /// and an idle connection holds none.
    fn disarm(&self) {
        self.head_deadline.store(0, Ordering::Relaxed);
        self.waiter.lock().expect("waiter lock").take();
    }
}

/// An idle HTTP/1.1 connection.
struct IdleConn {
    conn: Box<H1Conn>,
    shared: Arc<ConnShared>,
    /// Position in the pool-wide LRU order.
    lru_seq: u64,
}

/// A live HTTP/2 connection.
struct H2Conn {
    sender: http2::SendRequest<RequestBody>,
    shared: Arc<ConnShared>,
}

/// A request waiting for a connection.
struct Waiter {
    tx: oneshot::Sender<Result<Checkout, CheckoutError>>,
    /// A retry that must not be sent on a reused connection: it waits for a new one.
    fresh: bool,
}

/// One key's connections.
struct Host {
    /// HTTP/1.1 idle connections; the last is the most recently used.
    idle: Vec<IdleConn>,
    h2: Vec<H2Conn>,
    /// Connections open or being opened.
    open: usize,
    /// Set once an HTTP/2 connection was made for this key (or the profile asks for
    /// HTTP/2): then one connection serves many waiters, and a burst opens one per
    /// `H2_DEFAULT_STREAMS` waiters instead of one per waiter.
    speaks_h2: bool,
    /// The stream limit the last HTTP/2 connection of this key reported.
    h2_streams: usize,
    connecting: usize,
    waiters: VecDeque<Waiter>,
}

impl Host {
    /// The longest waiter that may take a connection; a reused connection skips
    /// waiters that asked for a fresh one.
    fn next_waiter(&mut self, reused: bool) -> Option<Waiter> {
        if !reused {
            return self.waiters.pop_front();
        }
        let pos = self.waiters.iter().position(|w| !w.fresh)?;
        self.waiters.remove(pos)
    }
}

impl Default for Host {
    fn default() -> Self {
        Host {
            idle: Vec::new(),
            h2: Vec::new(),
            open: 0,
            speaks_h2: false,
            h2_streams: H2_DEFAULT_STREAMS,
            connecting: 0,
            waiters: VecDeque::new(),
        }
    }
}

/// SipHash, std's default, cost more than the rest of a key lookup; foldhash keeps a
/// per-process random seed (forward-proxy targets are chosen by clients).
type Hasher = foldhash::quality::RandomState;

struct State {
    hosts: HashMap<Target, Host, Hasher>,
    /// Pool-wide order of idle connections, oldest first: (sequence number, key).
    /// Entries of connections taken back out are left in place and skipped when met
    /// (checking a sequence number against its key's short idle list); the queue is
    /// compacted when stale entries outnumber live ones. No allocation in steady state.
    lru: VecDeque<(u64, Target)>,
    next_seq: u64,
    idle_total: usize,
    /// Every open HTTP/1.1 connection, for the sweep's look at response deadlines;
    /// closed ones are dropped from it as the sweep meets them.
    h1_conns: Vec<Weak<ConnShared>>,
}

struct Inner {
    state: Mutex<State>,
    limits: Limits,
    connector: Connector,
    stats: Arc<Stats>,
    epoch: Instant,
    next_id: AtomicU64,
    /// Set once the sweeper task runs.
    sweeping: std::sync::atomic::AtomicBool,
    /// How late a response deadline may be seen, in ms: `limits.deadline_check`, or a
    /// quarter of the shortest route's own `upstream_response`.
    deadline_check_ms: AtomicU64,
    /// Idle HTTP/1.1 connections that kept their read buffer ([`KEEP_IDLE_BUFFERS`]).
    kept_buffers: Arc<crate::io::Slots>,
}

/// At most this many idle HTTP/1.1 connections keep their 8 KiB read buffer for their
/// next exchange (1 MiB in all); the others hold their socket alone. A busy pool then
/// allocates no read buffer per request.
pub const KEEP_IDLE_BUFFERS: usize = 128;

/// The pool. Cloning shares it.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("limits", &self.inner.limits)
            .finish()
    }
}

/// A connection lent to one request (or, for HTTP/2, one stream slot on a shared one).
/// Dropping it without [`Checkout::release`] closes an HTTP/1.1 connection.
pub struct Checkout {
    pool: Weak<Inner>,
    key: Target,
    /// `None` only once released.
    sender: Option<Sender>,
    shared: Arc<ConnShared>,
    /// True when the connection served a request before this one.
    pub reused: bool,
    released: bool,
}

impl fmt::Debug for Checkout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checkout")
            .field("key", &self.key)
            .field("id", &self.shared.id)
            .field("reused", &self.reused)
            .finish()
    }
}

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
        conn: Option<&mut Checkout>,
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

impl Checkout {
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

    pub fn is_h2(&self) -> bool {
        matches!(self.sender, Some(Sender::H2(_)))
    }

    /// The connection's id, unique in this pool.
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// Sends a request on this connection and waits for the response head until
    /// `deadline`.
    ///
    /// HTTP/1.1 is driven right here, in the caller's task; the response body is read
    /// through [`Reply::poll_frame`]. HTTP/2 streams go through hyper's connection
    /// task.
    // Not an `async fn`, on purpose (see the body).
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
                    // request's future would otherwise reserve room for it.
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

    /// Stops new streams going to this HTTP/2 connection (after GOAWAY or a refused
    /// stream); streams already on it carry on.
    pub fn retire_h2(&self) {
        if let Some(pool) = self.pool.upgrade() {
            let mut state = pool.state.lock().expect("pool lock");
            if let Some(host) = state.hosts.get_mut(&self.key) {
                host.h2.retain(|c| c.shared.id != self.shared.id);
            }
        }
    }

    /// Returns the connection for reuse: call once the response body ended, with
    /// `reusable` false when anything forbids reuse, and `hint` the origin's
    /// `Keep-Alive: timeout`, if any. An HTTP/1.1 connection also has to be clean: both
    /// messages ended, no stray byte buffered.
    pub fn release(mut self, reusable: bool, hint: Option<Duration>) {
        self.released = true;
        let sender = self.sender.take();
        let Some(pool) = self.pool.upgrade() else {
            return;
        };
        match sender {
            Some(Sender::H2(_)) => pool.release_stream(&self.key, &self.shared),
            Some(Sender::H1(mut conn)) if reusable && conn.is_clean() => {
                conn.rest(&pool.kept_buffers);
                pool.checkin_h1(&self.key, conn, self.shared.clone(), hint);
            }
            Some(Sender::H1(conn)) => {
                drop(conn);
                pool.h1_closed(&self.key);
            }
            None => {}
        }
    }

    /// Leaves the pool with an HTTP/1.1 connection that switched protocols (a 101): it
    /// no longer counts toward its host's connections. `None` for HTTP/2.
    pub fn into_upgraded(mut self) -> Option<(Stream, BytesMut)> {
        let conn = match self.sender.take() {
            Some(Sender::H1(conn)) => conn,
            other => {
                self.sender = other;
                return None;
            }
        };
        self.released = true;
        if let Some(pool) = self.pool.upgrade() {
            pool.h1_closed(&self.key);
        }
        Some(conn.into_io())
    }

    /// Takes the connection back without any bookkeeping (the pool lock is held).
    fn into_h1(mut self) -> Option<Box<H1Conn>> {
        self.released = true;
        match self.sender.take() {
            Some(Sender::H1(c)) => Some(c),
            _ => None,
        }
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        // Not released: an HTTP/1.1 connection is dropped (and so closed); an HTTP/2
        // stream slot is freed.
        let Some(pool) = self.pool.upgrade() else {
            return;
        };
        match self.sender.take() {
            Some(Sender::H2(_)) => pool.release_stream(&self.key, &self.shared),
            Some(Sender::H1(conn)) => {
                drop(conn);
                pool.h1_closed(&self.key);
            }
            None => {}
        }
    }
}

/// When an exchange's response head is due: `deadline`, or later while a streamed
/// request body is why it is late ([`BodyProgress::later_deadline`]).
struct Due {
    deadline: Instant,
    progress: Option<Arc<crate::body::BodyProgress>>,
    timeout: Duration,
}

/// Drives a begun HTTP/1.1 exchange to its response head, or to its deadline: the sweep
/// marks the connection timed out and wakes this task (no timer per request).
async fn h1_exchange(
    pool: &Weak<Inner>,
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

/// True when an HTTP/2 peer did not process the stream (RFC 9113 §8.7): it refused it,
/// or it was above the GOAWAY's last stream id, or it never left hyper's queue because
/// the connection's task ended first ("dispatch task is gone": hyper has no predicate
/// for that one, so its message is matched).
fn h2_unprocessed(e: &hyper::Error) -> bool {
    if e.is_user() && e.to_string().contains("dispatch task is gone") {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h2e) = s.downcast_ref::<h2::Error>() {
            return h2e.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h2e.is_go_away() && h2e.is_remote());
        }
        source = s.source();
    }
    false
}

impl Pool {
    pub fn new(limits: Limits, connector: Connector) -> Pool {
        let deadline_check_ms = limits.deadline_check.as_millis() as u64;
        Pool {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    hosts: HashMap::default(),
                    lru: VecDeque::new(),
                    next_seq: 0,
                    idle_total: 0,
                    h1_conns: Vec::new(),
                }),
                limits,
                connector,
                stats: Arc::new(Stats::default()),
                epoch: Instant::now(),
                next_id: AtomicU64::new(1),
                sweeping: std::sync::atomic::AtomicBool::new(false),
                deadline_check_ms: AtomicU64::new(deadline_check_ms),
                kept_buffers: Arc::new(crate::io::Slots::new(KEEP_IDLE_BUFFERS)),
            }),
        }
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.inner.stats
    }

    /// Counts a retry (the pool's caller decides when to retry).
    pub fn count_retry(&self) {
        Stats::bump(&self.inner.stats.retried);
    }

    /// An idle connection or a free HTTP/2 stream slot for `key`, if there is one now.
    /// The fast path: no waiting, no connect, nothing to await.
    pub fn try_checkout(&self, key: &Target) -> Option<Checkout> {
        let mut state = self.inner.state.lock().expect("pool lock");
        self.inner.take_available(&mut state, key)
        // pool lock released here
    }

    /// A connection for `key`: an idle one, a stream slot on an HTTP/2 one, or a new
    /// one. With `fresh`, never a reused connection.
    pub async fn checkout(&self, key: &Target, fresh: bool) -> Result<Checkout, CheckoutError> {
        let inner = &self.inner;
        let (rx, connect, queued_only) = {
            let mut state = inner.state.lock().expect("pool lock");
            // Counted as waiting before looking: a stream slot released right after
            // the look then sees a waiter and comes to the lock (see release_stream).
            inner.stats.waiting.fetch_add(1, Ordering::SeqCst);
            if !fresh && let Some(c) = inner.take_available(&mut state, key) {
                inner.stats.waiting.fetch_sub(1, Ordering::SeqCst);
                return Ok(c);
            }
            let limits = &inner.limits;
            let host = state.hosts.entry(key.clone()).or_default();
            let under_cap = limits.max_conns_per_host == 0 || host.open < limits.max_conns_per_host;
            // At most one connect per waiting request; for HTTP/2, one per connection's
            // worth of waiting streams.
            let speaks_h2 = host.speaks_h2 || key.profile.version == crate::config::Version::H2;
            let per_conn = if speaks_h2 { host.h2_streams } else { 1 };
            // A fresh connection is asked for by a retry: it gets its own, so its
            // request is the first stream there (never refused by a GOAWAY).
            let connect = under_cap && (fresh || host.connecting * per_conn <= host.waiters.len());
            if !connect && host.waiters.len() >= MAX_WAITERS {
                inner.stats.waiting.fetch_sub(1, Ordering::SeqCst);
                return Err(CheckoutError::Exhausted);
            }
            if connect {
                host.open += 1;
                host.connecting += 1;
            }
            let (tx, rx) = oneshot::channel();
            if fresh && connect {
                // A fresh connection goes to this request alone: it waits at the front.
                host.waiters.push_front(Waiter { tx, fresh: true });
            } else {
                // At the cap no new connection may be opened: take any that frees up.
                host.waiters.push_back(Waiter { tx, fresh: false });
            }
            (rx, connect, !connect)
            // pool lock released here
        };
        if connect {
            tokio::spawn(Inner::connect(self.inner.clone(), key.clone()));
        }
        let waited = if queued_only {
            match tokio::time::timeout(inner.limits.wait_timeout, rx).await {
                Ok(r) => r,
                Err(_) => {
                    // Our waiter is dead now; prune dead waiters so the gauge is true.
                    let mut state = inner.state.lock().expect("pool lock");
                    if let Some(host) = state.hosts.get_mut(key) {
                        let before = host.waiters.len();
                        host.waiters.retain(|w| !w.tx.is_closed());
                        let gone = before - host.waiters.len();
                        inner.stats.waiting.fetch_sub(gone, Ordering::Relaxed);
                    }
                    return Err(CheckoutError::Exhausted);
                }
            }
        } else {
            rx.await
        };
        match waited {
            Ok(result) => result,
            // The pool dropped the waiter (pruned as dead): nothing can come.
            Err(_) => Err(CheckoutError::Exhausted),
        }
    }

    /// Makes the sweep see response deadlines of `timeout` to within a quarter of it
    /// (a route's own `upstream_response`, shorter than `timeouts.upstream_response`).
    pub fn check_deadlines_within(&self, timeout: Duration) {
        let quarter = (timeout / 4).max(Duration::from_millis(10)).as_millis() as u64;
        self.inner
            .deadline_check_ms
            .fetch_min(quarter, Ordering::Relaxed);
    }

    /// Whether `max_conns_per_host` caps connections at all.
    pub fn caps_conns(&self) -> bool {
        self.inner.limits.max_conns_per_host != 0
    }

    /// False when `key` is at `max_conns_per_host` with no idle connection and no free
    /// HTTP/2 stream: a request for it now would wait.
    pub fn has_room(&self, key: &Target) -> bool {
        let max = self.inner.limits.max_conns_per_host;
        if max == 0 {
            return true;
        }
        let state = self.inner.state.lock().expect("pool lock");
        let Some(host) = state.hosts.get(key) else {
            return true;
        };
        host.open < max
            || !host.idle.is_empty()
            || host.h2.iter().any(|c| {
                c.shared.streams.load(Ordering::Relaxed)
                    < c.shared.max_streams.load(Ordering::Relaxed)
            })
    }

    /// Idle connections across all keys (for tests and metrics).
    pub fn idle_count(&self) -> usize {
        self.inner.state.lock().expect("pool lock").idle_total
    }
}

impl Inner {
    /// Forgets an idle connection taken off its key's list: the total and the gauge.
    /// Called with the lock held.
    fn forget_idle(&self, idle_total: &mut usize) {
        // Its LRU entry goes stale: skipped when met, dropped when the queue is compacted.
        *idle_total -= 1;
        self.stats.idle.fetch_sub(1, Ordering::Relaxed);
    }

    fn observe_connect(&self, started: Instant) {
        if let Some(observe) = self.stats.on_connect.get() {
            (observe.0)(started.elapsed());
        }
    }

    /// The pool-clock millisecond of an instant (see `now_ms`).
    fn ms_at(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64 + 1
    }

    fn sweep_every(&self) -> Duration {
        let check = Duration::from_millis(self.deadline_check_ms.load(Ordering::Relaxed));
        sweep_every(&self.limits, check)
    }

    fn now_ms(&self) -> u64 {
        // +1 keeps 0 free to mean "in use" / "no hint".
        crate::io::coarse_now()
            .saturating_duration_since(self.epoch)
            .as_millis() as u64
            + 1
    }

    fn checkout_from(
        self: &Arc<Self>,
        key: &Target,
        sender: Sender,
        shared: Arc<ConnShared>,
        reused: bool,
    ) -> Checkout {
        if reused {
            Stats::bump(&self.stats.reused);
        }
        Checkout {
            pool: Arc::downgrade(self),
            key: key.clone(),
            sender: Some(sender),
            shared,
            reused,
            released: false,
        }
    }

    /// Takes an idle HTTP/1.1 connection or an HTTP/2 stream slot, if one is usable.
    /// Called with the lock held.
    fn take_available(self: &Arc<Self>, state: &mut State, key: &Target) -> Option<Checkout> {
        let now = self.now_ms();
        let State {
            hosts,
            lru: _,
            idle_total,
            ..
        } = state;
        let host = hosts.get_mut(key)?;
        for c in &host.h2 {
            host.h2_streams = c.shared.max_streams.load(Ordering::Relaxed);
            let used = c.shared.streams.load(Ordering::Relaxed);
            if used < c.shared.max_streams.load(Ordering::Relaxed) && c.sender.is_ready() {
                c.shared.streams.fetch_add(1, Ordering::Relaxed);
                c.shared.idle_since.store(0, Ordering::Relaxed);
                let sender = Sender::H2(c.sender.clone());
                return Some(self.checkout_from(key, sender, c.shared.clone(), true));
            }
        }
        // LIFO: the most recently used idle connection first. One whose time is up
        // (the sweep has not come by yet), or that the upstream closed, is dropped.
        while let Some(mut c) = host.idle.pop() {
            self.forget_idle(idle_total);
            if let Some(counter) = self.expired(&c.shared, now) {
                Stats::bump(counter);
                self.h1_gone(host, key);
                continue;
            }
            if !c.conn.is_alive() {
                self.h1_gone(host, key);
                continue;
            }
            c.shared.idle_since.store(0, Ordering::Relaxed);
            return Some(self.checkout_from(key, Sender::H1(c.conn), c.shared, true));
        }
        None
    }

    /// The counter to bump when an idle HTTP/1.1 connection's time is up, or `None`.
    fn expired(&self, shared: &ConnShared, now: u64) -> Option<&AtomicU64> {
        let hint = shared.hint_deadline.load(Ordering::Relaxed);
        if hint != 0 && hint <= now {
            return Some(self.stats.retired_by_deadline(shared));
        }
        let since = shared.idle_since.load(Ordering::Relaxed);
        (since != 0 && since + self.limits.idle_timeout.as_millis() as u64 <= now)
            .then_some(&self.stats.evict_idle)
    }

    /// Retires the idle HTTP/1.1 connections whose time is up: `idle_timeout`, an
    /// origin's keep-alive hint, or the end of a surplus connection's grace. The
    /// sweeper task calls it every [`sweep_every`].
    fn sweep(self: &Arc<Self>) {
        let now = self.now_ms();
        let mut gone = Vec::new();
        let mut state = self.state.lock().expect("pool lock");
        let State {
            hosts, idle_total, ..
        } = &mut *state;
        for (key, host) in hosts.iter_mut() {
            let mut i = 0;
            while i < host.idle.len() {
                let Some(counter) = self.expired(&host.idle[i].shared, now) else {
                    i += 1;
                    continue;
                };
                Stats::bump(counter);
                gone.push(host.idle.remove(i));
                self.forget_idle(idle_total);
                self.h1_gone(host, key);
            }
        }
        hosts.retain(|_, h| h.open > 0 || !h.waiters.is_empty());
        // Requests under way whose response head is late are woken to end.
        let mut late = Vec::new();
        state.h1_conns.retain(|c| {
            let Some(c) = c.upgrade() else {
                return false;
            };
            let head = c.head_deadline.load(Ordering::Relaxed);
            if head != 0 && head <= now {
                c.timed_out.store(true, Ordering::Relaxed);
                late.push(c);
            }
            true
        });
        drop(state);
        for c in late {
            let waker = c.waiter.lock().expect("waiter lock").take();
            if let Some(w) = waker {
                w.wake();
            }
        }
        // The sockets close here, outside the lock.
        drop(gone);
    }

    /// Starts the sweeper task once, with the first HTTP/1.1 connection.
    fn start_sweeper(self: &Arc<Self>) {
        if self.sweeping.swap(true, Ordering::Relaxed) {
            return;
        }
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                // Read each round: a route with a shorter `upstream_response` may have
                // come with a reload.
                let every = match pool.upgrade() {
                    Some(inner) => inner.sweep_every(),
                    None => return,
                };
                tokio::time::sleep(every).await;
                let Some(inner) = pool.upgrade() else {
                    return;
                };
                inner.sweep();
            }
        });
    }

    /// An HTTP/1.1 connection was dropped, which closed it. Called with the lock held.
    fn h1_gone(self: &Arc<Self>, host: &mut Host, key: &Target) {
        Stats::bump(&self.stats.closed);
        host.open -= 1;
        self.maybe_connect_for_waiters(host, key);
    }

    /// An HTTP/1.1 connection a request held was dropped: forget it.
    fn h1_closed(self: &Arc<Self>, key: &Target) {
        let mut state = self.state.lock().expect("pool lock");
        let Some(host) = state.hosts.get_mut(key) else {
            return;
        };
        self.h1_gone(host, key);
        if host.open == 0 && host.waiters.is_empty() {
            state.hosts.remove(key);
        }
    }

    /// Opens a connection for `key` and hands it to the waiters.
    async fn connect(self: Arc<Self>, key: Target) {
        let result = self.open(&key).await;
        let mut state = self.state.lock().expect("pool lock");
        let host = state.hosts.entry(key.clone()).or_default();
        host.connecting -= 1;
        match result {
            Ok(Opened::H1(conn, shared)) => {
                drop(state);
                // One HTTP/1.1 connection serves one waiter; with none left alive it
                // goes idle.
                self.hand_h1(&key, conn, shared, false);
            }
            Ok(Opened::H2(sender, shared)) => {
                host.speaks_h2 = true;
                host.h2.push(H2Conn {
                    sender: sender.clone(),
                    shared: shared.clone(),
                });
                self.serve_h2_waiters(host, &key, &sender, &shared, false);
            }
            Err(e) => {
                host.open -= 1;
                tracing::debug!(upstream = %key, "connect failed: {e}");
                // The failure answers one waiter; the others have their own connects
                // (or queue for capacity).
                while let Some(w) = host.waiters.pop_front() {
                    self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
                    if w.tx.send(Err(e.clone())).is_ok() {
                        break;
                    }
                }
                self.maybe_connect_for_waiters(host, &key);
                if host.open == 0 && host.waiters.is_empty() {
                    state.hosts.remove(&key);
                }
            }
        }
    }

    /// Gives an HTTP/2 connection's free stream slots to waiters, first come first.
    fn serve_h2_waiters(
        self: &Arc<Self>,
        host: &mut Host,
        key: &Target,
        sender: &http2::SendRequest<RequestBody>,
        shared: &Arc<ConnShared>,
        reused: bool,
    ) {
        while shared.streams.load(Ordering::Relaxed) < shared.max_streams.load(Ordering::Relaxed) {
            let Some(w) = host.next_waiter(reused) else {
                break;
            };
            self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
            if w.tx.is_closed() {
                continue;
            }
            shared.streams.fetch_add(1, Ordering::Relaxed);
            shared.idle_since.store(0, Ordering::Relaxed);
            let c = self.checkout_from(key, Sender::H2(sender.clone()), shared.clone(), reused);
            if let Err(Ok(mut c)) = w.tx.send(Ok(c)) {
                // Gave up waiting in the meantime: take the slot back quietly (the
                // lock is held, so not through Drop).
                c.released = true;
                shared.streams.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Hands an HTTP/1.1 connection to the longest waiter, or makes it idle.
    fn hand_h1(
        self: &Arc<Self>,
        key: &Target,
        mut conn: Box<H1Conn>,
        shared: Arc<ConnShared>,
        reused: bool,
    ) {
        let mut state = self.state.lock().expect("pool lock");
        while let Some(host) = state.hosts.get_mut(key)
            && let Some(w) = host.next_waiter(reused)
        {
            self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
            if w.tx.is_closed() {
                continue;
            }
            shared.idle_since.store(0, Ordering::Relaxed);
            let c = self.checkout_from(key, Sender::H1(conn), shared.clone(), reused);
            match w.tx.send(Ok(c)) {
                Ok(()) => return,
                // The waiter left between the check and the send: keep looking.
                Err(back) => {
                    conn = back
                        .ok()
                        .and_then(Checkout::into_h1)
                        .expect("the checkout just made comes back whole");
                }
            }
        }
        self.make_idle(&mut state, key, conn, shared);
    }

    /// Puts an HTTP/1.1 connection on its key's idle list, evicting to stay in bounds.
    fn make_idle(
        self: &Arc<Self>,
        state: &mut State,
        key: &Target,
        conn: Box<H1Conn>,
        shared: Arc<ConnShared>,
    ) {
        let limits = &self.limits;
        if limits.max_idle_per_host == 0 || limits.max_idle == 0 {
            Stats::bump(&self.stats.evict_lru);
            drop(conn);
            if let Some(host) = state.hosts.get_mut(key) {
                self.h1_gone(host, key);
            }
            return;
        }
        shared.idle_since.store(self.now_ms(), Ordering::Relaxed);
        let seq = state.next_seq;
        state.next_seq += 1;
        let State {
            hosts,
            lru,
            idle_total,
            ..
        } = state;
        let host = match hosts.get_mut(key) {
            Some(h) => h,
            None => hosts.entry(key.clone()).or_default(),
        };
        // Beyond the key's bound, its coldest connections become surplus: the sweep
        // retires each after SURPLUS_GRACE unless a request takes it first.
        let excess = (host.idle.len() + 1).saturating_sub(limits.max_idle_per_host);
        if excess > 0 {
            let retire_at = self.now_ms() + SURPLUS_GRACE.as_millis() as u64;
            for c in host.idle.iter().take(excess) {
                if !c.shared.surplus.swap(true, Ordering::Relaxed) {
                    let hint = c.shared.hint_deadline.load(Ordering::Relaxed);
                    if hint == 0 || hint > retire_at {
                        c.shared.hint_deadline.store(retire_at, Ordering::Relaxed);
                    }
                }
            }
        }
        host.idle.push(IdleConn {
            conn,
            shared,
            lru_seq: seq,
        });
        lru.push_back((seq, key.clone()));
        *idle_total += 1;
        self.stats.idle.fetch_add(1, Ordering::Relaxed);
        let is_live = |hosts: &HashMap<Target, Host, Hasher>, seq: u64, key: &Target| {
            hosts
                .get(key)
                .is_some_and(|h| h.idle.iter().any(|c| c.lru_seq == seq))
        };
        while *idle_total > limits.max_idle {
            // The pool-wide least recently used connection makes room.
            let Some((old_seq, old_key)) = lru.pop_front() else {
                break;
            };
            if let Some(h) = hosts.get_mut(&old_key)
                && let Some(pos) = h.idle.iter().position(|c| c.lru_seq == old_seq)
            {
                h.idle.remove(pos);
                *idle_total -= 1;
                self.stats.idle.fetch_sub(1, Ordering::Relaxed);
                Stats::bump(&self.stats.evict_lru);
                self.h1_gone(h, &old_key);
            }
        }
        if lru.len() > 2 * *idle_total + 64 {
            lru.retain(|(seq, key)| is_live(hosts, *seq, key));
        }
    }

    fn checkin_h1(
        self: &Arc<Self>,
        key: &Target,
        conn: Box<H1Conn>,
        shared: Arc<ConnShared>,
        hint: Option<Duration>,
    ) {
        shared.surplus.store(false, Ordering::Relaxed);
        if let Some(hint) = hint {
            let margin = HINT_MARGIN.min(hint / 2);
            let retire_in = hint.saturating_sub(margin);
            if retire_in.is_zero() {
                Stats::bump(&self.stats.evict_hint);
                drop(conn);
                self.h1_closed(key);
                return;
            }
            let deadline = self.now_ms() + retire_in.as_millis() as u64;
            shared.hint_deadline.store(deadline, Ordering::Relaxed);
        } else {
            shared.hint_deadline.store(0, Ordering::Relaxed);
        }
        self.hand_h1(key, conn, shared, true);
    }

    /// A request finished with its HTTP/2 stream slot.
    fn release_stream(self: &Arc<Self>, key: &Target, shared: &Arc<ConnShared>) {
        let before = shared.streams.fetch_sub(1, Ordering::SeqCst);
        if before == 1 {
            shared.idle_since.store(self.now_ms(), Ordering::Relaxed);
        }
        // Nobody waits anywhere (the usual case): no need for the lock. A waiter that
        // arrives just after this check finds the free slot itself, under the lock.
        if self.stats.waiting.load(Ordering::SeqCst) == 0 {
            return;
        }
        let mut state = self.state.lock().expect("pool lock");
        let Some(host) = state.hosts.get_mut(key) else {
            return;
        };
        if host.waiters.is_empty() {
            return;
        }
        if let Some(c) = host.h2.iter().find(|c| c.shared.id == shared.id) {
            let (sender, shared) = (c.sender.clone(), c.shared.clone());
            self.serve_h2_waiters(host, key, &sender, &shared, true);
        }
    }

    /// Starts connects for waiters that have none, when capacity allows.
    fn maybe_connect_for_waiters(self: &Arc<Self>, host: &mut Host, key: &Target) {
        let max = self.limits.max_conns_per_host;
        let per_conn = if host.speaks_h2 { host.h2_streams } else { 1 };
        while host.connecting * per_conn < host.waiters.len() && (max == 0 || host.open < max) {
            host.open += 1;
            host.connecting += 1;
            tokio::spawn(Inner::connect(self.clone(), key.clone()));
        }
    }

    /// The driver task of an HTTP/2 connection ended: forget it.
    fn closed(self: &Arc<Self>, key: &Target, id: u64) {
        Stats::bump(&self.stats.closed);
        let mut state = self.state.lock().expect("pool lock");
        let Some(host) = state.hosts.get_mut(key) else {
            return;
        };
        host.open -= 1;
        host.h2.retain(|c| c.shared.id != id);
        self.maybe_connect_for_waiters(host, key);
        if host.open == 0 && host.waiters.is_empty() {
            state.hosts.remove(key);
        }
    }

    /// The idle timer of HTTP/2 connection `id` fired: retire it if no stream uses it.
    /// Returns true when it was removed from the pool.
    fn retire_idle_h2(&self, key: &Target, id: u64) -> bool {
        let mut state = self.state.lock().expect("pool lock");
        let Some(host) = state.hosts.get_mut(key) else {
            return false;
        };
        if let Some(pos) = host.h2.iter().position(|c| c.shared.id == id)
            && host.h2[pos].shared.streams.load(Ordering::Relaxed) == 0
        {
            host.h2.remove(pos);
            Stats::bump(&self.stats.evict_idle);
            return true;
        }
        false
    }

    /// Connects; for HTTP/2 also runs the handshake and spawns the connection's driver
    /// task. An HTTP/1.1 connection needs neither: its requests drive it.
    async fn open(self: &Arc<Self>, key: &Target) -> Result<Opened, CheckoutError> {
        let started = Instant::now();
        let (stream, h2) = (self.connector)(key)
            .await
            .map_err(CheckoutError::Connect)?;
        let shared = Arc::new(ConnShared {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            // An HTTP/2 connection is idle until a stream takes it (one opened for a
            // waiter another connection served may never get one); an HTTP/1.1
            // connection goes straight to a request or to the idle list.
            idle_since: AtomicU64::new(if h2 { self.now_ms() } else { 0 }),
            hint_deadline: AtomicU64::new(0),
            streams: AtomicUsize::new(0),
            max_streams: AtomicUsize::new(H2_DEFAULT_STREAMS),
            surplus: std::sync::atomic::AtomicBool::new(false),
            head_deadline: AtomicU64::new(0),
            timed_out: std::sync::atomic::AtomicBool::new(false),
            waiter: Mutex::new(None),
        });
        if !h2 {
            Stats::bump(&self.stats.opened);
            self.observe_connect(started);
            self.state
                .lock()
                .expect("pool lock")
                .h1_conns
                .push(Arc::downgrade(&shared));
            self.start_sweeper();
            return Ok(Opened::H1(Box::new(H1Conn::new(stream)), shared));
        }
        let exec = ConnExec::default();
        let (sender, conn) = http2::Builder::new(exec.clone())
            .timer(TokioTimer::new())
            // PING keepalive: a peer that stops answering is found and dropped.
            .keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(false)
            .initial_max_send_streams(H2_DEFAULT_STREAMS)
            // The bound HTTP/1.1 upstreams get (hyper's default would be 16 KiB).
            .max_header_list_size(crate::http1::MAX_HEAD as u32)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| CheckoutError::Handshake(e.to_string()))?;
        Stats::bump(&self.stats.opened);
        self.observe_connect(started);
        let driver = H2Driver {
            conn,
            shared: shared.clone(),
            exec,
            finished: false,
        };
        tokio::spawn(drive_h2(
            driver,
            Arc::downgrade(self),
            key.clone(),
            shared.clone(),
            self.limits.idle_timeout,
        ));
        Ok(Opened::H2(sender, shared))
    }
}

/// How often the sweeper looks for idle HTTP/1.1 connections whose time is up and for
/// late response heads: often enough to hold `idle_timeout`, a surplus connection's
/// grace and a hint's margin to within half of the shortest (checkouts check idle
/// deadlines themselves, so a late sweep only holds a socket a little longer), and
/// response deadlines to within `deadline_check`.
fn sweep_every(limits: &Limits, deadline_check: Duration) -> Duration {
    let shortest = limits
        .idle_timeout
        .min(SURPLUS_GRACE)
        .min(HINT_MARGIN)
        .min(deadline_check * 2);
    (shortest / 2).max(Duration::from_millis(10))
}

enum Opened {
    H1(Box<H1Conn>, Arc<ConnShared>),
    H2(http2::SendRequest<RequestBody>, Arc<ConnShared>),
}

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

/// Polls an HTTP/2 connection and keeps the peer's stream limit current; dropping it
/// ends the connection's tasks.
struct H2Driver {
    conn: http2::Connection<TokioIo<Stream>, RequestBody, ConnExec>,
    shared: Arc<ConnShared>,
    exec: ConnExec,
    finished: bool,
}

impl Drop for H2Driver {
    fn drop(&mut self) {
        // Dropped before hyper's side finished: the connection was retired while idle,
        // so end its tasks (and close the socket). When hyper's side ends by itself,
        // its connection task finishes any streams still under way and closes.
        if !self.finished {
            self.exec.end();
        }
    }
}

impl Future for H2Driver {
    type Output = hyper::Result<()>;
    fn poll(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.conn).poll(cx);
        this.finished = r.is_ready();
        let max = this.conn.current_max_send_streams().max(1);
        this.shared.max_streams.store(max, Ordering::Relaxed);
        r
    }
}

/// An HTTP/2 connection's driver task: runs hyper's connection future and retires the
/// connection when no stream has used it for `idle_timeout`.
async fn drive_h2(
    conn: H2Driver,
    pool: Weak<Inner>,
    key: Target,
    shared: Arc<ConnShared>,
    idle_timeout: Duration,
) {
    // hyper's connection runs in a task of its own, so the timer here is not polled on
    // every wake of a busy connection; aborting that task drops (and closes) it.
    let mut conn_task = tokio::spawn(conn);
    let sleep = tokio::time::sleep(idle_timeout);
    tokio::pin!(sleep);
    let mut retired = false;
    loop {
        tokio::select! {
            r = &mut conn_task => {
                if let Ok(Err(e)) = r {
                    tracing::debug!(upstream = %key, "upstream connection ended: {e}");
                }
                break;
            }
            () = sleep.as_mut(), if !retired => {
                let Some(inner) = pool.upgrade() else {
                    conn_task.abort();
                    break;
                };
                // The precise clock: this timer was set from it, and the coarse one may
                // not have reached the deadline yet (re-arming for an instant already
                // past would spin until it does).
                let now = inner.ms_at(Instant::now());
                let since = shared.idle_since.load(Ordering::Relaxed);
                if since == 0 {
                    // In use: it cannot be idle for long before this looks again.
                    sleep.as_mut().reset(Instant::now() + idle_timeout);
                    continue;
                }
                let deadline = since + idle_timeout.as_millis() as u64;
                if deadline <= now {
                    // Removed from the pool, no request takes it; an idle connection
                    // already retired (after GOAWAY) cannot get one either.
                    retired = inner.retire_idle_h2(&key, shared.id);
                    if shared.streams.load(Ordering::Relaxed) == 0 {
                        conn_task.abort();
                        break;
                    }
                    if !retired {
                        sleep.as_mut().reset(Instant::now() + idle_timeout);
                    }
                } else {
                    sleep.as_mut().reset(inner.epoch + Duration::from_millis(deadline - 1));
                }
            }
        }
    }
    if let Some(inner) = pool.upgrade() {
        inner.closed(&key, shared.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Version;
    use hyper::service::service_fn;

    /// An in-memory origin per connection: `/close` answers with `Connection: close`,
    /// `/slow` takes 10 s, anything else answers `ok` at once.
    fn pool_with(limits: Limits, h2: bool) -> (Pool, Arc<AtomicUsize>) {
        let connects = Arc::new(AtomicUsize::new(0));
        let counter = connects.clone();
        let connector: Connector = Arc::new(move |_key: &Target| {
            counter.fetch_add(1, Ordering::SeqCst);
            let (client, server) = tokio::io::duplex(1 << 16);
            tokio::spawn(async move {
                let service = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                    let mut resp = http::Response::new(crate::proxy::Body::text("ok"));
                    match req.uri().path() {
                        "/close" => {
                            resp.headers_mut()
                                .insert("connection", "close".parse().unwrap());
                        }
                        "/slow" => tokio::time::sleep(Duration::from_secs(10)).await,
                        _ => {}
                    }
                    Ok::<_, std::convert::Infallible>(resp)
                });
                let io = TokioIo::new(server);
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .max_concurrent_streams(2)
                    .serve_connection(io, service)
                    .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                }
            });
            Box::pin(async move { Ok((Stream::Duplex(client), h2)) })
        });
        (Pool::new(limits, connector), connects)
    }

    fn limits() -> Limits {
        Limits {
            idle_timeout: Duration::from_secs(90),
            max_idle_per_host: 32,
            max_idle: 1024,
            max_conns_per_host: 0,
            wait_timeout: Duration::from_secs(5),
            deadline_check: Duration::from_secs(15),
        }
    }

    fn key(authority: &str) -> Target {
        Target::new(
            Arc::new(Profile {
                id: 0,
                version: Version::Auto,
                tls: None,
                deny: Vec::new().into(),
                connect_timeout: Duration::from_secs(5),
                response_timeout: Duration::from_secs(60),
            }),
            Scheme::Http,
            authority.parse().unwrap(),
        )
    }

    /// Sends `path` on a checked-out connection and reads the whole response.
    async fn get(c: &mut Checkout, path: &str) -> http::Response<Bytes> {
        let mut req = http::Request::new(RequestBody::Empty);
        *req.uri_mut() = path.parse().unwrap();
        req.headers_mut().insert("host", "test".parse().unwrap());
        if c.is_h2() {
            *req.uri_mut() = format!("http://test{path}").parse().unwrap();
        }
        let resp = match c.send(req, Instant::now() + Duration::from_secs(60)).await {
            Ok(r) => r,
            Err(_) => panic!("send failed"),
        };
        let (parts, mut reply) = resp.into_parts();
        let mut data = Vec::new();
        while let Some(frame) = std::future::poll_fn(|cx| reply.poll_frame(Some(&mut *c), cx)).await
        {
            if let Ok(d) = frame.unwrap().into_data() {
                data.extend_from_slice(&d);
            }
        }
        http::Response::from_parts(parts, Bytes::from(data))
    }

    use bytes::Bytes;

    #[tokio::test(start_paused = true)]
    async fn idle_connections_are_reused_last_in_first_out() {
        let (pool, connects) = pool_with(limits(), false);
        let k = key("a");
        let mut a = pool.checkout(&k, false).await.unwrap();
        let mut b = pool.checkout(&k, false).await.unwrap();
        get(&mut a, "/").await;
        get(&mut b, "/").await;
        let (a_id, b_id) = (a.id(), b.id());
        a.release(true, None);
        b.release(true, None);
        assert_eq!(pool.idle_count(), 2);
        let c = pool.checkout(&k, false).await.unwrap();
        assert_eq!(c.id(), b_id, "the most recently returned goes first");
        assert!(c.reused);
        let d = pool.checkout(&k, false).await.unwrap();
        assert_eq!(d.id(), a_id);
        assert_eq!(connects.load(Ordering::SeqCst), 2);
        assert_eq!(pool.stats().reused.load(Ordering::Relaxed), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn clients_of_different_keys_never_share() {
        let (pool, connects) = pool_with(limits(), false);
        let mut a = pool.checkout(&key("a"), false).await.unwrap();
        get(&mut a, "/").await;
        a.release(true, None);
        let b = pool.checkout(&key("b"), false).await.unwrap();
        assert!(!b.reused);
        assert_eq!(connects.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_not_released_is_closed_not_reused() {
        let (pool, connects) = pool_with(limits(), false);
        let k = key("a");
        let mut a = pool.checkout(&k, false).await.unwrap();
        get(&mut a, "/").await;
        drop(a);
        let b = pool.checkout(&k, false).await.unwrap();
        assert!(!b.reused);
        assert_eq!(connects.load(Ordering::SeqCst), 2);
        // The dropped one closes and is counted.
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(pool.stats().closed.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_closed_idle_connection_is_skipped_on_checkout() {
        let (pool, connects) = pool_with(limits(), false);
        let k = key("a");
        let mut a = pool.checkout(&k, false).await.unwrap();
        // The origin closes after this response; the pool is told it is reusable
        // anyway, to check that checkout verifies the connection is open.
        get(&mut a, "/close").await;
        a.release(true, None);
        tokio::time::sleep(Duration::from_millis(10)).await;
        let b = pool.checkout(&k, false).await.unwrap();
        assert!(!b.reused);
        assert_eq!(connects.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_retires_connections_by_timer() {
        let (pool, _) = pool_with(limits(), false);
        let k = key("a");
        let mut a = pool.checkout(&k, false).await.unwrap();
        get(&mut a, "/").await;
        a.release(true, None);
        tokio::time::sleep(Duration::from_secs(89)).await;
        assert_eq!(pool.idle_count(), 1);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(pool.idle_count(), 0);
        assert_eq!(pool.stats().evict_idle.load(Ordering::Relaxed), 1);
        assert_eq!(pool.stats().idle.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn use_pushes_the_idle_deadline_back() {
        let (pool, _) = pool_with(limits(), false);
        let k = key("a");
        for _ in 0..3 {
            let mut a = pool.checkout(&k, false).await.unwrap();
            get(&mut a, "/").await;
            a.release(true, None);
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        assert_eq!(pool.idle_count(), 1, "used every 60 s, never idle for 90 s");
        assert_eq!(pool.stats().opened.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_keep_alive_hint_retires_before_it_runs_out() {
        let (pool, _) = pool_with(limits(), false);
        let k = key("a");
        let mut a = pool.checkout(&k, false).await.unwrap();
        get(&mut a, "/").await;
        a.release(true, Some(Duration::from_secs(2)));
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert_eq!(pool.idle_count(), 1);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            pool.idle_count(),
            0,
            "retired a margin before the origin's 2 s"
        );
        assert_eq!(pool.stats().evict_hint.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn max_idle_per_host_and_max_idle_evict_the_least_recently_used() {
        let mut l = limits();
        l.max_idle_per_host = 2;
        l.max_idle = 3;
        let (pool, _) = pool_with(l, false);
        // Three connections to "a": the per-host bound keeps two.
        let mut conns = Vec::new();
        for _ in 0..3 {
            conns.push(pool.checkout(&key("a"), false).await.unwrap());
        }
        for mut c in conns.drain(..) {
            get(&mut c, "/").await;
            c.release(true, None);
        }
        // The coldest is surplus: its timer retires it after the grace.
        assert_eq!(pool.idle_count(), 3);
        tokio::time::sleep(SURPLUS_GRACE + Duration::from_millis(100)).await;
        assert_eq!(pool.idle_count(), 2);
        assert_eq!(pool.stats().evict_lru.load(Ordering::Relaxed), 1);
        // Two to "b": the pool-wide bound of three drops the oldest of "a" at once.
        for _ in 0..2 {
            conns.push(pool.checkout(&key("b"), false).await.unwrap());
        }
        for mut c in conns.drain(..) {
            get(&mut c, "/").await;
            c.release(true, None);
        }
        assert_eq!(pool.idle_count(), 3);
        assert_eq!(pool.stats().evict_lru.load(Ordering::Relaxed), 2);
        let state = pool.inner.state.lock().unwrap();
        assert_eq!(state.hosts[&key("a")].idle.len(), 1);
        assert_eq!(state.hosts[&key("b")].idle.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_beyond_max_idle_per_host_keeps_its_connections_for_the_next_round() {
        let mut l = limits();
        l.max_idle_per_host = 2;
        let (pool, connects) = pool_with(l, false);
        let k = key("a");
        // Five requests at once return five connections at once, then five more come
        // a moment later: they reuse all five, nothing is opened again.
        for round in 0..3 {
            let mut conns = Vec::new();
            for _ in 0..5 {
                conns.push(pool.checkout(&k, false).await.unwrap());
            }
            for mut c in conns.drain(..) {
                get(&mut c, "/").await;
                c.release(true, None);
            }
            assert_eq!(connects.load(Ordering::Relaxed), 5, "round {round}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(pool.stats().evict_lru.load(Ordering::Relaxed), 0);
        // Quiet for the grace: back within the bound.
        tokio::time::sleep(SURPLUS_GRACE + Duration::from_millis(100)).await;
        assert_eq!(pool.idle_count(), 2);
        assert_eq!(pool.stats().evict_lru.load(Ordering::Relaxed), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn max_conns_per_host_queues_waiters_first_come_first_served() {
        let mut l = limits();
        l.max_conns_per_host = 1;
        let (pool, connects) = pool_with(l, false);
        let k = key("a");
        let mut first = pool.checkout(&k, false).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiting = Vec::new();
        for n in 0..3 {
            let (pool, k, order) = (pool.clone(), k.clone(), order.clone());
            waiting.push(tokio::spawn(async move {
                let mut c = pool.checkout(&k, false).await.unwrap();
                order.lock().unwrap().push(n);
                get(&mut c, "/").await;
                c.release(true, None);
            }));
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(pool.stats().waiting.load(Ordering::Relaxed), 3);
        get(&mut first, "/").await;
        first.release(true, None);
        for w in waiting {
            w.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2]);
        assert_eq!(connects.load(Ordering::SeqCst), 1);
        assert_eq!(pool.stats().waiting.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_queue_is_bounded() {
        let mut l = limits();
        l.max_conns_per_host = 1;
        l.wait_timeout = Duration::from_secs(60);
        let (pool, _) = pool_with(l, false);
        let k = key("a");
        let _held = pool.checkout(&k, false).await.unwrap();
        let mut waiting = Vec::new();
        for _ in 0..MAX_WAITERS {
            let (pool, k) = (pool.clone(), k.clone());
            waiting.push(tokio::spawn(async move { pool.checkout(&k, false).await }));
        }
        while pool.stats().waiting.load(Ordering::SeqCst) < MAX_WAITERS {
            tokio::task::yield_now().await;
        }
        let started = Instant::now();
        let err = pool.checkout(&k, false).await.unwrap_err();
        assert!(matches!(err, CheckoutError::Exhausted));
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "refused at once, not after waiting"
        );
        for w in waiting {
            w.abort();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_gives_up_after_wait_timeout() {
        let mut l = limits();
        l.max_conns_per_host = 1;
        let (pool, _) = pool_with(l, false);
        let k = key("a");
        let _held = pool.checkout(&k, false).await.unwrap();
        let started = Instant::now();
        let err = pool.checkout(&k, false).await.unwrap_err();
        assert!(matches!(err, CheckoutError::Exhausted));
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert_eq!(pool.stats().waiting.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_opens_at_most_one_connection_per_request() {
        let (pool, connects) = pool_with(limits(), false);
        let k = key("a");
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (pool, k) = (pool.clone(), k.clone());
            tasks.push(tokio::spawn(async move {
                let mut c = pool.checkout(&k, false).await.unwrap();
                get(&mut c, "/").await;
                c.release(true, None);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert!(connects.load(Ordering::SeqCst) <= 8);
        assert_eq!(pool.idle_count(), connects.load(Ordering::SeqCst));
    }

    #[tokio::test(start_paused = true)]
    async fn a_returned_connection_serves_a_waiter_before_a_new_one_is_ready() {
        let (pool, _) = pool_with(limits(), false);
        let k = key("a");
        let mut a = pool.checkout(&k, false).await.unwrap();
        get(&mut a, "/").await;
        let a_id = a.id();
        // A second request finds nothing idle and starts a connect; the first
        // connection comes back before that connect is done.
        let waiter = {
            let (pool, k) = (pool.clone(), k.clone());
            tokio::spawn(async move { pool.checkout(&k, false).await.unwrap().id() })
        };
        a.release(true, None);
        assert_eq!(waiter.await.unwrap(), a_id);
    }

    #[tokio::test(start_paused = true)]
    async fn the_sweep_ends_a_late_http1_response_head() {
        let mut l = limits();
        l.deadline_check = Duration::from_millis(250);
        let (pool, _) = pool_with(l, false);
        let k = key("a");
        let mut c = pool.checkout(&k, false).await.unwrap();
        let mut req = http::Request::new(RequestBody::Empty);
        *req.uri_mut() = "/slow".parse().unwrap();
        req.headers_mut().insert("host", "test".parse().unwrap());
        let started = Instant::now();
        let result = c.send(req, started + Duration::from_secs(1)).await;
        assert!(matches!(result, Err(SendError::TimedOut)));
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(1) && waited <= Duration::from_millis(1250),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_fresh_checkout_never_gets_a_reused_connection() {
        let (pool, _) = pool_with(limits(), false);
        let k = key("a");
        let mut a = pool.checkout(&k, false).await.unwrap();
        get(&mut a, "/").await;
        let a_id = a.id();
        let retry = {
            let (pool, k) = (pool.clone(), k.clone());
            tokio::spawn(async move { pool.checkout(&k, true).await.unwrap() })
        };
        tokio::task::yield_now().await;
        a.release(true, None);
        let c = retry.await.unwrap();
        assert_ne!(c.id(), a_id);
        assert!(!c.reused);
        assert_eq!(pool.idle_count(), 1, "the returned one went idle instead");
    }

    #[tokio::test(start_paused = true)]
    async fn http2_connections_carry_streams_up_to_the_peers_limit() {
        let (pool, connects) = pool_with(limits(), true);
        let k = key("a");
        // The in-memory origin allows 2 concurrent streams.
        let mut first = pool.checkout(&k, false).await.unwrap();
        get(&mut first, "/").await; // settings exchanged
        let mut held = vec![first];
        for _ in 0..3 {
            held.push(pool.checkout(&k, false).await.unwrap());
        }
        assert_eq!(
            connects.load(Ordering::SeqCst),
            2,
            "two streams per connection"
        );
        let ids: std::collections::HashSet<u64> = held.iter().map(|c| c.id()).collect();
        assert_eq!(ids.len(), 2);
        for c in held {
            c.release(true, None);
        }
        let c = pool.checkout(&k, false).await.unwrap();
        assert!(c.reused);
    }
}
