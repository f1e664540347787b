//! Scatter-gather lists: the memory an I/O reads into or writes from.
//!
//! An [`SgList`] names memory by raw segments and carries what keeps that
//! memory valid (its keep-alives: an owned buffer, or the mapping of guest
//! RAM). The runtime holds a clone of the keep-alives of every op until the
//! kernel is done with it, so neither dropping nor leaking the future of
//! an I/O (`mem::forget` is safe Rust) can free memory the kernel still
//! writes. That is what makes the I/O functions that take an `SgList` safe.
//!
//! Rust never holds a reference into an `SgList`'s memory: it is read and
//! written with raw copies, as vm-memory accesses guest memory. Whoever
//! else writes that memory at the same time (the guest, the kernel, two
//! I/Os over overlapping pieces) can leave mixed bytes, but cannot break
//! Rust's aliasing rules. docs/architecture.md says what is guaranteed.

use crate::buf::AlignedBuf;
use smallvec::SmallVec;
use std::any::Any;
use std::rc::Rc;

/// Something that keeps memory valid for as long as it lives.
pub type KeepAlive = Rc<dyn Any>;

#[derive(Clone, Copy, Debug)]
struct Seg {
    ptr: *mut u8,
    len: usize,
}

/// Memory segments one request reads into or writes from, with what keeps
/// them valid.
///
/// There is no way to borrow the memory as a Rust slice, so two pieces of
/// one list can never become two live `&mut [u8]` over the same bytes:
///
/// ```compile_fail
/// let sg = spindle_io::SgList::zeroed(512);
/// let (a, b) = (sg.slice(0, 512), sg.slice(0, 512));
/// let _two_mut: (Vec<std::io::IoSliceMut<'_>>, Vec<std::io::IoSliceMut<'_>>) = (a.io_slices_mut(), b.io_slices_mut());
/// ```
///
/// Nor can a list borrow the caller's memory, which the caller could free
/// while a leaked I/O still targets it:
///
/// ```compile_fail
/// let mut buf = vec![0u8; 512];
/// let _sg = spindle_io::SgList::new(&mut buf);
/// ```
#[derive(Clone)]
pub struct SgList {
    segs: SmallVec<[Seg; 4]>,
    len: usize,
    keep: SmallVec<[KeepAlive; 2]>,
}

impl std::fmt::Debug for SgList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SgList({} bytes in {} segments)", self.len, self.segs.len())
    }
}

impl SgList {
    /// A list over an owned buffer. Get the buffer back with
    /// [`SgList::into_buf`] once no I/O uses it.
    pub fn owned(mut buf: AlignedBuf) -> SgList {
        let seg = Seg {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        };
        // The heap block does not move when the buffer moves into the Rc.
        SgList {
            segs: std::iter::once(seg).filter(|s| s.len > 0).collect(),
            len: seg.len,
            keep: std::iter::once(Rc::new(buf) as KeepAlive).collect(),
        }
    }

    /// A list over a new zeroed buffer of `len` bytes, aligned for O_DIRECT.
    pub fn zeroed(len: usize) -> SgList {
        SgList::owned(AlignedBuf::new(len, 4096))
    }

    /// A list over a copy of `data`, without O_DIRECT's alignment: for
    /// socket I/O (protocol headers), where a page-aligned allocation per
    /// message would cost more than the message.
    pub fn copy_unaligned(data: &[u8]) -> SgList {
        let mut b = AlignedBuf::new(data.len(), 16);
        b.copy_from_slice(data);
        SgList::owned(b)
    }

    /// A list over a copy of `data`.
    pub fn copy_of(data: &[u8]) -> SgList {
        let mut b = AlignedBuf::new(data.len(), 4096);
        b.copy_from_slice(data);
        SgList::owned(b)
    }

    /// A list over raw memory, such as mapped guest RAM.
    ///
    /// # Safety
    /// Every `(ptr, len)` must be valid for reads and writes for as long as
    /// `keep` (or any clone of it) lives, and no Rust reference to that
    /// memory may exist while the list (or a slice of it) does: others may
    /// write it at any time.
    pub unsafe fn from_raw(segs: impl IntoIterator<Item = (*mut u8, usize)>, keep: KeepAlive) -> SgList {
        let segs: SmallVec<[Seg; 4]> = segs
            .into_iter()
            .filter(|&(_, len)| len > 0)
            .map(|(ptr, len)| Seg { ptr, len })
            .collect();
        let len = segs.iter().map(|s| s.len).sum();
        SgList {
            segs,
            len,
            keep: std::iter::once(keep).collect(),
        }
    }

    /// The lists one after the other (e.g. old data, a request, old data).
    pub fn concat(lists: &[&SgList]) -> SgList {
        let mut out = SgList {
            segs: SmallVec::new(),
            len: 0,
            keep: SmallVec::new(),
        };
        for l in lists {
            out.segs.extend_from_slice(&l.segs);
            out.len += l.len;
            out.keep.extend(l.keep.iter().cloned());
        }
        out
    }

