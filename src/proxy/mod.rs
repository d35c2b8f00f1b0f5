//! The proxy service: decides what each request is and where it goes.
//!
//! CONNECT opens a tunnel ([`tunnel`]), an absolute-form request is forward proxying
//! ([`forward`]), anything else goes through the route table ([`reverse`]). Errors Strait
//! makes itself are mapped to a status and a short body in one place,
//! [`Refusal::into_response`]. Nothing here opens sockets: [`crate::upstream`] does.

pub mod auth;
pub mod body;
pub mod forward;
pub mod headers;
mod health;
pub mod reverse;
pub mod tunnel;
mod upgrade;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body::{Frame, SizeHint};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::access::{AccessLog, Entry};
use crate::body::RequestBody;
use crate::config::Config;
use crate::http1::{self, framing::Refused};
use crate::metrics::{BytesLabels, Direction, Kind, Label, Metrics, RequestLabels, RouteLabels};
use crate::net::ClientAddr;
use crate::route::RouteTable;
use crate::upstream::{ConnectError, ResponseBody, Upstream, UpstreamError};
pub use body::Body;
use prometheus_client::metrics::counter::Counter;

/// A client connection's byte counters; the owner is the kind and user of the
/// connection's latest request.
pub type ConnBytes = crate::io::ConnBytes<BytesOwner>;

/// Who a connection's bytes belong to, with that owner's counters resolved once (a
/// keep-alive connection's requests usually share kind and user: no lookup per request).
pub struct BytesOwner {
    kind: Kind,
    user: Label,
    rx: Counter,
    tx: Counter,
}

impl BytesOwner {
    fn new(m: &Metrics, kind: Kind, user: &Label) -> BytesOwner {
        let counter = |direction| {
            m.bytes
                .get_or_create(&BytesLabels {
                    kind,
                    user: user.clone(),
                    direction,
                })
                .clone()
        };
        BytesOwner {
            kind,
            user: user.clone(),
            rx: counter(Direction::Rx),
            tx: counter(Direction::Tx),
        }
    }

    /// Adds bytes to this owner's counters.
    pub fn count(&self, rx: u64, tx: u64) {
        if rx > 0 {
            self.rx.inc_by(rx);
        }
        if tx > 0 {
            self.tx.inc_by(tx);
        }
    }
}

/// Makes (kind, user) the owner of `bytes` (reusing the resolved counters when it
/// already is) and counts what moved since the last call.
pub fn attribute_bytes(
    bytes: &ConnBytes,
    m: Option<&Metrics>,
    kind: Kind,
    user: &Label,
) -> (u64, u64) {
    let (rx, tx) = bytes.take();
    if let Some(m) = m {
        bytes.with_owner(|owner| {
            let same = owner
                .as_ref()
                .is_some_and(|o| o.kind == kind && Arc::ptr_eq(&o.user.0, &user.0));
            if !same {
                *owner = Some(BytesOwner::new(m, kind, user));
            }
            if let Some(o) = owner {
                o.count(rx, tx);
            }
        });
    }
    (rx, tx)
}

/// What Strait knows about the client connection a request arrived on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: ClientAddr,
    /// The address the connection came to; `None` on a Unix socket.
    pub local: Option<SocketAddr>,
    pub tls: bool,
}

/// The request handler shared by every connection.
pub struct Proxy {
    upstream: Arc<Upstream>,
    forward: Option<forward::ForwardPolicy>,
    routes: RouteTable<reverse::Route>,
    idle_timeout: Duration,
    /// `timeouts.body_read`.
    body_read: Duration,
    /// Tunnels outlive the request that opened them; shutdown waits for them here.
    tasks: TaskTracker,
    metrics: Arc<Metrics>,
    /// Per-request metrics are kept only when an admin listener can export them.
    metrics_on: bool,
    access: Option<AccessLog>,
}

/// What the dispatch learned about a request, for metrics and the access log.
pub struct Meta {
    pub kind: Kind,
    pub route: Label,
    pub user: Label,
    /// The upstream URL (reverse) or target authority (forward, CONNECT).
    pub upstream: Option<Arc<str>>,
    /// For a request that may switch protocols (an upgrade, an HTTP/2 WebSocket):
    /// where the switched connection finds what it accounts when it ends.
    pub(crate) switch: Option<Arc<upgrade::SwitchSlot>>,
}

