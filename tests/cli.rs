//! The command line as a user meets it: defaults, --check, exit codes.

mod support;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_config_is_a_forward_proxy_on_3128_that_refuses_loopback() {
    let origin = Origin::start().await;
    let strait = Strait::start_args(&[]);
    assert_eq!(strait.addr().to_string(), "127.0.0.1:3128");
    let out = curl(&["-x", "http://127.0.0.1:3128", &format!("{}/", origin.url())]).await;
    assert_eq!(out.status, 403);
    assert!(out.text().contains("deny_targets"), "{}", out.text());
    assert_eq!(origin.connections(), 0);
}

#[test]
fn the_example_config_passes_check() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/strait.example.toml");
    let (code, out, err) = run_strait(&["-c", example, "--check"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("ok"));
}

fn check(config: &str) -> (i32, String) {
    check_config(config)
}

#[test]
fn check_names_the_file_line_and_key_of_a_bad_value() {
    let (code, err) = check("[pool]\nmax_idle = 4\n\n[timeouts]\nconnect = \"fast\"\n");
    assert_eq!(code, 2);
    assert!(
        err.contains("strait.toml:5: timeouts.connect: invalid duration \"fast\""),
        "{err}"
    );
}

#[test]
fn check_refuses_unknown_keys() {
    let (code, err) = check("[forward]\nenabled = true\nusers = []\nhidden = true\n");
    assert_eq!(code, 2);
    assert!(
        err.contains("strait.toml:4: forward.hidden: unknown field `hidden`"),
        "{err}"
    );
}

#[test]
fn check_names_the_route_of_a_bad_upstream() {
    let (code, err) = check(
        "[[route]]\npath = \"/a/\"\nupstream = \"http://a\"\n\n[[route]]\npath = \"/b/\"\nupstream = [\"http://b\", \"ftp://c\"]\n",
    );
    assert_eq!(code, 2);
    assert!(err.contains("strait.toml:7: route[1].upstream"), "{err}");
    assert!(err.contains("ftp://c"), "{err}");
}

#[test]
fn check_names_a_health_check_setting_out_of_bounds() {
    let (code, err) = check(
        "[[route]]\nupstream = \"http://a\"\nhealth_check = \"/healthz\"\nhealth_interval = \"10ms\"\n",
    );
    assert_eq!(code, 2);
    assert!(
        err.contains(
            "strait.toml:4: route[0].health_interval: health_interval must be at least 100ms"
        ),
        "{err}"
    );
    let (code, err) = check("[[route]]\nupstream = \"http://a\"\nhealth_check = \"healthz\"\n");
    assert_eq!(code, 2);
    assert!(
        err.contains("strait.toml:3: route[0].health_check: invalid health check path"),
        "{err}"
    );
    let (code, err) =
        check("[[route]]\nupstream = \"http://a\"\nhealth_check = \"/status?full=1\"\n");
    assert_eq!(code, 0, "a query is allowed: {err}");
}

#[test]
fn check_names_a_missing_certificate_file() {
    let (code, err) = check(
        "[[listen]]\naddr = \"127.0.0.1:0\"\ntls = { cert = \"nope.pem\", key = \"nope.key\" }\n",
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("listen[0].tls.cert") && err.contains("nope.pem"),
        "{err}"
    );
}

#[test]
fn a_bad_quick_route_is_a_usage_error() {
    let (code, _, err) = run_strait(&["--route", "/api->http://x", "--check"]);
    assert_eq!(code, 2);
    assert!(err.contains("--route"), "{err}");
}

#[test]
fn a_port_in_use_exits_1_naming_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, _, err) = run_strait(&["-l", &addr]);
    assert_eq!(code, 1);
    assert!(err.contains(&addr) && err.contains("in use"), "{err}");
}

/// Listeners share ports with SO_REUSEPORT (docs/deployment.md, "Upgrading the binary"),
/// so one address named twice would bind twice: it is refused instead.
#[test]
fn an_address_listed_twice_is_a_config_error() {
    let (code, _, err) = run_strait(&["-l", "127.0.0.1:3999", "-l", "127.0.0.1:3999", "-t"]);
    assert_eq!(code, 2);
    assert!(err.contains("127.0.0.1:3999 is listed twice"), "{err}");
}

