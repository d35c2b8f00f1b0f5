//! The command line: flags, and the quick flags that become a [`Config`]; two
//! subcommands print what packagers install beside the binary (shell completions and
//! the man page), generated from the same definitions.
//!
//! Flags override the file: `--listen` replaces its listeners, `--user` and `--route`
//! add to it, `--tls-cert`/`--tls-key` put TLS on every listener.

use std::path::PathBuf;

use clap::{CommandFactory, Parser, Subcommand};

use crate::config::{
    Admin, Config, ConfigError, HostPattern, Listen, ListenTls, PathPrefix, RouteConfig, TlsFiles,
    Upstreams, User, Version,
};

/// A fast HTTP forward and reverse proxy.
///
/// With no config file Strait is a forward proxy on 127.0.0.1:3128.
#[derive(Debug, Parser)]
#[command(
    name = "strait",
    version,
    about,
    long_about = None,
    args_conflicts_with_subcommands = true,
    disable_help_subcommand = true
)]
pub struct Cli {
    /// Config file (TOML); see docs/configuration.md.
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Validate the configuration, print the problem if any, and exit 0 (ok) or 2.
    #[arg(short = 't', long)]
    pub check: bool,

    /// Listen on ADDR (repeatable); replaces the config's listeners.
    #[arg(short, long = "listen", value_name = "ADDR")]
    pub listen: Vec<crate::config::ListenAddrs>,

    /// Forward-proxy Basic auth user NAME:PASS (repeatable; shows in `ps`: prefer
    /// [forward] users_file).
    #[arg(short, long = "user", value_name = "NAME:PASS")]
    pub user: Vec<User>,

    /// Quick reverse route 'MATCH=>URL[,URL...]', MATCH = host | host/prefix | /prefix.
    #[arg(long = "route", value_name = "MATCH=>URL")]
    pub route: Vec<String>,

    /// Serve TLS on every listener with this certificate chain (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM) for --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Admin listener for /metrics and /healthz.
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<std::net::SocketAddr>,

    /// Log level: error, warn, info, debug or trace (RUST_LOG also works).
    #[arg(long, value_name = "LEVEL", value_parser = ["error", "warn", "info", "debug", "trace"])]
    pub log: Option<String>,

    /// Without one, Strait runs.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// What Strait prints instead of running.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the shell completion script for SHELL.
    Completions {
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff).
    Man,
}

impl Command {
    /// Writes what the subcommand prints.
    pub fn print(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        let mut cli = Cli::command();
        match self {
            Command::Completions { shell } => {
                clap_complete::generate(*shell, &mut cli, "strait", out);
                Ok(())
            }
            Command::Man => {
                let mut page = Vec::new();
                clap_mangen::Man::new(cli.long_about(MAN_DESCRIPTION)).render(&mut page)?;
                let page = String::from_utf8_lossy(&page);
                // The title line first, as man(7) has it (clap_mangen puts its
                // definition of the apostrophe before it; nothing before uses that).
                let (before, title) = match page.find("\n.TH ") {
                    Some(at) => page.split_at(at + 1),
                    None => ("", &page[..]),
                };
                let (title, rest) = title.split_at(title.find('\n').map_or(title.len(), |i| i + 1));
                // The sections the flags do not give go before the version's; the
                // subcommands are among them (clap_mangen would point to a page each).
                let at = rest.find(".SH VERSION").unwrap_or(rest.len());
                let (options, version) = rest.split_at(at);
                let options = match options.find(".SH SUBCOMMANDS") {
                    Some(from) => {
                        let to = options[from + 1..]
                            .find("\n.SH ")
                            .map_or(options.len(), |i| from + i + 2);
                        format!("{}{}", &options[..from], &options[to..])
                    }
                    None => options.to_owned(),
                };
                for part in [title, before, &options, MAN_EXTRA, version] {
                    out.write_all(part.as_bytes())?;
                }
                Ok(())
            }
        }
    }
}

/// The man page's description (`--help` keeps to the one line).
const MAN_DESCRIPTION: &str = "Strait is an HTTP forward and reverse proxy in one binary. With no \
configuration file it is a forward proxy on 127.0.0.1:3128; with --config it serves what the TOML \
file describes (listeners, routes, the forward proxy, limits, timeouts, the admin listener). The \
flags below add to the file or replace its listeners.";