impl Default for Meta {
    fn default() -> Self {
        Meta {
            kind: Kind::Reverse,
            route: Label::none(),
            user: Label::none(),
            upstream: None,
            switch: None,
        }
    }
}

impl Proxy {
    /// Builds the service from a validated config. Fails only on TLS material that
    /// cannot be loaded (for example an unreadable `tls_ca`).
    pub fn new(
        config: &Config,
        tasks: TaskTracker,
        upstream: Arc<Upstream>,
        metrics: Arc<Metrics>,
        access: Option<AccessLog>,
    ) -> Result<Proxy, String> {
        let forward = config
            .forward
            .enabled
            .then(|| {
                forward::ForwardPolicy::new(&config.forward, &config.timeouts, &upstream, &metrics)
            })
            .transpose()?
            .map(|mut f| {
                f.max_body = config.limits.max_body(config.forward.max_body);
                f
            });
        let route_metrics = config.admin.is_some().then_some(&*metrics);
        let routes = config
            .route
            .iter()
            .map(|r| {
                let mut route = reverse::Route::new(r, &config.timeouts, &upstream, route_metrics)?;
                route.max_body = config.limits.max_body(r.max_body);
                Ok((r.host.clone(), r.path.0.clone(), route))
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Proxy {
            upstream,
            forward,
            routes: RouteTable::new(routes),
            idle_timeout: config.timeouts.idle,
            body_read: config.timeouts.body_read,
            tasks,
            metrics,
            metrics_on: config.admin.is_some(),
            access,
        })
    }

    /// Handles one request; never fails: refusals become short plain-text responses.
    /// The response body carries the request's accounting, done when it ends.
    ///
    /// Owns what it uses, so the server boxes this future itself rather than a future
    /// around it: a request's future is a few KiB, and each nesting level copied it.
    // Not an `async fn`: an `async fn` keeps each argument and its moved-in copy in its
    // future; this future is moved per request (bench/proxy-instructions counts it).
    #[allow(clippy::manual_async_fn)]
    pub fn handle(
        self: Arc<Self>,
        req: Request<RequestBody>,
        conn: ConnInfo,
        bytes: Arc<ConnBytes>,
    ) -> impl Future<Output = Response<Tracked>> + Send + 'static {
        // An `async move` block rather than an `async fn`: the arguments then live in
        // the future once (an `async fn` keeps each argument and its moved-in copy).
        async move {
            let bytes = &bytes;
            // The clock is read only when a metric or a log line will use it.
            let start = (self.metrics_on || self.access.is_some()).then(Instant::now);
            // Kept for the log line and metrics; the clones are reference-count bumps.
            let method = req.method().clone();
            let uri = req.uri().clone();
            let version = req.version();
            // The guard in front of hyper holds the connection's next bytes until it
            // knows whether this request switched protocols (`server::guard`).
            let may_switch = version < http::Version::HTTP_2
                && (method == Method::CONNECT || req.headers().contains_key(header::UPGRADE));
            let (referer, user_agent) = match &self.access {
                Some(_) => (
                    req.headers().get(header::REFERER).cloned(),
                    req.headers().get(header::USER_AGENT).cloned(),
                ),
                None => (None, None),
            };
            let mut meta = Meta::default();
            // hyper gives an upgrade handle to requests with `Upgrade` and to CONNECTs;
            // a plain CONNECT is a tunnel, which accounts for itself.
            let ext = req.extensions();
            if ext.get::<hyper::upgrade::OnUpgrade>().is_some()
                && (method != Method::CONNECT || ext.get::<hyper::ext::Protocol>().is_some())
            {
                meta.switch = Some(Arc::new(upgrade::SwitchSlot::new(bytes.clone())));
            }
            // Strait's own HTTP/1.1 server checks `Host` as it parses (and hands a
            // request that fails to hyper); what hyper parsed, with its `Incoming` body,
            // is checked here.
            let mut req = req;
            let refused = match req.body() {
                RequestBody::Incoming(_) => malformed(&mut req),
                // Strait's own server refused the head's framing; it is answered here to
                // be logged and counted as every refusal is.
                _ if !req.extensions().is_empty() => req
                    .extensions()
                    .get::<Refused>()
                    .map(|r| Refusal::Framing(*r)),
                _ => None,
            };
            // The forward and CONNECT futures are boxed: the request's future is built and
            // moved whole, and theirs are the largest states it would otherwise hold.
            let result = if let Some(refusal) = refused {
                Err(refusal)
            } else if method == Method::CONNECT && !self.is_reverse_websocket(&req, conn) {
                Box::pin(self.connect(req, conn, &mut meta, bytes)).await
            } else if self.is_forward_form(&req, conn) {
                Box::pin(self.forward(req, conn, &mut meta)).await
            } else {
                self.reverse(req, conn, &mut meta).await
            };
            let mut resp = result.unwrap_or_else(|refusal| {
                refusal.log(&method, &uri, conn);
                refusal.into_response()
            });
            if version == http::Version::HTTP_10 {
                close_if_unframed(&mut resp);
            }
            let status = resp.status().as_u16();
            // A tunnel accounts for its bytes (the request's head among them) and logs
            // its line when it closes; so does a switched connection, given the line's
            // fields here. An HTTP/1 connection is theirs from now on: its own end must
            // not take the bytes.
            let tunnel = meta.kind == Kind::Connect && status == 200;
            let switch = meta.switch.take().filter(|slot| slot.is_switched());
            let handed_over = tunnel || switch.is_some();
            if handed_over && version < http::Version::HTTP_2 {
                bytes.hand_over();
            }
            if may_switch {
                bytes.decide_switch(handed_over);
            }
            let logged_later = match (switch, &self.access) {
                (Some(slot), Some(access)) => slot.leave_line(upgrade::Line {
                    access: access.clone(),
                    client: conn.peer,
                    user: meta.user.clone(),
                    method: method.clone(),
                    uri: uri.clone(),
                    version,
                    status,
                    start: start.unwrap_or_else(Instant::now),
                    kind: meta.kind,
                    route: meta.route.clone(),
                    upstream: meta.upstream.clone(),
                    referer: referer.clone(),
                    user_agent: user_agent.clone(),
                }),
                _ => false,
            };
            let access = if tunnel || logged_later {
                None
            } else {
                self.access.clone()
            };
            let metrics = self.metrics_on.then(|| self.metrics.clone());
            let done = (metrics.is_some() || access.is_some()).then(|| {
                Box::new(Done {
                    metrics,
                    access,
                    bytes: (!handed_over).then(|| bytes.clone()),
                    start: start.unwrap_or_else(Instant::now),
                    meta,
                    status,
                    method,
                    uri,
                    version,
                    client: conn.peer,
                    referer,
                    user_agent,
                    body_sent: 0,
                })
            });
            resp.map(|body| Tracked { body, done })
        }
    }

