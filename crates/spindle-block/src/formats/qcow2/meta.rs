//! qcow2 metadata: L1, cached L2 slices, refcounts and cluster allocation.
//!
//! All of it lives behind the image's async mutex. Every miss is an awaited
//! read on the runtime, never a blocking call. Write-back follows the order
//! that makes a crash leak-only: refcount blocks (then the refcount table)
//! are durable before any L2 slice that relies on them is written, and L2
//! tables before the L1 entries that point to them.

use super::cache::{get_be64, get_refcount, put_be64, set_refcount, TableCache};
use super::header::{Header, MAX_REFTABLE_BYTES};
use crate::error::{fmt_err, io_err, BlockError, Result};
use futures::future::{try_join_all, LocalBoxFuture};
use futures::FutureExt;
use spindle_io::{AlignedBuf, File};
use std::sync::Arc;

/// Host offset bits of L1/L2 entries (bits 9..55).
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Refcount is exactly one: in-place writes allowed.
pub const COPIED: u64 = 1 << 63;
/// Compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;
/// Reads as zeroes (v3, standard L2 only).
pub const ZERO: u64 = 1;

/// A guest cluster range being allocated by a write in flight. Others that
/// touch it wait for `lock` before looking at the mapping again.
pub struct Inflight {
    /// First guest cluster.
    pub start: u64,
    /// One past the last guest cluster.
    pub end: u64,
    /// Held by the allocating write until its L2 entries are installed.
    pub lock: Arc<futures::lock::Mutex<()>>,
}

/// Metadata state of an open image.
pub struct Meta {
    /// Header as last written.
    pub hdr: Header,
    /// Active L1 table (entries as on disk).
    pub l1: Vec<u64>,
    l2: TableCache,
    rc_table: Vec<u64>,
    rc_table_dirty: bool,
    rc: TableCache,
    free_hint: u64,
    /// One past the highest cluster in use (or the file end).
    end: u64,
    compressed_next: u64,
    /// Allocating writes in flight.
    pub inflight: Vec<Inflight>,
    /// Internal snapshots, as in the snapshot table.
    pub snapshots: Vec<super::snapshot::Snapshot>,
    /// Bytes of the snapshot table on disk.
    pub snapshots_table_len: u64,
}

impl Meta {
    /// Builds the state from tables read at open time.
    pub fn new(hdr: Header, l1: Vec<u64>, rc_table: Vec<u64>, file_len: u64, l2_cache: (usize, usize)) -> Meta {
        let cs = hdr.cluster_size() as usize;
        let rc_cap = ((1usize << 20) / cs).max(8);
        Meta {
            end: file_len.div_ceil(cs as u64),
            hdr,
            l1,
            l2: TableCache::new(l2_cache.0, l2_cache.1),
            rc_table,
            rc_table_dirty: false,
            rc: TableCache::new(cs, rc_cap),
            free_hint: 0,
            compressed_next: 0,
            inflight: Vec::new(),
            snapshots: Vec::new(),
            snapshots_table_len: 0,
        }
    }

    fn cs(&self) -> u64 {
        self.hdr.cluster_size()
    }
    fn entry_words(&self) -> usize {
        if self.hdr.extended_l2() {
            2
        } else {
            1
        }
    }
    fn rb_bits(&self) -> u32 {
        self.hdr.cluster_bits + 3 - self.hdr.refcount_order
    }
    fn rc_max(&self) -> u64 {
        if self.hdr.refcount_order == 6 {
            u64::MAX
        } else {
            (1u64 << (1 << self.hdr.refcount_order)) - 1
        }
    }
    /// One past the last cluster in use.
    pub fn end_cluster(&self) -> u64 {
        self.end
    }
    /// log2 of the clusters one refcount block covers.
    pub fn refcount_block_bits(&self) -> u32 {
        self.rb_bits()
    }

    /// The refcount table (for check).
    pub fn refcount_table(&self) -> &[u64] {
        &self.rc_table
    }

