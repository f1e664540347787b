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
use crate::protocol::VmRequest;
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
    /// Live: the longest pause wanted, in ms; QEMU's `downtime-limit` is a
    /// quarter of it ([`downtime_limit`]).
    pub max_pause_ms: u64,
}

/// A live snapshot whose guest has not let the migration converge for
/// this long gets twice the pause allowance.
const CONVERGE: Duration = Duration::from_secs(5);
/// The largest pause allowance the doubling reaches (then QEMU switches
/// over with whatever is left).
const MAX_DOWNTIME_MS: u64 = 60_000;

/// What a failed or finished snapshot has to undo.
#[derive(Default)]
struct Undo {
    quiesced: Vec<String>,
    made: Vec<String>,
    kept: Vec<String>,
    /// When the guest stopped (stop-copy: at `stop`; live: when the
    /// switch-over was seen).
    paused: Option<Instant>,
    /// Live: QEMU's own downtime (from its stopping the guest to the end
    /// of the stream) and when the end was seen; the pause is that plus
    /// the time from the end to `cont`.
    switched: Option<(Duration, Instant)>,
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
    // QEMU's own limits (32 MiB/s, 300 ms by default) come back afterwards.
    let params = qmp.execute("query-migrate-parameters", json!({}))?;
    let before = params["max-bandwidth"].as_u64();
    let before_downtime = params["downtime-limit"].as_u64();
    let bandwidth = opts.max_bandwidth.unwrap_or(1 << 40).max(1);
    let restore_params = |qmp: &mut Qmp| {
        if let Some(b) = before {
            let _ = qmp.execute("migrate-set-parameters", json!({"max-bandwidth": b}));
        }
        if let (true, Some(d)) = (opts.live, before_downtime) {
            let _ = downtime(qmp, d);
        }
    };
    let set = qmp
        .execute("migrate-set-parameters", json!({"max-bandwidth": bandwidth}))
        .and_then(|_| match opts.live {
            true => downtime(&mut qmp, downtime_limit(opts.max_pause_ms)),
            false => Ok(()),
        })
        .and_then(|()| qmp.running());
    let was_running = match set {
        Ok(r) => r,
        Err(e) => {
            restore_params(&mut qmp);
            return Err(e);
        }
    };
    let live = opts.live && was_running;
    let mut undo = Undo::default();
    let res = if live {
        take(
            &mut qmp,
            control,
            &disks,
            vm_disk,
            name,
            (true, opts.max_pause_ms),
            &mut undo,
        )
    } else {
        undo.paused = Some(Instant::now());
        let stopped = if was_running {
            qmp.execute("stop", json!({})).map(|_| ())
        } else {
            Ok(())
        };
        stopped.and_then(|()| take(&mut qmp, control, &disks, vm_disk, name, (false, 0), &mut undo))
    };
    if res.is_err() {
        for d in &undo.made {
            if let Err(e) = ctl(
                control,
                VmRequest::SnapshotDelete {
                    name: d.clone(),
                    snapshot: name.to_string(),
                },
            ) {
                eprintln!("spindle: vm snapshot: cannot roll back '{name}' on '{d}': {e}");
            }
        }
    }
    let mut resumed = true;
    if let Some(t) = undo.paused {
        tracing::debug!(ms = ms(t), "vm snapshot: resuming the disks");
    }
    for d in &undo.quiesced {
        if let Err(e) = ctl(control, VmRequest::Resume { name: d.clone() }) {
            eprintln!("spindle: vm snapshot: cannot resume '{d}': {e}");
            resumed = false;
        }
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
    let pause = match (undo.switched, undo.paused) {
        (Some((downtime, end)), _) => downtime + end.elapsed(),
        (None, Some(t)) => t.elapsed(),
        (None, None) => Duration::ZERO,
    };
    // Once the guest runs again: what only the next migration or device
    // stop would look at.
    for d in &undo.kept {
        if let Err(e) = ctl(
            control,
            VmRequest::KeepImage {
                name: d.clone(),
                keep: false,
                lease_s: None,
            },
        ) {
            eprintln!("spindle: vm snapshot: cannot clear keep_image of '{d}': {e}");
        }
    }
    restore_params(&mut qmp);
    if live {
        let _ = switchover_pause(&mut qmp, false);
    }

    if let (Err(e), Err(c)) = (&res, &cont) {
        return Err(format!("{e}; {c}"));
    }
    let size = res?;
    cont?;
    let pause_ms = pause.as_secs_f64() * 1e3;
    if let Err(e) = ctl(
        control,
        VmRequest::SnapshotRecord {
            name: vm_disk.name.clone(),
            snapshot: name.to_string(),
            pause_ms,
        },
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

/// Milliseconds since `t`, for the phase timings (`SPINDLE_LOG=debug`).
fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// QEMU's `downtime-limit` for a wanted pause of `max_pause_ms`: QEMU
/// estimates what it can send in that time from the rate the stream took
/// so far, which read-ahead into the daemon's buffers puts ahead of the
/// disk's; measured here (bench/vmsnap.py), a limit of a quarter of the
/// pause keeps an idle 2 GiB guest's pause under it.
fn downtime_limit(max_pause_ms: u64) -> u64 {
    (max_pause_ms / 4).max(1)
}

/// Sets QEMU's `downtime-limit` (ms): the migration switches over once
/// what is left to send fits in it at the rate measured so far.
fn downtime(qmp: &mut Qmp, ms: u64) -> Result<(), String> {
    qmp.execute("migrate-set-parameters", json!({"downtime-limit": ms}))
        .map(|_| ())
}

/// The pause allowance of a live snapshot while it waits for QEMU to
/// switch over: doubled every [`CONVERGE`] up to [`MAX_DOWNTIME_MS`].
struct Allowance {
    limit: u64,
    next: Duration,
}

impl Allowance {
    fn new(limit: u64) -> Allowance {
        Allowance { limit, next: CONVERGE }
    }

    /// The new limit, when `waited` calls for one.
    fn tick(&mut self, waited: Duration) -> Option<u64> {
        if waited < self.next || self.limit >= MAX_DOWNTIME_MS {
            return None;
        }
        self.limit = (self.limit * 2).min(MAX_DOWNTIME_MS);
        self.next += CONVERGE;
        Some(self.limit)
    }
}

/// Waits for the switch-over of a live snapshot, doubling the pause
/// allowance every [`CONVERGE`] while the guest dirties its memory faster
/// than the stream can take it.
fn wait_switchover(qmp: &mut Qmp, limit_ms: u64) -> Result<(), String> {
    let mut allowance = Allowance::new(limit_ms);
    qmp.wait_migration_state_with("pre-switchover", |q, waited| match allowance.tick(waited) {
        None => Ok(()),
        Some(limit) => {
            eprintln!(
                "spindle: vm snapshot: the guest writes its memory faster than it is saved; \
                 letting QEMU stop it for up to {limit} ms"
            );
            downtime(q, limit)
        }
    })
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
        let snaps = ctl(control, VmRequest::SnapshotList { name: d.name.clone() })?;
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
        ctl(
            control,
            VmRequest::Quiesce {
                name: d.name.clone(),
                lease_s: Some(LEASE_S),
            },
        )?;
        undo.quiesced.push(d.name.clone());
    }
    for d in disks.iter().filter(|d| d.name != vm_disk.name) {
        ctl(
            control,
            VmRequest::SnapshotCreate {
                name: d.name.clone(),
                snapshot: name.to_string(),
                vmstate: None,
                live: false,
            },
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
    (live, max_pause_ms): (bool, u64),
    undo: &mut Undo,
) -> Result<u64, String> {
    if live {
        for d in disks {
            ctl(
                control,
                VmRequest::KeepImage {
                    name: d.name.clone(),
                    keep: true,
                    lease_s: Some(LEASE_S),
                },
            )?;
            undo.kept.push(d.name.clone());
        }
        switchover_pause(qmp, true)?;
    } else {
        quiesce_and_snapshot(control, disks, vm_disk, name, undo)?;
    }
    let sock = super::socket_beside(control, "vmstate");
    let req = VmRequest::SnapshotCreate {
        name: vm_disk.name.clone(),
        snapshot: name.to_string(),
        vmstate: Some(sock.clone()),
        live,
    };
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
                    wait_switchover(qmp, downtime_limit(max_pause_ms))?;
                    let at = Instant::now();
                    undo.paused = Some(at);
                    quiesce_and_snapshot(control, disks, vm_disk, name, undo)?;
                    tracing::debug!(ms = ms(at), "vm snapshot: disks quiesced at the switch-over");
                    qmp.execute("migrate-continue", json!({"state": "pre-switchover"}))?;
                }
                let m = qmp.wait_migration_done()?;
                tracing::debug!(ms = ms(started), "vm snapshot: QEMU's migration ended");
                if let (true, Some(d)) = (live, m["downtime"].as_u64()) {
                    undo.switched = Some((Duration::from_millis(d), Instant::now()));
                }
                Ok(())
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
    tracing::debug!(ms = ms(started), "vm snapshot: the daemon committed the snapshot");
    undo.made.push(vm_disk.name.clone());
    Ok(reply["snapshot"]["vm_state_size"].as_u64().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pause_allowance_doubles_every_five_seconds_up_to_its_cap() {
        let mut a = Allowance::new(25);
        let s = Duration::from_secs;
        assert_eq!(a.tick(s(0)), None);
        assert_eq!(a.tick(s(4)), None);
        assert_eq!(a.tick(s(5)), Some(50));
        assert_eq!(a.tick(s(9)), None);
        assert_eq!(a.tick(s(10)), Some(100));
        let mut last = 100;
        for t in 3..40 {
            if let Some(l) = a.tick(s(5 * t)) {
                assert!(l == (last * 2).min(MAX_DOWNTIME_MS));
                last = l;
            }
        }
        assert_eq!(last, MAX_DOWNTIME_MS);
        assert_eq!(a.tick(s(1000)), None, "no change past the cap");
        assert_eq!(downtime_limit(100), 25);
        assert_eq!(downtime_limit(2), 1);
    }
}
