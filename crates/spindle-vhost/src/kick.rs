//! Holding the driver's kicks while an I/O thread is awake.

use std::sync::atomic::Ordering;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// Offset of `avail_event` in a used ring of `size` entries: it follows the
/// ring's flags and index (2 bytes each) and its `size` 8-byte elements.
fn avail_event_offset(size: u16) -> u64 {
    4 + 8 * u64::from(size)
}

/// Asks the driver not to kick `q` until notifications are enabled again
/// (`enable_notification`). With EVENT_IDX the driver kicks only when its
/// avail index passes `avail_event`, so pointing that one just behind the
/// next index to pop holds kicks for a whole lap of the index space;
/// virtio-queue's `disable_notification` leaves `avail_event` alone, since
/// it is normally passed once already. Without EVENT_IDX, NO_NOTIFY is set.
pub(crate) fn hold_kicks<M: GuestMemory>(mem: &M, q: &mut Queue) {
    if !q.event_idx_enabled() {
        let _ = q.disable_notification(mem);
        return;
    }
    let Some(at) = q.used_ring().checked_add(avail_event_offset(q.size())) else {
        return;
    };
    let behind = q.next_avail().wrapping_sub(1);
    // A ring outside guest memory fails here and is refused when popped.
    let _ = mem.store(behind.to_le(), GuestAddress(at), Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    /// The driver's rule (virtio 1.1, 2.6.10.2): kick when the new avail
    /// index passed `avail_event` while going from `old` to `new`.
    fn driver_kicks(mem: &GuestMemoryMmap, q: &Queue, old: u16, new: u16) -> bool {
        let at = GuestAddress(q.used_ring() + avail_event_offset(q.size()));
        let event = u16::from_le(mem.read_obj::<u16>(at).unwrap());
        new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
    }

    #[test]
    fn held_kicks_stay_held_until_notifications_are_enabled() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mock = MockSplitQueue::new(&mem, 16);
        let mut q: Queue = mock.create_queue().unwrap();
        q.set_event_idx(true);
        for next in [0u16, 5, u16::MAX] {
            q.set_next_avail(next);
            q.enable_notification(&mem).unwrap();
            assert!(driver_kicks(&mem, &q, next, next.wrapping_add(1)), "enabled at {next}");
            hold_kicks(&mem, &mut q);
            for added in [1u16, 3, 16] {
                assert!(
                    !driver_kicks(&mem, &q, next, next.wrapping_add(added)),
                    "held at {next} +{added}"
                );
            }
            q.enable_notification(&mem).unwrap();
            assert!(
                driver_kicks(&mem, &q, next, next.wrapping_add(1)),
                "enabled again at {next}"
            );
        }
    }

    #[test]
    fn without_event_idx_the_no_notify_flag_holds_kicks() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mock = MockSplitQueue::new(&mem, 16);
        let mut q: Queue = mock.create_queue().unwrap();
        let used = GuestAddress(q.used_ring());
        let flags = |mem: &GuestMemoryMmap| mem.read_obj::<u16>(used).unwrap();
        q.enable_notification(&mem).unwrap();
        assert_eq!(flags(&mem), 0);
        hold_kicks(&mem, &mut q);
        assert_eq!(
            u32::from(flags(&mem)),
            virtio_bindings::bindings::virtio_ring::VRING_USED_F_NO_NOTIFY
        );
    }
}
