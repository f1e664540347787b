//! qcow2 images, byte-compatible with QEMU.
//!
//! Reads map each cluster under the metadata lock, then move data without
//! it. Writes to clusters the active L1 owns (COPIED) go in place without the
//! lock held across the data I/O. Writes that need new clusters allocate
//! under the lock, mark the guest range in flight, write data (with
//! copy-on-write of the untouched part of each cluster) without the lock,
//! then take it again to install L2 entries.

mod amend;
mod cache;
pub mod check;
mod compress;
pub mod create;
pub mod header;
pub mod measure;
mod meta;
pub mod snapshot;
mod snapshots;
mod vmstate;

use crate::error::{fmt_err, io_err, BlockError, Result};
use crate::node::{BlockStatus, ImageInfo, Node};
use crate::sg::SgList;
use futures::future::try_join_all;
use futures::lock::Mutex;
use header::{Compression, Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use meta::{Inflight, Meta, COMPRESSED, COPIED, OFFSET_MASK, ZERO};
use spindle_io::{AlignedBuf, File};
use std::io::IoSlice;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub use check::{check, CheckMode, CheckReport};
pub use create::{create, CreateOptions, Preallocation};
pub use vmstate::VmStateOptions;

/// qcow2-specific facts for `info`.
#[derive(Debug, Clone)]
pub struct Qcow2Info {
    /// "0.10" (v2) or "1.1" (v3).
    pub compat: &'static str,
    /// Lazy refcounts enabled.
    pub lazy_refcounts: bool,
    /// Refcount width.
    pub refcount_bits: u32,
    /// Corrupt bit set.
    pub corrupt: bool,
    /// Extended L2 entries.
    pub extended_l2: bool,
    /// "zlib" or "zstd".
    pub compression_type: &'static str,
    /// Internal snapshots.
    pub snapshots: u32,
}

/// Tunables of an open image.
#[derive(Debug, Clone, Copy, Default)]
pub struct Qcow2Options {
    /// L2 cache size in bytes (QEMU's `l2-cache-size`); default covers the
    /// whole disk up to 32 MiB.
    pub l2_cache_size: Option<u64>,
    /// L2 cache entry (slice) size in bytes (`l2-cache-entry-size`); default
    /// one cluster.
    pub l2_cache_entry_size: Option<u64>,
    /// Open an image marked corrupt writable, to repair it (`check -r`).
    pub repair: bool,
}

/// How one guest range is stored.
#[derive(Debug, Clone, Copy)]
enum Piece {
    Data(u64),
    Zero,
    Backing,
    Compressed(u64),
}

/// An open qcow2 image.
pub struct Qcow2 {
    file: File,
    cluster_bits: u32,
    /// Granularity of mapping: cluster, or subcluster with extended L2.
    sub_bits: u32,
    ext_l2: bool,
    v3: bool,
    compression: Compression,
    size: AtomicU64,
    meta: Mutex<Meta>,
    backing: Option<Box<Node>>,
    read_only: bool,
    lazy: bool,
    /// Opened writable with the dirty bit set: refcounts may be stale and are
    /// rebuilt before the first allocation.
    repair_pending: std::sync::atomic::AtomicBool,
    repair_lock: Mutex<()>,
    /// Why the image is read-only, when it is not the caller's choice.
    ro_reason: String,
}

/// Offset and byte length of a compressed cluster's data.
pub(crate) fn compressed_extent(raw: u64, cluster_bits: u32) -> (u64, u64) {
    let x = 62 - (cluster_bits - 8);
    let off = raw & ((1u64 << x) - 1);
    let sectors = ((raw >> x) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
    let len = sectors * 512 - (off & 511);
    (off, len)
}

/// Reads the snapshot table at open (setup time), within QEMU's caps.
fn read_snapshot_table(
    f: &std::fs::File,
    hdr: &Header,
    file_len: u64,
    path: &Path,
) -> Result<(Vec<snapshot::Snapshot>, u64)> {
    use std::os::unix::fs::FileExt;
    if hdr.nb_snapshots == 0 {
        return Ok((Vec::new(), 0));
    }
    let len = snapshot::MAX_TABLE_BYTES.min(file_len.saturating_sub(hdr.snapshots_offset)) as usize;
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, hdr.snapshots_offset)
        .map_err(io_err(path, "cannot read the snapshot table"))?;
    let (snaps, len) = snapshot::parse_table(&buf, hdr.nb_snapshots).map_err(|m| fmt_err(path, m))?;
    for s in &snaps {
        if s.l1_size as u64 * 8 > header::MAX_L1_BYTES || s.l1_table_offset % hdr.cluster_size() != 0 {
            return Err(fmt_err(path, format!("snapshot {} has an invalid L1 table", s.id)));
        }
    }
    Ok((snaps, len))
}

fn read_table(f: &std::fs::File, off: u64, entries: usize, path: &Path, what: &str) -> Result<Vec<u64>> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; entries * 8];
    f.read_exact_at(&mut buf, off)
        .map_err(|e| fmt_err(path, format!("cannot read the {what} at 0x{off:x}: {e}")))?;
    Ok(buf
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or_default()))
        .collect())
}

