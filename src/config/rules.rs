//! The forward proxy's address and name rules: `allow_clients` and `deny_targets`
//! (CIDRs, addresses or named groups) and `allow_domains` / `deny_domains` (exact
//! names or `*.suffix`), and the reading of a request's host as an address.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use ipnet::IpNet;

/// The groups `deny_targets` and `allow_clients` accept besides CIDRs.
pub const GROUPS: [&str; 5] = [
    "loopback",
    "link-local",
    "private",
    "unspecified",
    "multicast",
];

/// `deny_targets` when the config does not set it: every address that reaches the
/// proxy's own host.
pub const DEFAULT_DENY: [&str; 3] = ["loopback", "link-local", "unspecified"];

/// One entry of `deny_targets` or `allow_clients`: an address, a CIDR block or a
/// named group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddrRule {
    nets: Vec<IpNet>,
    /// As written, for log lines and refusals: `loopback`, `10.0.0.0/8`.
    pub written: Arc<str>,
}

impl std::str::FromStr for AddrRule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let nets = match group(s) {
            Some(nets) => nets,
            None => vec![parse_net(s).ok_or_else(|| {
                format!(
                    "invalid address rule {s:?}: expected a CIDR like \"10.0.0.0/8\", an \
                     address, or one of the groups {}",
                    GROUPS.map(|g| format!("\"{g}\"")).join(", ")
                )
            })?],
        };
        Ok(AddrRule {
            nets,
            written: Arc::from(s),
        })
    }
}

fn parse_net(s: &str) -> Option<IpNet> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Some(net.trunc());
    }
    s.parse::<IpAddr>().ok().map(IpNet::from)
}

/// The blocks a named group stands for.
fn group(name: &str) -> Option<Vec<IpNet>> {
    let blocks: &[&str] = match name {
        "loopback" => &["127.0.0.0/8", "::1/128"],
        "link-local" => &["169.254.0.0/16", "fe80::/10"],
        "private" => &[
            "10.0.0.0/8",
            "172.16.0.0/12",
            "192.168.0.0/16",
            "100.64.0.0/10",
            "fc00::/7",
        ],
        "unspecified" => &["0.0.0.0/8", "::/128"],
        "multicast" => &["224.0.0.0/4", "ff00::/8"],
        _ => return None,
    };
    let mut nets: Vec<IpNet> = blocks
        .iter()
        .map(|b| b.parse().expect("the groups' blocks are valid CIDRs"))
        .collect();
    if name == "loopback" {
        // A connection to one of the host's own interface addresses lands on the host
        // as one to 127.0.0.1 does (and reaches services bound to every address).
        nets.extend(host_addresses().into_iter().map(IpNet::from));
    }
    Some(nets)
}

/// This host's interface addresses, read when the config is (at start and on reload).
fn host_addresses() -> Vec<IpAddr> {
    match if_addrs::get_if_addrs() {
        Ok(list) => list.into_iter().map(|i| i.ip()).collect(),
        Err(e) => {
            tracing::warn!("cannot list this host's addresses for deny_targets: {e}");
            Vec::new()
        }
    }
}

impl AddrRule {
    /// True when a connection to `ip` falls under the rule: the address as it is, and
    /// the IPv4 address an IPv4-mapped (`::ffff:a.b.c.d`) or IPv4-compatible
    /// (`::a.b.c.d`) address carries, both of which some stacks deliver to the IPv4
    /// address.
    pub fn covers_target(&self, ip: IpAddr) -> bool {
        let carried = match ip {
            IpAddr::V6(v6) => embedded_v4(v6).map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        self.nets
            .iter()
            .any(|n| n.contains(&ip) || carried.is_some_and(|v4| n.contains(&v4)))
    }

    /// True when a client at `ip` falls under the rule; an IPv4 client on a dual-stack
    /// listener shows as `::ffff:a.b.c.d` and is taken as its IPv4 address. (No other
    /// reading: an allow list must not grow by interpretation.)
    pub fn covers_client(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.nets.iter().any(|n| n.contains(&ip))
    }
}

/// The IPv4 address in an IPv4-mapped or IPv4-compatible IPv6 address.
fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    v6.to_ipv4_mapped().or_else(|| {
        let s = v6.segments();
        (s[..6] == [0; 6]).then(|| Ipv4Addr::from(((s[6] as u32) << 16) | s[7] as u32))
    })
}

/// The first rule of `rules` a connection to `ip` falls under.
pub fn denied_by(rules: &[AddrRule], ip: IpAddr) -> Option<&AddrRule> {
    rules.iter().find(|r| r.covers_target(ip))
}

/// A host that ends in a number but spells no address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadAddress;

