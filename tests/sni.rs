//! Several certificates on one TLS listener, chosen by the ClientHello's server name:
//! exact names, one-label wildcards, the first for everything else; each pair
//! replaced on its own; `--check`'s word on names covered twice; a directory of
//! pairs; the expiry metric.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use support::*;

const DAY: u64 = 86_400;

/// A CA that signs leaf certificates into a directory as `FILE.pem` and `FILE.key`.
struct Ca {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: PathBuf,
}

/// A leaf as written: its files and its DER, to recognise it on the wire.
struct Leaf {
    cert: PathBuf,
    key: PathBuf,
    der: Vec<u8>,
}

impl Ca {
    fn new(dir: &Path) -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "strait sni test CA");
        let cert = params.self_signed(&key).unwrap();
        let pem = dir.join("ca.pem");
        std::fs::write(&pem, cert.pem()).unwrap();
        Ca {
            issuer: rcgen::Issuer::new(params, key),
            pem,
        }
    }

    /// A leaf for `names` valid until `days` from now (negative: expired), written as
    /// `dir/FILE.pem` and `dir/FILE.key`.
    fn leaf(&self, dir: &Path, file: &str, names: &[&str], days: i64) -> Leaf {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let epoch = rcgen::date_time_ymd(1970, 1, 1);
        let until = now() as i64 + days * DAY as i64;
        params.not_before = epoch + Duration::from_secs(now() - 30 * DAY);
        params.not_after = epoch + Duration::from_secs(until as u64);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let leaf = Leaf {
            cert: dir.join(format!("{file}.pem")),
            key: dir.join(format!("{file}.key")),
            der: cert.der().to_vec(),
        };
        std::fs::write(&leaf.cert, cert.pem()).unwrap();
        std::fs::write(&leaf.key, key.serialize_pem()).unwrap();
        leaf
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// `tls = [...]` for these leaves, in order.
fn tls_list(leaves: &[&Leaf]) -> String {
    let pairs: Vec<String> = leaves
        .iter()
        .map(|l| {
            format!(
                "{{ cert = \"{}\", key = \"{}\" }}",
                l.cert.display(),
                l.key.display()
            )
        })
        .collect();
    format!("tls = [{}]", pairs.join(", "))
}

fn listener(tls: &str, origin: &Origin, extra: &str) -> String {
    format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n{tls}\n{extra}\n[[route]]\nupstream = \"{}\"\n",
        origin.url()
    )
}

/// Accepts any certificate: these tests look at which one came, not whether to trust it.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The leaf certificate Strait presents to a client that sends `sni` as its server name
/// (`None`: no server name, as for an IP address).
async fn presented(strait: &Strait, sni: Option<&str>) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    let name = match sni {
        Some(n) => ServerName::try_from(n.to_owned()).unwrap(),
        None => ServerName::IpAddress(strait.addr().ip().into()),
    };
    let tcp = tokio::net::TcpStream::connect(strait.addr()).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// Which of `leaves` Strait presents for `sni`, by file name, for readable failures.
