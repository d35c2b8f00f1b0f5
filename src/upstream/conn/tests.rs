//! The pool with Strait's HTTP connections over in-memory origins.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use super::h1::H1Conn;
use super::{Http, Lent, Pool, SendError};
use crate::body::RequestBody;
use crate::config::{Scheme, Version};
use crate::upstream::Profile;
use crate::upstream::connect::Stream;
use crate::upstream::pool::{
    CheckoutError, Connector, Limits, MAX_WAITERS, Opened, SURPLUS_GRACE, Target,
};

/// An in-memory origin per connection: `/close` answers with `Connection: close`,
/// `/slow` takes 10 s, anything else answers `ok` at once.
fn pool_with(limits: Limits, h2: bool) -> (Pool, Arc<AtomicUsize>) {
    let connects = Arc::new(AtomicUsize::new(0));
    let counter = connects.clone();
    let connector: Connector<Http> = Arc::new(move |_key: &Target| {
        counter.fetch_add(1, Ordering::SeqCst);
        let (client, server) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move {
            let service = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                let mut resp = http::Response::new(crate::proxy::Body::text("ok"));
                match req.uri().path() {
                    "/close" => {
                        resp.headers_mut()
                            .insert("connection", "close".parse().unwrap());
                    }
                    "/slow" => tokio::time::sleep(Duration::from_secs(10)).await,
                    _ => {}
                }
                Ok::<_, std::convert::Infallible>(resp)
            });
            let io = TokioIo::new(server);
            if h2 {
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .max_concurrent_streams(2)
                        .serve_connection(io, service)
                        .await;
            } else {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            }
        });
        Box::pin(async move {
            let stream = Stream::Duplex(client);
            if h2 {
                let (sender, driver) = super::h2::handshake(stream, 100).await?;
                Ok(Opened::H2(sender, driver))
            } else {
                Ok(Opened::H1(Box::new(H1Conn::new(stream))))
            }
        })
    });
    (Pool::new(limits, connector), connects)
}

fn limits() -> Limits {
    Limits {
        idle_timeout: Duration::from_secs(90),
        max_idle_per_host: 32,
        max_idle: 1024,
        max_conns_per_host: 0,
        wait_timeout: Duration::from_secs(5),
        deadline_check: Duration::from_secs(15),
    }
}

fn key(authority: &str) -> Target {
    Target::new(
        Arc::new(Profile {
            id: 0,
            version: Version::Auto,
            tls: None,
            deny: Vec::new().into(),
            via: None,
            resolver: crate::upstream::dns::Resolver::for_tests(""),
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(60),
        }),
        Scheme::Http,
        authority.parse().unwrap(),
    )
}

/// Sends `path` on a checked-out connection and reads the whole response.
async fn get(c: &mut Lent, path: &str) -> http::Response<Bytes> {
    let mut req = http::Request::new(RequestBody::Empty);
    *req.uri_mut() = path.parse().unwrap();
    req.headers_mut().insert("host", "test".parse().unwrap());
    if c.is_h2() {
        *req.uri_mut() = format!("http://test{path}").parse().unwrap();
    }
    let resp = match c.send(req, Instant::now() + Duration::from_secs(60)).await {
        Ok(r) => r,
        Err(_) => panic!("send failed"),
    };
    let (parts, mut reply) = resp.into_parts();
    let mut data = Vec::new();
    while let Some(frame) = std::future::poll_fn(|cx| reply.poll_frame(Some(&mut *c), cx)).await {
        if let Ok(d) = frame.unwrap().into_data() {
            data.extend_from_slice(&d);
        }
    }
    http::Response::from_parts(parts, Bytes::from(data))
}

#[tokio::test(start_paused = true)]
async fn idle_connections_are_reused_last_in_first_out() {
    let (pool, connects) = pool_with(limits(), false);
    let k = key("a");
    let mut a = pool.checkout(&k, false).await.unwrap();
    let mut b = pool.checkout(&k, false).await.unwrap();
    get(&mut a, "/").await;
    get(&mut b, "/").await;
    let (a_id, b_id) = (a.id(), b.id());
    a.release(true, None);
    b.release(true, None);
    assert_eq!(pool.idle_count(), 2);
    let c = pool.checkout(&k, false).await.unwrap();
    assert_eq!(c.id(), b_id, "the most recently returned goes first");
    assert!(c.reused);
    let d = pool.checkout(&k, false).await.unwrap();
    assert_eq!(d.id(), a_id);
    assert_eq!(connects.load(Ordering::SeqCst), 2);
    assert_eq!(pool.stats().reused.load(Ordering::Relaxed), 2);
}

