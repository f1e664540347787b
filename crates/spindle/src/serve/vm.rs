//! Control requests for VM snapshots (`spindle vm`, docs/control.md):
//! which exports a QEMU process uses, quiescing them, and internal
//! snapshots of their open qcow2 images, with VM state streamed from a
//! socket this daemon listens on.

use super::server::Server;
use super::vm_record;
use crate::error::{CliResult, Error};
pub use crate::protocol::VmRequest;
use serde_json::{json, Value};
use spindle_block::formats::qcow2::snapshot::Snapshot;
use spindle_block::formats::qcow2::{Qcow2, VmStateOptions};
use spindle_block::Node;
use spindle_export::quiesce::Hold;
use spindle_io::{Runtime, RuntimeConfig};
use spindle_vhost::Export;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// How long a quiesce waits for requests in flight.
const DRAIN_WAIT: Duration = Duration::from_secs(30);
/// A quiesce that is not resumed ends by itself after this long (default).
const DEFAULT_LEASE: u64 = 300;
/// How long the VM-state socket waits for its one connection.
const ACCEPT_WAIT: Duration = Duration::from_secs(30);
/// A VM-state stream that sends nothing for this long fails.
const STREAM_IDLE: Duration = Duration::from_secs(60);

/// Quiesces taken by `quiesce` requests, until `resume` or their lease.
struct Lease {
    export: Weak<Export>,
    id: u64,
    _hold: Hold,
}

static LEASES: Mutex<Vec<Lease>> = Mutex::new(Vec::new());
static NEXT_LEASE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn leases() -> std::sync::MutexGuard<'static, Vec<Lease>> {
    LEASES.lock().unwrap_or_else(|e| e.into_inner())
}

pub(super) fn refused(msg: String) -> Error {
    Error::Refused(msg)
}

/// Carries out `req`; the reply when it worked.
pub fn execute(server: &Server, req: VmRequest) -> CliResult<Value> {
    match req {
        VmRequest::VmDisks { pid } => {
            let disks: Vec<Value> = server
                .exports()
                .into_iter()
                .filter(|(_, e)| e.frontend_pid() == Some(pid))
                .map(|(spec, e)| {
                    json!({"name": e.dev.cfg.name, "image": spec.image, "format": e.dev.slot.info().format,
                           "size": e.dev.capacity(), "socket": e.socket.display().to_string(),
                           "readonly": e.dev.cfg.read_only})
                })
                .collect();
            Ok(json!({"ok": true, "pid": pid, "disks": disks}))
        }
        VmRequest::Quiesce { name, lease_s } => {
            let (export, _) = server.running(&name)?;
            let lease = lease_s.unwrap_or(DEFAULT_LEASE).clamp(1, 24 * 3600);
            let hold = export.quiesce(DRAIN_WAIT).map_err(refused)?;
            let id = NEXT_LEASE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            leases().push(Lease {
                export: Arc::downgrade(&export),
                id,
                _hold: hold,
            });
            let label = name.clone();
            let _ = std::thread::Builder::new().name("quiesce-lease".into()).spawn(move || {
                std::thread::sleep(Duration::from_secs(lease));
                let mut l = leases();
                if let Some(i) = l.iter().position(|x| x.id == id) {
                    l.remove(i);
                    tracing::warn!("export '{label}': quiesced for {lease} s without a resume; resumed");
                }
            });
            Ok(json!({"ok": true, "name": name, "lease_s": lease}))
        }
        VmRequest::Resume { name } => {
            let (export, _) = server.running(&name)?;
            let mut l = leases();
            let before = l.len();
            l.retain(|x| x.export.upgrade().is_some_and(|e| !Arc::ptr_eq(&e, &export)));
            Ok(json!({"ok": true, "name": name, "was_quiesced": l.len() != before}))
        }
        VmRequest::SnapshotCreate {
            name,
            snapshot,
            vmstate,
            live,
        } => create(server, &name, &snapshot, vmstate.as_deref(), live),
        VmRequest::SnapshotDelete { name, snapshot } => {
            let name = name.as_str();
            let table = with_qcow2(server, name, true, |n| async move {
                let q = qcow2(&n, name)?;
                q.snapshot_delete(&snapshot).await?;
                Ok(q.snapshot_list().await)
            })?;
            // The deleted snapshot's record goes too.
            let path = vm_record::sidecar(&vm_record::image_of(server, name)?);
            if let Err(e) = vm_record::write(&path, &table, None) {
                tracing::warn!("snapshot record {}: {e}", path.display());
            }
            Ok(json!({"ok": true, "name": name}))
        }
        VmRequest::SnapshotList { name } => {
            let name = name.as_str();
            let snaps = with_qcow2(server, name, false, |n| async move {
                Ok(qcow2(&n, name)?.snapshot_list().await)
            })?;
            let records = vm_record::read(&vm_record::sidecar(&vm_record::image_of(server, name)?));
            let list: Vec<Value> = snaps
                .iter()
                .map(|s| {
                    let mut v = snapshot_json(s);
                    v["pause_ms"] = vm_record::find(&records, s).map_or(Value::Null, |r| r["pause_ms"].clone());
                    v
                })
                .collect();
            Ok(json!({"ok": true, "name": name, "snapshots": list}))
        }
        VmRequest::SnapshotApply { name, snapshot } => super::vm_restore::apply(server, &name, &snapshot),
        VmRequest::VmstateLoad {
            name,
            snapshot,
            vmstate,
        } => super::vm_restore::load(server, &name, &snapshot, &vmstate),
        VmRequest::SnapshotRecord {
            name,
            snapshot,
            pause_ms,
        } => vm_record::record(server, &name, &snapshot, pause_ms),
        VmRequest::VmJobs {} => Ok(super::vm_jobs::list()),
        VmRequest::KeepImage { name, keep, lease_s } => super::vm_live::keep_image(server, &name, keep, lease_s),
    }
}

