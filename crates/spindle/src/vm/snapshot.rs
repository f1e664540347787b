//! `spindle vm snapshot`: a consistent snapshot of every Spindle disk of a
//! running VM, with its VM state in one of them (stop-copy).
//!
//! Order and commit point:
//! 1. refuse (no Spindle disk, a raw or read-only disk, the name taken on
//!    any disk) before the guest is touched;
//! 2. `stop` the guest (QEMU stops its vhost-user devices: no request in
//!    flight), quiesce every disk (no request admitted until resumed);
//! 3. a disk-only snapshot NAME on every disk but the VM-state disk;
//! 4. the VM state (QMP `migrate` into the daemon's socket) and snapshot
//!    NAME on the VM-state disk, in one step that exists fully or not at
//!    all: this is the commit point;
//! 5. resume the disks, `cont` when the guest was running.
//!
//! An error rolls back: NAME is deleted from the disks that got it. A crash
//! midway (of this command or of the daemon) can leave NAME as disk-only
//! snapshots on some disks but never VM state without every disk's
//! snapshot: a VM snapshot is complete exactly when one of its disks holds
//! its VM state, and `spindle vm` shows the rest as incomplete.

use super::qmp::Qmp;
use super::{ctl, disks_of, Disk};
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long a quiesce lasts when this command dies before resuming.
const LEASE_S: u64 = 600;
/// How long the daemon's VM-state socket may take to appear.
const LISTEN_WAIT: Duration = Duration::from_secs(10);

/// How `spindle vm snapshot` runs.
#[derive(Debug, Default, Clone)]
pub struct Options {
    /// The export that keeps the VM state (default: the first by name).
    pub vmstate_disk: Option<String>,
    /// Test only: QEMU's migration bandwidth limit (bytes/s), to make the
    /// VM-state stream last (default: no limit).
    pub max_bandwidth: Option<u64>,
}

/// Runs `spindle vm snapshot --qmp QMP -c CONTROL NAME`.
pub fn run(qmp_path: &Path, control: &Path, name: &str, opts: &Options) -> Result<(), String> {
    let mut qmp = Qmp::connect(qmp_path)?;
    let pid = qmp
        .pid
        .ok_or_else(|| format!("QMP socket {}: cannot tell which process QEMU is", qmp_path.display()))?;
    let disks = disks_of(control, pid)?;
    check(control, &disks, name)?;
    let vm_disk = match opts.vmstate_disk.as_deref() {
        Some(d) => disks
            .iter()
            .find(|x| x.name == d)
            .ok_or_else(|| format!("export '{d}' is not a disk of QEMU process {pid}"))?,
        None => &disks[0],
    };
    let list: Vec<&str> = disks.iter().map(|d| d.name.as_str()).collect();
    println!(
        "spindle: vm snapshot '{name}' of QEMU process {pid}: disks {} (VM state in '{}')",
        list.join(", "),
        vm_disk.name
    );
    // QEMU's own limit (32 MiB/s by default) comes back afterwards.
    let before = qmp.execute("query-migrate-parameters", json!({}))?["max-bandwidth"].as_u64();
    let bandwidth = opts.max_bandwidth.unwrap_or(1 << 40).max(1);
    qmp.execute("migrate-set-parameters", json!({"max-bandwidth": bandwidth}))?;
    let was_running = qmp.running()?;
    let paused = Instant::now();
    if was_running {
        qmp.execute("stop", json!({}))?;
    }
    let mut quiesced = Vec::new();
    let mut made = Vec::new();
    let res = take(&mut qmp, control, &disks, vm_disk, name, &mut quiesced, &mut made);
    if res.is_err() {
        for d in &made {
            if let Err(e) = ctl(control, json!({"cmd": "snapshot_delete", "name": d, "snapshot": name})) {
                eprintln!("spindle: vm snapshot: cannot roll back '{name}' on '{d}': {e}");
            }
        }
    }
    let mut resumed = true;
    for d in &quiesced {
        if let Err(e) = ctl(control, json!({"cmd": "resume", "name": d})) {
            eprintln!("spindle: vm snapshot: cannot resume '{d}': {e}");
            resumed = false;
        }
    }
    if let Some(b) = before {
        let _ = qmp.execute("migrate-set-parameters", json!({"max-bandwidth": b}));
    }
    // A guest continued while its daemon is gone would start its devices
    // without a backend (QEMU 7.2 does not start them again when the
    // daemon is back): it stays paused until the operator sends `cont`.
    let cont = if was_running && resumed {
        qmp.execute("cont", json!({})).map(|_| ())
    } else if was_running {
        Err(
            "the guest stays paused: its disks could not be resumed; once the daemon serves them \
             again, continue it (QMP cont) and run 'spindle vm list' (docs/snapshots.md, \"Errors and crashes\")"
                .to_string(),
        )
    } else {
        Ok(())
    };
    let pause = paused.elapsed();
    if let (Err(e), Err(c)) = (&res, &cont) {
        return Err(format!("{e}; {c}"));
    }
    let size = res?;
    cont?;
    let pause_ms = pause.as_secs_f64() * 1e3;
    if let Err(e) = ctl(
        control,
        json!({"cmd": "snapshot_record", "name": vm_disk.name, "snapshot": name, "pause_ms": pause_ms}),
    ) {
        eprintln!("spindle: vm snapshot '{name}': the pause time is not recorded: {e}");
    }
    println!(
        "spindle: vm snapshot '{name}': VM state {} bytes ({}), guest paused {:.3} s",
        size,
        crate::img::human_size(size),
        pause.as_secs_f64()
    );
    Ok(())
}