    async fn read_buf(&self, f: &File, off: u64, len: usize) -> Result<AlignedBuf> {
        let mut b = AlignedBuf::new(len, f.alignment().mem.max(512));
        f.read_at(off, &mut b)
            .await
            .map_err(io_err(f.path(), "metadata read failed"))?;
        Ok(b)
    }

    fn check_table_offset(&self, f: &File, off: u64, what: &str) -> Result<()> {
        if !off.is_multiple_of(self.cs()) || off == 0 {
            return Err(fmt_err(
                f.path(),
                format!("{what} offset 0x{off:x} is not cluster aligned; the image is corrupt"),
            ));
        }
        Ok(())
    }

    // ---------------------------------------------------------------- L2

    /// The L2 entry (and extended bitmap) of guest cluster `gc`.
    pub async fn get_l2(&mut self, f: &File, gc: u64) -> Result<(u64, u64)> {
        let l1i = (gc >> self.hdr.l2_bits()) as usize;
        let Some(&l1e) = self.l1.get(l1i) else {
            return Ok((0, 0));
        };
        self.get_l2_for(f, l1e, gc).await
    }

    /// The L2 entry of guest cluster `gc` under the L1 entry `l1e` (of any
    /// L1 table: the active one or a snapshot's).
    pub async fn get_l2_for(&mut self, f: &File, l1e: u64, gc: u64) -> Result<(u64, u64)> {
        let l2_bits = self.hdr.l2_bits();
        let l2_off = l1e & OFFSET_MASK;
        if l2_off == 0 {
            return Ok((0, 0));
        }
        self.check_table_offset(f, l2_off, "L2 table")?;
        let l2i = (gc & ((1 << l2_bits) - 1)) as usize;
        let (slice_off, idx) = self.slice_pos(l2_off, l2i);
        let w = self.entry_words();
        let e = self.l2_slice(f, slice_off).await?;
        let raw = get_be64(&e.buf, idx * w);
        let bmp = if w == 2 { get_be64(&e.buf, idx * 2 + 1) } else { 0 };
        Ok((raw, bmp))
    }

    fn slice_pos(&self, l2_off: u64, l2i: usize) -> (u64, usize) {
        let per = self.l2.piece_size() / (8 * self.entry_words());
        (l2_off + (l2i / per * self.l2.piece_size()) as u64, l2i % per)
    }

    async fn l2_slice(&mut self, f: &File, off: u64) -> Result<&mut super::cache::Entry> {
        if self.l2.get(off).is_none() {
            if self.l2.full() {
                if let Some((victim, dirty)) = self.l2.victim() {
                    if dirty {
                        self.flush_refcounts(f).await?;
                        self.write_l2_slice(f, victim).await?;
                    }
                    self.l2.remove(victim);
                }
            }
            let buf = self.read_buf(f, off, self.l2.piece_size()).await?;
            self.l2.insert(off, buf, false);
        }
        Ok(self.l2.get(off).expect("slice cached above"))
    }

    async fn write_l2_slice(&mut self, f: &File, off: u64) -> Result<()> {
        if let Some(e) = self.l2.get(off) {
            f.write_at(off, &e.buf, false)
                .await
                .map_err(io_err(f.path(), "L2 table write failed"))?;
            e.dirty = false;
        }
        Ok(())
    }

    /// Sets the L2 entry of guest cluster `gc`, allocating or un-sharing the
    /// L2 table first when needed.
    pub async fn set_l2(&mut self, f: &File, gc: u64, raw: u64, bmp: u64) -> Result<()> {
        let l2_bits = self.hdr.l2_bits();
        let l1i = (gc >> l2_bits) as usize;
        self.prepare_l2(f, gc).await?;
        let l2_off = self.l1[l1i] & OFFSET_MASK;
        let (slice_off, idx) = self.slice_pos(l2_off, (gc & ((1 << l2_bits) - 1)) as usize);
        let w = self.entry_words();
        let e = self.l2_slice(f, slice_off).await?;
        put_be64(&mut e.buf, idx * w, raw);
        if w == 2 {
            put_be64(&mut e.buf, idx * 2 + 1, bmp);
        }
        e.dirty = true;
        Ok(())
    }

