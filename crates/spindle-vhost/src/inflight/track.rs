//! Who uses the inflight buffer: the connection keeps the buffer the
//! frontend gave and which rings must start against it; each I/O thread
//! keeps, per queue, the buffer it started with, the next counter and the
//! chains it still has to resubmit.

use super::{Refused, Region};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// A connection's inflight buffer and the rings that must start against it.
pub(crate) struct Tracking {
    region: Mutex<Option<Arc<Region>>>,
    /// Per queue: the ring starts against the buffer (or without one) at
    /// its next pop. Set when the frontend gives a buffer or stops a ring.
    start: Box<[AtomicBool]>,
}

impl Tracking {
    /// No buffer, for `queues` queues.
    pub(crate) fn new(queues: usize) -> Tracking {
        Tracking {
            region: Mutex::new(None),
            start: (0..queues).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// The frontend gave `region` (or, with `None`, took the buffer away:
    /// a device reset): every ring starts against it at its next pop.
    pub(crate) fn set(&self, region: Option<Region>) {
        if let Ok(mut r) = self.region.lock() {
            *r = region.map(Arc::new);
        }
        for s in self.start.iter() {
            s.store(true, Ordering::Release);
        }
    }

    /// Ring `queue` was stopped (`GET_VRING_BASE`): it starts anew.
    pub(crate) fn stopped(&self, queue: usize) {
        if let Some(s) = self.start.get(queue) {
            s.store(true, Ordering::Release);
        }
    }

    /// Whether ring `queue` starts at its next pop (one atomic load).
    pub(crate) fn start_pending(&self, queue: usize) -> bool {
        self.start.get(queue).is_some_and(|s| s.load(Ordering::Acquire))
    }

    /// Whether ring `queue` must start now, and against which buffer
    /// (`Some(None)`: without one). One atomic load when not.
    pub(crate) fn take_start(&self, queue: usize) -> Option<Option<Arc<Region>>> {
        if !self.start_pending(queue) || !self.start[queue].swap(false, Ordering::AcqRel) {
            return None;
        }
        Some(self.region.lock().ok()?.clone())
    }

    /// Ring `queue` could not start now: it tries again at its next pop.
    pub(crate) fn defer_start(&self, queue: usize) {
        self.stopped(queue);
    }
}

/// One queue's tracking on its I/O thread.
pub(crate) struct QueueTrack {
    region: Arc<Region>,
    queue: usize,
    counter: u64,
    /// Chains in flight before the ring started, to run before any new
    /// one, oldest first.
    pub(crate) resubmit: VecDeque<u16>,
}

impl QueueTrack {
    /// Starts ring `queue` (`ring_size` entries, used index `ring_used` in
    /// guest memory) against `region`: see [`Region::start`].
    pub(crate) fn start(
        region: Arc<Region>,
        queue: usize,
        ring_size: u16,
        ring_used: u16,
    ) -> Result<QueueTrack, Refused> {
        let resume = region.start(queue, ring_size, ring_used)?;
        Ok(QueueTrack {
            region,
            queue,
            counter: resume.counter,
            resubmit: resume.heads.into(),
        })
    }

    /// Records chain `head` as taken: false when it is in flight already
    /// (the driver published it twice) or not a tracked descriptor.
    pub(crate) fn mark(&mut self, head: u16) -> bool {
        let ok = self.region.mark(self.queue, head, self.counter);
        if ok {
            self.counter = self.counter.wrapping_add(1);
        }
        ok
    }

    /// Returns `batch` to the driver through `publish`: see
    /// [`Region::complete`].
    pub(crate) fn complete<T>(&self, batch: &[T], head: impl Fn(&T) -> u16, publish: impl FnOnce() -> (usize, u16)) {
        self.region.complete(self.queue, batch, head, publish);
    }
}
