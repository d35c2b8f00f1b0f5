//! A binary upgrade refuses no connection: a new Strait started on the same addresses
//! (SO_REUSEPORT) serves beside the old one, and SIGTERM to the old one hands its ports
//! over before it drains, while clients open new connections without pause and others
//! keep theirs busy with request after request. And
//! systemd's readiness messages, which the upgrade under a `Type=notify` unit waits for.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::*;

/// Clients that open connections in a tight loop, one request on each.
const CONNECTORS: usize = 48;

/// Clients that send request after request on keep-alive connections.
const KEEPALIVE_CONNECTORS: usize = 16;

fn config(listen: &str, admin: &str, origin: &str) -> String {
    format!(
        "listen = [{{ addr = \"{listen}\" }}]\n[admin]\naddr = \"{admin}\"\n\
         [[route]]\nupstream = \"{origin}\"\n"
    )
}

/// What the connectors saw.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    /// The first failures, for the assertion's message.
    errors: Mutex<Vec<String>>,
}

/// One new connection, one request with `Connection: close`, a 200 read to the end.
async fn one_request(addr: SocketAddr) -> Result<(), String> {
    let mut s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    s.write_all(b"GET /up HTTP/1.1\r\nHost: upgrade.test\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut got = Vec::new();
    s.read_to_end(&mut got)
        .await
        .map_err(|e| format!("read: {e}"))?;
    if got.starts_with(b"HTTP/1.1 200") && got.ends_with(b"up") {
        Ok(())
    } else {
        Err(format!("response: {:?}", String::from_utf8_lossy(&got)))
    }
}

impl Tally {
    fn count(&self, outcome: Result<(), String>) {
        match outcome {
            Ok(()) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let mut errors = self.errors.lock().unwrap();
                if errors.len() < 10 {
                    errors.push(e);
                }
            }
        }
    }
}

/// Opens connections to `addr` until `stop`, one request on each, counting each in
/// `tally`.
async fn connector(addr: SocketAddr, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    while !stop.load(Ordering::Relaxed) {
        let outcome = tokio::time::timeout(Duration::from_secs(10), one_request(addr))
            .await
            .unwrap_or_else(|_| Err("no answer within 10 s".into()));
        tally.count(outcome);
    }
}

/// Sends requests on one keep-alive connection after another until `stop`. A
/// connection the server closed while idle is replaced; a request sent and not
/// answered is a failure.
async fn keepalive_connector(addr: SocketAddr, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    while !stop.load(Ordering::Relaxed) {
        let stream = match TcpStream::connect(addr).await {
            Ok(s) => s,
            Err(e) => {
                tally.count(Err(format!("keep-alive connect: {e}")));
                continue;
            }
        };
        let Ok((mut sender, conn)) =
            hyper::client::conn::http1::handshake::<_, String>(TokioIo::new(stream)).await
        else {
            continue;
        };
        tokio::spawn(conn);
        while !stop.load(Ordering::Relaxed) {
            // Closed by the server between requests: nothing was sent, reconnect.
            if sender.ready().await.is_err() {
                break;
            }
            let req = http::Request::get("/up")
                .header("host", "upgrade.test")
                .body(String::new())
                .unwrap();
            let sent = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req));
            let outcome = match sent.await {
                Ok(Ok(resp)) if resp.status() == 200 => {
                    match http_body_util::BodyExt::collect(resp.into_body()).await {
                        Ok(_) => Ok(()),
                        Err(e) => Err(format!("keep-alive body: {e}")),
                    }
                }
                Ok(Ok(resp)) => Err(format!("keep-alive status {}", resp.status())),
                Ok(Err(e)) => Err(format!("keep-alive request: {e}")),
                Err(_) => Err("keep-alive: no answer within 10 s".into()),
            };
            let failed = outcome.is_err();
            tally.count(outcome);
            if failed {
                break;
            }
        }
    }
}

