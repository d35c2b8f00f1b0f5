//! The HTTP/1.1 wire format, written once and with no sockets: how a message is framed
//! (RFC 9112 §6), the chunked coding (§7.1), the field rules a proxy must enforce and the
//! limits every HTTP/1.1 path shares.
//!
//! Strait's own server (`server/h1.rs`), its upstream client (`upstream/conn`'s HTTP/1.1
//! connection) and the limits handed to hyper's connections all come from here, so a
//! request meets the same rule whichever path serves it. A wire rule found anywhere else
//! is a bug waiting to drift.
//!
//! - [`framing`]: `Content-Length`, `Transfer-Encoding` and the [`Framing`] of a body;
//!   the verdict on a request head's framing fields ([`framing::RequestFraming`]).
//! - [`chunked`]: the chunk decoder (both directions' rules) and the size-line encoder.
//! - [`guard`]: follows a request stream hyper reads and holds back what these rules
//!   refuse, so hyper's laxer parser never sees it.
//! - [`response`]: an upstream's response head, parsed into a `Response` and what it
//!   says about its connection ([`response::Hop`]).
//!
//! Must not: touch a socket, a pool or a route.

pub mod chunked;
pub mod framing;
pub mod guard;
pub mod response;

pub use framing::Framing;

/// Largest head (start line and fields) taken in either direction: a request head over
/// it gets 431, a response head over it fails the request with 502. hyper's HTTP/1.1
/// read buffer and HTTP/2's header list size are held to the same bound.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most fields in a head, either direction (hyper's default, and what it is told).
pub const MAX_FIELDS: usize = 100;
/// Longest chunk-size line, extensions included.
pub const MAX_CHUNK_LINE: usize = 4 * 1024;
/// Largest trailer section of a chunked body.
pub const MAX_TRAILERS: usize = 16 * 1024;

/// A message that breaks the wire format: what is wrong, in a few words for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    Malformed(&'static str),
    /// A head over [`MAX_HEAD`] or [`MAX_FIELDS`].
    TooLarge,
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Malformed(why) => f.write_str(why),
            Error::TooLarge => f.write_str("head too large"),
        }
    }
}

impl std::error::Error for Error {}

/// OWS (RFC 9110 §5.6.3): spaces and tabs only. `trim_ascii` would also take vertical
/// tabs and form feeds, which no HTTP parser treats as white space.
pub fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// True when a comma-separated field value lists `token` (ASCII case-insensitive).
pub fn list_has(v: &[u8], token: &[u8]) -> bool {
    v.split(|b| *b == b',')
        .any(|t| trim_ows(t).eq_ignore_ascii_case(token))
}

/// `n` in decimal, written into `digits` (no allocation, unlike `to_string`).
pub fn decimal(mut n: u64, digits: &mut [u8; 20]) -> &[u8] {
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &digits[i..]
}

/// True for a field name a proxy passes on. nginx drops names with `_` by default
/// (`underscores_in_headers off`): `X_Forwarded_For` and `X-Forwarded-For` are one
/// field to CGI-style servers, which would let a client smuggle the one the proxy sets.
pub fn is_forwarded_name(name: &[u8]) -> bool {
    !name.contains(&b'_')
}

/// True for a `Host` value made only of what a host (a name, an IPv4 address or an IPv6
/// literal in brackets) and a port may hold; empty is allowed (RFC 9110 §7.2,
/// RFC 9112 §3.2).
pub fn is_host_port(v: &[u8]) -> bool {
    v.iter().all(|&b| HOST_BYTES[b as usize])
}

/// The bytes of RFC 3986's reg-name, IPv4address and IP-literal, and ':' before a port.
static HOST_BYTES: [bool; 256] = {
    let mut t = [false; 256];
    let extra = b"-._~!$&'()*+,;=%:[]";
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        t[i] = b.is_ascii_alphanumeric();
        i += 1;
    }
    let mut j = 0;
    while j < extra.len() {
        t[extra[j] as usize] = true;
        j += 1;
    }
    t
};

/// True when a `Connection` field of `headers` lists `token` (RFC 9110 §7.6.1), such
/// as `close` or `keep-alive`. Compared as bytes: a `str` split and trim cost more than
/// the rest of a response's reuse decision.
pub fn connection_has(headers: &http::HeaderMap, token: &str) -> bool {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .any(|v| list_has(v.as_bytes(), token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ows_is_spaces_and_tabs_only() {
        assert_eq!(trim_ows(b" \t5\t "), b"5");
        assert_eq!(trim_ows(b"\x0b5"), b"\x0b5");
        assert_eq!(trim_ows(b""), b"");
        assert!(list_has(b"keep-alive, Close", b"close"));
        assert!(!list_has(b"closed", b"close"));
    }

    #[test]
    fn decimals_are_written_without_allocating() {
        assert_eq!(decimal(0, &mut [0; 20]), b"0");
        assert_eq!(decimal(u64::MAX, &mut [0; 20]), b"18446744073709551615");
    }

    #[test]
    fn underscored_names_are_not_forwarded() {
        assert!(is_forwarded_name(b"x-forwarded-for"));
        assert!(!is_forwarded_name(b"x_forwarded_for"));
    }
}
