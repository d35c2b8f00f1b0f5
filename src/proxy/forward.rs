//! Forward proxying: absolute-form requests go upstream in origin form.
//!
//! The target's authority becomes `Host` (RFC 9112 §3.2.2); hop-by-hop fields and the
//! proxy credentials are removed; nothing is added that reveals a proxy. With `hide`,
//! a request without valid credentials is answered as a plain web server would.

use std::sync::Arc;

use http::header::{HOST, HeaderValue};
use http::{Request, Response};

use super::Body;
use super::auth::{Auth, Presented, Verdict};
use super::{ConnInfo, Meta, Proxy, Refusal, headers, relay_response, upgrade};
use crate::body::RequestBody;
use crate::config::{self, AddrRule, DomainRules, Scheme, Version};
use crate::metrics::{Kind, Label, Metrics};
use crate::upstream::via::Via;
use crate::upstream::{Profile, ProfileSettings, Target, TlsSettings, Upstream};

/// The `[forward]` settings, resolved.
pub struct ForwardPolicy {
    pub auth: Option<Arc<Auth>>,
    pub hide: bool,
    pub connect_ports: Vec<u16>,
    pub deny: Arc<[AddrRule]>,
    /// Client addresses that may use the forward proxy; empty = any.
    pub allow_clients: Vec<AddrRule>,
    pub allow_domains: DomainRules,
    pub deny_domains: DomainRules,
    /// Connections for forwarded requests; every target shares this one profile.
    pub profile: Arc<Profile>,
    /// The same over HTTP/1.1 only, for requests that switch protocols.
    pub upgrade_profile: Arc<Profile>,
    /// `[forward] max_body`, else `[limits]`'s; 0 = none.
    pub max_body: u64,
    /// `[forward] parent`: the profiles of connections through it, and the names
    /// that bypass it.
    pub parent: Option<Parent>,
}

/// Connections through `[forward] parent`.
pub struct Parent {
    pub profile: Arc<Profile>,
    pub upgrade_profile: Arc<Profile>,
    pub direct: DomainRules,
}

impl ForwardPolicy {
    /// The profile for requests to `host`: through the parent unless `direct_domains`
    /// names it.
    pub fn profile_for(&self, host: &str, upgrading: bool) -> &Arc<Profile> {
        let (profile, upgrade) = match &self.parent {
            Some(p) if p.direct.find(host).is_none() => (&p.profile, &p.upgrade_profile),
            _ => (&self.profile, &self.upgrade_profile),
        };
        if upgrading { upgrade } else { profile }
    }
}

/// What the credentials check decided.
pub enum Access {
    /// Allowed; the user's name when auth is on.
    Granted(Option<Arc<str>>),
    /// Refused with 407.
    Challenge,
    /// Refused, and the proxy must not reveal itself.
    Hidden,
    /// Not checked: every password-hashing slot stayed busy (503).
    Busy,
}

impl ForwardPolicy {
    pub fn new(
        cfg: &config::Forward,
        timeouts: &config::Timeouts,
        upstream: &Upstream,
        metrics: &Metrics,
    ) -> Result<Self, String> {
        let deny: Arc<[AddrRule]> = cfg.deny_targets.clone().into();
        let tls = TlsSettings::new(Version::Auto, None, None, false)?;
        let profile = upstream.profile(ProfileSettings {
            version: Version::Auto,
            tls: Some(tls.clone()),
            deny: deny.clone(),
            via: None,
            connect_timeout: timeouts.connect,
            response_timeout: timeouts.upstream_response,
        });
        let parent = match &cfg.parent {
            None => None,
            Some(url) => {
                let profile = upstream.profile(ProfileSettings {
                    version: Version::Auto,
                    tls: Some(tls),
                    deny: deny.clone(),
                    via: Some(Arc::new(Via::new(url)?)),
                    connect_timeout: timeouts.connect,
                    response_timeout: timeouts.upstream_response,
                });
                Some(Parent {
                    upgrade_profile: upstream.upgrade_profile(&profile),
                    profile,
                    direct: cfg.direct_domains.clone(),
                })
            }
        };
        Ok(ForwardPolicy {
            max_body: 0,
            upgrade_profile: upstream.upgrade_profile(&profile),
            auth: Auth::new(cfg, metrics),
            hide: cfg.hide,
            connect_ports: cfg.connect_ports.clone(),
            allow_clients: cfg.allow_clients.clone(),
            allow_domains: cfg.allow_domains.clone(),
            deny_domains: cfg.deny_domains.clone(),
            deny,
            profile,
            parent,
        })
    }

    /// Refuses a client outside `allow_clients`, before any credentials are asked for.
    /// A client on a Unix socket (no address) got in through the socket file's
    /// permissions, which are its allow list.
    pub fn admit_client(&self, client: Option<std::net::IpAddr>) -> Result<(), Refusal> {
        let Some(client) = client else {
            return Ok(());
        };
        if self.allow_clients.is_empty()
            || self.allow_clients.iter().any(|r| r.covers_client(client))
        {
            return Ok(());
        }
        Err(Refusal::Denied(
            "this client's address is not in allow_clients".into(),
        ))
    }

    /// Refuses a target host by name, before DNS: `deny_domains` first, then
    /// `allow_domains` (an address is no name, so an allow list refuses it). A host
    /// that ends in a number but spells no address is a bad request.
    pub fn admit_host(&self, host: &str) -> Result<(), Refusal> {
        let literal = config::host_ip(host)
            .map_err(|_| Refusal::BadRequest(format!("{host:?} is not a valid address")))?;
        if literal.is_none()
            && let Some(rule) = self.deny_domains.find(host)
        {
            return Err(Refusal::Denied(format!(
                "{host} is in deny_domains ({rule:?})"
            )));
        }
        if self.allow_domains.is_empty() {
            return Ok(());
        }
        match literal {
            None if self.allow_domains.find(host).is_some() => Ok(()),
            _ => Err(Refusal::Denied(format!("{host} is not in allow_domains"))),
        }
    }

