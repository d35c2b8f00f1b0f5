//! Plumbing for the black-box tests: start the real `strait` binary, in-process origins
//! that record what they receive (and misbehave on cue), curl as the client, and rcgen
//! certificates.
#![allow(dead_code)]

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

// ---- the strait process ------------------------------------------------------------

/// A running `strait` process; killed when dropped.
pub struct Strait {
    child: Option<Child>,
    pub addrs: Vec<SocketAddr>,
    /// The Unix sockets it listens on (`unix:/path` listeners).
    pub sockets: Vec<PathBuf>,
    logs: Arc<Mutex<Vec<String>>>,
    pub dir: tempfile::TempDir,
}

pub fn strait_bin() -> &'static str {
    env!("CARGO_BIN_EXE_strait")
}

impl Strait {
    /// Starts strait with `config` (TOML) written to a file, plus extra arguments, and
    /// waits until every listener is up.
    pub fn start(config: &str, args: &[&str]) -> Strait {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("strait.toml");
        std::fs::write(&path, config).unwrap();
        let mut all = vec!["-c", path.to_str().unwrap()];
        all.extend_from_slice(args);
        Strait::start_args_in(dir, &all)
    }

    /// Starts strait with exactly these arguments.
    pub fn start_args(args: &[&str]) -> Strait {
        Strait::start_args_in(tempfile::tempdir().unwrap(), args)
    }

    /// [`Strait::start`] with environment variables set (`SSL_CERT_FILE`, say).
    pub fn start_env(config: &str, env: &[(&str, &str)]) -> Strait {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("strait.toml");
        std::fs::write(&path, config).unwrap();
        Strait::start_full(dir, &["-c", path.to_str().unwrap()], env)
    }

    fn start_args_in(dir: tempfile::TempDir, args: &[&str]) -> Strait {
        Strait::start_full(dir, args, &[])
    }