/// What a reply says of a snapshot.
pub(super) fn snapshot_json(s: &Snapshot) -> Value {
    json!({"id": s.id, "name": s.name, "date_sec": s.date_sec, "date_nsec": s.date_nsec,
           "vm_clock_nsec": s.vm_clock_nsec, "vm_state_size": s.vm_state_size, "disk_size": s.disk_size})
}

/// Runs `f` on the open qcow2 image of export `name`, on a runtime of this
/// thread, holding the export's change gate (no resize or remove
/// meanwhile). A raw image is refused by name; so is a read-only export
/// when `write`.
pub(super) fn with_qcow2<T, F, Fut>(server: &Server, name: &str, write: bool, f: F) -> CliResult<T>
where
    F: FnOnce(Arc<Node>) -> Fut,
    Fut: std::future::Future<Output = CliResult<T>>,
{
    let (export, gate) = server.running(name)?;
    let dev = &export.dev;
    let format = dev.slot.info().format;
    if format != "qcow2" {
        return Err(refused(format!(
            "export '{name}' serves a {format} image; internal snapshots need qcow2"
        )));
    }
    if write && dev.cfg.read_only {
        return Err(refused(format!("export '{name}' is read-only")));
    }
    let Some(removed) = super::server::lock_within(&gate, super::server::BUSY_TIMEOUT) else {
        return Err(refused(format!("export '{name}' is busy (a resize or a snapshot)")));
    };
    if *removed {
        return Err(refused(format!("export '{name}' is being removed")));
    }
    let node = dev.open_node()?;
    let rt = Runtime::new(RuntimeConfig {
        engine: dev.cfg.engine.engine,
        ..Default::default()
    })?;
    rt.block_on(f(node))
}

pub(super) fn qcow2<'a>(node: &'a Node, name: &str) -> CliResult<&'a Qcow2> {
    match node {
        Node::Qcow2(q) => Ok(q),
        _ => Err(refused(format!("export '{name}': its image is not qcow2"))),
    }
}

