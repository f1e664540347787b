//! A single-threaded executor whose reactor is an I/O [`Engine`].
//!
//! One `Runtime` lives on each I/O thread. Tasks are polled on that thread
//! only; they submit [`Op`]s through [`submit`], which queue on the engine
//! without blocking. The loop hands queued ops to the kernel in one batch,
//! reaps completions in one batch, wakes the waiting tasks, and sleeps in
//! `poll(2)` on the engine's eventfd only when nothing is runnable.

use crate::engine::{self, signal_eventfd, Engine, EngineKind, ThreadPoolEngine};
use crate::error::Result;
use crate::op::Op;
use crate::times::ThreadTimes;
use slab::Slab;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

/// A spawned task; await it for its output. Dropping it cancels the task.
pub type Task<T> = async_task::Task<T>;

/// How a runtime's engine is set up.
#[derive(Debug, Clone, Copy)]
pub struct RuntimeConfig {
    /// Which engine.
    pub engine: EngineKind,
    /// Ops in flight the engine is sized for.
    pub depth: u32,
    /// Worker threads of the `threads` engine.
    pub threads: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            engine: EngineKind::IoUring,
            depth: 256,
            threads: 8,
        }
    }
}

/// Runnable tasks, shareable with wakers on other threads.
struct RunQueue {
    tasks: Mutex<VecDeque<async_task::Runnable>>,
    main_woken: AtomicBool,
    efd: OwnedFd,
}

impl RunQueue {
    fn notify(self: &Arc<Self>) {
        // Wakes from another thread must interrupt the reactor's poll(2).
        if !ON_THIS_RUNTIME.with(|c| c.get() == Arc::as_ptr(self) as usize) {
            signal_eventfd(self.efd.as_raw_fd());
        }
    }
    fn push(self: &Arc<Self>, r: async_task::Runnable) {
        if let Ok(mut q) = self.tasks.lock() {
            q.push_back(r);
        }
        self.notify();
    }
    fn pop(&self) -> Option<async_task::Runnable> {
        self.tasks.lock().ok()?.pop_front()
    }
    fn has_tasks(&self) -> bool {
        self.tasks.lock().map(|q| !q.is_empty()).unwrap_or(false)
    }
    fn has_work(&self) -> bool {
        self.main_woken.load(Ordering::Acquire) || self.tasks.lock().map(|q| !q.is_empty()).unwrap_or(false)
    }
}

struct MainWaker(Arc<RunQueue>);

impl Wake for MainWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.main_woken.store(true, Ordering::Release);
        self.0.notify();
    }
}

/// The memory of an op in flight: its iovec array, what keeps the buffers
/// valid, and the file's descriptor. Owned by the op's slot, not by its
/// future, and dropped when the completion is reaped: so they outlive the
/// kernel's use even if the future is leaked (`mem::forget`).
pub(crate) struct OpMem {
    /// Read by the kernel through the op's pointer.
    #[allow(dead_code)]
    pub(crate) iov: Vec<libc::iovec>,
    /// Held, never read: keeps the buffers valid.
    #[allow(dead_code)]
    pub(crate) keep: smallvec::SmallVec<[crate::sg::KeepAlive; 2]>,
    /// Held, never read: the descriptor stays open (and its number is not
    /// reused) while the op may still reach the kernel.
    #[allow(dead_code)]
    pub(crate) fd: Option<Arc<OwnedFd>>,
}

