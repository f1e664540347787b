//! What an I/O thread does on each event.
//!
//! 1. A kick (or a runtime eventfd, or a poll round) arrives.
//! 2. The thread pops every available descriptor chain of its queues,
//!    validates it (`blk::request::parse`) and spawns one task per request
//!    on the thread's runtime, polled at once; its I/O goes to the kernel
//!    right away, zero-copy into guest memory.
//! 3. `Runtime::poll_ready` reaps completions in one batch; each finished
//!    task leaves its chain for `signal`, which puts it on the used ring.
//! 4. The thread signals each queue's call eventfd once per batch, and only
//!    when EVENT_IDX says the driver wants it.
//! 5. A broken ring (`ring::Broken`: outside guest memory, an available
//!    index further ahead than the queue size, a head outside the table, a
//!    used ring that cannot be written) stops the device at once
//!    (`BlkBackend::fail`): one log line, no queue popped, so no spinning
//!    on it; the thread sleeps until the frontend resets the device.
//! 6. With nothing left in flight, the thread either polls (`poll::PollState`
//!    decides: it keeps looking at its queues and completions, notifications off,
//!    until nothing has happened for `poll_ns`) or takes one look at its
//!    queues with kicks held (`signal_and_look`); then it turns
//!    notifications back on and sleeps in epoll.

use crate::backend::{BlkBackend, Memory};
use crate::blk::{complete, parse, Parsed, RequestKind, VIRTIO_BLK_S_OK};
use crate::dirty::DirtyLog;
use crate::disk::VirtioDisk;
use crate::drain::Admission;
use crate::inflight::track::QueueTrack;
use crate::kick::hold_kicks;
use crate::poll::{PollState, Step};
use crate::queues::QueueMap;
use crate::ring::{self, Broken, Setup};
use smallvec::SmallVec;
use spindle_block::Node;
use spindle_export::device::Device;
use spindle_export::ratelimit::limited;
use spindle_export::stats::Op;
use spindle_export::throttle::Direction;
use spindle_io::trace::{VHOST_COMPLETE, VHOST_SUBMIT};
use spindle_io::{traced, Runtime};
use std::cell::RefCell;
use std::io;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vhost_user_backend::{VringRwLock, VringState, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};

/// The epoll event id of the runtime's eventfds (ids up to `num_queues`
/// belong to the library).
pub(crate) fn runtime_event(num_queues: u16) -> u64 {
    u64::from(num_queues) + 1
}

/// The epoll event id of the connection's waker (`activation::Waker`):
/// a device that waited to start may start now.
pub(crate) fn wake_event(num_queues: u16) -> u64 {
    u64::from(num_queues) + 2
}

/// Chains a polling round pops from one queue before it runs them and
/// signals their completions. Small rounds let the driver reap and refill
/// while this thread works on the next round, instead of the two taking
/// turns over the whole queue depth: on null at QD32 this doubled IOPS
/// (0.57M to 1.15M), on O_DIRECT raw it raised QD32 from 84k to 106k
/// (bench/vhost.py; 4 and 8 were best, 1 and 16 worse).
const POLL_BATCH: u16 = 8;

struct Worker {
    rt: Runtime,
    /// What the thread's request tasks share with it.
    shared: Rc<Shared>,
    /// This thread's index.
    thread: usize,
    /// Device queue of each of this thread's vrings.
    map: QueueMap,
    /// Queues (by index on this thread) whose guest notifications are off.
    quiet: RefCell<Vec<bool>>,
    /// What the polling decision has seen.
    polling: PollState,
    /// Per queue (by index on this thread): the setup its ring was last
    /// checked in (`ring::check`), so a ring is checked once per setup.
    checked: RefCell<Vec<Option<Setup>>>,
    /// Per queue (by index on this thread): its inflight tracking, when
    /// the frontend gave a buffer.
    track: RefCell<Vec<Option<QueueTrack>>>,
}

impl Drop for Worker {
    /// The thread ends (its connection went): its time goes to the
    /// device's totals for this thread number.
    fn drop(&mut self) {
        self.shared.dev.thread_times(self.thread).detach();
    }
}