impl Qcow2 {
    /// Opens a qcow2 image on an already opened file. Setup-time: reads the
    /// header and tables synchronously through a second descriptor.
    pub fn open(file: File, backing: Option<Box<Node>>, opts: Qcow2Options) -> Result<Qcow2> {
        let path = file.path().to_path_buf();
        let plain = std::fs::File::open(&path).map_err(io_err(&path, "cannot open"))?;
        let file_len = file.len().map_err(io_err(&path, "cannot get size"))?;
        let mut first = vec![0u8; (2u64 << 20).min(file_len) as usize];
        use std::os::unix::fs::FileExt;
        plain
            .read_exact_at(&mut first, 0)
            .map_err(io_err(&path, "cannot read header"))?;
        let hdr = Header::parse(&first, file_len).map_err(|m| fmt_err(&path, m))?;
        let read_only = file.is_read_only();
        // A corrupt image opens read-only (unless this open is the repair).
        let corrupt = hdr.incompatible & INCOMPAT_CORRUPT != 0;
        let ro_reason = if corrupt && !opts.repair {
            if !read_only {
                tracing::warn!(
                    "{}: image is marked corrupt; opened read-only (repair it with 'spindle img check -r all')",
                    path.display()
                );
            }
            "marked corrupt; repair it with 'spindle img check -r all'".to_string()
        } else {
            String::new()
        };
        let read_only = read_only || (corrupt && !opts.repair);
        let l1 = read_table(&plain, hdr.l1_table_offset, hdr.l1_size as usize, &path, "L1 table")?;
        let rct_entries = (hdr.refcount_table_clusters as u64 * hdr.cluster_size() / 8) as usize;
        let rct = read_table(&plain, hdr.refcount_table_offset, rct_entries, &path, "refcount table")?;
        let (snapshots, snapshot_table_len) = read_snapshot_table(&plain, &hdr, file_len, &path)?;
        let cs = hdr.cluster_size();
        let slice = opts
            .l2_cache_entry_size
            .unwrap_or(cs)
            .clamp(512, cs)
            .next_power_of_two()
            .min(cs);
        let entry = hdr.l2_entry_size();
        let cover = hdr.size.div_ceil(cs) * entry;
        let cache = opts.l2_cache_size.unwrap_or(cover.clamp(1 << 20, 32 << 20));
        let slices = (cache / slice).max(4) as usize;
        let ext_l2 = hdr.extended_l2();
        let dirty = hdr.incompatible & INCOMPAT_DIRTY != 0;
        let q = Qcow2 {
            repair_pending: std::sync::atomic::AtomicBool::new(dirty && !read_only),
            repair_lock: Mutex::new(()),
            ro_reason,
            cluster_bits: hdr.cluster_bits,
            sub_bits: if ext_l2 { hdr.cluster_bits - 5 } else { hdr.cluster_bits },
            ext_l2,
            v3: hdr.version == 3,
            compression: hdr.compression,
            size: AtomicU64::new(hdr.size),
            lazy: hdr.lazy_refcounts(),
            meta: Mutex::new({
                let mut m = Meta::new(hdr, l1, rct, file_len, (slice as usize, slices));
                m.snapshots_table_len = snapshot_table_len;
                m.snapshots = snapshots;
                m
            }),
            file,
            backing,
            read_only,
        };
        Ok(q)
    }

