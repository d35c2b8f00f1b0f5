//! Strait's own HTTP/1.1 server and hyper's read the same bytes the same way: for
//! generated request streams (valid, near-valid and hostile: odd request lines,
//! repeated, signed, listed or padded `Content-Length`, every shape of
//! `Transfer-Encoding`, both framings at once, underscored names, obs-fold, bare-LF
//! line ends, bodies that do or do not match their length, 1-3 pipelined messages,
//! streams cut short), every message Strait serves itself is one hyper's HTTP/1
//! server parses at the same place: the same count so far, method, target and body.
//! Strait may refuse what hyper takes (it is stricter on framing), or close where hyper
//! would go on; it may not take what hyper refuses, nor end a message where hyper does
//! not, nor take a message from bytes where hyper finds none whole. Each message it
//! serves gets the same verdict from its own bytes alone, and every shorter read of it
//! is still partial: how reads split a stream changes nothing.
//!
//! The property runs 2000 cases (`PROPTEST_CASES` sets another number); for a long
//! run: `PROPTEST_CASES=100000 cargo test --release --test differential`.

use std::cell::Cell;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};
use strait::http1::{MAX_FIELDS, MAX_HEAD};
use strait::server::h1::{Inspected, inspect};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;

// ---- Generated streams ----------------------------------------------------------

/// Bytes shown as an escaped byte string, so a shrunk case reads as the wire does.
#[derive(Clone, PartialEq, Eq)]
struct Raw(Vec<u8>);

impl fmt::Debug for Raw {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "b\"{}\"", self.0.escape_ascii())
    }
}

/// A line's end.
#[derive(Clone, Copy, Debug)]
enum Eol {
    Crlf,
    /// A bare LF.
    Lf,
}

impl Eol {
    fn bytes(self) -> &'static [u8] {
        match self {
            Eol::Crlf => b"\r\n",
            Eol::Lf => b"\n",
        }
    }
}

