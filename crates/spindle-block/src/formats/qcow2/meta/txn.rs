//! Snapshot create, apply and delete as one atomic switch of the header.
//!
//! Changing which L1 tables reach a cluster changes its refcount and, in
//! the active tables, its COPIED flag (set exactly where the refcount is
//! one). Those live in different clusters, so updating them in place
//! leaves a window in which `qemu-img check` sees a COPIED flag that
//! disagrees with the refcount, a corruption (QEMU's own in-place order
//! has the same window). Here nothing in use is written in place:
//!
//! 1. the refcounts after the operation are worked out in copies of the
//!    refcount blocks that change (a [`Shadow`]);
//! 2. active L2 tables whose COPIED flags change are copied with the new
//!    flags, and a new active L1 table, snapshot table, the refcount block
//!    copies and a new refcount table are written past the end of
//!    everything in use (clusters the old refcounts call free);
//! 3. after a flush, one header write switches the L1 table, the refcount
//!    table and the snapshot table at once (they all sit in its first
//!    sector), and a flush makes it durable.
//!
//! A crash before the header write leaves the old image untouched (the
//! new clusters are unreferenced and free); after it, the new one is
//! complete. What the operation frees (old tables, the old refcount
//! blocks, clusters only a deleted snapshot used) is free in the new
//! refcounts already: there is nothing to clean up afterwards.

use super::super::cache::{get_be64, get_refcount, put_be64, set_refcount};
use super::super::compressed_extent;
use super::super::entry::Entry;
use super::super::header::MAX_REFTABLE_BYTES;
use super::super::snapshot::{self, Snapshot};
use super::{Area, Meta, COPIED, OFFSET_MASK};
use crate::error::{corrupt, fmt_err, Result};
use crate::storage::Storage;
use spindle_io::{AlignedBuf, SgList};
use std::collections::BTreeMap;

/// Refcount blocks as they will be after the switch, copied on first touch.
#[derive(Default)]
pub struct Shadow {
    blocks: BTreeMap<u64, AlignedBuf>,
    /// Lowest cluster whose refcount drops to zero (the allocator's next
    /// search starts there).
    min_freed: Option<u64>,
}

/// The state an operation switches to.
pub struct Switch {
    /// Refcounts after the switch.
    pub shadow: Shadow,
    /// The active L1 after the switch (flags final). Entries whose table
    /// was copied are filled in by `commit`.
    pub l1: Vec<u64>,
    /// L1 indexes whose L2 table was copied, in the order the copies were
    /// written (copy i is at the start of the new area plus i clusters).
    pub copied: Vec<usize>,
    /// The snapshot table after the switch, when it changes.
    pub snapshots: Option<Vec<Snapshot>>,
    /// The virtual size after the switch.
    pub size: u64,
    /// Where the new area starts (cluster index).
    pub base: u64,
}

impl Meta {
    /// Starts an operation: everything cached is written back first, so the
    /// disk and the caches agree, and the new area starts past the end.
    pub async fn begin_switch(&mut self, f: &Storage) -> Result<Switch> {
        self.flush(f).await?;
        Ok(Switch {
            shadow: Shadow::default(),
            l1: Vec::new(),
            copied: Vec::new(),
            snapshots: None,
            size: self.hdr.size,
            base: self.end,
        })
    }

