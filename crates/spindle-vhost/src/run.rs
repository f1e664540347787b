//! Which rings of one frontend connection run, and its device's start and
//! stop, each decided under one lock.
//!
//! A ring *runs* from its first round of popped requests until the
//! frontend stops it (`GET_VRING_BASE`), resets the device or goes away.
//! The device runs while any ring does. Its first ring's first round asks
//! the slot whether it may start (`NodeSlot::start`: the one-writer guard,
//! and an image opened in the background when closed); while it may not,
//! the ring *waits*, its requests on the ring, until the connection's
//! [`Waker`] wakes its I/O thread. When the last running ring stops, the
//! device's stop (a flush, or the handover of the image for a migration)
//! is decided once, under the lock, and carried out off it; meanwhile the
//! device is *handing over*: a ring that starts then waits, and the other
//! exports of the slot still count it as running.
//!
//! The data path reads one atomic per round (`is_running`); the lock is
//! taken only on a ring's first round and at stops.

use spindle_block::Node;
use spindle_export::device::{Device, Migration};
use spindle_export::{Start, Waker};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ring {
    Stopped,
    /// Its first round found that the device may not start yet.
    Waiting,
    Running,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dev {
    Stopped,
    Running,
    /// Its stop is being carried out (flush, or the image handed over).
    Handing,
}

struct State {
    rings: Box<[Ring]>,
    device: Dev,
    /// The device ran on this connection and the frontend then stopped
    /// every ring.
    stopped: bool,
    /// The device started on this connection at least once.
    ran: bool,
}

/// The run state of one connection's rings and device.
pub(crate) struct Run {
    state: Mutex<State>,
    /// Per ring: it runs (the data path's look, without the lock).
    running: Box<[AtomicBool]>,
    waker: Arc<Waker>,
}

/// What a stopped ring leaves to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stopped {
    /// Nothing: the ring did not run.
    Idle,
    /// Flush: the ring ran, others still run.
    Ring,
    /// The device stops (no ring runs any more): hand the image over for
    /// a migration (`hand_over`), or flush; then [`Run::handed_over`].
    Device {
        /// Every ring stopped while dirty logging is on and the export is
        /// active: the frontend stops the device for a migration.
        hand_over: bool,
    },
}

