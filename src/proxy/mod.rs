//! The proxy service: decides what each request is and where it goes.
//!
//! CONNECT opens a tunnel ([`tunnel`]), an absolute-form request is forward proxying
//! ([`forward`]), anything else goes through the route table ([`reverse`]). Errors Strait
//! makes itself are mapped to a status and a short body in one place,
//! [`Refusal::into_response`]. Nothing here opens sockets: [`crate::upstream`] does.

pub mod auth;
pub mod forward;
pub mod headers;
pub mod reverse;
pub mod tunnel;

use std::net::SocketAddr;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use tokio_util::task::TaskTracker;

use crate::body::Body;
use crate::config::Config;
use crate::route::RouteTable;
use crate::upstream::{ConnectError, ResponseBody, Upstream, UpstreamError};

/// What Strait knows about the client connection a request arrived on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub tls: bool,
}

/// The request handler shared by every connection.
pub struct Proxy {
    upstream: Upstream,
    forward: Option<forward::ForwardPolicy>,
    routes: RouteTable<reverse::Route>,
    idle_timeout: Duration,
    /// Tunnels outlive the request that opened them; shutdown waits for them here.
    tasks: TaskTracker,
}

impl Proxy {
    /// Builds the service from a validated config. Fails only on TLS material that
    /// cannot be loaded (for example an unreadable `tls_ca`).
    pub fn new(config: &Config, tasks: TaskTracker) -> Result<Proxy, String> {
        let upstream = Upstream::new(&config.pool, &config.timeouts);
        let forward = config
            .forward
            .enabled
            .then(|| forward::ForwardPolicy::new(&config.forward, &upstream))
            .transpose()?;
        let routes = config
            .route
            .iter()
            .map(|r| {
                let route = reverse::Route::new(r, &upstream)?;
                Ok((r.host.clone(), r.path.0.clone(), route))
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Proxy {
            upstream,
            forward,
            routes: RouteTable::new(routes),
            idle_timeout: config.timeouts.idle,
            tasks,
        })
    }

    /// Handles one request; never fails: refusals become short plain-text responses.
    pub async fn handle(&self, req: Request<Incoming>, conn: ConnInfo) -> Response<Body> {
        // Kept for the log line should the request be refused; both clones are
        // reference-count bumps, not copies.
        let method = req.method().clone();
        let uri = req.uri().clone();
        let result = if method == Method::CONNECT {
            self.connect(req, conn).await
        } else if self.is_forward_form(&req, conn) {
            self.forward(req, conn).await
        } else {
            self.reverse(req, conn).await
        };
        result.unwrap_or_else(|refusal| {
            refusal.log(&method, &uri, conn);
            refusal.into_response()
        })
    }

    /// True for a request addressed to another server through this proxy.
    ///
    /// HTTP/1 says so with absolute form (RFC 9112 §3.2.2). HTTP/2 always carries an
    /// authority, so there a request is forward proxying only when no route takes it
    /// and it names a server other than this listener.
    fn is_forward_form(&self, req: &Request<Incoming>, conn: ConnInfo) -> bool {
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

/// True when `uri`'s authority is the listener's own address (or localhost on its port).
fn names_listener(uri: &http::Uri, local: SocketAddr) -> bool {
    let Some(host) = uri.host() else { return true };
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
    /// 403: `deny_targets` or `connect_ports` forbid the target.
    Denied(String),
    /// 404: no route takes the request.
    NoRoute,
    /// 407: proxy credentials missing or wrong.
    AuthRequired,
    /// 502 / 403 / 503 / 504: the upstream exchange failed.
    Upstream(UpstreamError),
}

impl Refusal {
    fn status(&self) -> StatusCode {
        match self {
            Refusal::BadRequest(_) => StatusCode::BAD_REQUEST,
            Refusal::Denied(_) => StatusCode::FORBIDDEN,
            Refusal::NoRoute => StatusCode::NOT_FOUND,
            Refusal::AuthRequired => StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            Refusal::Upstream(UpstreamError::Connect(ConnectError::Denied(_))) => {
                StatusCode::FORBIDDEN
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
            Refusal::BadRequest(_) => "400 bad request\n",
            Refusal::Denied(_)
            | Refusal::Upstream(UpstreamError::Connect(ConnectError::Denied(_))) => {
                "403 forbidden: the target address is blocked by the [forward] deny_targets \
                 setting (or not in connect_ports); change deny_targets (deny_targets = [] \
                 allows all) to allow it\n"
            }
            Refusal::NoRoute => "404 not found\n",
            Refusal::AuthRequired => "407 proxy authentication required\n",
            Refusal::Upstream(UpstreamError::Timeout(_)) => "504 gateway timeout\n",
            Refusal::Upstream(UpstreamError::Exhausted) => "503 service unavailable\n",
            Refusal::Upstream(_) => "502 bad gateway\n",
        };
        let mut resp = Response::new(Body::text(body));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if let Refusal::AuthRequired = self {
            h.insert(
                header::PROXY_AUTHENTICATE,
                header::HeaderValue::from_static("Basic realm=\"strait\""),
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
            Refusal::Denied(why) => {
                tracing::info!(%client, %method, %uri, status, "target denied: {why}")
            }
            Refusal::NoRoute => tracing::info!(%client, %method, %uri, status, "no route"),
            Refusal::AuthRequired => {
                tracing::info!(%client, %method, %uri, status, "proxy authentication required")
            }
            Refusal::Upstream(e) => {
                tracing::warn!(%client, %method, %uri, status, "upstream failed: {e}")
            }
        }
    }
}

impl From<UpstreamError> for Refusal {
    fn from(e: UpstreamError) -> Refusal {
        Refusal::Upstream(e)
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
