//! Strait's own HTTP/1.1 client against origins that answer in every framing HTTP/1.1
//! allows, and a few it does not: bodies arrive whole, connections are reused exactly
//! when the framing allows it, and a bad head is a 502.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads one request head (no body); false at EOF.
async fn read_head(s: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte).await {
            Ok(1) => buf.push(byte[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&buf).into_owned())
}

/// An origin that keeps its connections and answers the n-th request on each with
/// `replies[n % len]`; counts connections.
async fn scripted_origin(replies: &'static [&'static [u8]]) -> (SocketAddr, Arc<AtomicUsize>) {
    counting_origin(move |mut s| async move {
        let mut n = 0;
        while read_head(&mut s).await.is_some() {
            if s.write_all(replies[n % replies.len()]).await.is_err() {
                return;
            }
            n += 1;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_arrives_whole_and_the_connection_is_reused() {
    let (origin, conns) = scripted_origin(&[
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Sum: 11\r\n\r\n",
    ])
    .await;
    let strait = Strait::start(&route_to(&format!("http://{origin}"), ""), &[]);
    for _ in 0..3 {
        let out = curl(&[&format!("{}/c", strait.url())]).await;
        assert_eq!(out.status, 200);
        assert_eq!(out.text(), "hello world");
        assert_eq!(out.header("transfer-encoding"), Some("chunked"));
    }
    assert_eq!(
        conns.load(Ordering::SeqCst),
        1,
        "one connection for all three"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_delimited_by_close_arrives_whole() {
    let origin =
        raw_origin(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the very end").await;
    let strait = Strait::start(&route_to(&format!("http://{origin}"), ""), &[]);
    for _ in 0..2 {
        let out = curl(&[&format!("{}/x", strait.url())]).await;
        assert_eq!(out.status, 200);
        assert_eq!(out.text(), "until the very end");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn informational_heads_are_passed_over() {
    let (origin, conns) = scripted_origin(&[
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\nmade",
    ])
    .await;
    let strait = Strait::start(&route_to(&format!("http://{origin}"), ""), &[]);
    for _ in 0..2 {
        let out = curl(&["-d", "x=1", &format!("{}/new", strait.url())]).await;
        assert_eq!(out.status, 201);
        assert_eq!(out.text(), "made");
    }
    assert_eq!(conns.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_response_has_no_body_and_keeps_the_connection() {
    let (origin, conns) = scripted_origin(&[
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    ])
    .await;
    let strait = Strait::start(&route_to(&format!("http://{origin}"), ""), &[]);
    let head = curl(&["-I", &format!("{}/h", strait.url())]).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("100"));
    let get = curl(&[&format!("{}/g", strait.url())]).await;
    assert_eq!(get.text(), "ok");
    assert_eq!(conns.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_response_heads_are_502() {
    let huge: &'static [u8] = Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\nX-Big: {}\r\nContent-Length: 0\r\n\r\n",
            "a".repeat(70 * 1024)
        )
        .into_bytes()
        .into_boxed_slice(),
    );
    for reply in [
        huge,
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab".as_slice(),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".as_slice(),
    ] {
        let origin = raw_origin(reply).await;
        let strait = Strait::start(&route_to(&format!("http://{origin}"), ""), &[]);
        let out = curl(&[&format!("{}/x", strait.url())]).await;
        // A bad chunk comes after a good head: the client sees the body cut off.
        assert!(out.status == 502 || out.exit != 0, "{out:?}");
    }
}

/// An origin that answers at once and echoes the request body as it reads it: the
/// request body must keep flowing while the response body is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_keeps_flowing_while_its_echo_comes_back() {
    let (origin, _) = counting_origin(|s| async move {
        let service =
            hyper::service::service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                Ok::<_, std::convert::Infallible>(http::Response::new(req.into_body()))
            });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(s), service)
            .await;
    })
    .await;
    let strait = Strait::start(&route_to(&format!("http://{origin}"), ""), &[]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("up");
    let data: Vec<u8> = (0..24 << 20).map(|i: u32| (i % 251) as u8).collect();
    std::fs::write(&file, &data).unwrap();
    let out = curl(&[
        "--data-binary",
        &format!("@{}", file.display()),
        &format!("{}/echo", strait.url()),
    ])
    .await;
    assert_eq!(out.status, 200, "{}", out.stderr);
    assert_eq!(out.body.len(), data.len());
    assert!(out.body == data);
}

/// Answers the first request on each connection, then reads the second and closes
/// without a word: the race of a request with an origin's idle close.
async fn answer_once_origin() -> (SocketAddr, Arc<AtomicUsize>) {
    counting_origin(|mut s| async move {
        if read_head(&mut s).await.is_some() {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
                .await;
        }
        let _ = read_head(&mut s).await;
        // Closed with the second request unanswered.
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_get_on_a_reused_connection_goes_again_and_a_post_does_not() {
    let (origin, conns) = answer_once_origin().await;
    let strait = Strait::start(&route_to(&format!("http://{origin}"), ""), &[]);
    let first = curl(&[&format!("{}/a", strait.url())]).await;
    assert_eq!(first.text(), "first");
    // Reused connection, no answer: the GET is written again on a new connection.
    let again = curl(&[&format!("{}/b", strait.url())]).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.text(), "first");
    assert_eq!(conns.load(Ordering::SeqCst), 2);
    // A POST is not idempotent: the same race is a 502.
    let post = curl(&["-d", "order=1", &format!("{}/c", strait.url())]).await;
    assert_eq!(post.status, 502);
    assert_eq!(conns.load(Ordering::SeqCst), 2);
}

/// Answers each request with `reply` in pieces of `piece` bytes, 1 ms apart; with
/// `close_after`, closes after that many bytes instead.
async fn dripping_origin(
    reply: &'static [u8],
    piece: usize,
    close_after: Option<usize>,
) -> (SocketAddr, Arc<AtomicUsize>) {
    counting_origin(move |mut s| async move {
        s.set_nodelay(true).unwrap();
        while read_head(&mut s).await.is_some() {
            let end = close_after.unwrap_or(reply.len());
            for part in reply[..end].chunks(piece) {
                if s.write_all(part).await.is_err() {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            if close_after.is_some() {
                return;
            }
        }
    })
    .await
}

const DRIP: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Long: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n1a\r\nabcdefghijklmnopqrstuvwxyz\r\n4;x=y\r\n0123\r\n0\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_arriving_a_few_bytes_at_a_time_is_whole() {
    let (origin, conns) = dripping_origin(DRIP, 3, None).await;
    let strait = Strait::start(&route_to(&format!("http://{origin}"), ""), &[]);
    for _ in 0..2 {
        let out = curl(&[&format!("{}/drip", strait.url())]).await;
        assert_eq!(out.status, 200);
        assert_eq!(out.text(), "abcdefghijklmnopqrstuvwxyz0123");
    }
    assert_eq!(conns.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_cut_mid_chunk_never_looks_complete() {
    let cut = DRIP.len() - 12; // inside the second chunk's data
    let (origin, _) = dripping_origin(DRIP, 64, Some(cut)).await;
    let strait = Strait::start(&route_to(&format!("http://{origin}"), ""), &[]);
    let out = curl(&[&format!("{}/cut", strait.url())]).await;
    assert_eq!(out.status, 200, "the head was whole");
    assert_ne!(out.exit, 0, "curl must see the body cut short: {out:?}");
    assert!(!out.text().contains("0123"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_origin_closed_while_idle_is_never_handed_a_post() {
    // Answers one request per connection as if keeping it alive, then closes it.
    let (origin, conns) = counting_origin(|mut s| async move {
        if read_head(&mut s).await.is_some() {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await;
        }
        let _ = s.shutdown().await;
    })
    .await;
    let strait = Strait::start(&route_to(&format!("http://{origin}"), ""), &[]);
    for i in 0..3 {
        let get = curl(&[&format!("{}/g{i}", strait.url())]).await;
        assert_eq!(get.status, 200);
        // The close reaches Strait while the connection sits idle.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        // Not idempotent: sent on the closed connection it would be a 502.
        let post = curl(&["-d", "n=1", &format!("{}/p{i}", strait.url())]).await;
        assert_eq!(post.status, 200, "{post:?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(conns.load(Ordering::SeqCst), 6);
}
