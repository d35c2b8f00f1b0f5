//! TLS on the client side: the acceptor for a listener's certificate and key.

use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::config::TlsFiles;
use crate::upstream::connect::read_pem_certs;

/// Accepts TLS connections for one listener, offering ALPN `h2` and `http/1.1`.
#[derive(Clone)]
pub struct Acceptor {
    inner: TlsAcceptor,
}

impl Acceptor {
    /// Loads the certificate chain and key; the error names the file at fault.
    pub fn load(files: &TlsFiles) -> Result<Acceptor, String> {
        let config = server_config(files)?;
        Ok(Acceptor {
            inner: TlsAcceptor::from(Arc::new(config)),
        })
    }

    pub async fn accept(&self, tcp: TcpStream) -> std::io::Result<TlsStream<TcpStream>> {
        self.inner.accept(tcp).await
    }
}

/// Builds a server config from PEM files: a chain (leaf first, then intermediates) and
/// an RSA, ECDSA or Ed25519 key in PKCS#8, PKCS#1 or SEC1 form.
pub fn server_config(files: &TlsFiles) -> Result<ServerConfig, String> {
    let chain = read_pem_certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| format!("{}: no usable private key: {e}", files.key.display()))?;
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| {
                format!(
                    "{} and {} do not make a usable pair: {e}",
                    files.cert.display(),
                    files.key.display()
                )
            })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}
