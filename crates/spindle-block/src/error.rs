//! Block-layer errors. Each names the image and the problem in one line.

use std::io;
use std::path::PathBuf;

/// Errors raised by block drivers.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// I/O on the image file failed.
    #[error("{}: {context}: {source}", path.display())]
    Io {
        /// The image.
        path: PathBuf,
        /// What was being done.
        context: &'static str,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// The image is malformed or uses something Spindle refuses.
    #[error("{}: {msg}", path.display())]
    Format {
        /// The image.
        path: PathBuf,
        /// The problem.
        msg: String,
    },
    /// Metadata read from the image is inconsistent, or a write would land
    /// on metadata: the image gets the corrupt bit and the request fails.
    #[error("{}: image is corrupt: {msg}", path.display())]
    Corrupt {
        /// The image.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// The image or node cannot be written.
    #[error("{}: image is read-only{}", path.display(), if reason.is_empty() { String::new() } else { format!(" ({reason})") })]
    ReadOnly {
        /// The image.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A request reaches past the end of the device.
    #[error("request at offset {offset} length {len} is past the end of the {size}-byte device")]
    OutOfRange {
        /// Request offset.
        offset: u64,
        /// Request length.
        len: u64,
        /// Device size.
        size: u64,
    },
    /// The I/O layer could not be set up or a file could not be opened.
    #[error(transparent)]
    Setup(#[from] spindle_io::Error),
    /// A remote server (NBD) refused a request, or broke its protocol.
    #[error("{uri}: {msg}")]
    Remote {
        /// The URI of the export.
        uri: String,
        /// What went wrong, with the server's own message if it sent one.
        msg: String,
        /// The errno that stands for it.
        errno: i32,
    },
    /// Bad configuration or argument.
    #[error("{0}")]
    Invalid(String),
}

impl BlockError {
    /// The errno that best describes the error, for protocol replies.
    pub fn errno(&self) -> i32 {
        match self {
            BlockError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            BlockError::ReadOnly { .. } => libc::EROFS,
            BlockError::OutOfRange { .. } | BlockError::Invalid(_) => libc::EINVAL,
            BlockError::Remote { errno, .. } => *errno,
            _ => libc::EIO,
        }
    }
}

/// Result alias of the block layer.
pub type Result<T> = std::result::Result<T, BlockError>;

/// Helper: wrap an io::Error with the image path and context.
pub(crate) fn io_err<'a>(
    path: &'a std::path::Path,
    context: &'static str,
) -> impl FnOnce(io::Error) -> BlockError + 'a {
    move |source| BlockError::Io {
        path: path.to_path_buf(),
        context,
        source,
    }
}

/// Helper: refuses writes to a storage opened read-only for `reason`.
pub(crate) fn writable(path: &std::path::Path, read_only: Option<&str>) -> Result<()> {
    match read_only {
        Some(reason) => Err(BlockError::ReadOnly {
            path: path.to_path_buf(),
            reason: reason.into(),
        }),
        None => Ok(()),
    }
}

/// Helper: names what was being done when storage I/O failed (the
/// storage names the image and the error; other errors pass unchanged).
pub(crate) fn doing(context: &'static str) -> impl FnOnce(BlockError) -> BlockError {
    move |e| match e {
        BlockError::Io { path, source, .. } => BlockError::Io { path, context, source },
        e => e,
    }
}

/// Helper: a corruption found in the image's metadata.
pub(crate) fn corrupt(path: &std::path::Path, msg: impl Into<String>) -> BlockError {
    BlockError::Corrupt {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Helper: a format error.
pub(crate) fn fmt_err(path: &std::path::Path, msg: impl Into<String>) -> BlockError {
    BlockError::Format {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}
