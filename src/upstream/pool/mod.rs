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
//!   reads it (`conn::h1`), and while idle it is plain data on its key's list. An
//!   HTTP/2 connection runs in its driver's task (`conn::h2`), watched by a task of the
//!   pool's (`driver.rs`). What a connection is, the pool learns from [`Protocol`]: it
//!   knows nothing of HTTP.
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

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::connect::ConnectError;
use crate::body::BoxError;
use crate::io::Slots;

mod driver;
mod idle;
mod key;
mod sweep;
mod waiters;

use driver::{Driven, drive_h2};
pub use key::Target;
use sweep::sweep_every;

/// Most requests that may wait for one key's connections; more get 503 at once.
pub const MAX_WAITERS: usize = 1024;
/// Stream slots used per HTTP/2 connection before the peer's own limit is known.
pub const H2_DEFAULT_STREAMS: usize = 100;
/// How long a connection beyond `max_idle_per_host` may stay idle (see the Bounds
/// invariant).
pub const SURPLUS_GRACE: Duration = Duration::from_secs(1);
/// Retire a connection this long before an origin's `Keep-Alive: timeout` runs out
/// (at most half the hint), so no request races the origin's close.
const HINT_MARGIN: Duration = Duration::from_secs(1);

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

/// What the pool needs of the connections it keeps. The pool itself knows nothing of
/// HTTP: the upstream side's `conn::Http` says what its connections are and how to
/// look at them.
pub trait Protocol: Send + Sync + Sized + 'static {
    /// A connection lent to one request at a time (HTTP/1.1): idle on its key's list,
    /// or held by one [`Checkout`].
    type H1: Send + 'static;
    /// A handle on a connection requests share by streams (HTTP/2).
    type H2: Clone + Send + Sync + 'static;
    /// The task that drives a shared connection; dropping it before it ended ends the
    /// connection ([`Protocol::end`]).
    type Driver: Future<Output = Result<(), BoxError>> + Send + Unpin + 'static;
    /// Checked before an idle connection is lent: no close seen, no stray byte.
    fn is_alive(conn: &mut Self::H1) -> bool;
    /// Both messages of its last exchange ended and nothing is left buffered.
    fn is_clean(conn: &Self::H1) -> bool;
    /// Going idle: gives its buffers up, or keeps them in one of `kept`'s places.
    fn rest(conn: &mut Self::H1, kept: &Arc<Slots>);
    /// The shared connection takes a new stream now.
    fn is_ready(sender: &Self::H2) -> bool;
    /// The peer's current stream limit, as the driver last saw it.
    fn max_streams(driver: &Self::Driver) -> usize;
    /// Ends a shared connection's tasks (it was retired while idle).
    fn end(driver: &Self::Driver);
}

/// A connection the connector opened.
pub enum Opened<P: Protocol> {
    H1(Box<P::H1>),
    H2(P::H2, P::Driver),
}

/// Opens a connection for a key.
pub type Connector<P> = Arc<
    dyn Fn(&Target) -> Pin<Box<dyn Future<Output = Result<Opened<P>, CheckoutError>> + Send>>
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
pub(in crate::upstream) enum Sender<P: Protocol> {
    /// Boxed: a TLS connection's state is large, and checkouts move (benches/pool.rs).
    H1(Box<P::H1>),
    H2(P::H2),
}

/// State shared by a connection's driver task, the pool and the request using it.
pub(in crate::upstream) struct ConnShared {
    pub(in crate::upstream) id: u64,
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
    pub(in crate::upstream) head_deadline: AtomicU64,
    /// Set by the sweep when `head_deadline` passed.
    pub(in crate::upstream) timed_out: std::sync::atomic::AtomicBool,
    /// The task waiting for the response head, woken by the sweep on a timeout.
    pub(in crate::upstream) waiter: Mutex<Option<std::task::Waker>>,
}

impl ConnShared {
    /// Lets the sweep wake the task behind `cx` when `head_deadline` passes.
    pub(in crate::upstream) fn wake_on_deadline(&self, cx: &std::task::Context<'_>) {
        let mut waiter = self.waiter.lock().expect("waiter lock");
        if !waiter.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            *waiter = Some(cx.waker().clone());
        }
    }

    /// Nothing is due any more. The waker goes too: it keeps its task's memory alive,
    /// and an idle connection holds none.
    pub(in crate::upstream) fn disarm(&self) {
        self.head_deadline.store(0, Ordering::Relaxed);
        self.waiter.lock().expect("waiter lock").take();
    }
}

