//! Each thread's queue of requests to an image: a
//! `spindle_rbd::EventQueue` whose eventfd the thread's runtime watches
//! (a `spindle_io::EventSource` that a detached reaper task waits on), and
//! the thread's waiting requests. Made on the thread's first request;
//! dropped when the image closes (its `Shared` says so and signals every
//! queue) once the queue's last request is back, or with the thread.
//!
//! A request's memory is kept alive by its slot here, not by its future:
//! a future that is dropped (a cancelled request) leaves its slot
//! `Abandoned` with the keep-alives until librbd is done.

use super::Rbd;
use crate::error::{BlockError, Result};
use slab::Slab;
use spindle_io::{EventSource, KeepAlive, SgList};
use spindle_rbd::{Completion, EventQueue};
use std::cell::RefCell;
use std::future::Future;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

/// What every thread's queue of one image shares: whether the image
/// closed, and the queues' eventfds to say so.
#[derive(Default)]
pub(super) struct Shared {
    closed: AtomicBool,
    eventfds: Mutex<Vec<OwnedFd>>,
}

impl Shared {
    /// The image closed: every queue goes once it is idle.
    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        for fd in self.eventfds.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            signal(fd.as_raw_fd());
        }
    }
}

fn signal(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a valid u64 to an open eventfd.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

fn dup(fd: RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: duplicates an open descriptor; the result is checked.
    let d = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if d < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(d) })
}

enum Wait {
    /// In flight; its future waits.
    Pending {
        waker: Option<Waker>,
        _keep: Vec<KeepAlive>,
    },
    /// Back, not yet taken by its future.
    Done(spindle_rbd::Result<usize>),
    /// In flight; its future is gone.
    Abandoned(#[allow(dead_code)] Vec<KeepAlive>),
}

/// A thread's queue of requests to one image.
pub(super) struct Local {
    queue: RefCell<EventQueue>,
    waits: RefCell<Slab<Wait>>,
    done: RefCell<Vec<Completion>>,
}

struct Entry {
    id: u64,
    local: Rc<Local>,
}

thread_local! {
    /// This thread's queues, by image.
    static QUEUES: RefCell<Vec<Entry>> = const { RefCell::new(Vec::new()) };
}

impl Rbd {
    /// This thread's queue, made on first use.
    pub(super) fn local(&self) -> Result<Rc<Local>> {
        let found = QUEUES.with(|q| q.borrow().iter().find(|e| e.id == self.id).map(|e| e.local.clone()));
        if let Some(l) = found {
            return Ok(l);
        }
        let setup = |source| BlockError::Io {
            path: self.spec.clone(),
            context: "cannot set up this thread's RBD queue",
            source,
        };
        let queue = EventQueue::new(self.image.clone()).map_err(super::rbd_err(&self.spec))?;
        let src = EventSource::new(dup(queue.fd()).map_err(setup)?).map_err(setup)?;
        self.shared
            .eventfds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(dup(queue.fd()).map_err(setup)?);
        let local = Rc::new(Local {
            queue: RefCell::new(queue),
            waits: RefCell::new(Slab::new()),
            done: RefCell::new(Vec::new()),
        });
        QUEUES.with(|q| {
            q.borrow_mut().push(Entry {
                id: self.id,
                local: local.clone(),
            })
        });
        spindle_io::spawn(reaper(self.id, Rc::downgrade(&local), src, self.shared.clone())).detach();
        Ok(local)
    }
}

/// Takes the queue's completions whenever its eventfd fires; removes the
/// queue once the image closed and nothing of it is in flight.
async fn reaper(id: u64, local: Weak<Local>, src: EventSource, shared: Arc<Shared>) {
    loop {
        src.signalled().await;
        let Some(l) = local.upgrade() else { return };
        l.reap(true);
        if shared.closed.load(Ordering::Acquire) && l.waits.borrow().is_empty() {
            drop(l);
            QUEUES.with(|q| q.borrow_mut().retain(|e| e.id != id));
            return;
        }
    }
}

impl Local {
    /// Hands finished requests to their slots and wakes their futures;
    /// `reset` reads the eventfd (the reaper), else no system call.
    fn reap(&self, reset: bool) {
        let mut done = self.done.borrow_mut();
        {
            let mut q = self.queue.borrow_mut();
            if reset {
                let _ = q.reap(&mut done);
            } else {
                q.take(&mut done);
            }
        }
        if done.is_empty() {
            return;
        }
        let mut wake = Vec::new();
        {
            let mut waits = self.waits.borrow_mut();
            for c in done.drain(..) {
                let key = c.token as usize;
                match waits.get_mut(key) {
                    Some(Wait::Pending { waker, .. }) => {
                        wake.extend(waker.take());
                        waits[key] = Wait::Done(c.result);
                    }
                    Some(Wait::Abandoned(_)) => {
                        waits.remove(key);
                    }
                    Some(Wait::Done(_)) | None => {}
                }
            }
        }
        drop(done);
        wake.into_iter().for_each(Waker::wake);
    }