#[tokio::test(start_paused = true)]
async fn clients_of_different_keys_never_share() {
    let (pool, connects) = pool_with(limits(), false);
    let mut a = pool.checkout(&key("a"), false).await.unwrap();
    get(&mut a, "/").await;
    a.release(true, None);
    let b = pool.checkout(&key("b"), false).await.unwrap();
    assert!(!b.reused);
    assert_eq!(connects.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_connection_not_released_is_closed_not_reused() {
    let (pool, connects) = pool_with(limits(), false);
    let k = key("a");
    let mut a = pool.checkout(&k, false).await.unwrap();
    get(&mut a, "/").await;
    drop(a);
    let b = pool.checkout(&k, false).await.unwrap();
    assert!(!b.reused);
    assert_eq!(connects.load(Ordering::SeqCst), 2);
    // The dropped one closes and is counted.
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(pool.stats().closed.load(Ordering::Relaxed), 1);
}

#[tokio::test(start_paused = true)]
async fn a_closed_idle_connection_is_skipped_on_checkout() {
    let (pool, connects) = pool_with(limits(), false);
    let k = key("a");
    let mut a = pool.checkout(&k, false).await.unwrap();
    // The origin closes after this response; the pool is told it is reusable
    // anyway, to check that checkout verifies the connection is open.
    get(&mut a, "/close").await;
    a.release(true, None);
    tokio::time::sleep(Duration::from_millis(10)).await;
    let b = pool.checkout(&k, false).await.unwrap();
    assert!(!b.reused);
    assert_eq!(connects.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn idle_timeout_retires_connections_by_timer() {
    let (pool, _) = pool_with(limits(), false);
    let k = key("a");
    let mut a = pool.checkout(&k, false).await.unwrap();
    get(&mut a, "/").await;
    a.release(true, None);
    tokio::time::sleep(Duration::from_secs(89)).await;
    assert_eq!(pool.idle_count(), 1);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(pool.idle_count(), 0);
    assert_eq!(pool.stats().evict_idle.load(Ordering::Relaxed), 1);
    assert_eq!(pool.stats().idle.load(Ordering::Relaxed), 0);
}

#[tokio::test(start_paused = true)]
async fn use_pushes_the_idle_deadline_back() {
    let (pool, _) = pool_with(limits(), false);
    let k = key("a");
    for _ in 0..3 {
        let mut a = pool.checkout(&k, false).await.unwrap();
        get(&mut a, "/").await;
        a.release(true, None);
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
    assert_eq!(pool.idle_count(), 1, "used every 60 s, never idle for 90 s");
    assert_eq!(pool.stats().opened.load(Ordering::Relaxed), 1);
}

#[tokio::test(start_paused = true)]
async fn a_keep_alive_hint_retires_before_it_runs_out() {
    let (pool, _) = pool_with(limits(), false);
    let k = key("a");
    let mut a = pool.checkout(&k, false).await.unwrap();
    get(&mut a, "/").await;
    a.release(true, Some(Duration::from_secs(2)));
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(pool.idle_count(), 1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        pool.idle_count(),
        0,
        "retired a margin before the origin's 2 s"
    );
    assert_eq!(pool.stats().evict_hint.load(Ordering::Relaxed), 1);
}

#[tokio::test(start_paused = true)]
async fn max_idle_per_host_and_max_idle_evict_the_least_recently_used() {
    let mut l = limits();
    l.max_idle_per_host = 2;
    l.max_idle = 3;
    let (pool, _) = pool_with(l, false);
    // Three connections to "a": the per-host bound keeps two.
    let mut conns = Vec::new();
    for _ in 0..3 {
        conns.push(pool.checkout(&key("a"), false).await.unwrap());
    }
    for mut c in conns.drain(..) {
        get(&mut c, "/").await;
        c.release(true, None);
    }
    // The coldest is surplus: its timer retires it after the grace.
    assert_eq!(pool.idle_count(), 3);
    tokio::time::sleep(SURPLUS_GRACE + Duration::from_millis(100)).await;
    assert_eq!(pool.idle_count(), 2);
    assert_eq!(pool.stats().evict_lru.load(Ordering::Relaxed), 1);
    // Two to "b": the pool-wide bound of three drops the oldest of "a" at once.
    for _ in 0..2 {
        conns.push(pool.checkout(&key("b"), false).await.unwrap());
    }
    for mut c in conns.drain(..) {
        get(&mut c, "/").await;
        c.release(true, None);
    }
    assert_eq!(pool.idle_count(), 3);
    assert_eq!(pool.stats().evict_lru.load(Ordering::Relaxed), 2);
    assert_eq!(pool.idle_for(&key("a")), 1);
    assert_eq!(pool.idle_for(&key("b")), 2);
}

#[tokio::test(start_paused = true)]
async fn a_burst_beyond_max_idle_per_host_keeps_its_connections_for_the_next_round() {
    let mut l = limits();
    l.max_idle_per_host = 2;
    let (pool, connects) = pool_with(l, false);
    let k = key("a");
    // Five requests at once return five connections at once, then five more come
    // a moment later: they reuse all five, nothing is opened again.
    for round in 0..3 {
        let mut conns = Vec::new();
        for _ in 0..5 {
            conns.push(pool.checkout(&k, false).await.unwrap());
        }
        for mut c in conns.drain(..) {
            get(&mut c, "/").await;
            c.release(true, None);
        }
        assert_eq!(connects.load(Ordering::Relaxed), 5, "round {round}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(pool.stats().evict_lru.load(Ordering::Relaxed), 0);
    // Quiet for the grace: back within the bound.
    tokio::time::sleep(SURPLUS_GRACE + Duration::from_millis(100)).await;
    assert_eq!(pool.idle_count(), 2);
    assert_eq!(pool.stats().evict_lru.load(Ordering::Relaxed), 3);
}

#[tokio::test(start_paused = true)]
async fn max_conns_per_host_queues_waiters_first_come_first_served() {
    let mut l = limits();
    l.max_conns_per_host = 1;
    let (pool, connects) = pool_with(l, false);
    let k = key("a");
    let mut first = pool.checkout(&k, false).await.unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut waiting = Vec::new();
    for n in 0..3 {
        let (pool, k, order) = (pool.clone(), k.clone(), order.clone());
        waiting.push(tokio::spawn(async move {
            let mut c = pool.checkout(&k, false).await.unwrap();
            order.lock().unwrap().push(n);
            get(&mut c, "/").await;
            c.release(true, None);
        }));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(pool.stats().waiting.load(Ordering::Relaxed), 3);
    get(&mut first, "/").await;
    first.release(true, None);
    for w in waiting {
        w.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), vec![0, 1, 2]);
    assert_eq!(connects.load(Ordering::SeqCst), 1);
    assert_eq!(pool.stats().waiting.load(Ordering::Relaxed), 0);
}

#[tokio::test(start_paused = true)]
async fn the_wait_queue_is_bounded() {
    let mut l = limits();
    l.max_conns_per_host = 1;
    l.wait_timeout = Duration::from_secs(60);
    let (pool, _) = pool_with(l, false);
    let k = key("a");
    let _held = pool.checkout(&k, false).await.unwrap();
    let mut waiting = Vec::new();
    for _ in 0..MAX_WAITERS {
        let (pool, k) = (pool.clone(), k.clone());
        waiting.push(tokio::spawn(async move { pool.checkout(&k, false).await }));
    }
    while pool.stats().waiting.load(Ordering::SeqCst) < MAX_WAITERS {
        tokio::task::yield_now().await;
    }
    let started = Instant::now();
    let err = pool.checkout(&k, false).await.unwrap_err();
    assert!(matches!(err, CheckoutError::Exhausted));
    assert_eq!(
        started.elapsed(),
        Duration::ZERO,
        "refused at once, not after waiting"
    );
    for w in waiting {
        w.abort();
    }
}

#[tokio::test(start_paused = true)]
async fn a_waiter_gives_up_after_wait_timeout() {
    let mut l = limits();
    l.max_conns_per_host = 1;
    let (pool, _) = pool_with(l, false);
    let k = key("a");
    let _held = pool.checkout(&k, false).await.unwrap();
    let started = Instant::now();
    let err = pool.checkout(&k, false).await.unwrap_err();
    assert!(matches!(err, CheckoutError::Exhausted));
    assert_eq!(started.elapsed(), Duration::from_secs(5));
    assert_eq!(pool.stats().waiting.load(Ordering::Relaxed), 0);
}

#[tokio::test(start_paused = true)]
async fn a_burst_opens_at_most_one_connection_per_request() {
    let (pool, connects) = pool_with(limits(), false);
    let k = key("a");
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (pool, k) = (pool.clone(), k.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = pool.checkout(&k, false).await.unwrap();
            get(&mut c, "/").await;
            c.release(true, None);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(connects.load(Ordering::SeqCst) <= 8);
    assert_eq!(pool.idle_count(), connects.load(Ordering::SeqCst));
}

#[tokio::test(start_paused = true)]
async fn a_returned_connection_serves_a_waiter_before_a_new_one_is_ready() {
    let (pool, _) = pool_with(limits(), false);
    let k = key("a");
    let mut a = pool.checkout(&k, false).await.unwrap();
    get(&mut a, "/").await;
    let a_id = a.id();
    // A second request finds nothing idle and starts a connect; the first
    // connection comes back before that connect is done.
    let waiter = {
        let (pool, k) = (pool.clone(), k.clone());
        tokio::spawn(async move { pool.checkout(&k, false).await.unwrap().id() })
    };
    a.release(true, None);
    assert_eq!(waiter.await.unwrap(), a_id);
}

#[tokio::test(start_paused = true)]
async fn the_sweep_ends_a_late_http1_response_head() {
    let mut l = limits();
    l.deadline_check = Duration::from_millis(250);
    let (pool, _) = pool_with(l, false);
    let k = key("a");
    let mut c = pool.checkout(&k, false).await.unwrap();
    let mut req = http::Request::new(RequestBody::Empty);
    *req.uri_mut() = "/slow".parse().unwrap();
    req.headers_mut().insert("host", "test".parse().unwrap());
    let started = Instant::now();
    let result = c.send(req, started + Duration::from_secs(1)).await;
    assert!(matches!(result, Err(SendError::TimedOut)));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(1) && waited <= Duration::from_millis(1250),
        "{waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_fresh_checkout_never_gets_a_reused_connection() {
    let (pool, _) = pool_with(limits(), false);
    let k = key("a");
    let mut a = pool.checkout(&k, false).await.unwrap();
    get(&mut a, "/").await;
    let a_id = a.id();
    let retry = {
        let (pool, k) = (pool.clone(), k.clone());
        tokio::spawn(async move { pool.checkout(&k, true).await.unwrap() })
    };
    tokio::task::yield_now().await;
    a.release(true, None);
    let c = retry.await.unwrap();
    assert_ne!(c.id(), a_id);
    assert!(!c.reused);
    assert_eq!(pool.idle_count(), 1, "the returned one went idle instead");
}

#[tokio::test(start_paused = true)]
async fn http2_connections_carry_streams_up_to_the_peers_limit() {
    let (pool, connects) = pool_with(limits(), true);
    let k = key("a");
    // The in-memory origin allows 2 concurrent streams.
    let mut first = pool.checkout(&k, false).await.unwrap();
    get(&mut first, "/").await; // settings exchanged
    let mut held = vec![first];
    for _ in 0..3 {
        held.push(pool.checkout(&k, false).await.unwrap());
    }
    assert_eq!(
        connects.load(Ordering::SeqCst),
        2,
        "two streams per connection"
    );
    let ids: std::collections::HashSet<u64> = held.iter().map(|c| c.id()).collect();
    assert_eq!(ids.len(), 2);
    for c in held {
        c.release(true, None);
    }
    let c = pool.checkout(&k, false).await.unwrap();
    assert!(c.reused);
}
