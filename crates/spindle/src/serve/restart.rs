//! Starting again where a previous `spindle serve` left off.
//!
//! A `spindle serve` killed with SIGKILL leaves its image locks (OFD
//! locks) to the kernel, which drops them when the last reference to the
//! open file goes; io_uring's workers hold one for a moment after the
//! process died. A new `spindle serve` started at once on the same image
//! would find it in use: the open is retried for a short, bounded time,
//! saying so once, before the conflict is reported.

use super::spec::ExportSpec;
use crate::error::{CliResult, Error};
use spindle_block::BlockError;
use spindle_export::Device;
use std::time::{Duration, Instant};

/// How long an image that is in use is waited for.
pub const LOCK_WAIT: Duration = Duration::from_secs(3);

/// Whether `e` is an image-lock conflict (the image is in use).
fn in_use(e: &Error) -> bool {
    matches!(e, Error::Block(BlockError::Setup(spindle_io::Error::InUse { .. })))
}

/// Opens `spec`'s device; an image in use is tried again for up to `wait`.
pub fn open_waiting(spec: &ExportSpec, wait: Duration) -> CliResult<Device> {
    retry_in_use(&spec.image, wait, true, || spec.open())
}

/// Runs `open` until it succeeds or fails with something else than the
/// image being in use, for up to `wait`; says once that it waits, when
/// `say`.
pub fn retry_in_use<T>(image: &str, wait: Duration, say: bool, open: impl Fn() -> CliResult<T>) -> CliResult<T> {
    let start = Instant::now();
    let mut said = false;
    loop {
        match open() {
            Err(e) if in_use(&e) && start.elapsed() < wait => {
                if say && !said {
                    eprintln!(
                        "spindle: {image} is in use; trying again for up to {} s (a Spindle that was just killed, \
                         or the source of a migration, may hold its locks for a moment)",
                        wait.as_secs()
                    );
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            r => return r,
        }
    }
}
