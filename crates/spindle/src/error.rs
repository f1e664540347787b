//! The binary's error type: what went wrong in a command or in the daemon,
//! above the block layer. Every variant prints as one line that names the
//! thing at fault; `main` prints it once and exits 1.

use spindle_block::BlockError;
use std::io;

/// An error of a `spindle` command or of the daemon's control requests.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The block layer failed: opening, reading, writing or checking an
    /// image (it names the image).
    #[error(transparent)]
    Block(#[from] BlockError),
    /// A command-line argument, a configuration value or a field of a
    /// control request is wrong.
    #[error("{0}")]
    Usage(String),
    /// The request is well-formed but cannot be carried out now: no such
    /// export or job, a name already in use, an export being removed.
    #[error("{0}")]
    Refused(String),
    /// A peer broke its side: the control socket, QEMU's QMP socket, an
    /// NBD server, the daemon handing over its exports.
    #[error("{peer}: {msg}")]
    Peer {
        /// Who: `control socket /run/x.sock`, `QMP /run/vm.qmp`, ….
        peer: String,
        /// What happened.
        msg: String,
    },
    /// A VM operation of `spindle vm` failed; the message names the step
    /// (and the disk or QMP reply) it failed at.
    #[error("{0}")]
    Vm(String),
    /// The operating system refused something that is not an image: a
    /// thread, a signal handler, a listening socket.
    #[error("{what}: {source}")]
    System {
        /// What was being made.
        what: String,
        /// Why not.
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// A usage error (bad argument, configuration or request field).
    pub fn usage(msg: impl Into<String>) -> Error {
        Error::Usage(msg.into())
    }

    /// A refusal of a well-formed request.
    pub fn refused(msg: impl Into<String>) -> Error {
        Error::Refused(msg.into())
    }

    /// A peer's failure.
    pub fn peer(peer: impl Into<String>, msg: impl std::fmt::Display) -> Error {
        Error::Peer {
            peer: peer.into(),
            msg: msg.to_string(),
        }
    }

    /// The operating system refused `what`.
    pub fn system(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
        let what = what.into();
        move |source| Error::System { what, source }
    }

    /// The block-layer error inside, if that is what this is.
    pub fn as_block(&self) -> Option<&BlockError> {
        match self {
            Error::Block(e) => Some(e),
            _ => None,
        }
    }
}

impl From<spindle_io::Error> for Error {
    fn from(e: spindle_io::Error) -> Error {
        Error::Block(e.into())
    }
}

/// Result of the binary's commands and of the daemon's requests.
pub type CliResult<T> = Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_prints_one_line_naming_the_culprit() {
        let b = Error::from(BlockError::Invalid("bad".into()));
        assert_eq!(b.to_string(), "bad");
        assert!(b.as_block().is_some());
        assert_eq!(Error::usage("-d takes 1 to 4096").to_string(), "-d takes 1 to 4096");
        assert_eq!(
            Error::peer("control socket /x", "closed without a reply").to_string(),
            "control socket /x: closed without a reply"
        );
        let e = Error::system("cannot start the signal thread")(io::Error::from_raw_os_error(libc::EAGAIN));
        assert!(e.to_string().starts_with("cannot start the signal thread: "), "{e}");
        assert!(e.as_block().is_none());
    }
}
