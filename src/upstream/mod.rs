//! The upstream side: sends a request to an origin over a pooled connection.
//!
//! One entry point, [`Upstream::send`]: a request in origin form plus a [`Target`]
//! (scheme, authority and the [`Profile`] of connection settings) in, a response out.
//! Connections come from Strait's own [`pool`] and are shared by every client. This
//! module knows nothing of routes or users: the proxy decides *where*, this decides
//! *how*, including which failures are retried (RFC 9110 §9.2.2).

pub mod balance;
pub mod conn;
pub mod connect;
pub mod dns;
pub mod pool;
pub mod relay;
pub mod retry;
pub mod via;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::header::{CONNECTION, HOST, HeaderValue};
use http::uri::{Authority, PathAndQuery, Uri};
use http::{Request, Response, StatusCode};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;

use crate::body::BoxError;
use crate::body::RequestBody;
use crate::config::{self, AddrRule, Scheme, Version};
use crate::http1::list_has;
use conn::{Lent, Pool, Reply, SendError, h1};
pub use connect::{ConnectError, TlsSettings};
pub use pool::Target;
use pool::{CheckoutError, Opened};

/// Connection settings shared by a group of targets: protocol, TLS, address policy and
/// timeouts. Two targets only ever share a connection when they share a profile.
///
/// The timeouts live here, not in the pool, so a configuration reload changes them
/// with the routes that carry them: requests under way keep the ones they began with.
pub struct Profile {
    id: u32,
    version: Version,
    tls: Option<TlsSettings>,
    deny: Arc<[AddrRule]>,
    /// Another proxy every connection goes through.
    via: Option<Arc<via::Via>>,
    /// The resolver of the configuration that made the profile.
    resolver: Arc<dns::Resolver>,
    connect_timeout: Duration,
    response_timeout: Duration,
}

impl Profile {
    /// The proxy this profile's connections go through, if any.
    pub fn via(&self) -> Option<&via::Via> {
        self.via.as_deref()
    }

    /// `timeouts.connect`: TCP connect plus TLS handshake.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// Until the response head, and the longest a body may go without a byte: the
    /// route's own `upstream_response`, or `timeouts.upstream_response`.
    pub fn response_timeout(&self) -> Duration {
        self.response_timeout
    }
}

impl fmt::Debug for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Profile")
            .field("id", &self.id)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// What a profile is made of.
pub struct ProfileSettings {
    pub version: Version,
    /// Used for `https` targets; `None` refuses them.
    pub tls: Option<TlsSettings>,
    /// Addresses never connected to (checked after resolution).
    pub deny: Arc<[AddrRule]>,
    /// Another proxy to go through (`[forward] parent`, `[[route]] via`).
    pub via: Option<Arc<via::Via>>,
    /// `timeouts.connect`.
    pub connect_timeout: Duration,
    /// A route's own `upstream_response`, or `timeouts.upstream_response`.
    pub response_timeout: Duration,
}

/// Why an upstream exchange failed.
#[derive(Debug)]
pub enum UpstreamError {
    /// No connection could be opened; the request was not sent.
    Connect(ConnectError),
    /// `max_conns_per_host` was reached and nothing freed up within `wait_timeout`.
    Exhausted,
    /// `timeouts.upstream_response` passed before the response head arrived.
    Timeout(Duration),
    /// The connection failed while the request was under way, or the response was
    /// malformed.
    Exchange(BoxError),
    /// The target cannot be expressed as a URI, or the handshake failed.
    BadTarget(String),
    /// The client's request body broke while the request was under way (the client
    /// went away, broke its chunked framing or sent less than its `Content-Length`):
    /// the client's fault, not the upstream's.
    ClientBody(BoxError),
}

/// A failed [`Upstream::try_send`]: the error, and what another upstream of the same
/// group may still do with the request.
#[derive(Debug)]
pub struct Failure {
    pub error: UpstreamError,
    /// The request, whole, when no byte of it reached any upstream (no connection could
    /// be opened or none took it): another upstream may take it, whatever its method
    /// and body.
    pub request: Option<Box<Request<RequestBody>>>,
    /// A fresh HTTP/1.1 connection closed or reset before any response byte. The
    /// request may have been written, so only a caller holding its own copy of an
    /// idempotent request may send it elsewhere.
    pub unanswered: bool,
}

