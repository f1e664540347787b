//! Allocating a restore's guest RAM before the VM state streams in.
//!
//! QEMU loads an incoming migration on one thread, and each guest page it
//! writes for the first time is a page fault that allocates and zeroes a
//! page of the memory backend: with 2 GiB of non-zero RAM that took 2.5 s
//! of a 3.5 s load here, and capped a restore at 500-800 MiB/s whatever
//! the disk. Setting the backend's `prealloc` property on a running QEMU
//! (QOM, `qom-set`) allocates every page up front, with as many threads as
//! the backend's `prealloc-threads`, and the load then runs at the
//! device's speed (docs/snapshots.md, "Restore speed"). It allocates all
//! of the guest's RAM, though, also pages the snapshot leaves zero, which
//! a load never touches: `auto` does it only when the VM state is at least
//! half the guest's RAM.

use super::qmp::Qmp;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Whether to preallocate the guest's RAM before loading (`--prealloc`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Prealloc {
    /// When the VM state is at least half the guest's RAM.
    Auto,
    /// Always (unless QEMU preallocated it already).
    On,
    /// Never: pages are allocated as the load writes them.
    Off,
}

/// How long QEMU may take to preallocate (about 1 s per 2 GiB and thread
/// here; a 1 TiB guest on one thread would take minutes).
const PREALLOC_WAIT: Duration = Duration::from_secs(1800);

/// Preallocates the memory backends of the guest behind `qmp` if `mode`
/// says so for a VM state of `state` bytes; what it did, for the log
/// (`None`: nothing done). A QEMU that refuses only costs the speed-up.
pub fn prefault(qmp: &mut Qmp, state: u64, mode: Prealloc) -> Option<String> {
    if mode == Prealloc::Off {
        return None;
    }
    let memdevs = match qmp.execute("query-memdev", json!({})) {
        Ok(Value::Array(m)) => m,
        _ => return None,
    };
    let ram: u64 = memdevs.iter().filter_map(|m| m["size"].as_u64()).sum();
    if ram == 0 || (mode == Prealloc::Auto && state < ram / 2) {
        return None;
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(16);
    let start = Instant::now();
    let mut done = 0u64;
    for m in &memdevs {
        let (Some(id), Some(size)) = (m["id"].as_str(), m["size"].as_u64()) else {
            continue;
        };
        if m["prealloc"] == json!(true) {
            continue;
        }
        let path = format!("/objects/{id}");
        let _ = qmp.execute(
            "qom-set",
            json!({"path": path, "property": "prealloc-threads", "value": threads}),
        );
        match qmp.execute_within(
            "qom-set",
            json!({"path": path, "property": "prealloc", "value": true}),
            PREALLOC_WAIT,
        ) {
            Ok(_) => done += size,
            Err(e) => {
                eprintln!("spindle: vm restore: guest RAM '{id}' is not preallocated ({e}); loading without");
            }
        }
    }
    (done > 0).then(|| {
        format!(
            "preallocated {} of guest RAM in {:.2} s ({threads} threads)",
            crate::img::human_size(done),
            start.elapsed().as_secs_f64()
        )
    })
}
