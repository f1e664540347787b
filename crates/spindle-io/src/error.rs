//! Errors of the I/O layer.

use std::io;
use std::path::PathBuf;

/// Errors raised while setting up engines or opening files.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The requested I/O engine could not be created.
    #[error("cannot start the {engine} I/O engine")]
    EngineSetup {
        /// Engine name as given by the user (`io_uring`, `native`, `threads`).
        engine: &'static str,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// An engine name or cache mode string was not recognised.
    #[error("unknown {what} '{value}' (expected one of: {expected})")]
    UnknownName {
        /// What was being parsed ("cache mode", "aio engine").
        what: &'static str,
        /// The value given.
        value: String,
        /// The accepted values.
        expected: &'static str,
    },
    /// Opening an image file failed.
    #[error("{}: {context}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// What was being done.
        context: String,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// Another user of the image (QEMU, qemu-img, another Spindle export)
    /// conflicts with this open, by QEMU's image locks.
    #[error(
        "{}: image is in use: another process {} the \"{perm}\" permission (is a VM or qemu-img using it?)",
        path.display(),
        if *held { "holds" } else { "does not share" }
    )]
    InUse {
        /// The image.
        path: PathBuf,
        /// QEMU's name of the permission in conflict ("write", "resize", ...).
        perm: &'static str,
        /// Whether the other holds it (else it forbids this open holding it).
        held: bool,
    },
    /// An image lock could not be taken or tested (not a conflict: the file
    /// system refused, as QEMU's "Failed to lock byte").
    #[error("{}: cannot lock byte {byte} of the image: {source}", path.display())]
    Lock {
        /// The image.
        path: PathBuf,
        /// The lock byte.
        byte: u64,
        /// What fcntl said.
        #[source]
        source: io::Error,
    },
}

/// Result alias for the I/O layer's setup functions.
pub type Result<T> = std::result::Result<T, Error>;
