//! The node interface every driver implements, dispatched by enum.

use crate::error::{BlockError, Result};
use crate::fault::delay;
use crate::formats::{qcow2::Qcow2, raw::Raw};
use crate::info::ImageInfo;
use crate::status::{BlockStatus, Extent};
use crate::storage::Storage;
use spindle_io::SgList;
use std::path::Path;

/// One image of a backing chain: a format on a storage.
pub enum Node {
    /// A raw image: the storage's bytes (a file, a block device, an NBD
    /// export, `null:SIZE`).
    Raw(Raw),
    /// A qcow2 image.
    Qcow2(Box<Qcow2>),
}

fn range_check(offset: u64, len: u64, size: u64) -> Result<()> {
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(BlockError::OutOfRange { offset, len, size });
    }
    Ok(())
}

impl Node {
    /// The metadata cache and allocator counters of a qcow2 image (of
    /// this node, not of its backing files); `None` for raw.
    pub fn qcow2_counters(&self) -> Option<crate::formats::qcow2::Qcow2Counters> {
        match self {
            Node::Raw(_) => None,
            Node::Qcow2(q) => Some(q.counters()),
        }
    }

    /// Guest-visible size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Node::Raw(d) => d.size(),
            Node::Qcow2(d) => d.size(),
        }
    }

    /// The image's path (or spec, for `null`).
    pub fn path(&self) -> &Path {
        match self {
            Node::Raw(d) => d.path(),
            Node::Qcow2(d) => d.path(),
        }
    }

    /// The storage the image's bytes are in.
    pub fn storage(&self) -> &Storage {
        match self {
            Node::Raw(d) => d.storage(),
            Node::Qcow2(d) => d.storage(),
        }
    }

    /// The image file (none on other storage).
    pub fn file(&self) -> Option<&spindle_io::File> {
        self.storage().as_file()
    }

    /// Whether [`Node::map_extent`] costs nothing: no system call, no
    /// metadata lookup (a null device, all zeroes). A front end may then
    /// ask it before every read, however short (NBD hole chunks).
    pub fn status_is_free(&self) -> bool {
        matches!(self, Node::Raw(r) if matches!(r.storage(), crate::Storage::Null(_)))
    }

    /// Whether a read may find ranges that block status reports as
    /// zeroes (so a front end looking for holes before a read can find
    /// some): false only for a raw file known to have none.
    pub fn may_have_holes(&self) -> bool {
        match self {
            Node::Raw(r) => r.may_have_holes(),
            Node::Qcow2(_) => true,
        }
    }

    /// The backing node, if any.
    pub fn backing(&self) -> Option<&Node> {
        match self {
            Node::Qcow2(d) => d.backing(),
            _ => None,
        }
    }

    /// Whether writes are refused.
    pub fn is_read_only(&self) -> bool {
        match self {
            Node::Raw(d) => d.is_read_only(),
            Node::Qcow2(d) => d.is_read_only(),
        }
    }

    /// Whether only one thread may do I/O on this node: an NBD export
    /// without multi-conn has one connection, on the first thread that
    /// used it. Servers of such a node use one I/O thread.
    pub fn is_single_threaded(&self) -> bool {
        self.storage().is_single_threaded()
    }

    /// Format, size and format-specific facts.
    pub fn info(&self) -> ImageInfo {
        match self {
            // An NBD export shows as qemu-img shows it: raw data. `null:SIZE`
            // is a storage with no format above it in QEMU's terms.
            Node::Raw(d) => ImageInfo {
                format: match d.storage() {
                    Storage::Null(_) => "null",
                    _ => "raw",
                },
                virtual_size: d.size(),
                ..Default::default()
            },
            Node::Qcow2(d) => d.info(),
        }
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub async fn read(&self, offset: u64, buf: &SgList) -> Result<()> {
        range_check(offset, buf.len() as u64, self.size())?;
        if buf.is_empty() {
            return Ok(());
        }
        if let Some(wait) = delay::before(delay::Op::Read) {
            // Boxed: the test-only wait must not grow every request's future.
            Box::pin(wait).await;
        }
        match self {
            Node::Raw(d) => d.read(offset, buf).await,
            Node::Qcow2(d) => d.guard(d.read(offset, buf).await).await,
        }
    }

    /// Reads `buf.len()` bytes at `offset` into `buf`, through a buffer of
    /// its own (one copy; the data path reads into an [`SgList`]).
    pub async fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let sg = SgList::zeroed(buf.len());
        self.read(offset, &sg).await?;
        sg.copy_to(buf);
        Ok(())
    }

    /// Writes a copy of `buf` at `offset` (the data path writes an
    /// [`SgList`]).
    pub async fn write_from(&self, offset: u64, buf: &[u8], fua: bool) -> Result<()> {
        self.write(offset, &SgList::copy_of(buf), fua).await
    }

    /// Writes `buf` at `offset`; with `fua` it is durable on return.
    pub async fn write(&self, offset: u64, buf: &SgList, fua: bool) -> Result<()> {
        range_check(offset, buf.len() as u64, self.size())?;
        if buf.is_empty() {
            return Ok(());
        }
        if let Some(wait) = delay::before(delay::Op::Write) {
            Box::pin(wait).await;
        }
        match self {
            Node::Raw(d) => d.write(offset, buf, fua).await,
            Node::Qcow2(d) => d.guard(d.write(offset, buf, fua).await).await,
        }
    }

    /// Makes completed writes durable.
    pub async fn flush(&self) -> Result<()> {
        if let Some(wait) = delay::before(delay::Op::Flush) {
            Box::pin(wait).await;
        }
        match self {
            Node::Raw(d) => d.flush().await,
            Node::Qcow2(d) => d.guard(d.flush().await).await,
        }
    }

    /// Drops a range's data; it may read as zeroes or as the backing afterwards
    /// for raw, and as zeroes for qcow2 v3.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        range_check(offset, len, self.size())?;
        match self {
            Node::Raw(d) => d.discard(offset, len).await,
            Node::Qcow2(d) => d.guard(d.discard(offset, len).await).await,
        }
    }

    /// Makes a range read as zeroes; `may_unmap` allows freeing its storage.
    pub async fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        range_check(offset, len, self.size())?;
        match self {
            Node::Raw(d) => d.write_zeroes(offset, len, may_unmap).await,
            Node::Qcow2(d) => d.guard(d.write_zeroes(offset, len, may_unmap).await).await,
        }
    }

    /// Status of this node alone, for the range starting at `offset` and at
    /// most `len` long. Returns the status and how far it extends.
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<(BlockStatus, u64)> {
        let len = len.min(self.size().saturating_sub(offset));
        match self {
            Node::Raw(d) => d.block_status(offset, len).await,
            Node::Qcow2(d) => d.guard(d.block_status(offset, len).await).await,
        }
    }

    /// Status through the whole chain, as `qemu-img map` reports it.
    pub async fn map_extent(&self, offset: u64, len: u64) -> Result<Extent> {
        let mut node = self;
        let mut depth = 0;
        let mut len = len;
        loop {
            if let Node::Raw(r) = node {
                // Hole and zero are separate facts of a raw image's
                // storage, as qemu-img maps them.
                return r
                    .map_extent(offset, len.min(r.size().saturating_sub(offset)), depth)
                    .await;
            }
            let (st, n) = node.block_status(offset, len).await?;
            len = n;
            let ext = |data, zero, offset, compressed| Extent {
                len,
                data,
                zero,
                present: true,
                depth,
                offset,
                compressed,
            };
            match st {
                BlockStatus::Data { offset, compressed } => return Ok(ext(true, false, offset, compressed)),
                BlockStatus::Zero => return Ok(ext(false, true, None, false)),
                BlockStatus::Unallocated => match node.backing() {
                    Some(b) if offset < b.size() => {
                        node = b;
                        depth += 1;
                        len = len.min(b.size() - offset);
                    }
                    _ => {
                        return Ok(Extent {
                            len,
                            data: false,
                            zero: true,
                            present: false,
                            depth,
                            offset: None,
                            compressed: false,
                        })
                    }
                },
            }
        }
    }

    /// Changes the guest-visible size.
    pub async fn resize(&self, new_size: u64, allow_shrink: bool) -> Result<()> {
        if new_size < self.size() && !allow_shrink {
            return Err(BlockError::Invalid(format!(
                "{}: shrinking from {} to {} bytes needs --shrink (data past the new end is lost)",
                self.path().display(),
                self.size(),
                new_size
            )));
        }
        match self {
            Node::Raw(d) => d.resize(new_size),
            Node::Qcow2(d) => d.guard(d.resize(new_size).await).await,
        }
    }

    /// Writes back caches and marks the image clean. Call before dropping a
    /// writable node.
    pub async fn close(&self) -> Result<()> {
        match self {
            Node::Qcow2(d) => d.guard(d.close().await).await,
            other => other.flush().await,
        }
    }
}