/// `-t` is `--check` (nginx's and Pingora's habit); `-V` prints the version.
#[test]
fn short_check_and_version_flags() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[timeouts]\nconnect = \"2s\"\n").unwrap();
    let (code, out, _) = run_strait(&["-t", "-c", good.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[timeouts]\nconnect = \"fast\"\n").unwrap();
    let (code, out, err) = run_strait(&["-t", "-c", bad.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(format!("{out}{err}").contains("bad.toml:2: timeouts.connect"));
    let (code, out, _) = run_strait(&["-V"]);
    assert_eq!(code, 0);
    assert_eq!(out.trim(), format!("strait {}", env!("CARGO_PKG_VERSION")));
}

/// `-l :PORT` listens on every IPv4 interface; `-l NAME:PORT` binds every address the
/// name resolves to (resolved once, at start); a bad one is refused with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_addresses_take_a_bare_port_and_a_name() {
    // On every interface a forward proxy needs users (or allow_clients, or open = true).
    let strait = Strait::start_args(&["-l", ":0", "-u", "a:b"]);
    assert!(
        strait
            .addrs
            .iter()
            .all(|a| a.ip().is_unspecified() && a.is_ipv4()),
        "{:?}",
        strait.addrs
    );
    let port = strait.addr().port();
    let out = curl(&[
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("http://127.0.0.1:{port}/"),
    ])
    .await;
    assert_eq!(out.status, 404);
    drop(strait);

    let strait = Strait::start_args(&["-l", "localhost:0"]);
    assert!(!strait.addrs.is_empty());
    assert!(
        strait.addrs.iter().all(|a| a.ip().is_loopback()),
        "{:?}",
        strait.addrs
    );

    let (code, _, err) = run_strait(&["--check", "-l", "no such host:80"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("invalid listen address"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s.toml");
    std::fs::write(
        &file,
        "[[listen]]\naddr = \":8080\"\n[forward]\nallow_clients = [\"10.0.0.0/8\"]\n",
    )
    .unwrap();
    let (code, out, err) = run_strait(&["--check", "-c", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
}

/// The configuration shipped in deploy/kubernetes/configmap.yaml passes `--check`.
#[test]
fn the_kubernetes_configmap_holds_a_valid_config() {
    let yaml = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/kubernetes/configmap.yaml"
    ))
    .unwrap();
    let toml: String = yaml
        .lines()
        .skip_while(|l| l.trim() != "strait.toml: |")
        .skip(1)
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    assert!(toml.contains("[[listen]]"), "{toml}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("strait.toml");
    std::fs::write(&file, toml).unwrap();
    let (code, out, err) = run_strait(&["--check", "-c", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
}

/// The configuration baked into the container image passes `--check` (it listens on every
/// interface, so it must say who may use the forward proxy).
#[test]
fn the_container_config_is_valid() {
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/strait.docker.toml");
    let (code, out, err) = run_strait(&["--check", "-c", file]);
    assert_eq!(code, 0, "{out}{err}");
    let dockerfile =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/Dockerfile")).unwrap();
    assert!(
        dockerfile.contains("COPY deploy/strait.docker.toml /etc/strait/strait.toml"),
        "{dockerfile}"
    );
}

/// `strait completions SHELL` and `strait man` print what packagers install, generated
/// from the flags themselves; neither starts a proxy.
#[test]
fn completions_and_the_man_page_come_from_the_flags() {
    let (code, bash, err) = run_strait(&["completions", "bash"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        bash.contains("--check") && bash.contains("--listen"),
        "{bash}"
    );
    let (code, zsh, _) = run_strait(&["completions", "zsh"]);
    assert_eq!(code, 0);
    assert!(zsh.starts_with("#compdef strait"), "{zsh}");
    let (code, _, err) = run_strait(&["completions", "tcsh"]);
    assert_eq!(code, 2, "{err}");

    let (code, man, err) = run_strait(&["man"]);
    assert_eq!(code, 0, "{err}");
    assert!(man.starts_with(".TH strait 1 "), "{man}");
    for section in [
        ".SH OPTIONS",
        ".SH COMMANDS",
        ".SH SIGNALS",
        ".SH \"EXIT STATUS\"",
    ] {
        assert!(man.contains(section), "no {section}: {man}");
    }
    assert!(man.contains(r"\-\-check"), "{man}");

    // Rendered as man would, with groff's warnings on.
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("strait.1");
    std::fs::write(&page, &man).unwrap();
    match std::process::Command::new("groff")
        .args(["-man", "-Tascii", "-P", "-cbou", "-ww"])
        .arg(&page)
        .output()
    {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            let warnings = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success() && warnings.is_empty(), "{warnings}");
            assert!(
                text.contains("SIGNALS") && text.contains("--check"),
                "{text}"
            );
        }
        Err(_) => eprintln!("skipped rendering: groff absent"),
    }
}

/// A subcommand does not mix with the flags that run Strait.
#[test]
fn a_subcommand_with_run_flags_is_a_usage_error() {
    let (code, _, err) = run_strait(&["-t", "man"]);
    assert_eq!(code, 2);
    assert!(err.contains("cannot be used with"), "{err}");
}
