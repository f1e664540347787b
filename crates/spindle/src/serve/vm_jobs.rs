//! Progress of the VM-state streams the daemon runs (`snapshot_create`
//! with `vmstate`, `vmstate_load`), for the `vm_jobs` control request: a
//! client polls it on another connection while its request runs.

use serde_json::{json, Value};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

struct Job {
    id: u64,
    export: String,
    snapshot: String,
    kind: &'static str,
    bytes: Arc<AtomicU64>,
    total: Option<u64>,
    started: Instant,
}

static JOBS: Mutex<Vec<Job>> = Mutex::new(Vec::new());
static NEXT: AtomicU64 = AtomicU64::new(1);

fn jobs() -> std::sync::MutexGuard<'static, Vec<Job>> {
    JOBS.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running stream, listed until dropped.
pub struct Running {
    id: u64,
    bytes: Arc<AtomicU64>,
}

impl Running {
    /// Lists a `kind` (`save` or `load`) stream of `snapshot` on `export`,
    /// of `total` bytes when known.
    pub fn start(export: &str, snapshot: &str, kind: &'static str, total: Option<u64>) -> Running {
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let bytes = Arc::new(AtomicU64::new(0));
        jobs().push(Job {
            id,
            export: export.to_string(),
            snapshot: snapshot.to_string(),
            kind,
            bytes: bytes.clone(),
            total,
            started: Instant::now(),
        });
        Running { id, bytes }
    }

    /// `r`, counting what is read from it into this job.
    pub fn reader<R: Read>(&self, r: R) -> Counting<R> {
        Counting {
            inner: r,
            n: self.bytes.clone(),
        }
    }

    /// `w`, counting what is written to it into this job.
    pub fn writer<W: Write>(&self, w: W) -> Counting<W> {
        Counting {
            inner: w,
            n: self.bytes.clone(),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        jobs().retain(|j| j.id != self.id);
    }
}

/// A stream whose bytes are counted.
pub struct Counting<T> {
    /// The stream.
    pub inner: T,
    n: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.n.fetch_add(k as u64, Ordering::Relaxed);
        Ok(k)
    }
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let k = self.inner.write(buf)?;
        self.n.fetch_add(k as u64, Ordering::Relaxed);
        Ok(k)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The `vm_jobs` reply: every running stream.
pub fn list() -> Value {
    let jobs: Vec<Value> = jobs()
        .iter()
        .map(|j| {
            let bytes = j.bytes.load(Ordering::Relaxed);
            let secs = j.started.elapsed().as_secs_f64();
            json!({"export": j.export, "snapshot": j.snapshot, "kind": j.kind, "bytes": bytes,
                   "total": j.total, "seconds": secs,
                   "mib_per_s": bytes as f64 / (1 << 20) as f64 / secs.max(1e-3)})
        })
        .collect();
    json!({"ok": true, "jobs": jobs})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_is_listed_with_its_bytes_until_it_ends() {
        let job = Running::start("e1", "s", "load", Some(10));
        let mut w = job.writer(Vec::new());
        w.write_all(b"hello").unwrap();
        let l = list();
        let me = l["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["export"] == "e1")
            .cloned();
        assert_eq!(me.unwrap()["bytes"], 5);
        drop(job);
        assert!(!list()["jobs"].as_array().unwrap().iter().any(|j| j["export"] == "e1"));
    }
}
