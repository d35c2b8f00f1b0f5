//! Opening upstream connections: resolve, check, TCP connect, TLS with ALPN.
//!
//! The address that is checked against `deny_targets` is the very address connected to:
//! resolution happens once, here, and the result is filtered before any connect, so a
//! name that resolves differently a moment later (DNS rebinding) cannot slip past.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::config::{Cidr, Version};

/// Why a connection could not be opened. None of these sent a request byte.
#[derive(Debug, Clone)]
pub enum ConnectError {
    /// Every address the target resolved to is in `deny_targets`.
    Denied(IpAddr),
    /// The name did not resolve.
    Resolve(String, Arc<io::Error>),
    /// No address accepted the connection.
    Refused(SocketAddr, Arc<io::Error>),
    /// `timeouts.connect` passed.
    TimedOut(String),
    /// The TLS handshake failed (certificate, name, protocol).
    Tls(String, Arc<io::Error>),
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::Denied(ip) => write!(f, "target address {ip} is in deny_targets"),
            ConnectError::Resolve(host, e) => write!(f, "cannot resolve {host}: {e}"),
            ConnectError::Refused(addr, e) => write!(f, "cannot connect to {addr}: {e}"),
            ConnectError::TimedOut(host) => write!(f, "connecting to {host} timed out"),
            ConnectError::Tls(host, e) => write!(f, "TLS handshake with {host} failed: {e}"),
        }
    }
}

impl std::error::Error for ConnectError {}

/// Resolves `host:port`, drops denied addresses, and connects to the first that answers.
pub async fn connect_tcp(
    host: &str,
    port: u16,
    deny: &[Cidr],
    timeout: Duration,
) -> Result<TcpStream, ConnectError> {
    let attempt = async {
        let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::net::lookup_host((host, port))
                .await
                .map_err(|e| ConnectError::Resolve(host.to_owned(), Arc::new(e)))?
                .collect(),
        };
        let mut denied = None;
        let mut last_err = None;
        for addr in addrs {
            if let Some(_block) = deny.iter().find(|c| c.contains(addr.ip())) {
                denied.get_or_insert(addr.ip());
                continue;
            }
            match TcpStream::connect(addr).await {
                Ok(stream) => {
                    // Requests are written whole; waiting for more bytes only adds latency.
                    let _ = stream.set_nodelay(true);
                    return Ok(stream);
                }
                Err(e) => last_err = Some(ConnectError::Refused(addr, Arc::new(e))),
            }
        }
        Err(last_err
            .or(denied.map(ConnectError::Denied))
            .unwrap_or_else(|| {
                ConnectError::Resolve(
                    host.to_owned(),
                    Arc::new(io::Error::new(io::ErrorKind::NotFound, "no addresses")),
                )
            }))
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| Err(ConnectError::TimedOut(format!("{host}:{port}"))))
}

/// How to speak TLS to an upstream: roots, name and ALPN, resolved once.
#[derive(Clone)]
pub struct TlsSettings {
    connector: TlsConnector,
    /// Overrides the URL's host for SNI and certificate checks.
    server_name: Option<ServerName<'static>>,
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSettings")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// The built-in roots: webpki's plus the system's, loaded once per process.
fn default_roots() -> &'static RootCertStore {
    static ROOTS: OnceLock<RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let native = rustls_native_certs::load_native_certs();
        // Native stores often hold a few certificates rustls rejects; skip those.
        let (ok, bad) = roots.add_parsable_certificates(native.certs);
        tracing::debug!(added = ok, skipped = bad, "loaded system root certificates");
        roots
    })
}

/// Reads every certificate in a PEM file.
pub fn read_pem_certs(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not a PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate found", path.display()));
    }
    Ok(certs)
}

impl TlsSettings {
    /// Builds client TLS settings. `extra_roots` adds to the built-in roots.
    pub fn new(
        version: Version,
        extra_roots: Option<&std::path::Path>,
        server_name: Option<&str>,
        insecure: bool,
    ) -> Result<TlsSettings, String> {
        let builder =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?;
        let mut config = if insecure {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification))
                .with_no_client_auth()
        } else {
            let mut roots = default_roots().clone();
            if let Some(path) = extra_roots {
                for cert in read_pem_certs(path)? {
                    roots
                        .add(cert)
                        .map_err(|e| format!("{}: unusable CA certificate: {e}", path.display()))?;
                }
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        };
        config.alpn_protocols = match version {
            Version::H1 => vec![b"http/1.1".to_vec()],
            Version::H2 => vec![b"h2".to_vec()],
            Version::Auto => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        };
        let server_name = server_name
            .map(|n| {
                ServerName::try_from(n.to_owned())
                    .map_err(|_| format!("invalid TLS server name {n:?}"))
            })
            .transpose()?;
        Ok(TlsSettings {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }

    /// The same settings, offering only HTTP/1.1 in ALPN: for requests that switch
    /// protocols, which HTTP/2 cannot carry.
    pub fn h1_only(&self) -> TlsSettings {
        let mut config = ClientConfig::clone(self.connector.config());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        TlsSettings {
            connector: TlsConnector::from(Arc::new(config)),
            server_name: self.server_name.clone(),
        }
    }

    /// Runs the handshake over `tcp`.
    pub async fn handshake(&self, host: &str, tcp: TcpStream) -> Result<Stream, ConnectError> {
        let name = match &self.server_name {
            Some(n) => n.clone(),
            None => ServerName::try_from(host.to_owned()).map_err(|_| {
                ConnectError::Tls(
                    host.to_owned(),
                    Arc::new(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "not a valid TLS server name",
                    )),
                )
            })?,
        };
        self.connector
            .connect(name, tcp)
            .await
            .map(|tls| Stream::Tls(Box::new(tls)))
            .map_err(|e| ConnectError::Tls(host.to_owned(), Arc::new(e)))
    }
}

/// `tls_insecure = true`: accept any certificate. Signatures are still checked so the
/// handshake is well-formed; only the identity is not.
#[derive(Debug)]
struct NoVerification;

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// An open upstream connection, plain or TLS.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// An in-memory pipe, for the pool's unit tests.
    #[cfg(test)]
    Duplex(tokio::io::DuplexStream),
}

impl Stream {
    /// True when ALPN settled on HTTP/2.
    pub fn is_h2(&self) -> bool {
        match self {
            Stream::Tls(tls) => tls.get_ref().1.alpn_protocol() == Some(b"h2"),
            _ => false,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            #[cfg(test)]
            Stream::Duplex(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            #[cfg(test)]
            Stream::Duplex(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            #[cfg(test)]
            Stream::Duplex(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
            #[cfg(test)]
            Stream::Duplex(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            #[cfg(test)]
            Stream::Duplex(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            #[cfg(test)]
            Stream::Duplex(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
