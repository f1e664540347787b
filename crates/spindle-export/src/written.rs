//! Which ranges of a device the guest wrote while a job watches (the live
//! commit job, docs/jobs.md): one bit per granule, set lock-free by the
//! I/O threads once a write, write-zeroes or discard completed, taken (and
//! cleared) by the job.
//!
//! A bit is set after the request's I/O finished, never before: a job
//! that took the bit and copied the range before the write landed sees
//! the bit again; one that copies after it landed copies its data.

use std::sync::atomic::{AtomicU64, Ordering};

/// Written granules of one device.
pub struct Written {
    granule_bits: u32,
    words: Box<[AtomicU64]>,
}

impl Written {
    /// Tracks a device of `size` bytes in granules of `granule` bytes (a
    /// power of two, at least 512).
    pub fn new(size: u64, granule: u64) -> Written {
        let granule_bits = granule.max(512).next_power_of_two().trailing_zeros();
        let granules = size.div_ceil(1 << granule_bits);
        Written {
            granule_bits,
            words: (0..granules.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The granule size in bytes.
    pub fn granule(&self) -> u64 {
        1 << self.granule_bits
    }

    /// `len` bytes at `off` were written.
    pub fn mark(&self, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = off >> self.granule_bits;
        let last = (off.saturating_add(len) - 1) >> self.granule_bits;
        for g in first..=last {
            let Some(w) = self.words.get((g / 64) as usize) else {
                return;
            };
            w.fetch_or(1 << (g % 64), Ordering::AcqRel);
        }
    }

    /// The ranges written since the last take, merged, as (offset, length)
    /// in bytes; their bits are cleared.
    pub fn take(&self) -> Vec<(u64, u64)> {
        let g = self.granule();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (i, w) in self.words.iter().enumerate() {
            let mut bits = w.swap(0, Ordering::AcqRel);
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                let off = (i as u64 * 64 + b) * g;
                match out.last_mut() {
                    Some((o, l)) if *o + *l == off => *l += g,
                    _ => out.push((off, g)),
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_merge_into_ranges_and_a_take_clears_them() {
        let w = Written::new(1 << 20, 4096);
        w.mark(0, 1);
        w.mark(4096, 8192);
        w.mark(65536 * 2 + 5, 10);
        w.mark(1 << 30, 512); // past the end: ignored
        assert_eq!(w.take(), vec![(0, 3 * 4096), (131072, 4096)]);
        assert!(w.take().is_empty());
    }
}