impl Failure {
    fn reached_none(error: UpstreamError, out: Outgoing) -> Failure {
        let request = match out {
            Outgoing::Request(mut req) if error.is_unsent() => {
                // The watcher belongs to the exchange that set it; the next one decides
                // again.
                let body = req.body_mut();
                if let RequestBody::Incoming(b) = body {
                    b.watch(None);
                }
                Some(Box::new(req))
            }
            _ => None,
        };
        Failure {
            error,
            request,
            unanswered: false,
        }
    }
}

impl From<UpstreamError> for Failure {
    fn from(error: UpstreamError) -> Failure {
        Failure {
            error,
            request: None,
            unanswered: false,
        }
    }
}

impl UpstreamError {
    /// True when no byte of the request reached the upstream, so another upstream may
    /// take it.
    pub fn is_unsent(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect(_) | UpstreamError::BadTarget(_)
        )
    }
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamError::Connect(e) => write!(f, "{e}"),
            UpstreamError::Exhausted => {
                f.write_str("max_conns_per_host reached and no connection freed up in time")
            }
            UpstreamError::Timeout(d) => {
                write!(
                    f,
                    "no response head within {}",
                    humantime::format_duration(*d)
                )
            }
            UpstreamError::Exchange(e) | UpstreamError::ClientBody(e) => {
                write!(f, "{e}")?;
                let mut source = e.source();
                while let Some(s) = source {
                    write!(f, ": {s}")?;
                    source = s.source();
                }
                Ok(())
            }
            UpstreamError::BadTarget(t) => f.write_str(t),
        }
    }
}

impl std::error::Error for UpstreamError {}

impl From<CheckoutError> for UpstreamError {
    fn from(e: CheckoutError) -> Self {
        match e {
            CheckoutError::Connect(e) => UpstreamError::Connect(e),
            CheckoutError::Exhausted => UpstreamError::Exhausted,
            CheckoutError::Handshake(e) => UpstreamError::BadTarget(e),
        }
    }
}

/// The client the proxy sends through.
#[derive(Debug)]
pub struct Upstream {
    pool: Pool,
    next_profile: AtomicU32,
    /// The resolver new profiles take: the latest configuration's ([`Upstream::use_dns`]).
    resolver: ArcSwapOption<dns::Resolver>,
    /// Every resolver's counts, across reloads.
    dns_stats: Arc<dns::Stats>,
}

impl Upstream {
    /// The pool, sized by `[pool]`; its sweep starts at a quarter of
    /// `timeouts.upstream_response` (profiles with shorter timeouts make it check more
    /// often).
    pub fn new(pool: &config::Pool, timeouts: &config::Timeouts) -> Self {
        let connector: pool::Connector<conn::Http> =
            Arc::new(|key: &Target| Box::pin(open(key.clone())));
        let limits = pool::Limits {
            idle_timeout: pool.idle_timeout,
            max_idle_per_host: pool.max_idle_per_host,
            max_idle: pool.max_idle,
            max_conns_per_host: pool.max_conns_per_host,
            wait_timeout: pool.wait_timeout,
            deadline_check: (timeouts.upstream_response / 4).max(Duration::from_millis(10)),
        };
        Upstream {
            pool: Pool::new(limits, connector),
            next_profile: AtomicU32::new(0),
            resolver: ArcSwapOption::empty(),
            dns_stats: Arc::default(),
        }
    }

    /// Builds a resolver from `[dns]` for the profiles made from now on; called with
    /// each configuration, before its profiles are made. Profiles already made keep
    /// theirs. Fails when the system's resolver configuration is needed and unusable.
    pub fn use_dns(&self, dns: &config::Dns) -> Result<(), String> {
        let resolver = dns::Resolver::new(dns, self.dns_stats.clone())?;
        self.resolver.store(Some(Arc::new(resolver)));
        Ok(())
    }

