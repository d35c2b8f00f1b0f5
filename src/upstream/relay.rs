//! The byte relay of CONNECT tunnels and switched (upgraded) connections: bytes both
//! ways until each side has ended its half, with buffers held only while bytes are in
//! flight.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::io::{Slot, Slots};

/// Copies bytes both ways between `a` and `b` until each side has ended its half (the
/// other's write half is then shut down) or either fails: `copy_bidirectional`, with
/// buffers held only while bytes are in flight (see [`Held`]). Returns the bytes moved
/// from `a` to `b` and from `b` to `a`.
pub async fn relay<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut forth = Pipe::default();
    let mut back = Pipe::default();
    poll_fn(|cx| {
        let forth_done = forth.poll(cx, &mut *a, &mut *b)?.is_ready();
        let back_done = back.poll(cx, &mut *b, &mut *a)?.is_ready();
        if forth_done && back_done {
            Poll::Ready(Ok((forth.moved, back.moved)))
        } else {
            Poll::Pending
        }
    })
    .await
}

/// One direction of a relay.
#[derive(Default)]
struct Pipe {
    /// The buffer, while it holds bytes or a read is being tried.
    held: Option<Held>,
    /// The bytes in `held` not yet written: `start..end`.
    start: usize,
    end: usize,
    /// Bytes written since the last flush.
    unflushed: bool,
    read_done: bool,
    done: bool,
    moved: u64,
}