/// [`CONNECTORS`] and [`KEEPALIVE_CONNECTORS`] running against one address.
struct Load {
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    connectors: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Tally::default());
        let mut connectors: Vec<_> = (0..CONNECTORS)
            .map(|_| tokio::spawn(connector(addr, stop.clone(), tally.clone())))
            .collect();
        connectors.extend(
            (0..KEEPALIVE_CONNECTORS)
                .map(|_| tokio::spawn(keepalive_connector(addr, stop.clone(), tally.clone()))),
        );
        Load {
            stop,
            tally,
            connectors,
        }
    }

    fn served(&self) -> u64 {
        self.tally.ok.load(Ordering::Relaxed)
    }

    /// Stops the connectors and asserts that no connection failed.
    async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for c in self.connectors {
            c.await.unwrap();
        }
        let (ok, failed) = (
            self.tally.ok.load(Ordering::Relaxed),
            self.tally.failed.load(Ordering::Relaxed),
        );
        eprintln!("{ok} requests served, {failed} failed");
        assert_eq!(
            failed,
            0,
            "{failed} of {} connections failed: {:?}",
            ok + failed,
            self.tally.errors.lock().unwrap()
        );
        ok
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_binary_takes_the_ports_over_without_refusing_a_connection() {
    let origin = Origin::with(|_| async { ok("up") }).await;
    let mut old = Strait::start(&config("127.0.0.1:0", "127.0.0.1:0", &origin.url()), &[]);
    let (addr, admin) = (old.addr(), old.admin_addr());
    let same = config(&addr.to_string(), &admin.to_string(), &origin.url());

    let load = Load::start(addr);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Three times: each switch after the first meets what the first left on the port's group.
    let mut exits = Vec::new();
    let mut served_after_exit = Vec::new();
    for _ in 0..3 {
        let new = Strait::start(&same, &[]);
        new.wait_for_log("sharing the port").await;
        assert_eq!(new.admin_addr(), admin);
        tokio::time::sleep(Duration::from_millis(300)).await;
        old.signal("TERM");
        let code = old.wait_exit(Duration::from_secs(20)).await;
        exits.push((code, old.logs().join("\n")));
        let at_exit = load.served();
        tokio::time::sleep(Duration::from_secs(1)).await;
        served_after_exit.push(load.served() - at_exit);
        old = new;
    }
    load.finish().await;
    eprintln!("served after each switch: {served_after_exit:?}");
    for ((code, logs), after) in exits.iter().zip(&served_after_exit) {
        assert_eq!(*code, 0, "{logs}");
        assert!(logs.contains("handed over"), "{logs}");
        assert!(*after > 0, "nothing served after the old process left");
    }
    // The admin port went over too.
    let health = curl(&[&format!("http://{admin}/healthz")]).await;
    assert_eq!(health.status, 200);
}

/// Stopping the new process instead (an upgrade called off) hands its ports back to the
/// old one: its first guess at where to steer is itself (the newest socket), the SYNs it
/// then drops tell it so, and it steers to the other. Those clients are a second late,
/// none is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_new_binary_instead_hands_the_ports_back() {
    let origin = Origin::with(|_| async { ok("up") }).await;
    let mut old = Strait::start(&config("127.0.0.1:0", "127.0.0.1:0", &origin.url()), &[]);
    let (addr, admin) = (old.addr(), old.admin_addr());
    let mut new = Strait::start(
        &config(&addr.to_string(), &admin.to_string(), &origin.url()),
        &[],
    );
    let load = Load::start(addr);
    tokio::time::sleep(Duration::from_millis(300)).await;
    new.signal("TERM");
    assert_eq!(new.wait_exit(Duration::from_secs(20)).await, 0);
    let logs = new.logs().join("\n");
    assert!(logs.contains("steered to socket 0"), "{logs}");
    let at_exit = load.served();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(load.served() > at_exit, "the old process serves no more");
    load.finish().await;
    old.signal("TERM");
    assert_eq!(old.wait_exit(Duration::from_secs(20)).await, 0);
}

/// Under `Type=notify`, systemd learns that Strait is ready once it listens, and that it
/// is stopping when the drain begins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_and_stopping_reach_the_notify_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut child = std::process::Command::new(strait_bin())
        .args(["-l", "127.0.0.1:0"])
        .env("NOTIFY_SOCKET", &path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1");
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let n = socket.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert!(child.wait().unwrap().success());
}
