//! Graceful shutdown: one signal, observed by every accept loop and connection.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

/// A shutdown flag that can be awaited. Cloning is cheap; all clones see the trigger.
#[derive(Clone)]
pub struct Shutdown {
    tx: std::sync::Arc<watch::Sender<bool>>,
    rx: watch::Receiver<bool>,
    /// The same signal as a plain flag: checked on every park of every connection.
    flag: std::sync::Arc<AtomicBool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    pub fn new() -> Self {
        let (tx, rx) = watch::channel(false);
        Shutdown {
            tx: std::sync::Arc::new(tx),
            rx,
            flag: Default::default(),
        }
    }

    /// Starts the drain everywhere.
    pub fn trigger(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.tx.send_replace(true);
    }

    /// True once the drain has started.
    pub fn is_triggered(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    /// [`Shutdown::triggered`] as a future that owns what it needs, for a connection
    /// to keep across many waits.
    pub fn wait(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.rx.clone();
        async move {
            let _ = rx.wait_for(|&stop| stop).await;
        }
    }

    /// Completes once [`Shutdown::trigger`] was called (at once if it already was).
    pub async fn triggered(&self) {
        let mut rx = self.rx.clone();
        // An error means every sender is gone, which only happens at process end.
        let _ = rx.wait_for(|&stop| stop).await;
    }
}

/// Waits for SIGTERM or SIGINT and names the one that came. SIGHUP (whose default action
/// would kill the process) wakes everything waiting on `hup`: the configuration reload,
/// certificate reloads and the access log's reopening.
pub async fn wait_for_signal(hup_waiters: &tokio::sync::Notify) -> &'static str {
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    let mut hup = signal(SignalKind::hangup()).expect("installing a SIGHUP handler");
    loop {
        tokio::select! {
            _ = term.recv() => return "SIGTERM",
            _ = int.recv() => return "SIGINT",
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading");
                hup_waiters.notify_waiters();
            }
        }
    }
}
