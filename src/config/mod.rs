//! The configuration: TOML schema, defaults and validation.
//!
//! Everything is turned into typed values here, once: durations, socket addresses, CIDR
//! blocks, upstream URLs, host patterns. Runtime code never parses a string from the
//! config. A bad file is reported with its path, the line and the dotted key of the
//! problem (`strait.toml:7: timeouts.connect: ...`).

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer};

mod dns;
mod load;
mod rules;
mod tls;
mod users;
pub use dns::{Dns, NameServer};
pub use load::ConfigError;
#[cfg(test)]
use load::line_of_key;
pub use rules::{AddrRule, DomainRules, denied_by, host_ip};
pub use tls::{ListenTls, TlsFiles, TlsWritten};
pub use users::{FileUser, PasswordHash};

/// A complete, validated configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// One entry per address bound: a `[[listen]]` whose `addr` is a name resolving
    /// to several addresses becomes one entry for each.
    #[serde(default = "default_listeners", deserialize_with = "de_listeners")]
    pub listen: Vec<Listen>,
    #[serde(default)]
    pub forward: Forward,
    #[serde(default)]
    pub route: Vec<RouteConfig>,
    #[serde(default)]
    pub pool: Pool,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub admin: Option<Admin>,
    #[serde(default)]
    pub log: Log,
    #[serde(default)]
    pub runtime: Runtime,
    #[serde(default)]
    pub dns: Dns,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: default_listeners(),
            forward: Forward::default(),
            route: Vec::new(),
            pool: Pool::default(),
            timeouts: Timeouts::default(),
            limits: Limits::default(),
            admin: None,
            log: Log::default(),
            runtime: Runtime::default(),
            dns: Dns::default(),
        }
    }
}

/// The listener used when neither the config nor the command line names one.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:3128";

fn default_listeners() -> Vec<Listen> {
    vec![Listen {
        addr: ListenAddr::Tcp(
            DEFAULT_LISTEN
                .parse()
                .expect("the default listen address is valid"),
        ),
        tls: None,
    }]
}

/// One `[[listen]]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    pub addr: ListenAddr,
    pub tls: Option<ListenTls>,
}

/// `[[listen]]` as written: `addr` not yet resolved.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenAs {
    addr: ListenAddrs,
    #[serde(default)]
    tls: Option<ListenTls>,
}

fn de_listeners<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Listen>, D::Error> {
    let written = Vec::<ListenAs>::deserialize(d)?;
    Ok(written
        .into_iter()
        .flat_map(|l| {
            let tls = l.tls;
            l.addr.0.into_iter().map(move |addr| Listen {
                addr,
                tls: tls.clone(),
            })
        })
        .collect())
}

/// One address a listener binds: a TCP address, or the path of a Unix socket.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    /// `unix:/path`: an absolute path (`server::listeners` says what becomes of a file
    /// already there).
    Unix(PathBuf),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => a.fmt(f),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// The path of `unix:/path`: absolute, and short enough for a socket address (108 bytes
/// with the closing NUL on Linux).
fn unix_path(s: &str) -> Option<Result<PathBuf, String>> {
    let path = s.strip_prefix("unix:")?;
    Some(if !path.starts_with('/') || path.contains('\0') {
        Err(format!(
            "invalid Unix socket {s:?}: expected an absolute path, like \"unix:/run/strait/proxy.sock\""
        ))
    } else if path.len() > 107 {
        Err(format!(
            "invalid Unix socket {s:?}: the path is {} bytes long; a socket path has at most 107",
            path.len()
        ))
    } else {
        Ok(PathBuf::from(path))
    })
}

/// The addresses a listen address names: `IP:PORT`, `[v6]:PORT`, `:PORT` (every IPv4
/// interface, as nginx's `listen PORT`), `NAME:PORT`, resolved once, at start
/// (every address it resolves to is bound), or `unix:/path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenAddrs(pub Vec<ListenAddr>);

