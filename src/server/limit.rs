//! `[limits] max_connections`: one count of client connections across listeners, and
//! the accept loops' manners at the cap and when `accept` fails.
//!
//! At the cap a listener stops accepting (new connections wait in the kernel's
//! backlog) until one closes, as nginx's `worker_connections` and HAProxy's `maxconn`
//! do. Reaching it also trims: connections idle between requests close, so the ones
//! waiting get their places (again every quarter second while the listener waits).
//! With a tenth of the cap or less left, a connection that ends an exchange closes
//! instead of staying open for the next.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::metrics::{AcceptErrorLabels, Label, Metrics};

/// The places for client connections, shared by every listener of the process.
pub struct ConnLimit {
    places: Arc<Semaphore>,
    /// The cap now (a reload may move it).
    max: AtomicUsize,
    /// Places taken by a lowered cap, still to be given up as connections close.
    owed: AtomicUsize,
    /// Places held by accept loops for the connection they wait for.
    reserved: AtomicUsize,
    /// A tenth of the cap: with this many places left or fewer, the cap is near.
    near: AtomicUsize,
    /// The cap is near, as of the last place taken or given back: what every response
    /// looks at, one load.
    crowded: AtomicBool,
}

/// One client connection's place; given back when dropped (kept, if a lowered cap
/// is still owed places).
pub struct Place {
    permit: Option<OwnedSemaphorePermit>,
    limit: Arc<ConnLimit>,
    /// Held for a connection not yet accepted.
    reserved: bool,
}

impl Place {
    /// The connection this place waited for was accepted.
    pub fn claim(&mut self) {
        if std::mem::take(&mut self.reserved) {
            self.limit.reserved.fetch_sub(1, Ordering::Relaxed);
            self.limit.update_crowded();
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.claim();
        let owed = &self.limit.owed;
        if owed
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
            && let Some(p) = self.permit.take()
        {
            p.forget();
        }
        drop(self.permit.take());
        self.limit.update_crowded();
    }
}

impl ConnLimit {
    pub fn new(max: usize) -> ConnLimit {
        ConnLimit {
            places: Arc::new(Semaphore::new(max)),
            max: AtomicUsize::new(max),
            owed: AtomicUsize::new(0),
            reserved: AtomicUsize::new(0),
            near: AtomicUsize::new(max / 10),
            crowded: AtomicBool::new(false),
        }
    }

    pub fn max(&self) -> usize {
        self.max.load(Ordering::Relaxed)
    }

    /// A place for the next connection to accept at once, or none at the cap.
    pub fn try_take(self: &Arc<Self>) -> Option<Place> {
        let permit = self.places.clone().try_acquire_owned().ok()?;
        Some(self.reserve(permit))
    }

    /// Waits for a place for the next connection to accept.
    pub async fn take(self: &Arc<Self>) -> Place {
        let permit = self
            .places
            .clone()
            .acquire_owned()
            .await
            .expect("the places are never closed");
        self.reserve(permit)
    }

    fn reserve(self: &Arc<Self>, permit: OwnedSemaphorePermit) -> Place {
        self.reserved.fetch_add(1, Ordering::Relaxed);
        Place {
            permit: Some(permit),
            limit: self.clone(),
            reserved: true,
        }
    }

    /// True with a tenth of the cap or less left (places accept loops hold for the
    /// next connection count as left): an exchange that ends closes its connection.
    #[inline]
    pub fn is_crowded(&self) -> bool {
        self.crowded.load(Ordering::Relaxed)
    }

    /// Works out [`ConnLimit::is_crowded`] again (a place was taken or given back).
    fn update_crowded(&self) {
        let left = self.places.available_permits() + self.reserved.load(Ordering::Relaxed);
        let crowded = left <= self.near.load(Ordering::Relaxed);
        if self.crowded.load(Ordering::Relaxed) != crowded {
            self.crowded.store(crowded, Ordering::Relaxed);
        }
    }

    /// Moves the cap (a reload). Lowering it takes places as they come free; the
    /// connections above the new cap are not closed.
    pub fn set_max(&self, max: usize) {
        let old = self.max.swap(max, Ordering::Relaxed);
        self.near.store(max / 10, Ordering::Relaxed);
        if max > old {
            let mut more = max - old;
            // Places still owed to an earlier lowering are forgiven first.
            let owed = self.owed.load(Ordering::Relaxed);
            let forgiven = owed.min(more);
            self.owed.fetch_sub(forgiven, Ordering::Relaxed);
            more -= forgiven;
            self.places.add_permits(more);
        } else if max < old {
            let fewer = old - max;
            let taken = self.places.forget_permits(fewer);
            self.owed.fetch_add(fewer - taken, Ordering::Relaxed);
        }
        self.update_crowded();
    }
}

/// A listener's failed accepts: counted by reason, logged at most once a second with
/// how many there were, and followed by a pause that grows while they go on.
pub struct AcceptErrors {
    listener: Label,
    logged: Option<Instant>,
    unlogged: u64,
    pause: Duration,
}

/// The first pause after a failed accept, and the longest.
const PAUSE_MIN: Duration = Duration::from_millis(5);
const PAUSE_MAX: Duration = Duration::from_secs(1);

impl AcceptErrors {
    pub fn new(listener: Label) -> AcceptErrors {
        AcceptErrors {
            listener,
            logged: None,
            unlogged: 0,
            pause: PAUSE_MIN,
        }
    }

