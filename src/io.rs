//! IO wrappers shared by the server and the upstream side.
//!
//! [`IdleTimeoutIo`] ends a stream on which no byte has moved either way for a while: it
//! enforces `timeouts.idle` on client connections and tunnels. [`CountingIo`] counts the
//! bytes read and written (the seed's CounterIO), for `strait_transfer_bytes_total`.
//! Neither touches the bytes.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

pin_project! {
    /// A stream that fails with `TimedOut` once no byte was read or written for `timeout`.
    ///
    /// Activity only records an instant; the timer is re-armed lazily when it fires, so a
    /// busy stream costs one clock read per IO call, not a timer reset.
    pub struct IdleTimeoutIo<T> {
        #[pin]
        inner: T,
        sleep: LazySleep,
        timeout: Duration,
        last_active: Instant,
        // `timeouts.keepalive` for a client connection: the limit while `between`
        // requests. The timer is armed at most this far ahead, so parking needs no
        // timer reset (a busy connection's timer fires once per `keepalive`).
        keepalive: Duration,
        between: bool,
    }
}

/// Now, to within the kernel's clock tick (4 ms here): for stamps that only bound long
/// waits (the last byte on a connection, the time a pooled connection went idle).
///
/// The kernel's coarse monotonic clock costs about 3 ns a read against 20 for a precise
/// one (both through the vDSO, measured on the bench VM), and a busy proxy stamps
/// several times per request. Mapped onto [`Instant`] from one precise read and kept
/// at or behind `Instant::now()` (by up to two ticks): a stamp is never in the future,
/// so a wait bounded from it may end up to 8 ms early, never late. Unit tests get
/// tokio's clock, which they may pause.
pub fn coarse_now() -> Instant {
    #[cfg(not(test))]
    {
        use std::sync::OnceLock;
        static BASE: OnceLock<(Instant, Duration)> = OnceLock::new();
        fn read(
            f: unsafe extern "C" fn(libc::clockid_t, *mut libc::timespec) -> libc::c_int,
        ) -> Duration {
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: `ts` is a valid timespec to write; the clock id is a constant
            // Linux has had since 2.6.32.
            unsafe { f(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
            Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
        }
        let (base, coarse) = *BASE.get_or_init(|| {
            // The coarse clock lags the precise one by up to a tick (its resolution).
            let coarse = read(libc::clock_gettime);
            let now = Instant::now();
            let tick = read(libc::clock_getres);
            (now.checked_sub(tick).unwrap_or(now), coarse)
        });
        base + read(libc::clock_gettime).saturating_sub(coarse)
    }
    #[cfg(test)]
    Instant::now()
}

/// An instant several tasks read and write: ms on [`coarse_now`]'s clock since a
/// process-wide origin, in an atomic.
#[derive(Debug, Default)]
pub struct Stamp(std::sync::atomic::AtomicU64);

impl Stamp {
    /// A stamp of now.
    pub fn now() -> Stamp {
        let s = Stamp::default();
        s.touch();
        s
    }

    fn origin() -> Instant {
        static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *ORIGIN.get_or_init(coarse_now)
    }

    pub fn touch(&self) {
        let ms = coarse_now()
            .saturating_duration_since(Stamp::origin())
            .as_millis();
        self.0
            .store(ms as u64, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn get(&self) -> Instant {
        let ms = self.0.load(std::sync::atomic::Ordering::Relaxed);
        Stamp::origin() + Duration::from_millis(ms)
    }

    pub fn elapsed(&self) -> Duration {
        coarse_now().saturating_duration_since(self.get())
    }
}

impl<T> IdleTimeoutIo<T> {
    pub fn new(inner: T, timeout: Duration) -> Self {
        let now = Instant::now();
        IdleTimeoutIo {
            inner,
            sleep: LazySleep::new(now + timeout),
            timeout,
            last_active: now,
            keepalive: timeout,
            between: false,
        }
    }

    /// A client connection: between requests ([`IdleTimeoutIo::set_between`]), the
    /// stream ends once nothing moved for `keepalive`; otherwise `timeout` holds.
    pub fn with_keepalive(mut self, keepalive: Duration) -> Self {
        self.keepalive = keepalive.min(self.timeout);
        self.sleep.reset(self.last_active + self.keepalive);
        self
    }

    /// Marks the stream as between requests (true) or in an exchange (false).
    pub fn set_between(&mut self, between: bool) {
        self.between = between;
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// The stream underneath, for IO that should not count as activity.
    pub fn get_mut(&mut self) -> &mut T {
        &mut self.inner
    }

    /// Ready once nothing has moved for the timeout: for a caller that waits on the
    /// stream's readiness itself rather than reading through this wrapper.
    pub fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.limit()
            .check(&mut self.sleep, self.last_active, cx)
            .map(|_| ())
    }

    fn limit(&self) -> IdleLimit {
        IdleLimit::of(self.between, self.timeout, self.keepalive)
    }
}

/// A timer polled only when it may have fired or another task asks: a busy
/// connection's IO and loop wake several times per request, and polling the timer on
/// each wake (registering the same waker again) cost more than everything else these
/// checks do. Boxed so its owner stays `Unpin` (hyper and the tunnel relay want that):
/// one allocation per connection, none per wake.
pub struct LazySleep {
    sleep: Pin<Box<Sleep>>,
    /// The waker the timer holds, while it has not fired.
    polled_with: Option<Waker>,
}

impl LazySleep {
    pub fn new(deadline: Instant) -> LazySleep {
        LazySleep {
            sleep: Box::pin(tokio::time::sleep_until(deadline)),
            polled_with: None,
        }
    }

    pub fn deadline(&self) -> Instant {
        self.sleep.deadline()
    }

    pub fn reset(&mut self, deadline: Instant) {
        self.sleep.as_mut().reset(deadline);
        self.polled_with = None;
    }

    /// Ready once the deadline passed.
    pub fn poll_elapsed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.sleep.is_elapsed()
            && self
                .polled_with
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
        {
            return Poll::Pending;
        }
        match self.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.polled_with = None;
                Poll::Ready(())
            }
            Poll::Pending => {
                self.polled_with = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl std::fmt::Debug for LazySleep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazySleep")
            .field("deadline", &self.deadline())
            .finish()
    }
}

/// The idle limit that holds now, and the furthest the timer is armed ahead.
#[derive(Clone, Copy)]
struct IdleLimit {
    now: Duration,
    arm: Duration,
}

impl IdleLimit {
    fn of(between: bool, timeout: Duration, keepalive: Duration) -> IdleLimit {
        IdleLimit {
            now: if between { keepalive } else { timeout },
            arm: keepalive,
        }
    }

    /// Polls the idle timer after the inner stream returned `Pending`.
    fn check(
        self,
        sleep: &mut LazySleep,
        last_active: Instant,
        cx: &mut Context<'_>,
    ) -> Poll<io::Error> {
        loop {
            if sleep.poll_elapsed(cx).is_pending() {
                return Poll::Pending;
            }
            let now = Instant::now();
            let deadline = last_active + self.now;
            if deadline <= now {
                return Poll::Ready(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "idle timeout: no bytes moved either way",
                ));
            }
            // Activity since the timer was armed: re-arm for the real deadline (at most
            // `arm` ahead) and poll again so it is registered with this task.
            sleep.reset(deadline.min(now.max(last_active) + self.arm));
        }
    }
}

impl<T: AsyncRead> AsyncRead for IdleTimeoutIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        match this.inner.poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() != before {
                    *this.last_active = coarse_now();
                }
                Poll::Ready(r)
            }
            Poll::Pending => IdleLimit::of(*this.between, *this.timeout, *this.keepalive)
                .check(this.sleep, *this.last_active, cx)
                .map(Err),
        }
    }
}

