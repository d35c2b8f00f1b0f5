//! A misbehaving HTTP/1.1 origin for `bench/soak`: it answers every request it reads with
//! a whole `200`, and between requests it closes, resets, drops and stalls its keep-alive
//! connections at random, the way origins and the networks in front of them do.
//!
//! ```sh
//! cargo run --example chaos_origin [ADDR]   # default 127.0.0.1:0; prints the bound address
//! curl http://ADDR/_chaos/stats             # what it did so far (never chaotic)
//! ```
//!
//! The contract a proxy can count on: a request the origin has read always gets its
//! whole response (the chaos happens only between requests, and a close or reset waits
//! until the peer has acknowledged every byte of the response before). What it does to a
//! connection after a response, each with its own probability per response (env vars,
//! defaults in brackets):
//!
//! - `CHAOS_CLOSE` [0.03]: close at once (FIN), though the response promised keep-alive;
//! - `CHAOS_RESET` [0.03]: reset (`SO_LINGER` 0, then close) at once;
//! - `CHAOS_DROP`  [0.02]: wait for the next request, then reset without reading it;
//! - `CHAOS_IDLE`  [0.03]: close if no request comes within a random 0..`CHAOS_IDLE_MS`
//!   [20] ms: the keep-alive-timeout race a pool must survive.
//!
//! Before answering, a request is delayed 0..`CHAOS_DELAY_MS` [50] ms with probability
//! `CHAOS_DELAY` [0.10]; with probability `CHAOS_BIG` [0.02] the body is 16 KiB (half of
//! those chunked, half with a `Content-Length`), else 12 bytes. Every response carries
//! `X-Chaos-Len` (the body's length) so a client can check what arrived. Connections
//! otherwise stay open until `CHAOS_KEEPALIVE_S` [60] s pass with no request.
//! `CHAOS_SEED` makes the choices repeatable.
//!
//! The first request on a connection is never dropped, so a proxy that retries an
//! idempotent request on a fresh connection loses nothing.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Probabilities and bounds, read once from the environment.
struct Chaos {
    close: f64,
    reset: f64,
    drop: f64,
    idle: f64,
    idle_ms: u64,
    delay: f64,
    delay_ms: u64,
    big: f64,
    keepalive: Duration,
}

impl Chaos {
    fn from_env() -> Chaos {
        fn var<T: std::str::FromStr>(name: &str, default: T) -> T {
            match std::env::var(name) {
                Ok(v) => v
                    .parse()
                    .unwrap_or_else(|_| panic!("{name}={v}: not a number")),
                Err(_) => default,
            }
        }
        Chaos {
            close: var("CHAOS_CLOSE", 0.03),
            reset: var("CHAOS_RESET", 0.03),
            drop: var("CHAOS_DROP", 0.02),
            idle: var("CHAOS_IDLE", 0.03),
            idle_ms: var("CHAOS_IDLE_MS", 20),
            delay: var("CHAOS_DELAY", 0.10),
            delay_ms: var("CHAOS_DELAY_MS", 50),
            big: var("CHAOS_BIG", 0.02),
            keepalive: Duration::from_secs(var("CHAOS_KEEPALIVE_S", 60)),
        }
    }
}

/// What the origin did, for `GET /_chaos/stats`.
struct Stats {
    connections: AtomicU64,
    requests: AtomicU64,
    delayed: AtomicU64,
    big: AtomicU64,
    closed: AtomicU64,
    reset: AtomicU64,
    dropped: AtomicU64,
    idle_closed: AtomicU64,
    kept: AtomicU64,
}

static STATS: Stats = Stats {
    connections: AtomicU64::new(0),
    requests: AtomicU64::new(0),
    delayed: AtomicU64::new(0),
    big: AtomicU64::new(0),
    closed: AtomicU64::new(0),
    reset: AtomicU64::new(0),
    dropped: AtomicU64::new(0),
    idle_closed: AtomicU64::new(0),
    kept: AtomicU64::new(0),
};

impl Stats {
    fn render(&self) -> String {
        let n = |c: &AtomicU64| c.load(Relaxed);
        format!(
            "connections={} requests={} delayed={} big={} closed={} reset={} dropped={} idle_closed={} kept_after_idle_wait={}\n",
            n(&self.connections),
            n(&self.requests),
            n(&self.delayed),
            n(&self.big),
            n(&self.closed),
            n(&self.reset),
            n(&self.dropped),
            n(&self.idle_closed),
            n(&self.kept),
        )
    }
}

