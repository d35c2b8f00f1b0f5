//! `[[listen]] tls`: the certificate and key pairs a TLS listener serves, written as one
//! table, a list of tables or a directory. Which pair answers which server name is the
//! server's business (`server/tls.rs`); here they are only named, found and checked
//! readable.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};

/// A certificate chain and its private key, both PEM files.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The pairs of one TLS listener, in order: the first serves a client that names no
/// server, or a name no pair covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenTls {
    /// Never empty once the configuration is loaded.
    pub pairs: Vec<TlsFiles>,
    pub written: TlsWritten,
}

/// How `tls` was written, for messages that name the key at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsWritten {
    /// `tls = { cert, key }`
    Table,
    /// `tls = [{ cert, key }, …]`
    List,
    /// `tls = "DIR"`: the pairs found in it when the configuration was loaded.
    Dir(PathBuf),
}

impl ListenTls {
    /// One pair, as `tls = { cert, key }` or `--tls-cert`/`--tls-key` give it.
    pub fn one(files: TlsFiles) -> ListenTls {
        ListenTls {
            pairs: vec![files],
            written: TlsWritten::Table,
        }
    }

    /// The dotted key of pair `i` of `listen[n]`: `listen[0].tls`, `listen[0].tls[1]`.
    fn key(&self, n: usize, i: usize) -> String {
        match self.written {
            TlsWritten::List => format!("listen[{n}].tls[{i}]"),
            TlsWritten::Table | TlsWritten::Dir(_) => format!("listen[{n}].tls"),
        }
    }

    pub(super) fn resolve_paths(&mut self, join: impl Fn(&mut PathBuf)) {
        for p in &mut self.pairs {
            join(&mut p.cert);
            join(&mut p.key);
        }
        if let TlsWritten::Dir(d) = &mut self.written {
            join(d);
        }
    }

    /// Lists the directory of `tls = "DIR"` into pairs ([`pairs_in`]).
    pub(super) fn read_dir(&mut self, n: usize) -> Result<(), super::ConfigError> {
        if let TlsWritten::Dir(d) = &self.written {
            self.pairs = pairs_in(d)
                .map_err(|m| super::ConfigError::new(m).at(format!("listen[{n}].tls")))?;
        }
        Ok(())
    }

    /// Every file can be opened; the error names the key and the file.
    pub(super) fn check_readable(&self, n: usize) -> Result<(), super::ConfigError> {
        if self.pairs.is_empty() {
            let why = match &self.written {
                TlsWritten::Dir(d) => format!("the directory {} was not read", d.display()),
                _ => "no certificate is named".to_owned(),
            };
            return Err(super::ConfigError::new(why).at(format!("listen[{n}].tls")));
        }
        for (i, p) in self.pairs.iter().enumerate() {
            let key = self.key(n, i);
            let dotted = !matches!(self.written, TlsWritten::Dir(_));
            for (path, field) in [(&p.cert, "cert"), (&p.key, "key")] {
                std::fs::File::open(path).map_err(|e| {
                    let at = if dotted {
                        format!("{key}.{field}")
                    } else {
                        key.clone()
                    };
                    super::ConfigError::new(format!("cannot read {}: {e}", path.display())).at(at)
                })?;
            }
        }
        Ok(())
    }
}

/// The pairs of a certificate directory, in the byte order of their names: every
/// `NAME.pem` or `NAME.crt` with its `NAME.key` beside it. Files whose names begin with
/// a dot (editors' and Kubernetes' `..data`) and files with other extensions are
/// passed over; a certificate without its key, a key without its certificate, a name
/// with both `.pem` and `.crt`, or no pair at all is an error naming the file.
pub fn pairs_in(dir: &Path) -> Result<Vec<TlsFiles>, String> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot read the directory {}: {e}", dir.display()))?;
    let mut certs = BTreeMap::<String, PathBuf>::new();
    let mut keys = BTreeSet::<String>::new();
    for entry in entries {
        let entry =
            entry.map_err(|e| format!("cannot read the directory {}: {e}", dir.display()))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let path = entry.path();
        // Followed through symbolic links, as certbot's and Kubernetes' are.
        if name.starts_with('.') || !std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            continue;
        }
        let Some((stem, ext)) = name.rsplit_once('.') else {
            continue;
        };
        match ext {
            "pem" | "crt" => {
                if let Some(other) = certs.insert(stem.to_owned(), path.clone()) {
                    return Err(format!(
                        "{} and {} are both certificates for {stem}.key: keep one",
                        other.display(),
                        path.display()
                    ));
                }
            }
            "key" => {
                keys.insert(stem.to_owned());
            }
            _ => {}
        }
    }
    if let Some(stem) = keys.iter().find(|k| !certs.contains_key(*k)) {
        return Err(format!(
            "{}: a key without its certificate ({stem}.pem or {stem}.crt)",
            dir.join(format!("{stem}.key")).display()
        ));
    }
    let mut pairs = Vec::with_capacity(certs.len());
    for (stem, cert) in certs {
        if !keys.contains(&stem) {
            return Err(format!(
                "{}: a certificate without its key ({stem}.key)",
                cert.display()
            ));
        }
        pairs.push(TlsFiles {
            cert,
            key: dir.join(format!("{stem}.key")),
        });
    }
    if pairs.is_empty() {
        return Err(format!(
            "{}: no certificate in the directory (NAME.pem or NAME.crt beside NAME.key)",
            dir.display()
        ));
    }
    Ok(pairs)
}

