//! virtio-blk.

pub mod request;

pub use request::{parse, Limits, Parsed, Range, Request, RequestKind};
