//! Creating qcow2 images with qemu-img's options.

use super::header::{Compression, Header, COMPAT_LAZY_REFCOUNTS, INCOMPAT_COMPRESSION, INCOMPAT_EXTL2};
use super::meta::COPIED;
use super::{Qcow2, Qcow2Options};
use crate::error::{doing, io_err, BlockError, Result};
use crate::node::Node;
use crate::storage::Storage;
use spindle_io::{CacheMode, File, OpenOptions};
use std::path::Path;

/// qemu-img's `preallocation` option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Nothing allocated.
    #[default]
    Off,
    /// L2 tables and data clusters allocated, file sparse.
    Metadata,
    /// As metadata, plus fallocate of the data.
    Falloc,
    /// As metadata, plus zeroes written.
    Full,
}

impl std::str::FromStr for Preallocation {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "off" => Preallocation::Off,
            "metadata" => Preallocation::Metadata,
            "falloc" => Preallocation::Falloc,
            "full" => Preallocation::Full,
            _ => {
                return Err(format!(
                    "invalid preallocation mode '{s}' (off, metadata, falloc, full)"
                ))
            }
        })
    }
}

/// `-o` options of `create` for qcow2.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size in bytes.
    pub size: u64,
    /// Cluster size (512 B .. 2 MiB).
    pub cluster_size: u64,
    /// 2 (compat=0.10) or 3 (compat=1.1).
    pub version: u32,
    /// 1..64, a power of two.
    pub refcount_bits: u32,
    /// Lazy refcounts (v3).
    pub lazy_refcounts: bool,
    /// Extended L2 (v3, clusters >= 16 KiB).
    pub extended_l2: bool,
    /// Compression type (zstd needs v3).
    pub compression: Compression,
    /// Preallocation.
    pub preallocation: Preallocation,
    /// Backing file name, stored as given.
    pub backing_file: Option<String>,
    /// Backing format name.
    pub backing_format: Option<String>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 65536,
            version: 3,
            refcount_bits: 16,
            lazy_refcounts: false,
            extended_l2: false,
            compression: Compression::Zlib,
            preallocation: Preallocation::Off,
            backing_file: None,
            backing_format: None,
        }
    }
}

impl CreateOptions {
    /// Checks the options against each other, as qemu-img does.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let cs = self.cluster_size;
        if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
            return Err(format!("cluster size {cs} must be a power of two between 512 and 2M"));
        }
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return Err(format!(
                "refcount_bits {} must be a power of two up to 64",
                self.refcount_bits
            ));
        }
        if self.version == 2 && self.refcount_bits != 16 {
            return Err("compat=0.10 supports only refcount_bits=16".into());
        }
        if self.version == 2 && (self.lazy_refcounts || self.extended_l2 || self.compression != Compression::Zlib) {
            return Err("lazy_refcounts, extended_l2 and compression_type=zstd need compat=1.1".into());
        }
        if self.extended_l2 && cs < 16384 {
            return Err("extended_l2 needs a cluster size of at least 16K".into());
        }
        if self.backing_file.is_some() && self.preallocation != Preallocation::Off {
            return Err("preallocation is not supported with a backing file".into());
        }
        Ok(())
    }
}

/// The first three clusters of a new image: header, a one-cluster
/// refcount table, and one refcount block that records them.
fn initial_clusters(path: &Path, opts: &CreateOptions) -> Result<(Vec<u8>, u64)> {
    opts.validate()
        .map_err(|m| BlockError::Invalid(format!("{}: {m}", path.display())))?;
    let cs = opts.cluster_size;
    let cluster_bits = cs.trailing_zeros();
    let mut incompatible = 0;
    if opts.extended_l2 {
        incompatible |= INCOMPAT_EXTL2;
    }
    if opts.compression == Compression::Zstd {
        incompatible |= INCOMPAT_COMPRESSION;
    }
    let hdr = Header {
        version: opts.version,
        cluster_bits,
        size: 0,
        l1_size: 0,
        l1_table_offset: 0,
        refcount_table_offset: cs,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible,
        compatible: if opts.lazy_refcounts { COMPAT_LAZY_REFCOUNTS } else { 0 },
        autoclear: 0,
        refcount_order: opts.refcount_bits.trailing_zeros(),
        compression: opts.compression,
        backing_file: opts.backing_file.clone(),
        backing_format: opts.backing_format.clone(),
        other_extensions: Vec::new(),
        feature_names: Vec::new(),
    };
    let mut img = hdr
        .serialize()
        .map_err(|m| BlockError::Invalid(format!("{}: {m}", path.display())))?;
    img.resize(3 * cs as usize, 0);
    img[cs as usize..cs as usize + 8].copy_from_slice(&(2 * cs).to_be_bytes());
    let rb = &mut img[2 * cs as usize..];
    for i in 0..3 {
        super::cache::set_refcount(rb, hdr.refcount_order, i, 1);
    }
    Ok((img, cs))
}