impl std::str::FromStr for ListenAddrs {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "invalid listen address {s:?}: expected IP:PORT, [IPv6]:PORT, :PORT, NAME:PORT or unix:/path"
            )
        };
        if let Some(path) = unix_path(s) {
            return Ok(ListenAddrs(vec![ListenAddr::Unix(path?)]));
        }
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(ListenAddrs(vec![ListenAddr::Tcp(addr)]));
        }
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        if host.is_empty() {
            return Ok(ListenAddrs(vec![ListenAddr::Tcp(SocketAddr::from((
                [0, 0, 0, 0],
                port,
            )))]));
        }
        if host.starts_with('[')
            || !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            return Err(bad());
        }
        let mut addrs: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
            .map_err(|e| format!("cannot resolve listen address {s:?}: {e}"))?
            .collect();
        addrs.sort();
        addrs.dedup();
        if addrs.is_empty() {
            return Err(format!("listen address {s:?} resolves to no address"));
        }
        Ok(ListenAddrs(
            addrs.into_iter().map(ListenAddr::Tcp).collect(),
        ))
    }
}

/// `[forward]`: absolute-form requests and CONNECT.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Forward {
    pub enabled: bool,
    pub users: Vec<User>,
    /// `htpasswd -B` lines; read by [`Config::load`] (and on each reload) into
    /// `file_users`. Set, it turns auth on even when the file names no one.
    pub users_file: Option<PathBuf>,
    #[serde(skip)]
    pub file_users: Vec<FileUser>,
    pub hide: bool,
    pub connect_ports: Vec<u16>,
    /// Target addresses refused after resolution: CIDRs or groups.
    pub deny_targets: Vec<AddrRule>,
    /// Client addresses allowed to use the forward proxy; empty = any.
    pub allow_clients: Vec<AddrRule>,
    /// Says that a forward proxy on a non-loopback address with no users and no
    /// `allow_clients` is meant to be open.
    pub open: bool,
    /// Names the proxy may reach; empty = any.
    pub allow_domains: DomainRules,
    /// Names the proxy refuses, checked before DNS; wins over `allow_domains`.
    pub deny_domains: DomainRules,
    /// Another proxy every forward request goes through, but for `direct_domains`.
    pub parent: Option<ProxyUrl>,
    /// Names that bypass `parent`.
    pub direct_domains: DomainRules,
    /// Request body limit for forward requests; overrides `limits.max_body` when set.
    pub max_body: Option<Size>,
}

impl Default for Forward {
    fn default() -> Self {
        Forward {
            enabled: true,
            users: Vec::new(),
            users_file: None,
            file_users: Vec::new(),
            hide: false,
            connect_ports: Vec::new(),
            deny_targets: rules::DEFAULT_DENY
                .iter()
                .map(|s| s.parse().expect("the default deny_targets are valid"))
                .collect(),
            allow_clients: Vec::new(),
            open: false,
            allow_domains: DomainRules::default(),
            deny_domains: DomainRules::default(),
            parent: None,
            direct_domains: DomainRules::default(),
            max_body: None,
        }
    }
}

/// A proxy user, `name:password`.
#[derive(Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub password: String,
}

impl fmt::Debug for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print a password, not even in debug output.
        write!(f, "User({:?})", self.name)
    }
}

impl std::str::FromStr for User {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some((name, password)) if !name.is_empty() => Ok(User {
                name: name.to_owned(),
                password: password.to_owned(),
            }),
            _ => Err(format!(
                "invalid user {s:?}: expected \"name:password\" with a non-empty name"
            )),
        }
    }
}

/// One `[[route]]` table: which requests it takes and where they go.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    #[serde(default)]
    pub host: Option<HostPattern>,
    #[serde(default = "default_path")]
    pub path: PathPrefix,
    pub upstream: Upstreams,
    #[serde(default)]
    pub version: Version,
    #[serde(default)]
    pub preserve_host: bool,
    /// Rewrite a `Location` that points at the upstream into the route's own path, as
    /// nginx's `proxy_redirect default` does.
    #[serde(default = "yes")]
    pub rewrite_location: bool,
    /// Active health checks: each upstream gets `GET` of this path every
    /// `health_interval`; off when absent.
    #[serde(default)]
    pub health_check: Option<ProbePath>,
    #[serde(default = "default_health_interval", deserialize_with = "de_duration")]
    pub health_interval: Duration,
    /// This route's `timeouts.upstream_response` (an event stream may want longer).
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub upstream_response: Option<Duration>,
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    #[serde(default)]
    pub tls_server_name: Option<String>,
    #[serde(default)]
    pub tls_insecure: bool,
    /// This route's request body limit; overrides `limits.max_body` when set.
    #[serde(default)]
    pub max_body: Option<Size>,
    /// A proxy this route's upstreams are reached through.
    #[serde(default)]
    pub via: Option<ProxyUrl>,
}

