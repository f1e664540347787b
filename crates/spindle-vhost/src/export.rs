//! Serving one device on one vhost-user socket, connection after
//! connection.
//!
//! The socket is bound once. Each frontend connection gets a fresh
//! `VhostUserDaemon` (and so fresh I/O threads and runtimes) over the same
//! device; when the frontend goes away, for instance because QEMU
//! restarted, the loop drains the requests it had accepted and waits for
//! the next connection on the same socket.
//!
//! The serving thread waits for a connection in poll(2) on the listening
//! socket and an eventfd of its own, which [`Export::stop`] signals. It
//! never wakes itself with a connection of its own: a socket handed to
//! another process (a planned handover) would keep that connection in its
//! backlog for the other process to accept.

use crate::backend::{BlkBackend, Memory, DRAIN_TIMEOUT};
use crate::Error;
use spindle_export::device::{Device, Migration};
use spindle_export::quiesce::Hold;
use spindle_export::ratelimit::limited;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// A device served on a socket.
pub struct Export {
    /// The device.
    pub dev: Arc<Device>,
    /// The vhost-user socket path.
    pub socket: PathBuf,
    stop: AtomicBool,
    connections: AtomicU64,
    listener: Mutex<Option<Listener>>,
    /// A second descriptor of the listening socket while [`Export::run`]
    /// serves it, for handing the socket to another process.
    shared: Mutex<Option<OwnedFd>>,
    /// Whether the socket file is this export's to remove when it stops
    /// (not when the service manager passed the socket in, nor once the
    /// socket was handed to another process).
    owns_path: AtomicBool,
    /// The connected frontend, if any (control plane only).
    current: Mutex<Option<Connection>>,
    /// Signalled by [`Export::stop`] to wake the thread waiting for a
    /// connection.
    wake: EventFd,
}

/// A running export held still ([`Export::pause`]): no request is in
/// flight and none is admitted until it is dropped; then the I/O threads
/// look at their rings, so what the guest queued meanwhile is served.
pub struct Pause {
    hold: Option<Hold>,
    backend: Option<Arc<BlkBackend>>,
}

impl Drop for Pause {
    fn drop(&mut self) {
        drop(self.hold.take());
        if let Some(b) = &self.backend {
            b.wake();
        }
    }
}

/// What the control plane needs of a live connection.
struct Connection {
    shutdown: Option<ShutdownHandle>,
    backend: Arc<BlkBackend>,
    /// The frontend's process (`SO_PEERCRED` at connect time).
    pid: Option<u32>,
}

/// The process at the other end of a unix socket (`SO_PEERCRED`: the
/// peer when it connected, or when it listened for a connected client).
pub fn peer_pid(sock: BorrowedFd<'_>) -> Option<u32> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, which is
    // a ucred of that size; the descriptor is borrowed for the call.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (r == 0 && cred.pid > 0).then_some(cred.pid as u32)
}

/// Makes `path` free for a new listening socket: a stale socket file is
/// removed; anything else there is an error, never deleted.
pub fn claim_socket_path(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "exists and is not a socket",
        )),
        Err(_) => Ok(()),
    }
}

impl Export {
    /// Binds `socket` (replacing a stale socket file) for `dev`.
    pub fn bind(dev: Arc<Device>, socket: &Path) -> Result<Arc<Export>, Error> {
        let bind_err = |source| Error::Bind {
            path: socket.to_owned(),
            source,
        };
        claim_socket_path(socket).map_err(bind_err)?;
        // Bound here rather than by `Listener::new`, whose drop removes the
        // file: whether it goes is `owns_path`'s (a handover leaves it).
        let listener = spindle_io::listen_unix(socket).map_err(bind_err)?;
        let listener = Listener::from(listener);
        Export::with(dev, socket, listener, true).map_err(bind_err)
    }

    /// Serves `dev` on `listener`, a socket bound at `socket` by someone
    /// else (systemd socket activation): the socket file is left alone.
    pub fn adopt(
        dev: Arc<Device>,
        socket: &Path,
        listener: std::os::unix::net::UnixListener,
    ) -> std::io::Result<Arc<Export>> {
        Export::with(dev, socket, Listener::from(listener), false)
    }

    fn with(dev: Arc<Device>, socket: &Path, listener: Listener, owns_path: bool) -> std::io::Result<Arc<Export>> {
        // SAFETY: the descriptor belongs to `listener`, which is alive for
        // this call; the borrow is only duplicated.
        let shared = unsafe { BorrowedFd::borrow_raw(listener.as_raw_fd()) }
            .try_clone_to_owned()
            .ok();
        let wake = EventFd::new(EFD_NONBLOCK)?;
        Ok(Arc::new(Export {
            dev,
            socket: socket.to_owned(),
            stop: AtomicBool::new(false),
            connections: AtomicU64::new(0),
            listener: Mutex::new(Some(listener)),
            shared: Mutex::new(shared),
            owns_path: AtomicBool::new(owns_path),
            current: Mutex::new(None),
            wake,
        }))
    }