    fn start_full(dir: tempfile::TempDir, args: &[&str], env: &[(&str, &str)]) -> Strait {
        let mut child = Command::new(strait_bin())
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "strait=debug")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting strait");
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if !line.contains("admin listening on ")
                        && let Some(rest) = line.split("listening on ").nth(1)
                    {
                        let addr = rest.split_whitespace().next().unwrap().to_owned();
                        let _ = tx.send(addr);
                    }
                    logs.lock().unwrap().push(line);
                }
            });
        }
        let mut strait = Strait {
            child: Some(child),
            addrs: Vec::new(),
            sockets: Vec::new(),
            logs,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(addr) => match addr.strip_prefix("unix:") {
                    Some(path) => strait.sockets.push(path.into()),
                    None => strait.addrs.push(addr.parse().unwrap()),
                },
                Err(_) if !strait.addrs.is_empty() || !strait.sockets.is_empty() => break,
                Err(_) => {}
            }
            if let Some(status) = strait.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "strait exited early ({status}): {}",
                    strait.logs().join("\n")
                );
            }
            assert!(
                Instant::now() < deadline,
                "strait did not start: {}",
                strait.logs().join("\n")
            );
        }
        strait
    }

    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// The admin listener's address, from its startup log line.
    pub fn admin_addr(&self) -> SocketAddr {
        self.logs()
            .iter()
            .find_map(|l| l.split("admin listening on ").nth(1))
            .and_then(|a| a.split_whitespace().next())
            .expect("an admin listener")
            .parse()
            .unwrap()
    }

    /// The value of one metric line (`name{labels}` exactly as Strait renders it), or 0.
    pub async fn metric(&self, series: &str) -> f64 {
        let out = curl(&[&format!("http://{}/metrics", self.admin_addr())]).await;
        assert_eq!(out.status, 200);
        out.text()
            .lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0.0)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Waits until a log line contains `needle`.
    pub async fn wait_for_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.logs().iter().any(|l| l.contains(needle)) {
            assert!(
                Instant::now() < deadline,
                "no log line with {needle:?}: {:#?}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits for the process to exit and returns its exit code.
    pub async fn wait_exit(&mut self, within: Duration) -> i32 {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return status.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "strait did not exit within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A line of /proc/PID/status, in KiB (VmRSS, VmHWM).
    pub fn proc_status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    }

    /// Open file descriptors of the process.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }
}

impl Drop for Strait {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs strait to completion (for `--check` and startup failures).
pub fn run_strait(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(strait_bin()).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `strait --check` on `config` written to `strait.toml`: the exit code and stderr.
pub fn check_config(config: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("strait.toml");
    std::fs::write(&path, config).unwrap();
    let (code, _, err) = run_strait(&["-c", path.to_str().unwrap(), "--check"]);
    (code, err)
}

/// A config with one ephemeral listener, `extra` TOML, and one any-host route to `url`.
pub fn route_to(url: &str, extra: &str) -> String {
    format!("listen = [{{ addr = \"127.0.0.1:0\" }}]\n{extra}\n[[route]]\nupstream = \"{url}\"\n")
}

// ---- origins ------------------------------------------------------------------------

/// One request as an origin received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub version: http::Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Which accepted connection (0, 1, ...) carried it.
    pub conn: usize,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

/// A response body an origin can send: fixed bytes, a large generated stream, or a
/// stream that fails part-way.
pub enum OriginBody {
    Full(Option<Bytes>),
    /// `remaining` bytes of `chunk` repeated.
    Repeat {
        chunk: Bytes,
        remaining: u64,
    },
    /// Sends `chunk` once, waits a moment (so it surely left), then fails: the
    /// connection is torn down mid-body.
    Broken(Option<Bytes>, Option<Pin<Box<tokio::time::Sleep>>>),
    /// Sends `chunk`, then never ends.
    Stall(Option<Bytes>),
    /// Sends the data, then the trailers (as a gRPC server ends a call).
    Trailed(Option<Bytes>, Option<HeaderMap>),
}

impl OriginBody {
    pub fn text(s: impl Into<Bytes>) -> OriginBody {
        OriginBody::Full(Some(s.into()))
    }
}

impl http_body::Body for OriginBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match self.get_mut() {
            OriginBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            OriginBody::Repeat { chunk, remaining } => {
                if *remaining == 0 {
                    return Poll::Ready(None);
                }
                let n = (*remaining).min(chunk.len() as u64) as usize;
                *remaining -= n as u64;
                Poll::Ready(Some(Ok(Frame::data(chunk.slice(..n)))))
            }
            OriginBody::Broken(b, pause) => {
                if let Some(b) = b.take() {
                    *pause = Some(Box::pin(tokio::time::sleep(Duration::from_millis(200))));
                    return Poll::Ready(Some(Ok(Frame::data(b))));
                }
                if let Some(p) = pause
                    && p.as_mut().poll(cx).is_pending()
                {
                    return Poll::Pending;
                }
                Poll::Ready(Some(Err(std::io::Error::other("origin broke on cue"))))
            }
            OriginBody::Stall(b) => match b.take() {
                Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
                None => Poll::Pending,
            },
            OriginBody::Trailed(b, t) => match b.take() {
                Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
                None => Poll::Ready(t.take().map(|t| Ok(Frame::trailers(t)))),
            },
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            OriginBody::Full(Some(b)) => http_body::SizeHint::with_exact(b.len() as u64),
            OriginBody::Full(None) => http_body::SizeHint::with_exact(0),
            OriginBody::Repeat { remaining, .. } => http_body::SizeHint::with_exact(*remaining),
            _ => http_body::SizeHint::default(),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(
            self,
            OriginBody::Full(None) | OriginBody::Repeat { remaining: 0, .. }
        )
    }
}

type Handler =
    Arc<dyn Fn(&Seen) -> Pin<Box<dyn Future<Output = Response<OriginBody>> + Send>> + Send + Sync>;

/// An in-process HTTP origin (HTTP/1.1 and h2c) that records every request.
pub struct Origin {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    conns: Arc<AtomicUsize>,
    /// Bytes of request bodies received; bodies over 1 MiB are counted, not kept.
    pub body_bytes: Arc<AtomicUsize>,
}

/// Bodies larger than this are counted but not stored.
const KEEP_BODY: usize = 1 << 20;

impl Origin {
    /// An origin that answers `200 origin says hi` to everything.
    pub async fn start() -> Origin {
        Origin::with(|_| async { Response::new(OriginBody::text("origin says hi")) }).await
    }

    /// An origin whose response comes from `handler`, after the request body was read.
    pub async fn with<F, Fut>(handler: F) -> Origin
    where
        F: Fn(&Seen) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<OriginBody>> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |s| Box::pin(handler(s)));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Origin::serve(listener, None, handler)
    }

    /// The same, over TLS with the given server config.
    pub async fn tls<F, Fut>(config: rustls::ServerConfig, handler: F) -> Origin
    where
        F: Fn(&Seen) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<OriginBody>> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |s| Box::pin(handler(s)));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Origin::serve(
            listener,
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))),
            handler,
        )
    }

    fn serve(
        listener: TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
        handler: Handler,
    ) -> Origin {
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let conns = Arc::new(AtomicUsize::new(0));
        let body_bytes = Arc::new(AtomicUsize::new(0));
        let origin = Origin {
            addr,
            seen: seen.clone(),
            conns: conns.clone(),
            body_bytes: body_bytes.clone(),
        };
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    break;
                };
                let conn = conns.fetch_add(1, Ordering::SeqCst);
                let (seen, handler, body_bytes, tls) = (
                    seen.clone(),
                    handler.clone(),
                    body_bytes.clone(),
                    tls.clone(),
                );
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (seen, handler, body_bytes) =
                            (seen.clone(), handler.clone(), body_bytes.clone());
                        async move {
                            let (parts, mut body) = req.into_parts();
                            let mut kept = Vec::new();
                            while let Some(frame) = body.frame().await {
                                let Ok(frame) = frame else { break };
                                if let Ok(data) = frame.into_data() {
                                    body_bytes.fetch_add(data.len(), Ordering::SeqCst);
                                    if kept.len() < KEEP_BODY {
                                        kept.extend_from_slice(&data);
                                    }
                                }
                            }
                            let s = Seen {
                                method: parts.method.to_string(),
                                uri: parts.uri.to_string(),
                                version: parts.version,
                                headers: parts.headers,
                                body: kept.into(),
                                conn,
                            };
                            seen.lock().unwrap().push(s.clone());
                            Ok::<_, Infallible>(handler(&s).await)
                        }
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    match tls {
                        None => {
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                        Some(acceptor) => {
                            if let Ok(s) = acceptor.accept(stream).await {
                                let _ = builder.serve_connection(TokioIo::new(s), service).await;
                            }
                        }
                    }
                });
            }
        });
        origin
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn last(&self) -> Seen {
        self.seen().pop().expect("the origin saw no request")
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.conns.load(Ordering::SeqCst)
    }
}

