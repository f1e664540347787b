//! Whether a runtime's loop polls for work before it sleeps.
//!
//! Polling spends CPU for what a sleeping thread would wait for on every
//! round trip: the kernel's wake-up. It pays when a peer's turnaround is
//! what the thread waits for (its work finished without sleeping: null
//! and cached images, and every request's reply until the next request)
//! or when several ops are in flight at once (rounds overlap, and polling
//! reaps completions as they come). It does not pay for a lone op that
//! sleeps through the device's latency: a busy CPU then only makes the
//! scheduler wake the peer on another CPU (7% on raw O_DIRECT at QD1,
//! docs/serve.md). The state covers what the loop saw since its last
//! decision; each decision starts it afresh.

use std::cell::Cell;

/// What the loop saw since its last polling decision.
#[derive(Debug, Default)]
pub(crate) struct PollHint {
    /// More than one op was in flight at once.
    deep: Cell<bool>,
    /// The loop slept with ops in flight.
    waited: Cell<bool>,
}

impl PollHint {
    /// `in_flight` ops are in flight now.
    pub(crate) fn saw(&self, in_flight: usize) {
        self.deep.set(self.deep.get() || in_flight > 1);
    }

    /// The loop sleeps now with `in_flight` ops in flight.
    pub(crate) fn sleeps_with(&self, in_flight: usize) {
        self.saw(in_flight);
        self.waited.set(self.waited.get() || in_flight > 0);
    }

    /// The loop ran out of work with `in_flight` ops in flight: whether to
    /// poll. Starts the state afresh.
    pub(crate) fn decide(&self, in_flight: usize) -> bool {
        self.saw(in_flight);
        let poll = self.deep.get() || (!self.waited.get() && in_flight == 0);
        self.deep.set(false);
        self.waited.set(false);
        poll
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_for_turnarounds_and_deep_queues_not_for_a_lone_slow_op() {
        let h = PollHint::default();
        // Work that finished without sleeping (a null read): poll for the next.
        assert!(h.decide(0));
        // A lone op still in flight: sleep through it, and after it
        // completes, do not poll for the next request either.
        assert!(!h.decide(1));
        h.sleeps_with(1);
        assert!(!h.decide(0));
        // The round after that starts afresh.
        assert!(h.decide(0));
        // Several in flight at once: poll, even with some still in flight.
        h.saw(3);
        h.sleeps_with(1);
        assert!(h.decide(1));
        assert!(!h.decide(1), "each decision starts afresh");
    }
}