impl RouteConfig {
    /// The route as written, used in logs and metric labels: `app.example.com/api/`.
    pub fn label(&self) -> String {
        match &self.host {
            Some(h) => format!("{}{}", h.as_written(), self.path.0),
            None => self.path.0.clone(),
        }
    }
}

fn default_health_interval() -> Duration {
    Duration::from_secs(5)
}

fn yes() -> bool {
    true
}

fn default_path() -> PathPrefix {
    PathPrefix("/".to_owned())
}

/// A host a route answers for: exact (`app.example.com`) or a suffix (`*.example.com`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    Exact(String),
    /// Stored with its leading dot: `*.example.com` is `.example.com`.
    Suffix(String),
}

impl HostPattern {
    pub fn as_written(&self) -> String {
        match self {
            HostPattern::Exact(h) => h.clone(),
            HostPattern::Suffix(s) => format!("*{s}"),
        }
    }
}

impl std::str::FromStr for HostPattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let lower = s.to_ascii_lowercase();
        let (wild, name) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, lower.as_str()),
        };
        let valid = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
        if !valid {
            return Err(format!(
                "invalid host {s:?}: expected a name like \"app.example.com\" or \"*.example.com\""
            ));
        }
        Ok(if wild {
            HostPattern::Suffix(format!(".{name}"))
        } else {
            HostPattern::Exact(name.to_owned())
        })
    }
}

/// A path prefix; always starts with `/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPrefix(pub String);

impl std::str::FromStr for PathPrefix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if !s.starts_with('/') || s.bytes().any(|b| b <= b' ' || b == b'?' || b == b'#') {
            return Err(format!(
                "invalid path {s:?}: expected a prefix starting with \"/\", like \"/api/\""
            ));
        }
        Ok(PathPrefix(s.to_owned()))
    }
}

/// The path (and query) a health check asks for: `/healthz`, `/status?full=1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbePath(pub String);

impl std::str::FromStr for ProbePath {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if !s.starts_with('/')
            || s.bytes().any(|b| b <= b' ' || b == b'#' || b == 0x7f)
            || s.parse::<http::uri::PathAndQuery>().is_err()
        {
            return Err(format!(
                "invalid health check path {s:?}: expected a path starting with \"/\", like \"/healthz\""
            ));
        }
        Ok(ProbePath(s.to_owned()))
    }
}

/// The upstream URLs of a route: one string or a list.
#[derive(Debug, Clone)]
pub struct Upstreams(pub Vec<UpstreamUrl>);

/// `http` or `https`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
}

/// Another proxy to go through: `http://[user:pass@]host:port` or `https://...`.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
    /// `host:port`, as log lines name the hop.
    pub authority: String,
    /// Basic credentials for the proxy, percent-decoded.
    pub user: Option<(String, String)>,
}

impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The password never reaches a log or an error.
        write!(f, "ProxyUrl({}://{})", self.scheme.as_str(), self.authority)
    }
}

