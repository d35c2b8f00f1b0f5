//! The sockets a run accepts on: proxy listeners (each with its TLS acceptor and the
//! watcher of its certificate files) and the admin listener. Binding is apart from
//! serving, so a reload binds everything new before it changes anything, and a
//! listener told to stop hands its socket back, to be served again with another
//! acceptor (a reload that changed its `tls`) or closed. A Unix socket's file is
//! removed when its listener closes (`net::SocketFile`).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::{AbortHandle, JoinHandle};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{RunError, Shared, Shutdown, accept_loop, admin, handover, tls};
use crate::config::{Listen, ListenAddr};
use crate::metrics::{Label, ListenerLabels, Metrics};
use crate::net::{self, Listener};

/// A bound proxy listener, not yet served.
pub(super) struct Bound {
    pub cfg: Listen,
    pub listener: Listener,
    pub acceptor: Option<tls::Acceptor>,
}

/// Binds a proxy listener with `backlog` ([`super::limit::backlog`]) and loads its
/// certificate. The error names the address (exit 1) or the file (exit 2).
pub(super) async fn bind(cfg: &Listen, backlog: u32) -> Result<Bound, RunError> {
    let acceptor = match &cfg.tls {
        Some(files) => Some(tls::Acceptor::load(files).map_err(RunError::Config)?),
        None => None,
    };
    let listener = match &cfg.addr {
        ListenAddr::Tcp(addr) => listen(*addr, backlog, "listener").map(Listener::Tcp),
        ListenAddr::Unix(path) => net::bind_unix(path, backlog).await,
    }
    .map_err(|e| RunError::Bind(cfg.addr.clone(), e))?;
    Ok(Bound {
        cfg: cfg.clone(),
        listener,
        acceptor,
    })
}

/// A listening socket as `TcpListener::bind` makes one (`SO_REUSEADDR`), with the
/// backlog asked for rather than std's 128, and `SO_REUSEPORT`: a new binary can listen
/// beside this process and take the port over ([`handover`]). A socket without it (another
/// program's) on the address still makes the bind fail.
fn listen(addr: SocketAddr, backlog: u32, what: &str) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    let listener = socket.listen(backlog)?;
    handover::note_sharing(&listener, what);
    Ok(listener)
}

/// What serving a proxy listener needs besides the listener.
pub(super) struct Context {
    pub shared: Arc<Shared>,
    pub shutdown: Shutdown,
    pub tasks: TaskTracker,
    pub hup: Arc<Notify>,
    /// Woken by SIGHUP and SIGUSR1: the access log reopens its file.
    pub reopen: Arc<Notify>,
    pub metrics: Arc<Metrics>,
}

/// A proxy listener being served.
pub(super) struct Serving {
    pub cfg: Listen,
    stop: CancellationToken,
    /// The accept loop; it returns the listener once stopped (not after shutdown).
    task: JoinHandle<Option<Listener>>,
    /// The certificate files' watcher, on a TLS listener.
    watcher: Option<AbortHandle>,
}

impl Context {
    /// Starts the accept loop (and, with TLS, the certificate watcher) of a bound
    /// listener.
    pub fn serve(&self, bound: Bound) -> Serving {
        let Bound {
            cfg,
            listener,
            acceptor,
        } = bound;
        let kind = if acceptor.is_some() { "https" } else { "http" };
        tracing::info!("listening on {} ({kind})", listener.describe());
        let watcher = acceptor.as_ref().map(|a| {
            tokio::spawn(a.clone().watch(self.hup.clone(), self.metrics.clone())).abort_handle()
        });
        let label = Label::from(cfg.addr.to_string().as_str());
        let gauge = self
            .metrics
            .client_connections
            .get_or_create(&ListenerLabels {
                listener: label.clone(),
            })
            .clone();
        let stop = CancellationToken::new();
        let task = tokio::spawn(accept_loop(
            listener,
            acceptor,
            (label, gauge),
            self.shared.clone(),
            self.shutdown.clone(),
            self.tasks.clone(),
            stop.clone(),
        ));
        Serving {
            cfg,
            stop,
            task,
            watcher,
        }
    }
}

impl Serving {
    /// Stops accepting and returns the listener (closing it is dropping it).
    /// Connections it accepted go on.
    pub async fn stop(self) -> Option<Listener> {
        self.stop.cancel();
        if let Some(w) = &self.watcher {
            w.abort();
        }
        self.task.await.ok().flatten()
    }
}

/// The admin listener being served.
pub(super) struct AdminServing {
    pub addr: SocketAddr,
    stop: CancellationToken,
}

/// Binds the admin address (with `TcpListener::bind`'s backlog); the error names it.
pub(super) async fn bind_admin(addr: SocketAddr) -> Result<TcpListener, RunError> {
    listen(addr, 1024, "admin listener").map_err(|e| RunError::Bind(ListenAddr::Tcp(addr), e))
}

/// Serves `/metrics` and `/healthz` on a bound admin listener.
pub(super) fn serve_admin(
    addr: SocketAddr,
    listener: TcpListener,
    metrics: &Arc<Metrics>,
    shutdown: &Shutdown,
    leaving: &handover::Leaving,
) -> AdminServing {
    if let Ok(local) = listener.local_addr() {
        tracing::info!("admin listening on {local}");
    }
    let stop = CancellationToken::new();
    tokio::spawn(admin::serve(
        listener,
        metrics.clone(),
        shutdown.clone(),
        leaving.clone(),
        stop.clone(),
    ));
    AdminServing { addr, stop }
}

impl AdminServing {
    /// Stops accepting; the socket closes.
    pub fn stop(self) {
        self.stop.cancel();
    }
}