    /// The resolvers' counters.
    pub fn dns_stats(&self) -> &Arc<dns::Stats> {
        &self.dns_stats
    }

    /// Counts a request sent again, here or to another upstream of its route
    /// (`strait_pool_events_total{event="retry"}`).
    pub fn count_retry(&self) {
        self.pool.count_retry();
    }

    /// Whether `max_conns_per_host` caps connections (else every target has room).
    pub fn caps_conns(&self) -> bool {
        self.pool.caps_conns()
    }

    /// False when a request for `target` would wait for a connection to free up.
    pub fn has_room(&self, target: &Target) -> bool {
        self.pool.has_room(target)
    }

    /// A connection for a CONNECT tunnel to `host:port`, under `profile`'s address
    /// policy and connect timeout, through its proxy if it has one (the proxy module
    /// opens no socket itself).
    pub async fn open_tunnel(
        &self,
        host: &str,
        port: u16,
        profile: &Profile,
    ) -> Result<connect::Stream, ConnectError> {
        if let Some(via) = &profile.via {
            via::check_written(host, &profile.deny)?;
            return via
                .tunnel(
                    &profile.resolver,
                    &authority(host, port),
                    profile.connect_timeout,
                )
                .await;
        }
        connect::connect_tcp(
            &profile.resolver,
            host,
            port,
            &profile.deny,
            profile.connect_timeout,
        )
        .await
        .map(connect::Stream::Plain)
    }

    /// The pool's counters and gauges.
    pub fn stats(&self) -> &Arc<pool::Stats> {
        self.pool.stats()
    }

    /// Makes a profile: a group of targets that may share connections.
    pub fn profile(&self, settings: ProfileSettings) -> Arc<Profile> {
        let resolver = self
            .resolver
            .load_full()
            .expect("the composition root calls use_dns before making profiles");
        self.profile_with(settings, resolver)
    }

    fn profile_with(
        &self,
        settings: ProfileSettings,
        resolver: Arc<dns::Resolver>,
    ) -> Arc<Profile> {
        self.pool.check_deadlines_within(settings.response_timeout);
        Arc::new(Profile {
            id: self.next_profile.fetch_add(1, Ordering::Relaxed),
            version: settings.version,
            tls: settings.tls,
            deny: settings.deny,
            via: settings.via,
            resolver,
            connect_timeout: settings.connect_timeout,
            response_timeout: settings.response_timeout,
        })
    }

    /// The profile for requests that switch protocols (WebSocket): `profile`'s
    /// settings over HTTP/1.1 only, whatever its version (HTTP/2 has no upgrade). Its
    /// connections are pooled apart from `profile`'s.
    pub fn upgrade_profile(&self, profile: &Arc<Profile>) -> Arc<Profile> {
        if profile.version == Version::H1 {
            return profile.clone();
        }
        let settings = ProfileSettings {
            version: Version::H1,
            tls: profile.tls.as_ref().map(TlsSettings::h1_only),
            deny: profile.deny.clone(),
            via: profile.via.clone(),
            connect_timeout: profile.connect_timeout,
            response_timeout: profile.response_timeout,
        };
        self.profile_with(settings, profile.resolver.clone())
    }

