//! Unix sockets: `unix:/path` listeners (curl's `--unix-socket` as the client) and
//! `unix:/path` upstreams (an in-process hyper origin on a tokio `UnixListener`).

mod support;

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;

/// curl through the Unix socket at `socket`, to `url`, with more arguments.
async fn curl_unix(socket: &Path, url: &str, more: &[&str]) -> CurlOut {
    let mut args = vec!["--unix-socket", socket.to_str().unwrap()];
    args.extend_from_slice(more);
    args.push(url);
    curl(&args).await
}

/// Waits for `check` to hold, at most 10 s.
async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One request as the Unix socket origin saw it.
#[derive(Debug, Clone)]
struct UnixSeen {
    path: String,
    host: String,
    version: http::Version,
}

/// An HTTP origin (HTTP/1.1, and HTTP/2 with prior knowledge) on a Unix socket,
/// counting the connections it accepts. `/healthz` answers `health`.
struct UnixOrigin {
    path: PathBuf,
    seen: Arc<Mutex<Vec<UnixSeen>>>,
    conns: Arc<AtomicUsize>,
    health: Arc<Mutex<StatusCode>>,
}

impl UnixOrigin {
    fn start(path: PathBuf) -> UnixOrigin {
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let conns = Arc::new(AtomicUsize::new(0));
        let health = Arc::new(Mutex::new(StatusCode::OK));
        let origin = UnixOrigin {
            path,
            seen: seen.clone(),
            conns: conns.clone(),
            health: health.clone(),
        };
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                conns.fetch_add(1, Ordering::SeqCst);
                let (seen, health) = (seen.clone(), health.clone());
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let host = req
                        .headers()
                        .get(http::header::HOST)
                        .map(|v| v.to_str().unwrap().to_owned())
                        .or_else(|| req.uri().authority().map(|a| a.to_string()))
                        .unwrap_or_default();
                    seen.lock().unwrap().push(UnixSeen {
                        path: req.uri().path().to_owned(),
                        host,
                        version: req.version(),
                    });
                    let mut resp = Response::new(Full::new(Bytes::from("from the socket")));
                    if req.uri().path() == "/healthz" {
                        *resp.status_mut() = *health.lock().unwrap();
                    }
                    async move { Ok::<_, Infallible>(resp) }
                });
                tokio::spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        origin
    }

    fn url(&self) -> String {
        format!("unix:{}", self.path.display())
    }

    fn seen(&self, path: &str) -> Vec<UnixSeen> {
        let seen = self.seen.lock().unwrap();
        seen.iter().filter(|s| s.path == path).cloned().collect()
    }

    fn connections(&self) -> usize {
        self.conns.load(Ordering::SeqCst)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_listener_serves_and_shows_its_clients_as_unix() {
    let origin = Origin::with(|_| async { ok("hello") }).await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("proxy.sock");
    let log = dir.path().join("access.log");
    let strait = Strait::start(
        &format!(
            "[[listen]]\naddr = \"unix:{}\"\n[forward]\ndeny_targets = []\n[log]\naccess = \"{}\"\nformat = \"json\"\n[[route]]\nhost = \"app.test\"\nupstream = \"{}\"\n",
            socket.display(),
            log.display(),
            origin.url()
        ),
        &[],
    );
    assert_eq!(strait.sockets, vec![socket.clone()]);

    // Reverse: X-Forwarded-For names the client as nginx does.
    let out = curl_unix(&socket, "http://app.test/r", &[]).await;
    assert_eq!((out.status, out.text().as_str()), (200, "hello"));
    assert_eq!(origin.last().header("x-forwarded-for"), Some("unix:"));
    assert_eq!(origin.last().header("x-forwarded-proto"), Some("http"));
    let out = curl_unix(&socket, "http://app.test/h2", &["--http2-prior-knowledge"]).await;
    assert_eq!((out.status, out.text().as_str()), (200, "hello"));
    assert_eq!(origin.last().header("x-forwarded-for"), Some("unix:"));

    // Forward, in absolute form (curl takes no proxy through a Unix socket).
    let mut s = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let head = format!(
        "GET {}/f HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        origin.url(),
        origin.addr
    );
    tokio::io::AsyncWriteExt::write_all(&mut s, head.as_bytes())
        .await
        .unwrap();
    let (got, _) = read_until_end(&mut s).await;
    let got = String::from_utf8_lossy(&got);
    assert!(
        got.starts_with("HTTP/1.1 200") && got.ends_with("hello"),
        "{got}"
    );
    assert_eq!(origin.last().uri, "/f");

    let lines = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .collect::<Vec<_>>()
    };
    eventually("three access log lines", || lines().len() == 3).await;
    let lines = lines();
    for (line, kind) in lines.iter().zip(["reverse", "reverse", "forward"]) {
        assert_eq!(line["client"], "unix:", "{line}");
        assert_eq!(line["kind"], kind, "{line}");
        assert_eq!(line["status"], 200, "{line}");
    }
}

