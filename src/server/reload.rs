//! Configuration reloads on SIGHUP, as nginx's `reload` does them: everything but
//! `[pool]` and `[runtime]` changes without a connection dropped.
//!
//! - `[[route]]` and `[forward]` (its users file read again) serve every request that
//!   starts after the reload; requests, tunnels and upgraded connections under way
//!   finish as they began.
//! - `[timeouts]`: `connect` and `upstream_response` for requests that start after it,
//!   `idle` and `header_read` for connections accepted after it (`header_read` also for
//!   the next request head of a connection already open), `shutdown_grace` at the drain.
//! - `[log]`: a new writer; lines of requests under way may still reach the old
//!   destination.
//! - `[[listen]]` and `[admin]`: new addresses are bound before anything changes,
//!   then listeners no longer named stop accepting (the connections they accepted go
//!   on until they close), and a listener whose `tls` changed is served on the same
//!   socket with the new certificate (connections wait in the kernel's queue meanwhile,
//!   none is refused).
//!
//! A reload that cannot be done whole (the file does not load, a certificate, a route
//! or a bind fails) changes nothing, and the log says why. `[pool]` sizes the shared
//! pool and `[runtime]` the process's threads: a change there is named in the log as
//! taking effect after a restart.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::listeners::{self, AdminServing, Bound, Context, Serving};
use super::{BuildProxy, Reload, Settings};
use crate::access::AccessLog;
use crate::config::{Config, Listen};
use crate::proxy::Proxy;

/// What a run has in service, and the configuration it came from.
pub(super) struct Running {
    pub config: Config,
    pub listeners: Vec<Serving>,
    pub admin: Option<AdminServing>,
    pub access: Option<AccessLog>,
    /// `timeouts.shutdown_grace` in nanoseconds, read when the drain begins.
    pub grace: Arc<AtomicU64>,
}

/// `timeouts.shutdown_grace` as kept in [`Running::grace`].
pub(super) fn grace_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// On each SIGHUP: reads the configuration again and puts it in service ([`reload`]).
pub(super) async fn on_hup(reload: Reload, mut running: Running, ctx: Context, build: BuildProxy) {
    let hup = ctx.hup.clone();
    // Each wait is registered before the previous reload's work, so a SIGHUP that
    // comes during it is not missed (the signal wakes only tasks already waiting).
    let mut signalled = std::pin::pin!(hup.notified());
    signalled.as_mut().enable();
    loop {
        tokio::select! {
            () = signalled.as_mut() => {}
            // Once the exit began, listeners are handing their ports over or closing:
            // a reload would serve them again.
            () = ctx.shared.leaving.begun() => {
                tracing::info!("exiting: SIGHUP no longer reloads");
                return;
            }
        }
        signalled.set(hup.notified());
        signalled.as_mut().enable();
        let result = match reload() {
            Ok(next) => apply(next, &mut running, &ctx, &build).await,
            Err(e) => Err(e.to_string()),
        };
        ctx.metrics.count_reload("config", result.is_ok());
        if let Err(e) = result {
            tracing::error!("SIGHUP: configuration not reloaded: {e}");
        }
    }
}

/// Puts back a section a reload cannot change, and names a change to it in the log.
fn keep_as_started<T: Clone + std::fmt::Debug>(section: &str, running: &T, next: &mut T) {
    if format!("{running:?}") != format!("{next:?}") {
        tracing::warn!("SIGHUP: [{section}] changed; it takes effect after a restart");
    }
    *next = running.clone();
}

/// What becomes of one listener of the new configuration.
enum Plan {
    /// Serving already, as configured: stays as it is.
    Keep(Serving),
    /// Serving already with other `tls`: served again, on the same socket, as `Listen`
    /// says, with this acceptor.
    Retls(Serving, Listen, Option<super::tls::Acceptor>),
    /// New, and bound.
    Start(Bound),
}

/// What a reload has ready before anything in service changes.
struct Prepared {
    admin: Option<tokio::net::TcpListener>,
    access: Option<AccessLog>,
    proxy: Proxy,
}

