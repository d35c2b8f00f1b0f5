//! The client side: listeners, TLS, per-connection serving and graceful shutdown.
//!
//! A plain HTTP/1.1 connection is served by Strait's own server ([`h1`]), which hands
//! requests it leaves to hyper, with the socket, to a hyper session that gives the
//! socket back once idle ([`park`]). TLS connections and HTTP/2 (by prior knowledge or
//! ALPN) are served by hyper throughout, with the header-read timeout armed. An
//! [`IdleTimeoutIo`] is underneath every connection. Requests go to the shared
//! [`Proxy`]. The sockets are bound and served by [`listeners`], and a SIGHUP puts a
//! new configuration in service through [`reload`]. This module knows nothing of routes
//! or upstreams.

mod admin;
mod guard;
#[doc(hidden)]
pub mod h1;
mod h2watch;
mod handover;
mod hyper_side;
mod limit;
mod listeners;
mod notify;
pub mod park;
mod reload;
mod shutdown;
pub mod tls;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::access::AccessLog;
use crate::config::{Config, ConfigError, ListenAddr};
use crate::io::{CountingIo, IdleTimeoutIo};
use crate::metrics::Metrics;
use crate::net::{Listener, Stream};
use crate::proxy::{ConnInfo, Proxy};
use hyper_side::{HyperSide, serve};
use hyper_side::{InFlight, account_connection_end};
use limit::ConnLimit;
use park::Sessions;
use prometheus_client::metrics::gauge::Gauge;
pub use shutdown::Shutdown;

/// Why Strait could not run.
#[derive(Debug)]
pub enum RunError {
    /// A listener could not be bound (exit 1).
    Bind(ListenAddr, std::io::Error),
    /// A file the config names cannot be used, for example a certificate that does not
    /// parse (exit 2, like any other config problem).
    Config(String),
    /// Other setup failed (exit 1).
    Setup(String),
}

