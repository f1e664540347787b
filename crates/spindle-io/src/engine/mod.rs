//! I/O engines: how ops reach the kernel and how completions come back.
//!
//! All engines share one shape: ops are queued with a token, handed to the
//! kernel in a batch by [`Engine::submit`], and their results are reaped in a
//! batch by [`Engine::reap`]. Each engine exposes an eventfd that becomes
//! readable when completions may be waiting, so one `poll(2)` in the reactor
//! (and later the vhost-user worker's epoll) can wait for the engine together
//! with other event sources.

mod aio;
mod threads;
mod uring;

pub use aio::AioEngine;
pub use threads::ThreadPoolEngine;
pub use uring::UringEngine;

use crate::error::Error;
use crate::op::Op;
use std::fmt;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::str::FromStr;

/// The op kind could not be queued by this engine; the caller must route it
/// elsewhere (the runtime uses its helper thread pool).
#[derive(Debug)]
pub struct Unsupported;

/// An I/O engine.
pub trait Engine {
    /// Queues `op`; its completion is later reaped under `token`.
    ///
    /// # Safety
    /// The buffers and iovec array referenced by `op` must stay valid and
    /// unmoved until the completion for `token` has been reaped.
    unsafe fn push(&mut self, token: u64, op: Op) -> Result<(), Unsupported>;
    /// Hands every queued op to the kernel (or the workers).
    fn submit(&mut self) -> io::Result<()>;
    /// Appends finished ops as `(token, result)` without blocking. Results
    /// follow the kernel convention: bytes transferred, or negative errno.
    fn reap(&mut self, out: &mut Vec<(u64, i32)>);
    /// An eventfd that is readable when completions may be available.
    fn event_fd(&self) -> RawFd;
    /// Ops queued or in flight.
    fn in_flight(&self) -> usize;
}

/// Which engine to use, with QEMU's `aio=` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// io_uring (default).
    IoUring,
    /// Linux native AIO (`io_submit`). Blocks on sparse files and without O_DIRECT.
    Native,
    /// A bounded pool of worker threads doing `preadv`/`pwritev`.
    Threads,
}

impl EngineKind {
    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::IoUring => "io_uring",
            EngineKind::Native => "native",
            EngineKind::Threads => "threads",
        }
    }

    /// Creates an engine of this kind with room for `depth` ops in flight.
    /// `threads` sizes the pool of the `threads` engine.
    pub fn create(self, depth: u32, threads: usize) -> Result<Box<dyn Engine>, Error> {
        let setup = |source| Error::EngineSetup {
            engine: self.name(),
            source,
        };
        Ok(match self {
            EngineKind::IoUring => Box::new(UringEngine::new(depth).map_err(setup)?),
            EngineKind::Native => Box::new(AioEngine::new(depth).map_err(setup)?),
            EngineKind::Threads => Box::new(ThreadPoolEngine::new(threads).map_err(setup)?),
        })
    }
}

impl FromStr for EngineKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "io_uring" | "uring" => Ok(EngineKind::IoUring),
            "native" | "aio" => Ok(EngineKind::Native),
            "threads" => Ok(EngineKind::Threads),
            _ => Err(Error::UnknownName {
                what: "aio engine",
                value: s.to_string(),
                expected: "io_uring, native, threads",
            }),
        }
    }
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A non-blocking, close-on-exec eventfd.
pub(crate) fn new_eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the returned descriptor is checked before use.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds one to an eventfd counter.
pub(crate) fn signal_eventfd(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a valid u64; a full counter (EAGAIN) still
    // leaves the fd readable, which is all a signal needs.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}
