//! The client side: listeners, TLS, per-connection serving and graceful shutdown.
//!
//! Each accepted connection is served by hyper (HTTP/1.1, or HTTP/2 by prior knowledge
//! or ALPN) with the header-read timeout armed and an [`IdleTimeoutIo`] underneath.
//! Requests go to the shared [`Proxy`]. This module knows nothing of routes or
//! upstreams.

mod admin;
mod shutdown;
pub mod tls;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;

use crate::access::AccessLog;
use crate::config::Config;
use crate::io::{CountingIo, IdleTimeoutIo};
use crate::metrics::{Label, ListenerLabels, Metrics};
use crate::proxy::{ConnBytes, ConnInfo, Proxy, Tracked};
use crate::upstream::Upstream;
use prometheus_client::metrics::gauge::Gauge;
pub use shutdown::Shutdown;

/// Why Strait could not run.
#[derive(Debug)]
pub enum RunError {
    /// A listener could not be bound (exit 1).
    Bind(SocketAddr, std::io::Error),
    /// A file the config names cannot be used, for example a certificate that does not
    /// parse (exit 2, like any other config problem).
    Config(String),
    /// Other setup failed (exit 1).
    Setup(String),
}

impl RunError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::Config(_) => 2,
            RunError::Bind(..) | RunError::Setup(_) => 1,
        }
    }
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Bind(addr, e) => write!(f, "cannot listen on {addr}: {e}"),
            RunError::Config(msg) | RunError::Setup(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for RunError {}

/// Everything a connection task needs, shared by all of them.
struct Shared {
    proxy: Proxy,
    http: auto::Builder<TokioExecutor>,
    idle: Duration,
    handshake_timeout: Duration,
    metrics: Arc<Metrics>,
}

/// Runs Strait until SIGTERM or SIGINT, then drains and returns.
pub async fn run(config: Config) -> Result<(), RunError> {
    let shutdown = Shutdown::new();
    let tasks = TaskTracker::new();

    let upstream = Upstream::new(&config.pool, &config.timeouts);
    let metrics = Arc::new(Metrics::new(upstream.stats().clone()));
    let hup = Arc::new(tokio::sync::Notify::new());

    let mut listeners = Vec::with_capacity(config.listen.len());
    for l in &config.listen {
        let acceptor = match &l.tls {
            Some(files) => Some(tls::Acceptor::load(files).map_err(RunError::Config)?),
            None => None,
        };
        let listener = TcpListener::bind(l.addr)
            .await
            .map_err(|e| RunError::Bind(l.addr, e))?;
        let gauge = metrics
            .client_connections
            .get_or_create(&ListenerLabels {
                listener: Label::from(l.addr.to_string().as_str()),
            })
            .clone();
        listeners.push((listener, acceptor, gauge));
    }
    let admin = match &config.admin {
        Some(a) => Some(admin::bind(a.addr).await?),
        None => None,
    };
    for acceptor in listeners.iter().filter_map(|(_, a, _)| a.clone()) {
        tokio::spawn(acceptor.watch(hup.clone(), metrics.clone()));
    }

    let access = AccessLog::start(&config.log, hup.clone(), metrics.access_log_dropped.clone());
    let proxy = Proxy::new(&config, tasks.clone(), upstream, metrics.clone(), access)
        .map_err(RunError::Config)?;
    let shared = Arc::new(Shared {
        proxy,
        http: http_builder(&config),
        idle: config.timeouts.idle,
        handshake_timeout: config.timeouts.header_read,
        metrics: metrics.clone(),
    });

    if let Some(listener) = admin {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!("admin listening on {addr}");
        }
        tokio::spawn(admin::serve(listener, metrics.clone(), shutdown.clone()));
    }
    for (listener, acceptor, gauge) in listeners {
        let local = listener
            .local_addr()
            .map_err(|e| RunError::Setup(e.to_string()))?;
        let kind = if acceptor.is_some() { "https" } else { "http" };
        tracing::info!("listening on {local} ({kind})");
        tokio::spawn(accept_loop(
            listener,
            acceptor,
            gauge,
            shared.clone(),
            shutdown.clone(),
            tasks.clone(),
        ));
    }

    let signal = shutdown::wait_for_signal(&hup).await;
    shutdown.trigger();
    tracing::info!(
        "{signal}: draining, up to {} for in-flight requests",
        humantime::format_duration(config.timeouts.shutdown_grace)
    );
    tasks.close();
    if tokio::time::timeout(config.timeouts.shutdown_grace, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            remaining = tasks.len(),
            "shutdown grace passed with connections still open; closing them"
        );
    }
    tracing::info!("stopped");
    Ok(())
}

