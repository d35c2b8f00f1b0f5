//! HTTP/1.1 upgrades (WebSocket's handshake): the ask reaches the upstream, a 101
//! switches both connections and bytes flow both ways; a declined ask is an ordinary
//! response; a 101 nobody asked for is 502; an idle switched connection is closed.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::*;

const HANDSHAKE: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

/// Every request head an origin read, lower-cased.
type Heads = Arc<Mutex<Vec<String>>>;

/// An origin that switches to an echo on `Upgrade: websocket` (sending `early` bytes
/// right after its 101, in the same write), and answers anything else with 426.
async fn upgrade_origin() -> (SocketAddr, Heads) {
    let heads = Heads::default();
    let seen = heads.clone();
    let (addr, _) = counting_origin(move |s| serve_upgrade(s, heads.clone())).await;
    (addr, seen)
}

/// The same over TLS, offering h2 and http/1.1 in ALPN: a connection that chose h2 is
/// closed unanswered.
async fn tls_upgrade_origin(certs: &Certs) -> (SocketAddr, Heads) {
    let acceptor =
        tokio_rustls::TlsAcceptor::from(Arc::new(certs.server_config(&[b"h2", b"http/1.1"])));
    let heads = Heads::default();
    let seen = heads.clone();
    let (addr, _) = counting_origin(move |s| {
        let (acceptor, heads) = (acceptor.clone(), heads.clone());
        async move {
            let Ok(tls) = acceptor.accept(s).await else {
                return;
            };
            if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                heads.lock().unwrap().push("(h2)".into());
                return;
            }
            serve_upgrade(tls, heads).await;
        }
    })
    .await;
    (addr, seen)
}

async fn serve_upgrade<S>(mut s: S, heads: Heads)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    heads.lock().unwrap().push(head.clone());
    if !head.contains("upgrade: websocket") {
        let _ = s
            .write_all(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 3\r\nConnection: close\r\n\r\nno\n")
            .await;
        return;
    }
    let _ = s
        .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\nearly")
        .await;
    let (mut r, mut w) = tokio::io::split(s);
    let _ = tokio::io::copy(&mut r, &mut w).await;
    let _ = w.shutdown().await;
}

/// Sends the WebSocket handshake for `/chat` and reads through the origin's `early`
/// bytes; returns the connection and what was read.
async fn switch_to_websocket(addr: SocketAddr) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!("GET /chat HTTP/1.1\r\nHost: x\r\n{HANDSHAKE}");
    s.write_all(req.as_bytes()).await.unwrap();
    let got = read_until(&mut s, |t| t.contains("early")).await;
    (s, got)
}

/// A plain GET on a new connection gets 502.
async fn assert_502(addr: SocketAddr) {
    let got = raw_exchange(
        addr,
        b"GET /plain HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 502 "), "{got}");
}

/// Through a reverse route and through the forward proxy (absolute form): the ask
/// reaches the upstream, the client sees the 101 with the upstream's fields and the
/// bytes that came with it, both ways carry bytes, and half-closes pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_handshake_switches_and_bytes_flow_both_ways() {
    let (origin, heads) = upgrade_origin().await;
    let reverse = Strait::start(&route_to(&format!("http://{origin}"), ""), &[]);
    let forward = Strait::start(
        "listen = [{ addr = \"127.0.0.1:0\" }]\n[forward]\ndeny_targets = []\n",
        &[],
    );
    for (strait, target) in [
        (&reverse, "/chat".to_owned()),
        (&forward, format!("http://{origin}/chat")),
    ] {
        let mut s = TcpStream::connect(strait.addr()).await.unwrap();
        let req = format!("GET {target} HTTP/1.1\r\nHost: {origin}\r\n{HANDSHAKE}");
        s.write_all(req.as_bytes()).await.unwrap();
        let got = read_until(&mut s, |t| t.contains("early")).await;
        let lower = got.to_ascii_lowercase();
        assert!(got.starts_with("HTTP/1.1 101 "), "{target}: {got}");
        assert!(lower.contains("upgrade: websocket\r\n"), "{got}");
        assert!(lower.contains("connection: upgrade\r\n"), "{got}");
        assert!(
            lower.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=\r\n"),
            "{got}"
        );
        assert!(got.ends_with("\r\n\r\nearly"), "{got}");
        let head = heads.lock().unwrap().last().unwrap().clone();
        assert!(head.contains("\r\nupgrade: websocket\r\n"), "{head}");
        assert!(head.contains("\r\nconnection: upgrade\r\n"), "{head}");
        assert!(head.contains("\r\nsec-websocket-key: "), "{head}");

        for msg in ["one", "two"] {
            s.write_all(msg.as_bytes()).await.unwrap();
            read_until(&mut s, |t| t.contains(msg)).await;
        }
        // The client's half-close reaches the origin, whose own close comes back.
        s.shutdown().await.unwrap();
        let rest = read_to_close(&mut s).await;
        assert!(rest.is_empty(), "{rest:?}");
    }
}