enum Slot {
    Waiting(Option<Waker>, #[allow(dead_code)] Option<OpMem>),
    Done(i32),
}

pub(crate) struct Inner {
    engine: RefCell<Box<dyn Engine>>,
    /// Runs op kinds the main engine cannot queue (fallocate under native AIO).
    helper: RefCell<Option<ThreadPoolEngine>>,
    slots: RefCell<Slab<Slot>>,
    runq: Arc<RunQueue>,
    pub(crate) kind: EngineKind,
    reaped: RefCell<Vec<(u64, i32)>>,
    /// Socket readiness (crate::net).
    pub(crate) reactor: crate::reactor::Reactor,
    /// How long the loop polls for work before it sleeps (0: never).
    poll_window: Cell<std::time::Duration>,
    /// Requests another library runs for this runtime's tasks (librbd's),
    /// counted with the engine's as in flight ([`ForeignOp`]).
    foreign: Cell<usize>,
    /// What the loop saw since it last decided whether to poll.
    hint: crate::poll::PollHint,
    /// Where `block_on`'s thread's time goes (busy, idle, polling).
    times: Arc<ThreadTimes>,
    /// `block_on` attaches its thread to `times` (made by `with_times`).
    track: bool,
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<Inner>>> = const { RefCell::new(None) };
    static ON_THIS_RUNTIME: Cell<usize> = const { Cell::new(0) };
}

/// A per-thread executor and I/O reactor.
pub struct Runtime {
    inner: Rc<Inner>,
}

impl Runtime {
    /// Creates a runtime with its engine.
    pub fn new(cfg: RuntimeConfig) -> Result<Runtime> {
        Runtime::build(cfg, Arc::default(), false)
    }

    /// Creates a runtime whose [`Runtime::block_on`] counts where its
    /// thread's time goes in `times` (read from any thread): for a thread
    /// that runs one `block_on` for its life (an NBD I/O thread).
    pub fn with_times(cfg: RuntimeConfig, times: Arc<ThreadTimes>) -> Result<Runtime> {
        Runtime::build(cfg, times, true)
    }

    fn build(cfg: RuntimeConfig, times: Arc<ThreadTimes>, track: bool) -> Result<Runtime> {
        let engine = cfg.engine.create(cfg.depth, cfg.threads)?;
        let efd = engine::new_eventfd().map_err(|source| crate::Error::EngineSetup {
            engine: cfg.engine.name(),
            source,
        })?;
        Ok(Runtime {
            inner: Rc::new(Inner {
                engine: RefCell::new(engine),
                // Native AIO cannot queue fallocate: its helper pool exists
                // from the start so `event_fds` never changes.
                helper: RefCell::new(if cfg.engine == EngineKind::Native {
                    Some(ThreadPoolEngine::new(2).map_err(|source| crate::Error::EngineSetup {
                        engine: cfg.engine.name(),
                        source,
                    })?)
                } else {
                    None
                }),
                slots: RefCell::new(Slab::with_capacity(cfg.depth as usize)),
                poll_window: Cell::new(std::time::Duration::ZERO),
                foreign: Cell::new(0),
                hint: Default::default(),
                times,
                track,
                runq: Arc::new(RunQueue {
                    tasks: Mutex::new(VecDeque::new()),
                    main_woken: AtomicBool::new(true),
                    efd,
                }),
                kind: cfg.engine,
                reaped: RefCell::new(Vec::new()),
                reactor: crate::reactor::Reactor::new().map_err(|source| crate::Error::EngineSetup {
                    engine: cfg.engine.name(),
                    source,
                })?,
            }),
        })
    }

    /// Where this runtime's [`Runtime::block_on`] spent its time.
    pub fn times(&self) -> &Arc<ThreadTimes> {
        &self.inner.times
    }

    /// The engine this runtime uses.
    pub fn engine_kind(&self) -> EngineKind {
        self.inner.kind
    }

    /// The descriptors that become readable when this runtime has work:
    /// completions of its engine (and helper pool), wake-ups from other
    /// threads (eventfds) and sockets of [`crate::net`] (an epoll
    /// descriptor). An external event loop (the vhost-user worker's epoll)
    /// watches them and calls [`Runtime::run_ready`] when one fires.
    /// The helper pool of the `native` engine is created up front so the
    /// set does not change later.
    pub fn event_fds(&self) -> Vec<RawFd> {
        self.inner.event_fds()
    }

