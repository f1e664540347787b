//! The vhost-user-blk backend: rust-vmm's `VhostUserBackend`, implemented
//! on `&self` so the worker threads never share a lock.
//!
//! vhost-user-backend owns one epoll thread per entry of
//! [`queues_per_thread`](VhostUserBackend::queues_per_thread); each one is
//! an I/O thread here. On its first event the thread creates its own
//! [`spindle_io::Runtime`] and registers the runtime's eventfds with its
//! epoll loop, so kicks and I/O completions wake the same thread. See
//! `worker.rs` for what happens on each event.

use crate::blk::config::{parse_write, ConfigWrite};
use crate::dirty::{DirtyLog, LogMap, VHOST_F_LOG_ALL};
use crate::disk::VirtioDisk;
use crate::drain::InFlight;
use crate::inflight::track::Tracking;
use crate::inflight::{self, Caps, Region};
use crate::queues::QueueMap;
use crate::ring::{Broken, Setup};
use crate::run::{Run, Stopped};
use crate::worker;
use spindle_export::device::Device;
use spindle_export::ratelimit::limited;
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;
use vhost::vhost_user::message::{VhostUserInflight, VhostUserLog, VhostUserProtocolFeatures};
use vhost::vhost_user::Backend;
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

/// Guest memory as vhost-user maps it.
pub type Memory = GuestMemoryMmap<()>;
/// The epoll handler of one I/O thread.
pub type Handler = VringEpollHandler<Arc<BlkBackend>>;

/// How long `GET_VRING_BASE` and a disconnect wait for accepted requests.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// A broken ring that stopped the device (virtio's DEVICE_NEEDS_RESET,
/// which vhost-user gives a backend no way to tell the driver).
#[derive(Debug)]
struct Failure {
    queue: usize,
    /// The broken ring's setup and next index when it failed: a frontend
    /// that sets the ring up anew (size, addresses, memory, base) ends the
    /// failure.
    setup: Setup,
    next_avail: u16,
    reason: String,
}

/// The backend of one frontend connection to one device.
pub struct BlkBackend {
    pub(crate) dev: Arc<Device>,
    pub(crate) mem: GuestMemoryAtomic<Memory>,
    /// Requests accepted and not yet completed, and whether new ones are
    /// accepted (no longer once the frontend is gone).
    pub(crate) requests: InFlight,
    /// The inflight buffer the frontend gave (`SET_INFLIGHT_FD`), and the
    /// rings that must start against it.
    pub(crate) tracking: Tracking,
    /// Changes of the guest memory map so far (`ring::Setup` counts on it).
    mem_map: AtomicU64,
    /// Set while `failure` holds a broken ring: no queue is popped.
    failed: AtomicBool,
    failure: Mutex<Option<Failure>>,
    handlers: OnceLock<Vec<Weak<Handler>>>,
    /// The backend request channel (control plane only).
    backend_req: Mutex<Option<Backend>>,
    /// Features the frontend acked (`SET_FEATURES`).
    acked: AtomicU64,
    /// Whether `SET_FEATURES` came on this connection (see
    /// `protocol_features`).
    features_set: AtomicBool,
    /// Which rings run; the device's start and stop (`run.rs`).
    run: Run,
    /// The dirty log while the frontend migrates (`dirty.rs`).
    pub(crate) dirty: Arc<DirtyLog>,
}

impl BlkBackend {
    /// A backend for `dev` whose guest memory is `mem` (the same atomic
    /// the daemon updates on SET_MEM_TABLE). Fails when its waker (an
    /// eventfd) cannot be created.
    pub fn new(dev: Arc<Device>, mem: GuestMemoryAtomic<Memory>) -> io::Result<BlkBackend> {
        let queues = dev.cfg.num_queues as usize;
        Ok(BlkBackend {
            dev,
            mem,
            requests: InFlight::new(queues),
            tracking: Tracking::new(queues),
            mem_map: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            handlers: OnceLock::new(),
            backend_req: Mutex::new(None),
            acked: AtomicU64::new(0),
            features_set: AtomicBool::new(false),
            run: Run::new(queues)?,
            dirty: Arc::new(DirtyLog::for_connection()),
        })
    }

