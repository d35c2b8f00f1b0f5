//! [`H2Watch`]: the IO under hyper's HTTP/2 server that reads the client's frame
//! headers as they pass (never a payload), and holds a connection to what hyper and h2
//! do not:
//!
//! - `header_read` for the connection preface and the client's first SETTINGS, and for
//!   each request's header block (HEADERS up to END_HEADERS): a client trickling
//!   either is closed as an HTTP/1.1 client trickling a head is;
//! - `limits.h2_max_requests_per_connection`: at the limit the connection is asked to
//!   go ([`Watch::drain_wanted`], hyper's graceful GOAWAY); a client that keeps opening
//!   streams past it by more than [`OVERRUN`] is cut;
//! - a budget of client resets (RST_STREAM) and one of SETTINGS and PING frames, each
//!   refilled over time: a client that spends one ends with GOAWAY
//!   ENHANCE_YOUR_CALM (RFC 9113 §5.4.1) and the connection closes. h2's own guard
//!   counts only resets of streams not yet accepted; a paced reset storm (each stream
//!   reset after the proxy already sent it upstream) passes it.
//!
//! The GOAWAY is written here, between two of hyper's frames; what hyper writes after
//! it is dropped, what the client still sends is read and dropped for a moment (a
//! close with unread bytes would be a reset that can destroy the GOAWAY), then hyper
//! reads the end of the stream.
//!
//! A stream that does not open with the HTTP/2 preface (HTTP/1.1 over TLS) is passed
//! through untouched after its first bytes.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

use crate::io::coarse_now;

/// RFC 9113 §3.4: what an HTTP/2 client sends first.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Frame types and flags (RFC 9113 §6).
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

/// GOAWAY error codes (RFC 9113 §7).
const NO_ERROR: u32 = 0x0;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// Client resets a connection may spend at once, and how many it gets back a second.
pub const RESET_BURST: u32 = 50;
pub const RESET_REFILL: u32 = 5;
/// SETTINGS and PING frames (not acknowledgements) likewise.
pub const CONTROL_BURST: u32 = 1000;
pub const CONTROL_REFILL: u32 = 100;
/// Streams a client may open past the request limit while hyper's GOAWAY is on its way
/// (one round trip); beyond, the connection is cut.
pub const OVERRUN: u64 = 128;

/// Most bytes read and dropped after a GOAWAY, and for how long, before the end.
const LINGER_BYTES: usize = 1 << 20;
const LINGER_TIME: Duration = Duration::from_secs(1);

/// What the connection's task and the watch share.
#[derive(Debug, Default)]
pub struct Watch {
    drain: Notify,
}

impl Watch {
    /// Completes once the connection should be asked to go (its request limit).
    pub async fn drain_wanted(&self) {
        self.drain.notified().await
    }
}

/// A budget refilled over time.
#[derive(Debug)]
struct Budget {
    left: u32,
    burst: u32,
    per_sec: u32,
    since: Instant,
}

impl Budget {
    fn new(burst: u32, per_sec: u32) -> Budget {
        Budget {
            left: burst,
            burst,
            per_sec,
            since: coarse_now(),
        }
    }

    /// Spends one; false when none is left.
    fn spend(&mut self) -> bool {
        let now = coarse_now();
        let elapsed = now.duration_since(self.since).as_millis() as u64;
        let back = elapsed * self.per_sec as u64 / 1000;
        if back > 0 {
            self.left = (self.left as u64 + back).min(self.burst as u64) as u32;
            // The time the refill paid for, not all of it: what is left over counts
            // toward the next.
            self.since += Duration::from_millis(back * 1000 / self.per_sec as u64);
            if self.left == self.burst {
                self.since = now;
            }
        }
        match self.left.checked_sub(1) {
            Some(n) => {
                self.left = n;
                true
            }
            None => false,
        }
    }
}

