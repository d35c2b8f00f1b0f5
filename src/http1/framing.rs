//! How a message's body is delimited (RFC 9112 §6): `Content-Length`,
//! `Transfer-Encoding`, and what a request that combines them gets.

use http::StatusCode;
use http_body::SizeHint;

use super::chunked::Chunk;
use super::trim_ows;

/// How the rest of a body is delimited, in either direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// This many bytes still to come.
    Length(u64),
    Chunked(Chunk),
    /// Until the sender closes the connection (a response only; the connection then
    /// cannot be reused).
    Close,
    /// The body ended, or there is none (HEAD, 1xx, 204, 304).
    Done,
}

impl Framing {
    /// A chunked body at its start.
    pub const CHUNKED: Framing = Framing::Chunked(Chunk::Size);

    pub fn is_end(&self) -> bool {
        matches!(self, Framing::Done | Framing::Length(0))
    }

    pub fn size_hint(&self) -> SizeHint {
        match self {
            Framing::Length(n) => SizeHint::with_exact(*n),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// The largest length taken: nginx keeps lengths in a signed 64-bit `off_t`, hyper
/// refuses the top of `u64`; a length past either is refused as invalid, not as too
/// large.
pub const MAX_LENGTH: u64 = i64::MAX as u64;

/// A `Content-Length` value (RFC 9110 §8.6): `1*DIGIT` and nothing else, at most
/// [`MAX_LENGTH`]. No sign, no list (`5, 5`), no hex, no white space inside; OWS
/// around it is the field's, not the value's. `u64::from_str` would take `+5`.
pub fn parse_length(v: &[u8]) -> Option<u64> {
    let v = trim_ows(v);
    if v.is_empty() || v.len() > 19 {
        return None;
    }
    let n = v.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0'))
    })?;
    (n <= MAX_LENGTH).then_some(n)
}

/// True when a value must be rewritten to go out canonical: leading zeros (`010`) or
/// OWS. Everything else [`parse_length`] takes is already digits only.
pub fn length_needs_canon(v: &[u8]) -> bool {
    v.len() > 1 && v[0] == b'0'
        || v.first().is_some_and(|b| !b.is_ascii_digit())
        || v.last().is_some_and(|b| !b.is_ascii_digit())
}

/// Why a request's framing fields refuse it, and with which status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub status: StatusCode,
    pub why: &'static str,
}

impl Refused {
    const fn bad(why: &'static str) -> Refused {
        Refused {
            status: StatusCode::BAD_REQUEST,
            why,
        }
    }
}

/// How a request's body is framed, once its head's framing fields are all read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestBody {
    /// No body (no `Content-Length`, no `Transfer-Encoding`): RFC 9112 §6.3 rule 7.
    None,
    Length(u64),
    Chunked,
}

/// The verdict on a request head's framing fields, fed each as it is parsed. nginx's
/// rules, which are RFC 9112's made strict where the RFC leaves a choice:
///
/// - `Content-Length` is `1*DIGIT` (RFC 9110 §8.6); a second one, even equal, is
///   refused (400), as nginx refuses any duplicate: one choice for both directions.
/// - `Transfer-Encoding` must be exactly `chunked`, in one field (RFC 9112 §6.1 lets a
///   server refuse codings it does not know with 501; a proxy that forwarded `gzip,
///   chunked` as `chunked` would hand the origin still-encoded bytes as the body).
/// - both framings in one request: 400 (RFC 9112 §6.1 allows a server to refuse; a
///   request with both is the classic smuggling probe).
/// - `Transfer-Encoding` in an HTTP/1.0 request: 400 (RFC 9112 §6.1: 1.0 has no
///   chunked coding).
#[derive(Debug, Default)]
pub struct RequestFraming {
    length: Option<u64>,
    codings: u8,
    chunked: bool,
    error: Option<Refused>,
}

