//! CONNECT tunnels: after a 200, bytes flow both ways until either side closes or
//! `timeouts.idle` passes with no byte moving.

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::forward::Access;
use super::{ConnInfo, Proxy, Refusal};
use crate::body::Body;
use crate::io::IdleTimeoutIo;
use crate::upstream::UpstreamError;
use crate::upstream::connect::connect_tcp;

impl Proxy {
    /// Opens a tunnel to the authority a CONNECT request names (RFC 9110 §9.3.6).
    pub(super) async fn connect(
        &self,
        mut req: Request<Incoming>,
        conn: ConnInfo,
    ) -> Result<Response<Body>, Refusal> {
        let Some(policy) = &self.forward else {
            return Err(Refusal::BadRequest(
                "CONNECT with forward proxying off".into(),
            ));
        };
        match policy.check(req.headers()) {
            Access::Granted(_user) => {}
            Access::Challenge => return Err(Refusal::AuthRequired),
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
        if !policy.connect_ports.is_empty() && !policy.connect_ports.contains(&port) {
            return Err(Refusal::Denied(format!(
                "port {port} is not in connect_ports"
            )));
        }
        let upstream = connect_tcp(&host, port, &policy.deny, self.upstream.connect_timeout())
            .await
            .map_err(|e| Refusal::Upstream(UpstreamError::Connect(e)))?;

        let on_upgrade = hyper::upgrade::on(&mut req);
        let idle = self.idle_timeout;
        let peer = conn.peer;
        self.tasks.spawn(async move {
            let client = match on_upgrade.await {
                Ok(upgraded) => TokioIo::new(upgraded),
                Err(e) => {
                    tracing::debug!(client = %peer, "CONNECT upgrade failed: {e}");
                    return;
                }
            };
            let mut client = client;
            let mut upstream = IdleTimeoutIo::new(upstream, idle);
            match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                Ok((rx, tx)) => {
                    tracing::debug!(client = %peer, target = %format!("{host}:{port}"), rx, tx, "tunnel closed")
                }
                Err(e) => {
                    tracing::debug!(client = %peer, target = %format!("{host}:{port}"), "tunnel ended: {e}")
                }
            }
        });
        let mut resp = Response::new(Body::Empty);
        *resp.status_mut() = StatusCode::OK;
        Ok(resp)
    }
}
