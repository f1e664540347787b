//! A served three-layer chain for the live-job tests (docs/jobs.md):
//! `base ← mid.qcow2 ← top.qcow2`, each layer with data of its own, and
//! the control requests and views those tests need.

use super::serve::{config_text, Serve};
use super::{ok, p, qcow2_create};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The disk's size.
pub const DISK: u64 = 32 << 20;
/// The export's name.
pub const NAME: &str = "d";

/// The images of a chain and the sockets that serve it.
pub struct Chain {
    /// The scratch directory everything lives in.
    pub dir: PathBuf,
    /// The lowest layer (raw or qcow2).
    pub base: PathBuf,
    /// The middle layer.
    pub mid: PathBuf,
    /// The active layer, which the export serves.
    pub top: PathBuf,
    /// The vhost-user socket.
    pub sock: PathBuf,
    /// The control socket.
    pub ctl: PathBuf,
}

fn io(fmt: &str, img: &Path, ops: &[&str]) {
    let mut args = vec!["-f", fmt];
    for op in ops {
        args.extend(["-c", op]);
    }
    args.push(p(img));
    ok("qemu-io", &args);
}

impl Chain {
    /// Creates the chain in `dir` (its files named `PREFIX-…`), the base
    /// in `base_fmt` (`raw` or `qcow2`). Data: the base 0x11 over
    /// [0, 24M); mid 0x22 over [4M, 12M) and zeroes over [14M, 15M); top
    /// 0x33 over [8M, 10M) and 0x34 over [20M, 21M).
    pub fn create(dir: &Path, prefix: &str, base_fmt: &str) -> Chain {
        let f = |n: &str| dir.join(format!("{prefix}-{n}"));
        let ch = Chain {
            dir: dir.to_path_buf(),
            base: f(&format!("base.{base_fmt}")),
            mid: f("mid.qcow2"),
            top: f("top.qcow2"),
            sock: f("vhost.sock"),
            ctl: f("ctl.sock"),
        };
        let size = DISK.to_string();
        ok("qemu-img", &["create", "-q", "-f", base_fmt, p(&ch.base), &size]);
        io(base_fmt, &ch.base, &["write -P 0x11 0 24M"]);
        qcow2_create(&ch.mid, &["-F", base_fmt, "-b", p(&ch.base)], None);
        io("qcow2", &ch.mid, &["write -P 0x22 4M 8M", "write -z 14M 1M"]);
        qcow2_create(&ch.top, &["-F", "qcow2", "-b", p(&ch.mid)], None);
        io("qcow2", &ch.top, &["write -P 0x33 8M 2M", "write -P 0x34 20M 1M"]);
        ch
    }

    /// Serves the top image as export [`NAME`] with a control socket.
    pub fn serve(&self) -> Serve {
        let cfg = self.dir.join(format!("{}.toml", p(&self.top)));
        std::fs::write(&cfg, config_text(Some(&self.ctl), &[(NAME, &self.top, &self.sock, "")])).unwrap();
        let mut s = Serve::start(&self.dir, &["--config", p(&cfg), "--iothreads", "1"], &[&self.sock]);
        s.use_control(&self.ctl);
        s
    }
}

/// What `img` and its backing chain read, as raw bytes (`-U`: it may be
/// served, or left locked by a killed server).
pub fn view(img: &Path) -> Vec<u8> {
    let out = img.with_extension("view");
    ok("qemu-img", &["convert", "-U", "-O", "raw", p(img), p(&out)]);
    let v = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    v
}

/// The chain of file names `qemu-img info --backing-chain` reports.
pub fn backing_chain(img: &Path) -> Vec<String> {
    let out = ok("qemu-img", &["info", "-U", "--backing-chain", "--output=json", p(img)]);
    let v: Vec<Value> = serde_json::from_str(&out).unwrap();
    v.iter().map(|i| i["filename"].as_str().unwrap().to_string()).collect()
}

/// Job `id`'s entry in `jobs`.
pub fn job(s: &Serve, id: u64) -> Value {
    let r = s.ctl(&json!({"cmd": "jobs"}));
    r["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("no job {id} in {r}"))
}

/// Waits (at most 60 s) until job `id` is over; its last entry.
pub fn wait_job(s: &Serve, id: u64) -> Value {
    let start = Instant::now();
    loop {
        let j = job(s, id);
        if j["state"] != "running" {
            return j;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "job {id} still running: {j}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends a job request that must be accepted; the job's id.
pub fn start_job(s: &Serve, req: Value) -> u64 {
    let r = s.ctl(&req);
    assert_eq!(r["ok"], true, "{req}: {r}");
    r["job"].as_u64().unwrap()
}
