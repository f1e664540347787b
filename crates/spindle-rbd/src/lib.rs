//! A safe layer over librbd and librados (bound by hand in
//! `spindle-rbd-sys`): a [`Cluster`] connection with timeouts, [`Pool`]s
//! (with namespaces), [`Image`]s (metadata, snapshots, allocation,
//! exclusive lock) and [`EventQueue`], asynchronous I/O completed through an
//! eventfd that an I/O thread's epoll can watch.
//!
//! Every failure is one [`Error`] naming the cluster, pool and image and
//! librbd's errno (`-ENOENT` on open reads "image POOL/NAME not found").
#![deny(missing_docs)]

mod aio;
mod cluster;
mod error;
mod image;

pub use aio::{Completion, EventQueue, OpKind};
pub use cluster::{Cluster, ClusterOptions, Pool, DEFAULT_CONNECT_TIMEOUT};
pub use error::{Error, Result};
pub use image::{CreateOptions, Extent, Image, Snapshot, Stat};

/// The `RBD_FEATURE_*` bits, for [`CreateOptions::features`] and
/// [`Image::features`].
pub mod features {
    pub use spindle_rbd_sys::{
        RBD_FEATURE_DATA_POOL as DATA_POOL, RBD_FEATURE_DEEP_FLATTEN as DEEP_FLATTEN,
        RBD_FEATURE_EXCLUSIVE_LOCK as EXCLUSIVE_LOCK, RBD_FEATURE_FAST_DIFF as FAST_DIFF,
        RBD_FEATURE_JOURNALING as JOURNALING, RBD_FEATURE_LAYERING as LAYERING, RBD_FEATURE_OBJECT_MAP as OBJECT_MAP,
        RBD_FEATURE_STRIPINGV2 as STRIPINGV2,
    };
}