    /// Guest-visible size.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }
    /// Image path.
    pub fn path(&self) -> &Path {
        self.file.path()
    }
    /// The backing node.
    pub fn backing(&self) -> Option<&Node> {
        self.backing.as_deref()
    }
    /// Whether writes are refused.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }
    /// The image file.
    pub fn file(&self) -> &File {
        &self.file
    }
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Whether the image has the dirty bit set (needs a refcount repair).
    pub fn needs_repair(&self) -> bool {
        self.meta
            .try_lock()
            .map(|m| m.hdr.incompatible & INCOMPAT_DIRTY != 0)
            .unwrap_or(false)
    }

    /// Format facts.
    pub fn info(&self) -> ImageInfo {
        let m = self.meta.try_lock();
        let hdr = m.as_ref().map(|m| m.hdr.clone());
        let Some(h) = hdr else {
            return ImageInfo {
                format: "qcow2",
                virtual_size: self.size(),
                ..Default::default()
            };
        };
        ImageInfo {
            format: "qcow2",
            virtual_size: h.size,
            cluster_size: Some(h.cluster_size()),
            backing_file: h.backing_file.clone(),
            backing_format: h.backing_format.clone(),
            dirty: h.incompatible & INCOMPAT_DIRTY != 0,
            qcow2: Some(Qcow2Info {
                compat: if h.version == 3 { "1.1" } else { "0.10" },
                lazy_refcounts: h.lazy_refcounts(),
                refcount_bits: h.refcount_bits(),
                corrupt: h.incompatible & INCOMPAT_CORRUPT != 0,
                extended_l2: h.extended_l2(),
                compression_type: match h.compression {
                    Compression::Zlib => "zlib",
                    Compression::Zstd => "zstd",
                },
                snapshots: h.nb_snapshots,
            }),
        }
    }

    fn ro_err(&self) -> BlockError {
        BlockError::ReadOnly {
            path: self.path().into(),
            reason: self.ro_reason.clone(),
        }
    }

    /// How the range starting at `off` (at most `len`) is stored: one piece
    /// and its length, within one cluster.
    async fn map_piece(&self, m: &mut Meta, off: u64, len: u64) -> Result<(Piece, u64)> {
        let cs = 1u64 << self.cluster_bits;
        let gc = off >> self.cluster_bits;
        let in_cluster = off & (cs - 1);
        let (raw, bmp) = m.get_l2(&self.file, gc).await?;
        if self.ext_l2 {
            let sub = 1u64 << self.sub_bits;
            let mut si = (in_cluster >> self.sub_bits) as u32;
            let kind = |si: u32| -> u8 {
                if bmp & (1 << si) != 0 {
                    1
                } else if bmp & (1 << (si + 32)) != 0 {
                    2
                } else {
                    0
                }
            };
            let k = kind(si);
            let mut n = sub - (in_cluster & (sub - 1));
            while si + 1 < 32 && n < len && kind(si + 1) == k {
                si += 1;
                n += sub;
            }
            let n = n.min(len);
            if raw & COMPRESSED != 0 {
                return Ok((Piece::Compressed(raw), (cs - in_cluster).min(len)));
            }
            let piece = match k {
                1 => Piece::Data((raw & OFFSET_MASK) + in_cluster),
                2 => Piece::Zero,
                _ => Piece::Backing,
            };
            return Ok((piece, n));
        }
        let n = (cs - in_cluster).min(len);
        let piece = if raw & COMPRESSED != 0 {
            Piece::Compressed(raw)
        } else if raw & ZERO != 0 && self.v3 {
            Piece::Zero
        } else if raw & OFFSET_MASK != 0 {
            Piece::Data((raw & OFFSET_MASK) + in_cluster)
        } else {
            Piece::Backing
        };
        Ok((piece, n))
    }