    /// The image for a round of requests popped from ring `queue`. The
    /// first round since the frontend started the ring asks whether the
    /// device may start (`Run::start`): not while another export of the
    /// image runs, nor before its image is open again after a migration
    /// (it is opened in the background). Call holding the queue's
    /// admission, so a stop of the ring waits for this round. `None`: the
    /// ring stopped meanwhile, or the device may not start yet (the
    /// requests stay on the ring; the connection's waker brings this
    /// thread back). Never blocks.
    pub(crate) fn round_node(&self, queue: usize, vring: &VringRwLock) -> Option<Arc<spindle_block::Node>> {
        if self.run.is_running(queue) {
            let node = self.dev.node();
            if node.is_none() {
                limited!(error, device = %self.dev.cfg.name, queue, "a running ring has no open image; its requests wait on the ring");
            }
            return node;
        }
        // Only for a ring the frontend has started, checked under the
        // vring's lock, which a stop of the ring takes before it waits for
        // this admission.
        if !worker::live(vring) {
            return None;
        }
        self.run.start(queue, &self.dev)
    }

    /// Ring `queue` was stopped: flush (what the frontend counts as done
    /// must be on the image), and when every ring is stopped while dirty
    /// logging is on (the frontend stops the device for a migration), the
    /// export hands its image over (`Device::inactivate`). Whether the
    /// device stops is decided once, under the run state's lock.
    fn ring_stopped(&self, queue: usize) -> io::Result<()> {
        let migrating = self.acked.load(Ordering::Acquire) & VHOST_F_LOG_ALL != 0;
        let res = match self.run.stop(queue, &self.dev, migrating) {
            Stopped::Idle => Ok(()),
            Stopped::Ring => self.dev.slot.flush(),
            Stopped::Device { hand_over } => {
                let res = if hand_over {
                    self.dev.inactivate()
                } else {
                    self.dev.slot.flush()
                };
                self.run.handed_over(&self.dev);
                res
            }
        };
        res.map_err(|e| {
            limited!(error, device = %self.dev.cfg.name, queue, "cannot flush the image when the ring stopped: {e}");
            io::Error::other(format!("queue {queue}: cannot flush the image: {e}"))
        })
    }

    /// Makes every I/O thread of this connection look at all its rings
    /// once (the end of a pause: requests held back at admission wait on
    /// the rings with no kick to come).
    pub(crate) fn wake(&self) {
        self.run.waker().wake();
    }

    /// The frontend started the device on this connection and then
    /// stopped every ring: a frontend that goes away after that hands the
    /// image over (`Export`, at disconnect).
    pub(crate) fn device_stopped(&self) -> bool {
        self.run.device_stopped()
    }

    /// The frontend has not started the device on this connection (a QEMU
    /// that waits for an incoming migration).
    pub(crate) fn never_started(&self) -> bool {
        self.run.never_started()
    }

    /// The frontend went away (`drained`: nothing it sent is still in
    /// flight): the device no longer runs, and waits for nothing.
    pub(crate) fn disconnected(&self, drained: bool) {
        self.run.disconnected(&self.dev, drained);
    }

    /// Hands over the daemon's epoll handlers (one per I/O thread), so a
    /// thread can register its runtime's eventfds on its first event.
    pub fn set_handlers(&self, handlers: &[Arc<Handler>]) {
        let _ = self.handlers.set(handlers.iter().map(Arc::downgrade).collect());
    }

    /// Registers in I/O thread `thread`'s epoll loop its runtime's
    /// eventfds `fds` and the connection's waker, edge-triggered.
    pub(crate) fn register_thread(&self, thread: usize, fds: &[i32]) -> io::Result<()> {
        let handler = self
            .handlers
            .get()
            .and_then(|h| h.get(thread))
            .and_then(Weak::upgrade)
            .ok_or_else(|| io::Error::other(format!("I/O thread {thread} has no epoll handler")))?;
        let queues = self.dev.cfg.num_queues;
        let waker = (self.run.waker().fd(), worker::wake_event(queues));
        for (fd, id) in fds.iter().map(|&fd| (fd, worker::runtime_event(queues))).chain([waker]) {
            handler.register_listener(fd, EventSet::IN | EventSet::EDGE_TRIGGERED, id)?;
        }
        Ok(())
    }

    /// Stops accepting requests (the frontend is gone); those already
    /// accepted still complete. Follow with [`BlkBackend::drain`].
    pub fn stop_accepting(&self) {
        self.requests.stop_accepting();
    }

    /// Tells the frontend the configuration space changed (a resize), so it
    /// re-reads it and interrupts the driver. Returns false when the
    /// frontend set up no backend request channel.
    pub fn notify_config_change(&self) -> io::Result<bool> {
        let guard = self
            .backend_req
            .lock()
            .map_err(|_| io::Error::other("backend channel lock poisoned"))?;
        match guard.as_ref() {
            Some(b) => b.send_config_change().map(|_| true).map_err(io::Error::other),
            None => Ok(false),
        }
    }

