//! Control requests that restore a VM snapshot (`spindle vm restore`,
//! docs/control.md): reverting an export's open qcow2 image to a snapshot,
//! and streaming a snapshot's VM state into a QEMU that waits for it.

use super::server::Server;
use super::vm::{qcow2, refused, snapshot_json, with_qcow2};
use crate::error::CliResult;
use serde_json::{json, Value};
use spindle_block::formats::qcow2::VmStateOptions;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// A VM-state stream whose reader takes nothing for this long fails.
const STREAM_IDLE: Duration = Duration::from_secs(60);

/// `snapshot_apply`: reverts export `name`'s image to `snapshot`, quiesced
/// meanwhile. Only a disk no guest has used on its connection is reverted
/// (no frontend, or one waiting for an incoming migration), and only to a
/// snapshot of the export's current size (the frontend has read it).
pub fn apply(server: &Server, name: &str, snapshot: &str) -> CliResult<Value> {
    let (export, _) = server.running(name)?;
    let _hold = export.quiesce_unused().map_err(refused)?;
    let capacity = export.dev.capacity();
    let sn = with_qcow2(server, name, true, |node| async move {
        let q = qcow2(&node, name)?;
        let snaps = q.snapshot_list().await;
        let sn = snaps
            .iter()
            .find(|s| s.id == snapshot)
            .or_else(|| snaps.iter().find(|s| s.name == snapshot))
            .cloned()
            .ok_or_else(|| refused(format!("export '{name}' has no snapshot with id or name '{snapshot}'")))?;
        let size = sn.disk_size.unwrap_or(capacity);
        if size != capacity {
            return Err(refused(format!(
                "export '{name}': snapshot '{snapshot}' is of a {size}-byte disk, the export serves {capacity} \
                 bytes; resize it first"
            )));
        }
        // Durable when it returns (one header write, then a flush).
        q.snapshot_apply(&sn.id).await?;
        Ok(sn)
    })?;
    Ok(json!({"ok": true, "name": name, "snapshot": snapshot_json(&sn)}))
}

/// `vmstate_load`: connects to `path` (QEMU's `migrate-incoming
/// unix:PATH`) and writes snapshot `snapshot`'s VM state into it, read
/// ahead from the image.
pub fn load(server: &Server, name: &str, snapshot: &str, path: &Path) -> CliResult<Value> {
    let started = Instant::now();
    let conn = UnixStream::connect(path)
        .and_then(|c| c.set_write_timeout(Some(STREAM_IDLE)).map(|()| c))
        .map_err(|e| refused(format!("VM state socket {}: {e}", path.display())))?;
    let bytes = with_qcow2(server, name, false, |node| async move {
        let q = qcow2(&node, name)?;
        let sn = q
            .snapshot_list()
            .await
            .into_iter()
            .find(|s| s.id == snapshot || s.name == snapshot);
        let Some(size) = sn.map(|s| s.vm_state_size).filter(|n| *n > 0) else {
            return Err(refused(format!(
                "export '{name}' has no snapshot '{snapshot}' with VM state"
            )));
        };
        let job = super::vm_jobs::Running::start(name, snapshot, "load", Some(size));
        let (n, conn) = q
            .load_vmstate(snapshot, job.writer(conn), VmStateOptions::default())
            .await?;
        // QEMU reads the stream's end as its end.
        let _ = conn.inner.shutdown(std::net::Shutdown::Write);
        Ok(n)
    })?;
    Ok(json!({"ok": true, "name": name, "bytes": bytes, "seconds": started.elapsed().as_secs_f64()}))
}
