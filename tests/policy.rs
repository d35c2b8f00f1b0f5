//! The forward proxy's policy as a team runs it: which clients may use it, which names
//! and addresses it may reach, and the refusal of an open proxy on the network. Exact
//! request bytes where a client (curl) would rewrite what is sent.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::*;

const LOCAL: &str = "listen = [{ addr = \"127.0.0.1:0\" }]\n";

/// Sends one absolute-form GET for `http://{authority}/` and returns the raw reply.
async fn get_via(strait: &Strait, authority: &str) -> String {
    let req = format!(
        "GET http://{authority}/ HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    );
    raw_exchange(strait.addr(), req.as_bytes(), Duration::from_secs(5)).await
}

/// Sends one CONNECT for `authority` and returns the raw reply head.
async fn connect_via(strait: &Strait, authority: &str) -> String {
    use tokio::io::AsyncWriteExt;
    let req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    let mut s = tokio::net::TcpStream::connect(strait.addr()).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    read_until(&mut s, |t| t.contains("\r\n\r\n")).await
}

fn status(reply: &str) -> u16 {
    reply
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {reply:?}"))
}

/// A server on every IPv4 interface (0.0.0.0), as many local services listen: the one
/// the `0.0.0.0` bypass reached.
async fn origin_on_any() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nlocal",
                    )
                    .await;
            });
        }
    });
    (SocketAddr::from(([127, 0, 0, 1], port)), accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spelling_of_this_host_is_refused_by_default() {
    let (origin, accepted) = origin_on_any().await;
    let port = origin.port();

    // The bypass is real: with no deny_targets, 0.0.0.0 reaches the local service.
    let open = Strait::start(&format!("{LOCAL}[forward]\ndeny_targets = []\n"), &[]);
    let reply = get_via(&open, &format!("0.0.0.0:{port}")).await;
    assert_eq!(status(&reply), 200, "{reply}");
    assert!(reply.ends_with("local"), "{reply}");
    let reached = accepted.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(reached, 1);

    let strait = Strait::start(LOCAL, &[]);
    let mut spellings: Vec<String> = [
        "127.0.0.1",
        "127.1",
        "127.0.1",
        "2130706433",
        "0x7f000001",
        "0x7F.1",
        "0177.0.0.1",
        "0177.1",
        "017700000001",
        "127.0.0.1.",
        "127.255.255.254",
        "0.0.0.0",
        "0",
        "0x0",
        "0.0.0.0.",
        "00.0.0.0",
        "[::1]",
        "[::]",
        "[0:0:0:0:0:0:0:1]",
        "[::ffff:127.0.0.1]",
        "[::ffff:7f00:1]",
        "[::ffff:0.0.0.0]",
        "[::127.0.0.1]",
        "[::7f00:1]",
        "localhost",
        "LOCALHOST",
    ]
    .map(str::to_owned)
    .to_vec();
    // The host's own interface addresses reach it too.
    for a in if_addrs::get_if_addrs().unwrap() {
        match a.ip() {
            std::net::IpAddr::V4(v4) => spellings.push(v4.to_string()),
            std::net::IpAddr::V6(v6) if !v6.is_unicast_link_local() => {
                spellings.push(format!("[{v6}]"))
            }
            _ => {}
        }
    }
    for host in &spellings {
        let authority = format!("{host}:{port}");
        let reply = get_via(&strait, &authority).await;
        assert_eq!(status(&reply), 403, "GET {authority}: {reply}");
        assert!(reply.contains("deny_targets"), "{reply}");
        let reply = connect_via(&strait, &authority).await;
        assert_eq!(status(&reply), 403, "CONNECT {authority}: {reply}");
    }
    // A name with a final dot is looked up as written: `localhost.` is in no hosts
    // file, so it resolves to nothing rather than to loopback; refused either way.
    let reply = get_via(&strait, &format!("localhost.:{port}")).await;
    assert!(matches!(status(&reply), 403 | 502), "{reply}");
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        reached,
        "no spelling reached the local service"
    );
    // The log names the address connected to and the rule.
    let logs = strait.logs().join("\n");
    assert!(
        logs.contains("target address 0.0.0.0 is in deny_targets (\"unspecified\")"),
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_ends_in_a_number_but_is_no_address_is_a_bad_request() {
    let strait = Strait::start(&format!("{LOCAL}[forward]\ndeny_targets = []\n"), &[]);
    for host in [
        "256.0.0.1",
        "1.2.3.4.5",
        "4294967296",
        "08.1",
        "example.0x",
        "1.2.65536",
    ] {
        let reply = get_via(&strait, &format!("{host}:80")).await;
        assert_eq!(status(&reply), 400, "{host}: {reply}");
        let reply = connect_via(&strait, &format!("{host}:443")).await;
        assert_eq!(status(&reply), 400, "CONNECT {host}: {reply}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loose_spellings_reach_the_address_they_spell_when_allowed() {
    let origin = Origin::start().await;
    let port = origin.addr.port();
    let strait = Strait::start(&format!("{LOCAL}[forward]\ndeny_targets = []\n"), &[]);
    for host in ["127.1", "2130706433", "0x7f000001", "0177.0.0.1"] {
        let reply = get_via(&strait, &format!("{host}:{port}")).await;
        assert_eq!(status(&reply), 200, "{host}: {reply}");
    }
    assert_eq!(origin.seen().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_targets_takes_named_groups() {
    let origin = Origin::start().await;
    let target = format!("{}/", origin.url());
    let strait = Strait::start(
        &format!("{LOCAL}[forward]\ndeny_targets = [\"private\", \"multicast\", \"link-local\"]\n"),
        &[],
    );
    assert_eq!(curl(&["-x", &strait.url(), &target]).await.status, 200);
    for host in [
        "10.1.2.3",
        "192.168.1.1",
        "172.16.0.1",
        "100.64.0.1",
        "239.0.0.1",
        "169.254.169.254",
    ] {
        let reply = get_via(&strait, &format!("{host}:80")).await;
        assert_eq!(status(&reply), 403, "{host}: {reply}");
    }
    let reply = get_via(&strait, "[fd00::1]:80").await;
    assert!(reply.contains("(\"private\")"), "{reply}");

    let strait = Strait::start(
        &format!("{LOCAL}[forward]\ndeny_targets = [\"loopback\"]\n"),
        &[],
    );
    let out = curl(&["-x", &strait.url(), &target]).await;
    assert_eq!(out.status, 403);
    assert!(out.text().contains("(\"loopback\")"), "{}", out.text());

    let (code, err) = check("[forward]\ndeny_targets = [\"10.0.0.0/8\", \"internal\"]\n");
    assert_eq!(code, 2);
    assert!(err.contains("forward.deny_targets"), "{err}");
    assert!(
        err.contains("\"private\""),
        "the error lists the groups: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_outside_allow_clients_are_refused_before_any_auth_exchange() {
    let origin = Origin::start().await;
    let target = format!("{}/", origin.url());
    let config = format!(
        "{LOCAL}admin = {{ addr = \"127.0.0.1:0\" }}\n[forward]\ndeny_targets = []\nallow_clients = [\"10.0.0.0/8\", \"192.168.0.0/16\"]\nusers = [\"alice:pw\"]\n"
    );
    let strait = Strait::start(&config, &[]);
    for proxy in [strait.url(), format!("http://alice:pw@{}", strait.addr())] {
        let out = curl(&["-x", &proxy, &target]).await;
        assert_eq!(out.status, 403, "{out:?}");
        assert!(out.header("proxy-authenticate").is_none(), "{out:?}");
        assert!(out.text().contains("allow_clients"), "{}", out.text());
        let out = curl(&["-p", "-x", &proxy, &target]).await;
        assert_eq!(out.exit, 56, "CONNECT refused: {out:?}");
    }
    assert_eq!(origin.connections(), 0);
    strait
        .wait_for_log("denied: this client's address is not in allow_clients")
        .await;
    let refused = strait
        .metric("strait_requests_total{kind=\"forward\",route=\"-\",code=\"403\"}")
        .await;
    assert_eq!(refused, 2.0);

    // Loopback clients let in by name; credentials still asked for after that.
    let config = format!(
        "{LOCAL}[forward]\ndeny_targets = []\nallow_clients = [\"loopback\"]\nusers = [\"alice:pw\"]\n"
    );
    let strait = Strait::start(&config, &[]);
    assert_eq!(curl(&["-x", &strait.url(), &target]).await.status, 407);
    let proxy = format!("http://alice:pw@{}", strait.addr());
    assert_eq!(curl(&["-x", &proxy, &target]).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hidden_proxy_answers_outside_clients_as_a_web_server() {
    let origin = Origin::start().await;
    let config = format!(
        "{LOCAL}[forward]\ndeny_targets = []\nhide = true\nallow_clients = [\"10.0.0.0/8\"]\n"
    );
    let strait = Strait::start(&config, &[]);
    let out = curl(&["-x", &strait.url(), &format!("{}/", origin.url())]).await;
    assert_eq!(out.status, 404, "{out:?}");
    assert!(!out.text().contains("allow_clients"));
    assert_eq!(origin.connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domain_lists_refuse_by_name_before_dns() {
    let origin = Origin::start().await;
    let port = origin.addr.port();
    let config = format!(
        "{LOCAL}[forward]\ndeny_targets = []\nallow_domains = [\"localhost\", \"*.test\"]\ndeny_domains = [\"*.ads.test\", \"bad.test\"]\n"
    );
    let strait = Strait::start(&config, &[]);
    // Allowed by name.
    let reply = get_via(&strait, &format!("localhost:{port}")).await;
    assert_eq!(status(&reply), 200, "{reply}");
    let reply = connect_via(&strait, &format!("LocalHost:{port}")).await;
    assert_eq!(status(&reply), 200, "{reply}");
    // Denied names never reach DNS (none of them resolves: a lookup would be a 502).
    for (host, rule) in [
        ("bad.test", "deny_domains (\"bad.test\")"),
        ("BAD.test.", "deny_domains (\"bad.test\")"),
        ("x.ads.test", "deny_domains (\"*.ads.test\")"),
        ("a.b.ads.test", "deny_domains (\"*.ads.test\")"),
        ("example.com", "not in allow_domains"),
        ("test", "not in allow_domains"),
        ("127.0.0.1", "not in allow_domains"),
        ("2130706433", "not in allow_domains"),
        ("[::1]", "not in allow_domains"),
    ] {
        let reply = get_via(&strait, &format!("{host}:{port}")).await;
        assert_eq!(status(&reply), 403, "{host}: {reply}");
        assert!(reply.contains(rule), "{host}: {reply}");
        let reply = connect_via(&strait, &format!("{host}:{port}")).await;
        assert_eq!(status(&reply), 403, "CONNECT {host}: {reply}");
    }
    // Allowed by the list but not resolvable: DNS was asked, and failed.
    let reply = get_via(&strait, "nowhere.test:80").await;
    assert_eq!(status(&reply), 502, "{reply}");
    assert_eq!(origin.seen().len(), 1);

    let (code, err) = check("[forward]\nallow_domains = [\"ok.example\", \"*.\"]\n");
    assert_eq!(code, 2);
    assert!(
        err.contains("strait.toml:2: forward.allow_domains"),
        "{err}"
    );
}

fn check(config: &str) -> (i32, String) {
    check_config(config)
}

#[test]
fn an_open_forward_proxy_on_the_network_needs_open_true() {
    let exposed = "[[listen]]\naddr = \"127.0.0.1:0\"\n[[listen]]\naddr = \"0.0.0.0:0\"\n";
    let (code, err) = check(exposed);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("strait.toml:4: listen[1].addr: 0.0.0.0:0"),
        "{err}"
    );
    for fix in ["users", "allow_clients", "open = true"] {
        assert!(err.contains(fix), "the error names {fix}: {err}");
    }
    for fix in [
        "[forward]\nopen = true\n",
        "[forward]\nusers = [\"a:b\"]\n",
        "[forward]\nallow_clients = [\"10.0.0.0/8\"]\n",
        "[forward]\nenabled = false\n",
    ] {
        let (code, err) = check(&format!("{exposed}{fix}"));
        assert_eq!(code, 0, "{fix}: {err}");
    }
    let (code, err) = check("[[listen]]\naddr = \"[::]:0\"\n");
    assert_eq!(code, 2, "{err}");
    assert!(check("[[listen]]\naddr = \"[::1]:0\"\n").0 == 0);

    // The command line: -l on the network needs -u (or a config that allows it).
    let (code, _, err) = run_strait(&["-l", "0.0.0.0:0", "--check"]);
    assert_eq!(code, 2);
    assert!(err.contains("--listen: 0.0.0.0:0"), "{err}");
    let (code, _, err) = run_strait(&["-l", "0.0.0.0:0", "-u", "a:b", "--check"]);
    assert_eq!(code, 0, "{err}");
}