    /// Makes sure guest cluster `gc` has an L2 table the active L1 owns
    /// (allocating one, or un-sharing one from a snapshot).
    pub async fn prepare_l2(&mut self, f: &File, gc: u64) -> Result<()> {
        let l1i = (gc >> self.hdr.l2_bits()) as usize;
        let Some(&l1e) = self.l1.get(l1i) else {
            return Err(BlockError::Invalid(format!(
                "{}: guest cluster {gc} is beyond the L1 table",
                f.path().display()
            )));
        };
        if l1e & COPIED == 0 {
            self.new_l2_table(f, l1i, l1e & OFFSET_MASK).await?;
        }
        Ok(())
    }

    /// Allocates a new L2 table for L1 index `l1i`, copying `old` (a table
    /// shared with a snapshot) or zero-filled.
    async fn new_l2_table(&mut self, f: &File, l1i: usize, old: u64) -> Result<()> {
        let cs = self.cs() as usize;
        let mut table = AlignedBuf::new(cs, f.alignment().mem.max(512));
        if old != 0 {
            // Flush cached slices of the old table so the copy is current.
            self.flush_l2_range(f, old, old + cs as u64).await?;
            f.read_at(old, &mut table)
                .await
                .map_err(io_err(f.path(), "L2 table read failed"))?;
        }
        let new = self.alloc_clusters(f, 1).await?;
        f.write_at(new, &table, false)
            .await
            .map_err(io_err(f.path(), "L2 table write failed"))?;
        // Refcounts (and the table's contents) durable before L1 points at it.
        self.flush_refcounts(f).await?;
        f.flush().await.map_err(io_err(f.path(), "flush failed"))?;
        self.l1[l1i] = new | COPIED;
        self.write_l1_entry(f, l1i).await?;
        if old != 0 {
            self.l2.invalidate_range(old, old + cs as u64);
            self.update_refcount(f, old / cs as u64, -1).await?;
        }
        Ok(())
    }

    async fn flush_l2_range(&mut self, f: &File, start: u64, end: u64) -> Result<()> {
        let dirty: Vec<u64> = self.l2.dirty().into_iter().filter(|&o| o >= start && o < end).collect();
        if !dirty.is_empty() {
            self.flush_refcounts(f).await?;
            for o in dirty {
                self.write_l2_slice(f, o).await?;
            }
        }
        Ok(())
    }

    /// Writes L1 entry `i` to disk.
    pub async fn write_l1_entry(&mut self, f: &File, i: usize) -> Result<()> {
        let off = self.hdr.l1_table_offset + i as u64 * 8;
        f.write_at(off, &self.l1[i].to_be_bytes(), false)
            .await
            .map_err(io_err(f.path(), "L1 table write failed"))
    }

    // ---------------------------------------------------------- refcounts

    /// Refcount of host cluster `c` (0 beyond the table).
    pub async fn refcount(&mut self, f: &File, c: u64) -> Result<u64> {
        let bi = (c >> self.rb_bits()) as usize;
        let Some(&rb) = self.rc_table.get(bi) else {
            return Ok(0);
        };
        let rb = rb & !0x1ff;
        if rb == 0 {
            return Ok(0);
        }
        self.check_table_offset(f, rb, "refcount block")?;
        let order = self.hdr.refcount_order;
        let i = (c & ((1 << self.rb_bits()) - 1)) as usize;
        let e = self.rc_block(f, rb).await?;
        Ok(get_refcount(&e.buf, order, i))
    }

