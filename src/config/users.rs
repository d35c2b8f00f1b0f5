//! `[forward] users_file`: proxy users kept apart from the config, one `name:hash` a
//! line, as `htpasswd -B` writes them.
//!
//! Only slow, salted hashes are taken: bcrypt (`$2y$`, `$2b$`, `$2a$`) and argon2 PHC
//! strings (`$argon2id$`, `$argon2i$`, `$argon2d$`). htpasswd's other formats are
//! refused at load with the line that holds one: MD5 (`$apr1$`), SHA-1 (`{SHA}`) and
//! crypt(3) hashes fall to a commodity GPU in hours, and a plain-text line is a
//! password in a file. Every hash is parsed here, once; checking a password against one
//! is `proxy::auth`'s work.

use std::collections::HashSet;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use argon2::password_hash::phc;

use super::ConfigError;

/// The config key that names the file, in every error about it.
const KEY: &str = "forward.users_file";

/// A user of the users file.
#[derive(Clone)]
pub struct FileUser {
    pub name: String,
    pub hash: PasswordHash,
    /// The line of the users file that defines it (1-based), for error messages.
    pub line: usize,
}

impl fmt::Debug for FileUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A hash is a secret too: it can be attacked offline.
        write!(f, "FileUser({:?}, line {})", self.name, self.line)
    }
}

/// A password hash of a kind Strait checks, parsed.
#[derive(Clone)]
pub enum PasswordHash {
    /// The full 60-character string (`$2y$10$…`); the bcrypt crate reads its cost and
    /// salt from it again at each check, which costs nothing beside the hashing.
    Bcrypt(String),
    /// A PHC string whose algorithm, version and parameters argon2 accepts (boxed:
    /// it holds its salt and output inline).
    Argon2(Box<phc::PasswordHash>),
}

impl PasswordHash {
    /// Whether `password` hashes to this. Slow on purpose (tens of milliseconds): call
    /// it off the async runtime.
    pub fn verify(&self, password: &[u8]) -> bool {
        match self {
            PasswordHash::Bcrypt(h) => bcrypt::verify(password, h).unwrap_or(false),
            PasswordHash::Argon2(h) => {
                use argon2::password_hash::PasswordVerifier;
                argon2::Argon2::default()
                    .verify_password(password, &**h)
                    .is_ok()
            }
        }
    }
}

impl FromStr for PasswordHash {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        const FIX: &str = "make a bcrypt hash with `htpasswd -B` (or an argon2id PHC string)";
        if s.starts_with("$2y$")
            || s.starts_with("$2b$")
            || s.starts_with("$2a$")
            || s.starts_with("$2x$")
        {
            let parts =
                bcrypt::HashParts::from_str(s).map_err(|e| format!("invalid bcrypt hash: {e}"))?;
            let cost = parts.get_cost();
            // bcrypt's own bounds (the crate refuses others at each check).
            if !(4..=31).contains(&cost) {
                return Err(format!(
                    "invalid bcrypt hash: cost {cost} is outside 4..=31"
                ));
            }
            return Ok(PasswordHash::Bcrypt(s.to_owned()));
        }
        if s.starts_with("$argon2") {
            let h = phc::PasswordHash::new(s).map_err(|e| format!("invalid argon2 hash: {e}"))?;
            argon2::Algorithm::try_from(h.algorithm.as_str())
                .map_err(|e| format!("invalid argon2 hash: {e}"))?;
            argon2::Params::try_from(&h).map_err(|e| format!("invalid argon2 hash: {e}"))?;
            if h.salt.is_none() || h.hash.is_none() {
                return Err("invalid argon2 hash: it has no salt or no hash output".into());
            }
            return Ok(PasswordHash::Argon2(Box::new(h)));
        }
        let why = if s.starts_with("$apr1$") || s.starts_with("$1$") {
            "MD5 hashes are too fast to guess against and are not accepted"
        } else if s.starts_with("{SHA}") {
            "unsalted SHA-1 hashes are too fast to guess against and are not accepted"
        } else if s.starts_with("$5$") || s.starts_with("$6$") {
            "SHA-crypt hashes are not supported"
        } else if s.is_empty() {
            "the hash is empty"
        } else {
            "not a bcrypt or argon2 hash (crypt(3) and plain-text passwords are not accepted)"
        };
        Err(format!("{why}; {FIX}"))
    }
}

/// Reads and parses a users file. Blank lines and lines starting with `#` are skipped.
/// An error names the file, the line and [`KEY`]; one about the file as a whole (it
/// cannot be read) leaves `file` empty for the caller to fill with the config's own.
pub(super) fn read(path: &Path) -> Result<Vec<FileUser>, ConfigError> {
    let text = std::fs::read(path).map_err(|e| ConfigError {
        file: None,
        line: None,
        key: Some(KEY.to_owned()),
        message: format!("cannot read the users file {}: {e}", path.display()),
    })?;
    parse(&text).map_err(|(line, message)| ConfigError {
        file: Some(path.to_owned()),
        line: Some(line),
        key: Some(KEY.to_owned()),
        message,
    })
}

