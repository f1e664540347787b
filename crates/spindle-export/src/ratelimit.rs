//! Rate limits for log lines a guest or a frontend can trigger.
//!
//! Every such line in this crate goes through [`limited!`]: each call
//! site may log [`BURST`] lines per [`WINDOW`]; the rest are counted, and
//! the next line that gets through says how many were suppressed
//! (`suppressed=N`). The rust-vmm crates log through the `log` facade on
//! their own (a refused vhost-user message, a bad ring); [`LibraryLogs`]
//! puts the same limit on them, per module, in a tracing subscriber.
//!
//! A limit is shared by all devices: a guest that floods one call site
//! can delay another device's lines of the same kind by up to a window,
//! never hide the fact that they happened (the count).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tracing::{Event, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::layer::{Context, Layer};

/// Lines a call site may log per window.
pub const BURST: u64 = 10;
/// The window.
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

/// Logs at `$level` (a `tracing` macro name) through a limit of its own
/// call site: `limited!(warn, device = %name, "refused request {head}")`.
#[macro_export]
macro_rules! limited {
    ($level:ident, $($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit =
            $crate::ratelimit::RateLimit::new($crate::ratelimit::BURST, $crate::ratelimit::WINDOW);
        match LIMIT.check() {
            Some(0) => tracing::$level!($($arg)+),
            Some(suppressed) => tracing::$level!(suppressed, $($arg)+),
            None => {}
        }
    }};
}
pub use crate::limited;

/// Module paths of the rust-vmm crates this data plane runs on.
const LIBRARIES: [&str; 4] = ["vhost", "virtio_queue", "vm_memory", "vmm_sys_util"];

/// A tracing layer that puts the [`limited!`] limit, per module, on the
/// lines of the rust-vmm crates (`vhost`, `vhost_user_backend`,
/// `virtio_queue`, `vm_memory`, `vmm_sys_util`); it leaves every other line
/// alone. Lines over the limit are dropped without a count: they are not
/// this crate's to extend. Add it to the process's subscriber:
/// `tracing_subscriber::fmt().finish().with(LibraryLogs::default())`.
#[derive(Debug, Default)]
pub struct LibraryLogs {
    limits: Mutex<HashMap<String, Arc<RateLimit>>>,
}

impl<S: Subscriber> Layer<S> for LibraryLogs {
    fn event_enabled(&self, event: &Event<'_>, _cx: Context<'_, S>) -> bool {
        // A line from the `log` facade carries its module in a field; its
        // own metadata says only "log".
        let normalized = event.normalized_metadata();
        let target = normalized.as_ref().map_or(event.metadata().target(), |m| m.target());
        let krate = target.split("::").next().unwrap_or(target);
        if !LIBRARIES.iter().any(|l| krate.starts_with(l)) {
            return true;
        }
        let limit = match self.limits.lock() {
            Ok(mut m) => m.entry(target.to_owned()).or_default().clone(),
            Err(_) => return false,
        };
        limit.check().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
