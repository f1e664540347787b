//! Control requests: parsing one request line, refusing anything but a
//! known command with exactly its fields, and carrying it out.

use super::server::Server;
use super::spec::ExportSpec;
use serde::Deserialize;
use serde_json::{json, Value};
use spindle_block::BlockError;

/// Longest request line accepted, in bytes, not counting the newline.
pub const MAX_LINE: usize = 64 * 1024;

/// The commands, for error messages.
const COMMANDS: &str =
    "list, add, remove, stats, resize, throttle, throttle_group, throttle_groups, trace, vm_disks, quiesce, resume, snapshot_create, snapshot_delete, \
     snapshot_list, overlay, commit, stream, jobs or job_cancel";

/// A control request.
#[derive(Debug, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// List the exports. (A struct variant, so unknown keys are refused.)
    List {},
    /// Start serving another export.
    Add {
        /// What to serve (boxed: it is much larger than the others).
        export: Box<ExportSpec>,
    },
    /// Stop serving an export.
    Remove {
        /// Its name.
        name: String,
    },
    /// Request statistics of an export.
    Stats {
        /// Its name.
        name: String,
    },
    /// Change an export's size.
    Resize {
        /// Its name.
        name: String,
        /// New size (`10G`, bytes).
        size: String,
        /// Allow shrinking.
        #[serde(default)]
        shrink: bool,
    },
    /// Set an export's I/O limits (of its throttle group).
    Throttle {
        /// Its name.
        name: String,
        /// QEMU's limits, `iops-total=1000,…` (`none`: none).
        limits: String,
    },
    /// Set (or make) a named throttle group's limits.
    ThrottleGroup {
        /// The group.
        name: String,
        /// QEMU's limits.
        limits: String,
    },
    /// List the named throttle groups.
    ThrottleGroups {},
    /// Show the log filter, or add trace directives to it (`off`: back
    /// to the start-up filter).
    Trace {
        /// `EnvFilter` directives, e.g. `spindle::qcow2::alloc=debug`.
        #[serde(default)]
        filter: Option<String>,
    },
    /// A VM-snapshot request (`serve/vm.rs`).
    #[serde(skip)]
    Vm(super::vm::VmRequest),
    /// A live-snapshot or job request (`serve/jobs`).
    #[serde(skip)]
    Jobs(super::jobs::JobRequest),
}

