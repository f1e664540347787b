//! Asynchronous image I/O, reaped on the submitting thread through an
//! eventfd.
//!
//! An [`EventQueue`] belongs to one thread and shares its [`Image`] (an
//! `Arc`) with the queues of other threads and with metadata calls. Its
//! completion callback, which librbd runs on its own threads, takes the
//! request's return value, releases the completion, appends `(request,
//! result)` to the queue's inbox (a mutex held for a push) and signals the
//! queue's eventfd; nothing else. The owner (an I/O thread whose epoll
//! watches [`EventQueue::fd`]) takes the finished requests with
//! [`EventQueue::reap`]. So completions come back to the thread that
//! submitted them, whichever thread librbd finished them on, and several
//! I/O threads can serve one image without sharing any state of their
//! requests. No thread per request.
//!
//! (`rbd_set_image_notification` with `rbd_poll_io_events` would do the
//! same with one eventfd per image, but then every thread serving the
//! image would wake for every completion and hand other threads'
//! requests over to them.)

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libc::{c_int, c_void, iovec};
use slab::Slab;
use spindle_rbd_sys as sys;

use crate::error::{Error, Result};
use crate::image::Image;

/// What a request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// `rbd_aio_readv`.
    Read,
    /// `rbd_aio_writev`.
    Write,
    /// `rbd_aio_discard`.
    Discard,
    /// `rbd_aio_write_zeroes`.
    WriteZeroes,
    /// `rbd_aio_flush`.
    Flush,
}

impl OpKind {
    fn name(self) -> &'static str {
        match self {
            OpKind::Read => "read",
            OpKind::Write => "write",
            OpKind::Discard => "discard",
            OpKind::WriteZeroes => "write zeroes",
            OpKind::Flush => "flush",
        }
    }
}

/// A finished request.
#[derive(Debug)]
pub struct Completion {
    /// The token it was submitted with.
    pub token: u64,
    /// What it was.
    pub kind: OpKind,
    /// Bytes read; for a write, its length (librbd itself reports 0);
    /// 0 for the others; or the error.
    pub result: Result<usize>,
    /// The buffer an owned [`EventQueue::read`] / [`EventQueue::write`]
    /// gave, handed back (filled, for a read).
    pub buffer: Option<Vec<u8>>,
}

/// One request in flight.
struct Op {
    token: u64,
    kind: OpKind,
    offset: u64,
    /// The iovec array librbd reads from: it keeps the pointer (a read's
    /// result is scattered into it at completion), so it lives here until
    /// then.
    iov: Vec<iovec>,
    /// An owned request's buffer, which `iov` points into.
    buffer: Option<Vec<u8>>,
}

/// Where a queue's finished requests wait for its thread: shared with
/// the completion callbacks.
struct Inbox {
    /// `(op key, return value)` of each finished request.
    done: Mutex<Vec<(usize, i64)>>,
    /// Signalled after each push.
    eventfd: OwnedFd,
}

/// What a request's completion callback gets: its queue's inbox and the
/// op's key.
struct CallbackArg {
    inbox: Arc<Inbox>,
    key: usize,
}