    /// Makes room in the refcount cache, writing the victim back if dirty.
    /// (Refcount blocks have no ordering dependency of their own.)
    async fn evict_rc_if_full(&mut self, f: &File) -> Result<()> {
        if !self.rc.full() {
            return Ok(());
        }
        if let Some((victim, dirty)) = self.rc.victim() {
            if dirty {
                let e = self.rc.get(victim).expect("victim is cached");
                f.write_at(victim, &e.buf, false)
                    .await
                    .map_err(io_err(f.path(), "refcount block write failed"))?;
            }
            self.rc.remove(victim);
        }
        Ok(())
    }

    async fn rc_block(&mut self, f: &File, off: u64) -> Result<&mut super::cache::Entry> {
        if self.rc.get(off).is_none() {
            self.evict_rc_if_full(f).await?;
            let buf = self.read_buf(f, off, self.cs() as usize).await?;
            self.rc.insert(off, buf, false);
        }
        Ok(self.rc.get(off).expect("block cached above"))
    }

    /// Adds `delta` to the refcount of host cluster `c`.
    pub fn update_refcount<'a>(&'a mut self, f: &'a File, c: u64, delta: i64) -> LocalBoxFuture<'a, Result<()>> {
        async move {
            let cur = self.refcount(f, c).await?;
            let new = cur as i128 + delta as i128;
            if new < 0 || new > self.rc_max() as i128 {
                return Err(fmt_err(
                    f.path(),
                    format!("refcount of cluster {c} would become {new}; the image's refcounts are corrupt (run check -r all)"),
                ));
            }
            self.set_refcount(f, c, new as u64).await?;
            if new == 0 {
                self.free_hint = self.free_hint.min(c);
                let cs = self.cs();
                self.l2.invalidate_range(c * cs, (c + 1) * cs);
            }
            Ok(())
        }
        .boxed_local()
    }

    /// Sets the refcount of host cluster `c`, creating refcount blocks and
    /// growing the refcount table as needed.
    pub fn set_refcount<'a>(&'a mut self, f: &'a File, c: u64, v: u64) -> LocalBoxFuture<'a, Result<()>> {
        async move {
            let bi = (c >> self.rb_bits()) as usize;
            if bi >= self.rc_table.len() {
                self.grow_refcount_table(f, bi + 1).await?;
            }
            if self.rc_table[bi] & !0x1ff == 0 {
                // A new refcount block, appended. If it covers itself it
                // records its own refcount; otherwise that is a nested update.
                let x = self.end;
                self.end += 1;
                let cs = self.cs();
                self.evict_rc_if_full(f).await?;
                self.rc
                    .insert(x * cs, AlignedBuf::new(cs as usize, f.alignment().mem.max(512)), true);
                self.rc_table[bi] = x * cs;
                self.rc_table_dirty = true;
                self.set_refcount(f, x, 1).await?;
            }
            let rb = self.rc_table[bi] & !0x1ff;
            let order = self.hdr.refcount_order;
            let i = (c & ((1 << self.rb_bits()) - 1)) as usize;
            let e = self.rc_block(f, rb).await?;
            set_refcount(&mut e.buf, order, i, v);
            e.dirty = true;
            if v > 0 {
                self.end = self.end.max(c + 1);
            }
            Ok(())
        }
        .boxed_local()
    }

