//! One exported disk: the block node and what outlives a frontend
//! connection (settings, write-cache state, statistics, migration state).

use crate::quiesce::Gate;
use crate::slot::NodeSlot;
use crate::stats::{latencies, summarize, Latency, OpSummary, QueueSnapshot, QueueStats};
use crate::throttle::{Direction, Group, Limits, Membership};
use crate::written::Written;
use arc_swap::{ArcSwap, ArcSwapOption};
use spindle_block::{BlockError, Node};
use spindle_io::{RuntimeConfig, ThreadTimes};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long closing or handing over an image waits for NBD requests in
/// flight (each is one bounded image operation).
pub const STREAM_DRAIN: Duration = Duration::from_secs(60);

/// Stream front-end lanes of statistics per export: an NBD server has at
/// most this many I/O threads.
pub const LANES: usize = 16;

/// How a disk is exported.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// Export name (shown by `spindle ctl list`).
    pub name: String,
    /// GET_ID string (up to 20 bytes).
    pub serial: String,
    /// Request queues offered to the driver.
    pub num_queues: u16,
    /// I/O threads serving them (queue N goes to thread N mod iothreads).
    pub iothreads: usize,
    /// Largest virtqueue the driver may set up.
    pub queue_size: u16,
    /// How long an I/O thread keeps polling its queues and completions
    /// after the last piece of work before it sleeps (0: never polls).
    pub poll_ns: u64,
    /// Engine of each I/O thread's runtime.
    pub engine: RuntimeConfig,
    /// Writes are refused.
    pub read_only: bool,
}

/// Where an export stands in a live migration (`spindle ctl list`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Migration {
    /// It serves its frontend's device (the normal state).
    Active,
    /// A migration destination whose device has not served yet: its
    /// frontend has not started it, or it waits (another export of the
    /// image still runs, or the image cannot be opened yet). The image is
    /// not trusted (two daemons: not even open).
    Incoming,
    /// Its frontend stopped the device for a migration (every ring stopped
    /// while dirty logging was on): the image was flushed, and closed when
    /// no other export of this daemon shares it. It activates again when
    /// the frontend starts the device (a cancelled or failed migration).
    Inactive,
}

impl Migration {
    /// The name `spindle ctl list` shows.
    pub fn name(self) -> &'static str {
        match self {
            Migration::Active => "active",
            Migration::Incoming => "incoming",
            Migration::Inactive => "inactive",
        }
    }

    fn from_u8(v: u8) -> Migration {
        match v {
            1 => Migration::Incoming,
            2 => Migration::Inactive,
            _ => Migration::Active,
        }
    }
}

/// An exported disk. Shared by the I/O threads of every connection.
pub struct Device {
    /// The image (shared with the other exports of it in this daemon).
    pub slot: Arc<NodeSlot>,
    /// Settings.
    pub cfg: DeviceConfig,
    /// This export's id in its slot (`NodeSlot::attach`).
    id: u64,
    migration: AtomicU8,
    /// A migration into a VM snapshot (`spindle vm snapshot --live`) runs:
    /// a device stop during it keeps the image here.
    keep_image: AtomicBool,
    capacity: AtomicU64,
    writeback: AtomicBool,
    opt_io: u32,
    stats: Box<[QueueStats]>,
    /// Counters of the stream front ends (NBD), one lane per I/O thread.
    lanes: Box<[QueueStats]>,
    /// Where each vhost-user I/O thread's time goes (written by the
    /// thread of that number of the connected frontend's daemon).
    threads: Box<[ThreadTimes]>,
    gate: Arc<Gate>,
    /// A job watches the guest's writes (`written` is set).
    tracking: AtomicBool,
    written: ArcSwapOption<Written>,
    /// The throttle group this export's reads and writes pass (its own,
    /// without limits, unless it joined another).
    throttle: ArcSwap<Membership>,
}

impl Device {
    /// A device for `node`, which is never closed under it (inactivating
    /// it only flushes).
    pub fn new(node: Node, mut cfg: DeviceConfig) -> Device {
        cfg.read_only |= node.is_read_only();
        let size = node.size();
        let opt_io = opt_io(&node);
        Device::with_slot(Arc::new(NodeSlot::fixed(node, cfg.engine)), cfg, size, opt_io, false)
    }

    /// A device for the image in `slot`, of `size` bytes; `opt_io` is the
    /// optimal I/O size (the qcow2 cluster size, 0 if none). An `incoming`
    /// device is a migration destination: [`Migration::Incoming`] until
    /// its frontend starts it.
    pub fn with_slot(slot: Arc<NodeSlot>, cfg: DeviceConfig, size: u64, opt_io: u32, incoming: bool) -> Device {
        let migration = if incoming {
            Migration::Incoming
        } else {
            Migration::Active
        };
        Device::with_slot_in(slot, cfg, size, opt_io, migration)
    }

