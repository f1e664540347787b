//! virtio-blk.

pub mod exec;
pub mod request;

pub use exec::{complete, Completion, Device};
pub use request::{parse, Limits, Parsed, Range, Request, RequestKind};