impl<T: AsyncWrite> AsyncWrite for IdleTimeoutIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        match this.inner.poll_write(cx, buf) {
            Poll::Ready(r) => {
                if matches!(r, Ok(n) if n > 0) {
                    *this.last_active = coarse_now();
                }
                Poll::Ready(r)
            }
            Poll::Pending => IdleLimit::of(*this.between, *this.timeout, *this.keepalive)
                .check(this.sleep, *this.last_active, cx)
                .map(Err),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        match this.inner.poll_write_vectored(cx, bufs) {
            Poll::Ready(r) => {
                if matches!(r, Ok(n) if n > 0) {
                    *this.last_active = coarse_now();
                }
                Poll::Ready(r)
            }
            Poll::Pending => IdleLimit::of(*this.between, *this.timeout, *this.keepalive)
                .check(this.sleep, *this.last_active, cx)
                .map(Err),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

/// Bytes moved on one connection, and how many of them were already attributed to a
/// request (so each byte is counted once).
///
/// A response's last bytes are written after its request is accounted, so whatever a
/// connection moves after its last request goes, at the connection's end, to the owner
/// recorded with [`ConnBytes::with_owner`].
#[derive(Debug)]
pub struct ConnBytes<O = ()> {
    rx: std::sync::atomic::AtomicU64,
    tx: std::sync::atomic::AtomicU64,
    rx_taken: std::sync::atomic::AtomicU64,
    tx_taken: std::sync::atomic::AtomicU64,
    owner: std::sync::Mutex<Option<O>>,
    /// A tunnel or switched connection took the connection over, and accounts for
    /// its bytes when it ends.
    handed_over: std::sync::atomic::AtomicBool,
    /// Whether the request that might switch protocols (CONNECT, `Upgrade`) did, for
    /// the reader of the connection that waits to know (`server::guard`).
    switch: std::sync::Mutex<Switch>,
}

/// A decision on a protocol switch, and who waits for it.
#[derive(Debug, Default)]
struct Switch {
    decided: Option<bool>,
    waiter: Option<std::task::Waker>,
}

impl<O> Default for ConnBytes<O> {
    fn default() -> Self {
        ConnBytes {
            rx: Default::default(),
            tx: Default::default(),
            rx_taken: Default::default(),
            tx_taken: Default::default(),
            owner: std::sync::Mutex::new(None),
            handed_over: Default::default(),
            switch: Default::default(),
        }
    }
}

impl<O> ConnBytes<O> {
    /// The last recorded owner.
    pub fn take_owner(&self) -> Option<O> {
        self.owner.lock().expect("owner lock").take()
    }

    /// Runs `f` on the owner slot (under its lock, held only for `f`).
    pub fn with_owner<R>(&self, f: impl FnOnce(&mut Option<O>) -> R) -> R {
        f(&mut self.owner.lock().expect("owner lock"))
    }

    /// Marks the connection as taken over by a tunnel or switched connection.
    pub fn hand_over(&self) {
        self.handed_over
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Tells whoever waits in [`ConnBytes::poll_switch`] whether the request that
    /// might switch protocols did.
    pub fn decide_switch(&self, switched: bool) {
        let mut s = self.switch.lock().expect("switch lock");
        s.decided = Some(switched);
        let waiter = s.waiter.take();
        drop(s); // switch lock released here
        if let Some(w) = waiter {
            w.wake();
        }
    }

    /// Ready with the decision once [`ConnBytes::decide_switch`] made it (and takes
    /// it, for the next such request).
    pub fn poll_switch(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<bool> {
        let mut s = self.switch.lock().expect("switch lock");
        match s.decided.take() {
            Some(switched) => std::task::Poll::Ready(switched),
            None => {
                s.waiter = Some(cx.waker().clone());
                std::task::Poll::Pending
            }
        }
    }

    /// True once a tunnel or switched connection took the connection over.
    pub fn is_handed_over(&self) -> bool {
        self.handed_over.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Every byte read so far.
    pub fn read_total(&self) -> u64 {
        self.rx.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Bytes read and written since the last call: (rx, tx).
    pub fn take(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let rx = self.rx.load(Relaxed);
        let tx = self.tx.load(Relaxed);
        let rx_before = self.rx_taken.swap(rx, Relaxed);
        let tx_before = self.tx_taken.swap(tx, Relaxed);
        (rx.saturating_sub(rx_before), tx.saturating_sub(tx_before))
    }
}

pin_project! {
    /// A stream that counts the bytes read from and written to it.
    pub struct CountingIo<T, O> {
        #[pin]
        inner: T,
        bytes: std::sync::Arc<ConnBytes<O>>,
    }
}

impl<T, O> CountingIo<T, O> {
    pub fn new(inner: T, bytes: std::sync::Arc<ConnBytes<O>>) -> Self {
        CountingIo { inner, bytes }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead, O> AsyncRead for CountingIo<T, O> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let r = this.inner.poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.bytes
                .rx
                .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite, O> AsyncWrite for CountingIo<T, O> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.bytes
                .tx
                .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            this.bytes
                .tx
                .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

/// A bounded number of places, for things a process keeps only so many of (buffers of
/// idle connections). A place is given back when its [`Slot`] drops, however its holder
/// ends.
#[derive(Debug)]
pub struct Slots {
    taken: std::sync::atomic::AtomicUsize,
    max: usize,
}

/// One place taken in [`Slots`]: `S` is `&Slots` for a holder that borrows them, or
/// `Arc<Slots>` for one that outlives the borrow.
#[derive(Debug)]
pub struct Slot<S: std::ops::Deref<Target = Slots>>(S);

impl Slots {
    pub const fn new(max: usize) -> Slots {
        Slots {
            taken: std::sync::atomic::AtomicUsize::new(0),
            max,
        }
    }

    /// A place, if one is free.
    pub fn try_take<S: std::ops::Deref<Target = Slots>>(slots: S) -> Option<Slot<S>> {
        use std::sync::atomic::Ordering;
        if slots.taken.fetch_add(1, Ordering::Relaxed) < slots.max {
            return Some(Slot(slots));
        }
        slots.taken.fetch_sub(1, Ordering::Relaxed);
        None
    }

    /// Places taken now.
    pub fn taken(&self) -> usize {
        self.taken.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl<S: std::ops::Deref<Target = Slots>> Drop for Slot<S> {
    fn drop(&mut self) {
        self.0
            .taken
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn slots_are_bounded_and_given_back_on_drop() {
        let slots = Slots::new(2);
        let a = Slots::try_take(&slots);
        let b = Slots::try_take(&slots);
        assert!(a.is_some() && b.is_some());
        assert!(Slots::try_take(&slots).is_none());
        assert_eq!(slots.taken(), 2);
        drop(a);
        assert!(
            Slots::try_take(&slots).is_some(),
            "a dropped slot is free again"
        );
        drop(b);
        assert_eq!(slots.taken(), 0);
    }

    #[tokio::test]
    async fn counting_io_counts_each_byte_once() {
        let (a, mut b) = tokio::io::duplex(64);
        let bytes = std::sync::Arc::new(ConnBytes::<()>::default());
        let mut a = CountingIo::new(a, bytes.clone());
        a.write_all(b"hello").await.unwrap();
        b.write_all(b"abc").await.unwrap();
        let mut buf = [0u8; 3];
        a.read_exact(&mut buf).await.unwrap();
        assert_eq!(bytes.take(), (3, 5));
        assert_eq!(bytes.take(), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_stream_times_out() {
        let (a, _b) = tokio::io::duplex(64);
        let mut a = IdleTimeoutIo::new(a, Duration::from_secs(10));
        let start = Instant::now();
        let mut buf = [0u8; 8];
        let err = a.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(start.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn activity_pushes_the_deadline_back() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut a = IdleTimeoutIo::new(a, Duration::from_secs(10));
        let start = Instant::now();
        tokio::spawn(async move {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_secs(6)).await;
                b.write_all(b"x").await.unwrap();
            }
            // Keep the pipe open, silent, until the reader gives up.
            tokio::time::sleep(Duration::from_secs(3600)).await;
        });
        let mut buf = [0u8; 8];
        for _ in 0..3 {
            assert_eq!(a.read(&mut buf).await.unwrap(), 1);
        }
        let err = a.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(start.elapsed(), Duration::from_secs(28));
    }
}
