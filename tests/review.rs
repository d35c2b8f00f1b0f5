//! Findings of an attacker-minded review, each a black-box test of the real binary.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::Engine;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A users-file line as `htpasswd -nbB name password` writes it.
fn bcrypt_line(name: &str, password: &str, cost: u32) -> String {
    let parts = bcrypt::hash_with_result(password, cost).unwrap();
    format!(
        "{name}:{}\n",
        parts.format_for_version(bcrypt::Version::TwoY)
    )
}

/// A forward proxy whose users file holds `users`; the directory holds the file.
fn with_users(users: &str) -> (Strait, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("users");
    std::fs::write(&path, users).unwrap();
    let config = format!(
        "listen = [{{ addr = \"127.0.0.1:0\" }}]\n[log]\naccess = \"off\"\n\
         [forward]\ndeny_targets = []\nusers_file = \"{}\"\n",
        path.display()
    );
    (Strait::start(&config, &[]), dir)
}

/// One forward GET through `proxy` with Basic credentials made of these raw bytes:
/// the status and how long the answer took.
async fn get_with(proxy: SocketAddr, target: &str, credential: &[u8]) -> (u16, Duration) {
    let token = base64::engine::general_purpose::STANDARD.encode(credential);
    let host = target.split('/').nth(2).unwrap();
    let head = format!(
        "GET {target} HTTP/1.1\r\nHost: {host}\r\nProxy-Authorization: Basic {token}\r\n\
         Connection: close\r\n\r\n"
    );
    let start = Instant::now();
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
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

/// Finding: how long a refusal takes told whether the name exists. A credential that
/// is not UTF-8 is checked in two readings (as sent, and as Latin-1), so a wrong
/// password for a real name cost two bcrypt checks while an unknown name was paced
/// to one; and before the first check of the process an unknown name was refused at
/// once while a real one was hashed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_takes_as_long_whether_or_not_the_name_exists() {
    let origin = Origin::start().await;
    let target = format!("{}/", origin.url());
    // Cost 11: a check takes long enough (tens of ms) to stand out from the noise.
    let users = bcrypt_line("alice", "s3cret", 11);

    // The first refusal of a fresh process, for a name that does not exist.
    let (strait, _dir) = with_users(&users);
    let (status, first_ghost) = get_with(strait.addr(), &target, b"ghost:guess").await;
    assert_eq!(status, 407);
    let (status, hashed) = get_with(strait.addr(), &target, b"alice:guess").await;
    assert_eq!(status, 407);
    eprintln!("first refusal, unknown name: {first_ghost:?}; a wrong password: {hashed:?}");
    assert!(
        first_ghost * 2 > hashed,
        "the unknown name was refused in {first_ghost:?}, a real one in {hashed:?}"
    );

    // A password that is not UTF-8 (Latin-1 `é`): two readings to check.
    let mut ghost = Vec::new();
    let mut alice = Vec::new();
    for _ in 0..3 {
        // Spaced so alice's guessing budget (2 a second) never runs out.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let (status, took) = get_with(strait.addr(), &target, b"alice:caf\xe9").await;
        assert_eq!(status, 407);
        alice.push(took);
        let (status, took) = get_with(strait.addr(), &target, b"ghost:caf\xe9").await;
        assert_eq!(status, 407);
        ghost.push(took);
    }
    ghost.sort();
    alice.sort();
    let (ghost, alice) = (ghost[1], alice[1]);
    eprintln!("Latin-1 password: unknown name {ghost:?}, alice {alice:?}");
    assert!(
        ghost * 3 > alice * 2,
        "an unknown name is refused in {ghost:?}, alice's wrong password in {alice:?}"
    );
}
