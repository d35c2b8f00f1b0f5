//! A shared (HTTP/2) connection's driver task: it runs the connection and retires it
//! when no stream has used it for `idle_timeout`.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::time::Instant;

use super::{ConnShared, Inner, Protocol, Target};
use crate::body::BoxError;

/// Polls a shared connection's driver and keeps the peer's stream limit current;
/// dropping it before the driver ended ends the connection's tasks.
pub(super) struct Driven<P: Protocol> {
    pub(super) driver: P::Driver,
    pub(super) shared: Arc<ConnShared>,
    pub(super) finished: bool,
}

impl<P: Protocol> Drop for Driven<P> {
    fn drop(&mut self) {
        // Dropped before the driver finished: the connection was retired while idle,
        // so end its tasks (and close the socket). A driver that ends by itself
        // finishes any streams still under way and closes.
        if !self.finished {
            P::end(&self.driver);
        }
    }
}

impl<P: Protocol> Future for Driven<P> {
    type Output = Result<(), BoxError>;
    fn poll(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.driver).poll(cx);
        this.finished = r.is_ready();
        let max = P::max_streams(&this.driver).max(1);
        this.shared.max_streams.store(max, Ordering::Relaxed);
        r
    }
}

/// A shared (HTTP/2) connection's task: runs the protocol's driver and retires the
/// connection when no stream has used it for `idle_timeout`.
pub(super) async fn drive_h2<P: Protocol>(
    conn: Driven<P>,
    pool: Weak<Inner<P>>,
    key: Target,
    shared: Arc<ConnShared>,
    idle_timeout: Duration,
) {
    // The driver runs in a task of its own, so the timer here is not polled on every
    // wake of a busy connection; aborting that task drops (and closes) it.
    let mut conn_task = tokio::spawn(conn);
    let sleep = tokio::time::sleep(idle_timeout);
    tokio::pin!(sleep);
    let mut retired = false;
    loop {
        tokio::select! {
            r = &mut conn_task => {
                if let Ok(Err(e)) = r {
                    tracing::debug!(upstream = %key, "upstream connection ended: {e}");
                }
                break;
            }
            () = sleep.as_mut(), if !retired => {
                let Some(inner) = pool.upgrade() else {
                    conn_task.abort();
                    break;
                };
                // The precise clock: this timer was set from it, and the coarse one may
                // not have reached the deadline yet (re-arming for an instant already
                // past would spin until it does).
                let now = inner.ms_at(Instant::now());
                let since = shared.idle_since.load(Ordering::Relaxed);
                if since == 0 {
                    // In use: it cannot be idle for long before this looks again.
                    sleep.as_mut().reset(Instant::now() + idle_timeout);
                    continue;
                }
                let deadline = since + idle_timeout.as_millis() as u64;
                if deadline <= now {
                    // Removed from the pool, no request takes it; an idle connection
                    // already retired (after GOAWAY) cannot get one either.
                    retired = inner.retire_idle_h2(&key, shared.id);
                    if shared.streams.load(Ordering::Relaxed) == 0 {
                        conn_task.abort();
                        break;
                    }
                    if !retired {
                        sleep.as_mut().reset(Instant::now() + idle_timeout);
                    }
                } else {
                    sleep.as_mut().reset(inner.epoch + Duration::from_millis(deadline - 1));
                }
            }
        }
    }
    if let Some(inner) = pool.upgrade() {
        inner.closed(&key, shared.id);
    }
}
