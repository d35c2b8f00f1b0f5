//! Follows a stream of HTTP/1.1 requests as another server (hyper) reads it, and holds
//! back each piece until Strait's own rules have judged it.
//!
//! hyper's HTTP/1.1 server is laxer than nginx where it counts for smuggling: it drops a
//! `Content-Length` beside `Transfer-Encoding` (and reads on), merges repeated lengths,
//! and its chunk decoder takes a bare LF inside a trailer line as part of the line, so
//! the next request can be read as trailers. Every request hyper serves (over TLS, and
//! on plain connections after Strait's server handed them over) passes through a
//! [`RequestGuard`] first: each head is parsed with the same [`RequestFraming`] rules as
//! Strait's server, each body is framed as its head says ([`Follow`] for chunked
//! ones), and a piece the rules refuse never reaches hyper: its read fails instead.
//!
//! Anything the guard cannot follow ends its watch, and hyper's own answer stands: a
//! head that does not parse (hyper answers 400 and closes), one over the limits (431),
//! an HTTP/2 preface. After a request that may switch protocols (`Upgrade`, CONNECT)
//! it waits to be told whether it did: the watch ends then, or goes on (a refused
//! CONNECT or an ignored `Upgrade` must not open a way around it).

use super::chunked::Follow;
use super::framing::{RequestBody, RequestFraming};
use super::{Error, MAX_FIELDS, MAX_HEAD};

/// Where the stream stands.
#[derive(Debug, Default)]
enum State {
    /// At the start of a request head.
    #[default]
    Head,
    /// In a body with this many bytes to come.
    Length(u64),
    Chunked(Follow),
    /// After a request that may switch protocols (CONNECT, `Upgrade`): nothing passes
    /// until [`RequestGuard::switched`] says whether it did.
    Switching,
    /// Past what the guard can follow: everything passes.
    Off,
}

/// The judge of one connection's request stream (see the module doc).
#[derive(Debug, Default)]
pub struct RequestGuard {
    state: State,
    /// The request now in the stream may switch protocols: once its body has passed,
    /// the guard waits to know.
    last: bool,
    /// What the stream broke, once it did: nothing more passes.
    refused: Option<Error>,
    /// The answer a refused head calls for (400 or 501), when a head was refused.
    refused_head: Option<http::StatusCode>,
}

impl RequestGuard {
    /// True once the guard passes everything unread.
    pub fn is_off(&self) -> bool {
        matches!(self.state, State::Off)
    }

    /// The status a refused head calls for (400 or 501); `None` when nothing was
    /// refused, or a body was.
    pub fn refused_head(&self) -> Option<http::StatusCode> {
        self.refused_head
    }

    /// True while waiting to be told whether a protocol switch happened.
    pub fn is_switching(&self) -> bool {
        matches!(self.state, State::Switching)
    }

    /// The request that might switch protocols did (the watch ends) or did not (the
    /// next head is judged).
    pub fn switched(&mut self, switched: bool) {
        if let State::Switching = self.state {
            self.state = if switched { State::Off } else { State::Head };
        }
    }

    /// True where a head is next: a refusal here is of a whole request, not part of
    /// one whose head already passed.
    pub fn is_between_messages(&self) -> bool {
        matches!(self.state, State::Head)
    }

    /// Bytes of a `Content-Length` body still to come, which may pass unread.
    pub fn body_left(&self) -> Option<u64> {
        match self.state {
            State::Length(n) => Some(n),
            _ => None,
        }
    }

    /// Takes `n` bytes of a `Content-Length` body passed unread (at most
    /// [`RequestGuard::body_left`]).
    pub fn passed(&mut self, n: usize) {
        if let State::Length(left) = &mut self.state {
            *left -= (n as u64).min(*left);
            if *left == 0 {
                self.state = self.after_body();
            }
        }
    }

    /// Judges bytes not yet passed on, the first of them where the last call's
    /// accepted bytes ended: how many may pass now (0 while a head is incomplete), or
    /// why the next ones must not.
    pub fn check(&mut self, data: &[u8]) -> Result<usize, Error> {
        if let Some(e) = self.refused {
            return Err(e);
        }
        let mut at = 0;
        match self.judge(data, &mut at) {
            // What was judged before the fault passes first; the fault is told next.
            Err(e) if at > 0 => {
                self.refused = Some(e);
                Ok(at)
            }
            Err(e) => {
                self.refused = Some(e);
                Err(e)
            }
            Ok(()) => Ok(at),
        }
    }

    fn judge(&mut self, data: &[u8], at: &mut usize) -> Result<(), Error> {
        while *at < data.len() {
            let rest = &data[*at..];
            match &mut self.state {
                State::Off => *at = data.len(),
                State::Switching => break,
                State::Length(left) => {
                    let n = (*left).min(rest.len() as u64) as usize;
                    self.passed(n);
                    *at += n;
                }
                State::Chunked(follow) => {
                    *at += follow.feed(rest)?;
                    if follow.is_done() {
                        self.state = self.after_body();
                    }
                }
                State::Head => match self.head(rest)? {
                    Some(n) => *at += n,
                    None => break,
                },
            }
        }
        Ok(())
    }