/// Where the reader is in the client's byte stream.
#[derive(Debug, Clone, Copy)]
enum Read {
    /// This many bytes of the preface seen.
    Preface(usize),
    /// This many bytes of a frame header in `head`.
    Head(usize),
    /// This many payload bytes of the current frame still to pass.
    Payload(u32),
    /// Not HTTP/2: everything passes.
    Off,
}

/// Why the connection is being ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Reading on: nothing to end.
    No,
    /// The GOAWAY is owed (hyper's writes are between frames when it goes); this many
    /// bytes of it written.
    GoAway(usize),
    /// The GOAWAY is written: flushed (TLS holds it until then), then the write side
    /// closed.
    Flush,
    /// Reading and dropping what the client sends, this many bytes so far, until it
    /// closes or the linger ends.
    Linger(usize),
    /// The end of the stream, for hyper.
    Done,
}

/// The reader's knowledge of the client's frames.
#[derive(Debug)]
struct Frames {
    read: Read,
    head: [u8; 9],
    /// The current frame's type and flags.
    kind: u8,
    flags: u8,
    /// The client's first SETTINGS frame is whole.
    settings_seen: bool,
    /// A header block is open (HEADERS without END_HEADERS, or its CONTINUATIONs), or
    /// a HEADERS frame is partly read.
    in_block: bool,
    /// The highest stream the client opened.
    last_stream: u32,
    requests: u64,
    /// Header blocks begun: each has its own `header_read` clock.
    blocks: u64,
    /// Requests when hyper wrote its final GOAWAY: the overrun counts from there.
    requests_at_goaway: Option<u64>,
    resets: Budget,
    control: Budget,
}

/// What a frame header or a frame's end means for the connection.
enum Verdict {
    Fine,
    Drain,
    Calm(&'static str),
}

impl Frames {
    fn new() -> Frames {
        Frames {
            read: Read::Preface(0),
            head: [0; 9],
            kind: 0,
            flags: 0,
            settings_seen: false,
            in_block: false,
            last_stream: 0,
            requests: 0,
            blocks: 0,
            requests_at_goaway: None,
            resets: Budget::new(RESET_BURST, RESET_REFILL),
            control: Budget::new(CONTROL_BURST, CONTROL_REFILL),
        }
    }

    /// True while `header_read` runs: the preface or the first SETTINGS are not whole,
    /// or a header block is open.
    fn awaits_head(&self) -> bool {
        match self.read {
            Read::Off => false,
            Read::Preface(_) => true,
            _ => !self.settings_seen || self.in_block,
        }
    }

    /// Reads `bytes` as they pass; the first verdict other than fine stops the look.
    fn feed(&mut self, mut bytes: &[u8], max_requests: u64) -> Verdict {
        let mut verdict = Verdict::Fine;
        while !bytes.is_empty() {
            match self.read {
                Read::Off => return verdict,
                Read::Preface(seen) => {
                    let n = (PREFACE.len() - seen).min(bytes.len());
                    if bytes[..n] != PREFACE[seen..seen + n] {
                        self.read = Read::Off;
                        return verdict;
                    }
                    bytes = &bytes[n..];
                    self.read = if seen + n == PREFACE.len() {
                        Read::Head(0)
                    } else {
                        Read::Preface(seen + n)
                    };
                }
                Read::Head(got) => {
                    let n = (9 - got).min(bytes.len());
                    self.head[got..got + n].copy_from_slice(&bytes[..n]);
                    bytes = &bytes[n..];
                    if got + n < 9 {
                        self.read = Read::Head(got + n);
                        continue;
                    }
                    let len = u32::from_be_bytes([0, self.head[0], self.head[1], self.head[2]]);
                    self.kind = self.head[3];
                    self.flags = self.head[4];
                    let stream = u32::from_be_bytes([
                        self.head[5],
                        self.head[6],
                        self.head[7],
                        self.head[8],
                    ]) & 0x7fff_ffff;
                    self.read = Read::Payload(len);
                    let v = self.frame_begins(stream, max_requests);
                    if !matches!(v, Verdict::Fine) {
                        verdict = v;
                        if matches!(verdict, Verdict::Calm(_)) {
                            return verdict;
                        }
                    }
                    if len == 0 {
                        self.frame_ends();
                    }
                }
                Read::Payload(left) => {
                    let n = (left as usize).min(bytes.len());
                    bytes = &bytes[n..];
                    let left = left - n as u32;
                    self.read = Read::Payload(left);
                    if left == 0 {
                        self.frame_ends();
                    }
                }
            }
        }
        verdict
    }

