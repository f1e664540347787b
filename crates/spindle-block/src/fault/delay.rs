//! Test-only request delays: make every Nth read, write or flush of the
//! process wait before it starts, so requests complete out of order (what a
//! backend restart under load must survive). Set once per process, by
//! `spindle serve --x-delay-io PLAN` (hidden); off, it costs the data path one
//! atomic load per request.
//!
//! A plan reads `OPS:N:MS`:
//! - `OPS`: `read`, `write`, `flush`, `rw` (reads and writes) or `any`;
//! - `N`: every Nth request of those kinds (counted across the process,
//!   backing images included) is delayed, from 1 (all of them);
//! - `MS`: by this many milliseconds, 1 to 10000.
//!
//! A delayed request waits on a timer thread's wake-up, never by sleeping
//! on the I/O thread, so the thread goes on with other requests meanwhile.

use std::collections::BinaryHeap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// The kind of request a delay plan counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A read.
    Read,
    /// A write (data or zeroes).
    Write,
    /// A flush.
    Flush,
}

/// Which requests are delayed, and by how much.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DelayPlan {
    reads: bool,
    writes: bool,
    flushes: bool,
    /// Every Nth counted request waits.
    pub every: u64,
    /// How long it waits.
    pub delay: Duration,
}

impl std::str::FromStr for DelayPlan {
    type Err = String;
    fn from_str(s: &str) -> Result<DelayPlan, String> {
        let bad =
            |why: &str| format!("delay plan '{s}': {why} (expected OPS:N:MS, OPS one of read, write, flush, rw, any)");
        let parts: Vec<&str> = s.split(':').collect();
        let [ops, n, ms] = parts[..] else {
            return Err(bad("three fields"));
        };
        let (reads, writes, flushes) = match ops {
            "read" => (true, false, false),
            "write" => (false, true, false),
            "flush" => (false, false, true),
            "rw" => (true, true, false),
            "any" => (true, true, true),
            _ => return Err(bad("unknown OPS")),
        };
        let every = n
            .parse::<u64>()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| bad("N must be a number from 1"))?;
        let ms = ms
            .parse::<u64>()
            .ok()
            .filter(|ms| (1..=10_000).contains(ms))
            .ok_or_else(|| bad("MS must be from 1 to 10000"))?;
        Ok(DelayPlan {
            reads,
            writes,
            flushes,
            every,
            delay: Duration::from_millis(ms),
        })
    }
}

impl DelayPlan {
    fn counts(&self, op: Op) -> bool {
        match op {
            Op::Read => self.reads,
            Op::Write => self.writes,
            Op::Flush => self.flushes,
        }
    }
}

/// A plan in force: its counter and its timer thread.
pub struct Delays {
    plan: DelayPlan,
    seen: AtomicU64,
    timer: Sender<(Instant, Arc<Wait>)>,
}

impl Delays {
    /// Starts the timer thread for `plan`.
    pub fn new(plan: DelayPlan) -> Result<Delays, String> {
        let (timer, rx) = channel::<(Instant, Arc<Wait>)>();
        std::thread::Builder::new()
            .name("x-delay-io".into())
            .spawn(move || timer_thread(rx))
            .map_err(|e| format!("cannot start the delay timer thread: {e}"))?;
        Ok(Delays {
            plan,
            seen: AtomicU64::new(0),
            timer,
        })
    }

    /// The wait a request of kind `op` must make first, if the plan says so.
    pub fn before(&self, op: Op) -> Option<Sleep> {
        if !self.plan.counts(op) || !(self.seen.fetch_add(1, Ordering::Relaxed) + 1).is_multiple_of(self.plan.every) {
            return None;
        }
        Some(Sleep {
            wait: Arc::new(Wait::default()),
            deadline: Instant::now() + self.plan.delay,
            timer: Some(self.timer.clone()),
        })
    }
}

static DELAYS: OnceLock<Delays> = OnceLock::new();