    /// Stops the device: ring `queue`, set up as `setup` and at
    /// `next_avail`, is broken. Requests in flight still complete; no
    /// queue is popped until the frontend resets the device
    /// (RESET_DEVICE), stops the ring (GET_VRING_BASE), sets it up anew,
    /// or reconnects. Logged once per failure (and rate-limited). Returns
    /// whether this call stopped it (false: it was already stopped).
    pub(crate) fn fail(&self, queue: usize, setup: Setup, next_avail: u16, why: &Broken) -> bool {
        let Ok(mut f) = self.failure.lock() else { return false };
        if f.is_some() {
            return false;
        }
        limited!(error, device = %self.dev.cfg.name, queue, "broken ring: {why}; the device stops serving until the frontend resets it or sets the ring up again");
        *f = Some(Failure {
            queue,
            setup,
            next_avail,
            reason: format!("queue {queue}: {why}"),
        });
        self.failed.store(true, Ordering::Release);
        true
    }

    /// Which guest memory map is current (a count of its changes).
    pub(crate) fn mem_map(&self) -> u64 {
        self.mem_map.load(Ordering::Acquire)
    }

    /// Whether a broken ring stopped the device (one atomic load).
    pub(crate) fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Whether queue `queue`, now set up as `setup` at `next_avail`, may be
    /// popped: yes unless the device is failed; a failed device recovers
    /// when this is its broken ring and the frontend set it up anew.
    pub(crate) fn may_serve(&self, queue: usize, setup: Setup, next_avail: u16) -> bool {
        if !self.is_failed() {
            return true;
        }
        let anew = self.failure.lock().is_ok_and(|f| {
            f.as_ref()
                .is_some_and(|f| f.queue == queue && (f.setup, f.next_avail) != (setup, next_avail))
        });
        if anew {
            self.recover(Some(queue), "the frontend set the broken ring up again");
        }
        anew
    }

    /// Ends a failure of ring `queue` (`None`: of any ring).
    fn recover(&self, queue: Option<usize>, how: &str) {
        let Ok(mut f) = self.failure.lock() else { return };
        if f.as_ref().is_some_and(|f| queue.is_none_or(|q| q == f.queue)) {
            *f = None;
            self.failed.store(false, Ordering::Release);
            limited!(info, device = %self.dev.cfg.name, "the device serves again: {how}");
        }
    }