    async fn grow_refcount_table(&mut self, f: &File, min_entries: usize) -> Result<()> {
        let cs = self.cs();
        let per_cluster = (cs / 8) as usize;
        let want = min_entries.max(self.rc_table.len() * 3 / 2) + per_cluster;
        let clusters = want.div_ceil(per_cluster) as u64;
        if clusters * cs > MAX_REFTABLE_BYTES {
            return Err(fmt_err(
                f.path(),
                "the refcount table would exceed 8 MiB; the image is too large for its cluster size",
            ));
        }
        let old_off = self.hdr.refcount_table_offset;
        let old_clusters = self.hdr.refcount_table_clusters as u64;
        let start = self.end;
        self.end += clusters;
        self.rc_table.resize((clusters * cs / 8) as usize, 0);
        for c in start..start + clusters {
            self.set_refcount(f, c, 1).await?;
        }
        // New blocks durable, then the new table, then the header switch.
        self.write_dirty_refblocks(f).await?;
        f.flush().await.map_err(io_err(f.path(), "flush failed"))?;
        let mut buf = AlignedBuf::new((clusters * cs) as usize, f.alignment().mem.max(512));
        for (i, &e) in self.rc_table.iter().enumerate() {
            put_be64(&mut buf, i, e);
        }
        f.write_at(start * cs, &buf, false)
            .await
            .map_err(io_err(f.path(), "refcount table write failed"))?;
        f.flush().await.map_err(io_err(f.path(), "flush failed"))?;
        self.hdr.refcount_table_offset = start * cs;
        self.hdr.refcount_table_clusters = clusters as u32;
        self.write_header(f).await?;
        self.rc_table_dirty = false;
        for c in old_off / cs..old_off / cs + old_clusters {
            self.update_refcount(f, c, -1).await?;
        }
        Ok(())
    }

    /// Writes the header cluster and makes it durable.
    pub async fn write_header(&mut self, f: &File) -> Result<()> {
        let b = self.hdr.serialize().map_err(|m| fmt_err(f.path(), m))?;
        let mut a = AlignedBuf::new(b.len(), f.alignment().mem.max(512));
        a.copy_from_slice(&b);
        f.write_at(0, &a, false)
            .await
            .map_err(io_err(f.path(), "header write failed"))?;
        f.flush().await.map_err(io_err(f.path(), "flush failed"))
    }

    async fn write_dirty_refblocks(&mut self, f: &File) -> Result<()> {
        let dirty = self.rc.dirty();
        let mut writes = Vec::new();
        for &o in &dirty {
            let e = self.rc.get(o).expect("dirty block cached");
            let copy = {
                let mut b = AlignedBuf::new(e.buf.len(), f.alignment().mem.max(512));
                b.copy_from_slice(&e.buf);
                b
            };
            e.dirty = false;
            writes.push(async move {
                f.write_at(o, &copy, false)
                    .await
                    .map_err(io_err(f.path(), "refcount block write failed"))
            });
        }
        try_join_all(writes).await?;
        Ok(())
    }

    /// Writes back refcount blocks and table entries and makes them durable.
    pub async fn flush_refcounts(&mut self, f: &File) -> Result<()> {
        if !self.rc.any_dirty() && !self.rc_table_dirty {
            return Ok(());
        }
        self.write_dirty_refblocks(f).await?;
        f.flush().await.map_err(io_err(f.path(), "flush failed"))?;
        if self.rc_table_dirty {
            let cs = self.cs() as usize;
            let mut buf = AlignedBuf::new(self.rc_table.len() * 8, f.alignment().mem.max(512));
            for (i, &e) in self.rc_table.iter().enumerate() {
                put_be64(&mut buf, i, e);
            }
            let _ = cs;
            f.write_at(self.hdr.refcount_table_offset, &buf, false)
                .await
                .map_err(io_err(f.path(), "refcount table write failed"))?;
            f.flush().await.map_err(io_err(f.path(), "flush failed"))?;
            self.rc_table_dirty = false;
        }
        Ok(())
    }

    /// Writes back everything in the safe order and makes it durable.
    pub async fn flush(&mut self, f: &File) -> Result<()> {
        self.flush_refcounts(f).await?;
        for o in self.l2.dirty() {
            self.write_l2_slice(f, o).await?;
        }
        f.flush().await.map_err(io_err(f.path(), "flush failed"))
    }

    // ---------------------------------------------------------- snapshots

