//! The virtio-blk configuration space (virtio 1.2, 5.2.4) and feature bits.
//!
//! The layout is written field by field at the offsets the specification
//! gives, so no unsafe byte casting is involved.

use super::request::Limits;

/// Feature bits of the device (virtio 1.2, 5.2.3), as bit numbers.
pub mod feature {
    /// Largest segment in `size_max`.
    pub const SIZE_MAX: u32 = 1;
    /// Most segments in `seg_max`.
    pub const SEG_MAX: u32 = 2;
    /// Read-only device.
    pub const RO: u32 = 5;
    /// Logical block size in `blk_size`.
    pub const BLK_SIZE: u32 = 6;
    /// Flush command.
    pub const FLUSH: u32 = 9;
    /// Topology fields.
    pub const TOPOLOGY: u32 = 10;
    /// The driver can switch the write cache (the `writeback` field).
    pub const CONFIG_WCE: u32 = 11;
    /// Several request queues.
    pub const MQ: u32 = 12;
    /// Discard command.
    pub const DISCARD: u32 = 13;
    /// Write-zeroes command.
    pub const WRITE_ZEROES: u32 = 14;
    /// Indirect descriptors.
    pub const RING_INDIRECT_DESC: u32 = 28;
    /// Used/avail event index.
    pub const RING_EVENT_IDX: u32 = 29;
    /// vhost-user protocol features are negotiated.
    pub const VHOST_USER_PROTOCOL_FEATURES: u32 = 30;
    /// Virtio 1.0 device.
    pub const VERSION_1: u32 = 32;
}

/// Byte offset of the `writeback` field.
pub const WRITEBACK_OFFSET: u32 = 32;
/// Size of the configuration space this device exposes (up to the
/// write-zeroes fields; secure erase is not offered).
pub const CONFIG_LEN: usize = 60;

/// What the configuration space is built from.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    /// Request limits (capacity, segments, discard).
    pub limits: Limits,
    /// Logical block size in bytes (512 or 4096).
    pub logical_block: u32,
    /// Preferred I/O size in bytes (the qcow2 cluster size), 0 for none.
    pub opt_io: u32,
    /// Request queues.
    pub num_queues: u16,
    /// The write cache is on.
    pub writeback: bool,
    /// Discard alignment in 512-byte sectors (the device's granularity
    /// for a raw block device; else the logical block).
    pub discard_align_sectors: u32,
    /// Largest discard segment in sectors (the device's limit, for a raw
    /// block device).
    pub max_discard_sectors: u32,
}

impl Geometry {
    /// The feature bits this device offers.
    pub fn features(&self) -> u64 {
        use feature::*;
        let mut bits = [
            SIZE_MAX,
            SEG_MAX,
            BLK_SIZE,
            FLUSH,
            TOPOLOGY,
            CONFIG_WCE,
            MQ,
            RING_INDIRECT_DESC,
            RING_EVENT_IDX,
            VHOST_USER_PROTOCOL_FEATURES,
            VERSION_1,
        ]
        .iter()
        .fold(0u64, |acc, b| acc | 1 << b);
        if self.limits.read_only {
            bits |= 1 << RO;
        } else {
            bits |= 1 << DISCARD | 1 << WRITE_ZEROES;
        }
        bits
    }

    /// The configuration space as the driver reads it (little-endian).
    pub fn bytes(&self) -> [u8; CONFIG_LEN] {
        let l = &self.limits;
        let mut b = [0u8; CONFIG_LEN];
        let mut put = |off: usize, v: &[u8]| b[off..off + v.len()].copy_from_slice(v);
        put(0, &l.capacity_sectors.to_le_bytes());
        put(8, &l.size_max.to_le_bytes());
        put(12, &l.seg_max.to_le_bytes());
        // geometry (16..20) stays zero: not offered.
        put(20, &self.logical_block.to_le_bytes());
        let exp = (self.logical_block / 512).max(1).trailing_zeros() as u8;
        put(24, &[exp, 0]);
        put(26, &1u16.to_le_bytes()); // min_io_size, in logical blocks
        let opt = self.opt_io / self.logical_block.max(1);
        put(28, &opt.to_le_bytes());
        put(WRITEBACK_OFFSET as usize, &[u8::from(self.writeback)]);
        put(34, &self.num_queues.to_le_bytes());
        let seg_sectors = l.max_segment_sectors.min(u32::MAX >> 9 << 9);
        let discard_sectors = seg_sectors.min(self.max_discard_sectors.max(1));
        put(36, &discard_sectors.to_le_bytes()); // max_discard_sectors
        put(40, &l.max_discard_seg.to_le_bytes());
        let align = self.discard_align_sectors.max((self.logical_block / 512).max(1));
        put(44, &align.to_le_bytes()); // discard_sector_alignment
        put(48, &seg_sectors.to_le_bytes()); // max_write_zeroes_sectors
        put(52, &l.max_write_zeroes_seg.to_le_bytes());
        put(56, &[1]); // write_zeroes_may_unmap
        b
    }

