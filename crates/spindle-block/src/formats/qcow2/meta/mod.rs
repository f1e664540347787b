//! qcow2 metadata: L1, cached L2 slices, refcounts and cluster allocation.
//!
//! All of it lives behind the image's async mutex. Every miss is an awaited
//! read on the runtime, never a blocking call. Write-back follows the order
//! that makes a crash leak-only: refcount blocks (then the refcount table)
//! are durable before any L2 slice that relies on them is written, and L2
//! tables before the L1 entries that point to them.

use super::cache::{get_be64, put_be64, TableCache};
use super::entry::Layout;
use super::header::Header;
use crate::error::{corrupt, doing, io_err, BlockError, Result};
use crate::fault::{self, Injector, Kind};
use crate::storage::Storage;
use spindle_io::trace::{QCOW2_ALLOC, QCOW2_FLUSH, QCOW2_L2_MISS};
use spindle_io::{AlignedBuf, SgList};
use std::sync::Arc;
use std::time::Instant;

pub mod overlap;
mod refcount;
mod tables;
pub mod txn;

pub use overlap::Area;

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

/// What the image and its metadata share about the image's health.
#[derive(Debug, Default)]
pub struct Health {
    /// A corruption was found while open (and marked): no more changes.
    pub corrupted: std::sync::atomic::AtomicBool,
    /// A header switch failed: which state the disk holds is unknown, so
    /// nothing more is written through this open image.
    pub stale: std::sync::atomic::AtomicBool,
}

/// Metadata state of an open image.
pub struct Meta {
    /// Header as last written.
    pub hdr: Header,
    /// Active L1 table (entries as on disk); changed only through
    /// `set_l1`/`replace_l1`, which keep the overlap index in step.
    l1: Vec<u64>,
    /// Clusters of active L2 tables and refcount blocks (overlap check).
    overlaps: overlap::Index,
    /// Clusters of snapshots' L2 tables (overlap check).
    pub inactive_l2: overlap::Inactive,
    /// Test-only fault injection.
    faults: Option<Arc<Injector>>,
    /// Shared with the image.
    health: Arc<Health>,
    /// Cache and allocator counters, shared with the image.
    pub(super) counters: Arc<super::counters::Counters>,
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
    /// The header in memory differs from the one on disk in a way that
    /// must reach the disk before the image changes (autoclear bits).
    pub header_pending: bool,
    /// Refcount table indexes whose block lay past the end of the file at
    /// open: corrupt, never read or written (`block_at`).
    outside_blocks: std::collections::BTreeSet<usize>,
    /// References dropped by metadata not yet durable: applied by `flush`
    /// once the L1 and L2 changes that dropped them are on disk.
    pending_decrefs: Vec<u64>,
}

impl Meta {
    /// Builds the state from tables read at open time.
    pub fn new(
        hdr: Header,
        l1: Vec<u64>,
        rc_table: Vec<u64>,
        file_len: u64,
        l2_cache: (usize, usize),
        faults: Option<Arc<Injector>>,
        (health, counters): (Arc<Health>, Arc<super::counters::Counters>),
    ) -> Meta {
        let cs = hdr.cluster_size() as usize;
        let rc_cap = ((1usize << 20) / cs).max(8);
        Meta {
            end: file_len.div_ceil(cs as u64),
            overlaps: overlap::Index::build(&l1, &rc_table, hdr.cluster_bits),
            outside_blocks: rc_table
                .iter()
                .enumerate()
                .filter(|(_, &e)| e & !0x1ff != 0 && (e & !0x1ff) / cs as u64 >= file_len.div_ceil(cs as u64))
                .map(|(i, _)| i)
                .collect(),
            inactive_l2: overlap::Inactive::default(),
            faults,
            health,
            counters,
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
            header_pending: false,
            pending_decrefs: Vec::new(),
        }
    }

    fn cs(&self) -> u64 {
        self.hdr.cluster_size()
    }

    /// How L2 entries are decoded.
    pub fn layout(&self) -> Layout {
        Layout {
            cluster_bits: self.hdr.cluster_bits,
            v3: self.hdr.version == 3,
            ext_l2: self.hdr.extended_l2(),
        }
    }

    /// The active L1 table.
    pub fn l1(&self) -> &[u64] {
        &self.l1
    }

