//! Requests waiting for a connection: a connect per waiter (per stream limit's worth
//! on HTTP/2), and whichever connection frees up first goes to the longest waiter.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{Checkout, ConnShared, H2Conn, Host, Inner, Made, Protocol, Sender, Target};

impl<P: Protocol> Inner<P> {
    /// Opens a connection for `key` and hands it to the waiters.
    pub(super) async fn connect(self: Arc<Self>, key: Target) {
        let result = self.open(&key).await;
        let mut state = self.state.lock().expect("pool lock");
        let host = state.hosts.entry(key.clone()).or_default();
        host.connecting -= 1;
        match result {
            Ok(Made::H1(conn, shared)) => {
                drop(state);
                // One HTTP/1.1 connection serves one waiter; with none left alive it
                // goes idle.
                self.hand_h1(&key, conn, shared, false);
            }
            Ok(Made::H2(sender, shared)) => {
                host.speaks_h2 = true;
                host.h2.push(H2Conn {
                    sender: sender.clone(),
                    shared: shared.clone(),
                });
                self.serve_h2_waiters(host, &key, &sender, &shared, false);
            }
            Err(e) => {
                host.open -= 1;
                tracing::debug!(upstream = %key, "connect failed: {e}");
                // The failure answers one waiter; the others have their own connects
                // (or queue for capacity).
                while let Some(w) = host.waiters.pop_front() {
                    self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
                    if w.tx.send(Err(e.clone())).is_ok() {
                        break;
                    }
                }
                self.maybe_connect_for_waiters(host, &key);
                if host.open == 0 && host.waiters.is_empty() {
                    state.hosts.remove(&key);
                }
            }
        }
    }

    /// Gives an HTTP/2 connection's free stream slots to waiters, first come first.
    pub(super) fn serve_h2_waiters(
        self: &Arc<Self>,
        host: &mut Host<P>,
        key: &Target,
        sender: &P::H2,
        shared: &Arc<ConnShared>,
        reused: bool,
    ) {
        while shared.streams.load(Ordering::Relaxed) < shared.max_streams.load(Ordering::Relaxed) {
            let Some(w) = host.next_waiter(reused) else {
                break;
            };
            self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
            if w.tx.is_closed() {
                continue;
            }
            shared.streams.fetch_add(1, Ordering::Relaxed);
            shared.idle_since.store(0, Ordering::Relaxed);
            let c = self.checkout_from(key, Sender::H2(sender.clone()), shared.clone(), reused);
            if let Err(Ok(mut c)) = w.tx.send(Ok(c)) {
                // Gave up waiting in the meantime: take the slot back quietly (the
                // lock is held, so not through Drop).
                c.released = true;
                shared.streams.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Hands an HTTP/1.1 connection to the longest waiter, or makes it idle.
    pub(super) fn hand_h1(
        self: &Arc<Self>,
        key: &Target,
        mut conn: Box<P::H1>,
        shared: Arc<ConnShared>,
        reused: bool,
    ) {
        let mut state = self.state.lock().expect("pool lock");
        while let Some(host) = state.hosts.get_mut(key)
            && let Some(w) = host.next_waiter(reused)
        {
            self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
            if w.tx.is_closed() {
                continue;
            }
            shared.idle_since.store(0, Ordering::Relaxed);
            let c = self.checkout_from(key, Sender::H1(conn), shared.clone(), reused);
            match w.tx.send(Ok(c)) {
                Ok(()) => return,
                // The waiter left between the check and the send: keep looking.
                Err(back) => {
                    conn = back
                        .ok()
                        .and_then(Checkout::into_h1)
                        .expect("the checkout just made comes back whole");
                }
            }
        }
        self.make_idle(&mut state, key, conn, shared);
    }

    /// A request finished with its HTTP/2 stream slot.
    pub(super) fn release_stream(self: &Arc<Self>, key: &Target, shared: &Arc<ConnShared>) {
        let before = shared.streams.fetch_sub(1, Ordering::SeqCst);
        if before == 1 {
            shared.idle_since.store(self.now_ms(), Ordering::Relaxed);
        }
        // Nobody waits anywhere (the usual case): no need for the lock. A waiter that
        // arrives just after this check finds the free slot itself, under the lock.
        if self.stats.waiting.load(Ordering::SeqCst) == 0 {
            return;
        }
        let mut state = self.state.lock().expect("pool lock");
        let Some(host) = state.hosts.get_mut(key) else {
            return;
        };
        if host.waiters.is_empty() {
            return;
        }
        if let Some(c) = host.h2.iter().find(|c| c.shared.id == shared.id) {
            let (sender, shared) = (c.sender.clone(), c.shared.clone());
            self.serve_h2_waiters(host, key, &sender, &shared, true);
        }
    }

    /// Starts connects for waiters that have none, when capacity allows.
    pub(super) fn maybe_connect_for_waiters(self: &Arc<Self>, host: &mut Host<P>, key: &Target) {
        let max = self.limits.max_conns_per_host;
        let per_conn = if host.speaks_h2 { host.h2_streams } else { 1 };
        while host.connecting * per_conn < host.waiters.len() && (max == 0 || host.open < max) {
            host.open += 1;
            host.connecting += 1;
            tokio::spawn(Inner::connect(self.clone(), key.clone()));
        }
    }
}