    /// The `size` bytes at `offset`, zero beyond the end (as the driver
    /// expects of fields a device does not have).
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let all = self.bytes();
        let size = size.min(4096) as usize;
        let mut out = vec![0u8; size];
        let start = (offset as usize).min(CONFIG_LEN);
        let end = start.saturating_add(size).min(CONFIG_LEN);
        out[..end - start].copy_from_slice(&all[start..end]);
        out
    }
}

/// What a driver's configuration write asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigWrite {
    /// Turn the write cache on (`true`) or off.
    Writeback(bool),
}

/// Validates a driver's configuration write: only the `writeback` byte is
/// writable (virtio 1.2, 5.2.5.1).
pub fn parse_write(offset: u32, buf: &[u8]) -> Result<ConfigWrite, String> {
    match (offset, buf) {
        (WRITEBACK_OFFSET, [v]) if *v <= 1 => Ok(ConfigWrite::Writeback(*v == 1)),
        (WRITEBACK_OFFSET, [v]) => Err(format!("invalid writeback value {v} (0 or 1)")),
        _ => Err(format!(
            "config write of {} bytes at offset {offset}: only the 1-byte writeback field at offset {WRITEBACK_OFFSET} is writable",
            buf.len()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo() -> Geometry {
        Geometry {
            limits: Limits::new(2048),
            logical_block: 512,
            opt_io: 65536,
            num_queues: 2,
            writeback: true,
            discard_align_sectors: 1,
            max_discard_sectors: u32::MAX,
        }
    }

    #[test]
    fn layout_matches_the_specification() {
        let b = geo().bytes();
        assert_eq!(u64::from_le_bytes(b[0..8].try_into().unwrap()), 2048);
        assert_eq!(u32::from_le_bytes(b[8..12].try_into().unwrap()), 1 << 20);
        assert_eq!(u32::from_le_bytes(b[12..16].try_into().unwrap()), 254);
        assert_eq!(u32::from_le_bytes(b[20..24].try_into().unwrap()), 512);
        assert_eq!(u32::from_le_bytes(b[28..32].try_into().unwrap()), 128);
        assert_eq!(b[32], 1);
        assert_eq!(u16::from_le_bytes(b[34..36].try_into().unwrap()), 2);
        assert_eq!(u32::from_le_bytes(b[40..44].try_into().unwrap()), 32);
        assert_eq!(b[56], 1);
        // A block device's discard granularity and limit reach the driver.
        let dev = Geometry {
            discard_align_sectors: 8,
            max_discard_sectors: 8192,
            ..geo()
        };
        let b = dev.bytes();
        assert_eq!(u32::from_le_bytes(b[36..40].try_into().unwrap()), 8192);
        assert_eq!(u32::from_le_bytes(b[44..48].try_into().unwrap()), 8);
    }

    #[test]
    fn partial_and_out_of_range_reads() {
        let g = geo();
        assert_eq!(g.read(34, 2), vec![2, 0]);
        assert_eq!(g.read(58, 4), vec![0, 0, 0, 0]);
        assert_eq!(g.read(u32::MAX, 8), vec![0; 8]);
        assert_eq!(g.read(0, u32::MAX).len(), 4096);
    }

    #[test]
    fn only_writeback_is_writable() {
        assert_eq!(parse_write(32, &[0]), Ok(ConfigWrite::Writeback(false)));
        assert_eq!(parse_write(32, &[1]), Ok(ConfigWrite::Writeback(true)));
        assert!(parse_write(32, &[7]).is_err());
        assert!(parse_write(0, &[0; 8]).is_err());
        assert!(parse_write(32, &[1, 0]).is_err());
    }

    #[test]
    fn read_only_devices_offer_no_discard() {
        let mut g = geo();
        g.limits.read_only = true;
        let f = g.features();
        assert_ne!(f & 1 << feature::RO, 0);
        assert_eq!(f & (1 << feature::DISCARD | 1 << feature::WRITE_ZEROES), 0);
    }
}