    /// Sends `req` (whose URI is in origin form, with `Host` set) to `target` and waits
    /// for the response head, at most `timeouts.upstream_response`.
    pub fn send<'a>(
        &'a self,
        req: Request<RequestBody>,
        target: &'a Target,
    ) -> impl Future<Output = Result<Response<ResponseBody>, UpstreamError>> + Send + 'a {
        let exchange = self.try_send(req, target);
        async move { exchange.await.map_err(|f| f.error) }
    }

    /// [`send`](Self::send), but a failure says whether another upstream may take the
    /// request, and hands the request back when it reached none (see [`Failure`]).
    pub fn try_send<'a>(
        &'a self,
        req: Request<RequestBody>,
        target: &'a Target,
    ) -> impl Future<Output = Result<Response<ResponseBody>, Failure>> + Send + 'a {
        // One box for the whole exchange: its state is large, and callers move (and
        // spawn) their futures; a pointer moves cheaply.
        Box::pin(self.exchange(req, target))
    }

    /// The exchange with its retry rules:
    ///
    /// - a request hyper hands back unsent (HTTP/2) is sent again on a fresh
    ///   connection, whatever its method;
    /// - a request written to a *reused* HTTP/1.1 connection that got no response byte
    ///   is sent once more on a fresh connection if its method is idempotent (RFC 9110
    ///   §9.2.2) and its body is empty or buffered;
    /// - an HTTP/2 stream the peer did not process (REFUSED_STREAM, or above the
    ///   GOAWAY's last stream id) is replayed on a fresh connection when its body
    ///   is replayable;
    /// - a failure on a fresh HTTP/1.1 connection is never retried.
    // Not an `async fn`: an `async fn` keeps each argument and its moved-in copy in its
    // future; this future is moved per request (bench/proxy-instructions counts it).
    #[allow(clippy::manual_async_fn)]
    fn exchange<'a>(
        &'a self,
        mut req: Request<RequestBody>,
        key: &'a Target,
    ) -> impl Future<Output = Result<Response<ResponseBody>, Failure>> + Send + 'a {
        // An `async move` block rather than an `async fn`: the request then lives in the
        // future once (an `async fn` keeps each argument and its moved-in copy).
        async move {
            let idempotent = retry::is_idempotent(req.method());
            // Only HTTP/2 replays a non-idempotent request (a stream the peer refused); to
            // an upstream that is surely HTTP/1.1, its body is streamed, never read whole.
            let may_replay = idempotent || !key.surely_h1();
            let replayable = match retry::replay_plan(req.body()) {
                retry::Replay::Ready => true,
                retry::Replay::Buffer if may_replay => Box::pin(buffer_body(&mut req)).await?,
                retry::Replay::Buffer | retry::Replay::Never => false,
            };
            // A streamed body that may go to HTTP/2 is watched: if the response ends before
            // the body was sent whole, the stream slot is not reused (hyper would still be
            // writing it). Strait's HTTP/1.1 client knows that itself (`H1Conn::is_clean`).
            let sent_whole = match std::mem::take(req.body_mut()) {
                // An empty stream is sent by the head alone; nothing polls it, so a watcher
                // would never see its end and the connection would not be reused.
                RequestBody::Incoming(b) if http_body::Body::is_end_stream(&b) => {
                    *req.body_mut() = RequestBody::Empty;
                    None
                }
                RequestBody::Incoming(b) if key.surely_h1() => {
                    *req.body_mut() = RequestBody::Incoming(b);
                    None
                }
                RequestBody::Incoming(b) => {
                    let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
                    let mut b = b;
                    b.watch(Some(flag.clone()));
                    *req.body_mut() = RequestBody::Incoming(b);
                    Some(flag)
                }
                other => {
                    *req.body_mut() = other;
                    None
                }
            };
            // `upstream_response` runs from here to the response head, retries included.
            let response_timeout = key.profile.response_timeout();
            let deadline = tokio::time::Instant::now() + response_timeout;
            let mut fresh = false;
            let mut replays_left = 1;
            // To an upstream that is surely HTTP/1.1, a replay resends the bytes written the
            // first time: no copy of the request is made in advance.
            let h1_only = key.surely_h1();
            let mut out = Outgoing::Request(req);
            for attempt in 1..=retry::MAX_ATTEMPTS {
                // The common case takes an idle connection without awaiting; the waiting
                // and connecting path is boxed so this future stays small.
                let found = if fresh {
                    None
                } else {
                    self.pool.try_checkout(key)
                };
                let mut conn = match found {
                    Some(c) => c,
                    None => match Box::pin(self.pool.checkout(key, fresh)).await {
                        Ok(c) => c,
                        Err(error) => return Err(Failure::reached_none(error.into(), out)),
                    },
                };
                let (result, copy) = match out {
                    Outgoing::Request(mut req) => {
                        set_uri(&mut req, key, conn.is_h2())?;
                        // A copy is needed only where a retry after writing is allowed:
                        // HTTP/2, or an idempotent request on a reused connection. Failures
                        // on fresh HTTP/1.1 connections are final. Boxed: the future would
                        // otherwise keep room for a second request throughout
                        // (bench/proxy-instructions).
                        let copy = (replayable
                            && !h1_only
                            && (conn.is_h2() || (conn.reused && idempotent && replays_left > 0)))
                            .then(|| Box::new(copy_request(&req)));
                        (conn.send(req, deadline).await, copy)
                    }
                    Outgoing::Written(w) => (conn.resend(w, deadline).await, None),
                };
                match result {
                    Ok(resp) => return Ok(ResponseBody::wrap(resp, conn, sent_whole)),
                    Err(SendError::TimedOut) => {
                        return Err(UpstreamError::Timeout(response_timeout).into());
                    }
                    Err(SendError::Unsent(back, e)) => {
                        tracing::debug!(upstream = %key, attempt, "request not sent ({e}); retrying on a fresh connection");
                        if conn.is_h2() {
                            conn.retire_h2();
                        }
                        out = Outgoing::Request(*back);
                    }
                    Err(SendError::Failed {
                        error: e,
                        unprocessed,
                        replay,
                    }) => {
                        let h1_replay = !conn.is_h2()
                            && retry::replay_on_fresh(
                                conn.reused,
                                idempotent,
                                replayable,
                                replays_left,
                                unprocessed,
                            );
                        let retry = match (copy, replay) {
                            // Not processed by the peer: safe to replay whatever the method.
                            (Some(copy), _) if conn.is_h2() && unprocessed => {
                                conn.retire_h2();
                                Some(Outgoing::Request(*copy))
                            }
                            // No response byte on a reused connection: the upstream closed it
                            // as the request went out. An idempotent request goes once more.
                            (Some(copy), _) if h1_replay => Some(Outgoing::Request(*copy)),
                            (None, Some(w)) if h1_replay && h1_only => Some(Outgoing::Written(w)),
                            _ => None,
                        };
                        let Some(next) = retry else {
                            return Err(Failure {
                                error: exchange_error(e),
                                request: None,
                                // A fresh HTTP/1.1 connection that closed or reset before
                                // any response byte: the upstream's fault, not a stale
                                // connection's (nor the client's: a broken request body
                                // never counts as unprocessed).
                                unanswered: unprocessed && !conn.is_h2() && !conn.reused,
                            });
                        };
                        if !conn.is_h2() {
                            replays_left -= 1;
                        }
                        tracing::debug!(upstream = %key, attempt, "request not processed ({e}); replaying on a fresh connection");
                        out = next;
                    }
                }
                self.pool.count_retry();
                fresh = true;
            }
            let error = UpstreamError::BadTarget(format!(
                "{key}: no connection took the request in {} attempts",
                retry::MAX_ATTEMPTS
            ));
            Err(Failure::reached_none(error, out))
        }
    }
}