    fn after_body(&self) -> State {
        if self.last {
            State::Switching
        } else {
            State::Head
        }
    }

    /// A head at the start of `data`: its length once whole and accepted, `None` while
    /// incomplete.
    fn head(&mut self, data: &[u8]) -> Result<Option<usize>, Error> {
        // Empty lines before a request line are allowed (RFC 9112 §2.2); httparse
        // skips them too.
        let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
        let mut req = httparse::Request::new(&mut fields);
        let len = match req.parse(data) {
            Ok(httparse::Status::Complete(n)) if n <= MAX_HEAD => n,
            Ok(httparse::Status::Partial) if data.len() < MAX_HEAD => return Ok(None),
            // Unparsable, too large, an HTTP/2 preface: hyper answers for itself.
            _ => {
                self.state = State::Off;
                return Ok(Some(data.len()));
            }
        };
        let mut framing = RequestFraming::default();
        let mut switches = req.method == Some("CONNECT");
        for f in req.headers.iter() {
            if f.name.eq_ignore_ascii_case("content-length") {
                framing.content_length(f.value);
            } else if f.name.eq_ignore_ascii_case("transfer-encoding") {
                framing.transfer_encoding(f.value);
            } else if f.name.eq_ignore_ascii_case("upgrade") {
                switches = true;
            }
        }
        let body = framing.finish(req.version == Some(0)).map_err(|r| {
            self.refused_head = Some(r.status);
            Error::Malformed(r.why)
        })?;
        self.last = switches;
        self.state = match body {
            RequestBody::None | RequestBody::Length(0) => self.after_body(),
            RequestBody::Length(n) => State::Length(n),
            RequestBody::Chunked => State::Chunked(Follow::default()),
        };
        Ok(Some(len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `stream` in pieces of `split` bytes, as a reader would take them: returns
    /// how many bytes passed before the guard refused (or all of them).
    fn passed(stream: &[u8], split: usize) -> (usize, bool) {
        let mut g = RequestGuard::default();
        let mut pending: Vec<u8> = Vec::new();
        let mut out = 0;
        for piece in stream.chunks(split) {
            pending.extend_from_slice(piece);
            loop {
                match g.check(&pending) {
                    Ok(0) => break,
                    Ok(n) => {
                        out += n;
                        pending.drain(..n);
                    }
                    Err(_) => return (out, true),
                }
            }
        }
        (out, false)
    }

    #[test]
    fn requests_pass_whole_however_they_arrive() {
        let stream = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
            POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3;e=1\r\nabc\r\n0\r\nT: 1\r\n\r\n\
            GET /c HTTP/1.1\r\nHost: x\r\n\r\n";
        for split in 1..stream.len() {
            assert_eq!(
                passed(stream, split),
                (stream.len(), false),
                "split {split}"
            );
        }
    }

    #[test]
    fn what_nginx_refuses_never_passes() {
        let first = "GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
        for bad in [
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello",
        ] {
            let stream = format!("{first}{bad}");
            for split in 1..stream.len() {
                assert_eq!(
                    passed(stream.as_bytes(), split),
                    (first.len(), true),
                    "{bad:?} split {split}"
                );
            }
        }
        // A bare LF in the trailers: the head and the body up to there pass, the rest not.
        let stream = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: 1\n\nGET /hidden HTTP/1.1\r\nHost: x\r\n\r\n";
        for split in 1..stream.len() {
            let (n, refused) = passed(stream, split);
            assert!(refused && n < stream.len() - 30, "split {split}: {n}");
        }
    }

    #[test]
    fn what_does_not_parse_ends_the_watch() {
        for stream in [
            &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00"[..],
            b"GET /\x01 HTTP/1.1\r\n\r\n",
        ] {
            let mut g = RequestGuard::default();
            assert_eq!(g.check(stream), Ok(stream.len()));
            assert!(g.is_off());
        }
    }

    #[test]
    fn a_request_that_may_switch_holds_the_stream_until_told() {
        let smuggle =
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        for head in [
            "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n",
        ] {
            let stream = format!("{head}{smuggle}");
            // Switched: the rest is the new protocol's.
            let mut g = RequestGuard::default();
            assert_eq!(g.check(stream.as_bytes()), Ok(head.len()));
            assert!(g.is_switching());
            assert_eq!(g.check(&stream.as_bytes()[head.len()..]), Ok(0));
            g.switched(true);
            assert_eq!(g.check(&stream.as_bytes()[head.len()..]), Ok(smuggle.len()));
            // Refused or ignored: still HTTP, still judged.
            let mut g = RequestGuard::default();
            assert_eq!(g.check(stream.as_bytes()), Ok(head.len()));
            g.switched(false);
            assert!(g.check(&stream.as_bytes()[head.len()..]).is_err());
        }
    }
}
