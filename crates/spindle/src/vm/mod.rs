//! `spindle vm`: snapshots of a running VM whose disks `spindle serve`
//! serves, driven through QEMU's QMP socket and the daemon's control
//! socket (docs/snapshots.md, "VM snapshots").

pub mod list;
pub mod prefault;
pub mod progress;
pub mod qmp;
pub mod restore;
pub mod snapshot;

use crate::error::{CliResult, Error};
use crate::protocol::VmRequest;
use clap::{Args as ClapArgs, Subcommand};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// `spindle vm …`.
#[derive(ClapArgs)]
pub struct Args {
    /// The control socket of the `spindle serve --control` that serves the disks.
    #[arg(long, short = 'c', value_name = "PATH")]
    control: PathBuf,
    /// QEMU's QMP socket, one of its own (`-qmp unix:PATH,server=on,wait=off`).
    #[arg(long, value_name = "PATH")]
    qmp: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Snapshot the VM: every Spindle disk of it, and its VM state in one.
    Snapshot {
        /// Snapshot name.
        name: String,
        /// The export that keeps the VM state (default: the first by name).
        #[arg(long, value_name = "EXPORT")]
        vmstate_disk: Option<String>,
        /// Pre-copy the VM state while the guest runs; the guest pauses only
        /// for the switch-over (disks snapshotted, last pass).
        #[arg(long)]
        live: bool,
        /// With --live: the longest pause wanted, in ms. QEMU switches over
        /// once what is left fits in a quarter of it at the rate it measured
        /// (its downtime-limit; the rate it measures runs ahead of the
        /// disk); a guest that dirties memory faster than that is given
        /// twice as much every 5 s.
        #[arg(long = "max-pause", value_name = "MS", default_value_t = 100,
              value_parser = clap::value_parser!(u64).range(1..=60000))]
        max_pause: u64,
        /// Test only: QEMU's migration bandwidth (bytes/s), so the VM-state
        /// stream lasts long enough to be interrupted.
        #[arg(long = "x-max-bandwidth", hide = true, value_name = "BYTES")]
        max_bandwidth: Option<u64>,
    },
    /// Restore a snapshot into a QEMU started with `-incoming defer`:
    /// revert every disk, load the VM state, continue the guest.
    Restore {
        /// Snapshot name.
        name: String,
        /// Leave the guest paused once loaded.
        #[arg(long)]
        paused: bool,
        /// Allocate the guest's RAM before loading (QEMU's prealloc, on as many
        /// threads as CPUs): auto does it when the VM state is at least half the RAM.
        #[arg(long, value_enum, default_value = "auto")]
        prealloc: prefault::Prealloc,
    },
    /// List the snapshots on the VM's disks (complete, incomplete, disk-only).
    List,
    /// Delete a snapshot from every disk of the VM.
    Delete {
        /// Snapshot name.
        name: String,
    },
}

/// Runs `spindle vm`.
pub fn run(a: Args) -> CliResult<u8> {
    let r = match a.cmd {
        Cmd::Snapshot {
            name,
            vmstate_disk,
            live,
            max_bandwidth,
            max_pause,
        } => {
            let opts = snapshot::Options {
                vmstate_disk,
                live,
                max_bandwidth,
                max_pause_ms: max_pause,
            };
            snapshot::run(&a.qmp, &a.control, &name, &opts)
        }
        Cmd::Restore { name, paused, prealloc } => restore::run(&a.qmp, &a.control, &name, paused, prealloc),
        Cmd::List => list::list(&a.qmp, &a.control),
        Cmd::Delete { name } => list::delete(&a.qmp, &a.control, &name),
    };
    r.map(|()| 0).map_err(Error::Vm)
}

/// One control request; the reply when it says `ok`, else its error.
pub(crate) fn ctl(control: &Path, req: VmRequest) -> Result<Value, String> {
    let reply = crate::ctl::request(control, &req.into()).map_err(|e| e.to_string())?;
    if reply["ok"] == Value::Bool(true) {
        Ok(reply)
    } else {
        Err(reply["error"].as_str().unwrap_or("request failed").to_string())
    }
}

/// A disk of the VM, as the daemon reports it (`vm_disks`).
#[derive(Debug, Clone)]
pub struct Disk {
    /// Export name.
    pub name: String,
    /// Image path.
    pub image: String,
    /// Image format.
    pub format: String,
    /// Served read-only.
    pub readonly: bool,
}

/// The QEMU process behind `qmp` and its Spindle disks, sorted by name.
pub(crate) fn disks_of(control: &Path, pid: u32) -> Result<Vec<Disk>, String> {
    let reply = ctl(control, VmRequest::VmDisks { pid })?;
    let mut disks: Vec<Disk> = reply["disks"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|d| Disk {
                    name: d["name"].as_str().unwrap_or("").to_string(),
                    image: d["image"].as_str().unwrap_or("").to_string(),
                    format: d["format"].as_str().unwrap_or("").to_string(),
                    readonly: d["readonly"].as_bool().unwrap_or(false),
                })
                .collect()
        })
        .unwrap_or_default();
    disks.sort_by(|a, b| a.name.cmp(&b.name));
    if disks.is_empty() {
        return Err(format!(
            "QEMU process {pid} has no disk served by the daemon of {}",
            control.display()
        ));
    }
    Ok(disks)
}

/// A socket path for a VM-state stream: next to the control socket (a
/// directory the daemon can write), named for `what` and this process.
pub(crate) fn socket_beside(control: &Path, what: &str) -> PathBuf {
    let control = std::path::absolute(control).unwrap_or_else(|_| control.to_owned());
    let dir = control.parent().unwrap_or(Path::new("/tmp"));
    dir.join(format!(".spindle-{what}-{}.sock", std::process::id()))
}
