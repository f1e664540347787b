//! The `file` backend's own rules: block devices, holes, length.

use crate::error::{io_err, BlockError, Result};
use crate::status::Allocation;
use spindle_io::File;

/// An I/O error of `f`, with what was being done.
pub(super) fn err<'a>(f: &'a File, context: &'static str) -> impl FnOnce(std::io::Error) -> BlockError + 'a {
    io_err(f.path(), context)
}

pub(super) fn len(f: &File) -> Result<u64> {
    f.len().map_err(err(f, "cannot get size"))
}

/// Punches a hole in a file; on a block device, the device's own discard
/// (thin LVM volumes and SSDs get the space back), without blocking.
pub(super) async fn discard(f: &File, offset: u64, len: u64) -> Result<()> {
    if f.is_block_device() {
        return f.discard_device(offset, len).await.map_err(err(f, "discard failed"));
    }
    f.punch_hole(offset, len).await.map_err(err(f, "discard failed"))
}

pub(super) fn resize(f: &File, size: u64) -> Result<()> {
    if f.is_block_device() {
        return Err(BlockError::Invalid(format!(
            "{}: cannot resize a block device",
            f.path().display()
        )));
    }
    f.set_len(size).map_err(err(f, "resize failed"))
}

/// Data and holes from SEEK_DATA/SEEK_HOLE; a block device is all data.
pub(super) fn allocation(f: &File, offset: u64, len: u64) -> (Allocation, u64) {
    const DATA: Allocation = Allocation {
        data: true,
        zero: false,
    };
    const HOLE: Allocation = Allocation {
        data: false,
        zero: true,
    };
    if f.is_block_device() {
        return (DATA, len);
    }
    let fd = f.raw_fd();
    // SAFETY: lseek on a descriptor the File keeps open.
    let data = unsafe { libc::lseek(fd, offset as i64, libc::SEEK_DATA) };
    if data < 0 || data as u64 > offset {
        // In a hole (ENXIO: hole up to EOF).
        let end = if data < 0 {
            offset + len
        } else {
            (data as u64).min(offset + len)
        };
        return (HOLE, end - offset);
    }
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(fd, offset as i64, libc::SEEK_HOLE) };
    let end = if hole < 0 {
        offset + len
    } else {
        (hole as u64).min(offset + len)
    };
    (DATA, (end - offset).max(1).min(len))
}
