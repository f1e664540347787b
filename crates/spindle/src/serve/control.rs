//! The control socket: one JSON object per line in, exactly one JSON
//! object per line out, for every line. The protocol is documented in
//! docs/control.md.

use super::request;
use super::server::Server;
use crate::protocol::{self, MAX_LINE};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Control connections served at once; more wait in the listen backlog
/// until one closes.
pub const MAX_CONNECTIONS: usize = 64;
/// A connection that sends nothing (or does not read its replies) for this
/// long is closed, so idle clients cannot hold every connection slot.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// One request line as read from a connection.
#[derive(Debug, PartialEq)]
enum Line {
    /// A line (without its newline), or the unterminated rest at the end.
    Full(Vec<u8>),
    /// A line longer than [`MAX_LINE`]; the rest of it is skipped.
    TooLong,
}

/// Splits a byte stream into request lines of at most [`MAX_LINE`] bytes.
struct Lines<R> {
    inner: R,
    partial: Vec<u8>,
    /// Discarding the rest of a line that was too long.
    skipping: bool,
}

impl<R: BufRead> Lines<R> {
    fn new(inner: R) -> Self {
        Lines {
            inner,
            partial: Vec::new(),
            skipping: false,
        }
    }

    /// The next line; `None` at the end of the stream.
    fn next_line(&mut self) -> std::io::Result<Option<Line>> {
        loop {
            let buf = match self.inner.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if buf.is_empty() {
                self.skipping = false;
                if self.partial.is_empty() {
                    return Ok(None);
                }
                return Ok(Some(Line::Full(std::mem::take(&mut self.partial))));
            }
            let newline = buf.iter().position(|&b| b == b'\n');
            let take = newline.unwrap_or(buf.len());
            if self.skipping {
                self.inner.consume(take + newline.map_or(0, |_| 1));
                self.skipping = newline.is_none();
                continue;
            }
            if self.partial.len() + take > MAX_LINE {
                self.inner.consume(take + newline.map_or(0, |_| 1));
                self.partial.clear();
                self.skipping = newline.is_none();
                return Ok(Some(Line::TooLong));
            }
            self.partial.extend_from_slice(&buf[..take]);
            self.inner.consume(take + newline.map_or(0, |_| 1));
            if newline.is_some() {
                return Ok(Some(Line::Full(std::mem::take(&mut self.partial))));
            }
        }
    }
}

/// Answers one request line (without its newline).
pub fn handle(server: &Server, line: &[u8]) -> Value {
    let res = protocol::parse(line).and_then(|req| request::execute(server, req).map_err(|e| e.to_string()));
    res.unwrap_or_else(|e| json!({"ok": false, "error": e}))
}

fn too_long() -> Value {
    json!({"ok": false, "error": format!("request longer than {MAX_LINE} bytes; the rest of the line is skipped")})
}

