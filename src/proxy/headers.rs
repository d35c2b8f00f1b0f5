//! Header rules every proxied message follows: hop-by-hop removal and `X-Forwarded-*`.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::net::ClientAddr;

/// `Proxy-Connection`: not standard, but sent by old clients in place of `Connection`.
pub static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The fixed hop-by-hop fields (RFC 9110 §7.6.1), plus the proxy-auth pair, which only
/// ever concern the hop between a client and its proxy, and `Expect`: Strait answers
/// `100-continue` to its client itself (hyper does when the body is first read), and an
/// origin that saw `Expect` could answer before reading the body, then read the body as
/// the next request on a pooled connection (RFC 9110 §10.1.1). `Connection` comes first
/// ([`CONNECTION_AT`]): the fields it names are removed before it.
const HOP_BY_HOP: [&HeaderName; 10] = [
    &header::CONNECTION,
    &PROXY_CONNECTION,
    &header::PROXY_AUTHORIZATION,
    &header::PROXY_AUTHENTICATE,
    &header::TE,
    &header::TRAILER,
    &header::TRANSFER_ENCODING,
    &header::UPGRADE,
    &KEEP_ALIVE,
    &header::EXPECT,
];
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
/// Where `Connection` and `TE` stand in [`HOP_BY_HOP`].
const CONNECTION_AT: usize = 0;
const TE_AT: usize = 4;

/// Removes every hop-by-hop field: the fixed set and each field named in `Connection`
/// (RFC 9110 §7.6.1), so none crosses the proxy in either direction.
///
/// One pass over the names finds what is there; most messages carry none of these or
/// only `Connection: keep-alive`, so a removal by name (a hash each) happens only for
/// fields present, and nothing is allocated unless `Connection` names an unusual field.
///
/// Returns whether a removed `TE` accepted trailers: HTTP/2 lets that one value cross
/// (RFC 9113 §8.2.2), and gRPC servers want to see it.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) -> bool {
    let mut present = [false; HOP_BY_HOP.len()];
    let mut any = false;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| *h == name) {
            present[i] = true;
            any = true;
        }
    }
    if !any {
        return false;
    }
    let trailers = present[TE_AT]
        && headers.get_all(header::TE).iter().any(|v| {
            v.as_bytes().split(|&b| b == b',').any(|coding| {
                let name = coding.split(|&b| b == b';').next().unwrap_or_default();
                name.trim_ascii().eq_ignore_ascii_case(b"trailers")
            })
        });
    // Names listed in Connection go first, before Connection itself is removed. The
    // usual tokens are `close` and `keep-alive` (already in the fixed set).
    if present[CONNECTION_AT] {
        let named: Vec<String> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| {
                !t.is_empty()
                    && !t.eq_ignore_ascii_case("close")
                    && !t.eq_ignore_ascii_case("keep-alive")
            })
            .map(str::to_owned)
            .collect();
        for name in named {
            // By `&str`: looked up without allocating; a token that is no valid field
            // name finds nothing.
            headers.remove(name.as_str());
        }
    }
    for (name, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, p)| *p) {
        headers.remove(*name);
    }
    trailers
}

/// What an HTTP/2 client's request needs to go on, to an upstream of either version:
///
/// - its `TE: trailers` (RFC 9113 §8.2.2 lets that one value cross, and gRPC servers
///   want it). Strait relays trailers, and its HTTP/1.1 client never sends `TE` (there
///   it would be a hop-by-hop field of Strait's own);
/// - one `Cookie` field. HTTP/2 clients split cookies into a field each for HPACK, and
///   RFC 9113 §8.2.3 wants them joined with `; ` before they reach HTTP/1.1, where
///   servers read only one `Cookie` line or join them with `, `.
pub fn from_http2(parts: &mut http::request::Parts, trailers: bool) {
    if parts.version != http::Version::HTTP_2 {
        return;
    }
    if trailers {
        parts
            .headers
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }
    join_cookies(&mut parts.headers);
}

fn join_cookies(headers: &mut HeaderMap) {
    let header::Entry::Occupied(mut field) = headers.entry(header::COOKIE) else {
        return;
    };
    let mut values = field.iter();
    if values.nth(1).is_none() {
        return;
    }
    let mut joined = Vec::new();
    for v in field.iter() {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(v.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        field.insert(v);
    }
}

/// Appends the client's address to `X-Forwarded-For`, folding earlier values into one
/// comma-separated field. A Unix socket's client is `unix:`, as nginx writes it.
pub fn append_forwarded_for(headers: &mut HeaderMap, client: ClientAddr) {
    let value = match client {
        ClientAddr::Ip(a) => client_value(a.ip().to_canonical()),
        ClientAddr::Unix => Some(HeaderValue::from_static("unix:")),
    };
    let Some(value) = value else {
        return;
    };
    // One lookup: the usual request has no X-Forwarded-For yet.
    match headers.entry(&X_FORWARDED_FOR) {
        header::Entry::Vacant(slot) => {
            slot.insert(value);
        }
        header::Entry::Occupied(mut field) => {
            let mut joined = Vec::new();
            for v in field.iter() {
                if let Ok(v) = v.to_str() {
                    joined.extend_from_slice(v.trim().as_bytes());
                    joined.extend_from_slice(b", ");
                }
            }
            joined.extend_from_slice(value.as_bytes());
            if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(joined)) {
                field.insert(v);
            }
        }
    }
}

