//! The guest and daemon of the VM snapshot tests (vm_snapshot.rs,
//! vm_restore.rs): a booted TCG guest with two vhost-user disks (qcow2, and
//! qcow2 over a raw backing file) that prints a counter and tags its disks.
#![allow(dead_code)]

use super::serve::Serve;
use super::vm::{self, Vm};
use super::{ok, p, run};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A minute.
pub const MINUTE: Duration = Duration::from_secs(60);

/// The guest: writes a tag (`v1`) on sector 0 of both disks, then prints
/// a counter five times a second; `W2` on its console writes `v2`
/// instead, `V` reads both sectors back from the disks (page cache
/// dropped) and prints them. The counter waits with the shell's own
/// `read -t` on a FIFO, not `sleep`: a process forked five times a second
/// dirties many pages, and QEMU 7.2 under TCG now and then loses some of a
/// running guest's CPU writes during a live RAM copy (common/migrate.rs;
/// seen here as a kernel panic of the restored guest in
/// `a_live_snapshot_restores_to_its_switch_over`).
pub const SCRIPT: &str = r#"
tag() { printf "TAG-$1-$2\n" | dd of=/dev/$1 bs=512 conv=sync,fsync 2>/dev/null; }
show() { echo 3 > /proc/sys/vm/drop_caches; for d in vda vdb; do echo "DISK $d $(dd if=/dev/$d bs=512 count=1 2>/dev/null | head -n1)"; done; }
tag vda v1; tag vdb v1; sync
echo WROTE v1
mkfifo /tmp/tick
(exec 3<>/tmp/tick; i=0; while true; do i=$((i+1)); echo "COUNT $i"; read -t 0.2 -u 3 x; done) &
while read cmd; do
  case "$cmd" in
    W2) tag vda v2; tag vdb v2; sync; echo WROTE v2 ;;
    V) show ;;
  esac
done
"#;

/// The two images.
pub struct Images {
    /// a.qcow2.
    pub a: PathBuf,
    /// b.qcow2, over base.raw.
    pub b: PathBuf,
}

/// a.qcow2, and b.qcow2 over the raw base.raw (64 MiB each).
pub fn images(dir: &Path) -> Images {
    let a = dir.join("a.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&a), "64M"]);
    let base = dir.join("base.raw");
    ok("qemu-img", &["create", "-q", "-f", "raw", p(&base), "64M"]);
    let b = dir.join("b.qcow2");
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-F", "raw", "-b", p(&base), p(&b)],
    );
    Images { a, b }
}

/// A daemon serving `im` as exports a and b, with a control socket.
pub fn serve(dir: &Path, im: &Images, round: u32) -> (Serve, PathBuf, [PathBuf; 2]) {
    let ctl = dir.join(format!("ctl{round}.sock"));
    let socks = [dir.join(format!("a{round}.sock")), dir.join(format!("b{round}.sock"))];
    let config = dir.join(format!("serve{round}.toml"));
    let text = super::serve::config_text(Some(&ctl), &[("a", &im.a, &socks[0], ""), ("b", &im.b, &socks[1], "")]);
    std::fs::write(&config, text).unwrap();
    let mut s = Serve::start(dir, &["--config", p(&config)], &[&socks[0], &socks[1]]);
    s.use_control(&ctl);
    (s, ctl, socks)
}

/// Boots (or, with `incoming`, starts waiting for) the guest on `socks`.
pub fn boot(dir: &Path, name: &str, socks: &[PathBuf; 2], incoming: Option<&str>) -> Vm {
    let rd = dir.join("initrd.gz");
    let rd = if rd.exists() {
        rd
    } else {
        vm::initrd(dir, SCRIPT, false)
    };
    let disks: Vec<(&Path, u16)> = socks.iter().map(|s| (s.as_path(), 1)).collect();
    Vm::start_smp(dir, name, &rd, &disks, incoming, 1)
}

/// The counter values the guest printed from console line `from` on.
pub fn counts(vm: &Vm, from: usize) -> Vec<u64> {
    vm.console()
        .lines()
        .skip(from)
        .filter_map(|l| l.trim().strip_prefix("COUNT ")?.trim().parse().ok())
        .collect()
}

/// Waits for the next counter line from console line `from`: its line
/// number and value. A line whose number was cut off by other console
/// output (the echo of typed input lands mid-line) is passed over.
fn next_count_at(vm: &Vm, mut from: usize) -> (usize, u64) {
    loop {
        let (i, line) = vm.wait_line(from, "COUNT ", MINUTE);
        if let Some(n) = line.trim().strip_prefix("COUNT ").and_then(|v| v.trim().parse().ok()) {
            return (i, n);
        }
        from = i + 1;
    }
}

