//! Descriptors that another library signals (an eventfd that librbd's
//! completion callbacks write), watched by this thread's runtime.
//!
//! An [`EventSource`] registers the descriptor with the runtime's epoll
//! descriptor (`reactor`), like a socket, so the runtime wakes for it in
//! its own loop and in an external one ([`crate::Runtime::event_fds`]
//! includes the epoll descriptor). One task waits on it at a time.

use crate::reactor::Dir;
use crate::runtime::{try_current, Inner};
use std::future::poll_fn;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;

/// A readable-when-signalled descriptor on this thread's runtime.
pub struct EventSource {
    fd: OwnedFd,
    key: usize,
    rt: Rc<Inner>,
}

impl std::fmt::Debug for EventSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EventSource({})", self.fd.as_raw_fd())
    }
}

impl EventSource {
    /// Registers `fd` (non-blocking, e.g. an eventfd; a duplicate is fine)
    /// with the runtime this thread is running (call it from a task).
    pub fn new(fd: OwnedFd) -> io::Result<EventSource> {
        let rt = try_current()
            .ok_or_else(|| io::Error::other("spindle-io: an event source was made outside a runtime (a bug)"))?;
        let key = rt.reactor.register(fd.as_raw_fd())?;
        Ok(EventSource { fd, key, rt })
    }

    /// The descriptor.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Waits until the descriptor was signalled since the last call
    /// returned (the first call returns at once), and takes that signal.
    /// Resetting the descriptor (reading the eventfd) is the caller's.
    pub async fn signalled(&self) {
        poll_fn(|cx| self.poll_signalled(cx)).await
    }

    /// [`EventSource::signalled`] as a poll: `Ready` (and the signal
    /// taken) if it came, else `cx`'s waker is kept for it. One waker is
    /// kept: the last task that polled is the one woken.
    pub fn poll_signalled(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        if self.rt.reactor.poll_ready(self.key, Dir::Read, cx).is_pending() {
            return std::task::Poll::Pending;
        }
        let ticks = self.rt.reactor.ticks(self.key);
        self.rt.reactor.clear(self.key, Dir::Read, ticks);
        std::task::Poll::Ready(())
    }
}

impl Drop for EventSource {
    fn drop(&mut self) {
        self.rt.reactor.deregister(self.key, self.fd.as_raw_fd());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EngineKind, Runtime, RuntimeConfig};
    use std::cell::Cell;
    use std::os::fd::FromRawFd;

    fn eventfd() -> OwnedFd {
        // SAFETY: plain syscall, checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor we own.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    fn signal(fd: RawFd) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a valid u64 to an open eventfd.
        assert_eq!(unsafe { libc::write(fd, (&one as *const u64).cast(), 8) }, 8);
    }

    /// A signal from another thread wakes a task sleeping in the runtime,
    /// once per signal, under every engine.
    #[test]
    fn a_signal_from_another_thread_wakes_the_waiting_task() {
        for kind in [EngineKind::IoUring, EngineKind::Native, EngineKind::Threads] {
            let rt = Runtime::new(RuntimeConfig {
                engine: kind,
                ..Default::default()
            })
            .unwrap();
            let efd = eventfd();
            // SAFETY: duplicating an open descriptor.
            let dup = unsafe { libc::fcntl(efd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
            assert!(dup >= 0);
            let raw = efd.as_raw_fd();
            let woken = Cell::new(0);
            rt.block_on(async {
                // SAFETY: the duplicate is ours.
                let src = EventSource::new(unsafe { OwnedFd::from_raw_fd(dup) }).unwrap();
                src.signalled().await; // The first returns at once.
                for i in 0..3 {
                    let t = std::thread::spawn(move || {
                        std::thread::sleep(std::time::Duration::from_millis(20));
                        signal(raw);
                    });
                    src.signalled().await;
                    let mut v = 0u64;
                    // SAFETY: reads 8 bytes into a valid u64 from a non-blocking eventfd.
                    let n = unsafe { libc::read(raw, (&mut v as *mut u64).cast(), 8) };
                    assert_eq!((n, v), (8, 1), "round {i}: the signal was there when the task woke");
                    woken.set(woken.get() + 1);
                    t.join().unwrap();
                }
            });
            assert_eq!(woken.get(), 3, "{kind:?}");
        }
    }
}
