//! Header rules every proxied message follows: hop-by-hop removal and `X-Forwarded-*`.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// `Proxy-Connection`: not standard, but sent by old clients in place of `Connection`.
pub static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The fixed hop-by-hop fields (RFC 9110 §7.6.1), plus the proxy-auth pair, which only
/// ever concern the hop between a client and its proxy.
const HOP_BY_HOP: [&HeaderName; 9] = [
    &header::CONNECTION,
    &PROXY_CONNECTION,
    &header::PROXY_AUTHORIZATION,
    &header::PROXY_AUTHENTICATE,
    &header::TE,
    &header::TRAILER,
    &header::TRANSFER_ENCODING,
    &header::UPGRADE,
    &KEEP_ALIVE,
];
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// Removes every hop-by-hop field: the fixed set and each field named in `Connection`
/// (RFC 9110 §7.6.1), so none crosses the proxy in either direction.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Names listed in Connection go first, before Connection itself is removed.
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Appends the client's address to `X-Forwarded-For`, folding earlier values into one
/// comma-separated field.
pub fn append_forwarded_for(headers: &mut HeaderMap, client: IpAddr) {
    let client = client.to_canonical().to_string();
    let value = if headers.contains_key(&X_FORWARDED_FOR) {
        let mut joined = String::new();
        for v in headers.get_all(&X_FORWARDED_FOR) {
            if let Ok(v) = v.to_str() {
                joined.push_str(v.trim());
                joined.push_str(", ");
            }
        }
        joined.push_str(&client);
        joined
    } else {
        client
    };
    if let Ok(v) = HeaderValue::try_from(value) {
        headers.insert(&X_FORWARDED_FOR, v);
    }
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
        append_forwarded_for(&mut h, "::ffff:10.0.0.1".parse().unwrap());
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 10.0.0.1");
    }
}