/// SplitMix64: enough randomness for chaos, and no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % (n + 1) }
    }
}

const SMALL: &[u8] = b"hello chaos\n";
const BIG_LEN: usize = 16 * 1024;
const MAX_HEAD: usize = 64 * 1024;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into());
    let chaos: &'static Chaos = Box::leak(Box::new(Chaos::from_env()));
    let seed: u64 = match std::env::var("CHAOS_SEED") {
        Ok(v) => v.parse().expect("CHAOS_SEED: not a number"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
    };
    let listener = TcpListener::bind(&addr).await?;
    println!("{}", listener.local_addr()?);
    let mut id = 0u64;
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, for example: wait rather than spin.
                eprintln!("chaos_origin: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        id += 1;
        STATS.connections.fetch_add(1, Relaxed);
        let rng = Rng(seed ^ id.wrapping_mul(0xa076_1d64_78bd_642f));
        tokio::spawn(serve(stream, chaos, rng));
    }
}

/// How a connection ends its keep-alive turn after a response.
enum Fate {
    Keep,
    Close,
    Reset,
    DropNext,
    IdleClose(Duration),
}

/// The parts of a request head the origin acts on.
struct Head {
    stats: bool,
    keep_alive: bool,
    body_len: usize,
}

/// Why a connection stops being served.
enum Stop {
    /// The peer left, went quiet for `CHAOS_KEEPALIVE_S`, or the socket failed.
    Gone,
    /// A request the origin will not serve; this answer goes out, then the close.
    Refuse(&'static [u8]),
}

async fn serve(mut stream: TcpStream, chaos: &Chaos, mut rng: Rng) {
    let _ = stream.set_nodelay(true);
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut out: Vec<u8> = Vec::with_capacity(4096);
    loop {
        let head = match read_request(&mut stream, &mut buf, chaos.keepalive).await {
            Ok(head) => head,
            Err(Stop::Gone) => return,
            Err(Stop::Refuse(answer)) => {
                let _ = stream.write_all(answer).await;
                return;
            }
        };
        if head.stats {
            let body = STATS.render();
            let answer = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(answer.as_bytes()).await;
            return;
        }
        STATS.requests.fetch_add(1, Relaxed);
        if rng.chance(chaos.delay) {
            STATS.delayed.fetch_add(1, Relaxed);
            tokio::time::sleep(Duration::from_millis(rng.below(chaos.delay_ms))).await;
        }
        write_response(&mut out, head.keep_alive, chaos, &mut rng);
        if stream.write_all(&out).await.is_err() {
            return;
        }
        if !head.keep_alive {
            let _ = stream.shutdown().await;
            return;
        }
        // Chaos only between requests, and only with nothing of the next request read.
        if buf.is_empty()
            && !keep_going(&mut stream, pick_fate(chaos, &mut rng), chaos.keepalive).await
        {
            return;
        }
    }
}

/// Reads one request head into `buf` and discards its `Content-Length` body; bytes of a
/// next request stay in `buf`.
async fn read_request(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    keepalive: Duration,
) -> Result<Head, Stop> {
    let head_len = loop {
        if let Some(i) = find_head_end(buf) {
            break i;
        }
        if buf.len() > MAX_HEAD {
            return Err(Stop::Refuse(
                b"HTTP/1.1 431 Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            ));
        }
        match tokio::time::timeout(keepalive, stream.read_buf(buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Err(Stop::Gone),
            Ok(Ok(_)) => {}
        }
    };
    let mut headers = [httparse::EMPTY_HEADER; 100];
    let mut req = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(_)) = req.parse(&buf[..head_len]) else {
        return Err(Stop::Refuse(
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        ));
    };
    let mut head = Head {
        stats: req.path == Some("/_chaos/stats"),
        keep_alive: req.version == Some(1),
        body_len: 0,
    };
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            head.body_len = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // bench/soak sends no request bodies; refuse rather than mis-frame.
            return Err(Stop::Refuse(
                b"HTTP/1.1 501 Not Implemented\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            ));
        } else if h.name.eq_ignore_ascii_case("connection") {
            let v = String::from_utf8_lossy(h.value).to_ascii_lowercase();
            if v.contains("close") {
                head.keep_alive = false;
            } else if v.contains("keep-alive") {
                head.keep_alive = true;
            }
        }
    }
    // The body: what is buffered behind the head, then the rest from the socket.
    buf.drain(..head_len);
    let have = head.body_len.min(buf.len());
    buf.drain(..have);
    let mut left = head.body_len - have;
    let mut sink = [0u8; 8192];
    while left > 0 {
        let want = left.min(sink.len());
        match stream.read(&mut sink[..want]).await {
            Ok(0) | Err(_) => return Err(Stop::Gone),
            Ok(n) => left -= n,
        }
    }
    Ok(head)
}

/// A whole 200 into `out`: 12 bytes, or now and then 16 KiB (chunked or not).
fn write_response(out: &mut Vec<u8>, keep_alive: bool, chaos: &Chaos, rng: &mut Rng) {
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n");
    if !keep_alive {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    if !rng.chance(chaos.big) {
        let n = SMALL.len();
        out.extend_from_slice(
            format!("X-Chaos-Len: {n}\r\nContent-Length: {n}\r\n\r\n").as_bytes(),
        );
        out.extend_from_slice(SMALL);
        return;
    }
    STATS.big.fetch_add(1, Relaxed);
    out.extend_from_slice(format!("X-Chaos-Len: {BIG_LEN}\r\n").as_bytes());
    if rng.chance(0.5) {
        out.extend_from_slice(format!("Content-Length: {BIG_LEN}\r\n\r\n").as_bytes());
        out.resize(out.len() + BIG_LEN, b'x');
        return;
    }
    // Chunked, in chunks of uneven size.
    out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
    let mut left = BIG_LEN;
    while left > 0 {
        let n = left.min(1 + rng.below(6000) as usize);
        out.extend_from_slice(format!("{n:x}\r\n").as_bytes());
        out.resize(out.len() + n, b'x');
        out.extend_from_slice(b"\r\n");
        left -= n;
    }
    out.extend_from_slice(b"0\r\n\r\n");
}

fn pick_fate(chaos: &Chaos, rng: &mut Rng) -> Fate {
    let roll = rng.unit();
    let mut edge = 0.0;
    let mut under = |p: f64| {
        edge += p;
        roll < edge
    };
    if under(chaos.close) {
        Fate::Close
    } else if under(chaos.reset) {
        Fate::Reset
    } else if under(chaos.drop) {
        Fate::DropNext
    } else if under(chaos.idle) {
        Fate::IdleClose(Duration::from_millis(rng.below(chaos.idle_ms)))
    } else {
        Fate::Keep
    }
}

/// Carries out a fate; false when the connection is gone.
async fn keep_going(stream: &mut TcpStream, fate: Fate, keepalive: Duration) -> bool {
    let mut byte = [0u8; 1];
    match fate {
        Fate::Keep => true,
        Fate::Close => {
            STATS.closed.fetch_add(1, Relaxed);
            delivered(stream).await;
            false // the caller drops the stream: close(2), a FIN (an RST if a request raced in)
        }
        Fate::Reset => {
            STATS.reset.fetch_add(1, Relaxed);
            delivered(stream).await;
            reset(stream);
            false
        }
        Fate::DropNext => {
            // The next request arrives and is never read: the proxy sent it on a reused
            // connection and gets a reset instead of a response. (peek reads nothing.)
            if let Ok(Ok(1)) = tokio::time::timeout(keepalive, stream.peek(&mut byte)).await {
                STATS.dropped.fetch_add(1, Relaxed);
                reset(stream);
            }
            false
        }
        Fate::IdleClose(after) => match tokio::time::timeout(after, stream.peek(&mut byte)).await {
            Ok(Ok(1)) => {
                STATS.kept.fetch_add(1, Relaxed);
                true
            }
            Ok(_) => false, // the proxy closed it first
            Err(_) => {
                STATS.idle_closed.fetch_add(1, Relaxed);
                false
            }
        },
    }
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Waits (at most a second) until the peer has acknowledged every byte written, so a
/// close or reset that follows cannot take part of a response with it.
async fn delivered(stream: &TcpStream) {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let mut unacked: libc::c_int = 0;
        // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one c_int for a TCP socket's fd.
        let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut unacked) };
        if rc != 0 || unacked == 0 || Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Sets `SO_LINGER` 0, so that the close when the caller drops the stream is an RST.
fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}