    /// Checks the request's proxy credentials. A credential seen to be good before
    /// is answered at once; only others wait for a check (`auth`'s module doc).
    pub async fn check(&self, req_headers: &http::HeaderMap) -> Access {
        let Some(auth) = &self.auth else {
            return Access::Granted(None);
        };
        let verdict = match auth.presented(req_headers) {
            Presented::Remembered(user) => return Access::Granted(Some(user)),
            Presented::Nothing => Verdict::Refused,
            // Boxed: the check's state stays out of the future of every request that
            // does not need it.
            Presented::Unchecked(credential) => Box::pin(auth.check(credential)).await,
        };
        match verdict {
            Verdict::User(user) => Access::Granted(Some(user)),
            Verdict::Refused | Verdict::Busy if self.hide => Access::Hidden,
            Verdict::Refused => Access::Challenge,
            Verdict::Busy => Access::Busy,
        }
    }
}

impl Proxy {
    /// Forwards an absolute-form request to the server it names.
    pub(super) async fn forward(
        &self,
        req: Request<RequestBody>,
        conn: ConnInfo,
        meta: &mut Meta,
    ) -> Result<Response<Body>, Refusal> {
        let policy = self
            .forward
            .as_ref()
            .expect("forward requests need [forward]");
        meta.kind = Kind::Forward;
        if let Err(refusal) = policy.admit_client(conn.peer.ip()) {
            if policy.hide {
                return self.reverse(req, conn, meta).await;
            }
            return Err(refusal);
        }
        match policy.check(req.headers()).await {
            Access::Granted(user) => {
                if let Some(user) = user {
                    meta.user = Label(user);
                }
            }
            Access::Challenge => return Err(Refusal::AuthRequired),
            Access::Busy => return Err(Refusal::AuthBusy),
            // Answer as a web server that was asked for one of its own paths.
            Access::Hidden => return self.reverse(req, conn, meta).await,
        }
        let scheme = match req.uri().scheme_str() {
            Some(s) if s.eq_ignore_ascii_case("http") => Scheme::Http,
            Some(s) if s.eq_ignore_ascii_case("https") => Scheme::Https,
            _ => return Err(Refusal::BadRequest("scheme is not http or https".into())),
        };
        let authority = target_authority(req.uri(), scheme)
            .ok_or_else(|| Refusal::BadRequest("absolute URI without a host".into()))?;
        policy.admit_host(req.uri().host().unwrap_or_default())?;
        let host = HeaderValue::from_str(&authority)
            .map_err(|_| Refusal::BadRequest("invalid host".into()))?;

        // Old clients say `Proxy-Connection` to a proxy where they mean `Connection`
        // (RFC 9112 appendix C.2.2): honour a close there for the client connection.
        let client_closes = !req.headers().contains_key(http::header::CONNECTION)
            && req
                .headers()
                .get(&headers::PROXY_CONNECTION)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("close"));
        let (mut parts, mut body) = req.into_parts();
        let progress = super::limit_body(&mut body, policy.max_body, self.body_read)?;
        let switch = upgrade::asked(&parts);
        let trailers = headers::strip_hop_by_hop(&mut parts.headers);
        headers::from_http2(&mut parts, trailers);
        parts.headers.insert(HOST, host);
        // hyper's handle on the client connection stays here: the request moves on.
        let upgrading = switch.is_some();
        let version = parts.version;
        let mut client = http::Extensions::new();
        if let Some(switch) = switch {
            upgrade::restore(&mut parts, switch);
            client = std::mem::take(&mut parts.extensions);
        }
        let req = Request::from_parts(parts, body);

        meta.upstream = Some(Arc::from(authority.as_str()));
        let authority = http::uri::Authority::try_from(authority)
            .map_err(|_| Refusal::BadRequest("invalid host".into()))?;
        let host = req.uri().host().unwrap_or_default();
        let profile = policy.profile_for(host, upgrading);
        let target = Target::new(profile.clone(), scheme, authority);
        let resp = self
            .upstream
            .send(req, &target)
            .await
            .map_err(|e| super::body_refusal(e.into(), progress.as_deref()))?;
        super::parent_refused(&resp, profile)?;
        let mut resp = if upgrading {
            self.answer_upgrade(resp, &mut client, version, meta)?
        } else {
            relay_response(resp)
        };
        if client_closes {
            resp.headers_mut()
                .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        Ok(resp)
    }
}

/// `host[:port]` of an absolute URI, without user info, the port only when not the
/// scheme's default.
fn target_authority(uri: &http::Uri, scheme: Scheme) -> Option<String> {
    let host = uri.host().filter(|h| !h.is_empty())?;
    Some(match uri.port_u16() {
        Some(p) if p != scheme.default_port() => format!("{host}:{p}"),
        _ => host.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_drops_user_info_and_default_ports() {
        let uri: http::Uri = "http://u:p@Example.com:80/x".parse().unwrap();
        assert_eq!(target_authority(&uri, Scheme::Http).unwrap(), "Example.com");
        let uri: http::Uri = "http://[::1]:8080/".parse().unwrap();
        assert_eq!(target_authority(&uri, Scheme::Http).unwrap(), "[::1]:8080");
    }
}
