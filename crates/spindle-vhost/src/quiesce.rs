//! Holding an export's requests back while its image is snapshotted
//! (`spindle vm snapshot`): a [`Gate`] per device, held by a [`Hold`].
//!
//! While a gate is held, no I/O thread is admitted to pop a queue of any
//! connection of the device (`drain::InFlight::admit`), so requests stay on
//! the rings; those accepted before still complete, and the holder waits
//! for them (`Export::quiesce`). Requests are admitted again once the last
//! hold is dropped. A frontend's next notification (QEMU restarts the
//! device when the guest continues, with its kick already signalled) pops
//! what waited.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Whether a device admits requests; held by any number of [`Hold`]s.
#[derive(Debug, Default)]
pub struct Gate {
    holds: AtomicUsize,
}

/// One hold of a [`Gate`]; dropping it releases the hold.
#[derive(Debug)]
pub struct Hold {
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
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.gate.holds.fetch_sub(1, Ordering::SeqCst);
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
}
