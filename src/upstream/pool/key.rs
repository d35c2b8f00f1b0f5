//! [`Target`]: where a request goes, and the key the pool groups connections by.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use super::super::Profile;
use crate::config::Scheme;

/// Where one request goes, and the pool's key: scheme, authority (`host[:port]`,
/// exactly as it should appear in the URI), the Unix socket if it goes to one, and the
/// [`Profile`] of connection settings, everything that makes two connections
/// interchangeable. Made with [`Target::new`] (or [`Target::unix`]): a route makes its
/// targets once, the forward path one per request.
#[derive(Debug, Clone)]
pub struct Target {
    /// The connection profile: TLS roots, verification, server name, protocol and
    /// address policy. Compared by identity.
    pub profile: Arc<Profile>,
    pub scheme: Scheme,
    /// `host[:port]`; names the peer and, unless the profile overrides it, SNI. Parsed
    /// once (by the route or the forward path), so HTTP/2's `:authority` costs nothing.
    pub authority: http::uri::Authority,
    /// A Unix socket's path: connections go there, and the authority only names the
    /// server in the request (`Host`, `:authority`).
    pub unix: Option<Arc<Path>>,
    /// The key's digest, computed once: a request looks its key up twice (checkout and
    /// check-in), and hashing the authority cost more than the rest of a lookup.
    digest: u64,
}

/// The seed of key digests: random per process (forward-proxy targets are chosen by
/// clients, who must not be able to aim collisions).
static KEY_SEED: std::sync::OnceLock<foldhash::quality::RandomState> = std::sync::OnceLock::new();

impl PartialEq for Target {
    fn eq(&self, other: &Self) -> bool {
        self.profile.id == other.profile.id
            && self.scheme == other.scheme
            // As written (case-sensitive): `Authority`'s own comparison and hash fold
            // case byte by byte, which costs more than the whole key lookup otherwise.
            && self.authority.as_str() == other.authority.as_str()
            && self.unix == other.unix
    }
}

impl Eq for Target {}

impl std::hash::Hash for Target {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.digest);
    }
}

impl Target {
    pub fn new(profile: Arc<Profile>, scheme: Scheme, authority: http::uri::Authority) -> Target {
        Target::made(profile, scheme, authority, None)
    }

    /// HTTP over the Unix socket at `path`, naming the server `authority` in requests.
    pub fn unix(profile: Arc<Profile>, authority: http::uri::Authority, path: Arc<Path>) -> Target {
        Target::made(profile, Scheme::Http, authority, Some(path))
    }

    fn made(
        profile: Arc<Profile>,
        scheme: Scheme,
        authority: http::uri::Authority,
        unix: Option<Arc<Path>>,
    ) -> Target {
        use std::hash::BuildHasher;
        let digest = KEY_SEED.get_or_init(Default::default).hash_one((
            profile.id,
            scheme,
            authority.as_str(),
            unix.as_deref(),
        ));
        Target {
            profile,
            scheme,
            authority,
            unix,
            digest,
        }
    }

    /// The same place under another profile.
    pub fn with_profile(&self, profile: Arc<Profile>) -> Target {
        Target::made(
            profile,
            self.scheme,
            self.authority.clone(),
            self.unix.clone(),
        )
    }

    /// True when every connection for this key speaks HTTP/1.1: `version = "h1"`, or
    /// `auto` over plain http (h2c only when asked for).
    pub fn surely_h1(&self) -> bool {
        match self.profile.version {
            crate::config::Version::H1 => true,
            crate::config::Version::H2 => false,
            crate::config::Version::Auto => self.scheme == Scheme::Http,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(path) = &self.unix {
            return write!(f, "unix:{}", path.display());
        }
        write!(f, "{}://{}", self.scheme.as_str(), self.authority)
    }
}