    /// True for an HTTP/2 WebSocket (extended CONNECT, RFC 8441) meant for a reverse
    /// route: forward proxying is off, or a route takes its authority and path, or it
    /// names the listener. Any other extended CONNECT is a tunnel to its authority.
    fn is_reverse_websocket(&self, req: &Request<RequestBody>, conn: ConnInfo) -> bool {
        if !upgrade::is_h2_websocket(req.method(), req.extensions().get()) {
            return false;
        }
        self.forward.is_none()
            || self
                .routes
                .find(req.uri().host(), req.uri().path())
                .is_some()
            || names_listener(req.uri(), conn.local)
    }

    /// True for a request addressed to another server through this proxy.
    ///
    /// HTTP/1 says so with absolute form (RFC 9112 §3.2.2). HTTP/2 always carries an
    /// authority, so there a request is forward proxying only when no route takes it
    /// and it names a server other than this listener.
    fn is_forward_form(&self, req: &Request<RequestBody>, conn: ConnInfo) -> bool {
        if self.forward.is_none() || req.uri().scheme().is_none() {
            return false;
        }
        if req.version() != http::Version::HTTP_2 {
            return true;
        }
        if self
            .routes
            .find(req.uri().host(), req.uri().path())
            .is_some()
        {
            return false;
        }
        !names_listener(req.uri(), conn.local)
    }
}

