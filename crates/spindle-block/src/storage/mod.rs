//! The storage (protocol) layer: where a format's bytes live.
//!
//! As QEMU separates protocol drivers (`file`, `nbd`, `null-co`, `rbd`)
//! from format drivers (`raw`, `qcow2`), a format here holds a [`Storage`]
//! and does all its I/O through it, setup reads included: a raw image is
//! the storage's bytes as they are, a qcow2 image keeps its header, tables
//! and clusters in them. So every format runs on every storage (qcow2 on
//! an NBD export, as QEMU allows).
//!
//! [`Storage`] is an enum, matched once per call: the data path stays
//! static dispatch, and data moves between the caller's [`SgList`] and the
//! backend directly (zero-copy where the backend allows it, as
//! `spindle_io::File` does). The NBD client's request futures are boxed
//! (about 1.5 KiB, against 240 bytes for a file read): inline, every
//! request future of every format on every storage would be that large,
//! qcow2's with one such future for each metadata read it nests. An NBD
//! request allocates its header and reply buffers anyway.
//!
//! The backends:
//! - `file`: a file or block device through [`spindle_io::File`]
//!   (io_uring, native AIO or the thread pool; QEMU's cache modes and
//!   image locks).
//! - `null`: `null:SIZE`, reads zeroes and drops writes.
//! - `nbd`: an export of an NBD server ([`crate::protocols::nbd`]).
//! - `rbd`: a Ceph RBD image through librbd ([`crate::protocols::rbd`]):
//!   asynchronous vectored I/O completed on the submitting thread,
//!   `rbd_read` for [`Storage::read_blocking`], `rbd_diff_iterate2` (on a
//!   helper thread) for [`Storage::allocation`], `rbd_resize` for
//!   [`Storage::resize`]. Its futures are boxed as the NBD client's are.

mod file;
pub mod null;

use crate::error::{BlockError, Result};
use crate::protocols::nbd::Nbd;
use crate::protocols::rbd::Rbd;
use crate::status::Allocation;
use null::Null;
use spindle_io::{AlignedBuf, File, SgList};
use std::path::Path;

/// Where an image's bytes are stored.
pub enum Storage {
    /// A file or block device.
    File(File),
    /// Zeroes of a given size; writes are dropped.
    Null(Null),
    /// An NBD export.
    Nbd(Box<Nbd>),
    /// A Ceph RBD image.
    Rbd(Box<Rbd>),
}

