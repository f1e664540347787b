//! A lock-free limit on how often something may happen: the log lines a
//! guest or a frontend can trigger (`spindle_export::limited!`) and the
//! named trace events ([`crate::traced!`]).
//!
//! Each call site has a [`RateLimit`] of its own: [`RateLimit::check`]
//! lets `burst` through per window, counts the rest, and tells the next
//! one that gets through how many were suppressed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Lines a call site may log per window (the `limited!` default).
pub const BURST: u64 = 10;
/// The window (the `limited!` default).
pub const WINDOW: Duration = Duration::from_secs(60);

/// Milliseconds since the first call, plus one (0 means "never").
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// The state of one limited call site. Lock-free: a kick path may hit it.
#[derive(Debug)]
pub struct RateLimit {
    burst: u64,
    window_ms: u64,
    /// When the current window opened (`now_ms`), 0 before the first line.
    opened: AtomicU64,
    /// Lines seen in the current window, logged or not.
    seen: AtomicU64,
    /// Lines suppressed since the last one logged.
    suppressed: AtomicU64,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit::new(BURST, WINDOW)
    }
}

impl RateLimit {
    /// A limit of `burst` lines per `window`.
    pub const fn new(burst: u64, window: Duration) -> RateLimit {
        RateLimit {
            burst,
            window_ms: window.as_millis() as u64,
            opened: AtomicU64::new(0),
            seen: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether a line may be logged now: `Some(n)` when it may, `n` being
    /// the lines suppressed since the last one that was; `None` when it is
    /// suppressed (and counted).
    pub fn check(&self) -> Option<u64> {
        let now = now_ms();
        let opened = self.opened.load(Ordering::Acquire);
        if (opened == 0 || now.saturating_sub(opened) >= self.window_ms)
            && self
                .opened
                .compare_exchange(opened, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.seen.store(0, Ordering::Release);
        }
        let seen = self
            .seen
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| Some(n.saturating_add(1)))
            .unwrap_or(u64::MAX);
        if seen < self.burst {
            Some(self.suppressed.swap(0, Ordering::AcqRel))
        } else {
            self.suppressed.fetch_add(1, Ordering::AcqRel);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_burst_then_nothing_until_the_window_ends() {
        let l = RateLimit::new(3, Duration::from_millis(200));
        assert_eq!(l.check(), Some(0));
        assert_eq!(l.check(), Some(0));
        assert_eq!(l.check(), Some(0));
        for _ in 0..1000 {
            assert_eq!(l.check(), None);
        }
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(
            l.check(),
            Some(1000),
            "the first line of a new window counts the suppressed ones"
        );
        assert_eq!(l.check(), Some(0));
    }

    #[test]
    fn many_threads_share_one_burst() {
        let l = Arc::new(RateLimit::new(5, Duration::from_secs(3600)));
        let passed: u64 = (0..4)
            .map(|_| {
                let l = l.clone();
                std::thread::spawn(move || (0..10_000).filter(|_| l.check().is_some()).count() as u64)
            })
            .map(|t| t.join().unwrap())
            .sum();
        assert_eq!(passed, 5);
    }
}
