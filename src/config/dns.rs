//! `[dns]`: where upstream names are resolved and how many answers are kept.

use std::net::{IpAddr, SocketAddr};

use serde::Deserialize;
use serde::de::{self, Deserializer};

/// `[dns]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Dns {
    /// The name servers asked, over UDP and TCP; empty = the system's resolv.conf.
    pub servers: Vec<NameServer>,
    /// Names whose answers are kept, each until its TTL passes; 0 = none kept.
    pub cache_size: u64,
}

impl Default for Dns {
    fn default() -> Self {
        Dns {
            servers: Vec::new(),
            cache_size: 4096,
        }
    }
}

/// A name server: `IP` (port 53) or `IP:PORT` (`[v6]:PORT` for IPv6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NameServer(pub SocketAddr);

impl std::str::FromStr for NameServer {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(NameServer(SocketAddr::new(ip, 53)));
        }
        match s.parse::<SocketAddr>() {
            Ok(addr) if addr.port() != 0 => Ok(NameServer(addr)),
            _ => Err(format!(
                "invalid name server {s:?}: expected an IP address, optionally with a port, \
                 like \"10.0.0.2\", \"10.0.0.2:5353\" or \"[2001:db8::53]:53\""
            )),
        }
    }
}

impl<'de> Deserialize<'de> for NameServer {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use crate::Config;

    #[test]
    fn servers_take_an_address_with_or_without_a_port() {
        let c = Config::parse("").unwrap();
        assert!(c.dns.servers.is_empty());
        assert_eq!(c.dns.cache_size, 4096);
        let c = Config::parse(
            "[dns]\nservers = [\"10.0.0.2\", \"127.0.0.1:5353\", \"[::1]:53\", \"::1\"]\ncache_size = 0\n",
        )
        .unwrap();
        let got: Vec<String> = c.dns.servers.iter().map(|s| s.0.to_string()).collect();
        assert_eq!(
            got,
            ["10.0.0.2:53", "127.0.0.1:5353", "[::1]:53", "[::1]:53"]
        );
        assert_eq!(c.dns.cache_size, 0);
    }

    #[test]
    fn a_bad_server_names_its_line_and_key() {
        for bad in ["dns.example", "10.0.0.2:0", "10.0.0.2:dns", ""] {
            let text = format!("[dns]\ncache_size = 10\nservers = [\"10.0.0.1\", \"{bad}\"]\n");
            let e = Config::parse(&text).unwrap_err();
            assert_eq!(
                (e.line, e.key.as_deref()),
                (Some(3), Some("dns.servers[1]")),
                "{bad}: {e}"
            );
            assert!(e.message.contains("invalid name server"), "{e}");
        }
        let e = Config::parse("[dns]\ncache = 1\n").unwrap_err();
        assert!(e.to_string().contains("cache"), "{e}");
    }
}
