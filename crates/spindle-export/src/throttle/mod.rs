//! I/O throttling with QEMU's semantics (libvirt `<iotune>`, QEMU
//! `throttle-group`): limits and their validation ([`config`]), the leaky
//! buckets' arithmetic ([`state`]), and groups of exports sharing limits
//! with round-robin admission ([`group`]). An export without a named
//! group has a group of its own. A throttled request waits on a timer of
//! its I/O thread's runtime; it holds nothing else while it waits.

pub mod config;
pub mod group;
pub mod state;

pub use config::{Kind, Limits};
pub use group::{Group, Membership};
pub use state::Direction;