impl Run {
    /// `queues` rings, all stopped.
    pub(crate) fn new(queues: usize) -> io::Result<Run> {
        Ok(Run {
            state: Mutex::new(State {
                rings: vec![Ring::Stopped; queues].into(),
                device: Dev::Stopped,
                stopped: false,
                ran: false,
            }),
            running: (0..queues).map(|_| AtomicBool::new(false)).collect(),
            waker: Arc::new(Waker::new()?),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every change keeps the state whole.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The connection's waker (registered in each I/O thread's epoll).
    pub(crate) fn waker(&self) -> &Waker {
        &self.waker
    }

    /// Whether ring `queue` runs (one atomic load).
    pub(crate) fn is_running(&self, queue: usize) -> bool {
        self.running.get(queue).is_some_and(|r| r.load(Ordering::Acquire))
    }

    fn set(&self, st: &mut State, queue: usize, ring: Ring) {
        st.rings[queue] = ring;
        self.running[queue].store(ring == Ring::Running, Ordering::Release);
    }

    /// The first round of ring `queue` (started by the frontend) of `dev`:
    /// the image to serve it with, or `None` while the device may not
    /// start (the requests stay on the ring; the waker is woken when that
    /// may have changed).
    pub(crate) fn start(&self, queue: usize, dev: &Device) -> Option<Arc<Node>> {
        let mut st = self.lock();
        if queue >= st.rings.len() {
            return None;
        }
        match st.device {
            Dev::Running => {
                let node = dev.node()?;
                self.set(&mut st, queue, Ring::Running);
                Some(node)
            }
            Dev::Handing => {
                self.set(&mut st, queue, Ring::Waiting);
                None
            }
            Dev::Stopped => match dev.slot.start(dev.export_id(), &self.waker, &dev.cfg.name) {
                Start::Serve(node) => {
                    st.device = Dev::Running;
                    st.stopped = false;
                    st.ran = true;
                    self.set(&mut st, queue, Ring::Running);
                    dev.started();
                    // Rings that waited with this one may no longer have
                    // a wake-up coming (this start took their place).
                    if st.rings.contains(&Ring::Waiting) {
                        self.waker.wake();
                    }
                    Some(node)
                }
                Start::Wait => {
                    self.set(&mut st, queue, Ring::Waiting);
                    None
                }
            },
        }
    }

    /// Ring `queue` of `dev` was stopped, its requests drained; `migrating`:
    /// the frontend acked dirty logging. Decides, once, whether the device
    /// stops with it.
    pub(crate) fn stop(&self, queue: usize, dev: &Device, migrating: bool) -> Stopped {
        let mut st = self.lock();
        let Some(&ring) = st.rings.get(queue) else {
            return Stopped::Idle;
        };
        self.set(&mut st, queue, Ring::Stopped);
        self.no_longer_waiting(&st, dev);
        let all = !st.rings.contains(&Ring::Running);
        let hand_over = all && migrating && dev.migration() == Migration::Active && st.device != Dev::Handing;
        if all && (st.device == Dev::Running || hand_over) {
            st.stopped |= st.device == Dev::Running;
            st.device = Dev::Handing;
            return Stopped::Device { hand_over };
        }
        if ring == Ring::Running {
            Stopped::Ring
        } else {
            Stopped::Idle
        }
    }

    /// The device's stop was carried out: it no longer counts as running
    /// for the other exports of the slot (their waiting devices are woken),
    /// and a ring that started meanwhile tries again.
    pub(crate) fn handed_over(&self, dev: &Device) {
        let mut st = self.lock();
        if st.device != Dev::Handing {
            return;
        }
        st.device = Dev::Stopped;
        dev.slot.guard().stopped(dev.export_id());
        if st.rings.contains(&Ring::Waiting) {
            self.waker.wake();
        }
    }

    /// The frontend reset the device (its requests drained): every ring
    /// stops. Returns whether the device ran (then flush, and call
    /// [`Run::handed_over`]).
    pub(crate) fn reset(&self, dev: &Device) -> bool {
        let mut st = self.lock();
        for q in 0..st.rings.len() {
            self.set(&mut st, q, Ring::Stopped);
        }
        self.no_longer_waiting(&st, dev);
        let ran = st.device == Dev::Running;
        if ran {
            st.device = Dev::Handing;
        }
        ran
    }

    /// The frontend went away; `drained`: nothing it sent is in flight
    /// any more. The device stops; with requests still in flight it keeps
    /// counting as running, so no other export of the slot writes beside
    /// them.
    pub(crate) fn disconnected(&self, dev: &Device, drained: bool) {
        let mut st = self.lock();
        for q in 0..st.rings.len() {
            self.set(&mut st, q, Ring::Stopped);
        }
        self.no_longer_waiting(&st, dev);
        if drained && st.device == Dev::Running {
            st.device = Dev::Stopped;
            dev.slot.guard().stopped(dev.export_id());
        }
    }

    /// The device ran on this connection and the frontend then stopped
    /// every ring.
    pub(crate) fn device_stopped(&self) -> bool {
        self.lock().stopped
    }

    /// The device never started on this connection, and no ring waits to
    /// start it.
    pub(crate) fn never_started(&self) -> bool {
        let st = self.lock();
        !st.ran && st.device == Dev::Stopped && st.rings.iter().all(|r| *r == Ring::Stopped)
    }

    /// With no ring waiting, the device waits no longer for the slot.
    fn no_longer_waiting(&self, st: &State, dev: &Device) {
        if !st.rings.contains(&Ring::Waiting) {
            dev.slot.guard().cancel(&self.waker);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spindle_block::{open_image, OpenConfig};
    use spindle_export::device::DeviceConfig;
    use spindle_io::RuntimeConfig;

    fn device(name: &str, queues: u16, slot: Option<&Device>) -> Device {
        let cfg = DeviceConfig {
            name: name.into(),
            serial: name.into(),
            num_queues: queues,
            iothreads: 1,
            queue_size: 64,
            poll_ns: 0,
            engine: RuntimeConfig::default(),
            read_only: false,
        };
        match slot {
            Some(other) => Device::with_slot(other.slot.clone(), cfg, other.capacity(), 0, true),
            None => Device::new(open_image("null:1M", &OpenConfig::default()).unwrap(), cfg),
        }
    }

    #[test]
    fn rings_stopping_at_once_stop_the_device_exactly_once() {
        for _ in 0..200 {
            let dev = device("d", 2, None);
            let run = Run::new(2).unwrap();
            assert!(run.start(0, &dev).is_some() && run.start(1, &dev).is_some());
            let barrier = std::sync::Barrier::new(2);
            let (run, dev, barrier) = (&run, &dev, &barrier);
            let stops: Vec<Stopped> = std::thread::scope(|s| {
                let t: Vec<_> = (0..2)
                    .map(|q| {
                        s.spawn(move || {
                            barrier.wait();
                            run.stop(q, dev, true)
                        })
                    })
                    .collect();
                t.into_iter().map(|t| t.join().unwrap()).collect()
            });
            let devices = stops.iter().filter(|s| matches!(s, Stopped::Device { .. })).count();
            assert_eq!(devices, 1, "one of the two stops stops the device: {stops:?}");
            assert!(stops.contains(&Stopped::Ring));
            run.handed_over(dev);
            assert!(run.device_stopped());
        }
    }

    #[test]
    fn a_sibling_waits_until_the_running_device_stopped() {
        let src = device("src", 1, None);
        let dst = device("dst", 1, Some(&src));
        let (rs, rd) = (Run::new(1).unwrap(), Run::new(1).unwrap());
        assert!(rs.start(0, &src).is_some(), "the source starts");
        assert!(rd.start(0, &dst).is_none(), "the destination waits");
        assert_eq!(dst.migration(), Migration::Incoming);
        assert_eq!(rs.stop(0, &src, false), Stopped::Device { hand_over: false });
        assert!(
            rd.start(0, &dst).is_none(),
            "not while the source's stop is carried out"
        );
        assert!(!rd.waker().woken());
        rs.handed_over(&src);
        assert!(rd.waker().woken(), "the source's stop wakes the destination");
        assert!(rd.start(0, &dst).is_some());
        assert_eq!(dst.migration(), Migration::Active);
        assert!(rs.start(0, &src).is_none(), "now the source waits");
        rd.disconnected(&dst, true);
        assert!(rs.waker().woken(), "the destination's frontend left");
        assert!(rs.start(0, &src).is_some());
    }
}
