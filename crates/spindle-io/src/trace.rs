//! Named trace events: `tracing` targets an operator switches on at run
//! time (`spindle ctl trace 'spindle::qcow2::alloc=debug'`) to see what a
//! slow device does, without a restart (docs/operations.md, "Tracing a
//! slow device").
//!
//! Every event is at `DEBUG` level on one of [`TARGETS`] and goes through
//! [`traced!`], which costs what `tracing`'s disabled check costs (the
//! global level filter, one relaxed atomic load, then the call site's
//! cached interest) while the target is off: nothing is formatted,
//! allocated or counted. Once on, a call site may log [`BURST`] lines per
//! [`WINDOW`]; a guest's I/O can trigger these events, so a busy device
//! cannot flood the log. The next line that gets through counts the
//! suppressed ones (`suppressed=N`).

use std::time::Duration;

/// A qcow2 cluster allocation: data clusters for a write, a new L2 table.
pub const QCOW2_ALLOC: &str = "spindle::qcow2::alloc";
/// A qcow2 L2 cache miss: the slice read, what it evicted, how long it took.
pub const QCOW2_L2_MISS: &str = "spindle::qcow2::l2_miss";
/// A qcow2 metadata flush: the dirty tables written back, then the sync.
pub const QCOW2_FLUSH: &str = "spindle::qcow2::flush";
/// A vhost-user request popped from a ring.
pub const VHOST_SUBMIT: &str = "spindle::vhost::submit";
/// A vhost-user request done: its status and latency.
pub const VHOST_COMPLETE: &str = "spindle::vhost::complete";
/// An NBD request received.
pub const NBD_SUBMIT: &str = "spindle::nbd::submit";
/// An NBD request done: its result and latency.
pub const NBD_COMPLETE: &str = "spindle::nbd::complete";

/// Every named target, with what it shows (for `spindle ctl trace`).
pub const TARGETS: [(&str, &str); 7] = [
    (
        QCOW2_ALLOC,
        "qcow2 cluster allocations (data clusters of a write, new L2 tables)",
    ),
    (QCOW2_L2_MISS, "qcow2 L2 cache misses (slice read, eviction, time)"),
    (QCOW2_FLUSH, "qcow2 metadata flushes (tables written back, time)"),
    (VHOST_SUBMIT, "vhost-user requests as they are popped"),
    (VHOST_COMPLETE, "vhost-user requests as they complete (status, latency)"),
    (NBD_SUBMIT, "NBD requests as they arrive"),
    (NBD_COMPLETE, "NBD requests as they complete (result, latency)"),
];

/// Lines a named event's call site may log per [`WINDOW`].
pub const BURST: u64 = 200;
/// The window of [`BURST`].
pub const WINDOW: Duration = Duration::from_secs(1);

/// Whether the named target `$target` is on (its events would be logged).
/// For work only a trace line needs, such as reading the clock:
/// `let t0 = spindle_io::trace_on!(QCOW2_L2_MISS).then(Instant::now);`.
#[macro_export]
macro_rules! trace_on {
    ($target:expr) => {
        ::tracing::enabled!(target: $target, ::tracing::Level::DEBUG)
    };
}

/// Logs a named trace event at `DEBUG` on `$target` (one of
/// [`TARGETS`]), with `tracing`'s field syntax:
/// `traced!(QCOW2_ALLOC, image = %path.display(), clusters = n, "data clusters")`.
/// Nothing is evaluated while the target is off; once on, the call
/// site's rate limit applies.
#[macro_export]
macro_rules! traced {
    ($target:expr, $($arg:tt)+) => {
        if $crate::trace_on!($target) {
            static LIMIT: $crate::ratelimit::RateLimit =
                $crate::ratelimit::RateLimit::new($crate::trace::BURST, $crate::trace::WINDOW);
            match LIMIT.check() {
                Some(0) => ::tracing::debug!(target: $target, $($arg)+),
                Some(suppressed) => ::tracing::debug!(target: $target, suppressed, $($arg)+),
                None => {}
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    /// Collects the events it sees: `target message-and-fields`.
    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<Vec<String>>>);

    struct Fields(String);
    impl tracing::field::Visit for Fields {
        fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
            self.0.push_str(&format!(" {}={v:?}", f.name()));
        }
    }

    impl tracing::Subscriber for Seen {
        fn enabled(&self, m: &tracing::Metadata<'_>) -> bool {
            m.target() == QCOW2_ALLOC
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, e: &tracing::Event<'_>) {
            let mut f = Fields(e.metadata().target().to_string());
            e.record(&mut f);
            self.0.lock().unwrap().push(f.0);
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    #[test]
    fn an_event_is_evaluated_only_while_its_target_is_on_and_then_limited() {
        let seen = Seen::default();
        let evaluated = AtomicUsize::new(0);
        let field = || evaluated.fetch_add(1, Ordering::Relaxed);
        tracing::subscriber::with_default(seen.clone(), || {
            for _ in 0..10 {
                traced!(QCOW2_L2_MISS, n = field(), "off");
            }
            for _ in 0..(BURST + 50) {
                traced!(QCOW2_ALLOC, n = field(), "on");
            }
        });
        let lines = seen.0.lock().unwrap().clone();
        assert_eq!(evaluated.load(Ordering::Relaxed), BURST as usize, "fields evaluated");
        assert_eq!(lines.len(), BURST as usize);
        assert!(
            lines.iter().all(|l| l.starts_with("spindle::qcow2::alloc ")),
            "{lines:?}"
        );
        assert!(!lines.iter().any(|l| l.contains("suppressed")));
    }

    #[test]
    fn every_target_is_listed_once_under_spindle() {
        let mut names: Vec<&str> = TARGETS.iter().map(|t| t.0).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), TARGETS.len());
        assert!(names.iter().all(|n| n.starts_with("spindle::")));
    }
}