/// Turns the delays of `plan` on for the rest of the process. Fails when a
/// plan is already set.
pub fn set(plan: DelayPlan) -> Result<(), String> {
    if DELAYS.get().is_some() {
        return Err("a delay plan is already set".into());
    }
    DELAYS
        .set(Delays::new(plan)?)
        .map_err(|_| "a delay plan is already set".to_string())?;
    tracing::warn!(
        "test-only request delays: every {} request(s) wait {:?}",
        plan.every,
        plan.delay
    );
    Ok(())
}

/// The process's delay for a request of kind `op`: `None` unless a plan is
/// set and picks this request.
pub fn before(op: Op) -> Option<Sleep> {
    DELAYS.get()?.before(op)
}

#[derive(Default)]
struct Wait {
    done: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Wait {
    fn fire(&self) {
        self.done.store(true, Ordering::Release);
        if let Some(w) = self.waker.lock().ok().and_then(|mut w| w.take()) {
            w.wake();
        }
    }
}

/// A request's delay: ready once the timer thread saw its deadline pass.
pub struct Sleep {
    wait: Arc<Wait>,
    deadline: Instant,
    /// Taken when the wait is handed to the timer (first poll).
    timer: Option<Sender<(Instant, Arc<Wait>)>>,
}

impl Future for Sleep {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.wait.done.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        if let Ok(mut w) = self.wait.waker.lock() {
            *w = Some(cx.waker().clone());
        }
        if let Some(tx) = self.timer.take() {
            if tx.send((self.deadline, self.wait.clone())).is_err() {
                return Poll::Ready(()); // no timer: do not hang the request
            }
        }
        if self.wait.done.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

struct Due(Instant, Arc<Wait>);

impl PartialEq for Due {
    fn eq(&self, o: &Due) -> bool {
        self.0 == o.0
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, o: &Due) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Due {
    fn cmp(&self, o: &Due) -> std::cmp::Ordering {
        o.0.cmp(&self.0) // earliest first out of the max-heap
    }
}

fn timer_thread(rx: std::sync::mpsc::Receiver<(Instant, Arc<Wait>)>) {
    let mut due: BinaryHeap<Due> = BinaryHeap::new();
    loop {
        let now = Instant::now();
        while due.peek().is_some_and(|d| d.0 <= now) {
            if let Some(d) = due.pop() {
                d.1.fire();
            }
        }
        let next = match due.peek() {
            Some(d) => rx.recv_timeout(d.0 - now),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match next {
            Ok((at, w)) => due.push(Due(at, w)),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_parse_as_written() {
        let p: DelayPlan = "rw:3:40".parse().unwrap();
        assert!(p.counts(Op::Read) && p.counts(Op::Write) && !p.counts(Op::Flush));
        assert_eq!((p.every, p.delay), (3, Duration::from_millis(40)));
        assert!("any:1:1".parse::<DelayPlan>().unwrap().counts(Op::Flush));
        for bad in [
            "",
            "rw",
            "rw:3",
            "rw:0:5",
            "rw:3:0",
            "rw:3:10001",
            "trim:1:1",
            "rw:1:1:1",
        ] {
            assert!(bad.parse::<DelayPlan>().is_err(), "{bad}");
        }
    }

    #[test]
    fn every_nth_request_waits_for_the_timer_and_others_do_not() {
        let d = Delays::new("write:2:30".parse().unwrap()).unwrap();
        assert!(d.before(Op::Read).is_none(), "reads do not count");
        assert!(d.before(Op::Write).is_none());
        let slow = d.before(Op::Write).expect("the second write waits");
        assert!(d.before(Op::Write).is_none());
        let later = d.before(Op::Write).expect("and the fourth");
        let start = Instant::now();
        futures::executor::block_on(later);
        futures::executor::block_on(slow);
        assert!(start.elapsed() >= Duration::from_millis(30));
        assert!(before(Op::Write).is_none(), "no plan set in this process");
    }
}
