//! Per-export request statistics.
//!
//! Every virtqueue has its own counters, written only by the I/O thread that
//! serves the queue (relaxed atomics, no lock, no shared cache line between
//! threads). A query sums the queues. Latency goes into a log-linear
//! histogram: 8 sub-buckets per power of two of nanoseconds, so a
//! percentile is within about 9% of the truth.

use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// The kinds of request counted separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Reads.
    Read = 0,
    /// Writes.
    Write = 1,
    /// Flushes.
    Flush = 2,
    /// Discards.
    Discard = 3,
    /// Write-zeroes.
    WriteZeroes = 4,
    /// GET_ID and failed requests.
    Other = 5,
}

const OPS: usize = 6;
const NAMES: [&str; OPS] = ["read", "write", "flush", "discard", "write_zeroes", "other"];
const SUB: usize = 8;
/// Buckets 0..8 hold 0..8 ns exactly; then 8 per power of two up to 2^63.
const BUCKETS: usize = 62 * SUB;

fn bucket(ns: u64) -> usize {
    if ns < SUB as u64 {
        return ns as usize;
    }
    let exp = 63 - ns.leading_zeros() as usize; // >= 3
    let sub = ((ns >> (exp - 3)) & (SUB as u64 - 1)) as usize;
    ((exp - 2) * SUB + sub).min(BUCKETS - 1)
}

/// The smallest latency that falls into bucket `b`.
fn bucket_floor(b: usize) -> u64 {
    if b < SUB {
        return b as u64;
    }
    let exp = b / SUB + 2;
    if exp >= 64 {
        return u64::MAX;
    }
    let sub = (b % SUB) as u64;
    (1u64 << exp) | (sub << (exp - 3))
}

#[repr(align(128))]
struct OpCounters {
    requests: AtomicU64,
    errors: AtomicU64,
    bytes: AtomicU64,
    hist: Box<[AtomicU64]>,
}

