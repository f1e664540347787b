//! Control requests for VM snapshots (`spindle vm`, docs/control.md):
//! which exports a QEMU process uses, quiescing them, and internal
//! snapshots of their open qcow2 images, with VM state streamed from a
//! socket this daemon listens on.

use super::server::Server;
use super::vm_record;
use serde::Deserialize;
use serde_json::{json, Value};
use spindle_block::formats::qcow2::snapshot::Snapshot;
use spindle_block::formats::qcow2::{Qcow2, VmStateOptions};
use spindle_block::{BlockError, Node};
use spindle_export::quiesce::Hold;
use spindle_io::{Runtime, RuntimeConfig};
use spindle_vhost::Export;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// The request names, for the parser.
pub const COMMANDS: [&str; 11] = [
    "vm_disks",
    "quiesce",
    "resume",
    "snapshot_create",
    "snapshot_delete",
    "snapshot_list",
    "snapshot_apply",
    "vmstate_load",
    "snapshot_record",
    "vm_jobs",
    "keep_image",
];

/// How long a quiesce waits for requests in flight.
const DRAIN_WAIT: Duration = Duration::from_secs(30);
/// A quiesce that is not resumed ends by itself after this long (default).
const DEFAULT_LEASE: u64 = 300;
/// How long the VM-state socket waits for its one connection.
const ACCEPT_WAIT: Duration = Duration::from_secs(30);
/// A VM-state stream that sends nothing for this long fails.
const STREAM_IDLE: Duration = Duration::from_secs(60);

/// A VM-snapshot control request.
#[derive(Debug, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum VmRequest {
    /// The exports whose connected frontend is process `pid`.
    VmDisks {
        /// Process id (as `SO_PEERCRED` reports it).
        pid: u32,
    },
    /// Hold an export's requests back until `resume` (or the lease ends).
    Quiesce {
        /// Export name.
        name: String,
        /// Seconds after which the export resumes by itself.
        #[serde(default)]
        lease_s: Option<u64>,
    },
    /// Admit the export's requests again.
    Resume {
        /// Export name.
        name: String,
    },
    /// Take an internal snapshot of the export's qcow2 image.
    SnapshotCreate {
        /// Export name.
        name: String,
        /// Snapshot name.
        snapshot: String,
        /// Listen here for the VM state (QEMU's `migrate unix:PATH`).
        #[serde(default)]
        vmstate: Option<PathBuf>,
        /// The guest runs while the VM state streams (`--live`): quiesce
        /// only at the end, which the client does at the switch-over.
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
    /// Revert the export's image to a snapshot (its device unused).
    SnapshotApply {
        /// Export name.
        name: String,
        /// Snapshot id or name.
        snapshot: String,
    },
    /// Stream a snapshot's VM state into the socket QEMU listens on
    /// (`migrate-incoming unix:PATH`).
    VmstateLoad {
        /// Export name.
        name: String,
        /// Snapshot id or name.
        snapshot: String,
        /// The socket to connect to.
        vmstate: PathBuf,
    },
    /// Record the guest's pause time for a snapshot (vm_record.rs).
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
    KeepImage {
        /// Export name.
        name: String,
        /// Set or clear.
        keep: bool,
        /// Seconds after which a set mark clears itself.
        #[serde(default)]
        lease_s: Option<u64>,
    },
}

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

pub(super) fn invalid(msg: String) -> BlockError {
    BlockError::Invalid(msg)
}

/// Carries out `req`; the reply when it worked.
pub fn execute(server: &Server, req: VmRequest) -> Result<Value, BlockError> {
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
            let hold = export.quiesce(DRAIN_WAIT).map_err(invalid)?;
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
pub(super) fn with_qcow2<T, F, Fut>(server: &Server, name: &str, write: bool, f: F) -> Result<T, BlockError>
where
    F: FnOnce(Arc<Node>) -> Fut,
    Fut: std::future::Future<Output = Result<T, BlockError>>,
{
    let (export, gate) = server.running(name)?;
    let dev = &export.dev;
    let format = dev.slot.info().format;
    if format != "qcow2" {
        return Err(invalid(format!(
            "export '{name}' serves a {format} image; internal snapshots need qcow2"
        )));
    }
    if write && dev.cfg.read_only {
        return Err(invalid(format!("export '{name}' is read-only")));
    }
    let Some(removed) = super::server::lock_within(&gate, super::server::BUSY_TIMEOUT) else {
        return Err(invalid(format!("export '{name}' is busy (a resize or a snapshot)")));
    };
    if *removed {
        return Err(invalid(format!("export '{name}' is being removed")));
    }
    let node = dev.open_node()?;
    let rt = Runtime::new(RuntimeConfig {
        engine: dev.cfg.engine.engine,
        ..Default::default()
    })?;
    rt.block_on(f(node))
}

pub(super) fn qcow2<'a>(node: &'a Node, name: &str) -> Result<&'a Qcow2, BlockError> {
    match node {
        Node::Qcow2(q) => Ok(q),
        _ => Err(invalid(format!("export '{name}': its image is not qcow2"))),
    }
}

