//! What Spindle records of a VM snapshot beyond QEMU's snapshot table: the
//! guest's pause time. The table entry stays exactly what QEMU writes (its
//! extra data is QEMU's to define), so the record lives in a sidecar file
//! of Spindle's next to the image, `IMAGE.spindle-snapshots.json`:
//!
//! ```json
//! {"format":1,"snapshots":[{"id":"1","name":"s1","date_sec":…,"date_nsec":…,"pause_ms":12.5}]}
//! ```
//!
//! A record counts only while a table entry has the same id, name and date
//! (a snapshot deleted by other tools, or another one of the same name,
//! is not mistaken for it); records without one are dropped on the next
//! write. The file is replaced whole (written beside it, synced, renamed).

use super::server::Server;
use super::vm::refused;
use crate::error::CliResult;
use serde_json::{json, Value};
use spindle_block::formats::qcow2::snapshot::Snapshot;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The sidecar of `image`.
pub fn sidecar(image: &str) -> PathBuf {
    PathBuf::from(format!("{image}.spindle-snapshots.json"))
}

/// The records in the sidecar at `path` (none when it is missing or not
/// readable as one).
pub fn read(path: &Path) -> Vec<Value> {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|v| v["snapshots"].as_array().cloned())
        .unwrap_or_default()
}

fn same(r: &Value, s: &Snapshot) -> bool {
    r["id"] == json!(s.id)
        && r["name"] == json!(s.name)
        && r["date_sec"] == json!(s.date_sec)
        && r["date_nsec"] == json!(s.date_nsec)
}

/// The record of `s` among `records`.
pub fn find<'a>(records: &'a [Value], s: &Snapshot) -> Option<&'a Value> {
    records.iter().find(|r| same(r, s))
}

/// Rewrites the sidecar at `path`: the records of `table`'s snapshots, with
/// `add` in place of its snapshot's old one.
pub fn write(path: &Path, table: &[Snapshot], add: Option<Value>) -> std::io::Result<()> {
    let mut keep: Vec<Value> = read(path)
        .into_iter()
        .filter(|r| table.iter().any(|s| same(r, s)))
        .collect();
    if let Some(a) = add {
        keep.retain(|r| !(r["id"] == a["id"] && r["name"] == a["name"]));
        keep.push(a);
    }
    if keep.is_empty() {
        return match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp)?;
    writeln!(f, "{}", json!({"format": 1, "snapshots": keep}))?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// `snapshot_record`: records the guest's pause time for snapshot
/// `snapshot` of export `name`.
pub fn record(server: &Server, name: &str, snapshot: &str, pause_ms: f64) -> CliResult<Value> {
    if !pause_ms.is_finite() || pause_ms < 0.0 {
        return Err(refused(format!(
            "pause_ms must be a number of milliseconds, not {pause_ms}"
        )));
    }
    let image = image_of(server, name)?;
    let table = super::vm::with_qcow2(server, name, false, |node| async move {
        Ok(super::vm::qcow2(&node, name)?.snapshot_list().await)
    })?;
    let sn = table
        .iter()
        .find(|s| s.name == snapshot)
        .ok_or_else(|| refused(format!("export '{name}' has no snapshot named '{snapshot}'")))?;
    let rec = json!({"id": sn.id, "name": sn.name, "date_sec": sn.date_sec, "date_nsec": sn.date_nsec,
                     "pause_ms": pause_ms});
    let path = sidecar(&image);
    write(&path, &table, Some(rec)).map_err(|e| refused(format!("snapshot record {}: {e}", path.display())))?;
    Ok(json!({"ok": true, "name": name, "snapshot": snapshot, "pause_ms": pause_ms}))
}

/// The image path export `name` was added with.
pub fn image_of(server: &Server, name: &str) -> CliResult<String> {
    server
        .exports()
        .into_iter()
        .find(|(_, e)| e.dev.cfg.name == name)
        .map(|(spec, _)| spec.image)
        .ok_or_else(|| refused(format!("no export named '{name}'")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(id: &str, name: &str, sec: u32) -> Snapshot {
        Snapshot {
            id: id.into(),
            name: name.into(),
            date_sec: sec,
            ..Default::default()
        }
    }

    #[test]
    fn a_record_counts_only_for_its_own_snapshot_and_goes_with_it() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("x.qcow2.spindle-snapshots.json");
        let s1 = snap("1", "s1", 100);
        let rec = |s: &Snapshot, ms: f64| json!({"id": s.id, "name": s.name, "date_sec": s.date_sec, "date_nsec": s.date_nsec, "pause_ms": ms});
        write(&path, std::slice::from_ref(&s1), Some(rec(&s1, 7.5))).unwrap();
        let r = read(&path);
        assert_eq!(find(&r, &s1).unwrap()["pause_ms"], 7.5);
        // Another snapshot of the same name (re-created by another tool).
        assert!(find(&r, &snap("1", "s1", 101)).is_none());
        let s2 = snap("2", "s2", 200);
        write(&path, &[s1.clone(), s2.clone()], Some(rec(&s2, 1.0))).unwrap();
        assert_eq!(read(&path).len(), 2);
        // s1 deleted: its record goes on the next write; none left, no file.
        write(&path, std::slice::from_ref(&s2), None).unwrap();
        assert!(find(&read(&path), &s1).is_none());
        write(&path, &[], None).unwrap();
        assert!(!path.exists());
    }
}
