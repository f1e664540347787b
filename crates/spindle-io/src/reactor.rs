//! Socket readiness for the runtime: one epoll descriptor per runtime.
//!
//! Sockets register once, edge-triggered, for reading and writing. A
//! socket operation first tries its system call (non-blocking, or an
//! io_uring op with `MSG_DONTWAIT`); only when that says `EAGAIN` does the
//! task clear the direction's readiness and wait for the next edge. The
//! runtime reaps the epoll descriptor (`epoll_wait` with no timeout) in the
//! same step as engine completions, and its descriptor is one of
//! [`crate::Runtime::event_fds`] from the start, so an external event loop
//! wakes for sockets too.

use slab::Slab;
use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::task::{Context, Poll, Waker};

/// Which way a socket waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dir {
    /// Data (or a connection, or the peer's end) to read.
    Read,
    /// Room to write.
    Write,
}

impl Dir {
    fn bit(self) -> u8 {
        match self {
            Dir::Read => 1,
            Dir::Write => 2,
        }
    }
}

#[derive(Default)]
struct Reg {
    ready: u8,
    /// Edges seen so far: an `EAGAIN` clears readiness only if no edge
    /// came in since the call started (io_uring ops finish asynchronously,
    /// and the edge may be reaped in the same step as their `EAGAIN`).
    ticks: u64,
    read: Option<Waker>,
    write: Option<Waker>,
}

/// The runtime's epoll descriptor and its registrations.
pub(crate) struct Reactor {
    epfd: OwnedFd,
    regs: RefCell<Slab<Reg>>,
}

impl Reactor {
    pub(crate) fn new() -> io::Result<Reactor> {
        // SAFETY: plain syscall; the result is checked before use.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Reactor {
            // SAFETY: fd is a fresh descriptor that we own.
            epfd: unsafe { OwnedFd::from_raw_fd(fd) },
            regs: RefCell::new(Slab::new()),
        })
    }

    /// The epoll descriptor: readable when a registered socket changed.
    pub(crate) fn fd(&self) -> RawFd {
        self.epfd.as_raw_fd()
    }

    /// Registers `fd` for both directions; both start ready (the first
    /// system call finds out).
    pub(crate) fn register(&self, fd: RawFd) -> io::Result<usize> {
        let key = self.regs.borrow_mut().insert(Reg {
            ready: 3,
            ..Default::default()
        });
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
            u64: key as u64,
        };
        // SAFETY: ev is a valid epoll_event; both descriptors are open.
        if unsafe { libc::epoll_ctl(self.fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            self.regs.borrow_mut().remove(key);
            return Err(io::Error::last_os_error());
        }
        Ok(key)
    }

    /// Forgets a registration (before its descriptor closes).
    pub(crate) fn deregister(&self, key: usize, fd: RawFd) {
        // SAFETY: removing a descriptor from our epoll set; no memory involved.
        unsafe { libc::epoll_ctl(self.fd(), libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
        self.regs.borrow_mut().try_remove(key);
    }

    /// Whether `dir` may be ready (no `EAGAIN` seen since the last edge).
    pub(crate) fn is_ready(&self, key: usize, dir: Dir) -> bool {
        self.regs.borrow().get(key).is_some_and(|r| r.ready & dir.bit() != 0)
    }

    /// The edge count, taken before a call that may say `EAGAIN`.
    pub(crate) fn ticks(&self, key: usize) -> u64 {
        self.regs.borrow().get(key).map_or(0, |r| r.ticks)
    }

    /// A call started at `ticks` said `EAGAIN`: wait for the next edge,
    /// unless one came in meanwhile.
    pub(crate) fn clear(&self, key: usize, dir: Dir, ticks: u64) {
        if let Some(r) = self.regs.borrow_mut().get_mut(key) {
            if r.ticks == ticks {
                r.ready &= !dir.bit();
            }
        }
    }

    /// Ready when `dir` is ready; otherwise keeps the waker for the edge.
    pub(crate) fn poll_ready(&self, key: usize, dir: Dir, cx: &mut Context<'_>) -> Poll<()> {
        let mut regs = self.regs.borrow_mut();
        let Some(r) = regs.get_mut(key) else {
            return Poll::Ready(());
        };
        if r.ready & dir.bit() != 0 {
            return Poll::Ready(());
        }
        let slot = match dir {
            Dir::Read => &mut r.read,
            Dir::Write => &mut r.write,
        };
        *slot = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Collects the edges that came in without waiting and wakes their
    /// tasks. Returns how many sockets changed. No system call when
    /// nothing is registered.
    pub(crate) fn reap(&self) -> usize {
        if self.regs.borrow().is_empty() {
            return 0;
        }
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
        let mut total = 0;
        loop {
            // SAFETY: events is a valid array of its length; timeout 0 never blocks.
            let n = unsafe { libc::epoll_wait(self.fd(), events.as_mut_ptr(), events.len() as i32, 0) };
            if n <= 0 {
                return total;
            }
            let mut wake = Vec::new();
            {
                let mut regs = self.regs.borrow_mut();
                for ev in &events[..n as usize] {
                    let Some(r) = regs.get_mut(ev.u64 as usize) else {
                        continue;
                    };
                    let bits = ev.events as i32;
                    r.ticks += 1;
                    let err = libc::EPOLLERR | libc::EPOLLHUP;
                    if bits & (libc::EPOLLIN | libc::EPOLLRDHUP | err) != 0 {
                        r.ready |= Dir::Read.bit();
                        wake.extend(r.read.take());
                    }
                    if bits & (libc::EPOLLOUT | err) != 0 {
                        r.ready |= Dir::Write.bit();
                        wake.extend(r.write.take());
                    }
                }
            }
            // Woken outside the borrow: a waker may poll at once.
            wake.into_iter().for_each(Waker::wake);
            total += n as usize;
            if (n as usize) < events.len() {
                return total;
            }
        }
    }
}
