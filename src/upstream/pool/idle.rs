//! Idle HTTP/1.1 connections: each key's last-in first-out list, the pool-wide LRU
//! order under `max_idle`, and surplus connections beyond `max_idle_per_host`, retired
//! after their grace unless a request takes them first.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{
    ConnShared, HINT_MARGIN, Hasher, Host, IdleConn, Inner, Protocol, SURPLUS_GRACE, State, Stats,
    Target,
};

impl<P: Protocol> Inner<P> {
    /// Puts an HTTP/1.1 connection on its key's idle list, evicting to stay in bounds.
    pub(super) fn make_idle(
        self: &Arc<Self>,
        state: &mut State<P>,
        key: &Target,
        conn: Box<P::H1>,
        shared: Arc<ConnShared>,
    ) {
        let limits = &self.limits;
        if limits.max_idle_per_host == 0 || limits.max_idle == 0 {
            Stats::bump(&self.stats.evict_lru);
            drop(conn);
            if let Some(host) = state.hosts.get_mut(key) {
                self.h1_gone(host, key);
            }
            return;
        }
        shared.idle_since.store(self.now_ms(), Ordering::Relaxed);
        let seq = state.next_seq;
        state.next_seq += 1;
        let State {
            hosts,
            lru,
            idle_total,
            ..
        } = state;
        let host = match hosts.get_mut(key) {
            Some(h) => h,
            None => hosts.entry(key.clone()).or_default(),
        };
        // Beyond the key's bound, its coldest connections become surplus: the sweep
        // retires each after SURPLUS_GRACE unless a request takes it first.
        let excess = (host.idle.len() + 1).saturating_sub(limits.max_idle_per_host);
        if excess > 0 {
            let retire_at = self.now_ms() + SURPLUS_GRACE.as_millis() as u64;
            for c in host.idle.iter().take(excess) {
                if !c.shared.surplus.swap(true, Ordering::Relaxed) {
                    let hint = c.shared.hint_deadline.load(Ordering::Relaxed);
                    if hint == 0 || hint > retire_at {
                        c.shared.hint_deadline.store(retire_at, Ordering::Relaxed);
                    }
                }
            }
        }
        host.idle.push(IdleConn {
            conn,
            shared,
            lru_seq: seq,
        });
        lru.push_back((seq, key.clone()));
        *idle_total += 1;
        self.stats.idle.fetch_add(1, Ordering::Relaxed);
        let is_live = |hosts: &HashMap<Target, Host<P>, Hasher>, seq: u64, key: &Target| {
            hosts
                .get(key)
                .is_some_and(|h| h.idle.iter().any(|c| c.lru_seq == seq))
        };
        while *idle_total > limits.max_idle {
            // The pool-wide least recently used connection makes room.
            let Some((old_seq, old_key)) = lru.pop_front() else {
                break;
            };
            if let Some(h) = hosts.get_mut(&old_key)
                && let Some(pos) = h.idle.iter().position(|c| c.lru_seq == old_seq)
            {
                h.idle.remove(pos);
                *idle_total -= 1;
                self.stats.idle.fetch_sub(1, Ordering::Relaxed);
                Stats::bump(&self.stats.evict_lru);
                self.h1_gone(h, &old_key);
            }
        }
        if lru.len() > 2 * *idle_total + 64 {
            lru.retain(|(seq, key)| is_live(hosts, *seq, key));
        }
    }

    pub(super) fn checkin_h1(
        self: &Arc<Self>,
        key: &Target,
        conn: Box<P::H1>,
        shared: Arc<ConnShared>,
        hint: Option<Duration>,
    ) {
        shared.surplus.store(false, Ordering::Relaxed);
        if let Some(hint) = hint {
            let margin = HINT_MARGIN.min(hint / 2);
            let retire_in = hint.saturating_sub(margin);
            if retire_in.is_zero() {
                Stats::bump(&self.stats.evict_hint);
                drop(conn);
                self.h1_closed(key);
                return;
            }
            let deadline = self.now_ms() + retire_in.as_millis() as u64;
            shared.hint_deadline.store(deadline, Ordering::Relaxed);
        } else {
            shared.hint_deadline.store(0, Ordering::Relaxed);
        }
        self.hand_h1(key, conn, shared, true);
    }
}
