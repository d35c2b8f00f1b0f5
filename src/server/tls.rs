//! TLS on the client side: one acceptor per listener, serving one or several
//! certificates chosen by the ClientHello's server name, each replaceable while Strait
//! runs.
//!
//! The pairs live behind a resolver (rustls' `ResolvesServerCert`) that new handshakes
//! consult; established connections keep the key they started with. The name a client
//! asks for is looked up exactly, then as a wildcard one label up (`*.example.com`
//! serves `a.example.com`, not `example.com` nor `a.b.example.com`); a client that names
//! no server, or a name no pair covers, gets the first pair. A name two pairs cover goes
//! to the first of them ([`overlaps`] lists such names for `--check` and the log).
//!
//! A watcher task looks at every pair's files every [`WATCH_EVERY`] (size, mtime and
//! inode, so both replace-by-rename, as certbot and acme.sh do, and in-place rewrites are
//! seen) and on SIGHUP. Each pair reloads on its own: one that does not load, or does
//! not match, is refused with a logged error and its old version stays in service; the
//! others are not touched.

use std::collections::HashMap;
use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::config::{ListenTls, TlsFiles};
use crate::metrics::{CertificateNames, Metrics};
use crate::net::Stream;

/// How often the certificate and key files are looked at.
pub const WATCH_EVERY: Duration = Duration::from_secs(2);

/// Accepts TLS connections for one listener, offering ALPN `h2` and `http/1.1`.
#[derive(Clone)]
pub struct Acceptor {
    inner: TlsAcceptor,
    resolver: Arc<Resolver>,
    tls: ListenTls,
}

/// One certificate and key pair as loaded: the key rustls signs with, the names the
/// certificate covers and the end of its validity.
#[derive(Clone)]
pub struct Pair {
    key: Arc<CertifiedKey>,
    /// Lower case, no trailing dot; a wildcard as `*.example.com`.
    names: Vec<String>,
    /// `notAfter`, in Unix seconds.
    not_after: i64,
}

impl Pair {
    /// The names the certificate covers: its subjectAltName DNS names, or its subject's
    /// common name when it has none.
    pub fn names(&self) -> &[String] {
        &self.names
    }
}

/// The pairs of a listener and which of them serves which name; rebuilt whole whenever
/// a pair is (re)loaded, so a handshake sees one consistent table.
struct Table {
    pairs: Vec<Pair>,
    exact: HashMap<String, usize>,
    /// `*.example.com` under `example.com`.
    wildcard: HashMap<String, usize>,
}

impl Table {
    fn new(pairs: Vec<Pair>) -> Table {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for (i, p) in pairs.iter().enumerate() {
            for name in &p.names {
                let (map, key) = match name.strip_prefix("*.") {
                    Some(parent) => (&mut wildcard, parent),
                    None => (&mut exact, name.as_str()),
                };
                // The first pair that covers a name serves it.
                map.entry(key.to_owned()).or_insert(i);
            }
        }
        Table {
            pairs,
            exact,
            wildcard,
        }
    }

    /// The pair for a ClientHello's server name: exact, then a wildcard one label up,
    /// then the first.
    fn pick(&self, server_name: Option<&str>) -> usize {
        let Some(name) = server_name else { return 0 };
        let name = name.strip_suffix('.').unwrap_or(name);
        // rustls hands over the name in lower case already; a copy only if it did not.
        let lower;
        let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = name.to_ascii_lowercase();
            lower.as_str()
        } else {
            name
        };
        if let Some(&i) = self.exact.get(name) {
            return i;
        }
        name.split_once('.')
            .and_then(|(_, parent)| self.wildcard.get(parent))
            .copied()
            .unwrap_or(0)
    }

    /// Each name with the `notAfter` of the pair that serves it.
    fn for_each_name(&self, f: &mut dyn FnMut(&str, i64)) {
        for (name, &i) in &self.exact {
            f(name, self.pairs[i].not_after);
        }
        for (parent, &i) in &self.wildcard {
            f(&format!("*.{parent}"), self.pairs[i].not_after);
        }
    }
}

/// Hands new handshakes the pair for the name they ask for.
struct Resolver {
    table: ArcSwap<Table>,
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Resolver")
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let table = self.table.load();
        Some(table.pairs[table.pick(hello.server_name())].key.clone())
    }
}

/// The resolver's names for the metrics, alive as long as the watcher.
struct Names(Arc<Resolver>);

