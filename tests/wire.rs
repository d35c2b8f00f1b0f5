//! HTTP/1.1 wire rules as tables: each row the exact bytes a client (or an upstream)
//! sends and the verdict a user must see, per RFC 9112 framing and RFC 9110 fields.
//! Each table runs every row and fails once, listing every row that did not hold.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use support::*;

// ---- a raw origin that records every byte -------------------------------------------

/// A request as the raw origin parsed it.
#[derive(Clone, Debug)]
struct Parsed {
    head: String,
    path: String,
    body: Vec<u8>,
}

#[derive(Default)]
struct Log {
    /// Every byte received, per connection.
    conns: Vec<Vec<u8>>,
    requests: Vec<Parsed>,
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Every complete request gets `200 ok`.
    Ok,
    /// A request with `Expect` gets 401 at once and its body is NOT read: whatever follows
    /// on the connection is parsed as the next request (as many real servers do). Other
    /// requests get 200 with their path as the body.
    Expect,
}

/// A raw TCP origin: parses requests with httparse, frames bodies by Content-Length or
/// (leniently, as a forgiving backend would) chunked, and answers each complete one.
struct RawOrigin {
    addr: SocketAddr,
    log: Arc<Mutex<Log>>,
}

impl RawOrigin {
    async fn start(mode: Mode) -> RawOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(Log::default()));
        let shared = log.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(serve_raw(s, mode, shared.clone()));
            }
        });
        RawOrigin { addr, log }
    }

    fn requests(&self) -> Vec<Parsed> {
        self.log.lock().unwrap().requests.clone()
    }

    fn bytes_seen(&self) -> usize {
        self.log.lock().unwrap().conns.iter().map(Vec::len).sum()
    }

    fn summary(&self) -> String {
        let log = self.log.lock().unwrap();
        let reqs: Vec<String> = log
            .requests
            .iter()
            .map(|r| {
                format!(
                    "{} ({} body bytes) head {}",
                    r.path,
                    r.body.len(),
                    show(r.head.as_bytes())
                )
            })
            .collect();
        format!(
            "origin got {} bytes on {} connections, parsed {reqs:?}",
            log.conns.iter().map(Vec::len).sum::<usize>(),
            log.conns.len()
        )
    }
}

async fn serve_raw(mut s: TcpStream, mode: Mode, log: Arc<Mutex<Log>>) {
    let conn = {
        let mut l = log.lock().unwrap();
        l.conns.push(Vec::new());
        l.conns.len() - 1
    };
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 65536];
    loop {
        loop {
            let (req, used, expect) = match parse_request(&buf, mode) {
                Step::More => break,
                Step::Bad => return,
                Step::Got(req, used, expect) => (req, used, expect),
            };
            buf.drain(..used);
            let reply = if expect {
                b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n".to_vec()
            } else if mode == Mode::Expect {
                let p = &req.path;
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{p}", p.len()).into_bytes()
            } else {
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec()
            };
            log.lock().unwrap().requests.push(req);
            if s.write_all(&reply).await.is_err() {
                return;
            }
        }
        let n = match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        log.lock().unwrap().conns[conn].extend_from_slice(&chunk[..n]);
    }
}

enum Step {
    More,
    Bad,
    /// The request, the bytes it used, and whether it was answered before its body.
    Got(Parsed, usize, bool),
}

fn parse_request(buf: &[u8], mode: Mode) -> Step {
    let mut fields = [httparse::EMPTY_HEADER; 256];
    let mut req = httparse::Request::new(&mut fields);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Step::More,
        Err(_) => return Step::Bad,
    };
    let field = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
    };
    let (expect, te, cl) = (
        field("expect").is_some(),
        field("transfer-encoding"),
        field("content-length"),
    );
    let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
    let path = req.path.unwrap_or("").to_owned();
    if mode == Mode::Expect && expect {
        return Step::Got(
            Parsed {
                head,
                path,
                body: vec![],
            },
            head_len,
            true,
        );
    }
    let rest = &buf[head_len..];
    let (body, used) = if te.is_some_and(|te| te.contains("chunked")) {
        match dechunk(rest) {
            Chunked::Done(body, used) => (body, used),
            Chunked::More(_) => return Step::More,
            Chunked::Bad => return Step::Bad,
        }
    } else {
        let Ok(len) = cl.as_deref().unwrap_or("0").parse::<usize>() else {
            return Step::Bad;
        };
        if rest.len() < len {
            return Step::More;
        }
        (rest[..len].to_vec(), len)
    };
    Step::Got(Parsed { head, path, body }, head_len + used, false)
}

enum Chunked {
    /// The body and the bytes the chunked encoding used.
    Done(Vec<u8>, usize),
    /// Incomplete: the body so far.
    More(Vec<u8>),
    Bad,
}

/// Decodes chunked data leniently: a line may end in a bare LF, and whatever follows
/// the hex digits of a size is ignored, as a forgiving parser does.
fn dechunk(buf: &[u8]) -> Chunked {
    let line = |from: usize| {
        let i = buf[from..].iter().position(|&b| b == b'\n')?;
        let l = &buf[from..from + i];
        Some((l.strip_suffix(b"\r").unwrap_or(l), from + i + 1))
    };
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let Some((size_line, next)) = line(at) else {
            return Chunked::More(body);
        };
        let digits = size_line
            .iter()
            .take_while(|b| b.is_ascii_hexdigit())
            .count();
        let size = std::str::from_utf8(&size_line[..digits]).unwrap();
        let Ok(size) = usize::from_str_radix(size, 16) else {
            return Chunked::Bad;
        };
        at = next;
        if size == 0 {
            // Trailer fields up to an empty line.
            loop {
                let Some((l, next)) = line(at) else {
                    return Chunked::More(body);
                };
                at = next;
                if l.is_empty() {
                    return Chunked::Done(body, at);
                }
            }
        }
        if buf.len() - at < size {
            body.extend_from_slice(&buf[at..]);
            return Chunked::More(body);
        }
        body.extend_from_slice(&buf[at..at + size]);
        at += size;
        match line(at) {
            None => return Chunked::More(body),
            Some((l, _)) if !l.is_empty() => return Chunked::Bad,
            Some((_, next)) => at = next,
        }
    }
}