/// Checks and prepares everything `next` needs (binds, certificates, routes, the log
/// writer); only when all of it succeeded does anything in service change.
async fn apply(
    mut next: Config,
    running: &mut Running,
    ctx: &Context,
    build: &BuildProxy,
) -> Result<(), String> {
    keep_as_started("pool", &running.config.pool, &mut next.pool);
    keep_as_started("runtime", &running.config.runtime, &mut next.runtime);

    // Each listener in service is either planned for (kept, served again or, when the
    // reload fails, put back) or, if still here once all succeeded, stopped.
    let mut serving: Vec<Option<Serving>> = std::mem::take(&mut running.listeners)
        .into_iter()
        .map(Some)
        .collect();
    let mut plans = Vec::with_capacity(next.listen.len());
    let prepared = match prepare(&next, running, ctx, build, &mut serving, &mut plans).await {
        Ok(p) => p,
        Err(e) => {
            // What was bound for the reload closes; what served goes on serving.
            running.listeners = serving.into_iter().flatten().collect();
            for p in plans {
                if let Plan::Keep(s) | Plan::Retls(s, ..) = p {
                    running.listeners.push(s);
                }
            }
            return Err(e);
        }
    };
    let Prepared {
        admin: admin_bound,
        access,
        proxy,
    } = prepared;

    // Apply: new requests and connections see the new configuration from here on.
    ctx.shared.proxy.store(Arc::new(proxy));
    ctx.shared.settings.store(Arc::new(Settings::new(&next)));
    ctx.shared.limit.set_max(next.limits.max_connections);
    ctx.metrics
        .client_connections_max
        .set(next.limits.max_connections as i64);
    running
        .grace
        .store(grace_nanos(next.timeouts.shutdown_grace), Ordering::Relaxed);
    running.access = access;
    for gone in serving.into_iter().flatten() {
        let addr = gone.cfg.addr.clone();
        drop(gone.stop().await);
        tracing::info!("stopped listening on {addr}");
    }
    for plan in plans {
        let s = match plan {
            Plan::Keep(s) => s,
            Plan::Retls(s, cfg, acceptor) => {
                match s.stop().await {
                    Some(listener) => ctx.serve(Bound {
                        cfg,
                        listener,
                        acceptor,
                    }),
                    // The accept loop panicked: bind afresh (the old socket is gone).
                    None => match listeners::bind(&cfg, ctx.shared.backlog).await {
                        Ok(mut b) => {
                            b.acceptor = acceptor;
                            ctx.serve(b)
                        }
                        Err(e) => {
                            tracing::error!("SIGHUP: {e}");
                            continue;
                        }
                    },
                }
            }
            Plan::Start(b) => ctx.serve(b),
        };
        running.listeners.push(s);
    }
    match (&next.admin, admin_bound) {
        (Some(a), Some(listener)) => {
            if let Some(old) = running.admin.take() {
                old.stop();
            }
            running.admin = Some(listeners::serve_admin(
                a.addr,
                listener,
                &ctx.metrics,
                &ctx.shutdown,
                &ctx.shared.leaving,
            ));
        }
        (None, _) => {
            if let Some(old) = running.admin.take() {
                old.stop();
                tracing::info!("stopped the admin listener");
            }
        }
        (Some(_), None) => {}
    }
    tracing::info!(
        listeners = running.listeners.len(),
        routes = next.route.len(),
        forward = next.forward.enabled,
        "SIGHUP: configuration reloaded"
    );
    running.config = next;
    Ok(())
}

/// The fallible half of [`apply`]: binds new listeners and the admin listener, loads
/// certificates, starts a new log writer if `[log]` changed, builds the proxy.
async fn prepare(
    next: &Config,
    running: &Running,
    ctx: &Context,
    build: &BuildProxy,
    serving: &mut [Option<Serving>],
    plans: &mut Vec<Plan>,
) -> Result<Prepared, String> {
    for l in &next.listen {
        let found = serving
            .iter_mut()
            .find(|s| s.as_ref().is_some_and(|s| s.cfg.addr == l.addr));
        match found {
            Some(slot) if slot.as_ref().is_some_and(|s| s.cfg == *l) => {
                plans.push(Plan::Keep(slot.take().expect("found above")));
            }
            Some(slot) => {
                let acceptor = match &l.tls {
                    Some(files) => Some(super::tls::Acceptor::load(files)?),
                    None => None,
                };
                let s = slot.take().expect("found above");
                plans.push(Plan::Retls(s, l.clone(), acceptor));
            }
            None => plans.push(Plan::Start(
                listeners::bind(l, ctx.shared.backlog)
                    .await
                    .map_err(|e| e.to_string())?,
            )),
        }
    }
    let admin = match &next.admin {
        Some(a) if running.admin.as_ref().map(|s| s.addr) != Some(a.addr) => Some(
            listeners::bind_admin(a.addr)
                .await
                .map_err(|e| e.to_string())?,
        ),
        _ => None,
    };
    let access = if next.log == running.config.log {
        running.access.clone()
    } else {
        AccessLog::start(
            &next.log,
            ctx.reopen.clone(),
            ctx.metrics.access_log_dropped.clone(),
        )
    };
    let proxy = build(next, access.clone())?;
    Ok(Prepared {
        admin,
        access,
        proxy,
    })
}
