//! Spindle's I/O layer.
//!
//! Every I/O thread owns a [`Runtime`]: a small single-threaded executor whose
//! reactor is one of three [`engine`]s (io_uring, Linux native AIO, or a
//! bounded thread pool). Futures submit [`Op`]s that point straight into the
//! caller's buffers (zero-copy); the reactor reaps completions in batches and
//! wakes the waiting futures. Nothing on the thread blocks except the reactor's
//! wait for the next event.
//!
//! [`File`] wraps an image file or block device opened with one of QEMU's
//! cache modes ([`CacheMode`]), discovers its O_DIRECT alignment and serves
//! unaligned requests through bounce buffers. It takes QEMU's image locks
//! ([`lock`]) so QEMU and Spindle keep out of each other's images.
//!
//! [`net`] puts stream sockets on the same runtime (io_uring socket ops,
//! or non-blocking calls woken by the runtime's epoll descriptor).
#![deny(missing_docs)]

mod buf;
mod cache;
pub mod engine;
mod error;
mod event;
mod file;
pub mod lock;
pub mod memfd;
pub mod net;
mod op;
mod poll;
mod range_lock;
pub mod ratelimit;
mod reactor;
mod runtime;
mod sg;
pub mod time;
pub mod times;
pub mod trace;
mod unix_socket;

pub use buf::AlignedBuf;
pub use cache::CacheMode;
pub use engine::EngineKind;
pub use error::{Error, Result};
pub use event::EventSource;
pub use file::{Alignment, File, OpenOptions};
pub use lock::{Locking, Perms};
pub use op::Op;
pub use runtime::{current_key, spawn, ForeignOp, Runtime, RuntimeConfig, Task};
pub use sg::{KeepAlive, SgList};
pub use times::{ThreadTimes, ThreadTimesSnapshot};
pub use unix_socket::{listen_unix, published_path};
