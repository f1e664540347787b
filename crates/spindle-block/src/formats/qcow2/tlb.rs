//! A per-thread cache of L2 entries, so reads that hit it map guest
//! clusters without taking the image's metadata lock.
//!
//! Each open image has an id and a generation. Every metadata-lock
//! acquisition that may change the mapping (anything but a lookup) bumps
//! the generation before it changes anything; entries are filled under
//! the lock with the generation read there. A lookup that finds a
//! different generation drops that image's entries. So an entry is used
//! only while no mapping change has started since it was read, which is
//! what a lookup under the lock would have returned at that moment.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// Entries kept per image per thread before the cache starts over.
const MAX_ENTRIES: usize = 1 << 15;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A fresh image id (never reused in the process).
pub fn new_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

#[derive(Default)]
struct ImageEntries {
    gen: u64,
    entries: HashMap<u64, (u64, u64)>,
}

thread_local! {
    static TLB: RefCell<HashMap<u64, ImageEntries>> = RefCell::new(HashMap::new());
}

/// Runs `f` on the entries of image `id` valid at generation `gen`.
fn with<R>(id: u64, gen: u64, f: impl FnOnce(&mut HashMap<u64, (u64, u64)>) -> R) -> R {
    TLB.with(|t| {
        let mut t = t.borrow_mut();
        let img = t.entry(id).or_default();
        if img.gen != gen {
            img.entries.clear();
            img.gen = gen;
        }
        f(&mut img.entries)
    })
}

/// The cached L2 entry (and extended bitmap) of guest cluster `gc`.
pub fn get(id: u64, gen: u64, gc: u64) -> Option<(u64, u64)> {
    with(id, gen, |e| e.get(&gc).copied())
}

/// Remembers an entry read under the metadata lock at generation `gen`.
pub fn put(id: u64, gen: u64, gc: u64, entry: (u64, u64)) {
    with(id, gen, |e| {
        if e.len() >= MAX_ENTRIES {
            e.clear();
        }
        e.insert(gc, entry);
    })
}

/// Forgets image `id` on this thread (it is being closed).
pub fn forget(id: u64) {
    let _ = TLB.try_with(|t| t.borrow_mut().remove(&id));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_generation_drops_old_entries() {
        let id = new_id();
        put(id, 1, 7, (0x1000, 0));
        assert_eq!(get(id, 1, 7), Some((0x1000, 0)));
        assert_eq!(get(id, 2, 7), None);
        assert_eq!(get(id, 1, 7), None, "entries of the old generation are gone");
        let other = new_id();
        put(other, 2, 7, (0x2000, 0));
        put(id, 2, 7, (0x3000, 0));
        assert_eq!(get(other, 2, 7), Some((0x2000, 0)));
        forget(id);
        assert_eq!(get(id, 2, 7), None);
    }
}
