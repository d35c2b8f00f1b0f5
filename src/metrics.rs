//! Prometheus metrics: the registry, bounded label sets and the `/metrics` text.
//!
//! Labels are bounded by construction: `kind` is one of three words, `route` is a route
//! as written in the config (or `-`), `code` a status code, `user` a configured proxy user
//! (or `-`), `listener` a configured address. Client addresses and raw target hosts are
//! never labels. The pool's counters live as atomics in the pool and are copied in at
//! scrape time, so the pool knows nothing of Prometheus.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::upstream::dns;
use crate::upstream::pool::Stats;

/// A shared, cheaply cloned label value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Label(pub Arc<str>);

impl Label {
    pub fn none() -> Label {
        static NONE: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
        Label(NONE.get_or_init(|| Arc::from("-")).clone())
    }
}

impl From<&str> for Label {
    fn from(s: &str) -> Label {
        Label(Arc::from(s))
    }
}

impl EncodeLabelValue for Label {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(&self.0)
    }
}

/// What a request was: forward, reverse or connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Forward,
    Reverse,
    Connect,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Forward => "forward",
            Kind::Reverse => "reverse",
            Kind::Connect => "connect",
        }
    }
}

impl EncodeLabelValue for Kind {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    pub kind: Kind,
    pub route: Label,
    pub code: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RouteLabels {
    pub kind: Kind,
    pub route: Label,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Rx,
    Tx,
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(match self {
            Direction::Rx => "rx",
            Direction::Tx => "tx",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct BytesLabels {
    pub kind: Kind,
    pub user: Label,
    pub direction: Direction,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: Label,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct AcceptErrorLabels {
    pub listener: Label,
    pub reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RouteOnly {
    pub route: Label,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct EventLabels {
    pub event: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct CertificateLabels {
    pub name: Label,
}

/// The names a listener's certificates serve, each with the end of its certificate's
/// validity (`notAfter`, Unix seconds), read at scrape time for
/// `strait_tls_certificate_expiry_seconds`.
pub trait CertificateNames: Send + Sync {
    fn for_each_name(&self, f: &mut dyn FnMut(&str, i64));
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct AuthLabels {
    pub result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DnsLabels {
    pub result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReloadLabels {
    pub what: &'static str,
    pub result: &'static str,
}

/// Every metric Strait exports.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    pub bytes: Family<BytesLabels, Counter>,
    pub client_connections: Family<ListenerLabels, Gauge>,
    pub client_connections_parked: Gauge,
    pub client_connections_max: Gauge,
    pub accept_errors: Family<AcceptErrorLabels, Counter>,
    pub connect_duration: Histogram,
    pub tunnels_active: Gauge,
    pub upgraded_active: Gauge,
    pub upstreams_down: Family<RouteOnly, Gauge>,
    pub tls_handshake_failures: Counter,
    pub reloads: Family<ReloadLabels, Counter>,
    pub access_log_dropped: Counter,
    certificate_expiry: Family<CertificateLabels, Gauge>,
    /// Whoever serves certificates, registered by [`Metrics::watch_certificates`]; gone
    /// when its owner drops it.
    certificates: std::sync::Mutex<Vec<std::sync::Weak<dyn CertificateNames>>>,
    /// Proxy credentials checked because no earlier check remembered them
    /// (`proxy::auth`), by result.
    pub auth_checks: Family<AuthLabels, Counter>,
    pool_events: Family<EventLabels, Counter>,
    pool_idle: Gauge,
    pool_waiting: Gauge,
    pool: Arc<Stats>,
    dns_lookups: Family<DnsLabels, Counter>,
    dns_not_found: Counter,
    dns: Arc<dns::Stats>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ])
}

impl Metrics {
    pub fn new(pool: Arc<Stats>, dns: Arc<dns::Stats>) -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let duration: Family<RouteLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        let bytes = Family::<BytesLabels, Counter>::default();
        let client_connections = Family::<ListenerLabels, Gauge>::default();
        let client_connections_parked = Gauge::default();
        let client_connections_max = Gauge::default();
        let accept_errors = Family::<AcceptErrorLabels, Counter>::default();
        let connect_duration = latency_histogram();
        let tunnels_active = Gauge::default();
        let upgraded_active = Gauge::default();
        let upstreams_down = Family::<RouteOnly, Gauge>::default();
        let tls_handshake_failures = Counter::default();
        let reloads = Family::<ReloadLabels, Counter>::default();
        let access_log_dropped = Counter::default();
        let certificate_expiry = Family::<CertificateLabels, Gauge>::default();
        let auth_checks = Family::<AuthLabels, Counter>::default();
        let pool_events = Family::<EventLabels, Counter>::default();
        let pool_idle = Gauge::default();
        let pool_waiting = Gauge::default();
        let dns_lookups = Family::<DnsLabels, Counter>::default();
        let dns_not_found = Counter::default();
        let dns_duration = latency_histogram();
        let r = &mut registry;
        r.register(
            "strait_requests",
            "Requests answered, by kind, route and status code",
            requests.clone(),
        );
        r.register(
            "strait_request_duration_seconds",
            "Time from request head to the end of the response",
            duration.clone(),
        );
        r.register(
            "strait_transfer_bytes",
            "Bytes from (rx) and to (tx) clients, by kind and proxy user",
            bytes.clone(),
        );
        r.register(
            "strait_client_connections",
            "Open client connections, by listener",
            client_connections.clone(),
        );
        r.register(
            "strait_client_connections_parked",
            "Plain HTTP/1.1 client connections parked between requests, without hyper's buffers",
            client_connections_parked.clone(),
        );
        r.register(
            "strait_client_connections_max",
            "The cap on client connections across listeners ([limits] max_connections)",
            client_connections_max.clone(),
        );
        r.register(
            "strait_accept_errors",
            "Failed accepts, by listener and reason",
            accept_errors.clone(),
        );
        r.register(
            "strait_pool_events",
            "Upstream pool events",
            pool_events.clone(),
        );
        r.register(
            "strait_pool_idle_connections",
            "Idle upstream connections in the pool",
            pool_idle.clone(),
        );
        r.register(
            "strait_pool_waiting_requests",
            "Requests waiting for an upstream connection",
            pool_waiting.clone(),
        );
        r.register(
            "strait_upstream_connect_duration_seconds",
            "Time to open an upstream connection (TCP, TLS, HTTP handshake)",
            connect_duration.clone(),
        );
        r.register(
            "strait_tunnels_active",
            "Open CONNECT tunnels",
            tunnels_active.clone(),
        );
        r.register(
            "strait_upstreams_down",
            "Upstreams that failed their health checks and are out of the rotation, by route",
            upstreams_down.clone(),
        );
        r.register(
            "strait_upgraded_active",
            "Open connections that switched protocols (WebSocket)",
            upgraded_active.clone(),
        );
        r.register(
            "strait_tls_handshake_failures",
            "Client TLS handshakes that failed or timed out",
            tls_handshake_failures.clone(),
        );
        r.register(
            "strait_reloads",
            "Certificate and configuration reloads, by result",
            reloads.clone(),
        );
        r.register(
            "strait_access_log_dropped_lines",
            "Access log lines dropped because the writer fell behind",
            access_log_dropped.clone(),
        );
        r.register(
            "strait_tls_certificate_expiry_seconds",
            "Seconds until the certificate serving a name expires (negative once expired), by name",
            certificate_expiry.clone(),
        );
        r.register(
            "strait_auth_checks",
            "Proxy credentials checked in full (not remembered from an earlier check), by result",
            auth_checks.clone(),
        );
        r.register(
            "strait_dns_lookups",
            "Upstream name lookups, by where the answer came from: hosts (/etc/hosts), \
             hit (the cache), miss (the name servers answered), error (no answer)",
            dns_lookups.clone(),
        );
        r.register(
            "strait_dns_not_found",
            "Name lookups answered that the name has no address (NXDOMAIN or no A/AAAA)",
            dns_not_found.clone(),
        );
        r.register(
            "strait_dns_lookup_duration_seconds",
            "Time to ask the name servers (cache misses and errors)",
            dns_duration.clone(),
        );
        let _ = dns.on_query.set(dns::QueryObserver(Box::new(move |d| {
            dns_duration.observe(d.as_secs_f64())
        })));
        let histogram = connect_duration.clone();
        let _ = pool
            .on_connect
            .set(crate::upstream::pool::ConnectObserver(Box::new(move |d| {
                histogram.observe(d.as_secs_f64())
            })));
        Metrics {
            registry,
            requests,
            duration,
            bytes,
            client_connections,
            client_connections_parked,
            client_connections_max,
            accept_errors,
            connect_duration,
            tunnels_active,
            upgraded_active,
            upstreams_down,
            tls_handshake_failures,
            reloads,
            access_log_dropped,
            certificate_expiry,
            certificates: std::sync::Mutex::new(Vec::new()),
            auth_checks,
            pool_events,
            pool_idle,
            pool_waiting,
            pool,
            dns_lookups,
            dns_not_found,
            dns,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let s = &self.pool;
        for (event, value) in [
            ("open", &s.opened),
            ("reuse", &s.reused),
            ("retry", &s.retried),
            ("evict_idle", &s.evict_idle),
            ("evict_lru", &s.evict_lru),
            ("evict_hint", &s.evict_hint),
            ("close", &s.closed),
        ] {
            self.pool_events
                .get_or_create(&EventLabels { event })
                .inner()
                .store(value.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        self.pool_idle.set(s.idle.load(Ordering::Relaxed) as i64);
        self.pool_waiting
            .set(s.waiting.load(Ordering::Relaxed) as i64);
        // Held while the family is refilled, so two scrapes never see each other's half.
        let certificates = self.certificates.lock().expect("certificates lock");
        self.fill_certificate_expiry(&certificates);
        let d = &self.dns;
        for (result, value) in [
            ("hosts", &d.hosts),
            ("hit", &d.hits),
            ("miss", &d.misses),
            ("error", &d.errors),
        ] {
            self.dns_lookups
                .get_or_create(&DnsLabels { result })
                .inner()
                .store(value.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        self.dns_not_found
            .inner()
            .store(d.not_found.load(Ordering::Relaxed), Ordering::Relaxed);
        let mut out = String::with_capacity(8 * 1024);
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            let _ = writeln!(out, "# encoding failed");
        }
        drop(certificates); // certificates lock released here
        out
    }

    /// Adds a source of `strait_tls_certificate_expiry_seconds`; its names are shown
    /// while `source` lives.
    pub fn watch_certificates(&self, source: &Arc<dyn CertificateNames>) {
        let mut all = self.certificates.lock().expect("certificates lock");
        all.retain(|w| w.strong_count() > 0);
        all.push(Arc::downgrade(source));
    } // certificates lock released here

    /// One series per name a live source serves, in seconds from now. A name two
    /// listeners serve shows the certificate that expires first.
    fn fill_certificate_expiry(&self, sources: &[std::sync::Weak<dyn CertificateNames>]) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let mut soonest = std::collections::BTreeMap::<Arc<str>, i64>::new();
        for source in sources.iter().filter_map(std::sync::Weak::upgrade) {
            source.for_each_name(&mut |name, not_after| {
                let at = soonest.entry(Arc::from(name)).or_insert(not_after);
                *at = (*at).min(not_after);
            });
        }
        self.certificate_expiry.clear();
        for (name, not_after) in soonest {
            self.certificate_expiry
                .get_or_create(&CertificateLabels { name: Label(name) })
                .set(not_after - now);
        }
    }

    /// One reload of `what` (`certificate`, `config`), taken or refused.
    pub fn count_reload(&self, what: &'static str, ok: bool) {
        self.reloads
            .get_or_create(&ReloadLabels {
                what,
                result: if ok { "ok" } else { "refused" },
            })
            .inc();
    }
}
