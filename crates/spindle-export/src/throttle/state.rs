//! The leaky buckets' arithmetic, as QEMU's `util/throttle.c` does it:
//! each admitted request adds its bytes and operations to the buckets of
//! its direction (and the totals); buckets leak at their average rate
//! (and the burst level at the burst rate) as time passes; a request
//! waits while a bucket is over its size: `avg / 10` without a burst
//! rate, `max × max-length` with one, and the burst level over `max / 10`.
//! Time is passed in (nanoseconds on any monotonic clock), so the
//! arithmetic is tested against the formulas without sleeping.

use super::config::{Kind, Limits};

/// A request's direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Reads.
    Read = 0,
    /// Writes (and write-zeroes, discards: QEMU's throttle filter counts
    /// them as writes of their length).
    Write = 1,
}

const NS: f64 = 1e9;

/// The buckets' levels.
#[derive(Debug, Clone)]
pub struct State {
    limits: Limits,
    level: [f64; 6],
    burst_level: [f64; 6],
    previous_leak: u64,
}

impl State {
    /// Empty buckets at time `now`.
    pub fn new(limits: Limits, now: u64) -> State {
        State {
            limits,
            level: [0.0; 6],
            burst_level: [0.0; 6],
            previous_leak: now,
        }
    }

    /// The limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// New limits, with empty buckets (as QEMU's `throttle_config`).
    pub fn configure(&mut self, limits: Limits, now: u64) {
        *self = State::new(limits, now);
    }

    fn leak(&mut self, now: u64) {
        let delta = now.saturating_sub(self.previous_leak);
        self.previous_leak = self.previous_leak.max(now);
        if delta == 0 {
            return;
        }
        for k in Kind::ALL {
            let b = self.limits.bucket(k);
            let i = k.index();
            self.level[i] = (self.level[i] - b.avg as f64 * delta as f64 / NS).max(0.0);
            if b.burst_length > 1 {
                self.burst_level[i] = (self.burst_level[i] - b.max as f64 * delta as f64 / NS).max(0.0);
            }
        }
    }

    fn bucket_wait(&self, k: Kind) -> u64 {
        let b = self.limits.bucket(k);
        if b.avg == 0 {
            return 0;
        }
        let i = k.index();
        let (size, burst_size) = if b.max == 0 {
            (b.avg as f64 / 10.0, 0.0)
        } else {
            ((b.max * b.burst_length) as f64, b.max as f64 / 10.0)
        };
        let extra = self.level[i] - size;
        if extra > 0.0 {
            return (extra * NS / b.avg as f64) as u64;
        }
        if b.burst_length > 1 {
            let extra = self.burst_level[i] - burst_size;
            if extra > 0.0 {
                return (extra * NS / b.max as f64) as u64;
            }
        }
        0
    }

    fn kinds(dir: Direction) -> [Kind; 4] {
        match dir {
            Direction::Read => [Kind::BpsTotal, Kind::OpsTotal, Kind::BpsRead, Kind::OpsRead],
            Direction::Write => [Kind::BpsTotal, Kind::OpsTotal, Kind::BpsWrite, Kind::OpsWrite],
        }
    }

    /// How long (ns) a request in `dir` must wait from `now`; 0: it may go.
    pub fn wait(&mut self, dir: Direction, now: u64) -> u64 {
        self.leak(now);
        State::kinds(dir)
            .iter()
            .map(|&k| self.bucket_wait(k))
            .max()
            .unwrap_or(0)
    }

    /// Accounts an admitted request of `bytes`.
    pub fn account(&mut self, dir: Direction, bytes: u64) {
        let op = self.limits.iops_size;
        let units = if op != 0 && bytes > op {
            bytes as f64 / op as f64
        } else {
            1.0
        };
        let [bt, ot, bd, od] = State::kinds(dir);
        for (k, n) in [(bt, bytes as f64), (bd, bytes as f64), (ot, units), (od, units)] {
            let i = k.index();
            self.level[i] += n;
            if self.limits.bucket(k).burst_length > 1 {
                self.burst_level[i] += n;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    /// Requests admitted in `secs` seconds when a client always has one
    /// waiting, on the simulated clock.
    fn admitted(limits: &str, secs: u64, bytes: u64, dir: Direction) -> Vec<u64> {
        let mut s = State::new(Limits::parse(limits).unwrap(), 0);
        let mut now = 0;
        let mut at = Vec::new();
        while now < secs * SEC {
            let w = s.wait(dir, now);
            if w == 0 {
                s.account(dir, bytes);
                at.push(now);
            } else {
                now += w;
            }
        }
        at
    }

    #[test]
    fn the_average_rate_holds_for_every_kind_of_limit() {
        for (limits, bytes, dir, per_sec) in [
            ("iops-total=100", 4096, Direction::Read, 100.0),
            ("iops-read=250", 4096, Direction::Read, 250.0),
            ("iops-write=50", 4096, Direction::Write, 50.0),
            ("bps-total=1M", 4096, Direction::Write, 256.0),
            ("bps-read=4M", 65536, Direction::Read, 64.0),
            ("bps-write=2M", 131072, Direction::Write, 16.0),
            // iops-size: a 64 KiB request counts as 16 operations.
            ("iops-total=160,iops-size=4096", 65536, Direction::Read, 10.0),
        ] {
            let n = admitted(limits, 10, bytes, dir).len() as f64;
            // A first burst of avg/10 (QEMU's bucket size) comes on top.
            assert!((n / 10.0 - per_sec).abs() / per_sec < 0.02, "{limits}: {n} in 10 s");
        }
        // A read limit does not hold writes back.
        let mut s = State::new(Limits::parse("iops-read=10").unwrap(), 0);
        for _ in 0..1000 {
            assert_eq!(s.wait(Direction::Write, 0), 0);
            s.account(Direction::Write, 4096);
        }
        assert!(s.wait(Direction::Read, 0) == 0, "writes filled no read bucket");
    }

    #[test]
    fn a_burst_allows_max_times_length_then_the_average() {
        // iops-total=100, bursts at 1000/s for 3 s: 3000 operations at the
        // burst rate (plus its max/10 smoothing bucket), then 100/s.
        let at = admitted(
            "iops-total=100,iops-total-max=1000,iops-total-max-length=3",
            20,
            4096,
            Direction::Read,
        );
        let in_first = |t: u64| at.iter().filter(|&&x| x < t).count() as f64;
        // After 3 s the burst is spent: about max × length (+ avg × 3 leaked).
        let burst = in_first(3 * SEC + SEC / 10);
        let expect = 1000.0 * 3.0 + 100.0 * 3.0;
        assert!(
            (burst - expect).abs() / expect < 0.05,
            "burst: {burst}, formula {expect}"
        );
        // While bursting, the rate is the burst rate.
        let first_sec = in_first(SEC);
        assert!((first_sec - 1100.0).abs() < 60.0, "first second: {first_sec}");
        // From then on, the average.
        let late = at.iter().filter(|&&x| (10 * SEC..20 * SEC).contains(&x)).count() as f64;
        assert!((late / 10.0 - 100.0).abs() < 3.0, "late rate {late} per 10 s");
    }

    #[test]
    fn reconfiguring_empties_the_buckets() {
        let mut s = State::new(Limits::parse("iops-total=10").unwrap(), 0);
        for _ in 0..5 {
            s.account(Direction::Read, 512);
        }
        assert!(s.wait(Direction::Read, 0) > 0);
        s.configure(Limits::parse("iops-total=1000").unwrap(), 0);
        assert_eq!(s.wait(Direction::Read, 0), 0);
    }
}
