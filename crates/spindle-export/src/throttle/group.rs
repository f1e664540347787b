//! Throttle groups: exports that share one set of limits, with requests
//! admitted round-robin across the members that have requests waiting,
//! as QEMU's `block/throttle-groups.c` does.
//!
//! Each direction (reads, writes) has a token: the member whose turn it
//! is. A request that cannot go at once queues in its member's queue.
//! The head of the token member's queue is the one request that watches
//! the clock: it sleeps on a timer of its own thread's runtime until the
//! buckets allow it, goes, passes the token to the next member (in member
//! order, wrapping) that has requests waiting, and wakes that member's
//! head. Every other waiting request is parked (its waker kept) until it
//! is a head with the token. No thread, no busy loop; members on several
//! I/O threads share the group through its mutex (held for arithmetic
//! only), and cross-thread wakes go through the runtimes' wakers.
//!
//! A change of limits empties the buckets (as QEMU) and wakes the heads,
//! so it takes effect on the next request.

use super::config::Limits;
use super::state::{Direction, State};
use slab::Slab;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

struct Waiter {
    ticket: u64,
    waker: Option<Waker>,
    /// Woken to look again (it may be a head with the token now).
    notified: bool,
}

#[derive(Default)]
struct Member {
    queues: [VecDeque<Waiter>; 2],
}

struct Inner {
    state: State,
    members: Slab<Member>,
    /// Whose turn it is, per direction.
    token: [Option<usize>; 2],
    next_ticket: u64,
}

/// A group of exports sharing limits.
pub struct Group {
    name: String,
    epoch: Instant,
    /// Whether any limit is set: read without the lock, so an export
    /// without limits pays nothing per request.
    enabled: std::sync::atomic::AtomicBool,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Group({})", self.name)
    }
}

/// A member's place in its group; leaves the group when dropped.
#[derive(Debug)]
pub struct Membership {
    group: Arc<Group>,
    id: usize,
}

impl Group {
    /// A group with `limits` (validated by the caller).
    pub fn new(name: impl Into<String>, limits: Limits) -> Arc<Group> {
        Arc::new(Group {
            name: name.into(),
            epoch: Instant::now(),
            enabled: std::sync::atomic::AtomicBool::new(limits.is_enabled()),
            inner: Mutex::new(Inner {
                state: State::new(limits, 0),
                members: Slab::new(),
                token: [None, None],
                next_ticket: 0,
            }),
        })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos().min(u64::MAX as u128) as u64
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The limits now.
    pub fn limits(&self) -> Limits {
        *self.lock().state.limits()
    }

    /// Whether any limit is set.
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Members now.
    pub fn members(&self) -> usize {
        self.lock().members.len()
    }

    /// Changes the limits; waiting requests look again at once.
    pub fn set_limits(&self, limits: Limits) {
        let now = self.now();
        let wake = {
            let mut g = self.lock();
            g.state.configure(limits, now);
            self.enabled
                .store(limits.is_enabled(), std::sync::atomic::Ordering::Release);
            let mut w = Vec::new();
            for d in [Direction::Read, Direction::Write] {
                if let Some(t) = g.token[d as usize] {
                    w.extend(notify_head(&mut g, t, d));
                }
            }
            w
        };
        wake.into_iter().for_each(Waker::wake);
    }

    /// Joins the group.
    pub fn join(self: &Arc<Self>) -> Membership {
        let id = self.lock().members.insert(Member::default());
        Membership {
            group: self.clone(),
            id,
        }
    }
}

/// Marks the head of member `m`'s queue in `d` to look again; its waker.
fn notify_head(g: &mut Inner, m: usize, d: Direction) -> Option<Waker> {
    let head = g.members.get_mut(m)?.queues[d as usize].front_mut()?;
    head.notified = true;
    head.waker.take()
}

/// The next member after `from` (wrapping, `from` last) with requests
/// waiting in `d`.
fn next_with_waiters(g: &Inner, from: usize, d: Direction) -> Option<usize> {
    let keys: Vec<usize> = g.members.iter().map(|(k, _)| k).collect();
    let pos = keys.iter().position(|&k| k == from).unwrap_or(0);
    (1..=keys.len())
        .map(|i| keys[(pos + i) % keys.len()])
        .find(|&k| !g.members[k].queues[d as usize].is_empty())
}

/// How often a sleeping head looks at its escape condition.
pub const ESCAPE_CHECK: Duration = Duration::from_millis(20);

/// What a waiting request does next.
enum Next {
    Go,
    Sleep(Duration),
    Park,
}

impl Membership {
    /// The group.
    pub fn group(&self) -> &Arc<Group> {
        &self.group
    }

