//! Metrics, the admin endpoints and the access log, checked by exact deltas.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config(origin: &Origin, extra: &str) -> String {
    format!(
        "listen = [{{ addr = \"127.0.0.1:0\" }}]\n[admin]\naddr = \"127.0.0.1:0\"\n[forward]\ndeny_targets = []\nusers = [\"alice:a\", \"bob:b\"]\n{extra}\n[[route]]\npath = \"/api/\"\nupstream = \"{}\"\n",
        origin.url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_routes_codes_and_pool_reuse_are_counted_exactly() {
    let origin = Origin::start().await;
    let strait = Strait::start(&config(&origin, ""), &[]);
    let ok = "strait_requests_total{kind=\"reverse\",route=\"/api/\",code=\"200\"}";
    let missing = "strait_requests_total{kind=\"reverse\",route=\"-\",code=\"404\"}";
    let hist = "strait_request_duration_seconds_count{kind=\"reverse\",route=\"/api/\"}";
    let reuse = "strait_pool_events_total{event=\"reuse\"}";
    let open = "strait_pool_events_total{event=\"open\"}";
    let (ok0, missing0, hist0, reuse0, open0) = (
        strait.metric(ok).await,
        strait.metric(missing).await,
        strait.metric(hist).await,
        strait.metric(reuse).await,
        strait.metric(open).await,
    );
    for i in 0..3 {
        assert_eq!(
            curl(&[&format!("{}/api/{i}", strait.url())]).await.status,
            200
        );
    }
    assert_eq!(
        curl(&[&format!("{}/nowhere", strait.url())]).await.status,
        404
    );
    assert_eq!(strait.metric(ok).await - ok0, 3.0);
    assert_eq!(strait.metric(missing).await - missing0, 1.0);
    assert_eq!(strait.metric(hist).await - hist0, 3.0);
    assert_eq!(
        strait.metric(open).await - open0,
        1.0,
        "one upstream connection"
    );
    assert_eq!(
        strait.metric(reuse).await - reuse0,
        2.0,
        "reused by the next two"
    );
    assert_eq!(strait.metric("strait_pool_idle_connections").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_are_counted_once_by_kind_user_and_direction() {
    let origin = Origin::start().await;
    let echo = echo_server().await;
    let strait = Strait::start(&config(&origin, ""), &[]);
    let series = |kind: &str, user: &str, dir: &str| {
        format!(
            "strait_transfer_bytes_total{{kind=\"{kind}\",user=\"{user}\",direction=\"{dir}\"}}"
        )
    };

    // Forward: a 1 MiB upload as alice adds 1 MiB plus the request head to rx.
    let dir = tempfile::tempdir().unwrap();
    let upload = dir.path().join("up");
    std::fs::write(&upload, vec![b'u'; 1 << 20]).unwrap();
    let rx0 = strait.metric(&series("forward", "alice", "rx")).await;
    let proxy = format!("http://alice:a@{}", strait.addr());
    let body = format!("@{}", upload.display());
    let out = curl(&[
        "-x",
        &proxy,
        "--data-binary",
        &body,
        &format!("{}/up", origin.url()),
    ])
    .await;
    assert_eq!(out.status, 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rx = strait.metric(&series("forward", "alice", "rx")).await - rx0;
    assert!(
        rx >= (1 << 20) as f64 && rx < ((1 << 20) + 1024) as f64,
        "rx grew by {rx}"
    );
    let tx = strait.metric(&series("forward", "alice", "tx")).await;
    assert!(tx >= "origin says hi".len() as f64, "tx {tx}");

    // Reverse: a 10 000-byte POST adds 10 000 plus the head to rx; the reply to tx.
    let rrx0 = strait.metric(&series("reverse", "-", "rx")).await;
    let rtx0 = strait.metric(&series("reverse", "-", "tx")).await;
    let small = dir.path().join("small");
    std::fs::write(&small, vec![b's'; 10_000]).unwrap();
    let body = format!("@{}", small.display());
    let out = curl(&[
        "--data-binary",
        &body,
        &format!("{}/api/post", strait.url()),
    ])
    .await;
    assert_eq!(out.status, 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rrx = strait.metric(&series("reverse", "-", "rx")).await - rrx0;
    let rtx = strait.metric(&series("reverse", "-", "tx")).await - rtx0;
    assert!(
        (10_000.0..11_000.0).contains(&rrx),
        "reverse rx grew by {rrx}"
    );
    assert!((14.0..1_000.0).contains(&rtx), "reverse tx grew by {rtx}");

    // CONNECT as bob: the tunnel's bytes, both ways, once, its request and answer
    // heads among them.
    let mut s = tokio::net::TcpStream::connect(strait.addr()).await.unwrap();
    let connect = format!(
        "CONNECT {echo} HTTP/1.1\r\nHost: {echo}\r\nProxy-Authorization: Basic Ym9iOmI=\r\n\r\n"
    );
    s.write_all(connect.as_bytes()).await.unwrap();
    let mut head = vec![0u8; 512];
    let n = s.read(&mut head).await.unwrap();
    assert!(String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 200"));
    assert_eq!(strait.metric("strait_tunnels_active").await, 1.0);
    let payload = vec![7u8; 100_000];
    s.write_all(&payload).await.unwrap();
    let mut back = vec![0u8; payload.len()];
    s.read_exact(&mut back).await.unwrap();
    drop(s);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(strait.metric("strait_tunnels_active").await, 0.0);
    let rx = strait.metric(&series("connect", "bob", "rx")).await;
    let tx = strait.metric(&series("connect", "bob", "tx")).await;
    assert_eq!(rx, (connect.len() + payload.len()) as f64, "connect rx");
    assert_eq!(tx, (n + payload.len()) as f64, "connect tx");
    let reverse = strait.metric(&series("reverse", "-", "rx")).await;
    assert_eq!(reverse, rrx + rrx0, "the tunnel counted nothing as reverse");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_connection_gauge_goes_up_and_back_down() {
    let origin = Origin::start().await;
    let strait = Strait::start(&config(&origin, ""), &[]);
    let listener = format!("listener=\"{}\"", "127.0.0.1:0");
    let series = format!("strait_client_connections{{{listener}}}");
    assert_eq!(strait.metric(&series).await, 0.0);
    let a = tokio::net::TcpStream::connect(strait.addr()).await.unwrap();
    let b = tokio::net::TcpStream::connect(strait.addr()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(strait.metric(&series).await, 2.0);
    drop((a, b));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(strait.metric(&series).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_turns_503_while_draining() {
    let origin = Origin::with(|_| async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        ok("slow")
    })
    .await;
    let mut strait = Strait::start(&config(&origin, ""), &[]);
    let health = format!("http://{}/healthz", strait.admin_addr());
    assert_eq!(curl(&[&health]).await.status, 200);
    let url = format!("{}/api/slow", strait.url());
    let slow = tokio::spawn(async move { curl(&[&url]).await });
    while origin.seen().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    strait.signal("TERM");
    strait.wait_for_log("draining").await;
    let out = curl(&[&health]).await;
    assert_eq!((out.status, out.text().as_str()), (503, "draining\n"));
    assert_eq!(slow.await.unwrap().status, 200);
    assert_eq!(strait.wait_exit(Duration::from_secs(5)).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_access_log_line_is_json_with_the_fields_and_the_file_reopens_on_sighup() {
    let origin = Origin::start().await;
    let echo = echo_server().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let extra = format!("[log]\naccess = \"{}\"\nformat = \"json\"", log.display());
    let strait = Strait::start(&config(&origin, &extra), &[]);
    curl(&[&format!("{}/api/a?b=c", strait.url())]).await;
    curl(&[
        "-x",
        &format!("http://alice:a@{}", strait.addr()),
        &format!("{}/f", origin.url()),
    ])
    .await;
    curl(&["-x", &strait.url(), &format!("{}/f", origin.url())]).await; // 407
    let mut s = tokio::net::TcpStream::connect(strait.addr()).await.unwrap();
    s.write_all(
        format!(
            "CONNECT {echo} HTTP/1.1\r\nHost: {echo}\r\nProxy-Authorization: Basic Ym9iOmI=\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = vec![0u8; 512];
    let _ = s.read(&mut head).await.unwrap();
    drop(s);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    assert_eq!(lines.len(), 4, "{text}");
    for l in &lines {
        for field in [
            "time",
            "client",
            "user",
            "method",
            "target",
            "status",
            "bytes_in",
            "bytes_out",
            "duration_ms",
            "route",
            "upstream",
            "protocol",
            "kind",
            "referer",
            "user_agent",
        ] {
            assert!(l.get(field).is_some(), "{field} missing in {l}");
        }
    }
    let reverse = &lines[0];
    assert_eq!(reverse["target"], "/api/a?b=c");
    assert_eq!(reverse["route"], "/api/");
    assert_eq!(reverse["status"], 200);
    assert!(
        reverse["user_agent"].as_str().unwrap().starts_with("curl/"),
        "{reverse}"
    );
    assert_eq!(reverse["referer"], "-");
    assert_eq!(lines[1]["user"], "alice");
    assert_eq!(lines[1]["kind"], "forward");
    assert_eq!(lines[2]["status"], 407);
    assert_eq!(lines[3]["method"], "CONNECT");
    assert_eq!(lines[3]["user"], "bob");

    // logrotate: move the file away, SIGHUP, and new lines go to a new file.
    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    strait.signal("HUP");
    strait.wait_for_log("access log reopened").await;
    curl(&[&format!("{}/api/after", strait.url())]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fresh = std::fs::read_to_string(&log).unwrap();
    assert_eq!(fresh.lines().count(), 1, "{fresh}");
    assert!(fresh.contains("/api/after"));
    assert_eq!(
        std::fs::read_to_string(&rotated).unwrap().lines().count(),
        4
    );
}

/// SIGUSR1 (what logrotate sends nginx) reopens the access log and nothing else: the
/// configuration is not read again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_reopens_the_access_log_only() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let extra = format!("[log]\naccess = \"{}\"\nformat = \"json\"", log.display());
    let strait = Strait::start(&config(&origin, &extra), &[]);
    curl(&[&format!("{}/api/before", strait.url())]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    // A config that would no longer parse: a reload would say so.
    std::fs::write(strait.dir.path().join("strait.toml"), "[nonsense\n").unwrap();
    strait.signal("USR1");
    strait.wait_for_log("access log reopened").await;
    curl(&[&format!("{}/api/after", strait.url())]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fresh = std::fs::read_to_string(&log).unwrap();
    assert_eq!(fresh.lines().count(), 1, "{fresh}");
    assert!(fresh.contains("/api/after"));
    assert!(
        std::fs::read_to_string(&rotated)
            .unwrap()
            .contains("/api/before")
    );
    assert!(
        !strait
            .logs()
            .iter()
            .any(|l| l.contains("SIGHUP") || l.contains("reload")),
        "SIGUSR1 reloaded the configuration: {:#?}",
        strait.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_combined_format_is_one_apache_style_line() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let extra = format!(
        "[log]\naccess = \"{}\"\nformat = \"combined\"",
        log.display()
    );
    let strait = Strait::start(&config(&origin, &extra), &[]);
    curl(&[
        "-A",
        "tester/1",
        "-e",
        "http://ref/",
        &format!("{}/api/c", strait.url()),
    ])
    .await;
    // A quote in a field would end it early for every log parser: escaped as nginx does.
    curl(&["-A", "evil\" 500 1 \"x", &format!("{}/api/d", strait.url())]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    let first = lines[0];
    assert!(
        first.starts_with("127.0.0.1 - - [")
            && first.contains("\"GET /api/c HTTP/1.1\" 200 14 \"http://ref/\" \"tester/1\""),
        "{first}"
    );
    // The time as Apache and nginx write it: [04/Dec/2026:00:45:01 +0000].
    let time = &first[first.find('[').unwrap() + 1..first.find(']').unwrap()];
    let b = time.as_bytes();
    assert_eq!(b.len(), 26, "{time}");
    assert!(
        b[..2].iter().all(u8::is_ascii_digit)
            && b[2] == b'/'
            && b[3..6].iter().all(u8::is_ascii_alphabetic)
            && b[6] == b'/'
            && b[7..11].iter().all(u8::is_ascii_digit)
            && b[11] == b':'
            && time.ends_with(" +0000"),
        "{time}"
    );
    assert!(
        lines[1].contains("\"GET /api/d HTTP/1.1\" 200 14 \"-\" \"evil\\x22 500 1 \\x22x\""),
        "{}",
        lines[1]
    );
}
