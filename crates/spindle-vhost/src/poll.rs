//! What an I/O thread does once an event is handled: the polling decision.
//!
//! A thread with I/O in flight sleeps until it completes: no polling
//! through the device's latency (it cost 10-15% at QD1 on O_DIRECT raw and
//! gained nothing at QD32; bench/vhost.py runs, docs/serve.md).
//!
//! With nothing in flight, polling pays when the driver's turnaround is
//! most of a request's life: when requests completed without the thread
//! sleeping (null, cached, very fast devices: 3x IOPS at QD1 on null), when
//! the driver keeps several in flight, so rounds overlap (QD32), or when
//! the driver wanted no interrupt for its completions: it is awake
//! (polling its used ring, like a `--poll` client or a guest in polling
//! mode) and sends the next request at once, which polling catches
//! without a kick. A lone request that already slept through the device's
//! latency, for a driver that sleeps until its interrupt, gains little
//! from it, and a busy CPU here makes the scheduler wake the driver on
//! another CPU instead: on O_DIRECT raw at QD1 that cost 7% in this
//! project's 2-vCPU VM (docs/serve.md).
//!
//! The state is what the thread saw since the last decision; each
//! decision to poll or not starts it afresh, so a change of driver
//! behaviour shows one request late.

use std::cell::Cell;

/// What to do after an event's pops and completions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// I/O is in flight: signal what completed and sleep until more does.
    Signal,
    /// Signal, then poll the queues and completions for the poll window.
    Poll,
    /// Signal with kicks held, look at the signalled queues once, sleep.
    Look,
}

/// What the thread saw since the last polling decision.
#[derive(Debug, Default)]
pub(crate) struct PollState {
    /// More than one request was in flight at once.
    deep: Cell<bool>,
    /// The thread went to sleep with its own I/O in flight.
    waited: Cell<bool>,
    /// The driver asked for an interrupt (EVENT_IDX) for a completion. A
    /// driver that never does is awake, busy or polling its used ring,
    /// and answers at once.
    interrupted: Cell<bool>,
}

impl PollState {
    /// `in_flight` ops are in flight now, during a polling round.
    pub(crate) fn saw(&self, in_flight: usize) {
        self.deep.set(self.deep.get() || in_flight > 1);
    }

    /// The thread sleeps now with `in_flight` ops in flight.
    pub(crate) fn sleeps_with(&self, in_flight: usize) {
        self.saw(in_flight);
        self.waited.set(self.waited.get() || in_flight > 0);
    }

    /// The driver was sent an interrupt for its completions.
    pub(crate) fn interrupted(&self) {
        self.interrupted.set(true);
    }

    /// The next step with `in_flight` ops in flight, when the thread may
    /// poll (`can_poll`: a poll window is set).
    pub(crate) fn step(&self, in_flight: usize, can_poll: bool) -> Step {
        if in_flight > 0 {
            Step::Signal
        } else if can_poll && self.decide() {
            Step::Poll
        } else {
            Step::Look
        }
    }

    /// Whether polling is worth it; the state starts afresh.
    fn decide(&self) -> bool {
        let worth = self.deep.get() || !self.waited.get() || !self.interrupted.get();
        self.deep.set(false);
        self.waited.set(false);
        self.interrupted.set(false);
        worth
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One request's life on a thread: popped with the kick (in flight
    /// when the thread sleeps, or not for a device that needs no I/O),
    /// then completed; `wants_irq`: the driver asks for an interrupt.
    fn request(s: &PollState, sleeps: bool, wants_irq: bool) -> Step {
        let in_flight = usize::from(sleeps);
        if sleeps {
            assert_eq!(s.step(in_flight, true), Step::Signal);
            s.sleeps_with(in_flight);
        }
        // The completion: nothing in flight any more.
        let step = s.step(0, true);
        if wants_irq {
            s.interrupted();
        }
        s.sleeps_with(0);
        step
    }

    #[test]
    fn a_sleeping_driver_at_qd1_on_a_slow_device_is_not_polled_for() {
        let s = PollState::default();
        // The first decision has seen no interrupt yet.
        assert_eq!(request(&s, true, true), Step::Poll);
        for _ in 0..5 {
            assert_eq!(request(&s, true, true), Step::Look);
        }
    }

    #[test]
    fn requests_that_need_no_sleep_are_polled_for() {
        let s = PollState::default();
        for _ in 0..5 {
            assert_eq!(request(&s, false, true), Step::Poll);
        }
    }

    #[test]
    fn a_driver_that_wants_no_interrupt_is_polled_for() {
        let s = PollState::default();
        for _ in 0..5 {
            assert_eq!(request(&s, true, false), Step::Poll);
        }
    }

    #[test]
    fn depth_makes_polling_worth_it_once_per_decision() {
        let s = PollState::default();
        request(&s, true, true);
        assert_eq!(request(&s, true, true), Step::Look);
        // Two in flight at once, seen in a polling round or at sleep.
        s.saw(2);
        assert_eq!(request(&s, true, true), Step::Poll);
        assert_eq!(request(&s, true, true), Step::Look, "the state started afresh");
        s.sleeps_with(3);
        assert_eq!(request(&s, true, true), Step::Poll);
    }

    #[test]
    fn a_behaviour_change_shows_one_request_late() {
        let s = PollState::default();
        request(&s, true, true);
        assert_eq!(request(&s, true, true), Step::Look);
        // The driver stops asking for interrupts: the next decision still
        // sees the last one's interrupt, the one after does not.
        assert_eq!(request(&s, true, false), Step::Look);
        assert_eq!(request(&s, true, false), Step::Poll);
    }

    #[test]
    fn without_a_poll_window_the_state_is_kept() {
        let s = PollState::default();
        assert_eq!(s.step(0, false), Step::Look);
        s.sleeps_with(2);
        assert_eq!(s.step(0, false), Step::Look);
        assert_eq!(s.step(0, true), Step::Poll, "the depth seen earlier still counts");
    }
}