    /// As [`Device::with_slot`], starting in `migration`: a device that is
    /// not [`Migration::Active`] serves once its frontend starts it (a
    /// planned handover keeps an export's state this way).
    pub fn with_slot_in(
        slot: Arc<NodeSlot>,
        mut cfg: DeviceConfig,
        size: u64,
        opt_io: u32,
        migration: Migration,
    ) -> Device {
        cfg.num_queues = cfg.num_queues.clamp(1, 64);
        cfg.iothreads = cfg.iothreads.clamp(1, cfg.num_queues as usize);
        cfg.queue_size = cfg.queue_size.clamp(2, 32768).next_power_of_two();
        let id = slot.attach();
        Device {
            id,
            migration: AtomicU8::new(migration as u8),
            keep_image: AtomicBool::new(false),
            capacity: AtomicU64::new(size),
            writeback: AtomicBool::new(true),
            opt_io,
            stats: (0..cfg.num_queues).map(|_| QueueStats::default()).collect(),
            lanes: (0..LANES).map(|_| QueueStats::default()).collect(),
            threads: (0..cfg.iothreads).map(|_| ThreadTimes::default()).collect(),
            gate: Arc::default(),
            tracking: AtomicBool::new(false),
            written: ArcSwapOption::new(None),
            throttle: ArcSwap::from_pointee(Group::new(cfg.name.clone(), Limits::default()).join()),
            slot,
            cfg,
        }
    }

    /// The open image, or `None` while it is closed for a migration.
    pub fn node(&self) -> Option<Arc<Node>> {
        self.slot.current()
    }

    /// The open image, or the error a control request gets while the
    /// export is inactive.
    pub fn open_node(&self) -> Result<Arc<Node>, BlockError> {
        self.node().ok_or_else(|| {
            BlockError::Invalid(format!(
                "export '{}' is {} (live migration): its image is not open here",
                self.cfg.name,
                self.migration().name()
            ))
        })
    }

    /// The gate that holds the device's requests back while it is
    /// quiesced (a snapshot), on every connection.
    pub fn gate(&self) -> &Arc<Gate> {
        &self.gate
    }

    /// Records the ranges the guest writes in `written` from now on (a
    /// live commit job), or stops recording (`None`). Writes that complete
    /// after this returns are recorded.
    pub fn track_writes(&self, written: Option<Arc<Written>>) {
        let on = written.is_some();
        self.written.store(written);
        self.tracking.store(on, Ordering::SeqCst);
    }

    /// A write of `len` bytes at `off` completed (called by the I/O
    /// threads; one relaxed load when no job watches).
    pub fn wrote(&self, off: u64, len: u64) {
        if self.tracking.load(Ordering::Relaxed) {
            if let Some(w) = self.written.load().as_ref() {
                w.mark(off, len);
            }
        }
    }

    /// Where the export stands in a migration.
    pub fn migration(&self) -> Migration {
        Migration::from_u8(self.migration.load(Ordering::Acquire))
    }

    /// This export's id in its slot.
    pub fn export_id(&self) -> u64 {
        self.id
    }

    /// The frontend started the device and the slot let it serve
    /// (`NodeSlot::start`, which opened its image afresh first if it was
    /// closed): the export is active.
    pub fn started(&self) {
        if self.migration.swap(Migration::Active as u8, Ordering::AcqRel) != Migration::Active as u8 {
            tracing::info!(device = %self.cfg.name, "export active: its frontend started the device");
        }
    }

    /// The frontend stopped the device for a migration (no request in
    /// flight): the image is flushed, and closed unless another export of
    /// this daemon shares it.
    pub fn inactivate(&self) -> Result<(), BlockError> {
        self.drain_stream_requests(STREAM_DRAIN)?;
        if self.keep_image.load(Ordering::Acquire) {
            let t = std::time::Instant::now();
            let r = self.slot.flush();
            tracing::info!(device = %self.cfg.name, ms = t.elapsed().as_secs_f64() * 1e3,
                "the frontend stopped the device for a migration into a VM snapshot; the image stays (flushed)");
            return r;
        }
        let shared = self.slot.users() > 1;
        let closed = if shared {
            self.slot.flush().map(|_| false)?
        } else {
            self.slot.inactivate()?
        };
        self.migration.store(Migration::Inactive as u8, Ordering::Release);
        tracing::info!(device = %self.cfg.name, closed, "export inactive: its frontend stopped the device; the image is handed over");
        Ok(())
    }

    /// While set, the frontend's migration goes into a VM snapshot
    /// (`spindle vm snapshot --live`), not to another host: a device stop
    /// during it flushes the image and keeps it open and active here.
    pub fn set_keep_image(&self, keep: bool) {
        self.keep_image.store(keep, Ordering::Release);
    }

    /// The export stops serving: the last export of the image closes it.
    pub fn close(&self) -> Result<(), BlockError> {
        self.drain_stream_requests(STREAM_DRAIN)?;
        self.slot.detach(self.id)
    }

