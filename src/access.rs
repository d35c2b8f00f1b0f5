//! The access log: one line per request and per tunnel, JSON or combined.
//!
//! Request handling never waits for it: lines go into a bounded queue that one writer
//! thread drains into a buffered file (or stdout), flushing whenever the queue runs dry;
//! when the queue is full the line is dropped and counted
//! (`strait_access_log_dropped_lines_total`). A log file is reopened on SIGHUP, for
//! logrotate. A plain thread, not a task: file writes block, and tokio's file type would
//! hop to its blocking pool for every write.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use tokio::sync::Notify;

use crate::config::{self, LogFormat};
use crate::net::ClientAddr;

/// Lines that may wait for the writer; more are dropped.
pub const QUEUE: usize = 8192;

/// One request or tunnel, as logged.
pub struct Entry<'a> {
    pub client: ClientAddr,
    pub user: &'a str,
    pub method: &'a str,
    pub target: &'a str,
    pub protocol: &'a str,
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration: Duration,
    pub kind: &'a str,
    pub route: &'a str,
    pub upstream: &'a str,
    pub referer: &'a str,
    pub user_agent: &'a str,
}

/// The sending side of the access log. The writer thread ends once every clone is
/// gone and it has written what they queued (a reload that changes `[log]` starts a new
/// one; requests under way finish their lines on the old).
#[derive(Clone)]
pub struct AccessLog {
    tx: SyncSender<String>,
    format: LogFormat,
    dropped: Counter,
    _reopener: Arc<Reopener>,
}

/// The task that passes SIGHUP on to the writer (a flag, never a wait on the full
/// queue of a stalled writer); stopped with the last [`AccessLog`] clone.
struct Reopener(tokio::task::AbortHandle);

impl Drop for Reopener {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl AccessLog {
    /// Starts the writer; `None` when the log is off.
    pub fn start(cfg: &config::Log, reopen_on: Arc<Notify>, dropped: Counter) -> Option<AccessLog> {
        let sink = match &cfg.access {
            config::AccessLog::Off => return None,
            config::AccessLog::Stdout => Sink::Stdout,
            config::AccessLog::File(p) => Sink::File(p.clone()),
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        // SIGHUP and SIGUSR1 reach the writer as a flag it looks at every round.
        let reopen = Arc::new(AtomicBool::new(false));
        std::thread::Builder::new()
            .name("strait-access-log".into())
            .spawn({
                let reopen = reopen.clone();
                move || write_lines(rx, reopen, sink)
            })
            .expect("starting the access log thread");
        let reopener = tokio::spawn({
            let reopen = reopen.clone();
            async move {
                loop {
                    reopen_on.notified().await;
                    reopen.store(true, Ordering::Relaxed);
                }
            }
        });
        Some(AccessLog {
            tx,
            format: cfg.format,
            dropped,
            _reopener: Arc::new(Reopener(reopener.abort_handle())),
        })
    }

    /// Queues one line; never waits.
    pub fn log(&self, e: &Entry<'_>) {
        let line = match self.format {
            LogFormat::Json => json_line(e),
            LogFormat::Combined => combined_line(e),
        };
        if let Err(TrySendError::Full(_)) = self.tx.try_send(line) {
            self.dropped.inc();
        }
    }
}

enum Sink {
    Stdout,
    File(PathBuf),
}

fn open(path: &PathBuf) -> Option<std::fs::File> {
    match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::error!(path = %path.display(), "cannot open the access log: {e}");
            None
        }
    }
}

fn write_lines(rx: Receiver<String>, reopen: Arc<AtomicBool>, sink: Sink) {
    let writer = |sink: &Sink| -> Box<dyn std::io::Write> {
        match sink {
            Sink::Stdout => Box::new(std::io::stdout()),
            Sink::File(p) => match open(p) {
                Some(f) => Box::new(f),
                None => Box::new(std::io::sink()),
            },
        }
    };
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, writer(&sink));
    loop {
        if reopen.swap(false, Ordering::Relaxed)
            && let Sink::File(p) = &sink
        {
            let _ = out.flush();
            out = std::io::BufWriter::with_capacity(64 * 1024, writer(&sink));
            tracing::info!(path = %p.display(), "access log reopened");
        }
        // Drain what is queued, write it, then sleep a little. The writer never blocks
        // on the queue, so senders never have to wake it: no context switch per line.
        let mut drained = 0usize;
        loop {
            match rx.try_recv() {
                Ok(line) => {
                    drained += 1;
                    if let Err(e) = out.write_all(line.as_bytes()) {
                        tracing::warn!("access log write failed: {e}");
                    }
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    let _ = out.flush();
                    return;
                }
            }
        }
        let _ = out.flush();
        // A busy log is drained more often, so the queue does not fill.
        std::thread::sleep(if drained > QUEUE / 4 {
            Duration::from_millis(2)
        } else {
            Duration::from_millis(20)
        });
    }
}

/// The current time in RFC 3339 with milliseconds, formatted at most once per
/// millisecond per thread.
fn with_now<R>(f: impl FnOnce(&str) -> R) -> R {
    thread_local! {
        static NOW: std::cell::RefCell<(u128, String)> = const { std::cell::RefCell::new((0, String::new())) };
    }
    let now = SystemTime::now();
    let ms = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    NOW.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.0 != ms || cached.1.is_empty() {
            cached.1.clear();
            let _ = write!(cached.1, "{}", humantime::format_rfc3339_millis(now));
            cached.0 = ms;
        }
        f(&cached.1)
    })
}

