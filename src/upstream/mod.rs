//! The upstream side: sends a request to an origin over a pooled connection.
//!
//! One entry point, [`Upstream::send`]: a request in origin form plus a [`Target`]
//! (scheme, authority and the [`Profile`] of connection settings) in, a response out.
//! Connections are pooled and shared by every client of Strait. This module knows
//! nothing of routes or users: the proxy decides *where*, this decides *how*.
//!
//! For now the pool is hyper-util's pooled client, one per profile; Strait's own pool
//! replaces it behind the same seam.

pub mod balance;
pub mod connect;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme as UriScheme, Uri};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::Body;
use crate::config::{self, Cidr, Scheme, Version};
pub use connect::{ConnectError, TlsSettings};

/// Connection settings shared by a group of targets: protocol, TLS and address policy.
/// Two targets only ever share a connection when they share a profile.
pub struct Profile {
    client: Client<connect::Connector, Body>,
}

impl fmt::Debug for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Profile").finish_non_exhaustive()
    }
}

/// What a profile is made of.
pub struct ProfileSettings {
    pub version: Version,
    /// Used for `https` targets; `None` refuses them.
    pub tls: Option<TlsSettings>,
    /// Addresses never connected to (checked after resolution).
    pub deny: Arc<[Cidr]>,
}

/// Where one request goes.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub scheme: Scheme,
    /// `host[:port]`, exactly as it should appear in the URI.
    pub authority: &'a str,
    pub profile: &'a Profile,
}

/// Why an upstream exchange failed.
#[derive(Debug)]
pub enum UpstreamError {
    /// No connection could be opened; the request was not sent.
    Connect(ConnectError),
    /// `timeouts.upstream_response` passed before the response head arrived.
    Timeout(Duration),
    /// The connection failed while the request was under way, or the response was
    /// malformed.
    Exchange(hyper_util::client::legacy::Error),
    /// The target cannot be expressed as a URI.
    BadTarget(String),
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
            UpstreamError::Timeout(d) => {
                write!(
                    f,
                    "no response head within {}",
                    humantime::format_duration(*d)
                )
            }
            UpstreamError::Exchange(e) => {
                write!(f, "{e}")?;
                let mut source = std::error::Error::source(e);
                while let Some(s) = source {
                    write!(f, ": {s}")?;
                    source = s.source();
                }
                Ok(())
            }
            UpstreamError::BadTarget(t) => write!(f, "invalid target {t:?}"),
        }
    }
}

impl std::error::Error for UpstreamError {}

/// The client the proxy sends through.
#[derive(Debug, Clone)]
pub struct Upstream {
    pool: config::Pool,
    connect_timeout: Duration,
    response_timeout: Duration,
}

impl Upstream {
    pub fn new(pool: &config::Pool, timeouts: &config::Timeouts) -> Self {
        Upstream {
            pool: pool.clone(),
            connect_timeout: timeouts.connect,
            response_timeout: timeouts.upstream_response,
        }
    }

    /// `timeouts.connect`, for callers that open raw connections (tunnels).
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// Makes a profile: a group of targets that may share connections.
    pub fn profile(&self, settings: ProfileSettings) -> Profile {
        let connector = connect::Connector::new(settings.tls, settings.deny, self.connect_timeout);
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_idle_timeout(self.pool.idle_timeout)
            .pool_max_idle_per_host(self.pool.max_idle_per_host)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .http2_only(settings.version == Version::H2)
            // Strait sets Host itself (the proxy decides between the client's and ours).
            .set_host(false);
        Profile {
            client: builder.build(connector),
        }
    }

    /// Sends `req` (whose URI is in origin form) to `target` and waits for the response
    /// head, at most `timeouts.upstream_response`.
    pub async fn send(
        &self,
        mut req: Request<Body>,
        target: Target<'_>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let path = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let authority = Authority::try_from(target.authority)
            .map_err(|_| UpstreamError::BadTarget(target.authority.to_owned()))?;
        let scheme = match target.scheme {
            Scheme::Http => UriScheme::HTTP,
            Scheme::Https => UriScheme::HTTPS,
        };
        *req.uri_mut() = Uri::builder()
            .scheme(scheme)
            .authority(authority)
            .path_and_query(path)
            .build()
            .map_err(|_| UpstreamError::BadTarget(target.authority.to_owned()))?;
        // Strait speaks HTTP/1.1 or HTTP/2 upstream whatever the client spoke; the pooled
        // client picks h2 from the connection, and refuses a request marked HTTP/2 on h1.
        *req.version_mut() = http::Version::HTTP_11;
        match tokio::time::timeout(self.response_timeout, target.profile.client.request(req)).await
        {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(classify(e)),
            Err(_) => Err(UpstreamError::Timeout(self.response_timeout)),
        }
    }
}

/// Separates "could not connect" (nothing sent) from failures mid-exchange.
fn classify(e: hyper_util::client::legacy::Error) -> UpstreamError {
    if e.is_connect() {
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            if let Some(ce) = s.downcast_ref::<ConnectError>() {
                return UpstreamError::Connect(ce.clone());
            }
            source = s.source();
        }
    }
    UpstreamError::Exchange(e)
}
