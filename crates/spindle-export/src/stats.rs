//! Per-export request statistics.
//!
//! Every virtqueue has its own counters, written only by the I/O thread that
//! serves the queue (relaxed atomics, no lock, no shared cache line between
//! threads). A query sums the queues. Latency goes into a log-linear
//! histogram: 8 sub-buckets per power of two of nanoseconds, so a
//! percentile is within about 9% of the truth. The same counters feed
//! `spindle ctl stats` and the Prometheus endpoint ([`QueueSnapshot`],
//! [`Latency`]): one source for both.

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

/// Kinds of request.
pub const OPS: usize = 6;
/// The name of each kind, by [`Op`] value.
pub const NAMES: [&str; OPS] = ["read", "write", "flush", "discard", "write_zeroes", "other"];

impl Op {
    /// Every kind, in [`NAMES`]' order.
    pub const ALL: [Op; OPS] = [Op::Read, Op::Write, Op::Flush, Op::Discard, Op::WriteZeroes, Op::Other];

    /// Its name (`read`, `write_zeroes`, ...).
    pub fn name(self) -> &'static str {
        NAMES[self as usize]
    }
}
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
    /// Latencies of every request, summed (ns).
    time_ns: AtomicU64,
    hist: Box<[AtomicU64]>,
}

impl OpCounters {
    fn new() -> OpCounters {
        OpCounters {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            time_ns: AtomicU64::new(0),
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
    /// Requests accepted ([`QueueStats::start`]); those not yet recorded
    /// are in flight. Its own line: the owning thread writes it on the
    /// way in, the op counters on the way out.
    started: Padded,
}

#[repr(align(128))]
#[derive(Default)]
struct Padded(AtomicU64);

impl Default for QueueStats {
    fn default() -> Self {
        QueueStats {
            ops: std::array::from_fn(|_| OpCounters::new()),
            throttled: AtomicU64::new(0),
            throttled_ns: AtomicU64::new(0),
            started: Padded::default(),
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
        bump(&c.time_ns, latency_ns);
        bump(&c.hist[bucket(latency_ns)], 1);
    }

    /// Counts a request accepted (the queue's own I/O thread only): it is
    /// in flight until its [`QueueStats::record`].
    pub fn start(&self) {
        bump(&self.started.0, 1);
    }

    /// Requests accepted and not yet recorded.
    pub fn in_flight(&self) -> u64 {
        // Finished first: the writer bumps `started` before the request's
        // counters, so this never reads more finished than started.
        let finished = self.requests();
        self.started.0.load(Relaxed).saturating_sub(finished)
    }

    /// The counters now.
    pub fn snapshot(&self) -> QueueSnapshot {
        let op = |o: Op| {
            let c = &self.ops[o as usize];
            OpCounts {
                requests: c.requests.load(Relaxed),
                errors: c.errors.load(Relaxed),
                bytes: c.bytes.load(Relaxed),
                time_ns: c.time_ns.load(Relaxed),
            }
        };
        QueueSnapshot {
            in_flight: self.in_flight(),
            read: op(Op::Read),
            write: op(Op::Write),
            flush: op(Op::Flush),
            discard: op(Op::Discard),
            write_zeroes: op(Op::WriteZeroes),
            other: op(Op::Other),
            throttled_requests: self.throttled.load(Relaxed),
            throttled_ns: self.throttled_ns.load(Relaxed),
        }
    }
}

/// One kind of request's counters on a queue.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct OpCounts {
    /// Requests finished (failed ones too).
    pub requests: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Bytes of the requests that succeeded.
    pub bytes: u64,
    /// Their latencies summed, in nanoseconds (throttled time excluded).
    pub time_ns: u64,
}

/// A queue's (or a lane's) counters as read at one moment.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct QueueSnapshot {
    /// Requests accepted and not finished.
    pub in_flight: u64,
    /// Reads.
    pub read: OpCounts,
    /// Writes.
    pub write: OpCounts,
    /// Flushes.
    pub flush: OpCounts,
    /// Discards.
    pub discard: OpCounts,
    /// Write-zeroes.
    pub write_zeroes: OpCounts,
    /// GET_ID, and requests refused before they reached the image.
    pub other: OpCounts,
    /// Requests that waited for the throttle.
    pub throttled_requests: u64,
    /// How long they waited in all (ns).
    pub throttled_ns: u64,
}

impl QueueSnapshot {
    /// The counters of `op`.
    pub fn op(&self, op: Op) -> &OpCounts {
        match op {
            Op::Read => &self.read,
            Op::Write => &self.write,
            Op::Flush => &self.flush,
            Op::Discard => &self.discard,
            Op::WriteZeroes => &self.write_zeroes,
            Op::Other => &self.other,
        }
    }
}

/// Upper bounds of the latency histogram the metrics endpoint exports, in
/// nanoseconds: powers of two from 256 ns to 2^35 ns (34 s). Each is a
/// bucket boundary of the log-linear histogram, so the exported counts
/// are exact: a bound's count is the requests faster than it (a request
/// of exactly a bound's nanoseconds counts in the next bucket).
pub const LATENCY_BOUNDS_NS: [u64; 28] = {
    let mut b = [0u64; 28];
    let mut i = 0;
    while i < 28 {
        b[i] = 1 << (8 + i);
        i += 1;
    }
    b
};

/// The latencies of one kind of request, summed over queues: a
/// Prometheus histogram.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Latency {
    /// Kind (`read`, `write`, ...).
    pub op: &'static str,
    /// Requests.
    pub count: u64,
    /// Their latencies summed (ns).
    pub sum_ns: u64,
    /// Cumulative counts below each of [`LATENCY_BOUNDS_NS`].
    pub buckets: Vec<u64>,
}