/// What a request's task reaches through one `Rc`: no atomic operation
/// per request on the way in or out.
struct Shared {
    dev: Arc<Device>,
    /// Where the pages the thread writes are marked while the frontend
    /// migrates.
    log: Arc<DirtyLog>,
    /// Per queue (by index on this thread): finished chains, as (head,
    /// used length), not yet on the used ring. `signal` publishes them
    /// under one vring lock and one guest-memory load per queue.
    done: RefCell<Vec<Vec<(u16, u32)>>>,
}

mod resume;
use resume::{resubmit, start_ring};

thread_local! {
    static WORKER: RefCell<Option<Rc<Worker>>> = const { RefCell::new(None) };
}

fn worker(b: &BlkBackend, thread: usize, queues: usize) -> io::Result<Rc<Worker>> {
    if let Some(w) = WORKER.with(|w| w.borrow().clone()) {
        return Ok(w);
    }
    let rt = Runtime::new(b.dev.cfg.engine).map_err(io::Error::other)?;
    b.register_thread(thread, &rt.event_fds())?;
    let w = Rc::new(Worker {
        rt,
        shared: Rc::new(Shared {
            dev: b.dev.clone(),
            log: b.dirty.clone(),
            done: RefCell::new(vec![Vec::new(); queues]),
        }),
        thread,
        map: QueueMap::of(&b.dev.cfg),
        quiet: RefCell::new(vec![false; queues]),
        polling: PollState::default(),
        checked: RefCell::new(vec![None; queues]),
        track: RefCell::new((0..queues).map(|_| None).collect()),
    });
    // This thread's time counts for its number from now on (read from
    // the kernel when asked: nothing per event).
    b.dev.thread_times(thread).attach();
    WORKER.with(|slot| *slot.borrow_mut() = Some(w.clone()));
    Ok(w)
}

/// Entry point from `VhostUserBackend::handle_event`.
pub(crate) fn handle_event(b: &BlkBackend, event: u16, vrings: &[VringRwLock], thread: usize) -> io::Result<()> {
    let w = worker(b, thread, vrings.len())?;
    let w = &*w;
    // The runtime's eventfds are edge-triggered in this epoll: each signal
    // is one event, so they need not be read (two system calls saved per
    // wake-up). Their counters only grow; eventfds saturate, never fail.
    if (event as usize) < vrings.len() {
        pop_queue(b, w, event as usize, vrings, false);
    } else if u64::from(event) == wake_event(b.dev.cfg.num_queues) {
        // A ring that waited to start (or nothing: a wake-up may be
        // spurious) gets its round now, with no kick.
        for i in 0..vrings.len() {
            pop_queue(b, w, i, vrings, false);
        }
    }
    let in_flight = w.rt.poll_ready();
    let poll_ns = b.dev.cfg.poll_ns;
    let in_flight = match w.polling.step(in_flight, poll_ns > 0) {
        Step::Signal => {
            signal(b, w, vrings);
            in_flight
        }
        Step::Poll => {
            signal(b, w, vrings);
            poll(b, w, vrings, poll_ns)
        }
        Step::Look => signal_and_look(b, w, vrings),
    };
    w.polling.sleeps_with(in_flight);
    Ok(())
}

fn nanos(d: Duration) -> u64 {
    d.as_nanos().min(u64::MAX as u128) as u64
}

/// Signals the completions of a thread with nothing in flight that will
/// not poll, then takes one look at its queues for the driver's answer,
/// with kicks held meanwhile. A driver woken on this CPU runs at once,
/// publishes its next request and sleeps again before this thread
/// continues, so the look finds the request with no kick (one system call
/// fewer on each side) and submits it before the thread returns to epoll.
/// Returns the ops in flight.
fn signal_and_look(b: &BlkBackend, w: &Worker, vrings: &[VringRwLock]) -> usize {
    // Only the queues about to be signalled get an answer to look for, and
    // only live ones: `pop_queue` skips a disabled or unready queue, so a
    // hold there would outlive the look and swallow the next kick.
    // Nor while the device is failed: `pop_queue` skips every queue then.
    let held: SmallVec<[usize; 8]> = (0..vrings.len())
        .filter(|&i| !w.shared.done.borrow()[i].is_empty() && live(&vrings[i]) && !b.is_failed())
        .collect();
    if held.is_empty() {
        signal(b, w, vrings);
        return w.rt.poll_ready();
    }
    for &i in &held {
        if !w.quiet.borrow()[i] {
            hold_kicks(&*b.mem.memory(), vrings[i].get_mut().get_queue_mut());
            w.quiet.borrow_mut()[i] = true;
        }
    }
    signal(b, w, vrings);
    for &i in &held {
        pop_queue(b, w, i, vrings, false);
    }
    let in_flight = w.rt.poll_ready();
    signal(b, w, vrings);
    in_flight
}