/// Opens a connection for a pool key: resolve, check, connect, TLS with ALPN; then an
/// HTTP/1.1 connection, or the HTTP/2 handshake.
async fn open(key: Target) -> Result<Opened<conn::Http>, CheckoutError> {
    let (stream, h2) = connect(&key).await.map_err(CheckoutError::Connect)?;
    if !h2 {
        let mut conn = h1::H1Conn::new(stream);
        if let (Some(via), Scheme::Http) = (&key.profile.via, key.scheme) {
            conn.set_absolute_form(via::AbsoluteForm::new(
                via,
                key.scheme,
                key.authority.as_str(),
            ));
        }
        return Ok(Opened::H1(Box::new(conn)));
    }
    let (sender, driver) = conn::h2::handshake(stream, pool::H2_DEFAULT_STREAMS).await?;
    Ok(Opened::H2(sender, driver))
}

/// Resolve, check, connect, TLS with ALPN (or a Unix socket's connect): the stream and
/// whether it speaks HTTP/2.
async fn connect(key: &Target) -> Result<(connect::Stream, bool), ConnectError> {
    let profile = &key.profile;
    if let Some(path) = &key.unix {
        // HTTP/2 with prior knowledge when asked for, as over plain TCP.
        let stream = connect::connect_unix(path, profile.connect_timeout).await?;
        return Ok((
            connect::Stream::Unix(stream),
            profile.version == Version::H2,
        ));
    }
    let (host, port) = split_authority(key.authority.as_str(), key.scheme);
    if let Some(via) = &profile.via {
        via::check_written(host, &profile.deny)?;
        // `http`: requests in absolute form on a connection to the proxy; `https`:
        // TLS with the target inside the proxy's tunnel.
        return match (key.scheme, &profile.tls) {
            (Scheme::Http, _) => Ok((
                via.connect(&profile.resolver, profile.connect_timeout)
                    .await?,
                false,
            )),
            (Scheme::Https, Some(tls)) => {
                let open = async {
                    let tunnel = via
                        .tunnel(
                            &profile.resolver,
                            &authority(host, port),
                            profile.connect_timeout,
                        )
                        .await?;
                    tls.handshake_tunnelled(host, tunnel).await
                };
                let stream = tokio::time::timeout(profile.connect_timeout, open)
                    .await
                    .unwrap_or_else(|_| Err(ConnectError::TimedOut(key.authority.to_string())))?;
                let h2 = stream.is_h2() || profile.version == Version::H2;
                Ok((stream, h2))
            }
            (Scheme::Https, None) => Err(ConnectError::Tls(
                host.to_owned(),
                Arc::new(std::io::Error::other("no TLS settings for an https target")),
            )),
        };
    }
    let (deny, timeout) = (&profile.deny, profile.connect_timeout);
    let tcp = connect::connect_tcp(&profile.resolver, host, port, deny, timeout).await?;
    match key.scheme {
        Scheme::Http => Ok((connect::Stream::Plain(tcp), profile.version == Version::H2)),
        Scheme::Https => {
            let Some(tls) = &profile.tls else {
                return Err(ConnectError::Tls(
                    host.to_owned(),
                    Arc::new(std::io::Error::other("no TLS settings for an https target")),
                ));
            };
            let stream = tokio::time::timeout(profile.connect_timeout, tls.handshake(host, tcp))
                .await
                .unwrap_or_else(|_| Err(ConnectError::TimedOut(key.authority.to_string())))?;
            let h2 = stream.is_h2() || profile.version == Version::H2;
            Ok((stream, h2))
        }
    }
}

