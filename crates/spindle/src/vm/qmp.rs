//! A small QMP client: the greeting, `qmp_capabilities`, then commands
//! with an id each; events are skipped.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// How long a command may take to answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long QEMU may take to greet: it serves one client per socket,
/// and a second one waits unanswered.
const GREETING_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest reply line accepted.
const MAX_LINE: usize = 16 << 20;

/// A QMP connection in command mode.
pub struct Qmp {
    read: BufReader<UnixStream>,
    write: UnixStream,
    next_id: u64,
    /// The QEMU process (`SO_PEERCRED` of the socket).
    pub pid: Option<u32>,
    path: String,
}

impl Qmp {
    /// Connects to the QMP socket at `path`, reads the greeting and
    /// enters command mode.
    pub fn connect(path: &Path) -> Result<Qmp, String> {
        let p = path.display().to_string();
        let s = UnixStream::connect(path).map_err(|e| format!("QMP socket {p}: {e}"))?;
        s.set_read_timeout(Some(REPLY_TIMEOUT))
            .map_err(|e| format!("QMP socket {p}: {e}"))?;
        let pid = spindle_vhost::export::peer_pid(s.as_fd());
        let write = s.try_clone().map_err(|e| format!("QMP socket {p}: {e}"))?;
        let mut q = Qmp {
            read: BufReader::new(s),
            write,
            next_id: 1,
            pid,
            path: p,
        };
        q.read
            .get_ref()
            .set_read_timeout(Some(GREETING_TIMEOUT))
            .map_err(|e| format!("QMP socket {}: {e}", q.path))?;
        let greeting = q.line().map_err(|e| {
            format!(
                "{e} (no greeting within {} s: QEMU serves one client per QMP socket; \
                 give it a -qmp socket of its own for spindle vm)",
                GREETING_TIMEOUT.as_secs()
            )
        })?;
        q.read
            .get_ref()
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .map_err(|e| format!("QMP socket {}: {e}", q.path))?;
        if greeting.get("QMP").is_none() {
            return Err(format!("QMP socket {}: no QMP greeting: {greeting}", q.path));
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn line(&mut self) -> Result<Value, String> {
        let mut buf = Vec::new();
        let n = (&mut self.read)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut buf)
            .map_err(|e| format!("QMP socket {}: {e}", self.path))?;
        if n == 0 {
            return Err(format!("QMP socket {}: QEMU closed the connection", self.path));
        }
        serde_json::from_slice(&buf).map_err(|e| format!("QMP socket {}: bad reply: {e}", self.path))
    }

    /// Runs `cmd` with `args`; its `return` value, or QEMU's error text.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value, String> {
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({"execute": cmd, "arguments": args, "id": id});
        writeln!(self.write, "{msg}").map_err(|e| format!("QMP socket {}: {e}", self.path))?;
        loop {
            let v = self.line()?;
            if v.get("event").is_some() || v.get("id") != Some(&json!(id)) {
                continue;
            }
            if let Some(e) = v.get("error") {
                let desc = e.get("desc").and_then(Value::as_str).unwrap_or("error");
                return Err(format!("QMP {cmd}: {desc}"));
            }
            return Ok(v.get("return").cloned().unwrap_or(Value::Null));
        }
    }

    /// [`Qmp::execute`] with a reply timeout of `limit` for this command
    /// (one that QEMU carries out before it answers, such as preallocating
    /// guest RAM).
    pub fn execute_within(&mut self, cmd: &str, args: Value, limit: Duration) -> Result<Value, String> {
        let set = |q: &Qmp, t| {
            q.read
                .get_ref()
                .set_read_timeout(Some(t))
                .map_err(|e| format!("QMP socket {}: {e}", q.path))
        };
        set(self, limit)?;
        let r = self.execute(cmd, args);
        set(self, REPLY_TIMEOUT)?;
        r
    }

    /// Whether the guest runs (`query-status`).
    pub fn running(&mut self) -> Result<bool, String> {
        let st = self.execute("query-status", json!({}))?;
        Ok(st.get("running").and_then(Value::as_bool).unwrap_or(false))
    }

    /// Waits for the running migration to reach `state` (e.g.
    /// `pre-switchover`), polling every millisecond.
    pub fn wait_migration_state(&mut self, state: &str) -> Result<(), String> {
        self.wait_migration_state_with(state, |_, _| Ok(()))
    }

    /// As [`Qmp::wait_migration_state`], calling `tick` with the time
    /// waited so far between two polls (to change parameters meanwhile).
    pub fn wait_migration_state_with(
        &mut self,
        state: &str,
        mut tick: impl FnMut(&mut Qmp, Duration) -> Result<(), String>,
    ) -> Result<(), String> {
        let start = std::time::Instant::now();
        loop {
            tick(self, start.elapsed())?;
            let m = self.execute("query-migrate", json!({}))?;
            match m.get("status").and_then(Value::as_str).unwrap_or("") {
                s if s == state => {
                    tracing::debug!(ram = %m["ram"], "QEMU's migration is {state}");
                    return Ok(());
                }
                "failed" | "cancelled" | "completed" => {
                    let why = m.get("error-desc").and_then(Value::as_str).unwrap_or("no reason given");
                    return Err(format!("the migration of the VM state ended before {state}: {why}"));
                }
                _ => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }

    /// Waits for the running migration to finish; its total bytes.
    pub fn wait_migration(&mut self) -> Result<u64, String> {
        Ok(self.wait_migration_done()?["ram"]["total"].as_u64().unwrap_or(0))
    }

    /// Waits for the running migration to finish; QEMU's last
    /// `query-migrate` answer (with `downtime`, in ms, for a live one).
    pub fn wait_migration_done(&mut self) -> Result<Value, String> {
        loop {
            let m = self.execute("query-migrate", json!({}))?;
            match m.get("status").and_then(Value::as_str).unwrap_or("") {
                "completed" => {
                    tracing::debug!(ram = %m["ram"], downtime = %m["downtime"], "QEMU's migration completed");
                    return Ok(m);
                }
                "failed" | "cancelled" => {
                    let why = m.get("error-desc").and_then(Value::as_str).unwrap_or("no reason given");
                    return Err(format!("the migration of the VM state failed: {why}"));
                }
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }
}