    fn frame_begins(&mut self, stream: u32, max_requests: u64) -> Verdict {
        let ack = self.flags & ACK != 0;
        match self.kind {
            HEADERS => {
                self.in_block = true;
                self.blocks += 1;
                if stream > self.last_stream && stream % 2 == 1 {
                    self.last_stream = stream;
                    self.requests += 1;
                    // Past hyper's final GOAWAY by more than a round trip's worth, or
                    // far past the limit while it has not gone.
                    let cut = match self.requests_at_goaway {
                        Some(at) => at.max(max_requests).saturating_add(OVERRUN),
                        None => max_requests.saturating_add(8 * OVERRUN),
                    };
                    if self.requests > cut {
                        return Verdict::Calm("streams opened past the request limit");
                    }
                    if self.requests == max_requests {
                        return Verdict::Drain;
                    }
                }
            }
            RST_STREAM if !self.resets.spend() => {
                return Verdict::Calm("too many stream resets");
            }
            SETTINGS | PING if !ack && !self.control.spend() => {
                return Verdict::Calm("too many SETTINGS or PING frames");
            }
            _ => {}
        }
        Verdict::Fine
    }

    fn frame_ends(&mut self) {
        match self.kind {
            SETTINGS => self.settings_seen = true,
            HEADERS | CONTINUATION if self.flags & END_HEADERS != 0 => self.in_block = false,
            _ => {}
        }
        self.read = Read::Head(0);
    }
}

/// Where the writer is in hyper's frames: a GOAWAY may go only between two. It also
/// notes hyper's own GOAWAYs.
#[derive(Debug, Default)]
struct Written {
    head: [u8; 9],
    got: usize,
    left: u32,
    /// The current frame is a GOAWAY: its last stream id's bytes, as they pass.
    goaway: Option<([u8; 4], usize)>,
    /// hyper wrote a GOAWAY naming a stream (not the 2^31-1 of a graceful one's
    /// first).
    final_goaway: bool,
}

impl Written {
    fn between_frames(&self) -> bool {
        self.got == 0 && self.left == 0
    }

    fn pass(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.left > 0 {
                let n = (self.left as usize).min(bytes.len());
                if let Some((id, seen)) = &mut self.goaway {
                    let take = (4 - *seen).min(n);
                    id[*seen..*seen + take].copy_from_slice(&bytes[..take]);
                    *seen += take;
                    if *seen == 4 {
                        self.final_goaway |= u32::from_be_bytes(*id) & 0x7fff_ffff != 0x7fff_ffff;
                        self.goaway = None;
                    }
                }
                self.left -= n as u32;
                bytes = &bytes[n..];
                continue;
            }
            let n = (9 - self.got).min(bytes.len());
            self.head[self.got..self.got + n].copy_from_slice(&bytes[..n]);
            self.got += n;
            bytes = &bytes[n..];
            if self.got == 9 {
                self.left = u32::from_be_bytes([0, self.head[0], self.head[1], self.head[2]]);
                self.goaway = (self.head[3] == GOAWAY && self.left >= 8).then_some(([0; 4], 0));
                self.got = 0;
            }
        }
    }
}

/// See the module documentation.
pub struct H2Watch<T> {
    inner: T,
    frames: Frames,
    written: Written,
    end: End,
    header_read: Duration,
    max_requests: u64,
    /// Runs while `header_read` does (for the preface, or header block number
    /// `timer_block`), and while ending.
    timer: Option<Pin<Box<Sleep>>>,
    timer_block: u64,
    /// The last GOAWAY's bytes.
    goaway: [u8; 17],
    watch: Arc<Watch>,
}

