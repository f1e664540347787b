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
use std::cell::{Cell, RefCell};
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
    /// The peer's end (or an error) was seen: reading never waits again
    /// (the stream's end is reported once, and a short read before it
    /// must not wait for an edge that already came).
    closed: bool,
    read: Option<Waker>,
    write: Option<Waker>,
}

/// The runtime's epoll descriptor and its registrations.
pub(crate) struct Reactor {
    epfd: OwnedFd,
    regs: RefCell<Slab<Reg>>,
    /// Wakers held (tasks waiting for an edge).
    waiting: Cell<usize>,
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
            waiting: Cell::new(0),
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
        if let Some(r) = self.regs.borrow_mut().try_remove(key) {
            let held = r.read.is_some() as usize + r.write.is_some() as usize;
            self.waiting.set(self.waiting.get() - held);
        }
    }

    /// Whether a task waits for an edge (otherwise reaping can wait: every
    /// socket is either marked ready or has no task looking at it, and a
    /// task that starts waiting leaves its waker here first).
    pub(crate) fn has_waiters(&self) -> bool {
        self.waiting.get() > 0
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
            if r.ticks == ticks && !(dir == Dir::Read && r.closed) {
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
        if slot.replace(cx.waker().clone()).is_none() {
            self.waiting.set(self.waiting.get() + 1);
        }
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
                    if bits & (libc::EPOLLRDHUP | err) != 0 {
                        r.closed = true;
                    }
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
            self.waiting.set(self.waiting.get() - wake.len());
            // Woken outside the borrow: a waker may poll at once.
            wake.into_iter().for_each(Waker::wake);
            total += n as usize;
            if (n as usize) < events.len() {
                return total;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::task::Waker;

    /// The loop reaps the epoll descriptor only while a task waits for an
    /// edge: the count of held wakers must follow waits, wakes and
    /// deregistrations exactly.
    #[test]
    fn waiters_are_counted_through_wait_wake_and_deregister() {
        let r = Reactor::new().unwrap();
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let (c, _d) = std::os::unix::net::UnixStream::pair().unwrap();
        let ka = r.register(a.as_raw_fd()).unwrap();
        let kc = r.register(c.as_raw_fd()).unwrap();
        let mut cx = Context::from_waker(Waker::noop());
        assert!(r.poll_ready(ka, Dir::Read, &mut cx).is_ready(), "registered ready");
        assert!(!r.has_waiters());
        r.clear(ka, Dir::Read, r.ticks(ka));
        r.clear(kc, Dir::Read, r.ticks(kc));
        assert!(r.poll_ready(ka, Dir::Read, &mut cx).is_pending());
        assert!(
            r.poll_ready(ka, Dir::Read, &mut cx).is_pending(),
            "a second poll replaces the waker"
        );
        assert!(r.poll_ready(kc, Dir::Read, &mut cx).is_pending());
        assert!(r.has_waiters());
        b.write_all(b"x").unwrap();
        assert!(r.reap() >= 1);
        assert!(r.is_ready(ka, Dir::Read));
        assert!(r.has_waiters(), "c still waits");
        r.deregister(kc, c.as_raw_fd());
        assert!(!r.has_waiters());
    }
}
