//! Starting a ring against the inflight buffer, and running again the
//! chains it had in flight (vhost-user inflight I/O tracking; the buffer
//! itself is `crate::inflight`).

use super::{fail, spawn_request, stop, Worker};
use crate::backend::BlkBackend;
use crate::blk::{parse, Parsed};
use crate::disk::VirtioDisk;
use crate::inflight::track::QueueTrack;
use crate::inflight::Region;
use crate::ring::{self, Broken};
use spindle_block::Node;
use spindle_export::ratelimit::limited;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;

/// Starts ring `queue` against the inflight buffer `region` (or without
/// one), before its first pop: the ring goes on after the chains the
/// buffer says are in flight, and those are resubmitted first. Waits
/// (tries again at the next pop) while requests of the ring's last run
/// are still in flight here. Returns false when the buffer does not fit
/// the ring: the device stops.
pub(super) fn start_ring(
    b: &BlkBackend,
    w: &Worker,
    queue: usize,
    local: usize,
    vring: &VringRwLock,
    region: Option<Arc<Region>>,
) -> bool {
    let Some(region) = region else {
        w.track.borrow_mut()[local] = None;
        return true;
    };
    if b.requests.count(Some(queue)) > 0 {
        b.tracking.defer_start(queue);
        return true;
    }
    let mem = b.mem.memory();
    let mut st = vring.get_mut();
    let q = st.get_queue_mut();
    let started = q
        .used_idx(&*mem, Ordering::Acquire)
        .map_err(|_| Broken::Access("used index"))
        .and_then(|used| {
            QueueTrack::start(region, queue, q.size(), used.0)
                .map(|t| (t, used.0))
                .map_err(|why| Broken::Inflight(why.to_string()))
        });
    match started {
        Ok((t, used)) => {
            let n = t.resubmit.len();
            // Every chain before `used + n` in the available ring was
            // taken: returned (the used index counts it) or in flight (the
            // buffer has it). The frontend's base cannot know that after
            // a crash (QEMU rewinds it to the used index).
            let next = used.wrapping_add(n as u16);
            if n > 0 || next != q.next_avail() {
                limited!(info, device = %b.dev.cfg.name, queue, resubmitted = n, "ring started from the inflight buffer: {n} requests in flight before are resubmitted; the ring goes on at {next} (the frontend said {})", q.next_avail());
            }
            q.set_next_avail(next);
            w.track.borrow_mut()[local] = Some(t);
            true
        }
        Err(why) => {
            w.track.borrow_mut()[local] = None;
            stop(b, queue, &st, &why);
            b.tracking.defer_start(queue);
            false
        }
    }
}

/// Runs again the chains of queue `local` the inflight buffer had in
/// flight when the ring started, oldest first, before any new one.
/// Returns how many, or `None` when one is broken (the device stops).
#[allow(clippy::redundant_allocation)]
pub(super) fn resubmit(
    b: &BlkBackend,
    w: &Worker,
    queue: usize,
    local: usize,
    vring: &VringRwLock,
    node: &Rc<Arc<Node>>,
) -> Option<usize> {
    let heads: Vec<u16> = match w.track.borrow_mut()[local].as_mut() {
        Some(t) if !t.resubmit.is_empty() => t.resubmit.drain(..).collect(),
        _ => return Some(0),
    };
    let limits = b.dev.limits();
    let mem = Rc::new(b.mem.memory().into_inner());
    let start = Instant::now();
    for (n, &head) in heads.iter().enumerate() {
        let chain = match ring::chain_at(vring.get_ref().get_queue(), &**mem, head) {
            Ok(c) => c,
            Err(why) => {
                fail(b, queue, vring, &why);
                return if n == 0 { None } else { Some(n) };
            }
        };
        let parsed = parse(chain, &**mem, &limits);
        if let Parsed::Fail { reason, .. } | Parsed::Drop { reason } = &parsed {
            limited!(warn, device = %b.dev.cfg.name, queue, "refused resubmitted request {head}: {reason}");
        }
        spawn_request(w, queue, local, (mem.clone(), node.clone()), head, parsed, start);
        w.rt.submit_queued();
    }
    Some(heads.len())
}
