//! Spindle on Ceph RBD images, against a real single-node cluster
//! (tests/ceph/cluster.sh, one per run of this binary) with Ceph's own
//! tools and QEMU's as the peers that judge the data: `spindle img` on
//! `rbd:` specs, `spindle serve` of raw and qcow2 images on RBD to
//! libblkio, NBD clients and a TCG guest.

mod common;

use common::ceph::{cluster, unique, TestCluster};
use common::serve::{boot, Serve};
use common::{ok, p, run, scratch};
use serde_json::{json, Value};
use std::path::Path;

const MIB: usize = 1 << 20;

/// `len` bytes of a pattern with no zero block, different per `seed`.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&(x | 1).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// The whole image, through `rbd export`.
fn export(tc: &TestCluster, image: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join(format!("{image}.export"));
    let _ = std::fs::remove_file(&out);
    tc.rbd(&["export", &format!("rbd/{image}"), p(&out)]);
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    data
}

fn spindle_err(args: &[&str]) -> String {
    let o = run("spindle", args);
    assert!(!o.status.success(), "spindle {args:?} should fail");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The extents `spindle img map --output json` reports, as
/// (start, length, data).
fn map(spec: &str) -> Vec<(u64, u64, bool)> {
    let v: Value = serde_json::from_str(&ok("spindle", &["img", "map", "--output", "json", spec])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["data"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// `spindle img` create, convert in and out, compare, map, info, resize
/// on RBD images; qemu-img and `rbd export` agree with each copy.
#[test]
fn img_commands_work_on_rbd_images() {
    let tc = cluster();
    let d = scratch();
    let dir = d.path();
    // A qcow2 source with data at 1 MiB and 40 MiB and holes around.
    let src = dir.join("src.qcow2");
    ok("qemu-img", &["create", "-f", "qcow2", p(&src), "64M"]);
    ok(
        "qemu-io",
        &["-c", "write -P 0xab 1M 3M", "-c", "write -P 0x11 40M 64k", p(&src)],
    );
    let name = unique("img");
    let spec = tc.spec(&name);

    // convert creates the image (qemu-img's -O raw onto rbd:).
    ok("spindle", &["img", "convert", "-O", "raw", p(&src), &spec]);
    assert!(ok("spindle", &["img", "compare", p(&src), &spec]).contains("identical"));
    assert!(ok("qemu-img", &["compare", p(&src), &spec]).contains("identical"));
    let flat = dir.join("flat.raw");
    ok("qemu-img", &["convert", "-O", "raw", p(&src), p(&flat)]);
    assert!(
        export(tc, &name, dir) == std::fs::read(&flat).unwrap(),
        "rbd export differs"
    );

    // map is sparse: the untouched objects are holes (4 MiB objects: data
    // in objects 0 and 10 only).
    let m = map(&spec);
    let data: Vec<(u64, u64)> = m.iter().filter(|e| e.2).map(|e| (e.0, e.1)).collect();
    assert_eq!(data, vec![(0, 4 << 20), (40 << 20, 4 << 20)], "{m:?}");
    assert_eq!(m.iter().map(|e| e.1).sum::<u64>(), 64 << 20);

    // info: size, object size, features, the RBD image's snapshots.
    tc.rbd(&["snap", "create", &format!("rbd/{name}@before")]);
    let info: Value = serde_json::from_str(&ok("spindle", &["img", "info", "--output", "json", &spec])).unwrap();
    assert_eq!(info["virtual-size"], json!(64 << 20), "{info}");
    assert_eq!(info["format"], json!("raw"), "{info}");
    assert_eq!(info["rbd"]["object-size"], json!(4 << 20), "{info}");
    assert_eq!(info["rbd"]["snapshots"][0]["name"], json!("before"), "{info}");
    let human = ok("spindle", &["img", "info", &spec]);
    assert!(
        human.contains("disk size: unavailable") && human.contains("before (id"),
        "{human}"
    );

    // A snapshot opens read-only, as it was.
    ok("qemu-io", &["-f", "raw", "-c", "write -P 0x77 1M 64k", &spec]);
    let at_snap = format!("rbd:rbd/{name}@before:conf={}", tc.conf.display());
    assert!(ok("spindle", &["img", "compare", p(&src), &at_snap]).contains("identical"));
    assert!(!run("spindle", &["img", "compare", p(&src), &spec]).status.success());
    let e = spindle_err(&["img", "resize", &at_snap, "128M"]);
    assert!(e.contains("read-only"), "{e}");

    // resize, then a copy back out, qcow2, sparse.
    ok("spindle", &["img", "resize", &spec, "+16M"]);
    assert!(tc
        .rbd(&["info", &format!("rbd/{name}")])
        .stdout
        .windows(6)
        .any(|w| w == b"80 MiB"));
    let back = dir.join("back.qcow2");
    ok("spindle", &["img", "convert", "-O", "qcow2", &spec, p(&back)]);
    assert!(ok("qemu-img", &["compare", &spec, p(&back)]).contains("identical"));
    let alloc: Value = serde_json::from_str(&ok("qemu-img", &["info", "--output", "json", p(&back)])).unwrap();
    assert!(alloc["actual-size"].as_u64().unwrap() < 16 << 20, "not sparse: {alloc}");

    // create: raw of a size; an image that exists is refused.
    let made = unique("made");
    let made_spec = tc.spec(&made);
    ok("spindle", &["img", "create", "-f", "raw", &made_spec, "32M"]);
    let st: Value = serde_json::from_str(&ok("spindle", &["img", "info", "--output", "json", &made_spec])).unwrap();
    assert_eq!(st["virtual-size"], json!(32 << 20));
    let e = spindle_err(&["img", "create", "-f", "raw", &made_spec, "32M"]);
    assert!(
        e.contains(&format!("create image {made}")) && e.contains("exists"),
        "{e}"
    );
}

/// One clear error naming what is wrong: a missing image, a missing pool,
/// a malformed spec, a cluster that does not answer (within the connect
/// timeout, here set through a Ceph option in the spec).
#[test]
fn bad_specs_and_missing_images_get_clear_errors() {
    let tc = cluster();
    let conf = tc.conf.display().to_string();
    let e = spindle_err(&["img", "info", &format!("rbd:rbd/nope:conf={conf}")]);
    assert!(e.contains("image rbd/nope not found"), "{e}");
    let e = spindle_err(&["img", "info", &format!("rbd:nopool/x:conf={conf}")]);
    assert!(e.contains("pool nopool"), "{e}");
    let e = spindle_err(&["img", "info", "rbd:justimage"]);
    assert!(e.contains("no pool"), "{e}");
    let t = std::time::Instant::now();
    let e = spindle_err(&[
        "img",
        "info",
        "rbd:rbd/x:mon_host=127.0.0.1\\:1:client_mount_timeout=3:auth_client_required=none",
    ]);
    assert!(
        t.elapsed() < std::time::Duration::from_secs(30),
        "took {:?}",
        t.elapsed()
    );
    assert!(e.contains("connect"), "{e}");
}

/// `spindle serve` of an RBD image: libblkio writes and verifies through
/// vhost-user; data `rbd import` wrote reads back identically over NBD
/// (qemu-img compare against nbd://); after the daemon stops, `rbd
/// export`, qemu-img and Spindle read the same bytes.
#[test]
fn served_rbd_images_read_back_identically_everywhere() {
    let tc = cluster();
    let d = scratch();
    let dir = d.path();
    let name = unique("served");
    // rbd import: a pattern at 96-104 MiB of a 128 MiB image (above
    // what the benchmark below writes).
    let at = 96 * MIB;
    let mut img = vec![0u8; 128 * MIB];
    img[at..at + 8 * MIB].copy_from_slice(&pattern(8 * MIB, 7));
    let file = dir.join("import.raw");
    std::fs::write(&file, &img).unwrap();
    tc.rbd(&["import", "--no-progress", p(&file), &format!("rbd/{name}")]);
    let sock = dir.join("d.sock");
    let nbd = dir.join("nbd.sock");
    let s = Serve::start(
        dir,
        &[
            &tc.spec(&name),
            "--vhost-user",
            p(&sock),
            "--iothreads",
            "2",
            "--nbd",
            p(&nbd),
            "--control",
            "ctl.sock",
        ],
        &[&sock, &nbd],
    );
    let uri = format!("nbd+unix:///{name}?socket={}", nbd.display());
    let first = dir.join("first.raw");
    ok("qemu-img", &["convert", "-f", "raw", "-O", "raw", &uri, p(&first)]);
    assert!(
        std::fs::read(&first).unwrap() == img,
        "what rbd import wrote reads back differently"
    );

    // libblkio: random writes and reads, verified, with flushes, on two
    // queues, below the imported data.
    let o = run(
        "spindle",
        &[
            "bench",
            p(&sock),
            "--rw",
            "randrw",
            "--verify",
            "--iodepth",
            "16",
            "--queues",
            "2",
            "--size",
            "64M",
            "--number-ios",
            "6000",
            "--runtime",
            "120",
            "--flush-every",
            "64",
            "--output",
            "json",
        ],
    );
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {o:?}"));
    assert_eq!(v["errors"], json!(0), "{v}");
    assert_eq!(v["verify"]["failures"], json!(0), "{v}");
    assert!(v["verify"]["checked"].as_u64().unwrap() > 1000, "{v}");
    // Each disconnect stops the rings and flushes the image on the
    // vhost-user thread, on a runtime of its own each time: a second
    // connection and disconnect must not find the first one's queue.
    for _ in 0..2 {
        let again = run(
            "spindle",
            &[
                "bench",
                p(&sock),
                "--rw",
                "randrw",
                "--verify",
                "--iodepth",
                "4",
                "--size",
                "16M",
                "--number-ios",
                "500",
                "--runtime",
                "60",
                "--flush-every",
                "16",
                "--output",
                "json",
            ],
        );
        let v: Value = serde_json::from_slice(&again.stdout).unwrap_or_else(|e| panic!("{e}: {again:?}"));
        assert_eq!(
            (v["errors"].clone(), v["verify"]["failures"].clone()),
            (json!(0), json!(0)),
            "{v}"
        );
    }
    let st = s.ctl(&json!({"cmd": "stats", "name": name}));
    assert!(
        st["stats"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["op"] == "flush" && o["requests"].as_u64() > Some(0)),
        "{st}"
    );

    // What NBD reads now is what rbd export reads after the daemon stops.
    let served = dir.join("served.raw");
    ok("qemu-img", &["convert", "-f", "raw", "-O", "raw", &uri, p(&served)]);
    assert!(s.stop().success());
    let exported = export(tc, &name, dir);
    assert!(
        exported == std::fs::read(&served).unwrap(),
        "rbd export differs from what Spindle served"
    );
    assert!(exported[at..] == img[at..], "the imported data changed");
    assert!(ok("qemu-img", &["compare", p(&served), &tc.spec(&name)]).contains("identical"));
    // The lock went with the daemon: another writer may open it.
    ok("qemu-io", &["-f", "raw", "-c", "write -P 1 0 4k", &tc.spec(&name)]);
}

/// qcow2 on RBD: created by Spindle, served and written through libblkio,
/// then `qemu-img check` (through QEMU's rbd driver) finds it clean and
/// qemu-img reads what was written.
#[test]
fn qcow2_on_rbd_is_served_and_checks_clean() {
    let tc = cluster();
    let d = scratch();
    let dir = d.path();
    let name = unique("q");
    let spec = tc.spec(&name);
    ok("spindle", &["img", "create", "-f", "qcow2", &spec, "128M"]);
    let info: Value =
        serde_json::from_str(&ok("qemu-img", &["info", "-f", "qcow2", "--output", "json", &spec])).unwrap();
    assert_eq!(info["virtual-size"], json!(128 << 20), "{info}");
    let sock = dir.join("q.sock");
    let s = Serve::start(dir, &[&spec, "-f", "qcow2", "--vhost-user", p(&sock)], &[&sock]);
    let o = run(
        "spindle",
        &[
            "bench",
            p(&sock),
            "--rw",
            "randrw",
            "--verify",
            "--iodepth",
            "16",
            "--size",
            "96M",
            "--number-ios",
            "5000",
            "--runtime",
            "120",
            "--flush-every",
            "32",
            "--output",
            "json",
        ],
    );
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {o:?}"));
    assert_eq!(
        (v["errors"].clone(), v["verify"]["failures"].clone()),
        (json!(0), json!(0)),
        "{v}"
    );
    assert!(s.stop().success());
    let check = run("qemu-img", &["check", "-f", "qcow2", &spec]);
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stdout));
    assert!(String::from_utf8_lossy(&check.stdout).contains("No errors were found"));
    ok("spindle", &["img", "check", "-f", "qcow2", &spec]);
    // A copy through QEMU and one through Spindle agree.
    let (a, b) = (dir.join("a.raw"), dir.join("b.raw"));
    ok("qemu-img", &["convert", "-f", "qcow2", "-O", "raw", &spec, p(&a)]);
    ok("spindle", &["img", "convert", "-f", "qcow2", "-O", "raw", &spec, p(&b)]);
    assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap());
    assert!(
        std::fs::read(&a).unwrap().iter().any(|&x| x != 0),
        "nothing was written"
    );
}

const GUEST: &str = r#"
dd if=/dev/vda of=/tmp/h bs=1M count=4 iflag=direct 2>/dev/null
echo "HEAD-MD5 $(md5sum < /tmp/h | cut -d' ' -f1)"
dd if=/dev/urandom of=/tmp/p bs=1M count=4 2>/dev/null
dd if=/tmp/p of=/dev/vda bs=64k seek=256 oflag=direct conv=fsync 2>/dev/null
dd if=/dev/vda of=/tmp/b bs=1M skip=16 count=4 iflag=direct 2>/dev/null
cmp /tmp/p /tmp/b && echo "READBACK-OK"
echo "WROTE-MD5 $(md5sum < /tmp/p | cut -d' ' -f1)"
"#;

fn md5(data: &[u8], dir: &Path) -> String {
    let f = dir.join("md5.in");
    std::fs::write(&f, data).unwrap();
    let out = ok("md5sum", &[p(&f)]);
    out.split_whitespace().next().unwrap().to_owned()
}

fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in the guest's output:\n{out}"))
        .trim()
}

