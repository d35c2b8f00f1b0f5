//! Round trips through Strait's upstream pool against hyper-util's pooled client, on
//! the same loopback origin, in one run: HTTP/1.1 and h2c upstreams, 1 and 64
//! concurrent callers.
//!
//! `cargo bench --bench pool`; the ratios go to docs/benchmarks.md.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use strait::body::RequestBody;
use strait::config::{self, Scheme, Version};
use strait::upstream::{Profile, ProfileSettings, Target, Upstream};
use tokio::net::TcpListener;

/// A loopback origin answering every request with 12 bytes, over HTTP/1.1 or h2c.
async fn origin() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let svc = service_fn(|_req| async {
                    Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(
                        b"hello world\n",
                    ))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

struct StraitSide {
    upstream: Upstream,
    profile: Arc<Profile>,
    authority: http::uri::Authority,
}

impl StraitSide {
    fn new(addr: SocketAddr, version: Version) -> Self {
        let pool = config::Pool {
            max_idle_per_host: 128,
            ..Default::default()
        };
        let timeouts = config::Timeouts::default();
        let upstream = Upstream::new(&pool, &timeouts);
        upstream
            .use_dns(&config::Dns::default())
            .expect("the system's resolver configuration");
        let profile = upstream.profile(ProfileSettings {
            version,
            tls: None,
            deny: Vec::new().into(),
            via: None,
            connect_timeout: timeouts.connect,
            response_timeout: timeouts.upstream_response,
        });
        StraitSide {
            upstream,
            profile,
            authority: addr.to_string().parse().unwrap(),
        }
    }

    async fn round_trip(&self) {
        let req = http::Request::get("/")
            .header("host", self.authority.as_str())
            .body(RequestBody::Empty)
            .unwrap();
        let target = Target::new(self.profile.clone(), Scheme::Http, self.authority.clone());
        let resp = self.upstream.send(req, &target).await.unwrap();
        assert_eq!(
            resp.into_body().collect().await.unwrap().to_bytes().len(),
            12
        );
    }
}

struct HyperUtilSide {
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    authority: http::uri::Authority,
}

impl HyperUtilSide {
    fn new(addr: SocketAddr, version: Version) -> Self {
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(128)
            .http2_only(version == Version::H2)
            .build(connector);
        HyperUtilSide {
            client,
            authority: addr.to_string().parse().unwrap(),
        }
    }

    async fn round_trip(&self) {
        // A proxy holds an origin-form request with its Host and a target, as the
        // Strait side does: the absolute URI hyper-util needs is built per request.
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(http::uri::Scheme::HTTP);
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        let req = http::Request::get(http::Uri::from_parts(parts).unwrap())
            .header("host", self.authority.as_str())
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = self.client.request(req).await.unwrap();
        assert_eq!(
            resp.into_body().collect().await.unwrap().to_bytes().len(),
            12
        );
    }
}

/// `n` concurrent round trips through `side`.
macro_rules! concurrent {
    ($side:expr, $n:expr) => {{
        let side = $side.clone();
        async move {
            if $n == 1 {
                side.round_trip().await;
            } else {
                let mut set = tokio::task::JoinSet::new();
                for _ in 0..$n {
                    let side = side.clone();
                    set.spawn(async move { side.round_trip().await });
                }
                while let Some(r) = set.join_next().await {
                    r.unwrap();
                }
            }
        }
    }};
}

/// `POOL_LOOP=strait|hyper-util POOL_PROTO=h1|h2 POOL_CALLERS=n POOL_ROUNDS=k cargo bench
/// --bench pool`: run k rounds of n concurrent round trips and exit, for measuring CPU
/// time per request with `perf stat -e task-clock` or `/usr/bin/time`.
fn fixed_loop() -> bool {
    let Ok(side) = std::env::var("POOL_LOOP") else {
        return false;
    };
    let var = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
    let version = if var("POOL_PROTO", "h1") == "h2" {
        Version::H2
    } else {
        Version::H1
    };
    let callers: usize = var("POOL_CALLERS", "64").parse().unwrap();
    let rounds: usize = var("POOL_ROUNDS", "2000").parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let addr = origin().await;
        let strait = Arc::new(StraitSide::new(addr, version));
        let hyper_util = Arc::new(HyperUtilSide::new(addr, version));
        let started = std::time::Instant::now();
        for _ in 0..rounds {
            if side == "strait" {
                concurrent!(strait, callers).await
            } else {
                concurrent!(hyper_util, callers).await
            }
        }
        eprintln!(
            "{side}: {} requests in {:?}",
            rounds * callers,
            started.elapsed()
        );
    });
    true
}

fn bench(c: &mut Criterion) {
    if fixed_loop() {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let addr = rt.block_on(origin());
    let mut group = c.benchmark_group("pool");
    group
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    for (proto, version) in [("h1", Version::H1), ("h2", Version::H2)] {
        let strait = Arc::new(StraitSide::new(addr, version));
        let hyper_util = Arc::new(HyperUtilSide::new(addr, version));
        for callers in [1usize, 64] {
            let id = format!("{proto}/{callers}");
            group.bench_with_input(BenchmarkId::new("strait", &id), &callers, |b, &n| {
                b.to_async(&rt).iter(|| concurrent!(strait, n))
            });
            group.bench_with_input(BenchmarkId::new("hyper-util", &id), &callers, |b, &n| {
                b.to_async(&rt).iter(|| concurrent!(hyper_util, n))
            });
        }
        let stats = strait.upstream.stats();
        eprintln!(
            "strait {proto}: opened {} reused {} retried {} closed {}",
            stats.opened.load(std::sync::atomic::Ordering::Relaxed),
            stats.reused.load(std::sync::atomic::Ordering::Relaxed),
            stats.retried.load(std::sync::atomic::Ordering::Relaxed),
            stats.closed.load(std::sync::atomic::Ordering::Relaxed),
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
