//! The metrics endpoint's listening socket and its accept thread, which
//! can be stopped: a handover (SIGUSR2) stops it before the new process
//! binds the same address, and a failed handover listens again.

use super::http::{invalid, parse, send, serve_conn, warning, Addr, Conn, Reply, MAX_CONNECTIONS};
use crate::error::{CliResult, Error};
use crate::serve::server::Server;
use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often the accept thread looks whether it is to stop.
const STOP_POLL: Duration = Duration::from_millis(100);

/// The listening endpoint. Stopping it (or dropping it) closes the
/// socket and removes its unix socket file.
pub struct Listening {
    /// Where it listens, as `--metrics` would spell it (the port bound).
    pub addr: String,
    is_unix: bool,
    unix: Mutex<Option<PathBuf>>,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Listening {
    /// Where to scrape it: `http://127.0.0.1:9100/metrics`, or the unix
    /// socket (`unix:/run/spindle/metrics.sock, GET /metrics`).
    pub fn describe(&self) -> String {
        match self.is_unix {
            true => format!("{}, GET /metrics", self.addr),
            false => format!("http://{}/metrics", self.addr),
        }
    }

    /// Closes the listening socket (once its accept thread has seen the
    /// request, within [`STOP_POLL`]) and removes its file. Connections
    /// being answered finish on their own threads.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = t.join();
        }
        if let Some(p) = self.unix.lock().ok().and_then(|mut p| p.take()) {
            let _ = std::fs::remove_file(p);
        }
    }

    /// Whether [`stop`](Self::stop) ran.
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.stop();
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    fn accept(&self) -> std::io::Result<Box<dyn Conn>> {
        Ok(match self {
            Listener::Tcp(l) => Box::new(l.accept()?.0),
            Listener::Unix(l) => Box::new(l.accept()?.0),
        })
    }

    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Unix(l) => l.as_fd(),
        }
    }

    fn set_nonblocking(&self) -> std::io::Result<()> {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(true),
            Listener::Unix(l) => l.set_nonblocking(true),
        }
    }

    /// Waits up to `limit` for a connection to accept.
    fn readable_within(&self, limit: Duration) -> bool {
        let mut p = libc::pollfd {
            fd: self.fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd on the stack, for a descriptor this listener
        // owns; poll writes only its revents.
        let n = unsafe { libc::poll(&mut p, 1, limit.as_millis() as libc::c_int) };
        n > 0
    }
}

/// Binds `spec` (see [`parse`]) and serves the metrics of `server` until
/// stopped.
pub fn listen(spec: &str, server: Arc<Server>) -> CliResult<Listening> {
    let (listener, addr, unix) = match parse(spec)? {
        Addr::Unix(path) => {
            let path = std::path::absolute(&path).unwrap_or(path);
            if crate::serve::server::socket_in_use(&path) {
                return Err(invalid(format!(
                    "--metrics {}: another process accepts connections there",
                    path.display()
                )));
            }
            spindle_vhost::export::claim_socket_path(&path)
                .map_err(|e| invalid(format!("--metrics {}: {e}", path.display())))?;
            let l = spindle_io::listen_unix(&path)
                .map_err(Error::system(format!("cannot listen on {}", path.display())))?;
            (Listener::Unix(l), format!("unix:{}", path.display()), Some(path))
        }
        Addr::Tcp(addrs) => {
            let l = TcpListener::bind(&addrs[..]).map_err(Error::system(format!("cannot listen on {spec}")))?;
            let bound = l.local_addr().map_err(|e| invalid(format!("{spec}: {e}")))?;
            if let Some(w) = warning(&bound) {
                eprintln!("spindle: warning: {w}");
                tracing::warn!("{w}");
            }
            (Listener::Tcp(l), bound.to_string(), None)
        }
    };
    listener
        .set_nonblocking()
        .map_err(Error::system(format!("metrics endpoint {addr}")))?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || accept_loop(listener, server, &flag))
        .map_err(Error::system("cannot start the metrics thread"))?;
    Ok(Listening {
        addr,
        is_unix: unix.is_some(),
        unix: Mutex::new(unix),
        stop,
        thread: Mutex::new(Some(thread)),
    })
}

fn accept_loop(listener: Listener, server: Arc<Server>, stop: &AtomicBool) {
    let active = Arc::new(AtomicUsize::new(0));
    let mut warned: Option<Instant> = None;
    while !stop.load(Ordering::Acquire) {
        if !listener.readable_within(STOP_POLL) {
            continue;
        }
        let mut conn = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                // Out of descriptors and the like: wait, say so once a minute.
                if warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                    tracing::warn!("metrics endpoint: accept: {e}");
                    warned = Some(Instant::now());
                }
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        // Accepted sockets do not inherit O_NONBLOCK on Linux; the
        // connection's threads read and write with timeouts.
        if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::AcqRel);
            // Answered here, without reading the request: the accept
            // thread never waits on a client.
            let _ = conn.timeouts(None, Some(Duration::from_secs(1)));
            let _ = send(
                &mut *conn,
                &Reply::error(503, "Service Unavailable", "too many metrics connections at once\n"),
            );
            conn.finish();
            continue;
        }
        let (server, slot) = (server.clone(), active.clone());
        let spawned = std::thread::Builder::new().name("metrics-conn".into()).spawn(move || {
            serve_conn(&mut *conn, &server);
            slot.fetch_sub(1, Ordering::AcqRel);
        });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::AcqRel);
        }
    }
}
