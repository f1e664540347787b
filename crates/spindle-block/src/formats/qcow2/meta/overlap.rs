//! QEMU's metadata overlap check, in its default `cached` mode: before
//! anything is written to the image file, the host range is checked
//! against the image's own metadata (header, active L1 and L2 tables,
//! refcount table and blocks, snapshot table, snapshot L1 tables). A hit
//! means the metadata that led to the write is corrupt; the write is not
//! issued. Everything checked is in memory: the clusters of active L2
//! tables and of refcount blocks are indexed here, kept in step by
//! `Meta`'s setters for the L1 and refcount tables.

use super::{Meta, OFFSET_MASK};
use std::collections::BTreeMap;

/// A metadata area, by QEMU's overlap-check names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Area {
    /// The header cluster.
    MainHeader,
    /// The active L1 table.
    ActiveL1,
    /// An L2 table the active L1 points to.
    ActiveL2,
    /// The refcount table.
    RefcountTable,
    /// A refcount block.
    RefcountBlock,
    /// The snapshot table.
    SnapshotTable,
    /// A snapshot's L1 table.
    InactiveL1,
}

impl Area {
    /// How an error names it.
    pub fn name(self) -> &'static str {
        match self {
            Area::MainHeader => "image header",
            Area::ActiveL1 => "active L1 table",
            Area::ActiveL2 => "active L2 table",
            Area::RefcountTable => "refcount table",
            Area::RefcountBlock => "refcount block",
            Area::SnapshotTable => "snapshot table",
            Area::InactiveL1 => "L1 table of a snapshot",
        }
    }
}

/// Host clusters holding active L2 tables and refcount blocks (with a
/// count, as a corrupt image may name one cluster twice).
#[derive(Debug, Default)]
pub struct Index {
    l2: BTreeMap<u64, u32>,
    blocks: BTreeMap<u64, u32>,
}

fn add(map: &mut BTreeMap<u64, u32>, cluster: u64) {
    *map.entry(cluster).or_insert(0) += 1;
}

fn remove(map: &mut BTreeMap<u64, u32>, cluster: u64) {
    if let Some(n) = map.get_mut(&cluster) {
        *n -= 1;
        if *n == 0 {
            map.remove(&cluster);
        }
    }
}

impl Index {
    /// The index of an L1 table and a refcount table.
    pub fn build(l1: &[u64], rc_table: &[u64], cluster_bits: u32) -> Index {
        let mut ix = Index::default();
        for &e in l1 {
            ix.set_l1(0, e, cluster_bits);
        }
        for &e in rc_table {
            ix.set_block(0, e, cluster_bits);
        }
        ix
    }

    /// An L1 entry changed from `old` to `new`.
    pub fn set_l1(&mut self, old: u64, new: u64, cluster_bits: u32) {
        if old & OFFSET_MASK != 0 {
            remove(&mut self.l2, (old & OFFSET_MASK) >> cluster_bits);
        }
        if new & OFFSET_MASK != 0 {
            add(&mut self.l2, (new & OFFSET_MASK) >> cluster_bits);
        }
    }

    /// A refcount table entry changed from `old` to `new`.
    pub fn set_block(&mut self, old: u64, new: u64, cluster_bits: u32) {
        if old & !0x1ff != 0 {
            remove(&mut self.blocks, (old & !0x1ff) >> cluster_bits);
        }
        if new & !0x1ff != 0 {
            add(&mut self.blocks, (new & !0x1ff) >> cluster_bits);
        }
    }
}

impl Meta {
    /// The metadata area that writing `[off, off + len)` would overwrite,
    /// other than `except` (the kind of metadata being written, which
    /// lands where its own kind lives).
    pub fn overlap(&self, off: u64, len: u64, except: Option<Area>) -> Option<Area> {
        let bits = self.hdr.cluster_bits;
        let (c0, c1) = (off >> bits, off.saturating_add(len.max(1)).div_ceil(1 << bits));
        let hits = |start: u64, bytes: u64| {
            bytes > 0 && start >> bits < c1 && c0 < start.saturating_add(bytes).div_ceil(1 << bits)
        };
        let h = &self.hdr;
        let fixed = [
            (Area::MainHeader, c0 == 0),
            (Area::ActiveL1, hits(h.l1_table_offset, h.l1_size as u64 * 8)),
            (
                Area::RefcountTable,
                hits(h.refcount_table_offset, (h.refcount_table_clusters as u64) << bits),
            ),
            (
                Area::SnapshotTable,
                h.nb_snapshots > 0 && hits(h.snapshots_offset, self.snapshots_table_len),
            ),
            (
                Area::InactiveL1,
                self.snapshots
                    .iter()
                    .any(|s| hits(s.l1_table_offset, s.l1_size as u64 * 8)),
            ),
            (Area::ActiveL2, self.overlaps.l2.range(c0..c1).next().is_some()),
            (Area::RefcountBlock, self.overlaps.blocks.range(c0..c1).next().is_some()),
        ];
        fixed
            .into_iter()
            .find(|&(area, hit)| hit && Some(area) != except)
            .map(|(area, _)| area)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_follows_changes_and_counts_duplicates() {
        let bits = 16;
        let mut ix = Index::build(&[0x3_0000 | (1 << 63), 0], &[0x1_0000], bits);
        assert!(ix.l2.contains_key(&3) && ix.blocks.contains_key(&1));
        ix.set_l1(0, 0x3_0000, bits); // a corrupt second pointer to the same table
        ix.set_l1(0x3_0000, 0x7_0000, bits);
        assert!(ix.l2.contains_key(&3), "still named once");
        ix.set_l1(0x3_0000 | (1 << 63), 0, bits);
        assert!(!ix.l2.contains_key(&3) && ix.l2.contains_key(&7));
        ix.set_block(0x1_0000, 0x9_0000, bits);
        assert!(!ix.blocks.contains_key(&1) && ix.blocks.contains_key(&9));
    }
}
