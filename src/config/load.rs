//! Loading a configuration: the file read, parsed and checked, and every problem
//! reported with the file, the line and the dotted key.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{AccessLog, Config, Scheme};

/// A configuration problem, reported as `file:line: key: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: Option<PathBuf>,
    pub line: Option<usize>,
    pub key: Option<String>,
    pub message: String,
}

impl ConfigError {
    pub fn new(message: impl Into<String>) -> Self {
        ConfigError {
            file: None,
            line: None,
            key: None,
            message: message.into(),
        }
    }

    pub(crate) fn at(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Names the config file and, when the key is found in it, the line.
    pub fn in_file(mut self, path: &Path) -> Self {
        if let (Some(key), Ok(text)) = (&self.key, std::fs::read_to_string(path)) {
            self.line = line_of_key(&text, key);
        }
        self.file = Some(path.to_owned());
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}", file.display())?;
            if let Some(line) = self.line {
                write!(f, ":{line}")?;
            }
            f.write_str(": ")?;
        }
        if let Some(key) = &self.key {
            write!(f, "{key}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads and validates a config file. Relative paths inside it are taken relative to
    /// the file's own directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: Some(path.to_owned()),
            line: None,
            key: None,
            message: format!("cannot read the config file: {e}"),
        })?;
        let mut config = Config::parse(&text).map_err(|mut e| {
            e.file = Some(path.to_owned());
            e
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        if let Some(users) = &config.forward.users_file {
            config.forward.file_users = super::users::read(users).map_err(|mut e| {
                if e.file.is_none() {
                    e.file = Some(path.to_owned());
                    e.line = line_of_key(&text, "forward.users_file");
                }
                e
            })?;
        }
        let located = |mut e: ConfigError| {
            e.file = Some(path.to_owned());
            e.line = e.key.as_deref().and_then(|k| line_of_key(&text, k));
            e
        };
        for (i, l) in config.listen.iter_mut().enumerate() {
            if let Some(tls) = &mut l.tls {
                tls.read_dir(i).map_err(located)?;
            }
        }
        config.validate().map_err(located)?;
        Ok(config)
    }

    /// Parses TOML text; the error carries the line and dotted key of the problem.
    ///
    /// ```
    /// let c = strait::Config::parse("[timeouts]\nconnect = \"2s\"\n").unwrap();
    /// assert_eq!(c.timeouts.connect, std::time::Duration::from_secs(2));
    ///
    /// let e = strait::Config::parse("[timeouts]\nconnect = \"fast\"\n").unwrap_err();
    /// assert_eq!((e.line, e.key.as_deref()), (Some(2), Some("timeouts.connect")));
    /// ```
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::parse(text).map_err(|e| toml_error(text, e, None))?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let key = (path != ".").then_some(path);
            toml_error(text, e.into_inner(), key)
        })
    }

    fn resolve_paths(&mut self, base: &Path) {
        let join = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        for l in &mut self.listen {
            if let Some(tls) = &mut l.tls {
                tls.resolve_paths(join);
            }
        }
        for r in &mut self.route {
            if let Some(ca) = &mut r.tls_ca {
                join(ca);
            }
        }
        if let AccessLog::File(p) = &mut self.log.access {
            join(p);
        }
        if let Some(p) = &mut self.forward.users_file {
            join(p);
        }
    }

    /// Checks what a single key cannot check by itself. Keys in errors are dotted paths
    /// such as `route[1].tls_server_name`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.listen.is_empty() {
            return Err(ConfigError::new("at least one listener is required").at("listen"));
        }
        for (i, l) in self.listen.iter().enumerate() {
            if let Some(tls) = &l.tls {
                tls.check_readable(i)?;
            }
            // With SO_REUSEPORT a second bind would succeed: the mistake is caught here.
            let ephemeral = matches!(&l.addr, super::ListenAddr::Tcp(a) if a.port() == 0);
            if !ephemeral && self.listen[..i].iter().any(|o| o.addr == l.addr) {
                return Err(ConfigError::new(format!("{} is listed twice", l.addr))
                    .at(format!("listen[{i}].addr")));
            }
        }
        for (i, r) in self.route.iter().enumerate() {
            let any_https = r.upstream.0.iter().any(|u| u.scheme == Scheme::Https);
            if let Some(ca) = &r.tls_ca {
                check_readable(ca).map_err(|e| e.at(format!("route[{i}].tls_ca")))?;
            }
            if !any_https && (r.tls_ca.is_some() || r.tls_server_name.is_some() || r.tls_insecure) {
                return Err(ConfigError::new(
                    "TLS settings need an https:// upstream; this route has none",
                )
                .at(format!("route[{i}].upstream")));
            }
            if r.upstream_response.is_some_and(|t| t.is_zero()) {
                return Err(ConfigError::new("upstream_response must be more than 0")
                    .at(format!("route[{i}].upstream_response")));
            }
            if r.health_interval < MIN_HEALTH_INTERVAL {
                return Err(ConfigError::new(format!(
                    "health_interval must be at least {}",
                    humantime::format_duration(MIN_HEALTH_INTERVAL)
                ))
                .at(format!("route[{i}].health_interval")));
            }
            if let Some(name) = &r.tls_server_name
                && rustls_pki_types::ServerName::try_from(name.as_str()).is_err()
            {
                return Err(ConfigError::new(format!(
                    "invalid server name {name:?}: expected a DNS name or an IP address"
                ))
                .at(format!("route[{i}].tls_server_name")));
            }
        }
        let l = &self.limits;
        for (key, zero) in [
            ("limits.max_connections", l.max_connections == 0),
            ("limits.backlog", l.backlog == 0),
            (
                "limits.h2_max_concurrent_streams",
                l.h2_max_concurrent_streams == 0,
            ),
            (
                "limits.h2_max_requests_per_connection",
                l.h2_max_requests_per_connection == 0,
            ),
            ("timeouts.keepalive", self.timeouts.keepalive.is_zero()),
            ("timeouts.body_read", self.timeouts.body_read.is_zero()),
        ] {
            if zero {
                return Err(ConfigError::new("must be more than 0").at(key));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, r) in self.route.iter().enumerate() {
            if !seen.insert(r.label()) {
                return Err(ConfigError::new(format!(
                    "route {:?} is defined twice: each host and path pair may appear once",
                    r.label()
                ))
                .at(format!("route[{i}].path")));
            }
        }
        self.check_user_names()?;
        if let Some(admin) = &self.admin
            && admin.addr.port() != 0
            && self
                .listen
                .iter()
                .any(|l| l.addr == super::ListenAddr::Tcp(admin.addr))
        {
            return Err(ConfigError::new(format!(
                "{} is also a proxy listener: the admin listener needs its own address",
                admin.addr
            ))
            .at("admin.addr"));
        }
        Ok(())
    }
}

