//! QMP, and a QEMU process driven over it for VM-state tests (TCG, vCPUs
//! stopped).
#![allow(dead_code)]

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Fails (never skips) without qemu-system-x86_64.
pub fn need_qemu_system() {
    crate::common::need("qemu-system-x86_64");
}

/// A QMP connection.
pub struct Qmp {
    r: BufReader<UnixStream>,
}

impl Qmp {
    /// Connects to the QMP socket `sock` of `child` (waiting for it up to
    /// 30 s) and leaves capabilities negotiation behind.
    pub fn connect(sock: &Path, child: &mut Child) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            if let Ok(s) = UnixStream::connect(sock) {
                break s;
            }
            if let Ok(Some(st)) = child.try_wait() {
                panic!("QEMU exited ({st}) before it opened its QMP socket");
            }
            assert!(Instant::now() < deadline, "QEMU did not open its QMP socket");
            std::thread::sleep(Duration::from_millis(50));
        };
        stream.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let mut q = Qmp {
            r: BufReader::new(stream),
        };
        q.read_reply(); // greeting
        q.execute("qmp_capabilities", json!({}));
        q
    }

    fn read_reply(&mut self) -> Value {
        loop {
            let mut line = String::new();
            let n = self.r.read_line(&mut line).expect("QMP read");
            assert!(n > 0, "QEMU closed QMP");
            let v: Value = serde_json::from_str(&line).expect("QMP json");
            if v.get("event").is_none() {
                return v;
            }
        }
    }

    /// Runs a QMP command and returns the whole reply (`return` or `error`).
    pub fn request(&mut self, cmd: &str, args: Value) -> Value {
        let msg = json!({"execute": cmd, "arguments": args});
        let s = self.r.get_mut();
        s.write_all(format!("{msg}\n").as_bytes()).expect("QMP write");
        self.read_reply()
    }

    /// Runs a QMP command; panics on an error reply.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Value {
        let r = self.request(cmd, args);
        assert!(r.get("error").is_none(), "QMP {cmd} failed: {r}");
        r["return"].clone()
    }

    /// Starts streaming the VM state to `uri` (QMP migrate), unthrottled.
    pub fn migrate_start(&mut self, uri: &str) {
        self.execute("migrate-set-parameters", json!({"max-bandwidth": 100_000_000_000u64}));
        self.execute("migrate", json!({"uri": uri}));
    }

    /// Polls `query-migrate` until its status is one of `want` (at most
    /// `limit`) and returns it; a failed or cancelled migration that was
    /// not wanted fails the test.
    pub fn wait_migration(&mut self, want: &[&str], limit: Duration) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let st = self.execute("query-migrate", json!({}));
            let status = st["status"].as_str().unwrap_or("");
            if want.contains(&status) {
                return st;
            }
            assert!(
                !["failed", "cancelled"].contains(&status),
                "migration {status} (waiting for {want:?}): {st}"
            );
            assert!(
                Instant::now() < deadline,
                "migration not {want:?} within {limit:?}: {st}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `quit` without waiting for a reply.
    pub fn send_quit(&mut self) {
        let msg = json!({"execute": "quit"});
        let _ = self.r.get_mut().write_all(format!("{msg}\n").as_bytes());
    }
}

/// A stopped (`-S`) TCG guest whose RAM is backed by `ram` (share=off).
pub struct Qemu {
    child: Child,
    qmp: Qmp,
    sock: PathBuf,
}

impl Qemu {
    /// Starts QEMU with `mem_mb` of RAM from `ram` and, optionally, a qcow2 drive.
    pub fn start(dir: &Path, name: &str, ram: &Path, mem_mb: u64, drive: Option<&Path>) -> Qemu {
        let sock = dir.join(format!("{name}.qmp"));
        let mut args: Vec<String> = vec![
            "-accel".into(),
            "tcg".into(),
            "-S".into(),
            "-nodefaults".into(),
            "-display".into(),
            "none".into(),
            "-m".into(),
            format!("{mem_mb}M"),
            "-object".into(),
            format!(
                "memory-backend-file,id=ram0,size={mem_mb}M,mem-path={},share=off",
                ram.display()
            ),
            "-machine".into(),
            "pc,memory-backend=ram0".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", sock.display()),
        ];
        if let Some(d) = drive {
            args.push("-drive".into());
            args.push(format!(
                "file={},format=qcow2,if=none,id=d0,cache=writeback",
                d.display()
            ));
        }
        let mut child = Command::new("qemu-system-x86_64")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start qemu-system-x86_64");
        let qmp = Qmp::connect(&sock, &mut child);
        Qemu { child, qmp, sock }
    }

    /// Runs a QMP command; panics on an error reply.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Value {
        self.qmp.execute(cmd, args)
    }

    /// Runs an HMP command; returns its output (HMP reports errors as text).
    pub fn hmp(&mut self, line: &str) -> String {
        self.execute("human-monitor-command", json!({"command-line": line}))
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// Streams the VM state to `uri` (QMP migrate) and waits for it to finish.
    pub fn migrate(&mut self, uri: &str) {
        self.qmp.migrate_start(uri);
        self.qmp.wait_migration(&["completed"], Duration::from_secs(120));
    }
}

impl Qemu {
    /// Quits over QMP so QEMU closes its images cleanly, and waits.
    pub fn quit(mut self) {
        self.qmp.send_quit();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("QEMU did not quit");
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.sock);
    }
}

/// Guest RAM without the 0xC0000..0x100000 window, which reads ROM.
pub fn ram_without_rom(b: &[u8]) -> Vec<u8> {
    let mut v = b.to_vec();
    if v.len() >= 0x100000 {
        v[0xC0000..0x100000].fill(0);
    }
    v
}