    /// Spawns a task on this runtime from outside `block_on`; it runs in
    /// [`Runtime::run_ready`] (or `block_on`).
    pub fn spawn<F>(&self, fut: F) -> Task<F::Output>
    where
        F: Future + 'static,
        F::Output: 'static,
    {
        let _guard = EnterGuard::enter(self.inner.clone());
        spawn(fut)
    }

    /// Spawns a task and polls it once at once, on this thread. A task that
    /// finishes in its first poll (a request on a null or cached node)
    /// never reaches the run queue; one that waits for I/O is woken like
    /// any other. Its I/O is queued, not yet submitted: call
    /// [`Runtime::submit_queued`] or [`Runtime::poll_ready`] next.
    pub fn spawn_now<F>(&self, fut: F) -> Task<F::Output>
    where
        F: Future + 'static,
        F::Output: 'static,
    {
        let _guard = EnterGuard::enter(self.inner.clone());
        let runq = self.inner.runq.clone();
        let (runnable, task) = async_task::spawn_local(fut, move |r| runq.push(r));
        runnable.run();
        task
    }

    /// Hands the ops queued so far to the kernel (or the helper pool),
    /// without running tasks or reaping. Costs nothing (no system call)
    /// when none are queued.
    pub fn submit_queued(&self) {
        self.inner.submit();
    }

    /// One non-blocking step for an external event loop: resets the
    /// eventfds, runs every ready task, hands queued I/O to the kernel and
    /// reaps completions, until nothing is left to do without waiting.
    /// Never blocks. Returns the number of ops still in flight.
    pub fn run_ready(&self) -> usize {
        self.inner.drain_event_fds();
        self.poll_ready()
    }

    /// [`Runtime::run_ready`] without resetting the eventfds: for polling
    /// loops, where reading eventfds that did not fire would cost a system
    /// call per round. A fired eventfd stays readable, so the external
    /// loop still wakes and calls `run_ready` for it.
    pub fn poll_ready(&self) -> usize {
        let _guard = EnterGuard::enter(self.inner.clone());
        let inner = &self.inner;
        loop {
            let mut ran = 0;
            while let Some(r) = inner.runq.pop() {
                r.run();
                ran += 1;
            }
            let reaped = inner.submit_and_reap();
            // (The main-future flag belongs to block_on and is not looked at.)
            if ran == 0 && reaped == 0 && !inner.runq.has_tasks() {
                break;
            }
        }
        inner.in_flight()
    }

    /// Runs `fut` (and any tasks it spawns) to completion on this thread.
    pub fn block_on<F: Future>(&self, fut: F) -> F::Output {
        let _guard = EnterGuard::enter(self.inner.clone());
        let inner = &self.inner;
        let waker = Waker::from(Arc::new(MainWaker(inner.runq.clone())));
        let mut cx = Context::from_waker(&waker);
        let mut fut = pin!(fut);
        inner.runq.main_woken.store(true, Ordering::Release);
        let _attached = inner.track.then(|| Attached::new(&inner.times));
        loop {
            if inner.runq.main_woken.swap(false, Ordering::AcqRel) {
                if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
                    return v;
                }
            }
            let mut ran = 0;
            while ran < 256 {
                let Some(r) = inner.runq.pop() else { break };
                r.run();
                ran += 1;
            }
            // Busy: sockets are looked at only when a task waits for one.
            if inner.runq.has_work() {
                inner.submit_and_reap_with(inner.reactor.has_waiters());
                inner.hint.saw(inner.in_flight());
                continue;
            }
            // About to sleep: socket edges wake the poll(2) below, so the
            // epoll descriptor is reaped only when it has some.
            if inner.submit_and_reap_with(false) > 0 || inner.runq.has_work() || inner.poll_for_work() {
                continue;
            }
            inner.hint.sleeps_with(inner.in_flight());
            if inner.wait() {
                inner.reactor.reap();
            }
        }
    }

