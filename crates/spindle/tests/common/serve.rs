//! Running `spindle serve` and a test guest under QEMU (TCG).
#![allow(dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A `spindle serve` process, stopped with SIGINT (or killed on drop).
pub struct Serve {
    child: Option<Child>,
    pub log: PathBuf,
    pub control: Option<PathBuf>,
}

fn wait_for(path: &Path, child: &mut Child, log: &Path) {
    let start = Instant::now();
    while !path.exists() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "spindle serve exited ({st}) before {} appeared:\n{}",
                path.display(),
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Serve {
    /// Starts `spindle serve ARGS` in `dir` and waits for `sockets` (and
    /// the control socket, if `--control` is among the arguments).
    pub fn start(dir: &Path, args: &[&str], sockets: &[&Path]) -> Serve {
        let log = dir.join(format!("serve-{}.log", std::process::id() ^ rand_u32()));
        let f = std::fs::File::create(&log).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_spindle"))
            .arg("serve")
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .env("SPINDLE_LOG", "info")
            .spawn()
            .expect("spawn spindle serve");
        let control = args
            .iter()
            .position(|a| *a == "--control")
            .map(|i| dir.join(args[i + 1]));
        for s in sockets.iter().copied().chain(control.as_deref()) {
            wait_for(s, &mut child, &log);
        }
        Serve {
            child: Some(child),
            log,
            control,
        }
    }

    /// Uses the control socket at `path` (set by a config file), once it exists.
    pub fn use_control(&mut self, path: &Path) {
        let child = self.child.as_mut().unwrap();
        wait_for(path, child, &self.log);
        self.control = Some(path.to_owned());
    }

    /// Sends one control request and returns the reply.
    pub fn ctl(&self, req: &Value) -> Value {
        ctl_at(self.control.as_ref().expect("started without --control"), req)
    }

    /// Sends SIGINT and waits for the exit (at most 60 s).
    pub fn stop(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        // SAFETY: kill(2) on the pid of a child this process spawned.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let start = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if start.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                panic!("spindle serve did not exit within 60 s of SIGINT:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server with SIGKILL (a crash) and waits for it to end.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends `sig` to the server.
    pub fn signal(&self, sig: i32) {
        let pid = self.child.as_ref().expect("running").id() as i32;
        // SAFETY: kill(2) on the pid of a child this process spawned.
        unsafe { libc::kill(pid, sig) };
    }

    /// Waits at most `limit` for the server to exit.
    pub fn wait_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut().expect("running");
        let start = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                self.child = None;
                return Some(st);
            }
            if start.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends one control request; fails the test when no reply comes
    /// within `limit`.
    pub fn ctl_within(&self, req: &Value, limit: Duration) -> Value {
        let path = self.control.as_ref().expect("started without --control");
        let lines = exchange(path, format!("{req}\n").as_bytes(), limit);
        assert_eq!(lines.len(), 1, "{req}: want one reply, got {lines:?}");
        serde_json::from_str(&lines[0]).unwrap_or_else(|e| panic!("bad reply {:?}: {e}", lines[0]))
    }

    /// What the server printed.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A `spindle serve --config` file: an optional control socket and one
/// `[[export]]` per `(name, image, socket, more TOML lines)`.
pub fn config_text(control: Option<&Path>, exports: &[(&str, &Path, &Path, &str)]) -> String {
    let mut t = control.map_or(String::new(), |c| format!("control = \"{}\"\n", c.display()));
    for (name, image, socket, more) in exports {
        t.push_str(&format!(
            "\n[[export]]\nname = \"{name}\"\nimage = \"{}\"\nsocket = \"{}\"\n{more}",
            image.display(),
            socket.display()
        ));
    }
    t
}

/// Sends one request to the control socket at `path`.
pub fn ctl_at(path: &Path, req: &Value) -> Value {
    let mut s = UnixStream::connect(path).expect("connect control socket");
    writeln!(s, "{req}").unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad reply {line:?}: {e}"))
}

/// Sends `bytes` on one connection to the control socket at `path`,
/// closes the sending side and returns the reply lines. Fails the test
/// when the server has not closed the connection within `limit`.
pub fn exchange(path: &Path, bytes: &[u8], limit: Duration) -> Vec<String> {
    use std::io::Read;
    let mut s = UnixStream::connect(path).expect("connect control socket");
    s.set_read_timeout(Some(limit)).unwrap();
    s.set_write_timeout(Some(limit)).unwrap();
    let mut reader = s.try_clone().unwrap();
    // Read while writing: the server answers a long line before its end.
    let got = std::thread::spawn(move || {
        let mut out = Vec::new();
        let r = reader.read_to_end(&mut out);
        (r, out)
    });
    let sent = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let (r, out) = got.join().unwrap();
    let text = String::from_utf8(out).expect("replies are UTF-8");
    if let Err(e) = r {
        panic!("no end of the replies within {limit:?} ({e}); got so far: {text:?}");
    }
    sent.unwrap_or_else(|e| panic!("sending the request failed ({e}); replies: {text:?}"));
    assert!(text.is_empty() || text.ends_with('\n'), "unterminated reply: {text:?}");
    text.lines().map(str::to_string).collect()
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn rand_u32() -> u32 {
    use std::time::SystemTime;
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
}

/// Builds (once) Debian's kernel plus a busybox initramfs; returns the
/// directory holding `vmlinuz` and `base.cpio.gz`.
pub fn guest_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("guest");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/guest/build.sh");
    let o = Command::new("sh")
        .arg(&script)
        .arg(&dir)
        .output()
        .expect("run tests/guest/build.sh");
    assert!(
        o.status.success(),
        "building the test guest failed (it needs busybox-static, cpio and the Debian archive):\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    dir
}

/// Boots the guest with one vhost-user-blk disk per `(socket, queues)`
/// (vda, vdb, ...), runs `script` in it and returns the console output
/// between GUEST-START and GUEST-END.
pub fn boot(work: &Path, disks: &[(&Path, u16)], script: &str) -> String {
    boot_with(work, disks, &[], script)
}

/// [`boot`] with more QEMU arguments (other disks: `-blockdev`, `-device`).
pub fn boot_with(work: &Path, disks: &[(&Path, u16)], extra: &[String], script: &str) -> String {
    super::need("qemu-system-x86_64");
    let initrd = super::vm::initrd(work, script, false);
    let mut args = super::vm::guest_args(&initrd, disks, false);
    args.extend_from_slice(extra);
    let mut child = Command::new("qemu-system-x86_64")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu-system-x86_64");
    let start = Instant::now();
    let out = loop {
        if child.try_wait().unwrap().is_some() {
            break child.wait_with_output().unwrap();
        }
        if start.elapsed() > Duration::from_secs(240) {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!(
                "the guest did not finish in 240 s:\n{}",
                String::from_utf8_lossy(&o.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    let Some(s) = text.find("GUEST-START") else {
        panic!(
            "the guest never ran its test:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let body = &text[s..];
    assert!(body.contains("GUEST-END rc=0"), "the guest test failed:\n{body}");
    body.to_string()
}
