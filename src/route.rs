//! The reverse-proxy route table: which route takes a request, by host and path prefix.
//!
//! Precedence, as nginx users expect: an exact host beats a `*.suffix` host (the longest
//! suffix first), which beats an any-host route; within one host, the longest path
//! prefix wins. Prefixes are plain string prefixes (`/api` also matches `/apix`), like
//! nginx's prefix locations. The table knows nothing of upstream connections.

use std::collections::HashMap;

use crate::config::HostPattern;

/// A set of routes of type `T`, looked up by host and path.
#[derive(Debug)]
pub struct RouteTable<T> {
    routes: Vec<(String, T)>,
    /// Exact host → route indices, longest prefix first.
    exact: HashMap<String, Vec<usize>>,
    /// `.suffix` → route indices, longest suffix first, then longest prefix.
    suffix: Vec<(String, Vec<usize>)>,
    /// Routes without a host, longest prefix first.
    any: Vec<usize>,
}

impl<T> RouteTable<T> {
    /// Builds the table from `(host, path prefix, value)` triples.
    pub fn new(entries: impl IntoIterator<Item = (Option<HostPattern>, String, T)>) -> Self {
        let mut table = RouteTable {
            routes: Vec::new(),
            exact: HashMap::new(),
            suffix: Vec::new(),
            any: Vec::new(),
        };
        for (host, prefix, value) in entries {
            let i = table.routes.len();
            table.routes.push((prefix, value));
            match host {
                Some(HostPattern::Exact(h)) => table.exact.entry(h).or_default().push(i),
                Some(HostPattern::Suffix(s)) => {
                    match table.suffix.iter_mut().find(|(have, _)| *have == s) {
                        Some((_, list)) => list.push(i),
                        None => table.suffix.push((s, vec![i])),
                    }
                }
                None => table.any.push(i),
            }
        }
        let routes = &table.routes;
        let by_prefix_len = |list: &mut Vec<usize>| {
            list.sort_by_key(|&i| std::cmp::Reverse(routes[i].0.len()));
        };
        table.exact.values_mut().for_each(by_prefix_len);
        table.suffix.iter_mut().for_each(|(_, l)| by_prefix_len(l));
        table
            .suffix
            .sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        by_prefix_len(&mut table.any);
        table
    }

    /// The route for a request. `host` is the request's host without port, any case.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<&T> {
        let in_list = |list: &[usize]| {
            list.iter()
                .find(|&&i| path.starts_with(self.routes[i].0.as_str()))
                .map(|&i| &self.routes[i].1)
        };
        if let Some(host) = host {
            let host = host.trim_end_matches('.');
            let lower;
            let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
                lower = host.to_ascii_lowercase();
                lower.as_str()
            } else {
                host
            };
            if let Some(found) = self.exact.get(host).and_then(|l| in_list(l)) {
                return Some(found);
            }
            for (suffix, list) in &self.suffix {
                if host.len() > suffix.len()
                    && host.ends_with(suffix.as_str())
                    && let Some(found) = in_list(list)
                {
                    return Some(found);
                }
            }
        }
        in_list(&self.any)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(routes: &[(&str, &str, &'static str)]) -> RouteTable<&'static str> {
        RouteTable::new(routes.iter().map(|&(h, p, v)| {
            let host = (!h.is_empty()).then(|| h.parse().unwrap());
            (host, p.to_owned(), v)
        }))
    }

    #[test]
    fn longest_prefix_wins() {
        let t = table(&[
            ("", "/", "root"),
            ("", "/api/", "api"),
            ("", "/api/v2/", "v2"),
        ]);
        assert_eq!(t.find(None, "/api/v2/x"), Some(&"v2"));
        assert_eq!(t.find(None, "/api/v1"), Some(&"api"));
        assert_eq!(t.find(None, "/apix"), Some(&"root"));
        assert_eq!(t.find(Some("any.host"), "/"), Some(&"root"));
    }

    #[test]
    fn a_host_route_beats_an_any_host_route() {
        let t = table(&[("", "/api/", "any-api"), ("app.test", "/", "app")]);
        assert_eq!(t.find(Some("app.test"), "/api/x"), Some(&"app"));
        assert_eq!(t.find(Some("APP.test"), "/api/x"), Some(&"app"));
        assert_eq!(t.find(Some("other.test"), "/api/x"), Some(&"any-api"));
        assert_eq!(t.find(Some("other.test"), "/x"), None);
    }

    #[test]
    fn exact_beats_suffix_and_longer_suffix_beats_shorter() {
        let t = table(&[
            ("*.test", "/", "wild"),
            ("*.a.test", "/", "wild-a"),
            ("x.a.test", "/", "exact"),
        ]);
        assert_eq!(t.find(Some("x.a.test"), "/"), Some(&"exact"));
        assert_eq!(t.find(Some("y.a.test"), "/"), Some(&"wild-a"));
        assert_eq!(t.find(Some("b.test"), "/"), Some(&"wild"));
        assert_eq!(t.find(Some("test"), "/"), None);
    }

    #[test]
    fn a_host_route_without_a_matching_prefix_falls_through() {
        let t = table(&[("app.test", "/admin/", "admin"), ("", "/", "root")]);
        assert_eq!(t.find(Some("app.test"), "/admin/x"), Some(&"admin"));
        assert_eq!(t.find(Some("app.test"), "/x"), Some(&"root"));
    }
}
