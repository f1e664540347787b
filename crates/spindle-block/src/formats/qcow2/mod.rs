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
mod counters;
pub mod create;
mod entry;
pub mod header;
pub mod measure;
mod meta;
mod read;
pub mod snapshot;
mod snapshots;
mod tlb;
mod vmstate;
mod write;

use crate::error::{doing, fmt_err, BlockError, Result};
use crate::fault;
use crate::info::ImageInfo;
use crate::node::Node;
use crate::storage::Storage;
use futures::lock::Mutex;
use header::{Compression, Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use meta::Meta;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

pub use crate::info::Qcow2Info;
pub use check::{check, CheckMode, CheckReport};
pub use counters::Qcow2Counters;
pub use create::{create, create_on, CreateOptions, Preallocation};
pub use vmstate::VmStateOptions;

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
    /// Test only: fail one planned metadata write or flush.
    pub inject: Option<fault::Plan>,
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
    storage: Storage,
    cluster_bits: u32,
    /// Granularity of mapping: cluster, or subcluster with extended L2.
    sub_bits: u32,
    ext_l2: bool,
    v3: bool,
    compression: Compression,
    size: AtomicU64,
    meta: Mutex<Meta>,
    /// Id and mapping generation for the per-thread L2 entry cache (tlb.rs).
    tlb_id: u64,
    map_gen: AtomicU64,
    backing: Option<Box<Node>>,
    read_only: bool,
    lazy: bool,
    /// Opened writable with the dirty bit set: refcounts may be stale and are
    /// rebuilt before the first allocation.
    repair_pending: std::sync::atomic::AtomicBool,
    repair_lock: Mutex<()>,
    /// Why the image is read-only, when it is not the caller's choice.
    ro_reason: String,
    /// Corruption found while open, or a failed header switch: nothing
    /// writes to the image any more.
    health: std::sync::Arc<meta::Health>,
    /// Test-only fault injection, shared with the metadata.
    faults: Option<std::sync::Arc<fault::Injector>>,
    /// Cache and allocator counters, shared with the metadata.
    counters: std::sync::Arc<counters::Counters>,
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        // Entries on other threads go when those threads end.
        tlb::forget(self.tlb_id);
    }
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
fn read_snapshot_table(s: &Storage, hdr: &Header, file_len: u64) -> Result<(Vec<snapshot::Snapshot>, u64)> {
    if hdr.nb_snapshots == 0 {
        return Ok((Vec::new(), 0));
    }
    let path = s.path();
    let len = snapshot::MAX_TABLE_BYTES.min(file_len.saturating_sub(hdr.snapshots_offset)) as usize;
    let mut buf = vec![0u8; len];
    s.read_exact_blocking(hdr.snapshots_offset, &mut buf)
        .map_err(doing("cannot read the snapshot table"))?;
    let (snaps, len) = snapshot::parse_table(&buf, hdr.nb_snapshots).map_err(|m| fmt_err(path, m))?;
    // As QEMU: an oversized L1 table fails the open; a bad offset fails
    // only operations on that snapshot (check_snapshot_l1).
    for s in &snaps {
        if s.l1_size as u64 * 8 > header::MAX_L1_BYTES {
            return Err(fmt_err(
                path,
                format!("snapshot {} has an L1 table larger than 32 MiB", s.id),
            ));
        }
    }
    Ok((snaps, len))
}

/// Most bytes of snapshot L1 tables read at open for the overlap check;
/// snapshots past it go unchecked, as in QEMU's default mode.
const MAX_INDEXED_SNAPSHOT_L1: u64 = 64 << 20;

/// Reads the snapshots' L1 tables into the overlap check's index of their
/// L2 tables. A table that cannot be read is left out: only operations on
/// that snapshot fail (`check_snapshot_l1`), as in QEMU.
fn index_snapshot_l2(m: &mut Meta, s: &Storage, snaps: &[snapshot::Snapshot], file_len: u64) {
    let cs = m.hdr.cluster_size();
    let mut budget = MAX_INDEXED_SNAPSHOT_L1;
    for sn in snaps {
        let bytes = sn.l1_size as u64 * 8;
        let usable = sn.l1_table_offset != 0
            && sn.l1_table_offset.is_multiple_of(cs)
            && sn.l1_table_offset.checked_add(bytes).is_some_and(|e| e <= file_len);
        if !usable || m.inactive_l2.contains(sn.l1_table_offset) || bytes > budget {
            continue;
        }
        budget -= bytes;
        if let Ok(l1) = read_table(s, sn.l1_table_offset, sn.l1_size as usize, "") {
            m.inactive_l2.insert(sn.l1_table_offset, &l1, m.hdr.cluster_bits);
        }
    }
}

/// Reads a table of big-endian entries at open (setup time).
fn read_table(s: &Storage, off: u64, entries: usize, what: &str) -> Result<Vec<u64>> {
    let mut buf = vec![0u8; entries * 8];
    s.read_exact_blocking(off, &mut buf).map_err(|e| {
        let why = match e {
            BlockError::Io { source, .. } => source.to_string(),
            e => e.to_string(),
        };
        fmt_err(s.path(), format!("cannot read the {what} at 0x{off:x}: {why}"))
    })?;
    Ok(buf
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or_default()))
        .collect())
}

