//! The composition root: a configuration becomes the parts that serve it. The upstream
//! side (the pool, shared by every configuration of a run) and the metrics are built
//! here once; the proxy is built here from each configuration, the first and every one
//! a reload brings; the server gets them and knows none of their insides.

use std::sync::Arc;

use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::server::{self, BuildProxy, Reload, RunError};
use crate::upstream::Upstream;

/// Runs Strait until SIGTERM or SIGINT, then drains and returns.
pub async fn run(config: Config) -> Result<(), RunError> {
    run_reloading(config, None).await
}

/// [`run`], and on SIGHUP `reload` is called and the configuration it returns is put
/// in service, all of it but `[pool]` and `[runtime]` (`server::reload`).
pub async fn run_reloading(config: Config, reload: Option<Reload>) -> Result<(), RunError> {
    // Tunnels outlive the requests that open them: the proxy spawns them here, and
    // the drain waits for them with the connections.
    let tasks = TaskTracker::new();
    let upstream = Arc::new(Upstream::new(&config.pool, &config.timeouts));
    let metrics = Arc::new(Metrics::new(
        upstream.stats().clone(),
        upstream.dns_stats().clone(),
    ));
    let build: BuildProxy = {
        let (tasks, metrics) = (tasks.clone(), metrics.clone());
        Arc::new(move |config, access| {
            // A new resolver each time: resolv.conf and /etc/hosts are read again.
            upstream.use_dns(&config.dns)?;
            Proxy::new(
                config,
                tasks.clone(),
                upstream.clone(),
                metrics.clone(),
                access,
            )
        })
    };
    server::run(
        config,
        server::Parts {
            tasks,
            metrics,
            build,
        },
        reload,
    )
    .await
}