    /// Polls for work this long before sleeping, when the loop runs out
    /// of it (0, the default: sleep at once). Polling spends the CPU a
    /// peer's next request would otherwise wait for: the kernel's wake-up
    /// of a sleeping thread. When it pays is [`crate::poll`]'s rule.
    pub fn set_poll_window(&self, window: std::time::Duration) {
        self.inner.poll_window.set(window);
    }
}

/// Counts the thread's time in a [`ThreadTimes`] while it lives.
struct Attached<'a>(&'a ThreadTimes);

impl<'a> Attached<'a> {
    fn new(t: &'a ThreadTimes) -> Attached<'a> {
        t.attach();
        Attached(t)
    }
}

impl Drop for Attached<'_> {
    fn drop(&mut self) {
        self.0.detach();
    }
}

struct EnterGuard {
    prev: Option<Rc<Inner>>,
    prev_id: usize,
}

impl EnterGuard {
    fn enter(inner: Rc<Inner>) -> EnterGuard {
        let id = Arc::as_ptr(&inner.runq) as usize;
        let prev_id = ON_THIS_RUNTIME.with(|c| c.replace(id));
        let prev = CURRENT.with(|c| c.replace(Some(inner)));
        EnterGuard { prev, prev_id }
    }
}

impl Drop for EnterGuard {
    fn drop(&mut self) {
        CURRENT.with(|c| *c.borrow_mut() = self.prev.take());
        ON_THIS_RUNTIME.with(|c| c.set(self.prev_id));
    }
}

impl Inner {
    /// Hands queued ops to the kernel (engine and helper pool).
    fn submit(&self) {
        if let Err(e) = self.engine.borrow_mut().submit() {
            tracing::error!("I/O engine submit failed: {e}");
        }
        if let Some(h) = self.helper.borrow_mut().as_mut() {
            let _ = h.submit();
        }
    }

    /// Hands queued ops to the kernel and records finished ones. Returns how
    /// many completions were reaped.
    fn submit_and_reap(&self) -> usize {
        self.submit_and_reap_with(true)
    }

    /// [`Inner::submit_and_reap`]; with `sockets` false, socket edges are
    /// left in the epoll descriptor (for the loop's `poll(2)` to see).
    fn submit_and_reap_with(&self, sockets: bool) -> usize {
        self.submit();
        let mut reaped = self.reaped.borrow_mut();
        self.engine.borrow_mut().reap(&mut reaped);
        if let Some(h) = self.helper.borrow_mut().as_mut() {
            h.reap(&mut reaped);
        }
        let n = reaped.len();
        let mut slots = self.slots.borrow_mut();
        let n = n + if sockets { self.reactor.reap() } else { 0 };
        for (token, res) in reaped.drain(..) {
            let Some(slot) = slots.get_mut(token as usize) else {
                continue;
            };
            // The op's memory goes here, now the kernel is done with it.
            if let Slot::Waiting(Some(w), _) = std::mem::replace(slot, Slot::Done(res)) {
                w.wake();
            }
        }
        n
    }

    /// Polls the engine, the sockets and the run queue for the poll
    /// window; true as soon as one has work. The window counts as
    /// polling time.
    fn poll_for_work(&self) -> bool {
        let window = self.poll_window.get();
        if window.is_zero() {
            return false;
        }
        if !self.hint.decide(self.in_flight()) {
            return false;
        }
        let start = std::time::Instant::now();
        let deadline = start + window;
        let found = loop {
            if self.submit_and_reap_with(self.reactor.has_waiters()) > 0
                || self.runq.has_work()
                || self.runq.main_woken.load(Ordering::Acquire)
            {
                break true;
            }
            if std::time::Instant::now() >= deadline {
                break false;
            }
            std::hint::spin_loop();
        };
        self.times
            .add_polling(start.elapsed().as_nanos().min(u64::MAX as u128) as u64);
        found
    }

    /// Ops queued or in flight on the engine and the helper pool.
    fn in_flight(&self) -> usize {
        self.engine.borrow().in_flight()
            + self.helper.borrow().as_ref().map_or(0, |h| h.in_flight())
            + self.foreign.get()
    }

