//! `--metrics ADDR`: a small HTTP/1.1 responder for `GET /metrics`, on
//! threads of its own (never an I/O thread), on loopback TCP by default
//! or a unix socket.
//!
//! Each connection gets one request and one reply, then is closed. What
//! a client can do to it is bounded: the request head must arrive within
//! [`HEAD_DEADLINE`] and fit in [`MAX_HEAD`] bytes (else 408 or 431), at
//! most [`MAX_CONNECTIONS`] are served at once (the next ones get 503 at
//! once), and anything that is not a well-formed `GET`/`HEAD` of
//! `/metrics` gets 400, 404 or 405. The listening socket and its accept
//! thread are `listen.rs`'s.

use super::{encode, gather, Format};
use crate::error::{CliResult, Error};
use crate::serve::server::Server;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The longest request head (request line and headers) read.
pub const MAX_HEAD: usize = 8 * 1024;
/// How long a client may take to send its request head.
pub const HEAD_DEADLINE: Duration = Duration::from_secs(5);
/// How long a reply may take to be taken by the client.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more are answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 8;
/// The host of an address given as a port alone.
pub const DEFAULT_HOST: &str = "127.0.0.1";

pub(super) fn invalid(msg: String) -> Error {
    Error::Usage(msg)
}

/// Where the endpoint listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    /// TCP: the addresses the host resolved to (the first that binds).
    Tcp(Vec<SocketAddr>),
    /// A unix socket.
    Unix(PathBuf),
}

/// Parses `--metrics`: `unix:PATH` or a path with a `/` (a unix socket);
/// `HOST:PORT` or `[IPV6]:PORT` (port 0: any free one); `PORT` or
/// `:PORT` alone listen on 127.0.0.1, never on every interface.
pub fn parse(s: &str) -> CliResult<Addr> {
    if let Some(p) = s.strip_prefix("unix:") {
        if p.is_empty() {
            return Err(invalid("--metrics unix: needs a socket path".into()));
        }
        return Ok(Addr::Unix(PathBuf::from(p)));
    }
    if s.contains('/') {
        return Ok(Addr::Unix(PathBuf::from(s)));
    }
    let bad = || {
        invalid(format!(
            "--metrics {s}: expected HOST:PORT, [IPV6]:PORT, PORT, unix:PATH or a socket path"
        ))
    };
    let (host, port) = match s.rsplit_once(':') {
        Some(("", port)) => (DEFAULT_HOST, port),
        Some((host, port)) => (host, port),
        None => (DEFAULT_HOST, s),
    };
    let port: u16 = port.parse().map_err(|_| bad())?;
    let bracketed = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
    if bracketed.is_none() && host.contains(':') {
        return Err(bad());
    }
    let host = bracketed.unwrap_or(host);
    if host.is_empty() {
        return Err(bad());
    }
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| invalid(format!("--metrics {s}: {e}")))?
        .collect();
    if addrs.is_empty() {
        return Err(invalid(format!("--metrics {s}: {host} has no address")));
    }
    Ok(Addr::Tcp(addrs))
}

/// What an operator should hear about listening on `a`.
pub fn warning(a: &SocketAddr) -> Option<String> {
    let ip = a.ip();
    if ip.is_unspecified() {
        Some(format!(
            "the metrics endpoint listens on every interface ({a}): anyone who reaches this host can read it"
        ))
    } else if !ip.is_loopback() {
        Some(format!(
            "the metrics endpoint listens on {a}, not a loopback address: anyone who reaches it can read it"
        ))
    } else {
        None
    }
}

/// A connection, either kind.
pub(super) trait Conn: Read + Write + Send {
    fn timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> std::io::Result<()>;
    /// Ends the sending side (the client reads to its end).
    fn finish(&self);
}

impl Conn for TcpStream {
    fn timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(read)?;
        self.set_write_timeout(write)
    }
    fn finish(&self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
}

impl Conn for UnixStream {
    fn timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(read)?;
        self.set_write_timeout(write)
    }
    fn finish(&self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
}

/// How long, and how much, a refused request's unread rest is read and
/// dropped before the connection closes: closing with unread bytes makes
/// the kernel reset the connection, and the client could lose the reply.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 4 << 20;