/// The same client in the combined format: `%h` is `unix:`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_client_in_the_combined_log_is_unix() {
    let origin = Origin::with(|_| async { ok("hello") }).await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("proxy.sock");
    let log = dir.path().join("access.log");
    let _strait = Strait::start(
        &format!(
            "[[listen]]\naddr = \"unix:{}\"\n[log]\naccess = \"{}\"\nformat = \"combined\"\n[[route]]\nupstream = \"{}\"\n",
            socket.display(),
            log.display(),
            origin.url()
        ),
        &[],
    );
    assert_eq!(
        curl_unix(&socket, "http://localhost/c", &[]).await.status,
        200
    );
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    eventually("a log line", || !read().is_empty()).await;
    assert!(read().starts_with("unix: - - ["), "{}", read());
}

/// `-l unix:/path` on the command line; the socket file goes when Strait exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_file_is_removed_on_exit() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("cli.sock");
    let listen = format!("unix:{}", socket.display());
    let mut strait = Strait::start_args(&["-l", &listen]);
    assert!(socket.exists());
    // Strait answers through it (no route: 404 from Strait itself). Over HTTP/2 the
    // authority `localhost` names the listener: not a forward request (which
    // deny_targets would refuse with 403).
    assert_eq!(
        curl_unix(&socket, "http://localhost/", &[]).await.status,
        404
    );
    let out = curl_unix(&socket, "http://localhost/", &["--http2-prior-knowledge"]).await;
    assert_eq!(out.status, 404, "{out:?}");
    strait.signal("TERM");
    assert_eq!(strait.wait_exit(Duration::from_secs(10)).await, 0);
    assert!(!socket.exists(), "the socket file outlived Strait");
}

/// A socket file nobody accepts on (a process that ended without removing it) is
/// replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_socket_file_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let strait = Strait::start_args(&["-l", &format!("unix:{}", socket.display())]);
    assert_eq!(
        curl_unix(&socket, "http://localhost/", &[]).await.status,
        404
    );
    strait.wait_for_log("removing a stale socket file").await;
}

/// A socket another process accepts on is its: Strait exits 1 naming the path, and
/// leaves the socket working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_socket_is_an_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("live.sock");
    let other = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let listen = format!("unix:{}", socket.display());
    let (code, _, err) = run_strait(&["-l", &listen]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("cannot listen on {listen}")) && err.contains("in use"),
        "{err}"
    );
    assert!(std::os::unix::net::UnixStream::connect(&socket).is_ok());
    drop(other);
}

/// Anything at the path that is not a socket is never removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_regular_file_at_the_path_is_an_error_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("precious");
    std::fs::write(&file, "data").unwrap();
    let listen = format!("unix:{}", file.display());
    let (code, _, err) = run_strait(&["-l", &listen]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&listen) && err.contains("not a socket"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "data");

    // A relative path is a usage error before anything is touched.
    let (code, _, err) = run_strait(&["--check", "-l", "unix:relative.sock"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("absolute path"), "{err}");
}

/// SIGHUP binds a Unix listener the file adds and closes (and removes the file of)
/// one it no longer names; one it keeps keeps its socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_and_removes_unix_listeners() {
    let origin = Origin::with(|_| async { ok("hello") }).await;
    let dir = tempfile::tempdir().unwrap();
    let (a, b, kept) = (
        dir.path().join("a.sock"),
        dir.path().join("b.sock"),
        dir.path().join("kept.sock"),
    );
    let config = |first: &Path| {
        format!(
            "[[listen]]\naddr = \"unix:{}\"\n[[listen]]\naddr = \"unix:{}\"\n[log]\naccess = \"off\"\n[[route]]\nupstream = \"{}\"\n",
            first.display(),
            kept.display(),
            origin.url()
        )
    };
    let strait = Strait::start(&config(&a), &[]);
    let kept_inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&kept).unwrap());
    assert_eq!(
        curl_unix(&a, "http://localhost/", &[]).await.text(),
        "hello"
    );

    std::fs::write(strait.dir.path().join("strait.toml"), config(&b)).unwrap();
    strait.signal("HUP");
    strait.wait_for_log("SIGHUP: configuration reloaded").await;

    assert_eq!(
        curl_unix(&b, "http://localhost/", &[]).await.text(),
        "hello"
    );
    assert!(!a.exists(), "the removed listener's socket file stayed");
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&kept).unwrap()),
        kept_inode,
        "the kept listener was bound again"
    );
    assert_eq!(
        curl_unix(&kept, "http://localhost/", &[]).await.text(),
        "hello"
    );
}

