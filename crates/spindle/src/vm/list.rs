//! `spindle vm list` and `spindle vm delete`: a VM's snapshots across all
//! of its Spindle disks.

use super::{ctl, disks_of, Disk};
use crate::protocol::VmRequest;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// One snapshot name across the VM's disks.
#[derive(Debug, Default)]
struct VmSnapshot {
    /// The disks that have it.
    disks: Vec<String>,
    /// VM state bytes, and the disk that holds them.
    vm_state: Option<(u64, String)>,
    /// Creation time (seconds), of the VM-state disk's or the first entry.
    date_sec: u64,
    /// The guest's pause time in ms, as recorded with the VM state.
    pause_ms: Option<f64>,
}

fn by_name(control: &Path, disks: &[Disk]) -> Result<BTreeMap<String, VmSnapshot>, String> {
    let mut all: BTreeMap<String, VmSnapshot> = BTreeMap::new();
    for d in disks {
        let reply = ctl(control, VmRequest::SnapshotList { name: d.name.clone() })?;
        for s in reply["snapshots"].as_array().into_iter().flatten() {
            let name = s["name"].as_str().unwrap_or("").to_string();
            let e = all.entry(name).or_default();
            e.disks.push(d.name.clone());
            let size = s["vm_state_size"].as_u64().unwrap_or(0);
            if size > 0 || e.date_sec == 0 {
                e.date_sec = s["date_sec"].as_u64().unwrap_or(0);
            }
            if size > 0 {
                e.vm_state = Some((size, d.name.clone()));
                e.pause_ms = s["pause_ms"].as_f64();
            }
        }
    }
    Ok(all)
}

/// The QEMU process of `qmp` (`SO_PEERCRED`).
fn qemu_pid(qmp: &Path) -> Result<u32, String> {
    let q = super::qmp::Qmp::connect(qmp)?;
    q.pid
        .ok_or_else(|| format!("QMP socket {}: cannot tell which process QEMU is", qmp.display()))
}

/// Prints every snapshot name found on the VM's disks: its date, VM state
/// size, disks, and whether it is a complete VM snapshot (on every disk,
/// with VM state on one).
pub fn list(qmp: &Path, control: &Path) -> Result<(), String> {
    let disks = disks_of(control, qemu_pid(qmp)?)?;
    let all = by_name(control, &disks)?;
    println!(
        "{:<20} {:<19} {:>10} {:>10} {:<10} DISKS",
        "NAME", "DATE", "VM_STATE", "PAUSE", "STATE"
    );
    for (name, s) in &all {
        let complete = s.vm_state.is_some() && s.disks.len() == disks.len();
        let state = match (&s.vm_state, complete) {
            (_, true) => "complete",
            (None, _) => "disk-only",
            (Some(_), false) => "incomplete",
        };
        let size = s.vm_state.as_ref().map_or(0, |(n, _)| *n);
        let pause = s.pause_ms.map_or("-".to_string(), |ms| format!("{:.3} s", ms / 1e3));
        println!(
            "{:<20} {:<19} {:>10} {:>10} {:<10} {}",
            spindle_block::printable(name),
            crate::img::snapshot::local_time(s.date_sec as i64),
            crate::img::human_size(size),
            pause,
            state,
            s.disks.join(",")
        );
    }
    Ok(())
}

/// Deletes snapshot `name` from every disk of the VM that has it.
pub fn delete(qmp: &Path, control: &Path, name: &str) -> Result<(), String> {
    let disks = disks_of(control, qemu_pid(qmp)?)?;
    let all = by_name(control, &disks)?;
    let Some(s) = all.get(name) else {
        return Err(format!("no disk of this VM has a snapshot named '{name}'"));
    };
    let mut errors = Vec::new();
    for d in &s.disks {
        let r: Result<Value, String> = ctl(
            control,
            VmRequest::SnapshotDelete {
                name: d.clone(),
                snapshot: name.to_string(),
            },
        );
        if let Err(e) = r {
            errors.push(format!("'{d}': {e}"));
        }
    }
    if !errors.is_empty() {
        return Err(format!("deleting '{name}': {}", errors.join("; ")));
    }
    println!("spindle: vm delete '{name}': removed from {}", s.disks.join(", "));
    Ok(())
}
