//! virtio-blk.

pub mod config;
pub mod exec;
pub mod request;

pub use exec::{complete, Completion, Device};
pub use request::{parse, Limits, Parsed, Range, Request, RequestKind, VIRTIO_BLK_S_OK};
