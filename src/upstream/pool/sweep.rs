//! The sweep: one task per pool closes idle HTTP/1.1 connections whose time is up
//! (`idle_timeout`, a keep-alive hint, a surplus connection's grace) and marks HTTP/1.1
//! exchanges whose response deadline passed (no timer per request).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::{ConnShared, HINT_MARGIN, Inner, Limits, Protocol, SURPLUS_GRACE, State, Stats};

impl<P: Protocol> Inner<P> {
    /// The counter to bump when an idle HTTP/1.1 connection's time is up, or `None`.
    pub(super) fn expired(&self, shared: &ConnShared, now: u64) -> Option<&AtomicU64> {
        let hint = shared.hint_deadline.load(Ordering::Relaxed);
        if hint != 0 && hint <= now {
            return Some(self.stats.retired_by_deadline(shared));
        }
        let since = shared.idle_since.load(Ordering::Relaxed);
        (since != 0 && since + self.limits.idle_timeout.as_millis() as u64 <= now)
            .then_some(&self.stats.evict_idle)
    }

    /// Retires the idle HTTP/1.1 connections whose time is up: `idle_timeout`, an
    /// origin's keep-alive hint, or the end of a surplus connection's grace. The
    /// sweeper task calls it every [`sweep_every`].
    pub(super) fn sweep(self: &Arc<Self>) {
        let now = self.now_ms();
        let mut gone = Vec::new();
        let mut state = self.state.lock().expect("pool lock");
        let State {
            hosts, idle_total, ..
        } = &mut *state;
        for (key, host) in hosts.iter_mut() {
            let mut i = 0;
            while i < host.idle.len() {
                let Some(counter) = self.expired(&host.idle[i].shared, now) else {
                    i += 1;
                    continue;
                };
                Stats::bump(counter);
                gone.push(host.idle.remove(i));
                self.forget_idle(idle_total);
                self.h1_gone(host, key);
            }
        }
        hosts.retain(|_, h| h.open > 0 || !h.waiters.is_empty());
        // Requests under way whose response head is late are woken to end.
        let mut late = Vec::new();
        state.h1_conns.retain(|c| {
            let Some(c) = c.upgrade() else {
                return false;
            };
            let head = c.head_deadline.load(Ordering::Relaxed);
            if head != 0 && head <= now {
                c.timed_out.store(true, Ordering::Relaxed);
                late.push(c);
            }
            true
        });
        drop(state);
        for c in late {
            let waker = c.waiter.lock().expect("waiter lock").take();
            if let Some(w) = waker {
                w.wake();
            }
        }
        // The sockets close here, outside the lock.
        drop(gone);
    }

    /// Starts the sweeper task once, with the first HTTP/1.1 connection.
    pub(super) fn start_sweeper(self: &Arc<Self>) {
        if self.sweeping.swap(true, Ordering::Relaxed) {
            return;
        }
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                // Read each round: a route with a shorter `upstream_response` may have
                // come with a reload.
                let every = match pool.upgrade() {
                    Some(inner) => inner.sweep_every(),
                    None => return,
                };
                tokio::time::sleep(every).await;
                let Some(inner) = pool.upgrade() else {
                    return;
                };
                inner.sweep();
            }
        });
    }
}

/// How often the sweeper looks for idle HTTP/1.1 connections whose time is up and for
/// late response heads: often enough to hold `idle_timeout`, a surplus connection's
/// grace and a hint's margin to within half of the shortest (checkouts check idle
/// deadlines themselves, so a late sweep only holds a socket a little longer), and
/// response deadlines to within `deadline_check`.
pub(super) fn sweep_every(limits: &Limits, deadline_check: Duration) -> Duration {
    let shortest = limits
        .idle_timeout
        .min(SURPLUS_GRACE)
        .min(HINT_MARGIN)
        .min(deadline_check * 2);
    (shortest / 2).max(Duration::from_millis(10))
}
