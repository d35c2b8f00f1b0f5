//! Reverse proxying: routes, the proxy_pass rule, forwarding headers, HTTP versions on
//! both sides, https upstreams and load balancing.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use support::*;

fn listen() -> &'static str {
    "listen = [{ addr = \"127.0.0.1:0\" }]\n"
}

async fn tagged(tag: &'static str) -> Origin {
    Origin::with(move |_| async move { ok(tag) }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_pick_by_host_then_longest_prefix() {
    let (root, api, v2, app, wild) = (
        tagged("root").await,
        tagged("api").await,
        tagged("v2").await,
        tagged("app").await,
        tagged("wild").await,
    );
    let config = format!(
        "{}
[[route]]
upstream = \"{}\"
[[route]]
path = \"/api/\"
upstream = \"{}\"
[[route]]
path = \"/api/v2/\"
upstream = \"{}\"
[[route]]
host = \"app.test\"
upstream = \"{}\"
[[route]]
host = \"*.wild.test\"
path = \"/\"
upstream = [\"{}\"]
",
        listen(),
        root.url(),
        api.url(),
        v2.url(),
        app.url(),
        wild.url()
    );
    let strait = Strait::start(&config, &[]);
    let get = |host: &'static str, path: &'static str| {
        let url = format!("{}{path}", strait.url());
        async move { curl(&["-H", &format!("Host: {host}"), &url]).await.text() }
    };
    assert_eq!(get("x.test", "/").await, "root");
    assert_eq!(get("x.test", "/api/users").await, "api");
    assert_eq!(get("x.test", "/api/v2/users").await, "v2");
    assert_eq!(
        get("app.test", "/api/v2/users").await,
        "app",
        "a host route beats any-host"
    );
    assert_eq!(get("APP.test:8080", "/").await, "app");
    assert_eq!(get("a.wild.test", "/api/").await, "wild");
    assert_eq!(
        get("wild.test", "/api/").await,
        "api",
        "*.wild.test needs a subdomain"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_is_404() {
    let origin = Origin::start().await;
    let config = format!(
        "{}[[route]]\npath = \"/api/\"\nupstream = \"{}\"\n",
        listen(),
        origin.url()
    );
    let strait = Strait::start(&config, &[]);
    let out = curl(&[&format!("{}/other", strait.url())]).await;
    assert_eq!(out.status, 404);
    assert_eq!(origin.connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_path_replaces_the_matched_prefix_like_nginx_proxy_pass() {
    let origin = Origin::start().await;
    let config = format!(
        "{l}[[route]]\npath = \"/api/\"\nupstream = \"{u}/v1/\"\n[[route]]\npath = \"/keep/\"\nupstream = \"{u}\"\n[[route]]\npath = \"/root/\"\nupstream = \"{u}/\"\n",
        l = listen(),
        u = origin.url()
    );
    let strait = Strait::start(&config, &[]);
    curl(&[&format!("{}/api/users/7?x=1", strait.url())]).await;
    assert_eq!(origin.last().uri, "/v1/users/7?x=1");
    curl(&[&format!("{}/keep/users?y=2", strait.url())]).await;
    assert_eq!(origin.last().uri, "/keep/users?y=2");
    curl(&[&format!("{}/root/a", strait.url())]).await;
    assert_eq!(origin.last().uri, "/a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_and_host_follow_the_rules() {
    let origin = Origin::start().await;
    let config = format!(
        "{l}[[route]]\npath = \"/a/\"\nupstream = \"{u}\"\n[[route]]\npath = \"/p/\"\nupstream = \"{u}\"\npreserve_host = true\n",
        l = listen(),
        u = origin.url()
    );
    let strait = Strait::start(&config, &[]);
    let out = curl(&[
        "-H",
        "Host: shop.example:8443",
        "-H",
        "X-Forwarded-For: 203.0.113.9",
        "-H",
        "Proxy-Authorization: Basic eDp5",
        &format!("{}/a/x", strait.url()),
    ])
    .await;
    assert_eq!(out.status, 200);
    let seen = origin.last();
    assert_eq!(seen.header("host"), Some(origin.addr.to_string().as_str()));
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("203.0.113.9, 127.0.0.1")
    );
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen.header("x-forwarded-host"), Some("shop.example:8443"));
    assert_eq!(seen.header("proxy-authorization"), None);

    curl(&["-H", "Host: shop.example", &format!("{}/p/x", strait.url())]).await;
    assert_eq!(origin.last().header("host"), Some("shop.example"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_routes_from_the_command_line() {
    let (api, app) = (tagged("api").await, tagged("app").await);
    let r1 = format!("/api=>{}", api.url());
    let r2 = format!("app.test/=>{}", app.url());
    let strait = Strait::start_args(&["-l", "127.0.0.1:0", "--route", &r1, "--route", &r2]);
    assert_eq!(
        curl(&[&format!("{}/api/x", strait.url())]).await.text(),
        "api"
    );
    let out = curl(&["-H", "Host: app.test", &format!("{}/api/x", strait.url())]).await;
    assert_eq!(out.text(), "app");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_picks_the_upstream_protocol() {
    let origin = Origin::start().await;
    let config = format!(
        "{l}[[route]]\npath = \"/h2/\"\nupstream = \"{u}\"\nversion = \"h2\"\n[[route]]\npath = \"/auto/\"\nupstream = \"{u}\"\n[[route]]\npath = \"/h1/\"\nupstream = \"{u}\"\nversion = \"h1\"\n",
        l = listen(),
        u = origin.url()
    );
    let strait = Strait::start(&config, &[]);
    assert_eq!(curl(&[&format!("{}/h2/x", strait.url())]).await.status, 200);
    assert_eq!(origin.last().version, http::Version::HTTP_2);
    curl(&[&format!("{}/auto/x", strait.url())]).await;
    assert_eq!(origin.last().version, http::Version::HTTP_11);
    curl(&["--http2-prior-knowledge", &format!("{}/h1/x", strait.url())]).await;
    assert_eq!(origin.last().version, http::Version::HTTP_11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_clients_are_served_on_any_listener() {
    let origin = Origin::start().await;
    let config = format!("{}[[route]]\nupstream = \"{}\"\n", listen(), origin.url());
    let strait = Strait::start(&config, &[]);
    let out = curl(&[
        "--http2-prior-knowledge",
        "-v",
        &format!("{}/two", strait.url()),
    ])
    .await;
    assert_eq!(out.status, 200, "{out:?}");
    assert!(out.stderr.contains("HTTP/2 200"), "{}", out.stderr);
    let seen = origin.last();
    assert_eq!(seen.uri, "/two");
    assert_eq!(seen.header("host"), Some(origin.addr.to_string().as_str()));
    assert_eq!(
        seen.header("x-forwarded-host"),
        Some(strait.addr().to_string().as_str())
    );
}

/// The seed's question: an HTTP/2 request body of unknown length reaches an HTTP/1.1
/// upstream as chunked, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_body_without_length_reaches_an_h1_upstream_chunked_and_exact() {
    let origin = Origin::start().await;
    let config = format!(
        "{}[[route]]\nupstream = \"{}\"\nversion = \"h1\"\n",
        listen(),
        origin.url()
    );
    let strait = Strait::start(&config, &[]);

    let mut sender = h2_client(strait.addr()).await;
    // Frames of odd sizes, including every byte value, with no length announced.
    let chunks: Vec<Bytes> = (0..40u32)
        .map(|i| {
            Bytes::from(
                (0..(i * 977 % 5000 + 1))
                    .map(|b| (b * 7 + i) as u8)
                    .collect::<Vec<u8>>(),
            )
        })
        .collect();
    let expected: Vec<u8> = chunks.iter().flat_map(|c| c.to_vec()).collect();
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let body = ChannelBody(rx);
    let req = http::Request::post(format!("http://{}/upload", strait.addr()))
        .body(body)
        .unwrap();
    let send = tokio::spawn(async move { sender.send_request(req).await });
    for c in chunks {
        tx.send(c).await.unwrap();
    }
    drop(tx);
    let resp = send.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();

    let seen = origin.last();
    assert_eq!(seen.version, http::Version::HTTP_11);
    assert_eq!(seen.header("transfer-encoding"), Some("chunked"));
    assert_eq!(seen.header("content-length"), None);
    assert_eq!(seen.body.len(), expected.len());
    assert!(seen.body[..] == expected[..], "body bytes differ");
}

/// A request body fed through a channel: frames of unknown total length.
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|c| c.map(|c| Ok(http_body::Frame::data(c))))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstreams_are_verified_against_tls_ca() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new(dir.path(), &["backend.test", "127.0.0.1"]);
    let origin = Origin::tls(certs.server_config(&[b"h2", b"http/1.1"]), |_| async {
        ok("secure")
    })
    .await;
    let port = origin.addr.port();
    let ca = certs.ca_pem.display();
    let config = format!(
        "{l}
[[route]]
path = \"/good/\"
upstream = \"https://127.0.0.1:{port}\"
tls_ca = \"{ca}\"
[[route]]
path = \"/named/\"
upstream = \"https://localhost:{port}\"
tls_ca = \"{ca}\"
tls_server_name = \"backend.test\"
version = \"h1\"
[[route]]
path = \"/untrusted/\"
upstream = \"https://127.0.0.1:{port}\"
[[route]]
path = \"/wrongname/\"
upstream = \"https://127.0.0.1:{port}\"
tls_ca = \"{ca}\"
tls_server_name = \"other.test\"
[[route]]
path = \"/insecure/\"
upstream = \"https://127.0.0.1:{port}\"
tls_insecure = true
",
        l = listen()
    );
    let strait = Strait::start(&config, &[]);
    let out = curl(&[&format!("{}/good/x", strait.url())]).await;
    assert_eq!((out.status, out.text().as_str()), (200, "secure"));
    assert_eq!(
        origin.last().version,
        http::Version::HTTP_2,
        "ALPN picked h2 for auto"
    );

    let out = curl(&[&format!("{}/named/x", strait.url())]).await;
    assert_eq!(out.status, 200);
    assert_eq!(origin.last().version, http::Version::HTTP_11);

    assert_eq!(
        curl(&[&format!("{}/untrusted/x", strait.url())])
            .await
            .status,
        502
    );
    assert_eq!(
        curl(&[&format!("{}/wrongname/x", strait.url())])
            .await
            .status,
        502
    );
    assert_eq!(
        curl(&[&format!("{}/insecure/x", strait.url())])
            .await
            .status,
        200
    );
    assert!(
        strait.logs().iter().any(|l| l.contains("tls_insecure")),
        "insecure is warned about"
    );
    assert_eq!(origin.seen().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_spread_over_upstreams_and_skip_a_dead_one() {
    let (a, b) = (tagged("a").await, tagged("b").await);
    let dead = closed_port();
    let config = format!(
        "{}[[route]]\nupstream = [\"{}\", \"{}\", \"http://{dead}\"]\n",
        listen(),
        a.url(),
        b.url()
    );
    let strait = Strait::start(&config, &[]);
    let mut answers = Vec::new();
    for _ in 0..12 {
        let out = curl(&[&format!("{}/", strait.url())]).await;
        assert_eq!(
            out.status, 200,
            "a dead upstream never fails a GET: {out:?}"
        );
        answers.push(out.text());
    }
    let count = |t: &str| answers.iter().filter(|a| *a == t).count();
    assert!(count("a") >= 4 && count("b") >= 4, "{answers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_shared_by_all_clients() {
    let origin = Origin::start().await;
    let config = format!("{}[[route]]\nupstream = \"{}\"\n", listen(), origin.url());
    let strait = Strait::start(&config, &[]);
    // Eleven separate client connections (one curl each), forty requests in all.
    let mut sent = 0;
    for client in 0..11 {
        let n = if client < 7 { 4 } else { 3 };
        let urls: Vec<String> = (0..n)
            .map(|i| format!("{}/c{client}/{i}", strait.url()))
            .collect();
        // The first URL's body goes to the helper's file, the others to /dev/null.
        let mut args: Vec<&str> = vec![&urls[0]];
        for u in &urls[1..] {
            args.extend(["-o", "/dev/null", u.as_str()]);
        }
        let out = curl(&args).await;
        assert_eq!(out.status, 200);
        sent += n;
    }
    assert_eq!(sent, 40);
    assert_eq!(origin.seen().len(), 40);
    assert!(
        origin.connections() <= 2,
        "{} upstream connections",
        origin.connections()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_and_reverse_share_a_listener() {
    let origin = Origin::start().await;
    let config = format!(
        "{}[forward]\ndeny_targets = []\n[[route]]\npath = \"/r/\"\nupstream = \"{}\"\n",
        listen(),
        origin.url()
    );
    let strait = Strait::start(&config, &[]);
    assert_eq!(curl(&[&format!("{}/r/x", strait.url())]).await.status, 200);
    assert_eq!(origin.last().uri, "/r/x");
    let out = curl(&["-x", &strait.url(), &format!("{}/f", origin.url())]).await;
    assert_eq!(out.status, 200);
    assert_eq!(origin.last().uri, "/f");
    assert_eq!(origin.last().header("x-forwarded-for"), None);
    tokio::time::sleep(Duration::from_millis(10)).await;
}

/// gRPC's shape: an HTTP/2 client's `TE: trailers` reaches an HTTP/2 upstream (and
/// never an HTTP/1.1 one, where `TE` is hop-by-hop), and the upstream's trailers reach
/// the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn te_trailers_and_trailers_cross_between_http2_hops() {
    let origin = Origin::with(|_| async {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        http::Response::new(OriginBody::Trailed(Some("reply".into()), Some(trailers)))
    })
    .await;
    let config = format!(
        "{l}[[route]]\npath = \"/h2/\"\nupstream = \"{u}\"\nversion = \"h2\"\n[[route]]\npath = \"/h1/\"\nupstream = \"{u}\"\nversion = \"h1\"\n",
        l = listen(),
        u = origin.url()
    );
    let strait = Strait::start(&config, &[]);
    let mut sender = h2_client(strait.addr()).await;
    let req = http::Request::post(format!("http://{}/h2/svc/Call", strait.addr()))
        .header("te", "trailers")
        .header("content-type", "application/grpc")
        .body(http_body_util::Full::new(Bytes::from_static(b"call")))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let got = resp.into_body().collect().await.unwrap();
    assert_eq!(got.trailers().unwrap()["grpc-status"], "0");
    assert_eq!(&got.to_bytes()[..], b"reply");
    let seen = origin.last();
    assert_eq!(seen.version, http::Version::HTTP_2);
    assert_eq!(seen.header("te"), Some("trailers"));

    let req = http::Request::post(format!("http://{}/h1/svc/Call", strait.addr()))
        .header("te", "trailers")
        .body(http_body_util::Full::new(Bytes::from_static(b"call")))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let seen = origin.last();
    assert_eq!(seen.version, http::Version::HTTP_11);
    assert_eq!(seen.header("te"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_post_whose_upstream_is_down_goes_whole_to_the_next() {
    let live = Origin::start().await;
    let dead = closed_port();
    // The dead upstream comes first in the round-robin order.
    let config = format!(
        "{}[admin]\naddr = \"127.0.0.1:0\"\n[[route]]\nupstream = [\"http://{dead}\", \"{}\"]\n",
        listen(),
        live.url()
    );
    let strait = Strait::start(&config, &[]);
    // Larger than a read: the body streams, nothing of it is kept for a replay.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("body");
    let body: Vec<u8> = (0..300 * 1024).map(|i| (i % 251) as u8).collect();
    std::fs::write(&file, &body).unwrap();
    let data = format!("@{}", file.display());
    for _ in 0..3 {
        let out = curl(&["--data-binary", &data, &format!("{}/up", strait.url())]).await;
        assert_eq!(
            out.status,
            200,
            "a dead upstream never fails a POST: {out:?} {:?}",
            strait.logs()
        );
    }
    let seen = live.seen();
    assert_eq!(seen.len(), 3);
    assert!(
        seen.iter()
            .all(|s| s.method == "POST" && s.body == body[..])
    );
    // Only the first went to the dead upstream, then once more to the live one.
    let retries = "strait_pool_events_total{event=\"retry\"}";
    assert_eq!(strait.metric(retries).await, 1.0);
}

/// Two routes over the same two upstreams, `bad` first: each route has its own
/// round-robin order and health, so each sees `bad` first.
fn bad_then_live(bad: std::net::SocketAddr, live: &Origin, extra: &str) -> String {
    let pair = format!("[\"http://{bad}\", \"{}\"]", live.url());
    format!(
        "{}{extra}[[route]]\npath = \"/get/\"\nupstream = {pair}\n[[route]]\npath = \"/post/\"\nupstream = {pair}\n",
        listen()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_dropped_unanswered_by_a_fresh_connection_goes_to_the_next() {
    use std::sync::atomic::Ordering::SeqCst;
    use tokio::io::AsyncReadExt;
    // Takes the request, then closes without a byte of response.
    let (dropper, dropped) = counting_origin(|mut s| async move {
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).await;
    })
    .await;
    let live = tagged("live").await;
    let strait = Strait::start(&bad_then_live(dropper, &live, ""), &[]);
    for _ in 0..6 {
        let out = curl(&[&format!("{}/get/", strait.url())]).await;
        assert_eq!(out.status, 200, "{out:?}");
        assert_eq!(out.text(), "live");
    }
    // The first GET went to the dropper, then to the next upstream; the dropper was
    // then left out of the rotation.
    assert_eq!(dropped.load(SeqCst), 1);
    assert!(
        strait
            .logs()
            .iter()
            .any(|l| l.contains("upstream failed, trying the next")),
        "{:?}",
        strait.logs()
    );
    // A POST may have been acted on: it is not sent again.
    let out = curl(&["-d", "x=1", &format!("{}/post/", strait.url())]).await;
    assert_eq!(out.status, 502, "{out:?}");
    assert_eq!(dropped.load(SeqCst), 2);
    for _ in 0..3 {
        let out = curl(&["-d", "x=1", &format!("{}/post/", strait.url())]).await;
        assert_eq!(
            out.status, 200,
            "the dropper is left out after failing: {out:?}"
        );
    }
    assert_eq!(dropped.load(SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_an_upstream_never_answers_goes_to_the_next_after_upstream_response() {
    use std::sync::atomic::Ordering::SeqCst;
    use tokio::io::AsyncReadExt;
    // Reads requests and never answers.
    let (staller, stalled) = counting_origin(|mut s| async move {
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    let live = tagged("live").await;
    let timeouts = "[timeouts]\nupstream_response = \"300ms\"\n";
    let strait = Strait::start(&bad_then_live(staller, &live, timeouts), &[]);
    let started = std::time::Instant::now();
    let out = curl(&[&format!("{}/get/", strait.url())]).await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(out.text(), "live");
    assert!(started.elapsed() >= Duration::from_millis(300));
    for _ in 0..4 {
        let out = curl(&[&format!("{}/get/", strait.url())]).await;
        assert_eq!(out.text(), "live");
    }
    assert_eq!(
        stalled.load(SeqCst),
        1,
        "the staller is left out after failing"
    );
    // A POST is not sent twice: the client gets the 504.
    let out = curl(&["-d", "x=1", &format!("{}/post/", strait.url())]).await;
    assert_eq!(out.status, 504, "{out:?}");
    assert_eq!(stalled.load(SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_to_the_upstreams_own_url_is_rewritten_like_nginx_proxy_redirect() {
    // The origin redirects to its own URL, as an app that trusts its Host does.
    let origin = Origin::with(|s| {
        let host = s.header("host").unwrap_or("").to_owned();
        async move {
            let mut r = status(302, "moved");
            let to = format!("http://{host}/v1/login?next=%2F");
            r.headers_mut().insert("location", to.parse().unwrap());
            r
        }
    })
    .await;
    let u = origin.url();
    let config = format!(
        "{}[[route]]\npath = \"/api/\"\nupstream = \"{u}/v1/\"\n[[route]]\npath = \"/raw/\"\nupstream = \"{u}/v1/\"\nrewrite_location = false\n",
        listen()
    );
    let strait = Strait::start(&config, &[]);
    let out = curl(&[&format!("{}/api/x", strait.url())]).await;
    assert_eq!(out.status, 302);
    assert_eq!(out.header("location"), Some("/api/login?next=%2F"));
    let out = curl(&[&format!("{}/raw/x", strait.url())]).await;
    assert_eq!(
        out.header("location"),
        Some(format!("{u}/v1/login?next=%2F").as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http10_client_gets_a_chunked_body_delimited_by_close_and_told_so() {
    let origin =
        raw_origin(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
            .await;
    let strait = Strait::start(&route_to(&format!("http://{origin}"), ""), &[]);
    let reply = raw_exchange(
        strait.addr(),
        b"GET / HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    let (head, body) = reply.split_once("\r\n\r\n").unwrap();
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with("http/1.0 200"), "{reply}");
    assert!(head.contains("connection: close"), "{reply}");
    assert!(!head.contains("keep-alive"), "{reply}");
    assert!(!head.contains("transfer-encoding"), "{reply}");
    assert_eq!(body, "hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_at_max_conns_per_host_is_passed_over_while_another_has_room() {
    let slow = Origin::with(|_| async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        ok("slow")
    })
    .await;
    let fast = tagged("fast").await;
    let config = format!(
        "{}[pool]\nmax_conns_per_host = 1\nwait_timeout = \"5s\"\n[[route]]\nupstream = [\"{}\", \"{}\"]\n",
        listen(),
        slow.url(),
        fast.url()
    );
    let strait = Strait::start(&config, &[]);
    let url = format!("{}/", strait.url());
    // The first request takes the slow upstream's one connection for 1.5 s.
    let held = {
        let url = url.clone();
        tokio::spawn(async move { curl(&[&url]).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        slow.seen().len(),
        1,
        "the first request went to the slow upstream"
    );
    // Round robin puts the slow upstream first for one of these two; it is full, so
    // that request goes to the fast one instead of waiting.
    let started = std::time::Instant::now();
    for _ in 0..2 {
        let out = curl(&[&url]).await;
        assert_eq!(out.status, 200, "{out:?}");
        assert_eq!(out.text(), "fast");
    }
    assert!(
        started.elapsed() < Duration::from_millis(800),
        "waited {:?} for the full upstream",
        started.elapsed()
    );
    assert_eq!(held.await.unwrap().text(), "slow");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_clients_cookie_fields_reach_http1_as_one() {
    let origin = Origin::start().await;
    let strait = Strait::start(&route_to(&origin.url(), ""), &[]);
    let mut sender = h2_client::<http_body_util::Empty<Bytes>>(strait.addr()).await;
    let req = http::Request::get(format!("http://{}/", strait.addr()))
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .header("cookie", "c=3")
        .body(http_body_util::Empty::new())
        .unwrap();
    assert_eq!(sender.send_request(req).await.unwrap().status(), 200);
    let seen = origin.last();
    let cookies: Vec<_> = seen.headers.get_all("cookie").iter().collect();
    assert_eq!(cookies, ["a=1; b=2; c=3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_failing_its_health_checks_leaves_the_rotation_until_it_passes() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    let sick = Arc::new(AtomicBool::new(true));
    let flag = sick.clone();
    let wobbly = Origin::with(move |s| {
        let checked = s.uri == "/healthz";
        let ill = flag.load(SeqCst);
        async move {
            match (checked, ill) {
                (true, true) => status(503, "ill"),
                _ => ok("wobbly"),
            }
        }
    })
    .await;
    let steady = tagged("steady").await;
    let config = format!(
        "{}[[route]]\nupstream = [\"{}\", \"{}\"]\nhealth_check = \"/healthz\"\nhealth_interval = \"100ms\"\n",
        listen(),
        wobbly.url(),
        steady.url()
    );
    let strait = Strait::start(&config, &[]);
    strait
        .wait_for_log("health check failed: out of rotation")
        .await;
    for _ in 0..6 {
        assert_eq!(
            curl(&[&format!("{}/", strait.url())]).await.text(),
            "steady"
        );
    }
    let probe = wobbly
        .seen()
        .into_iter()
        .find(|s| s.uri == "/healthz")
        .unwrap();
    assert_eq!(probe.method, "GET");
    assert_eq!(probe.header("user-agent"), Some("strait-health-check"));
    assert_eq!(
        probe.header("host"),
        Some(wobbly.url().trim_start_matches("http://"))
    );

    sick.store(false, SeqCst);
    strait
        .wait_for_log("health check passed: back in rotation")
        .await;
    let mut answers = Vec::new();
    for _ in 0..6 {
        answers.push(curl(&[&format!("{}/", strait.url())]).await.text());
    }
    assert!(answers.iter().any(|a| a == "wobbly"), "{answers:?}");
    assert!(answers.iter().any(|a| a == "steady"), "{answers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segments_cannot_reach_past_a_routes_prefix() {
    let api = Origin::start().await;
    let config = format!(
        "{}[[route]]\npath = \"/api/\"\nupstream = \"{}/v1/\"\n",
        listen(),
        api.url()
    );
    let strait = Strait::start(&config, &[]);
    let get = |path: &'static str| {
        let url = format!("{}{path}", strait.url());
        async move { curl(&["--path-as-is", &url]).await.status }
    };
    // These resolve to /admin, which no route serves; sent as they came, the upstream
    // would have resolved /v1/../admin to its own /admin.
    assert_eq!(get("/api/../admin").await, 404);
    assert_eq!(get("/api/%2e%2e/admin").await, 404);
    assert_eq!(get("/api/../../etc/passwd").await, 400);
    assert!(api.seen().is_empty(), "{:?}", api.seen());
    // Within the route, the upstream gets the resolved path.
    assert_eq!(get("/api/x/./../users").await, 200);
    assert_eq!(api.last().uri, "/v1/users");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_check_does_not_fail_an_upstream_busy_at_max_conns_per_host() {
    let origin = Origin::with(|s| {
        let slow = s.uri == "/slow";
        async move {
            if slow {
                tokio::time::sleep(Duration::from_millis(1000)).await;
            }
            ok("fine")
        }
    })
    .await;
    let config = format!(
        "{}[pool]\nmax_conns_per_host = 1\n[[route]]\nupstream = \"{}\"\nhealth_check = \"/healthz\"\nhealth_interval = \"100ms\"\n",
        listen(),
        origin.url()
    );
    let strait = Strait::start(&config, &[]);
    // The one connection is busy for a second: ten probe rounds find no room.
    let out = curl(&[&format!("{}/slow", strait.url())]).await;
    assert_eq!(out.status, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let logs = strait.logs();
    assert!(
        !logs.iter().any(|l| l.contains("out of rotation")),
        "a busy upstream is not a failed one: {logs:?}"
    );
    assert!(origin.seen().iter().any(|s| s.uri == "/healthz"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_response_head_passes_from_h1_and_h2_upstreams_alike() {
    for (size, want) in [(40 * 1024, 200), (80 * 1024, 502)] {
        let origin = Origin::with(move |_| async move {
            let mut r = ok("big head");
            r.headers_mut()
                .insert("x-big", "v".repeat(size).parse().unwrap());
            r
        })
        .await;
        for version in ["h1", "h2"] {
            let config = format!(
                "{}[[route]]\nupstream = \"{}\"\nversion = \"{version}\"\n",
                listen(),
                origin.url()
            );
            let strait = Strait::start(&config, &[]);
            let out = curl(&[&format!("{}/", strait.url())]).await;
            assert_eq!(out.status, want, "{version}, {size} bytes: {out:?}");
            if want == 200 {
                assert_eq!(out.header("x-big").map(str::len), Some(size));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_broken_body_does_not_take_an_upstream_out_of_the_rotation() {
    use tokio::io::AsyncWriteExt;
    let (a, b) = (tagged("a").await, tagged("b").await);
    let config = format!(
        "{}[[route]]\nupstream = [\"{}\", \"{}\"]\n",
        listen(),
        a.url(),
        b.url()
    );
    let strait = Strait::start(&config, &[]);
    // The round-robin turn is `a`'s; the body breaks while it streams there.
    let mut s = tokio::net::TcpStream::connect(strait.addr()).await.unwrap();
    s.write_all(b"POST /broken HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\nzz\r\n\r\n")
        .await
        .unwrap();
    assert!(read_to_close(&mut s).await.starts_with("HTTP/1.1 400 "));
    let answers = [
        curl(&[&format!("{}/", strait.url())]).await.text(),
        curl(&[&format!("{}/", strait.url())]).await.text(),
    ];
    assert_eq!(answers, ["b", "a"], "the client's fault is not `a`'s");
}
