//! Refcounts and cluster allocation.

use super::super::cache::{get_refcount, put_be64, set_refcount};
use super::super::header::MAX_REFTABLE_BYTES;
use super::{Area, Meta};
use crate::error::{corrupt, fmt_err, Result};
use crate::storage::Storage;
use futures::future::{try_join_all, LocalBoxFuture};
use futures::FutureExt;
use spindle_io::{AlignedBuf, SgList};

impl Meta {
    /// Refcount of host cluster `c` (0 beyond the table).
    pub async fn refcount(&mut self, f: &Storage, c: u64) -> Result<u64> {
        let bi = (c >> self.rb_bits()) as usize;
        let rb = self.block_at(f, bi)?;
        if rb == 0 {
            return Ok(0);
        }
        let order = self.hdr.refcount_order;
        let i = (c & ((1 << self.rb_bits()) - 1)) as usize;
        let e = self.rc_block(f, rb).await?;
        Ok(get_refcount(&e.buf, order, i))
    }

    /// The offset of refcount block `bi` (0 when it has none), refused as a
    /// corruption when it is not cluster aligned or lay past the end of the
    /// file when the image was opened: using it would read zeroes and then
    /// write a block far past the end.
    pub(super) fn block_at(&self, f: &Storage, bi: usize) -> Result<u64> {
        let rb = self.rc_table.get(bi).map_or(0, |e| e & !0x1ff);
        if rb == 0 {
            return Ok(0);
        }
        if !rb.is_multiple_of(self.cs()) {
            return Err(corrupt(
                f.path(),
                format!("refcount block offset 0x{rb:x} (refcount table index {bi}) is not cluster aligned"),
            ));
        }
        if self.outside_blocks.contains(&bi) {
            return Err(corrupt(
                f.path(),
                format!("refcount block offset 0x{rb:x} (refcount table index {bi}) lies outside the image file"),
            ));
        }
        Ok(rb)
    }

    /// Makes room in the refcount cache, writing the victim back if dirty.
    /// (Refcount blocks have no ordering dependency of their own.)
    pub(super) async fn evict_rc_if_full(&mut self, f: &Storage) -> Result<()> {
        if !self.rc.full() {
            return Ok(());
        }
        if let Some((victim, dirty)) = self.rc.victim() {
            if dirty {
                let e = self.rc.get(victim).expect("victim is cached");
                let sg = SgList::owned(std::mem::replace(&mut e.buf, AlignedBuf::new(0, 1)));
                let r = self
                    .write_meta(f, Area::RefcountBlock, victim, &sg, "refcount block write failed")
                    .await;
                self.rc.get(victim).expect("victim is cached").buf =
                    sg.into_buf().expect("a finished write holds no buffer");
                r?;
            }
            self.rc.remove(victim);
        }
        Ok(())
    }

    pub(super) async fn rc_block(&mut self, f: &Storage, off: u64) -> Result<&mut super::super::cache::Entry> {
        let hit = self.rc.get(off).is_some();
        self.counters.refcount(hit);
        if !hit {
            self.evict_rc_if_full(f).await?;
            let buf = self.read_buf(f, off, self.cs() as usize).await?;
            self.rc.insert(off, buf, false);
        }
        Ok(self.rc.get(off).expect("block cached above"))
    }

    /// A refcount that would pass the maximum of its width: not a
    /// corruption, the operation fails alone (QEMU's ERANGE).
    pub(super) fn overflow(&self, f: &Storage, c: u64) -> crate::error::BlockError {
        fmt_err(
            f.path(),
            format!(
                "the refcount of cluster {c} would exceed {}, the most refcount_bits={} holds (too many snapshots share it)",
                self.rc_max(),
                1u32 << self.hdr.refcount_order
            ),
        )
    }

