//! Active health checks: a route with `health_check` sends `GET` of that path to each
//! of its upstreams every `health_interval`, through the shared pool, as HAProxy's
//! `check` does.
//!
//! An upstream whose probe fails [`FALL`] times in a row leaves the rotation (the
//! balancer tries it only when every upstream is down); [`RISE`] good probes in a row
//! bring it back. A probe is good when the upstream answers 2xx or 3xx within the
//! interval. Passive health (a refused connection, a dropped request, a timeout) works
//! beside it, and a request that succeeds on an upstream brings it back at once.

use std::sync::Arc;
use std::time::Duration;

use http::header::{HOST, HeaderValue, USER_AGENT};
use http::{Method, Request, Uri};
use http_body_util::BodyExt;

use prometheus_client::metrics::gauge::Gauge;

use crate::body::RequestBody;
use crate::metrics::{Label, Metrics, RouteOnly};
use crate::upstream::balance::Balancer;
use crate::upstream::{Target, Upstream};

/// Failed probes in a row that take an upstream out of the rotation.
pub const FALL: u32 = 2;
/// Good probes in a row that bring it back.
pub const RISE: u32 = 2;
/// The most of a probe's response body that is read; a longer one is cut (and its
/// connection closed), the status alone decides.
const BODY_LIMIT: usize = 64 * 1024;

/// One upstream to probe.
pub struct Probe {
    pub index: usize,
    pub name: Arc<str>,
    pub target: Target,
    pub host: HeaderValue,
}

/// The probes of one route; they stop when this is dropped (with its route, after a
/// reload or at exit).
pub struct Probes(Vec<tokio::task::AbortHandle>);

impl Drop for Probes {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Starts one probe task per upstream. `None` outside a runtime (`--check` builds no
/// proxy, but tests may).
pub fn start(
    route: &Label,
    path: &str,
    every: Duration,
    probes: Vec<Probe>,
    upstream: &Arc<Upstream>,
    balancer: &Arc<Balancer>,
    metrics: Option<&Metrics>,
) -> Option<Probes> {
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    let path: Uri = path.parse().ok()?;
    let gauge = metrics.map(|m| {
        m.upstreams_down
            .get_or_create(&RouteOnly {
                route: route.clone(),
            })
            .clone()
    });
    let tasks = probes
        .into_iter()
        .map(|probe| {
            let watch = Watch {
                route: route.clone(),
                path: path.clone(),
                every,
                probe,
                upstream: upstream.clone(),
                balancer: balancer.clone(),
                down: Down {
                    gauge: gauge.clone(),
                    counted: false,
                },
            };
            runtime.spawn(watch.run()).abort_handle()
        })
        .collect();
    Some(Probes(tasks))
}

struct Watch {
    route: Label,
    path: Uri,
    every: Duration,
    probe: Probe,
    upstream: Arc<Upstream>,
    balancer: Arc<Balancer>,
    down: Down,
}

/// Whether the upstream is out of the rotation, counted in `strait_upstreams_down`
/// while it is, and uncounted when its probe stops (a reload replaced the route).
struct Down {
    gauge: Option<Gauge>,
    counted: bool,
}

impl Down {
    fn set(&mut self, down: bool) {
        if down != self.counted {
            self.counted = down;
            if let Some(g) = &self.gauge {
                if down {
                    g.inc();
                } else {
                    g.dec();
                }
            }
        }
    }
}

impl Drop for Down {
    fn drop(&mut self) {
        self.set(false);
    }
}

impl Watch {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut failed, mut passed) = (0u32, 0u32);
        loop {
            tick.tick().await;
            // At `max_conns_per_host` with every connection busy, a probe would wait
            // for a connection, not for the upstream: this round says nothing.
            if !self.upstream.has_room(&self.probe.target) {
                continue;
            }
            let outcome = tokio::time::timeout(self.every, self.check())
                .await
                .unwrap_or_else(|_| {
                    Err(format!(
                        "no answer within health_interval ({})",
                        humantime::format_duration(self.every)
                    ))
                });
            let name = &*self.probe.name;
            match outcome {
                Ok(()) => {
                    failed = 0;
                    passed += 1;
                    if self.down.counted && passed >= RISE {
                        self.down.set(false);
                        self.balancer.mark_ok(self.probe.index);
                        tracing::info!(route = %self.route.0, upstream = name, "health check passed: back in rotation");
                    }
                }
                Err(why) => {
                    passed = 0;
                    failed += 1;
                    if failed >= FALL {
                        // Marked again on every failure: a request that succeeded on it
                        // meanwhile (when all were down) brought it back.
                        self.balancer.mark_down(self.probe.index);
                        if !self.down.counted {
                            self.down.set(true);
                            tracing::warn!(route = %self.route.0, upstream = name, "health check failed: out of rotation: {why}");
                        }
                    } else {
                        tracing::debug!(route = %self.route.0, upstream = name, "health check failed: {why}");
                    }
                }
            }
        }
    }

    /// One probe: `GET path` with the upstream's `Host`, a 2xx or 3xx answer, its body
    /// read (up to [`BODY_LIMIT`]) so the connection can go back to the pool.
    async fn check(&self) -> Result<(), String> {
        let mut req = Request::new(RequestBody::Empty);
        *req.method_mut() = Method::GET;
        *req.uri_mut() = self.path.clone();
        let h = req.headers_mut();
        h.insert(HOST, self.probe.host.clone());
        h.insert(USER_AGENT, HeaderValue::from_static("strait-health-check"));
        let resp = self
            .upstream
            .send(req, &self.probe.target)
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status();
        let mut body = resp.into_body();
        let mut read = 0;
        while read <= BODY_LIMIT {
            match body.frame().await {
                Some(Ok(frame)) => read += frame.data_ref().map_or(0, |d| d.len()),
                Some(Err(e)) => return Err(format!("response body failed: {e}")),
                None => break,
            }
        }
        if status.is_success() || status.is_redirection() {
            Ok(())
        } else {
            Err(format!("answered {status}"))
        }
    }
}
