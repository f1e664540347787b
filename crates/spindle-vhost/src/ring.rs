//! What a ring must be before its chains are popped, and the ways a
//! driver can break it.
//!
//! virtio-queue pops chains but reports a broken ring only as "no chain"
//! (and a line in the log for each try). Here every way a ring can be
//! broken is an error the caller acts on once: the device stops serving
//! (`backend::Failure`) until the frontend resets it. A broken chain is
//! not a broken ring: `blk::request::parse` fails that request alone.

use std::fmt;
use std::num::Wrapping;
use std::ops::Deref;
use std::sync::atomic::Ordering;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryBackend};

/// Bytes of each part of a split ring of `size` entries (virtio 1.2,
/// 2.7): descriptor table, available ring, used ring (each with its
/// event field).
pub fn part_sizes(size: u16) -> [u64; 3] {
    let n = u64::from(size);
    [16 * n, 6 + 2 * n, 6 + 8 * n]
}

/// Why a ring cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Broken {
    /// A part of the ring does not lie in guest memory.
    Outside {
        /// "descriptor table", "available ring" or "used ring".
        part: &'static str,
        /// Its guest address.
        addr: u64,
        /// Its length.
        len: u64,
    },
    /// The driver published more chains than the queue has entries.
    AvailIndex {
        /// The driver's available index.
        idx: u16,
        /// The next index the device pops.
        next: u16,
        /// Queue size.
        size: u16,
    },
    /// A chain's head is not a descriptor of the queue.
    Head {
        /// The head index the driver published.
        head: u16,
        /// Queue size.
        size: u16,
    },
    /// The ring could not be read or written where it must be.
    Access(&'static str),
    /// The available ring is at 0: the queue was never given addresses.
    Unset,
    /// The driver published a chain that is still in flight.
    Twice {
        /// Its head.
        head: u16,
    },
    /// The inflight buffer does not fit the ring set up
    /// (`inflight::Refused`, as text).
    Inflight(String),
}

impl fmt::Display for Broken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Broken::Outside { part, addr, len } => {
                write!(f, "its {part} ({len} bytes at {addr:#x}) is outside guest memory")
            }
            Broken::AvailIndex { idx, next, size } => write!(
                f,
                "available index {idx} is {} entries past the next one ({next}) on a queue of {size}",
                idx.wrapping_sub(*next)
            ),
            Broken::Head { head, size } => write!(f, "chain head {head} is not below the queue size {size}"),
            Broken::Access(what) => write!(f, "cannot access its {what}"),
            Broken::Unset => write!(f, "it was never given addresses (available ring at 0)"),
            Broken::Twice { head } => write!(f, "chain head {head} was published again while in flight"),
            Broken::Inflight(why) => write!(f, "its inflight buffer cannot be used: {why}"),
        }
    }
}

/// What a ring's validity depends on besides the driver's writes: its
/// size and addresses, and the guest memory map. A ring checked once is
/// checked again only when one of these changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setup {
    size: u16,
    parts: [u64; 3],
    /// Which guest memory map (counted up on each change of the map).
    mem: u64,
}

impl Setup {
    /// The setup of `q` in guest memory map number `mem`.
    pub fn of(q: &Queue, mem: u64) -> Setup {
        Setup {
            size: q.size(),
            parts: [q.desc_table(), q.avail_ring(), q.used_ring()],
            mem,
        }
    }
}

/// Checks that every part of `q`'s ring lies in guest memory.
pub fn check<M: GuestMemoryBackend + ?Sized>(q: &Queue, mem: &M) -> Result<(), Broken> {
    let parts = [q.desc_table(), q.avail_ring(), q.used_ring()];
    let names = ["descriptor table", "available ring", "used ring"];
    for ((addr, len), part) in parts.into_iter().zip(part_sizes(q.size())).zip(names) {
        if addr == 0 && part == "available ring" {
            // virtio-queue refuses to pop from it: a queue never set up.
            return Err(Broken::Unset);
        }
        if !mem.check_range(GuestAddress(addr), len as usize) {
            return Err(Broken::Outside { part, addr, len });
        }
    }
    Ok(())
}

/// Chains the driver has published and the device has not popped.
pub fn pending<M: GuestMemory + ?Sized>(q: &Queue, mem: &M) -> Result<u16, Broken> {
    let idx = q
        .avail_idx(mem, Ordering::Acquire)
        .map_err(|_| Broken::Access("available index"))?;
    let n = (idx - Wrapping(q.next_avail())).0;
    if n > q.size() {
        return Err(Broken::AvailIndex {
            idx: idx.0,
            next: q.next_avail(),
            size: q.size(),
        });
    }
    Ok(n)
}

