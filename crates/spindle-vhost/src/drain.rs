//! Requests in flight, the end of admission, and the wait for both: the
//! one owner of the drain rule.
//!
//! A request counts as in flight on its queue from the moment a thread
//! starts popping that queue until its used entry is on the ring. The
//! popping thread holds an [`Admission`] meanwhile, which counts one more,
//! so a drain never sees zero between a pop and its request's count.
//! Once [`InFlight::stop_accepting`] was called no admission is granted:
//! requests already accepted still complete, and [`InFlight::wait`]
//! waits for them. While the device's quiesce [`Gate`] is held (a
//! snapshot), no admission is granted either, on any connection.

use spindle_export::quiesce::Gate;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// In-flight counts per queue, and whether new requests are accepted.
pub(crate) struct InFlight {
    counts: Box<[AtomicUsize]>,
    stopping: AtomicBool,
    /// The device's quiesce gate, once the connection is set up.
    gate: OnceLock<Arc<Gate>>,
}

/// A thread's right to pop one queue, counted as one request in flight
/// until it is dropped.
pub(crate) struct Admission<'a> {
    owner: &'a InFlight,
    queue: usize,
}

impl InFlight {
    /// Counts for `queues` queues, accepting requests.
    pub(crate) fn new(queues: usize) -> InFlight {
        InFlight {
            counts: (0..queues).map(|_| AtomicUsize::new(0)).collect(),
            stopping: AtomicBool::new(false),
            gate: OnceLock::new(),
        }
    }

    /// Admits requests only while `gate` is not held (set once, before
    /// the connection serves).
    pub(crate) fn use_gate(&self, gate: Arc<Gate>) {
        let _ = self.gate.set(gate);
    }

    /// Whether the device's quiesce gate holds requests back.
    fn held(&self) -> bool {
        self.gate.get().is_some_and(|g| g.is_held())
    }

    /// Starts popping `queue`: `None` once no request is accepted (or for
    /// a queue that does not exist).
    pub(crate) fn admit(&self, queue: usize) -> Option<Admission<'_>> {
        let n = self.counts.get(queue)?;
        // Counted before the check: a drain that saw `stopping` unset (or
        // the gate held) and zero in flight cannot miss a pop that starts
        // now. SeqCst pairs with `Gate::hold`'s store (a locked
        // instruction on x86 either way).
        n.fetch_add(1, Ordering::SeqCst);
        let adm = Admission { owner: self, queue };
        if self.is_stopping() || self.held() {
            return None;
        }
        Some(adm)
    }

    /// `n` requests of `queue` are on the used ring (or were dropped with
    /// their queue): no longer in flight.
    pub(crate) fn completed(&self, queue: usize, n: usize) {
        if let Some(c) = self.counts.get(queue) {
            c.fetch_sub(n, Ordering::AcqRel);
        }
    }

    /// Stops accepting requests; those accepted still complete.
    pub(crate) fn stop_accepting(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    /// Whether requests are no longer accepted.
    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Requests in flight on `queue`, or on all queues.
    pub(crate) fn count(&self, queue: Option<usize>) -> usize {
        match queue {
            Some(q) => self.counts.get(q).map_or(0, |n| n.load(Ordering::Acquire)),
            None => self.counts.iter().map(|n| n.load(Ordering::Acquire)).sum(),
        }
    }

    /// Waits until nothing is in flight on `queue` (or on all queues), at
    /// most `timeout`. The I/O threads keep completing requests meanwhile.
    /// `Err` holds what was still in flight at the deadline.
    pub(crate) fn wait(&self, queue: Option<usize>, timeout: Duration) -> Result<(), usize> {
        let start = Instant::now();
        loop {
            let n = self.count(queue);
            if n == 0 {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(n);
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

impl Admission<'_> {
    /// `n` more requests were popped under this admission; each stays in
    /// flight until [`InFlight::completed`].
    pub(crate) fn accepted(&self, n: usize) {
        if let (true, Some(c)) = (n > 0, self.owner.counts.get(self.queue)) {
            c.fetch_add(n, Ordering::AcqRel);
        }
    }

    /// Whether requests are still accepted (a popping loop checks it, so a
    /// driver that keeps publishing cannot keep a frontend that left
    /// served).
    pub(crate) fn open(&self) -> bool {
        !self.owner.is_stopping() && !self.owner.held()
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        self.owner.completed(self.queue, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pop_counts_until_its_requests_complete() {
        let f = InFlight::new(2);
        let adm = f.admit(1).unwrap();
        assert_eq!(f.count(Some(1)), 1, "the popping thread counts");
        adm.accepted(3);
        drop(adm);
        assert_eq!((f.count(Some(1)), f.count(Some(0)), f.count(None)), (3, 0, 3));
        assert_eq!(f.wait(Some(0), Duration::ZERO), Ok(()));
        assert_eq!(f.wait(None, Duration::ZERO), Err(3));
        f.completed(1, 3);
        assert_eq!(f.wait(None, Duration::ZERO), Ok(()));
    }

    #[test]
    fn no_admission_after_stop_and_the_accepted_still_count() {
        let f = InFlight::new(1);
        let adm = f.admit(0).unwrap();
        adm.accepted(2);
        f.stop_accepting();
        assert!(!adm.open(), "a popping loop sees the stop");
        drop(adm);
        assert!(f.admit(0).is_none());
        assert_eq!(f.count(None), 2, "a refused admission leaves no count");
        f.completed(0, 2);
        assert_eq!(f.count(None), 0);
        assert!(f.admit(5).is_none(), "no such queue");
    }

    #[test]
    fn no_admission_while_the_gate_is_held() {
        let f = InFlight::new(1);
        let gate = Arc::new(Gate::default());
        f.use_gate(gate.clone());
        let hold = gate.hold();
        assert!(f.admit(0).is_none());
        assert_eq!(f.count(None), 0);
        drop(hold);
        assert!(f.admit(0).is_some_and(|a| a.open()));
    }

    #[test]
    fn a_drain_waits_for_completions_on_other_threads() {
        let f = std::sync::Arc::new(InFlight::new(1));
        f.admit(0).unwrap().accepted(1);
        let g = f.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            g.completed(0, 1);
        });
        assert_eq!(f.wait(None, Duration::from_secs(10)), Ok(()));
        t.join().unwrap();
    }
}
