//! Shutdown and resource bounds, observed from outside the process.

mod support;

use std::time::{Duration, Instant};

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish_then_exits_0() {
    let origin = Origin::with(|_| async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        ok("finished")
    })
    .await;
    let mut strait = Strait::start(&route_to(&origin.url(), ""), &[]);
    let url = format!("{}/slow", strait.url());
    let request = tokio::spawn(async move { curl(&[&url]).await });
    while origin.seen().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    strait.signal("TERM");
    strait.wait_for_log("draining").await;
    // No new connections once draining (the listener closes a moment after the signal).
    let mut refused = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(strait.addr()).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "the listener still accepts while draining");
    let out = request.await.unwrap();
    assert_eq!((out.status, out.text().as_str()), (200, "finished"));
    assert_eq!(strait.wait_exit(Duration::from_secs(5)).await, 0);
}

/// SIGQUIT drains as SIGTERM does (nginx's graceful quit), rather than dumping core.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigquit_drains_and_exits_0() {
    let origin = Origin::with(|_| async {
        tokio::time::sleep(Duration::from_millis(800)).await;
        ok("finished")
    })
    .await;
    let mut strait = Strait::start(&route_to(&origin.url(), ""), &[]);
    let url = format!("{}/slow", strait.url());
    let request = tokio::spawn(async move { curl(&[&url]).await });
    while origin.seen().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    strait.signal("QUIT");
    strait.wait_for_log("SIGQUIT: draining").await;
    let out = request.await.unwrap();
    assert_eq!((out.status, out.text().as_str()), (200, "finished"));
    assert_eq!(strait.wait_exit(Duration::from_secs(5)).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_on_an_idle_proxy_exits_0_at_once() {
    let mut strait = Strait::start_args(&["-l", "127.0.0.1:0"]);
    // An idle keep-alive client must not hold the exit up.
    let _idle = tokio::net::TcpStream::connect(strait.addr()).await.unwrap();
    let started = Instant::now();
    strait.signal("INT");
    assert_eq!(strait.wait_exit(Duration::from_secs(5)).await, 0);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_grace_bounds_the_wait_for_slow_requests() {
    let origin = Origin::with(|_| async {
        tokio::time::sleep(Duration::from_secs(60)).await;
        ok("never")
    })
    .await;
    let mut strait = Strait::start(
        &route_to(&origin.url(), "[timeouts]\nshutdown_grace = \"1s\""),
        &[],
    );
    let url = format!("{}/forever", strait.url());
    let request = tokio::spawn(async move { curl(&[&url]).await });
    while origin.seen().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = Instant::now();
    strait.signal("TERM");
    assert_eq!(strait.wait_exit(Duration::from_secs(5)).await, 0);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_ne!(request.await.unwrap().status, 200);
}

const BIG: u64 = 300 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_300_mb_download_streams_in_bounded_memory() {
    let origin = Origin::with(|s| {
        let size = if s.uri == "/big" { BIG } else { 1024 };
        async move {
            http::Response::new(OriginBody::Repeat {
                chunk: bytes::Bytes::from(vec![7u8; 64 * 1024]),
                remaining: size,
            })
        }
    })
    .await;
    let strait = Strait::start(&route_to(&origin.url(), ""), &[]);
    assert_eq!(curl(&[&format!("{}/warm", strait.url())]).await.status, 200);
    let base = strait.proc_status_kib("VmRSS");
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download}",
        ])
        .arg(format!("{}/big", strait.url()))
        .output()
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("200 {BIG}"),
        "{out:?}"
    );
    let peak = strait.proc_status_kib("VmHWM");
    let grew = peak.saturating_sub(base);
    eprintln!("download: RSS {base} KiB before, peak {peak} KiB, grew {grew} KiB");
    assert!(grew < 64 * 1024, "RSS grew by {grew} KiB moving 300 MB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_300_mb_upload_streams_in_bounded_memory() {
    let origin = Origin::start().await;
    let strait = Strait::start(&route_to(&origin.url(), ""), &[]);
    assert_eq!(curl(&[&format!("{}/warm", strait.url())]).await.status, 200);
    let base = strait.proc_status_kib("VmRSS");
    let script = format!(
        "head -c {BIG} /dev/zero | curl -sS -o /dev/null -w '%{{http_code}}' -T - {}/upload",
        strait.url()
    );
    let out = tokio::process::Command::new("sh")
        .args(["-c", &script])
        .output()
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "{out:?}");
    assert_eq!(
        origin.body_bytes.load(std::sync::atomic::Ordering::SeqCst) as u64,
        BIG
    );
    let peak = strait.proc_status_kib("VmHWM");
    let grew = peak.saturating_sub(base);
    eprintln!("upload: RSS {base} KiB before, peak {peak} KiB, grew {grew} KiB");
    assert!(grew < 64 * 1024, "RSS grew by {grew} KiB moving 300 MB up");
}

/// SIGHUP reads the config file again: new routes serve new requests, on new and on
/// kept-alive connections alike. A file that does not load changes nothing (the log
/// names the file, line and key), and a change to what was fixed at start is named as
/// needing a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_routes_and_keeps_them_when_the_file_is_bad() {
    use tokio::io::AsyncWriteExt;
    let a = Origin::with(|_| async { ok("from a") }).await;
    let b = Origin::with(|_| async { ok("from b") }).await;
    let admin = "[admin]\naddr = \"127.0.0.1:0\"";
    let strait = Strait::start(&route_to(&a.url(), admin), &[]);
    let url = format!("{}/x", strait.url());
    assert_eq!(curl(&[&url]).await.text(), "from a");
    let mut kept = tokio::net::TcpStream::connect(strait.addr()).await.unwrap();
    kept.write_all(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut kept, |t| t.contains("from a")).await;

    let file = strait.dir.path().join("strait.toml");
    std::fs::write(
        &file,
        route_to(&b.url(), &format!("{admin}\n[pool]\nmax_idle = 7")),
    )
    .unwrap();
    strait.signal("HUP");
    strait.wait_for_log("SIGHUP: configuration reloaded").await;
    assert_eq!(curl(&[&url]).await.text(), "from b");
    kept.write_all(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut kept, |t| t.contains("from b")).await;
    strait
        .wait_for_log("[pool] changed; it takes effect after a restart")
        .await;

    std::fs::write(
        &file,
        format!("{}\n[[route]]\nupstream = 5\n", route_to(&a.url(), admin)),
    )
    .unwrap();
    strait.signal("HUP");
    strait.wait_for_log("configuration not reloaded").await;
    let line = strait
        .logs()
        .into_iter()
        .find(|l| l.contains("configuration not reloaded"))
        .unwrap();
    assert!(line.contains("strait.toml:8: route[1].upstream"), "{line}");
    assert_eq!(curl(&[&url]).await.text(), "from b");
    let reloads =
        |result: &str| format!("strait_reloads_total{{what=\"config\",result=\"{result}\"}}");
    assert_eq!(strait.metric(&reloads("ok")).await, 1.0);
    assert_eq!(strait.metric(&reloads("refused")).await, 1.0);
}
