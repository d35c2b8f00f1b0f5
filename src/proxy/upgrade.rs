//! HTTP/1.1 protocol upgrades (RFC 9110 §7.8), WebSocket's handshake among them. The
//! client's `Upgrade` goes to the upstream with `Connection: upgrade`; when the upstream
//! answers 101, both connections switch and bytes flow both ways, as in a CONNECT
//! tunnel, until either side closes or `timeouts.idle` passes with no byte moving. Any
//! other answer is relayed as usual, and the client connection stays HTTP.
//!
//! An HTTP/2 client opens a WebSocket with an extended CONNECT (RFC 8441) on a stream;
//! one that a reverse route takes goes to the upstream as the HTTP/1.1 handshake, and
//! the upstream's 101 reaches the client as a 200 on that stream.

use std::sync::{Arc, Mutex};

use http::header::{
    CONNECTION, HeaderValue, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION,
    UPGRADE,
};
use http::request::Parts;
use http::{Extensions, Method, Response, StatusCode, Uri, Version};
use hyper::ext::Protocol;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use super::Body;
use super::{
    ConnBytes, Meta, Proxy, Refusal, attribute_bytes, header_str, headers, log_target,
    protocol_name, relay_response,
};
use crate::access::{AccessLog, Entry};
use crate::http1::list_has;
use crate::io::IdleTimeoutIo;
use crate::metrics::{Kind, Label, Metrics};
use crate::upstream::relay::relay;
use crate::upstream::{ResponseBody, UpstreamError};

/// What a client asks to switch its connection (or stream) to.
pub(super) enum Switch {
    /// HTTP/1.1 `Upgrade` to these protocols; the upstream's 101 goes back as a 101.
    H1(HeaderValue),
    /// An HTTP/2 WebSocket (RFC 8441: extended CONNECT with `:protocol = websocket`).
    /// The upstream gets the HTTP/1.1 handshake; its 101 goes back as a 200.
    H2WebSocket,
}

