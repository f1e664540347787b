//! Fault injection for tests, like QEMU's blkdebug `inject-error`: fail the
//! Nth write (or flush) of one kind of metadata, so tests can check that an
//! image is at most leaky after an I/O error at any point of an operation.
//!
//! A plan reads `KIND:N[:once|:sticky|:dead][:errno=E]`:
//! - `KIND`: `data`, `l2`, `refblock`, `reftable`, `l1`, `header`,
//!   `snapshot_table`, `bitmap`, `flush`, or `any` (every write and flush
//!   counts: `any:N:dead` is a crash just before the Nth one);
//! - `N`: the first write of that kind to fail (1-based);
//! - `once` (default): only that one fails; `sticky`: every later one of
//!   that kind fails too; `dead`: every later write and flush of any kind
//!   fails, as if the disk went away;
//! - `errno` (default 5, EIO).
//!
//! [`delay`] makes requests slow instead of failing them.

pub mod delay;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// What a write is, for fault injection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Guest data.
    Data,
    /// An L2 table (or slice).
    L2,
    /// A refcount block.
    RefcountBlock,
    /// The refcount table.
    RefcountTable,
    /// An L1 table (active or a snapshot's copy).
    L1,
    /// The image header.
    Header,
    /// The snapshot table.
    SnapshotTable,
    /// Persistent bitmap structures (Spindle writes none).
    Bitmap,
    /// A flush (fdatasync).
    Flush,
    /// In a plan: every write and flush counts.
    Any,
}

const KINDS: [(&str, Kind); 10] = [
    ("data", Kind::Data),
    ("l2", Kind::L2),
    ("refblock", Kind::RefcountBlock),
    ("reftable", Kind::RefcountTable),
    ("l1", Kind::L1),
    ("header", Kind::Header),
    ("snapshot_table", Kind::SnapshotTable),
    ("bitmap", Kind::Bitmap),
    ("flush", Kind::Flush),
    ("any", Kind::Any),
];

impl Kind {
    /// Every kind of write, for tests that try each.
    pub fn all() -> impl Iterator<Item = Kind> {
        KINDS.iter().map(|&(_, k)| k).filter(|&k| k != Kind::Any)
    }

    /// The kind's name in a plan.
    pub fn name(self) -> &'static str {
        KINDS.iter().find(|&&(_, k)| k == self).map_or("?", |&(n, _)| n)
    }
}

/// How long a fault lasts once it fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Only the Nth write fails.
    Once,
    /// The Nth and every later write of the kind fail.
    Sticky,
    /// The Nth and every later write or flush of any kind fail.
    Dead,
}

/// One injected fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Which writes count.
    pub kind: Kind,
    /// The first to fail (1-based).
    pub nth: u64,
    /// What happens after.
    pub scope: Scope,
    /// The error returned.
    pub errno: i32,
}

impl std::str::FromStr for Plan {
    type Err = String;
    fn from_str(s: &str) -> Result<Plan, String> {
        let bad = |why: &str| format!("fault plan '{s}': {why} (expected KIND:N[:once|:sticky|:dead][:errno=E])");
        let mut parts = s.split(':');
        let kind_name = parts.next().unwrap_or("");
        let kind = KINDS
            .iter()
            .find(|(n, _)| *n == kind_name)
            .map(|&(_, k)| k)
            .ok_or_else(|| bad("unknown kind"))?;
        let nth = parts
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .filter(|&n| n > 0)
            .ok_or_else(|| bad("N must be a number from 1"))?;
        let mut plan = Plan {
            kind,
            nth,
            scope: Scope::Once,
            errno: libc::EIO,
        };
        for p in parts {
            match p {
                "once" => plan.scope = Scope::Once,
                "sticky" => plan.scope = Scope::Sticky,
                "dead" => plan.scope = Scope::Dead,
                _ => {
                    plan.errno = p
                        .strip_prefix("errno=")
                        .and_then(|e| e.parse().ok())
                        .filter(|&e| e > 0)
                        .ok_or_else(|| bad("unknown option"))?
                }
            }
        }
        Ok(plan)
    }
}

/// Counts writes and fails the planned ones. Shared by everything that
/// writes one image.
#[derive(Debug)]
pub struct Injector {
    plan: Plan,
    seen: AtomicU64,
    dead: AtomicBool,
}

impl Injector {
    /// An injector for `plan`.
    pub fn new(plan: Plan) -> Injector {
        Injector {
            plan,
            seen: AtomicU64::new(0),
            dead: AtomicBool::new(false),
        }
    }

    /// Called before each write or flush of `kind`: the error to return
    /// instead of doing it, if this one is planned to fail.
    pub fn hit(&self, kind: Kind) -> Option<io::Error> {
        let err = || Some(io::Error::from_raw_os_error(self.plan.errno));
        if self.dead.load(Ordering::Acquire) {
            return err();
        }
        if kind != self.plan.kind && self.plan.kind != Kind::Any {
            return None;
        }
        let n = self.seen.fetch_add(1, Ordering::AcqRel) + 1;
        let fail = n == self.plan.nth || (n > self.plan.nth && self.plan.scope != Scope::Once);
        if fail && self.plan.scope == Scope::Dead {
            self.dead.store(true, Ordering::Release);
        }
        if fail {
            // Tests look for this line to know the plan fired.
            tracing::warn!("injected error: {} write {n} fails", kind.name());
            return err();
        }
        None
    }

    /// Whether the planned fault has fired.
    pub fn fired(&self) -> bool {
        self.seen.load(Ordering::Acquire) >= self.plan.nth
    }
}

/// `inj.hit(kind)` as a `Result`, for call sites with an optional injector.
pub fn check(inj: Option<&Injector>, kind: Kind) -> io::Result<()> {
    match inj.and_then(|i| i.hit(kind)) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_parse_and_fire_as_written() {
        let p: Plan = "l2:2".parse().unwrap();
        assert_eq!((p.kind, p.nth, p.scope, p.errno), (Kind::L2, 2, Scope::Once, libc::EIO));
        let i = Injector::new(p);
        assert!(i.hit(Kind::Data).is_none());
        assert!(i.hit(Kind::L2).is_none());
        assert!(i.hit(Kind::L2).is_some());
        assert!(i.hit(Kind::L2).is_none(), "once: later writes go through");
        let d = Injector::new("refblock:1:dead:errno=28".parse().unwrap());
        assert_eq!(d.hit(Kind::RefcountBlock).unwrap().raw_os_error(), Some(28));
        assert!(d.hit(Kind::Flush).is_some(), "dead: everything fails after");
        let a = Injector::new("any:3:dead".parse().unwrap());
        assert!(a.hit(Kind::L2).is_none() && a.hit(Kind::Flush).is_none());
        assert!(a.hit(Kind::Header).is_some() && a.hit(Kind::Data).is_some());
        let s = Injector::new("flush:1:sticky".parse().unwrap());
        assert!(s.hit(Kind::Flush).is_some() && s.hit(Kind::Flush).is_some());
        assert!(s.hit(Kind::Data).is_none());
        for bad in ["x:1", "l2", "l2:0", "l2:1:maybe", "l2:1:errno=-1"] {
            assert!(bad.parse::<Plan>().is_err(), "{bad}");
        }
    }
}