    /// Counts a failed accept, logs it if the last log line is a second old, and
    /// says how long to wait before accepting again.
    pub fn failed(&mut self, e: &std::io::Error, metrics: &Metrics) -> Duration {
        let reason = accept_reason(e);
        metrics
            .accept_errors
            .get_or_create(&AcceptErrorLabels {
                listener: self.listener.clone(),
                reason,
            })
            .inc();
        self.unlogged += 1;
        let now = Instant::now();
        if self
            .logged
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            tracing::warn!(
                listener = %self.listener.0,
                failures = self.unlogged,
                "accept failed: {e} ({reason}); pausing this listener {}ms",
                self.pause.as_millis()
            );
            self.logged = Some(now);
            self.unlogged = 0;
        }
        let pause = self.pause;
        self.pause = (self.pause * 2).min(PAUSE_MAX);
        pause
    }

    /// An accept succeeded: the next failure pauses briefly again.
    pub fn succeeded(&mut self) {
        self.pause = PAUSE_MIN;
    }
}

/// The `reason` label of a failed accept.
fn accept_reason(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EMFILE) => "process_fd_limit",
        Some(libc::ENFILE) => "system_fd_limit",
        Some(libc::ENOBUFS | libc::ENOMEM) => "no_memory",
        Some(libc::ECONNABORTED) => "aborted",
        _ => "other",
    }
}

/// The listen backlog to ask for: `limits.backlog`, at most the kernel's `somaxconn`
/// (asking more is silently cut to it; saying so in the log is kinder).
pub fn backlog(wanted: u32) -> u32 {
    let somaxconn = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    match somaxconn {
        Some(max) if max < wanted => {
            tracing::info!(
                "limits.backlog {wanted} is above net.core.somaxconn {max}: the kernel uses {max}"
            );
            max
        }
        _ => wanted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_is_shared_and_moves() {
        let limit = Arc::new(ConnLimit::new(2));
        let mut a = limit.try_take().unwrap();
        a.claim();
        let b = limit.try_take().unwrap();
        assert!(limit.try_take().is_none());
        drop(a);
        let a = limit.try_take().unwrap();
        limit.set_max(1);
        drop(b);
        assert!(
            limit.try_take().is_none(),
            "a lowered cap keeps freed places"
        );
        limit.set_max(3);
        let _b = limit.try_take().unwrap();
        let _c = limit.try_take().unwrap();
        assert!(limit.try_take().is_none());
        drop(a);
    }

    #[test]
    fn crowded_with_a_tenth_left() {
        let limit = Arc::new(ConnLimit::new(100));
        let claimed = |limit: &Arc<ConnLimit>| {
            let mut p = limit.try_take().unwrap();
            p.claim();
            p
        };
        let held: Vec<_> = (0..89).map(|_| claimed(&limit)).collect();
        let waiting = limit.try_take().unwrap();
        assert!(
            !limit.is_crowded(),
            "a place waiting for a connection is left"
        );
        drop(waiting);
        let more = claimed(&limit);
        assert!(limit.is_crowded());
        drop((held, more));
    }

    #[test]
    fn accept_pauses_grow_and_reset() {
        let metrics = Metrics::new(Default::default(), Default::default());
        let mut errors = AcceptErrors::new(Label::from("127.0.0.1:1"));
        let e = std::io::Error::from_raw_os_error(libc::EMFILE);
        let first = errors.failed(&e, &metrics);
        let second = errors.failed(&e, &metrics);
        assert!(second > first);
        for _ in 0..20 {
            errors.failed(&e, &metrics);
        }
        assert_eq!(errors.failed(&e, &metrics), PAUSE_MAX);
        errors.succeeded();
        assert_eq!(errors.failed(&e, &metrics), PAUSE_MIN);
        assert!(metrics.render().contains(
            "strait_accept_errors_total{listener=\"127.0.0.1:1\",reason=\"process_fd_limit\"} 24"
        ));
    }
}