    /// Adds `delta` to the refcount of host cluster `c`.
    pub fn update_refcount<'a>(&'a mut self, f: &'a Storage, c: u64, delta: i64) -> LocalBoxFuture<'a, Result<()>> {
        async move {
            let cur = self.refcount(f, c).await?;
            let new = cur as i128 + delta as i128;
            if new < 0 {
                return Err(fmt_err(
                    f.path(),
                    format!("refcount of cluster {c} would become {new}; the image's refcounts are corrupt (run check -r all)"),
                ));
            }
            if new > self.rc_max() as i128 {
                return Err(self.overflow(f, c));
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
    pub fn set_refcount<'a>(&'a mut self, f: &'a Storage, c: u64, v: u64) -> LocalBoxFuture<'a, Result<()>> {
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
                    .insert(x * cs, AlignedBuf::new(cs as usize, f.mem_align().max(512)), true);
                self.rc_table[bi] = x * cs;
                self.overlaps.set_block(0, x * cs, self.hdr.cluster_bits);
                self.rc_table_dirty = true;
                self.set_refcount(f, x, 1).await?;
            }
            let rb = self.block_at(f, bi)?;
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

    pub(super) async fn grow_refcount_table(&mut self, f: &Storage, min_entries: usize) -> Result<()> {
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
        self.sync(f).await?;
        let mut buf = AlignedBuf::new((clusters * cs) as usize, f.mem_align().max(512));
        for (i, &e) in self.rc_table.iter().enumerate() {
            put_be64(&mut buf, i, e);
        }
        self.write_meta(
            f,
            Area::RefcountTable,
            start * cs,
            &SgList::owned(buf),
            "refcount table write failed",
        )
        .await?;
        self.sync(f).await?;
        let (old_hdr_off, old_hdr_clusters) = (self.hdr.refcount_table_offset, self.hdr.refcount_table_clusters);
        self.hdr.refcount_table_offset = start * cs;
        self.hdr.refcount_table_clusters = clusters as u32;
        if let Err(e) = self.write_header(f).await {
            self.hdr.refcount_table_offset = old_hdr_off;
            self.hdr.refcount_table_clusters = old_hdr_clusters;
            return Err(e);
        }
        self.rc_table_dirty = false;
        for c in old_off / cs..old_off / cs + old_clusters {
            self.release_later(c);
        }
        Ok(())
    }

    pub(super) async fn write_dirty_refblocks(&mut self, f: &Storage) -> Result<()> {
        let dirty = self.rc.dirty();
        let mut writes = Vec::new();
        for &o in &dirty {
            let e = self.rc.get(o).expect("dirty block cached");
            writes.push((o, SgList::copy_of(&e.buf)));
        }
        let this = &*self;
        let jobs = writes.iter().map(|(o, copy)| async move {
            this.write_meta(f, Area::RefcountBlock, *o, copy, "refcount block write failed")
                .await
        });
        try_join_all(jobs).await?;
        // Clean only once written: a failed write-back is tried again.
        for (o, _) in &writes {
            if let Some(e) = self.rc.get(*o) {
                e.dirty = false;
            }
        }
        Ok(())
    }

    /// Writes back refcount blocks and table entries and makes them durable.
    pub async fn flush_refcounts(&mut self, f: &Storage) -> Result<()> {
        if !self.rc.any_dirty() && !self.rc_table_dirty {
            return Ok(());
        }
        self.write_dirty_refblocks(f).await?;
        self.sync(f).await?;
        if self.rc_table_dirty {
            let cs = self.cs() as usize;
            let mut buf = AlignedBuf::new(self.rc_table.len() * 8, f.mem_align().max(512));
            for (i, &e) in self.rc_table.iter().enumerate() {
                put_be64(&mut buf, i, e);
            }
            let _ = cs;
            let off = self.hdr.refcount_table_offset;
            self.write_meta(
                f,
                Area::RefcountTable,
                off,
                &SgList::owned(buf),
                "refcount table write failed",
            )
            .await?;
            self.sync(f).await?;
            self.rc_table_dirty = false;
        }
        Ok(())
    }

    /// Allocates `n` contiguous free clusters (refcount 1). Returns the host offset.
    pub async fn alloc_clusters(&mut self, f: &Storage, n: u64) -> Result<u64> {
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
        self.counters.allocated(n);
        Ok(start * self.cs())
    }

    /// Allocates `len` bytes for a compressed cluster, packing several into a
    /// host cluster as QEMU does. Returns the byte offset.
    pub async fn alloc_bytes(&mut self, f: &Storage, len: u64) -> Result<u64> {
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

    /// Drops one reference to the cluster(s) an L2 entry points to. An
    /// entry that does not decode (a corrupt offset) frees nothing, as
    /// QEMU does: freeing the cluster it happens to point into could free
    /// metadata.
    pub async fn release_entry(&mut self, f: &Storage, raw: u64) -> Result<()> {
        let cs = self.cs();
        let e = match self.layout().decode(raw, 0) {
            Ok(e) => e,
            Err(why) => {
                tracing::warn!("{}: not freeing a cluster: {why}", f.path().display());
                return Ok(());
            }
        };
        if let Some(raw) = e.compressed {
            let (off, len) = super::super::compressed_extent(raw, self.hdr.cluster_bits);
            for c in off / cs..=(off + len - 1) / cs {
                self.release_later(c);
            }
        } else if e.host != 0 {
            self.release_later(e.host / cs);
        }
        Ok(())
    }

    /// Drops one reference to cluster `c` once the metadata change that
    /// dropped it is durable (see `flush`).
    pub fn release_later(&mut self, c: u64) {
        self.pending_decrefs.push(c);
    }

    /// Applies the deferred decrements to the cached refcount blocks. One
    /// that would go below zero is a corruption of the refcounts: it is
    /// reported and skipped, the others still apply.
    pub(super) async fn apply_decrefs(&mut self, f: &Storage) -> Result<()> {
        // Guest writes reach here: one line per flush, however many fail.
        let (mut failed, mut first) = (0u64, None);
        for c in std::mem::take(&mut self.pending_decrefs) {
            if let Err(e) = self.update_refcount(f, c, -1).await {
                failed += 1;
                first.get_or_insert(e);
            }
        }
        if let Some(e) = first {
            tracing::warn!("{failed} refcount decrement(s) skipped, the first: {e}");
        }
        Ok(())
    }
}