impl CertificateNames for Names {
    fn for_each_name(&self, f: &mut dyn FnMut(&str, i64)) {
        self.0.table.load().for_each_name(f)
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads a certificate chain (leaf first, then intermediates) and its key (RSA, ECDSA or
/// Ed25519; PKCS#8, PKCS#1 or SEC1), checks that they belong together and reads the
/// leaf's names and expiry. The error names the file at fault.
pub fn load_pair(files: &TlsFiles) -> Result<Pair, String> {
    let chain = crate::pem::read_certs(&files.cert)?;
    let (names, not_after) = read_leaf(&chain[0])
        .map_err(|e| format!("{}: not a usable certificate: {e}", files.cert.display()))?;
    let key_der = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| format!("{}: no usable private key: {e}", files.key.display()))?;
    let key = provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| format!("{}: unsupported private key: {e}", files.key.display()))?;
    let certified = CertifiedKey::new(chain, key);
    certified.keys_match().map_err(|e| {
        format!(
            "{} and {} do not belong together: {e}",
            files.cert.display(),
            files.key.display()
        )
    })?;
    Ok(Pair {
        key: Arc::new(certified),
        names,
        not_after,
    })
}

/// A leaf certificate's DNS names (subjectAltName, else the subject's common name),
/// normalised, and its `notAfter`.
fn read_leaf(der: &[u8]) -> Result<(Vec<String>, i64), String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let mut names: Vec<String> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|g| match g {
                GeneralName::DNSName(n) => Some(normalise(n)),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => return Err(format!("subjectAltName: {e}")),
    };
    if names.is_empty() {
        names = cert
            .subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok())
            .map(normalise)
            .collect();
    }
    names.retain(|n| !n.is_empty());
    names.dedup();
    Ok((names, cert.validity().not_after.timestamp()))
}

fn normalise(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// Names more than one pair covers, each with the pair that serves it and one it
/// shadows, as sentences naming both certificate files; and pairs after the first
/// that cover no name at all (no client can reach them).
pub fn overlaps(tls: &ListenTls, pairs: &[Pair]) -> Vec<String> {
    let table = Table::new(pairs.to_vec());
    let mut out = Vec::new();
    for (i, p) in pairs.iter().enumerate() {
        if i > 0 && p.names.is_empty() {
            out.push(format!(
                "{} covers no DNS name, so no client is given it (clients asking for no known name get the first)",
                tls.pairs[i].cert.display()
            ));
        }
        for name in &p.names {
            let first = match name.strip_prefix("*.") {
                Some(parent) => table.wildcard[parent],
                None => table.exact[name.as_str()],
            };
            if first != i {
                out.push(format!(
                    "{name} is covered by both {} and {}; the first, {}, serves it",
                    tls.pairs[first].cert.display(),
                    tls.pairs[i].cert.display(),
                    tls.pairs[first].cert.display(),
                ));
            }
        }
    }
    out
}

/// Loads every pair of a listener; the error names the file at fault. What `--check`
/// reads, and the acceptor too.
pub fn load_all(tls: &ListenTls) -> Result<Vec<Pair>, String> {
    tls.pairs.iter().map(load_pair).collect()
}

impl Acceptor {
    /// Loads the pairs and builds the acceptor; names two pairs cover are logged.
    pub fn load(tls: &ListenTls) -> Result<Acceptor, String> {
        let pairs = load_all(tls)?;
        for warning in overlaps(tls, &pairs) {
            tracing::warn!("{warning}");
        }
        let resolver = Arc::new(Resolver {
            table: ArcSwap::from_pointee(Table::new(pairs)),
        });
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Acceptor {
            inner: TlsAcceptor::from(Arc::new(config)),
            resolver,
            tls: tls.clone(),
        })
    }

    pub async fn accept(&self, stream: Stream) -> std::io::Result<TlsStream<Stream>> {
        self.inner.accept(stream).await
    }

    /// Loads pair `i`'s files again; on success new handshakes use the new pair, the
    /// others as they were.
    pub fn reload(&self, i: usize) -> Result<(), String> {
        let pair = load_pair(&self.tls.pairs[i])?;
        let old = self.resolver.table.load_full();
        let mut pairs = old.pairs.clone();
        pairs[i] = pair;
        let before = overlaps(&self.tls, &old.pairs);
        for warning in overlaps(&self.tls, &pairs) {
            if !before.contains(&warning) {
                tracing::warn!("{warning}");
            }
        }
        // Only the watcher task stores, so nothing stored since `old` was read.
        self.resolver.table.store(Arc::new(Table::new(pairs)));
        Ok(())
    }

    /// Watches every pair's files and reloads a pair when they change, and all of them
    /// when `hup` is notified. Its names are in the metrics while it runs, which is until
    /// the listener stops.
    pub async fn watch(self, hup: Arc<Notify>, metrics: Arc<Metrics>) {
        let names: Arc<dyn CertificateNames> = Arc::new(Names(self.resolver.clone()));
        metrics.watch_certificates(&names);
        let mut seen: Vec<_> = self.tls.pairs.iter().map(signature).collect();
        let mut tick = tokio::time::interval(WATCH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let forced = tokio::select! {
                _ = tick.tick() => false,
                () = hup.notified() => true,
            };
            for (i, files) in self.tls.pairs.iter().enumerate() {
                let now = signature(files);
                if !forced && now == seen[i] {
                    continue;
                }
                // Remembered even on failure: a broken pair is reported once, not every
                // tick; the next change is tried again.
                seen[i] = now;
                let why = if forced { "SIGHUP" } else { "files changed" };
                let result = self.reload(i);
                metrics.count_reload("certificate", result.is_ok());
                match result {
                    Ok(()) => tracing::info!(
                        cert = %files.cert.display(),
                        "certificate reloaded ({why})"
                    ),
                    Err(e) => tracing::error!(
                        cert = %files.cert.display(),
                        "certificate reload refused ({why}), the old one stays in service: {e}"
                    ),
                }
            }
        }
    }
}

