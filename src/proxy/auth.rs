//! Forward-proxy Basic authentication (RFC 7617 over `Proxy-Authorization`).

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine;
use http::HeaderMap;
use http::header::PROXY_AUTHORIZATION;

use crate::config::User;

/// The accepted credentials, keyed by their base64 form so a check is one hash lookup
/// and no decoding.
#[derive(Debug)]
pub struct Auth {
    by_token: HashMap<Box<[u8]>, Arc<str>>,
}

impl Auth {
    /// `None` when there are no users: the proxy is open.
    pub fn new(users: &[User]) -> Option<Auth> {
        if users.is_empty() {
            return None;
        }
        let engine = base64::engine::general_purpose::STANDARD;
        let by_token = users
            .iter()
            .map(|u| {
                let token = engine.encode(format!("{}:{}", u.name, u.password));
                (
                    token.into_bytes().into_boxed_slice(),
                    Arc::from(u.name.as_str()),
                )
            })
            .collect();
        Some(Auth { by_token })
    }

    /// The user whose credentials the request carries, if they are valid.
    pub fn user(&self, headers: &HeaderMap) -> Option<&Arc<str>> {
        let value = headers.get(PROXY_AUTHORIZATION)?.as_bytes();
        let (scheme, token) = split_once(value, b' ')?;
        if !scheme.eq_ignore_ascii_case(b"basic") {
            return None;
        }
        self.by_token.get(trim(token))
    }
}

fn split_once(s: &[u8], sep: u8) -> Option<(&[u8], &[u8])> {
    let i = s.iter().position(|&b| b == sep)?;
    Some((&s[..i], &s[i + 1..]))
}

fn trim(s: &[u8]) -> &[u8] {
    let start = s
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(s.len());
    let end = s
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &s[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_user_is_recognised_and_others_are_not() {
        let users = vec![
            "alice:s3cret".parse().unwrap(),
            "bob:pa:ss".parse().unwrap(),
        ];
        let auth = Auth::new(&users).unwrap();
        let mut h = HeaderMap::new();
        let check = |h: &HeaderMap| auth.user(h).map(|u| u.to_string());
        assert_eq!(check(&h), None);
        h.insert(
            PROXY_AUTHORIZATION,
            "Basic YWxpY2U6czNjcmV0".parse().unwrap(),
        );
        assert_eq!(check(&h).as_deref(), Some("alice"));
        h.insert(PROXY_AUTHORIZATION, "basic  Ym9iOnBhOnNz ".parse().unwrap());
        assert_eq!(check(&h).as_deref(), Some("bob"));
        h.insert(
            PROXY_AUTHORIZATION,
            "Basic YWxpY2U6d3Jvbmc=".parse().unwrap(),
        );
        assert_eq!(check(&h), None);
        h.insert(
            PROXY_AUTHORIZATION,
            "Bearer YWxpY2U6czNjcmV0".parse().unwrap(),
        );
        assert_eq!(check(&h), None);
    }
}