/// Whether the driver has the queue enabled and set up.
pub(crate) fn live(vring: &VringRwLock) -> bool {
    is_live(&vring.get_ref())
}

/// [`live`], for a vring already locked.
fn is_live(st: &VringState<GuestMemoryAtomic<Memory>>) -> bool {
    st.is_enabled() && st.get_queue().ready()
}

/// Polls the thread's queues and runtime with guest notifications off
/// until `poll_ns` passes with no work and nothing in flight (a thread
/// with I/O in flight stops at the first idle round: its completions wake
/// it); then re-enables them. Returns the ops still in flight.
fn poll(b: &BlkBackend, w: &Worker, vrings: &[VringRwLock], poll_ns: u64) -> usize {
    let window = Duration::from_nanos(poll_ns);
    let mut last_work = Instant::now();
    // Rounds that found nothing count as polling time; one clock read
    // per round, as before.
    let (mut prev, mut idle) = (last_work, Duration::ZERO);
    loop {
        let mut popped = 0;
        for i in 0..vrings.len() {
            popped += pop_queue(b, w, i, vrings, true);
        }
        let in_flight = w.rt.poll_ready();
        w.polling.saw(in_flight);
        // Completions go out every round: the driver reaps them while
        // this thread pops the next round.
        let work = popped + signal(b, w, vrings);
        let now = Instant::now();
        if work > 0 {
            last_work = now;
        } else {
            idle += now - prev;
            if in_flight > 0 || now - last_work >= window {
                break;
            }
        }
        prev = now;
        std::hint::spin_loop();
    }
    w.shared.dev.thread_times(w.thread).add_polling(nanos(idle));
    for i in 0..vrings.len() {
        pop_queue(b, w, i, vrings, false);
    }
    let in_flight = w.rt.poll_ready();
    signal(b, w, vrings);
    in_flight
}

/// Pops every available chain of queue `local` and spawns its request.
/// Leaves guest notifications off when `keep_quiet`; otherwise ends with
/// them on and the queue seen empty after that. Returns chains popped.
fn pop_queue(b: &BlkBackend, w: &Worker, local: usize, vrings: &[VringRwLock], keep_quiet: bool) -> usize {
    let vring = &vrings[local];
    let quiet = w.quiet.borrow()[local];
    let queue = w.map.queue(w.thread, local);
    {
        let guard = b.mem.memory();
        let st = vring.get_ref();
        if !is_live(&st) {
            return 0;
        }
        let q = st.get_queue();
        let setup = Setup::of(q, b.mem_map());
        if !b.may_serve(queue, setup, q.next_avail()) {
            return 0;
        }
        if w.checked.borrow()[local] != Some(setup) {
            if let Err(why) = ring::check(q, &*guard) {
                stop(b, queue, &st, &why);
                return 0;
            }
            w.checked.borrow_mut()[local] = Some(setup);
        }
        // The cheap check a polling round makes: nothing new, nothing to do.
        if keep_quiet
            && quiet
            && !b.tracking.start_pending(queue)
            && q.avail_idx(&*guard, Ordering::Acquire)
                .map_or(true, |i| i.0 == q.next_avail())
        {
            return 0;
        }
    }
    if let Some(region) = b.tracking.take_start(queue) {
        if !start_ring(b, w, queue, local, vring, region) {
            return 0;
        }
    }
    // Counted as in flight while popping (`drain::Admission`); each
    // popped request stays counted until `signal` puts it on the used ring.
    let Some(adm) = b.requests.admit(queue) else {
        return 0;
    };
    // One load of the image per round; its requests share it through an
    // `Rc` (no atomic operation per request). A ring whose device may not
    // start yet leaves its requests on the ring; the connection's waker
    // brings this thread back (`wake_event`).
    let Some(node) = b.round_node(queue, vring) else {
        return 0;
    };
    let popped = pop_chains(b, w, &adm, queue, local, vring, keep_quiet, &Rc::new(node));
    // Turning notifications off and on wrote the used ring's flags or
    // `avail_event`.
    if b.dirty.is_on() {
        b.dirty.mark_used_event(vring.get_ref().get_queue());
    }
    adm.accepted(popped);
    popped
}