    /// Adds `addend` to the refcount of every L2 table and data cluster that
    /// `l1` reaches, and recomputes COPIED flags (set exactly where the
    /// refcount is 1) in those L2 tables and in `l1`. With `addend` 0 it only
    /// recomputes the flags. This is how QEMU counts snapshots: a cluster's
    /// refcount is the number of L1 tables that reach it.
    pub async fn update_snapshot_refcount(&mut self, f: &File, l1: &mut [u64], addend: i64) -> Result<()> {
        let cs = self.cs();
        let w = self.entry_words();
        let per_slice = self.l2.piece_size() / (8 * w);
        let slices = (1usize << self.hdr.l2_bits()) / per_slice;
        for e in l1.iter_mut() {
            let l2_off = *e & OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            self.check_table_offset(f, l2_off, "L2 table")?;
            for s in 0..slices {
                let slice_off = l2_off + (s * self.l2.piece_size()) as u64;
                for j in 0..per_slice {
                    let raw = get_be64(&self.l2_slice(f, slice_off).await?.buf, j * w);
                    let new = if raw & COMPRESSED != 0 {
                        if addend != 0 {
                            let (off, len) = super::compressed_extent(raw, self.hdr.cluster_bits);
                            for c in off / cs..=(off + len - 1) / cs {
                                self.update_refcount(f, c, addend).await?;
                            }
                        }
                        raw
                    } else if raw & OFFSET_MASK != 0 {
                        let c = (raw & OFFSET_MASK) / cs;
                        if addend != 0 {
                            self.update_refcount(f, c, addend).await?;
                        }
                        if self.refcount(f, c).await? == 1 {
                            raw | COPIED
                        } else {
                            raw & !COPIED
                        }
                    } else {
                        raw
                    };
                    if new != raw {
                        let e = self.l2_slice(f, slice_off).await?;
                        put_be64(&mut e.buf, j * w, new);
                        e.dirty = true;
                    }
                }
            }
            if addend != 0 {
                self.update_refcount(f, l2_off / cs, addend).await?;
            }
            *e = if self.refcount(f, l2_off / cs).await? == 1 {
                *e | COPIED
            } else {
                *e & !COPIED
            };
        }
        Ok(())
    }

    /// Reads an L1 table (a snapshot's) from disk.
    pub async fn read_l1(&self, f: &File, off: u64, entries: u32) -> Result<Vec<u64>> {
        let cs = self.cs() as usize;
        let bytes = (entries as usize * 8).div_ceil(cs).max(1) * cs;
        let buf = self.read_buf(f, off, bytes).await?;
        Ok((0..entries as usize).map(|i| get_be64(&buf, i)).collect())
    }

    /// Writes the whole active L1 table.
    pub async fn write_l1(&mut self, f: &File) -> Result<()> {
        let cs = self.cs() as usize;
        let bytes = (self.l1.len() * 8).div_ceil(cs).max(1) * cs;
        let mut buf = AlignedBuf::new(bytes, f.alignment().mem.max(512));
        for (i, &e) in self.l1.iter().enumerate() {
            put_be64(&mut buf, i, e);
        }
        f.write_at(self.hdr.l1_table_offset, &buf[..self.l1.len() * 8], false)
            .await
            .map_err(io_err(f.path(), "L1 table write failed"))
    }

    /// Writes `bytes` to newly allocated clusters and returns their offset.
    pub async fn write_new_clusters(&mut self, f: &File, bytes: &[u8]) -> Result<u64> {
        let cs = self.cs();
        let n = (bytes.len() as u64).div_ceil(cs).max(1);
        let off = self.alloc_clusters(f, n).await?;
        let mut buf = AlignedBuf::new((n * cs) as usize, f.alignment().mem.max(512));
        buf[..bytes.len()].copy_from_slice(bytes);
        f.write_at(off, &buf, false)
            .await
            .map_err(io_err(f.path(), "metadata write failed"))?;
        Ok(off)
    }

    /// Drops one reference to each of the `bytes.div_ceil(cs)` clusters at `off`.
    pub async fn free_clusters(&mut self, f: &File, off: u64, bytes: u64) -> Result<()> {
        let cs = self.cs();
        for c in off / cs..(off + bytes).div_ceil(cs) {
            self.update_refcount(f, c, -1).await?;
        }
        Ok(())
    }

