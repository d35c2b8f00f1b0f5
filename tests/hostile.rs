//! Hostile and slow clients, black-box: the deadlines, limits and flood budgets of
//! docs/behaviour.md, "Hostile clients", each driven as an attacker would, with exact
//! bytes where the attack is in the framing.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Empty;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Reads frames until the peer closes (or `within` passes); the error code of the
/// last GOAWAY among them, if any.
async fn goaway_then_close(s: &mut TcpStream, within: Duration) -> (Option<u32>, bool) {
    let mut all = Vec::new();
    let mut buf = [0u8; 16384];
    let deadline = tokio::time::Instant::now() + within;
    let closed = loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => all.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    (last_goaway(&all), closed)
}

/// The error code of the last GOAWAY among HTTP/2 frames, if any.
fn last_goaway(frames: &[u8]) -> Option<u32> {
    let mut code = None;
    let mut at = 0;
    while at + 9 <= frames.len() {
        let len = u32::from_be_bytes([0, frames[at], frames[at + 1], frames[at + 2]]) as usize;
        if frames[at + 3] == 0x7 && at + 17 <= frames.len() {
            code = Some(u32::from_be_bytes(
                frames[at + 13..at + 17].try_into().unwrap(),
            ));
        }
        at += 9 + len;
    }
    code
}

/// 1. An HTTP/2 preface sent a byte at a time ends at `header_read`, as a trickled
///    HTTP/1.1 head does; so does a header block left open.
#[tokio::test]
async fn http2_prefaces_and_header_blocks_are_held_to_header_read() {
    let origin = Origin::start().await;
    let strait = Strait::start(
        &route_to(&origin.url(), "[timeouts]\nheader_read = \"1s\""),
        &[],
    );
    // The preface, one byte every 300 ms: each byte would reset an idle timer.
    let mut s = TcpStream::connect(strait.addr()).await.unwrap();
    let start = Instant::now();
    let mut closed_at = None;
    for b in PREFACE.iter().chain(frame(0x4, 0, 0, &[]).iter()) {
        if s.write_all(&[*b]).await.is_err() {
            closed_at = Some(start.elapsed());
            break;
        }
        let mut one = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(300), s.read(&mut one)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed_at = Some(start.elapsed());
                break;
            }
            _ => {}
        }
    }
    let closed_at = closed_at.expect("a trickled preface kept its connection");
    assert!(
        closed_at >= Duration::from_millis(900) && closed_at < Duration::from_secs(3),
        "closed after {closed_at:?}"
    );

    // A whole preface and SETTINGS, then a HEADERS frame without END_HEADERS and no
    // CONTINUATION: GOAWAY, then the close.
    let mut s = TcpStream::connect(strait.addr()).await.unwrap();
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(0x4, 0, 0, &[]));
    bytes.extend(frame(0x1, 0, 1, &[0x82]));
    s.write_all(&bytes).await.unwrap();
    let start = Instant::now();
    let (code, closed) = goaway_then_close(&mut s, Duration::from_secs(5)).await;
    assert!(closed, "an open header block kept its connection");
    assert!(start.elapsed() >= Duration::from_millis(900));
    assert_eq!(code, Some(0), "no GOAWAY before the close");
    assert_eq!(origin.seen().len(), 0);
}