/// An idle HTTP/1.1 connection.
struct IdleConn<P: Protocol> {
    conn: Box<P::H1>,
    shared: Arc<ConnShared>,
    /// Position in the pool-wide LRU order.
    lru_seq: u64,
}

/// A live HTTP/2 connection.
struct H2Conn<P: Protocol> {
    sender: P::H2,
    shared: Arc<ConnShared>,
}

/// A request waiting for a connection.
struct Waiter<P: Protocol> {
    tx: oneshot::Sender<Result<Checkout<P>, CheckoutError>>,
    /// A retry that must not be sent on a reused connection: it waits for a new one.
    fresh: bool,
}

/// One key's connections.
struct Host<P: Protocol> {
    /// HTTP/1.1 idle connections; the last is the most recently used.
    idle: Vec<IdleConn<P>>,
    h2: Vec<H2Conn<P>>,
    /// Connections open or being opened.
    open: usize,
    /// Set once an HTTP/2 connection was made for this key (or the profile asks for
    /// HTTP/2): then one connection serves many waiters, and a burst opens one per
    /// `H2_DEFAULT_STREAMS` waiters instead of one per waiter.
    speaks_h2: bool,
    /// The stream limit the last HTTP/2 connection of this key reported.
    h2_streams: usize,
    connecting: usize,
    waiters: VecDeque<Waiter<P>>,
}

impl<P: Protocol> Host<P> {
    /// The longest waiter that may take a connection; a reused connection skips
    /// waiters that asked for a fresh one.
    fn next_waiter(&mut self, reused: bool) -> Option<Waiter<P>> {
        if !reused {
            return self.waiters.pop_front();
        }
        let pos = self.waiters.iter().position(|w| !w.fresh)?;
        self.waiters.remove(pos)
    }
}

impl<P: Protocol> Default for Host<P> {
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

struct State<P: Protocol> {
    hosts: HashMap<Target, Host<P>, Hasher>,
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

pub(in crate::upstream) struct Inner<P: Protocol> {
    state: Mutex<State<P>>,
    limits: Limits,
    connector: Connector<P>,
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
pub struct Pool<P: Protocol> {
    inner: Arc<Inner<P>>,
}

impl<P: Protocol> Clone for Pool<P> {
    fn clone(&self) -> Self {
        Pool {
            inner: self.inner.clone(),
        }
    }
}

impl<P: Protocol> fmt::Debug for Pool<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("limits", &self.inner.limits)
            .finish()
    }
}

/// A connection lent to one request (or, for HTTP/2, one stream slot on a shared one).
/// Dropping it without [`Checkout::release`] closes an HTTP/1.1 connection.
pub struct Checkout<P: Protocol> {
    pub(in crate::upstream) pool: Weak<Inner<P>>,
    pub(in crate::upstream) key: Target,
    /// `None` only once released.
    pub(in crate::upstream) sender: Option<Sender<P>>,
    pub(in crate::upstream) shared: Arc<ConnShared>,
    /// True when the connection served a request before this one.
    pub reused: bool,
    pub(in crate::upstream) released: bool,
}

impl<P: Protocol> fmt::Debug for Checkout<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checkout")
            .field("key", &self.key)
            .field("id", &self.shared.id)
            .field("reused", &self.reused)
            .finish()
    }
}

impl<P: Protocol> Checkout<P> {
    pub fn is_h2(&self) -> bool {
        matches!(self.sender, Some(Sender::H2(_)))
    }