    /// Waits until a request of `bytes` in `dir` may go, and accounts it.
    /// Returns how long it waited. Cancel-safe: a dropped wait leaves the
    /// queue, handing the turn on.
    pub async fn admit(&self, dir: Direction, bytes: u64) -> Duration {
        self.admit_unless(dir, bytes, &|| false).await
    }

    /// [`Membership::admit`], except that a request whose turn it is goes
    /// at once while `escape` says so (a drain for a snapshot or a stop
    /// must not wait for the limits, as QEMU's drain restarts throttled
    /// requests); it is looked at least every [`ESCAPE_CHECK`].
    pub async fn admit_unless(&self, dir: Direction, bytes: u64, escape: &dyn Fn() -> bool) -> Duration {
        let g = &self.group;
        let d = dir as usize;
        if !g.is_enabled() {
            return Duration::ZERO;
        }
        let ticket = {
            let mut inner = g.lock();
            if !inner.state.limits().is_enabled() {
                return Duration::ZERO;
            }
            let idle = inner.members.iter().all(|(_, m)| m.queues[d].is_empty());
            if idle && inner.state.wait(dir, g.now()) == 0 {
                inner.state.account(dir, bytes);
                return Duration::ZERO;
            }
            let ticket = inner.next_ticket;
            inner.next_ticket += 1;
            inner.members[self.id].queues[d].push_back(Waiter {
                ticket,
                waker: None,
                notified: false,
            });
            let token = inner.token[d];
            if token.is_none_or(|t| inner.members.get(t).is_none_or(|m| m.queues[d].is_empty())) {
                inner.token[d] = Some(self.id);
            }
            ticket
        };
        let start = Instant::now();
        let mut queued = Queued {
            m: self,
            dir,
            ticket,
            done: false,
        };
        loop {
            match queued.next(bytes, escape()) {
                Next::Go => {
                    queued.done = true;
                    return start.elapsed();
                }
                // The timer is this thread's; a change of limits or a
                // cancelled head wakes it early.
                Next::Sleep(w) => {
                    let _ = spindle_io::time::timeout(w.min(ESCAPE_CHECK), queued.notified()).await;
                }
                Next::Park => queued.notified().await,
            }
        }
    }
}

/// A request in a member's queue.
struct Queued<'a> {
    m: &'a Membership,
    dir: Direction,
    ticket: u64,
    done: bool,
}

