//! Forward-proxy Basic authentication (RFC 7617 over `Proxy-Authorization`).
//!
//! A request's credential takes one of two paths:
//! - **remembered**: a credential that passed a check is kept as its HMAC-SHA256 under
//!   a key drawn when the users are loaded (never the password, never the token), in a
//!   map read without a lock. Such a request costs one HMAC and one lookup: no hash, no
//!   blocking thread, no wait. The map is bounded and starts empty at each reload.
//! - **checked**: anything else is decoded and checked. A plain password (`users`,
//!   `--user`) is compared in constant time, inline. A hash (`users_file`: bcrypt,
//!   argon2) is verified on tokio's blocking pool, at most [`slots`] at once across the
//!   process, so wrong passwords cannot take every blocking thread or every core; a
//!   check that waits [`SLOT_WAIT`] for a slot is answered 503. Requests carrying the
//!   same credential at the same moment (a browser opening six connections) share one
//!   check.
//!
//! Guessing is slowed per user: each user has a bucket of [`BURST`] checks refilled at
//! [`RATE`] a second; a check that fails keeps its token, one that succeeds gives it
//! back. With the bucket empty a credential for that user is refused (407) without
//! being hashed at all, right or wrong: a user whose password is being guessed may
//! have to retry a first login, while every credential already remembered goes on
//! working.
//!
//! Names are not checked against a hash unless they exist, and a refusal does not tell
//! whether the name exists: when any user has a hash, every refusal of a presented
//! credential (unknown name, wrong password, empty bucket) is answered no sooner than
//! the hash checks of a wrong password for that name take (a moving average of the
//! recent ones, times the readings checked: two for a password that is not UTF-8), by
//! a timer, not by work; before any check has been timed, by a check in vain.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use base64::Engine;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use http::HeaderMap;
use http::header::PROXY_AUTHORIZATION;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use ring::hmac;
use tokio::sync::{OnceCell, Semaphore};
use tokio::time::Instant;

use crate::config::{self, PasswordHash};
use crate::metrics::{AuthLabels, Metrics};

/// Checks of one user's credentials that may run back to back before [`RATE`] paces
/// them.
pub const BURST: f64 = 5.0;
/// Checks a second per user once [`BURST`] is spent on wrong passwords.
pub const RATE: f64 = 2.0;
/// How long a check waits for a hashing slot before the request is answered 503.
pub const SLOT_WAIT: Duration = Duration::from_secs(2);

/// Remembered credentials kept at most, unless the users are more: twice their number
/// (a client that sends UTF-8 and one that sends Latin-1 make two).
const REMEMBERED_MIN: usize = 1024;

/// How many bytes of a password bcrypt reads; the rest never changes its result.
const BCRYPT_READS: usize = 72;

/// A credential's HMAC-SHA256 under [`Auth::key`].
type Digest = [u8; 32];

/// The users and what was learnt about their credentials.
pub struct Auth {
    /// Drawn at each load: a digest means nothing outside this process and this
    /// configuration.
    key: hmac::Key,
    users: HashMap<String, Account>,
    remembered: ArcSwap<HashMap<Digest, Arc<str>, foldhash::fast::RandomState>>,
    remembered_max: usize,
    /// Checks under way, so that the same credential sent again meanwhile waits for
    /// the answer rather than hashing again.
    in_flight: Mutex<HashMap<Digest, Arc<Flight>>>,
    /// Some user has a hash: refusals take as long as a hash check. The hash is one
    /// of theirs, checked in vain by a refusal that comes before any check was timed.
    pace: Option<Arc<PasswordHash>>,
    checks: Family<AuthLabels, Counter>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("users", &self.users.len())
            .finish_non_exhaustive()
    }
}

/// One user: its name as labels carry it, its secret, its guessing budget.
struct Account {
    name: Arc<str>,
    secret: Secret,
    bucket: Mutex<Bucket>,
}

enum Secret {
    /// A plain password, kept as its HMAC so the comparison is `hmac::verify`'s,
    /// constant in time.
    Plain(hmac::Tag),
    Hashed(Arc<PasswordHash>),
}

/// What a request presented.
pub enum Presented {
    /// No Basic credentials (or undecodable ones).
    Nothing,
    /// A credential that passed a check before.
    Remembered(Arc<str>),
    /// A credential to check with [`Auth::check`].
    Unchecked(Credential),
}

