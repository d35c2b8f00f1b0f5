//! Name resolution for upstream connections: `/etc/hosts`, then Strait's own cache,
//! then hickory's resolver asking the name servers.
//!
//! One [`Resolver`] serves a configuration; a reload builds a new one (reading
//! resolv.conf and `/etc/hosts` again, with an empty cache), and the profiles made
//! for the old configuration keep the old one until they go.
//!
//! A lookup of a name (IP literals never come here) takes the first of:
//! 1. **`/etc/hosts`**, read when the resolver is built. A name listed there is
//!    answered from it alone, for both address families, as glibc's `files` source
//!    does: a name listed only with an IPv4 address costs no AAAA query. `localhost`
//!    and the names under it are loopback when it does not list them (RFC 6761).
//! 2. **The cache**: a name's addresses until the smallest TTL of the records that
//!    gave them passes; a name that does not exist (NXDOMAIN, or no A and no AAAA)
//!    until its negative TTL passes (RFC 2308 §5: the SOA's, which must come with
//!    the answer for it to be kept), at most [`NEGATIVE_TTL_CAP`]. At most
//!    `[dns] cache_size` names; 0 keeps none.
//! 3. **hickory**: A and AAAA asked at once from `[dns] servers` (or resolv.conf's,
//!    with its search list, `ndots`, `timeout` and `attempts`). Timeouts, SERVFAIL
//!    and REFUSED answers are never kept.
//!
//! Why a cache of Strait's own in front of hickory's (which is off): hickory's cache
//! does not tell whether an answer came from it, and the metrics say exactly that.
//! With hickory's cache off, every miss here is a question on the wire.

use std::borrow::Cow;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::{Query, ResponseCode};
use hickory_resolver::proto::rr::{Name, RecordType};
use hickory_resolver::{Hosts, TokioResolver};

use crate::config;

/// The most addresses of one family kept for a name (the cache holds names, not
/// addresses; Happy Eyeballs never needs more).
const MAX_PER_FAMILY: usize = 16;

/// An answer's addresses as kept: IPv4 first, at most [`MAX_PER_FAMILY`] of each.
fn bounded(addrs: impl Iterator<Item = IpAddr>) -> Arc<[IpAddr]> {
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    for a in addrs {
        let family = if a.is_ipv4() { &mut v4 } else { &mut v6 };
        if family.len() < MAX_PER_FAMILY {
            family.push(a);
        }
    }
    v4.into_iter().chain(v6).collect()
}

/// The longest a "no such name" answer is kept, whatever its SOA says: a name that
/// is about to be created should not stay unreachable for long.
pub const NEGATIVE_TTL_CAP: Duration = Duration::from_secs(30);

/// Counts of lookups by where their answer came from, kept as atomics so this module
/// knows nothing of Prometheus (`metrics.rs` copies them at scrape time).
#[derive(Default)]
pub struct Stats {
    /// Answered by `/etc/hosts`, or `localhost` (RFC 6761).
    pub hosts: AtomicU64,
    /// Answered by the cache (addresses, or that the name does not exist).
    pub hits: AtomicU64,
    /// Asked of the name servers, which answered (addresses, or that the name does
    /// not exist).
    pub misses: AtomicU64,
    /// Asked of the name servers, which gave no answer (timeout, SERVFAIL, REFUSED),
    /// or not a valid name.
    pub errors: AtomicU64,
    /// Lookups whose answer was that the name has no address, from the cache or not.
    pub not_found: AtomicU64,
    /// Told the time each question to the name servers took.
    pub on_query: OnceLock<QueryObserver>,
}

impl fmt::Debug for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stats").finish_non_exhaustive()
    }
}

/// Called with the duration of every lookup that went to the name servers.
pub struct QueryObserver(pub Box<dyn Fn(Duration) + Send + Sync>);

/// What the cache keeps for a name.
#[derive(Clone)]
enum Answer {
    Addrs(Arc<[IpAddr]>),
    /// NXDOMAIN, or neither A nor AAAA records.
    NotFound,
}

#[derive(Clone)]
struct Cached {
    answer: Answer,
    valid_until: Instant,
}