/// 6. `keepalive` closes client connections with no request in flight: HTTP/1.1 on
///    Strait's own server, HTTP/2 (with a GOAWAY first).
#[tokio::test]
async fn keepalive_closes_quiet_client_connections() {
    let origin = Origin::start().await;
    let strait = Strait::start(
        &route_to(&origin.url(), "[timeouts]\nkeepalive = \"1s\""),
        &[],
    );
    let mut s = TcpStream::connect(strait.addr()).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut s, |r| r.ends_with("origin says hi")).await;
    let start = Instant::now();
    let rest = read_to_close(&mut s).await;
    assert_eq!(rest, "");
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(2),
        "HTTP/1.1 closed after {waited:?}"
    );

    // HTTP/2, quiet: GOAWAY and the close. This client answers no ping, so the close
    // comes a second after the GOAWAY (a client that answers is closed at once).
    let mut s = TcpStream::connect(strait.addr()).await.unwrap();
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(0x4, 0, 0, &[]));
    s.write_all(&bytes).await.unwrap();
    let start = Instant::now();
    let (code, closed) = goaway_then_close(&mut s, Duration::from_secs(5)).await;
    let waited = start.elapsed();
    assert!(closed && code == Some(0), "{code:?} {closed}");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
        "HTTP/2 closed after {waited:?}"
    );

    // A slow response is no idleness: the exchange in flight keeps its connection.
    let slow = Origin::with(|_| async {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        ok("late")
    })
    .await;
    let strait = Strait::start(
        &route_to(&slow.url(), "[timeouts]\nkeepalive = \"1s\""),
        &[],
    );
    let out = curl(&[&strait.url()]).await;
    assert_eq!((out.status, out.text().as_str()), (200, "late"));
    let mut h2 = h2_client::<Empty<Bytes>>(strait.addr()).await;
    let resp = h2
        .send_request(
            Request::get(format!("{}/", strait.url()))
                .body(Empty::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

/// A request body that stops arriving ends at `body_read` with 408, and the upstream
/// is not blamed.
#[tokio::test]
async fn a_stalled_request_body_gets_408_at_body_read() {
    let origin = Origin::start().await;
    let strait = Strait::start(
        &route_to(&origin.url(), "[timeouts]\nbody_read = \"1s\""),
        &[],
    );
    let mut s = TcpStream::connect(strait.addr()).await.unwrap();
    s.write_all(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        .await
        .unwrap();
    let start = Instant::now();
    let resp = read_to_close(&mut s).await;
    assert!(resp.starts_with("HTTP/1.1 408 "), "{resp}");
    assert!(start.elapsed() >= Duration::from_millis(900));
    strait.wait_for_log("client failed").await;
    assert!(!strait.logs().iter().any(|l| l.contains("upstream failed")));
}

/// 2. A slow, steady upload to a route with two upstreams and a short
///    `upstream_response` is answered, and takes neither upstream out of rotation.
#[tokio::test]
async fn a_slow_upload_is_not_an_upstream_timeout() {
    let a = Origin::start().await;
    let b = Origin::start().await;
    let config = format!(
        "listen = [{{ addr = \"127.0.0.1:0\" }}]\n[[route]]\nupstream = [\"{}\", \"{}\"]\nupstream_response = \"1s\"\n",
        a.url(),
        b.url()
    );
    let strait = Strait::start(&config, &[]);
    // 3 s of upload, a chunk every 100 ms, three times upstream_response.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Trickle>();
    let start = Instant::now();
    let resp = client
        .request(
            Request::post(format!("{}/upload", strait.url()))
                .body(Trickle::new(30, Duration::from_millis(100)))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "after {:?}", start.elapsed());
    assert!(start.elapsed() >= Duration::from_secs(2));
    let uploaded: usize = a
        .seen()
        .iter()
        .chain(b.seen().iter())
        .map(|s| s.body.len())
        .sum();
    assert_eq!(uploaded, 30 * 1000);
    // Both upstreams still take their turn.
    for _ in 0..10 {
        assert_eq!(curl(&[&strait.url()]).await.status, 200);
    }
    assert!(
        a.seen().len() >= 5 && b.seen().len() >= 5,
        "{} {}",
        a.seen().len(),
        b.seen().len()
    );
    assert!(!strait.logs().iter().any(|l| l.contains("upstream failed")));
}

/// A request body of `left` chunks of 1,000 bytes, one every `every`.
struct Trickle {
    left: usize,
    every: Duration,
    sleep: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl Trickle {
    fn new(left: usize, every: Duration) -> Trickle {
        Trickle {
            left,
            every,
            sleep: None,
        }
    }
}

impl http_body::Body for Trickle {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        use std::future::Future;
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        let every = self.every;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(every)));
        std::task::ready!(sleep.as_mut().poll(cx));
        self.sleep = None;
        self.left -= 1;
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from(vec![
            b'u';
            1000
        ])))))
    }
}

