//! `spindle vm snapshot` of a booted TCG guest with two vhost-user disks
//! (qcow2, and qcow2 over a raw backing file), judged by QEMU: without
//! Spindle's restore code, `qemu-img snapshot -a` reverts both images, an
//! independent reader below (Python, following QEMU's
//! docs/interop/qcow2.txt) takes the VM state out of the qcow2 file, and a
//! new QEMU loads it with `-incoming exec:cat FILE`, its disks served by
//! Spindle from the reverted images. The guest's counter goes on from the
//! snapshot point, not from boot, and the disks hold what they held then.

mod common;

use common::serve::Serve;
use common::vm::{self, Vm};
use common::{assert_clean, ok, p, run, scratch};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Duration;

const MINUTE: Duration = Duration::from_secs(60);

/// The guest: writes a tag (`v1`) on sector 0 of both disks, then prints
/// a counter five times a second; `W2` on its console writes `v2`
/// instead, `V` reads both sectors back from the disks (page cache
/// dropped) and prints them.
const SCRIPT: &str = r#"
tag() { printf "TAG-$1-$2\n" | dd of=/dev/$1 bs=512 conv=sync,fsync 2>/dev/null; }
show() { echo 3 > /proc/sys/vm/drop_caches; for d in vda vdb; do echo "DISK $d $(dd if=/dev/$d bs=512 count=1 2>/dev/null | head -n1)"; done; }
tag vda v1; tag vdb v1; sync
echo WROTE v1
(i=0; while true; do i=$((i+1)); echo "COUNT $i"; sleep 0.2; done) &
while read cmd; do
  case "$cmd" in
    W2) tag vda v2; tag vdb v2; sync; echo WROTE v2 ;;
    V) show ;;
  esac
done
"#;

/// Takes snapshot `name`'s VM state out of the qcow2 image `img` into
/// `dst`: header, snapshot table, the snapshot's L1 and L2 tables, the VM
/// state at the virtual size rounded up to what one L1 entry maps.
const READER: &str = r#"
import struct, sys
img, name, dst = sys.argv[1], sys.argv[2], sys.argv[3]
f = open(img, 'rb')
h = f.read(104)
(magic, version, _bfo, _bfs, cluster_bits, size, _crypt, _l1_size, _l1_off,
 _rt_off, _rt_clusters, nb_snapshots, snapshots_off) = struct.unpack('>IIQIIQIIQQIIQ', h[:72])
assert magic == 0x514649fb, 'not qcow2'
incompat = struct.unpack('>Q', h[72:80])[0] if version >= 3 else 0
assert not incompat & 16, 'extended L2 entries: not handled here'
cs = 1 << cluster_bits
l2_bits = cluster_bits - 3
mask = 0x00fffffffffffe00
off = snapshots_off
for _ in range(nb_snapshots):
    f.seek(off)
    (l1_off, l1_size, id_len, name_len, _s, _ns, _clock, vm32, extra) = struct.unpack('>QIHHIIQII', f.read(40))
    x = f.read(extra)
    f.read(id_len)
    sn_name = f.read(name_len).decode()
    vm_size = struct.unpack('>Q', x[:8])[0] if extra >= 8 else vm32
    disk_size = struct.unpack('>Q', x[8:16])[0] if extra >= 16 else size
    off = (off + 40 + extra + id_len + name_len + 7) // 8 * 8
    if sn_name == name:
        break
else:
    sys.exit('no snapshot ' + name)
span = 1 << (cluster_bits + l2_bits)
base = (disk_size + span - 1) // span * span
f.seek(l1_off)
l1 = struct.unpack('>%dQ' % l1_size, f.read(8 * l1_size))
out = open(dst, 'wb')
pos = 0
while pos < vm_size:
    g = base + pos
    n = min(cs - (g & (cs - 1)), vm_size - pos)
    data = bytes(n)
    i = g >> (cluster_bits + l2_bits)
    l2 = l1[i] & mask if i < len(l1) else 0
    if l2:
        f.seek(l2 + ((g >> cluster_bits) & ((1 << l2_bits) - 1)) * 8)
        e = struct.unpack('>Q', f.read(8))[0]
        assert not e & (1 << 62), 'compressed VM state'
        if e & mask and not e & 1:
            f.seek((e & mask) + (g & (cs - 1)))
            data = f.read(n)
    out.write(data)
    pos += n
