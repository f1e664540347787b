//! How an open qcow2 image's metadata caches and allocator are doing,
//! for `spindle ctl stats` and the metrics endpoint.
//!
//! Counters under the metadata lock are plain relaxed atomics (the lock
//! already serializes their writers). The per-thread L2 entry cache
//! (`tlb.rs`) is hit without any lock, on every I/O thread at once: its
//! counts go to one of a few cache-line-sized shards by thread, and each
//! lookup of a request adds its clusters with one relaxed add, so
//! threads do not share a line.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

const SHARDS: usize = 8;

#[repr(align(128))]
#[derive(Default)]
struct Shard {
    hits: AtomicU64,
    misses: AtomicU64,
}

thread_local! {
    static SHARD: Cell<Option<usize>> = const { Cell::new(None) };
}

static NEXT_SHARD: AtomicU64 = AtomicU64::new(0);

/// This thread's shard (threads take them in turn).
fn shard() -> usize {
    SHARD.with(|s| {
        s.get().unwrap_or_else(|| {
            let i = (NEXT_SHARD.fetch_add(1, Relaxed) as usize) % SHARDS;
            s.set(Some(i));
            i
        })
    })
}

/// The counters of one open image.
#[derive(Default)]
pub(crate) struct Counters {
    thread: [Shard; SHARDS],
    l2_hits: AtomicU64,
    l2_misses: AtomicU64,
    refcount_hits: AtomicU64,
    refcount_misses: AtomicU64,
    allocations: AtomicU64,
    allocated_clusters: AtomicU64,
}

impl Counters {
    /// A request's mapping was looked up in this thread's L2 entry cache:
    /// `hits` clusters found there, and whether it then had to take the
    /// metadata lock (a miss).
    pub(crate) fn thread_lookup(&self, hits: u64, missed: bool) {
        let s = &self.thread[shard()];
        if hits > 0 {
            s.hits.fetch_add(hits, Relaxed);
        }
        if missed {
            s.misses.fetch_add(1, Relaxed);
        }
    }

    /// An L2 slice was found in the cache (`true`) or read from the image.
    pub(crate) fn l2(&self, hit: bool) {
        let c = if hit { &self.l2_hits } else { &self.l2_misses };
        c.fetch_add(1, Relaxed);
    }

    /// A refcount block was found in the cache (`true`) or read.
    pub(crate) fn refcount(&self, hit: bool) {
        let c = if hit {
            &self.refcount_hits
        } else {
            &self.refcount_misses
        };
        c.fetch_add(1, Relaxed);
    }

    /// A run of `clusters` host clusters was allocated.
    pub(crate) fn allocated(&self, clusters: u64) {
        self.allocations.fetch_add(1, Relaxed);
        self.allocated_clusters.fetch_add(clusters, Relaxed);
    }

    /// The counters now; `cluster_size` turns clusters into bytes.
    pub(crate) fn snapshot(&self, cluster_size: u64) -> Qcow2Counters {
        let sum = |f: fn(&Shard) -> &AtomicU64| self.thread.iter().map(|s| f(s).load(Relaxed)).sum();
        Qcow2Counters {
            thread_cache_hits: sum(|s| &s.hits),
            thread_cache_misses: sum(|s| &s.misses),
            l2_cache_hits: self.l2_hits.load(Relaxed),
            l2_cache_misses: self.l2_misses.load(Relaxed),
            refcount_cache_hits: self.refcount_hits.load(Relaxed),
            refcount_cache_misses: self.refcount_misses.load(Relaxed),
            allocations: self.allocations.load(Relaxed),
            allocated_bytes: self.allocated_clusters.load(Relaxed).saturating_mul(cluster_size),
        }
    }
}

/// What an open qcow2 image's metadata caches and allocator did since it
/// was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Qcow2Counters {
    /// Guest clusters whose mapping an I/O thread's own L2 entry cache
    /// held (no metadata lock taken).
    pub thread_cache_hits: u64,
    /// Requests whose mapping that cache did not hold wholly, which then
    /// took the metadata lock.
    pub thread_cache_misses: u64,
    /// L2 table slices found in the image's L2 cache.
    pub l2_cache_hits: u64,
    /// L2 table slices read from the image (QEMU's `l2-cache-size`
    /// decides how many fit).
    pub l2_cache_misses: u64,
    /// Refcount blocks found in the refcount cache.
    pub refcount_cache_hits: u64,
    /// Refcount blocks read from the image.
    pub refcount_cache_misses: u64,
    /// Runs of host clusters allocated (data, L2 tables, refcount
    /// blocks, tables).
    pub allocations: u64,
    /// Bytes of the host clusters allocated.
    pub allocated_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_count_into_their_shards_and_the_sum_is_whole() {
        let c = std::sync::Arc::new(Counters::default());
        let threads: Vec<_> = (0..12)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        c.thread_lookup(3, false);
                        c.thread_lookup(1, true);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        c.l2(true);
        c.l2(false);
        c.l2(false);
        c.refcount(true);
        c.allocated(4);
        c.allocated(1);
        let s = c.snapshot(65536);
        assert_eq!((s.thread_cache_hits, s.thread_cache_misses), (48_000, 12_000));
        assert_eq!((s.l2_cache_hits, s.l2_cache_misses), (1, 2));
        assert_eq!((s.refcount_cache_hits, s.refcount_cache_misses), (1, 0));
        assert_eq!((s.allocations, s.allocated_bytes), (2, 5 * 65536));
    }
}