/// 5. `max_body`: a length over the limit is refused before any byte goes upstream; a
///    chunked body is cut where it passes the limit; a route's own limit wins.
#[tokio::test]
async fn max_body_refuses_long_bodies_with_413() {
    let origin = Origin::start().await;
    let config = format!(
        "listen = [{{ addr = \"127.0.0.1:0\" }}]\n[limits]\nmax_body = \"1KiB\"\n\
         [[route]]\npath = \"/big/\"\nupstream = \"{0}\"\nmax_body = \"1MiB\"\n\
         [[route]]\nupstream = \"{0}\"\n",
        origin.url()
    );
    let strait = Strait::start(&config, &[]);
    let body = "x".repeat(2000);
    // Content-Length over the limit: 413, nothing upstream.
    let out = curl(&["-d", &body, &format!("{}/small", strait.url())]).await;
    assert_eq!(out.status, 413, "{}", out.text());
    assert_eq!(out.header("connection"), Some("close"));
    assert_eq!(origin.seen().len(), 0);
    // Chunked, over the limit: 413 once the limit is passed.
    let out = curl(&[
        "-H",
        "Transfer-Encoding: chunked",
        "-d",
        &body,
        &format!("{}/small", strait.url()),
    ])
    .await;
    assert_eq!(out.status, 413, "{}", out.text());
    // Under the limit, and on the route with its own larger one: through.
    let out = curl(&["-d", "short", &format!("{}/small", strait.url())]).await;
    assert_eq!(out.status, 200);
    let out = curl(&["-d", &body, &format!("{}/big/x", strait.url())]).await;
    assert_eq!(out.status, 200);
    assert_eq!(origin.last().body.len(), 2000);
    // HTTP/2 likewise.
    let mut h2 = h2_client::<http_body_util::Full<Bytes>>(strait.addr()).await;
    let resp = h2
        .send_request(
            Request::post(format!("{}/small", strait.url()))
                .body(http_body_util::Full::new(Bytes::from(body.clone())))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    strait.wait_for_log("max_body").await;
}

/// `[forward] max_body` overrides `[limits]` for forwarded requests.
#[tokio::test]
async fn forward_max_body_applies_to_forwarded_requests() {
    let origin = Origin::start().await;
    let strait = Strait::start(
        "listen = [{ addr = \"127.0.0.1:0\" }]\n[forward]\ndeny_targets = []\nmax_body = 100\n",
        &[],
    );
    let out = curl(&["-x", &strait.url(), "-d", &"y".repeat(101), &origin.url()]).await;
    assert_eq!(out.status, 413);
    let out = curl(&["-x", &strait.url(), "-d", &"y".repeat(100), &origin.url()]).await;
    assert_eq!(out.status, 200);
}

/// 3. `max_connections`: at the cap Strait stops accepting until a connection closes,
///    and connections idle between requests are closed to make room. The backlog is
///    `limits.backlog` (as the kernel allows), and the cap is on /metrics.
#[tokio::test]
async fn the_connection_cap_pauses_accepting_and_trims_idle_connections() {
    let origin = Origin::start().await;
    let strait = Strait::start(
        &route_to(
            &origin.url(),
            "[limits]\nmax_connections = 2\n[admin]\naddr = \"127.0.0.1:0\"",
        ),
        &[],
    );
    assert_eq!(strait.metric("strait_client_connections_max").await, 2.0);
    // One keep-alive connection idle between requests, and one mid-request (its head
    // not finished), hold both places.
    let mut idle = TcpStream::connect(strait.addr()).await.unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let first = read_until(&mut idle, |r| r.ends_with("origin says hi")).await;
    assert!(!first.contains("connection: close"), "{first}");
    let mut busy = TcpStream::connect(strait.addr()).await.unwrap();
    busy.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A third needs a place: the idle one is closed for it, and it is served.
    let mut third = TcpStream::connect(strait.addr()).await.unwrap();
    third
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let got = read_until(&mut third, |r| r.ends_with("origin says hi")).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert_eq!(
        read_to_close(&mut idle).await,
        "",
        "the idle connection was not closed"
    );
    assert!(
        strait
            .logs()
            .iter()
            .any(|l| l.contains("connection cap reached"))
    );
    // Now the busy one and the third hold both places; a fourth waits in the backlog
    // until one of them closes (the third's answer said it would close: the cap is
    // near).
    assert!(got.contains("connection: close"), "{got}");
    let mut fourth = TcpStream::connect(strait.addr()).await.unwrap();
    fourth
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let got = read_until(&mut fourth, |r| r.ends_with("origin says hi")).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    // With both places held by heads on their way, a fifth is not served.
    let mut fifth = TcpStream::connect(strait.addr()).await.unwrap();
    let mut sixth = TcpStream::connect(strait.addr()).await.unwrap();
    fifth
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n")
        .await
        .unwrap();
    sixth
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let early = tokio::time::timeout(Duration::from_millis(500), sixth.read(&mut buf)).await;
    assert!(early.is_err(), "served above the cap: {early:?}");
    drop(busy);
    let got = read_until(&mut sixth, |r| r.ends_with("origin says hi")).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
}

/// `limits.backlog` is the listen backlog: with accepting paused at the cap, the kernel
/// completes that many handshakes (and one more) and leaves the rest unanswered. One
/// above `somaxconn` is cut to it, and the log says so.
#[tokio::test]
async fn the_backlog_is_limits_backlog() {
    let origin = Origin::start().await;
    let strait = Strait::start(
        &route_to(&origin.url(), "[limits]\nmax_connections = 1\nbacklog = 4"),
        &[],
    );
    let mut holder = TcpStream::connect(strait.addr()).await.unwrap();
    holder
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let addr = strait.addr();
    let tries: Vec<_> = (0..30)
        .map(|_| {
            tokio::spawn(async move {
                tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr))
                    .await
                    .ok()
                    .and_then(Result::ok)
            })
        })
        .collect();
    let mut connected = Vec::new();
    for t in tries {
        connected.extend(t.await.unwrap());
    }
    assert!(
        (4..=6).contains(&connected.len()),
        "{} of 30 handshakes completed with backlog 4",
        connected.len()
    );
    drop(holder);

    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let strait = Strait::start(
        &route_to(
            &origin.url(),
            &format!("[limits]\nbacklog = {}", somaxconn + 1),
        ),
        &[],
    );
    assert!(
        strait.logs().iter().any(|l| l.contains("somaxconn")),
        "no word of somaxconn"
    );
}