out.close()
print(vm_size)
"#;

struct Images {
    a: PathBuf,
    b: PathBuf,
}

/// a.qcow2, and b.qcow2 over the raw base.raw (64 MiB each).
fn images(dir: &Path) -> Images {
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

fn serve(dir: &Path, im: &Images, round: u32) -> (Serve, PathBuf, [PathBuf; 2]) {
    let ctl = dir.join(format!("ctl{round}.sock"));
    let socks = [dir.join(format!("a{round}.sock")), dir.join(format!("b{round}.sock"))];
    let config = dir.join(format!("serve{round}.toml"));
    let text = common::serve::config_text(Some(&ctl), &[("a", &im.a, &socks[0], ""), ("b", &im.b, &socks[1], "")]);
    std::fs::write(&config, text).unwrap();
    let mut s = Serve::start(dir, &["--config", p(&config)], &[&socks[0], &socks[1]]);
    s.use_control(&ctl);
    (s, ctl, socks)
}

fn boot(dir: &Path, name: &str, socks: &[PathBuf; 2], incoming: Option<&str>) -> Vm {
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
fn counts(vm: &Vm, from: usize) -> Vec<u64> {
    vm.console()
        .lines()
        .skip(from)
        .filter_map(|l| l.trim().strip_prefix("COUNT ")?.trim().parse().ok())
        .collect()
}

/// Waits for the next counter line from console line `from`; its value.
fn next_count(vm: &Vm, from: usize) -> u64 {
    let (i, _) = vm.wait_line(from, "COUNT ", MINUTE);
    counts(vm, i)[0]
}

/// Waits for the counter to reach `n`.
fn wait_count(vm: &Vm, n: u64) {
    let mut from = 0;
    loop {
        let (i, _) = vm.wait_line(from, "COUNT ", MINUTE);
        if counts(vm, i)[0] >= n {
            return;
        }
        from = i + 1;
    }
}

fn vm_cmd(qmp: &Path, ctl: &Path, args: &[&str]) -> std::process::Output {
    let mut all = vec!["vm", "--qmp", p(qmp), "-c", p(ctl)];
    all.extend_from_slice(args);
    run("spindle", &all)
}

fn snapshots(img: &Path) -> String {
    ok("qemu-img", &["snapshot", "-l", p(img)])
}

#[test]
fn qemu_resumes_a_spindle_vm_snapshot_read_back_without_spindle() {
    let _one = vm::one_at_a_time();
    let d = scratch();
    let dir = d.path();
    let im = images(dir);
    let (daemon, ctl, socks) = serve(dir, &im, 1);
    let mut src = boot(dir, "src", &socks, None);
    src.wait_line(0, "WROTE v1", Duration::from_secs(180));
    wait_count(&src, 10);
    let qmp = dir.join("src-spindle.qmp");

    // A raw export is refused by name.
    let raw = dir.join("scratch.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let e = json!({"name": "scratch", "image": p(&raw), "socket": p(&dir.join("scratch.sock")), "format": "raw"});
    assert_eq!(daemon.ctl(&json!({"cmd": "add", "export": e}))["ok"], true);
    let r = daemon.ctl(&json!({"cmd": "snapshot_create", "name": "scratch", "snapshot": "s"}));
    assert!(
        r["error"]
            .as_str()
            .unwrap_or("")
            .contains("'scratch' serves a raw image"),
        "{r}"
    );
    assert_eq!(daemon.ctl(&json!({"cmd": "remove", "name": "scratch"}))["ok"], true);
    // The daemon takes a snapshot only of a paused guest's disk.
    let r = daemon.ctl(&json!({"cmd": "snapshot_create", "name": "b", "snapshot": "taken"}));
    assert!(r["error"].as_str().unwrap_or("").contains("device is running"), "{r}");
    src.qmp.execute("stop", json!({}));
    let r = daemon.ctl(&json!({"cmd": "snapshot_create", "name": "b", "snapshot": "taken"}));
    assert_eq!(r["ok"], true, "{r}");
    src.qmp.execute("cont", json!({}));
    // Refused before the guest is touched: a name already on a disk.
    let from = src.mark();
    next_count(&src, from);
    let o = vm_cmd(&qmp, &ctl, &["snapshot", "taken"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("'taken' already"), "{err}");
    let r = daemon.ctl(&json!({"cmd": "snapshot_delete", "name": "b", "snapshot": "taken"}));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(src.qmp.execute("query-status", json!({}))["status"], "running");

    let before = src.mark();
    let last_before = *counts(&src, 0).last().unwrap();
    let o = vm_cmd(&qmp, &ctl, &["snapshot", "s1"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "vm snapshot failed:\n{out}{}\n{}",
        String::from_utf8_lossy(&o.stderr),
        daemon.log_text()
    );
    println!("{out}");
    assert!(
        out.contains("disks a, b") && out.contains("VM state") && out.contains("guest paused"),
        "{out}"
    );
    // The guest runs on, and overwrites both tags after the snapshot.
    src.wait_running(MINUTE);
    let first_after = next_count(&src, before);
    assert!(first_after > last_before, "{first_after} after {last_before}");
    let m = src.mark();
    src.send("W2");
    src.wait_line(m, "WROTE v2", MINUTE);
    let m = src.mark();
    src.send("V");
    src.wait_line(m, "DISK vdb TAG-vdb-v2", MINUTE);
    // A second one, listed with the first on both disks, then deleted
    // from both.
    let o = vm_cmd(&qmp, &ctl, &["snapshot", "s2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let l = String::from_utf8_lossy(&vm_cmd(&qmp, &ctl, &["list"]).stdout).into_owned();
    for n in ["s1", "s2"] {
        assert!(
            l.lines()
                .any(|x| x.starts_with(n) && x.contains("complete") && x.ends_with("a,b")),
            "{l}"
        );
    }
    let o = vm_cmd(&qmp, &ctl, &["delete", "s2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let l = String::from_utf8_lossy(&vm_cmd(&qmp, &ctl, &["list"]).stdout).into_owned();
    assert!(!l.contains("s2") && l.contains("s1"), "{l}");
    wait_count(&src, first_after + 15);
    let last_src = *counts(&src, 0).last().unwrap();
    src.kill();
    drop(src);
    let log = daemon.log_text();
    assert!(daemon.stop().success(), "{log}");

    // QEMU's tools see the snapshot on both disks, and the images clean.
    for img in [&im.a, &im.b] {
        let l = snapshots(img);
        assert!(l.contains("s1") && !l.contains("s2"), "{}: {l}", img.display());
        assert_clean(img);
        ok("qemu-img", &["snapshot", "-a", "s1", p(img)]);
        assert_clean(img);
    }
    assert!(
        !snapshots(&im.b)
            .lines()
            .any(|l| l.contains("s1") && !l.contains(" 0 B ")),
        "the VM state is on a: {}",
        snapshots(&im.b)
    );
    let state = dir.join("vmstate.bin");
    let o = run("python3", &["-c", READER, p(&im.a), "s1", p(&state)]);
    assert!(o.status.success(), "reader: {}", String::from_utf8_lossy(&o.stderr));
    let bytes = std::fs::read(&state).unwrap();
    assert_eq!(&bytes[..4], b"QEVM", "a QEMU migration stream");

    // A new QEMU loads it, its disks served from the reverted images.
    let (daemon, _ctl, socks) = serve(dir, &im, 2);
    let uri = format!("exec:cat {}", state.display());
    let mut dst = boot(dir, "dst", &socks, Some(&uri));
    let deadline = std::time::Instant::now() + MINUTE;
    loop {
        let st = dst.qmp.execute("query-status", json!({}));
        if st["status"] == "paused" || st["status"] == "running" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "incoming never finished: {st}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let from = dst.mark();
    dst.qmp.execute("cont", json!({}));
    let resumed = next_count(&dst, from);
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
    dst.kill();
    drop(dst);
    let log = daemon.log_text();
    assert!(daemon.stop().success(), "{log}");
    assert_clean(&im.a);
    assert_clean(&im.b);
}