impl Storage {
    /// The driver's name, as QEMU's protocol drivers are named.
    pub fn driver(&self) -> &'static str {
        match self {
            Storage::File(_) => "file",
            Storage::Null(_) => "null",
            Storage::Nbd(_) => "nbd",
            Storage::Rbd(_) => "rbd",
        }
    }

    /// The path, URI or spec it was opened from.
    pub fn path(&self) -> &Path {
        match self {
            Storage::File(f) => f.path(),
            Storage::Null(n) => n.path(),
            Storage::Nbd(n) => n.path(),
            Storage::Rbd(r) => r.path(),
        }
    }

    /// The file, for what only a file has (cache mode, disk usage).
    pub fn as_file(&self) -> Option<&File> {
        match self {
            Storage::File(f) => Some(f),
            _ => None,
        }
    }

    /// Whether writes are refused.
    pub fn is_read_only(&self) -> bool {
        match self {
            Storage::File(f) => f.is_read_only(),
            Storage::Null(_) => false,
            Storage::Nbd(n) => n.is_read_only(),
            Storage::Rbd(r) => r.is_read_only(),
        }
    }

    /// Refuses writes to a read-only storage, saying why.
    pub fn check_writable(&self) -> Result<()> {
        match self {
            Storage::File(f) if f.is_read_only() => Err(BlockError::ReadOnly {
                path: f.path().into(),
                reason: String::new(),
            }),
            Storage::Nbd(n) => n.check_writable(),
            Storage::Rbd(r) => r.check_writable(),
            _ => Ok(()),
        }
    }

    /// Whether only one thread may do I/O on it: an NBD export without
    /// multi-conn has one connection, on the first thread that used it.
    pub fn is_single_threaded(&self) -> bool {
        match self {
            Storage::Nbd(n) => !n.export().has(crate::protocols::nbd::wire::tflag::CAN_MULTI_CONN),
            _ => false,
        }
    }

    /// A block device's discard granularity and largest discard, in
    /// bytes (for the virtio-blk configuration); `None` otherwise.
    pub fn discard_limits(&self) -> Option<(u64, u64)> {
        self.as_file().and_then(File::discard_limits)
    }

    /// Memory alignment that buffers for it should have (O_DIRECT).
    pub fn mem_align(&self) -> usize {
        match self {
            Storage::File(f) => f.alignment().mem,
            _ => 1,
        }
    }

    /// Whether every write is durable on completion (write-through cache
    /// modes), so a format must flush its metadata with each change too.
    pub fn write_through(&self) -> bool {
        match self {
            Storage::File(f) => f.cache().write_through(),
            _ => false,
        }
    }

    /// Current length in bytes.
    pub fn len(&self) -> Result<u64> {
        match self {
            Storage::File(f) => file::len(f),
            Storage::Null(n) => Ok(n.size()),
            Storage::Nbd(n) => Ok(n.size()),
            Storage::Rbd(r) => Ok(r.size()),
        }
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Bytes the host really uses for it, where known (files).
    pub fn allocated_bytes(&self) -> Option<u64> {
        self.as_file().and_then(|f| f.allocated_bytes().ok())
    }

    /// Reads `buf.len()` bytes at `offset`, straight into `buf`; bytes
    /// past the end read as zeroes.
    pub async fn read(&self, offset: u64, buf: &SgList) -> Result<()> {
        match self {
            Storage::File(f) => f.read_sg(offset, buf).await.map_err(file::err(f, "read failed")),
            Storage::Null(_) => {
                buf.fill_zero();
                Ok(())
            }
            Storage::Nbd(n) => {
                let inside = clamp(offset, buf.len(), n.size());
                buf.slice(inside, buf.len() - inside).fill_zero();
                if inside == 0 {
                    return Ok(());
                }
                Box::pin(n.read(offset, &buf.slice(0, inside))).await
            }
            Storage::Rbd(r) => {
                let inside = clamp(offset, buf.len(), r.size());
                buf.slice(inside, buf.len() - inside).fill_zero();
                if inside == 0 {
                    return Ok(());
                }
                Box::pin(r.read(offset, &buf.slice(0, inside))).await
            }
        }
    }

    /// Writes all of `buf` at `offset`; with `fua` it is durable on return.
    pub async fn write(&self, offset: u64, buf: &SgList, fua: bool) -> Result<()> {
        match self {
            Storage::File(f) => f.write_sg(offset, buf, fua).await.map_err(file::err(f, "write failed")),
            Storage::Null(_) => Ok(()),
            Storage::Nbd(n) => {
                fits(offset, buf.len() as u64, n.size())?;
                Box::pin(n.write(offset, buf, fua)).await
            }
            Storage::Rbd(r) => {
                fits(offset, buf.len() as u64, r.size())?;
                Box::pin(r.write(offset, buf, fua)).await
            }
        }
    }

    /// Makes completed writes durable.
    pub async fn flush(&self) -> Result<()> {
        match self {
            Storage::File(f) => f.flush().await.map_err(file::err(f, "flush failed")),
            Storage::Null(_) => Ok(()),
            Storage::Nbd(n) => Box::pin(n.flush()).await,
            Storage::Rbd(r) => Box::pin(r.flush()).await,
        }
    }

    /// Drops a range's data (advisory: it may stay).
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        match self {
            Storage::File(f) => file::discard(f, offset, len).await,
            Storage::Null(_) => Ok(()),
            Storage::Nbd(n) => {
                fits(offset, len, n.size())?;
                Box::pin(n.discard(offset, len)).await
            }
            Storage::Rbd(r) => {
                fits(offset, len, r.size())?;
                Box::pin(r.discard(offset, len)).await
            }
        }
    }

    /// Makes a range read as zeroes; `may_unmap` lets it free the storage.
    pub async fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.check_writable()?;
        match self {
            Storage::File(f) => f
                .write_zeroes(offset, len, may_unmap)
                .await
                .map_err(file::err(f, "write zeroes failed")),
            Storage::Null(_) => Ok(()),
            Storage::Nbd(n) => {
                fits(offset, len, n.size())?;
                Box::pin(n.write_zeroes(offset, len, may_unmap)).await
            }
            Storage::Rbd(r) => {
                fits(offset, len, r.size())?;
                Box::pin(r.write_zeroes(offset, len, may_unmap)).await
            }
        }
    }

    /// Reserves space for a range (`fallocate`); a no-op where the
    /// backend has no such thing.
    pub async fn allocate(&self, offset: u64, len: u64) -> Result<()> {
        match self {
            Storage::File(f) => f.allocate(offset, len).await.map_err(file::err(f, "fallocate failed")),
            Storage::Null(_) | Storage::Nbd(_) | Storage::Rbd(_) => Ok(()),
        }
    }

    /// Whether the range starting at `offset` (at most `len`, `len` > 0)
    /// holds data and whether it reads as zeroes, and how far that holds.
    pub async fn allocation(&self, offset: u64, len: u64) -> Result<(Allocation, u64)> {
        match self {
            Storage::File(f) => Ok(file::allocation(f, offset, len)),
            Storage::Null(_) => Ok((
                Allocation {
                    data: false,
                    zero: true,
                },
                len,
            )),
            Storage::Nbd(n) => Box::pin(n.allocation(offset, len)).await,
            Storage::Rbd(r) => Box::pin(r.allocation(offset, len)).await,
        }
    }

    /// Changes the length to exactly `size`, where the backend can.
    pub fn resize(&self, size: u64) -> Result<()> {
        self.check_writable()?;
        match self {
            Storage::File(f) => file::resize(f, size),
            Storage::Null(n) => {
                n.resize(size);
                Ok(())
            }
            Storage::Nbd(n) => Err(BlockError::Invalid(format!(
                "{}: an NBD export cannot be resized from the client",
                n.path().display()
            ))),
            Storage::Rbd(r) => r.resize(size),
        }
    }

    /// Makes it at least `size` bytes long (a format that allocates past
    /// the end); an NBD export has its size, and only fits what fits; an
    /// RBD image grows in large steps.
    pub fn grow_to(&self, size: u64) -> Result<()> {
        match self {
            Storage::File(f) if file::len(f)? < size => file::resize(f, size),
            Storage::File(_) => Ok(()),
            Storage::Null(n) => {
                n.resize(n.size().max(size));
                Ok(())
            }
            Storage::Nbd(n) => fits(0, size, n.size()),
            Storage::Rbd(r) => r.grow_to(size),
        }
    }

    /// Ends what it holds beyond its descriptor (an NBD export's
    /// connections). The caller flushed first.
    pub async fn close(&self) -> Result<()> {
        match self {
            Storage::Nbd(n) => Box::pin(n.close()).await,
            _ => Ok(()),
        }
    }

    /// Reads `len` bytes at `offset` into a new buffer, aligned for it.
    pub async fn read_buf(&self, offset: u64, len: usize) -> Result<AlignedBuf> {
        let sg = SgList::owned(AlignedBuf::new(len, self.mem_align().max(512)));
        self.read(offset, &sg).await?;
        Ok(sg.into_buf().expect("no I/O holds a finished read's buffer"))
    }

    /// Reads into `buf` (through a buffer of its own: the borrowed slice
    /// is never handed to the kernel).
    pub async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let b = self.read_buf(offset, buf.len()).await?;
        buf.copy_from_slice(&b);
        Ok(())
    }

    /// Writes a copy of `buf` at `offset`.
    pub async fn write_at(&self, offset: u64, buf: &[u8], fua: bool) -> Result<()> {
        let mut b = AlignedBuf::new(buf.len(), self.mem_align().max(512));
        b.copy_from_slice(buf);
        self.write(offset, &SgList::owned(b), fua).await
    }

    /// Setup-time read that blocks the thread (opening an image, probing
    /// its format): `buf` filled from `offset`; returns the bytes read,
    /// fewer only at the end.
    pub fn read_blocking(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        match self {
            Storage::File(f) => f.read_blocking(offset, buf).map_err(file::err(f, "read failed")),
            Storage::Null(n) => {
                let inside = clamp(offset, buf.len(), n.size());
                buf[..inside].fill(0);
                Ok(inside)
            }
            Storage::Nbd(n) => {
                let inside = clamp(offset, buf.len(), n.size());
                n.read_blocking(offset, &mut buf[..inside])?;
                Ok(inside)
            }
            Storage::Rbd(r) => {
                let inside = clamp(offset, buf.len(), r.size());
                r.read_blocking(offset, &mut buf[..inside])?;
                Ok(inside)
            }
        }
    }

    /// [`Storage::read_blocking`] of all of `buf`: the end of the storage
    /// before it is an error.
    pub fn read_exact_blocking(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if self.read_blocking(offset, buf)? < buf.len() {
            return Err(BlockError::Io {
                path: self.path().into(),
                context: "read failed",
                source: std::io::ErrorKind::UnexpectedEof.into(),
            });
        }
        Ok(())
    }
}

/// How many of `len` bytes at `offset` lie before `size`.
fn clamp(offset: u64, len: usize, size: u64) -> usize {
    size.saturating_sub(offset).min(len as u64) as usize
}

/// Refuses a range past the end of a storage of fixed size.
fn fits(offset: u64, len: u64, size: u64) -> Result<()> {
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(BlockError::OutOfRange { offset, len, size });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