impl OpCounters {
    fn new() -> OpCounters {
        OpCounters {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            hist: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

/// Counters of one virtqueue.
pub struct QueueStats {
    ops: [OpCounters; OPS],
    /// Requests that waited for the throttle, and how long in all (ns):
    /// not part of their latency.
    throttled: AtomicU64,
    throttled_ns: AtomicU64,
}

impl Default for QueueStats {
    fn default() -> Self {
        QueueStats {
            ops: std::array::from_fn(|_| OpCounters::new()),
            throttled: AtomicU64::new(0),
            throttled_ns: AtomicU64::new(0),
        }
    }
}

impl QueueStats {
    /// Requests of every kind finished on this queue.
    pub fn requests(&self) -> u64 {
        self.ops.iter().map(|c| c.requests.load(Relaxed)).sum()
    }

    /// Counts one finished request. Only the queue's own I/O thread calls
    /// this, so each counter is bumped with a plain load and store rather
    /// than a locked read-modify-write (four fewer locked instructions per
    /// request); readers on other threads still see whole values.
    pub fn record(&self, op: Op, bytes: u64, ok: bool, latency_ns: u64) {
        let c = &self.ops[op as usize];
        bump(&c.requests, 1);
        if ok {
            bump(&c.bytes, bytes);
        } else {
            bump(&c.errors, 1);
        }
        bump(&c.hist[bucket(latency_ns)], 1);
    }
}

impl QueueStats {
    /// Counts a request that waited `ns` for the throttle (the queue's own
    /// I/O thread only, as [`QueueStats::record`]).
    pub fn record_throttled(&self, ns: u64) {
        bump(&self.throttled, 1);
        bump(&self.throttled_ns, ns);
    }
}

/// Requests that waited for the throttle, and the seconds they waited in
/// all, over `queues`.
pub fn throttled(queues: &[&QueueStats]) -> (u64, f64) {
    let n = queues.iter().map(|q| q.throttled.load(Relaxed)).sum();
    let ns: u64 = queues.iter().map(|q| q.throttled_ns.load(Relaxed)).sum();
    (n, ns as f64 / 1e9)
}

/// Adds `n` to a counter that has a single writer.
fn bump(c: &AtomicU64, n: u64) {
    c.store(c.load(Relaxed).wrapping_add(n), Relaxed);
}

/// Summed figures of one kind of request.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct OpSummary {
    /// Kind (`read`, `write`, ...).
    pub op: &'static str,
    /// Requests finished.
    pub requests: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Bytes moved by successful requests.
    pub bytes: u64,
    /// Median latency in microseconds.
    pub p50_us: f64,
    /// 99th percentile latency in microseconds.
    pub p99_us: f64,
    /// 99.9th percentile latency in microseconds.
    pub p999_us: f64,
}

/// Sums `queues` into one summary per kind of request that has been seen.
pub fn summarize(queues: &[&QueueStats]) -> Vec<OpSummary> {
    let mut out = Vec::new();
    for (i, name) in NAMES.iter().enumerate() {
        let mut hist = vec![0u64; BUCKETS];
        let (mut requests, mut errors, mut bytes) = (0, 0, 0);
        for q in queues {
            let c = &q.ops[i];
            requests += c.requests.load(Relaxed);
            errors += c.errors.load(Relaxed);
            bytes += c.bytes.load(Relaxed);
            for (h, a) in hist.iter_mut().zip(c.hist.iter()) {
                *h += a.load(Relaxed);
            }
        }
        if requests == 0 {
            continue;
        }
        let pct = |p: f64| percentile(&hist, p) as f64 / 1000.0;
        out.push(OpSummary {
            op: name,
            requests,
            errors,
            bytes,
            p50_us: pct(50.0),
            p99_us: pct(99.0),
            p999_us: pct(99.9),
        });
    }
    out
}

/// The latency in nanoseconds below which `p` percent of the samples fall
/// (the middle of the bucket that holds that sample).
pub fn percentile(hist: &[u64], p: f64) -> u64 {
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return 0;
    }
    let rank = ((p / 100.0) * total as f64).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (b, &n) in hist.iter().enumerate() {
        seen += n;
        if seen >= rank {
            let lo = bucket_floor(b);
            let hi = if b + 1 < hist.len() { bucket_floor(b + 1) } else { lo };
            return lo + (hi - lo) / 2;
        }
    }
    0
}

/// Records latencies into a plain (single-threaded) histogram, for
/// clients such as `spindle bench`.
#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Vec<u64>,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
        }
    }
}

impl Histogram {
    /// Adds one sample.
    pub fn add(&mut self, ns: u64) {
        self.counts[bucket(ns)] += 1;
    }
    /// Adds all of `other`'s samples.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
    }
    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
    /// See [`percentile`].
    pub fn percentile(&self, p: f64) -> u64 {
        percentile(&self.counts, p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for ns in [0u64, 1, 7, 8, 9, 15, 16, 100, 1000, 12_345, 1 << 40, u64::MAX] {
            let b = bucket(ns);
            assert!(b >= last, "{ns}");
            last = b;
            assert!(bucket_floor(b) <= ns, "{ns}: floor {}", bucket_floor(b));
            if b + 1 < BUCKETS {
                assert!(ns < bucket_floor(b + 1), "{ns}");
                assert!((bucket_floor(b + 1) - bucket_floor(b)) as f64 <= (ns as f64 / 8.0).max(1.0) + 1.0);
            }
        }
    }

    #[test]
    fn percentiles_of_a_known_distribution() {
        let q = [QueueStats::default(), QueueStats::default()];
        for i in 1..=1000u64 {
            q[(i % 2) as usize].record(Op::Read, 4096, true, i * 1000);
        }
        q[0].record(Op::Write, 512, false, 10);
        let s = summarize(&[&q[0], &q[1]]);
        assert_eq!(s.len(), 2);
        let r = &s[0];
        assert_eq!((r.op, r.requests, r.errors, r.bytes), ("read", 1000, 0, 4096 * 1000));
        assert!((r.p50_us - 500.0).abs() / 500.0 < 0.1, "{}", r.p50_us);
        assert!((r.p99_us - 990.0).abs() / 990.0 < 0.1, "{}", r.p99_us);
        assert_eq!((s[1].op, s[1].errors, s[1].bytes), ("write", 1, 0));
    }
}
