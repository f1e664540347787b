//! Throttling limits with QEMU's names, defaults and validation
//! (`docs/throttle.txt`, `util/throttle.c`): six leaky buckets (bytes and
//! operations, total, read and write), each with an average rate, an
//! optional burst rate (`-max`) and the burst's length in seconds
//! (`-max-length`), and `iops-size`, the size above which one request
//! counts as several operations.
//!
//! Spelled as QEMU's `throttle-group` properties (`iops-total=1000,
//! bps-write=50M`) or libvirt's `<iotune>` elements (`total_iops_sec`,
//! `write_bytes_sec`, `size_iops_sec`, …), comma-separated.

use serde::{Deserialize, Serialize};

/// The largest rate or burst QEMU accepts (`THROTTLE_VALUE_MAX`).
pub const VALUE_MAX: u64 = 1_000_000_000_000_000;

/// One of the six buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Bytes, reads and writes.
    BpsTotal,
    /// Bytes read.
    BpsRead,
    /// Bytes written.
    BpsWrite,
    /// Operations, reads and writes.
    OpsTotal,
    /// Read operations.
    OpsRead,
    /// Write operations.
    OpsWrite,
}

impl Kind {
    /// All six, in array order.
    pub const ALL: [Kind; 6] = [
        Kind::BpsTotal,
        Kind::BpsRead,
        Kind::BpsWrite,
        Kind::OpsTotal,
        Kind::OpsRead,
        Kind::OpsWrite,
    ];

    /// QEMU's property prefix.
    pub fn name(self) -> &'static str {
        match self {
            Kind::BpsTotal => "bps-total",
            Kind::BpsRead => "bps-read",
            Kind::BpsWrite => "bps-write",
            Kind::OpsTotal => "iops-total",
            Kind::OpsRead => "iops-read",
            Kind::OpsWrite => "iops-write",
        }
    }

    /// libvirt's `<iotune>` element.
    fn libvirt(self) -> &'static str {
        match self {
            Kind::BpsTotal => "total_bytes_sec",
            Kind::BpsRead => "read_bytes_sec",
            Kind::BpsWrite => "write_bytes_sec",
            Kind::OpsTotal => "total_iops_sec",
            Kind::OpsRead => "read_iops_sec",
            Kind::OpsWrite => "write_iops_sec",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// One bucket's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket {
    /// Average rate per second (0: no limit).
    pub avg: u64,
    /// Burst rate per second (0: none; QEMU then allows avg/10 at once).
    pub max: u64,
    /// How many seconds a burst at `max` may last.
    pub burst_length: u64,
}

impl Default for Bucket {
    fn default() -> Self {
        Bucket {
            avg: 0,
            max: 0,
            burst_length: 1,
        }
    }
}

/// A set of limits (QEMU's `ThrottleConfig`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// The six buckets, in [`Kind::ALL`] order.
    pub buckets: [Bucket; 6],
    /// Requests larger than this count as `size / iops_size` operations
    /// (0: every request is one).
    pub iops_size: u64,
}

fn number(key: &str, v: &str) -> Result<u64, String> {
    let v = v.trim();
    let (num, mult) = match v.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("{key}: '{v}' is not a number (suffixes: K, M, G, T)")),
            };
            (&v[..i], 1u64 << shift)
        }
        _ => (v, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{key}: '{v}' is not a number (suffixes: K, M, G, T)"))
}