/// A JSON string with quotes and escapes.
fn json_str(out: &mut String, s: &str) {
    out.push('"');
    if !s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        out.push_str(s);
        out.push('"');
        return;
    }
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn json_line(e: &Entry<'_>) -> String {
    let mut o = String::with_capacity(320);
    o.push_str("{\"time\":");
    with_now(|now| json_str(&mut o, now));
    // An address needs no escaping.
    let _ = write!(o, ",\"client\":\"{}\"", e.client);
    o.push_str(",\"user\":");
    json_str(&mut o, e.user);
    o.push_str(",\"method\":");
    json_str(&mut o, e.method);
    o.push_str(",\"target\":");
    json_str(&mut o, e.target);
    o.push_str(",\"protocol\":");
    json_str(&mut o, e.protocol);
    let _ = write!(
        o,
        ",\"status\":{},\"bytes_in\":{},\"bytes_out\":{},\"duration_ms\":{:.3}",
        e.status,
        e.bytes_in,
        e.bytes_out,
        e.duration.as_secs_f64() * 1000.0
    );
    o.push_str(",\"kind\":");
    json_str(&mut o, e.kind);
    o.push_str(",\"route\":");
    json_str(&mut o, e.route);
    o.push_str(",\"upstream\":");
    json_str(&mut o, e.upstream);
    o.push_str(",\"referer\":");
    json_str(&mut o, e.referer);
    o.push_str(",\"user_agent\":");
    json_str(&mut o, e.user_agent);
    o.push_str("}\n");
    o
}

/// Apache's combined format (`%h %l %u %t "%r" %>s %b "%{Referer}i" "%{User-agent}i"`,
/// with the time as `[04/Dec/2026:00:45:01 +0000]`, which log tools parse), plus the
/// duration, the route and the upstream at the end. What a client sent is escaped as
/// nginx escapes it, so a quote in a field cannot end it early.
fn combined_line(e: &Entry<'_>) -> String {
    let mut o = String::with_capacity(256);
    // `%h`: the address without its port; `unix:` for a Unix socket's client.
    let _ = match e.client {
        ClientAddr::Ip(a) => write!(o, "{} - ", a.ip()),
        ClientAddr::Unix => write!(o, "{} - ", e.client),
    };
    clf_str(&mut o, e.user);
    o.push_str(" [");
    o.push_str(std::str::from_utf8(&crate::date::clf_now()).unwrap_or("-"));
    let _ = write!(o, "] \"{} ", e.method);
    clf_str(&mut o, e.target);
    let _ = write!(o, " {}\" {} {} \"", e.protocol, e.status, e.bytes_out);
    clf_str(&mut o, e.referer);
    o.push_str("\" \"");
    clf_str(&mut o, e.user_agent);
    let _ = writeln!(
        o,
        "\" {:.3} {} {}",
        e.duration.as_secs_f64(),
        e.route,
        e.upstream
    );
    o
}

/// `s` with `"`, `\`, control bytes and bytes beyond ASCII written as `\xHH`, as
/// nginx writes variables into its access log.
fn clf_str(out: &mut String, s: &str) {
    let escaped = |b: u8| !(0x20..0x7f).contains(&b) || b == b'"' || b == b'\\';
    if !s.bytes().any(escaped) {
        out.push_str(s);
        return;
    }
    for b in s.bytes() {
        if escaped(b) {
            let _ = write!(out, "\\x{b:02X}");
        } else {
            out.push(char::from(b));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reverse request's entry; each test changes what it is about.
    fn entry() -> Entry<'static> {
        Entry {
            client: ClientAddr::Ip("10.0.0.1:5".parse().unwrap()),
            user: "-",
            method: "GET",
            target: "/",
            protocol: "HTTP/1.1",
            status: 200,
            bytes_in: 10,
            bytes_out: 20,
            duration: Duration::from_millis(5),
            kind: "reverse",
            route: "/",
            upstream: "http://u",
            referer: "-",
            user_agent: "-",
        }
    }

    #[test]
    fn json_lines_escape_what_clients_send() {
        let e = Entry {
            target: "/a\"b\\c\n",
            ..entry()
        };
        let line = json_line(&e);
        assert!(line.ends_with("}\n"));
        assert!(line.contains(r#""target":"/a\"b\\c\n""#), "{line}");
        assert!(
            line.contains(r#""status":200,"bytes_in":10,"bytes_out":20"#),
            "{line}"
        );
    }

    #[test]
    fn combined_lines_keep_their_fields_whatever_a_client_sends() {
        let e = Entry {
            target: "/a\"b",
            user_agent: "x\" 500 1 \"\\y\t",
            ..entry()
        };
        let line = combined_line(&e);
        let (head, rest) = line.split_once(" [").unwrap();
        assert_eq!(head, "10.0.0.1 - -");
        let (time, rest) = rest.split_once("] ").unwrap();
        assert_eq!(time.len(), crate::date::CLF_LEN, "{time}");
        assert!(time.ends_with(" +0000"), "{time}");
        assert_eq!(
            rest,
            "\"GET /a\\x22b HTTP/1.1\" 200 20 \"-\" \"x\\x22 500 1 \\x22\\x5Cy\\x09\" 0.005 / http://u\n"
        );
    }
}