    /// Every eventfd that signals work for this runtime.
    fn eventfds(&self) -> Vec<RawFd> {
        let mut fds = vec![self.engine.borrow().event_fd(), self.runq.efd.as_raw_fd()];
        if let Some(h) = self.helper.borrow().as_ref() {
            fds.push(h.event_fd());
        }
        fds
    }

    /// The eventfds and the sockets' epoll descriptor (last).
    fn event_fds(&self) -> Vec<RawFd> {
        let mut fds = self.eventfds();
        fds.push(self.reactor.fd());
        fds
    }

    /// Resets every eventfd without blocking (they are all non-blocking).
    /// The epoll descriptor needs no reset: reaping it empties it.
    fn drain_event_fds(&self) {
        for fd in self.eventfds() {
            let mut v: u64 = 0;
            // SAFETY: reads 8 bytes into a valid u64 from a non-blocking eventfd.
            unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
        }
    }

    /// Sleeps until an eventfd or a socket fires; true if a socket did
    /// (its edges are still to be reaped).
    fn wait(&self) -> bool {
        let mut fds: Vec<libc::pollfd> = self
            .event_fds()
            .into_iter()
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: fds is a valid array of pollfd for its length.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        let epfd = self.reactor.fd();
        let mut sockets = false;
        for pfd in &fds {
            if pfd.revents & libc::POLLIN == 0 {
                continue;
            }
            if pfd.fd == epfd {
                sockets = true;
            } else {
                let mut v: u64 = 0;
                // SAFETY: reads 8 bytes into a valid u64 from a non-blocking eventfd.
                unsafe { libc::read(pfd.fd, (&mut v as *mut u64).cast(), 8) };
            }
        }
        sockets
    }

    /// Queues `op` on the engine, or on the helper pool if the engine cannot.
    ///
    /// # Safety
    /// As for [`Engine::push`].
    unsafe fn push(&self, token: u64, op: Op) {
        // SAFETY: forwarded contract.
        if unsafe { self.engine.borrow_mut().push(token, op) }.is_ok() {
            return;
        }
        let mut helper = self.helper.borrow_mut();
        if helper.is_none() {
            match ThreadPoolEngine::new(2) {
                Ok(h) => *helper = Some(h),
                Err(e) => {
                    drop(helper);
                    self.complete(token, -e.raw_os_error().unwrap_or(libc::EIO));
                    return;
                }
            }
        }
        if let Some(h) = helper.as_mut() {
            // SAFETY: forwarded contract; the thread-pool engine accepts every op.
            let _ = unsafe { h.push(token, op) };
        }
    }

    fn complete(&self, token: u64, res: i32) {
        if let Some(slot) = self.slots.borrow_mut().get_mut(token as usize) {
            *slot = Slot::Done(res);
        }
    }
}

impl Drop for Inner {
    /// The kernel may still be writing into the memory of abandoned ops:
    /// wait for them before their slots (and that memory) go. Teardown
    /// only; nothing is in flight in steady state when a runtime ends.
    fn drop(&mut self) {
        while self.in_flight() > 0 {
            if self.submit_and_reap() == 0 {
                self.wait();
            }
        }
    }
}

/// A request that another library runs for a task of this runtime (an
/// RBD request in librbd), counted as in flight while this lives, so the
/// loop's polling rule (`crate::poll`) sees it as it sees the engine's:
/// a lone request that waits on the network is slept through, not spun
/// on. Made and dropped on the runtime's thread.
pub struct ForeignOp {
    rt: Rc<Inner>,
}

impl ForeignOp {
    /// Counts one request on this thread's runtime (`None` outside one).
    pub fn start() -> Option<ForeignOp> {
        let rt = try_current()?;
        rt.foreign.set(rt.foreign.get() + 1);
        Some(ForeignOp { rt })
    }
}

impl Drop for ForeignOp {
    fn drop(&mut self) {
        self.rt.foreign.set(self.rt.foreign.get().saturating_sub(1));
    }
}

