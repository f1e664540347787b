//! What an L2 entry means. The one place that decodes L2 entries, and
//! refuses what QEMU refuses before using them: a host offset that is not
//! cluster aligned, a zero flag in a compat=0.10 image, an extended-L2
//! bitmap with a subcluster both allocated and zero, or allocated
//! subclusters without a host cluster.

use super::meta::{COMPRESSED, COPIED, OFFSET_MASK, ZERO};

/// Bits of a standard L2 entry that must be zero (bits 1..8 and 56..61).
pub const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Bits of an L1 entry that must be zero (bits 0..8 and 56..62).
pub const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Extended L2: every subcluster allocated.
pub const ALL_ALLOC: u32 = u32::MAX;

/// The facts of an image that decoding depends on.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// log2(cluster size).
    pub cluster_bits: u32,
    /// compat=1.1 (v3): the zero flag exists.
    pub v3: bool,
    /// 128-bit L2 entries with subcluster bitmaps.
    pub ext_l2: bool,
}

/// One guest cluster as its L2 entry describes it. For standard L2
/// entries the whole cluster is one "subcluster": `alloc`/`zero` are all
/// ones or all zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Host cluster offset (cluster aligned), 0 when none.
    pub host: u64,
    /// Subclusters whose data is at `host`.
    pub alloc: u32,
    /// Subclusters that read as zeroes.
    pub zero: u32,
    /// The raw descriptor of a compressed cluster.
    pub compressed: Option<u64>,
    /// Refcount is exactly one: writes may go in place.
    pub copied: bool,
}

impl Layout {
    /// Decodes and validates an L2 entry (and, with extended L2, its
    /// bitmap). The error says what is wrong, for a corruption report.
    pub fn decode(&self, raw: u64, bmp: u64) -> Result<Entry, String> {
        let copied = raw & COPIED != 0;
        if raw & COMPRESSED != 0 {
            return Ok(Entry {
                host: 0,
                alloc: 0,
                zero: 0,
                compressed: Some(raw),
                copied,
            });
        }
        let host = raw & OFFSET_MASK;
        let cs = 1u64 << self.cluster_bits;
        let (alloc, zero) = if self.ext_l2 {
            let (alloc, zero) = (bmp as u32, (bmp >> 32) as u32);
            if host == 0 && alloc != 0 {
                return Err(format!(
                    "unallocated cluster with allocated subclusters (bitmap 0x{bmp:016x})"
                ));
            }
            if alloc & zero != 0 {
                return Err(format!("subclusters both allocated and zero (bitmap 0x{bmp:016x})"));
            }
            (alloc, zero)
        } else if raw & ZERO != 0 {
            if !self.v3 {
                return Err(format!(
                    "zero cluster entry 0x{raw:016x} in a compat=0.10 image, which has no zero flag"
                ));
            }
            (0, ALL_ALLOC)
        } else if host != 0 {
            (ALL_ALLOC, 0)
        } else {
            (0, 0)
        };
        if !host.is_multiple_of(cs) {
            return Err(format!(
                "cluster allocation offset 0x{host:x} is not aligned to the {cs}-byte cluster size"
            ));
        }
        Ok(Entry {
            host,
            alloc,
            zero,
            compressed: None,
            copied,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STD3: Layout = Layout {
        cluster_bits: 16,
        v3: true,
        ext_l2: false,
    };

    #[test]
    fn refuses_what_qemu_refuses() {
        // The reproducer: an offset inside the L2 table itself.
        assert!(STD3
            .decode(0x8000_0000_0004_0200, 0)
            .unwrap_err()
            .contains("not aligned"));
        let v2 = Layout { v3: false, ..STD3 };
        assert!(v2.decode(ZERO, 0).unwrap_err().contains("compat=0.10"));
        assert!(v2.decode(0x50000 | ZERO, 0).is_err());
        let ext = Layout { ext_l2: true, ..STD3 };
        assert!(ext
            .decode(0x8000_0000_0005_0000, 0x0000_0001_ffff_ffff)
            .unwrap_err()
            .contains("both allocated and zero"));
        assert!(ext.decode(0, 1).unwrap_err().contains("unallocated cluster"));
        // Zero flag is not a zero flag with extended L2.
        assert_eq!(ext.decode(0x50000 | ZERO, 0).unwrap().zero, 0);
    }

    #[test]
    fn decodes_every_valid_kind() {
        let e = STD3.decode(0x8000_0000_0005_0000, 0).unwrap();
        assert_eq!((e.host, e.alloc, e.zero, e.copied), (0x50000, ALL_ALLOC, 0, true));
        let z = STD3.decode(0x50000 | ZERO, 0).unwrap();
        assert_eq!((z.host, z.alloc, z.zero), (0x50000, 0, ALL_ALLOC));
        assert_eq!(
            STD3.decode(0, 0).unwrap(),
            Entry {
                host: 0,
                alloc: 0,
                zero: 0,
                compressed: None,
                copied: false
            }
        );
        assert!(STD3.decode(COMPRESSED | 0x1234, 0).unwrap().compressed.is_some());
        let ext = Layout { ext_l2: true, ..STD3 };
        let s = ext.decode(0x50000, 0x0000_00f0_0000_000f).unwrap();
        assert_eq!((s.alloc, s.zero), (0xf, 0xf0));
        assert_eq!(ext.decode(0, 0xffff_ffff_0000_0000).unwrap().zero, u32::MAX);
    }
}