/// `snapshot_create`: quiesces the export for the snapshot's duration,
/// then takes it, with the VM state read from one connection to
/// `vmstate` when given.
fn create(server: &Server, name: &str, snapshot: &str, vmstate: Option<&Path>, live: bool) -> CliResult<Value> {
    if snapshot.is_empty() || snapshot.len() > 1024 || snapshot.chars().any(char::is_control) {
        return Err(refused(
            "a snapshot name is 1 to 1024 bytes without control characters".into(),
        ));
    }
    let (export, _) = server.running(name)?;
    let started = Instant::now();
    let listener = match vmstate {
        Some(p) => Some(listen(p).map_err(|e| refused(format!("VM state socket {}: {e}", p.display())))?),
        None => None,
    };
    let listening = &listener;
    let res = (|| {
        if live && listening.is_none() {
            return Err(refused("a live snapshot needs vmstate".into()));
        }
        let _hold = if live {
            None
        } else {
            Some(export.quiesce(DRAIN_WAIT).map_err(refused)?)
        };
        let export = &export;
        with_qcow2(server, name, true, |node| async move {
            let q = qcow2(&node, name)?;
            if q.snapshot_list().await.iter().any(|s| s.name == snapshot) {
                return Err(refused(format!(
                    "export '{name}': a snapshot named '{snapshot}' already exists"
                )));
            }
            match listening {
                None => Ok(q.snapshot_create(snapshot, 0, 0).await?),
                Some((l, path)) => {
                    let conn = accept(l).map_err(|e| refused(format!("VM state socket {}: {e}", path.display())))?;
                    let job = super::vm_jobs::Running::start(name, snapshot, "save", None);
                    // A stream that is not whole fails the save, which
                    // rolls the snapshot back (vm_stream).
                    let stream = super::vm_stream::Checked::new(job.reader(conn));
                    let src: Box<dyn std::io::Read + Send> = if live {
                        Box::new(super::vm_live::QuiescedAtEnd::new(stream, export))
                    } else {
                        Box::new(stream)
                    };
                    Ok(q.save_vmstate(snapshot, src, VmStateOptions::default()).await?)
                }
            }
        })
    })();
    if let Some((_, p)) = &listener {
        let _ = std::fs::remove_file(p);
    }
    if let (Err(e), Some(_)) = (&res, &listener) {
        // The client that asked may be gone (it died with QEMU): say it here too.
        tracing::warn!("export '{name}': snapshot '{snapshot}' with VM state not taken: {e}");
    }
    let sn = res?;
    Ok(json!({"ok": true, "name": name, "snapshot": snapshot_json(&sn),
              "seconds": started.elapsed().as_secs_f64()}))
}

/// Listens at `path`, which must not exist: bound under a temporary name
/// and renamed into place, so the path appears only once it accepts
/// connections (a client may wait for it to exist, then connect).
fn listen(path: &Path) -> std::io::Result<(UnixListener, PathBuf)> {
    if std::fs::symlink_metadata(path).is_ok() {
        return Err(std::io::Error::new(std::io::ErrorKind::AlreadyExists, "exists already"));
    }
    let l = spindle_io::listen_unix(path)?;
    l.set_nonblocking(true)?;
    Ok((l, path.to_owned()))
}

/// The one connection to `l`, within [`ACCEPT_WAIT`]; it reads with a
/// timeout, so a stream that stops sending fails instead of hanging.
fn accept(l: &UnixListener) -> std::io::Result<UnixStream> {
    let deadline = Instant::now() + ACCEPT_WAIT;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(STREAM_IDLE))?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("nothing connected within {} s", ACCEPT_WAIT.as_secs()),
                ))
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_snapshot_of_an_unknown_export_names_it() {
        let server = super::Server::default();
        let r = super::execute(&server, super::VmRequest::SnapshotList { name: "nope".into() });
        assert!(r.unwrap_err().to_string().contains("no export named 'nope'"));
    }
}
