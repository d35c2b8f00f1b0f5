//! TLS on the listener: curl over TLS, h2 by ALPN, an HTTPS proxy, and certificates
//! replaced while Strait runs.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A TLS listener with a reverse route to `origin` and an open forward proxy.
fn tls_config(certs: &Certs, origin: &Origin, extra: &str) -> String {
    format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n[forward]\ndeny_targets = []\n{extra}\n[[route]]\npath = \"/r/\"\nupstream = \"{}\"\n",
        certs.cert_pem.display(),
        certs.key_pem.display(),
        origin.url()
    )
}

fn https(strait: &Strait, path: &str) -> String {
    format!("https://localhost:{}{path}", strait.addr().port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reverse_routes_work_over_tls_with_h2_by_alpn() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new(dir.path(), &["localhost", "127.0.0.1"]);
    let origin = Origin::start().await;
    let strait = Strait::start(&tls_config(&certs, &origin, ""), &[]);
    let ca = certs.ca_pem.to_str().unwrap();

    let out = curl(&["--cacert", ca, "--http1.1", &https(&strait, "/r/one")]).await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(origin.last().header("x-forwarded-proto"), Some("https"));

    let out = curl(&["--cacert", ca, "--http2", "-v", &https(&strait, "/r/two")]).await;
    assert_eq!(out.status, 200);
    assert!(
        out.stderr.contains("ALPN: server accepted h2") || out.stderr.contains("HTTP/2 200"),
        "{}",
        out.stderr
    );
    assert_eq!(origin.last().uri, "/r/two");

    // Without the CA, curl refuses the certificate.
    assert_ne!(curl(&[&https(&strait, "/r/x")]).await.exit, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_forward_proxy_works_as_an_https_proxy_with_connect_inside() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new(dir.path(), &["localhost", "127.0.0.1"]);
    let origin = Origin::start().await;
    let strait = Strait::start(&tls_config(&certs, &origin, ""), &[]);
    let proxy = format!("https://localhost:{}", strait.addr().port());
    let ca = certs.ca_pem.to_str().unwrap();
    let target = format!("{}/via-https-proxy", origin.url());

    let out = curl(&["--proxy", &proxy, "--proxy-cacert", ca, &target]).await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(origin.last().uri, "/via-https-proxy");
    assert_eq!(
        origin.last().header("x-forwarded-proto"),
        None,
        "forward adds nothing"
    );

    let out = curl(&["-p", "--proxy", &proxy, "--proxy-cacert", ca, &target]).await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(origin.seen().len(), 2);
}

/// Replaces `dst` with `src` by rename, as certbot and acme.sh do.
fn replace_by_rename(src: &Path, dst: &Path) {
    let tmp = dst.with_extension("new");
    std::fs::copy(src, &tmp).unwrap();
    std::fs::rename(&tmp, dst).unwrap();
}

async fn served_by(strait: &Strait, ca: &Path) -> bool {
    curl(&["--cacert", ca.to_str().unwrap(), &https(strait, "/r/probe")])
        .await
        .status
        == 200
}

async fn eventually_served_by(strait: &Strait, ca: &Path) {
    for _ in 0..50 {
        if served_by(strait, ca).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!(
        "the new certificate was not served within 10 s: {:#?}",
        strait.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_replaced_by_rename_is_served_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let old = Certs::new(dir.path(), &["localhost"]);
    let new = Certs::make(
        dir.path(),
        &["localhost"],
        &rcgen::PKCS_ECDSA_P384_SHA384,
        "new-",
    );
    let origin = Origin::start().await;
    let strait = Strait::start(&tls_config(&old, &origin, ""), &[]);
    assert!(served_by(&strait, &old.ca_pem).await);
    assert!(!served_by(&strait, &new.ca_pem).await);

    // A connection established before the change carries on after it.
    let mut established = tls_client(&strait, &old.ca_pem).await;
    assert!(get_on(&mut established).await.starts_with("HTTP/1.1 200"));

    replace_by_rename(&new.key_pem, &old.key_pem);
    replace_by_rename(&new.cert_pem, &old.cert_pem);
    eventually_served_by(&strait, &new.ca_pem).await;
    strait.wait_for_log("certificate reloaded").await;
    assert!(get_on(&mut established).await.starts_with("HTTP/1.1 200"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_place_rewrite_is_picked_up_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let old = Certs::new(dir.path(), &["localhost"]);
    let new = Certs::make(dir.path(), &["localhost"], &rcgen::PKCS_ED25519, "new-");
    let origin = Origin::start().await;
    let strait = Strait::start(&tls_config(&old, &origin, ""), &[]);
    assert!(served_by(&strait, &old.ca_pem).await);
    // Rewritten in place (same inode), then SIGHUP.
    std::fs::write(&old.cert_pem, std::fs::read(&new.cert_pem).unwrap()).unwrap();
    std::fs::write(&old.key_pem, std::fs::read(&new.key_pem).unwrap()).unwrap();
    strait.signal("HUP");
    eventually_served_by(&strait, &new.ca_pem).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_or_mismatched_renewal_keeps_the_old_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let old = Certs::new(dir.path(), &["localhost"]);
    let other = Certs::make(
        dir.path(),
        &["localhost"],
        &rcgen::PKCS_ECDSA_P256_SHA256,
        "other-",
    );
    let origin = Origin::start().await;
    let strait = Strait::start(&tls_config(&old, &origin, ""), &[]);

    std::fs::write(
        &old.cert_pem,
        b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n",
    )
    .unwrap();
    strait.signal("HUP");
    strait.wait_for_log("certificate reload refused").await;
    assert!(
        served_by(&strait, &old.ca_pem).await,
        "the old pair stays in service"
    );

    // A certificate whose key is not the one on disk: refused too.
    replace_by_rename(&other.cert_pem, &old.cert_pem);
    strait.signal("HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        strait
            .logs()
            .iter()
            .filter(|l| l.contains("certificate reload refused"))
            .count()
            >= 2,
        "{:#?}",
        strait.logs()
    );
    assert!(served_by(&strait, &old.ca_pem).await);
}

#[test]
fn unusable_certificates_at_startup_exit_2_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new(dir.path(), &["localhost"]);
    let other = Certs::make(
        dir.path(),
        &["localhost"],
        &rcgen::PKCS_ECDSA_P256_SHA256,
        "other-",
    );
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "hello").unwrap();
    let cert = certs.cert_pem.to_str().unwrap();
    let key = certs.key_pem.to_str().unwrap();
    for (c, k, named) in [
        (garbage.to_str().unwrap(), key, "garbage.pem"),
        (cert, garbage.to_str().unwrap(), "garbage.pem"),
        (
            other.cert_pem.to_str().unwrap(),
            key,
            "do not belong together",
        ),
        ("/nonexistent/cert.pem", key, "/nonexistent/cert.pem"),
    ] {
        let (code, _, err) = run_strait(&["-l", "127.0.0.1:0", "--tls-cert", c, "--tls-key", k]);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains(named), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_tls_port_harms_nobody() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new(dir.path(), &["localhost"]);
    let origin = Origin::start().await;
    let strait = Strait::start(
        &tls_config(&certs, &origin, "[timeouts]\nheader_read = \"1s\""),
        &[],
    );
    // Plain HTTP to a TLS port.
    let reply = raw_exchange(
        strait.addr(),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(!reply.contains("200"), "{reply}");
    // A truncated ClientHello, then silence: cut off after header_read.
    let mut s = tokio::net::TcpStream::connect(strait.addr()).await.unwrap();
    s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc])
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the stalled handshake was cut off"
    );
    // A client that connects and says nothing.
    let silent = tokio::net::TcpStream::connect(strait.addr()).await.unwrap();
    assert!(served_by(&strait, &certs.ca_pem).await);
    drop(silent);
}

/// A TLS connection to strait trusting `ca`, for keep-alive requests by hand.
async fn tls_client(
    strait: &Strait,
    ca: &Path,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let config = tls_client_config(ca);
    let tcp = tokio::net::TcpStream::connect(strait.addr()).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap()
}

async fn get_on(s: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> String {
    s.write_all(b"GET /r/kept HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}