/// A decoded credential awaiting its check.
pub struct Credential {
    digest: Digest,
    /// `user-id:password` as the client sent it (RFC 7617 §2).
    decoded: Vec<u8>,
}

/// The answer to a check.
pub enum Verdict {
    User(Arc<str>),
    /// 407.
    Refused,
    /// Every hashing slot stayed taken for [`SLOT_WAIT`]: 503.
    Busy,
}

/// What one check found; shared by the requests that waited on it.
#[derive(Clone)]
enum Outcome {
    Granted(Arc<str>),
    Wrong,
    Unknown,
    Limited,
    Busy,
}

impl Outcome {
    fn label(&self) -> &'static str {
        match self {
            Outcome::Granted(_) => "ok",
            Outcome::Wrong => "wrong",
            Outcome::Unknown => "unknown_user",
            Outcome::Limited => "rate_limited",
            Outcome::Busy => "busy",
        }
    }
}

type Flight = OnceCell<Outcome>;

impl Auth {
    /// `None` when there are no users and no users file: the proxy is open. A users
    /// file that names no one refuses everyone.
    pub fn new(cfg: &config::Forward, metrics: &Metrics) -> Option<Arc<Auth>> {
        if cfg.users.is_empty() && cfg.users_file.is_none() {
            return None;
        }
        let rng = ring::rand::SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng)
            .expect("the system's random source works (ring reads getrandom)");
        let mut users = HashMap::new();
        for u in &cfg.users {
            let tag = hmac::sign(&key, u.password.as_bytes());
            users.insert(u.name.clone(), Account::new(&u.name, Secret::Plain(tag)));
        }
        for u in &cfg.file_users {
            let secret = Secret::Hashed(Arc::new(u.hash.clone()));
            users.insert(u.name.clone(), Account::new(&u.name, secret));
        }
        Some(Arc::new(Auth {
            key,
            remembered: ArcSwap::default(),
            remembered_max: (users.len() * 2).max(REMEMBERED_MIN),
            in_flight: Mutex::default(),
            pace: cfg.file_users.first().map(|u| Arc::new(u.hash.clone())),
            users,
            checks: metrics.auth_checks.clone(),
        }))
    }

    /// The fast path: what the request presented, and whether it was seen to be good
    /// before. No hashing, no lock.
    pub fn presented(&self, headers: &HeaderMap) -> Presented {
        let Some(value) = headers.get(PROXY_AUTHORIZATION) else {
            return Presented::Nothing;
        };
        let Some((scheme, token)) = split_once(value.as_bytes(), b' ') else {
            return Presented::Nothing;
        };
        if !scheme.eq_ignore_ascii_case(b"basic") {
            return Presented::Nothing;
        }
        let token = token.trim_ascii();
        let mut digest = [0u8; 32];
        digest.copy_from_slice(hmac::sign(&self.key, token).as_ref());
        if let Some(user) = self.remembered.load().get(&digest) {
            return Presented::Remembered(user.clone());
        }
        match BASE64.decode(token) {
            Ok(decoded) => Presented::Unchecked(Credential { digest, decoded }),
            Err(_) => Presented::Nothing,
        }
    }

    /// The slow path: checks a credential [`presented`](Self::presented) did not know.
    pub async fn check(self: &Arc<Self>, cred: Credential) -> Verdict {
        let start = Instant::now();
        // As many hashes as a wrong password for the name would cost, whether or not
        // the name exists: it depends on the credential's bytes alone.
        let hashes = hashes_for(&cred.decoded);
        let outcome = self.shared_check(cred).await;
        match outcome {
            Outcome::Granted(user) => Verdict::User(user),
            Outcome::Busy => Verdict::Busy,
            Outcome::Wrong | Outcome::Unknown | Outcome::Limited => {
                if let Some(decoy) = &self.pace {
                    let typical = typical_hash_time();
                    if typical.is_zero() {
                        // No check has been timed yet, so there is nothing to pace by:
                        // hash in vain (and time it), as a name that exists would be.
                        let _ = verify_hash(decoy.clone(), vec![Vec::new(); hashes as usize]).await;
                    } else {
                        tokio::time::sleep_until(start + typical * hashes).await;
                    }
                }
                Verdict::Refused
            }
        }
    }

    /// Joins the check of the same credential under way, or starts it.
    async fn shared_check(self: &Arc<Self>, cred: Credential) -> Outcome {
        let flight = {
            let mut in_flight = self.in_flight.lock().expect("no panic under this lock");
            in_flight.entry(cred.digest).or_default().clone()
        }; // in_flight lock released here
        let _leave = Leave {
            auth: self,
            digest: cred.digest,
            flight: &flight,
        };
        // If the request that started the check goes away, the next one waiting
        // carries it on with its own copy of the same credential.
        flight.get_or_init(|| self.check_alone(&cred)).await.clone()
    }

    /// One check, start to end.
    async fn check_alone(self: &Arc<Self>, cred: &Credential) -> Outcome {
        // Answered by a check that ended between `presented` and joining this one.
        if let Some(user) = self.remembered.load().get(&cred.digest) {
            return Outcome::Granted(user.clone());
        }
        let outcome = self.decide(cred).await;
        self.checks
            .get_or_create(&AuthLabels {
                result: outcome.label(),
            })
            .inc();
        if let Outcome::Granted(user) = &outcome {
            self.remember(cred.digest, user);
        }
        outcome
    }

    async fn decide(&self, cred: &Credential) -> Outcome {
        let tries = readings(&cred.decoded);
        let Some(account) = tries.iter().find_map(|(name, _)| self.users.get(name)) else {
            return Outcome::Unknown;
        };
        let passwords: Vec<Vec<u8>> = tries
            .into_iter()
            .filter(|(name, _)| name.as_str() == &*account.name)
            .map(|(_, password)| password)
            .collect();
        if !account
            .bucket
            .lock()
            .expect("no panic under this lock")
            .take()
        {
            return Outcome::Limited;
        } // bucket lock released here
        // bcrypt reads the first 72 bytes of a password: past them any suffix passes,
        // each a new credential. Giving the turn back for those would let one user
        // keep the hashing slots busy without end; they spend turns as wrong ones do.
        let endless = matches!(&account.secret, Secret::Hashed(h) if matches!(**h, PasswordHash::Bcrypt(_)))
            && passwords.iter().any(|p| p.len() > BCRYPT_READS);
        let good = match &account.secret {
            Secret::Plain(tag) => passwords
                .iter()
                .any(|p| hmac::verify(&self.key, p, tag.as_ref()).is_ok()),
            Secret::Hashed(hash) => match verify_hash(hash.clone(), passwords).await {
                Some(good) => good,
                None => {
                    account
                        .bucket
                        .lock()
                        .expect("no panic under this lock")
                        .give_back();
                    return Outcome::Busy;
                }
            },
        };
        if good {
            if !endless {
                account
                    .bucket
                    .lock()
                    .expect("no panic under this lock")
                    .give_back();
            }
            Outcome::Granted(account.name.clone())
        } else {
            Outcome::Wrong
        }
    }

    fn remember(&self, digest: Digest, user: &Arc<str>) {
        // Copy on write: a new credential is rare, a lookup is every request.
        self.remembered.rcu(|map| {
            let mut map = if map.len() >= self.remembered_max {
                HashMap::default()
            } else {
                HashMap::clone(map)
            };
            map.insert(digest, user.clone());
            map
        });
    }
}