    // ---------------------------------------------------------- allocation

    /// Allocates `n` contiguous free clusters (refcount 1). Returns the host offset.
    pub async fn alloc_clusters(&mut self, f: &File, n: u64) -> Result<u64> {
        // First run of n clusters with refcount 0; clusters past the end are free.
        let mut start = self.free_hint;
        let mut c = start;
        // The first free cluster the scan passes that the run does not take.
        let mut first_free: Option<u64> = None;
        while c < start + n && c < self.end {
            if self.refcount(f, c).await? != 0 {
                if first_free.is_none() && c > start {
                    first_free = Some(start); // a free stretch too short for n
                }
                start = c + 1;
            }
            c += 1;
        }
        // Everything before the hint is in use: the next search starts at the
        // first hole left behind, or right after this run.
        self.free_hint = first_free.unwrap_or(start + n);
        self.end = self.end.max(start + n);
        for c in start..start + n {
            self.set_refcount(f, c, 1).await?;
        }
        Ok(start * self.cs())
    }

    /// Allocates `len` bytes for a compressed cluster, packing several into a
    /// host cluster as QEMU does. Returns the byte offset.
    pub async fn alloc_bytes(&mut self, f: &File, len: u64) -> Result<u64> {
        let cs = self.cs();
        let next = self.compressed_next;
        if next != 0 && !next.is_multiple_of(cs) && next % cs + len <= cs {
            self.update_refcount(f, next / cs, 1).await?;
            self.compressed_next = next + len;
            return Ok(next);
        }
        let start = self.alloc_clusters(f, len.div_ceil(cs)).await?;
        self.compressed_next = start + len;
        Ok(start)
    }

    /// Drops one reference to the cluster(s) an L2 entry points to.
    pub async fn release_entry(&mut self, f: &File, raw: u64) -> Result<()> {
        let cs = self.cs();
        if raw & COMPRESSED != 0 {
            let (off, len) = super::compressed_extent(raw, self.hdr.cluster_bits);
            for c in off / cs..=(off + len - 1) / cs {
                self.update_refcount(f, c, -1).await?;
            }
        } else if raw & OFFSET_MASK != 0 {
            self.update_refcount(f, (raw & OFFSET_MASK) / cs, -1).await?;
        }
        Ok(())
    }

    /// Replaces the L1 table with one of `entries` entries (resize).
    pub async fn resize_l1(&mut self, f: &File, entries: usize) -> Result<()> {
        let cs = self.cs();
        if entries as u64 * 8 > super::header::MAX_L1_BYTES {
            return Err(fmt_err(
                f.path(),
                "the L1 table would exceed 32 MiB; use a larger cluster size",
            ));
        }
        self.flush(f).await?;
        let old_off = self.hdr.l1_table_offset;
        let old_clusters = (self.l1.len() as u64 * 8).div_ceil(cs);
        let clusters = (entries as u64 * 8).div_ceil(cs).max(1);
        let new_off = self.alloc_clusters(f, clusters).await?;
        self.l1.resize(entries, 0);
        let mut buf = AlignedBuf::new((clusters * cs) as usize, f.alignment().mem.max(512));
        for (i, &e) in self.l1.iter().enumerate() {
            put_be64(&mut buf, i, e);
        }
        f.write_at(new_off, &buf, false)
            .await
            .map_err(io_err(f.path(), "L1 table write failed"))?;
        self.flush_refcounts(f).await?;
        f.flush().await.map_err(io_err(f.path(), "flush failed"))?;
        self.hdr.l1_table_offset = new_off;
        self.hdr.l1_size = entries as u32;
        self.write_header(f).await?;
        if old_off != 0 && old_clusters > 0 {
            for c in old_off / cs..old_off / cs + old_clusters {
                self.update_refcount(f, c, -1).await?;
            }
        }
        Ok(())
    }
}
