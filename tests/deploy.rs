//! The files in deploy/ for one host: the systemd units pass `systemd-analyze verify`,
//! reload with SIGHUP and stop with SIGTERM, the template (for binary upgrades) is the
//! unit with another name and a shared user, and logrotate asks for SIGUSR1.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::strait_bin;

fn deploy(file: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A unit's `Key=value` lines, in order, without comments or blank lines.
fn settings(unit: &str) -> Vec<(String, String)> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("not Key=value: {l}"));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

fn setting<'a>(unit: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    unit.iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// `systemd-analyze verify` on a copy of the unit whose commands run the binary under
/// test (verify needs them to exist). Passing means no error and no warning about it.
fn verify(file: &str, name: &str) {
    let unit = deploy(file).replace("/usr/local/bin/strait", strait_bin());
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join(name);
    std::fs::write(&path, unit).unwrap();
    let out = match Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("skipped: systemd-analyze absent");
            return;
        }
        Err(e) => panic!("systemd-analyze: {e}"),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{file}: {stderr}");
    let about_it: Vec<_> = stderr.lines().filter(|l| l.contains(name)).collect();
    assert!(about_it.is_empty(), "{file}: {about_it:#?}");
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    verify("strait.service", "strait.service");
}

#[test]
fn the_template_passes_systemd_analyze_verify() {
    verify("strait@.service", "strait@test.service");
}

/// `systemctl reload` is SIGHUP (the configuration), `systemctl stop` SIGTERM (the
/// drain, with time for `shutdown_grace`), and systemd waits for READY=1.
#[test]
fn the_unit_reloads_with_hup_stops_with_term_and_waits_for_ready() {
    let unit = settings(&deploy("strait.service"));
    assert_eq!(setting(&unit, "ExecReload"), ["/bin/kill -HUP $MAINPID"]);
    assert_eq!(setting(&unit, "KillSignal"), ["SIGTERM"]);
    assert_eq!(setting(&unit, "TimeoutStopSec"), ["45s"]);
    assert_eq!(setting(&unit, "Type"), ["notify"]);
    let start = setting(&unit, "ExecStart");
    assert_eq!(start, ["/usr/local/bin/strait -c /etc/strait/strait.toml"]);
    let check = setting(&unit, "ExecStartPre");
    assert_eq!(
        check,
        ["/usr/local/bin/strait --check -c /etc/strait/strait.toml"]
    );
}

/// The template is the unit but for its description and one user for every instance
/// (sockets share a port only within a user): the two cannot drift apart.
#[test]
fn the_template_is_the_unit_with_a_shared_user() {
    let unit = settings(&deploy("strait.service"));
    let template = settings(&deploy("strait@.service"));
    assert_eq!(setting(&template, "User"), ["strait"]);
    assert_eq!(setting(&template, "DynamicUser"), ["yes"]);
    let without = |s: &[(String, String)]| -> Vec<(String, String)> {
        s.iter()
            .filter(|(k, _)| k != "Description" && k != "User")
            .cloned()
            .collect()
    };
    assert_eq!(without(&template), without(&unit));
}

/// logrotate's postrotate sends SIGUSR1 (the access log reopens, nothing else), to the
/// unit and to the template's instances; never SIGHUP, which would reload.
#[test]
fn logrotate_asks_for_usr1() {
    let conf = deploy("strait.logrotate");
    let script: Vec<&str> = conf
        .lines()
        .map(str::trim)
        .skip_while(|l| *l != "postrotate")
        .skip(1)
        .take_while(|l| *l != "endscript")
        .filter(|l| !l.is_empty())
        .collect();
    assert!(!script.is_empty(), "no postrotate script: {conf}");
    for line in &script {
        assert!(
            line.starts_with("systemctl kill --signal=SIGUSR1 --kill-whom=main "),
            "{line}"
        );
        assert!(!line.contains("HUP"), "{line}");
    }
    assert!(script.iter().any(|l| l.contains(" strait.service ")));
    assert!(script.iter().any(|l| l.contains(" 'strait@*.service' ")));
    assert!(conf.contains("/var/log/strait/access.log {"), "{conf}");
}
