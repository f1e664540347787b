//! Requests for VM snapshots (`spindle vm`, docs/snapshots.md): which
//! exports a QEMU process uses, quiescing them, internal snapshots of
//! their qcow2 images with VM state streamed through a socket.

use super::absolute;
use clap::Subcommand;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// A VM-snapshot request. The hidden ones are steps of `spindle vm`; they
/// are documented for management software but not offered by `ctl`'s help.
#[derive(Debug, Clone, Serialize, Deserialize, Subcommand)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum VmRequest {
    /// The exports whose connected frontend is process PID (QEMU's, as the kernel's
    /// SO_PEERCRED reports it).
    VmDisks {
        /// Process id.
        pid: u32,
    },
    /// Hold an export's requests back (after those in flight complete) until `resume`
    /// or the lease ends; the guest must be paused.
    Quiesce {
        /// Export name.
        name: String,
        /// Seconds after which the export resumes by itself (default 300).
        #[arg(long = "lease", value_name = "SECONDS")]
        #[serde(default)]
        lease_s: Option<u64>,
    },
    /// Admit a quiesced export's requests again.
    Resume {
        /// Export name.
        name: String,
    },
    /// Take an internal snapshot of the export's qcow2 image (quiesced meanwhile).
    SnapshotCreate {
        /// Export name.
        name: String,
        /// Snapshot name.
        snapshot: String,
        /// Listen at this path for the VM state (QEMU's `migrate unix:PATH`).
        #[arg(long, value_parser = absolute)]
        #[serde(default)]
        vmstate: Option<PathBuf>,
        /// The guest runs while the VM state streams: the client quiesces the
        /// export at the switch-over (`spindle vm snapshot --live`).
        #[arg(long)]
        #[serde(default)]
        live: bool,
    },
    /// Delete a snapshot of the export's image.
    SnapshotDelete {
        /// Export name.
        name: String,
        /// Snapshot id or name.
        snapshot: String,
    },
    /// List the snapshots of the export's image.
    SnapshotList {
        /// Export name.
        name: String,
    },
    /// Revert the export's image to a snapshot (no guest may have used the device).
    SnapshotApply {
        /// Export name.
        name: String,
        /// Snapshot id or name.
        snapshot: String,
    },
    /// Stream a snapshot's VM state into the socket QEMU listens on
    /// (`migrate-incoming unix:PATH`).
    #[command(hide = true)]
    VmstateLoad {
        /// Export name.
        name: String,
        /// Snapshot id or name.
        snapshot: String,
        /// The socket to connect to.
        #[arg(value_parser = absolute)]
        vmstate: PathBuf,
    },
    /// Record the guest's pause time for a snapshot.
    #[command(hide = true)]
    SnapshotRecord {
        /// Export name.
        name: String,
        /// Snapshot name.
        snapshot: String,
        /// How long the guest was paused, in milliseconds.
        pause_ms: f64,
    },
    /// The VM-state streams running now, with their progress.
    VmJobs {},
    /// Keep the image here when the frontend stops the device for a
    /// migration (one into a VM snapshot: `--live`).
    #[command(hide = true)]
    KeepImage {
        /// Export name.
        name: String,
        /// Set (with --keep) or clear.
        #[arg(long)]
        keep: bool,
        /// Seconds after which a set mark clears itself (default 600).
        #[arg(long = "lease", value_name = "SECONDS")]
        #[serde(default)]
        lease_s: Option<u64>,
    },
}
