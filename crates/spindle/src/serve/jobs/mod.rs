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
use crate::error::CliResult;
use serde_json::{json, Value};

pub use table::Job;

pub use crate::protocol::JobRequest;

/// Carries out `req`; the reply when it worked.
pub fn execute(server: &Server, req: JobRequest) -> CliResult<Value> {
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
    use super::*;

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
