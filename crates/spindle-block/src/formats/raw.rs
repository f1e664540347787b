//! Raw images: a file or block device whose bytes are the disk.

use crate::error::{io_err, BlockError, Result};
use crate::status::BlockStatus;
use spindle_io::File;
use spindle_io::SgList;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// A raw image.
pub struct Raw {
    file: File,
    size: AtomicU64,
    /// The format was guessed, not stated: refuse writes that would make
    /// sector 0 look like another format (CVE-2008-2004).
    probed: bool,
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
    /// Wraps an open file. `probed` marks that the format was guessed.
    pub fn new(mut file: File, probed: bool) -> Result<Raw> {
        file.keep_exact_length();
        let size = file.len().map_err(io_err(file.path(), "cannot get size"))?;
        Ok(Raw {
            file,
            size: AtomicU64::new(size),
            probed,
        })
    }
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }
    /// The file's path.
    pub fn path(&self) -> &Path {
        self.file.path()
    }
    /// Whether it is read-only.
    pub fn is_read_only(&self) -> bool {
        self.file.is_read_only()
    }
    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn writable(&self) -> Result<()> {
        if self.file.is_read_only() {
            return Err(BlockError::ReadOnly {
                path: self.path().into(),
                reason: String::new(),
            });
        }
        Ok(())
    }

    pub(crate) async fn read(&self, offset: u64, buf: &SgList) -> Result<()> {
        self.file
            .read_sg(offset, buf)
            .await
            .map_err(io_err(self.path(), "read failed"))
    }

    pub(crate) async fn write(&self, offset: u64, buf: &SgList, fua: bool) -> Result<()> {
        self.writable()?;
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
        self.file
            .write_sg(offset, buf, fua)
            .await
            .map_err(io_err(self.path(), "write failed"))
    }

    pub(crate) async fn flush(&self) -> Result<()> {
        self.file.flush().await.map_err(io_err(self.path(), "flush failed"))
    }

    pub(crate) async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.writable()?;
        if self.file.is_block_device() {
            return Ok(()); // advisory; BLKDISCARD support can come with device passthrough
        }
        self.file
            .punch_hole(offset, len)
            .await
            .map_err(io_err(self.path(), "discard failed"))
    }

    pub(crate) async fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.writable()?;
        self.file
            .write_zeroes(offset, len, may_unmap)
            .await
            .map_err(io_err(self.path(), "write zeroes failed"))
    }

    /// Data/hole status from SEEK_DATA/SEEK_HOLE.
    pub(crate) fn block_status(&self, offset: u64, len: u64) -> Result<(BlockStatus, u64)> {
        if self.file.is_block_device() {
            return Ok((
                BlockStatus::Data {
                    offset: Some(offset),
                    compressed: false,
                },
                len,
            ));
        }
        let fd = self.file.raw_fd();
        // SAFETY: lseek on our own descriptor.
        let data = unsafe { libc::lseek(fd, offset as i64, libc::SEEK_DATA) };
        if data < 0 || data as u64 > offset {
            // In a hole (ENXIO: hole up to EOF).
            let end = if data < 0 {
                offset + len
            } else {
                (data as u64).min(offset + len)
            };
            return Ok((BlockStatus::Zero, end - offset));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, offset as i64, libc::SEEK_HOLE) };
        let end = if hole < 0 {
            offset + len
        } else {
            (hole as u64).min(offset + len)
        };
        Ok((
            BlockStatus::Data {
                offset: Some(offset),
                compressed: false,
            },
            (end - offset).max(1).min(len),
        ))
    }

    pub(crate) fn resize(&self, size: u64) -> Result<()> {
        self.writable()?;
        if self.file.is_block_device() {
            return Err(BlockError::Invalid(format!(
                "{}: cannot resize a block device",
                self.path().display()
            )));
        }
        self.file.set_len(size).map_err(io_err(self.path(), "resize failed"))?;
        self.size.store(size, Ordering::Relaxed);
        Ok(())
    }
}