/// An upstream that declines the ask answers as usual, and the client connection stays
/// HTTP: its next request is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_upgrade_is_an_ordinary_response() {
    let (origin, heads) = upgrade_origin().await;
    let strait = Strait::start(&route_to(&format!("http://{origin}"), ""), &[]);
    let mut s = TcpStream::connect(strait.addr()).await.unwrap();
    s.write_all(
        b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: tls/1.3\r\nConnection: Upgrade\r\n\r\n",
    )
    .await
    .unwrap();
    let got = read_until(&mut s, |t| t.contains("no\n")).await;
    assert!(got.starts_with("HTTP/1.1 426 "), "{got}");
    let head = heads.lock().unwrap().last().unwrap().clone();
    assert!(head.contains("\r\nupgrade: tls/1.3\r\n"), "{head}");
    s.write_all(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let got = read_until(&mut s, |t| t.contains("no\n")).await;
    assert!(got.starts_with("HTTP/1.1 426 "), "{got}");
}

/// An upgrade to cleartext HTTP/2 would give the client a connection straight to the
/// upstream, past routing ("h2c smuggling"): the request goes on without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_upgrade_is_not_passed_on() {
    let (origin, heads) = upgrade_origin().await;
    let strait = Strait::start(&route_to(&format!("http://{origin}"), ""), &[]);
    let mut s = TcpStream::connect(strait.addr()).await.unwrap();
    s.write_all(b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n")
        .await
        .unwrap();
    let got = read_until(&mut s, |t| t.contains("no\n")).await;
    assert!(got.starts_with("HTTP/1.1 426 "), "{got}");
    let head = heads.lock().unwrap().last().unwrap().clone();
    assert!(!head.contains("upgrade"), "{head}");
    assert!(!head.contains("http2-settings"), "{head}");
}

/// A 101 to a request that asked for no upgrade breaks the exchange: 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_101_nobody_asked_for_is_502() {
    let upstream = raw_origin(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    )
    .await;
    let strait = Strait::start(&route_to(&format!("http://{upstream}"), ""), &[]);
    assert_502(strait.addr()).await;
}

/// A switched connection on which no byte moves is closed after `timeouts.idle`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_upgraded_connection_is_closed_after_timeouts_idle() {
    let (origin, _) = upgrade_origin().await;
    let strait = Strait::start(
        &route_to(&format!("http://{origin}"), "[timeouts]\nidle = \"1s\""),
        &[],
    );
    let (mut s, _) = switch_to_websocket(strait.addr()).await;
    let started = std::time::Instant::now();
    read_to_close(&mut s).await;
    assert!(started.elapsed() >= Duration::from_millis(900));
}

/// Asks the listener at `addr`, over a new h2c connection, for an RFC 8441 WebSocket
/// to `/chat`; returns the response.
async fn open_h2_websocket(addr: SocketAddr) -> http::Response<hyper::body::Incoming> {
    let mut req = http::Request::connect(format!("http://{addr}/chat"))
        .header("sec-websocket-version", "13")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    h2_client(addr).await.send_request(req).await.unwrap()
}

/// An HTTP/2 WebSocket (RFC 8441 extended CONNECT) on a reverse route reaches the
/// upstream as the HTTP/1.1 handshake; its 101 comes back as a 200 on the stream, and
/// the stream carries bytes both ways. An upstream that answers the handshake with a
/// plain 200 has not switched: 502, never an open stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_websocket_on_a_reverse_route_is_the_h1_handshake_upstream() {
    let (origin, heads) = upgrade_origin().await;
    let strait = Strait::start(&route_to(&format!("http://{origin}"), ""), &[]);
    let resp = open_h2_websocket(strait.addr()).await;
    assert_eq!(resp.status(), 200);
    assert!(!resp.headers().contains_key("sec-websocket-accept"));
    let head = heads.lock().unwrap().last().unwrap().clone();
    assert!(head.starts_with("get /chat http/1.1\r\n"), "{head}");
    assert!(head.contains("\r\nupgrade: websocket\r\n"), "{head}");
    assert!(head.contains("\r\nconnection: upgrade\r\n"), "{head}");
    assert!(head.contains("\r\nsec-websocket-version: 13\r\n"), "{head}");
    let key = head
        .split("\r\n")
        .find_map(|l| l.strip_prefix("sec-websocket-key: "))
        .expect("a key");
    assert_eq!(key.len(), 24, "16 bytes in base64: {key}");

    let mut io = hyper_util::rt::TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
    let mut buf = [0u8; 5];
    io.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"early");
    io.write_all(b"hello").await.unwrap();
    io.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello");

    let plain = raw_origin(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
    let strait = Strait::start(&route_to(&format!("http://{plain}"), ""), &[]);
    assert_eq!(open_h2_websocket(strait.addr()).await.status(), 502);
}