/// At the open-file limit, failed accepts are paced, logged at most once a second with
/// a count, and counted by reason; the listener serves again once descriptors free.
#[tokio::test]
async fn accept_errors_are_paced_logged_and_counted() {
    let origin = Origin::start().await;
    let strait = Strait::start(
        &route_to(&origin.url(), "[admin]\naddr = \"127.0.0.1:0\""),
        &[],
    );
    let fds = strait.fd_count() as u64;
    // Room for a few connections more than Strait holds now.
    let limit = libc::rlimit {
        rlim_cur: fds + 6,
        rlim_max: fds + 6,
    };
    // SAFETY: a plain syscall on a child process this test owns; `limit` outlives it.
    let r = unsafe {
        libc::prlimit(
            strait.pid() as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &limit,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(r, 0, "prlimit: {}", std::io::Error::last_os_error());
    let mut held = Vec::new();
    for _ in 0..40 {
        if let Ok(s) = TcpStream::connect(strait.addr()).await {
            held.push(s);
        }
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let warnings = strait
        .logs()
        .iter()
        .filter(|l| l.contains("accept failed"))
        .count();
    assert!(
        (1..=4).contains(&warnings),
        "{warnings} accept warnings in 2.5 s"
    );
    drop(held);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let counted = strait
        .metric("strait_accept_errors_total{listener=\"127.0.0.1:0\",reason=\"process_fd_limit\"}")
        .await;
    assert!(counted >= 1.0, "accept errors counted: {counted}");
    assert_eq!(curl(&[&strait.url()]).await.status, 200);
}

/// 4. Paced rapid reset: a stream opened, reset 50 ms later, again and again, on one
///    HTTP/2 connection ends in GOAWAY ENHANCE_YOUR_CALM before 100 upstream requests.
#[tokio::test]
async fn a_paced_reset_storm_ends_in_enhance_your_calm() {
    let origin = Origin::with(|_| async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        ok("slow")
    })
    .await;
    let strait = Strait::start(&route_to(&origin.url(), ""), &[]);
    let tcp = TcpStream::connect(strait.addr()).await.unwrap();
    let (mut client, conn) = h2::client::handshake(tcp).await.unwrap();
    let ended = tokio::spawn(conn);
    let mut opened = 0;
    for _ in 0..300 {
        let req = Request::get(format!("{}/", strait.url())).body(()).unwrap();
        let Ok(ready) = client.clone().ready().await else {
            break;
        };
        client = ready;
        let Ok((resp, stream)) = client.send_request(req, true) else {
            break;
        };
        opened += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Dropping every handle resets the stream (CANCEL).
        drop((resp, stream));
        if ended.is_finished() {
            break;
        }
    }
    let err = tokio::time::timeout(Duration::from_secs(5), ended)
        .await
        .expect("the connection outlived the storm")
        .unwrap()
        .expect_err("the connection ended cleanly");
    assert_eq!(err.reason(), Some(h2::Reason::ENHANCE_YOUR_CALM), "{err}");
    let upstream = origin.seen().len();
    assert!(
        upstream < 100,
        "{upstream} upstream requests ({opened} streams)"
    );
}

/// 6. SETTINGS and PING floods end in GOAWAY ENHANCE_YOUR_CALM and a close.
#[tokio::test]
async fn settings_and_ping_floods_end_the_connection() {
    let origin = Origin::start().await;
    let strait = Strait::start(&route_to(&origin.url(), ""), &[]);
    for (kind, payload) in [(0x6u8, vec![0u8; 8]), (0x4, vec![])] {
        let mut s = TcpStream::connect(strait.addr()).await.unwrap();
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(0x4, 0, 0, &[]));
        for _ in 0..5000 {
            bytes.extend(frame(kind, 0, 0, &payload));
        }
        // The flood is written while the answers are read: a client that reads
        // nothing gets no GOAWAY, only the close.
        let (mut r, mut w) = s.split();
        let write = async {
            let _ = w.write_all(&bytes).await;
        };
        let read = async {
            let mut all = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), r.read_to_end(&mut all)).await;
            all
        };
        let ((), all) = tokio::join!(write, read);
        assert_eq!(
            last_goaway(&all),
            Some(0xb),
            "frame type {kind:#x}: no ENHANCE_YOUR_CALM"
        );
    }
}

