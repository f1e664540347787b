//! Each runtime's queue of requests to an image: a
//! `spindle_rbd::EventQueue` whose eventfd the runtime watches (a
//! `spindle_io::EventSource`), and the runtime's waiting requests. Made
//! on the runtime's first request; kept per thread, by image and runtime,
//! so a thread that runs one short-lived runtime after another (a control
//! thread's flush) never reuses a queue whose eventfd a dead runtime
//! watched. A queue goes once its image closed or its runtime ended and
//! nothing of it is in flight (looked at on each lookup), or with its
//! thread.
//!
//! No task of its own: the waiting requests take turns watching the
//! eventfd. The last one polled keeps its waker with the runtime's
//! reactor; when the eventfd fires it takes every finished request and
//! wakes their futures; a request that finishes (or is dropped) wakes
//! another waiting one, which then watches in its place.
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
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Weak;
use std::task::{Context, Poll, Waker};

fn dup(fd: RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: duplicates an open descriptor; the result is checked.
    let d = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if d < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(d) })
}

/// What an in-flight request holds: its memory's keep-alives, and its
/// count in the runtime's in-flight figure.
struct Held {
    _keep: Vec<KeepAlive>,
    _op: Option<spindle_io::ForeignOp>,
}

enum Wait {
    /// In flight; its future waits.
    Pending { waker: Option<Waker>, held: Held },
    /// Back, not yet taken by its future.
    Done(spindle_rbd::Result<usize>),
    /// In flight; its future is gone.
    Abandoned(#[allow(dead_code)] Held),
}

/// A runtime's queue of requests to one image.
pub(super) struct Local {
    queue: RefCell<EventQueue>,
    waits: RefCell<Slab<Wait>>,
    done: RefCell<Vec<Completion>>,
    /// The queue's eventfd on the runtime that made it.
    src: EventSource,
}

struct Entry {
    id: u64,
    runtime: usize,
    /// The image: the entry goes once it closed.
    alive: Weak<()>,
    local: Rc<Local>,
}

thread_local! {
    /// This thread's queues, by image and runtime.
    static QUEUES: RefCell<Vec<Entry>> = const { RefCell::new(Vec::new()) };
}

/// Drops the entries of closed images and ended runtimes that have
/// nothing in flight (finished requests are taken first).
fn prune(current: usize) {
    let stale: Vec<Entry> = QUEUES.with(|q| {
        let mut q = q.borrow_mut();
        let mut keep = Vec::new();
        let mut gone = Vec::new();
        for e in q.drain(..) {
            let live = e.alive.strong_count() > 0 && e.runtime == current;
            if !live {
                e.local.reap(false);
            }
            if live || !e.local.waits.borrow().is_empty() {
                keep.push(e);
            } else {
                gone.push(e);
            }
        }
        *q = keep;
        gone
    });
    // Dropped outside the borrow (an EventQueue's drop may wait).
    drop(stale);
}

impl Rbd {
    /// This runtime's queue, made on first use.
    pub(super) fn local(&self) -> Result<Rc<Local>> {
        let Some(runtime) = spindle_io::current_key() else {
            return Err(BlockError::Invalid(format!(
                "{}: RBD I/O outside an I/O thread's runtime (a bug)",
                self.name
            )));
        };
        let found = QUEUES.with(|q| {
            q.borrow()
                .iter()
                .find(|e| e.id == self.id && e.runtime == runtime)
                .map(|e| e.local.clone())
        });
        if let Some(l) = found {
            return Ok(l);
        }
        prune(runtime);
        let setup = |source| BlockError::Io {
            path: self.spec.clone(),
            context: "cannot set up this thread's RBD queue",
            source,
        };
        let queue = EventQueue::new(self.image.clone()).map_err(super::rbd_err(&self.spec))?;
        let src = EventSource::new(dup(queue.fd()).map_err(setup)?).map_err(setup)?;
        let local = Rc::new(Local {
            queue: RefCell::new(queue),
            waits: RefCell::new(Slab::new()),
            done: RefCell::new(Vec::new()),
            src,
        });
        QUEUES.with(|q| {
            q.borrow_mut().push(Entry {
                id: self.id,
                runtime,
                alive: std::sync::Arc::downgrade(&self.alive),
                local: local.clone(),
            })
        });
        Ok(local)
    }
}

impl Local {
    /// Hands finished requests to their slots and wakes their futures;
    /// `reset` reads the eventfd (after it fired), else no system call.
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

    /// A request left (finished or dropped): another waiting one takes
    /// over watching the eventfd.
    fn hand_over(&self, except: usize) {
        let w = {
            let mut waits = self.waits.borrow_mut();
            waits.iter_mut().find_map(|(k, w)| match w {
                Wait::Pending { waker, .. } if k != except => waker.take(),
                _ => None,
            })
        };
        if let Some(w) = w {
            w.wake();
        }
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
            held: Held {
                _keep: keep,
                _op: spindle_io::ForeignOp::start(),
            },
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

impl Request<'_> {
    /// Its result, if it is back (the slot freed).
    fn take(&mut self) -> Option<spindle_rbd::Result<usize>> {
        let mut waits = self.local.waits.borrow_mut();
        if !matches!(waits.get(self.key), Some(Wait::Done(_))) {
            return None;
        }
        let Wait::Done(r) = waits.remove(self.key) else {
            unreachable!("matched above")
        };
        drop(waits);
        self.state = State::Finished;
        self.local.hand_over(self.key);
        Some(r)
    }
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
        // Completions that came in since the eventfd was last looked at.
        self.local.reap(false);
        loop {
            if let Some(r) = self.take() {
                return Poll::Ready(r);
            }
            if let Some(Wait::Pending { waker, .. }) = self.local.waits.borrow_mut().get_mut(self.key) {
                *waker = Some(cx.waker().clone());
            }
            // Watch the eventfd for this runtime's requests; if it fired
            // meanwhile, take what came and look again.
            if self.local.src.poll_signalled(cx).is_pending() {
                return Poll::Pending;
            }
            self.local.reap(true);
        }
    }
}

impl Drop for Request<'_> {
    fn drop(&mut self) {
        if !matches!(self.state, State::Waiting) {
            return;
        }
        {
            let mut waits = self.local.waits.borrow_mut();
            let key = self.key;
            match waits.get_mut(key) {
                Some(Wait::Done(_)) => {
                    waits.remove(key);
                }
                Some(Wait::Pending { .. }) => {
                    // The slot stays (its completion finds it), holding
                    // the memory until librbd is done.
                    if let Wait::Pending { held, .. } = std::mem::replace(&mut waits[key], Wait::Done(Ok(0))) {
                        waits[key] = Wait::Abandoned(held);
                    }
                }
                _ => {}
            }
        }
        self.local.hand_over(self.key);
    }
}