/// Serves the requests read from `input`, writing one reply line to `out`
/// for each request line, until the end of `input` or an I/O error.
pub fn serve_stream(server: &Server, input: impl Read, mut out: impl Write) -> std::io::Result<()> {
    let mut lines = Lines::new(BufReader::new(input));
    loop {
        let reply = match lines.next_line() {
            Ok(None) => return Ok(()),
            Ok(Some(Line::TooLong)) => too_long(),
            Ok(Some(Line::Full(l))) => handle(server, &l),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                // An unfinished request still gets its one reply.
                if !lines.partial.is_empty() {
                    let msg = format!(
                        "request not finished (no newline) within {} s; closing",
                        IDLE_TIMEOUT.as_secs()
                    );
                    writeln!(out, "{}", json!({"ok": false, "error": msg}))?;
                }
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        writeln!(out, "{reply}")?;
        out.flush()?;
    }
}

/// Counts the connections being served.
#[derive(Default)]
struct Slots {
    used: Mutex<usize>,
    freed: Condvar,
}

impl Slots {
    fn acquire(self: &Arc<Self>) -> SlotGuard {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        while *used >= MAX_CONNECTIONS {
            used = self.freed.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        *used += 1;
        SlotGuard(self.clone())
    }
}

/// Frees its slot when the connection's thread ends (or never started).
struct SlotGuard(Arc<Slots>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        *self.0.used.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        self.0.freed.notify_one();
    }
}

/// The control socket's file was bound by this process (not passed in by
/// systemd or a handover, whose files are left in place).
static BOUND_HERE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Removes the control socket's file at exit, if this process bound it:
/// one passed in (socket activation, a handover) is left to whoever
/// holds it, as the exports' are; a later start replaces a stale one.
pub fn remove_socket_file(path: &Path) {
    if BOUND_HERE.load(std::sync::atomic::Ordering::Acquire) {
        let _ = std::fs::remove_file(path);
    }
}

/// Listens on `path` and serves requests until the process exits, each
/// connection on a thread of its own, at most [`MAX_CONNECTIONS`] at once.
/// A control socket passed in (a handover, socket activation) is served
/// as it is.
pub fn listen(path: &Path, server: Arc<Server>) -> std::io::Result<()> {
    let listener = match super::activation::claim_path(path) {
        Some(l) => l,
        None => {
            if super::server::socket_in_use(path) {
                return Err(std::io::Error::new(
                    ErrorKind::AddrInUse,
                    "another process accepts connections on it",
                ));
            }
            spindle_vhost::export::claim_socket_path(path)?;
            let l = spindle_io::listen_unix(path)?;
            BOUND_HERE.store(true, std::sync::atomic::Ordering::Release);
            l
        }
    };
    super::handover::set_control(&listener, path)?;
    let slots = Arc::new(Slots::default());
    let mut warned: Option<std::time::Instant> = None;
    std::thread::Builder::new().name("control".into()).spawn(move || loop {
        let slot = slots.acquire();
        let conn = match listener.accept() {
            Ok((c, _)) => c,
            Err(e) => {
                // EMFILE and the like: wait instead of spinning, and say
                // so at most once a minute.
                match warned {
                    Some(t) if t.elapsed() < Duration::from_secs(60) => {}
                    _ => {
                        tracing::warn!("control socket: accept: {e}");
                        warned = Some(std::time::Instant::now());
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let server = server.clone();
        let _ = std::thread::Builder::new().name("control-conn".into()).spawn(move || {
            let _slot = slot;
            serve_conn(conn, &server)
        });
    })?;
    Ok(())
}

fn serve_conn(conn: UnixStream, server: &Server) {
    let _ = conn.set_read_timeout(Some(IDLE_TIMEOUT));
    let _ = conn.set_write_timeout(Some(IDLE_TIMEOUT));
    let Ok(out) = conn.try_clone() else { return };
    let _ = serve_stream(server, conn, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8]) -> Vec<Line> {
        let mut l = Lines::new(BufReader::with_capacity(7, input));
        std::iter::from_fn(|| l.next_line().unwrap()).collect()
    }

    /// Yields its bytes, then a read timeout.
    struct Stalls(&'static [u8]);

    impl Read for Stalls {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.0.is_empty() {
                return Err(ErrorKind::WouldBlock.into());
            }
            let n = self.0.len().min(buf.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn a_request_cut_off_by_the_idle_timeout_gets_its_reply() {
        let server = Server::default();
        let mut out = Vec::new();
        let r = serve_stream(&server, Stalls(b"{\"cmd\":\"list\"}\n{\"cmd\""), &mut out);
        assert_eq!(r.unwrap_err().kind(), ErrorKind::WouldBlock);
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].contains("\"ok\":true"), "{text}");
        assert!(lines[1].contains("request not finished"), "{text}");
        // Idle between requests: nothing to answer.
        let mut out = Vec::new();
        let _ = serve_stream(&server, Stalls(b"{\"cmd\":\"list\"}\n"), &mut out);
        assert_eq!(String::from_utf8(out).unwrap().lines().count(), 1);
    }

    #[test]
    fn splits_lines_and_keeps_an_unterminated_last_one() {
        assert_eq!(
            lines(b"a\n\nbcdefghijk\nlast"),
            vec![
                Line::Full(b"a".to_vec()),
                Line::Full(vec![]),
                Line::Full(b"bcdefghijk".to_vec()),
                Line::Full(b"last".to_vec())
            ]
        );
        assert!(lines(b"").is_empty());
    }

    #[test]
    fn a_line_over_the_cap_is_one_too_long_and_the_next_line_is_read() {
        let mut input = vec![b'x'; MAX_LINE + 1];
        input.extend_from_slice(b"\nok\n");
        input.extend(vec![b'y'; MAX_LINE]);
        input.extend_from_slice(b"\n");
        input.extend(vec![b'z'; 3 * MAX_LINE]);
        assert_eq!(
            lines(&input),
            vec![
                Line::TooLong,
                Line::Full(b"ok".to_vec()),
                Line::Full(vec![b'y'; MAX_LINE]),
                Line::TooLong
            ]
        );
    }
}