impl std::str::FromStr for ProxyUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!("invalid proxy URL: {why} (expected like \"http://user:pass@proxy.corp:3128\")")
        };
        let (scheme, rest) = s
            .split_once("://")
            .ok_or_else(|| bad("the scheme must be http or https"))?;
        let (user, hostport) = match rest.rsplit_once('@') {
            Some((info, hostport)) => {
                let (name, pass) = info.split_once(':').unwrap_or((info, ""));
                let decode = |t: &str| {
                    percent_decode(t).ok_or_else(|| bad("the user info has a bad %-escape"))
                };
                (Some((decode(name)?, decode(pass)?)), hostport)
            }
            None => (None, rest),
        };
        let hostport = hostport.strip_suffix('/').unwrap_or(hostport);
        let url: UpstreamUrl = format!("{scheme}://{hostport}")
            .parse()
            .map_err(|_| bad("the scheme, host or port is malformed"))?;
        if url.path.is_some() {
            return Err(bad("a path is not allowed"));
        }
        let authority = if url.host.contains(':') {
            format!("[{}]:{}", url.host, url.port)
        } else {
            format!("{}:{}", url.host, url.port)
        };
        Ok(ProxyUrl {
            scheme: url.scheme,
            host: url.host,
            port: url.port,
            authority,
            user,
        })
    }
}

/// `%XX` escapes decoded; `None` for a bad escape or bytes that are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex = [bytes.next()?, bytes.next()?];
            out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}

/// One upstream URL, split once at load time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub scheme: Scheme,
    /// Host without brackets: `10.0.0.2`, `::1`, `backend.internal`.
    pub host: String,
    pub port: u16,
    /// `host[:port]` as it goes into `Host`: the port only when not the scheme's default.
    pub authority: String,
    /// `Some` when the URL has a path: it replaces the route's matched prefix (nginx's
    /// proxy_pass rule). `None`: the request's URI passes unchanged.
    pub path: Option<String>,
    /// `unix:/path`: HTTP over this Unix socket. `host` and `authority` are then
    /// `localhost` (the route says what `Host` carries), `scheme` is http.
    pub unix: Option<PathBuf>,
}

impl std::str::FromStr for UpstreamUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!(
                "invalid upstream {s:?}: {why} (expected like \"http://127.0.0.1:8080\", \"https://backend:8443/v1/\" or \"unix:/run/app.sock\")"
            )
        };
        if let Some(path) = unix_path(s) {
            return Ok(UpstreamUrl {
                scheme: Scheme::Http,
                host: "localhost".to_owned(),
                port: Scheme::Http.default_port(),
                authority: "localhost".to_owned(),
                path: None,
                unix: Some(path?),
            });
        }
        let (scheme, rest) = if let Some(rest) = s.strip_prefix("http://") {
            (Scheme::Http, rest)
        } else if let Some(rest) = s.strip_prefix("https://") {
            (Scheme::Https, rest)
        } else {
            return Err(bad("the scheme must be http or https"));
        };
        let (authority, path) = match rest.find(['/', '?', '#']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], Some(&rest[i..])),
            Some(_) => return Err(bad("a query or fragment is not allowed")),
            None => (rest, None),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(bad("a host is required and user info is not allowed"));
        }
        let parsed: http::uri::Authority = authority
            .parse()
            .map_err(|_| bad("the host or port is malformed"))?;
        let host = parsed.host().trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("a host is required"));
        }
        let port = parsed.port_u16().unwrap_or(scheme.default_port());
        let authority = if port == scheme.default_port() {
            parsed.host().to_ascii_lowercase()
        } else {
            format!("{}:{port}", parsed.host().to_ascii_lowercase())
        };
        if let Some(p) = path
            && p.bytes().any(|b| b <= b' ' || b == b'?' || b == b'#')
        {
            return Err(bad("the path has a character that is not allowed"));
        }
        Ok(UpstreamUrl {
            scheme,
            host: host.to_ascii_lowercase(),
            port,
            authority,
            path: path.map(str::to_owned),
            unix: None,
        })
    }
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(p) = &self.unix {
            return write!(f, "unix:{}", p.display());
        }
        write!(f, "{}://{}", self.scheme.as_str(), self.authority)?;
        if let Some(p) = &self.path {
            f.write_str(p)?;
        }
        Ok(())
    }
}

/// Which HTTP version to speak to a route's upstreams.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Version {
    H1,
    H2,
    /// ALPN for https (h2 preferred), HTTP/1.1 for http.
    #[default]
    Auto,
}