impl std::fmt::Debug for ForeignOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ForeignOp")
    }
}

/// Which runtime this thread is running, if any: a number that no other
/// live runtime has (for state kept per runtime, such as a storage
/// backend's completion queue). A runtime's number is not reused while
/// anything made on it (an [`crate::EventSource`], a socket) lives.
pub fn current_key() -> Option<usize> {
    CURRENT.with(|c| c.borrow().as_ref().map(|i| Arc::as_ptr(&i.runq) as usize))
}

/// The runtime of this thread, if inside one.
pub(crate) fn try_current() -> Option<Rc<Inner>> {
    CURRENT.with(|c| c.borrow().clone())
}

fn current() -> Rc<Inner> {
    CURRENT
        .with(|c| c.borrow().clone())
        .expect("spindle-io: I/O submitted outside Runtime::block_on (a bug)")
}

/// Spawns a task on the current thread's runtime.
///
/// # Panics
/// When called outside [`Runtime::block_on`], a programming error.
pub fn spawn<F>(fut: F) -> Task<F::Output>
where
    F: Future + 'static,
    F::Output: 'static,
{
    let runq = current().runq.clone();
    let (runnable, task) = async_task::spawn_local(fut, move |r| runq.push(r));
    runnable.schedule();
    task
}

/// Submits `op` to the current runtime and resolves to its result (bytes
/// transferred or negative errno). The memory `op` points to is kept alive
/// by `mem` until the kernel is done with it, whatever becomes of the
/// returned future.
///
/// # Safety
/// Every pointer in `op` must point into `mem.iov` or into memory that
/// `mem.keep` keeps valid; an op without `mem` must reference no memory.
pub(crate) unsafe fn submit(op: Op, mem: Option<OpMem>) -> OpFuture {
    OpFuture {
        op: Some((op, mem)),
        token: None,
        rt: current(),
    }
}

/// The future of one submitted [`Op`].
pub(crate) struct OpFuture {
    op: Option<(Op, Option<OpMem>)>,
    token: Option<usize>,
    rt: Rc<Inner>,
}

impl Future for OpFuture {
    type Output = i32;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<i32> {
        let this = &mut *self;
        if let Some((op, mem)) = this.op.take() {
            let token = this
                .rt
                .slots
                .borrow_mut()
                .insert(Slot::Waiting(Some(cx.waker().clone()), mem));
            this.token = Some(token);
            // SAFETY: the slot now owns the op's memory (its iovec array's
            // heap block does not move with the Vec) and keeps it until the
            // completion is reaped (submit's contract).
            unsafe { this.rt.push(token as u64, op) };
            return Poll::Pending;
        }
        let Some(token) = this.token else {
            return Poll::Ready(-libc::EINVAL);
        };
        let mut slots = this.rt.slots.borrow_mut();
        match slots.get_mut(token) {
            Some(Slot::Done(res)) => {
                let res = *res;
                slots.remove(token);
                this.token = None;
                Poll::Ready(res)
            }
            Some(Slot::Waiting(w, _)) => {
                *w = Some(cx.waker().clone());
                Poll::Pending
            }
            _ => Poll::Ready(-libc::EIO),
        }
    }
}