/// A request's host read as an address, the way browsers and `getaddrinfo` read it:
/// an IPv6 literal in brackets, or IPv4 in any of inet_aton's spellings (`127.1`,
/// `0x7f000001`, `2130706433`, `0177.0.0.1`). `Ok(None)` for a name; `Err` for a host
/// that ends in a number but is no valid address (WHATWG URL: an invalid host).
pub fn host_ip(host: &str) -> Result<Option<IpAddr>, BadAddress> {
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return inner
            .parse::<Ipv6Addr>()
            .map(|a| Some(IpAddr::V6(a)))
            .map_err(|_| BadAddress);
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(Some(ip));
    }
    let h = host.strip_suffix('.').unwrap_or(host);
    let parts: Vec<&str> = h.split('.').collect();
    let last = parts.last().copied().unwrap_or("");
    if !is_number(last) {
        return Ok(None);
    }
    if parts.len() > 4 {
        return Err(BadAddress);
    }
    let mut numbers = Vec::with_capacity(parts.len());
    for p in &parts {
        numbers.push(number(p).ok_or(BadAddress)?);
    }
    let (last, first) = numbers.split_last().expect("at least one part");
    if first.iter().any(|&n| n > 255) || *last >= 1u64 << (8 * (5 - parts.len())) {
        return Err(BadAddress);
    }
    let mut ip = *last;
    for (i, &n) in first.iter().enumerate() {
        ip += n << (8 * (3 - i));
    }
    Ok(Some(IpAddr::V4(Ipv4Addr::from(ip as u32))))
}

/// True for a label WHATWG's host parser takes as a number: decimal digits, or `0x`
/// and hex digits.
fn is_number(label: &str) -> bool {
    if label.is_empty() {
        return false;
    }
    match label
        .strip_prefix("0x")
        .or_else(|| label.strip_prefix("0X"))
    {
        Some(hex) => hex.bytes().all(|b| b.is_ascii_hexdigit()),
        None => label.bytes().all(|b| b.is_ascii_digit()),
    }
}

/// One part of a loose IPv4 address: hex after `0x`, octal after a leading `0`,
/// decimal otherwise. `None` when it is none of them or passes 2³².
fn number(part: &str) -> Option<u64> {
    let (digits, radix) = match part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
        Some(hex) => (hex, 16),
        None if part.len() > 1 && part.starts_with('0') => (&part[1..], 8),
        None => (part, 10),
    };
    if digits.is_empty() {
        // `0x` alone is 0, as WHATWG reads it.
        return (radix == 16).then_some(0);
    }
    u64::from_str_radix(digits, radix)
        .ok()
        .filter(|&n| n <= u32::MAX as u64)
}

/// `allow_domains` or `deny_domains`: exact names and `*.suffix` patterns, looked up
/// with one hash probe per label of the name asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DomainRules {
    exact: HashMap<Box<str>, Arc<str>>,
    /// `*.example.com` is stored as `example.com`: every name under it, at any depth,
    /// and not `example.com` itself.
    under: HashMap<Box<str>, Arc<str>>,
}

impl DomainRules {
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.under.is_empty()
    }

    /// The pattern (as written) that `host` matches. `host` is a name as a request
    /// carries it: case and a final dot do not matter.
    pub fn find(&self, host: &str) -> Option<&Arc<str>> {
        // Asked on every forward request (`direct_domains` too): no work when empty.
        if self.is_empty() {
            return None;
        }
        let name = normalise(host);
        if let Some(rule) = self.exact.get(name.as_ref()) {
            return Some(rule);
        }
        let mut rest = name.as_ref();
        while let Some((_, parent)) = rest.split_once('.') {
            if let Some(rule) = self.under.get(parent) {
                return Some(rule);
            }
            rest = parent;
        }
        None
    }
}

/// Lower case without a final dot; borrowed when it already is.
fn normalise(host: &str) -> Cow<'_, str> {
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

impl TryFrom<Vec<String>> for DomainRules {
    type Error = String;
    fn try_from(list: Vec<String>) -> Result<Self, String> {
        let mut rules = DomainRules::default();
        for written in list {
            let (name, map) = match written.strip_prefix("*.") {
                Some(suffix) => (suffix, &mut rules.under),
                None => (written.as_str(), &mut rules.exact),
            };
            let name = normalise(name);
            let valid = !name.is_empty()
                && name.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                });
            if !valid {
                return Err(format!(
                    "invalid domain {written:?}: expected a name like \"example.com\" or \
                     \"*.example.com\" (every name under it)"
                ));
            }
            map.insert(name.into(), Arc::from(written.as_str()));
        }
        Ok(rules)
    }
}

impl<'de> serde::Deserialize<'de> for DomainRules {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let list = Vec::<String>::deserialize(d)?;
        DomainRules::try_from(list).map_err(serde::de::Error::custom)
    }
}

