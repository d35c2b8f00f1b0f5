//! The upstream pool against origins that misbehave on cue: zero failed GETs, and the
//! proxy's file descriptors back to baseline afterwards.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Reads one request head (and a Content-Length body); false at EOF or timeout.
async fn read_request(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1024];
    loop {
        match tokio::time::timeout(within, s.read(&mut byte)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&byte[..n]),
            _ => return false,
        }
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            let mut have = buf.len() - end - 4;
            while have < len {
                match s.read(&mut byte).await {
                    Ok(n) if n > 0 => have += n,
                    _ => return false,
                }
            }
            return true;
        }
    }
}

#[derive(Clone, Copy)]
enum Close {
    Fin,
    Rst,
}

/// Answers one request per connection as if keeping it alive, then closes it.
async fn closing_origin(how: Close) -> (SocketAddr, Arc<AtomicUsize>) {
    counting_origin(move |mut s| async move {
        if read_request(&mut s, Duration::from_secs(10)).await {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await;
        }
        match how {
            Close::Fin => {
                let _ = s.shutdown().await;
            }
            Close::Rst => {
                // Give the response a moment to leave (a reset discards what is still
                // unsent), then reset the kept-alive connection.
                tokio::time::sleep(Duration::from_millis(5)).await;
                // SO_LINGER 0: close() sends RST instead of FIN.
                let std = s.into_std().unwrap();
                let _ = socket2::SockRef::from(&std).set_linger(Some(Duration::ZERO));
            }
        }
    })
    .await
}

/// One keep-alive client connection to strait, sending `n` GETs in a row.
async fn gets_on_one_connection(strait: SocketAddr, n: usize) -> usize {
    let stream = TcpStream::connect(strait).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut ok = 0;
    for i in 0..n {
        sender.ready().await.unwrap();
        let req = http::Request::get(format!("/r{i}"))
            .header("host", "strait")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let status = resp.status();
        resp.into_body().collect().await.unwrap();
        if status == 200 {
            ok += 1;
        }
    }
    ok
}

async fn no_failed_gets_when_the_origin_closes_after_each_response(how: Close) {
    let (origin, conns) = closing_origin(how).await;
    let strait = Strait::start(
        &route_to(&format!("http://{origin}"), "[pool]\nidle_timeout = \"1s\""),
        &[],
    );
    let baseline = strait.fd_count();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let addr = strait.addr();
        tasks.push(tokio::spawn(async move {
            gets_on_one_connection(addr, 50).await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += t.await.unwrap();
    }
    let warnings: Vec<String> = strait
        .logs()
        .into_iter()
        .filter(|l| l.contains("WARN"))
        .collect();
    assert_eq!(ok, 200, "every GET answered 200: {warnings:#?}");
    assert!(conns.load(Ordering::SeqCst) >= 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        strait.fd_count(),
        baseline,
        "file descriptors back to baseline"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_that_closes_each_kept_alive_connection_with_fin_loses_no_get() {
    no_failed_gets_when_the_origin_closes_after_each_response(Close::Fin).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_that_resets_each_kept_alive_connection_loses_no_get() {
    no_failed_gets_when_the_origin_closes_after_each_response(Close::Rst).await;
}

/// Advertises `Keep-Alive: timeout=2` and closes connections idle for 2 s.
async fn hinting_origin() -> (SocketAddr, Arc<AtomicUsize>) {
    counting_origin(|mut s| async move {
        while read_request(&mut s, Duration::from_secs(2)).await {
            let reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nKeep-Alive: timeout=2\r\n\r\nok";
            if s.write_all(reply).await.is_err() {
                break;
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_timeout_hint_retires_connections_before_the_origin_closes_them() {
    let (origin, conns) = hinting_origin().await;
    let strait = Strait::start(&route_to(&format!("http://{origin}"), ""), &[]);
    let url = format!("{}/post", strait.url());
    // POSTs are never retried once written, so a request sent into a connection the
    // origin is closing would fail: near the 2 s age, every one must still succeed.
    for pause_ms in [0, 1900, 1950, 2000, 2050, 300] {
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        let out = curl(&["-X", "POST", "--data-binary", "x", &url]).await;
        assert_eq!(out.status, 200, "after {pause_ms} ms idle: {out:?}");
    }
    // Each long pause retired the connection; the short ones reused it.
    assert_eq!(conns.load(Ordering::SeqCst), 5);
}

/// Answers 413 as soon as a request head arrives, without reading the body; then
/// drains for a moment (as servers do, so the answer is not lost to a reset) and closes.
async fn refusing_origin() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 9\r\nConnection: close\r\n\r\ntoo large")
                    .await;
                let _ = s.shutdown().await;
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                    }
                })
                .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_413_reaches_the_client_and_the_connection_is_not_reused() {
    let origin = refusing_origin().await;
    let strait = Strait::start(&route_to(&format!("http://{origin}"), ""), &[]);
    let dir = tempfile::tempdir().unwrap();
    let upload = dir.path().join("big");
    std::fs::write(&upload, vec![b'u'; 20 * 1024 * 1024]).unwrap();
    let url = format!("{}/upload", strait.url());
    let out = curl(&["-T", upload.to_str().unwrap(), &url]).await;
    assert_eq!(out.status, 413, "{out:?}");
    for _ in 0..3 {
        let out = curl(&["-H", "Expect:", "--data-binary", "small", &url]).await;
        assert_eq!(out.status, 413);
    }
}

/// An h2c origin (the h2 crate) that allows 8 concurrent streams per connection and,
/// as nginx's `keepalive_requests 10` does, asks each connection to go after its 10th
/// request (GOAWAY): streams the final GOAWAY leaves out are not processed, those it
/// names finish.
async fn h2_origin() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::Builder::new()
                    .max_concurrent_streams(8)
                    .handshake::<_, bytes::Bytes>(socket)
                    .await
                else {
                    return;
                };
                let mut served = 0;
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    served += 1;
                    if served == 10 {
                        conn.graceful_shutdown();
                    }
                    tokio::spawn(async move {
                        // A moment's work, so streams overlap up to the limit.
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        let Ok(mut body) = respond.send_response(http::Response::new(()), false)
                        else {
                            return;
                        };
                        let _ = body.send_data(bytes::Bytes::from_static(b"from h2"), true);
                    });
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_origin_with_8_streams_and_goaway_every_10_requests_loses_no_get() {
    let origin = h2_origin().await;
    let config = format!(
        "listen = [{{ addr = \"127.0.0.1:0\" }}]\n[pool]\nidle_timeout = \"1s\"\n[[route]]\nupstream = \"http://{origin}\"\nversion = \"h2\"\n",
    );
    let strait = Strait::start(&config, &[]);
    let baseline = strait.fd_count();
    // 32 client connections at once, 20 GETs each: 640 requests over streams that
    // the origin caps at 8 per connection and ends with GOAWAY every 10.
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let addr = strait.addr();
        tasks.push(tokio::spawn(async move {
            gets_on_one_connection(addr, 20).await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += t.await.unwrap();
    }
    assert_eq!(ok, 640, "every GET answered 200");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        strait.fd_count(),
        baseline,
        "file descriptors back to baseline"
    );
}