impl RequestFraming {
    pub fn content_length(&mut self, v: &[u8]) {
        if self.length.is_some() {
            self.fail(Refused::bad("repeated Content-Length"));
        }
        match parse_length(v) {
            Some(n) => self.length = Some(n),
            None => self.fail(Refused::bad("invalid Content-Length")),
        }
    }

    pub fn transfer_encoding(&mut self, v: &[u8]) {
        self.codings = self.codings.saturating_add(1);
        self.chunked = trim_ows(v).eq_ignore_ascii_case(b"chunked");
    }

    fn fail(&mut self, refused: Refused) {
        self.error.get_or_insert(refused);
    }

    /// The body's framing, or why the request is refused. `http10`: the request line
    /// said HTTP/1.0.
    pub fn finish(self, http10: bool) -> Result<RequestBody, Refused> {
        if let Some(e) = self.error {
            return Err(e);
        }
        if self.codings == 0 {
            return Ok(self.length.map_or(RequestBody::None, RequestBody::Length));
        }
        if http10 {
            return Err(Refused::bad("Transfer-Encoding in an HTTP/1.0 request"));
        }
        if self.codings > 1 || !self.chunked {
            return Err(Refused {
                status: StatusCode::NOT_IMPLEMENTED,
                why: "Transfer-Encoding other than chunked",
            });
        }
        if self.length.is_some() {
            return Err(Refused::bad("both Content-Length and Transfer-Encoding"));
        }
        Ok(RequestBody::Chunked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_are_digits_only() {
        assert_eq!(parse_length(b"0"), Some(0));
        assert_eq!(parse_length(b" 42\t"), Some(42));
        assert_eq!(parse_length(b"010"), Some(10));
        assert_eq!(parse_length(b"9223372036854775807"), Some(MAX_LENGTH));
        for bad in [
            &b""[..],
            b"+1",
            b"-1",
            b"1,1",
            b"5, 5",
            b"5 5",
            b"0x10",
            b"5\xa0",
            b"\x0b5",
            b"9223372036854775808",
            b"18446744073709551615",
            b"99999999999999999999",
        ] {
            assert_eq!(parse_length(bad), None, "{bad:?}");
        }
        assert!(length_needs_canon(b"010"));
        assert!(!length_needs_canon(b"10"));
        assert!(!length_needs_canon(b"0"));
    }

    fn verdict(fields: &[(&str, &str)], http10: bool) -> Result<RequestBody, Refused> {
        let mut f = RequestFraming::default();
        for (name, value) in fields {
            match *name {
                "cl" => f.content_length(value.as_bytes()),
                _ => f.transfer_encoding(value.as_bytes()),
            }
        }
        f.finish(http10)
    }

    #[test]
    fn request_framing_is_nginx_strict() {
        assert_eq!(verdict(&[], false), Ok(RequestBody::None));
        assert_eq!(verdict(&[("cl", "5")], false), Ok(RequestBody::Length(5)));
        assert_eq!(
            verdict(&[("te", "Chunked")], false),
            Ok(RequestBody::Chunked)
        );
        let status = |fields: &[(&str, &str)]| verdict(fields, false).unwrap_err().status;
        for te in [
            "gzip, chunked",
            "identity, chunked",
            "chunked, chunked",
            ",chunked",
            "xchunked",
            "identity",
        ] {
            assert_eq!(status(&[("te", te)]), StatusCode::NOT_IMPLEMENTED, "{te}");
        }
        assert_eq!(
            status(&[("te", "chunked"), ("te", "chunked")]),
            StatusCode::NOT_IMPLEMENTED
        );
        assert_eq!(
            status(&[("cl", "5"), ("te", "chunked")]),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status(&[("te", "chunked"), ("cl", "5")]),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(status(&[("cl", "5"), ("cl", "5")]), StatusCode::BAD_REQUEST);
        assert_eq!(status(&[("cl", "+5")]), StatusCode::BAD_REQUEST);
        assert_eq!(
            verdict(&[("te", "chunked")], true).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
    }
}