/// The bytes a switched connection moves count toward the request's kind and user in
/// `strait_transfer_bytes_total`, and its access log line is written when it ends, with
/// the whole exchange's bytes, the handshake's included (as a tunnel's is).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switched_connections_bytes_are_counted_and_logged_at_its_end() {
    let (origin, _) = upgrade_origin().await;
    let logs = tempfile::tempdir().unwrap();
    let access = logs.path().join("access.log");
    let strait = Strait::start(
        &route_to(
            &format!("http://{origin}"),
            &format!(
                "[admin]\naddr = \"127.0.0.1:0\"\n[log]\naccess = \"{}\"",
                access.display()
            ),
        ),
        &[],
    );
    let series = |dir: &str| {
        format!("strait_transfer_bytes_total{{kind=\"reverse\",user=\"-\",direction=\"{dir}\"}}")
    };
    let (s, answer) = switch_to_websocket(strait.addr()).await;
    let asked = format!("GET /chat HTTP/1.1\r\nHost: x\r\n{HANDSHAKE}").len();
    let payload = vec![b'w'; 256 * 1024];
    let (mut r, mut w) = s.into_split();
    let reading = tokio::spawn(async move {
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        got.len()
    });
    w.write_all(&payload).await.unwrap();
    // While the connection is open, its line is not written yet.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = std::fs::read_to_string(&access).unwrap_or_default();
    assert!(!before.contains("/chat"), "logged before the end: {before}");
    assert_eq!(strait.metric("strait_upgraded_active").await, 1.0);
    w.shutdown().await.unwrap();
    assert_eq!(reading.await.unwrap(), payload.len());

    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let rx = strait.metric(&series("rx")).await;
        let tx = strait.metric(&series("tx")).await;
        let log = std::fs::read_to_string(&access).unwrap_or_default();
        let line = log.lines().find(|l| l.contains("\"/chat\""));
        // Every byte once, the handshake's among them: the request's head in, the 101
        // and the origin's `early` bytes out, and the echoed payload both ways.
        let (want_rx, want_tx) = (asked + payload.len(), answer.len() + payload.len());
        if rx >= want_rx as f64
            && tx >= want_tx as f64
            && let Some(line) = line
        {
            assert_eq!((rx, tx), (want_rx as f64, want_tx as f64));
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["status"], 101, "{line}");
            assert_eq!(v["bytes_in"], want_rx, "{line}");
            assert_eq!(v["bytes_out"], want_tx, "{line}");
            assert!(v["duration_ms"].as_f64().unwrap() >= 200.0, "{line}");
            assert_eq!(strait.metric("strait_upgraded_active").await, 0.0);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rx {rx}, tx {tx}, log {log:?}: the switched connection was not accounted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An https upstream whose ALPN offers h2 gets WebSockets over HTTP/1.1 (HTTP/2 has
/// no upgrade), on a connection of their own, while plain requests to it use h2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_to_an_h2_capable_https_upstream_goes_over_http1() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new(dir.path(), &["localhost", "127.0.0.1"]);
    let (origin, heads) = tls_upgrade_origin(&certs).await;
    let config = format!(
        "listen = [{{ addr = \"127.0.0.1:0\" }}]\n[[route]]\nupstream = \"https://localhost:{}\"\ntls_ca = \"{}\"\n",
        origin.port(),
        certs.ca_pem.display()
    );
    let strait = Strait::start(&config, &[]);
    let (mut s, got) = switch_to_websocket(strait.addr()).await;
    assert!(got.starts_with("HTTP/1.1 101 "), "{got}");
    s.write_all(b"over tls").await.unwrap();
    read_until(&mut s, |t| t.contains("over tls")).await;
    // A plain request to the same upstream negotiates h2 (which this origin refuses).
    assert_502(strait.addr()).await;
    let heads = heads.lock().unwrap().clone();
    assert!(heads[0].starts_with("get /chat "), "{heads:?}");
    assert!(heads.iter().any(|h| h == "(h2)"), "{heads:?}");
}
