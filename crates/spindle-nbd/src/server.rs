//! The server: a listening socket, an accept loop and a fixed set of I/O
//! threads, each running one [`spindle_io::Runtime`] with every
//! connection it was given as tasks (no thread per connection, none per
//! request).
//!
//! The calling thread accepts (readiness on its own runtime) and hands
//! each connection to the next I/O thread, round robin. It also decides
//! when the server ends: on [`StopHandle::stop`] (a signal), or, unless
//! persistent, when the last client left. Then every connection's socket
//! is shut for reading, each finishes the requests it has, and the
//! threads end.

use crate::connection;
use crate::error::{NbdError, Result};
use crate::export::Catalog;
use futures::channel::mpsc::{unbounded, UnboundedReceiver, UnboundedSender};
use futures::StreamExt;
use spindle_io::net::{Listener, Socket};
use spindle_io::{Runtime, RuntimeConfig, ThreadTimes};
use std::cell::RefCell;
use std::os::fd::OwnedFd;
use std::rc::{Rc, Weak};
use std::sync::Arc;

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// I/O threads (at least one).
    pub threads: usize,
    /// Each thread's runtime.
    pub runtime: RuntimeConfig,
    /// Most clients at once (`-e/--shared`); `None`: no limit. Further
    /// clients wait in the listen backlog until one leaves.
    pub max_clients: Option<usize>,
    /// Keep serving after the last client left (`-t/--persistent`).
    pub persistent: bool,
    /// TLS credentials: with them, every client must start TLS first.
    pub tls: Option<crate::tls::TlsConfig>,
    /// A client that has not finished its handshake within this time is
    /// disconnected (qemu-nbd's `--handshake-limit`).
    pub handshake_limit: std::time::Duration,
    /// How long an I/O thread polls for its clients' next requests and
    /// its completions before it sleeps ([`Runtime::set_poll_window`]).
    pub poll: std::time::Duration,
}

/// The default poll window (as `spindle serve --poll-us`).
pub const POLL: std::time::Duration = std::time::Duration::from_micros(64);

/// The default handshake limit (qemu-nbd's: 10 s).
pub const HANDSHAKE_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

enum Event {
    Stop,
    Ended,
}

enum ToThread {
    Conn(OwnedFd),
    Shutdown,
}

/// Ends a running server from another thread (a signal handler's thread).
#[derive(Clone)]
pub struct StopHandle(UnboundedSender<Event>);

impl StopHandle {
    /// Asks the server to stop: it stops accepting, lets every client's
    /// requests in flight finish, disconnects them and returns.
    pub fn stop(&self) {
        let _ = self.0.unbounded_send(Event::Stop);
    }
}

/// A server over one listening socket.
pub struct Server {
    listener: OwnedFd,
    exports: Arc<Catalog>,
    cfg: ServerConfig,
    /// Where each I/O thread's time goes.
    times: Vec<Arc<ThreadTimes>>,
    tx: UnboundedSender<Event>,
    rx: UnboundedReceiver<Event>,
}

impl Server {
    /// A server for the exports of `exports` (which may change while it
    /// runs) on a bound, listening socket.
    pub fn new(listener: OwnedFd, exports: Arc<Catalog>, cfg: ServerConfig) -> Server {
        let (tx, rx) = unbounded();
        let threads = cfg.threads.clamp(1, spindle_export::device::LANES);
        Server {
            listener,
            exports,
            times: (0..threads).map(|_| Arc::default()).collect(),
            cfg,
            tx,
            rx,
        }
    }

    /// Where each I/O thread spends its time (busy, idle, polling), by
    /// thread (the statistics lane of its requests).
    pub fn thread_times(&self) -> Vec<Arc<ThreadTimes>> {
        self.times.clone()
    }

