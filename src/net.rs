//! Client-side sockets of either family: a listener on a TCP address or a Unix socket
//! path (`unix:/path`), the stream it accepts, and the client's address as logs and
//! `X-Forwarded-For` show it.
//!
//! A TCP connection costs one predictable branch per read or write over a bare
//! `TcpStream`. A Unix socket's file is Strait's while it listens: a stale one (a
//! socket file nobody accepts on) is replaced at bind, a live one is an error, anything
//! that is not a socket is never removed, and the file goes when the listener is
//! dropped (a clean exit, or a reload that removes the listener), unless another
//! socket has taken its place meanwhile. This module knows nothing of HTTP.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

/// Who a client is, as far as Strait can tell: its IP address and port, or a client of
/// a Unix socket (which has no address worth showing; nginx writes `unix:` too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAddr {
    Ip(SocketAddr),
    Unix,
}

impl ClientAddr {
    /// The client's IP address; `None` for a Unix socket's client.
    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            ClientAddr::Ip(a) => Some(a.ip()),
            ClientAddr::Unix => None,
        }
    }

    /// True for a client on this host: a loopback address, or a Unix socket (reachable
    /// only by processes that may open its file).
    pub fn is_local(&self) -> bool {
        match self {
            ClientAddr::Ip(a) => a.ip().to_canonical().is_loopback(),
            ClientAddr::Unix => true,
        }
    }
}

impl fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientAddr::Ip(a) => a.fmt(f),
            ClientAddr::Unix => f.write_str("unix:"),
        }
    }
}

impl From<SocketAddr> for ClientAddr {
    fn from(a: SocketAddr) -> ClientAddr {
        ClientAddr::Ip(a)
    }
}

/// An accepted client connection.
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    /// Waits for bytes and copies the first of them into `buf` without taking them from
    /// the socket.
    pub async fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.peek(buf).await,
            // tokio has no `peek` for Unix streams: `recv(MSG_PEEK)` on readiness.
            Stream::Unix(s) => loop {
                s.readable().await?;
                let fd = s.as_raw_fd();
                match s.try_io(Interest::READABLE, || peek_fd(fd, buf)) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    r => return r,
                }
            },
        }
    }

    /// Ready when the socket may have bytes to read (or has failed).
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Tcp(s) => s.poll_read_ready(cx),
            Stream::Unix(s) => s.poll_read_ready(cx),
        }
    }

    /// Makes closing the socket send a TCP reset. A Unix socket has none: its peer
    /// sees the end of the stream (or a reset, if bytes it sent were left unread).
    pub fn set_zero_linger(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_zero_linger(),
            Stream::Unix(_) => Ok(()),
        }
    }
}

/// `recv(fd, buf, MSG_PEEK)`.
fn peek_fd(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `fd` is an open socket borrowed for the call, and `buf` is valid for
    // writes of its length.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_PEEK) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl AsyncRead for Stream {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    #[inline]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Unix(s) => s.is_write_vectored(),
        }
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A bound listener of either family.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    /// With its socket file, removed when the listener is dropped.
    Unix(UnixListener, SocketFile),
}

impl Listener {
    /// The TCP listener, when it is one.
    pub fn as_tcp(&self) -> Option<&TcpListener> {
        match self {
            Listener::Tcp(l) => Some(l),
            Listener::Unix(..) => None,
        }
    }

    /// Accepts a connection: the stream, the client, and the local address it came
    /// to (`None` on a Unix socket).
    pub async fn accept(&self) -> io::Result<(Stream, ClientAddr, Option<SocketAddr>)> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                // Requests and responses are written whole; waiting for more bytes only
                // adds latency.
                let _ = s.set_nodelay(true);
                let local = s.local_addr().or_else(|_| l.local_addr()).ok();
                Ok((Stream::Tcp(s), ClientAddr::Ip(peer), local))
            }
            Listener::Unix(l, _) => {
                let (s, _) = l.accept().await?;
                Ok((Stream::Unix(s), ClientAddr::Unix, None))
            }
        }
    }

    /// What the listener is bound to, for the log: `127.0.0.1:3128` or `unix:/path`.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map_or_else(|e| format!("(unknown: {e})"), |a| a.to_string()),
            Listener::Unix(_, file) => format!("unix:{}", file.path.display()),
        }
    }
}