impl Queued<'_> {
    fn next(&mut self, bytes: u64, escape: bool) -> Next {
        let g = &self.m.group;
        let d = self.dir as usize;
        let now = g.now();
        let wake;
        {
            let mut inner = g.lock();
            let is_head = inner.token[d] == Some(self.m.id)
                && inner.members[self.m.id].queues[d]
                    .front()
                    .is_some_and(|w| w.ticket == self.ticket);
            if !is_head {
                return Next::Park;
            }
            let wait = inner.state.wait(self.dir, now);
            if wait > 0 && !escape {
                return Next::Sleep(Duration::from_nanos(wait));
            }
            inner.state.account(self.dir, bytes);
            inner.members[self.m.id].queues[d].pop_front();
            let next = next_with_waiters(&inner, self.m.id, self.dir);
            inner.token[d] = next;
            wake = next.and_then(|n| notify_head(&mut inner, n, self.dir));
        }
        if let Some(w) = wake {
            w.wake();
        }
        Next::Go
    }

    /// Until someone marks this request to look again.
    async fn notified(&self) {
        let g = &self.m.group;
        let d = self.dir as usize;
        poll_fn(|cx| {
            let mut inner = g.lock();
            let Some(w) = inner.members[self.m.id].queues[d]
                .iter_mut()
                .find(|w| w.ticket == self.ticket)
            else {
                return Poll::Ready(());
            };
            if std::mem::take(&mut w.notified) {
                return Poll::Ready(());
            }
            w.waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}

impl Drop for Queued<'_> {
    /// A cancelled request leaves its queue; if it held the turn, the
    /// turn goes on.
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let g = &self.m.group;
        let d = self.dir as usize;
        let wake = {
            let mut inner = g.lock();
            let q = &mut inner.members[self.m.id].queues[d];
            let was_head = q.front().is_some_and(|w| w.ticket == self.ticket);
            q.retain(|w| w.ticket != self.ticket);
            if was_head && inner.token[d] == Some(self.m.id) {
                let next = if inner.members[self.m.id].queues[d].is_empty() {
                    next_with_waiters(&inner, self.m.id, self.dir)
                } else {
                    Some(self.m.id)
                };
                inner.token[d] = next;
                next.and_then(|n| notify_head(&mut inner, n, self.dir))
            } else {
                None
            }
        };
        if let Some(w) = wake {
            w.wake();
        }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        let mut inner = self.group.lock();
        inner.members.try_remove(self.id);
        for d in 0..2 {
            if inner.token[d] == Some(self.id) {
                inner.token[d] = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spindle_io::{Runtime, RuntimeConfig};
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Three members on two I/O threads, always busy: each gets a third
    /// of the group's rate, and the group's rate is its limit.
    #[test]
    fn busy_members_share_the_limit_round_robin_across_threads() {
        let g = Group::new("g", Limits::parse("iops-total=600").unwrap());
        let counts: Arc<[AtomicU64; 3]> = Arc::new(Default::default());
        let run = Duration::from_millis(1500);
        let threads: Vec<_> = [vec![0usize, 1], vec![2]]
            .into_iter()
            .map(|ids| {
                let (g, counts) = (g.clone(), counts.clone());
                std::thread::spawn(move || {
                    let rt = Runtime::new(RuntimeConfig::default()).unwrap();
                    rt.block_on(async move {
                        let start = Instant::now();
                        let mut tasks = Vec::new();
                        for id in ids {
                            let m = Arc::new(g.join());
                            for _ in 0..4 {
                                let (m, counts) = (m.clone(), counts.clone());
                                tasks.push(spindle_io::spawn(async move {
                                    while start.elapsed() < run {
                                        m.admit(Direction::Read, 4096).await;
                                        // Past the first member's start-up
                                        // burst (the bucket's avg/10).
                                        if start.elapsed() > Duration::from_millis(300) {
                                            counts[id].fetch_add(1, Ordering::Relaxed);
                                        }
                                    }
                                }));
                            }
                        }
                        for t in tasks {
                            t.await;
                        }
                    })
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let c: Vec<f64> = counts.iter().map(|c| c.load(Ordering::Relaxed) as f64).collect();
        let total: f64 = c.iter().sum();
        // 1.2 s at 600/s.
        assert!((total - 720.0).abs() / 720.0 < 0.05, "total {total}: {c:?}");
        for n in &c {
            assert!((n / total - 1.0 / 3.0).abs() < 0.1 / 3.0, "unfair: {c:?}");
        }
    }

    /// A request waiting a long time for a low limit goes at once when
    /// the limit is raised from another thread.
    #[test]
    fn a_new_limit_takes_effect_on_the_waiting_request() {
        let g = Group::new("g", Limits::parse("iops-total=1").unwrap());
        let m = g.join();
        let g2 = g.clone();
        let raiser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            g2.set_limits(Limits::parse("iops-total=100000").unwrap());
            Instant::now()
        });
        let rt = Runtime::new(RuntimeConfig::default()).unwrap();
        let done = rt.block_on(async {
            m.admit(Direction::Write, 512).await; // The first goes.
            let waited = m.admit(Direction::Write, 512).await;
            assert!(waited >= Duration::from_millis(150), "{waited:?}");
            Instant::now()
        });
        let raised = raiser.join().unwrap();
        let late = done.saturating_duration_since(raised);
        assert!(late < Duration::from_millis(100), "took {late:?} after the change");
    }

    /// A cancelled waiting request hands the turn on.
    #[test]
    fn a_cancelled_head_hands_the_turn_on() {
        let g = Group::new("g", Limits::parse("iops-total=5").unwrap());
        let (a, b) = (g.join(), g.join());
        let rt = Runtime::new(RuntimeConfig::default()).unwrap();
        rt.block_on(async {
            a.admit(Direction::Read, 512).await;
            // a's next request waits ~200 ms; cancel it after 50 ms.
            let r = spindle_io::time::timeout(Duration::from_millis(50), a.admit(Direction::Read, 512)).await;
            assert!(matches!(r, Ok(None)));
            let t = Instant::now();
            b.admit(Direction::Read, 512).await;
            assert!(t.elapsed() < Duration::from_millis(400), "{:?}", t.elapsed());
        });
        assert_eq!(g.members(), 2);
    }
}
