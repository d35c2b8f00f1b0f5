//! Proxy users from `[forward] users_file`: `htpasswd -B` lines checked with bcrypt or
//! argon2, remembered once good, guessed no faster than a small rate per user, read
//! again on SIGHUP; a bad file is a config error with its file and line.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::Engine;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A users-file line as `htpasswd -nbB name password` writes it (`$2y$`).
fn bcrypt_line(name: &str, password: &str, cost: u32) -> String {
    let parts = bcrypt::hash_with_result(password, cost).unwrap();
    format!(
        "{name}:{}\n",
        parts.format_for_version(bcrypt::Version::TwoY)
    )
}

/// A users-file line with an argon2id PHC string (small parameters, for speed).
fn argon2_line(name: &str, password: &str) -> String {
    use argon2::password_hash::PasswordHasher;
    let params = argon2::Params::new(1024, 2, 1, None).unwrap();
    let hash = argon2::Argon2::from(params)
        .hash_password_with_salt(password.as_bytes(), b"strait-test-salt")
        .unwrap();
    format!("{name}:{hash}\n")
}

/// A forward proxy whose users file holds `users`, with an admin listener for the
/// counters.
struct Proxy {
    strait: Strait,
    /// Holds the users file.
    dir: tempfile::TempDir,
}

impl std::ops::Deref for Proxy {
    type Target = Strait;
    fn deref(&self) -> &Strait {
        &self.strait
    }
}

fn start(users: &str) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("users");
    std::fs::write(&path, users).unwrap();
    let config = format!(
        "listen = [{{ addr = \"127.0.0.1:0\" }}]\n[admin]\naddr = \"127.0.0.1:0\"\n\
         [log]\naccess = \"off\"\n\
         [forward]\ndeny_targets = []\nusers_file = \"{}\"\n",
        path.display()
    );
    let strait = Strait::start(&config, &[]);
    Proxy { strait, dir }
}

fn write_users(proxy: &Proxy, text: &str) {
    std::fs::write(proxy.dir.path().join("users"), text).unwrap();
}

async fn reload(strait: &Strait, outcome: &str) {
    let before = strait.logs().iter().filter(|l| l.contains(outcome)).count();
    strait.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while strait.logs().iter().filter(|l| l.contains(outcome)).count() == before {
        assert!(
            Instant::now() < deadline,
            "no {outcome:?} after SIGHUP: {:#?}",
            strait.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn proxy_url(strait: &Strait, credential: &str) -> String {
    format!("http://{credential}@{}", strait.addr())
}

/// `Proxy-Authorization` for these raw credential bytes.
fn basic(credential: &[u8]) -> String {
    let token = base64::engine::general_purpose::STANDARD.encode(credential);
    format!("Basic {token}")
}

/// One forward GET of `target` through the proxy on its own connection, with this
/// `Proxy-Authorization` (if any): the status and how long it took.
async fn proxied_get(proxy: SocketAddr, target: &str, auth: Option<&str>) -> (u16, Duration) {
    let start = Instant::now();
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let host = target.split('/').nth(2).unwrap();
    let auth = auth
        .map(|a| format!("Proxy-Authorization: {a}\r\n"))
        .unwrap_or_default();
    let head = format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut reply))
        .await
        .expect("an answer within 30 s")
        .unwrap();
    let status = String::from_utf8_lossy(&reply)
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, start.elapsed())
}

