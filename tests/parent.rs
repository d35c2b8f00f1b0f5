//! Going through another proxy: `[forward] parent` (absolute-form requests in absolute
//! form, CONNECT chained through a CONNECT), `direct_domains`, and `[[route]] via`.
//! The parent is a second Strait, and Squid where it is installed.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::*;

/// A Strait that is a parent: an open forward proxy with one user and metrics.
fn parent() -> Strait {
    Strait::start(
        "listen = [{ addr = \"127.0.0.1:0\" }]\nadmin = { addr = \"127.0.0.1:0\" }\n[forward]\ndeny_targets = []\nusers = [\"corp:pa ss\"]\n",
        &[],
    )
}

/// A child whose forward requests go through `parent` (credentials `corp:pa ss`,
/// percent-encoded in the URL), with `extra` added to its `[forward]`.
fn child(parent: SocketAddr, extra: &str) -> Strait {
    Strait::start(
        &format!(
            "listen = [{{ addr = \"127.0.0.1:0\" }}]\nadmin = {{ addr = \"127.0.0.1:0\" }}\n[forward]\ndeny_targets = []\nparent = \"http://corp:pa%20ss@{parent}\"\n{extra}"
        ),
        &[],
    )
}

async fn served(strait: &Strait, kind: &str, code: u16) -> f64 {
    strait
        .metric(&format!(
            "strait_requests_total{{kind=\"{kind}\",route=\"-\",code=\"{code}\"}}"
        ))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_requests_go_through_the_parent_in_absolute_form() {
    let origin = Origin::start().await;
    let parent = parent();
    let child = child(parent.addr(), "");
    for i in 0..5 {
        let out = curl(&["-x", &child.url(), &format!("{}/p/{i}?q=1", origin.url())]).await;
        assert_eq!(out.status, 200, "{out:?}");
        assert_eq!(out.text(), "origin says hi");
    }
    let seen = origin.last();
    assert_eq!(seen.uri, "/p/4?q=1");
    assert_eq!(seen.header("host"), Some(origin.addr.to_string().as_str()));
    assert!(seen.header("proxy-authorization").is_none());
    // The parent forwarded them (so it took the child's credentials for it) ...
    assert_eq!(served(&parent, "forward", 200).await, 5.0);
    // ... over one pooled connection from the child.
    assert_eq!(
        child
            .metric("strait_pool_events_total{event=\"open\"}")
            .await,
        1.0
    );
    assert_eq!(
        child
            .metric("strait_pool_events_total{event=\"reuse\"}")
            .await,
        4.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_chained_through_a_connect_to_the_parent() {
    let origin = Origin::start().await;
    let parent = parent();
    let child = child(parent.addr(), "");
    let out = curl(&[
        "-p",
        "-x",
        &child.url(),
        &format!("{}/through", origin.url()),
    ])
    .await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(origin.last().uri, "/through");
    assert_eq!(served(&parent, "connect", 200).await, 1.0);

    // Bytes the target sends first (a banner) come through the chained tunnel.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let banner = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"SSH-2.0-banner\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
    });
    let mut s = tokio::net::TcpStream::connect(child.addr()).await.unwrap();
    use tokio::io::AsyncWriteExt;
    s.write_all(format!("CONNECT {banner} HTTP/1.1\r\nHost: {banner}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let got = read_until(&mut s, |t| t.contains("SSH-2.0-banner")).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_that_refuses_is_a_502_naming_the_hop() {
    let origin = Origin::start().await;
    let parent = parent();
    let child = Strait::start(
        &format!(
            "listen = [{{ addr = \"127.0.0.1:0\" }}]\n[forward]\ndeny_targets = []\nparent = \"http://corp:wrong@{}\"\n",
            parent.addr()
        ),
        &[],
    );
    let out = curl(&["-x", &child.url(), &format!("{}/", origin.url())]).await;
    assert_eq!(out.status, 502, "{out:?}");
    assert!(out.header("proxy-authenticate").is_none());
    let out = curl(&["-p", "-x", &child.url(), &format!("{}/", origin.url())]).await;
    assert_eq!(out.exit, 56, "{out:?}");
    let hop = format!("parent proxy {}: answered", parent.addr());
    child.wait_for_log(&format!("{hop} 407")).await;
    child
        .wait_for_log(&format!("{hop} CONNECT {} with 407", origin.addr))
        .await;
    assert_eq!(origin.connections(), 0);

    // A parent that is down.
    let gone = closed_port();
    let child = Strait::start(
        &format!(
            "listen = [{{ addr = \"127.0.0.1:0\" }}]\n[forward]\ndeny_targets = []\nparent = \"http://{gone}\"\n"
        ),
        &[],
    );
    let out = curl(&["-x", &child.url(), &format!("{}/", origin.url())]).await;
    assert_eq!(out.status, 502, "{out:?}");
    child
        .wait_for_log(&format!("parent proxy {gone}: cannot reach it"))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_domains_bypass_the_parent() {
    let origin = Origin::start().await;
    let parent = parent();
    let child = child(parent.addr(), "direct_domains = [\"localhost\"]\n");
    let port = origin.addr.port();
    let out = curl(&[
        "-x",
        &child.url(),
        &format!("http://localhost:{port}/direct"),
    ])
    .await;
    assert_eq!(out.status, 200, "{out:?}");
    let out = curl(&[
        "-p",
        "-x",
        &child.url(),
        &format!("http://localhost:{port}/tunnel"),
    ])
    .await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(served(&parent, "forward", 200).await, 0.0);
    assert_eq!(served(&parent, "connect", 200).await, 0.0);
    let out = curl(&["-x", &child.url(), &format!("{}/parent", origin.url())]).await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(served(&parent, "forward", 200).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_targets_still_hold_for_addresses_sent_to_the_parent() {
    let parent = parent();
    let child = Strait::start(
        &format!(
            "listen = [{{ addr = \"127.0.0.1:0\" }}]\n[forward]\nparent = \"http://corp:pa%20ss@{}\"\n",
            parent.addr()
        ),
        &[],
    );
    let reply = raw_exchange(
        child.addr(),
        b"GET http://2130706433:9/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");
    assert!(reply.contains("(\"loopback\")"), "{reply}");
    let mut s = tokio::net::TcpStream::connect(child.addr()).await.unwrap();
    use tokio::io::AsyncWriteExt;
    s.write_all(b"CONNECT [::ffff:127.0.0.1]:22 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let reply = read_until(&mut s, |t| t.contains("\r\n\r\n")).await;
    assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");
    assert_eq!(served(&parent, "connect", 200).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_reach_their_upstreams_via_a_proxy() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new(dir.path(), &["localhost"]);
    let tls_origin = Origin::tls(certs.server_config(&[b"h2", b"http/1.1"]), |_req| async {
        ok("tls origin")
    })
    .await;
    let parent = parent();
    let config = format!(
        "listen = [{{ addr = \"127.0.0.1:0\" }}]\n[forward]\nenabled = false\n\n[[route]]\npath = \"/plain/\"\nupstream = \"{}\"\nvia = \"http://corp:pa%20ss@{}\"\n\n[[route]]\npath = \"/tls/\"\nupstream = \"https://localhost:{}\"\ntls_ca = \"{}\"\nvia = \"http://corp:pa%20ss@{}\"\n",
        origin.url(),
        parent.addr(),
        tls_origin.addr.port(),
        certs.ca_pem.display(),
        parent.addr(),
    );
    let strait = Strait::start(&config, &[]);
    let out = curl(&[&format!("{}/plain/x", strait.url())]).await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(origin.last().uri, "/plain/x");
    assert_eq!(served(&parent, "forward", 200).await, 1.0);
    let out = curl(&[&format!("{}/tls/y", strait.url())]).await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(out.text(), "tls origin");
    assert_eq!(served(&parent, "connect", 200).await, 1.0);
}

/// A one-shot parent that checks the child's CONNECT and answers with `reply` in a
/// single write.
async fn fake_parent(reply: &'static [u8]) -> (SocketAddr, tokio::task::JoinHandle<String>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let (mut s, _) = listener.accept().await.unwrap();
        let head = read_until(&mut s, |t| t.contains("\r\n\r\n")).await;
        s.write_all(reply).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        head
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_after_the_parents_answer_belong_to_the_tunnel() {
    let (parent, head) =
        fake_parent(b"HTTP/1.1 200 Connection established\r\nVia: 1.1 p\r\n\r\nBANNER").await;
    let child = child(parent, "");
    let mut s = tokio::net::TcpStream::connect(child.addr()).await.unwrap();
    use tokio::io::AsyncWriteExt;
    s.write_all(b"CONNECT example.test:22 HTTP/1.1\r\nHost: example.test:22\r\nProxy-Authorization: Basic Y2xpZW50OnNlY3JldA==\r\n\r\n")
        .await
        .unwrap();
    let got = read_until(&mut s, |t| t.contains("BANNER")).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    let head = head.await.unwrap();
    assert!(
        head.starts_with("CONNECT example.test:22 HTTP/1.1\r\n"),
        "{head}"
    );
    // The parent gets the child's credentials for it, never the client's.
    assert!(
        head.contains("Proxy-Authorization: Basic Y29ycDpwYSBzcw==\r\n"),
        "{head}"
    );
    assert!(!head.contains("Y2xpZW50OnNlY3JldA=="), "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_parent_gets_the_absolute_form_with_its_own_credentials_only() {
    let (parent, head) = fake_parent(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
    let child = child(parent, "");
    let reply = raw_exchange(
        child.addr(),
        b"GET http://Example.test:8080/p/a%20b?q=1 HTTP/1.1\r\nHost: example.test:8080\r\nProxy-Authorization: Basic Y2xpZW50OnNlY3JldA==\r\nProxy-Connection: keep-alive\r\nConnection: close\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.ends_with("ok"), "{reply}");
    let head = head.await.unwrap();
    assert!(
        head.starts_with("GET http://Example.test:8080/p/a%20b?q=1 HTTP/1.1\r\n"),
        "{head}"
    );
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("\r\nhost: example.test:8080\r\n"), "{head}");
    assert_eq!(lower.matches("proxy-authorization:").count(), 1, "{head}");
    assert!(
        lower.contains("proxy-authorization: basic y29ycdpwysbzcw==\r\n"),
        "{head}"
    );
    assert!(!lower.contains("proxy-connection"), "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_that_answers_nonsense_is_a_502() {
    for reply in [
        &b"SSH-2.0-not-http\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
    ] {
        let (parent, _) = fake_parent(reply).await;
        let child = child(parent, "");
        let reply = raw_exchange(
            child.addr(),
            b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n",
            Duration::from_secs(3),
        )
        .await;
        assert!(reply.starts_with("HTTP/1.1 502"), "{reply}");
        child.wait_for_log("malformed answer").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_parent_is_reached_over_tls() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new(dir.path(), &["localhost"]);
    let parent = Strait::start(
        &format!(
            "[[listen]]\naddr = \"127.0.0.1:0\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n[admin]\naddr = \"127.0.0.1:0\"\n[forward]\ndeny_targets = []\n",
            certs.cert_pem.display(),
            certs.key_pem.display()
        ),
        &[],
    );
    let child = Strait::start_env(
        &format!(
            "listen = [{{ addr = \"127.0.0.1:0\" }}]\n[forward]\ndeny_targets = []\nparent = \"https://localhost:{}\"\n",
            parent.addr().port()
        ),
        &[("SSL_CERT_FILE", certs.ca_pem.to_str().unwrap())],
    );
    let out = curl(&["-x", &child.url(), &format!("{}/over-tls", origin.url())]).await;
    assert_eq!(out.status, 200, "{out:?}");
    let out = curl(&[
        "-p",
        "-x",
        &child.url(),
        &format!("{}/tunnel", origin.url()),
    ])
    .await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(served(&parent, "forward", 200).await, 1.0);
    assert_eq!(served(&parent, "connect", 200).await, 1.0);

    // Without the CA the parent's certificate is refused: a 502 naming the hop.
    let child = Strait::start(
        &format!(
            "listen = [{{ addr = \"127.0.0.1:0\" }}]\n[forward]\ndeny_targets = []\nparent = \"https://localhost:{}\"\n",
            parent.addr().port()
        ),
        &[],
    );
    let out = curl(&["-x", &child.url(), &format!("{}/", origin.url())]).await;
    assert_eq!(out.status, 502, "{out:?}");
    child
        .wait_for_log(&format!("parent proxy localhost:{}", parent.addr().port()))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn squid_as_the_parent() {
    let Some(squid) = Squid::start().await else {
        eprintln!("skipped: squid is not installed");
        return;
    };
    let origin = Origin::start().await;
    let child = Strait::start(
        &format!(
            "listen = [{{ addr = \"127.0.0.1:0\" }}]\n[forward]\ndeny_targets = []\nparent = \"http://{}\"\n",
            squid.addr
        ),
        &[],
    );
    for i in 0..3 {
        let out = curl(&["-x", &child.url(), &format!("{}/squid/{i}", origin.url())]).await;
        assert_eq!(out.status, 200, "{out:?}");
    }
    assert_eq!(origin.last().uri, "/squid/2");
    assert!(
        origin
            .last()
            .header("via")
            .is_some_and(|v| v.contains("squid")),
        "Squid forwarded it: {:?}",
        origin.last().headers
    );
    // Squid's default config tunnels to port 443 only: CONNECT elsewhere is its 403,
    // which is Strait's 502 naming the hop.
    let out = curl(&["-p", "-x", &child.url(), &format!("{}/", origin.url())]).await;
    assert_eq!(out.exit, 56, "{out:?}");
    child
        .wait_for_log(&format!("parent proxy {}: answered CONNECT", squid.addr))
        .await;
}

/// Squid on a loopback port with a throwaway config, or `None` where it is not
/// installed.
struct Squid {
    addr: SocketAddr,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Squid {
    async fn start() -> Option<Squid> {
        let bin = ["/usr/sbin/squid", "/usr/bin/squid"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())?;
        let dir = tempfile::tempdir().unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let d = dir.path().display();
        let conf = format!(
            "http_port 127.0.0.1:{port}\nacl localnet src 127.0.0.0/8\nacl SSL_ports port 443\nacl CONNECT method CONNECT\nhttp_access deny CONNECT !SSL_ports\nhttp_access allow localnet\nhttp_access deny all\ncache deny all\ncache_dir null /tmp\naccess_log none\ncache_log {d}/cache.log\npid_filename {d}/squid.pid\ncoredump_dir {d}\nshutdown_lifetime 0 seconds\n"
        );
        let path = dir.path().join("squid.conf");
        std::fs::write(&path, conf).unwrap();
        let child = std::process::Command::new(bin)
            .args(["-N", "-f", path.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Some(Squid {
                    addr,
                    child,
                    _dir: dir,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let log = std::fs::read_to_string(dir.path().join("cache.log")).unwrap_or_default();
        panic!("squid did not start: {log}");
    }
}

impl Drop for Squid {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
