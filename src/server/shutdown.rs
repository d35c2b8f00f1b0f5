//! Graceful shutdown: one signal, observed by every accept loop and connection; and
//! the trim, which asks connections idle between requests to close (the connection
//! cap is reached).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio_util::sync::ReusableBoxFuture;

/// A shutdown flag that can be awaited. Cloning is cheap; all clones see the trigger.
#[derive(Clone)]
pub struct Shutdown {
    /// Bumped by every drain and trim: what wakes the waiting connections.
    tx: std::sync::Arc<watch::Sender<u64>>,
    rx: watch::Receiver<u64>,
    /// The drain as a plain flag: checked on every park of every connection.
    flag: std::sync::Arc<AtomicBool>,
    /// How many drains and trims there were.
    signals: std::sync::Arc<AtomicU64>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    pub fn new() -> Self {
        let (tx, rx) = watch::channel(0);
        Shutdown {
            tx: std::sync::Arc::new(tx),
            rx,
            flag: Default::default(),
            signals: Default::default(),
        }
    }

    /// Starts the drain everywhere.
    pub fn trigger(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.signals.fetch_add(1, Ordering::SeqCst);
        self.tx.send_modify(|n| *n += 1);
    }

    /// Asks every connection idle between requests to close now.
    pub fn trim(&self) {
        self.signals.fetch_add(1, Ordering::SeqCst);
        self.tx.send_modify(|n| *n += 1);
    }

    /// How many drains and trims there were: a connection that parked at one count
    /// closes when it changes (one load tells it).
    #[inline]
    pub fn signals(&self) -> u64 {
        self.signals.load(Ordering::Acquire)
    }

    /// True once the drain has started.
    pub fn is_triggered(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    /// Completes once [`Shutdown::trigger`] was called (at once if it already was).
    pub async fn triggered(&self) {
        let mut rx = self.rx.clone();
        // An error means every sender is gone, which only happens at process end.
        let _ = rx.wait_for(|_| self.is_triggered()).await;
    }

    /// The next drain or trim after now.
    fn next(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.rx.clone();
        rx.borrow_and_update();
        async move {
            let _ = rx.changed().await;
        }
    }
}

/// One connection's registration for the next drain or trim, kept across its waits:
/// one allocation per connection, reused after each wake.
pub struct Signal {
    next: ReusableBoxFuture<'static, ()>,
    fired: bool,
    /// Polled and pending when the signal count was this: the task that polled it
    /// will be woken by the next signal after it.
    armed: Option<u64>,
}

impl Signal {
    pub fn new(shutdown: &Shutdown) -> Signal {
        Signal {
            next: ReusableBoxFuture::new(shutdown.next()),
            fired: false,
            armed: None,
        }
    }

    /// Ready when a drain or trim came since the last time this was ready; pending
    /// otherwise, with the task registered for the next one. Whether it was a drain
    /// or a trim is for the caller to ask [`Shutdown`].
    pub fn poll(&mut self, shutdown: &Shutdown, cx: &mut Context<'_>) -> Poll<()> {
        if self.fired {
            self.next.set(shutdown.next());
            self.fired = false;
        }
        let signals = shutdown.signals();
        if self.next.poll(cx).is_pending() {
            self.armed = Some(signals);
            return Poll::Pending;
        }
        self.armed = None;
        self.fired = true;
        Poll::Ready(())
    }

    /// Registers the task for the next drain or trim, unless it already is: a task
    /// whose waker never changes polls once per signal, not once per wait.
    #[inline]
    pub fn arm(&mut self, shutdown: &Shutdown, cx: &mut Context<'_>) {
        // Inlined: every wake of a waiting connection comes here, and almost always
        // finds the registration in place.
        if self.armed != Some(shutdown.signals()) {
            self.rearm(shutdown, cx);
        }
    }

    #[cold]
    fn rearm(&mut self, shutdown: &Shutdown, cx: &mut Context<'_>) {
        while self.poll(shutdown, cx).is_ready() {}
    }
}

/// Waits for SIGTERM, SIGINT or SIGQUIT (each drains) and names the one that came.
/// SIGHUP (whose default action would kill the process) wakes everything waiting on
/// `hup`, the configuration reload and the certificate reloads, and reopens the access
/// log; SIGUSR1 (what logrotate sends nginx) only reopens the access log (`reopen`).
pub async fn wait_for_signal(
    hup: &tokio::sync::Notify,
    reopen: &tokio::sync::Notify,
) -> &'static str {
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    let mut quit = signal(SignalKind::quit()).expect("installing a SIGQUIT handler");
    let mut hup_signal = signal(SignalKind::hangup()).expect("installing a SIGHUP handler");
    let mut usr1 = signal(SignalKind::user_defined1()).expect("installing a SIGUSR1 handler");
    loop {
        tokio::select! {
            _ = term.recv() => return "SIGTERM",
            _ = int.recv() => return "SIGINT",
            _ = quit.recv() => return "SIGQUIT",
            _ = hup_signal.recv() => {
                tracing::info!("SIGHUP: reloading");
                hup.notify_waiters();
                reopen.notify_waiters();
            }
            _ = usr1.recv() => {
                tracing::info!("SIGUSR1: reopening the access log");
                reopen.notify_waiters();
            }
        }
    }
}
