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
//! With `--live` (pre-copy) the guest runs while QEMU sends its RAM,
//! dirty logging marking what Spindle writes into it, and QEMU's
//! `pause-before-switchover` stops it before the last pass: each disk is
//! marked `keep_image` first (its device stop then keeps the image here),
//! the migration starts at once, steps 2 and 3 happen at the
//! `pre-switchover` state, then `migrate-continue` ends the stream; the
//! daemon takes the VM-state disk's snapshot only if that disk is
//! quiesced when the stream ends.
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
    /// Pre-copy while the guest runs; the disks are snapshotted at the
    /// switch-over.
    pub live: bool,
    /// Test only: QEMU's migration bandwidth limit (bytes/s), to make the
    /// VM-state stream last (default: no limit).
    pub max_bandwidth: Option<u64>,
}

/// What a failed or finished snapshot has to undo.
#[derive(Default)]
struct Undo {
    quiesced: Vec<String>,
    made: Vec<String>,
    kept: Vec<String>,
    /// When the guest stopped (stop-copy: at `stop`; live: at the
    /// switch-over).
    paused: Option<Instant>,
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
        "spindle: vm snapshot '{name}' of QEMU process {pid}: disks {} (VM state in '{}'){}",
        list.join(", "),
        vm_disk.name,
        if opts.live { ", live" } else { "" }
    );
    // QEMU's own limit (32 MiB/s by default) comes back afterwards.
    let before = qmp.execute("query-migrate-parameters", json!({}))?["max-bandwidth"].as_u64();
    let bandwidth = opts.max_bandwidth.unwrap_or(1 << 40).max(1);
    qmp.execute("migrate-set-parameters", json!({"max-bandwidth": bandwidth}))?;
    let was_running = qmp.running()?;
    let live = opts.live && was_running;
    let mut undo = Undo::default();
    let res = if live {
        take(&mut qmp, control, &disks, vm_disk, name, true, &mut undo)
    } else {
        undo.paused = Some(Instant::now());
        let stopped = if was_running {
            qmp.execute("stop", json!({})).map(|_| ())
        } else {
            Ok(())
        };
        stopped.and_then(|()| take(&mut qmp, control, &disks, vm_disk, name, false, &mut undo))
    };
    if res.is_err() {
        for d in &undo.made {
            if let Err(e) = ctl(control, json!({"cmd": "snapshot_delete", "name": d, "snapshot": name})) {
                eprintln!("spindle: vm snapshot: cannot roll back '{name}' on '{d}': {e}");
            }
        }
    }
    let mut resumed = true;
    for d in &undo.quiesced {
        if let Err(e) = ctl(control, json!({"cmd": "resume", "name": d})) {
            eprintln!("spindle: vm snapshot: cannot resume '{d}': {e}");
            resumed = false;
        }
    }
    for d in &undo.kept {
        if let Err(e) = ctl(control, json!({"cmd": "keep_image", "name": d, "keep": false})) {
            eprintln!("spindle: vm snapshot: cannot clear keep_image of '{d}': {e}");
        }
    }
    if let Some(b) = before {
        let _ = qmp.execute("migrate-set-parameters", json!({"max-bandwidth": b}));
    }
    if live {
        let _ = switchover_pause(&mut qmp, false);
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
    let pause = undo.paused.map_or(Duration::ZERO, |t| t.elapsed());
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

/// Sets QEMU's `pause-before-switchover` migration capability.
fn switchover_pause(qmp: &mut Qmp, on: bool) -> Result<(), String> {
    qmp.execute(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "pause-before-switchover", "state": on}]}),
    )
    .map(|_| ())
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

/// Quiesces every disk, then a disk-only snapshot on each but `vm_disk`
/// (steps 2 and 3).
fn quiesce_and_snapshot(
    control: &Path,
    disks: &[Disk],
    vm_disk: &Disk,
    name: &str,
    undo: &mut Undo,
) -> Result<(), String> {
    for d in disks {
        ctl(control, json!({"cmd": "quiesce", "name": d.name, "lease_s": LEASE_S}))?;
        undo.quiesced.push(d.name.clone());
    }
    for d in disks.iter().filter(|d| d.name != vm_disk.name) {
        ctl(
            control,
            json!({"cmd": "snapshot_create", "name": d.name, "snapshot": name}),
        )?;
        undo.made.push(d.name.clone());
    }
    Ok(())
}

/// Steps 2 to 4 (stop-copy, the guest stopped already) or the live
/// sequence; the VM state's size. `undo` says what to undo.
fn take(
    qmp: &mut Qmp,
    control: &Path,
    disks: &[Disk],
    vm_disk: &Disk,
    name: &str,
    live: bool,
    undo: &mut Undo,
) -> Result<u64, String> {
    if live {
        for d in disks {
            ctl(
                control,
                json!({"cmd": "keep_image", "name": d.name, "keep": true, "lease_s": LEASE_S}),
            )?;
            undo.kept.push(d.name.clone());
        }
        switchover_pause(qmp, true)?;
    } else {
        quiesce_and_snapshot(control, disks, vm_disk, name, undo)?;
    }
    let sock = super::socket_beside(control, "vmstate");
    let req = json!({"cmd": "snapshot_create", "name": vm_disk.name, "snapshot": name, "vmstate": sock,
                     "live": live});
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
            .and_then(|_| {
                if live {
                    qmp.wait_migration_state("pre-switchover")?;
                    undo.paused = Some(Instant::now());
                    quiesce_and_snapshot(control, disks, vm_disk, name, undo)?;
                    qmp.execute("migrate-continue", json!({"state": "pre-switchover"}))?;
                }
                qmp.wait_migration()
            })
    } else {
        Err(format!(
            "the daemon did not listen on {} for the VM state",
            sock.display()
        ))
    };
    watch.finish();
    if migrated.is_err() {
        // The daemon's side fails too (the stream ends early or never
        // comes); cancel what QEMU may still be doing.
        let _ = qmp.execute("migrate_cancel", json!({}));
    }
    let saved = saver
        .join()
        .map_err(|_| "the VM-state request thread failed".to_string())?;
    if let Err(e) = &migrated {
        if saved.is_ok() {
            undo.made.push(vm_disk.name.clone());
        }
        return Err(e.clone());
    }
    let reply = saved?;
    undo.made.push(vm_disk.name.clone());
    Ok(reply["snapshot"]["vm_state_size"].as_u64().unwrap_or(0))
}