/// Pops the next chain, which the caller knows was published (`pending`
/// said so). Its head is a descriptor of the queue.
pub fn pop<M>(q: &mut Queue, mem: M) -> Result<DescriptorChain<M>, Broken>
where
    M: Clone + Deref,
    M::Target: GuestMemory,
{
    let size = q.size();
    let chain = match q.iter(mem.clone()) {
        Ok(mut it) => it.next(),
        // The index moved since `pending` (or the ring was never set up).
        Err(_) => return Err(pending(q, &*mem).err().unwrap_or(Broken::Unset)),
    };
    // No chain where one was published: the entry cannot be read, or the
    // driver moved its index back.
    let chain = chain.ok_or(Broken::Access("available ring entries"))?;
    if chain.head_index() >= size {
        return Err(Broken::Head {
            head: chain.head_index(),
            size,
        });
    }
    Ok(chain)
}

/// The chain at `head` again (resubmitted from the inflight buffer after
/// the ring started), validated like a popped one.
pub fn chain_at<M>(q: &Queue, mem: M, head: u16) -> Result<DescriptorChain<M>, Broken>
where
    M: Deref,
    M::Target: GuestMemory,
{
    if head >= q.size() {
        return Err(Broken::Head { head, size: q.size() });
    }
    Ok(DescriptorChain::new(mem, GuestAddress(q.desc_table()), q.size(), head))
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestMemoryMmap};

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    #[test]
    fn a_ring_in_memory_passes_and_one_past_the_end_does_not() {
        let m = mem();
        let mock = MockSplitQueue::new(&m, 16);
        let mut q: Queue = mock.create_queue().unwrap();
        assert_eq!(check(&q, &m), Ok(()));
        // The used ring starts in memory and ends past it.
        q.try_set_used_ring_address(GuestAddress(0x10000 - 8)).unwrap();
        assert!(matches!(check(&q, &m), Err(Broken::Outside { part: "used ring", .. })));
        q.try_set_used_ring_address(GuestAddress(0x20000)).unwrap();
        assert!(matches!(check(&q, &m), Err(Broken::Outside { .. })));
    }

    #[test]
    fn an_avail_index_past_the_queue_size_is_broken() {
        let m = mem();
        let mock = MockSplitQueue::new(&m, 64);
        let mut q: Queue = mock.create_queue().unwrap();
        assert_eq!(pending(&q, &m), Ok(0));
        mock.avail().idx().store(1000u16.to_le());
        let e = pending(&q, &m).unwrap_err();
        assert_eq!(
            e,
            Broken::AvailIndex {
                idx: 1000,
                next: 0,
                size: 64
            }
        );
        assert_eq!(
            e.to_string(),
            "available index 1000 is 1000 entries past the next one (0) on a queue of 64"
        );
        // Wrapping: next at 65530, index at 4 is 10 ahead.
        q.set_next_avail(65530);
        mock.avail().idx().store(4u16.to_le());
        assert_eq!(pending(&q, &m), Ok(10));
    }

    #[test]
    fn heads_outside_the_table_are_broken_and_good_ones_pop() {
        let m = mem();
        let mock = MockSplitQueue::new(&m, 16);
        let mut q: Queue = mock.create_queue().unwrap();
        let d = RawDescriptor::from(Descriptor::new(0x8000, 16, 0, 0));
        mock.add_desc_chains(&[d], 0).unwrap();
        assert_eq!(pending(&q, &m), Ok(1));
        assert_eq!(pop(&mut q, &m).unwrap().head_index(), 0);
        // Publish head 16 on a queue of 16.
        let ring = GuestAddress(q.avail_ring() + 4 + 2);
        m.write_obj(16u16.to_le(), ring).unwrap();
        mock.avail().idx().store(2u16.to_le());
        assert_eq!(pending(&q, &m), Ok(1));
        assert_eq!(pop(&mut q, &m).unwrap_err(), Broken::Head { head: 16, size: 16 });
    }

    #[test]
    fn a_chain_is_built_again_from_its_head() {
        let m = mem();
        let mock = MockSplitQueue::new(&m, 16);
        let mut q: Queue = mock.create_queue().unwrap();
        let d = [
            RawDescriptor::from(Descriptor::new(
                0x8000,
                16,
                virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT as u16,
                1,
            )),
            RawDescriptor::from(Descriptor::new(
                0x9000,
                1,
                virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE as u16,
                0,
            )),
        ];
        mock.add_desc_chains(&d, 0).unwrap();
        let popped: Vec<_> = pop(&mut q, &m).unwrap().map(|d| (d.addr(), d.len())).collect();
        let again: Vec<_> = chain_at(&q, &m, 0).unwrap().map(|d| (d.addr(), d.len())).collect();
        assert_eq!(popped, again);
        assert_eq!(popped.len(), 2);
        assert_eq!(chain_at(&q, &m, 16).unwrap_err(), Broken::Head { head: 16, size: 16 });
    }
}