impl<'de> serde::Deserialize<'de> for AddrRule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(s: &str) -> AddrRule {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_default_rules_cover_every_spelling_of_this_host() {
        let rules: Vec<AddrRule> = DEFAULT_DENY.iter().map(|s| rule(s)).collect();
        for target in [
            "127.0.0.1",
            "127.255.255.254",
            "0.0.0.0",
            "0.1.2.3",
            "::1",
            "::",
            "::ffff:127.0.0.1",
            "::ffff:0.0.0.0",
            "::127.0.0.1",
            "::ffff:169.254.169.254",
            "169.254.169.254",
            "fe80::1",
        ] {
            assert!(denied_by(&rules, ip(target)).is_some(), "{target}");
        }
        for target in [
            "93.184.216.34",
            "2606:2800:220:1::1",
            "::ffff:93.184.216.34",
        ] {
            assert!(denied_by(&rules, ip(target)).is_none(), "{target}");
        }
    }

    #[test]
    fn loopback_covers_the_hosts_own_addresses() {
        let loopback = rule("loopback");
        for a in host_addresses() {
            assert!(loopback.covers_target(a), "{a}");
        }
    }

    #[test]
    fn groups_and_cidrs_parse_and_bad_ones_name_the_groups() {
        assert!(rule("private").covers_target(ip("172.20.1.1")));
        assert!(rule("private").covers_target(ip("100.64.0.1")));
        assert!(rule("private").covers_target(ip("fd00::1")));
        assert!(!rule("private").covers_target(ip("172.32.0.1")));
        assert!(rule("multicast").covers_target(ip("239.1.1.1")));
        assert!(rule("10.1.2.3/8").covers_target(ip("10.200.0.1")));
        assert!(rule("10.0.0.1").covers_target(ip("10.0.0.1")));
        let e = "localnet".parse::<AddrRule>().unwrap_err();
        assert!(e.contains("\"loopback\", \"link-local\""), "{e}");
    }

    #[test]
    fn clients_are_read_as_they_are_or_as_mapped_ipv4_only() {
        let ten = rule("10.0.0.0/8");
        assert!(ten.covers_client(ip("10.1.1.1")));
        assert!(ten.covers_client(ip("::ffff:10.1.1.1")));
        assert!(!ten.covers_client(ip("::10.1.1.1")));
        assert!(!ten.covers_client(ip("11.0.0.1")));
    }

    #[test]
    fn hosts_read_as_addresses_the_way_getaddrinfo_does() {
        let v4 = |s: &str| host_ip(s).unwrap().unwrap().to_string();
        assert_eq!(v4("127.0.0.1"), "127.0.0.1");
        assert_eq!(v4("127.1"), "127.0.0.1");
        assert_eq!(v4("127.0.1"), "127.0.0.1");
        assert_eq!(v4("2130706433"), "127.0.0.1");
        assert_eq!(v4("0x7f000001"), "127.0.0.1");
        assert_eq!(v4("0X7F.1"), "127.0.0.1");
        assert_eq!(v4("0177.0.0.1"), "127.0.0.1");
        assert_eq!(v4("017700000001"), "127.0.0.1");
        assert_eq!(v4("0"), "0.0.0.0");
        assert_eq!(v4("0x"), "0.0.0.0");
        assert_eq!(v4("127.0.0.1."), "127.0.0.1");
        assert_eq!(v4("[::ffff:127.0.0.1]"), "::ffff:127.0.0.1");
        assert_eq!(v4("[::]"), "::");
        for name in ["example.com", "localhost", "1.example", "0x7g.com", "a.0xg"] {
            assert_eq!(host_ip(name), Ok(None), "{name}");
        }
        for bad in [
            "256.0.0.1",
            "1.2.3.4.5",
            "4294967296",
            "08.0.0.1",
            "1..1",
            "1.2.65536",
            "a.0x",
            "[::g]",
            "a.b.99999999999999999999",
        ] {
            assert_eq!(host_ip(bad), Err(BadAddress), "{bad}");
        }
    }

    #[test]
    fn domain_rules_take_exact_names_and_every_name_under_a_suffix() {
        let rules =
            DomainRules::try_from(vec!["Ads.Example".to_owned(), "*.corp.example".to_owned()])
                .unwrap();
        assert_eq!(rules.find("ads.example").unwrap().as_ref(), "Ads.Example");
        assert!(rules.find("ADS.EXAMPLE.").is_some());
        assert!(rules.find("x.ads.example").is_none());
        assert!(rules.find("a.corp.example").is_some());
        assert!(rules.find("a.b.corp.example.").is_some());
        assert!(rules.find("corp.example").is_none());
        assert!(rules.find("notcorp.example").is_none());
        for bad in ["", "*.", "*", "a..b", "*.a.*.b", "a b", "ex ample.com"] {
            assert!(
                DomainRules::try_from(vec![bad.to_owned()]).is_err(),
                "{bad}"
            );
        }
    }
}