/// A field's value.
#[derive(Clone, Debug)]
enum Value {
    Text(&'static str),
    /// The length of the message's body as rendered, in decimal, in place of `{}` in
    /// this (`0{}`: after a zero).
    BodyLength(&'static str),
}

#[derive(Clone, Debug)]
enum Field {
    /// `name: value`.
    Line {
        name: &'static str,
        value: Value,
        eol: Eol,
    },
    /// `name: first` CRLF SP `more`: an obs-fold.
    Folded {
        name: &'static str,
        first: &'static str,
        more: &'static str,
    },
    /// A line as it is: a space before the colon, no colon, an empty name.
    Bare(&'static str),
}

#[derive(Clone, Debug)]
enum Body {
    Bytes(Raw),
    /// These chunks in the chunked coding, then the last chunk.
    Chunked(Vec<Raw>),
    /// A last chunk and a whole request after it: what a smuggler hides in a body.
    Smuggled,
}

impl Body {
    fn render(&self, out: &mut Vec<u8>) {
        match self {
            Body::Bytes(b) => out.extend_from_slice(&b.0),
            Body::Chunked(chunks) => {
                for c in chunks {
                    out.extend_from_slice(format!("{:x}\r\n", c.0.len()).as_bytes());
                    out.extend_from_slice(&c.0);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"0\r\n\r\n");
            }
            Body::Smuggled => {
                out.extend_from_slice(b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n")
            }
        }
    }
}

#[derive(Clone, Debug)]
struct Message {
    /// An empty line before the request line (RFC 9112 §2.2 lets a server skip it).
    blank_first: bool,
    method: &'static str,
    target: Raw,
    version: &'static str,
    /// The request line's end and the head's.
    eol: Eol,
    host: Option<&'static str>,
    fields: Vec<Field>,
    body: Body,
}

impl Message {
    fn render(&self, out: &mut Vec<u8>) {
        let mut body = Vec::new();
        self.body.render(&mut body);
        if self.blank_first {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(self.method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(&self.target.0);
        out.push(b' ');
        out.extend_from_slice(self.version.as_bytes());
        out.extend_from_slice(self.eol.bytes());
        if let Some(host) = self.host {
            out.extend_from_slice(format!("Host: {host}\r\n").as_bytes());
        }
        for f in &self.fields {
            match f {
                Field::Line { name, value, eol } => {
                    out.extend_from_slice(name.as_bytes());
                    out.extend_from_slice(b": ");
                    match value {
                        Value::Text(v) => out.extend_from_slice(v.as_bytes()),
                        Value::BodyLength(form) => out.extend_from_slice(
                            form.replace("{}", &body.len().to_string()).as_bytes(),
                        ),
                    }
                    out.extend_from_slice(eol.bytes());
                }
                Field::Folded { name, first, more } => {
                    out.extend_from_slice(format!("{name}: {first}\r\n {more}\r\n").as_bytes());
                }
                Field::Bare(line) => {
                    out.extend_from_slice(line.as_bytes());
                    out.extend_from_slice(b"\r\n");
                }
            }
        }
        out.extend_from_slice(self.eol.bytes());
        out.extend_from_slice(&body);
    }
}

/// Pipelined messages, the stream perhaps cut short.
#[derive(Clone, Debug)]
struct Stream {
    messages: Vec<Message>,
    cut: Option<Index>,
}

impl Stream {
    fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for m in &self.messages {
            m.render(&mut out);
        }
        if let Some(cut) = &self.cut {
            out.truncate(cut.index(out.len() + 1));
        }
        out
    }
}

fn eol() -> impl Strategy<Value = Eol> {
    prop_oneof![9 => Just(Eol::Crlf), 1 => Just(Eol::Lf)]
}

fn text(values: &'static [&'static str]) -> impl Strategy<Value = Value> {
    prop::sample::select(values).prop_map(Value::Text)
}

fn line(
    names: &'static [&'static str],
    value: impl Strategy<Value = Value>,
) -> impl Strategy<Value = Field> {
    (prop::sample::select(names), value, eol()).prop_map(|(name, value, eol)| Field::Line {
        name,
        value,
        eol,
    })
}

fn field() -> impl Strategy<Value = Field> {
    prop_oneof![
        3 => line(
            &["X-A", "Accept", "User-Agent"],
            text(&["1", "a b", "", "\u{1}", "é", "\u{7f}", "x\tx"]),
        ),
        // A second Host: hyper's, and the proxy answers 400.
        1 => line(&["Host", "host"], text(&["x", "y", "a b"])),
        5 => line(
            &["Content-Length", "content-length", "CONTENT-LENGTH"],
            prop_oneof![
                3 => body_length(),
                4 => text(&[
                    "0", "5", "05", "+5", "-1", "5, 5", "5,5", " 5", "5 ", "0x5", "1e1",
                    "18446744073709551615", "9223372036854775807", "9223372036854775808",
                    "65536", "65537", "", "0005", "000000000000000000005", "5\u{a0}", "5\t5",
                ]),
            ],
        ),
        4 => line(
            &["Transfer-Encoding", "transfer-encoding"],
            text(&[
                "chunked", "Chunked", "gzip, chunked", "chunked, gzip", ",chunked",
                " chunked", "chunked ", "identity", "chunked, chunked", "xchunked", "",
            ]),
        ),
        1 => line(
            &["Connection"],
            text(&["close", "keep-alive", "Close, keep-alive", "upgrade", "closed", "close, é"]),
        ),
        1 => line(&["Expect"], text(&["100-continue"])),
        1 => line(&["Upgrade"], text(&["websocket"])),
        2 => line(
            &["X_A", "Content_Length", "Transfer_Encoding", "Host_"],
            text(&["1", "5", "chunked"]),
        ),
        1 => (
            prop::sample::select(&["X-A", "Content-Length", "Transfer-Encoding"][..]),
            prop::sample::select(&["a", "5", "chunked"][..]),
            prop::sample::select(&["b", "5", "chunked"][..]),
        )
            .prop_map(|(name, first, more)| Field::Folded { name, first, more }),
        1 => prop::sample::select(
            &[
                "Content-Length : 5",
                "Transfer-Encoding : chunked",
                "Content-Length:5",
                "X-A",
                ": empty",
                "X A: b",
                "X-\u{1}: b",
                " X-A: leading space",
            ][..],
        )
        .prop_map(Field::Bare),
    ]
}

fn target() -> impl Strategy<Value = Raw> {
    let plain = prop::sample::select(
        &[
            "/",
            "/a?b=1",
            "http://h/x",
            "*",
            "https://h:443/p?q",
            "HTTP://H/X",
            "http://h",
            "//x",
            "/a#f",
            "/%zz",
            "x",
            "h:80",
        ][..],
    )
    .prop_map(|t| Raw(t.as_bytes().to_vec()));
    // One odd byte somewhere in an ordinary target.
    let odd = (
        prop::sample::select(&["/", "/a?b=1", "http://h/x"][..]),
        prop::sample::select(
            &[
                0u8, 1, b' ', b'\t', 0x7f, 0x80, 0xff, b'"', b'{', b'\\', b'#', b'%', b'\r',
            ][..],
        ),
        any::<Index>(),
    )
        .prop_map(|(t, b, at)| {
            let mut t = t.as_bytes().to_vec();
            t.insert(at.index(t.len() + 1), b);
            Raw(t)
        });
    prop_oneof![6 => plain, 1 => odd]
}

fn body_bytes(max: usize) -> impl Strategy<Value = Raw> {
    prop::collection::vec(
        prop_oneof![4 => b'a'..=b'z', 1 => any::<u8>(), 1 => Just(b'\r'), 1 => Just(b'\n')],
        0..=max,
    )
    .prop_map(Raw)
}

/// A `Content-Length` of the body's length, now and then in an odd but valid form.
fn body_length() -> impl Strategy<Value = Value> {
    prop_oneof![
        6 => Just(Value::BodyLength("{}")),
        1 => prop::sample::select(&["0{}", "00{}", " {}", "{} ", "{}\t", "\t{}"][..])
            .prop_map(Value::BodyLength),
    ]
}

/// Fields Strait serves with: the common case, and the odd but valid.
fn tame_field() -> impl Strategy<Value = Field> {
    prop_oneof![
        6 => line(
            &["X-A", "Accept", "User-Agent"],
            text(&["1", "a b", "", "é", "x\tx", "a  "]),
        ),
        1 => line(&["Connection"], text(&["keep-alive", "close"])),
        1 => line(&["X_A"], text(&["1"])),
    ]
}

/// A request Strait most likely serves itself, with now and then one hostile part.
fn near_valid() -> impl Strategy<Value = Message> {
    (
        prop::bool::weighted(0.03),
        prop::sample::select(&["GET", "POST", "PUT", "HEAD", "OPTIONS"][..]),
        prop_oneof![
            8 => prop::sample::select(
                &["/", "/a?b=1", "http://h/x", "https://h:443/p?q", "/a#f", "HTTP://H/X",
                  "http://h", "//x", "/%zz"][..],
            )
            .prop_map(|t| Raw(t.as_bytes().to_vec())),
            1 => target(),
        ],
        eol(),
        prop::sample::select(&["x", "example.com:8080", "[::1]:80"][..]),
        prop::collection::vec(prop_oneof![8 => tame_field(), 1 => field()], 0..=5),
        // Where a `Content-Length` of the body's length goes, if one does.
        prop::option::weighted(0.8, (any::<Index>(), body_length())),
        prop_oneof![8 => body_bytes(12).prop_map(Body::Bytes), 1 => Just(Body::Smuggled)],
    )
        .prop_map(
            |(blank_first, method, target, eol, host, mut fields, length, body)| {
                if let Some((at, value)) = length {
                    let cl = Field::Line {
                        name: "Content-Length",
                        value,
                        eol: Eol::Crlf,
                    };
                    fields.insert(at.index(fields.len() + 1), cl);
                }
                Message {
                    blank_first,
                    method,
                    target,
                    version: "HTTP/1.1",
                    eol,
                    host: Some(host),
                    fields,
                    body,
                }
            },
        )
}

/// A request from anywhere in the generators' range.
fn hostile() -> impl Strategy<Value = Message> {
    (
        prop::bool::weighted(0.05),
        prop_oneof![
            8 => prop::sample::select(&["GET", "POST", "PUT", "HEAD", "OPTIONS"][..]),
            1 => prop::sample::select(
                &["get", "FOO", "M-SEARCH", "DELETE", "CONNECT", "G@T", "", "PRI", "X\u{7f}"][..],
            ),
        ],
        target(),
        prop_oneof![
            10 => Just("HTTP/1.1"),
            1 => Just("HTTP/1.0"),
            1 => prop::sample::select(&["HTTP/1.2", "http/1.1", "HTTP/2.0", "HTTP/1.1 "][..]),
        ],
        eol(),
        prop_oneof![
            10 => prop::sample::select(&["x", "example.com:8080", "[::1]:80"][..]).prop_map(Some),
            1 => prop::sample::select(&["", "a b", "u@x", "x\u{1}"][..]).prop_map(Some),
            1 => Just(None),
        ],
        prop::collection::vec(field(), 0..=8),
        prop_oneof![
            6 => body_bytes(12).prop_map(Body::Bytes),
            1 => prop::collection::vec(body_bytes(6), 0..=2).prop_map(Body::Chunked),
            1 => Just(Body::Smuggled),
        ],
    )
        .prop_map(
            |(blank_first, method, target, version, eol, host, fields, body)| Message {
                blank_first,
                method,
                target,
                version,
                eol,
                host,
                fields,
                body,
            },
        )
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![2 => near_valid(), 1 => hostile()]
}

fn stream() -> impl Strategy<Value = Stream> {
    (
        prop::collection::vec(message(), 1..=3),
        prop::option::weighted(0.2, any::<Index>()),
    )
        .prop_map(|(messages, cut)| Stream { messages, cut })
}

// ---- The two servers ------------------------------------------------------------

/// A request as a server took it.
#[derive(Debug, PartialEq, Eq)]
struct Took {
    method: String,
    uri: String,
    body: Raw,
}

/// What hyper's HTTP/1 server made of a stream.
#[derive(Debug)]
struct HyperSaw {
    /// Each request whose body it read whole, in order.
    took: Vec<Took>,
    /// What it wrote back.
    answers: String,
    /// How its connection ended, if not cleanly.
    error: Option<String>,
}

/// Serves `bytes` (then the client's EOF) with hyper's HTTP/1 server at Strait's limits,
/// answering each request 200 once its whole body is read.
async fn hyper_reads(bytes: &[u8]) -> HyperSaw {
    let (client, server) = tokio::io::duplex(1 << 20);
    let took = Arc::new(Mutex::new(Vec::new()));
    let service = {
        let took = took.clone();
        service_fn(move |req: Request<Incoming>| {
            let took = took.clone();
            async move {
                let (head, body) = req.into_parts();
                let body = body.collect().await?.to_bytes();
                took.lock().unwrap().push(Took {
                    method: head.method.as_str().to_owned(),
                    uri: head.uri.to_string(),
                    body: Raw(body.to_vec()),
                });
                Ok::<_, hyper::Error>(Response::new(Empty::<Bytes>::new()))
            }
        })
    };
    let conn = http1::Builder::new()
        .max_buf_size(MAX_HEAD)
        .max_headers(MAX_FIELDS)
        // The client's EOF after its last request does not cancel that request (it
        // would with hyper's default): only how hyper meets the EOF changes, not how it
        // parses.
        .half_close(true)
        .serve_connection(TokioIo::new(server), service);
    let (mut rd, mut wr) = tokio::io::split(client);
    let write = async {
        // hyper may close before it read everything: what it left unread is no matter.
        let _ = wr.write_all(bytes).await;
        let _ = wr.shutdown().await;
    };
    let read = async {
        let mut out = Vec::new();
        let _ = rd.read_to_end(&mut out).await;
        out
    };
    let session = async { tokio::join!(conn, write, read) };
    let (served, (), answers) = tokio::time::timeout(Duration::from_secs(10), session)
        .await
        .unwrap_or_else(|_| panic!("hyper's session hung on b\"{}\"", bytes.escape_ascii()));
    let took = std::mem::take(&mut *took.lock().unwrap());
    HyperSaw {
        took,
        answers: String::from_utf8_lossy(&answers).into_owned(),
        error: served.err().map(|e| e.to_string()),
    }
}

/// A message Strait served: where it starts, its length and its body's.
#[derive(Debug, Clone, Copy)]
struct Served {
    at: usize,
    len: usize,
    body: usize,
    close: bool,
}

/// Where Strait's own server stopped serving a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// Every byte served.
    End,
    /// The last message served asked to close.
    Close,
    Refused(u16),
    /// The rest is not a whole message.
    Partial,
    /// The rest goes to hyper.
    Hyper,
}

/// What Strait's own server makes of a stream: the messages it serves, and why it stops.
fn strait_reads(bytes: &[u8]) -> (Vec<Served>, Stop) {
    let mut served = Vec::new();
    let mut at = 0;
    loop {
        if at == bytes.len() {
            return (served, Stop::End);
        }
        match inspect(&bytes[at..]) {
            Inspected::Served { len, body, close } => {
                assert!(
                    len > 0 && body <= len && at + len <= bytes.len(),
                    "a served message out of bounds: len {len}, body {body}, at {at} of {}",
                    bytes.len()
                );
                served.push(Served {
                    at,
                    len,
                    body,
                    close,
                });
                at += len;
                if close {
                    return (served, Stop::Close);
                }
            }
            Inspected::Refused(status) => return (served, Stop::Refused(status)),
            Inspected::Partial => return (served, Stop::Partial),
            Inspected::Hyper => return (served, Stop::Hyper),
        }
    }
}

/// The request Strait forwards for a message it served: method and target from its
/// request line (read as Strait reads it, with httparse), its body from the bytes.
fn strait_took(bytes: &[u8], s: Served) -> Took {
    let message = &bytes[s.at..s.at + s.len];
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut req = httparse::Request::new(&mut fields);
    let head = match req.parse(message) {
        Ok(httparse::Status::Complete(n)) => n,
        other => panic!("a served message whose head does not parse: {other:?}"),
    };
    assert_eq!(
        head + s.body,
        s.len,
        "head and body do not make the message"
    );
    let target = req.path.unwrap();
    Took {
        method: req.method.unwrap().to_owned(),
        uri: http::Uri::try_from(target)
            .map_or_else(|e| format!("{target} ({e})"), |u| u.to_string()),
        body: Raw(message[head..].to_vec()),
    }
}

/// What both servers made of a stream.
#[derive(Debug)]
struct Verdict {
    served: Vec<Served>,
    stop: Stop,
    hyper: HyperSaw,
}

/// Runs both servers on `bytes` and checks that they agree; the verdict either way.
fn compare(rt: &Runtime, bytes: &[u8]) -> (Verdict, Result<(), String>) {
    let (served, stop) = strait_reads(bytes);
    let hyper = rt.block_on(hyper_reads(bytes));
    let result = agree(bytes, &served, stop, &hyper);
    (
        Verdict {
            served,
            stop,
            hyper,
        },
        result,
    )
}

fn agree(bytes: &[u8], served: &[Served], stop: Stop, hyper: &HyperSaw) -> Result<(), String> {
    for (i, s) in served.iter().enumerate() {
        let strait = strait_took(bytes, *s);
        let Some(theirs) = hyper.took.get(i) else {
            return Err(format!(
                "Strait served message {i} ({strait:?} in bytes {}..{}), hyper took only {} \
                 (error: {:?}, answers: {:?})",
                s.at,
                s.at + s.len,
                hyper.took.len(),
                hyper.error,
                hyper.answers
            ));
        };
        if strait != *theirs {
            return Err(format!(
                "message {i} (bytes {}..{}): Strait took {strait:?}, hyper {theirs:?}",
                s.at,
                s.at + s.len
            ));
        }
        // Its verdict rests on its own bytes, whatever follows, and no shorter read
        // ends it: Strait decides with what its reads brought in so far.
        let alone = inspect(&bytes[s.at..s.at + s.len]);
        let expected = Inspected::Served {
            len: s.len,
            body: s.body,
            close: s.close,
        };
        if alone != expected {
            return Err(format!(
                "message {i} alone is {alone:?}, followed by the rest {expected:?}"
            ));
        }
        for short in 1..s.len {
            let verdict = inspect(&bytes[s.at..s.at + short]);
            if verdict != Inspected::Partial {
                return Err(format!(
                    "message {i} ({} bytes) cut after {short} is {verdict:?}",
                    s.len
                ));
            }
        }
    }
    // Where Strait sees the stream end, or a message not whole, hyper takes no more
    // requests either. (Strait closing where hyper would go on is stricter, so allowed:
    // `Connection: close, é` closes Strait's connection, while hyper reads no
    // `Connection` value that is not ASCII.)
    if matches!(stop, Stop::End | Stop::Partial) && hyper.took.len() > served.len() {
        return Err(format!(
            "Strait served {} and stopped ({stop:?}), hyper took {}: {:?}",
            served.len(),
            hyper.took.len(),
            &hyper.took[served.len()..]
        ));
    }
    Ok(())
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2000)
}

// ---- The property ---------------------------------------------------------------

#[test]
fn every_message_strait_serves_hyper_reads_the_same_way() {
    let rt = runtime();
    let config = Config {
        cases: cases(),
        // Shrunk failures are reported here; the regression cases below keep them.
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    // How far the cases went: a generator that never reached Strait's own path would
    // prove nothing.
    let messages = Cell::new(0u64);
    let stops = Cell::new([0u64; 5]);
    let started = std::time::Instant::now();
    let result = runner.run(&stream(), |stream| {
        let bytes = stream.render();
        let (verdict, result) = compare(&rt, &bytes);
        messages.set(messages.get() + verdict.served.len() as u64);
        let mut s = stops.get();
        s[match verdict.stop {
            Stop::End => 0,
            Stop::Close => 1,
            Stop::Refused(_) => 2,
            Stop::Partial => 3,
            Stop::Hyper => 4,
        }] += 1;
        stops.set(s);
        result.map_err(|why| {
            TestCaseError::fail(format!("{why}\nbytes: b\"{}\"", bytes.escape_ascii()))
        })
    });
    let [end, close, refused, partial, hyper] = stops.get();
    eprintln!(
        "{} cases in {:.1?}: {} messages served by Strait; stopped at the end {end}, on close \
         {close}, refused {refused}, partial {partial}, to hyper {hyper}",
        cases(),
        started.elapsed(),
        messages.get()
    );
    match result {
        Ok(()) => {}
        Err(TestError::Fail(why, stream)) => {
            panic!("Strait and hyper disagree: {why}\nminimal stream: {stream:#?}")
        }
        Err(e) => panic!("{e}"),
    }
}

// ---- Fixed cases ----------------------------------------------------------------

/// Checks that both servers agree on `bytes`, and returns what Strait did.
fn strait_agrees(bytes: &[u8]) -> Verdict {
    let (verdict, result) = compare(&runtime(), bytes);
    if let Err(why) = result {
        panic!("{why}\nbytes: b\"{}\"", bytes.escape_ascii());
    }
    verdict
}

#[test]
fn a_length_beside_chunked_is_refused_not_smuggled() {
    let v = strait_agrees(
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 38\r\nTransfer-Encoding: chunked\r\n\r\n\
          0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert!(v.served.is_empty());
    assert_eq!(v.stop, Stop::Refused(400));
}

#[test]
fn a_repeated_length_is_refused_even_when_equal() {
    let v = strait_agrees(
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    );
    assert_eq!(v.stop, Stop::Refused(400));
    // hyper takes it, as one length.
    assert_eq!(v.hyper.took.len(), 1);
}

#[test]
fn a_signed_length_is_refused() {
    let v = strait_agrees(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello");
    assert_eq!(v.stop, Stop::Refused(400));
}

#[test]
fn pipelined_gets_and_a_post_are_served_where_hyper_reads_them() {
    let v = strait_agrees(
        b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n\
          POST /two HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
          GET /three HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert_eq!(v.served.len(), 3);
    assert_eq!(v.stop, Stop::End);
    assert_eq!(v.hyper.took.len(), 3);
}

#[test]
fn a_close_ends_the_served_messages_where_hyper_stops_too() {
    let v = strait_agrees(
        b"GET /one HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n\
          GET /two HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert_eq!((v.served.len(), v.stop), (1, Stop::Close));
    assert_eq!(v.hyper.took.len(), 1);
}

/// hyper reads a `Connection` value only when it is all ASCII; Strait finds `close`
/// among its tokens whatever else it holds, and closes where hyper would go on:
/// stricter, so allowed.
#[test]
fn a_close_beside_a_token_that_is_not_ascii_closes_strait_alone() {
    let v = strait_agrees(
        b"GET /one HTTP/1.1\r\nHost: x\r\nConnection: close, \xc3\xa9\r\n\r\n\
          GET /two HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert_eq!((v.served.len(), v.stop), (1, Stop::Close));
    assert_eq!(v.hyper.took.len(), 2);
}

#[test]
fn a_body_shorter_than_its_length_is_not_served() {
    let v = strait_agrees(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhel");
    assert_eq!((v.served.len(), v.stop), (0, Stop::Partial));
}

#[test]
fn a_head_at_strait_limits_is_one_hyper_takes_too() {
    // Host and 99 more fields: MAX_FIELDS.
    let mut head = b"GET /full HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 1..MAX_FIELDS {
        head.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    let v = strait_agrees(&head);
    assert_eq!((v.served.len(), v.stop), (1, Stop::End));
    // MAX_HEAD bytes, padded by one long field.
    let start = b"GET /long HTTP/1.1\r\nHost: x\r\nX-Pad: ";
    let pad = MAX_HEAD - start.len() - 4;
    let head = [&start[..], &vec![b'p'; pad], b"\r\n\r\n"].concat();
    assert_eq!(head.len(), MAX_HEAD);
    let v = strait_agrees(&[&head[..], b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"].concat());
    assert_eq!((v.served.len(), v.stop), (2, Stop::End));
}

#[test]
fn a_head_past_strait_limits_goes_to_hyper() {
    let mut head = b"GET /many HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..MAX_FIELDS {
        head.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    assert_eq!(strait_agrees(&head).stop, Stop::Hyper);
    let start = b"GET /long HTTP/1.1\r\nHost: x\r\nX-Pad: ";
    let pad = MAX_HEAD + 1 - start.len() - 4;
    let head = [&start[..], &vec![b'p'; pad], b"\r\n\r\n"].concat();
    assert_eq!(strait_agrees(&head).stop, Stop::Hyper);
}