/// Ends `conn` after an error reply: sending side first, then its unread
/// input (bounded) is drained.
fn linger(conn: &mut dyn Conn) {
    conn.finish();
    let deadline = Instant::now() + LINGER;
    let mut chunk = [0u8; 8192];
    let mut seen = 0;
    while seen < LINGER_BYTES {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || conn.timeouts(Some(left), None).is_err() {
            return;
        }
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => seen += n,
        }
    }
}

pub(super) fn serve_conn(conn: &mut dyn Conn, server: &Server) {
    let reply = match read_head(conn, HEAD_DEADLINE) {
        Ok(head) => respond(&head, |format| encode(gather(server), format)),
        Err(Some(r)) => r,
        Err(None) => return,
    };
    let _ = conn.timeouts(None, Some(WRITE_TIMEOUT));
    if send(conn, &reply).is_ok() && reply.status != 200 {
        linger(conn);
    }
}

/// Reads a request head (up to its blank line). `Err(None)`: the client
/// went away; `Err(Some(reply))`: it gets that reply instead.
fn read_head(conn: &mut dyn Conn, limit: Duration) -> Result<Vec<u8>, Option<Reply>> {
    let deadline = Instant::now() + limit;
    let mut head = Vec::new();
    let mut chunk = [0u8; 2048];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Some(Reply::error(
                408,
                "Request Timeout",
                "request head not received in time\n",
            )));
        }
        if conn.timeouts(Some(left), None).is_err() {
            return Err(None);
        }
        let n = match conn.read(&mut chunk) {
            Ok(0) => return Err(None),
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(_) => return Err(None),
        };
        // Only the new bytes (and three before them) can complete the head.
        let from = head.len().saturating_sub(3);
        head.extend_from_slice(&chunk[..n]);
        if let Some(end) = head_end(&head[from..]) {
            head.truncate(from + end);
            return Ok(head);
        }
        if head.len() > MAX_HEAD {
            return Err(Some(Reply::error(
                431,
                "Request Header Fields Too Large",
                "request head longer than 8192 bytes\n",
            )));
        }
    }
}

/// The length of the head in `b` up to its blank line, if it has one.
fn head_end(b: &[u8]) -> Option<usize> {
    let crlf = b.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = b.windows(2).position(|w| w == b"\n\n");
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// An HTTP reply.
#[derive(Debug, PartialEq)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Its reason phrase.
    pub reason: &'static str,
    /// Content-Type.
    pub content_type: &'static str,
    /// Extra header lines (`Name: value`).
    pub headers: Vec<String>,
    /// The body.
    pub body: String,
    /// Send the headers only (HEAD).
    pub head_only: bool,
}

impl Reply {
    pub(super) fn error(status: u16, reason: &'static str, body: &str) -> Reply {
        Reply {
            status,
            reason,
            content_type: "text/plain; charset=utf-8",
            headers: Vec::new(),
            body: body.to_string(),
            head_only: false,
        }
    }
}

/// The reply to the request head `head` (without its blank line);
/// `metrics` renders the exposition in a format.
pub fn respond(head: &[u8], metrics: impl FnOnce(Format) -> String) -> Reply {
    let bad = |why: &str| Reply::error(400, "Bad Request", &format!("{why}\n"));
    let Ok(text) = std::str::from_utf8(head) else {
        return bad("request head is not UTF-8");
    };
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let line = lines.next().unwrap_or("");
    let parts: Vec<&str> = line.split(' ').collect();
    let [method, target, version] = parts[..] else {
        return bad("malformed request line");
    };
    if !matches!(version, "HTTP/1.0" | "HTTP/1.1") {
        return bad("only HTTP/1.0 and HTTP/1.1 are served");
    }
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return bad("malformed method");
    }
    let mut accept = String::new();
    for h in lines {
        let Some((name, value)) = h.split_once(':') else {
            return bad("malformed header line");
        };
        if name.is_empty() || name.contains(|c: char| c.is_ascii_whitespace() || c.is_control()) {
            return bad("malformed header name");
        }
        if name.eq_ignore_ascii_case("accept") {
            accept.push_str(value);
            accept.push(',');
        }
    }
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    if path != "/metrics" {
        return Reply::error(404, "Not Found", "not found; the metrics are at /metrics\n");
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => {
            let mut r = Reply::error(405, "Method Not Allowed", "only GET and HEAD\n");
            r.headers.push("Allow: GET, HEAD".into());
            return r;
        }
    };
    let format = if accept.contains("application/openmetrics-text") {
        Format::OpenMetrics
    } else {
        Format::Prometheus
    };
    Reply {
        status: 200,
        reason: "OK",
        content_type: format.content_type(),
        headers: Vec::new(),
        body: metrics(format),
        head_only,
    }
}

