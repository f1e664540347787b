//! QEMU's metadata overlap check, in its `all` mode: before anything is
//! written to the image file, the host range is checked against the
//! image's own metadata (header, active L1 and L2 tables, refcount table
//! and blocks, snapshot table, snapshot L1 tables, and the L2 tables the
//! snapshots reach). A hit means the metadata that led to the write is
//! corrupt; the write is not issued. Everything checked is in memory: the
//! clusters of active L2 tables and of refcount blocks are indexed here,
//! kept in step by `Meta`'s setters for the L1 and refcount tables; those
//! of snapshots' L2 tables are read at open and follow snapshot create and
//! delete ([`Inactive`]).

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
    /// An L2 table a snapshot's L1 table points to.
    InactiveL2,
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
            Area::InactiveL2 => "L2 table of a snapshot",
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

/// Host clusters of the L2 tables that snapshots' L1 tables point to, per
/// snapshot (by its L1 table's offset) and counted over all of them.
#[derive(Debug, Default)]
pub struct Inactive {
    by_snapshot: BTreeMap<u64, Vec<u64>>,
    clusters: BTreeMap<u64, u32>,
}

impl Inactive {
    /// Records the L1 table (entries as on disk) of the snapshot whose L1
    /// table is at `l1_offset`.
    pub fn insert(&mut self, l1_offset: u64, l1: &[u64], cluster_bits: u32) {
        self.remove(l1_offset);
        let mut tables: Vec<u64> = l1
            .iter()
            .filter(|&&e| e & OFFSET_MASK != 0)
            .map(|&e| (e & OFFSET_MASK) >> cluster_bits)
            .collect();
        tables.sort_unstable();
        tables.dedup();
        for &c in &tables {
            add(&mut self.clusters, c);
        }
        self.by_snapshot.insert(l1_offset, tables);
    }

    /// Forgets the snapshot whose L1 table is at `l1_offset`.
    pub fn remove(&mut self, l1_offset: u64) {
        for c in self.by_snapshot.remove(&l1_offset).unwrap_or_default() {
            remove(&mut self.clusters, c);
        }
    }

    /// Whether the snapshot whose L1 table is at `l1_offset` is recorded.
    pub fn contains(&self, l1_offset: u64) -> bool {
        self.by_snapshot.contains_key(&l1_offset)
    }

    /// The L1 offsets of the recorded snapshots.
    pub fn snapshots(&self) -> Vec<u64> {
        self.by_snapshot.keys().copied().collect()
    }

    fn hits(&self, c0: u64, c1: u64) -> bool {
        self.clusters.range(c0..c1).next().is_some()
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
            (Area::InactiveL2, self.inactive_l2.hits(c0, c1)),
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

    #[test]
    fn snapshot_tables_are_counted_over_all_snapshots() {
        let bits = 16;
        let mut ix = Inactive::default();
        ix.insert(0x10_0000, &[0x3_0000 | (1 << 63), 0x3_0000, 0x5_0000], bits);
        ix.insert(0x20_0000, &[0x3_0000], bits);
        assert!(ix.hits(3, 4) && ix.hits(5, 6) && !ix.hits(4, 5));
        ix.remove(0x10_0000);
        assert!(
            ix.hits(3, 4) && !ix.hits(5, 6),
            "table 3 is still the second snapshot's"
        );
        ix.remove(0x20_0000);
        assert!(!ix.hits(0, u64::MAX) && ix.snapshots().is_empty());
    }
}