/// Waits for the next counter line from console line `from`; its value.
pub fn next_count(vm: &Vm, from: usize) -> u64 {
    next_count_at(vm, from).1
}

/// Waits for the counter to reach `n`.
pub fn wait_count(vm: &Vm, n: u64) {
    let mut from = 0;
    loop {
        let (i, v) = next_count_at(vm, from);
        if v >= n {
            return;
        }
        from = i + 1;
    }
}

/// Runs `spindle vm --qmp QMP -c CTL ARGS`.
pub fn vm_cmd(qmp: &Path, ctl: &Path, args: &[&str]) -> std::process::Output {
    let mut all = vec!["vm", "--qmp", p(qmp), "-c", p(ctl)];
    all.extend_from_slice(args);
    run("spindle", &all)
}

/// Starts `spindle vm --qmp QMP -c CTL snapshot NAME` with the VM state
/// at 4 MB/s, so that the stream lasts seconds, and returns once image `a`
/// grew by 2 MiB of it (the stream runs).
pub fn slow_snapshot(qmp: &Path, ctl: &Path, name: &str, a: &Path, log: &dyn Fn() -> String) -> std::process::Child {
    let size0 = std::fs::metadata(a).unwrap().len();
    let mut cli = std::process::Command::new(env!("CARGO_BIN_EXE_spindle"))
        .args(["vm", "--qmp", p(qmp), "-c", p(ctl), "snapshot", name])
        .args(["--x-max-bandwidth", "4000000"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + MINUTE;
    while std::fs::metadata(a).unwrap().len() <= size0 + (2 << 20) {
        assert!(Instant::now() < deadline, "the VM state never streamed:\n{}", log());
        assert!(cli.try_wait().unwrap().is_none(), "vm snapshot ended early");
        std::thread::sleep(Duration::from_millis(2));
    }
    cli
}

/// `qemu-img snapshot -l`.
pub fn snapshots(img: &Path) -> String {
    ok("qemu-img", &["snapshot", "-l", p(img)])
}

/// The guest as it was at the snapshot: counting on from between
/// `last_before` and `first_after`, well before `last_src`; tags v1.
pub fn assert_resumed_at_snapshot(dst: &mut Vm, from: usize, last_before: u64, first_after: u64, last_src: u64) {
    let resumed = next_count(dst, from);
    assert!(
        resumed > 5 && resumed >= last_before && resumed <= first_after + 3 && resumed + 10 < last_src,
        "the counter resumed at {resumed}; the snapshot was taken between {last_before} and {first_after}, \
         the source counted to {last_src}:\n{}",
        dst.console()
    );
    let m = dst.mark();
    dst.send("V");
    let (_, a) = dst.wait_line(m, "DISK vda", MINUTE);
    let (_, b) = dst.wait_line(m, "DISK vdb", MINUTE);
    assert!(a.contains("TAG-vda-v1") && b.contains("TAG-vdb-v1"), "{a} / {b}");
}

/// The images, the daemon serving them, and the guest booted on them.
pub struct Booted {
    /// The images.
    pub im: Images,
    /// The daemon.
    pub daemon: Serve,
    /// Its control socket.
    pub ctl: PathBuf,
    /// The exports' sockets.
    pub socks: [PathBuf; 2],
    /// The guest, counting (at 10 at least).
    pub src: Vm,
    /// The guest's QMP socket for `spindle vm`.
    pub qmp: PathBuf,
}

/// Creates the images, serves them and boots the guest (round 1).
pub fn booted(dir: &Path) -> Booted {
    let im = images(dir);
    let (daemon, ctl, socks) = serve(dir, &im, 1);
    let src = boot(dir, "src", &socks, None);
    src.wait_line(0, "WROTE v1", Duration::from_secs(180));
    wait_count(&src, 10);
    let qmp = dir.join("src-spindle.qmp");
    Booted {
        im,
        daemon,
        ctl,
        socks,
        src,
        qmp,
    }
}

/// Waits until the daemon sees `vm`'s QEMU on both exports.
pub fn wait_connected(daemon: &Serve, vm: &Vm) {
    let deadline = Instant::now() + MINUTE;
    loop {
        let r = daemon.ctl(&json!({"cmd": "vm_disks", "pid": vm.pid()}));
        if r["disks"].as_array().is_some_and(|d| d.len() == 2) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} never connected to both disks: {r}",
            vm.name
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