/// Creates a qcow2 image at `path`. Runs on the current runtime.
pub async fn create(path: &Path, opts: &CreateOptions) -> Result<()> {
    let (img, cs) = initial_clusters(path, opts)?;
    // Created (and truncated) only once the creator's lock is held, so an
    // image in use elsewhere is refused before anything changes.
    {
        let created = File::open(
            path,
            OpenOptions {
                cache: CacheMode::Writeback,
                read_only: false,
                create: true,
            },
        )?;
        // The refcount table and block first, the header last: a crash
        // (even inside one large write) leaves a file that is no qcow2
        // yet, never a header whose refcount block is missing.
        let (head, rest) = img.split_at(cs as usize);
        for (off, part) in [(cs, rest), (0, head)] {
            created
                .write_at(off, part, false)
                .await
                .map_err(io_err(path, "cannot create"))?;
            created.flush().await.map_err(io_err(path, "cannot create"))?;
        }
    }

    let file = File::open(
        path,
        OpenOptions {
            cache: CacheMode::Writeback,
            read_only: false,
            create: false,
        },
    )?;
    finish(Storage::File(file), opts).await
}

/// Creates a qcow2 image in a storage that exists (an RBD image, as
/// QEMU's qcow2 on its `rbd` driver): it grows as the image does.
pub async fn create_on(storage: Storage, opts: &CreateOptions) -> Result<()> {
    if opts.backing_file.is_some() {
        return Err(BlockError::Invalid(format!(
            "{}: a qcow2 image on {} storage cannot have a backing file (Spindle opens backing files only of local images)",
            storage.path().display(),
            storage.driver()
        )));
    }
    let path = storage.path().to_path_buf();
    let (img, cs) = initial_clusters(&path, opts)?;
    storage.grow_to(3 * cs)?;
    // As in `create`: the refcount structures first, the header last.
    let (head, rest) = img.split_at(cs as usize);
    for (off, part) in [(cs, rest), (0, head)] {
        storage.write_at(off, part, false).await?;
        storage.flush().await?;
    }
    finish(storage, opts).await
}

/// Opens the new image, sizes it and preallocates what was asked.
async fn finish(storage: Storage, opts: &CreateOptions) -> Result<()> {
    let q = Qcow2::open(storage, None, Qcow2Options::default())?;
    let node = Node::Qcow2(Box::new(q));
    node.resize(opts.size, false).await?;
    if opts.preallocation != Preallocation::Off {
        let Node::Qcow2(q) = &node else {
            unreachable!("created as qcow2")
        };
        preallocate(q, opts.preallocation).await?;
    }
    node.close().await
}

/// Allocates every data cluster in order, so the data is contiguous.
async fn preallocate(q: &Qcow2, mode: Preallocation) -> Result<()> {
    let cs = q.cluster_size();
    let clusters = q.size().div_ceil(cs);
    let mut m = q.lock_meta().await;
    let l2_bits = m.hdr.l2_bits();
    let full = if q.ext_l2 { u32::MAX as u64 } else { 0 };
    let mut gc = 0;
    while gc < clusters {
        // One L2 table's worth at a time: table first, then its data run.
        let n = ((1u64 << l2_bits) - (gc & ((1 << l2_bits) - 1))).min(clusters - gc);
        m.set_l2(&q.storage, gc, 0, 0).await?;
        let base = m.alloc_clusters(&q.storage, n).await?;
        for i in 0..n {
            m.set_l2(&q.storage, gc + i, (base + i * cs) | COPIED, full).await?;
        }
        let end = base + n * cs;
        match mode {
            Preallocation::Falloc => q
                .storage
                .allocate(base, n * cs)
                .await
                .map_err(doing("fallocate failed"))?,
            Preallocation::Full => {
                q.storage
                    .write_zeroes(base, n * cs, false)
                    .await
                    .map_err(doing("preallocation failed"))?;
                q.storage
                    .allocate(base, n * cs)
                    .await
                    .map_err(doing("fallocate failed"))?
            }
            _ => {}
        }
        q.storage.grow_to(end).map_err(doing("cannot extend"))?;
        gc += n;
    }
    m.flush(&q.storage).await
}