/// `host:port` as a CONNECT names it, an IPv6 host in brackets.
fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// `example.com:8080` → (`example.com`, 8080); `[::1]` → (`::1`, default port).
fn split_authority(authority: &str, scheme: Scheme) -> (&str, u16) {
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(':') && p.bytes().all(|b| b.is_ascii_digit()) => {
            (h, p.parse().unwrap_or(scheme.default_port()))
        }
        _ => (authority, scheme.default_port()),
    };
    (host.trim_start_matches('[').trim_end_matches(']'), port)
}

/// What an attempt sends: the request, or (a replay to an HTTP/1.1 upstream) the
/// bytes written for it the first time.
enum Outgoing {
    Request(Request<RequestBody>),
    Written(h1::Written),
}

/// Names a failed exchange: the client's body broke, or the upstream failed.
fn exchange_error(e: BoxError) -> UpstreamError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&*e);
    while let Some(c) = cause {
        if let Some(h1::Error::RequestBody(_) | h1::Error::ShortRequestBody) = c.downcast_ref() {
            return UpstreamError::ClientBody(e);
        }
        // hyper's HTTP/2 client resets a stream with INTERNAL_ERROR itself (neither
        // the peer nor h2) only when the request body it was sending failed.
        if let Some(h2) = c.downcast_ref::<h2::Error>()
            && h2.is_reset()
            && !h2.is_remote()
            && !h2.is_library()
            && h2.reason() == Some(h2::Reason::INTERNAL_ERROR)
        {
            return UpstreamError::ClientBody(e);
        }
        cause = c.source();
    }
    UpstreamError::Exchange(e)
}