/// TLS on a Unix listener works as on TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_listener_serves_tls() {
    let origin = Origin::with(|_| async { ok("hello") }).await;
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new(dir.path(), &["localhost"]);
    let socket = dir.path().join("tls.sock");
    let _strait = Strait::start(
        &format!(
            "[[listen]]\naddr = \"unix:{}\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n[[route]]\nupstream = \"{}\"\n",
            socket.display(),
            certs.cert_pem.display(),
            certs.key_pem.display(),
            origin.url()
        ),
        &[],
    );
    let ca = certs.ca_pem.to_str().unwrap();
    for http2 in ["--http1.1", "--http2"] {
        let out = curl_unix(&socket, "https://localhost/t", &["--cacert", ca, http2]).await;
        assert_eq!((out.status, out.text().as_str()), (200, "hello"), "{out:?}");
        assert_eq!(origin.last().header("x-forwarded-proto"), Some("https"));
    }
}

/// A route to a Unix socket: requests name the route's host, the connection is kept
/// and reused, and a missing socket is named in the log and skipped for the next
/// upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_upstream_is_reused_and_named_by_the_routes_host() {
    let dir = tempfile::tempdir().unwrap();
    let origin = UnixOrigin::start(dir.path().join("app.sock"));
    let other = UnixOrigin::start(dir.path().join("other.sock"));
    let missing = dir.path().join("missing.sock");
    let strait = Strait::start(
        &format!(
            "listen = [{{ addr = \"127.0.0.1:0\" }}]\n[log]\naccess = \"off\"\n[[route]]\nhost = \"app.test\"\nupstream = \"{}\"\n[[route]]\npath = \"/any/\"\nupstream = [\"unix:{}\", \"{}\"]\n[[route]]\npath = \"/two/\"\nupstream = [\"{}\", \"{}\"]\n",
            origin.url(),
            missing.display(),
            origin.url(),
            origin.url(),
            other.url()
        ),
        &[],
    );
    for i in 0..5 {
        let out = curl(&["-H", "Host: app.test", &format!("{}/n{i}", strait.url())]).await;
        assert_eq!((out.status, out.text().as_str()), (200, "from the socket"));
    }
    assert_eq!(origin.seen("/n4")[0].host, "app.test");
    assert_eq!(
        origin.connections(),
        1,
        "the pooled connection was not reused"
    );

    // The second route's first upstream has no socket: the next one takes the request,
    // and the log names the path.
    for _ in 0..2 {
        let out = curl(&[&format!("{}/any/x", strait.url())]).await;
        assert_eq!((out.status, out.text().as_str()), (200, "from the socket"));
    }
    assert_eq!(origin.seen("/any/x")[0].host, "localhost");
    strait
        .wait_for_log(&format!("cannot connect to unix:{}", missing.display()))
        .await;

    // Two sockets are two upstreams, each with its own pooled connection.
    let before = origin.connections();
    for _ in 0..4 {
        let out = curl(&[&format!("{}/two/", strait.url())]).await;
        assert_eq!(out.status, 200);
    }
    assert_eq!(origin.seen("/two/").len(), 2);
    assert_eq!(other.seen("/two/").len(), 2);
    // (Each route has its own connections.)
    assert_eq!((origin.connections(), other.connections()), (before + 1, 1));
}

/// Health checks reach a Unix socket's upstream, and `version = "h2"` speaks HTTP/2
/// (prior knowledge) over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_upstream_is_health_checked_and_speaks_h2_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let origin = UnixOrigin::start(dir.path().join("h2.sock"));
    *origin.health.lock().unwrap() = StatusCode::SERVICE_UNAVAILABLE;
    let strait = Strait::start(
        &format!(
            "listen = [{{ addr = \"127.0.0.1:0\" }}]\n[admin]\naddr = \"127.0.0.1:0\"\n[log]\naccess = \"off\"\n[[route]]\nupstream = \"{}\"\nversion = \"h2\"\nhealth_check = \"/healthz\"\nhealth_interval = \"100ms\"\n",
            origin.url()
        ),
        &[],
    );
    let down = "strait_upstreams_down{route=\"/\"}";
    let deadline = Instant::now() + Duration::from_secs(10);
    while strait.metric(down).await != 1.0 {
        assert!(
            Instant::now() < deadline,
            "the failing upstream never went down"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    *origin.health.lock().unwrap() = StatusCode::OK;
    while strait.metric(down).await != 0.0 {
        assert!(Instant::now() < deadline, "the upstream never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let probes = origin.seen("/healthz");
    assert!(probes.len() >= 4, "{probes:?}");
    assert!(probes.iter().all(|p| p.host == "localhost"), "{probes:?}");

    let out = curl(&[&format!("{}/h2", strait.url())]).await;
    assert_eq!((out.status, out.text().as_str()), (200, "from the socket"));
    assert_eq!(origin.seen("/h2")[0].version, http::Version::HTTP_2);
    // Probes and the request shared one HTTP/2 connection.
    assert_eq!(origin.connections(), 1);
}
