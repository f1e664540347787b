//! A real guest (Debian's kernel under TCG) uses Spindle's vhost-user-blk
//! disks: raw, qcow2, and qcow2 over a raw backing file, each with two
//! queues on two I/O threads, all served from one --config file.

mod common;

use common::serve::{boot, ctl_at, Serve};
use common::{assert_clean, ok, p, scratch};
use serde_json::json;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

fn md5_range(img: &Path, fmt: &str, dir: &Path, skip_mib: u64, mib: u64) -> String {
    let raw = dir.join("extract.raw");
    ok("qemu-img", &["convert", "-f", fmt, "-O", "raw", p(img), p(&raw)]);
    let out = ok(
        "sh",
        &[
            "-c",
            &format!(
                "dd if={} bs=1M skip={skip_mib} count={mib} 2>/dev/null | md5sum",
                raw.display()
            ),
        ],
    );
    std::fs::remove_file(&raw).unwrap();
    out.split_whitespace().next().unwrap().to_string()
}

fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

const SCRIPT: &str = r#"
for d in vda vdb vdc; do
  echo "$d queues=$(ls /sys/block/$d/mq | wc -l) cache=$(cat /sys/block/$d/queue/write_cache | tr ' ' _) opt=$(cat /sys/block/$d/queue/optimal_io_size)"
  dd if=/dev/urandom of=/tmp/p0 bs=1M count=2 2>/dev/null
  dd if=/dev/urandom of=/tmp/p1 bs=1M count=2 2>/dev/null
  taskset 1 dd if=/tmp/p0 of=/dev/$d bs=64k seek=16 oflag=direct conv=fsync 2>/dev/null &
  taskset 2 dd if=/tmp/p1 of=/dev/$d bs=64k seek=48 oflag=direct conv=fsync 2>/dev/null &
  wait
  dd if=/dev/$d of=/tmp/b bs=1M skip=1 count=4 iflag=direct 2>/dev/null
  cat /tmp/p0 /tmp/p1 | cmp - /tmp/b && echo "$d READBACK-OK"
  echo "$d MD5 $(cat /tmp/p0 /tmp/p1 | md5sum | cut -d' ' -f1)"
  blkdiscard -o 67108864 -l 33554432 /dev/$d && echo "$d DISCARD-OK"
done
# CONFIG_WCE: the guest turns vdb's write cache off; writes go on working.
# (QEMU 7.2 keeps this change to itself: no SET_CONFIG reaches the backend.
# crates/spindle-vhost/tests/config_frontend.rs covers the backend's side.)
echo "write through" > /sys/block/vdb/queue/write_cache
echo "vdb cache=$(cat /sys/block/vdb/queue/write_cache | tr ' ' _)"
dd if=/tmp/p0 of=/dev/vdb bs=64k seek=160 oflag=direct 2>/dev/null && echo "vdb WT-WRITE-OK"
# The host grows vda through the control socket; the guest must see it.
for i in $(seq 600); do [ "$(cat /sys/block/vda/size)" != 524288 ] && break; sleep 0.1; done
echo "vda SIZE $(cat /sys/block/vda/size)"
"#;