    /// Waits (at most `timeout`) for the stream front ends' (NBD)
    /// requests in flight, whose gate the caller holds already (a quiesce
    /// or pause: vhost-user's own requests are the caller's to wait for).
    pub fn wait_stream_requests(&self, timeout: Duration) -> Result<(), String> {
        self.gate.wait_passes(timeout).map_err(|n| {
            format!(
                "export '{}': {n} NBD requests still in flight after {} s",
                self.cfg.name,
                timeout.as_secs()
            )
        })
    }

    /// Before the image is closed or handed over: holds the gate while
    /// the stream front ends' requests in flight finish. A request that
    /// waited meanwhile finds the image closed (or its export withdrawn)
    /// once the gate opens, and fails without touching it.
    fn drain_stream_requests(&self, timeout: Duration) -> Result<(), BlockError> {
        let _hold = self.gate.hold();
        self.wait_stream_requests(timeout).map_err(BlockError::Invalid)
    }

    /// Waits until the throttle lets a read or write of `bytes` go (at
    /// once, and without a system call, when no limit is set); how long
    /// it waited. While `escape` says so (a drain), a request whose turn
    /// it is goes at once.
    pub async fn throttle(&self, dir: Direction, bytes: u64, escape: &dyn Fn() -> bool) -> Duration {
        if !self.throttle.load().group().is_enabled() {
            return Duration::ZERO;
        }
        let m = self.throttle.load_full();
        m.admit_unless(dir, bytes, escape).await
    }

    /// The throttle group this export is in.
    pub fn throttle_group(&self) -> Arc<Group> {
        self.throttle.load().group().clone()
    }

    /// Moves the export into `group` (its next requests pass that one).
    pub fn join_throttle_group(&self, group: &Arc<Group>) {
        self.throttle.store(Arc::new(group.join()));
    }

    /// Requests that waited for the throttle and their seconds waited.
    pub fn throttled(&self) -> (u64, f64) {
        let all: Vec<&QueueStats> = self.stats.iter().chain(self.lanes.iter()).collect();
        crate::stats::throttled(&all)
    }

    /// The optimal I/O size (the qcow2 cluster size, 0 if none).
    pub fn opt_io(&self) -> u32 {
        self.opt_io
    }

    /// Whether the guest's write cache is on (CONFIG_WCE).
    pub fn writeback(&self) -> bool {
        self.writeback.load(Ordering::Relaxed)
    }

    /// Sets the write cache; when off, writes complete only once durable.
    pub fn set_writeback(&self, on: bool) {
        self.writeback.store(on, Ordering::Relaxed);
    }

    /// Publishes a new capacity in bytes (after the node was resized).
    pub fn set_capacity(&self, bytes: u64) {
        self.capacity.store(bytes, Ordering::Release);
    }

    /// Current capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Acquire)
    }

    /// Counters of queue `q`.
    pub fn queue_stats(&self, q: usize) -> &QueueStats {
        &self.stats[q.min(self.stats.len() - 1)]
    }

    /// Requests finished per queue.
    pub fn queue_requests(&self) -> Vec<u64> {
        self.stats.iter().map(QueueStats::requests).collect()
    }

    /// Counters of stream front-end lane `lane` (an NBD I/O thread's
    /// number): each lane has one writer, as each queue has.
    pub fn lane_stats(&self, lane: usize) -> &QueueStats {
        &self.lanes[lane % LANES]
    }

    /// Requests finished by the stream front ends (NBD), all lanes.
    pub fn lane_requests(&self) -> u64 {
        self.lanes.iter().map(QueueStats::requests).sum()
    }

    /// Statistics summed over all queues and lanes.
    pub fn stats(&self) -> Vec<OpSummary> {
        let all: Vec<&QueueStats> = self.stats.iter().chain(self.lanes.iter()).collect();
        summarize(&all)
    }

    /// The counters of each vhost-user queue now.
    pub fn queue_snapshots(&self) -> Vec<QueueSnapshot> {
        self.stats.iter().map(QueueStats::snapshot).collect()
    }

    /// The counters of the first `n` stream front-end (NBD) lanes now.
    pub fn lane_snapshots(&self, n: usize) -> Vec<QueueSnapshot> {
        self.lanes.iter().take(n).map(QueueStats::snapshot).collect()
    }

    /// Latency histograms per kind of request, over all queues and lanes.
    pub fn latencies(&self) -> Vec<Latency> {
        let all: Vec<&QueueStats> = self.stats.iter().chain(self.lanes.iter()).collect();
        latencies(&all)
    }

    /// Where vhost-user I/O thread `t` spends its time (attached by the
    /// thread of that number of the connected frontend's daemon).
    pub fn thread_times(&self, t: usize) -> &ThreadTimes {
        &self.threads[t.min(self.threads.len() - 1)]
    }

    /// Every vhost-user I/O thread's times, by thread number.
    pub fn threads(&self) -> &[ThreadTimes] {
        &self.threads
    }
}

/// The optimal I/O size of `node` (the qcow2 cluster size, 0 if none).
pub fn opt_io(node: &Node) -> u32 {
    node.info().cluster_size.map_or(0, |c| c.min(1 << 30) as u32)
}
