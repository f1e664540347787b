//! One exported disk: the block node and what outlives a frontend
//! connection (settings, write-cache state, statistics).

use crate::blk::config::Geometry;
use crate::blk::exec;
use crate::blk::Limits;
use crate::stats::{summarize, OpSummary, QueueStats};
use spindle_block::Node;
use spindle_io::RuntimeConfig;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

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

/// An exported disk. Shared by the I/O threads of every connection.
pub struct Device {
    /// The image.
    pub node: Arc<Node>,
    /// Settings.
    pub cfg: DeviceConfig,
    capacity: AtomicU64,
    writeback: AtomicBool,
    opt_io: u32,
    ident: exec::Device,
    stats: Box<[QueueStats]>,
}

impl Device {
    /// A device for `node`.
    pub fn new(node: Node, mut cfg: DeviceConfig) -> Device {
        cfg.num_queues = cfg.num_queues.clamp(1, 64);
        cfg.iothreads = cfg.iothreads.clamp(1, cfg.num_queues as usize);
        cfg.queue_size = cfg.queue_size.clamp(2, 32768).next_power_of_two();
        let info = node.info();
        let opt_io = info.cluster_size.map_or(0, |c| c.min(1 << 30) as u32);
        cfg.read_only |= node.is_read_only();
        Device {
            capacity: AtomicU64::new(node.size()),
            writeback: AtomicBool::new(true),
            opt_io,
            ident: exec::Device::new(&cfg.serial),
            stats: (0..cfg.num_queues).map(|_| QueueStats::default()).collect(),
            node: Arc::new(node),
            cfg,
        }
    }

    /// Request limits as of now (the capacity follows resizes).
    pub fn limits(&self) -> Limits {
        let mut l = Limits::new(self.capacity.load(Ordering::Acquire) / 512);
        l.read_only = self.cfg.read_only;
        l
    }

    /// The configuration space and features as of now.
    pub fn geometry(&self) -> Geometry {
        Geometry {
            limits: self.limits(),
            logical_block: 512,
            opt_io: self.opt_io,
            num_queues: self.cfg.num_queues,
            writeback: self.writeback(),
        }
    }

    /// Request settings as of now: the GET_ID string, and write-through
    /// when the guest turned its write cache off.
    pub fn ident(&self) -> exec::Device {
        let mut d = self.ident.clone();
        d.write_through = !self.writeback();
        d
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

    /// Statistics summed over all queues.
    pub fn stats(&self) -> Vec<OpSummary> {
        summarize(&self.stats)
    }
}
