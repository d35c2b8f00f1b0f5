//! HTTP/1.1 protocol upgrades (RFC 9110 §7.8), WebSocket's handshake among them. The
//! client's `Upgrade` goes to the upstream with `Connection: upgrade`; when the upstream
//! answers 101, both connections switch and bytes flow both ways, as in a CONNECT
//! tunnel, until either side closes or `timeouts.idle` passes with no byte moving. Any
//! other answer is relayed as usual, and the client connection stays HTTP.

use http::header::{CONNECTION, HeaderMap, HeaderValue, UPGRADE};
use http::request::Parts;
use http::{Extensions, Response, StatusCode, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;

use super::tunnel::relay;
use super::{Proxy, Refusal, headers, relay_response};
use crate::body::Body;
use crate::io::IdleTimeoutIo;
use crate::upstream::{ResponseBody, UpstreamError, list_has};

/// The protocols an HTTP/1.1 request asks to upgrade to: its `Upgrade` field, when
/// `Connection` names it. Only requests hyper parsed with `Upgrade` carry hyper's
/// handle on the connection (Strait's own server hands them to hyper), so the usual
/// request costs one look at an empty extension map; HTTP/2 has no upgrade.
pub(super) fn asked(parts: &Parts) -> Option<HeaderValue> {
    if parts.version != Version::HTTP_11 || parts.extensions.get::<OnUpgrade>().is_none() {
        return None;
    }
    let named = parts
        .headers
        .get_all(CONNECTION)
        .iter()
        .any(|v| list_has(v.as_bytes(), b"upgrade"));
    if !named {
        return None;
    }
    parts.headers.get(UPGRADE).cloned()
}

/// Puts the ask back on a request whose hop-by-hop fields are gone.
pub(super) fn restore(headers: &mut HeaderMap, protocols: HeaderValue) {
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, protocols);
}

impl Proxy {
    /// The client's answer to an upstream response when it asked for an upgrade: a
    /// 101 joins the two connections (Strait's HTTP/1.1 client takes a 101 only when
    /// the request carried `Upgrade`, and HTTP/2 has none); anything else is relayed
    /// as usual. `client` holds hyper's handle on the client connection.
    #[cold]
    #[inline(never)]
    pub(super) fn answer_upgrade(
        &self,
        resp: Response<ResponseBody>,
        client: &mut Extensions,
    ) -> Result<Response<Body>, Refusal> {
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Ok(relay_response(resp));
        }
        let broken = |why: &str| Refusal::Upstream(UpstreamError::Exchange(why.into()));
        let on = client
            .remove::<OnUpgrade>()
            .ok_or_else(|| broken("101 to a request that asked for no upgrade"))?;
        let (mut parts, mut body) = resp.into_parts();
        let protocol = parts
            .headers
            .get(UPGRADE)
            .cloned()
            .ok_or_else(|| broken("101 without Upgrade"))?;
        let (upstream, early) = body
            .take_upgraded()
            .ok_or_else(|| broken("101 over HTTP/2"))?;
        headers::strip_hop_by_hop(&mut parts.headers);
        parts
            .headers
            .insert(CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(UPGRADE, protocol);
        parts.version = Version::HTTP_11;

        let idle = self.idle_timeout;
        self.tasks.spawn(async move {
            let mut down = match on.await {
                Ok(upgraded) => TokioIo::new(upgraded),
                Err(e) => {
                    tracing::debug!("upgrade failed: {e}");
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
                Ok((rx, tx)) => tracing::debug!(rx, tx, "upgraded connection closed"),
                Err(e) => tracing::debug!("upgraded connection ended: {e}"),
            }
        });
        Ok(Response::from_parts(parts, Body::Empty))
    }
}
