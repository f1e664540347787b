//! Live external snapshots and background jobs on a running export
//! (docs/jobs.md, docs/control.md): `overlay` puts a new qcow2 image on
//! top of the export's chain; `stream` and `commit` run as jobs, each on a
//! thread of its own with its own I/O runtime (never on the export's I/O
//! threads), listed by `jobs` and stopped by `job_cancel`.

mod chain;
mod commit;
mod overlay;
mod stream;
mod table;

use super::server::Server;
use serde::Deserialize;
use serde_json::{json, Value};
use spindle_block::BlockError;
use std::path::PathBuf;

pub use table::Job;

/// The request names, for the parser.
pub const COMMANDS: [&str; 5] = ["overlay", "commit", "stream", "jobs", "job_cancel"];

/// A live-snapshot or job request.
#[derive(Debug, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum JobRequest {
    /// Create a qcow2 overlay on top of the export's image and serve it.
    Overlay {
        /// Export name.
        name: String,
        /// The new image (must not exist; an absolute path).
        image: PathBuf,
    },
    /// Merge a layer of the export's chain down into a lower one.
    Commit {
        /// Export name.
        name: String,
        /// The layer to merge into (default: the top's backing file).
        #[serde(default)]
        base: Option<PathBuf>,
        /// The layer to merge (default: the active layer).
        #[serde(default)]
        top: Option<PathBuf>,
        /// Copy at most this many bytes per second (0: unlimited).
        #[serde(default)]
        speed: Option<u64>,
    },
    /// Copy the backing chain's data into the top image.
    Stream {
        /// Export name.
        name: String,
        /// Keep this layer (and those below) as the backing file.
        #[serde(default)]
        base: Option<PathBuf>,
        /// Copy at most this many bytes per second (0: unlimited).
        #[serde(default)]
        speed: Option<u64>,
    },
    /// List the jobs.
    Jobs {},
    /// Cancel a running job.
    JobCancel {
        /// Job id.
        id: u64,
    },
}

/// Carries out `req`; the reply when it worked.
pub fn execute(server: &Server, req: JobRequest) -> Result<Value, BlockError> {
    match req {
        JobRequest::Overlay { name, image } => overlay::run(server, &name, &image),
        JobRequest::Commit { name, base, top, speed } => {
            let job = commit::start(server, &name, base.as_deref(), top.as_deref(), speed.unwrap_or(0))?;
            Ok(json!({"ok": true, "name": name, "job": job}))
        }
        JobRequest::Stream { name, base, speed } => {
            let job = stream::start(server, &name, base.as_deref(), speed.unwrap_or(0))?;
            Ok(json!({"ok": true, "name": name, "job": job}))
        }
        JobRequest::Jobs {} => Ok(json!({"ok": true, "jobs": table::list()})),
        JobRequest::JobCancel { id } => {
            table::cancel(id)?;
            Ok(json!({"ok": true, "id": id}))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::request::{parse, Request};
    use super::*;

    #[test]
    fn job_requests_parse_and_refuse_unknown_fields() {
        assert!(matches!(
            parse(br#"{"cmd":"overlay","name":"a","image":"/x.qcow2"}"#),
            Ok(Request::Jobs(JobRequest::Overlay { .. }))
        ));
        assert!(matches!(
            parse(br#"{"cmd":"commit","name":"a","speed":1048576}"#),
            Ok(Request::Jobs(JobRequest::Commit {
                speed: Some(1048576),
                base: None,
                top: None,
                ..
            }))
        ));
        assert!(matches!(
            parse(br#"{"cmd":"jobs"}"#),
            Ok(Request::Jobs(JobRequest::Jobs {}))
        ));
        let e = parse(br#"{"cmd":"stream","name":"a","force":true}"#).unwrap_err();
        assert!(e.contains("unknown field `force`"), "{e}");
        let e = parse(br#"{"cmd":"job_cancel"}"#).unwrap_err();
        assert!(e.contains("missing field `id`"), "{e}");
    }

    #[test]
    fn refusals_name_the_problem() {
        let server = Server::default();
        let e = execute(
            &server,
            JobRequest::Overlay {
                name: "nope".into(),
                image: "/nonexistent/x.qcow2".into(),
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("no export named 'nope'"), "{e}");
        let e = execute(&server, JobRequest::JobCancel { id: 999_999 }).unwrap_err();
        assert!(e.to_string().contains("no job 999999"), "{e}");
    }
}