impl Qcow2 {
    /// Opens a qcow2 image on an opened storage. Setup-time: reads the
    /// header and tables with the storage's blocking reads.
    pub fn open(storage: Storage, backing: Option<Box<Node>>, opts: Qcow2Options) -> Result<Qcow2> {
        let path = storage.path().to_path_buf();
        let file_len = storage.len()?;
        let mut first = vec![0u8; (2u64 << 20).min(file_len) as usize];
        storage
            .read_exact_blocking(0, &mut first)
            .map_err(doing("cannot read header"))?;
        let hdr = Header::parse(&first, file_len).map_err(|m| fmt_err(&path, m))?;
        let read_only = storage.is_read_only();
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
        let l1 = read_table(&storage, hdr.l1_table_offset, hdr.l1_size as usize, "L1 table")?;
        let rct_entries = (hdr.refcount_table_clusters as u64 * hdr.cluster_size() / 8) as usize;
        let rct = read_table(&storage, hdr.refcount_table_offset, rct_entries, "refcount table")?;
        let (snapshots, snapshot_table_len) = read_snapshot_table(&storage, &hdr, file_len)?;
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
        let faults = opts.inject.map(|p| std::sync::Arc::new(fault::Injector::new(p)));
        let health = std::sync::Arc::new(meta::Health::default());
        let counters = std::sync::Arc::new(counters::Counters::default());
        let q = Qcow2 {
            counters: counters.clone(),
            health: health.clone(),
            faults: faults.clone(),
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
            tlb_id: tlb::new_id(),
            map_gen: AtomicU64::new(0),
            meta: Mutex::new({
                let mut m = Meta::new(
                    hdr,
                    l1,
                    rct,
                    file_len,
                    (slice as usize, slices),
                    faults,
                    (health, counters),
                );
                m.snapshots_table_len = snapshot_table_len;
                // Spindle implements no autoclear feature: opened
                // writable, they all go with the next header write.
                if !read_only && m.hdr.autoclear != 0 {
                    m.hdr.autoclear = 0;
                    m.header_pending = true;
                }
                index_snapshot_l2(&mut m, &storage, &snapshots, file_len);
                m.snapshots = snapshots;
                m
            }),
            storage,
            backing,
            read_only,
        };
        Ok(q)
    }

    /// Takes the metadata lock to change something: bumps the mapping
    /// generation first, so no thread uses a cached L2 entry from before.
    pub(super) async fn lock_meta(&self) -> futures::lock::MutexGuard<'_, Meta> {
        let m = self.meta.lock().await;
        self.map_gen.fetch_add(1, Ordering::SeqCst);
        m
    }

    /// Guest-visible size.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }
    /// Image path.
    pub fn path(&self) -> &Path {
        self.storage.path()
    }
    /// The backing node.
    pub fn backing(&self) -> Option<&Node> {
        self.backing.as_deref()
    }
    /// Whether writes are refused.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }
    /// The storage the image is in.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// What the metadata caches and the allocator did since the open.
    pub fn counters(&self) -> Qcow2Counters {
        self.counters.snapshot(1 << self.cluster_bits)
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

    pub(super) fn ro_err(&self) -> BlockError {
        BlockError::ReadOnly {
            path: self.path().into(),
            reason: self.ro_reason.clone(),
        }
    }

    /// Refuses changes to an image opened read-only or found corrupt.
    pub(super) fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(self.ro_err());
        }
        self.check_usable()
    }

    /// Refuses metadata write-back (and changes) once the image was found
    /// corrupt or a header switch failed.
    pub(super) fn check_usable(&self) -> Result<()> {
        let reason = if self.health.corrupted.load(Ordering::Acquire) {
            "found corrupt while open and marked corrupt; repair it with 'spindle img check -r all'"
        } else if self.health.stale.load(Ordering::Acquire) {
            "a metadata update failed half-way; reopen the image"
        } else {
            return Ok(());
        };
        Err(BlockError::ReadOnly {
            path: self.path().into(),
            reason: reason.into(),
        })
    }

    /// How L2 entries of this image are decoded.
    pub(super) fn layout(&self) -> entry::Layout {
        entry::Layout {
            cluster_bits: self.cluster_bits,
            v3: self.v3,
            ext_l2: self.ext_l2,
        }
    }

    /// Passes `r` on; a corruption of this image found on the way first
    /// marks the image corrupt (QEMU's `qcow2_signal_corruption`): the
    /// corrupt bit goes into the header when the image is writable, and
    /// from then on every change is refused. Call where no metadata lock
    /// is held (the public entry points).
    pub(crate) async fn guard<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(BlockError::Corrupt { path, msg }) = &r {
            if path == self.path() && !self.health.corrupted.swap(true, Ordering::AcqRel) {
                tracing::error!(
                    "{}: {msg}; the image is marked corrupt and no longer written (repair it with 'spindle img check -r all')",
                    path.display()
                );
                if !self.read_only {
                    let mut m = self.meta.lock().await;
                    m.hdr.incompatible |= INCOMPAT_CORRUPT;
                    if let Err(e) = m.write_header(&self.storage).await {
                        tracing::error!("{}: cannot set the corrupt bit: {e}", path.display());
                    }
                }
            }
        }
        r
    }

    /// Attaches the backing node (at open, before the image is shared).
    pub fn set_backing_node(&mut self, backing: Option<Box<Node>>) {
        self.backing = backing;
    }

    /// Whether a corruption was found (and marked) while open.
    pub fn is_corrupted(&self) -> bool {
        self.health.corrupted.load(Ordering::Acquire)
    }
}