    /// Why the device stopped serving, while it is stopped: the broken ring
    /// and what is wrong with it.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().ok()?.as_ref().map(|f| f.reason.clone())
    }

    /// What an inflight buffer may describe: this device's queues.
    fn caps(&self) -> Caps {
        Caps {
            queues: self.dev.cfg.num_queues,
            queue_size: self.dev.cfg.queue_size,
        }
    }

    /// Logs why the frontend's inflight buffer (or its request for one) is
    /// refused, and makes the error that ends the connection.
    fn refuse_inflight(&self, msg: &str, why: &inflight::Refused) -> io::Error {
        limited!(error, device = %self.dev.cfg.name, "{msg} refused, closing the connection: the inflight buffer: {why}");
        io::Error::new(io::ErrorKind::InvalidInput, format!("inflight buffer refused: {why}"))
    }

    /// Requests accepted on all queues and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.requests.count(None)
    }

    /// Waits until no request is in flight (on `queue`, or on all queues),
    /// at most `timeout`. The I/O threads keep completing requests
    /// meanwhile. Returns whether everything finished.
    pub fn drain(&self, queue: Option<usize>, timeout: Duration) -> bool {
        match self.requests.wait(queue, timeout) {
            Ok(()) => true,
            Err(n) => {
                limited!(error, device = %self.dev.cfg.name, in_flight = n, "requests still in flight after {timeout:?}");
                false
            }
        }
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.dev.cfg.num_queues as usize
    }

    fn max_queue_size(&self) -> usize {
        self.dev.cfg.queue_size as usize
    }

    fn features(&self) -> u64 {
        self.dev.geometry().features() | VHOST_F_LOG_ALL
    }

    fn acked_features(&self, features: u64) {
        self.acked.store(features, Ordering::Release);
        self.features_set.store(true, Ordering::Release);
        self.dirty.set_features(features);
    }

    /// CONFIGURE_MEM_SLOTS only to a frontend that acked its virtio
    /// features before it asks for the protocol features (libblkio, which
    /// requires it, and Cloud Hypervisor do). QEMU asks first and sets the
    /// features only when it starts the device; it is not offered it:
    /// with it QEMU sends only the memory regions it believes the backend
    /// has not got, and after a restart of Spindle while the VM is paused
    /// QEMU 7.2 goes on with its old session on the new connection (see
    /// PATCHES.md) and would send none. Without it every device start
    /// carries the whole table (SET_MEM_TABLE, up to 8 regions).
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        let base = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::RESET_DEVICE
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::LOG_SHMFD;
        if self.features_set.load(Ordering::Acquire) {
            base | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        } else {
            base
        }
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        if let Ok(mut b) = self.backend_req.lock() {
            *b = Some(backend);
        }
    }

    fn reset_device(&self) {
        self.drain(None, DRAIN_TIMEOUT);
        // The frontend acks its features anew after a reset: a stop until
        // then is no migration's.
        self.acked.fetch_and(!VHOST_F_LOG_ALL, Ordering::AcqRel);
        let ran = self.run.reset(&self.dev);
        if let Err(e) = self.dev.slot.flush() {
            limited!(error, device = %self.dev.cfg.name, "cannot flush the image on a device reset: {e}");
        }
        if ran {
            self.run.handed_over(&self.dev);
        }
        // A reset device starts afresh: the frontend allocates a new
        // inflight buffer (QEMU frees its own on reset).
        self.tracking.set(None);
        self.dirty.reset();
        self.recover(None, "the frontend reset it");
    }

    fn get_inflight_fd(&self, msg: &VhostUserInflight) -> io::Result<(VhostUserInflight, File)> {
        inflight::create(msg, self.caps())
            .map(|(file, desc)| (desc, file))
            .map_err(|why| self.refuse_inflight("GET_INFLIGHT_FD", &why))
    }

    fn set_inflight_fd(&self, msg: &VhostUserInflight, file: File) -> io::Result<()> {
        let region =
            Region::adopt(file, msg, self.caps()).map_err(|why| self.refuse_inflight("SET_INFLIGHT_FD", &why))?;
        limited!(info, device = %self.dev.cfg.name, "inflight buffer set: {} queues of {} entries", region.queues(), msg.queue_size);
        self.tracking.set(Some(region));
        Ok(())
    }

    fn set_log_base(&self, log: &VhostUserLog, file: &File) -> io::Result<bool> {
        let map = LogMap::adopt(file, log).inspect_err(|e| {
            limited!(error, device = %self.dev.cfg.name, "SET_LOG_BASE refused, closing the connection: {e}");
        })?;
        limited!(info, device = %self.dev.cfg.name, "dirty log set: {} bytes (guest memory up to {} MiB)", map.len(), (map.len() as u64 * 8 * 4096) >> 20);
        self.dirty.set_base(map);
        Ok(true)
    }

    fn set_log_fd(&self, file: File) -> io::Result<()> {
        limited!(info, device = %self.dev.cfg.name, "dirty log eventfd set (kept, never signalled: the log is written as pages are)");
        self.dirty.set_log_fd(file.into());
        Ok(())
    }

    /// The vrings track EVENT_IDX themselves (`needs_notification`).
    fn set_event_idx(&self, _enabled: bool) {}

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.dev.geometry().read(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        match parse_write(offset, buf) {
            Ok(ConfigWrite::Writeback(on)) => {
                limited!(info, device = %self.dev.cfg.name, "guest turned its write cache {}", if on { "on" } else { "off" });
                self.dev.set_writeback(on);
                Ok(())
            }
            // Read-only fields ignore writes (virtio 1.2, 2.5): an error
            // here would make the vhost-user handler drop the connection.
            Err(msg) => {
                limited!(warn, device = %self.dev.cfg.name, "ignored {msg}");
                Ok(())
            }
        }
    }

    fn update_memory(&self, _mem: GuestMemoryAtomic<Memory>) -> io::Result<()> {
        // `self.mem` is the same atomic the daemon just updated; every ring
        // is checked again against the new map before its next pop.
        self.mem_map.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        QueueMap::of(&self.dev.cfg).masks()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        self.recover(Some(queue_index as usize), "the frontend stopped the broken ring");
        // The ring starts against the inflight buffer again when it is
        // set up anew.
        self.tracking.stopped(queue_index as usize);
        if self.drain(Some(queue_index as usize), DRAIN_TIMEOUT) {
            self.ring_stopped(queue_index as usize)
        } else {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("queue {queue_index}: requests still in flight"),
            ))
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        worker::handle_event(self, device_event, vrings, thread_id)
    }
}