impl Account {
    fn new(name: &str, secret: Secret) -> Account {
        Account {
            name: Arc::from(name),
            secret,
            bucket: Mutex::new(Bucket {
                tokens: BURST,
                at: Instant::now(),
            }),
        }
    }
}

/// Takes a check out of the in-flight map when it is answered, or when the last
/// request waiting for it is gone.
struct Leave<'a> {
    auth: &'a Auth,
    digest: Digest,
    flight: &'a Arc<Flight>,
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        let mut in_flight = self
            .auth
            .in_flight
            .lock()
            .expect("no panic under this lock");
        if let Some(f) = in_flight.get(&self.digest)
            && Arc::ptr_eq(f, self.flight)
            // Two: the map's and this request's; clones are only made under this lock.
            && (self.flight.initialized() || Arc::strong_count(self.flight) == 2)
        {
            in_flight.remove(&self.digest);
        }
    } // in_flight lock released here
}

/// A user's budget of checks: [`BURST`] tokens, refilled at [`RATE`] a second.
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * RATE;
        self.tokens = (self.tokens + refill).min(BURST);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn give_back(&mut self) {
        self.tokens = (self.tokens + 1.0).min(BURST);
    }
}

/// Base64 as RFC 4648 §4 has it, with or without the trailing `=`: some clients drop it.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The `(user-id, password)` readings of a decoded credential. RFC 7617 §2.1: with
/// `charset="UTF-8"` in the challenge a client sends UTF-8; older ones send their
/// own charset, most often ISO-8859-1. Bytes that are UTF-8 are taken as they are;
/// others are tried as sent and also read as ISO-8859-1 (each byte the code point of
/// the same value), so `é` sent as 0xE9 matches a password written in UTF-8.
fn readings(decoded: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::with_capacity(2);
    let Some(colon) = decoded.iter().position(|&b| b == b':') else {
        return out;
    };
    let (name, password) = (&decoded[..colon], &decoded[colon + 1..]);
    if let Ok(name) = std::str::from_utf8(name) {
        out.push((name.to_owned(), password.to_vec()));
    }
    if std::str::from_utf8(decoded).is_err() {
        let latin1 = |b: &[u8]| b.iter().map(|&c| char::from(c)).collect::<String>();
        out.push((latin1(name), latin1(password).into_bytes()));
    }
    out
}

