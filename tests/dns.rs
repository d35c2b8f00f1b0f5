//! Upstream names resolved by Strait's resolver: a name server on loopback that counts
//! the questions it gets, the forward proxy asked for names under `test.`, and what
//! the cache saves, keeps and forgets.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_resolver::proto::op::{Message, OpCode, ResponseCode};
use hickory_resolver::proto::rr::rdata::{A, SOA};
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use support::*;

/// A name server for `test.` on UDP loopback. `nx*.test` does not exist (NXDOMAIN, its
/// SOA giving `ttl` as the negative TTL), `fail*.test` gets SERVFAIL, every other name
/// is 127.0.0.1 for `ttl` seconds and has no AAAA.
struct NameServer {
    addr: SocketAddr,
    asked: Arc<Mutex<HashMap<String, usize>>>,
}

impl NameServer {
    async fn start(ttl: u32) -> NameServer {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let asked = Arc::new(Mutex::new(HashMap::new()));
        let seen = asked.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                let Ok(query) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let Some(q) = query.queries.first().cloned() else {
                    continue;
                };
                let name = q.name().to_lowercase().to_string();
                if q.query_type() == RecordType::A {
                    *seen.lock().unwrap().entry(name.clone()).or_insert(0) += 1;
                }
                let mut reply = Message::response(query.metadata.id, OpCode::Query);
                reply.metadata.recursion_desired = query.metadata.recursion_desired;
                reply.metadata.recursion_available = true;
                reply.add_query(q.clone());
                let soa = Record::from_rdata(
                    Name::from_ascii("test.").unwrap(),
                    ttl,
                    RData::SOA(SOA::new(
                        Name::from_ascii("ns.test.").unwrap(),
                        Name::from_ascii("admin.test.").unwrap(),
                        1,
                        60,
                        60,
                        60,
                        ttl,
                    )),
                );
                if name.starts_with("nx") {
                    reply.metadata.response_code = ResponseCode::NXDomain;
                    reply.add_authority(soa);
                } else if name.starts_with("fail") {
                    reply.metadata.response_code = ResponseCode::ServFail;
                } else if q.query_type() == RecordType::A {
                    reply.add_answer(Record::from_rdata(
                        q.name().clone(),
                        ttl,
                        RData::A(A::new(127, 0, 0, 1)),
                    ));
                } else {
                    reply.add_authority(soa);
                }
                let _ = socket.send_to(&reply.to_vec().unwrap(), from).await;
            }
        });
        NameServer { addr, asked }
    }

    /// A questions asked for `name` (without the final dot).
    fn asked(&self, name: &str) -> usize {
        let asked = self.asked.lock().unwrap();
        asked.get(&format!("{name}.")).copied().unwrap_or(0)
    }
}