thread_local! {
    /// The last client address written, as a field value: requests come in runs from
    /// the same few clients, and a clone is a reference-count bump where a new value
    /// is an allocation.
    static LAST_CLIENT: std::cell::RefCell<Option<(IpAddr, HeaderValue)>> =
        const { std::cell::RefCell::new(None) };
}

/// A client address as a field value.
fn client_value(client: IpAddr) -> Option<HeaderValue> {
    LAST_CLIENT.with(|last| {
        let mut last = last.borrow_mut();
        if let Some((ip, v)) = &*last
            && *ip == client
        {
            return Some(v.clone());
        }
        let mut buf = [0u8; 15];
        let owned;
        let text: &[u8] = match client {
            // The common case, written without the formatting machinery.
            IpAddr::V4(v4) => write_ipv4(v4, &mut buf),
            IpAddr::V6(v6) => {
                owned = v6.to_string();
                owned.as_bytes()
            }
        };
        let v = HeaderValue::from_bytes(text).ok()?;
        *last = Some((client, v.clone()));
        Some(v)
    })
}

/// `a.b.c.d` into `buf`; the same text `Ipv4Addr`'s `Display` writes.
fn write_ipv4(ip: std::net::Ipv4Addr, buf: &mut [u8; 15]) -> &[u8] {
    let mut n = 0;
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            buf[n] = b'.';
            n += 1;
        }
        if octet >= 100 {
            buf[n] = b'0' + octet / 100;
            n += 1;
        }
        if octet >= 10 {
            buf[n] = b'0' + octet / 10 % 10;
            n += 1;
        }
        buf[n] = b'0' + octet % 10;
        n += 1;
    }
    &buf[..n]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_named_in_connection_are_removed_too() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, X-Secret, close".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("proxy-authorization", "Basic eA==".parse().unwrap());
        h.insert("te", "trailers".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn forwarded_for_is_appended_into_one_field() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", "1.1.1.1".parse().unwrap());
        h.append("x-forwarded-for", "2.2.2.2".parse().unwrap());
        append_forwarded_for(&mut h, client("[::ffff:10.0.0.1]:5"));
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 10.0.0.1");
    }

    #[test]
    fn ipv4_addresses_are_written_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "255.255.255.255",
            "1.100.9.99",
        ] {
            let mut buf = [0u8; 15];
            let ip: std::net::Ipv4Addr = ip.parse().unwrap();
            assert_eq!(write_ipv4(ip, &mut buf), ip.to_string().as_bytes());
        }
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, client("[2001:db8::1]:5"));
        assert_eq!(h["x-forwarded-for"], "2001:db8::1");
    }

    fn client(addr: &str) -> ClientAddr {
        ClientAddr::Ip(addr.parse().unwrap())
    }

    #[test]
    fn a_unix_socket_client_is_forwarded_as_unix() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", "1.1.1.1".parse().unwrap());
        append_forwarded_for(&mut h, ClientAddr::Unix);
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, unix:");
    }

    #[test]
    fn connection_and_te_stand_where_the_strip_looks_for_them() {
        assert_eq!(*HOP_BY_HOP[CONNECTION_AT], header::CONNECTION);
        assert_eq!(*HOP_BY_HOP[TE_AT], header::TE);
    }

    #[test]
    fn a_te_that_accepts_trailers_is_reported() {
        for (te, trailers) in [
            ("trailers", true),
            ("deflate;q=0.5, Trailers", true),
            ("trailers;q=1", true),
            ("gzip", false),
            ("trailer", false),
        ] {
            let mut h = HeaderMap::new();
            h.insert("te", te.parse().unwrap());
            assert_eq!(strip_hop_by_hop(&mut h), trailers, "{te}");
            assert!(h.is_empty());
        }
        assert!(!strip_hop_by_hop(&mut HeaderMap::new()));
    }

    #[test]
    fn messages_without_hop_by_hop_fields_keep_everything() {
        let mut h = HeaderMap::new();
        h.insert("host", "a.test".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2);
        h.insert("connection", "keep-alive".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2);
    }
}