/// A Unix socket file this process created. Dropped, it removes the file if it is still
/// the same file (device and inode): a socket another process has put in its place since
/// is left alone.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    id: (u64, u64),
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let same =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id);
        if same {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// How long the probe of a socket file already at a listener's path may take.
const PROBE_WITHIN: Duration = Duration::from_secs(1);

/// Binds a Unix socket at `path` with `backlog`. A socket file already there is replaced
/// when nothing accepts on it (connecting is refused: a process that held it ended
/// without removing it); when something does, the error is `AddrInUse`. Anything else
/// at the path (a regular file, a directory) is an error, and is left as it is.
///
/// The file's mode is what the process's umask leaves of 0777 (connecting needs write
/// permission on it): docs/deployment.md says how to open or restrict it.
pub async fn bind_unix(path: &Path, backlog: u32) -> io::Result<Listener> {
    match std::fs::symlink_metadata(path) {
        // Probed without blocking: a live listener whose backlog is full would hold a
        // blocking connect (and the start, or a reload) until it took one.
        Ok(m) if m.file_type().is_socket() => {
            let probe = tokio::time::timeout(PROBE_WITHIN, UnixStream::connect(path)).await;
            match probe {
                Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    tracing::info!(path = %path.display(), "removing a stale socket file");
                    std::fs::remove_file(path)?;
                }
                Ok(Err(e)) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
                // Connected, or a full backlog, or no answer in time: someone listens.
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        "address in use: another process accepts connections on this socket",
                    ));
                }
            }
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket (it is left as it is)",
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let std = std::os::unix::net::UnixListener::bind(path)?;
    let meta = std::fs::symlink_metadata(path)?;
    let file = SocketFile {
        path: path.to_owned(),
        id: (meta.dev(), meta.ino()),
    };
    // std listens with its own backlog; a second `listen` on a listening socket sets
    // the one asked for (Linux, as the BSDs).
    let backlog = i32::try_from(backlog).unwrap_or(i32::MAX);
    // SAFETY: the descriptor is the open listening socket `std` owns.
    if unsafe { libc::listen(std.as_raw_fd(), backlog) } != 0 {
        return Err(io::Error::last_os_error());
    }
    std.set_nonblocking(true)?;
    Ok(Listener::Unix(UnixListener::from_std(std)?, file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_the_file_goes_with_the_listener() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        // A socket file nobody accepts on: the listener that made it is gone, the file
        // stays (std does not remove it).
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let l = bind_unix(&path, 16).await.unwrap();
        assert!(UnixStream::connect(&path).await.is_ok());
        let e = bind_unix(&path, 16).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        drop(l);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn a_file_that_is_no_socket_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        std::fs::write(&path, "keep me").unwrap();
        assert!(bind_unix(&path, 16).await.is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me");
    }

    #[tokio::test]
    async fn a_socket_put_in_its_place_is_not_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let l = bind_unix(&path, 16).await.unwrap();
        std::fs::remove_file(&path).unwrap();
        let other = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(l);
        assert!(path.exists());
        drop(other);
    }

    #[tokio::test]
    async fn peek_leaves_the_bytes_for_the_reader() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"hello").await.unwrap();
        let mut s = Stream::Unix(a);
        let mut head = [0u8; 3];
        assert_eq!(s.peek(&mut head).await.unwrap(), 3);
        assert_eq!(&head, b"hel");
        let mut all = [0u8; 5];
        s.read_exact(&mut all).await.unwrap();
        assert_eq!(&all, b"hello");
    }

    #[test]
    fn a_unix_client_shows_as_unix_and_is_local() {
        assert_eq!(ClientAddr::Unix.to_string(), "unix:");
        assert!(ClientAddr::Unix.is_local());
        assert_eq!(ClientAddr::Unix.ip(), None);
        let a: ClientAddr = "10.0.0.1:5".parse::<SocketAddr>().unwrap().into();
        assert!(!a.is_local());
        assert_eq!(a.to_string(), "10.0.0.1:5");
    }
}