/// The latency histogram of each kind of request over `queues`.
pub fn latencies(queues: &[&QueueStats]) -> Vec<Latency> {
    Op::ALL
        .iter()
        .map(|&op| {
            let mut hist = vec![0u64; BUCKETS];
            let mut sum_ns = 0;
            for q in queues {
                let c = &q.ops[op as usize];
                sum_ns += c.time_ns.load(Relaxed);
                for (h, a) in hist.iter_mut().zip(c.hist.iter()) {
                    *h += a.load(Relaxed);
                }
            }
            let mut buckets = Vec::with_capacity(LATENCY_BOUNDS_NS.len());
            let (mut seen, mut b) = (0u64, 0usize);
            for &bound in &LATENCY_BOUNDS_NS {
                // Buckets wholly below the bound (their ends are bounds too).
                while b < BUCKETS && bucket_floor(b + 1) <= bound {
                    seen += hist[b];
                    b += 1;
                }
                buckets.push(seen);
            }
            // The count is the buckets' own total, so +Inf matches them
            // even while requests finish during the reading.
            let count = hist.iter().sum();
            Latency {
                op: op.name(),
                count,
                sum_ns,
                buckets,
            }
        })
        .collect()
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

    #[test]
    fn exported_buckets_are_exact_counts_below_each_bound() {
        let q = QueueStats::default();
        // One request per power of two from 1 ns to 2^40 ns, one just
        // below each, and a failed one.
        for k in 0..=40u32 {
            q.start();
            q.record(Op::Read, 512, true, 1 << k);
            q.start();
            q.record(Op::Read, 512, true, (1u64 << k).saturating_sub(1));
        }
        q.start();
        q.start();
        q.record(Op::Flush, 0, false, 3000);
        let snap = q.snapshot();
        assert_eq!(snap.in_flight, 1);
        assert_eq!(snap.read.requests, 82);
        assert_eq!(snap.read.bytes, 82 * 512);
        assert_eq!(
            (snap.flush.requests, snap.flush.errors, snap.flush.time_ns),
            (1, 1, 3000)
        );
        let sum: u64 = (0..=40u32).map(|k| (1u64 << k) + (1u64 << k) - 1).sum();
        assert_eq!(snap.read.time_ns, sum);
        let l = latencies(&[&q]);
        assert_eq!(l.len(), OPS);
        let r = &l[Op::Read as usize];
        assert_eq!((r.op, r.count, r.sum_ns), ("read", 82, sum));
        for (i, &bound) in LATENCY_BOUNDS_NS.iter().enumerate() {
            // Samples below 2^k: both of every smaller power, and 2^k - 1.
            let k = bound.trailing_zeros() as u64;
            assert_eq!(r.buckets[i], 2 * k + 1, "below {bound} ns");
        }
        let f = &l[Op::Flush as usize];
        assert_eq!(
            (f.count, f.buckets[3], f.buckets[4]),
            (1, 0, 1),
            "3000 ns lies in [2048, 4096)"
        );
    }
}