impl Config {
    /// Refuses a forward proxy that anyone who reaches it could use: forwarding on, a
    /// listener on an address other than loopback, and neither users nor
    /// `allow_clients`, unless `[forward] open = true` says that is meant. Checked on
    /// the config with the command line's flags applied (`-u` adds users).
    pub fn check_exposure(&self) -> Result<(), ConfigError> {
        let f = &self.forward;
        if !f.enabled
            || f.open
            || !f.users.is_empty()
            || f.users_file.is_some()
            || !f.allow_clients.is_empty()
        {
            return Ok(());
        }
        // A Unix socket is reached through its file's permissions, not the network.
        let exposed = self.listen.iter().position(|l| match &l.addr {
            super::ListenAddr::Tcp(addr) => {
                let ip = match addr.ip() {
                    std::net::IpAddr::V6(v6) => v6
                        .to_ipv4_mapped()
                        .map(std::net::IpAddr::V4)
                        .unwrap_or(std::net::IpAddr::V6(v6)),
                    v4 => v4,
                };
                !ip.is_loopback()
            }
            super::ListenAddr::Unix(_) => false,
        });
        match exposed {
            None => Ok(()),
            Some(i) => Err(ConfigError::new(format!(
                "{} is reachable from other hosts and the forward proxy has no users and no \
                 allow_clients: anyone who reaches it could use it. Set [forward] users (or \
                 users_file) or [forward] allow_clients, or [forward] open = true if an \
                 open proxy is meant ([forward] enabled = false for a reverse proxy only)",
                self.listen[i].addr
            ))
            .at(format!("listen[{i}].addr"))),
        }
    }