fn http_builder(config: &Config) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.timeouts.header_read)
        .keep_alive(true);
    // RFC 8441 / RFC 9113 §8.5: extended CONNECT for clients that tunnel over h2.
    builder
        .http2()
        .timer(TokioTimer::new())
        .enable_connect_protocol();
    builder
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: Option<tls::Acceptor>,
    gauge: Gauge,
    shared: Arc<Shared>,
    shutdown: Shutdown,
    tasks: TaskTracker,
) {
    let local = listener.local_addr().ok();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = shutdown.triggered() => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors or similar: back off instead of spinning.
                tracing::warn!(listener = ?local, "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let local = stream
            .local_addr()
            .unwrap_or_else(|_| local.expect("bound listener"));
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        let acceptor = acceptor.clone();
        let gauge = gauge.clone();
        tasks.spawn(async move {
            gauge.inc();
            let _open = DecOnDrop(gauge);
            match acceptor {
                None => {
                    let info = ConnInfo {
                        peer,
                        local,
                        tls: false,
                    };
                    serve(stream, info, shared, shutdown).await
                }
                Some(acceptor) => {
                    let handshake = acceptor.accept(stream);
                    match tokio::time::timeout(shared.handshake_timeout, handshake).await {
                        Ok(Ok(tls)) => {
                            let info = ConnInfo {
                                peer,
                                local,
                                tls: true,
                            };
                            serve(tls, info, shared, shutdown).await
                        }
                        Ok(Err(e)) => {
                            shared.metrics.tls_handshake_failures.inc();
                            tracing::debug!(client = %peer, "TLS handshake failed: {e}")
                        }
                        Err(_) => {
                            shared.metrics.tls_handshake_failures.inc();
                            tracing::debug!(client = %peer, "TLS handshake timed out")
                        }
                    }
                }
            }
        });
    }
    tracing::debug!(listener = ?local, "stopped accepting");
}

/// Serves one client connection until it closes, or until shutdown asks it to finish.
async fn serve<S>(stream: S, info: ConnInfo, shared: Arc<Shared>, shutdown: Shutdown)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let bytes = Arc::new(ConnBytes::default());
    let counted = CountingIo::new(stream, bytes.clone());
    let io = TokioIo::new(IdleTimeoutIo::new(counted, shared.idle));
    let service = ConnService {
        shared: shared.clone(),
        info,
        bytes: bytes.clone(),
    };
    let conn = shared.http.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = shutdown.triggered() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(client = %info.peer, "connection ended: {e}");
    }
    // The tail of the last response was written after its request was accounted.
    let (rx, tx) = bytes.take();
    if let Some(owner) = bytes.take_owner() {
        owner.count(rx, tx);
    }
}

/// The hyper service for one connection: hands each request to the proxy.
#[derive(Clone)]
struct ConnService {
    shared: Arc<Shared>,
    info: ConnInfo,
    bytes: Arc<ConnBytes>,
}

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<Tracked>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Tracked>, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let shared = self.shared.clone();
        let info = self.info;
        let bytes = self.bytes.clone();
        Box::pin(async move { Ok(shared.proxy.handle(req, info, &bytes).await) })
    }
}

/// Decrements a gauge when dropped (a connection's end, however it ends).
struct DecOnDrop(Gauge);

impl Drop for DecOnDrop {
    fn drop(&mut self) {
        self.0.dec();
    }
}
