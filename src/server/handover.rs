//! Leaving a shared port without refusing a connection: what makes a binary upgrade
//! (a new Strait started on the same addresses, then SIGTERM to the old one) lose
//! nothing.
//!
//! Listeners are bound with `SO_REUSEPORT`, so the new process listens beside the old
//! one and the kernel spreads new connections over the sockets of the port's reuseport
//! group. Closing a listening socket resets every connection in its accept queue and
//! every handshake under way towards it (Linux moves them to another socket of the
//! group only with `net.ipv4.tcp_migrate_req = 1`, a root-only sysctl that is off by
//! default). So when the exit begins, a listener that shares its port hands it over
//! before it closes:
//!
//! 1. A socket filter on it drops new SYNs: nothing new is queued here. A client whose
//!    SYN was dropped sends it again a second later, when this socket is gone: its
//!    connection is late, not refused.
//! 2. A reuseport program (classic BPF, which needs no privilege) steers new
//!    connections to another socket of the group, so that in practice no SYN is
//!    dropped. It returns an index into the group's array, which holds the sockets in
//!    the order they started listening, a closed one's place taken by the last: the
//!    last is the newest listener, the new binary. A guess shown wrong by the socket's
//!    drop count (SYNs still come here) moves to the next lower index.
//! 3. It accepts and serves what is queued and what the handshakes under way bring,
//!    until nothing came for [`SETTLE`] (at most [`HANDOVER_MAX`]).
//! 4. The program is taken off the group, whose sockets are balanced by hash again,
//!    and the listener closes.
//!
//! A listener alone on its port closes at once, as any listener did before.
//!
//! This module owns the exit's first step ([`Leaving`]) and the handover; the accept
//! loops call it. It knows nothing of HTTP.

use std::io::{self, BufRead};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{TaskTracker, task_tracker::TaskTrackerToken};

/// How long a listener handing over must see nothing arrive before it closes: long
/// enough for the handshakes under way towards it to complete (one round trip) and for
/// the clients of the connections it just accepted to send their first request.
pub(super) const SETTLE: Duration = Duration::from_millis(500);

/// The longest a handover lasts, whatever still arrives.
pub(super) const HANDOVER_MAX: Duration = Duration::from_secs(5);

/// How often a handover looks at its socket's drop count and accept queue.
const TICK: Duration = Duration::from_millis(20);

/// After a handover, how long a plain HTTP/1.1 connection idle at the drain (between
/// requests, or accepted and not yet sent its first) waits for one more request,
/// answered with `Connection: close`, before it closes. Closing it at once could cut
/// off a request its client is sending (a client that keeps its connections busy, as a
/// load balancer's or a benchmark's do, is never idle for long); the clients of a
/// process that handed its ports over reach the new one for their next connection.
pub(super) const IDLE_LINGER: Duration = Duration::from_secs(1);

/// The exit's first step, before the drain: every listener closes, those that share
/// their port once they handed it over. Each listener's task holds a [`TaskTrackerToken`]
/// while its socket is open.
#[derive(Clone, Default)]
pub(super) struct Leaving {
    begun: CancellationToken,
    open: TaskTracker,
    /// A listener's port was shared when the exit began: idle connections linger
    /// ([`IDLE_LINGER`]).
    shared: Arc<AtomicBool>,
}

impl Leaving {
    /// Held by a listener's task while its socket is open.
    pub fn hold(&self) -> TaskTrackerToken {
        self.open.token()
    }

    /// Completes once the exit began.
    pub async fn begun(&self) {
        self.begun.cancelled().await
    }

    /// Whether a listener's port was shared when the exit began (another process takes
    /// the clients over).
    pub fn shared(&self) -> bool {
        self.shared.load(Ordering::Relaxed)
    }

    /// Begins the exit and waits until every listener closed (at most `within`).
    pub async fn leave(&self, within: Duration) {
        self.begun.cancel();
        self.open.close();
        if tokio::time::timeout(within, self.open.wait())
            .await
            .is_err()
        {
            tracing::warn!("listeners still open after {within:?}; draining anyway");
        }
    }
}

