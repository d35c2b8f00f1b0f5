//! Errors Strait makes itself, and peers that misbehave: the right status, a short body,
//! a log line that says why, and nobody else disturbed.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_request_gets_400_and_disturbs_no_one() {
    let origin = Origin::start().await;
    let strait = Strait::start(&route_to(&origin.url(), ""), &[]);

    // A client with a keep-alive connection open before the bad request arrives.
    let mut good = tokio::net::TcpStream::connect(strait.addr()).await.unwrap();
    let req = b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n";
    good.write_all(req).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = good.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));

    for garbage in [
        &b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n"[..],
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",
        b"GET /\x01 HTTP/1.1\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nabcde",
    ] {
        let reply = raw_exchange(strait.addr(), garbage, Duration::from_secs(2)).await;
        assert!(
            reply.starts_with("HTTP/1.1 400"),
            "{garbage:?} got {reply:?}"
        );
    }

    // The earlier connection still works, and so do new ones.
    good.write_all(b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let n = good.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    assert_eq!(
        curl(&[&format!("{}/three", strait.url())]).await.status,
        200
    );
    let uris: Vec<String> = origin.seen().into_iter().map(|s| s.uri).collect();
    assert_eq!(uris, ["/one", "/two", "/three"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_is_502_and_logged() {
    let dead = closed_port();
    let strait = Strait::start(&route_to(&format!("http://{dead}"), ""), &[]);
    let out = curl(&[&format!("{}/x", strait.url())]).await;
    assert_eq!(out.status, 502);
    assert_eq!(out.text(), "502 bad gateway\n", "short, no internals");
    assert_eq!(
        out.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    strait.wait_for_log("Connection refused").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_upstream_response_is_502() {
    let bad = raw_origin(b"HTTP/1.1 2OO Okay\r\nthis is not http\r\n\r\n").await;
    let strait = Strait::start(&route_to(&format!("http://{bad}"), ""), &[]);
    let out = curl(&[&format!("{}/x", strait.url())]).await;
    assert_eq!(out.status, 502);
    strait.wait_for_log("upstream failed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upstream_is_504_after_upstream_response() {
    let origin = Origin::with(|_| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        ok("too late")
    })
    .await;
    let strait = Strait::start(
        &route_to(&origin.url(), "[timeouts]\nupstream_response = \"500ms\""),
        &[],
    );
    let started = std::time::Instant::now();
    let out = curl(&[&format!("{}/slow", strait.url())]).await;
    assert_eq!(out.status, 504);
    assert!(started.elapsed() < Duration::from_secs(5));
    strait.wait_for_log("no response head within 500ms").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stalls_is_cut_after_upstream_response_without_a_byte() {
    for version in ["h1", "h2"] {
        let origin = Origin::with(|_| async {
            http::Response::new(OriginBody::Stall(Some(bytes::Bytes::from_static(
                b"first part",
            ))))
        })
        .await;
        let config = format!(
            "listen = [{{ addr = \"127.0.0.1:0\" }}]\n[timeouts]\nupstream_response = \"500ms\"\n[[route]]\nupstream = \"{}\"\nversion = \"{version}\"\n",
            origin.url()
        );
        let strait = Strait::start(&config, &[]);
        let started = std::time::Instant::now();
        let out = curl(&[&format!("{}/stream", strait.url())]).await;
        // The head and the first bytes went out; the body then ends short, never as
        // if complete.
        assert_eq!(out.status, 200, "{version}: {out:?}");
        assert_eq!(out.text(), "first part", "{version}");
        assert_ne!(out.exit, 0, "{version}: a cut body must not look complete");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{version}: {:?}",
            started.elapsed()
        );
        strait
            .wait_for_log("no byte of the response body for 500ms")
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routes_own_upstream_response_overrides_the_global_one() {
    let origin = Origin::with(|s| {
        let wait = if s.uri.starts_with("/quick/") { 30 } else { 1 };
        async move {
            tokio::time::sleep(Duration::from_secs(wait)).await;
            ok("late")
        }
    })
    .await;
    // The global timeout is the default minute; one route allows half a second, another
    // (an event stream, say) a whole minute more than the body needs.
    let config = format!(
        "listen = [{{ addr = \"127.0.0.1:0\" }}]\n[[route]]\npath = \"/quick/\"\nupstream = \"{u}\"\nupstream_response = \"500ms\"\n[[route]]\npath = \"/\"\nupstream = \"{u}\"\n",
        u = origin.url()
    );
    let strait = Strait::start(&config, &[]);
    let started = std::time::Instant::now();
    let out = curl(&[&format!("{}/quick/x", strait.url())]).await;
    assert_eq!(out.status, 504);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    strait.wait_for_log("no response head within 500ms").await;
    let out = curl(&[&format!("{}/slow", strait.url())]).await;
    assert_eq!(out.status, 200, "the other route keeps the global minute");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_h2_upstream_is_504_too() {
    let origin = Origin::with(|_| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        ok("too late")
    })
    .await;
    let config = format!(
        "listen = [{{ addr = \"127.0.0.1:0\" }}]\n[timeouts]\nupstream_response = \"500ms\"\n[[route]]\nupstream = \"{}\"\nversion = \"h2\"\n",
        origin.url()
    );
    let strait = Strait::start(&config, &[]);
    let started = std::time::Instant::now();
    let out = curl(&[&format!("{}/slow", strait.url())]).await;
    assert_eq!(out.status, 504);
    assert!(started.elapsed() < Duration::from_secs(3));
    // The shared connection serves the next request.
    assert_eq!(origin.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_reset_mid_body_never_looks_like_a_clean_end() {
    let origin = Origin::with(|s| {
        let chunked = s.uri.contains("chunked");
        async move {
            let mut r = http::Response::new(OriginBody::Broken(
                Some(bytes::Bytes::from(vec![b'x'; 10_000])),
                None,
            ));
            if !chunked {
                r.headers_mut()
                    .insert("content-length", "100000".parse().unwrap());
            }
            r
        }
    })
    .await;
    let strait = Strait::start(&route_to(&origin.url(), ""), &[]);
    for path in ["/sized", "/chunked"] {
        let out = curl(&[&format!("{}{path}", strait.url())]).await;
        assert_ne!(
            out.exit, 0,
            "{path}: curl must see a broken transfer: {out:?}"
        );
        let out = curl(&[
            "--http2-prior-knowledge",
            &format!("{}{path}", strait.url()),
        ])
        .await;
        assert_ne!(
            out.exit, 0,
            "{path} over h2: curl must see a broken stream: {out:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_its_head_is_cut_off_after_header_read() {
    let origin = Origin::start().await;
    let strait = Strait::start(
        &route_to(&origin.url(), "[timeouts]\nheader_read = \"1s\""),
        &[],
    );
    let mut s = tokio::net::TcpStream::connect(strait.addr()).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("closed by the header-read timeout")
        .ok();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
    assert_eq!(origin.seen().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_client_is_closed_after_timeouts_idle() {
    let origin = Origin::start().await;
    let strait = Strait::start(
        &route_to(
            &origin.url(),
            "[timeouts]\nidle = \"1s\"\nheader_read = \"30s\"",
        ),
        &[],
    );
    let mut s = tokio::net::TcpStream::connect(strait.addr()).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let started = std::time::Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("closed by the idle timeout")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(started.elapsed() >= Duration::from_millis(900));
}

/// The same 64 KiB bound as an HTTP/1.1 head (`http1::MAX_HEAD`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_header_list_over_64_kib_gets_431_and_the_connection_goes_on() {
    let origin = Origin::start().await;
    let strait = Strait::start(&route_to(&origin.url(), ""), &[]);
    let mut sender = h2_client::<http_body_util::Empty<bytes::Bytes>>(strait.addr()).await;
    let get = |big: usize| {
        http::Request::get(format!("http://{}/", strait.addr()))
            .header("x-big", "a".repeat(big))
            .body(http_body_util::Empty::new())
            .unwrap()
    };
    let resp = sender.send_request(get(70 * 1024)).await.unwrap();
    assert_eq!(resp.status(), 431);
    let resp = sender.send_request(get(48 * 1024)).await.unwrap();
    assert_eq!(
        resp.status(),
        200,
        "the same connection serves the next stream"
    );
    assert_eq!(origin.seen().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_head_is_refused_without_harm() {
    let origin = Origin::start().await;
    let strait = Strait::start(&route_to(&origin.url(), ""), &[]);
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(1 << 20)
    );
    let reply = raw_exchange(strait.addr(), huge.as_bytes(), Duration::from_secs(3)).await;
    assert!(
        reply.starts_with("HTTP/1.1 431") || reply.starts_with("HTTP/1.1 400") || reply.is_empty(),
        "{reply:.80}"
    );
    assert_eq!(curl(&[&format!("{}/", strait.url())]).await.status, 200);
    assert_eq!(origin.seen().len(), 1);
}
