//! Opening upstream connections: resolve, check, TCP connect, TLS with ALPN; or a
//! Unix socket's connect.
//!
//! The address that is checked against `deny_targets` is the very address connected to:
//! resolution happens once, here, and the result is filtered before any connect, so a
//! name that resolves differently a moment later (DNS rebinding) cannot slip past.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::dns::Resolver;
use crate::config::{AddrRule, Version};

/// Why a connection could not be opened. None of these sent a request byte.
#[derive(Debug, Clone)]
pub enum ConnectError {
    /// Every address the target resolved to is in `deny_targets`: the first such
    /// address and the rule (as written) that covers it.
    Denied(IpAddr, Arc<str>),
    /// The host ends in a number but is no IPv4 address (`256.1`, `1.2.3.4.5`).
    BadAddress(String),
    /// The name did not resolve.
    Resolve(String, Arc<io::Error>),
    /// No address accepted the connection.
    Refused(SocketAddr, Arc<io::Error>),
    /// The Unix socket did not accept the connection (no file, nobody listening, no
    /// permission).
    UnixRefused(Arc<Path>, Arc<io::Error>),
    /// `timeouts.connect` passed.
    TimedOut(String),
    /// The TLS handshake failed (certificate, name, protocol).
    Tls(String, Arc<io::Error>),
    /// The proxy in between (`parent`, `via`) failed or refused: which hop, and how.
    Via(String),
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::Denied(ip, rule) => {
                write!(f, "target address {ip} is in deny_targets ({rule:?})")
            }
            ConnectError::BadAddress(host) => write!(f, "{host:?} is not a valid address"),
            ConnectError::Resolve(host, e) => write!(f, "cannot resolve {host}: {e}"),
            ConnectError::Refused(addr, e) => write!(f, "cannot connect to {addr}: {e}"),
            ConnectError::UnixRefused(path, e) => {
                write!(f, "cannot connect to unix:{}: {e}", path.display())
            }
            ConnectError::TimedOut(host) => write!(f, "connecting to {host} timed out"),
            ConnectError::Tls(host, e) => write!(f, "TLS handshake with {host} failed: {e}"),
            ConnectError::Via(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for ConnectError {}

/// Resolves `host:port` (an IP literal as itself, a name through `resolver`), drops
/// denied addresses, and connects to the first that answers.
pub async fn connect_tcp(
    resolver: &Resolver,
    host: &str,
    port: u16,
    deny: &[AddrRule],
    timeout: Duration,
) -> Result<TcpStream, ConnectError> {
    let attempt = async {
        // An address in any spelling is connected to as the address it spells, never
        // looked up as a name.
        let literal =
            crate::config::host_ip(host).map_err(|_| ConnectError::BadAddress(host.to_owned()))?;
        let addrs: Vec<SocketAddr> = match literal {
            Some(ip) => vec![SocketAddr::new(ip, port)],
            None => resolver
                .lookup_host(host, port)
                .await
                .map_err(|e| ConnectError::Resolve(host.to_owned(), Arc::new(e)))?
                .collect(),
        };
        let mut denied = None;
        let allowed: Vec<SocketAddr> = addrs
            .into_iter()
            .filter(|addr| match crate::config::denied_by(deny, addr.ip()) {
                Some(rule) => {
                    denied.get_or_insert((addr.ip(), rule.written.clone()));
                    false
                }
                None => true,
            })
            .collect();
        if allowed.is_empty() {
            return Err(denied
                .map(|(ip, rule)| ConnectError::Denied(ip, rule))
                .unwrap_or_else(|| {
                    ConnectError::Resolve(
                        host.to_owned(),
                        Arc::new(io::Error::new(io::ErrorKind::NotFound, "no addresses")),
                    )
                }));
        }
        let stream = connect_first(interleave_families(allowed)).await?;
        // Requests are written whole; waiting for more bytes only adds latency.
        let _ = stream.set_nodelay(true);
        Ok(stream)
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| Err(ConnectError::TimedOut(format!("{host}:{port}"))))
}

/// Connects to the Unix socket at `path` within `timeout`.
pub async fn connect_unix(path: &Arc<Path>, timeout: Duration) -> Result<UnixStream, ConnectError> {
    match tokio::time::timeout(timeout, UnixStream::connect(path)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(ConnectError::UnixRefused(path.clone(), Arc::new(e))),
        Err(_) => Err(ConnectError::TimedOut(format!("unix:{}", path.display()))),
    }
}

/// How long a connection attempt runs alone before the next address is tried beside it
/// (RFC 8305's "Connection Attempt Delay", whose recommended value this is).
const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// Connects to the first of `addrs` that answers. An attempt that fails starts the
/// next at once; one that hangs (an address that drops packets) gets
/// [`ATTEMPT_DELAY`] alone, then the next runs beside it, and the first to connect
/// wins (RFC 8305, "Happy Eyeballs"). A hanging address so costs a name with several
/// addresses 250 ms, not all of `timeouts.connect`.
async fn connect_first(addrs: Vec<SocketAddr>) -> Result<TcpStream, ConnectError> {
    if let [addr] = addrs[..] {
        return TcpStream::connect(addr)
            .await
            .map_err(|e| ConnectError::Refused(addr, Arc::new(e)));
    }
    let mut last_err = ConnectError::Refused(
        addrs[0],
        Arc::new(io::Error::other("connection attempt failed")),
    );
    let mut waiting = addrs.into_iter();
    // Dropped (and so aborted) with the losers still running when one wins.
    let mut attempts = tokio::task::JoinSet::new();
    loop {
        match waiting.next() {
            Some(addr) => {
                attempts.spawn(async move { (addr, TcpStream::connect(addr).await) });
            }
            None if attempts.is_empty() => return Err(last_err),
            None => {}
        }
        // Until an attempt ends, or the delay passes while addresses are left.
        let more = waiting.len() > 0;
        tokio::select! {
            Some(done) = attempts.join_next() => match done {
                Ok((_, Ok(stream))) => return Ok(stream),
                Ok((addr, Err(e))) => last_err = ConnectError::Refused(addr, Arc::new(e)),
                // A task that panicked or was cancelled: as good as refused.
                Err(_) => {}
            },
            () = tokio::time::sleep(ATTEMPT_DELAY), if more => {}
            else => {}
        }
    }
}

/// The addresses in the resolver's order, but alternating IPv6 and IPv4 from the
/// resolver's first family on (RFC 8305 §4), so that a family that does not work
/// costs one attempt delay, not one per address.
fn interleave_families(addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let Some(first) = addrs.first() else {
        return addrs;
    };
    let first_v6 = first.is_ipv6();
    let (same, other): (Vec<_>, Vec<_>) = addrs.into_iter().partition(|a| a.is_ipv6() == first_v6);
    let mut out = Vec::with_capacity(same.len() + other.len());
    let (mut a, mut b) = (same.into_iter(), other.into_iter());
    loop {
        match (a.next(), b.next()) {
            (None, None) => break,
            (x, y) => out.extend(x.into_iter().chain(y)),
        }
    }
    out
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
                for cert in crate::pem::read_certs(path)? {
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
        self.handshake_over(host, tcp)
            .await
            .map(|tls| Stream::Tls(Box::new(tls)))
    }

    /// Runs the handshake over a tunnel through a proxy.
    pub async fn handshake_tunnelled(
        &self,
        host: &str,
        tunnel: Stream,
    ) -> Result<Stream, ConnectError> {
        let tls = self.handshake_over(host, tunnel).await?;
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        Ok(Stream::Via(Box::new(tls), h2))
    }

    async fn handshake_over<IO>(&self, host: &str, io: IO) -> Result<TlsStream<IO>, ConnectError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
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
            .connect(name, io)
            .await
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

/// An open upstream connection: plain TCP, TLS, or a Unix socket.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// Through another proxy's CONNECT tunnel (TLS inside it, or not), and whether
    /// ALPN settled on HTTP/2.
    Via(Box<dyn Tunnelled>, bool),
    Unix(UnixStream),
    /// An in-memory pipe, for the pool's unit tests.
    #[cfg(test)]
    Duplex(tokio::io::DuplexStream),
}

impl Stream {
    /// True when ALPN settled on HTTP/2.
    pub fn is_h2(&self) -> bool {
        match self {
            Stream::Tls(tls) => tls.get_ref().1.alpn_protocol() == Some(b"h2"),
            Stream::Via(_, h2) => *h2,
            _ => false,
        }
    }
}

/// What a tunnel through a proxy is: any byte stream.
pub trait Tunnelled: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Tunnelled for T {}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Via(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
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
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Via(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
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
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Stream::Via(s, _) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            #[cfg(test)]
            Stream::Duplex(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Unix(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
            Stream::Via(s, _) => s.is_write_vectored(),
            #[cfg(test)]
            Stream::Duplex(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Via(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
            #[cfg(test)]
            Stream::Duplex(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Via(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
            #[cfg(test)]
            Stream::Duplex(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_alternate_from_the_resolvers_first() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let (v6a, v6b, v4a, v4b) = (a("[::1]:1"), a("[::2]:1"), a("10.0.0.1:1"), a("10.0.0.2:1"));
        assert_eq!(
            interleave_families(vec![v6a, v6b, v4a, v4b]),
            vec![v6a, v4a, v6b, v4b]
        );
        assert_eq!(
            interleave_families(vec![v4a, v4b, v6a]),
            vec![v4a, v6a, v4b]
        );
        assert_eq!(interleave_families(vec![v4a, v4b]), vec![v4a, v4b]);
    }

    /// A listener whose accept queue is full drops new SYNs: connecting to it hangs, as
    /// to an address that drops packets.
    async fn hanging_address() -> (tokio::net::TcpListener, Vec<TcpStream>, SocketAddr) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut queued = Vec::new();
        for _ in 0..4 {
            let attempt =
                tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr));
            if let Ok(Ok(s)) = attempt.await {
                queued.push(s);
            }
        }
        (listener, queued, addr)
    }

    #[tokio::test]
    async fn an_address_that_hangs_costs_one_attempt_delay_not_the_connect_timeout() {
        let (_full, _queued, hangs) = hanging_address().await;
        let alone = tokio::time::timeout(Duration::from_millis(600), TcpStream::connect(hangs));
        assert!(
            alone.await.is_err(),
            "the address must hang for this test to mean anything"
        );

        let good = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good_addr = good.local_addr().unwrap();
        let started = std::time::Instant::now();
        let stream = tokio::time::timeout(
            Duration::from_secs(3),
            connect_first(vec![hangs, good_addr]),
        )
        .await
        .expect("the second address is tried beside the hanging first")
        .unwrap();
        assert_eq!(stream.peer_addr().unwrap(), good_addr);
        assert!(started.elapsed() >= ATTEMPT_DELAY);
    }

    #[tokio::test]
    async fn the_address_connected_to_is_one_the_deny_list_passed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        // The name's first address is denied; the second is where the listener is.
        let r = Resolver::for_tests("127.0.0.2 two.test\n127.0.0.1 two.test\n");
        let deny: Vec<crate::config::AddrRule> = vec!["127.0.0.2".parse().unwrap()];
        let timeout = Duration::from_secs(2);
        let s = connect_tcp(&r, "two.test", port, &deny, timeout)
            .await
            .unwrap();
        assert_eq!(s.peer_addr().unwrap(), listener.local_addr().unwrap());

        let deny: Vec<crate::config::AddrRule> = vec!["127.0.0.0/8".parse().unwrap()];
        let err = connect_tcp(&r, "two.test", port, &deny, timeout)
            .await
            .unwrap_err();
        assert!(
            matches!(err, ConnectError::Denied(ip, _) if ip.to_string() == "127.0.0.2"),
            "{err}"
        );
        // A literal is never looked up, and is judged the same way.
        let err = connect_tcp(&r, "127.0.0.1", port, &deny, timeout)
            .await
            .unwrap_err();
        assert!(matches!(err, ConnectError::Denied(..)), "{err}");
    }

    #[tokio::test]
    async fn a_name_listed_with_both_families_alternates_them_from_ipv4() {
        let r = Resolver::for_tests("::1 both.test\n127.0.0.1 both.test\n127.0.0.2 both.test\n");
        let addrs: Vec<SocketAddr> = r.lookup_host("both.test", 80).await.unwrap().collect();
        let got: Vec<String> = interleave_families(addrs)
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(got, ["127.0.0.1:80", "[::1]:80", "127.0.0.2:80"]);
    }

    #[tokio::test]
    async fn a_refused_address_starts_the_next_at_once() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let good = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good_addr = good.local_addr().unwrap();
        let started = std::time::Instant::now();
        let stream = connect_first(vec![closed, good_addr]).await.unwrap();
        assert_eq!(stream.peer_addr().unwrap(), good_addr);
        assert!(started.elapsed() < ATTEMPT_DELAY);
        let err = connect_first(vec![closed, closed]).await.unwrap_err();
        assert!(
            matches!(err, ConnectError::Refused(a, _) if a == closed),
            "{err}"
        );
    }
}