/// What a request asks to switch to: an HTTP/1.1 `Upgrade` field that `Connection`
/// names, or an HTTP/2 WebSocket. Only requests hyper parsed with `Upgrade` (or as
/// CONNECT) carry hyper's handle on the connection (Strait's own server hands them to
/// hyper), so the usual request costs one look at an empty extension map.
pub(super) fn asked(parts: &Parts) -> Option<Switch> {
    parts.extensions.get::<OnUpgrade>()?;
    if parts.version == Version::HTTP_2 {
        return is_h2_websocket(&parts.method, parts.extensions.get())
            .then_some(Switch::H2WebSocket);
    }
    if parts.version != Version::HTTP_11 {
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
    let protocols = parts.headers.get(UPGRADE)?;
    // An upgrade to cleartext HTTP/2 would hand the client a connection straight to
    // the upstream, on which its next requests skip routing ("h2c smuggling"): the
    // request goes on as a plain one (Envoy drops it the same way).
    if list_has(protocols.as_bytes(), b"h2c") {
        return None;
    }
    Some(Switch::H1(protocols.clone()))
}

/// True for an HTTP/2 extended CONNECT that opens a WebSocket (RFC 8441 §4).
pub(super) fn is_h2_websocket(method: &Method, protocol: Option<&Protocol>) -> bool {
    method == Method::CONNECT
        && protocol.is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"))
}

/// Puts the ask on the request to the upstream, whose hop-by-hop fields are gone. An
/// HTTP/2 WebSocket becomes the HTTP/1.1 handshake (RFC 8441 §5): a GET with
/// `Upgrade: websocket` and a fresh `Sec-WebSocket-Key`.
pub(super) fn restore(parts: &mut Parts, switch: Switch) {
    let h = &mut parts.headers;
    h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    match switch {
        Switch::H1(protocols) => {
            h.insert(UPGRADE, protocols);
        }
        Switch::H2WebSocket => {
            parts.method = Method::GET;
            h.insert(UPGRADE, HeaderValue::from_static("websocket"));
            h.insert(SEC_WEBSOCKET_KEY, websocket_key());
            if !h.contains_key(SEC_WEBSOCKET_VERSION) {
                h.insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
            }
        }
    }
}

/// A `Sec-WebSocket-Key`: 16 bytes, base64 (RFC 6455 §4.1). The key only proves that
/// the upstream speaks WebSocket, so bytes from std's randomly seeded hasher do.
fn websocket_key() -> HeaderValue {
    use base64::Engine as _;
    use std::hash::{BuildHasher, Hasher};
    let mut bytes = [0u8; 16];
    for half in bytes.chunks_mut(8) {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        half.copy_from_slice(&h.finish().to_le_bytes());
    }
    let key = base64::engine::general_purpose::STANDARD.encode(bytes);
    HeaderValue::from_str(&key).expect("base64 is a valid field value")
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
        version: Version,
        meta: &Meta,
    ) -> Result<Response<Body>, Refusal> {
        let broken = |why: &str| Refusal::Upstream(UpstreamError::Exchange(why.into()));
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            // A 2xx would open an HTTP/2 client's stream as if the WebSocket were up.
            if version == Version::HTTP_2 && resp.status().is_success() {
                return Err(broken("the upstream did not switch to WebSocket"));
            }
            return Ok(relay_response(resp));
        }
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
        if version == Version::HTTP_2 {
            // RFC 8441 §5: the stream is open once the CONNECT gets a 2xx; the accept
            // answers Strait's key, not the client's.
            parts.status = StatusCode::OK;
            parts.headers.remove(SEC_WEBSOCKET_ACCEPT);
        } else {
            parts
                .headers
                .insert(CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(UPGRADE, protocol);
        }
        parts.version = version;

        let idle = self.idle_timeout;
        let slot = meta.switch.clone();
        if let Some(slot) = &slot {
            slot.state().switched = true;
        }
        let end = SwitchedEnd {
            metrics: self.metrics_on.then(|| self.metrics.clone()),
            slot,
            kind: meta.kind,
            user: meta.user.clone(),
        };
        if let Some(m) = &end.metrics {
            m.upgraded_active.inc();
        }
        self.tasks.spawn(async move {
            let _end = end;
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

/// Where a request that may switch protocols meets the connection it switches to: the
/// connection's byte counts, and the access log line the request leaves for the
/// switched connection to write when it ends (with the bytes and time of the whole
/// exchange, as a tunnel's line has).
pub(crate) struct SwitchSlot {
    bytes: Arc<ConnBytes>,
    state: Mutex<SlotState>,
}

#[derive(Default)]
struct SlotState {
    /// The upstream switched; the relay owns the connections.
    switched: bool,
    /// The relay ended.
    ended: bool,
    line: Option<Box<Line>>,
}

impl SwitchSlot {
    pub(super) fn new(bytes: Arc<ConnBytes>) -> SwitchSlot {
        SwitchSlot {
            bytes,
            state: Mutex::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn is_switched(&self) -> bool {
        self.state().switched
    }

    /// Leaves the request's log line for the relay; false when the relay already
    /// ended (the request then logs it itself).
    pub(super) fn leave_line(&self, line: Line) -> bool {
        let mut state = self.state();
        if state.ended {
            return false;
        }
        state.line = Some(Box::new(line));
        true
    }
}

/// The fields of a switched request's access log line, known when it was answered.
pub(super) struct Line {
    pub access: AccessLog,
    pub client: crate::net::ClientAddr,
    pub user: Label,
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub status: u16,
    pub start: Instant,
    pub kind: Kind,
    pub route: Label,
    pub upstream: Option<Arc<str>>,
    pub referer: Option<HeaderValue>,
    pub user_agent: Option<HeaderValue>,
}

/// Accounts a switched connection when it ends: its bytes (they flow after its request
/// was accounted) toward the request's kind and user, and the request's log line.
struct SwitchedEnd {
    metrics: Option<Arc<Metrics>>,
    slot: Option<Arc<SwitchSlot>>,
    kind: Kind,
    user: Label,
}

impl Drop for SwitchedEnd {
    fn drop(&mut self) {
        if let Some(m) = &self.metrics {
            m.upgraded_active.dec();
        }
        let Some(slot) = &self.slot else { return };
        let line = {
            let mut state = slot.state();
            state.ended = true;
            state.line.take()
        };
        let (rx, tx) = attribute_bytes(&slot.bytes, self.metrics.as_deref(), self.kind, &self.user);
        let Some(l) = line else { return };
        let mut whole = String::new();
        l.access.log(&Entry {
            client: l.client,
            user: &l.user.0,
            method: l.method.as_str(),
            target: log_target(&l.uri, &mut whole),
            protocol: protocol_name(l.version),
            status: l.status,
            bytes_in: rx,
            bytes_out: tx,
            duration: l.start.elapsed(),
            kind: l.kind.as_str(),
            route: &l.route.0,
            upstream: l.upstream.as_deref().unwrap_or("-"),
            referer: header_str(&l.referer),
            user_agent: header_str(&l.user_agent),
        });
    }
}