impl<'de> Deserialize<'de> for ListenTls {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Written;
        impl<'de> Visitor<'de> for Written {
            type Value = ListenTls;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("{ cert = \"…\", key = \"…\" }, a list of such tables, or a directory")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<ListenTls, E> {
                if s.is_empty() {
                    return Err(E::custom("an empty directory name"));
                }
                Ok(ListenTls {
                    pairs: Vec::new(),
                    written: TlsWritten::Dir(PathBuf::from(s)),
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ListenTls, A::Error> {
                let one = TlsFiles::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(ListenTls::one(one))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<ListenTls, A::Error> {
                let pairs =
                    Vec::<TlsFiles>::deserialize(de::value::SeqAccessDeserializer::new(seq))?;
                if pairs.is_empty() {
                    return Err(de::Error::custom(
                        "an empty list: name at least one { cert, key } pair",
                    ));
                }
                Ok(ListenTls {
                    pairs,
                    written: TlsWritten::List,
                })
            }
        }
        d.deserialize_any(Written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Config;

    fn tls_of(text: &str) -> ListenTls {
        let c = Config::parse(&format!("[[listen]]\naddr = \"127.0.0.1:0\"\n{text}\n")).unwrap();
        c.listen[0].tls.clone().unwrap()
    }

    #[test]
    fn a_table_a_list_and_a_directory_are_all_accepted() {
        let one = tls_of("tls = { cert = \"a.pem\", key = \"a.key\" }");
        assert_eq!((one.pairs.len(), one.written), (1, TlsWritten::Table));
        let two = tls_of(
            "tls = [{ cert = \"a.pem\", key = \"a.key\" }, { cert = \"b.pem\", key = \"b.key\" }]",
        );
        assert_eq!(two.written, TlsWritten::List);
        assert_eq!(two.pairs[1].cert, PathBuf::from("b.pem"));
        let dir = tls_of("tls = \"certs\"");
        assert_eq!(dir.written, TlsWritten::Dir(PathBuf::from("certs")));
    }

    #[test]
    fn a_bad_entry_of_the_list_names_its_index_and_line() {
        let text = "[[listen]]\naddr = \"127.0.0.1:0\"\ntls = [\n  { cert = \"a.pem\", key = \"a.key\" },\n  { cert = \"b.pem\" },\n]\n";
        let e = Config::parse(text).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("listen[0].tls[1]"), "{e}");
        assert_eq!(e.line, Some(5), "{e}");
        assert!(e.message.contains("key"), "{e}");

        let e = Config::parse("[[listen]]\naddr = \"127.0.0.1:0\"\ntls = []\n").unwrap_err();
        assert!(e.message.contains("empty list"), "{e}");
        let e = Config::parse("[[listen]]\naddr = \"127.0.0.1:0\"\ntls = 3\n").unwrap_err();
        assert!(e.message.contains("directory"), "{e}");
    }

    #[test]
    fn a_directory_gives_its_pairs_in_name_order() {
        let d = tempfile::tempdir().unwrap();
        for f in [
            "b.pem",
            "b.key",
            "a.crt",
            "a.key",
            "README",
            ".hidden.pem",
            "c.csr",
        ] {
            std::fs::write(d.path().join(f), "x").unwrap();
        }
        std::fs::create_dir(d.path().join("old.pem")).unwrap();
        let pairs = pairs_in(d.path()).unwrap();
        let names: Vec<_> = pairs
            .iter()
            .map(|p| {
                let f = |p: &Path| p.file_name().unwrap().to_str().unwrap().to_owned();
                (f(&p.cert), f(&p.key))
            })
            .collect();
        assert_eq!(
            names,
            [
                ("a.crt".to_owned(), "a.key".to_owned()),
                ("b.pem".to_owned(), "b.key".to_owned())
            ]
        );
    }

    #[test]
    fn a_directory_with_an_odd_file_out_is_refused() {
        for (files, named) in [
            (&["a.pem"][..], "a.pem: a certificate without its key"),
            (&["a.pem", "a.key", "b.key"][..], "b.key: a key without"),
            (&["a.pem", "a.crt", "a.key"][..], "are both certificates"),
            (&["README"][..], "no certificate in the directory"),
        ] {
            let d = tempfile::tempdir().unwrap();
            for f in files {
                std::fs::write(d.path().join(f), "x").unwrap();
            }
            let e = pairs_in(d.path()).unwrap_err();
            assert!(e.contains(named), "{files:?}: {e}");
        }
        let e = pairs_in(Path::new("/nonexistent/certs")).unwrap_err();
        assert!(e.contains("/nonexistent/certs"), "{e}");
    }
}
