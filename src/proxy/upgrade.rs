//! HTTP/1.1 protocol upgrades (RFC 9110 §7.8), WebSocket's handshake among them. The
//! client's `Upgrade` goes to the upstream with `Connection: upgrade`; when the upstream
//! answers 101, both connections switch and bytes flow both ways, as in a CONNECT
//! tunnel, until either side closes or `timeouts.idle` passes with no byte moving. Any
//! other answer is relayed as usual, and the client connection stays HTTP.

use http::header::{CONNECTION, HeaderMap, HeaderValue, UPGRADE};
use http::request::Parts;
use http::{Response, StatusCode, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;

use super::tunnel::relay;
use super::{ConnInfo, Proxy, Refusal, headers, relay_response};
use crate::body::Body;
use crate::io::IdleTimeoutIo;
use crate::upstream::{ResponseBody, UpstreamError, list_has};

/// An upgrade a client asked for: the protocols its `Upgrade` names, and hyper's handle
/// on its connection for when the response switches it.
pub(super) struct Ask {
    protocols: HeaderValue,
    on: OnUpgrade,
}

impl Ask {
    /// The upgrade an HTTP/1.1 request asks for: an `Upgrade` field that `Connection`
    /// names. Only requests hyper parsed with `Upgrade` carry its handle (Strait's own
    /// server hands them to hyper), so the usual request costs one look at an empty
    /// extension map; HTTP/2 has no upgrade.
    pub(super) fn take(parts: &mut Parts) -> Option<Ask> {
        if parts.version != Version::HTTP_11 || parts.extensions.get::<OnUpgrade>().is_none() {
            return None;
        }
        let protocols = parts.headers.get(UPGRADE)?.clone();
        let named = parts
            .headers
            .get_all(CONNECTION)
            .iter()
            .any(|v| list_has(v.as_bytes(), b"upgrade"));
        if !named {
            return None;
        }
        let on = parts.extensions.remove::<OnUpgrade>()?;
        Some(Ask { protocols, on })
    }

    /// Puts the ask on the request to the upstream, whose hop-by-hop fields are gone.
    pub(super) fn restore(&self, headers: &mut HeaderMap) {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(UPGRADE, self.protocols.clone());
    }
}

impl Proxy {
    /// The client's answer to an upstream response. A 101 to an upgrade the client asked
    /// for joins the two connections; a 101 nobody asked for is a broken upstream.
    pub(super) fn answer(
        &self,
        resp: Response<ResponseBody>,
        ask: Option<Ask>,
        conn: ConnInfo,
    ) -> Result<Response<Body>, Refusal> {
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Ok(relay_response(resp));
        }
        let broken = |why: &str| Refusal::Upstream(UpstreamError::Exchange(why.into()));
        let ask = ask.ok_or_else(|| broken("101 to a request that asked for no upgrade"))?;
        let (mut parts, body) = resp.into_parts();
        let protocol = parts
            .headers
            .get(UPGRADE)
            .cloned()
            .ok_or_else(|| broken("101 without Upgrade"))?;
        let (upstream, early) = body
            .into_upgraded()
            .ok_or_else(|| broken("101 over HTTP/2"))?;
        headers::strip_hop_by_hop(&mut parts.headers);
        parts
            .headers
            .insert(CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(UPGRADE, protocol);
        parts.version = Version::HTTP_11;

        let idle = self.idle_timeout;
        let client = conn.peer;
        self.tasks.spawn(async move {
            let mut down = match ask.on.await {
                Ok(upgraded) => TokioIo::new(upgraded),
                Err(e) => {
                    tracing::debug!(%client, "upgrade failed: {e}");
                    return;
                }
            };
            let mut up = IdleTimeoutIo::new(upstream, idle);
            let relayed = async {
                // Bytes of the new protocol that came with the upstream's 101.
                if !early.is_empty() {
                    down.write_all(&early).await?;
                }
                relay(&mut down, &mut up).await
            };
            match relayed.await {
                Ok((rx, tx)) => tracing::debug!(%client, rx, tx, "upgraded connection closed"),
                Err(e) => tracing::debug!(%client, "upgraded connection ended: {e}"),
            }
        });
        Ok(Response::from_parts(parts, Body::Empty))
    }
}
