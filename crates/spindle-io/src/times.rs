//! Where an I/O thread's time goes: running (busy), spinning for work
//! before it sleeps (polling), and asleep waiting for work (idle).
//!
//! Nothing is measured per request or per wake-up: the kernel keeps each
//! thread's time on a CPU and waiting for one (`/proc/thread-self/
//! schedstat`), read when someone asks (`spindle ctl stats`, the metrics
//! endpoint) and once as the thread ends. Only polling windows are timed
//! by the thread itself, with the clock reads the polling loop makes
//! anyway. So busy is the CPU time less polling, idle the time the
//! thread existed less its CPU time and its waits for a CPU.
//!
//! A thread [`ThreadTimes::attach`]es itself when it starts its loop and
//! [`ThreadTimes::detach`]es as it ends (which adds its figures to the
//! totals); one `ThreadTimes` may see a series of threads (the I/O
//! threads of successive vhost-user connections).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Instant;

/// Busy, idle and polling time of a (series of) I/O thread(s).
#[derive(Debug, Default)]
pub struct ThreadTimes {
    /// Polling windows, in ns: written by the attached thread only.
    poll_ns: AtomicU64,
    /// The thread attached now, and the figures of those that ended.
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    live: Option<Live>,
    /// Ended threads' CPU time and idle time (ns).
    cpu_ns: u64,
    idle_ns: u64,
}

#[derive(Debug, Clone, Copy)]
struct Live {
    tid: i32,
    since: Instant,
}

/// A reading of a [`ThreadTimes`], in nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThreadTimesSnapshot {
    /// Running (tasks, submissions, completions, parsing), polling excluded.
    pub busy_ns: u64,
    /// Asleep, waiting for an event.
    pub idle_ns: u64,
    /// Spinning for work before sleeping (a poll window).
    pub poll_ns: u64,
}

/// The calling thread's id.
fn gettid() -> i32 {
    // SAFETY: gettid(2) takes no arguments and cannot fail.
    unsafe { libc::gettid() }
}

/// Thread `tid`'s (of this process) time on a CPU and waiting for one,
/// in ns; `None` if it is gone.
fn cpu_of(tid: i32) -> Option<(u64, u64)> {
    if let Ok(s) = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")) {
        let mut f = s.split_ascii_whitespace().map(|x| x.parse::<u64>().ok());
        if let (Some(Some(cpu)), Some(Some(wait))) = (f.next(), f.next()) {
            return Some((cpu, wait));
        }
    }
    // Without schedstat: user and system time in clock ticks.
    let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_ascii_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf(3) with a valid name.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some((ticks.saturating_mul(1_000_000_000 / hz), 0))
}

/// The CPU and idle time of `l` so far.
fn figures(l: &Live) -> (u64, u64) {
    let wall = l.since.elapsed().as_nanos().min(u64::MAX as u128) as u64;
    let (cpu, wait) = cpu_of(l.tid).unwrap_or((0, 0));
    (cpu, wall.saturating_sub(cpu).saturating_sub(wait))
}

impl ThreadTimes {
    /// The calling thread's time counts here from now on (until
    /// [`ThreadTimes::detach`]). A thread still attached is taken as
    /// ended now.
    pub fn attach(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = st.live.take() {
            let (cpu, idle) = figures(&old);
            st.cpu_ns += cpu;
            st.idle_ns += idle;
        }
        st.live = Some(Live {
            tid: gettid(),
            since: Instant::now(),
        });
    }

    /// The calling thread ends (or stops counting here): its figures go
    /// to the totals. Does nothing if another thread attached since.
    pub fn detach(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let Some(l) = st.live.filter(|l| l.tid == gettid()) else {
            return;
        };
        let (cpu, idle) = figures(&l);
        st.cpu_ns += cpu;
        st.idle_ns += idle;
        st.live = None;
    }

    /// Counts `ns` of polling for work (the attached thread only: a plain
    /// load and store).
    pub fn add_polling(&self, ns: u64) {
        self.poll_ns.store(self.poll_ns.load(Relaxed).wrapping_add(ns), Relaxed);
    }

    /// The figures now (reads the attached thread's from the kernel).
    pub fn snapshot(&self) -> ThreadTimesSnapshot {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (cpu, idle) = st.live.as_ref().map_or((0, 0), figures);
        let poll_ns = self.poll_ns.load(Relaxed);
        ThreadTimesSnapshot {
            busy_ns: (st.cpu_ns + cpu).saturating_sub(poll_ns),
            idle_ns: st.idle_ns + idle,
            poll_ns,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    /// The calling thread's CPU time.
    fn thread_cpu() -> Duration {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime(2) writes one timespec into `ts`.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    /// Spins until this thread has used `d` of CPU (however loaded the
    /// machine is).
    pub(crate) fn spin(d: Duration) {
        let t = thread_cpu();
        while thread_cpu() - t < d {
            std::hint::spin_loop();
        }
    }

    #[test]
    fn a_thread_counts_its_cpu_and_sleep_and_the_totals_keep_them() {
        let t = Arc::new(ThreadTimes::default());
        let outer = Instant::now();
        let run = |t: Arc<ThreadTimes>| {
            std::thread::spawn(move || {
                t.attach();
                spin(Duration::from_millis(40));
                std::thread::sleep(Duration::from_millis(60));
                t.add_polling(5_000_000);
                // Live figures, read from this thread too.
                let s = t.snapshot();
                t.detach();
                s
            })
            .join()
            .unwrap()
        };
        let live = run(t.clone());
        // 40 ms of CPU, less the 5 ms counted as polling.
        assert!(live.busy_ns >= 35_000_000, "{live:?}");
        assert!(live.idle_ns >= 50_000_000, "{live:?}");
        let first = t.snapshot();
        // A second thread adds to the first one's figures.
        let _ = run(t.clone());
        let total = outer.elapsed().as_nanos() as u64;
        let s = t.snapshot();
        assert!(s.busy_ns >= first.busy_ns + 35_000_000, "{first:?} {s:?}");
        assert!(s.idle_ns >= first.idle_ns + 50_000_000, "{first:?} {s:?}");
        assert_eq!(s.poll_ns, 10_000_000);
        // Each stretch counted once: the phases add up to at most the time passed.
        assert!(s.busy_ns + s.idle_ns + s.poll_ns <= total, "{s:?} > {total}");
        // Detached: nothing changes while no thread is attached.
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(t.snapshot(), s);
    }
}