    /// The connected frontend's backend, if a frontend is connected.
    fn backend(&self) -> Option<Arc<BlkBackend>> {
        self.current.lock().ok()?.as_ref().map(|c| c.backend.clone())
    }

    /// Whether a frontend is connected now.
    pub fn is_connected(&self) -> bool {
        self.current.lock().is_ok_and(|c| c.is_some())
    }

    /// The connected frontend's process id, if a frontend is connected.
    pub fn frontend_pid(&self) -> Option<u32> {
        self.current.lock().ok()?.as_ref()?.pid
    }

    /// Quiesces the device for a snapshot: from now on no request is
    /// admitted on any connection until the returned hold is dropped, and
    /// those accepted before have completed when this returns (at most
    /// `timeout`). A connected frontend must have stopped its device
    /// (a paused guest; QEMU stops its vhost-user devices on `stop`): a
    /// running driver's requests would wait on the rings unseen.
    pub fn quiesce(&self, timeout: std::time::Duration) -> Result<Hold, String> {
        let name = &self.dev.cfg.name;
        let hold = self.dev.gate().hold();
        let backend = self.backend();
        if let Some(b) = backend {
            // A device the frontend never started (QEMU started with -S,
            // as libvirt starts guests) has no requests to wait for.
            if !b.device_stopped() && !b.never_started() {
                return Err(format!(
                    "export '{name}': its frontend's device is running; pause the guest first (QMP stop)"
                ));
            }
            if !b.drain(None, timeout) {
                return Err(format!(
                    "export '{name}': {} requests still in flight after {} s",
                    b.in_flight(),
                    timeout.as_secs()
                ));
            }
        }
        self.wait_other_front_ends(timeout)?;
        Ok(hold)
    }

    /// Waits for the requests of the export's other front ends (NBD),
    /// which the held gate admits no more.
    fn wait_other_front_ends(&self, timeout: std::time::Duration) -> Result<(), String> {
        self.dev.wait_stream_requests(timeout)
    }

    /// Holds a running export still for a moment (a live overlay, the
    /// switch at the end of a stream or commit job): from now on no
    /// request is admitted on any connection, and those accepted before
    /// have completed when this returns (at most `timeout`). The guest
    /// keeps running; its new requests wait on the rings until the
    /// returned [`Pause`] is dropped, which wakes the I/O threads to pop
    /// them (no kick may come for them otherwise).
    pub fn pause(&self, timeout: std::time::Duration) -> Result<Pause, String> {
        let hold = self.dev.gate().hold();
        let backend = self.backend();
        let pause = Pause {
            hold: Some(hold),
            backend,
        };
        if let Some(b) = &pause.backend {
            if !b.drain(None, timeout) {
                return Err(format!(
                    "export '{}': {} requests still in flight after {} s",
                    self.dev.cfg.name,
                    b.in_flight(),
                    timeout.as_secs()
                ));
            }
        }
        self.wait_other_front_ends(timeout)?;
        Ok(pause)
    }

    /// Quiesces a device that no guest has used on this connection, to
    /// revert its image (`spindle vm restore`): no frontend, or one that
    /// has not started the device (a QEMU waiting for an incoming
    /// migration, which starts it only once the migration completed).
    /// A device that runs or ran is refused: its guest saw the image.
    pub fn quiesce_unused(&self) -> Result<Hold, String> {
        let name = &self.dev.cfg.name;
        let hold = self.dev.gate().hold();
        let backend = self.backend();
        if let Some(b) = backend {
            if !b.never_started() || b.in_flight() > 0 {
                return Err(format!(
                    "export '{name}': its frontend has started the device; revert only the disks of a QEMU \
                     that waits for an incoming migration (-incoming defer)"
                ));
            }
        }
        self.wait_other_front_ends(DRAIN_TIMEOUT)?;
        Ok(hold)
    }

    /// Why the connected frontend's device stopped serving (a broken
    /// ring), if it did; `None` when it serves or no frontend is connected.
    pub fn failure(&self) -> Option<String> {
        self.current.lock().ok()?.as_ref()?.backend.failure()
    }

    /// A new descriptor of the listening socket, for another process to
    /// serve it (a handover); `None` once the export stopped serving.
    pub fn clone_listener(&self) -> Option<std::io::Result<OwnedFd>> {
        let s = self.shared.lock().ok()?;
        s.as_ref().map(|fd| fd.try_clone())
    }

    /// Leaves the socket file in place when the export stops: another
    /// process serves the socket now.
    pub fn leave_socket_file(&self) {
        self.owns_path.store(false, Ordering::Release);
    }

    /// Whether the socket file goes when the export stops: it bound the
    /// socket itself, and has not handed it over.
    pub fn owns_socket_file(&self) -> bool {
        self.owns_path.load(Ordering::Acquire)
    }