/// How many passwords [`Auth::decide`] checks against a name's hash for a credential
/// with these bytes: its readings that carry the first reading's name (two when a
/// password that is not UTF-8 is also read as Latin-1 under an ASCII name). At least
/// one, so a refusal is paced like a check even when the bytes make no reading.
fn hashes_for(decoded: &[u8]) -> u32 {
    let tries = readings(decoded);
    let count = match tries.first() {
        Some((first, _)) => tries.iter().filter(|(name, _)| name == first).count(),
        None => 1,
    };
    u32::try_from(count).unwrap_or(1).max(1)
}

/// Verifies passwords against a hash on the blocking pool, in one of [`slots`].
/// `None` when no slot came free within [`SLOT_WAIT`].
async fn verify_hash(hash: Arc<PasswordHash>, passwords: Vec<Vec<u8>>) -> Option<bool> {
    let slot = tokio::time::timeout(SLOT_WAIT, slots().clone().acquire_owned())
        .await
        .ok()?
        .expect("the slots semaphore is never closed");
    let task = tokio::task::spawn_blocking(move || {
        // The slot is held until the hashing ends, even if the request is gone.
        let _slot = slot;
        let mut good = false;
        for p in &passwords {
            let start = std::time::Instant::now();
            good |= hash.verify(p);
            note_hash_time(start.elapsed());
        }
        good
    });
    // A panic in the hashing refuses the credential.
    Some(task.await.unwrap_or(false))
}

/// Hashing slots across the process, kept across reloads so a reload does not add
/// slots while the old configuration's checks finish: half the cores, 2 to 8.
fn slots() -> &'static Arc<Semaphore> {
    static SLOTS: LazyLock<Arc<Semaphore>> = LazyLock::new(|| {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Arc::new(Semaphore::new(cores.div_ceil(2).clamp(2, 8)))
    });
    &SLOTS
}

/// A moving average of hash check times, in microseconds (0 until the first).
static HASH_MICROS: AtomicU64 = AtomicU64::new(0);

fn note_hash_time(took: Duration) {
    let sample = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
    // Races lose a sample at worst.
    let old = HASH_MICROS.load(Ordering::Relaxed);
    let new = if old == 0 {
        sample
    } else {
        (old * 7 + sample) / 8
    };
    HASH_MICROS.store(new, Ordering::Relaxed);
}

fn typical_hash_time() -> Duration {
    Duration::from_micros(HASH_MICROS.load(Ordering::Relaxed))
}

