//! The jobs of this daemon: progress, state and cancellation, read by
//! `jobs` and set by the job's own thread.

use crate::error::{CliResult, Error};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Finished jobs kept for `jobs` to show (the oldest go first).
const KEEP_FINISHED: usize = 32;

/// Where a job stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Copying (or switching the export over at its end).
    Running,
    /// Done: the export serves the new chain.
    Completed,
    /// Stopped by an error; the guest's disk is as it was.
    Failed(String),
    /// Stopped by `job_cancel`; the guest's disk is as it was.
    Cancelled,
}

/// One background job.
pub struct Job {
    /// Its id (`job_cancel`).
    pub id: u64,
    /// `stream` or `commit`.
    pub kind: &'static str,
    /// The export it works on.
    pub export: String,
    /// Bytes of the disk gone through, of `total`.
    pub done: AtomicU64,
    /// Bytes to go through (the disk's size; a commit adds what the guest
    /// wrote meanwhile).
    pub total: AtomicU64,
    /// Bytes copied so far (what the rate limit counts).
    pub copied: AtomicU64,
    /// The rate limit in bytes per second (0: none).
    pub speed: u64,
    cancel: AtomicBool,
    state: Mutex<State>,
    started: Instant,
}

static JOBS: Mutex<Vec<Arc<Job>>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn jobs() -> MutexGuard<'static, Vec<Arc<Job>>> {
    JOBS.lock().unwrap_or_else(|e| e.into_inner())
}

impl Job {
    /// Whether `job_cancel` asked it to stop.
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Acquire)
    }

    /// Its state now.
    pub fn state(&self) -> State {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The job ended: `Ok` completed; an error cancelled (when asked) or
    /// failed.
    pub fn finish(&self, res: CliResult<()>) {
        let st = match res {
            Ok(()) => State::Completed,
            Err(_) if self.cancelled() => State::Cancelled,
            Err(e) => State::Failed(e.to_string()),
        };
        match &st {
            State::Failed(e) => tracing::warn!(job = self.id, export = %self.export, "{} job failed: {e}", self.kind),
            s => tracing::info!(job = self.id, export = %self.export, "{} job {:?}", self.kind, s),
        }
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = st;
    }

    /// The error a copy loop returns once the job was cancelled.
    pub fn check(&self) -> CliResult<()> {
        match self.cancelled() {
            true => Err(Error::Refused(format!("job {} was cancelled", self.id))),
            false => Ok(()),
        }
    }

    /// `n` more bytes were copied: waits as long as the rate limit asks
    /// (in short sleeps, so a cancel is seen at once).
    pub fn copied(&self, n: u64) -> CliResult<()> {
        let copied = self.copied.fetch_add(n, Ordering::AcqRel) + n;
        if self.speed > 0 {
            let due = Duration::from_secs_f64(copied as f64 / self.speed as f64);
            while self.started.elapsed() < due {
                self.check()?;
                std::thread::sleep((due - self.started.elapsed()).min(Duration::from_millis(50)));
            }
        }
        self.check()
    }

    fn json(&self) -> Value {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let copied = self.copied.load(Ordering::Acquire);
        let (state, error) = match self.state() {
            State::Running => ("running", None),
            State::Completed => ("completed", None),
            State::Failed(e) => ("failed", Some(e)),
            State::Cancelled => ("cancelled", None),
        };
        json!({"id": self.id, "type": self.kind, "export": self.export, "state": state,
               "done": self.done.load(Ordering::Acquire), "total": self.total.load(Ordering::Acquire),
               "copied": copied, "speed": self.speed, "rate": (copied as f64 / secs) as u64,
               "error": error})
    }
}

/// A new running job of `kind` on `export`; refused while another job of
/// that export runs.
pub fn register(kind: &'static str, export: &str, total: u64, speed: u64) -> CliResult<Arc<Job>> {
    let mut all = jobs();
    if let Some(j) = running_on(&all, export) {
        return Err(Error::Refused(format!(
            "export '{export}' has a {} job running (id {}); wait for it or cancel it (job_cancel)",
            j.kind, j.id
        )));
    }
    let job = Arc::new(Job {
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        kind,
        export: export.to_string(),
        done: AtomicU64::new(0),
        total: AtomicU64::new(total),
        copied: AtomicU64::new(0),
        speed,
        cancel: AtomicBool::new(false),
        state: Mutex::new(State::Running),
        started: Instant::now(),
    });
    all.push(job.clone());
    let finished: Vec<u64> = all
        .iter()
        .filter(|j| j.state() != State::Running)
        .map(|j| j.id)
        .collect();
    if finished.len() > KEEP_FINISHED {
        let drop: Vec<u64> = finished[..finished.len() - KEEP_FINISHED].to_vec();
        all.retain(|j| !drop.contains(&j.id));
    }
    Ok(job)
}

fn running_on(all: &[Arc<Job>], export: &str) -> Option<Arc<Job>> {
    all.iter()
        .find(|j| j.export == export && j.state() == State::Running)
        .cloned()
}

/// The job running on `export`, if any.
pub fn running(export: &str) -> Option<Arc<Job>> {
    running_on(&jobs(), export)
}

/// Every job, as `jobs` shows them.
pub fn list() -> Vec<Value> {
    jobs().iter().map(|j| j.json()).collect()
}

/// Asks job `id` to stop; it undoes what it did and ends `cancelled`.
pub fn cancel(id: u64) -> CliResult<()> {
    let all = jobs();
    let Some(j) = all.iter().find(|j| j.id == id) else {
        return Err(Error::Refused(format!("no job {id}")));
    };
    if j.state() != State::Running {
        return Err(Error::Refused(format!("job {id} is not running (it is over)")));
    }
    j.cancel.store(true, Ordering::Release);
    Ok(())
}