    /// Sets active L1 entry `i` (in memory; `write_l1_entry` writes it).
    pub fn set_l1(&mut self, i: usize, v: u64) {
        let old = std::mem::replace(&mut self.l1[i], v);
        self.overlaps.set_l1(old, v, self.hdr.cluster_bits);
    }

    /// Replaces the active L1 table (in memory).
    pub fn replace_l1(&mut self, l1: Vec<u64>) {
        self.l1 = l1;
        self.reindex();
    }

    /// Rebuilds the overlap index from the L1 and refcount tables.
    pub(super) fn reindex(&mut self) {
        self.overlaps = overlap::Index::build(&self.l1, &self.rc_table, self.hdr.cluster_bits);
    }

    /// Refuses a write of `[off, off + len)` that would land on metadata
    /// other than `except`, as a corruption (the write is not issued).
    pub fn check_overlap(&self, f: &Storage, off: u64, len: u64, except: Option<Area>) -> Result<()> {
        match self.overlap(off, len, except) {
            None => Ok(()),
            Some(area) => Err(corrupt(
                f.path(),
                format!(
                    "a write of {len} bytes at host offset 0x{off:x} would overwrite the {} (metadata overlap); it was not issued",
                    area.name()
                ),
            )),
        }
    }

    /// The fault injector, if any (tests).
    pub fn faults(&self) -> Option<&Injector> {
        self.faults.as_deref()
    }

    /// Writes metadata of `area` at `off`, after the overlap check.
    pub(super) async fn write_meta(
        &self,
        f: &Storage,
        area: Area,
        off: u64,
        buf: &SgList,
        what: &'static str,
    ) -> Result<()> {
        self.check_overlap(f, off, buf.len() as u64, Some(area))?;
        let kind = match area {
            Area::MainHeader => Kind::Header,
            Area::ActiveL1 | Area::InactiveL1 => Kind::L1,
            Area::ActiveL2 | Area::InactiveL2 => Kind::L2,
            Area::RefcountTable => Kind::RefcountTable,
            Area::RefcountBlock => Kind::RefcountBlock,
            Area::SnapshotTable => Kind::SnapshotTable,
        };
        fault::check(self.faults(), kind).map_err(io_err(f.path(), what))?;
        f.write(off, buf, false).await.map_err(doing(what))
    }

