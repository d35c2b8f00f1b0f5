//! SIGHUP puts a new configuration in service: listeners, the admin listener, the
//! access log and timeouts as well as routes, without dropping a connection; a reload
//! that cannot be done whole changes nothing.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::AsyncWriteExt;

/// A port nothing listens on right now, as `127.0.0.1:PORT`.
fn free_addr() -> String {
    closed_port().to_string()
}

fn write_config(strait: &Strait, text: &str) {
    std::fs::write(strait.dir.path().join("strait.toml"), text).unwrap();
}

/// Reloads and waits for the outcome's log line (the nth of its kind).
async fn reload(strait: &Strait, outcome: &str) {
    let before = strait.logs().iter().filter(|l| l.contains(outcome)).count();
    strait.signal("HUP");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while strait.logs().iter().filter(|l| l.contains(outcome)).count() == before {
        assert!(
            std::time::Instant::now() < deadline,
            "no {outcome:?} after SIGHUP: {:#?}",
            strait.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_moves_the_listeners_the_admin_listener_and_the_access_log() {
    let origin = Origin::with(|_| async { ok("hello") }).await;
    let (a, b) = (free_addr(), free_addr());
    let (admin_a, admin_b) = (free_addr(), free_addr());
    let route = format!("[[route]]\nupstream = \"{}\"", origin.url());
    let strait = Strait::start(
        &format!(
            "[[listen]]\naddr = \"{a}\"\n{route}\n[admin]\naddr = \"{admin_a}\"\n[log]\naccess = \"off\""
        ),
        &[],
    );
    assert_eq!(curl(&[&format!("http://{a}/x")]).await.text(), "hello");
    // A kept-alive connection on the listener the reload removes.
    let mut kept = tokio::net::TcpStream::connect(&a).await.unwrap();
    kept.write_all(b"GET /k1 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut kept, |t| t.contains("hello")).await;

    let log = strait.dir.path().join("access.log");
    write_config(
        &strait,
        &format!(
            "[[listen]]\naddr = \"{b}\"\n{route}\n[admin]\naddr = \"{admin_b}\"\n[log]\naccess = \"{}\"\nformat = \"combined\"",
            log.display()
        ),
    );
    reload(&strait, "SIGHUP: configuration reloaded").await;

    // The new listener serves, the old one takes no new connection, and the connection
    // it accepted before goes on.
    assert_eq!(curl(&[&format!("http://{b}/y")]).await.text(), "hello");
    assert!(
        tokio::net::TcpStream::connect(&a).await.is_err(),
        "the removed listener still accepts"
    );
    kept.write_all(b"GET /k2 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let second = read_until(&mut kept, |t| t.contains("hello")).await;
    assert!(second.contains("200 OK"), "{second}");
    assert!(
        strait
            .logs()
            .iter()
            .any(|l| l.contains(&format!("stopped listening on {a}")))
    );

    // The admin listener moved.
    let metrics = curl(&[&format!("http://{admin_b}/metrics")]).await;
    assert_eq!(metrics.status, 200);
    assert!(metrics.text().contains("strait_requests_total"));
    assert!(tokio::net::TcpStream::connect(&admin_a).await.is_err());

    // The access log went from off to a file, in the new format.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains("\"GET /y HTTP/1.1\" 200 5"), "{text}");
    assert!(text.contains("\"GET /k2 HTTP/1.1\" 200 5"), "{text}");
    assert!(
        !text.contains("/x "),
        "a line from before the reload: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_cannot_bind_changes_nothing() {
    let first = Origin::with(|_| async { ok("first") }).await;
    let second = Origin::with(|_| async { ok("second") }).await;
    let a = free_addr();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap();
    let config = |origin: &Origin, extra: &str| {
        format!(
            "[[listen]]\naddr = \"{a}\"\n{extra}[[route]]\nupstream = \"{}\"\n[admin]\naddr = \"127.0.0.1:0\"",
            origin.url()
        )
    };
    let strait = Strait::start(&config(&first, ""), &[]);
    assert_eq!(curl(&[&format!("http://{a}/")]).await.text(), "first");

    // A second listener on a port another socket holds, and a new route.
    write_config(
        &strait,
        &config(&second, &format!("[[listen]]\naddr = \"{taken_addr}\"\n")),
    );
    reload(&strait, "configuration not reloaded").await;
    let line = strait
        .logs()
        .into_iter()
        .find(|l| l.contains("configuration not reloaded"))
        .unwrap();
    assert!(
        line.contains(&format!("cannot listen on {taken_addr}")),
        "{line}"
    );
    // Nothing changed: the old route, the old listener.
    assert_eq!(curl(&[&format!("http://{a}/")]).await.text(), "first");
    drop(taken);

    // Once the port is free, the same file goes through.
    reload(&strait, "SIGHUP: configuration reloaded").await;
    assert_eq!(curl(&[&format!("http://{a}/")]).await.text(), "second");
    assert_eq!(
        curl(&[&format!("http://{taken_addr}/")]).await.text(),
        "second"
    );
    let reloads =
        |result: &str| format!("strait_reloads_total{{what=\"config\",result=\"{result}\"}}");
    assert_eq!(strait.metric(&reloads("refused")).await, 1.0);
    assert_eq!(strait.metric(&reloads("ok")).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_timeouts_for_new_requests_and_connections() {
    let origin = Origin::with(|_| async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        ok("late")
    })
    .await;
    let mut strait = Strait::start(&route_to(&origin.url(), ""), &[]);
    write_config(
        &strait,
        &route_to(
            &origin.url(),
            "[timeouts]\nupstream_response = \"300ms\"\nidle = \"500ms\"\nshutdown_grace = \"1s\"",
        ),
    );
    reload(&strait, "SIGHUP: configuration reloaded").await;

    // upstream_response: a 504 long before the origin's 3 s.
    let started = std::time::Instant::now();
    let out = curl(&[&format!("{}/slow", strait.url())]).await;
    assert_eq!(out.status, 504, "{}", out.text());
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "took {:?}",
        started.elapsed()
    );

    // idle: a kept-alive connection with nothing to do is closed after half a second.
    let mut quiet = tokio::net::TcpStream::connect(strait.addr()).await.unwrap();
    quiet
        .write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut quiet, |t| t.contains("504")).await;
    let started = std::time::Instant::now();
    read_to_close(&mut quiet).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );

    // shutdown_grace: the drain waits one second.
    strait.signal("TERM");
    strait.wait_for_log("draining, up to 1s").await;
    assert_eq!(strait.wait_exit(Duration::from_secs(5)).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_puts_tls_on_a_listener_without_closing_its_socket() {
    let origin = Origin::with(|_| async { ok("hello") }).await;
    let a = free_addr();
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new(dir.path(), &["localhost", "127.0.0.1"]);
    let config = |tls: &str| {
        format!(
            "[[listen]]\naddr = \"{a}\"\n{tls}\n[[route]]\nupstream = \"{}\"",
            origin.url()
        )
    };
    let with_tls = |cert: &std::path::Path, key: &std::path::Path| {
        config(&format!(
            "tls = {{ cert = \"{}\", key = \"{}\" }}",
            cert.display(),
            key.display()
        ))
    };
    let strait = Strait::start(&config(""), &[]);
    assert_eq!(curl(&[&format!("http://{a}/")]).await.text(), "hello");
    write_config(&strait, &with_tls(&certs.cert_pem, &certs.key_pem));
    reload(&strait, "SIGHUP: configuration reloaded").await;
    let ca = certs.ca_pem.to_str().unwrap();
    let out = curl(&["--cacert", ca, &format!("https://{a}/")]).await;
    assert_eq!((out.status, out.text().as_str()), (200, "hello"));

    // A certificate that does not load refuses the reload; TLS stays as it was.
    write_config(&strait, &with_tls(&certs.ca_pem, &certs.key_pem));
    reload(&strait, "configuration not reloaded").await;
    let out = curl(&["--cacert", ca, &format!("https://{a}/")]).await;
    assert_eq!((out.status, out.text().as_str()), (200, "hello"));
}