// The round's image comes in an `Rc` so each request clones it without an
// atomic operation, as the memory snapshot does.
#[allow(clippy::too_many_arguments, clippy::redundant_allocation)]
fn pop_chains(
    b: &BlkBackend,
    w: &Worker,
    adm: &Admission<'_>,
    queue: usize,
    local: usize,
    vring: &VringRwLock,
    keep_quiet: bool,
    node: &Rc<Arc<Node>>,
) -> usize {
    let limits = b.dev.limits();
    let mut popped = match resubmit(b, w, queue, local, vring, node) {
        Some(n) => n,
        None => return 0,
    };
    loop {
        // A driver that keeps publishing keeps this loop going: a frontend
        // that left must still end it.
        if !adm.open() {
            break;
        }
        if !w.quiet.borrow()[local] {
            let _ = vring.disable_notification();
            w.quiet.borrow_mut()[local] = true;
        }
        loop {
            let pending = match available(b, vring) {
                Ok(0) => break,
                Ok(n) => n,
                Err(why) => {
                    fail(b, queue, vring, &why);
                    return popped;
                }
            };
            // Guest memory is loaded after the avail index was read: a
            // frontend publishes a request only once the memory it uses
            // was acknowledged (ADD_MEM_REG, SET_MEM_TABLE), so this
            // snapshot maps every buffer of these `pending` chains.
            let mem = Rc::new(b.mem.memory().into_inner());
            let pending = if keep_quiet { pending.min(POLL_BATCH) } else { pending };
            // One clock read per round: a request's latency is counted
            // from the round that popped it.
            let start = Instant::now();
            for _ in 0..pending {
                let chain = ring::pop(vring.get_mut().get_queue_mut(), &**mem);
                let chain = match chain {
                    Ok(c) => c,
                    Err(why) => {
                        fail(b, queue, vring, &why);
                        return popped;
                    }
                };
                let head = chain.head_index();
                // Recorded in the inflight buffer before anything of the
                // request runs.
                if let Some(t) = w.track.borrow_mut()[local].as_mut() {
                    if !t.mark(head) {
                        fail(b, queue, vring, &Broken::Twice { head });
                        return popped;
                    }
                }
                let parsed = parse(chain, &**mem, &limits);
                if let Parsed::Fail { reason, .. } | Parsed::Drop { reason } = &parsed {
                    limited!(warn, device = %b.dev.cfg.name, queue, "refused request {head}: {reason}");
                }
                spawn_request(w, queue, local, (mem.clone(), node.clone()), head, parsed, start);
                // Its I/O goes to the kernel now, not at the end of the
                // round: the device starts on it while the rest are parsed.
                // On O_DIRECT raw QD32 that took Spindle from 82-90% of fio
                // to 88-93% (two 10-pair runs), for 7-19% more CPU per
                // request (one io_uring_enter each). Null queues nothing:
                // no system call.
                w.rt.submit_queued();
                popped += 1;
            }
            if keep_quiet {
                break;
            }
        }
        if keep_quiet {
            break;
        }
        // New chains may have arrived just before notifications came back on.
        w.quiet.borrow_mut()[local] = false;
        if !matches!(vring.enable_notification(), Ok(true)) {
            break;
        }
    }
    popped
}

/// Chains the driver has made available and this queue has not popped.
fn available(b: &BlkBackend, vring: &VringRwLock) -> Result<u16, Broken> {
    let guard = b.mem.memory();
    let st = vring.get_ref();
    ring::pending(st.get_queue(), &*guard)
}

/// Stops the device for ring `queue`, found broken as `why`.
fn fail(b: &BlkBackend, queue: usize, vring: &VringRwLock, why: &Broken) {
    stop(b, queue, &vring.get_ref(), why);
}

