//! Spindle's export layer: what an exported disk is, whichever front end
//! serves it (vhost-user to a guest, NBD to a tool or a remote QEMU).
//!
//! - [`device::Device`]: one export: its name and settings, the image's
//!   [`slot::NodeSlot`] (which live migration closes and reopens, and
//!   overlays and jobs replace), its size, write-cache state, statistics,
//!   migration state and written-range tracking for jobs;
//! - [`quiesce::Gate`]: admission of every front end's requests, held
//!   while the image is snapshotted or switched;
//! - [`stats`]: lock-free per-queue (or per-lane) counters;
//! - [`ratelimit`]: the limit on log lines a peer can trigger;
//! - [`throttle`]: I/O limits (QEMU's), per export or shared by a group.
//!
//! Front ends (`spindle-vhost`, `spindle-nbd`) depend on this crate, never
//! on each other.
#![deny(missing_docs)]

mod activation;
pub mod device;
pub mod quiesce;
pub mod ratelimit;
pub mod slot;
pub mod stats;
pub mod throttle;
pub mod written;

pub use activation::{Guard, Start, Waker};
pub use device::{opt_io, Device, DeviceConfig, Migration};
pub use ratelimit::LibraryLogs;