// ---- the client side over raw TCP ----------------------------------------------------

/// How a raw client connection ended.
#[derive(Debug, Clone, Copy, PartialEq)]
enum End {
    Eof,
    Reset,
    /// Still open when reading stopped.
    Open,
}

struct Reply {
    bytes: Vec<u8>,
    end: End,
}

/// One HTTP/1 response as the client read it.
#[derive(Debug)]
struct H1 {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// The body ended as its framing says (a length met, a last chunk, or a clean close).
    complete: bool,
}

impl H1 {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `bytes` on a fresh connection and reads the answer (see `read_reply`).
async fn exchange(addr: SocketAddr, bytes: &[u8], to_close: bool) -> Reply {
    let mut s = TcpStream::connect(addr).await.unwrap();
    // A server may answer and close before it has read everything (431): keep reading.
    let _ = s.write_all(bytes).await;
    read_reply(&mut s, to_close).await
}

/// Reads until the peer closes, 3 s pass, or (unless `to_close`) a final response is
/// complete and nothing more arrived for 300 ms.
async fn read_reply(s: &mut TcpStream, to_close: bool) -> Reply {
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut bytes = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let done = !to_close
            && responses(&bytes, End::Open)
                .iter()
                .any(|r| r.status >= 200 && r.complete);
        let left = deadline.saturating_duration_since(Instant::now());
        let wait = if done {
            left.min(Duration::from_millis(300))
        } else {
            left
        };
        let end = match tokio::time::timeout(wait, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {
                bytes.extend_from_slice(&buf[..n]);
                continue;
            }
            Ok(Ok(_)) => End::Eof,
            Ok(Err(_)) => End::Reset,
            Err(_) => End::Open,
        };
        return Reply { bytes, end };
    }
}

/// The responses in `buf`, in order; the last one may be incomplete.
fn responses(mut buf: &[u8], end: End) -> Vec<H1> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let mut fields = [httparse::EMPTY_HEADER; 256];
        let mut r = httparse::Response::new(&mut fields);
        let Ok(httparse::Status::Complete(n)) = r.parse(buf) else {
            break;
        };
        let status = r.code.unwrap_or(0);
        let headers: Vec<(String, String)> = r
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect();
        let mut h1 = H1 {
            status,
            headers,
            body: Vec::new(),
            complete: true,
        };
        let rest = &buf[n..];
        let used = if status < 200 || status == 204 || status == 304 {
            0
        } else if h1
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
        {
            match dechunk(rest) {
                Chunked::Done(body, used) => {
                    h1.body = body;
                    used
                }
                Chunked::More(body) => {
                    (h1.body, h1.complete) = (body, false);
                    rest.len()
                }
                Chunked::Bad => {
                    h1.complete = false;
                    rest.len()
                }
            }
        } else if let Some(len) = h1
            .header("content-length")
            .and_then(|v| v.trim().parse().ok())
        {
            let take = rest.len().min(len);
            (h1.body, h1.complete) = (rest[..take].to_vec(), take == len);
            take
        } else {
            (h1.body, h1.complete) = (rest.to_vec(), end == End::Eof);
            rest.len()
        };
        out.push(h1);
        buf = &buf[n + used..];
    }
    out
}

/// Bytes for a failure message: escaped, at most 200 characters.
fn show(bytes: &[u8]) -> String {
    let text: String = String::from_utf8_lossy(bytes).escape_debug().collect();
    match text.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text,
    }
}

fn strait_to(origin: SocketAddr) -> Strait {
    Strait::start(&route_to(&format!("http://{origin}"), ""), &[])
}

/// Panics listing every failed row, after printing each row's outcome.
fn report(table: &str, total: usize, failures: Vec<String>) {
    assert!(
        failures.is_empty(),
        "{table}: {} of {total} rows failed:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}

fn record(table: &str, name: &str, outcome: Result<(), String>, failures: &mut Vec<String>) {
    match outcome {
        Ok(()) => println!("ok   {table} / {name}"),
        Err(e) => {
            println!("FAIL {table} / {name}: {e}");
            failures.push(format!("{name}: {e}"));
        }
    }
}

// ---- request tables --------------------------------------------------------------------

/// What the client must get back.
#[derive(Clone, Copy, Debug)]
enum Answer {
    /// The first final response has this status.
    Status(u16),
    /// The first final status is 400, or the connection closed without a 2xx among the
    /// responses after the first `after` (those belong to requests that may be served).
    Refused { after: usize },
}

/// What the origin must have received.
#[derive(Clone, Copy, Debug)]
enum Saw {
    /// Not one byte.
    Nothing,
    NoCompleteRequest,
    NoRequestFor(&'static str),
    /// Exactly one request; its head (lower-cased) contains every `has` and no `lacks`.
    One {
        has: &'static [&'static str],
        lacks: &'static [&'static str],
        body: Option<&'static [u8]>,
    },
}

#[derive(Clone, Copy, Debug)]
struct Want {
    answer: Answer,
    saw: Saw,
}

type Row = (&'static str, &'static [u8], Want);

/// Answered with `code` and never sent upstream.
const fn refused(code: u16) -> Want {
    Want {
        answer: Answer::Status(code),
        saw: Saw::Nothing,
    }
}

/// Served (200), arriving upstream as one request.
const fn reaches(
    has: &'static [&'static str],
    lacks: &'static [&'static str],
    body: Option<&'static [u8]>,
) -> Want {
    Want {
        answer: Answer::Status(200),
        saw: Saw::One { has, lacks, body },
    }
}

