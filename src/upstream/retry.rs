//! The one replay policy: when a request that failed may be sent again, on this
//! upstream (`Upstream::send`'s attempts) or on a route's next upstream (the proxy's
//! failover). Both ask here, so "idempotent and replayable" means one thing.
//!
//! - A request no byte of which reached an upstream goes anywhere, whatever its method.
//! - An HTTP/2 stream the peer did not process (REFUSED_STREAM, above a GOAWAY's last
//!   stream id) is replayed on a fresh connection when its body is replayable.
//! - An idempotent request (RFC 9110 §9.2.2) with an empty or buffered body that got no
//!   response byte on a *reused* HTTP/1.1 connection goes once more on a fresh one.
//! - A failure on a fresh HTTP/1.1 connection is never retried on the same upstream; a
//!   route may take an idempotent, replayable request to its next upstream when the
//!   failed one dropped it unanswered or sent no response head in time.

use http::Method;

use super::{Failure, UpstreamError};
use crate::body::RequestBody;

/// A request body up to this size is read before sending so it can be replayed.
pub const REPLAY_BUFFER: u64 = 64 * 1024;
/// Most attempts for one request (first try plus retries). Unsent requests and
/// unprocessed HTTP/2 streams may use them all; a replay after writing to a reused
/// HTTP/1.1 connection happens at most once.
pub(super) const MAX_ATTEMPTS: usize = 8;

/// RFC 9110 §9.2.2.
pub fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Whether a request body can be replayed, and what it takes.
pub(super) enum Replay {
    /// Empty or already in memory.
    Ready,
    /// Known to be at most [`REPLAY_BUFFER`] bytes: read it whole first.
    Buffer,
    /// Streamed: sent once.
    Never,
}

pub(super) fn replay_plan(body: &RequestBody) -> Replay {
    use http_body::Body as _;
    if body.is_end_stream() || matches!(body, RequestBody::Full(_) | RequestBody::Empty) {
        return Replay::Ready;
    }
    match body.size_hint().exact() {
        Some(n) if n <= REPLAY_BUFFER => Replay::Buffer,
        _ => Replay::Never,
    }
}

/// May a request that got no response byte on an HTTP/1.1 connection go once more, on
/// a fresh connection to the same upstream?
pub(super) fn replay_on_fresh(
    reused: bool,
    idempotent: bool,
    replayable: bool,
    replays_left: u32,
    unprocessed: bool,
) -> bool {
    reused && idempotent && replayable && replays_left > 0 && unprocessed
}

/// What a route does after one of its upstreams failed a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failover {
    /// Not the upstream's failure (the client's body, a broken exchange it answered):
    /// the client gets the error, the upstream keeps its place.
    Answer,
    /// The upstream's own failure (no connection, a fresh one dropped unanswered, no
    /// response head in time): it leaves the rotation for a while (nginx's
    /// `max_fails`), and the client gets the error.
    Blame,
    /// As `Blame`, and the request goes to the route's next upstream.
    Next,
}

/// The route's decision after `failure`, for a request that is `idempotent` and whose
/// body is `replayable` (empty or in memory).
pub fn failover(failure: &Failure, idempotent: bool, replayable: bool) -> Failover {
    let timed_out = matches!(failure.error, UpstreamError::Timeout(_));
    let reached_none = failure.error.is_unsent();
    if !(reached_none || failure.unanswered || timed_out) {
        return Failover::Answer;
    }
    if reached_none || ((failure.unanswered || timed_out) && idempotent && replayable) {
        Failover::Next
    } else {
        Failover::Blame
    }
}