    /// Records a request and lets `submit` hand it to librbd under its
    /// slot's key.
    fn submit(
        &self,
        keep: Vec<KeepAlive>,
        submit: impl FnOnce(&mut EventQueue, u64) -> spindle_rbd::Result<()>,
    ) -> Request<'_> {
        let key = self.waits.borrow_mut().insert(Wait::Pending {
            waker: None,
            _keep: keep,
        });
        let r = submit(&mut self.queue.borrow_mut(), key as u64);
        if let Err(e) = r {
            self.waits.borrow_mut().remove(key);
            return Request {
                local: self,
                key,
                state: State::Failed(Some(e)),
            };
        }
        Request {
            local: self,
            key,
            state: State::Waiting,
        }
    }

    pub(super) fn readv(&self, offset: u64, buf: &SgList) -> Request<'_> {
        let (iov, keep) = buf.foreign_io_parts();
        self.submit(keep, |q, token| {
            // SAFETY: the iovecs describe memory kept valid by `keep`,
            // which the request's slot holds until librbd's completion is
            // reaped (or the queue, which waits for it, is dropped), also
            // when the future is dropped first; nothing in Rust holds a
            // reference into SgList memory.
            unsafe { q.readv(token, offset, &iov) }
        })
    }

    pub(super) fn writev(&self, offset: u64, buf: &SgList) -> Request<'_> {
        let (iov, keep) = buf.foreign_io_parts();
        self.submit(keep, |q, token| {
            // SAFETY: as in `readv`; librbd only reads the memory.
            unsafe { q.writev(token, offset, &iov) }
        })
    }

    pub(super) fn flush(&self) -> Request<'_> {
        self.submit(Vec::new(), |q, token| q.flush(token))
    }

    pub(super) fn discard(&self, offset: u64, len: u64) -> Request<'_> {
        self.submit(Vec::new(), |q, token| q.discard(token, offset, len))
    }

    pub(super) fn write_zeroes(&self, offset: u64, len: u64, thick: bool) -> Request<'_> {
        self.submit(Vec::new(), |q, token| q.write_zeroes(token, offset, len, thick))
    }
}

enum State {
    Waiting,
    Failed(Option<spindle_rbd::Error>),
    Finished,
}

/// One request in flight, as a future of its result (bytes read, or a
/// write's length).
pub(super) struct Request<'a> {
    local: &'a Local,
    key: usize,
    state: State,
}

impl Future for Request<'_> {
    type Output = spindle_rbd::Result<usize>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.state {
            State::Waiting => {}
            State::Failed(e) => {
                let e = e.take().expect("a failed request is polled once");
                self.state = State::Finished;
                return Poll::Ready(Err(e));
            }
            State::Finished => panic!("an RBD request polled after it finished"),
        }
        // Completions that came in since the reaper last ran.
        self.local.reap(false);
        let mut waits = self.local.waits.borrow_mut();
        match waits.get_mut(self.key) {
            Some(Wait::Pending { waker, .. }) => {
                *waker = Some(cx.waker().clone());
                Poll::Pending
            }
            Some(Wait::Done(_)) => {
                let Wait::Done(r) = waits.remove(self.key) else {
                    unreachable!("matched above")
                };
                drop(waits);
                self.state = State::Finished;
                Poll::Ready(r)
            }
            Some(Wait::Abandoned(_)) | None => unreachable!("a waiting request's slot is its own"),
        }
    }
}

impl Drop for Request<'_> {
    fn drop(&mut self) {
        if !matches!(self.state, State::Waiting) {
            return;
        }
        let mut waits = self.local.waits.borrow_mut();
        let key = self.key;
        match waits.get_mut(key) {
            Some(Wait::Done(_)) => {
                waits.remove(key);
            }
            Some(Wait::Pending { _keep, .. }) => {
                let keep = std::mem::take(_keep);
                waits[key] = Wait::Abandoned(keep);
            }
            _ => {}
        }
    }
}