    /// A user name appears once across `forward.users`, `--user` and the users file:
    /// two passwords for one name would leave which one counts to chance.
    fn check_user_names(&self) -> Result<(), ConfigError> {
        let f = &self.forward;
        let mut seen = std::collections::HashSet::new();
        for u in &f.users {
            if !seen.insert(u.name.as_str()) {
                return Err(ConfigError::new(format!(
                    "user {:?} is defined twice (in users or by --user): each name may \
                     appear once",
                    u.name
                ))
                .at("forward.users"));
            }
        }
        if let (Some(file), Some(u)) = (
            &f.users_file,
            f.file_users.iter().find(|u| seen.contains(u.name.as_str())),
        ) {
            return Err(ConfigError::new(format!(
                "user {:?} is in users (or given by --user) and at {}:{}: each name may \
                 appear once",
                u.name,
                file.display(),
                u.line
            ))
            .at("forward.users"));
        }
        Ok(())
    }
}

/// The shortest `health_interval`: probes more often than this would be load, not
/// checks.
const MIN_HEALTH_INTERVAL: Duration = Duration::from_millis(100);

fn check_readable(path: &Path) -> Result<(), ConfigError> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|e| ConfigError::new(format!("cannot read {}: {e}", path.display())))
}

fn toml_error(text: &str, e: toml::de::Error, key: Option<String>) -> ConfigError {
    let line = e
        .span()
        .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
    let mut message = e.message().trim().to_owned();
    // serde's wording for unknown keys lists every valid key: keep it, it tells the fix.
    if message.is_empty() {
        message = "invalid value".to_owned();
    }
    let line = line.or_else(|| key.as_deref().and_then(|k| line_of_key(text, k)));
    ConfigError {
        file: None,
        line,
        key,
        message,
    }
}

/// Finds the line of a dotted key such as `route[1].upstream` or `timeouts.connect`, for
/// errors found after parsing. Best effort: `None` when the key is not written out.
pub(super) fn line_of_key(text: &str, key: &str) -> Option<usize> {
    // Split `route[1].upstream` into table `route`, index 1, field `upstream`.
    let (table, rest) = key.split_once(['.', '[']).unwrap_or((key, ""));
    let index: usize = rest
        .split_once(']')
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or(0);
    // The fields below the table, indexes dropped: `listen[0].tls[1]` is on the line of
    // `tls`, and so is `listen[0].tls.cert` when `tls` is an inline table.
    let fields: Vec<&str> = key
        .split('.')
        .skip(1)
        .map(|f| f.split_once('[').map_or(f, |(f, _)| f))
        .collect();
    let mut seen = 0usize;
    let mut in_table = false;
    let mut table_line = None;
    let mut outer_line = None;
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.starts_with('[') {
            let name = line.trim_matches(|c| c == '[' || c == ']').trim();
            in_table = false;
            if name == table {
                if line.starts_with("[[") {
                    in_table = seen == index;
                    seen += 1;
                } else {
                    in_table = true;
                }
                if in_table {
                    table_line = Some(n + 1);
                }
            }
            continue;
        }
        if in_table {
            let k = line.split('=').next().unwrap_or("").trim();
            if fields.last() == Some(&k) {
                return Some(n + 1);
            }
            if outer_line.is_none() && fields.contains(&k) {
                outer_line = Some(n + 1);
            }
        }
    }
    outer_line.or(table_line)
}