/// Stops the device for ring `queue` (in state `st`), found broken as
/// `why`, and tells the frontend on the ring's error eventfd
/// (`SET_VRING_ERR`; QEMU logs "vhost vring error in virtqueue N").
fn stop(b: &BlkBackend, queue: usize, st: &VringState<GuestMemoryAtomic<Memory>>, why: &Broken) {
    let q = st.get_queue();
    if b.fail(queue, Setup::of(q, b.mem_map()), q.next_avail(), why) {
        let _ = st.signal_error();
    }
}

fn classify(p: &Parsed) -> (Op, u64) {
    match p {
        Parsed::Request(r) => match &r.kind {
            RequestKind::Read => (Op::Read, r.data_len),
            RequestKind::Write => (Op::Write, r.data_len),
            RequestKind::Flush => (Op::Flush, 0),
            RequestKind::Discard(v) => (Op::Discard, v.iter().map(|r| u64::from(r.sectors) * 512).sum()),
            RequestKind::WriteZeroes(v) => (Op::WriteZeroes, v.iter().map(|r| u64::from(r.sectors) * 512).sum()),
            RequestKind::GetId => (Op::Other, 0),
        },
        _ => (Op::Other, 0),
    }
}

/// What a trace line calls a request, its first byte and its reason
/// (a refused one's).
fn describe(p: &Parsed) -> (&'static str, u64, &'static str) {
    match p {
        Parsed::Request(r) => {
            let first = |v: &[crate::blk::request::Range]| v.first().map_or(0, |r| r.sector * 512);
            match &r.kind {
                RequestKind::Read => ("read", r.sector * 512, ""),
                RequestKind::Write => ("write", r.sector * 512, ""),
                RequestKind::Flush => ("flush", 0, ""),
                RequestKind::GetId => ("get_id", 0, ""),
                RequestKind::Discard(v) => ("discard", first(v), ""),
                RequestKind::WriteZeroes(v) => ("write_zeroes", first(v), ""),
            }
        }
        Parsed::Fail { reason, .. } => ("refused", 0, reason),
        Parsed::Drop { reason } => ("dropped", 0, reason),
    }
}

/// A virtio-blk status byte by name.
fn status_name(status: Option<u8>) -> &'static str {
    match status {
        Some(VIRTIO_BLK_S_OK) => "ok",
        Some(crate::blk::request::VIRTIO_BLK_S_IOERR) => "ioerr",
        Some(_) => "unsupp",
        None => "none",
    }
}

/// The span of the device a request changes (writes, write-zeroes and
/// discards; the span around all ranges of a multi-range one), in bytes.
fn written_span(p: &Parsed) -> Option<(u64, u64)> {
    let Parsed::Request(r) = p else { return None };
    let span = |v: &[crate::blk::request::Range]| {
        let start = v.iter().map(|r| r.sector).min()?;
        let end = v.iter().map(|r| r.sector + u64::from(r.sectors)).max()?;
        Some((start * 512, (end - start) * 512))
    };
    match &r.kind {
        RequestKind::Write => Some((r.sector * 512, r.data_len)),
        RequestKind::Discard(v) | RequestKind::WriteZeroes(v) => span(v),
        _ => None,
    }
}