/// The completion callback (on a librbd thread): result into the inbox,
/// completion released, eventfd signalled.
extern "C" fn on_complete(c: sys::rbd_completion_t, arg: *mut c_void) {
    // SAFETY: `arg` is the `Box<CallbackArg>` that `submit` leaked for
    // this completion, which librbd completes (and so calls this) once.
    let arg = unsafe { Box::from_raw(arg.cast::<CallbackArg>()) };
    // SAFETY: `c` is the finished completion this callback is for; its
    // value is read before it is released, once (librbd holds its own
    // reference for as long as it still touches it, as QEMU relies on).
    let ret = unsafe {
        let ret = sys::rbd_aio_get_return_value(c);
        sys::rbd_aio_release(c);
        ret
    };
    // A poisoned lock cannot happen (nothing panics under it); the push is
    // made regardless so the request is never lost.
    let mut done = arg.inbox.done.lock().unwrap_or_else(|p| p.into_inner());
    done.push((arg.key, ret as i64));
    drop(done);
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a valid u64 to the inbox's eventfd, open
    // as long as `arg.inbox` lives.
    unsafe { libc::write(arg.inbox.eventfd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

/// Asynchronous I/O on an image from one thread, completed through an
/// eventfd (see the module docs). Dropping it waits for the requests in
/// flight; the image closes with its last `Arc`.
pub struct EventQueue {
    image: Arc<Image>,
    inbox: Arc<Inbox>,
    ops: Slab<Op>,
    taken: Vec<(usize, i64)>,
}

// SAFETY: the raw pointers in `ops` (iovecs) point into buffers that are
// either owned by the op or guaranteed by the unsafe submitter to stay
// valid until completion, wherever the queue is; librbd's handles are not
// tied to a thread (see `Image`).
unsafe impl Send for EventQueue {}

impl std::fmt::Debug for EventQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventQueue")
            .field("image", &*self.image)
            .field("in_flight", &self.ops.len())
            .finish()
    }
}

impl EventQueue {
    /// A queue of this thread's requests to `image` (an image alone, or
    /// one shared with other queues), with an eventfd of its own.
    pub fn new(image: impl Into<Arc<Image>>) -> Result<EventQueue> {
        let image = image.into();
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
            return Err(image.error("create eventfd", -i64::from(errno)));
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(EventQueue {
            image,
            inbox: Arc::new(Inbox {
                done: Mutex::new(Vec::new()),
                eventfd,
            }),
            ops: Slab::new(),
            taken: Vec::new(),
        })
    }

    /// The image.
    pub fn image(&self) -> &Image {
        &self.image
    }

    /// The image, shared (for metadata calls on another thread).
    pub fn shared_image(&self) -> Arc<Image> {
        self.image.clone()
    }

    /// The eventfd to watch for readability; then call [`EventQueue::reap`].
    pub fn fd(&self) -> RawFd {
        self.inbox.eventfd.as_raw_fd()
    }

    /// Requests submitted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.ops.len()
    }

    /// Creates a completion for a new op, lets `submit` pass it to librbd
    /// with the op's iovec array, and records the op; on a submission error
    /// nothing stays behind.
    fn submit(
        &mut self,
        op: Op,
        submit: impl FnOnce(sys::rbd_image_t, *const iovec, c_int, sys::rbd_completion_t) -> c_int,
    ) -> Result<()> {
        let iovcnt = c_int::try_from(op.iov.len()).map_err(|_| self.image.error(op.kind.name(), -22))?;
        let kind = op.kind;
        let entry = self.ops.vacant_entry();
        let key = entry.key();
        let arg = Box::into_raw(Box::new(CallbackArg {
            inbox: self.inbox.clone(),
            key,
        }));
        let mut c: sys::rbd_completion_t = ptr::null_mut();
        // SAFETY: valid out-pointer; the argument is the leaked box that
        // the callback (valid for the process' life) takes back once.
        let r = unsafe { sys::rbd_aio_create_completion(arg.cast(), Some(on_complete), &mut c) };
        if r < 0 {
            // SAFETY: no completion took the box; freed once, here.
            drop(unsafe { Box::from_raw(arg) });
            return Err(self.image.error(kind.name(), i64::from(r)));
        }
        // The op (and its iovec array, whose heap storage does not move) is
        // in place before librbd sees the pointers.
        let op = entry.insert(op);
        let iov = op.iov.as_ptr();
        let r = submit(self.image.raw(), iov, iovcnt, c);
        if r < 0 {
            // SAFETY: librbd did not take the request, so the callback will
            // not run: the completion and the box are ours alone and freed
            // once.
            unsafe {
                sys::rbd_aio_release(c);
                drop(Box::from_raw(arg));
            }
            self.ops.remove(key);
            return Err(self.image.error(kind.name(), i64::from(r)));
        }
        Ok(())
    }

    /// Reads into the caller's buffers at `offset`; the completion carries
    /// `token`.
    ///
    /// # Safety
    /// Every `iov` entry must describe memory that is valid for writes of
    /// `iov_len` bytes and that nothing else reads or writes from this call
    /// until the completion with this request is returned by
    /// [`EventQueue::reap`] / [`EventQueue::wait`], or until the queue is
    /// dropped (which waits for it). The `iov` array itself is copied.
    pub unsafe fn readv(&mut self, token: u64, offset: u64, iov: &[iovec]) -> Result<()> {
        let op = Op {
            token,
            kind: OpKind::Read,
            offset,
            iov: iov.to_vec(),
            buffer: None,
        };
        self.submit(op, |image, iov, n, c| {
            // SAFETY: open image; `iov` is the op's own array (alive until
            // the op is reaped) and its buffers are valid for writes per
            // this function's contract; `c` is a fresh completion.
            unsafe { sys::rbd_aio_readv(image, iov, n, offset, c) }
        })
    }

    /// Writes the caller's buffers at `offset` (zero-copy: librbd sends
    /// straight from them); the completion carries `token`.
    ///
    /// # Safety
    /// Every `iov` entry must describe memory that is valid for reads of
    /// `iov_len` bytes and that nothing writes from this call until the
    /// completion with this request is returned by [`EventQueue::reap`] /
    /// [`EventQueue::wait`], or until the queue is dropped (which waits for
    /// it). The `iov` array itself is copied.
    pub unsafe fn writev(&mut self, token: u64, offset: u64, iov: &[iovec]) -> Result<()> {
        if self.image.is_read_only() {
            return Err(self.image.error("write", -i64::from(libc::EROFS)));
        }
        let op = Op {
            token,
            kind: OpKind::Write,
            offset,
            iov: iov.to_vec(),
            buffer: None,
        };
        self.submit(op, |image, iov, n, c| {
            // SAFETY: as in `readv`, the buffers being valid for reads.
            unsafe { sys::rbd_aio_writev(image, iov, n, offset, c) }
        })
    }

    /// Reads `buffer.len()` bytes at `offset` into `buffer`, handed back
    /// filled in the completion.
    pub fn read(&mut self, token: u64, offset: u64, mut buffer: Vec<u8>) -> Result<()> {
        let iov = vec![iovec {
            iov_base: buffer.as_mut_ptr().cast(),
            iov_len: buffer.len(),
        }];
        let op = Op {
            token,
            kind: OpKind::Read,
            offset,
            iov,
            buffer: Some(buffer),
        };
        self.submit(op, |image, iov, n, c| {
            // SAFETY: the iovec points into the op's own buffer, whose heap
            // storage stays put and untouched until the op is reaped.
            unsafe { sys::rbd_aio_readv(image, iov, n, offset, c) }
        })
    }

    /// Writes `buffer` at `offset`; the buffer comes back in the completion.
    pub fn write(&mut self, token: u64, offset: u64, buffer: Vec<u8>) -> Result<()> {
        if self.image.is_read_only() {
            return Err(self.image.error("write", -i64::from(libc::EROFS)));
        }
        let iov = vec![iovec {
            iov_base: buffer.as_ptr() as *mut c_void,
            iov_len: buffer.len(),
        }];
        let op = Op {
            token,
            kind: OpKind::Write,
            offset,
            iov,
            buffer: Some(buffer),
        };
        self.submit(op, |image, iov, n, c| {
            // SAFETY: the iovec points into the op's own buffer, alive and
            // unchanged until the op is reaped; librbd only reads it.
            unsafe { sys::rbd_aio_writev(image, iov, n, offset, c) }
        })
    }

    /// Discards `length` bytes at `offset` (they read as zeroes after).
    pub fn discard(&mut self, token: u64, offset: u64, length: u64) -> Result<()> {
        let op = Op {
            token,
            kind: OpKind::Discard,
            offset,
            iov: Vec::new(),
            buffer: None,
        };
        self.submit(op, |image, _, _, c| {
            // SAFETY: open image, fresh completion; no memory involved.
            unsafe { sys::rbd_aio_discard(image, offset, length, c) }
        })
    }

    /// Writes zeroes to `length` bytes at `offset`; `thick` keeps the
    /// range allocated (`RBD_WRITE_ZEROES_FLAG_THICK_PROVISION`), else
    /// librbd may deallocate it.
    pub fn write_zeroes(&mut self, token: u64, offset: u64, length: u64, thick: bool) -> Result<()> {
        let len = usize::try_from(length).map_err(|_| self.image.error("write zeroes", -22))?;
        let op = Op {
            token,
            kind: OpKind::WriteZeroes,
            offset,
            iov: Vec::new(),
            buffer: None,
        };
        self.submit(op, |image, _, _, c| {
            // SAFETY: open image, fresh completion; no memory involved.
            unsafe { sys::rbd_aio_write_zeroes(image, offset, len, c, c_int::from(thick), 0) }
        })
    }

    /// Flushes the writes completed before it.
    pub fn flush(&mut self, token: u64) -> Result<()> {
        let op = Op {
            token,
            kind: OpKind::Flush,
            offset: 0,
            iov: Vec::new(),
            buffer: None,
        };
        self.submit(op, |image, _, _, c| {
            // SAFETY: open image, fresh completion.
            unsafe { sys::rbd_aio_flush(image, c) }
        })
    }

    /// Takes the finished requests (without blocking) and appends them to
    /// `out`; returns how many. Call when [`EventQueue::fd`] is readable.
    pub fn reap(&mut self, out: &mut Vec<Completion>) -> Result<usize> {
        let mut counter = 0u64;
        // SAFETY: reads 8 bytes into `counter` from our non-blocking
        // eventfd; EAGAIN (nothing signalled) is fine: the inbox is looked
        // at regardless, and a push comes before its signal.
        let _ = unsafe { libc::read(self.fd(), (&mut counter as *mut u64).cast(), 8) };
        Ok(self.take(out))
    }

    /// [`EventQueue::reap`] without resetting the eventfd (no system
    /// call): for a caller that polls, and whose event loop resets it.
    pub fn take(&mut self, out: &mut Vec<Completion>) -> usize {
        {
            let mut done = self.inbox.done.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::swap(&mut *done, &mut self.taken);
        }
        let before = out.len();
        for (key, ret) in std::mem::take(&mut self.taken).drain(..) {
            let Some(op) = self.ops.try_remove(key) else {
                continue; // Not ours: cannot happen, the inbox is.
            };
            let result = match op.kind {
                _ if ret < 0 => Err(self.op_error(&op, ret)),
                OpKind::Write => Ok(op.iov.iter().map(|v| v.iov_len).sum()),
                _ => Ok(ret as usize),
            };
            out.push(Completion {
                token: op.token,
                kind: op.kind,
                result,
                buffer: op.buffer,
            });
        }
        out.len() - before
    }

    fn op_error(&self, op: &Op, r: i64) -> Error {
        let what = match op.kind {
            OpKind::Flush => "flush".to_owned(),
            kind => {
                let len: usize = op.iov.iter().map(|v| v.iov_len).sum();
                format!("{} at {} ({} bytes)", kind.name(), op.offset, len)
            }
        };
        self.image.error(&what, r)
    }

    /// Waits until at least one request has finished, or `timeout` (`None`:
    /// no limit) has passed, and returns the finished ones (none if
    /// nothing is in flight or on timeout). Blocks in `poll(2)` on the
    /// eventfd.
    pub fn wait(&mut self, timeout: Option<Duration>) -> Result<Vec<Completion>> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut out = Vec::new();
        while !self.ops.is_empty() {
            if self.reap(&mut out)? > 0 {
                break;
            }
            let ms = match deadline {
                None => -1,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    c_int::try_from(left.as_millis().max(1)).unwrap_or(c_int::MAX)
                }
            };
            let mut pfd = libc::pollfd {
                fd: self.fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
                return Err(self.image.error("poll eventfd", -i64::from(errno)));
            }
        }
        Ok(out)
    }
}

impl AsFd for EventQueue {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inbox.eventfd.as_fd()
    }
}

impl Drop for EventQueue {
    fn drop(&mut self) {
        // librbd may still write into the ops' buffers and reads our
        // iovec arrays: wait for every request before freeing anything.
        while !self.ops.is_empty() {
            if self.wait(None).is_err() {
                // Cannot learn when they finish: leak the buffers rather
                // than free memory librbd may still use (the inbox and
                // image stay alive through the callbacks' Arcs and ours).
                std::mem::forget(std::mem::take(&mut self.ops));
                std::mem::forget(self.image.clone());
                return;
            }
        }
    }
}