impl Drop for OpFuture {
    fn drop(&mut self) {
        let Some(token) = self.token else { return };
        // Cancelled while in flight: callers rely on a dropped I/O being
        // over (its clusters may be given back, its buffer reused), so
        // wait for it. (A leaked future never gets here; the slot still
        // keeps its memory until the completion comes.)
        loop {
            if matches!(self.rt.slots.borrow().get(token), Some(Slot::Done(_)) | None) {
                break;
            }
            if self.rt.submit_and_reap() == 0 {
                self.rt.wait();
            }
        }
        self.rt.slots.borrow_mut().try_remove(token);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::engine::EngineKind;

    #[test]
    fn spawned_tasks_and_block_on_interleave() {
        for kind in [EngineKind::IoUring, EngineKind::Native, EngineKind::Threads] {
            let rt = Runtime::new(RuntimeConfig {
                engine: kind,
                ..Default::default()
            })
            .unwrap();
            let out = rt.block_on(async {
                let a = spawn(async { 1 });
                let b = spawn(async { 2 });
                a.await + b.await
            });
            assert_eq!(out, 3);
        }
    }

    /// An external loop (as the vhost-user worker's epoll will be) drives
    /// the runtime through its eventfds and `run_ready`, never blocking in it.
    #[test]
    fn an_external_event_loop_drives_the_runtime() {
        use std::rc::Rc;
        for kind in [EngineKind::IoUring, EngineKind::Native, EngineKind::Threads] {
            let dir = std::env::temp_dir().join(format!("spindle-ext-{}-{kind}", std::process::id()));
            std::fs::write(&dir, vec![0u8; 1 << 20]).unwrap();
            let rt = Runtime::new(RuntimeConfig {
                engine: kind,
                ..Default::default()
            })
            .unwrap();
            let file = Rc::new(crate::File::open(&dir, crate::OpenOptions::default()).unwrap());
            let done = Rc::new(std::cell::Cell::new(0));
            for i in 0..64u64 {
                let (file, done) = (file.clone(), done.clone());
                rt.spawn(async move {
                    let b = vec![i as u8; 4096];
                    file.write_at(i * 4096, &b, false).await.unwrap();
                    file.allocate(i * 4096, 4096).await.unwrap(); // fallocate: the helper pool under native AIO
                    let mut r = vec![0u8; 4096];
                    file.read_at(i * 4096, &mut r).await.unwrap();
                    assert!(r.iter().all(|&x| x == i as u8));
                    done.set(done.get() + 1);
                })
                .detach();
            }
            let fds = rt.event_fds();
            let mut rounds = 0;
            while done.get() < 64 {
                let in_flight = rt.run_ready();
                if done.get() == 64 {
                    break;
                }
                assert!(in_flight > 0, "{kind}: tasks wait but no I/O is in flight");
                let n = wait_readable(&fds, 5000);
                assert!(
                    n > 0,
                    "{kind}: no eventfd fired within 5 s with {in_flight} ops in flight"
                );
                rounds += 1;
            }
            assert_eq!(rt.event_fds(), fds, "{kind}: the eventfd set must not change");
            assert!(rounds < 10_000);
            let _ = std::fs::remove_file(&dir);
        }
    }

    /// poll(2) on `fds` for readability, at most `ms`; returns poll's result.
    pub(crate) fn wait_readable(fds: &[RawFd], ms: i32) -> i32 {
        let mut p: Vec<libc::pollfd> = fds
            .iter()
            .map(|&fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: p is a valid pollfd array of its length; the timeout bounds the wait.
        unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, ms) }
    }

