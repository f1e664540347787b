//! A test guest (Debian's kernel under TCG, tests/guest/build.sh) that keeps
//! running while the test reads its console line by line, talks to it on
//! its serial input and drives QEMU over QMP: for restarts of Spindle under
//! a running guest and live migration.
#![allow(dead_code)]

use super::qemu::Qmp;
use super::serve::guest_dir;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Guest RAM in MiB (memfd, shared with the vhost-user backends).
pub const MEM_MB: u32 = 512;

/// Serializes the guest tests of one test binary: two TCG guests on this
/// machine's two cores would slow each other past the tests' time limits.
pub fn one_at_a_time() -> MutexGuard<'static, ()> {
    static ONE: Mutex<()> = Mutex::new(());
    ONE.lock().unwrap_or_else(|e| e.into_inner())
}

/// The guest's initramfs: the base archive plus `test.sh` (`script`) and,
/// with `gio`, the workload tool at `/gio`.
pub fn initrd(work: &Path, script: &str, gio: bool) -> PathBuf {
    let g = guest_dir();
    let t = work.join("guest-test");
    std::fs::create_dir_all(&t).unwrap();
    std::fs::write(t.join("test.sh"), script).unwrap();
    let mut files = "test.sh\n".to_string();
    if gio {
        std::fs::copy(super::gio::binary(), t.join("gio")).unwrap();
        files.push_str("gio\n");
    }
    let mut cpio = Command::new("sh")
        .arg("-c")
        .arg("cpio -o -H newc 2>/dev/null | gzip")
        .current_dir(&t)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run cpio (apt-get install -y cpio)");
    cpio.stdin.take().unwrap().write_all(files.as_bytes()).unwrap();
    let out = cpio.wait_with_output().unwrap();
    assert!(out.status.success() && !out.stdout.is_empty(), "cpio failed");
    let mut image = std::fs::read(g.join("base.cpio.gz")).unwrap();
    image.extend_from_slice(&out.stdout);
    let path = work.join("initrd.gz");
    std::fs::write(&path, image).unwrap();
    path
}

/// vCPUs of the test guest.
pub const SMP: u32 = 2;

/// QEMU's arguments for the test guest with one vhost-user-blk disk per
/// `(socket, queues)`; `reconnect` makes QEMU reconnect to a restarted
/// backend every second.
pub fn guest_args(initrd: &Path, disks: &[(&Path, u16)], reconnect: bool) -> Vec<String> {
    guest_args_smp(initrd, disks, reconnect, SMP)
}