/// A TCG guest whose disk is an RBD image served by Spindle reads what
/// `rbd import` put there and writes data that `rbd export` then holds.
#[test]
fn a_guest_runs_on_an_rbd_disk() {
    let tc = cluster();
    let d = scratch();
    let dir = d.path();
    let name = unique("guest");
    let head = dir.join("head.raw");
    let mut img = pattern(4 * MIB, 3);
    img.resize(64 * MIB, 0);
    std::fs::write(&head, &img).unwrap();
    tc.rbd(&["import", "--no-progress", p(&head), &format!("rbd/{name}")]);
    let sock = dir.join("g.sock");
    let s = Serve::start(
        dir,
        &[&tc.spec(&name), "--vhost-user", p(&sock), "--iothreads", "2"],
        &[&sock],
    );
    let out = boot(dir, &[(&sock, 2)], GUEST);
    assert!(s.stop().success());
    assert_eq!(field(&out, "HEAD-MD5"), md5(&img[..4 * MIB], dir), "{out}");
    assert!(out.contains("READBACK-OK"), "{out}");
    let exported = export(tc, &name, dir);
    assert_eq!(
        md5(&exported[16 * MIB..20 * MIB], dir),
        field(&out, "WROTE-MD5"),
        "{out}"
    );
}

/// Two daemons (two hosts) never write one image: the second writable
/// open waits a little for the exclusive lock, then fails naming the
/// image and that it is in use; read-only opens are let in. The second
/// daemon's export comes from `[export.rbd]` config keys; once the first
/// daemon is gone it serves.
#[test]
fn the_exclusive_lock_keeps_a_second_writer_out_and_one_daemon_knows_its_image() {
    let tc = cluster();
    let d = scratch();
    let dir = d.path();
    let name = unique("lock");
    tc.rbd(&["create", &format!("rbd/{name}"), "--size", "32M"]);
    let a_sock = dir.join("a.sock");
    let a = Serve::start(
        dir,
        &[
            &tc.spec(&name),
            "--vhost-user",
            p(&a_sock),
            "--name",
            "a",
            "--control",
            "ctl.sock",
        ],
        &[&a_sock],
    );
    // The same daemon knows the image by its pool and name, however it is
    // spelled: a second active export is refused at once, naming the
    // first; a migration destination shares the open image.
    let c_sock = dir.join("c.sock");
    let keys = json!({"pool": "rbd", "image": name, "conf": tc.conf});
    let t = std::time::Instant::now();
    let r = a.ctl(&json!({"cmd": "add", "export": {"socket": p(&c_sock), "name": "c", "rbd": keys}}));
    assert_eq!(r["ok"], json!(false), "{r}");
    assert!(
        r["error"].as_str().unwrap().contains("already served by export 'a'"),
        "{r}"
    );
    assert!(
        t.elapsed() < std::time::Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    let r = a.ctl(&json!({"cmd": "add", "export": {"socket": p(&c_sock), "name": "c", "rbd": keys, "incoming": true}}));
    assert_eq!(r["ok"], json!(true), "{r}");
    let list = a.ctl(&json!({"cmd": "list"}));
    let c = list["exports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "c")
        .unwrap();
    assert_eq!(c["migration"], json!("incoming"), "{list}");
    assert_eq!(a.ctl(&json!({"cmd": "remove", "name": "c"}))["ok"], json!(true));
    let b_sock = dir.join("b.sock");
    let cfg = format!(
        "[[export]]\nsocket = \"{}\"\n[export.rbd]\npool = \"rbd\"\nimage = \"{name}\"\nconf = \"{}\"\n",
        b_sock.display(),
        tc.conf.display()
    );
    std::fs::write(dir.join("b.toml"), &cfg).unwrap();
    let t = std::time::Instant::now();
    let o = run("spindle", &["serve", "--config", p(&dir.join("b.toml"))]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains(&format!("image rbd/{name} is in use")) && e.contains("exclusive lock"),
        "{e}"
    );
    assert!(
        t.elapsed() < std::time::Duration::from_secs(30),
        "took {:?}",
        t.elapsed()
    );
    let e = spindle_err(&["img", "convert", "-n", "-O", "raw", "null:1M", &tc.spec(&name)]);
    assert!(e.contains("is in use"), "{e}");
    // Readers are fine.
    ok("spindle", &["img", "compare", "null:32M", &tc.spec(&name)]);
    assert!(a.stop().success());
    let b = Serve::start(dir, &["--config", "b.toml"], &[&b_sock]);
    assert!(b.stop().success());
}