/// Why a request hyper parsed (HTTP/1 on hyper's path, and every HTTP/2 request) is
/// refused, if it is, as nginx refuses them; fields with `_` in their names are dropped
/// on the way (`http1::is_forwarded_name`).
///
/// HTTP/1: an HTTP/1.1 request without `Host`, any with more than one or with one that
/// is no host[:port] (RFC 9112 §3.2); a target in neither origin nor absolute form
/// outside CONNECT; codings other than exactly `chunked` (501, RFC 9112 §6.1: hyper
/// decodes a final `chunked` and lets `gzip, chunked` pass as if it were plain). The
/// other framing faults are hyper's to answer, or Strait's own server's before hyper
/// sees the head (`server/h1.rs`).
///
/// HTTP/2 (RFC 9113 §8.2.1, §8.3.1): a `:path` that is not origin form (or `*` for
/// OPTIONS), and field values with white space at either end, are malformed.
fn malformed(req: &mut Request<RequestBody>) -> Option<Refusal> {
    drop_underscored(req.headers_mut());
    let version = req.version();
    let uri = req.uri();
    if version >= http::Version::HTTP_2 {
        let path = uri.path_and_query().map_or("", |p| p.as_str());
        let bad_path = req.method() != Method::CONNECT
            && !path.starts_with('/')
            && !(path == "*" && req.method() == Method::OPTIONS);
        let padded = req.headers().values().any(|v| {
            let v = v.as_bytes();
            matches!(v.first(), Some(b' ' | b'\t')) || matches!(v.last(), Some(b' ' | b'\t'))
        });
        return match (bad_path, padded) {
            (true, _) => Some(Refusal::BadRequest(":path is not origin form".into())),
            (_, true) => Some(Refusal::BadRequest(
                "field value with white space at either end".into(),
            )),
            _ => None,
        };
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = match (hosts.next(), hosts.next()) {
        (None, _) if version == http::Version::HTTP_11 => Some("HTTP/1.1 request without Host"),
        (Some(_), Some(_)) => Some("more than one Host"),
        (Some(host), None) if !http1::is_host_port(host.as_bytes()) => {
            Some("Host is not host[:port]")
        }
        _ => None,
    };
    // hyper takes `GET host:80` (authority form) and `GET *` as targets; only CONNECT
    // names an authority, and Strait serves no `*` (RFC 9112 §3.2).
    let target =
        (req.method() != Method::CONNECT && uri.scheme().is_none() && !uri.path().starts_with('/'))
            .then_some("request target is neither origin form nor absolute form");
    if let Some(why) = host.or(target) {
        return Some(Refusal::BadRequest(why.into()));
    }
    let mut codings = req.headers().get_all(header::TRANSFER_ENCODING).iter();
    if let Some(first) = codings.next() {
        let mut framing = http1::framing::RequestFraming::default();
        framing.transfer_encoding(first.as_bytes());
        for more in codings {
            framing.transfer_encoding(more.as_bytes());
        }
        if let Err(refused) = framing.finish(version == http::Version::HTTP_10) {
            return Some(Refusal::Framing(refused));
        }
    }
    None
}

/// Removes fields whose names hold `_`; one pass over the names finds none in the
/// usual request.
fn drop_underscored(headers: &mut http::HeaderMap) {
    if headers
        .keys()
        .all(|n| http1::is_forwarded_name(n.as_str().as_bytes()))
    {
        return;
    }
    let names: Vec<header::HeaderName> = headers
        .keys()
        .filter(|n| !http1::is_forwarded_name(n.as_str().as_bytes()))
        .cloned()
        .collect();
    for name in names {
        headers.remove(name);
    }
}

/// True when `uri`'s authority is the listener's own address (or localhost on its port);
/// on a Unix socket, when it is `localhost` (on any port: the socket has none).
fn names_listener(uri: &http::Uri, local: Option<SocketAddr>) -> bool {
    let Some(host) = uri.host() else { return true };
    let Some(local) = local else {
        return host.eq_ignore_ascii_case("localhost");
    };
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    if port != local.port() {
        return false;
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<std::net::IpAddr>().ok() == Some(local.ip())
}

/// A request Strait answers itself. Each maps to one status and one short body.
#[derive(Debug)]
pub enum Refusal {
    /// 400: the request cannot be proxied as sent.
    BadRequest(String),
    /// 400 or 501: the head's framing fields refuse it (`http1::framing`); the
    /// connection closes after the answer, as where its body ends is in doubt.
    Framing(Refused),
    /// 403: a `[forward]` rule refuses the client or the target; the text names the
    /// rule, and is the body's.
    Denied(String),
    /// 404: no route takes the request.
    NoRoute,
    /// 407: proxy credentials missing or wrong.
    AuthRequired,
    /// 503: the credentials could not be checked now (every password-hashing slot
    /// stayed busy; `auth.rs`).
    AuthBusy,
    /// 502 / 403 / 503 / 504: the upstream exchange failed; 400 when the client's
    /// request body broke on the way.
    Upstream(UpstreamError),
    /// 413 (`max_body`) or 408 (`body_read`): the client's body was refused for its
    /// length or its pace. The connection closes after the answer: the rest of the
    /// body is not read.
    BodyLimit(StatusCode, String),
}

impl Refusal {
    fn status(&self) -> StatusCode {
        match self {
            Refusal::BadRequest(_) | Refusal::Upstream(UpstreamError::ClientBody(_)) => {
                StatusCode::BAD_REQUEST
            }
            Refusal::Framing(r) => r.status,
            Refusal::BodyLimit(status, _) => *status,
            Refusal::Denied(_) => StatusCode::FORBIDDEN,
            Refusal::NoRoute => StatusCode::NOT_FOUND,
            Refusal::AuthRequired => StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            Refusal::AuthBusy => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::Upstream(UpstreamError::Connect(ConnectError::Denied(..))) => {
                StatusCode::FORBIDDEN
            }
            Refusal::Upstream(UpstreamError::Connect(ConnectError::BadAddress(_))) => {
                StatusCode::BAD_REQUEST
            }
            Refusal::Upstream(UpstreamError::Timeout(_)) => StatusCode::GATEWAY_TIMEOUT,
            Refusal::Upstream(UpstreamError::Exhausted) => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::Upstream(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// The response the client sees: a status and a short body that never carries
    /// internals (addresses, error chains); those go to the log.
    pub fn into_response(self) -> Response<Body> {
        let status = self.status();
        let body = match &self {
            Refusal::BadRequest(_)
            | Refusal::Upstream(UpstreamError::ClientBody(_))
            | Refusal::Upstream(UpstreamError::Connect(ConnectError::BadAddress(_))) => {
                "400 bad request\n"
            }
            // The rule that refused, as the config writes it: what a user asks their
            // administrator about.
            Refusal::Denied(why) => {
                return text_response(status, format!("403 forbidden: {why}\n"));
            }
            Refusal::Upstream(UpstreamError::Connect(ConnectError::Denied(_, rule))) => {
                return text_response(
                    status,
                    format!("403 forbidden: the target address is in deny_targets ({rule:?})\n"),
                );
            }
            Refusal::Framing(r) if r.status == StatusCode::NOT_IMPLEMENTED => {
                "501 not implemented\n"
            }
            Refusal::Framing(_) => "400 bad request\n",
            Refusal::BodyLimit(StatusCode::PAYLOAD_TOO_LARGE, _) => "413 content too large\n",
            Refusal::BodyLimit(_, _) => "408 request timeout\n",
            Refusal::NoRoute => "404 not found\n",
            Refusal::AuthRequired => "407 proxy authentication required\n",
            Refusal::AuthBusy => "503 service unavailable\n",
            Refusal::Upstream(UpstreamError::Timeout(_)) => "504 gateway timeout\n",
            Refusal::Upstream(UpstreamError::Exhausted) => "503 service unavailable\n",
            Refusal::Upstream(_) => "502 bad gateway\n",
        };
        let mut resp = text_response(status, body);
        let h = resp.headers_mut();
        if let Refusal::Framing(_) | Refusal::BodyLimit(..) = self {
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Refusal::AuthRequired = self {
            h.insert(
                header::PROXY_AUTHENTICATE,
                // RFC 7617 §2.1: ask for UTF-8; Latin-1 still works (`auth.rs`).
                header::HeaderValue::from_static("Basic realm=\"strait\", charset=\"UTF-8\""),
            );
        }
        resp
    }

    fn log(&self, method: &Method, uri: &http::Uri, conn: ConnInfo) {
        let status = self.status().as_u16();
        let client = conn.peer;
        match self {
            Refusal::BadRequest(why) => {
                tracing::info!(%client, %method, %uri, status, "bad request: {why}")
            }
            Refusal::Framing(r) => {
                tracing::info!(%client, %method, %uri, status, "bad request: {}", r.why)
            }
            Refusal::Denied(why) => {
                tracing::info!(%client, %method, %uri, status, "denied: {why}")
            }
            Refusal::NoRoute => tracing::info!(%client, %method, %uri, status, "no route"),
            Refusal::AuthRequired => {
                tracing::info!(%client, %method, %uri, status, "proxy authentication required")
            }
            Refusal::AuthBusy => tracing::warn!(
                %client, %method, %uri, status,
                "proxy credentials not checked: every password-hashing slot stayed busy"
            ),
            Refusal::Upstream(UpstreamError::ClientBody(e)) => {
                tracing::info!(%client, %method, %uri, status, "client failed: request body: {e}")
            }
            Refusal::BodyLimit(_, why) => {
                tracing::info!(%client, %method, %uri, status, "client failed: {why}")
            }
            Refusal::Upstream(
                e @ UpstreamError::Connect(ConnectError::Denied(..) | ConnectError::BadAddress(_)),
            ) => {
                tracing::info!(%client, %method, %uri, status, "denied: {e}")
            }
            Refusal::Upstream(e) => {
                tracing::warn!(%client, %method, %uri, status, "upstream failed: {e}")
            }
        }
    }
}

/// A 407 from the proxy in between (`parent`, `via`) is about Strait's credentials
/// for it, not the client's: a 502, with the hop named in the log.
fn parent_refused<B>(
    resp: &Response<B>,
    profile: &crate::upstream::Profile,
) -> Result<(), Refusal> {
    match profile.via() {
        Some(via) if resp.status() == StatusCode::PROXY_AUTHENTICATION_REQUIRED => Err(
            Refusal::Upstream(UpstreamError::Connect(ConnectError::Via(format!(
                "parent proxy {}: answered 407: check the credentials in its URL",
                via.authority()
            )))),
        ),
        _ => Ok(()),
    }
}

/// A short plain-text answer.
fn text_response(status: StatusCode, body: impl Into<bytes::Bytes>) -> Response<Body> {
    let mut resp = Response::new(Body::Full(Some(body.into())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

impl From<UpstreamError> for Refusal {
    fn from(e: UpstreamError) -> Refusal {
        Refusal::Upstream(e)
    }
}

/// Puts `max_body` (0 = none) and `timeouts.body_read` on a request's body. A body
/// whose length is known to pass the limit is refused here, before any byte of it
/// goes upstream; a streamed one is cut where it passes it.
#[inline]
fn limit_body(
    body: &mut RequestBody,
    max: u64,
    within: Duration,
) -> Result<Option<Arc<crate::body::BodyProgress>>, Refusal> {
    let least = match body {
        RequestBody::Incoming(b) => http_body::Body::size_hint(b).lower(),
        RequestBody::Full(Some(d)) => d.len() as u64,
        RequestBody::Full(None) | RequestBody::Empty => return Ok(None),
    };
    if max > 0 && least > max {
        return Err(too_large(least, max));
    }
    Ok(match body {
        RequestBody::Incoming(b) => b.limit(max, within),
        RequestBody::Full(_) | RequestBody::Empty => None,
    })
}

#[cold]
fn too_large(least: u64, max: u64) -> Refusal {
    Refusal::BodyLimit(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body of {least} bytes is longer than max_body ({max} bytes)"),
    )
}

/// A refusal for a body cut by [`limit_body`]'s limits, which the upstream reports as
/// its request body failing: 413 or 408 rather than 400.
fn body_refusal(refusal: Refusal, progress: Option<&crate::body::BodyProgress>) -> Refusal {
    match (refusal, progress.and_then(|p| p.status())) {
        (Refusal::Upstream(UpstreamError::ClientBody(e)), Some(status)) => {
            // The limit's own words, not every layer's wrapping of them.
            let mut cause: &(dyn std::error::Error + 'static) = &*e;
            while let Some(inner) = cause.source() {
                cause = inner;
            }
            Refusal::BodyLimit(status, format!("request body: {cause}"))
        }
        (r, _) => r,
    }
}

/// An HTTP/1.0 client has no chunked coding: a body of unknown length ends with the
/// connection. Saying so, in an HTTP/1.0 head, keeps hyper from announcing
/// `keep-alive` for a connection it is about to close (it adds that to heads marked
/// HTTP/1.1 whatever their `Connection` says).
#[cold]
fn close_if_unframed(resp: &mut Response<Body>) {
    let bodiless = resp.status().is_informational()
        || matches!(
            resp.status(),
            http::StatusCode::NO_CONTENT | http::StatusCode::NOT_MODIFIED
        );
    if !bodiless && http_body::Body::size_hint(resp.body()).exact().is_none() {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        *resp.version_mut() = http::Version::HTTP_10;
    }
}

/// Removes hop-by-hop fields from an upstream response and hands it to the client.
fn relay_response(resp: Response<ResponseBody>) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    // The client hears Strait's own HTTP version, not the upstream's (an HTTP/1.0
    // origin must not turn a keep-alive client connection into a closing one).
    parts.version = http::Version::HTTP_11;
    Response::from_parts(parts, Body::Upstream(body))
}

/// A response body that does the request's accounting when it ends or is dropped:
/// `strait_requests_total`, the duration histogram, the connection's bytes since the
/// previous request, and the access log line.
pub struct Tracked {
    body: Body,
    /// Boxed: a response moves several times on its way to hyper, and this is most of
    /// its size; without metrics or a log there is none (bench/proxy-instructions).
    done: Option<Box<Done>>,
}

struct Done {
    metrics: Option<Arc<Metrics>>,
    access: Option<AccessLog>,
    bytes: Option<Arc<ConnBytes>>,
    start: Instant,
    meta: Meta,
    status: u16,
    method: Method,
    uri: Uri,
    version: http::Version,
    client: ClientAddr,
    referer: Option<HeaderValue>,
    user_agent: Option<HeaderValue>,
    /// Response body bytes handed to the client (nginx's `$body_bytes_sent`).
    body_sent: u64,
}

impl Drop for Done {
    fn drop(&mut self) {
        let elapsed = self.start.elapsed();
        let kind = self.meta.kind;
        let (rx, _tx) = match &self.bytes {
            Some(b) => attribute_bytes(b, self.metrics.as_deref(), kind, &self.meta.user),
            None => (0, 0),
        };
        if let Some(m) = &self.metrics {
            m.requests
                .get_or_create(&RequestLabels {
                    kind,
                    route: self.meta.route.clone(),
                    code: self.status,
                })
                .inc();
            m.duration
                .get_or_create(&RouteLabels {
                    kind,
                    route: self.meta.route.clone(),
                })
                .observe(elapsed.as_secs_f64());
        }
        if let Some(log) = &self.access {
            let mut whole = String::new();
            let target = log_target(&self.uri, &mut whole);
            log.log(&Entry {
                client: self.client,
                user: &self.meta.user.0,
                method: self.method.as_str(),
                target,
                protocol: protocol_name(self.version),
                status: self.status,
                bytes_in: rx,
                bytes_out: self.body_sent,
                duration: elapsed,
                kind: kind.as_str(),
                route: &self.meta.route.0,
                upstream: self.meta.upstream.as_deref().unwrap_or("-"),
                referer: header_str(&self.referer),
                user_agent: header_str(&self.user_agent),
            });
        }
    }
}

/// The request target as logged: origin form (most requests) as it is; only absolute
/// and authority forms need the URI put back together, in `whole`.
fn log_target<'a>(uri: &'a Uri, whole: &'a mut String) -> &'a str {
    match (uri.scheme(), uri.path_and_query()) {
        (None, Some(pq)) => pq.as_str(),
        _ => {
            *whole = uri.to_string();
            whole
        }
    }
}

fn header_str(v: &Option<HeaderValue>) -> &str {
    v.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("-")
}

pub fn protocol_name(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_2 => "HTTP/2.0",
        _ => "HTTP/1.1",
    }
}

/// A response body that failed after its head went out: the client's response is cut
/// short (its HTTP/1 connection closed, its HTTP/2 stream reset), and the log says why.
#[cold]
fn body_failed(done: Option<&Done>, e: &crate::body::BoxError) {
    let upstream = done.and_then(|d| d.meta.upstream.as_deref()).unwrap_or("-");
    tracing::warn!(upstream, "response body cut short: {e}");
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = crate::body::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, crate::body::BoxError>>> {
        let this = &mut *self;
        let mut polled = Pin::new(&mut this.body).poll_frame(cx);
        match &mut polled {
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => {
                // Whichever upstream sent them: no framing or routing field travels
                // in trailers (RFC 9110 §6.5.1).
                if let Some(trailers) = frame.trailers_mut() {
                    http1::chunked::strip_trailers(trailers);
                }
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(done), Some(data)) = (&mut this.done, frame.data_ref()) {
                    done.body_sent += data.len() as u64;
                }
            }
            Poll::Ready(Some(Err(e))) => {
                body_failed(this.done.as_deref(), e);
                this.done = None;
            }
            // The end: account now rather than when hyper drops the body.
            Poll::Ready(None) => this.done = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