impl Pipe {
    /// Ready once the source ended and the destination's write half is shut down.
    fn poll<R, W>(&mut self, cx: &mut Context<'_>, src: &mut R, dst: &mut W) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if let Some(held) = &self.held {
                while self.start < self.end {
                    let n = ready!(
                        Pin::new(&mut *dst).poll_write(cx, &held.buf[self.start..self.end])
                    )?;
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    self.start += n;
                    self.moved += n as u64;
                    self.unflushed = true;
                }
            }
            (self.start, self.end) = (0, 0);
            if self.read_done {
                ready!(Pin::new(&mut *dst).poll_shutdown(cx))?;
                self.done = true;
                continue;
            }
            let held = self.held.get_or_insert_with(Held::take);
            let mut read = ReadBuf::new(&mut held.buf);
            match Pin::new(&mut *src).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) if read.filled().is_empty() => {
                    self.read_done = true;
                    self.held = None;
                }
                Poll::Ready(Ok(())) => self.end = read.filled().len(),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Nothing to move: the buffer goes back, and what was written is
                    // flushed (a TLS stream may still hold it).
                    self.held = None;
                    if self.unflushed {
                        ready!(Pin::new(&mut *dst).poll_flush(cx))?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// A relay's buffer, taken when a direction tries to read and given back when it has
/// nothing left to move, so an idle tunnel holds none.
///
/// Large buffers make a bulk tunnel fast: a read takes all the source has queued, and
/// the destination's reader wakes once per write, not once per 32 KiB. Measured on a
/// loopback 512 MiB download (bench/compare, scenario 5b), against a direct one: 32 KiB
/// buffers ran at about 0.78 of direct, 256 KiB at about 0.90, 128 KiB and 1 MiB in
/// between. At most [`LARGE_MAX`] are in use at once; past that a direction copies
/// through [`SMALL`] bytes.
struct Held {
    buf: Box<[u8]>,
    _large: Option<Slot<&'static Slots>>,
}

/// The large buffer's size.
const LARGE: usize = 256 * 1024;
/// At most this many large buffers are in use at once (64 MiB).
const LARGE_MAX: usize = 256;
/// The buffer's size once [`LARGE_MAX`] are in use.
const SMALL: usize = 16 * 1024;
/// Buffers of each size kept for reuse by each thread, when given back: a direction
/// takes one each time it tries a read, so a busy thread reuses rather than allocates.
const SPARE_MAX: usize = 4;

static LARGE_IN_USE: Slots = Slots::new(LARGE_MAX);

thread_local! {
    /// This thread's given-back buffers: large ones, then small ones.
    static SPARE: RefCell<[Vec<Box<[u8]>>; 2]> = const { RefCell::new([Vec::new(), Vec::new()]) };
}

/// Where buffers of `len` bytes are kept in [`SPARE`].
fn spare_index(len: usize) -> usize {
    usize::from(len != LARGE)
}

impl Held {
    fn take() -> Held {
        let large = Slots::try_take(&LARGE_IN_USE);
        let len = if large.is_some() { LARGE } else { SMALL };
        let buf = SPARE
            .with_borrow_mut(|spare| spare[spare_index(len)].pop())
            .unwrap_or_else(|| vec![0; len].into_boxed_slice());
        Held { buf, _large: large }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        // `try_with`: a tunnel's task may be dropped while its thread is ending.
        let _ = SPARE.try_with(|spare| {
            let kept = &mut spare.borrow_mut()[spare_index(buf.len())];
            if kept.len() < SPARE_MAX {
                kept.push(buf);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The tests here count the process's large buffers: one at a time.
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    /// Bytes cross both ways, each half-close is passed on, and a tunnel with nothing
    /// to move holds no buffer.
    #[tokio::test]
    async fn relay_moves_both_ways_passes_half_closes_and_idles_without_a_buffer() {
        let _alone = ONE_AT_A_TIME.lock().await;
        let (mut client, mut near) = tokio::io::duplex(64 * 1024);
        let (mut far, mut origin) = tokio::io::duplex(64 * 1024);
        let relaying = tokio::spawn(async move { relay(&mut near, &mut far).await });

        client.write_all(b"hello").await.unwrap();
        let mut got = [0; 5];
        origin.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        // Idle now: both directions gave their buffers back.
        for _ in 0..100 {
            if LARGE_IN_USE.taken() == 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(LARGE_IN_USE.taken(), 0, "an idle tunnel holds a buffer");

        // A transfer larger than any buffer on the way, read while it is written.
        let big: Vec<u8> = (0..3 << 20).map(|i| (i % 251) as u8).collect();
        let sent = big.clone();
        let writer = tokio::spawn(async move {
            origin.write_all(&sent).await.unwrap();
            origin
        });
        let mut back = vec![0; big.len()];
        client.read_exact(&mut back).await.unwrap();
        assert!(back == big, "the bytes changed on the way");
        let mut origin = writer.await.unwrap();

        // The client ends its half: the origin sees the end and may still answer.
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        origin.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        origin.write_all(b"bye").await.unwrap();
        origin.shutdown().await.unwrap();
        let mut tail = Vec::new();
        client.read_to_end(&mut tail).await.unwrap();
        assert_eq!(tail, b"bye");

        let (forth, back) = relaying.await.unwrap().unwrap();
        assert_eq!((forth, back), (5, big.len() as u64 + 3));
        assert_eq!(LARGE_IN_USE.taken(), 0);
    }

    /// Past [`LARGE_MAX`] large buffers in use, a direction copies through a small one;
    /// the count goes back to zero as they are given back, and a thread keeps at most
    /// [`SPARE_MAX`] of each size for reuse.
    #[tokio::test]
    async fn large_buffers_are_bounded() {
        let _alone = ONE_AT_A_TIME.lock().await;
        let held: Vec<Held> = (0..LARGE_MAX).map(|_| Held::take()).collect();
        assert!(held.iter().all(|h| h.buf.len() == LARGE));
        let past = Held::take();
        assert_eq!(past.buf.len(), SMALL);
        assert_eq!(LARGE_IN_USE.taken(), LARGE_MAX);
        drop(past);
        drop(held);
        assert_eq!(LARGE_IN_USE.taken(), 0);
        // Only SPARE_MAX of those given back are kept; the next take reuses one.
        let large_kept = || SPARE.with_borrow(|spare| spare[spare_index(LARGE)].len());
        assert_eq!(large_kept(), SPARE_MAX);
        let again = Held::take();
        assert_eq!(again.buf.len(), LARGE);
        assert_eq!(large_kept(), SPARE_MAX - 1);
    }
}