async fn served<'a>(strait: &Strait, sni: Option<&str>, leaves: &[&'a Leaf]) -> &'a str {
    let der = presented(strait, sni).await;
    leaves
        .iter()
        .find(|l| l.der == der)
        .map(|l| l.cert.file_name().unwrap().to_str().unwrap())
        .unwrap_or("a certificate of none of the leaves")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_is_chosen_by_server_name_exact_then_wildcard_then_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path());
    let default = ca.leaf(dir.path(), "default", &["default.test"], 90);
    let a = ca.leaf(dir.path(), "a", &["a.test"], 90);
    let wild = ca.leaf(dir.path(), "wild", &["*.wild.test"], 90);
    let exact = ca.leaf(dir.path(), "exact", &["x.wild.test"], 90);
    let origin = Origin::with(|_| async { ok("hello") }).await;
    let strait = Strait::start(
        &listener(&tls_list(&[&default, &a, &wild, &exact]), &origin, ""),
        &[],
    );
    let all = [&default, &a, &wild, &exact];
    for (sni, want) in [
        (Some("a.test"), "a.pem"),
        (Some("default.test"), "default.pem"),
        (Some("b.wild.test"), "wild.pem"),
        (Some("x.wild.test"), "exact.pem"),
        (Some("wild.test"), "default.pem"),
        (Some("a.b.wild.test"), "default.pem"),
        (Some("unknown.test"), "default.pem"),
        (None, "default.pem"),
    ] {
        assert_eq!(
            served(&strait, sni, &all).await,
            want,
            "server name {sni:?}"
        );
    }

    // curl asking for a.test by name verifies a.test's certificate, and gets through.
    let port = strait.addr().port();
    for name in ["a.test", "b.wild.test", "default.test"] {
        let out = curl(&[
            "--cacert",
            ca.pem.to_str().unwrap(),
            "--resolve",
            &format!("{name}:{port}:127.0.0.1"),
            &format!("https://{name}:{port}/"),
        ])
        .await;
        assert_eq!(
            (out.status, out.text().as_str()),
            (200, "hello"),
            "{name}: {out:?}"
        );
    }
    // An unknown name gets the first certificate, which does not cover it.
    let out = curl(&[
        "--cacert",
        ca.pem.to_str().unwrap(),
        "--resolve",
        &format!("unknown.test:{port}:127.0.0.1"),
        &format!("https://unknown.test:{port}/"),
    ])
    .await;
    assert_ne!(out.exit, 0, "{out:?}");
}

/// Replaces `dst` with `src` by rename, as certbot and acme.sh do.
fn replace_by_rename(src: &Path, dst: &Path) {
    let tmp = dst.with_extension("new");
    std::fs::copy(src, &tmp).unwrap();
    std::fs::rename(&tmp, dst).unwrap();
}