fn split_once(s: &[u8], sep: u8) -> Option<(&[u8], &[u8])> {
    let i = s.iter().position(|&b| b == sep)?;
    Some((&s[..i], &s[i + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(users: &[&str], file_users: &[(&str, &str)]) -> Arc<Auth> {
        let mut cfg = config::Forward {
            users: users.iter().map(|u| u.parse().unwrap()).collect(),
            ..Default::default()
        };
        for (name, password) in file_users {
            cfg.users_file = Some("users".into());
            cfg.file_users.push(config::FileUser {
                name: name.to_string(),
                hash: bcrypt::hash(password, 4).unwrap().parse().unwrap(),
                line: 1,
            });
        }
        let metrics = Metrics::new(Default::default(), Default::default());
        Auth::new(&cfg, &metrics).unwrap()
    }

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(PROXY_AUTHORIZATION, value.parse().unwrap());
        h
    }

    fn basic(credential: &[u8]) -> HeaderMap {
        let token = base64::engine::general_purpose::STANDARD.encode(credential);
        headers(&format!("Basic {token}"))
    }

    async fn user(auth: &Arc<Auth>, h: &HeaderMap) -> Option<String> {
        match auth.presented(h) {
            Presented::Nothing => None,
            Presented::Remembered(u) => Some(u.to_string()),
            Presented::Unchecked(c) => match auth.check(c).await {
                Verdict::User(u) => Some(u.to_string()),
                Verdict::Refused | Verdict::Busy => None,
            },
        }
    }

    #[tokio::test]
    async fn each_user_is_recognised_and_others_are_not() {
        let auth = auth(&["alice:s3cret", "bob:pa:ss"], &[]);
        assert_eq!(user(&auth, &HeaderMap::new()).await, None);
        let alice = headers("Basic YWxpY2U6czNjcmV0");
        assert_eq!(user(&auth, &alice).await.as_deref(), Some("alice"));
        let bob = headers("basic  Ym9iOnBhOnNz ");
        assert_eq!(user(&auth, &bob).await.as_deref(), Some("bob"));
        // Without its padding the token still decodes.
        let unpadded = basic(b"bob:pa:ss");
        let unpadded = unpadded[PROXY_AUTHORIZATION].to_str().unwrap();
        let unpadded = headers(unpadded.trim_end_matches('='));
        assert_eq!(user(&auth, &unpadded).await.as_deref(), Some("bob"));
        for refused in [
            "Basic YWxpY2U6d3Jvbmc=",
            "Bearer YWxpY2U6czNjcmV0",
            "Basic !!!",
            "Basic",
        ] {
            assert_eq!(user(&auth, &headers(refused)).await, None, "{refused}");
        }
    }

    #[tokio::test]
    async fn a_credential_once_checked_is_remembered_by_its_digest_alone() {
        let auth = auth(&[], &[("alice", "s3cret")]);
        let h = basic(b"alice:s3cret");
        assert!(matches!(auth.presented(&h), Presented::Unchecked(_)));
        assert_eq!(user(&auth, &h).await.as_deref(), Some("alice"));
        assert!(matches!(auth.presented(&h), Presented::Remembered(_)));
        // A wrong one is not remembered, and nothing holds the password.
        let wrong = basic(b"alice:s3cre");
        assert_eq!(user(&auth, &wrong).await, None);
        assert!(matches!(auth.presented(&wrong), Presented::Unchecked(_)));
        let map = auth.remembered.load();
        assert_eq!(map.len(), 1);
        assert!(map.values().all(|u| &**u == "alice"));
    }

    #[tokio::test]
    async fn utf8_and_latin1_encodings_of_a_password_both_match() {
        let auth = auth(&["jos\u{e9}:caf\u{e9}"], &[("ren\u{e9}", "cr\u{e8}me")]);
        for (credential, who) in [
            (&b"jos\xc3\xa9:caf\xc3\xa9"[..], "jos\u{e9}"),
            (&b"jos\xe9:caf\xe9"[..], "jos\u{e9}"),
            (&b"ren\xc3\xa9:cr\xc3\xa8me"[..], "ren\u{e9}"),
            (&b"ren\xe9:cr\xe8me"[..], "ren\u{e9}"),
        ] {
            let got = user(&auth, &basic(credential)).await;
            assert_eq!(got.as_deref(), Some(who), "{credential:?}");
        }
        // Latin-1 bytes of a different password are still wrong.
        assert_eq!(user(&auth, &basic(b"jos\xe9:caf\xe8")).await, None);
    }

    #[tokio::test]
    async fn readings_of_utf8_are_one_and_of_other_bytes_two() {
        assert_eq!(readings(b"a:b"), [("a".to_owned(), b"b".to_vec())]);
        assert_eq!(
            readings(b"a:\xe9"),
            [
                ("a".to_owned(), b"\xe9".to_vec()),
                ("a".to_owned(), "\u{e9}".as_bytes().to_vec())
            ]
        );
        assert!(readings(b"no colon").is_empty());
    }

    #[test]
    fn refusals_are_paced_by_the_hashes_the_bytes_would_cost() {
        assert_eq!(hashes_for(b"a:b"), 1);
        // An ASCII name with a password that is not UTF-8: both readings are its.
        assert_eq!(hashes_for(b"a:\xe9"), 2);
        // A UTF-8 name that is not ASCII: its Latin-1 reading is another name.
        assert_eq!(hashes_for(b"\xc3\xa9:\xe9"), 1);
        assert_eq!(hashes_for(b"\xe9:b"), 1);
        assert_eq!(hashes_for(b"no colon"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn wrong_passwords_spend_the_users_bucket_and_right_ones_do_not() {
        let auth = auth(&["alice:s3cret", "bob:hunter2"], &[]);
        let right = basic(b"alice:s3cret");
        for i in 0..BURST as usize {
            let wrong = basic(format!("alice:guess{i}").as_bytes());
            assert_eq!(user(&auth, &wrong).await, None);
        }
        let count = |result| auth.checks.get_or_create(&AuthLabels { result }).get();
        assert_eq!(count("wrong"), BURST as u64);
        // The bucket is empty: even the right password is not checked now.
        assert_eq!(user(&auth, &right).await, None);
        assert_eq!(count("rate_limited"), 1);
        // Another user is not affected.
        let bob = basic(b"bob:hunter2");
        assert_eq!(user(&auth, &bob).await.as_deref(), Some("bob"));
        // Half a second later one token is back (RATE = 2/s).
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(user(&auth, &right).await.as_deref(), Some("alice"));
        // Remembered from now on, whatever the bucket holds.
        for i in 0..3 {
            let wrong = basic(format!("alice:again{i}").as_bytes());
            assert_eq!(user(&auth, &wrong).await, None);
        }
        assert_eq!(user(&auth, &right).await.as_deref(), Some("alice"));
    }

    #[tokio::test(start_paused = true)]
    async fn suffixes_past_bcrypts_72_bytes_spend_turns_though_they_pass() {
        let long = "p".repeat(72);
        let auth = auth(&[], &[("alice", long.as_str())]);
        // Every suffix passes bcrypt and is a new credential: none gives its turn back.
        for i in 0..BURST as usize {
            let variant = basic(format!("alice:{long}{i}").as_bytes());
            assert_eq!(user(&auth, &variant).await.as_deref(), Some("alice"));
        }
        let fresh = basic(format!("alice:{long}x").as_bytes());
        assert_eq!(user(&auth, &fresh).await, None, "the turns are spent");
        let count = |result| auth.checks.get_or_create(&AuthLabels { result }).get();
        assert_eq!(count("ok"), BURST as u64);
        assert_eq!(count("rate_limited"), 1);
    }

    #[tokio::test]
    async fn an_unknown_name_is_refused_without_a_check() {
        let auth = auth(&["alice:s3cret"], &[]);
        assert_eq!(user(&auth, &basic(b"mallory:s3cret")).await, None);
        let c = auth
            .checks
            .get_or_create(&AuthLabels {
                result: "unknown_user",
            })
            .get();
        assert_eq!(c, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_same_credential_sent_together_is_hashed_once() {
        let auth = auth(&[], &[("alice", "s3cret")]);
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let auth = auth.clone();
                tokio::spawn(async move { user(&auth, &basic(b"alice:s3cret")).await })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().as_deref(), Some("alice"));
        }
        let ok = auth
            .checks
            .get_or_create(&AuthLabels { result: "ok" })
            .get();
        assert_eq!(ok, 1, "checks for 20 requests with one credential");
        assert!(auth.in_flight.lock().unwrap().is_empty());
    }

    #[test]
    fn no_users_and_no_users_file_is_an_open_proxy_and_an_empty_file_is_not() {
        let metrics = Metrics::new(Default::default(), Default::default());
        let mut cfg = config::Forward::default();
        assert!(Auth::new(&cfg, &metrics).is_none());
        cfg.users_file = Some("empty".into());
        assert!(Auth::new(&cfg, &metrics).is_some());
    }
}