/// user + system CPU time of a process, from /proc/PID/stat.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name, which ends with the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after ')'.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bcrypt_and_argon2_users_get_through_and_others_are_challenged_in_utf8() {
    let origin = Origin::start().await;
    let users = format!(
        "# htpasswd -B\n{}{}\n{}",
        bcrypt_line("alice", "s3cret", 4),
        bcrypt_line("bob", "hunter2", 4).replace("$2y$", "$2b$"),
        argon2_line("carol", "argon-pw"),
    );
    let strait = start(&users);
    let target = format!("{}/private", origin.url());

    for user in ["alice:s3cret", "bob:hunter2", "carol:argon-pw"] {
        let out = curl(&["-x", &proxy_url(&strait, user), &target]).await;
        assert_eq!(out.status, 200, "{user}: {out:?}");
        assert_eq!(origin.last().header("proxy-authorization"), None);
    }
    // CONNECT takes the same credentials.
    let out = curl(&["-p", "-x", &proxy_url(&strait, "carol:argon-pw"), &target]).await;
    assert_eq!(out.status, 200, "{out:?}");

    for refused in ["alice:wrong", "carol:s3cret", "mallory:s3cret"] {
        let out = curl(&["-x", &proxy_url(&strait, refused), &target]).await;
        assert_eq!(out.status, 407, "{refused}");
        assert_eq!(
            out.header("proxy-authenticate"),
            Some("Basic realm=\"strait\", charset=\"UTF-8\""),
            "RFC 7617 §2.1"
        );
    }
    let out = curl(&["-x", &strait.url(), &target]).await;
    assert_eq!(out.status, 407);
    assert_eq!(
        origin.seen().len(),
        4,
        "refused requests never reach the origin"
    );
    let checks = |r: &'static str| {
        let strait = &strait;
        async move {
            strait
                .metric(&format!("strait_auth_checks_total{{result=\"{r}\"}}"))
                .await
        }
    };
    assert_eq!(checks("ok").await, 3.0, "carol's CONNECT was remembered");
    assert_eq!(checks("wrong").await, 2.0);
    assert_eq!(checks("unknown_user").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_ascii_password_matches_in_utf8_and_in_latin1() {
    let origin = Origin::start().await;
    let users = bcrypt_line("ren\u{e9}", "cr\u{e8}me br\u{fb}l\u{e9}e", 4);
    let strait = start(&users);
    let target = format!("{}/", origin.url());
    let utf8 = "ren\u{e9}:cr\u{e8}me br\u{fb}l\u{e9}e".as_bytes().to_vec();
    let latin1: Vec<u8> = "ren\u{e9}:cr\u{e8}me br\u{fb}l\u{e9}e"
        .chars()
        .map(|c| u8::try_from(u32::from(c)).unwrap())
        .collect();
    assert_ne!(utf8, latin1);
    for (encoding, credential) in [("UTF-8", &utf8), ("Latin-1", &latin1)] {
        let (status, _) = proxied_get(strait.addr(), &target, Some(&basic(credential))).await;
        assert_eq!(status, 200, "{encoding}");
    }
    // A wrong one in either encoding is still wrong.
    let mut wrong = latin1.clone();
    *wrong.last_mut().unwrap() = b'E';
    let (status, _) = proxied_get(strait.addr(), &target, Some(&basic(&wrong))).await;
    assert_eq!(status, 407);

    // `--user` passwords (plain, from the command line) take both too.
    let plain = Strait::start(
        "listen = [{ addr = \"127.0.0.1:0\" }]\n[forward]\ndeny_targets = []\n",
        &["-u", "ren\u{e9}:cr\u{e8}me br\u{fb}l\u{e9}e"],
    );
    for credential in [&utf8, &latin1] {
        let (status, _) = proxied_get(plain.addr(), &target, Some(&basic(credential))).await;
        assert_eq!(status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reads_the_users_file_again() {
    let origin = Origin::start().await;
    let strait = start(&bcrypt_line("alice", "s3cret", 4));
    let target = format!("{}/", origin.url());
    let alice = proxy_url(&strait, "alice:s3cret");
    let bob = proxy_url(&strait, "bob:hunter2");
    assert_eq!(curl(&["-x", &alice, &target]).await.status, 200);
    assert_eq!(curl(&["-x", &bob, &target]).await.status, 407);

    write_users(&strait, &bcrypt_line("bob", "hunter2", 4));
    reload(&strait, "SIGHUP: configuration reloaded").await;
    assert_eq!(curl(&["-x", &bob, &target]).await.status, 200);
    // Alice was remembered by the old configuration; the new one forgot her.
    assert_eq!(curl(&["-x", &alice, &target]).await.status, 407);

    // A bad file is refused whole: bob goes on as before.
    write_users(&strait, "bob:$apr1$Kx0dQ2Eb$4a2F1y0S0bqYBiY5RHe2c/\n");
    reload(&strait, "SIGHUP: configuration not reloaded").await;
    let line = strait
        .logs()
        .into_iter()
        .rfind(|l| l.contains("not reloaded"))
        .unwrap();
    assert!(line.contains("users:1: forward.users_file:"), "{line}");
    assert_eq!(curl(&["-x", &bob, &target]).await.status, 200);
}

#[test]
fn a_bad_users_file_is_a_config_error_naming_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("strait.toml");
    let users = dir.path().join("users");
    let check = |users_text: &str, toml: &str| {
        std::fs::write(&users, users_text).unwrap();
        std::fs::write(&config, toml).unwrap();
        run_strait(&["--check", "-c", config.to_str().unwrap()])
    };
    let toml = "[forward]\nusers_file = \"users\"\n";
    let good = bcrypt_line("alice", "s3cret", 4);

    let (code, out, err) = check(&good, toml);
    assert_eq!(
        (code, out.trim_end()),
        (0, format!("{}: ok", config.display()).as_str()),
        "{err}"
    );

    for (bad, why) in [
        ("bob:$apr1$Kx0dQ2Eb$4a2F1y0S0bqYBiY5RHe2c/", "MD5"),
        ("bob:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", "SHA-1"),
        ("bob:rl5P7iPmVAn1.", "not a bcrypt or argon2 hash"),
        ("bob", "expected \"name:hash\""),
        ("alice:$2y$04$short", "invalid bcrypt hash"),
    ] {
        let (code, _, err) = check(&format!("# users\n{good}{bad}\n"), toml);
        assert_eq!(code, 2, "{bad}");
        let want = format!("{}:3: forward.users_file: ", users.display());
        assert!(err.contains(&want) && err.contains(why), "{bad}: {err}");
    }
    let (_, _, err) = check("bob:$apr1$Kx0dQ2Eb$4a2F1y0S0bqYBiY5RHe2c/\n", toml);
    assert!(err.contains("htpasswd -B"), "the fix is named: {err}");

    // A missing file: the config file's line with the key, and the path it names.
    std::fs::remove_file(&users).unwrap();
    std::fs::write(&config, format!("# proxy\n{toml}")).unwrap();
    let (code, _, err) = run_strait(&["--check", "-c", config.to_str().unwrap()]);
    assert_eq!(code, 2);
    let want = format!(
        "{}:3: forward.users_file: cannot read the users file {}",
        config.display(),
        users.display()
    );
    assert!(err.contains(&want), "{err}");

    // One name in two places is an error, whichever they are.
    let (code, _, err) = check(
        &good,
        "[forward]\nusers = [\"alice:pw\"]\nusers_file = \"users\"\n",
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("\"alice\"") && err.contains("users:1"),
        "{err}"
    );
    std::fs::write(&config, toml).unwrap();
    let (code, _, err) = run_strait(&["--check", "-c", config.to_str().unwrap(), "-u", "alice:pw"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("\"alice\""), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_once_checked_costs_no_hashing_again() {
    let origin = Origin::start().await;
    // Cost 10, as `htpasswd -B -C 10` writes it: tens of milliseconds a check.
    let strait = start(&bcrypt_line("alice", "s3cret", 10));
    let target = format!("{}/", origin.url());
    let auth = basic(b"alice:s3cret");
    let (status, first) = proxied_get(strait.addr(), &target, Some(&auth)).await;
    assert_eq!(status, 200);
    let mut later = Vec::new();
    for _ in 0..20 {
        let (status, took) = proxied_get(strait.addr(), &target, Some(&auth)).await;
        assert_eq!(status, 200);
        later.push(took);
    }
    let later = median(later);
    eprintln!("first request {first:?}, median of the next 20 {later:?}");
    assert_eq!(
        strait
            .metric("strait_auth_checks_total{result=\"ok\"}")
            .await,
        1.0,
        "one bcrypt check for 21 requests"
    );
    assert!(
        later * 4 < first,
        "remembered: {later:?} against {first:?} for the first"
    );

    // A wrong password for a name that exists is hashed; a name that does not exist
    // is not, yet its refusal takes as long, by a timer.
    let (status, wrong) = proxied_get(strait.addr(), &target, Some(&basic(b"alice:nope"))).await;
    assert_eq!(status, 407);
    let (status, ghost) = proxied_get(strait.addr(), &target, Some(&basic(b"ghost:nope"))).await;
    assert_eq!(status, 407);
    eprintln!("refused: alice's wrong password {wrong:?}, an unknown name {ghost:?}");
    assert!(ghost * 2 > wrong, "unknown {ghost:?}, wrong {wrong:?}");
    assert_eq!(
        strait
            .metric("strait_auth_checks_total{result=\"unknown_user\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_wrong_passwords_is_hashed_at_the_users_rate_and_slows_no_one() {
    let origin = Origin::start().await;
    let users = format!(
        "{}{}",
        bcrypt_line("alice", "s3cret", 10),
        bcrypt_line("bob", "hunter2", 10)
    );
    let strait = start(&users);
    let target = format!("{}/", origin.url());
    let proxy = strait.addr();
    let bob = basic(b"bob:hunter2");

    // Bob's requests alone, once his credential is remembered.
    assert_eq!(proxied_get(proxy, &target, Some(&bob)).await.0, 200);
    let mut quiet = Vec::new();
    for _ in 0..20 {
        let (status, took) = proxied_get(proxy, &target, Some(&bob)).await;
        assert_eq!(status, 200);
        quiet.push(took);
    }

    // 200 different wrong passwords for alice at once, and 200 for names that do
    // not exist; bob's 20 requests meanwhile.
    let cpu_before = cpu_time(strait.pid());
    let start = Instant::now();
    let flood: Vec<_> = (0..400)
        .map(|i| {
            let target = target.clone();
            let name = if i % 2 == 0 { "alice" } else { "nobody" };
            let auth = basic(format!("{name}:guess-{i}").as_bytes());
            tokio::spawn(async move { proxied_get(proxy, &target, Some(&auth)).await })
        })
        .collect();
    let mut busy = Vec::new();
    for _ in 0..20 {
        let (status, took) = proxied_get(proxy, &target, Some(&bob)).await;
        assert_eq!(status, 200);
        busy.push(took);
    }
    let mut refused = Vec::new();
    for f in flood {
        let (status, took) = f.await.unwrap();
        assert_eq!(status, 407);
        refused.push(took);
    }
    let elapsed = start.elapsed();
    let cpu = cpu_time(strait.pid()) - cpu_before;

    let metric = |r: &'static str| {
        let strait = &strait;
        async move {
            strait
                .metric(&format!("strait_auth_checks_total{{result=\"{r}\"}}"))
                .await
        }
    };
    let wrong = metric("wrong").await;
    let limited = metric("rate_limited").await;
    let unknown = metric("unknown_user").await;
    let (quiet_max, busy_max) = (*quiet.iter().max().unwrap(), *busy.iter().max().unwrap());
    eprintln!(
        "bob alone: median {:?} max {quiet_max:?}; during the flood: median {:?} max \
         {busy_max:?}; flood of 400 answered in {elapsed:?} (refusals: median {:?}); \
         bcrypt checks of wrong passwords {wrong}, rate-limited {limited}, unknown names \
         {unknown}; strait CPU during the flood {cpu:?}",
        median(quiet.clone()),
        median(busy.clone()),
        median(refused.clone()),
    );
    // The burst (5) and 2 a second after it; one more for rounding.
    let allowed = 5.0 + 2.0 * elapsed.as_secs_f64() + 1.0;
    assert!(
        wrong <= allowed,
        "{wrong} hashed in {elapsed:?}: at most {allowed}"
    );
    assert_eq!(wrong + limited, 200.0);
    assert_eq!(unknown, 200.0);
    assert!(
        busy_max < Duration::from_secs(1),
        "bob's requests during the flood: max {busy_max:?}"
    );
    // Refusals take about as long as a hash check, by a timer: names that exist do
    // not answer slower than names that do not.
    let (alice_refusals, nobody_refusals): (Vec<_>, Vec<_>) =
        refused.iter().enumerate().partition(|(i, _)| i % 2 == 0);
    let alice_refusals = median(alice_refusals.into_iter().map(|(_, d)| *d).collect());
    let nobody_refusals = median(nobody_refusals.into_iter().map(|(_, d)| *d).collect());
    eprintln!("refusal medians: alice {alice_refusals:?}, unknown names {nobody_refusals:?}");
    assert!(
        nobody_refusals * 3 > alice_refusals && alice_refusals * 3 > nobody_refusals,
        "alice {alice_refusals:?}, unknown {nobody_refusals:?}"
    );
}
