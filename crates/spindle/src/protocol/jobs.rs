//! Requests for live external snapshots and background jobs: overlay,
//! commit, stream (docs/jobs.md).

use super::{absolute, bytes_per_second};
use clap::Subcommand;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// A live-snapshot or job request.
#[derive(Debug, Clone, Serialize, Deserialize, Subcommand)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum JobRequest {
    /// Create a qcow2 overlay on top of a running export's image and serve
    /// it (a live external snapshot; docs/jobs.md).
    Overlay {
        /// Export name.
        name: String,
        /// The new image (must not exist; sent as an absolute path).
        #[arg(value_parser = absolute)]
        image: PathBuf,
    },
    /// Merge the active layer (or --top) down into its backing file (or
    /// --base) while the guest runs, then serve the base (a background job).
    Commit {
        /// Export name.
        name: String,
        /// The image to merge into (default: the top's backing file).
        #[arg(long, value_parser = absolute)]
        #[serde(default)]
        base: Option<PathBuf>,
        /// The layer to merge (default: the active layer).
        #[arg(long, value_parser = absolute)]
        #[serde(default)]
        top: Option<PathBuf>,
        /// Copy at most this many bytes per second (e.g. 64M; 0: unlimited).
        #[arg(long, value_parser = bytes_per_second)]
        #[serde(default)]
        speed: Option<u64>,
    },
    /// Copy the backing chain's data into the top image while the guest
    /// runs, then drop the backing file (or keep --base); a background job.
    Stream {
        /// Export name.
        name: String,
        /// Keep this image (and those below it) as the backing file.
        #[arg(long, value_parser = absolute)]
        #[serde(default)]
        base: Option<PathBuf>,
        /// Copy at most this many bytes per second (e.g. 64M; 0: unlimited).
        #[arg(long, value_parser = bytes_per_second)]
        #[serde(default)]
        speed: Option<u64>,
    },
    /// List the background jobs: progress, state, rate.
    Jobs {},
    /// Cancel a running job; the guest's disk stays as it was.
    JobCancel {
        /// Job id (from `jobs`).
        id: u64,
    },
}
