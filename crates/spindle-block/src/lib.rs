//! Spindle's block layer.
//!
//! A [`Node`] is one image in a backing chain: a format (`raw` or `qcow2`,
//! [`formats`]) on a [`Storage`] ([`storage`]): a file or block device,
//! `null:SIZE`, or an NBD export (`nbd://`, `nbd+unix://`, through
//! [`protocols::nbd`]). Every operation is an `async fn` that runs on the
//! calling thread's [`spindle_io::Runtime`]; data moves directly between
//! the caller's [`SgList`] and the storage. qcow2 metadata misses
//! are awaited like any other I/O, so no call blocks the thread.
#![deny(missing_docs)]

mod error;
pub mod fault;
pub mod formats;
#[doc(hidden)]
pub mod fuzzing;
mod info;
mod node;
mod open;
pub mod protocols;
mod status;
pub mod storage;

pub use error::{BlockError, Result};
pub use formats::qcow2::header::printable;
pub use info::ImageInfo;
pub use node::Node;
pub use open::{backing_path, open_image, parse_size, probe, probe_storage, Format, OpenConfig, Sharing};
pub use spindle_io::SgList;
pub use status::{Allocation, BlockStatus, Extent};
pub use storage::Storage;