    /// Makes everything written so far durable.
    pub async fn sync(&self, f: &Storage) -> Result<()> {
        fault::check(self.faults(), Kind::Flush).map_err(io_err(f.path(), "flush failed"))?;
        f.flush().await.map_err(doing("flush failed"))
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

    async fn read_buf(&self, f: &Storage, off: u64, len: usize) -> Result<AlignedBuf> {
        f.read_buf(off, len).await.map_err(doing("metadata read failed"))
    }

    fn check_table_offset(&self, f: &Storage, off: u64, what: &str) -> Result<()> {
        if !off.is_multiple_of(self.cs()) || off == 0 {
            return Err(corrupt(
                f.path(),
                format!("{what} offset 0x{off:x} is not cluster aligned"),
            ));
        }
        Ok(())
    }

    // ---------------------------------------------------------------- L2

    /// The L2 entry (and extended bitmap) of guest cluster `gc`.
    pub async fn get_l2(&mut self, f: &Storage, gc: u64) -> Result<(u64, u64)> {
        let l1i = (gc >> self.hdr.l2_bits()) as usize;
        let Some(&l1e) = self.l1.get(l1i) else {
            return Ok((0, 0));
        };
        self.get_l2_for(f, l1e, gc).await
    }

    /// The L2 entry of guest cluster `gc` under the L1 entry `l1e` (of any
    /// L1 table: the active one or a snapshot's).
    pub async fn get_l2_for(&mut self, f: &Storage, l1e: u64, gc: u64) -> Result<(u64, u64)> {
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

    async fn l2_slice(&mut self, f: &Storage, off: u64) -> Result<&mut super::cache::Entry> {
        let hit = self.l2.get(off).is_some();
        self.counters.l2(hit);
        if !hit {
            let t0 = spindle_io::trace_on!(QCOW2_L2_MISS).then(Instant::now);
            let mut evicted = None;
            if self.l2.full() {
                if let Some((victim, dirty)) = self.l2.victim() {
                    if dirty {
                        self.flush_refcounts(f).await?;
                        self.write_l2_slice(f, victim).await?;
                    }
                    self.l2.remove(victim);
                    evicted = Some((victim, dirty));
                }
            }
            let buf = self.read_buf(f, off, self.l2.piece_size()).await?;
            self.l2.insert(off, buf, false);
            if let Some(t0) = t0 {
                spindle_io::traced!(QCOW2_L2_MISS, image = %f.path().display(), slice_offset = off,
                    evicted = evicted.map_or(0, |e| e.0), written_back = evicted.is_some_and(|e| e.1),
                    us = t0.elapsed().as_micros() as u64, "L2 slice read");
            }
        }
        Ok(self.l2.get(off).expect("slice cached above"))
    }

    async fn write_l2_slice(&mut self, f: &Storage, off: u64) -> Result<()> {
        let Some(e) = self.l2.get(off) else { return Ok(()) };
        // Written from the cache's own buffer, lent for the write.
        let sg = SgList::owned(std::mem::replace(&mut e.buf, AlignedBuf::new(0, 1)));
        let r = self
            .write_meta(f, Area::ActiveL2, off, &sg, "L2 table write failed")
            .await;
        let e = self.l2.get(off).expect("slice still cached");
        e.buf = sg.into_buf().expect("a finished write holds no buffer");
        e.dirty &= r.is_err();
        r
    }

    /// Sets the L2 entry of guest cluster `gc`, allocating or un-sharing the
    /// L2 table first when needed.
    pub async fn set_l2(&mut self, f: &Storage, gc: u64, raw: u64, bmp: u64) -> Result<()> {
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
    pub async fn prepare_l2(&mut self, f: &Storage, gc: u64) -> Result<()> {
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
    async fn new_l2_table(&mut self, f: &Storage, l1i: usize, old: u64) -> Result<()> {
        let cs = self.cs() as usize;
        let mut table = AlignedBuf::new(cs, f.mem_align().max(512));
        if old != 0 {
            // Flush cached slices of the old table so the copy is current.
            self.flush_l2_range(f, old, old + cs as u64).await?;
            f.read_at(old, &mut table)
                .await
                .map_err(doing("L2 table read failed"))?;
        }
        let new = self.alloc_clusters(f, 1).await?;
        spindle_io::traced!(QCOW2_ALLOC, image = %f.path().display(), l1_index = l1i, host_offset = new,
            copied_from = old, "L2 table allocated");
        self.write_meta(f, Area::ActiveL2, new, &SgList::owned(table), "L2 table write failed")
            .await?;
        // Refcounts (and the table's contents) durable before L1 points at it.
        self.flush_refcounts(f).await?;
        self.sync(f).await?;
        let prev = self.l1[l1i];
        self.set_l1(l1i, new | COPIED);
        if let Err(e) = self.write_l1_entry(f, l1i).await {
            self.set_l1(l1i, prev);
            return Err(e);
        }
        if old != 0 {
            self.l2.invalidate_range(old, old + cs as u64);
            self.release_later(old / cs as u64);
        }
        Ok(())
    }

    async fn flush_l2_range(&mut self, f: &Storage, start: u64, end: u64) -> Result<()> {
        let dirty: Vec<u64> = self.l2.dirty().into_iter().filter(|&o| o >= start && o < end).collect();
        if !dirty.is_empty() {
            self.flush_refcounts(f).await?;
            for o in dirty {
                self.write_l2_slice(f, o).await?;
            }
        }
        Ok(())
    }

    /// Writes back everything in the safe order and makes it durable:
    /// refcount increments before the L2 tables that use them, then the
    /// L2 tables, then the decrements their changes allow (QEMU orders its
    /// caches the same way): a crash never leaves a refcount below the
    /// references on disk, only above (a leak).
    pub async fn flush(&mut self, f: &Storage) -> Result<()> {
        let traced = spindle_io::trace_on!(QCOW2_FLUSH).then(|| (Instant::now(), self.rc.dirty().len()));
        self.flush_refcounts(f).await?;
        let l2 = self.l2.dirty();
        let slices = l2.len();
        for o in l2 {
            self.write_l2_slice(f, o).await?;
        }
        self.sync(f).await?;
        let decrefs = self.pending_decrefs.len();
        if decrefs > 0 {
            self.apply_decrefs(f).await?;
            self.flush_refcounts(f).await?;
        }
        if let Some((t0, blocks)) = traced {
            spindle_io::traced!(QCOW2_FLUSH, image = %f.path().display(), refcount_blocks = blocks, l2_slices = slices,
                decrefs, us = t0.elapsed().as_micros() as u64, "metadata flushed");
        }
        Ok(())
    }
}