/// Completes when the listener should close: when the exit begins, or, if the port is
/// shared, once it handed the port over ([`Handover`], kept in `state` between calls,
/// as the accept loop polls this beside its accept). False: nothing else listens on the
/// port (the admin listener then stays open until the process ends).
pub(super) async fn closing(
    state: &mut Option<Handover>,
    leaving: &Leaving,
    listener: Option<&TcpListener>,
    what: &'static str,
) -> bool {
    let Some(listener) = listener else {
        // A Unix socket has no reuseport group: it closes when the exit begins.
        leaving.begun().await;
        return false;
    };
    if state.is_none() {
        leaving.begun().await;
        let begin = Handover::begin(listener, what);
        if !matches!(begin, Begin::Alone) {
            leaving.shared.store(true, Ordering::Relaxed);
        }
        match begin {
            Begin::Alone => return false,
            Begin::CloseNow => return true,
            Begin::Handing(h) => *state = Some(h),
        }
    }
    if let Some(h) = state {
        h.settled(listener).await
    }
    true
}

/// What a listener does when the exit begins.
enum Begin {
    /// Nothing else listens on its port.
    Alone,
    /// The port is shared, but there is nothing to hand over: the kernel moves queued
    /// connections itself, or the filter cannot be attached.
    CloseNow,
    Handing(Handover),
}

/// Closes a listener that [`closing`] let go: the reuseport program comes off the group
/// first.
pub(super) fn close(state: Option<Handover>, listener: crate::net::Listener) {
    if let (Some(h), Some(tcp)) = (state, listener.as_tcp()) {
        h.finish(tcp);
    }
    drop(listener);
}

/// A listener handing its port over to the other sockets of its reuseport group.
pub(super) struct Handover {
    addr: SocketAddr,
    what: &'static str,
    began: Instant,
    /// The last connection accepted or SYN dropped here.
    last: Instant,
    next_check: Instant,
    accepted: u64,
    /// The socket's drop count when last read.
    drops: u32,
    /// The sockets in the group, this one included, when last counted.
    group: usize,
    /// The group index the program steers to.
    target: u32,
}

impl Handover {
    /// Starts handing over, unless nothing else listens on the port, the kernel
    /// migrates queued connections itself (`tcp_migrate_req`), or the socket filter
    /// cannot be attached.
    fn begin(listener: &TcpListener, what: &'static str) -> Begin {
        let Ok(addr) = listener.local_addr() else {
            return Begin::Alone;
        };
        let group = match listening_on(addr) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!("{what} {addr}: cannot tell whether the port is shared: {e}");
                return Begin::Alone;
            }
        };
        if group < 2 {
            return Begin::Alone;
        }
        if kernel_migrates() {
            tracing::info!(
                "{what} {addr}: closing; the kernel moves its queued connections to the \
                 {} other listener(s) on the port (net.ipv4.tcp_migrate_req)",
                group - 1
            );
            return Begin::CloseNow;
        }
        let fd = listener.as_raw_fd();
        if let Err(e) = attach(fd, SO_ATTACH_FILTER, &DROP_SYN) {
            tracing::warn!("{what} {addr}: cannot stop new connections coming here ({e}); closing");
            return Begin::CloseNow;
        }
        let target = u32::try_from(group - 1).unwrap_or(u32::MAX);
        steer(fd, target, addr, what);
        let now = Instant::now();
        tracing::info!(
            "{what} {addr}: handing over to the {} other listener(s) on the port",
            group - 1
        );
        Begin::Handing(Handover {
            addr,
            what,
            began: now,
            last: now,
            next_check: now + TICK,
            accepted: 0,
            drops: drops(fd).unwrap_or(0),
            group,
            target,
        })
    }

    /// A connection was accepted: the quiet period starts again.
    pub fn accepted(&mut self) {
        self.accepted += 1;
        self.last = Instant::now();
    }

    /// Completes once nothing came for [`SETTLE`] and the accept queue is empty, or
    /// [`HANDOVER_MAX`] after the start. Meanwhile, SYNs still dropped here move the
    /// program to the next index.
    async fn settled(&mut self, listener: &TcpListener) {
        let fd = listener.as_raw_fd();
        loop {
            let now = Instant::now();
            if now >= self.last + SETTLE && queued(fd) == Some(0) {
                return;
            }
            if now >= self.began + HANDOVER_MAX {
                tracing::warn!(
                    "{} {}: still receiving after {HANDOVER_MAX:?}; closing",
                    self.what,
                    self.addr
                );
                return;
            }
            tokio::time::sleep_until(self.next_check).await;
            self.next_check = Instant::now() + TICK;
            let Ok(d) = drops(fd) else { continue };
            if d == self.drops {
                continue;
            }
            // SYNs still reach this socket: the program steers here, or the group
            // changed. Those clients try again in a second, by when this socket is gone.
            self.drops = d;
            self.last = Instant::now();
            self.group = listening_on(self.addr).unwrap_or(self.group);
            if self.group < 2 {
                // Nothing left to hand over to.
                return;
            }
            let n = u32::try_from(self.group).unwrap_or(u32::MAX);
            self.target = self.target.min(n - 1).checked_sub(1).unwrap_or(n - 1);
            steer(fd, self.target, self.addr, self.what);
        }
    }

    /// Takes the program off the group: the sockets that stay are balanced by hash.
    fn finish(self, listener: &TcpListener) {
        let fd = listener.as_raw_fd();
        // SAFETY: a plain setsockopt on a socket this process owns; the value is unused.
        let zero: libc::c_int = 0;
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                SO_DETACH_REUSEPORT_BPF,
                (&zero as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            tracing::debug!(
                "{} {}: reuseport program not detached: {}",
                self.what,
                self.addr,
                io::Error::last_os_error()
            );
        }
        tracing::info!(
            "{} {}: handed over in {} ms ({} connection(s) accepted meanwhile)",
            self.what,
            self.addr,
            self.began.elapsed().as_millis(),
            self.accepted
        );
    }
}