/// A POST whose Transfer-Encoding is `$te`, with a valid chunked body.
macro_rules! te {
    ($te:literal) => {
        concat!(
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: ",
            $te,
            "\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        )
        .as_bytes()
    };
}

/// A POST whose Content-Length is `$cl`, with a 5-byte body.
macro_rules! cl {
    ($cl:literal) => {
        concat!(
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: ",
            $cl,
            "\r\n\r\nhello"
        )
        .as_bytes()
    };
}

const CONTROLS: &[Row] = &[
    (
        "plain GET",
        b"GET /plain HTTP/1.1\r\nHost: a\r\n\r\n",
        reaches(&["get /plain http/1.1\r\n"], &[], Some(b"")),
    ),
    (
        "POST, 5-byte body",
        cl!("5"),
        reaches(&["\r\ncontent-length: 5\r\n"], &[], Some(b"hello")),
    ),
];

/// RFC 9112 §6.1: a request whose codings are not exactly `chunked` is not understood.
const TRANSFER_CODINGS: &[Row] = &[
    ("gzip, chunked", te!("gzip, chunked"), refused(501)),
    ("identity, chunked", te!("identity, chunked"), refused(501)),
    ("foo, chunked", te!("foo, chunked"), refused(501)),
    ("chunked, chunked", te!("chunked, chunked"), refused(501)),
    (",chunked", te!(",chunked"), refused(501)),
    ("xchunked", te!("xchunked"), refused(501)),
    (
        "two chunked fields",
        te!("chunked\r\nTransfer-Encoding: chunked"),
        refused(501),
    ),
    ("identity alone", te!("identity"), refused(501)),
];

/// RFC 9112 §6.2-6.3: Content-Length is 1*DIGIT, once; with Transfer-Encoding it is an
/// attack, not a length.
const CONTENT_LENGTHS: &[Row] = &[
    ("CL then TE", te!("chunked\r\nContent-Length: 5"), refused(400)),
    (
        "TE then CL",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        refused(400),
    ),
    ("+5", cl!("+5"), refused(400)),
    ("-1", cl!("-1"), refused(400)),
    ("0x10", cl!("0x10"), refused(400)),
    ("5 5", cl!("5 5"), refused(400)),
    ("5, 5", cl!("5, 5"), refused(400)),
    ("u64::MAX", cl!("18446744073709551615"), refused(400)),
    ("20 digits", cl!("99999999999999999999"), refused(400)),
    ("two identical fields", cl!("5\r\nContent-Length: 5"), refused(400)),
    ("5 then 0xA0", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\xa0\r\n\r\nhello", refused(400)),
    (
        "010 is ten, sent as 10",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 010\r\n\r\n0123456789",
        reaches(&["\r\ncontent-length: 10\r\n"], &["content-length: 010"], Some(b"0123456789")),
    ),
];

/// Chunked request bodies that a lenient parser reads differently (RFC 9112 §7.1).
const BODY_FRAMING: &[Row] = &[
    (
        "trailers end in a bare LF, then a pipelined GET",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: 1\n\nGET /second HTTP/1.1\r\nHost: a\r\n\r\n",
        Want { answer: Answer::Refused { after: 1 }, saw: Saw::NoRequestFor("/second") },
    ),
    (
        "bare CR in a chunk extension",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;a\rb\r\nhello\r\n0\r\n\r\n",
        Want { answer: Answer::Refused { after: 0 }, saw: Saw::NoCompleteRequest },
    ),
    (
        "chunk size `5 x`",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5 x\r\nhello\r\n0\r\n\r\n",
        Want { answer: Answer::Refused { after: 0 }, saw: Saw::NoCompleteRequest },
    ),
];

/// Names with `_` are dropped: a backend may read `X_Forwarded_For` as X-Forwarded-For.
const FIELD_NAMES: &[Row] = &[
    (
        "Foo_Bar",
        b"GET / HTTP/1.1\r\nHost: a\r\nFoo_Bar: 1\r\n\r\n",
        reaches(&[], &["foo_bar"], None),
    ),
    (
        "X_Forwarded_For",
        b"GET / HTTP/1.1\r\nHost: a\r\nX_Forwarded_For: 6.6.6.6\r\n\r\n",
        reaches(&[], &["x_forwarded_for", "6.6.6.6"], None),
    ),
];

/// Heads over 64 KiB or 100 fields get 431.
fn head_size_rows() -> Vec<(&'static str, Vec<u8>, Want)> {
    let big = |kib: usize| {
        format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
            "a".repeat(kib << 10)
        )
    };
    let fields = |n: usize| {
        let extra: String = (1..n).map(|i| format!("X-F{i}: 1\r\n")).collect();
        format!("GET / HTTP/1.1\r\nHost: a\r\n{extra}\r\n")
    };
    vec![
        ("70 KiB field value", big(70).into_bytes(), refused(431)),
        (
            "60 KiB field value",
            big(60).into_bytes(),
            reaches(&[], &[], Some(b"")),
        ),
        ("101 fields", fields(101).into_bytes(), refused(431)),
        (
            "99 fields",
            fields(99).into_bytes(),
            reaches(&[], &[], Some(b"")),
        ),
    ]
}

fn check_request_row(reply: &Reply, origin: &RawOrigin, want: Want) -> Result<(), String> {
    let finals: Vec<u16> = responses(&reply.bytes, reply.end)
        .iter()
        .map(|r| r.status)
        .filter(|s| *s >= 200)
        .collect();
    let answered = match want.answer {
        Answer::Status(code) => finals.first() == Some(&code),
        Answer::Refused { after } => {
            finals.first() == Some(&400)
                || (reply.end != End::Open
                    && finals.iter().skip(after).all(|s| !(200..300).contains(s)))
        }
    };
    let reqs = origin.requests();
    let upstream = match want.saw {
        Saw::Nothing => origin.bytes_seen() == 0,
        Saw::NoCompleteRequest => reqs.is_empty(),
        Saw::NoRequestFor(path) => reqs.iter().all(|r| r.path != path),
        Saw::One { has, lacks, body } => {
            reqs.len() == 1 && {
                let head = reqs[0].head.to_ascii_lowercase();
                has.iter().all(|h| head.contains(h))
                    && lacks.iter().all(|l| !head.contains(l))
                    && body.is_none_or(|b| reqs[0].body == b)
            }
        }
    };
    if answered && upstream {
        return Ok(());
    }
    Err(format!(
        "want {:?} and {:?}; client got {finals:?} then {:?}: {}; {}",
        want.answer,
        want.saw,
        reply.end,
        show(&reply.bytes),
        origin.summary()
    ))
}

async fn run_request_rows(table: &str, rows: Vec<(&'static str, Vec<u8>, Want)>) {
    let total = rows.len();
    let mut failures = Vec::new();
    for (name, bytes, want) in rows {
        let origin = RawOrigin::start(Mode::Ok).await;
        let strait = strait_to(origin.addr);
        // A row that may end in a close waits for it.
        let to_close = matches!(want.answer, Answer::Refused { .. });
        let reply = exchange(strait.addr(), &bytes, to_close).await;
        // Anything Strait sent upstream has arrived.
        tokio::time::sleep(Duration::from_millis(100)).await;
        record(
            table,
            name,
            check_request_row(&reply, &origin, want),
            &mut failures,
        );
    }
    report(table, total, failures);
}

fn owned(rows: &[Row]) -> Vec<(&'static str, Vec<u8>, Want)> {
    rows.iter().map(|(n, b, w)| (*n, b.to_vec(), *w)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_requests_reach_the_origin_intact() {
    run_request_rows("controls", owned(CONTROLS)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_codings_other_than_one_chunked_get_501() {
    run_request_rows("transfer codings", owned(TRANSFER_CODINGS)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_length_must_be_digits_once_and_goes_upstream_canonical() {
    run_request_rows("content lengths", owned(CONTENT_LENGTHS)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_a_lenient_parser_would_misread_is_refused() {
    run_request_rows("body framing", owned(BODY_FRAMING)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn field_names_with_underscores_never_reach_the_origin() {
    run_request_rows("field names", owned(FIELD_NAMES)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_over_64_kib_or_100_fields_gets_431() {
    run_request_rows("head sizes", head_size_rows()).await;
}

// ---- Expect: 100-continue cannot smuggle (RFC 9110 §10.1.1) --------------------------

/// Client A's body: exactly the start of a request, left open for the next one's bytes.
const SMUGGLED: &[u8] = b"GET /attacker-controlled HTTP/1.1\r\nX-Junk: ";

/// Client A sends a POST with `Expect: 100-continue` whose body is the start of another
/// request, over `way`; client B then asks for /victim on another connection. An origin
/// that answers an `Expect` request before its body would read A's body as a request of
/// its own and give B the answer to it, if Strait passed `Expect` on.
async fn expect_cannot_smuggle(way: &str) {
    let origin = RawOrigin::start(Mode::Expect).await;
    let strait = strait_to(origin.addr);
    // A's interim and final answers, as (status, body).
    let mut a: Vec<(u16, Vec<u8>)> = Vec::new();
    let a_note;
    if way == "HTTP/2" {
        let mut c = h2_client::<Full<Bytes>>(strait.addr()).await;
        let req = http::Request::post("http://app/x")
            .header("expect", "100-continue")
            .body(Full::new(Bytes::from_static(SMUGGLED)))
            .unwrap();
        match tokio::time::timeout(Duration::from_secs(5), c.send_request(req)).await {
            Ok(Ok(r)) => {
                let status = r.status().as_u16();
                let body = r.into_body().collect().await.map(|b| b.to_bytes());
                let body = body.unwrap_or_default().to_vec();
                a_note = format!("{status} {}", show(&body));
                a.push((status, body));
            }
            other => a_note = format!("{other:?}"),
        }
    } else {
        let mut s = TcpStream::connect(strait.addr()).await.unwrap();
        let head = format!(
            "POST /x {way}\r\nHost: app\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            SMUGGLED.len()
        );
        s.write_all(head.as_bytes()).await.unwrap();
        // The body goes after the 100 Continue, or after 200 ms without one.
        let mut first = vec![0u8; 4096];
        let early = tokio::time::timeout(Duration::from_millis(200), s.read(&mut first)).await;
        let mut got = match early {
            Ok(Ok(n)) => first[..n].to_vec(),
            _ => Vec::new(),
        };
        let _ = s.write_all(SMUGGLED).await;
        let rest = read_reply(&mut s, false).await;
        got.extend(rest.bytes);
        a = responses(&got, rest.end)
            .into_iter()
            .map(|r| (r.status, r.body))
            .collect();
        a_note = show(&got);
    }
    // A's upstream connection is back in the pool by now, if it was kept.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let b = exchange(
        strait.addr(),
        b"GET /victim HTTP/1.1\r\nHost: app\r\nCookie: s=SECRET\r\n\r\n",
        false,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut problems = Vec::new();
    let continued = a.first().is_some_and(|(s, _)| *s == 100);
    if way == "HTTP/1.1" && !continued {
        problems.push("A got no 100 Continue from Strait");
    }
    if way == "HTTP/1.0" && continued {
        problems.push("A got a 100 Continue over HTTP/1.0 (RFC 9110 §10.1.1: ignore it)");
    }
    if !a.iter().any(|(s, body)| *s == 200 && body == b"/x") {
        problems.push("A's POST was not answered 200 by the origin with its body read");
    }
    let b_final = responses(&b.bytes, b.end)
        .into_iter()
        .find(|r| r.status >= 200);
    if !b_final.is_some_and(|r| r.status == 200 && r.body == b"/victim") {
        problems.push("B did not get the answer to /victim");
    }
    let reqs = origin.requests();
    if reqs.iter().any(|r| r.path == "/attacker-controlled") {
        problems.push("the origin parsed a request for /attacker-controlled");
    }
    if reqs
        .iter()
        .any(|r| r.head.to_ascii_lowercase().contains("\nexpect:"))
    {
        problems.push("the origin received an Expect field");
    }
    assert!(
        problems.is_empty(),
        "{way}: {problems:?}\nA got {a_note}\nB got {}\n{}",
        show(&b.bytes),
        origin.summary()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expect_request_cannot_smuggle_a_request_over_http1_1() {
    expect_cannot_smuggle("HTTP/1.1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expect_request_cannot_smuggle_a_request_over_http1_0() {
    expect_cannot_smuggle("HTTP/1.0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expect_request_cannot_smuggle_a_request_over_http2() {
    expect_cannot_smuggle("HTTP/2").await;
}

// ---- targets ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absolute_form_target_with_an_empty_path_goes_upstream_as_slash() {
    let origin = RawOrigin::start(Mode::Ok).await;
    let config =
        "listen = [{ addr = \"127.0.0.1:0\" }]\n[forward]\nenabled = true\ndeny_targets = []\n";
    let strait = Strait::start(config, &[]);
    let target = origin.addr;
    let req = format!("GET http://{target}?x=1 HTTP/1.1\r\nHost: {target}\r\n\r\n");
    let reply = exchange(strait.addr(), req.as_bytes(), false).await;
    let first = responses(&reply.bytes, reply.end)
        .into_iter()
        .find(|r| r.status >= 200);
    assert_eq!(first.map(|r| r.status), Some(200), "{}", show(&reply.bytes));
    let reqs = origin.requests();
    assert!(
        reqs.len() == 1 && reqs[0].head.starts_with("GET /?x=1 HTTP/1.1\r\n"),
        "{}",
        origin.summary()
    );
}

/// HTTP/2 requests that are malformed (RFC 9113 §8.2.1, §8.3.1), sent with the h2
/// crate, which passes them as written: (name, URI, one extra field, status).
type H2Row = (
    &'static str,
    &'static str,
    Option<(&'static str, &'static str)>,
    u16,
);

const H2_REQUESTS: &[H2Row] = &[
    ("control", "http://a/", None, 200),
    ("`:path` is only a query", "http://a?x=1", None, 400),
    (
        "value with a leading space",
        "http://a/",
        Some(("x-a", " v")),
        400,
    ),
    (
        "value with a trailing space",
        "http://a/",
        Some(("x-a", "v ")),
        400,
    ),
];

async fn h2_status(addr: SocketAddr, req: http::Request<()>) -> Result<u16, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (client, conn) = h2::client::handshake(tcp)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut client = client.ready().await.map_err(|e| e.to_string())?;
    let (resp, _) = client
        .send_request(req, true)
        .map_err(|e| format!("the h2 crate would not send it: {e}"))?;
    match tokio::time::timeout(Duration::from_secs(3), resp).await {
        Err(_) => Err("no response within 3 s".to_owned()),
        Ok(Err(e)) => Err(format!("stream error: {e}")),
        Ok(Ok(r)) => Ok(r.status().as_u16()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_http2_requests_get_400() {
    let mut failures = Vec::new();
    for &(name, uri, field, want) in H2_REQUESTS {
        let origin = RawOrigin::start(Mode::Ok).await;
        let strait = strait_to(origin.addr);
        let mut req = http::Request::get(uri);
        if let Some((n, v)) = field {
            req = req.header(n, v);
        }
        let got = h2_status(strait.addr(), req.body(()).unwrap()).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let upstream_ok = want == 200 || origin.bytes_seen() == 0;
        let outcome = match got {
            Ok(s) if s == want && upstream_ok => Ok(()),
            got => Err(format!("want {want}, got {got:?}; {}", origin.summary())),
        };
        record("h2 requests", name, outcome, &mut failures);
    }
    report("h2 requests", H2_REQUESTS.len(), failures);
}

// ---- response table: origin -> Strait -> each kind of client ---------------------------

/// What the upstream does with each request it reads.
#[derive(Clone, Copy)]
enum Upstream {
    /// Writes the reply and closes.
    Once(&'static [u8]),
    /// Writes the first part, waits 300 ms, writes the second and closes.
    Breaks(&'static [u8], &'static [u8]),
    /// Writes the reply and waits for the next request on the connection.
    KeepsAlive(&'static [u8]),
}

#[derive(Clone, Copy, Debug)]
enum Resp {
    BadGateway,
    /// 200 with this body, complete; `length` is the Content-Length an HTTP/1 client must
    /// see (an HTTP/2 client: if any).
    Ok {
        body: &'static str,
        length: Option<&'static str>,
    },
    /// Never a complete 200.
    Cut,
    /// 200 with this body; an HTTP/2 client's trailers hold `x-t` and no `content-length`.
    Trailers(&'static str),
    /// 200 with this body, and the upstream connection is never used again.
    NotReused(&'static str),
}

const RESPONSES: &[(&str, Upstream, Resp)] = &[
    (
        "control",
        Upstream::Once(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
        Resp::Ok { body: "hello", length: Some("5") },
    ),
    ("CL +5", Upstream::Once(b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello"), Resp::BadGateway),
    (
        "CL 5 and CL 6",
        Upstream::Once(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello"),
        Resp::BadGateway,
    ),
    ("CL `5, 5`", Upstream::Once(b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello"), Resp::BadGateway),
    (
        "CL u64::MAX",
        Upstream::Once(b"HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551615\r\n\r\nhello"),
        Resp::BadGateway,
    ),
    ("CL 5 then 0xA0", Upstream::Once(b"HTTP/1.1 200 OK\r\nContent-Length: 5\xa0\r\n\r\nhello"), Resp::BadGateway),
    (
        "CL 010",
        Upstream::Once(b"HTTP/1.1 200 OK\r\nContent-Length: 010\r\n\r\n0123456789"),
        Resp::Ok { body: "0123456789", length: Some("10") },
    ),
    // Found by fuzz/ (response_head): a status outside 100-599 is invalid (RFC 9110 §15).
    ("status 600", Upstream::Once(b"HTTP/1.1 600 OK\r\nContent-Length: 5\r\n\r\nhello"), Resp::BadGateway),
    ("status 999", Upstream::Once(b"HTTP/1.1 999\r\nContent-Length: 0\r\n\r\n"), Resp::BadGateway),
    // A coding Strait cannot pass on (Transfer-Encoding is hop-by-hop): 502, not the
    // still-coded bytes passed off as the content.
    (
        "TE gzip, chunked",
        Upstream::Once(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        Resp::BadGateway,
    ),
    (
        "garbage chunk size",
        Upstream::Once(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
        Resp::BadGateway,
    ),
    (
        "bare CR in a chunk extension",
        Upstream::Once(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;a\rb\r\nhello\r\n0\r\n\r\n"),
        Resp::BadGateway,
    ),
    (
        "chunked body breaks after the head",
        Upstream::Breaks(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", b"zz\r\n"),
        Resp::Cut,
    ),
    (
        "content-length in the trailers",
        Upstream::Once(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\ncontent-length: 99\r\nx-t: 1\r\n\r\n",
        ),
        Resp::Trailers("ok"),
    ),
    (
        "CL 3 and chunked",
        Upstream::KeepsAlive(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"),
        Resp::NotReused("ok"),
    ),
];

/// A scripted upstream; counts its connections.
async fn scripted_origin(up: Upstream) -> (SocketAddr, Arc<AtomicUsize>) {
    counting_origin(move |mut s: TcpStream| async move {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            // One request head (Strait sends these GETs without a body).
            let end = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            buf.drain(..end);
            match up {
                Upstream::Once(reply) => {
                    let _ = s.write_all(reply).await;
                    let _ = s.shutdown().await;
                    return;
                }
                Upstream::Breaks(first, rest) => {
                    let _ = s.write_all(first).await;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let _ = s.write_all(rest).await;
                    let _ = s.shutdown().await;
                    return;
                }
                Upstream::KeepsAlive(reply) => {
                    if s.write_all(reply).await.is_err() {
                        return;
                    }
                }
            }
        }
    })
    .await
}

/// A response as one client path saw it.
#[derive(Debug, Default)]
struct Got {
    status: u16,
    length: Option<String>,
    body: Vec<u8>,
    complete: bool,
    trailers: Option<http::HeaderMap>,
    note: String,
}

async fn get_h1(addr: SocketAddr, version: &str) -> Got {
    let reply = exchange(
        addr,
        format!("GET / {version}\r\nHost: a\r\n\r\n").as_bytes(),
        false,
    )
    .await;
    let note = format!("{:?}: {}", reply.end, show(&reply.bytes));
    match responses(&reply.bytes, reply.end)
        .into_iter()
        .find(|r| r.status >= 200)
    {
        None => Got {
            note,
            ..Got::default()
        },
        Some(r) => Got {
            status: r.status,
            length: r.header("content-length").map(str::to_owned),
            body: r.body,
            complete: r.complete,
            trailers: None,
            note,
        },
    }
}

async fn get_h2(addr: SocketAddr) -> Got {
    let mut c = h2_client::<Empty<Bytes>>(addr).await;
    let req = http::Request::get("http://a/")
        .header("te", "trailers")
        .body(Empty::new())
        .unwrap();
    let resp = match tokio::time::timeout(Duration::from_secs(5), c.send_request(req)).await {
        Ok(Ok(r)) => r,
        other => {
            return Got {
                note: format!("{other:?}"),
                ..Got::default()
            };
        }
    };
    let mut got = Got {
        status: resp.status().as_u16(),
        length: resp
            .headers()
            .get("content-length")
            .map(|v| v.to_str().unwrap_or("?").to_owned()),
        complete: true,
        ..Got::default()
    };
    let mut body = resp.into_body();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), body.frame()).await {
            Ok(None) => break,
            Ok(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => got.body.extend_from_slice(&data),
                Err(frame) => got.trailers = frame.into_trailers().ok(),
            },
            Ok(Some(Err(e))) => {
                (got.complete, got.note) = (false, format!("body error: {e}"));
                break;
            }
            Err(_) => {
                (got.complete, got.note) = (false, "body stalled 5 s".to_owned());
                break;
            }
        }
    }
    got
}

fn judge(want: Resp, h2: bool, got: &Got) -> bool {
    let ok_body = |body: &str| got.status == 200 && got.complete && got.body == body.as_bytes();
    match want {
        Resp::BadGateway => got.status == 502,
        Resp::Ok { body, length } => {
            ok_body(body)
                && length.is_none_or(|l| match &got.length {
                    Some(v) => v == l,
                    None => h2,
                })
        }
        Resp::Cut => !(got.status == 200 && got.complete),
        Resp::Trailers(body) => {
            ok_body(body)
                && (!h2
                    || got.trailers.as_ref().is_some_and(|t| {
                        t.contains_key("x-t") && !t.contains_key("content-length")
                    }))
        }
        Resp::NotReused(body) => ok_body(body),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_response_framing_on_every_client_path() {
    let mut failures = Vec::new();
    for &(name, up, want) in RESPONSES {
        let (origin, conns) = scripted_origin(up).await;
        let strait = strait_to(origin);
        for path in ["HTTP/1.1", "HTTP/1.0", "HTTP/2"] {
            let h2 = path == "HTTP/2";
            let before = conns.load(Ordering::SeqCst);
            // NotReused asks twice: each answer must come on its own upstream connection.
            let tries = if matches!(want, Resp::NotReused(_)) {
                2
            } else {
                1
            };
            let mut problems = Vec::new();
            for _ in 0..tries {
                let got = if h2 {
                    get_h2(strait.addr()).await
                } else {
                    get_h1(strait.addr(), path).await
                };
                if !judge(want, h2, &got) {
                    problems.push(format!(
                        "got {} (content-length {:?}, body {:?}, complete {}, trailers {:?}) {}",
                        got.status,
                        got.length,
                        show(&got.body),
                        got.complete,
                        got.trailers,
                        got.note
                    ));
                }
            }
            let used = conns.load(Ordering::SeqCst) - before;
            if matches!(want, Resp::NotReused(_)) && used != tries {
                problems.push(format!("{tries} requests took {used} upstream connections"));
            }
            let outcome = match problems.is_empty() {
                true => Ok(()),
                false => Err(format!("want {want:?}; {}", problems.join("; "))),
            };
            record(
                "responses",
                &format!("{name} via {path}"),
                outcome,
                &mut failures,
            );
        }
    }
    report("responses", RESPONSES.len() * 3, failures);
}

// ---- the same rules where hyper reads the requests ------------------------------------

/// Streams hyper's HTTP/1.1 server reads: what must never reach the origin, and what
/// must (the control). Strait's own server answers these with 400/501 when it reads
/// the head itself; here each goes through the guard in front of hyper.
/// A stream, the paths that must never reach the origin, and those that must.
type HyperRow = (
    &'static str,
    &'static [u8],
    &'static [&'static str],
    &'static [&'static str],
);

const HYPER_PATH_ROWS: &[HyperRow] = &[
    (
        "Content-Length then Transfer-Encoding",
        b"POST /smuggle HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /hidden HTTP/1.1\r\nHost: a\r\n\r\n",
        &["/smuggle", "/hidden"],
        &[],
    ),
    (
        "Transfer-Encoding then Content-Length",
        b"POST /smuggle HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\nGET /hidden HTTP/1.1\r\nHost: a\r\n\r\n",
        &["/smuggle", "/hidden"],
        &[],
    ),
    (
        "two equal lengths",
        b"POST /smuggle HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        &["/smuggle"],
        &[],
    ),
    (
        "trailers ended by a bare LF",
        b"POST /t HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: 1\n\nGET /hidden HTTP/1.1\r\nHost: a\r\n\r\n",
        &["/hidden"],
        &[],
    ),
    (
        "an Upgrade the upstream does not take up, then both framings",
        b"GET /up HTTP/1.1\r\nHost: a\r\nUpgrade: foo\r\nConnection: upgrade\r\n\r\nPOST /smuggle HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /hidden HTTP/1.1\r\nHost: a\r\n\r\n",
        &["/smuggle", "/hidden"],
        &[],
    ),
    (
        "a refused CONNECT, then both framings",
        b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\nPOST /smuggle HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /hidden HTTP/1.1\r\nHost: a\r\n\r\n",
        &["/smuggle", "/hidden"],
        &[],
    ),
    (
        "control: a chunked POST and a GET",
        b"POST /ok HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /after HTTP/1.1\r\nHost: a\r\n\r\n",
        &[],
        &["/ok", "/after"],
    ),
];

/// Reads until the peer closes or goes quiet for 500 ms (3 s at most).
async fn read_quiet<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut got = Vec::new();
    let mut buf = vec![0u8; 16384];
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

fn check_hyper_row(
    origin: &RawOrigin,
    never: &[&str],
    always: &[&str],
    got: &str,
) -> Result<(), String> {
    let paths: Vec<String> = origin.requests().into_iter().map(|r| r.path).collect();
    let leaked: Vec<&&str> = never
        .iter()
        .filter(|p| paths.iter().any(|s| s == **p))
        .collect();
    let missing: Vec<&&str> = always
        .iter()
        .filter(|p| !paths.iter().any(|s| s == **p))
        .collect();
    if leaked.is_empty() && missing.is_empty() {
        return Ok(());
    }
    Err(format!(
        "origin saw {paths:?} (leaked {leaked:?}, missing {missing:?}); client got {}",
        show(got.as_bytes())
    ))
}

/// A Strait serving TLS (a certificate for `localhost`) with one route to `origin`, and
/// a client that trusts it.
fn tls_strait(dir: &std::path::Path, origin: SocketAddr) -> (Strait, tokio_rustls::TlsConnector) {
    tls_strait_with(dir, origin, "")
}

/// The same, with `extra` config before the route.
fn tls_strait_with(
    dir: &std::path::Path,
    origin: SocketAddr,
    extra: &str,
) -> (Strait, tokio_rustls::TlsConnector) {
    let certs = Certs::new(dir, &["localhost"]);
    let client = tls_client_config(&certs.ca_pem);
    let config = format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n{extra}\n[[route]]\nupstream = \"http://{origin}\"\n",
        certs.cert_pem.display(),
        certs.key_pem.display(),
    );
    (
        Strait::start(&config, &[]),
        tokio_rustls::TlsConnector::from(Arc::new(client)),
    )
}

async fn tls_connect(
    strait: &Strait,
    connector: &tokio_rustls::TlsConnector,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(strait.addr()).await.unwrap();
    connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap()
}

/// Over TLS, every request is hyper's to read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_tls_meet_the_same_framing_rules() {
    let mut failures = Vec::new();
    for (name, bytes, never, always) in HYPER_PATH_ROWS {
        let origin = RawOrigin::start(Mode::Ok).await;
        let dir = tempfile::tempdir().unwrap();
        let (strait, connector) = tls_strait(dir.path(), origin.addr);
        let mut s = tls_connect(&strait, &connector).await;
        let _ = s.write_all(bytes).await;
        let got = read_quiet(&mut s).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        record(
            "tls",
            name,
            check_hyper_row(&origin, never, always, &got),
            &mut failures,
        );
    }
    report("tls", HYPER_PATH_ROWS.len(), failures);
}

/// A body the upstream cuts short reaches a TLS client ending in a reset: without one,
/// a client that does not insist on close_notify would take the truncated body whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_cut_short_over_tls_ends_in_a_reset() {
    // The head and the first bytes go out at once; the close comes later, so what
    // the client gets is the cut, not a response never sent.
    let (upstream, _) = counting_origin(|mut s| async move {
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
            .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (strait, connector) = tls_strait(dir.path(), upstream);
    let mut s = tls_connect(&strait, &connector).await;
    s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let (got, end) = read_until_end(&mut s).await;
    let got = String::from_utf8_lossy(&got);
    assert!(
        got.starts_with("HTTP/1.1 200 OK\r\n") && got.ends_with("only this"),
        "{got}"
    );
    assert_eq!(end, Some(std::io::ErrorKind::ConnectionReset), "{got}");
}

/// On a plain connection, a request Strait's server hands to hyper (a chunked POST)
/// leaves the connection with hyper for the requests behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_behind_one_hyper_serves_meet_the_same_framing_rules() {
    let first = b"POST /first HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n";
    let mut failures = Vec::new();
    for (name, bytes, never, always) in HYPER_PATH_ROWS {
        let origin = RawOrigin::start(Mode::Ok).await;
        let strait = strait_to(origin.addr);
        let mut s = TcpStream::connect(strait.addr()).await.unwrap();
        let _ = s.write_all(&[&first[..], bytes].concat()).await;
        let got = read_quiet(&mut s).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let always: Vec<&str> = std::iter::once("/first")
            .chain(always.iter().copied())
            .collect();
        record(
            "behind a hyper-served request",
            name,
            check_hyper_row(&origin, never, &always, &got),
            &mut failures,
        );
    }
    report(
        "behind a hyper-served request",
        HYPER_PATH_ROWS.len(),
        failures,
    );
}

/// A refused request whose body is still arriving gets its answer: Strait drains what
/// follows before it closes, so the close is no reset that destroys the 400 first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_with_a_large_body_still_gets_its_answer() {
    let origin = RawOrigin::start(Mode::Ok).await;
    let strait = strait_to(origin.addr);
    let s = TcpStream::connect(strait.addr()).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let sending = tokio::spawn(async move {
        let head = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 524288\r\nTransfer-Encoding: chunked\r\n\r\n";
        let _ = w.write_all(head).await;
        for _ in 0..64 {
            if w.write_all(&[b'x'; 8192]).await.is_err() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        true
    });
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(5), r.read(&mut buf)).await {
            Ok(Ok(0)) => break "eof",
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(_)) => break "reset",
            Err(_) => break "open",
        }
    };
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 400 "), "{ended}: {got}");
    assert_eq!(ended, "eof", "{got}");
    assert!(
        sending.await.unwrap(),
        "the client's body was cut off by a reset"
    );
    assert_eq!(origin.bytes_seen(), 0);
}

/// A refused head held behind a request hyper still answers ends its connection at
/// `header_read`, and at once when the client leaves: it must not hold a socket for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_refused_head_does_not_keep_its_connection() {
    let origin = RawOrigin::start(Mode::Ok).await;
    let strait = Strait::start(
        &route_to(
            &format!("http://{}", origin.addr),
            "[timeouts]\nheader_read = \"1s\"\n",
        ),
        &[],
    );
    let stream = b"POST /pre HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nPOST /a HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello";
    let mut s = TcpStream::connect(strait.addr()).await.unwrap();
    s.write_all(stream).await.unwrap();
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            Ok(_) => break,
            Err(_) => panic!("still open after 5 s: {}", show(&got)),
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    let paths: Vec<String> = origin.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, ["/pre"], "{}", show(&got));
    assert!(got.starts_with(b"HTTP/1.1 200 "), "{}", show(&got));

    // A client that leaves while the head is held frees its socket at once.
    let baseline = strait.fd_count();
    let mut s = TcpStream::connect(strait.addr()).await.unwrap();
    s.write_all(stream).await.unwrap();
    let mut first = [0u8; 64];
    let _ = s.read(&mut first).await;
    drop(s);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        strait.fd_count() <= baseline,
        "{} > {baseline}",
        strait.fd_count()
    );
}

/// Over TLS a refused first head gets the answer Strait's own server gives on plain
/// connections (hyper, which would take it, never sees it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_first_head_over_tls_is_answered() {
    let origin = RawOrigin::start(Mode::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    let (strait, connector) = tls_strait(dir.path(), origin.addr);
    for (head, status) in [
        (&b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"[..], "400"),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello", "400"),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", "501"),
    ] {
        let mut s = tls_connect(&strait, &connector).await;
        s.write_all(head).await.unwrap();
        let got = read_quiet(&mut s).await;
        assert!(got.starts_with(&format!("HTTP/1.1 {status} ")), "{}: {got}", show(head));
    }
    assert_eq!(origin.bytes_seen(), 0);
}

/// A head trickling in over TLS is cut off at `header_read`: the guard holds it whole
/// before anyone else sees it, so the guard keeps that clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_head_over_tls_is_cut_off_at_header_read() {
    let origin = RawOrigin::start(Mode::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    let (strait, connector) = tls_strait_with(
        dir.path(),
        origin.addr,
        "[timeouts]\nheader_read = \"1s\"\n",
    );
    let mut s = tls_connect(&strait, &connector).await;
    let started = Instant::now();
    let mut buf = [0u8; 64];
    for b in b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: yyyyyyyyyyyyyyyy".iter() {
        if s.write_all(&[*b]).await.is_err() {
            break;
        }
        match tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await {
            Err(_) => continue,
            Ok(_) => break,
        }
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "closed after {took:?}"
    );
    assert_eq!(origin.bytes_seen(), 0);
}
