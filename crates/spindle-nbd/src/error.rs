//! The crate's one error type.

use std::io;

/// Why a connection or the server ended.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// Socket or image I/O failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// A magic number was wrong (the peer does not speak NBD, or lost sync).
    #[error("bad {what} magic {got:#x}")]
    BadMagic {
        /// Which magic.
        what: &'static str,
        /// What came instead.
        got: u64,
    },
    /// The client set flags the server did not offer.
    #[error("unknown client flags {0:#x}")]
    ClientFlags(u32),
    /// `NBD_OPT_EXPORT_NAME` named no export (the spec's answer: disconnect).
    #[error("no export named {0:?}")]
    UnknownExport(String),
    /// TLS failed: the handshake, a record, or the client's certificate.
    #[error("TLS: {0}")]
    Tls(String),
    /// The client broke a rule that leaves no way to go on.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// Setting the server up failed.
    #[error("{0}")]
    Setup(String),
}

/// Results of this crate.
pub type Result<T, E = NbdError> = std::result::Result<T, E>;