/// Waits until one log line contains every needle.
async fn wait_for_line(strait: &Strait, needles: &[&str]) {
    for _ in 0..500 {
        if strait
            .logs()
            .iter()
            .any(|l| needles.iter().all(|n| l.contains(n)))
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no log line with all of {needles:?}: {:#?}", strait.logs());
}

async fn eventually_served(strait: &Strait, sni: &str, leaves: &[&Leaf], want: &str) {
    for _ in 0..50 {
        if served(strait, Some(sni), leaves).await == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!(
        "{sni} was not served {want} within 10 s: {:#?}",
        strait.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_pair_is_reloaded_on_its_own_and_a_bad_one_keeps_its_old_version() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path());
    let default = ca.leaf(dir.path(), "default", &["default.test"], 90);
    let a = ca.leaf(dir.path(), "a", &["a.test"], 90);
    let wild = ca.leaf(dir.path(), "wild", &["*.wild.test"], 90);
    let renewals = tempfile::tempdir().unwrap();
    let a2 = ca.leaf(renewals.path(), "a", &["a.test", "more.test"], 180);
    let origin = Origin::start().await;
    let strait = Strait::start(
        &listener(
            &tls_list(&[&default, &a, &wild]),
            &origin,
            "[admin]\naddr = \"127.0.0.1:0\"",
        ),
        &[],
    );
    let all = [&default, &a, &wild, &a2];
    assert_eq!(served(&strait, Some("a.test"), &all).await, "a.pem");

    // a's files renewed by rename: a.test (and the name the renewal added) get the new
    // certificate; the other pairs are not touched.
    replace_by_rename(&a2.key, &a.key);
    replace_by_rename(&a2.cert, &a.cert);
    let is_a2 = |der: Vec<u8>| der == a2.der;
    for _ in 0..50 {
        if is_a2(presented(&strait, Some("a.test")).await) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        is_a2(presented(&strait, Some("a.test")).await),
        "{:#?}",
        strait.logs()
    );
    assert!(is_a2(presented(&strait, Some("more.test")).await));
    assert_eq!(served(&strait, Some("b.wild.test"), &all).await, "wild.pem");
    assert_eq!(served(&strait, None, &all).await, "default.pem");
    let reloaded: Vec<String> = strait
        .logs()
        .into_iter()
        .filter(|l| l.contains("certificate reloaded"))
        .collect();
    assert_eq!(reloaded.len(), 1, "{reloaded:#?}");
    assert!(reloaded[0].contains("a.pem"), "{reloaded:#?}");

    // A broken renewal of the wildcard's certificate is refused; it stays as it was.
    std::fs::write(&wild.cert, b"-----BEGIN CERTIFICATE-----\nnot base64\n").unwrap();
    wait_for_line(&strait, &["certificate reload refused", "wild.pem"]).await;
    assert_eq!(served(&strait, Some("b.wild.test"), &all).await, "wild.pem");
    assert!(is_a2(presented(&strait, Some("a.test")).await));
    assert!(
        strait
            .metric("strait_reloads_total{what=\"certificate\",result=\"refused\"}")
            .await
            >= 1.0
    );
    // A valid one, then, is picked up.
    let wild2 = ca.leaf(renewals.path(), "wild", &["*.wild.test"], 30);
    replace_by_rename(&wild2.key, &wild.key);
    replace_by_rename(&wild2.cert, &wild.cert);
    for _ in 0..50 {
        if presented(&strait, Some("b.wild.test")).await == wild2.der {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(presented(&strait, Some("b.wild.test")).await, wild2.der);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_expiry_of_each_name_is_a_gauge_that_follows_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path());
    let default = ca.leaf(dir.path(), "default", &["default.test"], 90);
    let wild = ca.leaf(dir.path(), "wild", &["*.wild.test", "wild.test"], 10);
    let expired = ca.leaf(dir.path(), "expired", &["old.test"], -2);
    let origin = Origin::start().await;
    let strait = Strait::start(
        &listener(
            &tls_list(&[&default, &wild, &expired]),
            &origin,
            "[admin]\naddr = \"127.0.0.1:0\"",
        ),
        &[],
    );
    let expiry = |name: &str| format!("strait_tls_certificate_expiry_seconds{{name=\"{name}\"}}");
    let near = |got: f64, days: i64| (got - (days * DAY as i64) as f64).abs() < 120.0;
    let got = strait.metric(&expiry("default.test")).await;
    assert!(near(got, 90), "{got}");
    for name in ["*.wild.test", "wild.test"] {
        let got = strait.metric(&expiry(name)).await;
        assert!(near(got, 10), "{name}: {got}");
    }
    let got = strait.metric(&expiry("old.test")).await;
    assert!(near(got, -2), "an expired certificate is negative: {got}");

    // Renewed: the gauge follows.
    let renewals = tempfile::tempdir().unwrap();
    let wild2 = ca.leaf(renewals.path(), "wild", &["*.wild.test"], 60);
    replace_by_rename(&wild2.key, &wild.key);
    replace_by_rename(&wild2.cert, &wild.cert);
    strait.wait_for_log("certificate reloaded").await;
    let got = strait.metric(&expiry("*.wild.test")).await;
    assert!(near(got, 60), "{got}");
    let text = curl(&[&format!("http://{}/metrics", strait.admin_addr())])
        .await
        .text();
    assert!(
        !text.contains("name=\"wild.test\""),
        "a name the renewal dropped has no series: {text}"
    );
}

#[test]
fn check_warns_of_a_name_two_certificates_cover_and_names_both_files() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path());
    let one = ca.leaf(dir.path(), "one", &["a.test", "b.test"], 90);
    let two = ca.leaf(dir.path(), "two", &["a.test", "c.test"], 90);
    let config = dir.path().join("strait.toml");
    std::fs::write(
        &config,
        format!(
            "[[listen]]\naddr = \"127.0.0.1:0\"\n{}\n",
            tls_list(&[&one, &two])
        ),
    )
    .unwrap();
    let (code, out, err) = run_strait(&["-t", "-c", config.to_str().unwrap()]);
    assert_eq!(code, 0, "a warning, not an error: {err}");
    assert!(out.contains("ok"), "{out}");
    let warning = err
        .lines()
        .find(|l| l.contains("warning"))
        .unwrap_or_else(|| panic!("no warning: {err}"));
    assert!(
        warning.contains("a.test")
            && warning.contains(one.cert.to_str().unwrap())
            && warning.contains(two.cert.to_str().unwrap()),
        "{warning}"
    );
    assert!(!err.contains("b.test") && !err.contains("c.test"), "{err}");

    // Without the overlap, --check says nothing more than ok.
    let three = ca.leaf(dir.path(), "three", &["c.test"], 90);
    std::fs::write(
        &config,
        format!(
            "[[listen]]\naddr = \"127.0.0.1:0\"\n{}\n",
            tls_list(&[&one, &three])
        ),
    )
    .unwrap();
    let (code, _, err) = run_strait(&["-t", "-c", config.to_str().unwrap()]);
    assert_eq!((code, err.as_str()), (0, ""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_directory_serves_its_pairs_and_is_listed_again_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    let ca = Ca::new(dir.path());
    // Name order makes the default: "00-default" before "a".
    let default = ca.leaf(&certs, "00-default", &["default.test"], 90);
    let a = ca.leaf(&certs, "a", &["a.test"], 90);
    std::fs::rename(&a.cert, certs.join("a.crt")).unwrap();
    let origin = Origin::start().await;
    let strait = Strait::start(
        &listener(&format!("tls = \"{}\"", certs.display()), &origin, ""),
        &[],
    );
    let leaves = [&default, &a];
    assert_eq!(served(&strait, Some("a.test"), &leaves).await, "a.pem");
    assert_eq!(
        served(&strait, Some("x.test"), &leaves).await,
        "00-default.pem"
    );
    assert_eq!(served(&strait, None, &leaves).await, "00-default.pem");

    // A pair added to the directory is served after SIGHUP.
    let b = ca.leaf(&certs, "b", &["b.test"], 90);
    let leaves = [&default, &a, &b];
    assert_eq!(
        served(&strait, Some("b.test"), &leaves).await,
        "00-default.pem"
    );
    strait.signal("HUP");
    strait.wait_for_log("SIGHUP: configuration reloaded").await;
    eventually_served(&strait, "b.test", &leaves, "b.pem").await;
    assert_eq!(served(&strait, Some("a.test"), &leaves).await, "a.pem");

    // One left without its key: the reload is refused, and the listener serves on.
    std::fs::remove_file(&b.key).unwrap();
    strait.signal("HUP");
    strait.wait_for_log("configuration not reloaded").await;
    assert!(
        strait
            .logs()
            .iter()
            .any(|l| l.contains("b.pem: a certificate without its key")),
        "{:#?}",
        strait.logs()
    );
    assert_eq!(served(&strait, Some("b.test"), &leaves).await, "b.pem");
}

#[test]
fn a_bad_certificate_directory_is_a_config_error_with_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path());
    let certs = dir.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    let config = dir.path().join("strait.toml");
    let check = |tls: &str| {
        std::fs::write(
            &config,
            format!(
                "[admin]\naddr = \"127.0.0.1:0\"\n\n[[listen]]\naddr = \"127.0.0.1:0\"\n{tls}\n"
            ),
        )
        .unwrap();
        run_strait(&["-t", "-c", config.to_str().unwrap()])
    };
    let at = format!("{}:6: listen[0].tls: ", config.display());

    let (code, _, err) = check("tls = \"certs\"");
    assert_eq!(code, 2);
    assert!(
        err.contains(&at) && err.contains("no certificate in the directory"),
        "{err}"
    );

    let lone = ca.leaf(&certs, "lone", &["lone.test"], 90);
    std::fs::remove_file(&lone.key).unwrap();
    let (code, _, err) = check("tls = \"certs\"");
    assert_eq!(code, 2);
    assert!(
        err.contains(&at) && err.contains("lone.pem: a certificate without its key"),
        "{err}"
    );

    let (code, _, err) = check("tls = \"missing\"");
    assert_eq!(code, 2);
    assert!(err.contains(&at) && err.contains("missing"), "{err}");

    // A pair whose files are there but whose certificate is not: exit 2, naming it.
    std::fs::write(&lone.key, "not a key").unwrap();
    let (code, _, err) = check("tls = \"certs\"");
    assert_eq!(code, 2);
    assert!(err.contains("lone.key"), "{err}");

    // The list form names the entry.
    let (code, _, err) = check(
        "tls = [{ cert = \"certs/lone.pem\", key = \"certs/lone.key\" }, { cert = \"certs/nope.pem\", key = \"certs/lone.key\" }]",
    );
    assert_eq!(code, 2);
    assert!(
        err.contains(&format!("{}:6: listen[0].tls[1].cert: ", config.display()))
            && err.contains("nope.pem"),
        "{err}"
    );
}