/// `[pool]`: upstream connection reuse.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Pool {
    #[serde(deserialize_with = "de_duration")]
    pub idle_timeout: Duration,
    pub max_idle_per_host: usize,
    pub max_idle: usize,
    pub max_conns_per_host: usize,
    #[serde(deserialize_with = "de_duration")]
    pub wait_timeout: Duration,
}

impl Default for Pool {
    fn default() -> Self {
        Pool {
            idle_timeout: Duration::from_secs(90),
            max_idle_per_host: 32,
            max_idle: 1024,
            max_conns_per_host: 0,
            wait_timeout: Duration::from_secs(5),
        }
    }
}

/// `[timeouts]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    #[serde(deserialize_with = "de_duration")]
    pub connect: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub header_read: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub upstream_response: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub idle: Duration,
    /// A client connection with no request in flight (HTTP/1.1 and HTTP/2).
    #[serde(deserialize_with = "de_duration")]
    pub keepalive: Duration,
    /// Between two reads of a client's request body.
    #[serde(deserialize_with = "de_duration")]
    pub body_read: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub shutdown_grace: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(5),
            header_read: Duration::from_secs(15),
            upstream_response: Duration::from_secs(60),
            idle: Duration::from_secs(600),
            keepalive: Duration::from_secs(75),
            body_read: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// `[limits]`: what one client, or all of them, may hold.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Client connections per process, across listeners; at the cap accepting pauses.
    pub max_connections: usize,
    /// The listen backlog (capped by the kernel's `somaxconn`).
    pub backlog: u32,
    /// Request body limit; 0 = none.
    pub max_body: Size,
    pub h2_max_concurrent_streams: u32,
    /// Requests on one HTTP/2 connection before it is asked to go (GOAWAY).
    pub h2_max_requests_per_connection: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            backlog: 4096,
            max_body: Size(0),
            h2_max_concurrent_streams: 128,
            h2_max_requests_per_connection: 1000,
        }
    }
}

impl Limits {
    /// The body limit for a route or the forward proxy that may override it (0 = none).
    pub fn max_body(&self, own: Option<Size>) -> u64 {
        own.unwrap_or(self.max_body).0
    }
}

/// A size in bytes: an integer, or a string with a `KiB`, `MiB` or `GiB` suffix.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Size(pub u64);

impl std::str::FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let (digits, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
            Some(i) => (&t[..i], t[i..].trim_start()),
            None => (t, ""),
        };
        let shift = match unit {
            "" | "B" => 0,
            "KiB" => 10,
            "MiB" => 20,
            "GiB" => 30,
            _ => u32::MAX,
        };
        digits
            .parse::<u64>()
            .ok()
            .filter(|_| shift != u32::MAX)
            .and_then(|n| n.checked_mul(1u64 << shift.min(63)))
            .map(Size)
            .ok_or_else(|| {
                format!(
                    "invalid size {s:?}: expected a number of bytes, or one with a KiB, MiB or GiB suffix, like \"10MiB\""
                )
            })
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum IntOrStr {
            Int(i64),
            Str(String),
        }
        match IntOrStr::deserialize(d)
            .map_err(|_| de::Error::custom("expected a size: bytes, or a string like \"10MiB\""))?
        {
            IntOrStr::Int(n) => u64::try_from(n)
                .map(Size)
                .map_err(|_| de::Error::custom("a size cannot be negative")),
            IntOrStr::Str(s) => s.parse().map_err(de::Error::custom),
        }
    }
}

/// `[admin]`: the metrics and health listener.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    pub addr: SocketAddr,
}

/// `[log]`: the access log.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    pub access: AccessLog,
    pub format: LogFormat,
}

impl Default for Log {
    fn default() -> Self {
        Log {
            access: AccessLog::Stdout,
            format: LogFormat::Json,
        }
    }
}

/// Where access log lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLog {
    Stdout,
    Off,
    File(PathBuf),
}

/// How an access log line is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Combined,
}

/// `[runtime]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Runtime {
    /// Tokio worker threads; 0 = one per core.
    pub workers: usize,
}

// ---- typed values from strings ------------------------------------------------------

/// Parses a duration such as `250ms`, `5s`, `10m` or `1h 30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|_| {
        format!("invalid duration {s:?}: expected a number with a unit, like \"250ms\", \"5s\" or \"10m\"")
    })
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(de::Error::custom)
}

fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

/// Deserializes any `FromStr` type from a TOML string, reporting its own message.
macro_rules! deserialize_from_str {
    ($($t:ty),*) => {$(
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(de::Error::custom)
            }
        }
    )*};
}
deserialize_from_str!(
    User,
    HostPattern,
    PathPrefix,
    ProbePath,
    UpstreamUrl,
    ListenAddrs,
    ProxyUrl
);

impl<'de> Deserialize<'de> for Upstreams {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        let list = match OneOrMany::deserialize(d)
            .map_err(|_| de::Error::custom("expected an upstream URL or a list of them"))?
        {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        };
        if list.is_empty() {
            return Err(de::Error::custom("at least one upstream URL is required"));
        }
        list.iter()
            .map(|s| s.parse().map_err(de::Error::custom))
            .collect::<Result<Vec<_>, _>>()
            .map(Upstreams)
    }
}

impl<'de> Deserialize<'de> for AccessLog {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(match s.as_str() {
            "stdout" => AccessLog::Stdout,
            "off" => AccessLog::Off,
            "" => {
                return Err(de::Error::custom(
                    "expected \"stdout\", \"off\" or a file path",
                ));
            }
            path => AccessLog::File(PathBuf::from(path)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_the_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.listen[0].addr.to_string(), DEFAULT_LISTEN);
        assert!(c.forward.enabled);
        assert_eq!(c.forward.deny_targets.len(), 3);
        assert_eq!(c.pool.max_idle_per_host, 32);
        assert_eq!(c.timeouts.header_read, Duration::from_secs(15));
    }

    #[test]
    fn a_bad_duration_names_the_line_and_key() {
        let e = Config::parse("[timeouts]\n\nconnect = \"fast\"\n").unwrap_err();
        assert_eq!(e.line, Some(3));
        assert_eq!(e.key.as_deref(), Some("timeouts.connect"));
        assert!(e.message.contains("invalid duration"), "{e}");
    }

    #[test]
    fn an_unknown_key_is_an_error() {
        let e = Config::parse("[forward]\nenabled = true\nhidden = true\n").unwrap_err();
        assert_eq!(e.line, Some(3));
        assert!(e.to_string().contains("hidden"), "{e}");
    }

    #[test]
    fn upstream_urls_keep_or_drop_their_path() {
        let u: UpstreamUrl = "http://127.0.0.1:8080".parse().unwrap();
        assert_eq!(u.path, None);
        assert_eq!(u.authority, "127.0.0.1:8080");
        let u: UpstreamUrl = "https://Backend:443/v1/".parse().unwrap();
        assert_eq!(u.path.as_deref(), Some("/v1/"));
        assert_eq!(u.authority, "backend");
        assert_eq!(u.port, 443);
        let u: UpstreamUrl = "http://[::1]:9000/".parse().unwrap();
        assert_eq!(u.host, "::1");
        assert_eq!(u.authority, "[::1]:9000");
        assert!("ftp://x".parse::<UpstreamUrl>().is_err());
        assert!("http://x/a?b".parse::<UpstreamUrl>().is_err());
    }

    #[test]
    fn unix_sockets_are_listen_addresses_and_upstreams() {
        let l: ListenAddrs = "unix:/run/strait/p.sock".parse().unwrap();
        assert_eq!(l.0, vec![ListenAddr::Unix("/run/strait/p.sock".into())]);
        assert_eq!(l.0[0].to_string(), "unix:/run/strait/p.sock");
        let u: UpstreamUrl = "unix:/run/app.sock".parse().unwrap();
        assert_eq!(
            u.unix.as_deref(),
            Some(std::path::Path::new("/run/app.sock"))
        );
        assert_eq!(
            (u.scheme, u.authority.as_str()),
            (Scheme::Http, "localhost")
        );
        assert_eq!(u.to_string(), "unix:/run/app.sock");
        let long = format!("unix:/{}", "a".repeat(107));
        for bad in ["unix:run/p.sock", "unix:", long.as_str()] {
            assert!(bad.parse::<ListenAddrs>().is_err(), "{bad}");
            assert!(bad.parse::<UpstreamUrl>().is_err(), "{bad}");
        }
        let e =
            Config::parse("[[route]]\nupstream = [\"http://a\", \"unix:x.sock\"]\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("route[0].upstream"));
        assert!(e.message.contains("absolute path"), "{e}");
    }

    #[test]
    fn route_problems_found_after_parsing_name_the_route_line() {
        let text = "[[route]]\npath = \"/a\"\nupstream = \"http://a\"\n\n[[route]]\npath = \"/b\"\nupstream = \"http://b\"\ntls_insecure = true\n";
        let c = Config::parse(text).unwrap();
        let mut e = c.validate().unwrap_err();
        e.line = e.key.as_deref().and_then(|k| line_of_key(text, k));
        assert_eq!(e.key.as_deref(), Some("route[1].upstream"));
        assert_eq!(e.line, Some(7));
    }

    #[test]
    fn proxy_urls_take_credentials_and_never_show_them() {
        let u: ProxyUrl = "http://corp:p%40ss%20w@proxy.corp:3128".parse().unwrap();
        assert_eq!(u.authority, "proxy.corp:3128");
        assert_eq!(u.user, Some(("corp".into(), "p@ss w".into())));
        assert!(!format!("{u:?}").contains("ss"), "{u:?}");
        let u: ProxyUrl = "https://[::1]/".parse().unwrap();
        assert_eq!(
            (u.authority.as_str(), u.scheme),
            ("[::1]:443", Scheme::Https)
        );
        for bad in [
            "proxy:3128",
            "socks5://p:1080",
            "http://p:3128/path",
            "http://u:%zz@p:1",
        ] {
            assert!(bad.parse::<ProxyUrl>().is_err(), "{bad}");
        }
        let e = Config::parse("[forward]\nparent = \"ftp://x\"\n").unwrap_err();
        assert_eq!(
            (e.line, e.key.as_deref()),
            (Some(2), Some("forward.parent"))
        );
    }

    #[test]
    fn sizes_take_bytes_or_binary_suffixes() {
        for (text, bytes) in [
            ("max_body = 0", 0),
            ("max_body = 1500", 1500),
            ("max_body = \"0\"", 0),
            ("max_body = \"64KiB\"", 64 << 10),
            ("max_body = \"10MiB\"", 10 << 20),
            ("max_body = \"2 GiB\"", 2 << 30),
        ] {
            let c = Config::parse(&format!("[limits]\n{text}\n")).unwrap();
            assert_eq!(c.limits.max_body, Size(bytes), "{text}");
        }
        for bad in [
            "\"10MB\"",
            "\"1.5MiB\"",
            "-1",
            "\"\"",
            "\"MiB\"",
            "\"99999999999GiB\"",
        ] {
            let e = Config::parse(&format!("[limits]\nmax_body = {bad}\n")).unwrap_err();
            assert_eq!(
                (e.line, e.key.as_deref()),
                (Some(2), Some("limits.max_body")),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn limits_have_their_defaults_and_overrides() {
        let c = Config::parse(
            "[limits]\nmax_body = \"1KiB\"\n[forward]\nmax_body = 0\n[[route]]\nupstream = \"http://a\"\nmax_body = \"1MiB\"\n[[route]]\npath = \"/b\"\nupstream = \"http://b\"\n",
        )
        .unwrap();
        assert_eq!(c.limits.max_body(c.route[0].max_body), 1 << 20);
        assert_eq!(c.limits.max_body(c.route[1].max_body), 1024);
        assert_eq!(c.limits.max_body(c.forward.max_body), 0);
        let d = Config::default();
        assert_eq!((d.limits.max_connections, d.limits.backlog), (10_000, 4096));
        assert_eq!(d.timeouts.keepalive, Duration::from_secs(75));
        assert_eq!(d.timeouts.body_read, Duration::from_secs(60));
        let e = Config::parse("[limits]\nmax_connections = 0\n")
            .unwrap()
            .validate()
            .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("limits.max_connections"));
    }
}