/// Parses the text of a users file; an error is its line and the problem.
fn parse(text: &[u8]) -> Result<Vec<FileUser>, (usize, String)> {
    let mut users = Vec::new();
    let mut seen = HashSet::new();
    for (i, raw) in text.split(|&b| b == b'\n').enumerate() {
        let n = i + 1;
        let line = std::str::from_utf8(raw)
            .map_err(|_| (n, "the line is not UTF-8".to_owned()))?
            .trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((name, hash)) = line.split_once(':') else {
            return Err((n, "expected \"name:hash\"".to_owned()));
        };
        if name.is_empty() {
            return Err((n, "the user name is empty".to_owned()));
        }
        let hash = hash
            .parse()
            .map_err(|e| (n, format!("user {name:?}: {e}")))?;
        if !seen.insert(name) {
            return Err((
                n,
                format!("user {name:?} is defined twice: each name may appear once"),
            ));
        }
        users.push(FileUser {
            name: name.to_owned(),
            hash,
            line: n,
        });
    }
    Ok(users)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A line as `htpasswd -nbB` writes it (`$2y$`), at the lowest cost to keep tests
    /// quick.
    fn bcrypt_line(name: &str, password: &str) -> String {
        let parts = bcrypt::hash_with_result(password, 4).unwrap();
        format!("{name}:{}", parts.format_for_version(bcrypt::Version::TwoY))
    }

    #[test]
    fn htpasswd_bcrypt_lines_with_comments_and_blank_lines_load() {
        let text = format!(
            "# proxy users\n\n{}\r\n  {}  \n",
            bcrypt_line("alice", "s3cret"),
            bcrypt_line("bob", "hunter2")
        );
        let users = parse(text.as_bytes()).unwrap();
        let names: Vec<_> = users.iter().map(|u| (u.name.as_str(), u.line)).collect();
        assert_eq!(names, [("alice", 3), ("bob", 4)]);
        assert!(users[1].hash.verify(b"hunter2"));
        assert!(!users[1].hash.verify(b"hunter3"));
    }

    #[test]
    fn an_argon2_phc_string_loads_and_verifies() {
        use argon2::password_hash::PasswordHasher;
        let params = argon2::Params::new(256, 1, 1, None).unwrap();
        let h = argon2::Argon2::from(params)
            .hash_password_with_salt(b"s3cret", b"saltsaltsalt")
            .unwrap()
            .to_string();
        assert!(h.starts_with("$argon2id$"), "{h}");
        let users = parse(format!("carol:{h}\n").as_bytes()).unwrap();
        assert!(users[0].hash.verify(b"s3cret"));
        assert!(!users[0].hash.verify(b"s3cre"));
    }

    #[test]
    fn weak_or_unknown_formats_are_refused_with_their_line_and_the_fix() {
        for (line, why) in [
            ("dave:$apr1$Kx0dQ2Eb$4a2F1y0S0bqYBiY5RHe2c/", "MD5"),
            ("dave:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", "SHA-1"),
            ("dave:$6$salt$abcdef", "SHA-crypt"),
            ("dave:rl5P7iPmVAn1.", "not a bcrypt or argon2 hash"),
            ("dave:plaintext", "not a bcrypt or argon2 hash"),
            ("dave:$2y$05$short", "invalid bcrypt hash"),
            ("dave:$argon2id$v=19$m=bad", "invalid argon2 hash"),
        ] {
            let text = format!("{}\n{line}\n", bcrypt_line("alice", "s3cret"));
            let (n, e) = parse(text.as_bytes()).unwrap_err();
            assert_eq!(n, 2, "{line}");
            assert!(e.contains(why), "{line}: {e}");
            if !why.starts_with("invalid") {
                assert!(e.contains("htpasswd -B"), "{line}: {e}");
            }
        }
    }

    #[test]
    fn a_line_without_a_colon_an_empty_name_or_a_second_definition_is_an_error() {
        let cases = [
            ("alice\n", 1, "expected \"name:hash\""),
            (":$2y$05$x\n", 1, "name is empty"),
            ("#\n{ALICE}\n{ALICE}\n", 3, "defined twice"),
        ];
        for (text, line, why) in cases {
            let text = text.replace("{ALICE}", &bcrypt_line("alice", "s3cret"));
            let (n, e) = parse(text.as_bytes()).unwrap_err();
            assert_eq!((n, e.contains(why)), (line, true), "{text:?}: {e}");
        }
    }

    #[test]
    fn an_unreadable_file_names_the_key_and_the_file() {
        let e = read(Path::new("/nonexistent/strait-users")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some(KEY));
        assert!(e.message.contains("/nonexistent/strait-users"), "{e}");
    }
}