/// The man page's sections the flags do not give: commands, signals, files, exit status.
const MAN_EXTRA: &str = r#".SH COMMANDS
.TP
\fBstrait completions\fR \fISHELL\fR
Prints the completion script for \fISHELL\fR (bash, zsh, fish, elvish or powershell), for /usr/share/bash-completion/completions/strait, say.
.TP
\fBstrait man\fR
Prints this page, for /usr/share/man/man1/strait.1.
.SH SIGNALS
.TP
\fBSIGHUP\fR
Reads the configuration file again and puts it in service; a file that does not load leaves the running configuration in place. Reopens the access log.
.TP
\fBSIGUSR1\fR
Reopens the access log file (for logrotate), nothing else.
.TP
\fBSIGTERM\fR, \fBSIGINT\fR, \fBSIGQUIT\fR
Stop accepting and drain: requests in flight finish within \fBtimeouts.shutdown_grace\fR, then Strait exits 0. A listener whose port another process shares (a new binary started on the same addresses) hands the port over first, so that the upgrade refuses no connection.
.SH FILES
.TP
\fI/etc/strait/strait.toml\fR
The configuration, as \fB\-c\fR names it; \fBstrait.example.toml\fR and docs/configuration.md in the sources describe every key.
.SH "EXIT STATUS"
.TP
0
Stopped by a signal after the drain, or \fB\-\-check\fR found the configuration good.
.TP
1
A listener could not be bound, or the process could not start.
.TP
2
The command line or the configuration is wrong; the message names the file, line and key.
"#;

impl Cli {
    /// The configuration these flags describe: the file (if any) with the flags applied.
    pub fn to_config(&self) -> Result<Config, ConfigError> {
        let mut config = match &self.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        if !self.listen.is_empty() {
            config.listen = self
                .listen
                .iter()
                .flat_map(|a| {
                    a.0.iter().map(|addr| Listen {
                        addr: addr.clone(),
                        tls: None,
                    })
                })
                .collect();
        }
        config.forward.users.extend(self.user.iter().cloned());
        for spec in &self.route {
            config.route.push(parse_quick_route(spec)?);
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            for l in &mut config.listen {
                l.tls = Some(ListenTls::one(TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                }));
            }
        }
        if let Some(addr) = self.admin {
            config.admin = Some(Admin { addr });
        }
        config.validate().map_err(|mut e| {
            if e.key.as_deref().is_some_and(|k| k.starts_with("route[")) {
                e.file = self.config.clone();
            }
            e
        })?;
        config.check_exposure().map_err(|e| match &self.config {
            Some(path) if self.listen.is_empty() => e.in_file(path),
            _ => ConfigError {
                key: Some("--listen".to_owned()),
                ..e
            },
        })?;
        Ok(config)
    }
}

/// Parses `MATCH=>URL[,URL…]` where MATCH is `host`, `host/prefix` or `/prefix`.
fn parse_quick_route(spec: &str) -> Result<RouteConfig, ConfigError> {
    let err = |why: String| ConfigError::new(why).at_flag();
    let (matcher, urls) = spec.split_once("=>").ok_or_else(|| {
        err(format!(
            "invalid route {spec:?}: expected 'MATCH=>URL', like '/api=>http://127.0.0.1:8080'"
        ))
    })?;
    let matcher = matcher.trim();
    let (host, path) = match matcher.find('/') {
        Some(0) => (None, matcher),
        Some(i) => (Some(&matcher[..i]), &matcher[i..]),
        None if !matcher.is_empty() => (Some(matcher), "/"),
        None => (None, "/"),
    };
    let host: Option<HostPattern> = host
        .map(|h| h.parse())
        .transpose()
        .map_err(|e: String| err(e))?;
    let path: PathPrefix = path.parse().map_err(|e: String| err(e))?;
    let upstream = urls
        .split(',')
        .map(|u| u.trim().parse())
        .collect::<Result<Vec<_>, String>>()
        .map_err(err)?;
    if upstream.is_empty() {
        return Err(err(format!("invalid route {spec:?}: no upstream URL")));
    }
    Ok(RouteConfig {
        host,
        path,
        upstream: Upstreams(upstream),
        version: Version::Auto,
        preserve_host: false,
        rewrite_location: true,
        health_check: None,
        health_interval: std::time::Duration::from_secs(5),
        upstream_response: None,
        tls_ca: None,
        tls_server_name: None,
        tls_insecure: false,
        max_body: None,
        via: None,
    })
}

impl ConfigError {
    fn at_flag(mut self) -> Self {
        self.key = Some("--route".to_owned());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_routes_take_a_host_a_prefix_or_both() {
        let r = parse_quick_route("/api=>http://127.0.0.1:8080").unwrap();
        assert_eq!(r.host, None);
        assert_eq!(r.path.0, "/api");
        let r = parse_quick_route("app.test/=>http://a:1,http://b:2/v1/").unwrap();
        assert_eq!(r.host, Some(HostPattern::Exact("app.test".into())));
        assert_eq!(r.path.0, "/");
        assert_eq!(r.upstream.0.len(), 2);
        let r = parse_quick_route("*.test=>http://a").unwrap();
        assert_eq!(r.host, Some(HostPattern::Suffix(".test".into())));
        assert!(parse_quick_route("/api->http://a").is_err());
        assert!(parse_quick_route("/api=>ftp://a").is_err());
    }
}