    /// The connection's id, unique in this pool.
    pub fn id(&self) -> u64 {
        self.shared.id
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
            Some(Sender::H1(mut conn)) if reusable && P::is_clean(&conn) => {
                P::rest(&mut conn, &pool.kept_buffers);
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
    pub fn into_exclusive(mut self) -> Option<Box<P::H1>> {
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
        Some(conn)
    }

    /// Takes the connection back without any bookkeeping (the pool lock is held).
    fn into_h1(mut self) -> Option<Box<P::H1>> {
        self.released = true;
        match self.sender.take() {
            Some(Sender::H1(c)) => Some(c),
            _ => None,
        }
    }
}

impl<P: Protocol> Drop for Checkout<P> {
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

impl<P: Protocol> Pool<P> {
    pub fn new(limits: Limits, connector: Connector<P>) -> Pool<P> {
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

    /// Idle connections kept for `key`.
    #[cfg(test)]
    pub(in crate::upstream) fn idle_for(&self, key: &Target) -> usize {
        let state = self.inner.state.lock().expect("pool lock");
        state.hosts.get(key).map_or(0, |h| h.idle.len())
    }

    /// Counts a retry (the pool's caller decides when to retry).
    pub fn count_retry(&self) {
        Stats::bump(&self.inner.stats.retried);
    }

    /// An idle connection or a free HTTP/2 stream slot for `key`, if there is one now.
    /// The fast path: no waiting, no connect, nothing to await.
    pub fn try_checkout(&self, key: &Target) -> Option<Checkout<P>> {
        let mut state = self.inner.state.lock().expect("pool lock");
        self.inner.take_available(&mut state, key)
        // pool lock released here
    }

    /// A connection for `key`: an idle one, a stream slot on an HTTP/2 one, or a new
    /// one. With `fresh`, never a reused connection.
    pub async fn checkout(&self, key: &Target, fresh: bool) -> Result<Checkout<P>, CheckoutError> {
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

impl<P: Protocol> Inner<P> {
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
    pub(in crate::upstream) fn ms_at(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64 + 1
    }

    fn sweep_every(&self) -> Duration {
        let check = Duration::from_millis(self.deadline_check_ms.load(Ordering::Relaxed));
        sweep_every(&self.limits, check)
    }

    pub(in crate::upstream) fn now_ms(&self) -> u64 {
        // +1 keeps 0 free to mean "in use" / "no hint".
        crate::io::coarse_now()
            .saturating_duration_since(self.epoch)
            .as_millis() as u64
            + 1
    }

    fn checkout_from(
        self: &Arc<Self>,
        key: &Target,
        sender: Sender<P>,
        shared: Arc<ConnShared>,
        reused: bool,
    ) -> Checkout<P> {
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
    fn take_available(self: &Arc<Self>, state: &mut State<P>, key: &Target) -> Option<Checkout<P>> {
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
            if used < c.shared.max_streams.load(Ordering::Relaxed) && P::is_ready(&c.sender) {
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
            if !P::is_alive(&mut c.conn) {
                self.h1_gone(host, key);
                continue;
            }
            c.shared.idle_since.store(0, Ordering::Relaxed);
            return Some(self.checkout_from(key, Sender::H1(c.conn), c.shared, true));
        }
        None
    }

    /// An HTTP/1.1 connection was dropped, which closed it. Called with the lock held.
    fn h1_gone(self: &Arc<Self>, host: &mut Host<P>, key: &Target) {
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

    /// Opens a connection (the connector connects, and for HTTP/2 also runs the
    /// handshake); a shared one gets its driver task here. An HTTP/1.1 connection needs
    /// none: its requests drive it.
    async fn open(self: &Arc<Self>, key: &Target) -> Result<Made<P>, CheckoutError> {
        let started = Instant::now();
        let opened = (self.connector)(key).await?;
        let h2 = matches!(opened, Opened::H2(..));
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
        Stats::bump(&self.stats.opened);
        self.observe_connect(started);
        match opened {
            Opened::H1(conn) => {
                self.state
                    .lock()
                    .expect("pool lock")
                    .h1_conns
                    .push(Arc::downgrade(&shared));
                self.start_sweeper();
                Ok(Made::H1(conn, shared))
            }
            Opened::H2(sender, driver) => {
                let driven = Driven::<P> {
                    driver,
                    shared: shared.clone(),
                    finished: false,
                };
                tokio::spawn(drive_h2(
                    driven,
                    Arc::downgrade(self),
                    key.clone(),
                    shared.clone(),
                    self.limits.idle_timeout,
                ));
                Ok(Made::H2(sender, shared))
            }
        }
    }
}

/// A connection opened and entered in the books.
enum Made<P: Protocol> {
    H1(Box<P::H1>, Arc<ConnShared>),
    H2(P::H2, Arc<ConnShared>),
}