/// Expires each entry when its TTL passes.
struct ByTtl;

impl moka::Expiry<Box<str>, Cached> for ByTtl {
    fn expire_after_create(&self, _: &Box<str>, v: &Cached, now: Instant) -> Option<Duration> {
        Some(v.valid_until.saturating_duration_since(now))
    }

    // Two misses for one name at once both insert: the later answer keeps its own
    // TTL (moka's default would keep the earlier entry's deadline).
    fn expire_after_update(
        &self,
        _: &Box<str>,
        v: &Cached,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(v.valid_until.saturating_duration_since(now))
    }
}

/// Resolves upstream names; built from `[dns]` once per configuration.
pub struct Resolver {
    hickory: TokioResolver,
    hosts: Hosts,
    /// Lower-case name → answer; `None` when `cache_size` is 0.
    cache: Option<moka::sync::Cache<Box<str>, Cached>>,
    stats: Arc<Stats>,
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resolver")
            .field("cache", &self.cache.as_ref().map(|c| c.entry_count()))
            .finish_non_exhaustive()
    }
}

impl Resolver {
    /// Builds a resolver from `[dns]`. With no `servers`, the system's resolv.conf
    /// must be readable and name at least one server: Strait does not start (and a
    /// reload is refused) otherwise.
    pub fn new(cfg: &config::Dns, stats: Arc<Stats>) -> Result<Resolver, String> {
        let (conf, mut opts) = if cfg.servers.is_empty() {
            hickory_resolver::system_conf::read_system_conf().map_err(|e| {
                format!(
                    "dns: cannot use the system's resolver configuration (/etc/resolv.conf): \
                     {e}; name the servers in [dns] servers"
                )
            })?
        } else {
            let servers = cfg.servers.iter().map(|s| name_server(s.0)).collect();
            (
                ResolverConfig::from_parts(None, Vec::new(), servers),
                ResolverOpts::default(),
            )
        };
        // IPv4 first, as glibc orders them on a host without global IPv6; Happy
        // Eyeballs (connect.rs) alternates the families from there.
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        // The cache below is the only one (module doc).
        opts.cache_size = 0;
        // `/etc/hosts` is read here, to answer for both families (module doc).
        opts.use_hosts_file = ResolveHosts::Never;
        let hickory = TokioResolver::builder_with_config(conf, TokioRuntimeProvider::default())
            .with_options(opts)
            .build()
            .map_err(|e| format!("dns: cannot build the resolver: {e}"))?;
        let hosts = Hosts::from_system().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read /etc/hosts; names are resolved by DNS alone");
            Hosts::default()
        });
        let cache = (cfg.cache_size > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(cfg.cache_size)
                .expire_after(ByTtl)
                .build()
        });
        Ok(Resolver {
            hickory,
            hosts,
            cache,
            stats,
        })
    }

    /// A resolver for tests: names from `hosts` (in `/etc/hosts` form) and
    /// `localhost`; its name server is never asked.
    #[cfg(test)]
    pub fn for_tests(hosts: &str) -> Arc<Resolver> {
        let cfg = config::Dns {
            servers: vec!["127.0.0.1:9".parse().expect("a valid name server")],
            cache_size: 0,
        };
        let mut r = Resolver::new(&cfg, Arc::default()).expect("no system configuration is read");
        r.hosts = Hosts::default();
        r.hosts
            .read_hosts_conf(hosts.as_bytes())
            .expect("hosts text in /etc/hosts form");
        Arc::new(r)
    }

    /// The addresses of `host` with `port`, in the resolver's order (IPv4 first).
    /// A name that does not exist fails with `NotFound`; one that could not be
    /// resolved with another kind.
    pub async fn lookup_host(
        &self,
        host: &str,
        port: u16,
    ) -> io::Result<impl Iterator<Item = SocketAddr> + use<>> {
        let addrs = self.lookup(host).await?;
        Ok((0..addrs.len()).map(move |i| SocketAddr::new(addrs[i], port)))
    }

    async fn lookup(&self, host: &str) -> io::Result<Arc<[IpAddr]>> {
        let key = match host.bytes().any(|b| b.is_ascii_uppercase()) {
            true => Cow::Owned(host.to_ascii_lowercase()),
            false => Cow::Borrowed(host),
        };
        if let Some(cache) = &self.cache
            && let Some(hit) = cache.get(&*key)
            && hit.valid_until > Instant::now()
        {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return self.answered(hit.answer);
        }
        // Underscores too (`my_service`), as getaddrinfo takes them.
        let Some(name) = Name::from_str_relaxed(host)
            .ok()
            .filter(|n| n.num_labels() > 0)
        else {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a valid DNS name",
            ));
        };
        // Never cached, so never a hit: the order of these two steps does not matter.
        if let Some(addrs) = self.hosts_answer(&name) {
            self.stats.hosts.fetch_add(1, Ordering::Relaxed);
            return Ok(addrs);
        }

        // `a.test` is tried as written first (`ndots` 1), then with the search list;
        // a trailing dot makes it only that.
        let started = Instant::now();
        let result = self.hickory.lookup_ip(name).await;
        if let Some(observe) = self.stats.on_query.get() {
            (observe.0)(started.elapsed());
        }
        let now = Instant::now();
        let cached = match result {
            Ok(lookup) => {
                // Bounded: a zone that answers thousands of records per name would
                // otherwise make each cache entry (and each connect's list of attempts)
                // as large as it liked.
                let addrs = bounded(lookup.iter());
                let answer = if addrs.is_empty() {
                    Answer::NotFound
                } else {
                    Answer::Addrs(addrs)
                };
                // An empty answer has no TTL to keep it by.
                let valid_until = match answer {
                    Answer::Addrs(_) => lookup.valid_until(),
                    Answer::NotFound => now,
                };
                Cached {
                    answer,
                    valid_until,
                }
            }
            Err(NetError::Dns(DnsError::NoRecordsFound(no)))
                if matches!(
                    no.response_code,
                    ResponseCode::NXDomain | ResponseCode::NoError
                ) =>
            {
                Cached {
                    answer: Answer::NotFound,
                    valid_until: now + negative_ttl(no.negative_ttl),
                }
            }
            Err(e) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                return Err(io::Error::other(e.to_string()));
            }
        };
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        if let Some(cache) = &self.cache
            && cached.valid_until > now
        {
            cache.insert(key.into_owned().into(), cached.clone());
        }
        self.answered(cached.answer)
    }

    fn answered(&self, answer: Answer) -> io::Result<Arc<[IpAddr]>> {
        match answer {
            Answer::Addrs(addrs) => Ok(addrs),
            Answer::NotFound => {
                self.stats.not_found.fetch_add(1, Ordering::Relaxed);
                Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    "the name does not exist or has no address",
                ))
            }
        }
    }

    /// Both families' addresses from `/etc/hosts`, if it lists the name at all; else
    /// loopback for `localhost` and names under it (RFC 6761 §6.3).
    fn hosts_answer(&self, name: &Name) -> Option<Arc<[IpAddr]>> {
        let found = [RecordType::A, RecordType::AAAA]
            .into_iter()
            .filter_map(|t| {
                self.hosts
                    .lookup_static_host(&Query::query(name.clone(), t))
            });
        let addrs: Arc<[IpAddr]> = found
            .flat_map(|l| {
                l.answers()
                    .iter()
                    .filter_map(|r| r.data.ip_addr())
                    .collect::<Vec<_>>()
            })
            .collect();
        if !addrs.is_empty() {
            return Some(addrs);
        }
        let last = name.iter().next_back()?;
        last.eq_ignore_ascii_case(b"localhost").then(|| {
            Arc::from([
                IpAddr::from([127, 0, 0, 1]),
                IpAddr::from(Ipv6Addr::LOCALHOST),
            ])
        })
    }
}