/// Logs, once a listener is bound, that another socket already listens on its port:
/// with `SO_REUSEPORT` a second Strait started on the same address by mistake would
/// otherwise share it silently.
pub(super) fn note_sharing(listener: &TcpListener, what: &str) {
    let Ok(addr) = listener.local_addr() else {
        return;
    };
    if let Ok(n) = listening_on(addr)
        && n > 1
    {
        tracing::warn!(
            "{what} {addr}: sharing the port with {} other listening socket(s) \
             (SO_REUSEPORT): expected while a new binary takes over, a mistake otherwise",
            n - 1
        );
    }
}

// Socket options the libc crate does not export for every Linux target. The values are
// the kernel's asm-generic ones (sparc, parisc and alpha number them apart; Strait is
// not built for those).
/// Linux 2.2.
const SO_ATTACH_FILTER: libc::c_int = 26;
/// Linux 4.5.
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;
/// Linux 4.12.
const SO_MEMINFO: libc::c_int = 55;
/// Linux 5.3.
const SO_DETACH_REUSEPORT_BPF: libc::c_int = 68;
/// The length of `SO_MEMINFO`'s array.
const SK_MEMINFO_VARS: usize = 9;

const fn insn(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// Drops a TCP segment with SYN set and ACK clear (a new connection), keeps anything
/// else (the handshakes under way complete). The filter sees the TCP header at offset
/// 0; its flags are byte 13 (RFC 9293 §3.1).
const DROP_SYN: [libc::sock_filter; 5] = [
    // ldb [13]
    insn(
        (libc::BPF_LD | libc::BPF_B | libc::BPF_ABS) as u16,
        0,
        0,
        13,
    ),
    // and #(SYN|ACK)
    insn(
        (libc::BPF_ALU | libc::BPF_AND | libc::BPF_K) as u16,
        0,
        0,
        0x12,
    ),
    // jeq #SYN: drop, else keep
    insn(
        (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        0,
        1,
        0x02,
    ),
    insn((libc::BPF_RET | libc::BPF_K) as u16, 0, 0, 0),
    insn((libc::BPF_RET | libc::BPF_K) as u16, 0, 0, u32::MAX),
];

/// Points the group's reuseport program at `index` (a program that returns it).
fn steer(fd: RawFd, index: u32, addr: SocketAddr, what: &str) {
    let program = [insn((libc::BPF_RET | libc::BPF_K) as u16, 0, 0, index)];
    match attach(fd, SO_ATTACH_REUSEPORT_CBPF, &program) {
        Ok(()) => {
            tracing::debug!("{what} {addr}: new connections steered to socket {index} of the group")
        }
        // The filter alone still keeps connections from being reset; they are late.
        Err(e) => tracing::warn!("{what} {addr}: cannot steer new connections away ({e})"),
    }
}

/// Attaches a classic BPF program: a socket filter or a reuseport group's program.
fn attach(fd: RawFd, option: libc::c_int, program: &[libc::sock_filter]) -> io::Result<()> {
    let prog = libc::sock_fprog {
        len: program.len() as libc::c_ushort,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: the kernel copies the program during the call; `prog` and `program`
    // outlive it.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&prog as *const libc::sock_fprog).cast(),
            size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Packets the socket dropped (`SK_MEMINFO_DROPS`): here, SYNs the filter refused.
fn drops(fd: RawFd) -> io::Result<u32> {
    let mut info = [0u32; SK_MEMINFO_VARS];
    let mut len = size_of_val(&info) as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `info`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info[libc::SK_MEMINFO_DROPS as usize])
}

/// Connections waiting in a listening socket's accept queue (`tcpi_unacked` of a
/// listener, as `ss -l` shows in Recv-Q).
fn queued(fd: RawFd) -> Option<u32> {
    // SAFETY: tcp_info is plain data; the kernel writes at most `len` bytes.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(info.tcpi_unacked)
}

/// Whether the kernel moves a closed listener's connections to another socket of its
/// group (`net.ipv4.tcp_migrate_req`, Linux 5.14).
fn kernel_migrates() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req").is_ok_and(|v| v.trim() == "1")
}

/// How many sockets listen on exactly `addr` (this process's included), from
/// /proc/net/tcp or tcp6. A socket on the same port but another address is in another
/// group and is not counted. The kernel lists listening sockets before all others, so
/// reading stops at the first that is not listening: the established ones, however
/// many, are not read.
fn listening_on(addr: SocketAddr) -> io::Result<usize> {
    let (path, local) = match addr {
        SocketAddr::V4(a) => (
            "/proc/net/tcp",
            format!(
                "{:08X}:{:04X}",
                u32::from_ne_bytes(a.ip().octets()),
                a.port()
            ),
        ),
        SocketAddr::V6(a) => {
            let o = a.ip().octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            (
                "/proc/net/tcp6",
                format!(
                    "{:08X}{:08X}{:08X}{:08X}:{:04X}",
                    word(0),
                    word(4),
                    word(8),
                    word(12),
                    a.port()
                ),
            )
        }
    };
    let file = io::BufReader::new(std::fs::File::open(path)?);
    let mut n = 0;
    for line in file.lines().skip(1) {
        let line = line?;
        // "sl local_address rem_address st ..."
        let mut fields = line.split_whitespace().skip(1);
        let (Some(local_field), Some(_), Some(state)) =
            (fields.next(), fields.next(), fields.next())
        else {
            break;
        };
        if state != "0A" {
            break;
        }
        if local_field == local {
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_listener_counts_itself_and_a_second_socket_on_its_port() {
        let first = bound("127.0.0.1:0".parse().unwrap());
        let addr = first.local_addr().unwrap();
        assert_eq!(listening_on(addr).unwrap(), 1);
        let second = bound(addr);
        assert_eq!(listening_on(addr).unwrap(), 2);
        drop(second);
        assert_eq!(listening_on(addr).unwrap(), 1);
    }

    #[tokio::test]
    async fn an_ipv6_listener_is_found_in_tcp6() {
        let Ok(first) = std::panic::catch_unwind(|| bound("[::1]:0".parse().unwrap())) else {
            eprintln!("skipped: no IPv6 loopback");
            return;
        };
        let addr = first.local_addr().unwrap();
        let _second = bound(addr);
        assert_eq!(listening_on(addr).unwrap(), 2);
    }

    fn bound(addr: SocketAddr) -> TcpListener {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
        .unwrap();
        socket.set_reuseport(true).unwrap();
        socket.bind(addr).unwrap();
        socket.listen(16).unwrap()
    }
}
