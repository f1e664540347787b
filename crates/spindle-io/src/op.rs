//! The operations an engine executes.

use std::os::fd::RawFd;

/// One I/O operation, as handed to an engine.
///
/// Buffers are referenced by raw `iovec` pointers: whoever builds an `Op` must
/// keep the iovec array and the memory it points to alive and unmoved until
/// the engine reports the op's completion. [`crate::Runtime::submit`] enforces
/// that for safe callers.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    /// `preadv(fd, iov, iovcnt, offset)`.
    Readv {
        /// File descriptor.
        fd: RawFd,
        /// iovec array.
        iov: *const libc::iovec,
        /// Number of iovecs.
        iovcnt: u32,
        /// File offset.
        offset: u64,
    },
    /// `pwritev2(fd, iov, iovcnt, offset, flags)`.
    Writev {
        /// File descriptor.
        fd: RawFd,
        /// iovec array.
        iov: *const libc::iovec,
        /// Number of iovecs.
        iovcnt: u32,
        /// File offset.
        offset: u64,
        /// `RWF_*` flags, e.g. `RWF_DSYNC` for FUA.
        flags: i32,
    },
    /// `fdatasync(fd)` (or `fsync` when `datasync` is false).
    Fsync {
        /// File descriptor.
        fd: RawFd,
        /// Only data and the metadata needed to read it back.
        datasync: bool,
    },
    /// `fallocate(fd, mode, offset, len)`.
    Fallocate {
        /// File descriptor.
        fd: RawFd,
        /// `FALLOC_FL_*` flags.
        mode: i32,
        /// Start.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Discards a range of a block device: `BLOCK_URING_CMD_DISCARD` under
    /// io_uring, the `BLKDISCARD` ioctl on a worker thread otherwise. The
    /// range is whole logical blocks.
    Discard {
        /// Block device descriptor.
        fd: RawFd,
        /// Start, in bytes.
        offset: u64,
        /// Length, in bytes.
        len: u64,
    },
    /// `recvmsg(fd, msg, flags)` on a socket. The net layer passes
    /// `MSG_DONTWAIT`, so the op never parks in the kernel.
    RecvMsg {
        /// Socket descriptor.
        fd: RawFd,
        /// The message header (its iovecs name the buffers).
        msg: *mut libc::msghdr,
        /// `MSG_*` flags.
        flags: i32,
    },
    /// `sendmsg(fd, msg, flags)` on a socket (`MSG_DONTWAIT | MSG_NOSIGNAL`
    /// from the net layer).
    SendMsg {
        /// Socket descriptor.
        fd: RawFd,
        /// The message header.
        msg: *const libc::msghdr,
        /// `MSG_*` flags.
        flags: i32,
    },
}

/// `_IO(0x12, 119)`: discard a byte range of a block device.
const BLKDISCARD: libc::c_ulong = 0x1277;
/// `_IO(0x12, 0)`: the io_uring command that does the same (Linux 6.12+).
pub(crate) const BLOCK_URING_CMD_DISCARD: u32 = 0x1200;

impl Op {
    /// Runs the op synchronously on the calling thread. Used by the thread-pool
    /// engine's workers and as the fallback for ops an engine cannot queue.
    /// Returns the result in the kernel's convention (negative errno).
    ///
    /// # Safety
    /// The iovec pointers must be valid as described on [`Op`].
    pub unsafe fn run_blocking(&self) -> i32 {
        let ret: i64 = match *self {
            Op::Readv {
                fd,
                iov,
                iovcnt,
                offset,
            } => {
                // SAFETY: the caller guarantees iov points to iovcnt valid iovecs.
                unsafe { libc::preadv(fd, iov, iovcnt as i32, offset as i64) as i64 }
            }
            Op::Writev {
                fd,
                iov,
                iovcnt,
                offset,
                flags,
            } => {
                // SAFETY: as above.
                unsafe { libc::pwritev2(fd, iov, iovcnt as i32, offset as i64, flags) as i64 }
            }
            Op::Fsync { fd, datasync } => {
                // SAFETY: plain syscalls on a descriptor, no memory involved.
                let r = unsafe {
                    if datasync {
                        libc::fdatasync(fd)
                    } else {
                        libc::fsync(fd)
                    }
                };
                r as i64
            }
            Op::Fallocate { fd, mode, offset, len } => {
                // SAFETY: plain syscall on a descriptor, no memory involved.
                unsafe { libc::fallocate(fd, mode, offset as i64, len as i64) as i64 }
            }
            Op::Discard { fd, offset, len } => {
                let range: [u64; 2] = [offset, len];
                // SAFETY: BLKDISCARD reads two u64s (start, length) from a
                // valid array; no other memory is involved.
                unsafe { libc::ioctl(fd, BLKDISCARD, range.as_ptr()) as i64 }
            }
            Op::RecvMsg { fd, msg, flags } => {
                // SAFETY: the caller guarantees msg and its iovecs are valid.
                unsafe { libc::recvmsg(fd, msg, flags) as i64 }
            }
            Op::SendMsg { fd, msg, flags } => {
                // SAFETY: as above.
                unsafe { libc::sendmsg(fd, msg, flags) as i64 }
            }
        };
        if ret < 0 {
            -std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
        } else {
            ret.min(i32::MAX as i64) as i32
        }
    }
}