    /// Maps `[off, off+len)` into pieces, merging neighbours of the same kind.
    async fn map_range(&self, off: u64, len: u64) -> Result<Vec<(u64, u64, Piece)>> {
        let mut m = self.meta.lock().await;
        let mut out: Vec<(u64, u64, Piece)> = Vec::new();
        let mut pos = off;
        while pos < off + len {
            let (p, n) = self.map_piece(&mut m, pos, off + len - pos).await?;
            match (out.last_mut(), p) {
                (Some((_, l, Piece::Data(h))), Piece::Data(h2)) if *h + *l == h2 => *l += n,
                (Some((_, l, Piece::Zero)), Piece::Zero) | (Some((_, l, Piece::Backing)), Piece::Backing) => *l += n,
                _ => out.push((pos, n, p)),
            }
            pos += n;
        }
        Ok(out)
    }

    /// Reads guest data.
    pub(crate) async fn read(&self, off: u64, buf: &SgList<'_>) -> Result<()> {
        let pieces = self.map_range(off, buf.len() as u64).await?;
        let reads = pieces.into_iter().map(|(pos, n, p)| {
            let part = buf.slice((pos - off) as usize, n as usize);
            async move { self.read_piece(pos, p, &part).await }
        });
        try_join_all(reads).await?;
        Ok(())
    }

    async fn read_piece(&self, pos: u64, p: Piece, part: &SgList<'_>) -> Result<()> {
        match p {
            Piece::Data(host) => {
                let mut iov = part.io_slices_mut();
                self.file
                    .read_vectored_at(host, &mut iov)
                    .await
                    .map_err(io_err(self.path(), "read failed"))
            }
            Piece::Zero => {
                part.fill_zero();
                Ok(())
            }
            Piece::Backing => self.read_backing(pos, part).await,
            Piece::Compressed(raw) => {
                let data = self.read_compressed(raw).await?;
                let cs = 1u64 << self.cluster_bits;
                let start = (pos & (cs - 1)) as usize;
                part.copy_from(&data[start..start + part.len()]);
                Ok(())
            }
        }
    }

    async fn read_backing(&self, pos: u64, part: &SgList<'_>) -> Result<()> {
        let Some(b) = &self.backing else {
            part.fill_zero();
            return Ok(());
        };
        let bsize = b.size();
        let n = part.len() as u64;
        if pos >= bsize {
            part.fill_zero();
            return Ok(());
        }
        let inside = n.min(bsize - pos) as usize;
        if inside < part.len() {
            part.slice(inside, part.len() - inside).fill_zero();
        }
        Box::pin(b.read(pos, &part.slice(0, inside))).await
    }

    async fn read_compressed(&self, raw: u64) -> Result<Vec<u8>> {
        // At most two clusters by the descriptor's format; bytes past the
        // end of the file read as zeroes (no fstat on the I/O thread).
        let (off, len) = compressed_extent(raw, self.cluster_bits);
        let mut cbuf = vec![0u8; len as usize];
        self.file
            .read_at(off, &mut cbuf)
            .await
            .map_err(io_err(self.path(), "compressed cluster read failed"))?;
        compress::decompress(self.compression, &cbuf, 1 << self.cluster_bits)
            .map_err(|e| fmt_err(self.path(), format!("compressed cluster at 0x{off:x}: {e}")))
    }

