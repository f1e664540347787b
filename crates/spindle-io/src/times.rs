//! Where an I/O thread's time goes: asleep waiting for work (idle),
//! spinning for work before it sleeps (polling), and the rest (busy:
//! running tasks, submitting, reaping, parsing requests).
//!
//! One thread writes a [`ThreadTimes`]: the counters are bumped with a
//! plain load and store (no locked instruction), read by any thread
//! (`spindle ctl stats`, the metrics endpoint). The loop reads the clock
//! only where it changes state (before and after a sleep or a polling
//! window), never per request.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

/// Nanoseconds an I/O thread spent busy, idle and polling.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct ThreadTimes {
    busy_ns: AtomicU64,
    idle_ns: AtomicU64,
    poll_ns: AtomicU64,
}

/// A reading of a [`ThreadTimes`], in nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThreadTimesSnapshot {
    /// Running (tasks, submissions, completions, parsing).
    pub busy_ns: u64,
    /// Asleep, waiting for an event.
    pub idle_ns: u64,
    /// Spinning for work before sleeping (a poll window).
    pub poll_ns: u64,
}

/// What a thread was doing in a stretch of time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Running.
    Busy,
    /// Asleep.
    Idle,
    /// Spinning for work.
    Polling,
}

/// Adds `n` to a counter that has a single writer.
fn bump(c: &AtomicU64, n: u64) {
    c.store(c.load(Relaxed).wrapping_add(n), Relaxed);
}

impl ThreadTimes {
    /// Counts `ns` nanoseconds of `phase` (the owning thread only).
    pub fn add(&self, phase: Phase, ns: u64) {
        match phase {
            Phase::Busy => bump(&self.busy_ns, ns),
            Phase::Idle => bump(&self.idle_ns, ns),
            Phase::Polling => bump(&self.poll_ns, ns),
        }
    }

    /// The counters now.
    pub fn snapshot(&self) -> ThreadTimesSnapshot {
        ThreadTimesSnapshot {
            busy_ns: self.busy_ns.load(Relaxed),
            idle_ns: self.idle_ns.load(Relaxed),
            poll_ns: self.poll_ns.load(Relaxed),
        }
    }
}

/// Splits a thread's time into phases: [`Clock::switch`] at each change
/// counts the time since the last change as the phase that ended.
#[derive(Debug)]
pub struct Clock {
    since: Instant,
}

impl Default for Clock {
    fn default() -> Self {
        Clock { since: Instant::now() }
    }
}

impl Clock {
    /// The stretch since the last switch was `ended`; a new one starts now
    /// (returned).
    pub fn switch(&mut self, times: &ThreadTimes, ended: Phase) -> Instant {
        let now = Instant::now();
        let ns = now
            .saturating_duration_since(self.since)
            .as_nanos()
            .min(u64::MAX as u128) as u64;
        times.add(ended, ns);
        self.since = now;
        now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clock_splits_time_into_its_phases() {
        let t = ThreadTimes::default();
        let outer = Instant::now();
        let mut c = Clock::default();
        std::thread::sleep(std::time::Duration::from_millis(20));
        c.switch(&t, Phase::Busy);
        std::thread::sleep(std::time::Duration::from_millis(30));
        c.switch(&t, Phase::Idle);
        c.switch(&t, Phase::Polling);
        let total = outer.elapsed().as_nanos() as u64;
        let s = t.snapshot();
        assert!(s.busy_ns >= 20_000_000, "{s:?}");
        assert!(s.idle_ns >= 30_000_000, "{s:?}");
        // Each stretch counted once: the phases add up to the time passed.
        assert!(s.busy_ns + s.idle_ns + s.poll_ns <= total, "{s:?} > {total}");
    }
}
