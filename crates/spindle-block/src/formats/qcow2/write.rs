//! The qcow2 write path: in-place and allocating writes, zeroes and
//! discard, resize, compressed clusters, flush and close.

use super::header::{Header, INCOMPAT_DIRTY};
use super::meta::{Inflight, Meta, COMPRESSED, COPIED, OFFSET_MASK, ZERO};
use super::{check, compress, fmt_err, Qcow2};
use crate::error::{doing, io_err, Result};
use crate::fault;
use futures::future::try_join_all;
use futures::lock::Mutex;
use futures::FutureExt;
use spindle_io::AlignedBuf;
use spindle_io::SgList;
use std::sync::atomic::Ordering;
use std::sync::Arc;

impl Qcow2 {
    /// Writes guest data.
    pub(crate) async fn write(&self, off: u64, buf: &SgList, fua: bool) -> Result<()> {
        self.write_if(off, buf, fua, false).await.map(|_| ())
    }

    /// Writes `buf` at `off` only if every cluster it touches is
    /// unallocated in this image (no data, no zero flag): copy-on-read for
    /// a stream job (docs/jobs.md). The check and the allocation happen
    /// under the metadata lock and the write's in-flight range, which a
    /// guest write of the same clusters waits for, so a guest write that
    /// landed first is never overwritten and one that comes later wins.
    /// Returns whether it wrote.
    pub async fn write_unallocated(&self, off: u64, buf: &SgList) -> Result<bool> {
        let r = self.write_if(off, buf, false, true).await;
        self.guard(r).await
    }

    async fn write_if(&self, off: u64, buf: &SgList, fua: bool, only_unallocated: bool) -> Result<bool> {
        self.check_writable()?;
        self.repair_if_dirty().await?;
        let cs = 1u64 << self.cluster_bits;
        let len = buf.len() as u64;
        let (first, last) = (off >> self.cluster_bits, (off + len - 1) >> self.cluster_bits);
        let mut m = self.lock_meta_clear_of(first, last + 1).await;
        self.mark_dirty(&mut m).await?;
        // Classify clusters: in place, or needing a new cluster.
        let mut in_place: Vec<(u64, u64, u64)> = Vec::new(); // (guest pos, host, len)
        let mut allocs: Vec<(u64, u64)> = Vec::new(); // (guest cluster, old raw entry)
        for gc in first..=last {
            let (raw, bmp) = m.get_l2(&self.storage, gc).await?;
            if only_unallocated && (raw != 0 || bmp != 0) {
                return Ok(false);
            }
            let pos = (gc * cs).max(off);
            let e = self.entry_at(gc * cs, raw, bmp)?;
            let normal = e.copied && e.compressed.is_none() && e.host != 0;
            // Standard L2 entries have one subcluster: bit 0.
            let end = ((gc + 1) * cs).min(off + len);
            let (s0, s1) = (
                ((pos & (cs - 1)) >> self.sub_bits),
                (((end - 1) & (cs - 1)) >> self.sub_bits),
            );
            let mask = (((1u64 << (s1 + 1)) - 1) & !((1u64 << s0) - 1)) as u32;
            if normal && e.alloc & mask == mask {
                let host = e.host + (pos & (cs - 1));
                let n = end - pos;
                match in_place.last_mut() {
                    // Contiguous in guest and host: one write.
                    Some((p, h, l)) if *p + *l == pos && *h + *l == host => *l += n,
                    _ => in_place.push((pos, host, n)),
                }
            } else {
                allocs.push((gc, raw));
            }
        }
        for &(_, host, n) in &in_place {
            m.check_overlap(&self.storage, host, n, None)?;
        }
        if allocs.is_empty() {
            drop(m);
            let writes = in_place.iter().map(|&(pos, host, n)| {
                let part = buf.slice((pos - off) as usize, n as usize);
                async move { self.write_host(host, &part, fua).await }
            });
            try_join_all(writes).await?;
            return Ok(true);
        }
        // L2 tables first (as QEMU does), so data runs stay contiguous; then
        // one contiguous run for the new clusters.
        for &(gc, _) in &allocs {
            m.prepare_l2(&self.storage, gc).await?;
        }
        let base = m.alloc_clusters(&self.storage, allocs.len() as u64).await?;
        // Newly allocated clusters that hold metadata: the refcounts are
        // corrupt. Nothing is written and nothing is given back.
        m.check_overlap(&self.storage, base, allocs.len() as u64 * cs, None)?;
        spindle_io::traced!(spindle_io::trace::QCOW2_ALLOC, image = %self.path().display(),
            guest_offset = allocs[0].0 * cs, clusters = allocs.len(), host_offset = base,
            cow = allocs.iter().filter(|a| a.1 != 0).count(), "data clusters allocated");
        let lock = Arc::new(Mutex::new(()));
        let guard = lock.clone().lock_owned().await;
        m.inflight.push(Inflight {
            start: first,
            end: last + 1,
            lock,
        });
        drop(m);
        let result = self.write_allocating(off, buf, fua, &in_place, &allocs, base).await;
        let mut m = self.lock_meta().await;
        let installed = match result {
            Ok(()) => self.install(&mut m, &allocs, base).await,
            Err(e) => Err(e),
        };
        if installed.is_err() {
            // Give the clusters back; the write failed before the mapping changed.
            for i in 0..allocs.len() as u64 {
                let _ = m.update_refcount(&self.storage, base / cs + i, -1).await;
            }
        }
        m.inflight.retain(|i| i.start != first || i.end != last + 1);
        drop(guard);
        installed?;
        if fua || self.storage.write_through() {
            m.flush(&self.storage).await?;
        }
        Ok(true)
    }