    /// Frontend connections served so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Acquire)
    }

    /// Serves connections until [`Export::stop`]; then flushes the image
    /// and writes back its metadata. Call once, on a thread of its own.
    pub fn run(&self) -> Result<(), Error> {
        let Some(mut listener) = self.listener.lock().ok().and_then(|mut l| l.take()) else {
            return Ok(());
        };
        while self.wait_for_frontend(&listener) {
            if let Err(e) = self.serve_one(&mut listener) {
                if self.stop.load(Ordering::Acquire) {
                    break;
                }
                limited!(warn, device = %self.dev.cfg.name, "connection ended: {e}");
            }
        }
        if let Ok(mut s) = self.shared.lock() {
            *s = None;
        }
        if self.owns_path.load(Ordering::Acquire) {
            let _ = std::fs::remove_file(&self.socket);
        }
        self.close()
    }

    /// Waits until a frontend connects (true) or [`Export::stop`] was
    /// called (false). A blocking poll(2), on the export's own thread
    /// (control plane), never on an I/O thread.
    fn wait_for_frontend(&self, listener: &Listener) -> bool {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            if self.stop.load(Ordering::Acquire) {
                return false;
            }
            // SAFETY: poll(2) on an array of two pollfds that lives for
            // the call; both descriptors stay open meanwhile (owned by
            // `listener` and `self`).
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                // Not expected with two open descriptors; accept(2) then
                // says what is wrong, as before there was a poll.
                limited!(warn, device = %self.dev.cfg.name, "waiting for a frontend: poll: {e}");
                return !self.stop.load(Ordering::Acquire);
            }
            if fds[1].revents != 0 || self.stop.load(Ordering::Acquire) {
                return false;
            }
            if fds[0].revents != 0 {
                return true;
            }
        }
    }

    fn serve_one(&self, listener: &mut Listener) -> Result<(), Error> {
        let mem = GuestMemoryAtomic::new(Memory::new());
        let backend =
            Arc::new(BlkBackend::new(self.dev.clone(), mem.clone()).map_err(|e| Error::Daemon(e.to_string()))?);
        backend.requests.use_gate(self.dev.gate().clone());
        let mut daemon = VhostUserDaemon::new(format!("spindle-{}", self.dev.cfg.name), backend.clone(), mem)
            .map_err(|e| Error::Daemon(e.to_string()))?;
        let handlers = daemon.get_epoll_handlers();
        backend.set_handlers(&handlers);
        daemon.start(listener).map_err(|e| Error::Daemon(e.to_string()))?;
        if let Ok(mut c) = self.current.lock() {
            let shutdown = daemon.shutdown_handle();
            let pid = shutdown.as_ref().and_then(|h| peer_pid(h.socket()));
            *c = Some(Connection {
                shutdown,
                backend: backend.clone(),
                pid,
            });
        }
        if self.stop.load(Ordering::Acquire) {
            daemon.request_shutdown();
        }
        self.connections.fetch_add(1, Ordering::AcqRel);
        limited!(info, device = %self.dev.cfg.name, socket = %self.socket.display(), "frontend connected");
        let result = daemon.wait();
        if let Ok(mut c) = self.current.lock() {
            *c = None;
        }
        // The I/O threads still run: the driver may still be adding
        // requests to the shared rings, so stop taking them, then let the
        // threads finish what they accepted before they are told to exit.
        backend.stop_accepting();
        let drained = backend.drain(None, DRAIN_TIMEOUT);
        // A frontend that stopped its device and then went away hands the
        // image over, as a stop with dirty logging on does: the source of
        // a migration whose guest was paused (QEMU turns logging on only
        // for a running device), or a guest that powered off. The image is
        // opened afresh when a frontend starts the device again.
        // Only with no request left in flight: a late one would write
        // after the image was closed clean.
        if drained && backend.device_stopped() && self.dev.migration() == Migration::Active {
            if let Err(e) = self.dev.inactivate() {
                limited!(error, device = %self.dev.cfg.name, "cannot hand the image over after the frontend left: {e}");
            }
        }
        // Only now may another export of the image start its device.
        backend.disconnected(drained);
        for h in &handlers {
            h.send_exit_event();
        }
        drop(handlers);
        drop(daemon);
        limited!(info, device = %self.dev.cfg.name, "frontend disconnected");
        match result {
            // The frontend went away: the normal end of a connection.
            Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            ))
            | Ok(()) => Ok(()),
            Err(e) => Err(Error::Daemon(e.to_string())),
        }
    }

    /// Tells the connected frontend (if any) that the configuration space
    /// changed. Returns whether a frontend was told.
    pub fn notify_config_change(&self) -> std::io::Result<bool> {
        let backend = self.backend();
        match backend {
            Some(b) => b.notify_config_change(),
            None => Ok(false),
        }
    }

    /// Stops serving: disconnects the frontend (after its accepted requests
    /// complete) and makes [`Export::run`] return.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self
            .current
            .lock()
            .ok()
            .and_then(|c| c.as_ref().and_then(|c| c.shutdown.clone()))
        {
            h.shutdown();
        }
        // Wake the thread waiting for a connection (never by connecting:
        // see the module's documentation). A full counter is awake anyway.
        let _ = self.wake.write(1);
    }

    fn close(&self) -> Result<(), Error> {
        // The last export of the image closes it; others only flush.
        self.dev.close().map_err(|source| Error::Close {
            name: self.dev.cfg.name.clone(),
            source,
        })
    }
}
