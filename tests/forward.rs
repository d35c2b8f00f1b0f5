//! Forward proxying as a user runs it: curl with `-x`, absolute-form requests, CONNECT,
//! Basic auth, hidden mode and target policy.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const OPEN: &str = "listen = [{ addr = \"127.0.0.1:0\" }]\n[forward]\ndeny_targets = []\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_goes_upstream_in_origin_form_with_the_targets_host() {
    let origin = Origin::start().await;
    let strait = Strait::start(OPEN, &[]);
    let url = format!("{}/some/path?q=1&r=two", origin.url());
    let out = curl(&["-x", &strait.url(), &url, "-H", "Via: 1.1 client-side"]).await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(out.text(), "origin says hi");
    let seen = origin.last();
    assert_eq!(seen.uri, "/some/path?q=1&r=two");
    assert_eq!(seen.header("host"), Some(origin.addr.to_string().as_str()));
    // Nothing reveals a proxy: no Via of our own, no X-Forwarded-*.
    assert_eq!(seen.header("via"), Some("1.1 client-side"));
    assert!(
        seen.headers
            .keys()
            .all(|k| !k.as_str().starts_with("x-forwarded"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_requests_from_many_clients_share_one_upstream_connection() {
    let origin = Origin::start().await;
    let strait = Strait::start(OPEN, &[]);
    let url = format!("{}/again", origin.url());
    // One after another, each from a new client connection: the upstream connection
    // goes back to the pool each time and is taken again.
    for _ in 0..10 {
        let out = curl(&["-x", &strait.url(), &url]).await;
        assert_eq!(out.status, 200, "{out:?}");
    }
    // A body too: the connection stays reusable once the body was sent whole.
    let out = curl(&["-x", &strait.url(), &url, "--data-binary", "abc"]).await;
    assert_eq!(out.status, 200, "{out:?}");
    let out = curl(&["-x", &strait.url(), &url]).await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(origin.seen().len(), 12);
    assert_eq!(origin.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_method_and_its_body_is_forwarded() {
    let origin = Origin::start().await;
    let strait = Strait::start(OPEN, &[]);
    for method in ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PURGE"] {
        let out = curl(&[
            "-x",
            &strait.url(),
            "-X",
            method,
            "--data-binary",
            "payload-bytes",
            &format!("{}/m", origin.url()),
        ])
        .await;
        assert_eq!(out.status, 200, "{method}: {out:?}");
        let seen = origin.last();
        assert_eq!(seen.method, method);
        assert_eq!(&seen.body[..], b"payload-bytes");
    }
    let out = curl(&["-x", &strait.url(), "-I", &format!("{}/h", origin.url())]).await;
    assert_eq!(out.status, 200);
    assert_eq!(origin.last().method, "HEAD");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_knows_several_users_and_challenges_the_rest() {
    let origin = Origin::start().await;
    let config = format!("{OPEN}users = [\"alice:s3cret\", \"bob:hunter2\"]\n");
    let strait = Strait::start(&config, &[]);
    let target = format!("{}/private", origin.url());

    let out = curl(&["-x", &strait.url(), &target]).await;
    assert_eq!(out.status, 407);
    assert_eq!(
        out.header("proxy-authenticate"),
        Some("Basic realm=\"strait\", charset=\"UTF-8\"")
    );

    let wrong = format!("http://alice:nope@{}", strait.addr());
    assert_eq!(curl(&["-x", &wrong, &target]).await.status, 407);

    for user in ["alice:s3cret", "bob:hunter2"] {
        let proxy = format!("http://{user}@{}", strait.addr());
        let out = curl(&["-x", &proxy, &target]).await;
        assert_eq!(out.status, 200, "{user}");
        // The credentials are for the proxy alone.
        assert_eq!(origin.last().header("proxy-authorization"), None);
    }
    assert_eq!(
        origin.seen().len(),
        2,
        "refused requests never reach the origin"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hidden_proxy_answers_like_a_plain_web_server() {
    let origin = Origin::start().await;
    let config = format!("{OPEN}users = [\"alice:s3cret\"]\nhide = true\n");
    let strait = Strait::start(&config, &[]);
    let target = format!("{}/x", origin.url());

    let out = curl(&["-x", &strait.url(), &target]).await;
    assert_eq!(
        out.status, 404,
        "answered as a web server without that page"
    );
    assert_eq!(out.header("proxy-authenticate"), None);
    let plain = curl(&[&format!("{}/x", strait.url())]).await;
    assert_eq!(plain.status, out.status);
    assert_eq!(
        plain.body, out.body,
        "indistinguishable from a direct request"
    );

    let reply = raw_exchange(
        strait.addr(),
        format!(
            "CONNECT {} HTTP/1.1\r\nHost: {}\r\n\r\n",
            origin.addr, origin.addr
        )
        .as_bytes(),
        Duration::from_secs(2),
    )
    .await;
    assert!(
        !reply.contains("407") && !reply.to_ascii_lowercase().contains("proxy-authenticate"),
        "{reply}"
    );
    assert!(!reply.starts_with("HTTP/1.1 200"), "{reply}");

    let proxy = format!("http://alice:s3cret@{}", strait.addr());
    assert_eq!(curl(&["-x", &proxy, &target]).await.status, 200);
    assert_eq!(origin.seen().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_targets_are_denied_by_default_even_by_name() {
    let origin = Origin::start().await;
    let strait = Strait::start("listen = [{ addr = \"127.0.0.1:0\" }]\n", &[]);
    for host in [
        origin.addr.to_string(),
        format!("localhost:{}", origin.addr.port()),
    ] {
        let out = curl(&["-x", &strait.url(), &format!("http://{host}/")]).await;
        assert_eq!(out.status, 403, "{host}");
        assert!(
            out.text().contains("deny_targets"),
            "the body names the setting: {}",
            out.text()
        );
        let out = curl(&["-p", "-x", &strait.url(), &format!("http://{host}/")]).await;
        assert_eq!(out.exit, 56, "CONNECT refused: {out:?}");
    }
    assert_eq!(origin.connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_targets_takes_cidrs() {
    let origin = Origin::start().await;
    let config = "listen = [{ addr = \"127.0.0.1:0\" }]\n[forward]\ndeny_targets = [\"127.0.0.2/32\", \"10.0.0.0/8\"]\n";
    let strait = Strait::start(config, &[]);
    let out = curl(&["-x", &strait.url(), &format!("{}/", origin.url())]).await;
    assert_eq!(out.status, 200, "127.0.0.1 is not in the list");
    let out = curl(&[
        "-x",
        &strait.url(),
        &format!("http://127.0.0.2:{}/", origin.addr.port()),
    ])
    .await;
    assert_eq!(out.status, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_opens_a_tunnel_with_bytes_both_ways() {
    let origin = Origin::start().await;
    let strait = Strait::start(OPEN, &[]);
    // curl tunnels plain HTTP through CONNECT with -p.
    let out = curl(&[
        "-p",
        "-x",
        &strait.url(),
        &format!("{}/through", origin.url()),
    ])
    .await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(origin.last().uri, "/through");

    // Raw: CONNECT to an echo server, then bytes both ways, then close from our side.
    let echo = echo_server().await;
    let s = open_tunnel(&strait, &echo.to_string()).await;
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = s.into_split();
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut got))
        .await
        .expect("the tunnel closes after our half-close is echoed")
        .unwrap();
    writer.await.unwrap();
    assert_eq!(got, payload);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_ports_limits_tunnels() {
    let echo = echo_server().await;
    let config = format!("{OPEN}connect_ports = [443]\n");
    let strait = Strait::start(&config, &[]);
    let reply = raw_exchange(
        strait.addr(),
        format!("CONNECT {echo} HTTP/1.1\r\nHost: {echo}\r\n\r\n").as_bytes(),
        Duration::from_secs(2),
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");
}

/// A client connection to `strait` with a tunnel open to `target` (its 200 read).
async fn open_tunnel(strait: &Strait, target: &str) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(strait.addr()).await.unwrap();
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = vec![0u8; 1024];
    let n = s.read(&mut head).await.unwrap();
    let head = String::from_utf8_lossy(&head[..n]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tunnel_is_closed_after_timeouts_idle() {
    let echo = echo_server().await;
    let config = format!("{OPEN}[timeouts]\nidle = \"1s\"\n");
    let strait = Strait::start(&config, &[]);
    let mut s = open_tunnel(&strait, &echo.to_string()).await;
    let mut buf = vec![0u8; 1024];
    // Active for longer than the idle timeout: stays open.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        s.write_all(b"ping").await.unwrap();
        let n = s.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"ping");
    }
    // Silent: closed within the idle timeout plus slack.
    let started = std::time::Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("closed by the idle timeout")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "{:?}",
        started.elapsed()
    );
}

/// A client that stops reading while the origin keeps sending: no byte moves either way
/// once the buffers on the way are full, so the tunnel ends after `timeouts.idle` (the
/// client connection's own idle timer sees the tunnel's writes wait; the upstream end's
/// timer, only polled by reads, would not).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_whose_client_stopped_reading_is_closed_after_timeouts_idle() {
    let flood = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = flood.local_addr().unwrap();
    let (ended, mut ended_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = flood.accept().await.unwrap();
        let chunk = vec![b'x'; 64 * 1024];
        while s.write_all(&chunk).await.is_ok() {}
        let _ = ended.send(std::time::Instant::now());
    });
    let config = format!("{OPEN}[timeouts]\nidle = \"1s\"\n");
    let strait = Strait::start(&config, &[]);
    let s = open_tunnel(&strait, &target.to_string()).await;
    // From here on the client reads nothing; the origin's writes stall.
    let started = std::time::Instant::now();
    let ended_at = tokio::time::timeout(Duration::from_secs(8), &mut ended_rx)
        .await
        .expect("the stalled tunnel is closed by the idle timeout")
        .unwrap();
    assert!(
        ended_at.duration_since(started) >= Duration::from_millis(800),
        "{:?}",
        ended_at.duration_since(started)
    );
    drop(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_never_cross_the_forward_proxy() {
    let origin = Origin::with(|_| async {
        let mut r = ok("fine");
        let h = r.headers_mut();
        h.insert("connection", "x-resp-private".parse().unwrap());
        h.insert("x-resp-private", "secret".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-resp-public", "yes".parse().unwrap());
        r
    })
    .await;
    let strait = Strait::start(OPEN, &[]);
    let out = curl(&[
        "-x",
        &strait.url(),
        "-H",
        "Connection: keep-alive, X-Req-Private",
        "-H",
        "X-Req-Private: secret",
        "-H",
        "Keep-Alive: timeout=9",
        "-H",
        "Proxy-Connection: keep-alive",
        "-H",
        "TE: trailers",
        "-H",
        "Upgrade: h2c",
        "-H",
        "X-Req-Public: yes",
        &format!("{}/", origin.url()),
    ])
    .await;
    assert_eq!(out.status, 200);
    let seen = origin.last();
    for name in [
        "x-req-private",
        "keep-alive",
        "proxy-connection",
        "te",
        "upgrade",
        "connection",
    ] {
        assert_eq!(seen.header(name), None, "{name} reached the origin");
    }
    assert_eq!(seen.header("x-req-public"), Some("yes"));
    assert_eq!(out.header("x-resp-private"), None);
    assert_eq!(out.header("keep-alive"), None);
    assert_eq!(out.header("x-resp-public"), Some("yes"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_works_over_an_h2_client_connection() {
    let echo = echo_server().await;
    let strait = Strait::start(OPEN, &[]);
    let mut sender = h2_client(strait.addr()).await;
    let req = http::Request::connect(echo.to_string())
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let upgraded = hyper::upgrade::on(resp).await.unwrap();
    let mut io = hyper_util::rt::TokioIo::new(upgraded);
    io.write_all(b"over h2").await.unwrap();
    let mut buf = [0u8; 7];
    io.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"over h2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_connection_close_closes_the_client_connection() {
    let origin = Origin::start().await;
    let strait = Strait::start(OPEN, &[]);
    let req = format!(
        "GET {}/pc HTTP/1.1\r\nHost: {}\r\nProxy-Connection: close\r\n\r\n",
        origin.url(),
        origin.addr
    );
    // read_to_end returns only because Strait closes the connection after the answer.
    let reply = raw_exchange(strait.addr(), req.as_bytes(), Duration::from_secs(5)).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(
        reply.to_ascii_lowercase().contains("connection: close"),
        "{reply}"
    );
    assert_eq!(origin.last().header("proxy-connection"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_connect_tunnels_over_h2() {
    let echo = echo_server().await;
    let strait = Strait::start(OPEN, &[]);
    let mut sender = h2_client(strait.addr()).await;
    // RFC 8441: CONNECT with :protocol, :scheme and :path; the authority is the target.
    let mut req = http::Request::connect(format!("http://{echo}/"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut io = hyper_util::rt::TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
    io.write_all(b"extended").await.unwrap();
    let mut buf = [0u8; 8];
    io.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"extended");
}
