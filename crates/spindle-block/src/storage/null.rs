//! The `null` storage (`null:SIZE`): reads zeroes, accepts and drops
//! writes. For benchmarks.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The null storage.
pub struct Null {
    size: AtomicU64,
    spec: PathBuf,
}

impl Null {
    /// A null device of `size` bytes.
    pub fn new(size: u64) -> Null {
        Null {
            size: AtomicU64::new(size),
            spec: PathBuf::from(format!("null:{size}")),
        }
    }
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }
    /// The spec it was made from.
    pub fn path(&self) -> &Path {
        &self.spec
    }
    pub(crate) fn resize(&self, size: u64) {
        self.size.store(size, Ordering::Relaxed)
    }
}
