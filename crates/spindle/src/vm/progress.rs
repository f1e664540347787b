//! A progress line for a VM-state stream on a terminal: the daemon's
//! `vm_jobs` polled from a thread of its own while the request runs.

use super::ctl;
use crate::protocol::VmRequest;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use std::io::IsTerminal;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How often the daemon is asked.
const POLL: Duration = Duration::from_millis(200);

/// The progress line of one stream, shown until [`Watch::finish`].
pub struct Watch {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watch {
    /// Shows the progress of the `kind` stream of `snapshot` on `export`
    /// (bytes, MiB/s, and a bar when its size is known), on a terminal
    /// only.
    pub fn start(control: &Path, export: &str, snapshot: &str, kind: &'static str) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        if !std::io::stderr().is_terminal() {
            return Watch { stop, thread: None };
        }
        let (control, export, snapshot, done) = (
            control.to_owned(),
            export.to_string(),
            snapshot.to_string(),
            stop.clone(),
        );
        let thread = std::thread::spawn(move || {
            let bar = ProgressBar::new_spinner();
            let mut sized = false;
            while !done.load(Ordering::Acquire) {
                let jobs = ctl(&control, VmRequest::VmJobs {}).unwrap_or(Value::Null);
                let job = jobs["jobs"].as_array().and_then(|a| {
                    a.iter()
                        .find(|j| j["export"] == json!(export) && j["snapshot"] == json!(snapshot) && j["kind"] == kind)
                        .cloned()
                });
                if let Some(j) = job {
                    if let (Some(total), false) = (j["total"].as_u64(), sized) {
                        bar.set_length(total);
                        sized = true;
                    }
                    bar.set_position(j["bytes"].as_u64().unwrap_or(0));
                    bar.set_message(format!("{:.0} MiB/s", j["mib_per_s"].as_f64().unwrap_or(0.0)));
                    let template = if sized {
                        "    {bar:40} {bytes}/{total_bytes} {msg}"
                    } else {
                        "    VM state {bytes} {msg}"
                    };
                    bar.set_style(
                        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()),
                    );
                }
                std::thread::sleep(POLL);
            }
            bar.finish_and_clear();
        });
        Watch {
            stop,
            thread: Some(thread),
        }
    }

    /// Ends the line.
    pub fn finish(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
