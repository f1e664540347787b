//! Linux native AIO (`io_submit`/`io_getevents`), completions signalled on an eventfd.

use super::{new_eventfd, Engine, Unsupported};
use crate::op::Op;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

const IOCB_CMD_FSYNC: u16 = 2;
const IOCB_CMD_FDSYNC: u16 = 3;
const IOCB_CMD_PREADV: u16 = 7;
const IOCB_CMD_PWRITEV: u16 = 8;
const IOCB_FLAG_RESFD: u32 = 1;

/// The kernel's `struct iocb` (x86_64 / little-endian layout).
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct Iocb {
    aio_data: u64,
    aio_key: u32,
    aio_rw_flags: i32,
    aio_lio_opcode: u16,
    aio_reqprio: i16,
    aio_fildes: u32,
    aio_buf: u64,
    aio_nbytes: u64,
    aio_offset: i64,
    aio_reserved2: u64,
    aio_flags: u32,
    aio_resfd: u32,
}

/// The kernel's `struct io_event`.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct IoEvent {
    data: u64,
    obj: u64,
    res: i64,
    res2: i64,
}

/// A Linux AIO context. Iocbs live in a fixed arena indexed by slot so their
/// addresses stay stable while the kernel holds them.
pub struct AioEngine {
    ctx: libc::c_ulong,
    efd: OwnedFd,
    iocbs: Box<[Iocb]>,
    tokens: Vec<u64>,
    free: Vec<usize>,
    pending: VecDeque<usize>,
    in_flight: usize,
    events: Vec<IoEvent>,
    /// Completions found outside `reap` (submit errors).
    backlog: Vec<(u64, i32)>,
    /// Ops that found every iocb slot taken; they get slots as ops complete.
    overflow: VecDeque<(u64, Op)>,
}

impl AioEngine {
    /// Sets up a context for `depth` ops in flight.
    pub fn new(depth: u32) -> io::Result<Self> {
        let depth = depth.clamp(8, 4096) as usize;
        let mut ctx: libc::c_ulong = 0;
        // SAFETY: io_setup writes the context id into ctx.
        let r = unsafe {
            libc::syscall(
                libc::SYS_io_setup,
                depth as libc::c_long,
                &mut ctx as *mut libc::c_ulong,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(AioEngine {
            ctx,
            efd: new_eventfd()?,
            iocbs: vec![Iocb::default(); depth].into_boxed_slice(),
            tokens: vec![0; depth],
            free: (0..depth).rev().collect(),
            pending: VecDeque::new(),
            in_flight: 0,
            events: vec![IoEvent::default(); depth],
            backlog: Vec::new(),
            overflow: VecDeque::new(),
        })
    }

    fn reap_some(&mut self, out: &mut Vec<(u64, i32)>) -> usize {
        let zero = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: events has room for events.len() entries; the timeout makes it non-blocking.
        let n = unsafe {
            libc::syscall(
                libc::SYS_io_getevents,
                self.ctx,
                0 as libc::c_long,
                self.events.len() as libc::c_long,
                self.events.as_mut_ptr(),
                &zero as *const libc::timespec,
            )
        };
        if n <= 0 {
            return 0;
        }
        for ev in &self.events[..n as usize] {
            let slot = ev.data as usize;
            out.push((self.tokens[slot], ev.res.clamp(i32::MIN as i64, i32::MAX as i64) as i32));
            self.free.push(slot);
            self.in_flight -= 1;
        }
        n as usize
    }
}

impl AioEngine {
    /// Fills a free iocb slot with `op` and queues it for io_submit.
    fn prepare(&mut self, token: u64, op: Op) {
        let (fd, opcode, buf, nbytes, offset, rw_flags) = match op {
            Op::Readv {
                fd,
                iov,
                iovcnt,
                offset,
            } => (fd, IOCB_CMD_PREADV, iov as u64, iovcnt as u64, offset, 0),
            Op::Writev {
                fd,
                iov,
                iovcnt,
                offset,
                flags,
            } => (fd, IOCB_CMD_PWRITEV, iov as u64, iovcnt as u64, offset, flags),
            Op::Fsync { fd, datasync } => (fd, if datasync { IOCB_CMD_FDSYNC } else { IOCB_CMD_FSYNC }, 0, 0, 0, 0),
            Op::Fallocate { .. } | Op::Discard { .. } | Op::RecvMsg { .. } | Op::SendMsg { .. } => {
                unreachable!("push refuses fallocate, discard and socket ops")
            }
        };
        let slot = self.free.pop().unwrap_or_default();
        self.tokens[slot] = token;
        self.iocbs[slot] = Iocb {
            aio_data: slot as u64,
            aio_rw_flags: rw_flags,
            aio_lio_opcode: opcode,
            aio_fildes: fd as u32,
            aio_buf: buf,
            aio_nbytes: nbytes,
            aio_offset: offset as i64,
            aio_flags: IOCB_FLAG_RESFD,
            aio_resfd: self.efd.as_raw_fd() as u32,
            ..Iocb::default()
        };
        self.pending.push_back(slot);
    }

    /// Gives freed slots to waiting ops, oldest first.
    fn admit_overflow(&mut self) {
        while !self.free.is_empty() {
            let Some((token, op)) = self.overflow.pop_front() else {
                break;
            };
            self.prepare(token, op);
        }
    }
}

impl Engine for AioEngine {
    unsafe fn push(&mut self, token: u64, op: Op) -> Result<(), Unsupported> {
        if matches!(
            op,
            Op::Fallocate { .. } | Op::Discard { .. } | Op::RecvMsg { .. } | Op::SendMsg { .. }
        ) {
            return Err(Unsupported);
        }
        self.in_flight += 1;
        // Out of iocb slots (more ops than the context was sized for): the op
        // waits here and takes a slot when one comes back. Never spin.
        if self.free.is_empty() || !self.overflow.is_empty() {
            self.overflow.push_back((token, op));
        } else {
            self.prepare(token, op);
        }
        Ok(())
    }

    fn submit(&mut self) -> io::Result<()> {
        self.admit_overflow();
        while !self.pending.is_empty() {
            let ptrs: Vec<*mut Iocb> = self.pending.iter().map(|&s| &mut self.iocbs[s] as *mut Iocb).collect();
            // SAFETY: every pointer refers to an iocb in our arena, which outlives the op.
            let n = unsafe { libc::syscall(libc::SYS_io_submit, self.ctx, ptrs.len() as libc::c_long, ptrs.as_ptr()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EAGAIN) {
                    return Ok(()); // kernel queue full: retry on the next submit
                }
                // Fail the first op so the error reaches its waiter; keep going with the rest.
                let slot = self.pending.pop_front().unwrap_or_default();
                self.backlog
                    .push((self.tokens[slot], -e.raw_os_error().unwrap_or(libc::EIO)));
                self.free.push(slot);
                self.in_flight -= 1;
                continue;
            }
            if n == 0 {
                return Ok(());
            }
            self.pending.drain(..n as usize);
        }
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<(u64, i32)>) {
        out.append(&mut self.backlog);
        while self.reap_some(out) > 0 {}
    }

    fn event_fd(&self) -> RawFd {
        self.efd.as_raw_fd()
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }
}

impl Drop for AioEngine {
    fn drop(&mut self) {
        // SAFETY: destroys our own context; the kernel waits for in-flight ops.
        unsafe { libc::syscall(libc::SYS_io_destroy, self.ctx) };
    }
}