impl RunError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::Config(_) => 2,
            RunError::Bind(..) | RunError::Setup(_) => 1,
        }
    }
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Bind(addr, e) => write!(f, "cannot listen on {addr}: {e}"),
            RunError::Config(msg) | RunError::Setup(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for RunError {}

/// Everything a connection task needs, shared by all of them.
struct Shared {
    /// Replaced whole on a reload; each request takes the one current when it starts.
    proxy: ArcSwap<Proxy>,
    /// Replaced whole on a reload; each connection takes the one current when it
    /// starts (and again for each request head it waits for).
    settings: ArcSwap<Settings>,
    /// Plain HTTP/1.1 connections' hyper sessions, which give the socket back when idle.
    h1: http1::Builder,
    /// Plain HTTP/1.1 connections that hyper serves right now.
    sessions: Sessions,
    /// Parked plain HTTP/1.1 connections that kept their buffers ([`h1::KEEP_BUFFERS`]).
    kept_buffers: crate::io::Slots,
    metrics: Arc<Metrics>,
    /// `limits.max_connections`, across listeners.
    limit: Arc<ConnLimit>,
    /// `limits.backlog`, as the kernel allows it (fixed at start).
    backlog: u32,
    /// The exit's first step: listeners close, shared ports handed over ([`handover`]).
    leaving: handover::Leaving,
}

/// What client connections take from `[timeouts]`.
struct Settings {
    /// `timeouts.idle`.
    idle: Duration,
    /// `timeouts.keepalive`.
    keepalive: Duration,
    /// `timeouts.header_read`, which also bounds a TLS handshake.
    header_read: Duration,
    /// `limits.h2_max_requests_per_connection`.
    h2_max_requests: u64,
    /// hyper's builder for TLS connections and plain ones that open with the HTTP/2
    /// preface (it carries `header_read`).
    http: auto::Builder<TokioExecutor>,
}

impl Settings {
    fn new(config: &Config) -> Settings {
        Settings {
            idle: config.timeouts.idle,
            keepalive: config.timeouts.keepalive,
            header_read: config.timeouts.header_read,
            h2_max_requests: config.limits.h2_max_requests_per_connection,
            http: http_builder(config),
        }
    }
}

/// Reads the configuration again (the file, with the command line's flags applied).
pub type Reload = Box<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>;

/// Builds the proxy for a configuration, with the access log it writes to (the
/// composition root's: `app`).
pub type BuildProxy =
    Arc<dyn Fn(&Config, Option<AccessLog>) -> Result<Proxy, String> + Send + Sync>;

/// What the server is given besides its configuration.
pub struct Parts {
    /// Every connection and tunnel; the drain waits for them.
    pub tasks: TaskTracker,
    pub metrics: Arc<Metrics>,
    pub build: BuildProxy,
}

/// Serves `config` until SIGTERM, SIGINT, then drains and returns; with `reload`, a
/// SIGHUP puts a new configuration in service, all of it but `[pool]` and `[runtime]`
/// ([`reload`]).
pub async fn run(config: Config, parts: Parts, reload: Option<Reload>) -> Result<(), RunError> {
    let Parts {
        tasks,
        metrics,
        build,
    } = parts;
    let shutdown = Shutdown::new();
    let hup = Arc::new(tokio::sync::Notify::new());
    let reopen = Arc::new(tokio::sync::Notify::new());
    // Polled once now: the signal handlers are in place before a listener is served or
    // systemd hears READY=1, so an early SIGTERM drains rather than kills.
    let mut signal = std::pin::pin!(shutdown::wait_for_signal(&hup, &reopen));
    let early = std::future::poll_fn(|cx| Poll::Ready(signal.as_mut().poll(cx))).await;

    let backlog = limit::backlog(config.limits.backlog);
    let mut bound = Vec::with_capacity(config.listen.len());
    for l in &config.listen {
        bound.push(listeners::bind(l, backlog).await?);
    }
    let admin = match &config.admin {
        Some(a) => Some((a.addr, listeners::bind_admin(a.addr).await?)),
        None => None,
    };

    let access = AccessLog::start(
        &config.log,
        reopen.clone(),
        metrics.access_log_dropped.clone(),
    );
    let proxy = build(&config, access.clone()).map_err(RunError::Config)?;
    let shared = Arc::new(Shared {
        proxy: ArcSwap::from_pointee(proxy),
        settings: ArcSwap::from_pointee(Settings::new(&config)),
        h1: h1_builder(),
        sessions: Sessions::default(),
        kept_buffers: crate::io::Slots::new(h1::KEEP_BUFFERS),
        metrics: metrics.clone(),
        limit: Arc::new(ConnLimit::new(config.limits.max_connections)),
        backlog,
        leaving: handover::Leaving::default(),
    });
    metrics
        .client_connections_max
        .set(config.limits.max_connections as i64);

    let admin = admin
        .map(|(addr, l)| listeners::serve_admin(addr, l, &metrics, &shutdown, &shared.leaving));
    let ctx = listeners::Context {
        shared: shared.clone(),
        shutdown: shutdown.clone(),
        tasks: tasks.clone(),
        hup: hup.clone(),
        reopen: reopen.clone(),
        metrics: metrics.clone(),
    };
    let serving: Vec<_> = bound.into_iter().map(|b| ctx.serve(b)).collect();

    let grace = Arc::new(AtomicU64::new(reload::grace_nanos(
        config.timeouts.shutdown_grace,
    )));
    if let Some(reload) = reload {
        let running = reload::Running {
            config: config.clone(),
            listeners: serving,
            admin,
            access,
            grace: grace.clone(),
        };
        tokio::spawn(reload::on_hup(reload, running, ctx, build));
    } else {
        // Nothing will change them: they serve until the process ends.
        drop((serving, admin));
    }

    notify::notify("READY=1");

    let signal = match early {
        Poll::Ready(signal) => signal,
        Poll::Pending => signal.await,
    };
    notify::notify("STOPPING=1");
    // Listeners close first; one whose port another process shares (a new binary)
    // hands it over before it does, so that no connection is refused or reset.
    shared
        .leaving
        .leave(handover::HANDOVER_MAX + Duration::from_secs(1))
        .await;
    shutdown.trigger();
    let grace = Duration::from_nanos(grace.load(Ordering::Relaxed));
    tracing::info!(
        "{signal}: draining, up to {} for in-flight requests",
        humantime::format_duration(grace)
    );
    tasks.close();
    if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
        tracing::warn!(
            remaining = tasks.len(),
            "shutdown grace passed with connections still open; closing them"
        );
    }
    tracing::info!("stopped");
    Ok(())
}