impl<T> H2Watch<T> {
    pub fn new(inner: T, header_read: Duration, max_requests: u64, watch: Arc<Watch>) -> Self {
        H2Watch {
            inner,
            frames: Frames::new(),
            written: Written::default(),
            end: End::No,
            header_read,
            max_requests,
            timer: None,
            timer_block: 0,
            goaway: [0; 17],
            watch,
        }
    }

    /// Starts the end: a GOAWAY with `code` naming `last_stream`, then the linger; all
    /// of it within [`LINGER_TIME`].
    fn end_with(&mut self, code: u32, last_stream: u32, why: &str) {
        if self.end != End::No {
            return;
        }
        tracing::debug!("HTTP/2 client: {why}; closing the connection");
        self.goaway[..9].copy_from_slice(&[0, 0, 8, GOAWAY, 0, 0, 0, 0, 0]);
        self.goaway[9..13].copy_from_slice(&last_stream.to_be_bytes());
        self.goaway[13..].copy_from_slice(&code.to_be_bytes());
        // Mid-frame no GOAWAY can go: the connection just closes.
        self.end = if self.written.between_frames() {
            End::GoAway(0)
        } else {
            End::Linger(0)
        };
        self.timer = Some(Box::pin(tokio::time::sleep(LINGER_TIME)));
    }
}

