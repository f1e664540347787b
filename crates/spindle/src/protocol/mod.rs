//! The control protocol (docs/control.md): each request the control
//! socket takes, defined once. The daemon parses a request line into a
//! [`Request`] ([`parse`]); `spindle ctl` gets the same types from its
//! command line (they derive clap's `Subcommand`) and sends them as JSON
//! (serde); `spindle vm` and `spindle libvirt` build them in code.

mod exports;
mod jobs;
mod vm;

pub use exports::{AddRequest, ExportRequest};
pub use jobs::JobRequest;
pub use vm::VmRequest;

use clap::Subcommand;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::PathBuf;
use std::sync::OnceLock;

/// Longest request line accepted, in bytes, not counting the newline.
pub const MAX_LINE: usize = 64 * 1024;

/// A control request: one of three families, each with its own executor
/// in the daemon. On the wire every request is one JSON object whose
/// `cmd` names it.
#[derive(Debug, Clone, Serialize, Subcommand)]
#[serde(untagged)]
pub enum Request {
    /// Exports: list, add, remove, stats, resize, throttling, tracing.
    #[command(flatten)]
    Export(ExportRequest),
    /// VM snapshots (`serve/vm.rs`).
    #[command(flatten)]
    Vm(VmRequest),
    /// Live snapshots and background jobs (`serve/jobs`).
    #[command(flatten)]
    Job(JobRequest),
}

impl From<ExportRequest> for Request {
    fn from(r: ExportRequest) -> Request {
        Request::Export(r)
    }
}

impl From<VmRequest> for Request {
    fn from(r: VmRequest) -> Request {
        Request::Vm(r)
    }
}

impl From<JobRequest> for Request {
    fn from(r: JobRequest) -> Request {
        Request::Job(r)
    }
}

impl Request {
    /// The request as its JSON line's object.
    pub fn to_json(&self) -> Value {
        // Serializing these types cannot fail: no maps with non-string
        // keys, no custom serializers.
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// The three families' `cmd` names, from the enums themselves (clap's
/// subcommand names, kebab-case, are serde's snake_case ones).
struct Names {
    export: Vec<String>,
    vm: Vec<String>,
    job: Vec<String>,
    all: String,
}

fn names_of<S: Subcommand>() -> Vec<String> {
    S::augment_subcommands(clap::Command::new("control"))
        .get_subcommands()
        .map(|c| c.get_name().replace('-', "_"))
        .collect()
}

fn names() -> &'static Names {
    static NAMES: OnceLock<Names> = OnceLock::new();
    NAMES.get_or_init(|| {
        let (export, vm, job) = (
            names_of::<ExportRequest>(),
            names_of::<VmRequest>(),
            names_of::<JobRequest>(),
        );
        let mut all: Vec<&str> = export.iter().chain(&vm).chain(&job).map(String::as_str).collect();
        let last = all.pop().unwrap_or_default();
        let all = format!("{} or {last}", all.join(", "));
        Names { export, vm, job, all }
    })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Parses one request line (without its newline). The error names the
/// problem in one line.
pub fn parse(line: &[u8]) -> Result<Request, String> {
    let text = std::str::from_utf8(line).map_err(|e| {
        format!(
            "request is not UTF-8 (invalid byte 0x{:02x} at offset {})",
            line[e.valid_up_to()],
            e.valid_up_to()
        )
    })?;
    let text = text.trim();
    if text.is_empty() {
        return Err("empty request: send one JSON object per line".into());
    }
    let v: Value = serde_json::from_str(text).map_err(|e| format!("request is not valid JSON: {e}"))?;
    let Value::Object(obj) = &v else {
        return Err(format!("a request must be a JSON object, not {}", kind(&v)));
    };
    let n = names();
    let bad = |e: serde_json::Error| format!("bad request: {}", one_line(&e.to_string()));
    match obj.get("cmd") {
        None => Err(format!("missing field `cmd` (one of {})", n.all)),
        Some(Value::String(c)) if n.export.contains(c) => {
            ExportRequest::deserialize(v).map(Request::Export).map_err(bad)
        }
        Some(Value::String(c)) if n.vm.contains(c) => VmRequest::deserialize(v).map(Request::Vm).map_err(bad),
        Some(Value::String(c)) if n.job.contains(c) => JobRequest::deserialize(v).map(Request::Job).map_err(bad),
        Some(Value::String(c)) => {
            let c: String = c.chars().flat_map(char::escape_default).take(64).collect();
            Err(format!("unknown cmd `{c}`: use {}", n.all))
        }
        Some(other) => Err(format!("`cmd` must be a string, not {}", kind(other))),
    }
}

/// Error texts can quote the request; keep the reply on one line.
fn one_line(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

/// A path as the daemon must see it: absolute (it runs in another
/// directory).
fn absolute(s: &str) -> Result<PathBuf, String> {
    std::path::absolute(s).map_err(|e| format!("{s}: {e}"))
}

/// A rate such as `64M`, in bytes per second.
fn bytes_per_second(s: &str) -> Result<u64, String> {
    spindle_block::parse_size(s).ok_or_else(|| format!("invalid rate '{s}' (bytes per second, e.g. 64M)"))
}

#[cfg(test)]
mod tests;