/// A server asked over UDP, and over TCP for answers too long for UDP.
fn name_server(addr: SocketAddr) -> NameServerConfig {
    let mut server = NameServerConfig::udp_and_tcp(addr.ip());
    for c in &mut server.connections {
        c.port = addr.port();
    }
    server
}

/// How long a "no such name" answer is kept: its SOA's negative TTL, at most
/// [`NEGATIVE_TTL_CAP`]; not at all without an SOA (RFC 2308 §5).
fn negative_ttl(from_soa: Option<u32>) -> Duration {
    from_soa.map_or(Duration::ZERO, |s| {
        Duration::from_secs(u64::from(s)).min(NEGATIVE_TTL_CAP)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_answer_keeps_sixteen_addresses_of_each_family() {
        let many: Vec<IpAddr> = (0..4000u32)
            .map(|i| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i)))
            .chain((0..2000u16).map(|i| IpAddr::from(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, i))))
            .collect();
        let kept = bounded(many.iter().copied());
        assert_eq!(kept.len(), 32);
        assert!(kept[..16].iter().all(IpAddr::is_ipv4));
        assert!(kept[16..].iter().all(IpAddr::is_ipv6));
        assert_eq!(kept[0].to_string(), "10.0.0.0");
    }

    #[test]
    fn negative_answers_are_kept_by_their_soa_and_never_past_the_cap() {
        assert_eq!(negative_ttl(None), Duration::ZERO);
        assert_eq!(negative_ttl(Some(5)), Duration::from_secs(5));
        assert_eq!(negative_ttl(Some(86_400)), NEGATIVE_TTL_CAP);
    }

    #[test]
    fn a_server_keeps_its_port_for_udp_and_tcp() {
        let s = name_server("127.0.0.1:5353".parse().unwrap());
        assert_eq!(s.connections.len(), 2);
        assert!(s.connections.iter().all(|c| c.port == 5353));
    }

    fn resolver(servers: &[&str], cache_size: u64) -> Resolver {
        let cfg = config::Dns {
            servers: servers.iter().map(|s| s.parse().unwrap()).collect(),
            cache_size,
        };
        Resolver::new(&cfg, Arc::default()).unwrap()
    }

    #[tokio::test]
    async fn localhost_is_loopback_without_asking_a_server() {
        // A server that never answers: reaching it would fail the lookup.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let r = resolver(&[&silent.local_addr().unwrap().to_string()], 16);
        for name in ["localhost", "LocalHost.", "app.localhost"] {
            let addrs: Vec<SocketAddr> = r.lookup_host(name, 80).await.unwrap().collect();
            assert!(!addrs.is_empty());
            assert!(
                addrs.iter().all(|a| a.ip().is_loopback()),
                "{name}: {addrs:?}"
            );
            assert!(addrs.iter().all(|a| a.port() == 80));
        }
        let s = &r.stats;
        assert_eq!(s.hosts.load(Ordering::Relaxed), 3);
        assert_eq!(s.misses.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_name_in_the_hosts_file_is_answered_from_it_alone() {
        // The server never answers: an AAAA question for the name would hang the
        // lookup for hickory's timeout.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut r = resolver(&[&silent.local_addr().unwrap().to_string()], 16);
        r.hosts = Hosts::default();
        r.hosts
            .read_hosts_conf(&b"10.1.2.3 svc.internal my_svc\n"[..])
            .unwrap();
        for name in ["svc.internal", "SVC.internal.", "my_svc"] {
            let lookup = r.lookup_host(name, 8080);
            let addrs: Vec<SocketAddr> = tokio::time::timeout(Duration::from_secs(2), lookup)
                .await
                .expect("no question to the name server")
                .unwrap()
                .collect();
            assert_eq!(addrs, ["10.1.2.3:8080".parse().unwrap()], "{name}");
        }
        assert_eq!(r.stats.hosts.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn a_name_that_is_not_a_dns_name_fails_cleanly() {
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let r = resolver(&[&silent.local_addr().unwrap().to_string()], 16);
        let long_label = format!("{}.test", "a".repeat(64));
        for bad in [long_label.as_str(), "a..b", "", "."] {
            let err = r.lookup_host(bad, 80).await.err().expect(bad);
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{bad}: {err}");
        }
        assert_eq!(r.stats.errors.load(Ordering::Relaxed), 4);
    }
}
