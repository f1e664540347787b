//! A `spindle nbd` server for tests, and the NBD tools' install hints.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// Fails (never skips) when an NBD tool is missing, naming its package.
pub fn need_tool(tool: &str) {
    let ok = Command::new(tool)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    let pkg = match tool {
        "nbdkit" => "nbdkit",
        "fio" => "fio",
        "qemu-io" | "qemu-img" | "qemu-nbd" => "qemu-utils",
        _ => "libnbd-bin python3-libnbd",
    };
    assert!(
        ok,
        "{tool} is required for this test: install it with `apt-get install -y {pkg}`"
    );
}

/// Per 64 KiB block: (data, zero) as qemu-img map says.
pub fn qemu_map(img: &std::path::Path, size: u64) -> Vec<(bool, bool)> {
    let out = super::ok("qemu-img", &["map", "-U", "--output=json", super::p(img)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut blocks = vec![(false, false); (size / (64 << 10)) as usize];
    for e in v.as_array().unwrap() {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        for b in start / (64 << 10)..(start + len) / (64 << 10) {
            blocks[b as usize] = (e["data"].as_bool().unwrap(), e["zero"].as_bool().unwrap());
        }
    }
    blocks
}

/// A running `spindle nbd`; stopped (SIGTERM, then waited for) on drop.
pub struct NbdServer {
    child: Child,
    /// The URI it printed (`nbd://…` or `nbd+unix://…`).
    pub uri: String,
}

impl NbdServer {
    /// Starts `spindle nbd ARGS…` and waits for its start line.
    pub fn start(args: &[&str]) -> NbdServer {
        let mut child = Command::new(env!("CARGO_BIN_EXE_spindle"))
            .arg("nbd")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn spindle nbd");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("start line");
        let uri = line
            .split_whitespace()
            .find(|w| {
                ["nbd://", "nbd+unix://", "nbds://", "nbds+unix://"]
                    .iter()
                    .any(|s| w.starts_with(s))
            })
            .unwrap_or_else(|| panic!("no URI in the start line {line:?} (args {args:?})"))
            .to_string();
        NbdServer { child, uri }
    }

    /// `host:port` of a TCP server.
    pub fn tcp_addr(&self) -> String {
        let rest = self.uri.trim_start_matches("nbd://").trim_start_matches("nbds://");
        rest.split('/').next().unwrap_or_default().to_string()
    }

    /// Stops it with SIGTERM and returns whether it exited 0.
    pub fn stop(mut self) -> bool {
        self.terminate()
    }

    fn terminate(&mut self) -> bool {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().map(|s| s.success()).unwrap_or(false)
    }

    /// Waits for it to exit by itself; whether it exited 0.
    pub fn wait(mut self) -> bool {
        self.child.wait().map(|s| s.success()).unwrap_or(false)
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
        }
    }
}
