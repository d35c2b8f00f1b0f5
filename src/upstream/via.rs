//! Reaching targets through another proxy (`[forward] parent`, `[[route]] via`).
//!
//! An `http` target goes to the proxy in absolute form on a connection to the proxy
//! (the proxy's credentials added to each request); an `https` target, and a client's
//! CONNECT, go through a CONNECT tunnel the proxy opens, with TLS to the target inside
//! it. Connections through a proxy are pooled under their own profile, apart from
//! direct ones; the proxy's own address is the operator's choice, so `deny_targets`
//! does not apply to it (it applies to what the proxy is asked to reach only where
//! Strait resolves the name itself, which through a proxy it does not).

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine;
use bytes::{Buf, Bytes, BytesMut};
use http::HeaderValue;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::connect::{self, ConnectError, Stream, TlsSettings};
use super::dns::Resolver;
use crate::config::{self, AddrRule, ProxyUrl, Scheme, Version};

/// The longest CONNECT response head read from a proxy.
const MAX_HEAD: usize = 16 * 1024;

/// A proxy to go through, resolved once from its URL.
pub struct Via {
    host: String,
    port: u16,
    /// `host:port`, naming the hop in errors.
    authority: String,
    /// TLS to the proxy itself, for an `https://` proxy (HTTP/1.1 only).
    tls: Option<TlsSettings>,
    /// `Basic ...` for the URL's user info.
    auth: Option<HeaderValue>,
}

impl fmt::Debug for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Via({})", self.authority)
    }
}

impl Via {
    pub fn new(url: &ProxyUrl) -> Result<Via, String> {
        let tls = match url.scheme {
            Scheme::Https => Some(TlsSettings::new(Version::H1, None, None, false)?),
            Scheme::Http => None,
        };
        let auth = url.user.as_ref().map(|(name, pass)| {
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{name}:{pass}"));
            HeaderValue::try_from(format!("Basic {token}")).expect("base64 is a valid header value")
        });
        Ok(Via {
            host: url.host.clone(),
            port: url.port,
            authority: url.authority.clone(),
            tls,
            auth,
        })
    }

    /// The proxy's `host:port`.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// `Proxy-Authorization` for requests sent to the proxy in absolute form.
    pub fn auth(&self) -> Option<&HeaderValue> {
        self.auth.as_ref()
    }

    /// A connection to the proxy itself: TCP, and TLS for an `https://` proxy.
    pub async fn connect(
        &self,
        resolver: &Resolver,
        timeout: Duration,
    ) -> Result<Stream, ConnectError> {
        let tcp = connect::connect_tcp(resolver, &self.host, self.port, &[], timeout)
            .await
            .map_err(|e| self.failed(format!("cannot reach it: {e}")))?;
        match &self.tls {
            None => Ok(Stream::Plain(tcp)),
            Some(tls) => tokio::time::timeout(timeout, tls.handshake(&self.host, tcp))
                .await
                .map_err(|_| self.failed("the TLS handshake timed out".into()))?
                .map_err(|e| self.failed(e.to_string())),
        }
    }

    /// A tunnel to `target` (`host:port`) through the proxy: its CONNECT answered
    /// with 2xx. Bytes the proxy sent after its head are the tunnel's first.
    pub async fn tunnel(
        &self,
        resolver: &Resolver,
        target: &str,
        timeout: Duration,
    ) -> Result<Stream, ConnectError> {
        let open = async {
            let mut stream = self.connect(resolver, timeout).await?;
            let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
            if let Some(auth) = &self.auth {
                head.push_str("Proxy-Authorization: ");
                head.push_str(auth.to_str().expect("built from text"));
                head.push_str("\r\n");
            }
            head.push_str("\r\n");
            stream
                .write_all(head.as_bytes())
                .await
                .map_err(|e| self.failed(format!("CONNECT {target}: {e}")))?;
            let mut buf = BytesMut::with_capacity(1024);
            let (status, reason, len) = loop {
                if stream
                    .read_buf(&mut buf)
                    .await
                    .map_err(|e| self.failed(format!("CONNECT {target}: {e}")))?
                    == 0
                {
                    return Err(self.failed(format!("closed before answering CONNECT {target}")));
                }
                let mut headers = [httparse::EMPTY_HEADER; 64];
                let mut resp = httparse::Response::new(&mut headers);
                match resp.parse(&buf) {
                    Ok(httparse::Status::Complete(len)) => {
                        break (
                            resp.code.unwrap_or(0),
                            resp.reason.unwrap_or("").to_owned(),
                            len,
                        );
                    }
                    Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
                    Ok(httparse::Status::Partial) => {
                        return Err(self.failed(format!("CONNECT {target}: head too long")));
                    }
                    Err(e) => {
                        return Err(self.failed(format!("CONNECT {target}: malformed answer: {e}")));
                    }
                }
            };
            if !(200..300).contains(&status) {
                let hint = if status == 407 {
                    ": check the credentials in its URL"
                } else {
                    ""
                };
                return Err(self.failed(format!(
                    "answered CONNECT {target} with {status} {reason}{hint}"
                )));
            }
            buf.advance(len);
            Ok(Stream::Via(
                Box::new(Prefixed {
                    first: buf.freeze(),
                    inner: stream,
                }),
                false,
            ))
        };
        tokio::time::timeout(timeout, open)
            .await
            .unwrap_or_else(|_| Err(self.failed(format!("CONNECT {target} timed out"))))
    }

    fn failed(&self, why: String) -> ConnectError {
        ConnectError::Via(format!("parent proxy {}: {why}", self.authority))
    }
}

/// Through a proxy Strait resolves no name, so `deny_targets` can only be held against
/// an address written in the request (`2130706433` included); the proxy's own policy
/// covers names.
pub fn check_written(host: &str, deny: &[AddrRule]) -> Result<(), ConnectError> {
    match config::host_ip(host) {
        Ok(Some(ip)) => match config::denied_by(deny, ip) {
            Some(rule) => Err(ConnectError::Denied(ip, rule.written.clone())),
            None => Ok(()),
        },
        Ok(None) => Ok(()),
        Err(_) => Err(ConnectError::BadAddress(host.to_owned())),
    }
}

/// A stream whose first bytes were already read (a tunnel's, behind the proxy's head).
struct Prefixed<S> {
    first: Bytes,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.first.is_empty() {
            let n = self.first.len().min(buf.remaining());
            buf.put_slice(&self.first.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What a request to an `http` target through a proxy is written with: the absolute
/// form's `http://authority` before the path, and the proxy's credentials.
#[derive(Debug, Clone)]
pub struct AbsoluteForm {
    pub origin: Bytes,
    pub auth: Option<HeaderValue>,
}

impl AbsoluteForm {
    pub fn new(via: &Via, scheme: Scheme, authority: &str) -> AbsoluteForm {
        AbsoluteForm {
            origin: Bytes::from(format!("{}://{authority}", scheme.as_str())),
            auth: via.auth.clone(),
        }
    }
}
