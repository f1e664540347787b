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
}

/// Result alias for the I/O layer's setup functions.
pub type Result<T> = std::result::Result<T, Error>;