/// `snapshot_create`: quiesces the export for the snapshot's duration,
/// then takes it, with the VM state read from one connection to
/// `vmstate` when given.
fn create(
    server: &Server,
    name: &str,
    snapshot: &str,
    vmstate: Option<&Path>,
    live: bool,
) -> Result<Value, BlockError> {
    if snapshot.is_empty() || snapshot.len() > 1024 || snapshot.chars().any(char::is_control) {
        return Err(invalid(
            "a snapshot name is 1 to 1024 bytes without control characters".into(),
        ));
    }
    let (export, _) = server.running(name)?;
    let started = Instant::now();
    let listener = match vmstate {
        Some(p) => Some(listen(p).map_err(|e| invalid(format!("VM state socket {}: {e}", p.display())))?),
        None => None,
    };
    let listening = &listener;
    let res = (|| {
        if live && listening.is_none() {
            return Err(invalid("a live snapshot needs vmstate".into()));
        }
        let _hold = if live {
            None
        } else {
            Some(export.quiesce(DRAIN_WAIT).map_err(invalid)?)
        };
        let export = &export;
        with_qcow2(server, name, true, |node| async move {
            let q = qcow2(&node, name)?;
            if q.snapshot_list().await.iter().any(|s| s.name == snapshot) {
                return Err(invalid(format!(
                    "export '{name}': a snapshot named '{snapshot}' already exists"
                )));
            }
            match listening {
                None => q.snapshot_create(snapshot, 0, 0).await,
                Some((l, path)) => {
                    let conn = accept(l).map_err(|e| invalid(format!("VM state socket {}: {e}", path.display())))?;
                    let job = super::vm_jobs::Running::start(name, snapshot, "save", None);
                    // A stream that is not whole fails the save, which
                    // rolls the snapshot back (vm_stream).
                    let stream = super::vm_stream::Checked::new(job.reader(conn));
                    let src: Box<dyn std::io::Read + Send> = if live {
                        Box::new(super::vm_live::QuiescedAtEnd::new(stream, export))
                    } else {
                        Box::new(stream)
                    };
                    q.save_vmstate(snapshot, src, VmStateOptions::default()).await
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
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let l = UnixListener::bind(&tmp)?;
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
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
    use super::super::request::{parse, Request};

    #[test]
    fn vm_requests_parse_and_refuse_unknown_fields() {
        assert!(matches!(
            parse(br#"{"cmd":"snapshot_create","name":"a","snapshot":"s","vmstate":"/x.sock"}"#),
            Ok(Request::Vm(super::VmRequest::SnapshotCreate { vmstate: Some(_), .. }))
        ));
        assert!(matches!(
            parse(br#"{"cmd":"vm_disks","pid":7}"#),
            Ok(Request::Vm(super::VmRequest::VmDisks { pid: 7 }))
        ));
        let e = parse(br#"{"cmd":"quiesce","name":"a","force":true}"#).unwrap_err();
        assert!(e.contains("unknown field `force`"), "{e}");
        let e = parse(br#"{"cmd":"snapshot_list"}"#).unwrap_err();
        assert!(e.contains("missing field `name`"), "{e}");
    }

    #[test]
    fn a_snapshot_of_an_unknown_export_names_it() {
        let server = super::Server::default();
        let r = super::execute(&server, super::VmRequest::SnapshotList { name: "nope".into() });
        assert!(r.unwrap_err().to_string().contains("no export named 'nope'"));
    }
}