/// Runs one request as a task on the thread's runtime, polled at once:
/// a request that needs no I/O (null, a failed parse) finishes here; one
/// that does has its I/O queued for the round's submit. Its used entry
/// waits in `Shared::done` for `signal`. The round's memory snapshot
/// comes in an `Rc` so each request clones it without an atomic
/// operation (one `Rc` allocation per round, not one atomic per request).
#[allow(clippy::redundant_allocation)]
fn spawn_request(
    w: &Worker,
    queue: usize,
    local: usize,
    (mem, node): (Rc<Arc<Memory>>, Rc<Arc<Node>>),
    head: u16,
    parsed: Parsed,
    start: Instant,
) {
    let (op, bytes) = classify(&parsed);
    let written = written_span(&parsed);
    let sh = w.shared.clone();
    // In flight from here until its `record` below.
    sh.dev.queue_stats(queue).start();
    if spindle_io::trace_on!(VHOST_SUBMIT) {
        let (name, offset, reason) = describe(&parsed);
        // A refused or dropped request says why.
        let reason = (!reason.is_empty()).then_some(reason);
        traced!(VHOST_SUBMIT, export = %sh.dev.cfg.name, queue, head, op = %name, offset, bytes, reason, "request");
    }
    // Only what the completion line needs, and only while it is on.
    let traced = spindle_io::trace_on!(VHOST_COMPLETE).then(|| describe(&parsed));
    let task = w.rt.spawn_now(async move {
        // Reads and writes (write-zeroes and discards count as writes of
        // their length, as QEMU's throttle filter counts them) pass the
        // export's throttle first; a drain (the gate held) lets them go.
        let dir = match op {
            Op::Read => Some(Direction::Read),
            Op::Write | Op::Discard | Op::WriteZeroes => Some(Direction::Write),
            _ => None,
        };
        let mut start = start;
        if let Some(dir) = dir {
            let gate = sh.dev.gate().clone();
            let waited = sh.dev.throttle(dir, bytes, &|| gate.is_held()).await;
            if !waited.is_zero() {
                sh.dev.queue_stats(queue).record_throttled(waited.as_nanos() as u64);
                // Latency is the device's: the throttled time is counted apart.
                start += waited;
            }
        }
        let ident = sh.dev.ident();
        let c = complete(&node, &mem, &ident, &sh.log, parsed).await;
        // After the I/O, failed or not (a failed write may have landed in
        // part): a live commit job copies the range again.
        if let Some((off, len)) = written {
            sh.dev.wrote(off, len);
        }
        let ok = c.status == Some(VIRTIO_BLK_S_OK);
        let ns = start.elapsed().as_nanos() as u64;
        sh.dev.queue_stats(queue).record(op, bytes, ok, ns);
        if let Some((name, offset, _)) = traced {
            traced!(VHOST_COMPLETE, export = %sh.dev.cfg.name, queue, head, op = %name, offset, bytes,
                status = %status_name(c.status), us = ns / 1000, "request done");
        }
        sh.done.borrow_mut()[local].push((head, c.used_len));
    });
    task.detach();
}

/// Puts each queue's finished chains on its used ring, under one vring
/// lock and one guest-memory load per queue, and signals the queue if
/// EVENT_IDX says the driver wants it. Returns how many queues had
/// entries.
fn signal(b: &BlkBackend, w: &Worker, vrings: &[VringRwLock]) -> usize {
    let mut n = 0;
    let mut done = w.shared.done.borrow_mut();
    for (i, list) in done.iter_mut().enumerate() {
        if list.is_empty() {
            continue;
        }
        n += 1;
        let queue = w.map.queue(w.thread, i);
        let mut broken: Option<Broken> = None;
        {
            let mem = b.mem.memory();
            let mut st = vrings[i].get_mut();
            let q = st.get_queue_mut();
            // A ring stopped by GET_VRING_BASE is no longer ready, but
            // its drain is waiting for these: they go on the used ring, or
            // the frontend would count them done (its base) and the guest
            // never see them. A queue reset after a drain gave up
            // (RESET_DEVICE) has no ring left (no addresses): its late
            // completions are dropped, not written to stale addresses.
            if q.ready() || q.avail_ring() != 0 {
                let mut publish = || {
                    let mut published = 0;
                    for &(head, len) in list.iter() {
                        // The frontend may have shrunk the queue since the pop.
                        let why = if head >= q.size() {
                            Broken::Head { head, size: q.size() }
                        } else if q.add_used(&*mem, head, len).is_err() {
                            Broken::Access("used ring")
                        } else {
                            published += 1;
                            continue;
                        };
                        broken = Some(why);
                        break;
                    }
                    (published, q.next_used())
                };
                match w.track.borrow()[i].as_ref() {
                    Some(t) => t.complete(&list[..], |e| e.0, publish),
                    None => drop(publish()),
                }
                // Marked once the entries and the index are written.
                if b.dirty.is_on() {
                    b.dirty.mark_used_ring(st.get_queue());
                }
                if let Some(why) = &broken {
                    stop(b, queue, &st, why);
                } else if st.get_queue_mut().needs_notification(&*mem).unwrap_or(true) {
                    let _ = st.signal_used_queue();
                    w.polling.interrupted();
                }
            } else {
                limited!(warn, device = %b.dev.cfg.name, queue, "dropped {} completions of a queue that was reset", list.len());
            }
        }
        b.requests.completed(queue, list.len());
        list.clear();
    }
    n
}
