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

pub use spindle_io::ratelimit::{RateLimit, BURST, WINDOW};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tracing::{Event, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::layer::{Context, Layer};

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
