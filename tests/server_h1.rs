//! Strait's own HTTP/1.1 server for plain client connections, driven with raw bytes:
//! framing of what it writes, pipelining, hand-offs to hyper in the middle of a
//! connection, and clients that leave early.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::Response;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::*;

/// An origin that answers each request with its method, path and body.
async fn echo_origin() -> Origin {
    Origin::with(|seen| {
        let text = format!(
            "{} {} [{}]",
            seen.method,
            seen.uri,
            String::from_utf8_lossy(&seen.body)
        );
        async move { Response::new(OriginBody::text(text)) }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    let origin = echo_origin().await;
    let strait = Strait::start(&route_to(&origin.url(), ""), &[]);
    let mut s = TcpStream::connect(strait.addr()).await.unwrap();
    s.write_all(
        b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n\
          POST /two HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
          GET /three HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await
    .unwrap();
    let got = read_until(&mut s, |t| t.contains("GET /three []")).await;
    let one = got.find("GET /one []").expect("first answer");
    let two = got.find("POST /two [hello]").expect("second answer");
    let three = got.find("GET /three []").unwrap();
    assert!(one < two && two < three, "{got}");
    assert_eq!(got.matches("HTTP/1.1 200 OK\r\n").count(), 3, "{got}");
}

/// A close-delimited upstream body has no length: the client gets it chunked, and the
/// connection stays usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_of_unknown_length_is_sent_chunked() {
    let upstream =
        raw_origin(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nthree words here").await;
    let strait = Strait::start(&route_to(&format!("http://{upstream}"), ""), &[]);
    let mut s = TcpStream::connect(strait.addr()).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let got = read_until(&mut s, |t| t.ends_with("0\r\n\r\n")).await;
    let (head, body) = got.split_once("\r\n\r\n").unwrap();
    let head = head.to_ascii_lowercase();
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    assert!(!head.contains("content-length"), "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    assert_eq!(body, "10\r\nthree words here\r\n0\r\n\r\n");
    s.write_all(b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut s, |t| t.ends_with("0\r\n\r\n")).await;
}

/// HEAD and 204 answers carry no body: the next response on the connection follows
/// right after their heads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodiless_answers_keep_the_stream_in_step() {
    let origin = Origin::with(|seen| {
        let path = seen.uri.clone();
        async move {
            if path == "/empty" {
                status(204, "")
            } else {
                ok("fourteen bytes")
            }
        }
    })
    .await;
    let strait = Strait::start(&route_to(&origin.url(), ""), &[]);
    let mut s = TcpStream::connect(strait.addr()).await.unwrap();
    s.write_all(
        b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /empty HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /last HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await
    .unwrap();
    let got = read_until(&mut s, |t| t.ends_with("fourteen bytes")).await;
    let answers: Vec<&str> = got.split("HTTP/1.1 ").skip(1).collect();
    assert_eq!(answers.len(), 3, "{got}");
    assert!(answers[0].starts_with("200"), "{got}");
    assert!(
        answers[0]
            .to_ascii_lowercase()
            .contains("content-length: 14"),
        "{got}"
    );
    assert!(answers[0].ends_with("\r\n\r\n"), "HEAD got a body: {got}");
    assert!(answers[1].starts_with("204"), "{got}");
    assert!(
        !answers[1].to_ascii_lowercase().contains("content-length"),
        "{got}"
    );
    assert!(answers[1].ends_with("\r\n\r\n"), "204 got a body: {got}");
    assert!(answers[2].starts_with("200"), "{got}");
}

/// Strait's own answers (here a 404) carry a `Date`, as hyper's did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_answers_are_dated_and_sized() {
    let strait = Strait::start(
        "listen = [{ addr = \"127.0.0.1:0\" }]\n[[route]]\nhost = \"only.example\"\nupstream = \"http://127.0.0.1:9\"\n",
        &[],
    );
    let got = raw_exchange(
        strait.addr(),
        b"GET / HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    let lower = got.to_ascii_lowercase();
    assert!(got.starts_with("HTTP/1.1 404 Not Found\r\n"), "{got}");
    assert!(lower.contains("\r\ndate: "), "{got}");
    assert!(lower.contains("\r\ncontent-length: "), "{got}");
    assert!(lower.contains("\r\nconnection: close\r\n"), "{got}");
}

/// Requests Strait leaves to hyper can follow requests it served itself, on the same
/// connection, and the connection comes back to Strait after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_moves_to_hyper_and_back() {
    let origin = echo_origin().await;
    let strait = Strait::start(&route_to(&origin.url(), ""), &[]);
    let mut s = TcpStream::connect(strait.addr()).await.unwrap();
    s.write_all(b"GET /mine HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut s, |t| t.ends_with("GET /mine []")).await;
    // Expect: 100-continue is hyper's: the interim answer comes before the body is sent.
    s.write_all(
        b"PUT /expect HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n",
    )
    .await
    .unwrap();
    read_until(&mut s, |t| t.starts_with("HTTP/1.1 100 Continue\r\n\r\n")).await;
    s.write_all(b"body").await.unwrap();
    read_until(&mut s, |t| t.ends_with("PUT /expect [body]")).await;
    // A chunked body, then a plain request in the same write.
    s.write_all(
        b"POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
          3\r\nabc\r\n0\r\n\r\nGET /after HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await
    .unwrap();
    let got = read_until(&mut s, |t| t.ends_with("GET /after []")).await;
    assert!(got.contains("POST /chunked [abc]"), "{got}");
    let uris: Vec<String> = origin.seen().iter().map(|r| r.uri.clone()).collect();
    assert_eq!(uris, ["/mine", "/expect", "/chunked", "/after"]);
}

/// A malformed head after a good request gets hyper's 400 and the connection closes;
/// the good request's answer came first, whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_head_mid_connection_gets_400() {
    let origin = echo_origin().await;
    let strait = Strait::start(&route_to(&origin.url(), ""), &[]);
    let mut s = TcpStream::connect(strait.addr()).await.unwrap();
    s.write_all(b"GET /good HTTP/1.1\r\nHost: x\r\n\r\nGET /bad HTTP/1.1\r\nBad Header: x\r\n\r\n")
        .await
        .unwrap();
    let got = read_to_close(&mut s).await;
    let good = got.find("GET /good []").expect("the good answer");
    let bad = got.find("HTTP/1.1 400 Bad Request").expect("a 400");
    assert!(good < bad, "{got}");
    assert_eq!(origin.seen().len(), 1);
}

/// A body longer than Strait reads whole streams through hyper, every byte of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_body_streams_whole() {
    let origin = Origin::with(|seen| {
        let n = seen.body.len();
        async move { Response::new(OriginBody::text(format!("got {n}"))) }
    })
    .await;
    let strait = Strait::start(&route_to(&origin.url(), ""), &[]);
    let mut s = TcpStream::connect(strait.addr()).await.unwrap();
    let body = vec![b'x'; 300_000];
    s.write_all(b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 300000\r\n\r\n")
        .await
        .unwrap();
    s.write_all(&body).await.unwrap();
    read_until(&mut s, |t| t.ends_with("got 300000")).await;
}

/// A client that closes while its request waits on the upstream cancels it: the
/// upstream connection is dropped rather than left to answer nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_cancels_its_request() {
    let cancelled = Arc::new(AtomicBool::new(false));
    let flag = cancelled.clone();
    let (upstream, _) = counting_origin(move |mut s| {
        let flag = flag.clone();
        async move {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            // Never answers; sees the proxy hang up.
            if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await
            {
                flag.store(true, Ordering::SeqCst);
            }
        }
    })
    .await;
    let strait = Strait::start(&route_to(&format!("http://{upstream}"), ""), &[]);
    let mut s = TcpStream::connect(strait.addr()).await.unwrap();
    s.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(s);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while !cancelled.load(Ordering::SeqCst) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the upstream request outlived its client"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A body cut short by the upstream must not look whole to the client: the connection
/// closes before the promised length.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_body_ends_the_connection() {
    let upstream = raw_origin(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this").await;
    let strait = Strait::start(&route_to(&format!("http://{upstream}"), ""), &[]);
    let mut s = TcpStream::connect(strait.addr()).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // Read until the connection ends, which must be a reset: a FIN would look like
    // the end of a whole response to a client reading until close.
    let (got, end) = read_until_end(&mut s).await;
    let reset = end == Some(std::io::ErrorKind::ConnectionReset);
    let got = String::from_utf8_lossy(&got);
    assert!(reset, "ended with a FIN: {got}");
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
    assert!(
        got.to_ascii_lowercase().contains("content-length: 100"),
        "{got}"
    );
    assert!(got.ends_with("only this"), "{got}");
}

/// A short body that is still on its way when its head arrives streams to the upstream
/// (through hyper): the upstream gets its first bytes before the client sends the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_body_on_its_way_streams_to_the_upstream() {
    let origin = echo_origin().await;
    let strait = Strait::start(&route_to(&origin.url(), ""), &[]);
    let mut s = TcpStream::connect(strait.addr()).await.unwrap();
    s.write_all(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhe")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    while origin.body_bytes.load(Ordering::SeqCst) < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the upstream got none of the body while the client waits"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    s.write_all(b"llo").await.unwrap();
    let got = read_until(&mut s, |t| t.contains("POST /slow [hello]")).await;
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
    // The connection serves its next request.
    s.write_all(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut s, |t| t.contains("GET /next []")).await;
}

/// Sends `bad` and a good request after it on one connection: the first gets 400, the
/// second reaches the origin.
async fn gets_400_then_serves_the_next(addr: std::net::SocketAddr, bad: &str) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bad.as_bytes()).await.unwrap();
    s.write_all(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let got = read_until(&mut s, |t| t.contains("GET /next []")).await;
    assert!(got.starts_with("HTTP/1.1 400 "), "{bad:?}: {got}");
}

/// RFC 9112 §3.2: an HTTP/1.1 request without `Host`, with two, or with one that is no
/// host[:port] gets 400, on Strait's own path and on hyper's (a chunked body), and the
/// connection serves its next request. HTTP/1.0 may leave `Host` out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_one_good_host_get_400() {
    let origin = echo_origin().await;
    let strait = Strait::start(&route_to(&origin.url(), ""), &[]);
    for bad in [
        "GET /none HTTP/1.1\r\n\r\n",
        "GET /two HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        "GET /space HTTP/1.1\r\nHost: a b\r\n\r\n",
        "GET /user HTTP/1.1\r\nHost: user@a\r\n\r\n",
        "POST /chunked HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
    ] {
        gets_400_then_serves_the_next(strait.addr(), bad).await;
    }
    assert!(
        origin.seen().iter().all(|r| r.uri == "/next"),
        "a bad request reached the origin"
    );
    let mut s = TcpStream::connect(strait.addr()).await.unwrap();
    s.write_all(b"GET /old HTTP/1.0\r\n\r\n").await.unwrap();
    let got = read_to_close(&mut s).await;
    assert!(got.starts_with("HTTP/1.0 200 "), "{got}");
}

/// A target hyper takes but no origin server serves (authority form outside CONNECT,
/// `*`) gets 400, and the connection serves its next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_of_the_wrong_form_gets_400() {
    let origin = echo_origin().await;
    let strait = Strait::start(&route_to(&origin.url(), ""), &[]);
    for bad in [
        "GET example.com:80 HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET * HTTP/1.1\r\nHost: x\r\n\r\n",
        "OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        gets_400_then_serves_the_next(strait.addr(), bad).await;
    }
    assert!(origin.seen().iter().all(|r| r.uri == "/next"));
}

/// A body chunked twice (RFC 9112 §6.1) is framed one way here and another way
/// elsewhere: 501 (any coding but exactly `chunked`, as nginx answers), nothing
/// reaches the origin, and the connection closes rather than read on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_chunked_twice_gets_501_and_closes_the_connection() {
    let origin = echo_origin().await;
    let strait = Strait::start(&route_to(&origin.url(), ""), &[]);
    for te in [
        "Transfer-Encoding: chunked, chunked\r\n",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    ] {
        let mut s = TcpStream::connect(strait.addr()).await.unwrap();
        let req = format!(
            "POST /twice HTTP/1.1\r\nHost: x\r\n{te}\r\n0\r\n\r\nGET /next HTTP/1.1\r\nHost: x\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let got = read_to_close(&mut s).await;
        assert!(got.starts_with("HTTP/1.1 501 "), "{te:?}: {got}");
        assert_eq!(got.matches("HTTP/1.1 ").count(), 1, "{te:?}: {got}");
    }
    assert!(origin.seen().is_empty(), "a request reached the origin");
}

/// A chunked body that breaks its framing is the client's fault: 400, not 502, over
/// an HTTP/1.1 upstream and an h2c one, and the upstream connection it was streaming
/// on is not reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_chunked_body_gets_400() {
    let origin = echo_origin().await;
    for version in ["h1", "h2"] {
        let config = format!(
            "listen = [{{ addr = \"127.0.0.1:0\" }}]\n[[route]]\nupstream = \"{}\"\nversion = \"{version}\"\n",
            origin.url()
        );
        let strait = Strait::start(&config, &[]);
        let mut s = TcpStream::connect(strait.addr()).await.unwrap();
        s.write_all(b"POST /broken HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\nzz\r\n\r\n")
            .await
            .unwrap();
        let got = read_to_close(&mut s).await;
        assert!(got.starts_with("HTTP/1.1 400 "), "{version}: {got}");
        let mut s = TcpStream::connect(strait.addr()).await.unwrap();
        s.write_all(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        // An h2c origin sees the full URI.
        let got = read_until(&mut s, |t| t.contains("/next []")).await;
        assert!(got.starts_with("HTTP/1.1 200 "), "{version}: {got}");
    }
}