/// `h2_max_requests_per_connection`: at the limit the connection is asked to go; the
/// client's next requests go on a new one.
#[tokio::test]
async fn http2_connections_end_after_their_request_limit() {
    let origin = Origin::start().await;
    let strait = Strait::start(
        &route_to(
            &origin.url(),
            "[limits]\nh2_max_requests_per_connection = 5",
        ),
        &[],
    );
    let mut h2 = h2_client::<Empty<Bytes>>(strait.addr()).await;
    let mut ok = 0;
    for _ in 0..10 {
        let req = Request::get(format!("{}/", strait.url()))
            .body(Empty::new())
            .unwrap();
        match h2.send_request(req).await {
            Ok(resp) if resp.status() == 200 => ok += 1,
            _ => break,
        }
    }
    assert_eq!(ok, 5, "requests served on one connection");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        h2.is_closed() || h2.ready().await.is_err(),
        "the connection stayed open"
    );
}

/// A trim (the cap reached) while HTTP/2 requests are in flight closes nothing busy,
/// costs no CPU while they run, and the connection goes once they are done.
#[tokio::test]
async fn a_trim_leaves_busy_http2_connections_alone() {
    let origin = Origin::with(|_| async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        ok("late")
    })
    .await;
    let strait = Strait::start(
        &route_to(&origin.url(), "[limits]\nmax_connections = 3"),
        &[],
    );
    let mut h2 = h2_client::<Empty<Bytes>>(strait.addr()).await;
    let slow = h2.send_request(
        Request::get(format!("{}/", strait.url()))
            .body(Empty::new())
            .unwrap(),
    );
    let slow = tokio::spawn(slow);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Fill the cap: the accept loop trims.
    let mut fill = Vec::new();
    for _ in 0..3 {
        fill.push(TcpStream::connect(strait.addr()).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(fill);
    let cpu_before = process_cpu(strait.pid());
    let resp = slow.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let spent = process_cpu(strait.pid()) - cpu_before;
    assert!(
        spent < Duration::from_millis(500),
        "{spent:?} of CPU while one request waited"
    );
    assert_eq!(curl(&[&strait.url()]).await.status, 200);
}

/// utime + stime of a process.
fn process_cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf with a constant name only reads configuration.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// An HTTP/2 client that opens no window for its response, its pings keeping the
/// socket busy, is closed once the exchange has not moved for `idle`.
#[tokio::test]
async fn a_stalled_http2_exchange_ends_at_idle() {
    let origin = Origin::with(|_| async {
        Response::new(OriginBody::Repeat {
            chunk: Bytes::from(vec![b'z'; 16 * 1024]),
            remaining: 8 << 20,
        })
    })
    .await;
    let strait = Strait::start(
        &route_to(
            &origin.url(),
            "[timeouts]\nidle = \"2s\"\nkeepalive = \"60s\"",
        ),
        &[],
    );
    let tcp = TcpStream::connect(strait.addr()).await.unwrap();
    let (client, mut conn) = h2::client::Builder::new()
        .initial_window_size(1)
        .handshake::<_, Bytes>(tcp)
        .await
        .unwrap();
    let mut pinger = conn.ping_pong().unwrap();
    let ended = tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let (resp, _) = client
        .send_request(
            Request::get(format!("{}/", strait.url())).body(()).unwrap(),
            true,
        )
        .unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
    let start = Instant::now();
    // Ping on, never read the body.
    let _body = resp.into_body();
    let pings = tokio::spawn(async move {
        while pinger.ping(h2::Ping::opaque()).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let r = tokio::time::timeout(Duration::from_secs(10), ended).await;
    assert!(r.is_ok(), "the stalled connection was kept");
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(1800),
        "closed after {waited:?}"
    );
    pings.abort();
}

/// Streams h2 resets for the client's own protocol errors (a stream made to depend on
/// itself) are bounded as the client's resets are.
#[tokio::test]
async fn self_dependent_streams_are_bounded_like_resets() {
    let origin = Origin::with(|_| async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        ok("slow")
    })
    .await;
    let strait = Strait::start(&route_to(&origin.url(), ""), &[]);
    let mut s = TcpStream::connect(strait.addr()).await.unwrap();
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(0x4, 0, 0, &[]));
    s.write_all(&bytes).await.unwrap();
    // HPACK: :method GET (0x82), :scheme http (0x86), :path / (0x84), :authority a.
    let block = [0x82, 0x86, 0x84, 0x41, 0x01, b'a'];
    let (mut r, mut w) = s.split();
    let write = async {
        for i in 0..300u32 {
            let id = 1 + 2 * i;
            let mut b = frame(0x1, 0x5, id, &block);
            let mut prio = id.to_be_bytes().to_vec();
            prio.push(16);
            b.extend(frame(0x2, 0, id, &prio));
            if w.write_all(&b).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let read = async {
        let mut all = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut all)).await;
        all
    };
    let ((), _) = tokio::join!(write, read);
    let upstream = origin.seen().len();
    assert!(upstream < 100, "{upstream} upstream requests");
}

/// A body refused for its length is never read as requests: with exact bytes, a
/// request smuggled in an over-long body (by `Content-Length`, and after the chunk that
/// passes the limit) gets no answer and never reaches the origin; the connection closes
/// after the one 413.
#[tokio::test]
async fn a_body_refused_for_its_length_smuggles_nothing() {
    let origin = Origin::start().await;
    let strait = Strait::start(&route_to(&origin.url(), "[limits]\nmax_body = 64"), &[]);
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n";
    let padding = "x".repeat(100 - smuggled.len());
    let by_length =
        format!("POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n{padding}{smuggled}");
    let chunked = format!(
        "POST /b HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
         50\r\n{}\r\n0\r\n\r\n{smuggled}",
        "y".repeat(0x50)
    );
    for bytes in [by_length, chunked] {
        let got = raw_exchange(strait.addr(), bytes.as_bytes(), Duration::from_secs(3)).await;
        assert!(got.starts_with("HTTP/1.1 413 "), "{got}");
        assert_eq!(got.matches("HTTP/1.1 ").count(), 1, "{got}");
    }
    assert!(
        origin.seen().iter().all(|s| !s.uri.contains("smuggled")),
        "{:?}",
        origin.seen()
    );
}