    /// Locks the metadata once no allocating write is in flight on guest
    /// clusters `[first, end)`.
    pub(super) async fn lock_meta_clear_of(&self, first: u64, end: u64) -> futures::lock::MutexGuard<'_, Meta> {
        loop {
            let m = self.lock_meta().await;
            let waiting = m
                .inflight
                .iter()
                .find(|i| i.start < end && first < i.end)
                .map(|i| i.lock.clone());
            let Some(lock) = waiting else { return m };
            drop(m);
            drop(lock.lock().await);
        }
    }

    pub(super) async fn write_host(&self, host: u64, part: &SgList, fua: bool) -> Result<()> {
        fault::check(self.faults.as_deref(), fault::Kind::Data).map_err(io_err(self.path(), "write failed"))?;
        self.storage.write(host, part, fua).await.map_err(doing("write failed"))
    }

    /// Data phase of an allocating write: new clusters get the request's bytes
    /// plus copy-on-write of what the request does not cover. New clusters
    /// are contiguous on the host, so each run of consecutive guest clusters
    /// is one vectored write.
    pub(super) async fn write_allocating(
        &self,
        off: u64,
        buf: &SgList,
        fua: bool,
        in_place: &[(u64, u64, u64)],
        allocs: &[(u64, u64)],
        base: u64,
    ) -> Result<()> {
        let cs = 1u64 << self.cluster_bits;
        let len = buf.len() as u64;
        let mut jobs = Vec::new();
        for &(pos, host, n) in in_place {
            let part = buf.slice((pos - off) as usize, n as usize);
            jobs.push(async move { self.write_host(host, &part, fua).await }.boxed_local());
        }
        let mut i = 0;
        while i < allocs.len() {
            let mut j = i + 1;
            while j < allocs.len() && allocs[j].0 == allocs[j - 1].0 + 1 {
                j += 1;
            }
            let host = base + i as u64 * cs;
            let (gstart, gend) = (allocs[i].0 * cs, (allocs[j - 1].0 + 1) * cs);
            let (a, b) = (off.max(gstart), (off + len).min(gend));
            let part = buf.slice((a - off) as usize, (b - a) as usize);
            jobs.push(self.write_new_run(host, gstart, gend, a, b, part, fua).boxed_local());
            i = j;
        }
        try_join_all(jobs).await?;
        Ok(())
    }

    /// Writes guest range `[gstart, gend)` to new host clusters at `host`: old
    /// contents for `[gstart, a)` and `[b, gend)`, the request for `[a, b)`.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn write_new_run(
        &self,
        host: u64,
        gstart: u64,
        gend: u64,
        a: u64,
        b: u64,
        part: SgList,
        fua: bool,
    ) -> Result<()> {
        let mem = self.storage.mem_align().max(512);
        let head = SgList::owned(AlignedBuf::new((a - gstart) as usize, mem));
        let tail = SgList::owned(AlignedBuf::new((gend - b) as usize, mem));
        if !head.is_empty() {
            self.read_old(gstart, &head).await?;
        }
        if !tail.is_empty() {
            self.read_old(b, &tail).await?;
        }
        let run = SgList::concat(&[&head, &part, &tail]);
        fault::check(self.faults.as_deref(), fault::Kind::Data).map_err(io_err(self.path(), "write failed"))?;
        self.storage.write(host, &run, fua).await.map_err(doing("write failed"))
    }

    /// Reads what the guest currently sees at `[pos, pos+len)`, clamped to the
    /// disk size (bytes past it read as zeroes).
    pub(super) async fn read_old(&self, pos: u64, out: &SgList) -> Result<()> {
        let size = self.size();
        let inside = (out.len() as u64).min(size.saturating_sub(pos)) as usize;
        if inside > 0 {
            self.read(pos, &out.slice(0, inside)).await?;
        }
        out.slice(inside, out.len() - inside).fill_zero();
        Ok(())
    }

    pub(super) async fn install(&self, m: &mut Meta, allocs: &[(u64, u64)], base: u64) -> Result<()> {
        let cs = 1u64 << self.cluster_bits;
        let full = if self.ext_l2 { u32::MAX as u64 } else { 0 };
        for (i, &(gc, old)) in allocs.iter().enumerate() {
            m.set_l2(&self.storage, gc, (base + i as u64 * cs) | COPIED, full)
                .await?;
            m.release_entry(&self.storage, old).await?;
        }
        Ok(())
    }

    /// Rebuilds refcounts of an image opened writable with the dirty bit set,
    /// before anything is allocated from them. Call without the meta lock.
    pub(super) async fn repair_if_dirty(&self) -> Result<()> {
        if !self.repair_pending.load(Ordering::Acquire) {
            return Ok(());
        }
        let _g = self.repair_lock.lock().await;
        if self.repair_pending.load(Ordering::Acquire) {
            tracing::warn!("{}: dirty bit set, repairing refcounts", self.path().display());
            let r = check::check(self, check::CheckMode::All).await?;
            if r.corruptions > 0 || r.check_errors > 0 {
                return Err(fmt_err(
                    self.path(),
                    "refcount repair of the dirty image failed; run 'spindle img check -r all'",
                ));
            }
            self.repair_pending.store(false, Ordering::Release);
        }
        Ok(())
    }

    /// Sets the dirty bit before the first write of a lazy-refcount image.
    /// Before the first change of the image's contents: a lazy-refcount
    /// image gets its dirty bit, and autoclear bits Spindle does not
    /// implement (persistent bitmaps) go, so QEMU does not trust bitmaps
    /// that these writes make stale.
    pub(super) async fn mark_dirty(&self, m: &mut Meta) -> Result<()> {
        if self.lazy && m.hdr.incompatible & INCOMPAT_DIRTY == 0 {
            m.hdr.incompatible |= INCOMPAT_DIRTY;
            m.write_header(&self.storage).await?;
        } else if m.header_pending {
            m.write_header(&self.storage).await?;
        }
        Ok(())
    }

    /// Writes back metadata in the safe order and makes everything durable.
    pub(crate) async fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.lock_meta().await.flush(&self.storage).await
    }

    /// Flushes and clears the dirty bit.
    pub(crate) async fn close(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        if self.health.stale.load(Ordering::Acquire) {
            // The header in memory may not be the one on disk.
            return self.check_usable();
        }
        let mut m = self.lock_meta().await;
        m.flush(&self.storage).await?;
        if m.hdr.incompatible & INCOMPAT_DIRTY != 0 {
            m.hdr.incompatible &= !INCOMPAT_DIRTY;
            m.write_header(&self.storage).await?;
        }
        Ok(())
    }

    /// Discard: whole clusters become unallocated (or zero when a backing
    /// file would otherwise show through, on v3); partial clusters are left.
    pub(crate) async fn discard(&self, off: u64, len: u64) -> Result<()> {
        self.zero_or_discard(off, len, true, true).await
    }

    /// Write-zeroes: whole clusters become zero clusters (v3), partial ones
    /// are written with zeroes.
    pub(crate) async fn write_zeroes(&self, off: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.zero_or_discard(off, len, may_unmap, false).await
    }

    pub(super) async fn zero_or_discard(&self, off: u64, len: u64, may_unmap: bool, discard: bool) -> Result<()> {
        self.check_writable()?;
        let cs = 1u64 << self.cluster_bits;
        let end = off + len;
        let size = self.size();
        // Whole clusters (the last partial cluster of the disk counts as whole).
        let first_full = off.div_ceil(cs) * cs;
        let last_full = if end == size {
            end.div_ceil(cs) * cs
        } else {
            end / cs * cs
        };
        let can_zero_flag = self.v3 || self.backing.is_none();
        if !discard && (first_full >= last_full || !can_zero_flag) {
            return self.write_zero_bytes(off, len).await;
        }
        if !discard {
            if off < first_full {
                self.write_zero_bytes(off, first_full - off).await?;
            }
            if last_full < end {
                self.write_zero_bytes(last_full, end - last_full).await?;
            }
        }
        if first_full >= last_full {
            return Ok(());
        }
        self.repair_if_dirty().await?;
        let (g0, g1) = (first_full / cs, last_full / cs);
        let mut m = self.lock_meta_clear_of(g0, g1).await;
        self.mark_dirty(&mut m).await?;
        let zero_needed = !discard || self.backing.is_some();
        const ALL_ZERO: u64 = 0xffff_ffff << 32; // extended L2: every subcluster reads as zero
        for gc in g0..g1 {
            let (raw, bmp) = m.get_l2(&self.storage, gc).await?;
            let e = self.entry_at(gc * cs, raw, bmp)?;
            // Write-zeroes without may-unmap keeps an owned cluster allocated
            // (QEMU's "zero cluster with a host offset"): only the flag changes.
            let owned = e.copied && e.compressed.is_none() && e.host != 0;
            if !discard && !may_unmap && owned && (self.v3 || self.ext_l2) {
                let (keep, bmp) = if self.ext_l2 { (raw, ALL_ZERO) } else { (raw | ZERO, 0) };
                m.set_l2(&self.storage, gc, keep, bmp).await?;
                continue;
            }
            let (new_raw, new_bmp) = if self.ext_l2 {
                (0, if zero_needed { ALL_ZERO } else { 0 })
            } else if zero_needed && self.v3 {
                (ZERO, 0)
            } else {
                (0, 0)
            };
            if raw == new_raw && !self.ext_l2 {
                continue;
            }
            m.set_l2(&self.storage, gc, new_raw, new_bmp).await?;
            m.release_entry(&self.storage, raw).await?;
        }
        if self.storage.write_through() {
            m.flush(&self.storage).await?;
        }
        Ok(())
    }

    pub(super) async fn write_zero_bytes(&self, off: u64, len: u64) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zero = SgList::zeroed(CHUNK.min(len) as usize);
        let mut pos = off;
        while pos < off + len {
            let n = CHUNK.min(off + len - pos) as usize;
            self.write(pos, &zero.slice(0, n), false).await?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Grows or shrinks the virtual disk. Everything that can refuse the
    /// new size is checked before anything changes, and the in-memory
    /// size changes only once the header says so.
    pub(crate) async fn resize(&self, new_size: u64) -> Result<()> {
        self.check_writable()?;
        if !new_size.is_multiple_of(512) {
            return Err(fmt_err(self.path(), "the new size must be a multiple of 512 bytes"));
        }
        let l2_bits = self.cluster_bits - if self.ext_l2 { 4 } else { 3 };
        let need = Header::l1_entries_for(new_size, self.cluster_bits, l2_bits);
        if need * 8 > super::header::MAX_L1_BYTES {
            return Err(fmt_err(
                self.path(),
                format!(
                    "a {new_size}-byte disk needs an L1 table over 32 MiB with {} KiB clusters; use a larger cluster size",
                    (1u64 << self.cluster_bits) >> 10
                ),
            ));
        }
        self.repair_if_dirty().await?;
        let cs = 1u64 << self.cluster_bits;
        let old = {
            let mut m = self.lock_meta_clear_of(new_size / cs, u64::MAX).await;
            let old = m.hdr.size;
            if m.hdr.nb_snapshots > 0 && new_size < old {
                return Err(fmt_err(
                    self.path(),
                    "cannot shrink an image that has internal snapshots",
                ));
            }
            if new_size < old {
                self.free_past(&mut m, new_size.div_ceil(cs), old.div_ceil(cs)).await?;
                m.flush(&self.storage).await?;
            }
            m.hdr.size = new_size;
            let res = if need as usize > m.l1().len() {
                m.resize_l1(&self.storage, need as usize).await
            } else {
                m.write_header(&self.storage).await
            };
            if let Err(e) = res {
                m.hdr.size = old;
                return Err(e);
            }
            self.size.store(new_size, Ordering::Relaxed);
            old
        };
        if new_size > old {
            self.zero_grown(old, new_size).await?;
        }
        Ok(())
    }

    /// Makes the space a grow added, `[old, new)`, read as zeroes. Two
    /// things could show through otherwise: the rest of the cluster that
    /// held the old end (data from before a shrink: QEMU shows it, a raw
    /// file does not), and a backing file longer than the old size (QEMU
    /// zeroes that too). Runs after the header grew, as QEMU's truncate
    /// does: a crash in between leaves those bytes as they were.
    async fn zero_grown(&self, old: u64, new: u64) -> Result<()> {
        let cs = 1u64 << self.cluster_bits;
        let tail_end = old.div_ceil(cs) * cs;
        let backing_end = self.backing.as_ref().map_or(0, |b| b.size());
        let end = new.min(tail_end.max(backing_end));
        if end > old {
            self.write_zeroes(old, end - old, true).await?;
        }
        Ok(())
    }

    /// Unmaps guest clusters `[first, end)` (a shrink), visiting only the
    /// L2 tables that exist.
    async fn free_past(&self, m: &mut Meta, first: u64, end: u64) -> Result<()> {
        let l2_bits = m.hdr.l2_bits();
        let mut gc = first;
        while gc < end {
            let l1i = (gc >> l2_bits) as usize;
            if m.l1().get(l1i).is_none_or(|e| e & OFFSET_MASK == 0) {
                gc = ((l1i as u64) + 1) << l2_bits;
                continue;
            }
            let (raw, bmp) = m.get_l2(&self.storage, gc).await?;
            if raw != 0 || bmp != 0 {
                m.set_l2(&self.storage, gc, 0, 0).await?;
                m.release_entry(&self.storage, raw).await?;
            }
            gc += 1;
        }
        Ok(())
    }

    /// Writes one guest cluster compressed (for `convert -c`). The cluster
    /// must be unallocated. Falls back to a plain write when compression
    /// does not save space.
    pub async fn write_compressed(&self, gc: u64, data: &[u8]) -> Result<()> {
        let r = self.write_compressed_inner(gc, data).await;
        self.guard(r).await
    }

    async fn write_compressed_inner(&self, gc: u64, data: &[u8]) -> Result<()> {
        self.check_writable()?;
        let cs = 1u64 << self.cluster_bits;
        if self.ext_l2 || data.len() as u64 != cs {
            return self.write(gc * cs, &SgList::copy_of(data), false).await;
        }
        self.repair_if_dirty().await?;
        let packed = compress::compress(self.compression, data).map_err(|e| fmt_err(self.path(), e))?;
        if packed.len() as u64 >= cs - 512 {
            return self.write(gc * cs, &SgList::copy_of(data), false).await;
        }
        let mut m = self.lock_meta().await;
        self.mark_dirty(&mut m).await?;
        let off = m.alloc_bytes(&self.storage, packed.len() as u64).await?;
        m.check_overlap(&self.storage, off, packed.len() as u64, None)?;
        fault::check(self.faults.as_deref(), fault::Kind::Data).map_err(io_err(self.path(), "write failed"))?;
        self.storage
            .write_at(off, &packed, false)
            .await
            .map_err(doing("write failed"))?;
        let x = 62 - (self.cluster_bits - 8);
        let extra_sectors = ((off + packed.len() as u64 - 1) >> 9) - (off >> 9);
        let raw = COMPRESSED | (extra_sectors << x) | off;
        let (old, _) = m.get_l2(&self.storage, gc).await?;
        m.set_l2(&self.storage, gc, raw, 0).await?;
        m.release_entry(&self.storage, old).await?;
        Ok(())
    }
}