/// An origin that answers every request with `ok` and closes the connection, so that
/// every request through Strait opens (and resolves) anew.
async fn closing_origin() -> u16 {
    raw_origin(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        .await
        .port()
}

fn config(dns: &str) -> String {
    format!(
        "listen = [{{ addr = \"127.0.0.1:0\" }}]\n[admin]\naddr = \"127.0.0.1:0\"\n\
         [forward]\ndeny_targets = []\n[log]\naccess = \"off\"\n[dns]\n{dns}\n"
    )
}

async fn get(strait: &Strait, url: &str) -> u16 {
    curl(&["-x", &strait.url(), url]).await.status
}

async fn lookups(strait: &Strait, result: &str) -> f64 {
    let series = format!("strait_dns_lookups_total{{result=\"{result}\"}}");
    strait.metric(&series).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_is_asked_once_and_kept_until_its_ttl_passes() {
    let dns = NameServer::start(1).await;
    let port = closing_origin().await;
    let strait = Strait::start(&config(&format!("servers = [\"{}\"]", dns.addr)), &[]);
    let url = format!("http://a.test:{port}/");

    assert_eq!(get(&strait, &url).await, 200);
    assert_eq!(dns.asked("a.test"), 1);
    // Within the TTL: a new connection, and no new question.
    assert_eq!(get(&strait, &url).await, 200);
    assert_eq!(get(&strait, &format!("http://A.Test:{port}/")).await, 200);
    assert_eq!(dns.asked("a.test"), 1);
    assert_eq!(lookups(&strait, "miss").await, 1.0);
    assert_eq!(lookups(&strait, "hit").await, 2.0);

    // The TTL (1 s) passes: asked again.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(get(&strait, &url).await, 200);
    assert_eq!(dns.asked("a.test"), 2);
    assert_eq!(lookups(&strait, "miss").await, 2.0);
    let timed = strait
        .metric("strait_dns_lookup_duration_seconds_count")
        .await;
    assert_eq!(timed, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_tunnel_resolves_through_the_same_cache() {
    let dns = NameServer::start(60).await;
    let port = closing_origin().await;
    let strait = Strait::start(&config(&format!("servers = [\"{}\"]", dns.addr)), &[]);
    let url = format!("http://tunnel.test:{port}/");
    for _ in 0..2 {
        let out = curl(&["-p", "-x", &strait.url(), &url]).await;
        assert_eq!((out.status, out.text().as_str()), (200, "ok"), "{out:?}");
    }
    assert_eq!(dns.asked("tunnel.test"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_that_does_not_exist_is_a_502_and_kept_for_its_negative_ttl() {
    let dns = NameServer::start(1).await;
    let strait = Strait::start(&config(&format!("servers = [\"{}\"]", dns.addr)), &[]);
    let url = "http://nx.test/";

    assert_eq!(get(&strait, url).await, 502);
    assert_eq!(get(&strait, url).await, 502);
    assert_eq!(dns.asked("nx.test"), 1);
    assert_eq!(lookups(&strait, "miss").await, 1.0);
    assert_eq!(lookups(&strait, "hit").await, 1.0);
    assert_eq!(strait.metric("strait_dns_not_found_total").await, 2.0);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(get(&strait, url).await, 502);
    assert_eq!(dns.asked("nx.test"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_failure_is_a_502_and_never_kept() {
    let dns = NameServer::start(60).await;
    let strait = Strait::start(&config(&format!("servers = [\"{}\"]", dns.addr)), &[]);
    assert_eq!(get(&strait, "http://fail.test/").await, 502);
    let first = dns.asked("fail.test");
    assert!(first >= 1);
    assert_eq!(get(&strait, "http://fail.test/").await, 502);
    assert!(dns.asked("fail.test") > first);
    assert_eq!(lookups(&strait, "error").await, 2.0);
    assert_eq!(lookups(&strait, "hit").await, 0.0);
    assert_eq!(strait.metric("strait_dns_not_found_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_cache_size_0_every_connection_asks() {
    let dns = NameServer::start(60).await;
    let port = closing_origin().await;
    let strait = Strait::start(
        &config(&format!("servers = [\"{}\"]\ncache_size = 0", dns.addr)),
        &[],
    );
    let url = format!("http://b.test:{port}/");
    for _ in 0..3 {
        assert_eq!(get(&strait, &url).await, 200);
    }
    assert_eq!(dns.asked("b.test"), 3);
    assert_eq!(lookups(&strait, "miss").await, 3.0);
    assert_eq!(lookups(&strait, "hit").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_targets_judge_the_address_the_name_resolved_to() {
    let dns = NameServer::start(60).await;
    let port = closing_origin().await;
    // The default deny_targets refuse loopback, where every name of this server points.
    let strait = Strait::start(
        &format!(
            "listen = [{{ addr = \"127.0.0.1:0\" }}]\n[log]\naccess = \"off\"\n[dns]\nservers = [\"{}\"]\n",
            dns.addr
        ),
        &[],
    );
    assert_eq!(get(&strait, &format!("http://c.test:{port}/")).await, 403);
    assert_eq!(dns.asked("c.test"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_is_no_dns_name_is_a_502() {
    let dns = NameServer::start(60).await;
    let strait = Strait::start(&config(&format!("servers = [\"{}\"]", dns.addr)), &[]);
    // A label of 64 octets is one too long (RFC 1035 §2.3.4).
    let url = format!("http://{}.test/", "a".repeat(64));
    assert_eq!(get(&strait, &url).await, 502);
    assert_eq!(lookups(&strait, "error").await, 1.0);
    assert!(dns.asked.lock().unwrap().is_empty());
    // Still serving.
    let port = closing_origin().await;
    assert_eq!(get(&strait, &format!("http://d.test:{port}/")).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn localhost_resolves_with_the_default_dns_settings_and_no_server() {
    let port = closing_origin().await;
    let strait = Strait::start(&config(""), &[]);
    for _ in 0..2 {
        assert_eq!(
            get(&strait, &format!("http://localhost:{port}/")).await,
            200
        );
    }
    assert_eq!(lookups(&strait, "hosts").await, 2.0);
    assert_eq!(lookups(&strait, "miss").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_builds_a_new_resolver_with_the_new_servers() {
    let (old, new) = (NameServer::start(60).await, NameServer::start(60).await);
    let port = closing_origin().await;
    let strait = Strait::start(&config(&format!("servers = [\"{}\"]", old.addr)), &[]);
    let url = format!("http://e.test:{port}/");
    assert_eq!(get(&strait, &url).await, 200);

    std::fs::write(
        strait.dir.path().join("strait.toml"),
        config(&format!("servers = [\"{}\"]", new.addr)),
    )
    .unwrap();
    strait.signal("HUP");
    strait.wait_for_log("SIGHUP: configuration reloaded").await;
    assert_eq!(get(&strait, &url).await, 200);
    assert_eq!((old.asked("e.test"), new.asked("e.test")), (1, 1));
}

#[tokio::test]
async fn a_bad_name_server_is_a_config_error_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("strait.toml");
    std::fs::write(
        &path,
        "[dns]\ncache_size = 10\nservers = [\"dns.example\"]\n",
    )
    .unwrap();
    let (code, _, stderr) = run_strait(&["--check", "-c", path.to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("strait.toml:3: dns.servers[0]: invalid name server \"dns.example\""),
        "{stderr}"
    );
}