/// Reads a small body whole so the request can be replayed; always true.
async fn buffer_body(req: &mut Request<RequestBody>) -> Result<bool, UpstreamError> {
    let body = std::mem::take(req.body_mut());
    let bytes = body
        .collect()
        .await
        .map_err(UpstreamError::ClientBody)?
        .to_bytes();
    *req.body_mut() = RequestBody::Full(Some(bytes));
    Ok(true)
}

/// A copy of a request whose body is replayable (empty or buffered).
fn copy_request(req: &Request<RequestBody>) -> Request<RequestBody> {
    let body = match req.body() {
        RequestBody::Full(b) => RequestBody::Full(b.clone()),
        _ => RequestBody::Empty,
    };
    let mut copy = Request::new(body);
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.headers_mut() = req.headers().clone();
    copy
}

/// HTTP/1.1 wants origin form and `Host`; HTTP/2 wants scheme and authority in
/// pseudo-headers and no `Host` beside them (RFC 9113 §8.3.1; nginx refuses both).
fn set_uri(req: &mut Request<RequestBody>, key: &Target, h2: bool) -> Result<(), UpstreamError> {
    *req.version_mut() = if h2 {
        http::Version::HTTP_2
    } else {
        http::Version::HTTP_11
    };
    // `http://h?x=1` has an empty path; origin form and `:path` want `/?x=1`
    // (RFC 9112 §3.2.1, RFC 9113 §8.3.1).
    let empty_path = req
        .uri()
        .path_and_query()
        .is_some_and(|p| p.as_str().starts_with('?'));
    let has_authority = req.uri().authority().is_some();
    if h2 == has_authority && !empty_path {
        return Ok(());
    }
    let path = match req.uri().path_and_query() {
        Some(p) if empty_path => PathAndQuery::try_from(format!("/{}", p.as_str()))
            .map_err(|e| UpstreamError::BadTarget(e.to_string()))?,
        Some(p) => p.clone(),
        None => PathAndQuery::from_static("/"),
    };
    if h2 && has_authority {
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        parts.path_and_query = Some(path);
        *req.uri_mut() =
            Uri::from_parts(parts).map_err(|e| UpstreamError::BadTarget(e.to_string()))?;
        return Ok(());
    }
    if h2 {
        // The Host the proxy chose becomes :authority; the key's own authority is
        // parsed once per request only when they differ.
        let authority = match req.headers_mut().remove(HOST) {
            Some(v) if v.as_bytes() != key.authority.as_str().as_bytes() => {
                Authority::try_from(v.as_bytes()).ok()
            }
            _ => None,
        };
        let authority = authority.unwrap_or_else(|| key.authority.clone());
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(match key.scheme {
            Scheme::Http => http::uri::Scheme::HTTP,
            Scheme::Https => http::uri::Scheme::HTTPS,
        });
        parts.authority = Some(authority);
        parts.path_and_query = Some(path);
        *req.uri_mut() =
            Uri::from_parts(parts).map_err(|e| UpstreamError::BadTarget(e.to_string()))?;
    } else {
        if !req.headers().contains_key(HOST) {
            let authority = req
                .uri()
                .authority()
                .map(|a| a.as_str())
                .unwrap_or(key.authority.as_str());
            if let Ok(v) = HeaderValue::from_str(authority) {
                req.headers_mut().insert(HOST, v);
            }
        }
        *req.uri_mut() = Uri::from(path);
    }
    Ok(())
}

static KEEP_ALIVE: http::HeaderName = http::HeaderName::from_static("keep-alive");

/// A response body that returns its connection to the pool once read to the end.
pub struct ResponseBody {
    reply: Reply,
    /// Present until the body ends (then released) or is dropped (then closed).
    conn: Option<Lent>,
    reusable: bool,
    hint: Option<Duration>,
    /// Set once the request body was sent to its end; `None` when it had no stream.
    request_sent: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseBody").finish_non_exhaustive()
    }
}

