//! Reverse proxying: origin-form requests go to the upstreams of the route that takes
//! them.
//!
//! The nginx `proxy_pass` rule rewrites the path: an upstream URL with a path replaces
//! the matched prefix; without one the URI passes unchanged. `Host` becomes the
//! upstream's authority unless `preserve_host` (a Unix socket's upstream has none: the
//! route's host when it is one name, else `localhost`); `X-Forwarded-For` is appended
//! to and `X-Forwarded-Proto` and `X-Forwarded-Host` are set.

use std::sync::Arc;

use http::header::{HOST, HeaderValue, LOCATION};
use http::uri::{Authority, PathAndQuery};
use http::{HeaderMap, Request, Response, StatusCode, Uri};

use super::Body;
use super::headers::{self, X_FORWARDED_HOST, X_FORWARDED_PROTO};
use super::{ConnInfo, Meta, Proxy, Refusal, health, relay_response, upgrade};
use crate::body::RequestBody;
use crate::config::{HostPattern, RouteConfig, Scheme, Timeouts, UpstreamUrl};
use crate::metrics::{Kind, Label, Metrics};
use crate::upstream::balance::Balancer;
use crate::upstream::retry::{self, Failover};
use crate::upstream::via::Via;
use crate::upstream::{ProfileSettings, Target, TlsSettings, Upstream};

/// A route, ready to serve: its upstreams, their balancer and connection profile.
pub struct Route {
    /// The route as written, for logs and metrics.
    pub label: Label,
    /// Each upstream URL as written, for the access log.
    names: Vec<Arc<str>>,
    prefix_len: usize,
    upstreams: Vec<UpstreamUrl>,
    /// Each upstream's authority as a ready `Host` value, and its pool key.
    host_values: Vec<HeaderValue>,
    targets: Vec<Target>,
    /// The same upstreams over HTTP/1.1 only, for requests that switch protocols.
    upgrade_targets: Vec<Target>,
    balancer: Arc<Balancer>,
    preserve_host: bool,
    /// Per upstream, how a `Location` pointing at it is rewritten (empty with
    /// `rewrite_location = false`).
    locations: Vec<LocationRewrite>,
    /// The route's health checks, which stop with it.
    _probes: Option<health::Probes>,
    /// `max_body` (the route's, else `[limits]`'s); 0 = none.
    pub max_body: u64,
}

/// See [`Route::order`].
enum Order<I> {
    AsBalanced(I),
    RoomFirst(std::iter::Chain<std::vec::IntoIter<usize>, std::vec::IntoIter<usize>>),
}

impl<I: Iterator<Item = usize>> Iterator for Order<I> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        match self {
            Order::AsBalanced(i) => i.next(),
            Order::RoomFirst(i) => i.next(),
        }
    }
}

/// nginx's `proxy_redirect default`: a `Location` that begins with the upstream's URL
/// (its path included, or `/` when it has none) begins with the route's prefix (or `/`)
/// instead. The result is a path the client resolves against the URL it asked for, so
/// scheme, host and port stay the client's.
struct LocationRewrite {
    /// `scheme://authority` (lower case) followed by the upstream's path, or `/`.
    from: Box<str>,
    /// How much of `from` compares without regard to case.
    origin_len: usize,
    to: Box<str>,
}

impl LocationRewrite {
    fn new(up: &UpstreamUrl, prefix: &str) -> LocationRewrite {
        let origin = format!(
            "{}://{}",
            up.scheme.as_str(),
            up.authority.to_ascii_lowercase()
        );
        let (path, to) = match &up.path {
            Some(base) => (base.as_str(), prefix),
            None => ("/", "/"),
        };
        LocationRewrite {
            origin_len: origin.len(),
            from: (origin + path).into(),
            to: to.into(),
        }
    }

    /// Out of line: redirects are rare, and the request's future stays small.
    #[inline(never)]
    fn apply(&self, headers: &mut HeaderMap) {
        let Some(rewritten) = headers
            .get(LOCATION)
            .and_then(|v| self.rewrite(v.as_bytes()))
        else {
            return;
        };
        if let Ok(v) = HeaderValue::from_bytes(&rewritten) {
            headers.insert(LOCATION, v);
        }
    }