    /// Writes guest data.
    pub(crate) async fn write(&self, off: u64, buf: &SgList<'_>, fua: bool) -> Result<()> {
        if self.read_only {
            return Err(self.ro_err());
        }
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
            let (raw, bmp) = m.get_l2(&self.file, gc).await?;
            let pos = (gc * cs).max(off);
            let normal = raw & (COMPRESSED | COPIED) == COPIED && raw & OFFSET_MASK != 0;
            let fits = if self.ext_l2 {
                let end = ((gc + 1) * cs).min(off + len);
                let (s0, s1) = (
                    ((pos & (cs - 1)) >> self.sub_bits),
                    (((end - 1) & (cs - 1)) >> self.sub_bits),
                );
                let mask = ((1u64 << (s1 + 1)) - 1) & !((1u64 << s0) - 1);
                bmp & mask == mask
            } else {
                raw & ZERO == 0
            };
            if normal && fits {
                let host = (raw & OFFSET_MASK) + (pos & (cs - 1));
                let n = ((gc + 1) * cs).min(off + len) - pos;
                match in_place.last_mut() {
                    // Contiguous in guest and host: one write.
                    Some((p, h, l)) if *p + *l == pos && *h + *l == host => *l += n,
                    _ => in_place.push((pos, host, n)),
                }
            } else {
                allocs.push((gc, raw));
            }
        }
        if allocs.is_empty() {
            drop(m);
            let writes = in_place.iter().map(|&(pos, host, n)| {
                let part = buf.slice((pos - off) as usize, n as usize);
                async move { self.write_host(host, &part, fua).await }
            });
            try_join_all(writes).await?;
            return Ok(());
        }
        // L2 tables first (as QEMU does), so data runs stay contiguous; then
        // one contiguous run for the new clusters.
        for &(gc, _) in &allocs {
            m.prepare_l2(&self.file, gc).await?;
        }
        let base = m.alloc_clusters(&self.file, allocs.len() as u64).await?;
        let lock = Arc::new(Mutex::new(()));
        let guard = lock.clone().lock_owned().await;
        m.inflight.push(Inflight {
            start: first,
            end: last + 1,
            lock,
        });
        drop(m);
        let result = self.write_allocating(off, buf, fua, &in_place, &allocs, base).await;
        let mut m = self.meta.lock().await;
        let installed = match result {
            Ok(()) => self.install(&mut m, &allocs, base).await,
            Err(e) => Err(e),
        };
        if installed.is_err() {
            // Give the clusters back; the write failed before the mapping changed.
            for i in 0..allocs.len() as u64 {
                let _ = m.update_refcount(&self.file, base / cs + i, -1).await;
            }
        }
        m.inflight.retain(|i| i.start != first || i.end != last + 1);
        drop(guard);
        installed?;
        if fua || self.file.cache().write_through() {
            m.flush(&self.file).await?;
        }
        Ok(())
    }

    /// Locks the metadata once no allocating write is in flight on guest
    /// clusters `[first, end)`.
    async fn lock_meta_clear_of(&self, first: u64, end: u64) -> futures::lock::MutexGuard<'_, Meta> {
        loop {
            let m = self.meta.lock().await;
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

    async fn write_host(&self, host: u64, part: &SgList<'_>, fua: bool) -> Result<()> {
        let iov = part.io_slices();
        self.file
            .write_vectored_at(host, &iov, fua)
            .await
            .map_err(io_err(self.path(), "write failed"))
    }

    /// Data phase of an allocating write: new clusters get the request's bytes
    /// plus copy-on-write of what the request does not cover. New clusters
    /// are contiguous on the host, so each run of consecutive guest clusters
    /// is one vectored write.
    async fn write_allocating(
        &self,
        off: u64,
        buf: &SgList<'_>,
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
    async fn write_new_run(
        &self,
        host: u64,
        gstart: u64,
        gend: u64,
        a: u64,
        b: u64,
        part: SgList<'_>,
        fua: bool,
    ) -> Result<()> {
        let mem = self.file.alignment().mem.max(512);
        let mut head = AlignedBuf::new((a - gstart) as usize, mem);
        let mut tail = AlignedBuf::new((gend - b) as usize, mem);
        if !head.is_empty() {
            self.read_old(gstart, &mut head).await?;
        }
        if !tail.is_empty() {
            self.read_old(b, &mut tail).await?;
        }
        let mut iov: Vec<IoSlice<'_>> = vec![IoSlice::new(&head)];
        iov.extend(part.io_slices());
        iov.push(IoSlice::new(&tail));
        self.file
            .write_vectored_at(host, &iov, fua)
            .await
            .map_err(io_err(self.path(), "write failed"))
    }

    /// Reads what the guest currently sees at `[pos, pos+len)`, clamped to the
    /// disk size (bytes past it read as zeroes).
    async fn read_old(&self, pos: u64, out: &mut [u8]) -> Result<()> {
        let size = self.size();
        let inside = (out.len() as u64).min(size.saturating_sub(pos)) as usize;
        if inside > 0 {
            self.read(pos, &SgList::new(&mut out[..inside])).await?;
        }
        out[inside..].fill(0);
        Ok(())
    }

    async fn install(&self, m: &mut Meta, allocs: &[(u64, u64)], base: u64) -> Result<()> {
        let cs = 1u64 << self.cluster_bits;
        let full = if self.ext_l2 { u32::MAX as u64 } else { 0 };
        for (i, &(gc, old)) in allocs.iter().enumerate() {
            m.set_l2(&self.file, gc, (base + i as u64 * cs) | COPIED, full).await?;
            m.release_entry(&self.file, old).await?;
        }
        Ok(())
    }

    /// Rebuilds refcounts of an image opened writable with the dirty bit set,
    /// before anything is allocated from them. Call without the meta lock.
    async fn repair_if_dirty(&self) -> Result<()> {
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
    async fn mark_dirty(&self, m: &mut Meta) -> Result<()> {
        if self.lazy && m.hdr.incompatible & INCOMPAT_DIRTY == 0 {
            m.hdr.incompatible |= INCOMPAT_DIRTY;
            m.write_header(&self.file).await?;
        }
        Ok(())
    }

    /// Writes back metadata in the safe order and makes everything durable.
    pub(crate) async fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.meta.lock().await.flush(&self.file).await
    }

    /// Flushes and clears the dirty bit.
    pub(crate) async fn close(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let mut m = self.meta.lock().await;
        m.flush(&self.file).await?;
        if m.hdr.incompatible & INCOMPAT_DIRTY != 0 {
            m.hdr.incompatible &= !INCOMPAT_DIRTY;
            m.write_header(&self.file).await?;
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

    async fn zero_or_discard(&self, off: u64, len: u64, _may_unmap: bool, discard: bool) -> Result<()> {
        if self.read_only {
            return Err(self.ro_err());
        }
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
        for gc in g0..g1 {
            let (raw, _) = m.get_l2(&self.file, gc).await?;
            let (new_raw, new_bmp) = if self.ext_l2 {
                if zero_needed {
                    (0, 0xffff_ffffu64 << 32)
                } else {
                    (0, 0)
                }
            } else if zero_needed && self.v3 {
                (ZERO, 0)
            } else {
                (0, 0)
            };
            if raw == new_raw && !self.ext_l2 {
                continue;
            }
            m.set_l2(&self.file, gc, new_raw, new_bmp).await?;
            m.release_entry(&self.file, raw).await?;
        }
        if self.file.cache().write_through() {
            m.flush(&self.file).await?;
        }
        Ok(())
    }

    async fn write_zero_bytes(&self, off: u64, len: u64) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let mut zero = vec![0u8; CHUNK.min(len) as usize];
        let mut pos = off;
        while pos < off + len {
            let n = CHUNK.min(off + len - pos) as usize;
            self.write(pos, &SgList::new(&mut zero[..n]), false).await?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Allocation status of this image alone.
    pub(crate) async fn block_status(&self, off: u64, len: u64) -> Result<(BlockStatus, u64)> {
        let mut m = self.meta.lock().await;
        let (first, mut n) = self.map_piece(&mut m, off, len).await?;
        // Extend over following clusters of the same kind.
        while n < len {
            let (p, k) = self.map_piece(&mut m, off + n, len - n).await?;
            let same = match (first, p) {
                (Piece::Data(h), Piece::Data(h2)) => h + n == h2,
                (Piece::Zero, Piece::Zero) | (Piece::Backing, Piece::Backing) => true,
                _ => false,
            };
            if !same {
                break;
            }
            n += k;
        }
        let st = match first {
            Piece::Data(h) => BlockStatus::Data {
                offset: Some(h),
                compressed: false,
            },
            Piece::Compressed(_) => BlockStatus::Data {
                offset: None,
                compressed: true,
            },
            Piece::Zero => BlockStatus::Zero,
            Piece::Backing => BlockStatus::Unallocated,
        };
        Ok((st, n))
    }

    /// Grows or shrinks the virtual disk.
    pub(crate) async fn resize(&self, new_size: u64) -> Result<()> {
        if self.read_only {
            return Err(self.ro_err());
        }
        self.repair_if_dirty().await?;
        let mut m = self.meta.lock().await;
        if m.hdr.nb_snapshots > 0 && new_size < m.hdr.size {
            return Err(fmt_err(
                self.path(),
                "cannot shrink an image that has internal snapshots",
            ));
        }
        let cs = 1u64 << self.cluster_bits;
        let old = m.hdr.size;
        if new_size < old {
            // Free clusters past the new end.
            for gc in new_size.div_ceil(cs)..old.div_ceil(cs) {
                let (raw, _) = m.get_l2(&self.file, gc).await?;
                if raw != 0 {
                    m.set_l2(&self.file, gc, 0, 0).await?;
                    m.release_entry(&self.file, raw).await?;
                }
            }
            m.flush(&self.file).await?;
        }
        let need = Header::l1_entries_for(new_size, self.cluster_bits, m.hdr.l2_bits()) as usize;
        m.hdr.size = new_size;
        if need > m.l1.len() {
            m.resize_l1(&self.file, need).await?;
        } else {
            m.write_header(&self.file).await?;
        }
        self.size.store(new_size, Ordering::Relaxed);
        Ok(())
    }

    /// Writes one guest cluster compressed (for `convert -c`). The cluster
    /// must be unallocated. Falls back to a plain write when compression
    /// does not save space.
    pub async fn write_compressed(&self, gc: u64, data: &[u8]) -> Result<()> {
        if self.read_only {
            return Err(self.ro_err());
        }
        let cs = 1u64 << self.cluster_bits;
        if self.ext_l2 || data.len() as u64 != cs {
            return self.write(gc * cs, &SgList::new(&mut data.to_vec()), false).await;
        }
        self.repair_if_dirty().await?;
        let packed = compress::compress(self.compression, data).map_err(|e| fmt_err(self.path(), e))?;
        if packed.len() as u64 >= cs - 512 {
            return self.write(gc * cs, &SgList::new(&mut data.to_vec()), false).await;
        }
        let mut m = self.meta.lock().await;
        self.mark_dirty(&mut m).await?;
        let off = m.alloc_bytes(&self.file, packed.len() as u64).await?;
        self.file
            .write_at(off, &packed, false)
            .await
            .map_err(io_err(self.path(), "write failed"))?;
        let x = 62 - (self.cluster_bits - 8);
        let extra_sectors = ((off + packed.len() as u64 - 1) >> 9) - (off >> 9);
        let raw = COMPRESSED | (extra_sectors << x) | off;
        let (old, _) = m.get_l2(&self.file, gc).await?;
        m.set_l2(&self.file, gc, raw, 0).await?;
        m.release_entry(&self.file, old).await?;
        Ok(())
    }
}

use futures::FutureExt;