impl ResponseBody {
    /// Decides reuse from the response head, then releases at once if the body is
    /// already complete: empty, or (HTTP/1.1) read whole with the head.
    fn wrap(
        resp: Response<Reply>,
        mut conn: Lent,
        request_sent: Option<Arc<std::sync::atomic::AtomicBool>>,
    ) -> Response<ResponseBody> {
        // `Connection: close` forbids reuse, HTTP/1.0 needs `keep-alive`, and
        // `Keep-Alive: timeout=N` is the origin's idle hint. Strait's HTTP/1.1 client
        // read them while parsing; otherwise one pass over the fields finds them.
        let hop = conn.h1_hop().unwrap_or_else(|| {
            let mut hop = crate::http1::response::Hop::default();
            for (name, v) in resp.headers() {
                if name == CONNECTION {
                    hop.close |= list_has(v.as_bytes(), b"close");
                    hop.keep_alive |= list_has(v.as_bytes(), b"keep-alive");
                } else if name == KEEP_ALIVE && hop.hint.is_none() {
                    hop.hint = crate::http1::response::keep_alive_timeout(v.as_bytes());
                }
            }
            hop
        });
        let (closes, keeps, hint) = (hop.close, hop.keep_alive, hop.hint);
        let http10_without_keep_alive = resp.version() == http::Version::HTTP_10 && !keeps;
        let reusable = !closes
            && !http10_without_keep_alive
            && resp.status() != StatusCode::SWITCHING_PROTOCOLS;
        let (parts, mut reply) = resp.into_parts();
        conn.take_buffered(&mut reply);
        let mut body = ResponseBody {
            reply,
            conn: Some(conn),
            reusable,
            hint,
            request_sent,
        };
        // After a 101 the connection carries another protocol: it stays with the
        // body until the proxy takes it ([`ResponseBody::take_upgraded`]).
        let switched = parts.status == StatusCode::SWITCHING_PROTOCOLS;
        if !switched && (matches!(body.reply, Reply::Buffered(_)) || body.reply.is_end_stream()) {
            body.finish();
        }
        Response::from_parts(parts, body)
    }

    /// The upstream connection of a 101 response, out of the pool: its stream and the
    /// bytes of the new protocol that came with the head. `None` over HTTP/2.
    pub fn take_upgraded(&mut self) -> Option<(connect::Stream, bytes::BytesMut)> {
        self.conn.take()?.into_exclusive().map(|c| c.into_io())
    }

    fn finish(&mut self) {
        if let Some(conn) = self.conn.take() {
            let sent = self
                .request_sent
                .as_ref()
                .is_none_or(|s| s.load(std::sync::atomic::Ordering::Relaxed));
            conn.release(self.reusable && sent, self.hint);
        }
    }
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = this.reply.poll_frame(this.conn.as_mut(), cx);
        match &polled {
            Poll::Ready(None) => this.finish(),
            // HTTP/1.1: the last byte is in; release now, as the reader may stop
            // polling once the length is satisfied (and dropping would close the
            // connection). Not for HTTP/2, whose end flag can arrive while earlier
            // frames are still buffered: there the slot frees on None or drop.
            Poll::Ready(Some(Ok(_)))
                if matches!(this.reply, Reply::H1(_)) && this.reply.is_end_stream() =>
            {
                this.finish()
            }
            Poll::Ready(Some(Err(_))) => {
                // Broken mid-body: the connection is not reused.
                this.reusable = false;
                this.finish();
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.reply.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.reply.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    #[test]
    fn authorities_split_into_host_and_port() {
        assert_eq!(
            split_authority("a.test:8080", Scheme::Http),
            ("a.test", 8080)
        );
        assert_eq!(split_authority("a.test", Scheme::Https), ("a.test", 443));
        assert_eq!(split_authority("[::1]:9", Scheme::Http), ("::1", 9));
        assert_eq!(split_authority("[::1]", Scheme::Http), ("::1", 80));
    }

    #[test]
    fn only_rfc_idempotent_methods_are_replayed() {
        for m in [
            Method::GET,
            Method::HEAD,
            Method::PUT,
            Method::DELETE,
            Method::OPTIONS,
        ] {
            assert!(retry::is_idempotent(&m));
        }
        assert!(!retry::is_idempotent(&Method::POST));
        assert!(!retry::is_idempotent(&Method::PATCH));
    }
}
