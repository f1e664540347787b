//! One writer per image, and opening a closed image in the background.
//!
//! The exports of one image in one daemon (a local migration's source and
//! destination) share a [`NodeSlot`](crate::slot::NodeSlot). The rule its
//! [`Guard`] keeps: an export's device may start (pop its rings) only
//! while no other export of the slot has a running device, that is one
//! that popped since its rings were last all stopped (or its device was
//! reset, or its frontend went away) and whose stop is not handed over
//! yet.
//!
//! A device that cannot start now (another export's device runs, or the
//! image is closed, for a migration) leaves its requests on the ring and
//! registers its [`Waker`] with the guard. While the image is closed the
//! guard runs at most one *activation* thread per slot, a control-plane
//! thread that opens the image afresh ([`Reopen::open_active`], one try
//! each time, every 20 ms at first and then every 200 ms) for as long as
//! some device waits. The I/O thread never waits for it. Every waker is
//! woken when the image was opened or when a running device of another
//! export stopped; the woken I/O threads then try to start again, and the
//! first one the guard lets through serves.
//!
//! A [`Waker`] is an eventfd of the connection's, registered in the epoll
//! loop of each of its I/O threads (edge-triggered, never read, as the
//! runtime's own eventfds): waking it makes every I/O thread of the
//! connection look at all its rings once. A spurious wake-up is harmless,
//! so a ring stopped, reset or gone meanwhile only sees one look that
//! finds nothing to pop.
//!
//! [`Reopen::open_active`]: crate::slot::Reopen::open_active

use crate::ratelimit::limited;
use crate::slot::NodeSlot;
use spindle_block::Node;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The first pause between two tries of the activation thread.
const FIRST_PAUSE: Duration = Duration::from_millis(20);
/// The longest pause between two tries.
const MAX_PAUSE: Duration = Duration::from_millis(200);

/// Wakes the I/O threads of one connection (an eventfd in their epoll).
pub struct Waker(EventFd);

impl Waker {
    /// A new, non-blocking eventfd.
    pub fn new() -> io::Result<Waker> {
        EventFd::new(EFD_NONBLOCK).map(Waker)
    }

    /// Makes every I/O thread that registered it look at its rings.
    pub fn wake(&self) {
        // Never read: the counter only grows; a full one still wakes.
        let _ = self.0.write(1);
    }

    /// The descriptor to register (edge-triggered) in an epoll loop.
    pub fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Whether it was woken since the last look (which reads it; for
    /// tests: the I/O threads never read it).
    pub fn woken(&self) -> bool {
        self.0.read().is_ok()
    }
}

/// What a device that asks to start gets.
pub enum Start {
    /// It may serve: the open image.
    Serve(Arc<Node>),
    /// Not now; its waker is woken when that may have changed.
    Wait,
}

/// Who runs, who waits, and whether an activation thread runs.
#[derive(Default)]
struct State {
    /// Ids of the exports whose device runs.
    running: Vec<u64>,
    /// Devices waiting to start: export id and waker.
    waiting: Vec<(u64, Arc<Waker>)>,
    /// An activation thread runs.
    activating: bool,
}

/// The one-writer rule of a slot (see the module's documentation).
#[derive(Default)]
pub struct Guard {
    state: Mutex<State>,
}

impl Guard {
    /// The state; every change keeps it whole, so a panic elsewhere that
    /// poisoned the lock leaves nothing half done.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The device of export `id` asks to start: it may when no other
    /// export's device runs and the image is open (`node`). Otherwise
    /// `waker` waits; `Some(true)` in the answer's second half asks the
    /// caller to start an activation thread (the image is closed and none
    /// runs).
    pub(crate) fn start(&self, id: u64, waker: &Arc<Waker>, node: impl FnOnce() -> Option<Arc<Node>>) -> (Start, bool) {
        let mut st = self.lock();
        st.waiting.retain(|(_, w)| !Arc::ptr_eq(w, waker));
        let other = st.running.iter().any(|&r| r != id);
        let node = if other { None } else { node() };
        if let Some(node) = node {
            if !st.running.contains(&id) {
                st.running.push(id);
            }
            return (Start::Serve(node), false);
        }
        st.waiting.push((id, waker.clone()));
        let spawn = !other && !st.activating;
        st.activating |= spawn;
        (Start::Wait, spawn)
    }

    /// The device of export `id` stopped (or is gone): devices waiting for
    /// it are woken.
    pub fn stopped(&self, id: u64) {
        let woken = {
            let mut st = self.lock();
            let before = st.running.len();
            st.running.retain(|&r| r != id);
            if st.running.len() == before {
                return;
            }
            std::mem::take(&mut st.waiting)
        };
        woken.iter().for_each(|(_, w)| w.wake());
    }

    /// `waker` waits no longer (its rings stopped, its device was reset or
    /// its frontend went away).
    pub fn cancel(&self, waker: &Arc<Waker>) {
        self.lock().waiting.retain(|(_, w)| !Arc::ptr_eq(w, waker));
    }

    /// Export `id` stops serving the slot.
    pub(crate) fn forget(&self, id: u64) {
        self.lock().waiting.retain(|&(e, _)| e != id);
        self.stopped(id);
    }

    /// Whether the activation thread goes on: some device still waits.
    /// When none does, the thread ends (and a later wait starts a new one).
    pub(crate) fn keep_activating(&self) -> bool {
        let mut st = self.lock();
        st.activating = !st.waiting.is_empty();
        st.activating
    }

    /// The image is open: the activation thread ends and every waiting
    /// device is woken.
    pub(crate) fn opened(&self) {
        let woken = {
            let mut st = self.lock();
            st.activating = false;
            std::mem::take(&mut st.waiting)
        };
        woken.iter().for_each(|(_, w)| w.wake());
    }

    /// Whether an activation thread runs.
    #[cfg(test)]
    pub(crate) fn is_activating(&self) -> bool {
        self.lock().activating
    }
}

/// Starts the activation thread of `slot` (the caller got `true` from
/// [`Guard::start`]); `name` is the export that asked, for the logs.
pub(crate) fn spawn(slot: &Arc<NodeSlot>, name: &str) {
    let (thread_slot, name) = (slot.clone(), name.to_string());
    let spawned = std::thread::Builder::new()
        .name("spindle-activate".into())
        .spawn(move || activate(&thread_slot, &name));
    if let Err(e) = spawned {
        limited!(
            error,
            "cannot start the image activation thread: {e}; a waiting device tries again at its next kick"
        );
        slot.guard().lock().activating = false;
    }
}

/// The activation thread: opens the image, one try at a time with a
/// growing pause, while some device waits; wakes them when it is open.
fn activate(slot: &NodeSlot, name: &str) {
    let mut pause = FIRST_PAUSE;
    loop {
        match slot.open_for_waiting() {
            Ok(true) => {
                limited!(info, device = %name, "image opened for a waiting device");
                return slot.guard().opened();
            }
            Ok(false) => return,
            Err(e) => {
                limited!(warn, device = %name, "cannot activate the export (open its image): {e}; trying again; its requests wait on the ring");
            }
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(MAX_PAUSE);
    }
}
