//! Spindle's NBD server (the protocol of the NetworkBlockDevice project's
//! `doc/proto.md`, with QEMU's `qemu:allocation-depth` context).
//!
//! The layers, each its own module:
//! - [`proto`]: wire constants and fixed-size headers;
//! - [`handshake`]: the fixed newstyle negotiation as a state machine over
//!   bytes (no socket: fuzzable, and TLS can wrap the stream under it);
//! - [`transmission`]: request validation and reply encoding, over bytes;
//! - `exec`: runs a command on the export's [`spindle_block::Node`];
//! - `connection`: one client's socket I/O (handshake, then one task per
//!   request, replies out of order, bounded in-flight work);
//! - [`server`]: the accept loop and the I/O threads, each one
//!   [`spindle_io::Runtime`] whose sockets go through its engine.
#![deny(missing_docs)]

mod connection;
mod error;
mod exec;
pub mod export;
pub mod fuzzing;
pub mod handshake;
mod outbox;
pub mod pool;
pub mod proto;
pub mod server;
pub mod tls;
pub mod transmission;

pub use error::{NbdError, Result};
pub use export::{Catalog, DetectZeroes, Export, Settings};
pub use handshake::ExportInfo;
pub use server::{Server, ServerConfig, StopHandle, POLL};
pub use tls::TlsConfig;
