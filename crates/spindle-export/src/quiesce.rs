//! Holding an export's requests back while its image is snapshotted or
//! switched (`spindle vm snapshot`, a live overlay, a job's pivot): a
//! [`Gate`] per export, held by a [`Hold`].
//!
//! The gate is the one owner of admission for every front end:
//! - vhost-user: while a gate is held, no I/O thread is admitted to pop a
//!   queue of any connection of the device (`spindle-vhost`'s drain), so
//!   requests stay on the rings; its own in-flight counts say when the
//!   accepted ones are done.
//! - stream front ends (NBD): each request takes a [`Pass`] before it
//!   touches the image ([`Gate::pass`]), which waits, without blocking
//!   the thread, while the gate is held; the pass counts the request in
//!   flight until it is dropped, and [`Gate::wait_passes`] waits for them.
//!
//! Requests are admitted again once the last hold is dropped.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// Whether an export admits requests; held by any number of [`Hold`]s.
#[derive(Debug, Default)]
pub struct Gate {
    holds: AtomicUsize,
    /// Stream front-end requests in flight (live [`Pass`]es).
    passes: AtomicUsize,
    /// Tasks waiting for the gate to open.
    waiting: Mutex<Vec<Waker>>,
}

/// One hold of a [`Gate`]; dropping it releases the hold.
#[derive(Debug)]
pub struct Hold {
    gate: Arc<Gate>,
}

/// One stream front-end request admitted through a [`Gate`], counted in
/// flight until dropped.
#[derive(Debug)]
pub struct Pass {
    gate: Arc<Gate>,
}

impl Gate {
    /// Holds new requests back until the returned [`Hold`] is dropped.
    pub fn hold(self: &Arc<Self>) -> Hold {
        // Sequentially consistent with the admission's count and check: a
        // drain that follows this store sees every pop that missed it.
        self.holds.fetch_add(1, Ordering::SeqCst);
        Hold { gate: self.clone() }
    }

    /// Whether requests are held back now.
    pub fn is_held(&self) -> bool {
        self.holds.load(Ordering::SeqCst) > 0
    }

    /// Admits one stream front-end request: at once while the gate is
    /// open, else once the last hold is dropped (the task waits; the
    /// thread serves its other tasks meanwhile).
    pub async fn pass(self: &Arc<Self>) -> Pass {
        std::future::poll_fn(|cx| {
            // Counted before the check, as a vhost-user pop is: a holder
            // that saw zero passes after its hold cannot miss this one.
            self.passes.fetch_add(1, Ordering::SeqCst);
            if !self.is_held() {
                return Poll::Ready(Pass { gate: self.clone() });
            }
            self.passes.fetch_sub(1, Ordering::SeqCst);
            // A panic elsewhere never leaves the list half-changed.
            let mut w = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
            w.push(cx.waker().clone());
            drop(w);
            // Released between the check and the registration: try again
            // rather than wait for a wake that already happened.
            if !self.is_held() {
                cx.waker().wake_by_ref();
            }
            Poll::Pending
        })
        .await
    }

    /// Stream front-end requests in flight.
    pub fn passes(&self) -> usize {
        self.passes.load(Ordering::SeqCst)
    }

    /// Waits (this thread sleeps: a control-plane call) until no stream
    /// front-end request is in flight, at most `timeout`; `Err` holds how
    /// many still were at the deadline.
    pub fn wait_passes(&self, timeout: Duration) -> Result<(), usize> {
        let start = Instant::now();
        loop {
            let n = self.passes();
            if n == 0 {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(n);
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn released(&self) {
        if self.holds.fetch_sub(1, Ordering::SeqCst) == 1 {
            let wakers = std::mem::take(&mut *self.waiting.lock().unwrap_or_else(|e| e.into_inner()));
            wakers.into_iter().for_each(Waker::wake);
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.gate.released();
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        self.gate.passes.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_until_the_last_hold_goes() {
        let g = Arc::new(Gate::default());
        assert!(!g.is_held());
        let a = g.hold();
        let b = g.hold();
        drop(a);
        assert!(g.is_held());
        drop(b);
        assert!(!g.is_held());
    }

    #[test]
    fn a_pass_waits_for_the_hold_and_counts_until_dropped() {
        let g = Arc::new(Gate::default());
        let rt = spindle_io::Runtime::new(spindle_io::RuntimeConfig::default()).unwrap();
        let p = rt.block_on(g.pass());
        assert_eq!(g.passes(), 1);
        assert_eq!(g.wait_passes(Duration::ZERO), Err(1));
        drop(p);
        assert_eq!(g.wait_passes(Duration::ZERO), Ok(()));

        let hold = g.hold();
        let g2 = g.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let start = Instant::now();
        let t = std::thread::spawn(move || {
            let rt = spindle_io::Runtime::new(spindle_io::RuntimeConfig::default()).unwrap();
            let p = rt.block_on(g2.pass());
            tx.send(()).unwrap();
            (start.elapsed(), g2.passes(), p)
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "a pass was admitted under the hold"
        );
        assert_eq!(g.passes(), 0, "a waiting request is not in flight");
        drop(hold);
        let (waited, n, p) = t.join().unwrap();
        assert!(
            waited >= Duration::from_millis(200),
            "admitted after {waited:?}, under the hold"
        );
        assert_eq!(n, 1);
        drop(p);
        assert_eq!(g.passes(), 0);
    }
}
