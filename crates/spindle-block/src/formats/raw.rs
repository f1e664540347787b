//! Raw images: the storage's bytes are the disk.

use crate::error::{BlockError, Result};
use crate::status::{BlockStatus, Extent};
use crate::storage::Storage;
use spindle_io::SgList;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A raw image.
pub struct Raw {
    storage: Storage,
    size: AtomicU64,
    /// The format was guessed, not stated: refuse writes that would make
    /// sector 0 look like another format (CVE-2008-2004).
    probed: bool,
    /// Whether a range may read as zeroes that block status would find
    /// (a hole, an unwritten or discarded range). False only for a file
    /// whose blocks covered all of it when opened and that nothing has
    /// discarded, zeroed with unmap or grown since: then looking for holes
    /// before a read (two `lseek`s) cannot find any.
    holes: AtomicBool,
}

/// Magic strings of formats a guest must not be able to forge in sector 0 of
/// a probed raw image.
const FORMAT_MAGICS: &[&[u8]] = &[
    b"QFI\xfb",                                 // qcow, qcow2
    b"QED\0",                                   // qed
    b"KDMV",                                    // vmdk
    b"# Disk Descriptor",                       // vmdk descriptor
    b"conectix",                                // vpc
    b"vhdxfile",                                // vhdx
    b"LUKS\xba\xbe",                            // luks
    b"WithoutFreeSpace",                        // parallels
    b"WithouFreSpacExt",                        // parallels
    b"<<< Oracle VM",                           // vdi
    b"<<< Sun",                                 // vdi
    b"<<< innotek",                             // vdi
    b"Bochs Virtual HD",                        // bochs
    b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop", // cloop
];

/// Whether `head` (the start of sector 0) looks like a non-raw image format.
pub fn looks_like_image_format(head: &[u8]) -> bool {
    FORMAT_MAGICS.iter().any(|m| head.starts_with(m))
}

impl Raw {
    /// Wraps an open storage. `probed` marks that the format was guessed.
    pub fn new(mut storage: Storage, probed: bool) -> Result<Raw> {
        if let Storage::File(f) = &mut storage {
            f.keep_exact_length();
        }
        let size = storage.len()?;
        let dense = matches!(&storage, Storage::File(_)) && storage.allocated_bytes().is_some_and(|a| a >= size);
        Ok(Raw {
            storage,
            size: AtomicU64::new(size),
            probed,
            holes: AtomicBool::new(!dense),
        })
    }
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }
    /// The storage's path.
    pub fn path(&self) -> &Path {
        self.storage.path()
    }
    /// Whether it is read-only.
    pub fn is_read_only(&self) -> bool {
        self.storage.is_read_only()
    }
    /// The storage underneath.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    pub(crate) async fn read(&self, offset: u64, buf: &SgList) -> Result<()> {
        self.storage.read(offset, buf).await
    }

    pub(crate) async fn write(&self, offset: u64, buf: &SgList, fua: bool) -> Result<()> {
        self.storage.check_writable()?;
        if self.probed && offset < 512 {
            let mut head = vec![0u8; buf.len().min(512 - offset as usize)];
            buf.slice(0, head.len()).copy_to(&mut head);
            let mut sector = vec![0u8; 512];
            sector[offset as usize..offset as usize + head.len()].copy_from_slice(&head);
            if offset == 0 && looks_like_image_format(&sector) {
                return Err(BlockError::Invalid(format!(
                    "{}: refusing a write that would make sector 0 look like an image format header; \
                     the format was probed, state it with format=raw to allow this",
                    self.path().display()
                )));
            }
        }
        self.storage.write(offset, buf, fua).await
    }

    pub(crate) async fn flush(&self) -> Result<()> {
        self.storage.flush().await
    }

    /// Whether a range may read as zeroes that block status would find
    /// (see the field): where not, a reader need not look for holes.
    pub fn may_have_holes(&self) -> bool {
        self.holes.load(Ordering::Relaxed)
    }

    pub(crate) async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.holes.store(true, Ordering::Relaxed);
        self.storage.discard(offset, len).await
    }

    pub(crate) async fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        // Zeroing may leave an unwritten or punched range even without
        // unmap (FALLOC_FL_ZERO_RANGE).
        self.holes.store(true, Ordering::Relaxed);
        self.storage.write_zeroes(offset, len, may_unmap).await
    }

    /// Everything is defined here: data, or zeroes where the storage
    /// knows them.
    pub(crate) async fn block_status(&self, offset: u64, len: u64) -> Result<(BlockStatus, u64)> {
        if len == 0 {
            return Ok((BlockStatus::Zero, 0));
        }
        let (a, n) = self.storage.allocation(offset, len).await?;
        let st = if a.zero {
            BlockStatus::Zero
        } else {
            BlockStatus::Data {
                offset: Some(offset),
                compressed: false,
            }
        };
        Ok((st, n))
    }

    /// A range as `qemu-img map` shows a raw image at `depth` of a chain:
    /// present, mapped at its own offset, data unless a hole, zero where
    /// the storage says so.
    pub(crate) async fn map_extent(&self, offset: u64, len: u64, depth: u32) -> Result<Extent> {
        let (a, n) = if len == 0 {
            (
                crate::status::Allocation {
                    data: true,
                    zero: false,
                },
                0,
            )
        } else {
            self.storage.allocation(offset, len).await?
        };
        Ok(Extent {
            len: n,
            data: a.data,
            zero: a.zero,
            present: true,
            depth,
            offset: Some(offset),
            compressed: false,
        })
    }

    pub(crate) fn resize(&self, size: u64) -> Result<()> {
        if size > self.size() {
            self.holes.store(true, Ordering::Relaxed);
        }
        self.storage.resize(size)?;
        self.size.store(size, Ordering::Relaxed);
        Ok(())
    }
}