pub(super) fn send(conn: &mut dyn Conn, r: &Reply) -> std::io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        r.status,
        r.reason,
        r.content_type,
        r.body.len()
    );
    for h in &r.headers {
        out.push_str(h);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    if !r.head_only {
        out.push_str(&r.body);
    }
    conn.write_all(out.as_bytes())?;
    conn.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(head: &str) -> Reply {
        respond(head.as_bytes(), |f| format!("{f:?}"))
    }

    #[test]
    fn addresses_default_to_loopback() {
        let tcp = |s: &str| match parse(s) {
            Ok(Addr::Tcp(a)) => a,
            other => panic!("{s}: {other:?}"),
        };
        assert_eq!(tcp("9100"), vec!["127.0.0.1:9100".parse().unwrap()]);
        assert_eq!(tcp(":0"), vec!["127.0.0.1:0".parse().unwrap()]);
        assert_eq!(tcp("[::1]:9100"), vec!["[::1]:9100".parse().unwrap()]);
        assert_eq!(tcp("0.0.0.0:9100"), vec!["0.0.0.0:9100".parse().unwrap()]);
        assert!(tcp("localhost:1").iter().all(|a| a.ip().is_loopback()));
        assert_eq!(parse("unix:/run/m.sock").unwrap(), Addr::Unix("/run/m.sock".into()));
        assert_eq!(parse("./m.sock").unwrap(), Addr::Unix("./m.sock".into()));
        for bad in ["", "x", "host:", "host:70000", "::1:9100", "[]:1", "unix:", "[::1:9"] {
            assert!(parse(bad).is_err(), "{bad:?} must be refused");
        }
        assert!(warning(&"127.0.0.1:1".parse().unwrap()).is_none());
        assert!(warning(&"[::1]:1".parse().unwrap()).is_none());
        assert!(warning(&"0.0.0.0:1".parse().unwrap())
            .unwrap()
            .contains("every interface"));
        assert!(warning(&"[::]:1".parse().unwrap()).unwrap().contains("every interface"));
        assert!(warning(&"192.0.2.1:1".parse().unwrap())
            .unwrap()
            .contains("not a loopback"));
    }

    #[test]
    fn a_scrape_gets_the_format_it_asks_for() {
        let r = reply(
            "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
        );
        assert_eq!((r.status, r.body.as_str(), r.head_only), (200, "OpenMetrics", false));
        assert!(r.content_type.starts_with("application/openmetrics-text"));
        let r = reply("GET /metrics?x=1 HTTP/1.0\nUser-Agent: curl");
        assert_eq!((r.status, r.body.as_str()), (200, "Prometheus"));
        assert!(r.content_type.starts_with("text/plain; version=0.0.4"));
        let r = reply("HEAD /metrics HTTP/1.1");
        assert_eq!((r.status, r.head_only), (200, true));
    }

    #[test]
    fn anything_else_is_refused_by_status() {
        let status = |h: &[u8]| respond(h, |_| unreachable!("no exposition for a refused request")).status;
        assert_eq!(status(b"GET / HTTP/1.1"), 404);
        assert_eq!(status(b"GET /metricsx HTTP/1.1"), 404);
        assert_eq!(status(b"POST /metrics HTTP/1.1"), 405);
        assert_eq!(status(b"GET /metrics"), 400);
        assert_eq!(status(b"GET /metrics HTTP/2.0"), 400);
        assert_eq!(status(b"GET  /metrics HTTP/1.1"), 400);
        assert_eq!(status(b"get /metrics HTTP/1.1"), 400);
        assert_eq!(status(b"\xff\xfe"), 400);
        assert_eq!(status(b""), 400);
        assert_eq!(status(b"GET /metrics HTTP/1.1\r\nno colon here"), 400);
        assert_eq!(status(b"GET /metrics HTTP/1.1\r\nBad Name: x"), 400);
        let r = reply("DELETE /metrics HTTP/1.1");
        assert_eq!(r.headers, vec!["Allow: GET, HEAD".to_string()]);
    }

    #[test]
    fn the_head_ends_at_its_blank_line() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nbody"), Some(14));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\n"), Some(14));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n"), None);
    }
}
