//! systemd's readiness protocol (`sd_notify`): `READY=1` once every listener is bound
//! and served, `STOPPING=1` when the exit begins. A unit with `Type=notify` is started
//! only then, so `systemctl start` of a second instance returns once it listens (the
//! binary upgrade in docs/deployment.md relies on it). Without `NOTIFY_SOCKET` (not
//! under such a unit) nothing is sent.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;

/// Sends `state` (`READY=1`, `STOPPING=1`) to the service manager, if one asked.
pub(super) fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send(path.as_bytes(), state.as_bytes()) {
        tracing::warn!("NOTIFY_SOCKET {}: {e}", path.to_string_lossy());
    }
}

fn send(path: &[u8], state: &[u8]) -> std::io::Result<()> {
    let socket = UnixDatagram::unbound()?;
    match path.strip_prefix(b"@") {
        // An abstract socket address, as systemd gives it.
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(state, &addr)?
        }
        None => socket.send_to(state, std::ffi::OsStr::from_bytes(path))?,
    };
    Ok(())
}