    /// A runtime on `kind` and a 4 KiB temporary file full of `byte`.
    fn runtime_and_page(
        kind: EngineKind,
        tag: &str,
        byte: u8,
    ) -> (Runtime, std::rc::Rc<crate::File>, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!("spindle-{tag}-{}-{kind}", std::process::id()));
        std::fs::write(&path, vec![byte; 4096]).unwrap();
        let rt = Runtime::new(RuntimeConfig {
            engine: kind,
            ..Default::default()
        })
        .unwrap();
        let file = std::rc::Rc::new(crate::File::open(&path, crate::OpenOptions::default()).unwrap());
        (rt, file, path)
    }

    /// `spawn_now` runs the first poll inline: a task with nothing to wait
    /// for is finished before it returns; one that waits for I/O finishes
    /// through the usual `run_ready` rounds.
    #[test]
    fn spawn_now_polls_at_once() {
        use std::rc::Rc;
        for kind in [EngineKind::IoUring, EngineKind::Native, EngineKind::Threads] {
            let (rt, file, path) = runtime_and_page(kind, "now", 7);
            let ran = Rc::new(std::cell::Cell::new(0));
            let r = ran.clone();
            rt.spawn_now(async move { r.set(1) }).detach();
            assert_eq!(ran.get(), 1, "{kind}: a ready task must finish inside spawn_now");
            assert_eq!(rt.poll_ready(), 0);

            let (r, f) = (ran.clone(), file.clone());
            rt.spawn_now(async move {
                let mut b = vec![0u8; 4096];
                f.read_at(0, &mut b).await.unwrap();
                r.set(if b.iter().all(|&x| x == 7) { 2 } else { 3 });
            })
            .detach();
            assert_eq!(
                ran.get(),
                1,
                "{kind}: the read cannot have finished before it was submitted"
            );
            for _ in 0..5000 {
                if rt.run_ready() == 0 && ran.get() != 1 {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            assert_eq!(ran.get(), 2, "{kind}: the read must finish with the file's bytes");
            let _ = std::fs::remove_file(&path);
        }
    }

    /// `submit_queued` alone puts a queued read in the kernel's hands:
    /// its completion fires the runtime's eventfds with no `run_ready`.
    #[test]
    fn submit_queued_reaches_the_kernel() {
        use std::rc::Rc;
        for kind in [EngineKind::IoUring, EngineKind::Native, EngineKind::Threads] {
            let (rt, file, path) = runtime_and_page(kind, "subq", 9);
            rt.run_ready(); // resets the eventfds
            let got = Rc::new(std::cell::Cell::new(0u8));
            let (f, g) = (file.clone(), got.clone());
            rt.spawn_now(async move {
                let mut b = vec![0u8; 4096];
                f.read_at(0, &mut b).await.unwrap();
                g.set(b[4095]);
            })
            .detach();
            rt.submit_queued();
            assert!(
                wait_readable(&rt.event_fds(), 5000) > 0,
                "{kind}: the read was not submitted"
            );
            while rt.run_ready() > 0 {}
            assert_eq!(got.get(), 9, "{kind}");
            let _ = std::fs::remove_file(&path);
        }
    }

    /// `block_on` splits its time into busy, idle (asleep in poll(2)) and
    /// polling (a poll window), and the three add up to its run.
    #[test]
    fn block_on_counts_busy_idle_and_polling_time() {
        let rt = Runtime::with_times(RuntimeConfig::default(), Arc::default()).unwrap();
        rt.set_poll_window(std::time::Duration::from_micros(200));
        let t = std::time::Instant::now();
        rt.block_on(async {
            // Asleep on the timer.
            let _ = crate::time::sleep(std::time::Duration::from_millis(30)).await;
            // Busy without a wait.
            crate::times::tests::spin(std::time::Duration::from_millis(10));
            // Two short sleeps: the loop polls its window before each.
            for _ in 0..2 {
                let _ = crate::time::sleep(std::time::Duration::from_millis(2)).await;
            }
        });
        let total = t.elapsed().as_nanos() as u64;
        let s = rt.times().snapshot();
        assert!(s.idle_ns >= 25_000_000, "{s:?}");
        assert!(s.busy_ns >= 10_000_000, "{s:?}");
        assert!(s.poll_ns > 0, "{s:?}");
        assert!(s.busy_ns + s.idle_ns + s.poll_ns <= total, "{s:?} > {total}");
    }

    #[test]
    fn cross_thread_wake_interrupts_the_reactor() {
        let rt = Runtime::new(RuntimeConfig::default()).unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<Waker>();
        let flag = Arc::new(AtomicBool::new(false));
        let f2 = flag.clone();
        let t = std::thread::spawn(move || {
            let w = rx.recv().unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
            f2.store(true, Ordering::SeqCst);
            w.wake();
        });
        let mut sent = Some(tx);
        rt.block_on(std::future::poll_fn(|cx| {
            if flag.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            if let Some(tx) = sent.take() {
                tx.send(cx.waker().clone()).unwrap();
            }
            Poll::Pending
        }));
        t.join().unwrap();
    }
}