/// [`guest_args`] with `smp` vCPUs.
pub fn guest_args_smp(initrd: &Path, disks: &[(&Path, u16)], reconnect: bool, smp: u32) -> Vec<String> {
    let smp = smp.to_string();
    let mut args: Vec<String> = [
        "-accel",
        "tcg",
        "-m",
        &MEM_MB.to_string(),
        "-smp",
        &smp,
        "-display",
        "none",
        "-nodefaults",
        "-serial",
        "stdio",
        "-no-reboot",
        "-object",
        &format!("memory-backend-memfd,id=mem,size={MEM_MB}M,share=on"),
        "-numa",
        "node,memdev=mem",
        "-append",
        "console=ttyS0 quiet panic=-1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(["-kernel".into(), guest_dir().join("vmlinuz").display().to_string()]);
    args.extend(["-initrd".into(), initrd.display().to_string()]);
    let reconnect = if reconnect { ",reconnect=1" } else { "" };
    for (i, (sock, queues)) in disks.iter().enumerate() {
        args.extend([
            "-chardev".into(),
            format!("socket,id=c{i},path={}{reconnect}", sock.display()),
        ]);
        args.extend([
            "-device".into(),
            format!("vhost-user-blk-pci,chardev=c{i},num-queues={queues}"),
        ]);
    }
    args
}

#[derive(Default)]
struct Console {
    lines: Mutex<(Vec<String>, bool)>,
    grew: Condvar,
}

/// A running guest: its console as it comes, its serial input, its QMP.
pub struct Vm {
    /// Name in messages and file names.
    pub name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    console: Arc<Console>,
    /// QEMU's QMP connection.
    pub qmp: Qmp,
    qmp_sock: PathBuf,
    err_log: PathBuf,
}

impl Vm {
    /// Starts QEMU for the guest; with `incoming` (a migration URI) it waits
    /// for a migration instead of booting. The chardevs reconnect.
    pub fn start(work: &Path, name: &str, initrd: &Path, disks: &[(&Path, u16)], incoming: Option<&str>) -> Vm {
        Vm::start_smp(work, name, initrd, disks, incoming, SMP)
    }

    /// [`Vm::start`] with `smp` vCPUs.
    pub fn start_smp(
        work: &Path,
        name: &str,
        initrd: &Path,
        disks: &[(&Path, u16)],
        incoming: Option<&str>,
        smp: u32,
    ) -> Vm {
        super::need("qemu-system-x86_64");
        let qmp_sock = work.join(format!("{name}.qmp"));
        let err_log = work.join(format!("{name}.qemu-stderr"));
        let mut args = guest_args_smp(initrd, disks, true, smp);
        // QEMU serves one client per QMP socket: a second one for
        // `spindle vm`.
        let second = work.join(format!("{name}-spindle.qmp"));
        args.extend(["-qmp".into(), format!("unix:{},server=on,wait=off", second.display())]);
        args.extend(["-qmp".into(), format!("unix:{},server=on,wait=off", qmp_sock.display())]);
        if let Some(uri) = incoming {
            args.extend(["-incoming".into(), uri.to_string()]);
        }
        let mut child = Command::new("qemu-system-x86_64")
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&err_log).unwrap())
            .spawn()
            .expect("start qemu-system-x86_64");
        let console = Arc::new(Console::default());
        let out = child.stdout.take().unwrap();
        let c = console.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(out);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                let n = r.read_until(b'\n', &mut buf).unwrap_or(0);
                let mut l = c.lines.lock().unwrap();
                if n == 0 {
                    l.1 = true;
                    c.grew.notify_all();
                    return;
                }
                let line = String::from_utf8_lossy(&buf).replace('\r', "");
                l.0.push(line.trim_end_matches('\n').to_string());
                c.grew.notify_all();
            }
        });
        let stdin = child.stdin.take();
        let qmp = Qmp::connect(&qmp_sock, &mut child);
        Vm {
            name: name.to_string(),
            child,
            stdin,
            console,
            qmp,
            qmp_sock,
            err_log,
        }
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Types `line` on the guest's serial console.
    pub fn send(&mut self, line: &str) {
        let s = self.stdin.as_mut().expect("stdin");
        s.write_all(format!("{line}\n").as_bytes())
            .expect("write to QEMU's stdin");
        s.flush().unwrap();
    }

    /// The index the next console line will have.
    pub fn mark(&self) -> usize {
        self.console.lines.lock().unwrap().0.len()
    }

    /// The console so far.
    pub fn console(&self) -> String {
        self.console.lines.lock().unwrap().0.join("\n")
    }

    /// What QEMU printed on stderr.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err_log).unwrap_or_default()
    }

    /// Waits (at most `limit`) for a console line from index `from` on
    /// that contains `pat`; returns its index and text. Fails the test with
    /// the console and QEMU's stderr when none comes.
    pub fn wait_line(&self, from: usize, pat: &str, limit: Duration) -> (usize, String) {
        self.wait_any(from, &[pat], limit)
    }

    /// [`Vm::wait_line`] for the first line that contains any of `pats`.
    pub fn wait_any(&self, from: usize, pats: &[&str], limit: Duration) -> (usize, String) {
        let deadline = Instant::now() + limit;
        let mut l = self.console.lines.lock().unwrap();
        loop {
            if let Some(i) = (from..l.0.len()).find(|&i| pats.iter().any(|p| l.0[i].contains(p))) {
                return (i, l.0[i].clone());
            }
            let now = Instant::now();
            if l.1 || now >= deadline {
                let why = if l.1 { "the console closed" } else { "timed out" };
                let text = l.0.join("\n");
                drop(l);
                panic!(
                    "{}: no console line with {pats:?} ({why} after {limit:?}):\n{text}\n--- QEMU stderr:\n{}",
                    self.name,
                    self.stderr()
                );
            }
            l = self.console.grew.wait_timeout(l, deadline - now).unwrap().0;
        }
    }

    /// Waits for QEMU to exit (the guest powers off) at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                // The reader thread drains what is left of the console.
                let mut l = self.console.lines.lock().unwrap();
                while !l.1 {
                    l = self.console.grew.wait_timeout(l, Duration::from_secs(5)).unwrap().0;
                }
                return st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "{}: QEMU did not exit within {limit:?}:\n{}\n--- QEMU stderr:\n{}",
                    self.name,
                    self.console(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills QEMU (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Polls `query-status` until the VM runs (at most `limit`).
    pub fn wait_running(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let st = self.qmp.execute("query-status", serde_json::json!({}));
            if st["status"] == "running" {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{}: not running after {limit:?}: {st}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.qmp_sock);
    }
}