fn http_builder(config: &Config) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.timeouts.header_read)
        .keep_alive(true)
        // The limits of `http1`, which Strait's own server applies: a request meets
        // the same ones whichever path serves it.
        .max_buf_size(crate::http1::MAX_HEAD)
        .max_headers(crate::http1::MAX_FIELDS);
    // RFC 8441 / RFC 9113 §8.5: extended CONNECT for clients that tunnel over h2.
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(crate::http1::MAX_HEAD as u32)
        .max_concurrent_streams(config.limits.h2_max_concurrent_streams)
        // Streams h2 resets for the client's protocol errors (a stream made to depend
        // on itself, say) cancel requests as the client's own resets do; h2 counts
        // them apart, over the connection's life, and ends it past this.
        .max_local_error_reset_streams(h2watch::RESET_BURST as usize)
        .enable_connect_protocol();
    builder
}

/// hyper's own header-read timer is off here: it costs a boxed timer per request.
/// `drive_h1` enforces `header_read` from its periodic check instead.
fn h1_builder() -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .keep_alive(true)
        .max_buf_size(crate::http1::MAX_HEAD)
        .max_headers(crate::http1::MAX_FIELDS);
    builder
}

/// How often a listener at the connection cap closes the connections idle between
/// requests again.
const TRIM_EVERY: Duration = Duration::from_millis(250);

/// Accepts connections and serves each in a task of its own, until shutdown (the
/// listener closes) or `stop` (a reload: the listener is handed back). Each connection
/// takes a place under `limits.max_connections` before it is accepted ([`limit`]).
async fn accept_loop(
    listener: Listener,
    acceptor: Option<tls::Acceptor>,
    (label, gauge): (crate::metrics::Label, Gauge),
    shared: Arc<Shared>,
    shutdown: Shutdown,
    tasks: TaskTracker,
    stop: tokio_util::sync::CancellationToken,
) -> Option<Listener> {
    let name = listener.describe();
    let mut errors = limit::AcceptErrors::new(label);
    let mut full_logged: Option<Instant> = None;
    // At the exit: closed at once, or handed over first if the port is shared.
    let _open = shared.leaving.hold();
    let mut handing = None;
    loop {
        let place = match shared.limit.try_take() {
            Some(p) => p,
            None => {
                // At the cap: connections idle between requests close, and this
                // listener leaves new ones in the backlog until a place is free.
                shutdown.trim();
                if full_logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    tracing::warn!(
                        listener = %name,
                        max_connections = shared.limit.max(),
                        "connection cap reached: not accepting until a connection closes"
                    );
                    full_logged = Some(Instant::now());
                }
                // Trimmed again while waiting: a connection that goes idle later is
                // closed too.
                let waited = loop {
                    tokio::select! {
                        p = shared.limit.take() => break Some(p),
                        () = tokio::time::sleep(TRIM_EVERY) => shutdown.trim(),
                        _ = handover::closing(&mut handing, &shared.leaving, listener.as_tcp(), "listener") => {
                            handover::close(handing, listener);
                            return None;
                        }
                        () = shutdown.triggered() => return None,
                        () = stop.cancelled() => break None,
                    }
                };
                match waited {
                    Some(p) => p,
                    None => break,
                }
            }
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = handover::closing(&mut handing, &shared.leaving, listener.as_tcp(), "listener") => {
                handover::close(handing, listener);
                return None;
            }
            () = shutdown.triggered() => {
                tracing::debug!(listener = %name, "stopped accepting");
                return None;
            }
            () = stop.cancelled() => break,
        };
        let mut place = place;
        let (stream, peer, local) = match accepted {
            Ok(a) => {
                errors.succeeded();
                place.claim();
                if let Some(h) = &mut handing {
                    h.accepted();
                }
                a
            }
            Err(e) => {
                // Out of file descriptors or similar: back off instead of spinning.
                let pause = errors.failed(&e, &shared.metrics);
                drop(place);
                tokio::select! {
                    () = tokio::time::sleep(pause) => continue,
                    () = shutdown.triggered() => return None,
                    () = stop.cancelled() => break,
                }
            }
        };
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        let acceptor = acceptor.clone();
        let gauge = gauge.clone();
        tasks.spawn(async move {
            let _place = place;
            gauge.inc();
            let _open = DecOnDrop(gauge);
            match acceptor {
                None => {
                    let info = ConnInfo {
                        peer,
                        local,
                        tls: false,
                    };
                    serve_plain(stream, info, shared, shutdown).await
                }
                // Boxed: the handshake's state is large, and every plain
                // connection's task would otherwise reserve room for it
                // (tests/parking.rs measures a plain connection's cost).
                Some(acceptor) => {
                    Box::pin(async move {
                        let handshake = acceptor.accept(stream);
                        let within = shared.settings.load().header_read;
                        match tokio::time::timeout(within, handshake).await {
                            Ok(Ok(tls)) => {
                                let info = ConnInfo {
                                    peer,
                                    local,
                                    tls: true,
                                };
                                Box::pin(serve(tls, info, shared, shutdown)).await
                            }
                            Ok(Err(e)) => {
                                shared.metrics.tls_handshake_failures.inc();
                                tracing::debug!(client = %peer, "TLS handshake failed: {e}")
                            }
                            Err(_) => {
                                shared.metrics.tls_handshake_failures.inc();
                                tracing::debug!(client = %peer, "TLS handshake timed out")
                            }
                        }
                    })
                    .await
                }
            }
        });
    }
    tracing::debug!(listener = %name, "stopped accepting");
    Some(listener)
}