#[test]
fn guest_uses_raw_qcow2_and_backed_qcow2_with_two_queues() {
    let d = scratch();
    let dir = d.path();
    let raw = dir.join("raw.img");
    let q = dir.join("q.qcow2");
    let base = dir.join("base.raw");
    let over = dir.join("over.qcow2");
    ok("truncate", &["-s", "256M", p(&raw)]);
    ok(
        "sh",
        &[
            "-c",
            &format!(
                "dd if=/dev/urandom of={} bs=1M seek=64 count=32 conv=notrunc 2>/dev/null",
                raw.display()
            ),
        ],
    );
    ok("qemu-img", &["create", "-f", "qcow2", p(&q), "256M"]);
    ok("qemu-io", &["-c", "write -P 0x5a 64M 32M", p(&q)]);
    ok("truncate", &["-s", "256M", p(&base)]);
    ok(
        "sh",
        &[
            "-c",
            &format!(
                "dd if=/dev/urandom of={} bs=1M count=16 conv=notrunc 2>/dev/null",
                base.display()
            ),
        ],
    );
    ok(
        "qemu-img",
        &["create", "-f", "qcow2", "-b", p(&base), "-F", "raw", p(&over)],
    );
    let base_md5 = md5_range(&base, "raw", dir, 0, 256);
    let raw_alloc_before = allocated(&raw);

    let socks: Vec<_> = ["raw", "q", "over"]
        .iter()
        .map(|n| dir.join(format!("{n}.sock")))
        .collect();
    let config = format!(
        "control = \"{}\"\n\n[[export]]\nname = \"raw\"\nimage = \"{}\"\nsocket = \"{}\"\nformat = \"raw\"\n\n\
         [[export]]\nname = \"q\"\nimage = \"{}\"\nsocket = \"{}\"\n\n\
         [[export]]\nname = \"over\"\nimage = \"{}\"\nsocket = \"{}\"\nformat = \"qcow2\"\n",
        dir.join("ctl.sock").display(),
        raw.display(),
        socks[0].display(),
        q.display(),
        socks[1].display(),
        over.display(),
        socks[2].display()
    );
    std::fs::write(dir.join("spindle.toml"), config).unwrap();
    let server = Serve::start(
        dir,
        &["--config", "spindle.toml", "--iothreads", "2", "--control", "ctl.sock"],
        &[&socks[0], &socks[1], &socks[2]],
    );
    // Once the guest has discarded on vda, grow it from the host.
    let resizer = std::thread::spawn({
        let ctl = dir.join("ctl.sock");
        move || {
            for _ in 0..1200 {
                let st = ctl_at(&ctl, &json!({"cmd": "stats", "name": "raw"}));
                let discards = st["stats"].as_array().unwrap().iter().any(|s| s["op"] == "discard");
                if discards {
                    return ctl_at(&ctl, &json!({"cmd": "resize", "name": "raw", "size": "320M"}));
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            panic!("the guest never discarded on vda");
        }
    });
    let out = boot(dir, &[(&socks[0], 2), (&socks[1], 2), (&socks[2], 2)], SCRIPT);
    println!("{out}");
    let resized = resizer.join().unwrap();
    assert_eq!(resized["ok"], json!(true), "{resized}");
    assert_eq!(resized["guest_notified"], json!(true), "{resized}");
    assert!(
        out.contains("vda SIZE 655360"),
        "the guest did not see the resize: {out}"
    );
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 320 << 20);

    let names = ["raw", "q", "over"];
    for (i, name) in names.iter().enumerate() {
        let dev = ["vda", "vdb", "vdc"][i];
        assert!(
            out.contains(&format!("{dev} queues=2 cache=write_back")),
            "{dev}: {out}"
        );
        assert!(out.contains(&format!("{dev} READBACK-OK")), "{dev}: {out}");
        assert!(out.contains(&format!("{dev} DISCARD-OK")), "{dev}: {out}");
        let st = server.ctl(&json!({"cmd": "stats", "name": name}));
        assert_eq!(st["ok"], json!(true), "{st}");
        let per_queue: Vec<u64> = serde_json::from_value(st["queue_requests"].clone()).unwrap();
        assert!(
            per_queue[0] > 0 && per_queue[1] > 0,
            "{name}: both queues must serve requests: {per_queue:?}"
        );
        let flushes = st["stats"].as_array().unwrap().iter().find(|s| s["op"] == "flush");
        assert!(
            flushes.is_some_and(|f| f["requests"].as_u64() > Some(0)),
            "{name}: no flush reached Spindle: {st}"
        );
    }
    assert!(
        out.contains("vdb queues=2 cache=write_back opt=65536"),
        "qcow2 cluster size as opt_io_size: {out}"
    );
    assert!(
        out.contains("vdb cache=write_through") && out.contains("vdb WT-WRITE-OK"),
        "{out}"
    );
    let status = server.stop();
    assert!(status.success(), "spindle serve exited with {status}");

    let md5_of = |dev: &str| {
        let line = out.lines().find(|l| l.starts_with(&format!("{dev} MD5 "))).unwrap();
        line.split_whitespace().nth(2).unwrap().to_string()
    };
    assert_eq!(
        md5_range(&raw, "raw", dir, 1, 4),
        md5_of("vda"),
        "raw: written range differs"
    );
    assert_eq!(
        md5_range(&q, "qcow2", dir, 1, 4),
        md5_of("vdb"),
        "qcow2: written range differs"
    );
    assert_eq!(
        md5_range(&over, "qcow2", dir, 1, 4),
        md5_of("vdc"),
        "backed qcow2: written range differs"
    );
    assert_clean(&q);
    assert_clean(&over);
    assert_eq!(
        md5_range(&base, "raw", dir, 0, 256),
        base_md5,
        "the backing file must not change"
    );

    // Discard freed space: the raw file lost its 32 MiB of data blocks, and
    // the qcow2 range no longer maps data.
    let raw_alloc_after = allocated(&raw);
    assert!(
        raw_alloc_after + (30 << 20) <= raw_alloc_before + (4 << 20),
        "raw: discard did not punch holes ({raw_alloc_before} -> {raw_alloc_after} bytes allocated)"
    );
    let map: serde_json::Value = serde_json::from_str(&ok("qemu-img", &["map", "--output=json", p(&q)])).unwrap();
    for e in map.as_array().unwrap() {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        if start < (96 << 20) && start + len > (64 << 20) {
            assert_eq!(e["data"], json!(false), "qcow2: discarded range still maps data: {e}");
        }
    }
}