    fn rewrite(&self, location: &[u8]) -> Option<Vec<u8>> {
        let from = self.from.as_bytes();
        let (origin, path) = from.split_at(self.origin_len);
        let rest = location.get(from.len()..)?;
        let matches = location[..origin.len()].eq_ignore_ascii_case(origin)
            && &location[origin.len()..from.len()] == path;
        matches.then(|| [self.to.as_bytes(), rest].concat())
    }
}

impl Route {
    pub fn new(
        cfg: &RouteConfig,
        timeouts: &Timeouts,
        upstream: &Arc<Upstream>,
        metrics: Option<&Metrics>,
    ) -> Result<Route, String> {
        let any_https = cfg.upstream.0.iter().any(|u| u.scheme == Scheme::Https);
        let tls = if any_https {
            if cfg.tls_insecure {
                tracing::warn!(
                    route = %cfg.label(),
                    "tls_insecure = true: upstream certificates are not checked"
                );
            }
            Some(TlsSettings::new(
                cfg.version,
                cfg.tls_ca.as_deref(),
                cfg.tls_server_name.as_deref(),
                cfg.tls_insecure,
            )?)
        } else {
            None
        };
        let profile = upstream.profile(ProfileSettings {
            version: cfg.version,
            tls,
            // Reverse routes go where the operator said, loopback included.
            deny: Vec::new().into(),
            via: cfg
                .via
                .as_ref()
                .map(|url| Via::new(url).map(Arc::new))
                .transpose()?,
            connect_timeout: timeouts.connect,
            response_timeout: cfg.upstream_response.unwrap_or(timeouts.upstream_response),
        });
        let upgrade_profile = upstream.upgrade_profile(&profile);
        let upstreams = named_upstreams(cfg);
        let targets = upstreams
            .iter()
            .map(|u| {
                let a = Authority::from_maybe_shared(bytes::Bytes::from(u.authority.clone()))
                    .map_err(|_| format!("invalid upstream host {}", u.authority))?;
                Ok(match &u.unix {
                    Some(path) => Target::unix(profile.clone(), a, Arc::from(path.as_path())),
                    None => Target::new(profile.clone(), u.scheme, a),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let upgrade_targets = targets
            .iter()
            .map(|t| t.with_profile(upgrade_profile.clone()))
            .collect();
        let names: Vec<Arc<str>> = upstreams
            .iter()
            .map(|u| Arc::from(u.to_string().as_str()))
            .collect();
        let host_values = upstreams
            .iter()
            .map(|u| {
                HeaderValue::from_str(&u.authority)
                    .map_err(|_| format!("invalid upstream host {}", u.authority))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let label = Label::from(cfg.label().as_str());
        let balancer = Arc::new(Balancer::new(cfg.upstream.0.len()));
        let probes = cfg.health_check.as_ref().and_then(|path| {
            let probes = (0..names.len())
                .map(|index| health::Probe {
                    index,
                    name: names[index].clone(),
                    target: targets[index].clone(),
                    host: host_values[index].clone(),
                })
                .collect();
            health::start(
                &label,
                &path.0,
                cfg.health_interval,
                probes,
                upstream,
                &balancer,
                metrics,
            )
        });
        Ok(Route {
            max_body: 0,
            label,
            names,
            prefix_len: cfg.path.0.len(),
            upstreams: upstreams.clone(),
            host_values,
            targets,
            upgrade_targets,
            balancer,
            preserve_host: cfg.preserve_host,
            locations: if cfg.rewrite_location {
                upstreams
                    .iter()
                    .map(|u| LocationRewrite::new(u, &cfg.path.0))
                    .collect()
            } else {
                Vec::new()
            },
            _probes: probes,
        })
    }

    /// The order in which to try the route's upstreams: the balancer's, except that
    /// with `max_conns_per_host` set, upstreams at their cap come after those with
    /// room, so a request waits for a connection only when every upstream is full
    /// (nginx's `max_conns` skips a full server the same way).
    fn order<'r>(
        &'r self,
        upstream: &Upstream,
        targets: &[Target],
    ) -> Order<impl Iterator<Item = usize> + 'r> {
        let order = self.balancer.order();
        if self.upstreams.len() < 2 || !upstream.caps_conns() {
            return Order::AsBalanced(order);
        }
        let (room, full): (Vec<usize>, Vec<usize>) =
            order.partition(|&i| upstream.has_room(&targets[i]));
        Order::RoomFirst(room.into_iter().chain(full))
    }

    /// The path and query to send to `up` for a request to `uri` (nginx's rule).
    fn upstream_path(&self, up: &UpstreamUrl, uri: &Uri) -> Result<PathAndQuery, Refusal> {
        let Some(base) = &up.path else {
            return Ok(uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")));
        };
        let rest = uri.path().get(self.prefix_len..).unwrap_or("");
        let mut p =
            String::with_capacity(base.len() + rest.len() + 1 + uri.query().map_or(0, str::len));
        p.push_str(base);
        p.push_str(rest);
        if let Some(q) = uri.query() {
            p.push('?');
            p.push_str(q);
        }
        PathAndQuery::try_from(p).map_err(|_| Refusal::BadRequest("unusable path".into()))
    }
}

impl Proxy {
    /// Sends an origin-form request to its route's upstreams.
    // Not an `async fn`: an `async fn` keeps each argument and its moved-in copy in its
    // future; this future is moved per request (bench/proxy-instructions counts it).
    #[allow(clippy::manual_async_fn)]
    pub(super) fn reverse<'a>(
        &'a self,
        req: Request<RequestBody>,
        conn: ConnInfo,
        meta: &'a mut Meta,
    ) -> impl Future<Output = Result<Response<Body>, Refusal>> + Send + 'a {
        // An `async move` block: the request lives in the future once (see `handle`).
        async move {
            meta.kind = Kind::Reverse;
            let (mut parts, body) = req.into_parts();
            if has_dot_segment(parts.uri.path()) {
                parts.uri = without_dot_segments(&parts.uri)?;
            }
            let host_value = request_host(&parts.uri, &parts.headers);
            let host = host_value
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .map(strip_port);
            let route = self
                .routes
                .find(host, parts.uri.path())
                .ok_or(Refusal::NoRoute)?;
            meta.route = route.label.clone();

            let switch = upgrade::asked(&parts);
            let upgrading = switch.is_some();
            let trailers = headers::strip_hop_by_hop(&mut parts.headers);
            headers::from_http2(&mut parts, trailers);
            if let Some(switch) = switch {
                upgrade::restore(&mut parts, switch);
            }
            let h = &mut parts.headers;
            headers::append_forwarded_for(h, conn.peer);
            h.insert(
                &X_FORWARDED_PROTO,
                HeaderValue::from_static(if conn.tls { "https" } else { "http" }),
            );
            if let Some(v) = &host_value {
                h.insert(&X_FORWARDED_HOST, v.clone());
            }
            if route.preserve_host
                && let Some(v) = host_value
            {
                h.insert(HOST, v);
            }

            // The next upstream takes a request that reached none, whatever its body (it
            // comes back whole). A request without a body, or with one read whole, is kept
            // here for the next upstream, which then also takes an idempotent one that a
            // fresh connection dropped unanswered or that got no response head in time.
            let empty = http_body::Body::is_end_stream(&body);
            let replayable = empty || matches!(body, RequestBody::Full(_));
            let idempotent = retry::is_idempotent(&parts.method);
            let mut body = if empty { RequestBody::Empty } else { body };
            let progress = super::limit_body(&mut body, route.max_body, self.body_read)?;
            let progress = progress.as_deref();
            let mut last_err = None;
            let candidates = route.upstreams.len();
            let targets = if upgrading {
                &route.upgrade_targets
            } else {
                &route.targets
            };
            for (attempt, i) in route.order(&self.upstream, targets).enumerate() {
                // The headers are copied only while another upstream may still need them.
                let last = attempt + 1 == candidates;
                let up = &route.upstreams[i];
                let path = route.upstream_path(up, &parts.uri)?;
                let mut req = Request::new(match &body {
                    RequestBody::Full(b) if !last => RequestBody::Full(b.clone()),
                    _ => std::mem::take(&mut body),
                });
                *req.method_mut() = parts.method.clone();
                *req.uri_mut() = Uri::from(path);
                *req.headers_mut() = if replayable && !last {
                    parts.headers.clone()
                } else {
                    std::mem::take(&mut parts.headers)
                };
                if !route.preserve_host {
                    req.headers_mut().insert(HOST, route.host_values[i].clone());
                }
                meta.upstream = Some(route.names[i].clone());
                match self.upstream.try_send(req, &targets[i]).await {
                    Ok(mut resp) => {
                        super::parent_refused(&resp, &targets[i].profile)?;
                        route.balancer.mark_ok(i);
                        let status = resp.status();
                        if (status.is_redirection() || status == StatusCode::CREATED)
                            && let Some(rewrite) = route.locations.get(i)
                        {
                            rewrite.apply(resp.headers_mut());
                        }
                        if upgrading {
                            return self.answer_upgrade(
                                resp,
                                &mut parts.extensions,
                                parts.version,
                                meta,
                            );
                        }
                        return Ok(relay_response(resp));
                    }
                    Err(f) => {
                        // The upstream's own failures (no connection, a fresh one dropped,
                        // no response head in time) leave it out of the rotation for a
                        // while, as nginx counts them against `max_fails`.
                        let decision = retry::failover(&f, idempotent, replayable);
                        if decision != Failover::Answer {
                            route.balancer.mark_failed(i);
                        }
                        if decision != Failover::Next || last {
                            return Err(super::body_refusal(f.error.into(), progress));
                        }
                        tracing::warn!(route = %route.label.0, upstream = %up, "upstream failed, trying the next: {}", f.error);
                        self.upstream.count_retry();
                        last_err = Some(f.error);
                        match f.request {
                            Some(back) if !replayable => {
                                let (back, back_body) = back.into_parts();
                                parts.headers = back.headers;
                                body = back_body;
                            }
                            Some(_) => {}
                            None if !replayable => break,
                            None => {}
                        }
                    }
                }
            }
            Err(last_err.map(Refusal::from).unwrap_or(Refusal::NoRoute))
        }
    }
}

/// A route's upstream URLs, each with the authority its requests name: a Unix socket's
/// upstream takes the route's host when that is one name (not `*.suffix`), else keeps
/// `localhost`.
fn named_upstreams(cfg: &RouteConfig) -> Vec<UpstreamUrl> {
    let mut upstreams = cfg.upstream.0.clone();
    if let Some(HostPattern::Exact(host)) = &cfg.host {
        for u in upstreams.iter_mut().filter(|u| u.unix.is_some()) {
            u.host.clone_from(host);
            u.authority.clone_from(host);
        }
    }
    upstreams
}

/// The host the client asked for: the URI's authority (HTTP/2, absolute form) or `Host`.
fn request_host(uri: &Uri, headers: &HeaderMap) -> Option<HeaderValue> {
    match uri.authority() {
        Some(a) => HeaderValue::from_str(a.as_str().rsplit('@').next().unwrap_or("")).ok(),
        None => headers.get(HOST).cloned(),
    }
}

/// True when a path may hold a `.` or `..` segment, plain or percent-encoded (`%2e`):
/// the quick test every request takes; most paths have neither `/.` nor `%2e`.
fn has_dot_segment(path: &str) -> bool {
    let b = path.as_bytes();
    (1..b.len()).any(|i| match b[i] {
        b'.' => b[i - 1] == b'/',
        b'2' => b[i - 1] == b'%' && matches!(b.get(i + 1), Some(b'e' | b'E')),
        _ => false,
    })
}

/// How many dots a path segment is made of, each `.` or `%2e`; `None` when it holds
/// anything else.
fn dots(seg: &str) -> Option<usize> {
    let mut rest = seg.as_bytes();
    let mut n = 0;
    while !rest.is_empty() {
        rest = match rest {
            [b'.', more @ ..] => more,
            [b'%', b'2', b'e' | b'E', more @ ..] => more,
            _ => return None,
        };
        n += 1;
    }
    Some(n)
}

/// The URI with its path's dot segments resolved (RFC 3986 §5.2.4), `%2e` counting as
/// `.`, so that a route is chosen, and the upstream asked, by the path the upstream
/// will resolve: `/api/../admin` is `/admin`, not a way past the `/api/` route to the
/// upstream's `/admin`. A path that climbs above the root is refused, as nginx does.
#[cold]
fn without_dot_segments(uri: &Uri) -> Result<Uri, Refusal> {
    let path = uri.path();
    let mut out: Vec<&str> = Vec::new();
    let mut segments = path.split('/').skip(1).peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        match dots(seg) {
            Some(1) => {}
            Some(2) if out.pop().is_none() => {
                return Err(Refusal::BadRequest("the path climbs above the root".into()));
            }
            Some(2) => {}
            _ => {
                out.push(seg);
                continue;
            }
        }
        // `/a/.` and `/a/b/..` are `/a/`: a trailing dot segment leaves its slash.
        if last {
            out.push("");
        }
    }
    let mut p = String::with_capacity(path.len() + uri.query().map_or(0, |q| q.len() + 1));
    for seg in &out {
        p.push('/');
        p.push_str(seg);
    }
    if p.is_empty() {
        p.push('/');
    }
    if let Some(q) = uri.query() {
        p.push('?');
        p.push_str(q);
    }
    let mut parts = uri.clone().into_parts();
    parts.path_and_query =
        Some(PathAndQuery::try_from(p).map_err(|_| Refusal::BadRequest("unusable path".into()))?);
    Uri::from_parts(parts).map_err(|_| Refusal::BadRequest("unusable path".into()))
}

/// `example.com:8080` → `example.com`; `[::1]:80` → `::1`.
fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_stripped_from_hosts() {
        assert_eq!(strip_port("example.com:8080"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[::1]:80"), "::1");
    }

    fn resolved(path: &str) -> Result<String, ()> {
        let uri: Uri = path.parse().unwrap();
        if !has_dot_segment(uri.path()) {
            return Ok(uri.to_string());
        }
        without_dot_segments(&uri)
            .map(|u| u.to_string())
            .map_err(|_| ())
    }

    #[test]
    fn dot_segments_are_resolved_before_routing() {
        assert_eq!(resolved("/api/../admin").unwrap(), "/admin");
        assert_eq!(resolved("/api/%2e%2e/admin").unwrap(), "/admin");
        assert_eq!(
            resolved("/api/%2E./admin?x=/../y").unwrap(),
            "/admin?x=/../y"
        );
        assert_eq!(resolved("/api/./v/./x").unwrap(), "/api/v/x");
        assert_eq!(resolved("/api/v/..").unwrap(), "/api/");
        assert_eq!(resolved("/api/v/.").unwrap(), "/api/v/");
        assert_eq!(resolved("/a/b/../../c").unwrap(), "/c");
        assert_eq!(resolved("/..").map_err(|_| "refused"), Err("refused"));
        assert_eq!(
            resolved("/a/../../b").map_err(|_| "refused"),
            Err("refused")
        );
        // Names that only look like dot segments stay.
        assert_eq!(resolved("/.well-known/x").unwrap(), "/.well-known/x");
        assert_eq!(resolved("/a/...").unwrap(), "/a/...");
        assert_eq!(resolved("/a/..b/%2e%2ex").unwrap(), "/a/..b/%2e%2ex");
        assert_eq!(resolved("/a%20b/c").unwrap(), "/a%20b/c");
        assert_eq!(resolved("/static/app.js").unwrap(), "/static/app.js");
    }

    fn rewrite(upstream: &str, prefix: &str, location: &str) -> Option<String> {
        let up: UpstreamUrl = upstream.parse().unwrap();
        LocationRewrite::new(&up, prefix)
            .rewrite(location.as_bytes())
            .map(|v| String::from_utf8(v).unwrap())
    }

    #[test]
    fn a_location_at_the_upstream_becomes_one_at_the_route() {
        let with_path = |l| rewrite("http://b:8080/v1/", "/api/", l);
        assert_eq!(
            with_path("http://b:8080/v1/login?next=/x").as_deref(),
            Some("/api/login?next=/x")
        );
        // Scheme and host compare without case, the path with it.
        assert_eq!(with_path("HTTP://B:8080/v1/").as_deref(), Some("/api/"));
        assert_eq!(with_path("http://b:8080/V1/x"), None);
        assert_eq!(with_path("http://b:8080/v2/x"), None);
        assert_eq!(with_path("http://b/v1/x"), None);
        assert_eq!(with_path("https://b:8080/v1/x"), None);
        assert_eq!(with_path("/v1/x"), None);
        assert_eq!(with_path("http://b:80"), None);

        let without = |l| rewrite("https://b", "/api/", l);
        assert_eq!(without("https://b/api/x").as_deref(), Some("/api/x"));
        assert_eq!(without("https://b/").as_deref(), Some("/"));
        assert_eq!(without("https://bb/x"), None);
        assert_eq!(without("https://b.evil/x"), None);
    }
}