/// Serves a plain (TCP or Unix socket) client connection: HTTP/2 with prior knowledge through hyper's
/// auto builder, HTTP/1.1 through Strait's own server ([`h1`]). Until the first bytes arrive (at most
/// `header_read`), the connection holds nothing but its socket.
async fn serve_plain(stream: Stream, info: ConnInfo, shared: Arc<Shared>, shutdown: Shutdown) {
    let deadline = Instant::now() + shared.settings.load().header_read;
    let mut head = [0u8; h2watch::PREFACE.len()];
    // `peek` waits for bytes (readiness alone can be a false positive) and leaves
    // them for whoever serves the connection.
    let n = tokio::select! {
        r = stream.peek(&mut head) => match r {
            Ok(n) if n > 0 => n,
            _ => return,
        },
        () = tokio::time::sleep_until(deadline) => return,
        () = first_request_cut(&shutdown, &shared) => return,
    };
    if h2watch::PREFACE.starts_with(&head[..n]) {
        // HTTP/2, or too few bytes to tell: hyper's auto builder reads on and decides.
        // Boxed, as its state is large and every plain connection's task would
        // otherwise reserve room for it (tests/parking.rs).
        Box::pin(serve(stream, info, shared, shutdown)).await
    } else {
        h1::serve(stream, info, shared, shutdown).await
    }
}

/// When a connection that has sent nothing yet gives up at the drain: at once, or, after
/// a handover, [`handover::IDLE_LINGER`] later (its first request is likely on its way).
async fn first_request_cut(shutdown: &Shutdown, shared: &Shared) {
    shutdown.triggered().await;
    if shared.leaving.shared() {
        tokio::time::sleep(handover::IDLE_LINGER).await;
    }
}

/// The socket under a plain HTTP/1.1 connection, as hyper sees it.
type PlainIo = IdleTimeoutIo<CountingIo<Stream, crate::proxy::BytesOwner>>;

/// Decrements a gauge when dropped (a connection's end, however it ends).
struct DecOnDrop(Gauge);

impl Drop for DecOnDrop {
    fn drop(&mut self) {
        self.0.dec();
    }
}