    async fn shadow_block<'s>(&mut self, f: &Storage, sh: &'s mut Shadow, idx: u64) -> Result<&'s mut AlignedBuf> {
        if let std::collections::btree_map::Entry::Vacant(v) = sh.blocks.entry(idx) {
            let cs = self.cs() as usize;
            let mut b = AlignedBuf::new(cs, f.mem_align().max(512));
            let old = self.block_at(f, idx as usize)?;
            if old != 0 {
                b.copy_from_slice(&self.rc_block(f, old).await?.buf);
            }
            v.insert(b);
        }
        Ok(sh.blocks.get_mut(&idx).expect("inserted above"))
    }

    /// Refcount of cluster `c` after the switch.
    pub async fn sh_get(&mut self, f: &Storage, sh: &Shadow, c: u64) -> Result<u64> {
        let bits = self.rb_bits();
        match sh.blocks.get(&(c >> bits)) {
            Some(b) => Ok(get_refcount(
                b,
                self.hdr.refcount_order,
                (c & ((1 << bits) - 1)) as usize,
            )),
            None => self.refcount(f, c).await,
        }
    }

    async fn sh_set(&mut self, f: &Storage, sh: &mut Shadow, c: u64, v: u64) -> Result<()> {
        let bits = self.rb_bits();
        let order = self.hdr.refcount_order;
        let b = self.shadow_block(f, sh, c >> bits).await?;
        set_refcount(b, order, (c & ((1 << bits) - 1)) as usize, v);
        if v == 0 {
            sh.min_freed = Some(sh.min_freed.map_or(c, |m| m.min(c)));
        }
        Ok(())
    }

    /// Adds `delta` to the refcount of cluster `c` after the switch.
    pub async fn sh_add(&mut self, f: &Storage, sh: &mut Shadow, c: u64, delta: i64) -> Result<u64> {
        let cur = self.sh_get(f, sh, c).await?;
        let new = cur as i128 + delta as i128;
        if new < 0 {
            return Err(corrupt(
                f.path(),
                format!(
                    "the refcount of cluster {c} would become {new}; the refcounts are inconsistent (run check -r all)"
                ),
            ));
        }
        if new > self.rc_max() as i128 {
            return Err(self.overflow(f, c));
        }
        self.sh_set(f, sh, c, new as u64).await?;
        Ok(new as u64)
    }

    /// Adds `delta` to every cluster of `[off, off + bytes)`.
    pub async fn sh_add_range(&mut self, f: &Storage, sh: &mut Shadow, off: u64, bytes: u64, delta: i64) -> Result<()> {
        let cs = self.cs();
        for c in off / cs..(off + bytes).div_ceil(cs) {
            self.sh_add(f, sh, c, delta).await?;
        }
        Ok(())
    }

    /// Reads the whole L2 table at `off` (validated as an L1 entry's target).
    pub async fn read_l2_table(&self, f: &Storage, off: u64) -> Result<AlignedBuf> {
        self.check_table_offset(f, off, "L2 table")?;
        self.read_buf(f, off, self.cs() as usize).await
    }

    /// A reference from a table to cluster `c`, which must lie inside
    /// the image: a hostile offset cannot make the switch create refcount
    /// blocks far past the end.
    fn referenced(&self, f: &Storage, c: u64, what: &str) -> Result<u64> {
        if c >= self.end {
            return Err(corrupt(
                f.path(),
                format!("{what} at cluster {c} lies beyond the end of the image"),
            ));
        }
        Ok(c)
    }

    /// Every entry of the L2 table `table` (read from `l2`), decoded:
    /// (index, raw entry, what it means).
    fn table_entries(&self, f: &Storage, l2: u64, table: &[u8]) -> Result<Vec<(usize, u64, Entry)>> {
        let (w, layout) = (self.entry_words(), self.layout());
        (0..table.len() / (8 * w))
            .map(|j| {
                let raw = get_be64(table, j * w);
                let bmp = if w == 2 { get_be64(table, j * 2 + 1) } else { 0 };
                layout
                    .decode(raw, bmp)
                    .map(|e| (j, raw, e))
                    .map_err(|m| corrupt(f.path(), format!("L2 table at 0x{l2:x}, entry {j}: {m}")))
            })
            .collect()
    }

    /// Adds `delta` to the refcount of the L2 table `l2` and of every
    /// cluster it maps: one L1 table's reference, gained or lost.
    pub async fn sh_reference(&mut self, f: &Storage, sh: &mut Shadow, l2: u64, delta: i64) -> Result<()> {
        let c = self.referenced(f, l2 / self.cs(), "an L2 table")?;
        let table = self.read_l2_table(f, l2).await?;
        self.sh_add(f, sh, c, delta).await?;
        let cs = self.cs();
        for (_, _, e) in self.table_entries(f, l2, &table)? {
            if let Some(raw) = e.compressed {
                let (off, len) = compressed_extent(raw, self.hdr.cluster_bits);
                self.referenced(f, (off + len - 1) / cs, "compressed data")?;
                self.sh_add_range(f, sh, off / cs * cs, off % cs + len, delta).await?;
            } else if e.host != 0 {
                let c = self.referenced(f, e.host / cs, "a data cluster")?;
                self.sh_add(f, sh, c, delta).await?;
            }
        }
        Ok(())
    }

    /// Adds `delta` for every table `l1` reaches: an L1 table's references.
    pub async fn sh_reference_l1(&mut self, f: &Storage, sh: &mut Shadow, l1: &[u64], delta: i64) -> Result<()> {
        for &e in l1 {
            if e & OFFSET_MASK != 0 {
                self.sh_reference(f, sh, e & OFFSET_MASK, delta).await?;
            }
        }
        Ok(())
    }

    /// Makes `l2` the active table of L1 index `i` in the switch, with
    /// COPIED flags as the new refcounts say. A table whose flags are all
    /// right already is kept (and the L1 entry gets COPIED if only the
    /// active L1 reaches it); otherwise a copy with the right flags is
    /// written into the new area and the active L1 drops its reference to
    /// the original. `l2` must already count the active reference.
    pub async fn sh_activate(&mut self, f: &Storage, sw: &mut Switch, i: usize, l2: u64) -> Result<()> {
        let mut table = self.read_l2_table(f, l2).await?;
        let (w, cs) = (self.entry_words(), self.cs());
        let mut changed = false;
        for (j, raw, e) in self.table_entries(f, l2, &table)? {
            let want = e.compressed.is_none() && e.host != 0 && self.sh_get(f, &sw.shadow, e.host / cs).await? == 1;
            if want != e.copied {
                put_be64(&mut table, j * w, if want { raw | COPIED } else { raw & !COPIED });
                changed = true;
            }
        }
        if !changed {
            let own = self.sh_get(f, &sw.shadow, l2 / cs).await? == 1;
            sw.l1[i] = l2 | if own { COPIED } else { 0 };
            return Ok(());
        }
        self.sh_add(f, &mut sw.shadow, l2 / cs, -1).await?;
        let at = (sw.base + sw.copied.len() as u64) * cs;
        self.write_meta(f, Area::ActiveL2, at, &SgList::owned(table), "L2 table write failed")
            .await?;
        sw.copied.push(i);
        Ok(())
    }

    /// Writes the rest of the new state past the copies and switches the
    /// header to it. Frees the old active L1 (unless `keep_l1`, when it
    /// became a snapshot's), the old snapshot table when it is replaced,
    /// and the old refcount structures. On an error nothing changed,
    /// except after a failed header write, when the on-disk state is
    /// unknown: then the metadata is marked stale and nothing more may be
    /// written through it.
    pub async fn commit_switch(&mut self, f: &Storage, mut sw: Switch, keep_l1: bool) -> Result<()> {
        let cs = self.cs();
        let sh = &mut sw.shadow;
        let h = self.hdr.clone();
        if !keep_l1 && h.l1_size > 0 {
            self.sh_add_range(f, sh, h.l1_table_offset, h.l1_size as u64 * 8, -1)
                .await?;
        }
        let table = sw.snapshots.as_ref().map(|s| snapshot::serialize_table(s));
        if let Some(t) = &table {
            if t.len() as u64 > snapshot::MAX_TABLE_BYTES {
                return Err(fmt_err(f.path(), "the snapshot table would exceed 64 MiB"));
            }
            if h.nb_snapshots > 0 && self.snapshots_table_len > 0 {
                self.sh_add_range(f, sh, h.snapshots_offset, self.snapshots_table_len, -1)
                    .await?;
            }
        }
        let copies = sw.copied.len() as u64;
        let l1_clusters = (sw.l1.len() as u64 * 8).div_ceil(cs);
        let st_clusters = table.as_ref().map_or(0, |t| (t.len() as u64).div_ceil(cs));
        // The area holds [copies][L1][snapshot table][blocks][refcount
        // table]; its own refcounts may need more blocks and a larger
        // table: grow until nothing changes.
        let old_table: Vec<u64> = self.rc_table.clone();
        let old_rt = h.refcount_table_offset / cs..h.refcount_table_offset / cs + h.refcount_table_clusters as u64;
        let (mut blocks, mut rt_clusters) = (0u64, h.refcount_table_clusters as u64);
        loop {
            let n = copies + l1_clusters + st_clusters + blocks + rt_clusters;
            for c in sw.base..sw.base + n {
                self.sh_set(f, sh, c, 1).await?;
            }
            for c in old_rt.clone() {
                self.sh_set(f, sh, c, 0).await?;
            }
            let replaced: Vec<u64> = sh
                .blocks
                .keys()
                .filter_map(|&i| old_table.get(i as usize).map(|e| e & !0x1ff))
                .filter(|&o| o != 0)
                .collect();
            for o in replaced {
                self.sh_set(f, sh, o / cs, 0).await?;
            }
            let last = sh.blocks.keys().next_back().copied().unwrap_or(0);
            let entries = (last + 1).max(old_table.len() as u64);
            let (nb, nt) = (sh.blocks.len() as u64, (entries * 8).div_ceil(cs).max(rt_clusters));
            if nt * cs > MAX_REFTABLE_BYTES {
                return Err(fmt_err(
                    f.path(),
                    "the refcount table would exceed 8 MiB; the image is too large for its cluster size",
                ));
            }
            if (nb, nt) == (blocks, rt_clusters) {
                break;
            }
            (blocks, rt_clusters) = (nb, nt);
        }
        // Place everything and write it.
        let align = f.mem_align().max(512);
        let l1_at = sw.base + copies;
        let st_at = l1_at + l1_clusters;
        let blocks_at = st_at + st_clusters;
        let rt_at = blocks_at + blocks;
        for (k, &i) in sw.copied.iter().enumerate() {
            sw.l1[i] = ((sw.base + k as u64) * cs) | COPIED;
        }
        let mut rt = old_table.clone();
        rt.resize((rt_clusters * cs / 8) as usize, 0);
        for (k, &idx) in sh.blocks.keys().enumerate() {
            rt[idx as usize] = (blocks_at + k as u64) * cs;
        }
        let mut l1buf = AlignedBuf::new((l1_clusters * cs) as usize, align);
        for (i, &e) in sw.l1.iter().enumerate() {
            put_be64(&mut l1buf, i, e);
        }
        if l1_clusters > 0 {
            self.write_meta(
                f,
                Area::ActiveL1,
                l1_at * cs,
                &SgList::owned(l1buf),
                "L1 table write failed",
            )
            .await?;
        }
        if let Some(t) = &table {
            if st_clusters > 0 {
                let mut b = AlignedBuf::new((st_clusters * cs) as usize, align);
                b[..t.len()].copy_from_slice(t);
                self.write_meta(
                    f,
                    Area::SnapshotTable,
                    st_at * cs,
                    &SgList::owned(b),
                    "snapshot table write failed",
                )
                .await?;
            }
        }
        for (k, b) in std::mem::take(&mut sh.blocks).into_values().enumerate() {
            let at = (blocks_at + k as u64) * cs;
            self.write_meta(
                f,
                Area::RefcountBlock,
                at,
                &SgList::owned(b),
                "refcount block write failed",
            )
            .await?;
        }
        let mut rtbuf = AlignedBuf::new((rt_clusters * cs) as usize, align);
        for (i, &e) in rt.iter().enumerate() {
            put_be64(&mut rtbuf, i, e);
        }
        self.write_meta(
            f,
            Area::RefcountTable,
            rt_at * cs,
            &SgList::owned(rtbuf),
            "refcount table write failed",
        )
        .await?;
        self.sync(f).await?;
        // The switch.
        let mut nh = h.clone();
        nh.l1_table_offset = if sw.l1.is_empty() { 0 } else { l1_at * cs };
        nh.l1_size = sw.l1.len() as u32;
        nh.refcount_table_offset = rt_at * cs;
        nh.refcount_table_clusters = rt_clusters as u32;
        nh.size = sw.size;
        if let Some(s) = &sw.snapshots {
            nh.nb_snapshots = s.len() as u32;
            nh.snapshots_offset = if s.is_empty() { 0 } else { st_at * cs };
        }
        self.hdr = nh;
        if let Err(e) = self.write_header(f).await {
            self.hdr = h;
            self.health.stale.store(true, std::sync::atomic::Ordering::Release);
            return Err(e);
        }
        self.end = rt_at + rt_clusters;
        // In memory, as on disk now. The caches held only clean entries;
        // some of them are free clusters now.
        let old_l1 = std::mem::replace(&mut self.l1, std::mem::take(&mut sw.l1));
        self.rc_table = rt;
        self.rc_table_dirty = false;
        self.reindex();
        self.l2.clear();
        self.rc.clear();
        if let (Some(s), Some(t)) = (sw.snapshots.take(), table) {
            // The overlap check's snapshot L2 tables: a new snapshot took
            // the old active L1 table as it was; deleted ones go.
            for gone in self.inactive_l2.snapshots() {
                if !s.iter().any(|sn| sn.l1_table_offset == gone) {
                    self.inactive_l2.remove(gone);
                }
            }
            for sn in &s {
                if !self.inactive_l2.contains(sn.l1_table_offset) && sn.l1_table_offset == h.l1_table_offset {
                    self.inactive_l2
                        .insert(sn.l1_table_offset, &old_l1, self.hdr.cluster_bits);
                }
            }
            self.snapshots_table_len = if s.is_empty() { 0 } else { t.len() as u64 };
            self.snapshots = s;
        }
        self.free_hint = sh.min_freed.unwrap_or(self.free_hint).min(self.free_hint);
        self.compressed_next = 0;
        Ok(())
    }
}