/// The refusals, before the guest is paused.
fn check(control: &Path, disks: &[Disk], name: &str) -> Result<(), String> {
    for d in disks {
        if d.format != "qcow2" {
            return Err(format!(
                "disk '{}' ({}) is {}; VM snapshots need every disk in qcow2",
                d.name, d.image, d.format
            ));
        }
        if d.readonly {
            return Err(format!("disk '{}' ({}) is served read-only", d.name, d.image));
        }
        let snaps = ctl(control, json!({"cmd": "snapshot_list", "name": d.name}))?;
        let taken = snaps["snapshots"]
            .as_array()
            .is_some_and(|a| a.iter().any(|s| s["name"] == json!(name)));
        if taken {
            return Err(format!("disk '{}' has a snapshot named '{name}' already", d.name));
        }
    }
    Ok(())
}

/// Steps 2 to 4; the VM state's size. `quiesced` and `made` say what to
/// undo.
fn take(
    qmp: &mut Qmp,
    control: &Path,
    disks: &[Disk],
    vm_disk: &Disk,
    name: &str,
    quiesced: &mut Vec<String>,
    made: &mut Vec<String>,
) -> Result<u64, String> {
    for d in disks {
        ctl(control, json!({"cmd": "quiesce", "name": d.name, "lease_s": LEASE_S}))?;
        quiesced.push(d.name.clone());
    }
    for d in disks.iter().filter(|d| d.name != vm_disk.name) {
        ctl(
            control,
            json!({"cmd": "snapshot_create", "name": d.name, "snapshot": name}),
        )?;
        made.push(d.name.clone());
    }
    let sock = super::socket_beside(control, "vmstate");
    let req = json!({"cmd": "snapshot_create", "name": vm_disk.name, "snapshot": name, "vmstate": sock});
    let ctl_path = control.to_owned();
    let saver = std::thread::spawn(move || ctl(&ctl_path, req));
    let started = Instant::now();
    while std::fs::symlink_metadata(&sock).is_err() {
        if saver.is_finished() || started.elapsed() > LISTEN_WAIT {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let watch = super::progress::Watch::start(control, &vm_disk.name, name, "save");
    let migrated = if std::fs::symlink_metadata(&sock).is_ok() {
        qmp.execute("migrate", json!({"uri": format!("unix:{}", sock.display())}))
            .and_then(|_| qmp.wait_migration())
    } else {
        Err(format!(
            "the daemon did not listen on {} for the VM state",
            sock.display()
        ))
    };
    watch.finish();
    let saved = saver
        .join()
        .map_err(|_| "the VM-state request thread failed".to_string())?;
    if let Err(e) = &migrated {
        // The daemon's side fails too (the stream ends early or never
        // comes); cancel what QEMU may still be doing.
        let _ = qmp.execute("migrate_cancel", json!({}));
        if saved.is_ok() {
            made.push(vm_disk.name.clone());
        }
        return Err(e.clone());
    }
    let reply = saved?;
    made.push(vm_disk.name.clone());
    Ok(reply["snapshot"]["vm_state_size"].as_u64().unwrap_or(0))
}
