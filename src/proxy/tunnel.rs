//! CONNECT tunnels: after a 200, bytes flow both ways until either side closes or
//! `timeouts.idle` passes with no byte moving.

use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use super::forward::Access;
use super::{Body, ConnBytes, ConnInfo, Meta, Proxy, Refusal, attribute_bytes, protocol_name};
use crate::access::{AccessLog, Entry};
use crate::body::RequestBody;
use crate::io::IdleTimeoutIo;
use crate::metrics::{Kind, Label, Metrics};
use crate::upstream::UpstreamError;
use crate::upstream::relay::relay;

impl Proxy {
    /// Opens a tunnel to the authority a CONNECT request names (RFC 9110 §9.3.6).
    pub(super) async fn connect(
        &self,
        mut req: Request<RequestBody>,
        conn: ConnInfo,
        meta: &mut Meta,
        bytes: &Arc<ConnBytes>,
    ) -> Result<Response<Body>, Refusal> {
        meta.kind = Kind::Connect;
        let Some(policy) = &self.forward else {
            return Err(Refusal::BadRequest(
                "CONNECT with forward proxying off".into(),
            ));
        };
        if let Err(refusal) = policy.admit_client(conn.peer.ip()) {
            if policy.hide {
                return Err(Refusal::BadRequest(
                    "CONNECT from outside allow_clients".into(),
                ));
            }
            return Err(refusal);
        }
        match policy.check(req.headers()).await {
            Access::Granted(user) => {
                if let Some(user) = user {
                    meta.user = Label(user);
                }
            }
            Access::Challenge => return Err(Refusal::AuthRequired),
            Access::Busy => return Err(Refusal::AuthBusy),
            // A plain web server does not know CONNECT.
            Access::Hidden => {
                return Err(Refusal::BadRequest("CONNECT without credentials".into()));
            }
        }
        let Some(authority) = req.uri().authority() else {
            return Err(Refusal::BadRequest(
                "CONNECT target is not host:port".into(),
            ));
        };
        // Extended CONNECT (RFC 9113 §8.5) names a scheme, whose default port applies.
        let extended = req.extensions().get::<hyper::ext::Protocol>().is_some();
        let default_port = match req.uri().scheme_str() {
            Some("https") | Some("wss") if extended => Some(443),
            Some("http") | Some("ws") if extended => Some(80),
            _ => None,
        };
        let Some(port) = authority.port_u16().or(default_port) else {
            return Err(Refusal::BadRequest("CONNECT target has no port".into()));
        };
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        policy.admit_host(authority.host())?;
        let target: Arc<str> = Arc::from(authority.as_str());
        meta.upstream = Some(target.clone());
        if !policy.connect_ports.is_empty() && !policy.connect_ports.contains(&port) {
            return Err(Refusal::Denied(format!(
                "port {port} is not in connect_ports"
            )));
        }
        let profile = policy.profile_for(&host, false);
        let upstream = self
            .upstream
            .open_tunnel(&host, port, profile)
            .await
            .map_err(|e| Refusal::Upstream(UpstreamError::Connect(e)))?;

        let on_upgrade = hyper::upgrade::on(&mut req);
        let idle = self.idle_timeout;
        let account = TunnelEnd {
            metrics: self.metrics.clone(),
            access: self.access.clone(),
            bytes: bytes.clone(),
            user: meta.user.clone(),
            target,
            client: conn.peer,
            version: req.version(),
            start: Instant::now(),
        };
        self.metrics.tunnels_active.inc();
        self.tasks.spawn(async move {
            let mut client = match on_upgrade.await {
                Ok(upgraded) => TokioIo::new(upgraded),
                Err(e) => {
                    tracing::debug!(client = %account.client, "CONNECT upgrade failed: {e}");
                    return;
                }
            };
            let mut upstream = IdleTimeoutIo::new(upstream, idle);
            match relay(&mut client, &mut upstream).await {
                Ok((rx, tx)) => {
                    tracing::debug!(client = %account.client, target = %account.target, rx, tx, "tunnel closed")
                }
                Err(e) => {
                    tracing::debug!(client = %account.client, target = %account.target, "tunnel ended: {e}")
                }
            }
            // `account` drops here: the tunnel's bytes and log line.
        });
        let mut resp = Response::new(Body::Empty);
        *resp.status_mut() = StatusCode::OK;
        Ok(resp)
    }
}

/// A tunnel's accounting, done when it closes (or its task ends any other way): the
/// connection's bytes since the CONNECT request, one access log line, the gauge.
struct TunnelEnd {
    metrics: Arc<Metrics>,
    access: Option<AccessLog>,
    bytes: Arc<ConnBytes>,
    user: Label,
    target: Arc<str>,
    client: crate::net::ClientAddr,
    version: http::Version,
    start: Instant,
}

impl Drop for TunnelEnd {
    fn drop(&mut self) {
        self.metrics.tunnels_active.dec();
        let (rx, tx) = attribute_bytes(&self.bytes, Some(&self.metrics), Kind::Connect, &self.user);
        if let Some(log) = &self.access {
            log.log(&Entry {
                client: self.client,
                user: &self.user.0,
                method: "CONNECT",
                target: &self.target,
                protocol: protocol_name(self.version),
                status: 200,
                bytes_in: rx,
                bytes_out: tx,
                duration: self.start.elapsed(),
                kind: Kind::Connect.as_str(),
                route: "-",
                upstream: &self.target,
                referer: "-",
                user_agent: "-",
            });
        }
    }
}