    /// A handle that stops [`Server::run`].
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.tx.clone())
    }

    /// Serves until stopped (or, unless persistent, until the last client
    /// left). Blocks the calling thread, which accepts.
    pub fn run(self) -> Result<()> {
        let Server {
            listener,
            exports,
            cfg,
            times,
            tx,
            mut rx,
        } = self;
        let mut threads = Vec::new();
        let mut senders = Vec::new();
        for (i, times) in times.into_iter().enumerate() {
            let (ttx, trx) = unbounded::<ToThread>();
            let setup = connection::Setup {
                catalog: exports.clone(),
                tls: cfg.tls.clone(),
                lane: i,
                handshake_limit: cfg.handshake_limit,
            };
            let (ended, rcfg, poll) = (tx.clone(), cfg.runtime, cfg.poll);
            let t = std::thread::Builder::new()
                .name(format!("spindle-nbd-{i}"))
                .spawn(move || io_thread((rcfg, times), poll, trx, setup, ended))
                .map_err(|e| NbdError::Setup(format!("cannot start an I/O thread: {e}")))?;
            threads.push(t);
            senders.push(ttx);
        }
        let rt = Runtime::new(cfg.runtime).map_err(|e| NbdError::Setup(e.to_string()))?;
        let r = rt.block_on(async {
            let l = Listener::new(listener)?;
            let (mut active, mut next) = (0usize, 0usize);
            loop {
                let full = cfg.max_clients.is_some_and(|m| active >= m);
                let ev = if full {
                    rx.next().await
                } else {
                    let accept = std::pin::pin!(l.accept());
                    match futures::future::select(accept, rx.next()).await {
                        futures::future::Either::Left((fd, _)) => {
                            let fd = match fd {
                                Ok(fd) => fd,
                                Err(e) => {
                                    // Out of descriptors or memory, a
                                    // connection reset before accept: the
                                    // listener stays; try again shortly.
                                    spindle_export::limited!(warn, "NBD accept failed: {e}; retrying");
                                    let _ = spindle_io::time::sleep(ACCEPT_RETRY).await;
                                    continue;
                                }
                            };
                            active += 1;
                            let _ = senders[next % senders.len()].unbounded_send(ToThread::Conn(fd));
                            next += 1;
                            continue;
                        }
                        futures::future::Either::Right((ev, _)) => ev,
                    }
                };
                match ev {
                    Some(Event::Ended) => {
                        active -= 1;
                        if active == 0 && !cfg.persistent {
                            return Ok(());
                        }
                    }
                    Some(Event::Stop) | None => return Ok(()),
                }
            }
        });
        for s in &senders {
            let _ = s.unbounded_send(ToThread::Shutdown);
        }
        drop(senders);
        for t in threads {
            let _ = t.join();
        }
        r
    }
}

/// One I/O thread: takes connections and serves each as a task.
fn io_thread(
    (cfg, times): (RuntimeConfig, Arc<ThreadTimes>),
    poll: std::time::Duration,
    mut rx: UnboundedReceiver<ToThread>,
    setup: connection::Setup,
    ended: UnboundedSender<Event>,
) {
    let rt = match Runtime::with_times(cfg, times) {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("NBD I/O thread: {e}");
            return;
        }
    };
    rt.set_poll_window(poll);
    let live: Rc<RefCell<Vec<Weak<Socket>>>> = Rc::default();
    rt.block_on(async {
        let mut tasks = Vec::new();
        while let Some(msg) = rx.next().await {
            match msg {
                ToThread::Conn(fd) => {
                    let (setup, ended, mine) = (setup.clone(), ended.clone(), live.clone());
                    tasks.push(spindle_io::spawn(async move {
                        nodelay(&fd);
                        match Socket::new(fd) {
                            Ok(sock) => {
                                let sock = Rc::new(sock);
                                mine.borrow_mut().push(Rc::downgrade(&sock));
                                if let Err(e) = connection::serve(sock, setup).await {
                                    spindle_export::limited!(warn, "NBD connection ended: {e}");
                                }
                            }
                            Err(e) => spindle_export::limited!(warn, "NBD connection refused: {e}"),
                        }
                        let _ = ended.unbounded_send(Event::Ended);
                    }));
                    live.borrow_mut().retain(|w| w.strong_count() > 0);
                    tasks.retain(|t| !t.is_finished());
                }
                ToThread::Shutdown => {
                    for s in live.borrow().iter().filter_map(Weak::upgrade) {
                        s.shutdown(std::net::Shutdown::Read);
                    }
                    // A client that does not read its replies would keep
                    // its connection (and this thread) forever: after a
                    // grace period its socket is shut both ways.
                    let mine = live.clone();
                    spindle_io::spawn(async move {
                        let _ = spindle_io::time::sleep(SHUTDOWN_GRACE).await;
                        for s in mine.borrow().iter().filter_map(Weak::upgrade) {
                            s.shutdown(std::net::Shutdown::Both);
                        }
                    })
                    .detach();
                    break;
                }
            }
        }
        for t in tasks {
            t.await;
        }
        // An image only this thread may use (an NBD upstream without
        // multi-conn) is flushed here, where its connection is.
        for e in setup.catalog.list() {
            if let Some(n) = e.dev.node().filter(|n| n.is_single_threaded()) {
                if let Err(err) = n.flush().await {
                    tracing::warn!("NBD export '{}': flush at exit failed: {err}", e.settings.name);
                }
            }
        }
    });
}

/// How long a failed accept waits before the next.
const ACCEPT_RETRY: std::time::Duration = std::time::Duration::from_millis(100);
/// How long stopping waits for clients to take their last replies.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// `TCP_NODELAY` on a TCP connection (replies are whole messages already;
/// Nagle would only delay them). Unix sockets refuse it, harmlessly.
fn nodelay(fd: &OwnedFd) {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a valid int option value on our own socket.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}
