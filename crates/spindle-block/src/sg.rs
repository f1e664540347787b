//! Scatter-gather lists over caller (later: guest) memory.

use std::io::{IoSlice, IoSliceMut};
use std::marker::PhantomData;

#[derive(Clone, Copy, Debug)]
struct Seg {
    ptr: *mut u8,
    len: usize,
}

/// A list of memory segments that one request reads into or writes from.
///
/// Drivers split a request into pieces with [`SgList::slice`]; pieces of one
/// list never overlap, so each byte is touched by at most one I/O at a time.
#[derive(Debug)]
pub struct SgList<'a> {
    segs: Vec<Seg>,
    len: usize,
    _mem: PhantomData<&'a mut [u8]>,
}

// SAFETY: an SgList is a set of exclusive borrows (or, via from_raw, memory the
// creator vouches for); moving it to another thread moves those borrows.
unsafe impl Send for SgList<'_> {}
// SAFETY: drivers only hand disjoint pieces of a list to concurrent I/Os.
unsafe impl Sync for SgList<'_> {}

impl<'a> SgList<'a> {
    /// One buffer.
    pub fn new(buf: &'a mut [u8]) -> Self {
        let len = buf.len();
        SgList {
            segs: vec![Seg {
                ptr: buf.as_mut_ptr(),
                len,
            }],
            len,
            _mem: PhantomData,
        }
    }

    /// Several buffers.
    pub fn from_slices(bufs: &'a mut [&mut [u8]]) -> Self {
        let segs: Vec<Seg> = bufs
            .iter_mut()
            .map(|b| Seg {
                ptr: b.as_mut_ptr(),
                len: b.len(),
            })
            .collect();
        let len = segs.iter().map(|s| s.len).sum();
        SgList {
            segs,
            len,
            _mem: PhantomData,
        }
    }

    /// A list over raw memory, such as mapped guest RAM.
    ///
    /// # Safety
    /// Every `(ptr, len)` must be valid for reads and writes for `'a`, the
    /// segments must not overlap, and nothing else may rely on the contents
    /// of that memory staying unchanged while the list is used.
    pub unsafe fn from_raw(segs: impl IntoIterator<Item = (*mut u8, usize)>) -> Self {
        let segs: Vec<Seg> = segs.into_iter().map(|(ptr, len)| Seg { ptr, len }).collect();
        let len = segs.iter().map(|s| s.len).sum();
        SgList {
            segs,
            len,
            _mem: PhantomData,
        }
    }

    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes `[offset, offset + len)` of this list. Panics if out of range
    /// (callers split within the request they were given).
    pub fn slice(&self, offset: usize, len: usize) -> SgList<'a> {
        assert!(offset + len <= self.len, "SgList::slice out of range");
        let mut segs = Vec::new();
        let mut skip = offset;
        let mut want = len;
        for s in &self.segs {
            if want == 0 {
                break;
            }
            if skip >= s.len {
                skip -= s.len;
                continue;
            }
            let n = (s.len - skip).min(want);
            // SAFETY: skip < s.len, so the pointer stays inside the segment.
            let ptr = unsafe { s.ptr.add(skip) };
            segs.push(Seg { ptr, len: n });
            want -= n;
            skip = 0;
        }
        SgList {
            segs,
            len,
            _mem: PhantomData,
        }
    }

    /// The segments as `IoSliceMut`s for a read.
    pub fn io_slices_mut(&self) -> Vec<IoSliceMut<'_>> {
        self.segs
            .iter()
            // SAFETY: each segment is valid for 'a and pieces handed to
            // concurrent I/Os are disjoint (see the type's docs).
            .map(|s| IoSliceMut::new(unsafe { std::slice::from_raw_parts_mut(s.ptr, s.len) }))
            .collect()
    }

    /// The segments as `IoSlice`s for a write.
    pub fn io_slices(&self) -> Vec<IoSlice<'_>> {
        self.segs
            .iter()
            // SAFETY: as in io_slices_mut.
            .map(|s| IoSlice::new(unsafe { std::slice::from_raw_parts(s.ptr, s.len) }))
            .collect()
    }

    /// Fills the list with zeroes.
    pub fn fill_zero(&self) {
        for s in &self.segs {
            // SAFETY: the segment is valid for writes of s.len bytes.
            unsafe { std::ptr::write_bytes(s.ptr, 0, s.len) };
        }
    }

    /// Copies `src` into the list (`src.len()` must equal `self.len()`).
    pub fn copy_from(&self, src: &[u8]) {
        let mut pos = 0;
        for s in &self.segs {
            let n = s.len.min(src.len() - pos);
            // SAFETY: the segment is valid for n bytes and does not overlap src.
            unsafe { std::ptr::copy_nonoverlapping(src[pos..].as_ptr(), s.ptr, n) };
            pos += n;
        }
    }

    /// Copies the list into `dst` (`dst.len()` must equal `self.len()`).
    pub fn copy_to(&self, dst: &mut [u8]) {
        let mut pos = 0;
        for s in &self.segs {
            let n = s.len.min(dst.len() - pos);
            // SAFETY: the segment is valid for n bytes and does not overlap dst.
            unsafe { std::ptr::copy_nonoverlapping(s.ptr, dst[pos..].as_mut_ptr(), n) };
            pos += n;
        }
    }

    /// Whether every byte is zero.
    pub fn is_zero(&self) -> bool {
        self.segs.iter().all(|s| {
            // SAFETY: the segment is valid for reads of s.len bytes.
            let b = unsafe { std::slice::from_raw_parts(s.ptr, s.len) };
            b.iter().all(|&x| x == 0)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::SgList;

    #[test]
    fn slices_cross_segments() {
        let mut a = [1u8; 3];
        let mut b = [2u8; 5];
        let mut bufs: [&mut [u8]; 2] = [&mut a, &mut b];
        let sg = SgList::from_slices(&mut bufs);
        let mid = sg.slice(2, 3);
        assert_eq!(mid.len(), 3);
        let mut out = [0u8; 3];
        mid.copy_to(&mut out);
        assert_eq!(out, [1, 2, 2]);
        mid.copy_from(&[9, 9, 9]);
        drop(mid);
        drop(sg);
        assert_eq!(a, [1, 1, 9]);
        assert_eq!(b, [9, 9, 2, 2, 2]);
    }
}
