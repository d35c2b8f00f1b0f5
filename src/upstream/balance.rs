//! Spreading requests over a group of interchangeable upstreams.
//!
//! Round robin, with passive health: an upstream that refused a connection, whose
//! fresh connection dropped a request unanswered, or that did not answer in time, is
//! skipped for [`RETRY_AFTER`] unless every upstream in the group is down, in which case the
//! least recently failed one is tried anyway (a request is never refused for want of a
//! healthy peer while one might answer).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long a failed upstream is left out of the rotation.
pub const RETRY_AFTER: Duration = Duration::from_secs(5);

/// Round-robin state for `n` upstreams.
#[derive(Debug)]
pub struct Balancer {
    next: AtomicUsize,
    /// Per upstream: milliseconds since `epoch` until which it is considered down; 0 = up.
    down_until: Vec<AtomicU64>,
    epoch: Instant,
}

impl Balancer {
    pub fn new(n: usize) -> Self {
        Balancer {
            next: AtomicUsize::new(0),
            down_until: (0..n).map(|_| AtomicU64::new(0)).collect(),
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        // +1 so that 0 always means "never failed".
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// The order in which to try the upstreams for one request: healthy ones in
    /// round-robin order first, then the down ones, soonest back first.
    pub fn order(&self) -> impl Iterator<Item = usize> + '_ {
        let n = self.down_until.len();
        let start = if n > 1 {
            self.next.fetch_add(1, Ordering::Relaxed) % n
        } else {
            0
        };
        // No clock read while every upstream is up (the usual case).
        let any_down = self
            .down_until
            .iter()
            .any(|d| d.load(Ordering::Relaxed) != 0);
        let now = if any_down { self.now_ms() } else { 0 };
        let healthy = (0..n)
            .map(move |k| (start + k) % n)
            .filter(move |&i| self.down_until[i].load(Ordering::Relaxed) <= now);
        let mut down: Vec<(u64, usize)> = (0..n)
            .filter_map(|i| {
                let until = self.down_until[i].load(Ordering::Relaxed);
                (until > now).then_some((until, i))
            })
            .collect();
        down.sort_unstable();
        healthy.chain(down.into_iter().map(|(_, i)| i))
    }

    /// Records that upstream `i` could not be connected to, dropped a request or did
    /// not answer in time. It never shortens a longer exclusion (a failed health check).
    pub fn mark_failed(&self, i: usize) {
        let until = self.now_ms() + RETRY_AFTER.as_millis() as u64;
        self.down_until[i].fetch_max(until, Ordering::Relaxed);
    }

    /// Leaves upstream `i` out of the rotation until [`mark_ok`](Self::mark_ok): it
    /// failed its health checks. Requests still reach it when every upstream is down.
    pub fn mark_down(&self, i: usize) {
        self.down_until[i].store(u64::MAX, Ordering::Relaxed);
    }

    /// Records that upstream `i` answered.
    pub fn mark_ok(&self, i: usize) {
        if self.down_until[i].load(Ordering::Relaxed) != 0 {
            self.down_until[i].store(0, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_visits_every_upstream() {
        let b = Balancer::new(3);
        let firsts: Vec<usize> = (0..6).map(|_| b.order().next().unwrap()).collect();
        assert_eq!(firsts, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn a_failed_upstream_goes_last_until_it_answers() {
        let b = Balancer::new(3);
        b.mark_failed(1);
        for _ in 0..6 {
            let order: Vec<usize> = b.order().collect();
            assert_eq!(order.len(), 3);
            assert_eq!(*order.last().unwrap(), 1);
        }
        b.mark_ok(1);
        assert!((0..3).any(|_| b.order().next() == Some(1)));
    }

    #[test]
    fn a_health_check_exclusion_outlasts_a_request_failure() {
        let b = Balancer::new(3);
        b.mark_down(2);
        b.mark_failed(0);
        b.mark_failed(2);
        // Both down: the one a request failed comes back first, the one that failed
        // its health checks last.
        assert_eq!(b.order().skip(1).collect::<Vec<_>>(), vec![0, 2]);
        b.mark_ok(2);
        assert!((0..3).any(|_| b.order().next() == Some(2)));
    }
}