impl<T> H2Watch<T> {
    /// hyper's final GOAWAY went: the request limit's overrun counts from here.
    fn note_goaway(&mut self) {
        if self.written.final_goaway && self.frames.requests_at_goaway.is_none() {
            self.frames.requests_at_goaway = Some(self.frames.requests);
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> H2Watch<T> {
    /// Moves the end along: the GOAWAY, its flush, the write side's close, the linger.
    /// Ready once the stream should end for hyper.
    fn poll_end(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if let Some(t) = &mut self.timer
                && t.as_mut().poll(cx).is_ready()
            {
                self.end = End::Done;
            }
            let inner = Pin::new(&mut self.inner);
            match self.end {
                End::No => return Poll::Pending,
                End::Done => return Poll::Ready(()),
                End::GoAway(sent) if sent < self.goaway.len() => {
                    self.end = match ready!(inner.poll_write(cx, &self.goaway[sent..])) {
                        Ok(n) if n > 0 => End::GoAway(sent + n),
                        _ => End::Linger(0),
                    };
                }
                End::GoAway(_) => {
                    self.end = match ready!(inner.poll_flush(cx)) {
                        Ok(()) => End::Flush,
                        Err(_) => End::Linger(0),
                    };
                }
                End::Flush => {
                    let _ = ready!(inner.poll_shutdown(cx));
                    self.end = End::Linger(0);
                }
                End::Linger(dropped) => {
                    if dropped >= LINGER_BYTES {
                        self.end = End::Done;
                        continue;
                    }
                    let mut scratch = [0u8; 4096];
                    let mut rb = ReadBuf::new(&mut scratch);
                    self.end = match ready!(inner.poll_read(cx, &mut rb)) {
                        Ok(()) if !rb.filled().is_empty() => {
                            End::Linger(dropped + rb.filled().len())
                        }
                        _ => End::Done,
                    };
                }
            }
        }
    }

    /// Runs `header_read` while the watch waits for a head; true once it passed.
    fn head_late(&mut self, cx: &mut Context<'_>) -> bool {
        self.arm_head_clock();
        match &mut self.timer {
            Some(t) => t.as_mut().poll(cx).is_ready(),
            None => false,
        }
    }

    /// The `header_read` clock: running while a head is awaited, started afresh for
    /// each header block, stopped otherwise.
    fn arm_head_clock(&mut self) {
        if !self.frames.awaits_head() {
            self.timer = None;
        } else if self.timer.is_none() || self.timer_block != self.frames.blocks {
            self.timer = Some(Box::pin(tokio::time::sleep(self.header_read)));
            self.timer_block = self.frames.blocks;
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for H2Watch<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.end != End::No {
            ready!(this.poll_end(cx));
            return Poll::Ready(Ok(()));
        }
        if let Read::Off = this.frames.read {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let handed_last = this.frames.last_stream;
                let verdict = this.frames.feed(&buf.filled()[before..], this.max_requests);
                match verdict {
                    Verdict::Fine => {}
                    Verdict::Drain => this.watch.drain.notify_one(),
                    Verdict::Calm(why) => {
                        // What this read brought is not handed on: the connection is
                        // over, and hyper must not act on a frame past the limit. The
                        // GOAWAY names the last stream hyper was given: the client may
                        // send the others again elsewhere.
                        buf.set_filled(before);
                        this.end_with(ENHANCE_YOUR_CALM, handed_last, why);
                        ready!(this.poll_end(cx));
                        return Poll::Ready(Ok(()));
                    }
                }
                // A head still incomplete after this read keeps its clock; one that
                // came whole never started one.
                this.arm_head_clock();
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if this.head_late(cx) {
                    let why = if this.frames.settings_seen {
                        "request header block not complete within header_read"
                    } else {
                        "connection preface not complete within header_read"
                    };
                    let last = this.frames.last_stream;
                    this.end_with(NO_ERROR, last, why);
                    ready!(this.poll_end(cx));
                    return Poll::Ready(Ok(()));
                }
                Poll::Pending
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for H2Watch<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.end != End::No {
            // After the GOAWAY, hyper's frames go nowhere.
            return Poll::Ready(Ok(buf.len()));
        }
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        if !matches!(this.frames.read, Read::Off) {
            this.written.pass(&buf[..n]);
            this.note_goaway();
        }
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.end != End::No {
            return Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
        }
        let n = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, bufs))?;
        if !matches!(this.frames.read, Read::Off) {
            let mut left = n;
            for b in bufs {
                let take = left.min(b.len());
                this.written.pass(&b[..take]);
                left -= take;
                if left == 0 {
                    break;
                }
            }
            this.note_goaway();
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.end != End::No {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.end != End::No {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn opening() -> Vec<u8> {
        let mut b = PREFACE.to_vec();
        b.extend(frame(SETTINGS, 0, 0, &[]));
        b
    }

    /// A watched server end, the client end, and the watch.
    fn pair(
        header_read: Duration,
        max_requests: u64,
    ) -> (
        H2Watch<tokio::io::DuplexStream>,
        tokio::io::DuplexStream,
        Arc<Watch>,
    ) {
        let (client, server) = tokio::io::duplex(1 << 20);
        let watch = Arc::new(Watch::default());
        (
            H2Watch::new(server, header_read, max_requests, watch.clone()),
            client,
            watch,
        )
    }

    /// Reads from the watched end until it ends; what it handed on.
    async fn read_all(w: &mut H2Watch<tokio::io::DuplexStream>) -> Vec<u8> {
        let mut got = Vec::new();
        w.read_to_end(&mut got).await.unwrap();
        got
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickled_preface_ends_at_header_read() {
        let (mut w, mut client, _) = pair(Duration::from_secs(15), 1000);
        client.write_all(&PREFACE[..5]).await.unwrap();
        let start = Instant::now();
        let got = read_all(&mut w).await;
        assert_eq!(got, &PREFACE[..5]);
        assert!(start.elapsed() >= Duration::from_secs(15));
        assert!(start.elapsed() < Duration::from_secs(17));
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_header_block_ends_at_header_read_and_a_whole_one_runs_no_clock() {
        let (mut w, mut client, _) = pair(Duration::from_secs(15), 1000);
        let mut bytes = opening();
        bytes.extend(frame(HEADERS, END_HEADERS, 1, b"abc"));
        // HEADERS without END_HEADERS, and no CONTINUATION.
        bytes.extend(frame(HEADERS, 0, 3, b"abc"));
        client.write_all(&bytes).await.unwrap();
        let start = Instant::now();
        let got = read_all(&mut w).await;
        assert_eq!(got, bytes);
        assert!(start.elapsed() >= Duration::from_secs(15));
        // A GOAWAY (NO_ERROR, last stream 3) went to the client.
        let mut goaway = [0u8; 17];
        client.read_exact(&mut goaway).await.unwrap();
        assert_eq!(goaway, [0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0]);
    }

    #[tokio::test(start_paused = true)]
    async fn quiet_connections_between_requests_have_no_head_clock() {
        let (mut w, mut client, _) = pair(Duration::from_secs(15), 1000);
        let mut bytes = opening();
        bytes.extend(frame(HEADERS, END_HEADERS, 1, b"abc"));
        client.write_all(&bytes).await.unwrap();
        let mut got = vec![0u8; bytes.len()];
        w.read_exact(&mut got).await.unwrap();
        let mut more = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(60), w.read(&mut more)).await;
        assert!(r.is_err(), "a connection between requests was ended: {r:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_request_limit_asks_for_a_drain_then_cuts_an_overrun() {
        let (mut w, mut client, watch) = pair(Duration::from_secs(15), 3);
        let mut bytes = opening();
        for i in 0..3 {
            bytes.extend(frame(HEADERS, END_HEADERS, 1 + 2 * i, b"x"));
        }
        client.write_all(&bytes).await.unwrap();
        let mut got = vec![0u8; bytes.len()];
        w.read_exact(&mut got).await.unwrap();
        tokio::time::timeout(Duration::from_secs(1), watch.drain_wanted())
            .await
            .expect("no drain asked for at the request limit");
        // hyper's final GOAWAY goes out: the overrun counts from there.
        w.write_all(&frame(GOAWAY, 0, 0, &[0, 0, 0, 5, 0, 0, 0, 0]))
            .await
            .unwrap();
        let mut more = Vec::new();
        for i in 3..(3 + OVERRUN as u32 + 1) {
            more.extend(frame(HEADERS, END_HEADERS, 1 + 2 * i, b"x"));
        }
        client.write_all(&more).await.unwrap();
        let rest = read_all(&mut w).await;
        assert!(rest.len() < more.len(), "the overrun was handed on whole");
    }

    #[tokio::test(start_paused = true)]
    async fn a_reset_storm_ends_in_enhance_your_calm() {
        let (mut w, mut client, _) = pair(Duration::from_secs(15), 1000);
        client.write_all(&opening()).await.unwrap();
        let mut handed = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut sent = 0;
        for i in 0..200u32 {
            let mut b = frame(HEADERS, END_HEADERS, 1 + 2 * i, b"x");
            b.extend(frame(RST_STREAM, 0, 1 + 2 * i, &8u32.to_be_bytes()));
            client.write_all(&b).await.unwrap();
            sent += 1;
            let n = w.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            handed.extend_from_slice(&buf[..n]);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(sent < 100, "{sent} paced resets passed");
        let mut goaway = [0u8; 17];
        client.read_exact(&mut goaway).await.unwrap();
        assert_eq!(&goaway[..5], &[0, 0, 8, 7, 0]);
        assert_eq!(
            u32::from_be_bytes(goaway[13..].try_into().unwrap()),
            ENHANCE_YOUR_CALM
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_ping_flood_ends_in_enhance_your_calm_and_pings_at_a_pace_do_not() {
        let (mut w, mut client, _) = pair(Duration::from_secs(15), 1000);
        client.write_all(&opening()).await.unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let n = w.read(&mut buf).await.unwrap();
        assert_eq!(n, opening().len());
        // Ten a second for a minute: fine.
        for _ in 0..600 {
            client.write_all(&frame(PING, 0, 0, &[0; 8])).await.unwrap();
            assert_eq!(w.read(&mut buf).await.unwrap(), 17);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let flood: Vec<u8> = (0..5000).flat_map(|_| frame(PING, 0, 0, &[0; 8])).collect();
        client.write_all(&flood).await.unwrap();
        let rest = read_all(&mut w).await;
        assert!(rest.len() < flood.len());
        let mut goaway = [0u8; 17];
        client.read_exact(&mut goaway).await.unwrap();
        assert_eq!(
            u32::from_be_bytes(goaway[13..].try_into().unwrap()),
            ENHANCE_YOUR_CALM
        );
    }

    #[tokio::test(start_paused = true)]
    async fn each_header_block_has_its_own_clock() {
        let (mut w, mut client, _) = pair(Duration::from_secs(2), 1000);
        client.write_all(&opening()).await.unwrap();
        let one = frame(HEADERS, END_HEADERS, 1, &[0x82; 20]);
        let three = frame(HEADERS, END_HEADERS, 3, &[0x82; 20]);
        let mut buf = vec![0u8; 4096];
        let _ = w.read(&mut buf).await.unwrap();
        client.write_all(&one[..10]).await.unwrap();
        let _ = w.read(&mut buf).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // The rest of the first block and the start of the next, in one read.
        let mut b = one[10..].to_vec();
        b.extend_from_slice(&three[..10]);
        client.write_all(&b).await.unwrap();
        let _ = w.read(&mut buf).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1000)).await;
        client.write_all(&three[10..]).await.unwrap();
        let n = w.read(&mut buf).await.unwrap();
        assert_eq!(
            n,
            three.len() - 10,
            "the second block was timed from the first"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_calm_goaway_names_the_last_stream_hyper_was_given() {
        let (mut w, mut client, _) = pair(Duration::from_secs(15), 1000);
        let mut bytes = opening();
        bytes.extend(frame(HEADERS, END_HEADERS, 1, b"x"));
        client.write_all(&bytes).await.unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let _ = w.read(&mut buf).await.unwrap();
        // A new stream and a reset storm in one read: none of it reaches hyper.
        let mut storm = frame(HEADERS, END_HEADERS, 3, b"x");
        for _ in 0..=RESET_BURST {
            storm.extend(frame(RST_STREAM, 0, 3, &8u32.to_be_bytes()));
        }
        client.write_all(&storm).await.unwrap();
        assert_eq!(
            w.read(&mut buf).await.unwrap(),
            0,
            "part of the storm was handed on"
        );
        let mut goaway = [0u8; 17];
        client.read_exact(&mut goaway).await.unwrap();
        assert_eq!(u32::from_be_bytes(goaway[9..13].try_into().unwrap()), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_budget_refills_at_its_rate() {
        let mut b = Budget::new(5, 5);
        for _ in 0..5 {
            assert!(b.spend());
        }
        assert!(!b.spend());
        // 5.1 a second for ten seconds: about 50 back, not fewer.
        let mut spent = 0;
        for _ in 0..51 {
            tokio::time::sleep(Duration::from_millis(196)).await;
            spent += u32::from(b.spend());
        }
        assert!(spent >= 49, "{spent} of 51 spent at just above the rate");
    }

    #[tokio::test]
    async fn http1_passes_untouched() {
        let (mut w, mut client, _) = pair(Duration::from_secs(15), 1000);
        let req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        client.write_all(req).await.unwrap();
        drop(client);
        assert_eq!(read_all(&mut w).await, req);
        assert!(matches!(w.frames.read, Read::Off));
    }

    #[test]
    fn frames_split_anywhere_are_read_alike() {
        let mut bytes = opening();
        bytes.extend(frame(HEADERS, 0, 1, b"abcdef"));
        bytes.extend(frame(CONTINUATION, END_HEADERS, 1, b"gh"));
        bytes.extend(frame(0x0, 0x1, 1, b"body"));
        bytes.extend(frame(HEADERS, 0, 3, b"abc"));
        for split in 1..bytes.len() {
            let mut f = Frames::new();
            f.feed(&bytes[..split], 1000);
            f.feed(&bytes[split..], 1000);
            assert!(f.settings_seen && f.in_block, "split at {split}");
            assert_eq!((f.requests, f.last_stream), (2, 3), "split at {split}");
        }
    }
}
