//! What the virtio-blk front end derives from an export
//! ([`spindle_export::Device`]): request limits, the configuration space,
//! and per-request settings. The export knows nothing of virtio.

use crate::blk::config::Geometry;
use crate::blk::exec;
use crate::blk::Limits;
use spindle_export::Device;

/// The virtio-blk view of an export.
pub trait VirtioDisk {
    /// Request limits as of now (the capacity follows resizes).
    fn limits(&self) -> Limits;
    /// The configuration space and features as of now.
    fn geometry(&self) -> Geometry;
    /// Request settings as of now: the GET_ID string, and write-through
    /// when the guest turned its write cache off.
    fn ident(&self) -> exec::Device;
}

impl VirtioDisk for Device {
    fn limits(&self) -> Limits {
        let mut l = Limits::new(self.capacity() / 512);
        l.read_only = self.cfg.read_only;
        l
    }

    fn geometry(&self) -> Geometry {
        // A raw block device's own discard granularity and limit (a
        // format on it discards by its own clusters).
        let discard = self
            .node()
            .filter(|n| matches!(**n, spindle_block::Node::Raw(_)))
            .and_then(|n| n.storage().discard_limits())
            .filter(|&(_, max)| max > 0);
        let sectors = |b: u64| (b / 512).clamp(1, u64::from(u32::MAX)) as u32;
        Geometry {
            limits: self.limits(),
            logical_block: 512,
            opt_io: self.opt_io(),
            num_queues: self.cfg.num_queues,
            writeback: self.writeback(),
            discard_align_sectors: discard.map_or(1, |(g, _)| sectors(g)),
            max_discard_sectors: discard.map_or(u32::MAX, |(_, m)| sectors(m)),
        }
    }

    fn ident(&self) -> exec::Device {
        let mut d = exec::Device::new(&self.cfg.serial);
        d.write_through = !self.writeback();
        d
    }
}
