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
        let back = now.duration_since(self.since).as_millis() as u64 * self.per_sec as u64 / 1000;
        if back > 0 {
            self.left = (self.left as u64 + back).min(self.burst as u64) as u32;
            self.since = now;
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
    /// The GOAWAY with this code is owed (hyper's writes are between frames when it
    /// goes); `usize` bytes of it written.
    GoAway(u32, usize),
    /// The GOAWAY went (or could not): reading and dropping what the client sends,
    /// `usize` bytes so far, until it closes or the linger ends.
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
                if stream > self.last_stream && stream % 2 == 1 {
                    self.last_stream = stream;
                    self.requests += 1;
                    if self.requests > max_requests.saturating_add(OVERRUN) {
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

/// Where the writer is in hyper's frames: a GOAWAY may go only between two.
#[derive(Debug, Default)]
struct Written {
    head: [u8; 9],
    got: usize,
    left: u32,
}

impl Written {
    fn between_frames(&self) -> bool {
        self.got == 0 && self.left == 0
    }

    fn pass(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.left > 0 {
                let n = (self.left as usize).min(bytes.len());
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
    /// Runs while `header_read` does, and while lingering.
    timer: Option<Pin<Box<Sleep>>>,
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
            goaway: [0; 17],
            watch,
        }
    }

    /// Starts the end: a GOAWAY with `code`, then the linger.
    fn end_with(&mut self, code: u32, why: &str) {
        if self.end != End::No {
            return;
        }
        tracing::debug!("HTTP/2 client: {why}; closing the connection");
        self.goaway[..9].copy_from_slice(&[0, 0, 8, 0x7, 0, 0, 0, 0, 0]);
        self.goaway[9..13].copy_from_slice(&self.frames.last_stream.to_be_bytes());
        self.goaway[13..].copy_from_slice(&code.to_be_bytes());
        self.end = End::GoAway(code, 0);
        self.timer = None;
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> H2Watch<T> {
    /// Moves the end along: the GOAWAY (if hyper's writes are between frames), the
    /// write side's close, the linger. Ready once the stream should end for hyper.
    fn poll_end(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            match self.end {
                End::No => return Poll::Pending,
                End::Done => return Poll::Ready(()),
                End::GoAway(code, sent) => {
                    if sent == 0 && !self.written.between_frames() {
                        // Mid-frame: no GOAWAY can go; the connection just closes.
                        self.end = End::Linger(0);
                        continue;
                    }
                    if sent < self.goaway.len() {
                        match Pin::new(&mut self.inner).poll_write(cx, &self.goaway[sent..]) {
                            Poll::Ready(Ok(n)) if n > 0 => {
                                self.end = End::GoAway(code, sent + n);
                                continue;
                            }
                            Poll::Ready(_) => self.end = End::Linger(0),
                            // A client that does not read gets no GOAWAY.
                            Poll::Pending => self.end = End::Linger(0),
                        }
                        continue;
                    }
                    let _ = Pin::new(&mut self.inner).poll_shutdown(cx);
                    self.end = End::Linger(0);
                }
                End::Linger(dropped) => {
                    let timer = self
                        .timer
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(LINGER_TIME)));
                    if timer.as_mut().poll(cx).is_ready() || dropped >= LINGER_BYTES {
                        self.end = End::Done;
                        continue;
                    }
                    let mut scratch = [0u8; 4096];
                    let mut rb = ReadBuf::new(&mut scratch);
                    match Pin::new(&mut self.inner).poll_read(cx, &mut rb) {
                        Poll::Ready(Ok(())) if !rb.filled().is_empty() => {
                            self.end = End::Linger(dropped + rb.filled().len());
                        }
                        Poll::Ready(_) => self.end = End::Done,
                        Poll::Pending => return Poll::Pending,
                    }
                }
            }
        }
    }

    /// Runs `header_read` while the watch waits for a head; true once it passed.
    fn head_late(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.frames.awaits_head() {
            self.timer = None;
            return false;
        }
        let within = self.header_read;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(within)));
        timer.as_mut().poll(cx).is_ready()
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
                let verdict = this.frames.feed(&buf.filled()[before..], this.max_requests);
                match verdict {
                    Verdict::Fine => {}
                    Verdict::Drain => this.watch.drain.notify_one(),
                    Verdict::Calm(why) => {
                        // What this read brought is not handed on: the connection is
                        // over, and hyper must not act on a frame past the limit.
                        buf.set_filled(before);
                        this.end_with(ENHANCE_YOUR_CALM, why);
                        ready!(this.poll_end(cx));
                        return Poll::Ready(Ok(()));
                    }
                }
                // A head still incomplete after this read keeps its clock; one that
                // came whole never started one.
                if this.frames.awaits_head() {
                    this.timer
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(this.header_read)));
                } else {
                    this.timer = None;
                }
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
                    this.end_with(NO_ERROR, why);
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
