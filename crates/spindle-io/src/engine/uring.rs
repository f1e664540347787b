//! The io_uring engine.

use super::{new_eventfd, Engine, Unsupported};
use crate::op::Op;
use io_uring::{opcode, squeue, types, IoUring};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

/// io_uring with a registered completion eventfd.
pub struct UringEngine {
    ring: IoUring,
    efd: OwnedFd,
    queued: usize,
    in_flight: usize,
}

impl UringEngine {
    /// Creates a ring with `depth` submission entries.
    pub fn new(depth: u32) -> io::Result<Self> {
        let depth = depth.clamp(8, 4096).next_power_of_two();
        let ring = IoUring::builder().setup_cqsize(depth * 8).build(depth)?;
        let efd = new_eventfd()?;
        ring.submitter().register_eventfd(efd.as_raw_fd())?;
        Ok(UringEngine {
            ring,
            efd,
            queued: 0,
            in_flight: 0,
        })
    }

    fn entry(op: Op) -> squeue::Entry {
        match op {
            Op::Readv {
                fd,
                iov,
                iovcnt,
                offset,
            } => opcode::Readv::new(types::Fd(fd), iov, iovcnt).offset(offset).build(),
            Op::Writev {
                fd,
                iov,
                iovcnt,
                offset,
                flags,
            } => opcode::Writev::new(types::Fd(fd), iov, iovcnt)
                .offset(offset)
                .rw_flags(flags)
                .build(),
            Op::Fsync { fd, datasync } => {
                let flags = if datasync {
                    types::FsyncFlags::DATASYNC
                } else {
                    types::FsyncFlags::empty()
                };
                opcode::Fsync::new(types::Fd(fd)).flags(flags).build()
            }
            Op::Fallocate { fd, mode, offset, len } => opcode::Fallocate::new(types::Fd(fd), len)
                .offset(offset)
                .mode(mode)
                .build(),
        }
    }
}

impl Engine for UringEngine {
    unsafe fn push(&mut self, token: u64, op: Op) -> Result<(), Unsupported> {
        let entry = Self::entry(op).user_data(token);
        loop {
            // SAFETY: the caller keeps op's buffers alive until its completion is reaped.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                self.queued += 1;
                self.in_flight += 1;
                return Ok(());
            }
            // Submission queue full: hand the batch to the kernel and retry.
            if self.submit().is_err() {
                // EBUSY/EAGAIN: reap to make room; completions are kept by the kernel.
                std::thread::yield_now();
            }
        }
    }

    fn submit(&mut self) -> io::Result<()> {
        // With completions parked in the kernel's overflow list, entering the
        // kernel (with GETEVENTS, which the crate adds) moves them to the ring.
        if self.queued == 0 && !self.ring.submission().cq_overflow() {
            return Ok(());
        }
        match self.ring.submit() {
            Ok(n) => {
                self.queued = self.queued.saturating_sub(n);
                Ok(())
            }
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn reap(&mut self, out: &mut Vec<(u64, i32)>) {
        loop {
            for cqe in self.ring.completion() {
                out.push((cqe.user_data(), cqe.result()));
                self.in_flight -= 1;
            }
            if !self.ring.submission().cq_overflow() || self.ring.submit().is_err() {
                return;
            }
        }
    }

    fn event_fd(&self) -> RawFd {
        self.efd.as_raw_fd()
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }
}
