//! Timers on the per-thread runtime: a `timerfd` registered with the
//! runtime's epoll descriptor like a socket, so a task that sleeps parks
//! until the timer's edge and the thread serves its other tasks (no thread
//! per timer, no busy loop).

use crate::reactor::Dir;
use crate::runtime::{try_current, Inner};
use std::future::{poll_fn, Future};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::Duration;

/// A one-shot timer registered with this thread's runtime.
struct Timer {
    fd: OwnedFd,
    key: usize,
    rt: Rc<Inner>,
}

impl Timer {
    fn new(after: Duration) -> io::Result<Timer> {
        let rt = try_current().ok_or_else(|| io::Error::other("spindle-io: a timer outside a runtime (a bug)"))?;
        // SAFETY: plain syscall; the result is checked before use.
        let raw = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a fresh descriptor that we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // A zero it_value disarms a timerfd: the shortest wait is 1 ns.
        let after = after.max(Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 },
            it_value: libc::timespec {
                tv_sec: after.as_secs().min(i64::MAX as u64) as libc::time_t,
                tv_nsec: after.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: spec is a valid itimerspec; the old value is not asked for.
        if unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let key = rt.reactor.register(fd.as_raw_fd())?;
        Ok(Timer { fd, key, rt })
    }

    /// Whether the timer expired (reads its count; `EAGAIN` if not yet).
    fn expired(&self) -> io::Result<bool> {
        let mut n = 0u64;
        // SAFETY: reads 8 bytes into `n`, which is 8 bytes long.
        let r = unsafe { libc::read(self.fd.as_raw_fd(), (&mut n as *mut u64).cast(), 8) };
        if r == 8 {
            return Ok(true);
        }
        match io::Error::last_os_error() {
            e if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            e => Err(e),
        }
    }

    async fn wait(&self) -> io::Result<()> {
        loop {
            if !self.rt.reactor.is_ready(self.key, Dir::Read) {
                poll_fn(|cx| self.rt.reactor.poll_ready(self.key, Dir::Read, cx)).await;
            }
            let ticks = self.rt.reactor.ticks(self.key);
            if self.expired()? {
                return Ok(());
            }
            self.rt.reactor.clear(self.key, Dir::Read, ticks);
        }
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        self.rt.reactor.deregister(self.key, self.fd.as_raw_fd());
    }
}

/// Waits `d` on this thread's runtime (call it from a task).
pub async fn sleep(d: Duration) -> io::Result<()> {
    Timer::new(d)?.wait().await
}

/// Runs `fut` for at most `d`: `None` if the time ran out first (`fut` is
/// dropped then). A timer that cannot be made fails the call.
pub async fn timeout<F: Future>(d: Duration, fut: F) -> io::Result<Option<F::Output>> {
    let timer = Timer::new(d)?;
    let mut fut = pin!(fut);
    let mut expiry = pin!(timer.wait());
    // The future first: one that is ready when the time runs out wins.
    poll_fn(|cx| match fut.as_mut().poll(cx) {
        Poll::Ready(v) => Poll::Ready(Ok(Some(v))),
        Poll::Pending => expiry.as_mut().poll(cx).map(|r| r.map(|()| None)),
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EngineKind, Runtime, RuntimeConfig};
    use std::time::Instant;

    fn engines() -> [RuntimeConfig; 2] {
        [
            RuntimeConfig::default(),
            RuntimeConfig {
                engine: EngineKind::Threads,
                ..RuntimeConfig::default()
            },
        ]
    }

    #[test]
    fn a_sleep_lasts_its_time_and_other_tasks_run_meanwhile() {
        for cfg in engines() {
            let rt = Runtime::new(cfg).unwrap();
            let start = Instant::now();
            let (slept, other) = rt.block_on(async {
                let other = crate::spawn(async { Instant::now() });
                sleep(Duration::from_millis(50)).await.unwrap();
                (start.elapsed(), other.await)
            });
            assert!(slept >= Duration::from_millis(50), "{slept:?}");
            assert!(slept < Duration::from_secs(2), "{slept:?}");
            assert!(
                other.duration_since(start) < Duration::from_millis(50),
                "the other task waited"
            );
        }
    }

    #[test]
    fn a_timeout_ends_a_future_that_never_finishes_and_passes_one_that_does() {
        for cfg in engines() {
            let rt = Runtime::new(cfg).unwrap();
            let r = rt.block_on(timeout(Duration::from_millis(30), std::future::pending::<()>()));
            assert!(matches!(r, Ok(None)));
            let r = rt.block_on(timeout(Duration::from_secs(5), async { 7 }));
            assert!(matches!(r, Ok(Some(7))));
        }
    }
}
