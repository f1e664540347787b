//! Spindle's data plane: virtio-blk over vhost-user.
//!
//! - [`blk`] faces the guest: it turns a descriptor chain into a validated
//!   request (or the status a hostile chain deserves), runs it against a
//!   block node zero-copy, and describes the configuration space.
//! - [`backend`] and `worker` implement rust-vmm's `VhostUserBackend` on
//!   `&self`: each I/O thread owns a `spindle_io::Runtime` whose eventfds
//!   sit in the same epoll loop as the queue kicks.
//! - [`export`] serves a [`spindle_export::Device`] on a socket,
//!   connection after connection; [`disk::VirtioDisk`] is what virtio-blk
//!   makes of the export (limits, configuration space).
//!
//! The export itself (its image slot, statistics, quiesce gate) is
//! `spindle-export`'s, which the NBD front end shares.
#![deny(missing_docs)]

pub mod backend;
pub mod blk;
pub mod dirty;
pub mod disk;
mod drain;
pub mod export;
#[doc(hidden)]
pub mod fuzzing;
pub mod inflight;
mod kick;
mod poll;
mod queues;
pub mod ring;
mod run;
mod worker;

pub use disk::VirtioDisk;
pub use export::Export;
use std::path::PathBuf;

/// Errors of the data plane.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The vhost-user socket cannot be created.
    #[error("cannot listen on vhost-user socket {}: {source}", path.display())]
    Bind {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The vhost-user daemon failed.
    #[error("vhost-user: {0}")]
    Daemon(String),
    /// An I/O runtime cannot be created.
    #[error("cannot start an I/O runtime: {0}")]
    Runtime(#[source] spindle_io::Error),
    /// Flushing an image on shutdown failed.
    #[error("export {name}: cannot flush the image: {source}")]
    Close {
        /// Export name.
        name: String,
        /// Cause.
        #[source]
        source: spindle_block::BlockError,
    },
}