/// `none` clears every limit.
fn none_is_empty(limits: &str) -> &str {
    if limits.trim() == "none" {
        ""
    } else {
        limits
    }
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
    match obj.get("cmd") {
        None => return Err(format!("missing field `cmd` (one of {COMMANDS})")),
        Some(Value::String(c))
            if [
                "list",
                "add",
                "remove",
                "stats",
                "resize",
                "throttle",
                "throttle_group",
                "throttle_groups",
                "trace",
            ]
            .contains(&c.as_str()) => {}
        Some(Value::String(c)) if super::vm::COMMANDS.contains(&c.as_str()) => {
            return super::vm::VmRequest::deserialize(v)
                .map(Request::Vm)
                .map_err(|e| format!("bad request: {}", one_line(&e.to_string())));
        }
        Some(Value::String(c)) if super::jobs::COMMANDS.contains(&c.as_str()) => {
            return super::jobs::JobRequest::deserialize(v)
                .map(Request::Jobs)
                .map_err(|e| format!("bad request: {}", one_line(&e.to_string())));
        }
        Some(Value::String(c)) => {
            let c: String = c.chars().flat_map(char::escape_default).take(64).collect();
            return Err(format!("unknown cmd `{c}`: use {COMMANDS}"));
        }
        Some(other) => return Err(format!("`cmd` must be a string, not {}", kind(other))),
    }
    Request::deserialize(v).map_err(|e| format!("bad request: {}", one_line(&e.to_string())))
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

/// Carries out `req`; the reply when it worked.
pub fn execute(server: &Server, req: Request) -> Result<Value, BlockError> {
    Ok(match req {
        Request::List {} => json!({"ok": true, "pid": std::process::id(), "exports": server.list(),
            "nbd": server.nbd().map(|f| f.describe())}),
        Request::Add { export } => {
            let e = server.add(*export)?;
            json!({"ok": true, "name": e.dev.cfg.name, "socket": e.socket.display().to_string(), "size": e.dev.capacity()})
        }
        Request::Remove { name } => {
            server.remove(&name)?;
            json!({"ok": true})
        }
        Request::Stats { name } => {
            let s = server.stats(&name)?;
            let mut v = json!({"ok": true, "name": name, "stats": s.stats, "queue_requests": s.queue_requests,
                   "nbd_requests": s.nbd_requests, "nbd_connections": s.nbd_connections, "throttle": s.throttle});
            // The figures the metrics endpoint exports, from the same counters.
            if let Value::Object(o) = &mut v {
                o.extend(super::metrics::stats_json(server, &name)?);
            }
            v
        }
        Request::Throttle { name, limits } => {
            let t = server.set_throttle(&name, none_is_empty(&limits))?;
            json!({"ok": true, "name": name, "throttle": t})
        }
        Request::ThrottleGroup { name, limits } => {
            let l = super::throttle::parse(&format!("throttle group '{name}'"), none_is_empty(&limits))?;
            let g = server.throttles().define(&name, l)?;
            json!({"ok": true, "name": name, "limits": g.limits().to_string(), "members": g.members()})
        }
        Request::ThrottleGroups {} => json!({"ok": true, "groups": server.throttles().list()}),
        Request::Trace { filter } => {
            let now = match filter {
                Some(f) => crate::logging::set_trace(&f).map_err(BlockError::Invalid)?,
                None => crate::logging::current()
                    .ok_or_else(|| BlockError::Invalid("this process has no log filter of its own".into()))?,
            };
            let targets: Vec<Value> = spindle_io::trace::TARGETS
                .iter()
                .map(|(t, what)| json!({"target": t, "shows": what}))
                .collect();
            json!({"ok": true, "filter": now.filter, "base": now.base, "trace": now.trace, "targets": targets})
        }
        Request::Resize { name, size, shrink } => {
            let (n, told) = server.resize(&name, &size, shrink)?;
            json!({"ok": true, "name": name, "size": n, "guest_notified": told})
        }
        Request::Vm(r) => super::vm::execute(server, r)?,
        Request::Jobs(r) => super::jobs::execute(server, r)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(line: &[u8]) -> String {
        parse(line).expect_err("must be refused")
    }

    #[test]
    fn each_malformed_request_is_refused_naming_the_problem() {
        assert!(err(b"\xff{}").contains("not UTF-8 (invalid byte 0xff at offset 0)"));
        assert!(err(b"").contains("empty request"));
        assert!(err(b" \t\r").contains("empty request"));
        assert!(err(b"[]").contains("must be a JSON object, not an array"));
        assert!(err(b"42").contains("not a number"));
        assert!(err(b"{").contains("not valid JSON"));
        assert!(err(&[b'['; 10_000]).contains("recursion limit"));
        assert!(err(b"{}").contains("missing field `cmd`"));
        assert!(err(br#"{"cmd":7}"#).contains("`cmd` must be a string, not a number"));
        assert!(err(br#"{"cmd":"frob"}"#).contains("unknown cmd `frob`"));
        assert!(err(br#"{"cmd":"list","x":1}"#).contains("unknown field `x`"));
        assert!(err(br#"{"cmd":"remove","name":"a","force":true}"#).contains("unknown field `force`"));
        assert!(
            err(br#"{"cmd":"add","export":{"image":"a","socket":"b","colour":1}}"#).contains("unknown field `colour`")
        );
        assert!(err(br#"{"cmd":"remove"}"#).contains("missing field `name`"));
        assert!(err(br#"{"cmd":"resize","name":"a","size":1e999}"#).contains("not valid JSON"));
        assert!(err(br#"{"cmd":"resize","name":"a","size":18446744073709551616}"#).contains("invalid type"));
        assert!(err(br#"{"cmd":"resize","name":"a","size":"1G","shrink":"yes"}"#).contains("invalid type"));
    }

    #[test]
    fn errors_stay_on_one_line() {
        let e = err(b"{\"cmd\":\"frob\\n\\u0000\"}");
        assert!(!e.contains('\n') && !e.contains('\0'), "{e:?}");
        let e = err(b"{\"cmd\":\"remove\",\"na\\nme\":1}");
        assert!(!e.contains('\n'), "{e:?}");
    }

    #[test]
    fn good_requests_parse() {
        assert!(matches!(parse(br#" {"cmd":"list"} "#), Ok(Request::List {})));
        assert!(matches!(
            parse(br#"{"cmd":"resize","name":"a","size":"2G"}"#),
            Ok(Request::Resize { shrink: false, .. })
        ));
    }
}