    /// The buffer of a list made by [`SgList::owned`], when no slice or
    /// I/O shares it any more; otherwise the list back.
    pub fn into_buf(self) -> Result<AlignedBuf, Box<SgList>> {
        if self.keep.len() != 1 {
            return Err(Box::new(self));
        }
        let SgList { segs, len, mut keep } = self;
        let k = keep.pop().expect("one keep-alive");
        let back = |k: KeepAlive| {
            Box::new(SgList {
                segs: segs.clone(),
                len,
                keep: std::iter::once(k).collect(),
            })
        };
        match k.downcast::<AlignedBuf>().map(Rc::try_unwrap) {
            Ok(Ok(buf)) if buf.len() == len => Ok(buf),
            // A slice of the buffer: the segments still point into it.
            Ok(Ok(buf)) => Err(back(Rc::new(buf))),
            Ok(Err(rc)) => Err(back(rc)),
            Err(k) => Err(back(k)),
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

    /// The bytes `[offset, offset + len)` of this list, sharing its memory.
    /// Panics if out of range (callers split within the request they were
    /// given).
    pub fn slice(&self, offset: usize, len: usize) -> SgList {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len),
            "SgList::slice out of range"
        );
        let mut segs = SmallVec::new();
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
            // Stays inside the segment (skip < s.len); wrapping_add makes
            // no claim about the memory, which is only ever used raw.
            segs.push(Seg {
                ptr: s.ptr.wrapping_add(skip),
                len: n,
            });
            want -= n;
            skip = 0;
        }
        SgList {
            segs,
            len,
            keep: self.keep.clone(),
        }
    }

    /// The segments as iovecs, for an op.
    pub(crate) fn iovecs(&self) -> Vec<libc::iovec> {
        self.segs
            .iter()
            .map(|s| libc::iovec {
                iov_base: s.ptr.cast(),
                iov_len: s.len,
            })
            .collect()
    }

    /// The segments as iovecs, and what keeps their memory valid: for I/O
    /// that another library does (librbd's vectored calls), which must be
    /// done with the memory before the keep-alives are dropped. Holding
    /// them is what the caller's `unsafe` submission relies on.
    pub fn foreign_io_parts(&self) -> (Vec<libc::iovec>, Vec<KeepAlive>) {
        (self.iovecs(), self.keep.iter().cloned().collect())
    }

    /// The keep-alives, for an op.
    pub(crate) fn keep_alives(&self) -> SmallVec<[KeepAlive; 2]> {
        self.keep.clone()
    }

    /// The address and length of each segment (to check alignment).
    pub(crate) fn segments(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.segs.iter().map(|s| (s.ptr as usize, s.len))
    }

    /// Fills the list with zeroes.
    pub fn fill_zero(&self) {
        for s in &self.segs {
            // SAFETY: the segment is valid for writes of s.len bytes while
            // self.keep lives (from_raw/owned contract); no reference to it
            // exists.
            unsafe { std::ptr::write_bytes(s.ptr, 0, s.len) };
        }
    }

    /// Copies `src` into the start of the list (at most `self.len()` bytes).
    pub fn copy_from(&self, src: &[u8]) {
        let mut pos = 0;
        for s in &self.segs {
            let n = s.len.min(src.len() - pos);
            if n == 0 {
                break;
            }
            // SAFETY: the segment is valid for n bytes (as in fill_zero) and
            // does not overlap `src`, which Rust borrows (list memory is
            // never borrowed).
            unsafe { std::ptr::copy_nonoverlapping(src[pos..].as_ptr(), s.ptr, n) };
            pos += n;
        }
    }

    /// Copies the start of the list into `dst` (at most `dst.len()` bytes).
    pub fn copy_to(&self, dst: &mut [u8]) {
        let mut pos = 0;
        for s in &self.segs {
            let n = s.len.min(dst.len() - pos);
            if n == 0 {
                break;
            }
            // SAFETY: as in copy_from, reading instead.
            unsafe { std::ptr::copy_nonoverlapping(s.ptr, dst[pos..].as_mut_ptr(), n) };
            pos += n;
        }
    }

    /// The list's bytes, copied out.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len];
        self.copy_to(&mut v);
        v
    }

    /// Whether every byte is zero (as read at the time of each copy).
    pub fn is_zero(&self) -> bool {
        let mut chunk = [0u8; 4096];
        let mut pos = 0;
        while pos < self.len {
            let n = (self.len - pos).min(chunk.len());
            self.slice(pos, n).copy_to(&mut chunk[..n]);
            if chunk[..n].iter().any(|&b| b != 0) {
                return false;
            }
            pos += n;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_and_concatenations_share_memory() {
        let a = SgList::copy_of(&[1, 1, 1]);
        let b = SgList::copy_of(&[2, 2, 2, 2, 2]);
        let sg = SgList::concat(&[&a, &b]);
        let mid = sg.slice(2, 3);
        assert_eq!(mid.to_vec(), vec![1, 2, 2]);
        mid.copy_from(&[9, 9, 9]);
        drop((mid, sg));
        assert_eq!(a.to_vec(), vec![1, 1, 9]);
        assert_eq!(b.slice(0, 5).to_vec(), vec![9, 9, 2, 2, 2]);
        assert!(!b.is_zero());
        b.fill_zero();
        assert!(b.is_zero());
        assert_eq!(b.into_buf().map(|v| v.to_vec()).unwrap(), vec![0u8; 5]);
    }

    #[test]
    fn into_buf_only_when_unshared() {
        let sg = SgList::zeroed(8192);
        let part = sg.slice(0, 4096);
        let sg = sg.into_buf().expect_err("a slice still shares it");
        drop(part);
        assert_eq!(sg.into_buf().unwrap().len(), 8192);
        // Guest-like memory is never handed out as a buffer.
        let mut v = vec![7u8; 16];
        let keep: KeepAlive = Rc::new(());
        // SAFETY: v outlives the list and is not borrowed while it lives.
        let raw = unsafe { SgList::from_raw([(v.as_mut_ptr(), v.len())], keep) };
        assert!(raw.into_buf().is_err());
        assert_eq!(v, vec![7u8; 16]);
    }
}
