//! The io_uring engine.

use super::{new_eventfd, Engine, Unsupported};
use crate::op::Op;
use io_uring::{opcode, squeue, types, IoUring};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

/// io_uring with a registered completion eventfd.
pub struct UringEngine {
    ring: IoUring,
    efd: OwnedFd,
    queued: usize,
    in_flight: usize,
    /// Entries that found the submission queue full; they go in as it drains.
    waiting: VecDeque<squeue::Entry>,
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
            waiting: VecDeque::new(),
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
            Op::Discard { fd, offset, len } => {
                // The block layer reads the start from `addr` and the length
                // from `addr3`, the first 8 bytes of the command area.
                let mut cmd = [0u8; 16];
                cmd[..8].copy_from_slice(&len.to_le_bytes());
                opcode::UringCmd16::new(types::Fd(fd), crate::op::BLOCK_URING_CMD_DISCARD)
                    .addr(Some(offset))
                    .cmd(cmd)
                    .build()
            }
            Op::RecvMsg { fd, msg, flags } => opcode::RecvMsg::new(types::Fd(fd), msg).flags(flags as u32).build(),
            Op::SendMsg { fd, msg, flags } => opcode::SendMsg::new(types::Fd(fd), msg).flags(flags as u32).build(),
        }
    }
}

impl Engine for UringEngine {
    unsafe fn push(&mut self, token: u64, op: Op) -> Result<(), Unsupported> {
        let entry = Self::entry(op).user_data(token);
        self.in_flight += 1;
        // Keep order: once anything waits, later entries wait behind it.
        // SAFETY: the caller keeps op's buffers alive until its completion is reaped.
        if !self.waiting.is_empty() || unsafe { self.ring.submission().push(&entry) }.is_err() {
            self.waiting.push_back(entry);
        } else {
            self.queued += 1;
        }
        Ok(())
    }

    fn submit(&mut self) -> io::Result<()> {
        loop {
            // Move waiting entries into the submission queue while it has room.
            while let Some(e) = self.waiting.front() {
                // SAFETY: entries in `waiting` were pushed under the same contract.
                if unsafe { self.ring.submission().push(e) }.is_err() {
                    break;
                }
                self.waiting.pop_front();
                self.queued += 1;
            }
            // With completions parked in the kernel's overflow list, entering the
            // kernel (with GETEVENTS, which the crate adds) moves them to the ring.
            if self.queued == 0 && !self.ring.submission().cq_overflow() {
                return Ok(());
            }
            match self.ring.submit() {
                Ok(n) => self.queued = self.queued.saturating_sub(n),
                // Busy or interrupted: try again on the next loop iteration;
                // completions will wake the reactor. Never spin here.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::EAGAIN)
                    ) =>
                {
                    return Ok(())
                }
                Err(e) => return Err(e),
            }
            if self.waiting.is_empty() {
                return Ok(());
            }
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
