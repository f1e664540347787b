//! `spindle vm snapshot` of a booted TCG guest with two vhost-user disks
//! (qcow2, and qcow2 over a raw backing file), judged by QEMU: without
//! Spindle's restore code, `qemu-img snapshot -a` reverts both images, an
//! independent reader below (Python, following QEMU's
//! docs/interop/qcow2.txt) takes the VM state out of the qcow2 file, and a
//! new QEMU loads it with `-incoming exec:cat FILE`, its disks served by
//! Spindle from the reverted images. The guest's counter goes on from the
//! snapshot point, not from boot, and the disks hold what they held then.

mod common;

use common::vm;
use common::vmsnap::*;
use common::{assert_clean, ok, p, run, scratch};
use serde_json::json;
use std::time::Duration;

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

#[test]
fn qemu_resumes_a_spindle_vm_snapshot_read_back_without_spindle() {
    let _one = vm::one_at_a_time();
    let d = scratch();
    let dir = d.path();
    let Booted {
        im,
        daemon,
        ctl,
        socks: _,
        mut src,
        qmp,
    } = booted(dir);

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
    // The pause time is listed as the snapshot reported it, from
    // Spindle's sidecar (QEMU's table entry is QEMU's); the deleted
    // snapshot's record went with it.
    let said: f64 = out
        .split("guest paused ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let line = l.lines().find(|x| x.starts_with("s1")).unwrap();
    let listed: f64 = line.split_whitespace().nth(5).unwrap().parse().unwrap();
    assert!((said - listed).abs() < 0.002, "said {said} s, listed: {line}");
    let sidecar = std::fs::read_to_string(format!("{}.spindle-snapshots.json", im.a.display())).unwrap();
    assert!(sidecar.contains("\"s1\"") && !sidecar.contains("\"s2\""), "{sidecar}");
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
    assert_resumed_at_snapshot(&mut dst, from, last_before, first_after, last_src);
    dst.kill();
    drop(dst);
    let log = daemon.log_text();
    assert!(daemon.stop().success(), "{log}");
    assert_clean(&im.a);
    assert_clean(&im.b);
}
