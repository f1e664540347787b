//! Helpers for tests that drive the real `spindle` binary and QEMU's tools.
#![allow(dead_code)]

/// The Ceph test cluster, shared with spindle-rbd's tests.
#[path = "../../../spindle-rbd/tests/common/mod.rs"]
pub mod ceph;
pub mod gio;
pub mod handover;
pub mod jobs;
pub mod migrate;
pub mod nbd;
pub mod qcow2;
pub mod qemu;
pub mod serve;
pub mod tls;
pub mod vm;
pub mod vmsnap;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Fails (never skips) when a QEMU tool is missing, naming what to install.
pub fn need(tool: &str) {
    let ok = Command::new(tool)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    // qemu-storage-daemon comes in qemu-system-common, with qemu-system-x86.
    let install = if tool.starts_with("qemu-system") || tool == "qemu-storage-daemon" {
        "apt-get install -y qemu-system-x86 && apt-get install -y qemu-utils"
    } else {
        "apt-get install -y qemu-utils"
    };
    assert!(ok, "{tool} is required for this test: install it with `{install}`");
}

/// A scratch directory on a real file system (O_DIRECT works there, not on tmpfs).
pub fn scratch() -> tempfile::TempDir {
    let base = std::env::var("SPINDLE_TEST_DIR").unwrap_or_else(|_| "/var/tmp".into());
    tempfile::Builder::new()
        .prefix("spindle-test-")
        .tempdir_in(base)
        .expect("scratch dir")
}

/// Runs a command and returns its output.
pub fn run(cmd: &str, args: &[&str]) -> Output {
    let exe = if cmd == "spindle" {
        env!("CARGO_BIN_EXE_spindle").to_string()
    } else {
        cmd.to_string()
    };
    Command::new(&exe)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {exe}: {e}"))
}

/// Runs and asserts success; returns stdout.
pub fn ok(cmd: &str, args: &[&str]) -> String {
    let o = run(cmd, args);
    assert!(
        o.status.success(),
        "{cmd} {args:?} failed ({}):\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `qemu-img check` must call the image clean (exit 0).
pub fn assert_clean(img: &Path) {
    let o = run("qemu-img", &["check", p(img)]);
    assert!(
        o.status.code() == Some(0),
        "qemu-img check {} exit {:?}:\n{}{}",
        img.display(),
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `qemu-img compare` must find the two images identical.
pub fn assert_same(a: &Path, b: &Path) {
    ok("qemu-img", &["compare", "-q", p(a), p(b)]);
}

/// Path as &str.
pub fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// Writes `len` bytes of mixed content: random, repeated and zero runs.
pub fn mixed_data(path: &Path, len: usize, seed: u64) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    let mut pos = 0;
    while pos < len {
        let n = rng.gen_range(1..200_000).min(len - pos);
        match rng.gen_range(0..4) {
            0 => rng.fill(&mut v[pos..pos + n]),
            1 => v[pos..pos + n].fill(rng.gen()),
            _ => {} // zeroes
        }
        pos += n;
    }
    std::fs::write(path, v).expect("write data");
}

/// A path inside `dir`.
pub fn at(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

/// Runs qemu-io on a qcow2 image with one `-c` per op; asserts success.
pub fn qemu_io(img: &Path, ops: &[&str]) -> String {
    let mut args: Vec<&str> = Vec::new();
    for op in ops {
        args.push("-c");
        args.push(op);
    }
    args.extend_from_slice(&["-f", "qcow2", p(img)]);
    ok("qemu-io", &args)
}

/// `qemu-img create -q -f qcow2 OPTS IMG [SIZE]`; asserts success.
pub fn qcow2_create(img: &Path, opts: &[&str], size: Option<&str>) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend_from_slice(opts);
    args.push(p(img));
    args.extend(size);
    ok("qemu-img", &args);
}

/// The bytes of `path` that anyone holds OFD locks (QEMU's image locks) on.
pub fn ofd_locked_bytes(path: &Path) -> Vec<u64> {
    spindle_io::lock::locked_bytes(path).expect("read /proc/locks")
}

/// Waits (at most 10 s) until nobody holds image locks on `path`. A killed
/// process's io_uring keeps its files, and so their locks, open for a
/// moment after the process is gone.
pub fn wait_unlocked(path: &Path) {
    let start = std::time::Instant::now();
    while !ofd_locked_bytes(path).is_empty() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "{} is still locked 10 s after its user ended: {:?}",
            path.display(),
            ofd_locked_bytes(path)
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