/// A raw TCP origin that runs `serve` on every connection it accepts, and counts them.
pub async fn counting_origin<F, Fut>(serve: F) -> (SocketAddr, Arc<AtomicUsize>)
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let counter = conns.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(s));
        }
    });
    (addr, conns)
}

/// A raw TCP origin: every connection gets `reply` written after the first read, then
/// the connection is closed. For malformed responses.
pub async fn raw_origin(reply: &'static [u8]) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(reply).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// A TCP echo server (for tunnels).
pub async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// An address nothing listens on.
pub fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

// ---- curl ---------------------------------------------------------------------------

/// What curl got back.
#[derive(Debug)]
pub struct CurlOut {
    pub status: u16,
    /// Headers of the final response, lower-cased names.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub exit: i32,
    pub stderr: String,
}

impl CurlOut {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Runs curl with `args` and captures status, the last header block and the body.
pub async fn curl(args: &[&str]) -> CurlOut {
    let dir = tempfile::tempdir().unwrap();
    let head = dir.path().join("head");
    let body = dir.path().join("body");
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "30", "-o"])
        .arg(&body)
        .arg("-D")
        .arg(&head)
        .args(["-w", "%{http_code}\n"])
        .args(args)
        .output()
        .await
        .expect("curl runs");
    let head = std::fs::read_to_string(&head).unwrap_or_default();
    // With a proxy tunnel, curl writes the CONNECT response first: keep the last block.
    let last_block = head
        .split("\r\n\r\n")
        .filter(|b| !b.trim().is_empty())
        .last()
        .unwrap_or("");
    let headers = last_block
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    CurlOut {
        // One status line per URL; the last one is the final answer.
        status: String::from_utf8_lossy(&out.stdout)
            .lines()
            .rfind(|l| !l.trim().is_empty())
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or(0),
        headers,
        body: std::fs::read(&body).unwrap_or_default(),
        exit: out.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

// ---- HTTP/2 by hand ----

/// An h2c (prior knowledge) client connection to `addr`, its driver spawned.
pub async fn h2_client<B>(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<B>
where
    B: http_body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

// ---- raw HTTP -----------------------------------------------------------------------

/// Reads from `s` until what was read satisfies `done`, or fails after 5 s without a
/// byte or at an early close. Returns what was read.
pub async fn read_until(s: &mut tokio::net::TcpStream, done: impl Fn(&str) -> bool) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    while !done(&String::from_utf8_lossy(&got)) {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("stalled after {:?}", String::from_utf8_lossy(&got)))
            .unwrap();
        assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Reads everything until the peer closes (at most 5 s).
pub async fn read_to_close(s: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut all))
        .await
        .expect("closed within 5 s")
        .unwrap();
    String::from_utf8_lossy(&all).into_owned()
}

/// Sends raw bytes on a new connection and returns everything read until the peer
/// closes or `within` passes.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8], within: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(within, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

// ---- certificates -------------------------------------------------------------------

/// A CA and a leaf certificate it signed, written as PEM files in `dir`.
pub struct Certs {
    pub ca_pem: PathBuf,
    pub cert_pem: PathBuf,
    pub key_pem: PathBuf,
    pub chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    pub key_der: Vec<u8>,
}

impl Certs {
    /// A CA plus a leaf for `names` (DNS names or IP addresses), ECDSA P-256.
    pub fn new(dir: &Path, names: &[&str]) -> Certs {
        Certs::make(dir, names, &rcgen::PKCS_ECDSA_P256_SHA256, "")
    }

    /// The same with another key algorithm, files named with `prefix`.
    pub fn make(
        dir: &Path,
        names: &[&str],
        alg: &'static rcgen::SignatureAlgorithm,
        prefix: &str,
    ) -> Certs {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "strait test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);

        let leaf_key = KeyPair::generate_for(alg).unwrap();
        let params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let leaf = params.signed_by(&leaf_key, &issuer).unwrap();

        let ca_pem = dir.join(format!("{prefix}ca.pem"));
        let cert_pem = dir.join(format!("{prefix}cert.pem"));
        let key_pem = dir.join(format!("{prefix}key.pem"));
        std::fs::write(&ca_pem, ca.pem()).unwrap();
        std::fs::write(&cert_pem, leaf.pem()).unwrap();
        std::fs::write(&key_pem, leaf_key.serialize_pem()).unwrap();
        Certs {
            ca_pem,
            cert_pem,
            key_pem,
            chain: vec![leaf.der().clone()],
            key_der: leaf_key.serialize_der(),
        }
    }

    /// A rustls server config for the leaf, offering `alpn`.
    pub fn server_config(&self, alpn: &[&[u8]]) -> rustls::ServerConfig {
        let key = rustls::pki_types::PrivateKeyDer::try_from(self.key_der.clone()).unwrap();
        let mut c = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(self.chain.clone(), key)
        .unwrap();
        c.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        c
    }
}

/// A plain 200 response with a text body.
pub fn ok(text: &'static str) -> Response<OriginBody> {
    Response::new(OriginBody::text(text))
}

/// A response with a status and body.
pub fn status(code: u16, text: &'static str) -> Response<OriginBody> {
    let mut r = Response::new(OriginBody::text(text));
    *r.status_mut() = StatusCode::from_u16(code).unwrap();
    r
}

/// A TLS client config (ring, safe defaults) that trusts the CA certificates in `ca`.
pub fn tls_client_config(ca: &Path) -> rustls::ClientConfig {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// Reads until the peer closes or the stream fails (at most 5 s): what arrived, and
/// how it ended (`None`: a clean end of stream; otherwise the error's kind, such as
/// `ConnectionReset`).
pub async fn read_until_end<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
) -> (Vec<u8>, Option<std::io::ErrorKind>) {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(0)) => return (got, None),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => return (got, Some(e.kind())),
            Err(_) => panic!("not ended within 5 s: {:?}", String::from_utf8_lossy(&got)),
        }
    }
}