impl Limits {
    /// Parses `key=value,…` (QEMU's or libvirt's names); validates.
    pub fn parse(s: &str) -> Result<Limits, String> {
        let mut l = Limits::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| format!("'{part}' is not KEY=VALUE (e.g. iops-total=1000)"))?;
            l.set(key.trim(), number(key, value)?)?;
        }
        l.validate()?;
        Ok(l)
    }

    /// Sets one limit by QEMU's or libvirt's name.
    pub fn set(&mut self, key: &str, v: u64) -> Result<(), String> {
        if matches!(key, "iops-size" | "size_iops_sec") {
            self.iops_size = v;
            return Ok(());
        }
        for k in Kind::ALL {
            let b = &mut self.buckets[k.index()];
            let (q, lv) = (k.name(), k.libvirt());
            if key == q || key == lv {
                b.avg = v;
            } else if key.strip_suffix("-max") == Some(q) || key.strip_suffix("_max") == Some(lv) {
                b.max = v;
            } else if key.strip_suffix("-max-length") == Some(q) || key.strip_suffix("_max_length") == Some(lv) {
                if v > u64::from(u32::MAX) {
                    return Err(format!("{key} value must be in the range [0, {}]", u32::MAX));
                }
                b.burst_length = v;
            } else {
                continue;
            }
            return Ok(());
        }
        Err(format!(
            "unknown throttle limit '{key}' (bps-total, bps-read, bps-write, iops-total, iops-read, iops-write, each with -max and -max-length, and iops-size; or libvirt's names)"
        ))
    }

    /// The bucket of `k`.
    pub fn bucket(&self, k: Kind) -> &Bucket {
        &self.buckets[k.index()]
    }

    /// Whether any limit is set.
    pub fn is_enabled(&self) -> bool {
        self.buckets.iter().any(|b| b.avg > 0)
    }

    /// QEMU's checks, with its messages (`throttle_is_valid`).
    pub fn validate(&self) -> Result<(), String> {
        let b = |k: Kind| self.bucket(k);
        let conflict =
            |t: Kind, r: Kind, w: Kind, f: fn(&Bucket) -> u64| f(b(t)) != 0 && (f(b(r)) != 0 || f(b(w)) != 0);
        let (bt, br, bw) = (Kind::BpsTotal, Kind::BpsRead, Kind::BpsWrite);
        let (ot, or, ow) = (Kind::OpsTotal, Kind::OpsRead, Kind::OpsWrite);
        if conflict(bt, br, bw, |x| x.avg)
            || conflict(ot, or, ow, |x| x.avg)
            || conflict(bt, br, bw, |x| x.max)
            || conflict(ot, or, ow, |x| x.max)
        {
            return Err("bps/iops/max total values and read/write values cannot be used at the same time".into());
        }
        if self.iops_size != 0 && b(ot).avg == 0 && b(or).avg == 0 && b(ow).avg == 0 {
            return Err("iops size requires an iops value to be set".into());
        }
        for k in Kind::ALL {
            let x = b(k);
            if x.avg > VALUE_MAX || x.max > VALUE_MAX {
                return Err(format!("bps/iops/max values must be within [0, {VALUE_MAX}]"));
            }
            if x.burst_length == 0 {
                return Err("the burst length cannot be 0".into());
            }
            if x.burst_length > 1 && x.max == 0 {
                return Err("burst length set without burst rate".into());
            }
            if x.max != 0 && x.burst_length > VALUE_MAX / x.max {
                return Err("burst length too high for this burst rate".into());
            }
            if x.max != 0 && x.avg == 0 {
                return Err("bps_max/iops_max require corresponding bps/iops values".into());
            }
            if x.max != 0 && x.max < x.avg {
                return Err("bps_max/iops_max cannot be lower than bps/iops".into());
            }
        }
        Ok(())
    }
}

impl std::fmt::Display for Limits {
    /// The limits set, as `parse` takes them (`none` if none).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        for k in Kind::ALL {
            let b = self.bucket(k);
            if b.avg != 0 {
                parts.push(format!("{}={}", k.name(), b.avg));
            }
            if b.max != 0 {
                parts.push(format!("{}-max={}", k.name(), b.max));
            }
            if b.burst_length != 1 {
                parts.push(format!("{}-max-length={}", k.name(), b.burst_length));
            }
        }
        if self.iops_size != 0 {
            parts.push(format!("iops-size={}", self.iops_size));
        }
        if parts.is_empty() {
            return f.write_str("none");
        }
        f.write_str(&parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemus_and_libvirts_names_parse_alike() {
        let a = Limits::parse("iops-total=1000,iops-total-max=2000,iops-total-max-length=5,bps-write=50M,iops-size=4k")
            .unwrap();
        let b = Limits::parse(
            "total_iops_sec=1000,total_iops_sec_max=2000,total_iops_sec_max_length=5,write_bytes_sec=52428800,size_iops_sec=4096",
        )
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(a.bucket(Kind::OpsTotal).max, 2000);
        assert_eq!(a.bucket(Kind::BpsWrite).avg, 50 << 20);
        assert_eq!(Limits::parse(&a.to_string()).unwrap(), a);
        assert_eq!(Limits::default().to_string(), "none");
        assert!(!Limits::default().is_enabled());
    }

    #[test]
    fn qemus_validation_errors() {
        for (s, says) in [
            ("iops-total=10,iops-read=5", "cannot be used at the same time"),
            (
                "bps-total=10,bps-total-max=100,bps-write=1,bps-write-max=2",
                "cannot be used at the same time",
            ),
            ("iops-size=4096,bps-total=1", "iops size requires an iops value"),
            ("iops-total=100,iops-total-max-length=0", "burst length cannot be 0"),
            (
                "iops-total=100,iops-total-max-length=5",
                "burst length set without burst rate",
            ),
            ("iops-total-max=100", "require corresponding"),
            ("iops-total=100,iops-total-max=50", "cannot be lower"),
            ("iops-total=2000000000000000", "must be within"),
            (
                "iops-total=100,iops-total-max=1000000000000,iops-total-max-length=100000",
                "too high",
            ),
            (
                "iops-total=100,iops-total-max-length=5000000000",
                "range [0, 4294967295]",
            ),
            ("iops=5", "unknown throttle limit 'iops'"),
            ("iops-total", "not KEY=VALUE"),
            ("iops-total=lots", "not a number"),
        ] {
            let e = Limits::parse(s).unwrap_err();
            assert!(e.contains(says), "{s}: {e}");
        }
    }
}
