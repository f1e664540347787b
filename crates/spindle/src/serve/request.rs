//! Carrying out control requests (the protocol: `crate::protocol`).

use super::server::Server;
use crate::error::{CliResult, Error};
use crate::protocol::{AddRequest, ExportRequest, Request};
use serde_json::{json, Value};

/// `none` clears every limit.
fn none_is_empty(limits: &str) -> &str {
    if limits.trim() == "none" {
        ""
    } else {
        limits
    }
}

/// Carries out `req`; the reply when it worked.
pub fn execute(server: &Server, req: Request) -> CliResult<Value> {
    match req {
        Request::Export(r) => export(server, r),
        Request::Vm(r) => super::vm::execute(server, r),
        Request::Job(r) => super::jobs::execute(server, r),
    }
}

/// Carries out a request about exports.
fn export(server: &Server, req: ExportRequest) -> CliResult<Value> {
    Ok(match req {
        ExportRequest::List {} => json!({"ok": true, "pid": std::process::id(), "exports": server.list(),
            "nbd": server.nbd().map(|f| f.describe())}),
        ExportRequest::Add(AddRequest { export }) => {
            let e = server.add(*export)?;
            json!({"ok": true, "name": e.dev.cfg.name, "socket": e.socket.display().to_string(), "size": e.dev.capacity()})
        }
        ExportRequest::Remove { name } => {
            server.remove(&name)?;
            json!({"ok": true})
        }
        ExportRequest::Stats { name } => {
            let s = server.stats(&name)?;
            let mut v = json!({"ok": true, "name": name, "stats": s.stats, "queue_requests": s.queue_requests,
                   "nbd_requests": s.nbd_requests, "nbd_connections": s.nbd_connections, "throttle": s.throttle});
            // The figures the metrics endpoint exports, from the same counters.
            if let Value::Object(o) = &mut v {
                o.extend(super::metrics::stats_json(server, &name)?);
            }
            v
        }
        ExportRequest::Throttle { name, limits } => {
            let t = server.set_throttle(&name, none_is_empty(&limits))?;
            json!({"ok": true, "name": name, "throttle": t})
        }
        ExportRequest::ThrottleGroup { name, limits } => {
            let l = super::throttle::parse(&format!("throttle group '{name}'"), none_is_empty(&limits))?;
            let g = server.throttles().define(&name, l)?;
            json!({"ok": true, "name": name, "limits": g.limits().to_string(), "members": g.members()})
        }
        ExportRequest::ThrottleGroups {} => json!({"ok": true, "groups": server.throttles().list()}),
        ExportRequest::Trace { filter } => {
            let now = match filter {
                Some(f) => crate::logging::set_trace(&f).map_err(Error::Usage)?,
                None => crate::logging::current()
                    .ok_or_else(|| Error::refused("this process has no log filter of its own"))?,
            };
            let targets: Vec<Value> = spindle_io::trace::TARGETS
                .iter()
                .map(|(t, what)| json!({"target": t, "shows": what}))
                .collect();
            json!({"ok": true, "filter": now.filter, "base": now.base, "trace": now.trace, "targets": targets})
        }
        ExportRequest::Resize { name, size, shrink } => {
            let (n, told) = server.resize(&name, &size, shrink)?;
            json!({"ok": true, "name": name, "size": n, "guest_notified": told})
        }
    })
}
