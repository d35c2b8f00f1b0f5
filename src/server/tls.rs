//! TLS on the client side: one acceptor per listener whose certificate can be replaced
//! while Strait runs.
//!
//! The certified key lives behind a resolver (rustls' `ResolvesServerCert`) that new
//! handshakes consult; established connections keep the key they started with. A watcher
//! task looks at the certificate and key files every [`WATCH_EVERY`] (size, mtime and
//! inode, so both replace-by-rename, as certbot and acme.sh do, and in-place rewrites are
//! seen) and on SIGHUP. A pair that does not load, or does not match, is refused with a
//! logged error and the old pair stays in service.

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::config::TlsFiles;
use crate::net::Stream;

/// How often the certificate and key files are looked at.
pub const WATCH_EVERY: Duration = Duration::from_secs(2);

/// Accepts TLS connections for one listener, offering ALPN `h2` and `http/1.1`.
#[derive(Clone)]
pub struct Acceptor {
    inner: TlsAcceptor,
    resolver: Arc<Resolver>,
    files: TlsFiles,
}

/// Hands new handshakes the current certified key.
struct Resolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Resolver")
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().expect("cert lock").clone())
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads a certificate chain (leaf first, then intermediates) and its key (RSA, ECDSA or
/// Ed25519; PKCS#8, PKCS#1 or SEC1) and checks that they belong together. The error
/// names the file at fault.
pub fn load_pair(files: &TlsFiles) -> Result<CertifiedKey, String> {
    let chain = crate::pem::read_certs(&files.cert)?;
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
    Ok(certified)
}

impl Acceptor {
    /// Loads the pair and builds the acceptor.
    pub fn load(files: &TlsFiles) -> Result<Acceptor, String> {
        let resolver = Arc::new(Resolver {
            current: RwLock::new(Arc::new(load_pair(files)?)),
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
            files: files.clone(),
        })
    }

    pub async fn accept(&self, stream: Stream) -> std::io::Result<TlsStream<Stream>> {
        self.inner.accept(stream).await
    }

    /// Loads the files again; on success new handshakes use the new pair.
    pub fn reload(&self) -> Result<(), String> {
        let pair = load_pair(&self.files)?;
        *self.resolver.current.write().expect("cert lock") = Arc::new(pair);
        Ok(())
    }

    /// Watches the files and reloads when they change or `hup` is notified. Runs until
    /// the process ends.
    pub async fn watch(self, hup: Arc<Notify>, metrics: Arc<crate::metrics::Metrics>) {
        let mut seen = signature(&self.files);
        let mut tick = tokio::time::interval(WATCH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let forced = tokio::select! {
                _ = tick.tick() => false,
                () = hup.notified() => true,
            };
            let now = signature(&self.files);
            if !forced && now == seen {
                continue;
            }
            // Remembered even on failure: a broken pair is reported once, not every tick;
            // the next change is tried again.
            seen = now;
            let why = if forced { "SIGHUP" } else { "files changed" };
            let result = self.reload();
            metrics.count_reload("certificate", result.is_ok());
            match result {
                Ok(()) => tracing::info!(
                    cert = %self.files.cert.display(),
                    "certificate reloaded ({why})"
                ),
                Err(e) => tracing::error!(
                    cert = %self.files.cert.display(),
                    "certificate reload refused ({why}), the old one stays in service: {e}"
                ),
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