/// What identifies a file's content without reading it: inode, size, mtime.
type Signature = Option<(u64, u64, i64, i64)>;

fn file_signature(path: &Path) -> Signature {
    let m = std::fs::metadata(path).ok()?;
    Some((m.ino(), m.len(), m.mtime(), m.mtime_nsec()))
}

fn signature(files: &TlsFiles) -> (Signature, Signature) {
    (file_signature(&files.cert), file_signature(&files.key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(names: &[&str]) -> Pair {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap()
                .self_signed(&key)
                .unwrap();
        let der = cert.der().to_vec();
        let (names, not_after) = read_leaf(&der).unwrap();
        let signer = provider()
            .key_provider
            .load_private_key(PrivateKeyDer::try_from(key.serialize_der()).unwrap())
            .unwrap();
        Pair {
            key: Arc::new(CertifiedKey::new(vec![der.into()], signer)),
            names,
            not_after,
        }
    }

    #[test]
    fn exact_names_win_then_one_label_wildcards_then_the_first() {
        let t = Table::new(vec![
            pair(&["default.test"]),
            pair(&["a.test", "A.Other.Test."]),
            pair(&["*.wild.test"]),
            pair(&["x.wild.test"]),
        ]);
        assert_eq!(t.pick(None), 0);
        assert_eq!(t.pick(Some("a.test")), 1);
        assert_eq!(t.pick(Some("A.TEST.")), 1);
        assert_eq!(
            t.pick(Some("a.other.test")),
            1,
            "the certificate's name normalised"
        );
        assert_eq!(t.pick(Some("b.wild.test")), 2);
        assert_eq!(t.pick(Some("x.wild.test")), 3, "exact beats wildcard");
        assert_eq!(t.pick(Some("wild.test")), 0, "a wildcard needs its label");
        assert_eq!(t.pick(Some("a.b.wild.test")), 0, "and only one");
        assert_eq!(t.pick(Some("unknown.test")), 0);
        assert_eq!(t.pick(Some("test")), 0);
    }

    #[test]
    fn a_name_covered_twice_goes_to_the_first_and_is_reported() {
        let pairs = vec![
            pair(&["a.test", "*.w.test"]),
            pair(&["b.test", "a.test"]),
            pair(&["*.w.test"]),
        ];
        let t = Table::new(pairs.clone());
        assert_eq!(t.pick(Some("a.test")), 0);
        assert_eq!(t.pick(Some("z.w.test")), 0);
        assert_eq!(t.pick(Some("b.test")), 1);
        let files = |n: &str| TlsFiles {
            cert: format!("{n}.pem").into(),
            key: format!("{n}.key").into(),
        };
        let tls = ListenTls {
            pairs: vec![files("one"), files("two"), files("three")],
            written: crate::config::TlsWritten::List,
        };
        let warnings = overlaps(&tls, &pairs);
        assert_eq!(warnings.len(), 2, "{warnings:#?}");
        assert!(warnings[0].starts_with("a.test is covered by both one.pem and two.pem"));
        assert!(warnings[1].starts_with("*.w.test is covered by both one.pem and three.pem"));
    }

    #[test]
    fn the_common_name_counts_only_without_dns_alt_names() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Legacy.Test");
        let der = params.self_signed(&key).unwrap().der().to_vec();
        assert_eq!(read_leaf(&der).unwrap().0, ["legacy.test"]);

        params.subject_alt_names = vec![rcgen::SanType::DnsName("san.test".try_into().unwrap())];
        let der = params.self_signed(&key).unwrap().der().to_vec();
        assert_eq!(read_leaf(&der).unwrap().0, ["san.test"]);
    }
}
