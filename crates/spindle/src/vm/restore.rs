//! `spindle vm restore`: a VM snapshot into a QEMU that waits for an
//! incoming migration (`-incoming defer`).
//!
//! 1. refuse (QEMU not waiting for a migration, a disk without the
//!    snapshot, no disk with its VM state) before anything changes;
//! 2. preallocate the guest's RAM when the VM state fills most of it
//!    (`prefault.rs`: the load is then not bound by page faults);
//! 3. revert every disk to the snapshot (`snapshot_apply`: the daemon
//!    refuses a disk whose device the frontend has started);
//! 4. `migrate-incoming unix:SOCK` and the daemon streams the VM state
//!    into it (`vmstate_load`), read ahead from the image;
//! 5. wait until QEMU has loaded it (`query-status`: paused or running,
//!    or prelaunch for a guest snapshotted before it ever ran), then
//!    `cont` unless `--paused` (a never-run guest stays so).

use super::prefault::{prefault, Prealloc};
use super::qmp::Qmp;
use super::{ctl, disks_of};
use crate::protocol::VmRequest;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

/// How long QEMU may take to finish loading once the stream ended.
const LOAD_WAIT: Duration = Duration::from_secs(120);

/// Runs `spindle vm restore --qmp QMP -c CONTROL NAME [--paused]`.
pub fn run(qmp_path: &Path, control: &Path, name: &str, paused: bool, prealloc: Prealloc) -> Result<(), String> {
    let mut qmp = Qmp::connect(qmp_path)?;
    let pid = qmp
        .pid
        .ok_or_else(|| format!("QMP socket {}: cannot tell which process QEMU is", qmp_path.display()))?;
    let status = qmp.execute("query-status", json!({}))?;
    if status["status"] != "inmigrate" {
        return Err(format!(
            "QEMU process {pid} is {}, not waiting for an incoming migration: start it with -incoming defer",
            status["status"].as_str().unwrap_or("in an unknown state")
        ));
    }
    let disks = disks_of(control, pid)?;
    let mut vm_disk = None;
    for d in &disks {
        let snaps = ctl(control, VmRequest::SnapshotList { name: d.name.clone() })?;
        let sn: Option<&Value> = snaps["snapshots"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s["name"] == json!(name)));
        let Some(sn) = sn else {
            return Err(format!(
                "disk '{}' ({}) has no snapshot named '{name}'",
                d.name, d.image
            ));
        };
        if sn["vm_state_size"].as_u64().unwrap_or(0) > 0 {
            vm_disk = Some((d.name.clone(), sn["vm_state_size"].as_u64().unwrap_or(0)));
        }
    }
    let Some((vm_disk, size)) = vm_disk else {
        return Err(format!(
            "no disk of QEMU process {pid} holds VM state of '{name}' (a disk-only or incomplete snapshot)"
        ));
    };
    let list: Vec<&str> = disks.iter().map(|d| d.name.as_str()).collect();
    println!(
        "spindle: vm restore '{name}' into QEMU process {pid}: disks {} (VM state from '{vm_disk}')",
        list.join(", ")
    );
    if let Some(what) = prefault(&mut qmp, size, prealloc) {
        println!("spindle: vm restore '{name}': {what}");
    }
    for d in &disks {
        ctl(
            control,
            VmRequest::SnapshotApply {
                name: d.name.clone(),
                snapshot: name.to_string(),
            },
        )
        .map_err(|e| format!("reverting '{}': {e}", d.name))?;
    }
    let started = Instant::now();
    let sock = super::socket_beside(control, "vmload");
    let _ = std::fs::remove_file(&sock);
    let res = stream(&mut qmp, control, &vm_disk, name, &sock);
    let _ = std::fs::remove_file(&sock);
    let status = res?;
    let secs = started.elapsed().as_secs_f64();
    if !paused && status == "paused" {
        qmp.execute("cont", json!({}))?;
    }
    println!(
        "spindle: vm restore '{name}': VM state {size} bytes ({}) in {secs:.3} s ({:.0} MiB/s); guest {}",
        crate::img::human_size(size),
        size as f64 / (1 << 20) as f64 / secs.max(1e-9),
        if paused { status.as_str() } else { "running" }
    );
    Ok(())
}

/// Steps 4 and 5; QEMU's run state afterwards (`paused` or `running`).
fn stream(qmp: &mut Qmp, control: &Path, vm_disk: &str, name: &str, sock: &Path) -> Result<String, String> {
    qmp.execute("migrate-incoming", json!({"uri": format!("unix:{}", sock.display())}))?;
    let watch = super::progress::Watch::start(control, vm_disk, name, "load");
    let loaded = ctl(
        control,
        VmRequest::VmstateLoad {
            name: vm_disk.to_string(),
            snapshot: name.to_string(),
            vmstate: sock.to_owned(),
        },
    );
    watch.finish();
    let deadline = Instant::now() + LOAD_WAIT;
    loop {
        // QEMU exits when an incoming migration fails: the QMP error says so.
        let st = qmp.execute("query-status", json!({})).map_err(|e| match &loaded {
            Err(l) => format!("streaming the VM state failed: {l}; QEMU: {e}"),
            Ok(_) => format!("QEMU did not load the VM state: {e}"),
        })?;
        let s = st["status"].as_str().unwrap_or("").to_string();
        // `prelaunch`: the snapshot is of a guest that never ran (QEMU
        // started with -S); QEMU restores that state, and so it stays.
        if s == "paused" || s == "running" || s == "prelaunch" {
            loaded?;
            return Ok(s);
        }
        if let Err(e) = &loaded {
            let m = qmp.execute("query-migrate", json!({})).unwrap_or(Value::Null);
            if m["status"] == "failed" || Instant::now() > deadline {
                return Err(format!("streaming the VM state failed: {e}"));
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "QEMU did not finish loading the VM state within {} s (status {s})",
                LOAD_WAIT.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
