//! The control socket: one JSON object per line in, one per line out.
//! The protocol is documented in docs/control.md.

use super::server::Server;
use super::spec::ExportSpec;
use serde::Deserialize;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

/// Longest request line accepted.
pub const MAX_LINE: u64 = 64 * 1024;

/// A control request.
#[derive(Debug, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// List the exports.
    List,
    /// Start serving another export.
    Add {
        /// What to serve.
        export: ExportSpec,
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
}

/// Answers one request line.
pub fn handle(server: &Server, line: &str) -> Value {
    let req: Request = match serde_json::from_str(line) {
        Ok(r) => r,
        Err(e) => return json!({"ok": false, "error": format!("bad request: {e}")}),
    };
    let res = match req {
        Request::List => Ok(json!({"ok": true, "exports": server.list()})),
        Request::Add { export } => server.add(export).map(|e| {
            json!({"ok": true, "name": e.dev.cfg.name, "socket": e.socket.display().to_string(), "size": e.dev.capacity()})
        }),
        Request::Remove { name } => server.remove(&name).map(|_| json!({"ok": true})),
        Request::Stats { name } => server
            .stats(&name)
            .map(|(s, q)| json!({"ok": true, "name": name, "stats": s, "queue_requests": q})),
        Request::Resize { name, size, shrink } => server
            .resize(&name, &size, shrink)
            .map(|(n, told)| json!({"ok": true, "name": name, "size": n, "guest_notified": told})),
    };
    res.unwrap_or_else(|e| json!({"ok": false, "error": e.to_string()}))
}

/// Listens on `path` and serves requests until the process exits.
pub fn listen(path: &Path, server: Arc<Server>) -> std::io::Result<()> {
    spindle_vhost::export::claim_socket_path(path)?;
    let listener = UnixListener::bind(path)?;
    std::thread::Builder::new().name("control".into()).spawn(move || {
        for conn in listener.incoming().flatten() {
            let server = server.clone();
            let _ = std::thread::Builder::new()
                .name("control-conn".into())
                .spawn(move || serve_conn(conn, &server));
        }
    })?;
    Ok(())
}

fn serve_conn(conn: UnixStream, server: &Server) {
    let Ok(mut out) = conn.try_clone() else { return };
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = String::new();
        match (&mut reader).take(MAX_LINE).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let reply = if !line.ends_with('\n') && line.len() as u64 >= MAX_LINE {
            let reply = json!({"ok": false, "error": format!("request longer than {MAX_LINE} bytes")});
            let _ = writeln!(out, "{reply}");
            return;
        } else if line.trim().is_empty() {
            continue;
        } else {
            handle(server, line.trim())
        };
        if writeln!(out, "{reply}").is_err() {
            return;
        }
    }
}
