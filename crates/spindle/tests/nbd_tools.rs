//! `spindle nbd` against libnbd's tools and QEMU's: nbdinfo (list, can,
//! map of both contexts, compared with `qemu-img map`), nbdcopy with four
//! connections over TCP and unix both ways, and qemu-io's writes, zero
//! writes, discards and FUA, after which `qemu-img check` is clean.

mod common;

use common::nbd::{need_tool, qemu_map, NbdServer};
use common::{ok, p, run, scratch};
use serde_json::Value;
use std::path::Path;

const MIB: u64 = 1 << 20;

/// A 64 MiB qcow2 over a raw backing file: data in the backing only, data
/// on top, a zero cluster over backing data, and unallocated space.
fn chain(dir: &Path) -> std::path::PathBuf {
    let base = dir.join("base.raw");
    let top = dir.join("top.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "raw", p(&base), "64M"]);
    ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x11 0 8M",
            "-c",
            "write -P 0x12 40M 2M",
            p(&base),
        ],
    );
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-b", p(&base), "-F", "raw", p(&top)],
    );
    ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x21 4M 1M",
            "-c",
            "write -z 40M 1M",
            "-c",
            "write -P 0x22 20M 64k",
            p(&top),
        ],
    );
    top
}

/// Per 64 KiB block: the value nbdinfo --map reports for `context`.
fn nbd_map(uri: &str, context: &str, size: u64) -> Vec<u64> {
    let out = ok("nbdinfo", &["--json", &format!("--map={context}"), uri]);
    let v: Value = serde_json::from_str(&out).unwrap();
    let mut blocks = vec![u64::MAX; (size / (64 << 10)) as usize];
    for e in v.as_array().unwrap() {
        let (start, len) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        for b in start / (64 << 10)..(start + len) / (64 << 10) {
            blocks[b as usize] = e["type"].as_u64().unwrap();
        }
    }
    blocks
}

#[test]
fn nbdinfo_lists_and_maps_what_qemu_img_maps() {
    need_tool("nbdinfo");
    let dir = scratch();
    let top = chain(dir.path());
    let srv = NbdServer::start(&["-t", "-p", "0", "-A", "-x", "vm1", "-D", "the test chain", p(&top)]);
    let list = ok("nbdinfo", &["--list", "--json", &srv.uri]);
    let v: Value = serde_json::from_str(&list).unwrap();
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], "vm1");
    assert_eq!(e["description"], "the test chain");
    assert_eq!(e["export-size"], 64 * MIB);
    let contexts: Vec<&str> = e["contexts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(contexts, ["base:allocation", "qemu:allocation-depth"]);
    for can in ["flush", "fua", "trim", "zero", "fast-zero", "multi-conn", "cache", "df"] {
        let o = run("nbdinfo", &["--can", can, &srv.uri]);
        assert_eq!(o.status.code(), Some(0), "nbdinfo --can {can}");
    }
    assert_eq!(run("nbdinfo", &["--is", "read-only", &srv.uri]).status.code(), Some(2));

    // base:allocation against qemu-img map: data ⇔ not a hole, zero ⇔ zero.
    let qemu = qemu_map(&top, 64 * MIB);
    let base = nbd_map(&srv.uri, "base:allocation", 64 * MIB);
    for (i, (&(data, zero), &flags)) in qemu.iter().zip(&base).enumerate() {
        assert_eq!(
            (flags & 1 == 0, flags & 2 != 0),
            (data, zero),
            "block {i} (offset {}): nbd flags {flags}, qemu-img data {data} zero {zero}",
            i as u64 * (64 << 10)
        );
    }
    // qemu:allocation-depth: 1 on top, 2 from the backing file, 0 nowhere.
    let depth = nbd_map(&srv.uri, "qemu:allocation-depth", 64 * MIB);
    let at = |off: u64| depth[(off / (64 << 10)) as usize];
    assert_eq!((at(4 * MIB), at(40 * MIB), at(20 * MIB)), (1, 1, 1));
    assert_eq!((at(0), at(41 * MIB)), (2, 2));
    // A raw backing file defines every byte: nothing is absent.
    assert!(depth.iter().all(|&d| d == 1 || d == 2), "{depth:?}");
    assert!(srv.stop());
}

#[test]
fn nbdcopy_out_and_in_with_four_connections_over_tcp_and_unix() {
    need_tool("nbdcopy");
    let dir = scratch();
    let top = chain(dir.path());
    for unix in [false, true] {
        let sock = dir.path().join("nbd.sock");
        let tag = if unix { "unix" } else { "tcp" };
        let srv = if unix {
            NbdServer::start(&["-t", "-r", "-k", p(&sock), p(&top)])
        } else {
            NbdServer::start(&["-t", "-r", "-p", "0", p(&top)])
        };
        // Out: the copy is identical, and sparse where the source reads as zeroes.
        let out = dir.path().join(format!("out-{tag}.raw"));
        ok("nbdcopy", &["--connections", "4", &srv.uri, p(&out)]);
        ok(
            "qemu-img",
            &["compare", "-U", "-f", "qcow2", "-F", "raw", p(&top), p(&out)],
        );
        let used = std::fs::metadata(&out)
            .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
            .unwrap();
        assert!(used < 20 * MIB, "{tag}: the copy is not sparse ({used} bytes used)");
        assert!(srv.stop(), "{tag}: clean exit");

        // In: a fresh writable qcow2 receives the copy over four connections.
        let dst = dir.path().join(format!("in-{tag}.qcow2"));
        ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&dst), "64M"]);
        let srv = if unix {
            NbdServer::start(&["-t", "--discard=unmap", "-k", p(&sock), p(&dst)])
        } else {
            NbdServer::start(&["-t", "--discard=unmap", "-p", "0", p(&dst)])
        };
        ok("nbdcopy", &["--connections", "4", p(&out), &srv.uri]);
        assert!(srv.stop(), "{tag}: clean exit");
        ok("qemu-img", &["compare", "-f", "qcow2", "-F", "raw", p(&dst), p(&out)]);
        common::assert_clean(&dst);
        let map = qemu_map(&dst, 64 * MIB);
        let data = map.iter().filter(|b| b.0).count() as u64 * (64 << 10);
        assert!(data <= 12 * MIB, "{tag}: zeroes were written as data ({data} bytes)");
    }
}

#[test]
fn qemu_io_writes_zeroes_discards_and_fua_then_the_image_checks_clean() {
    need_tool("qemu-io");
    let dir = scratch();
    let img = dir.path().join("disk.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&img), "32M"]);
    let srv = NbdServer::start(&["-t", "-p", "0", "--discard=unmap", p(&img)]);
    let o = ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 1M 1M",
            "-c",
            "write -f -P 0x6b 3M 64k",
            "-c",
            "write -z 1M 256k",
            "-c",
            "discard 1536k 256k",
            "-c",
            "write -z -u 5M 1M",
            "-c",
            "flush",
            "-c",
            "read -P 0 1M 256k",
            "-c",
            "read -P 0x5a 1280k 256k",
            "-c",
            "read -P 0 1536k 256k",
            "-c",
            "read -P 0x6b 3M 64k",
            "-c",
            "read -v 3M 16",
            &srv.uri,
        ],
    );
    assert!(!o.contains("Pattern verification failed"), "{o}");
    assert!(o.contains("6b 6b 6b 6b"), "read -v shows the bytes: {o}");
    // Past the end: refused, the server keeps serving.
    let past = run("qemu-io", &["-f", "raw", "-c", "read 32M 4k", &srv.uri]);
    assert!(
        String::from_utf8_lossy(&past.stdout).contains("error")
            || !past.status.success()
            || String::from_utf8_lossy(&past.stderr).contains("rror")
    );
    ok("qemu-io", &["-f", "raw", "-c", "read -P 0x6b 3M 64k", &srv.uri]);
    assert!(srv.stop());
    common::assert_clean(&img);
    ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "read -P 0x5a 1280k 256k",
            "-c",
            "read -P 0x6b 3M 64k",
            p(&img),
        ],
    );
}

#[test]
fn without_persistent_the_server_exits_after_the_last_client() {
    need_tool("nbdinfo");
    let dir = scratch();
    let pid = dir.path().join("nbd.pid");
    let srv = NbdServer::start(&["-p", "0", "-r", "--pid-file", p(&pid), "null:16M"]);
    assert!(std::fs::read_to_string(&pid).unwrap().trim().parse::<u32>().is_ok());
    ok("nbdinfo", &["--size", &srv.uri]);
    assert!(srv.wait(), "exit 0 after the client left");
    assert!(!pid.exists(), "the pid file is removed");
}

/// `-l`: an internal snapshot served read-only, by name or by
/// `snapshot.id=`, with the snapshot's own size; the image is not changed.
#[test]
fn load_snapshot_serves_an_internal_snapshot_read_only() {
    need_tool("qemu-io");
    let d = scratch();
    let dir = d.path();
    let img = dir.join("snap.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&img), "32M"]);
    ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x31 0 4M",
            "-c",
            "write -P 0x32 20M 1M",
            p(&img),
        ],
    );
    ok("qemu-img", &["snapshot", "-c", "before", p(&img)]);
    ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x41 1M 4M",
            "-c",
            "write -z 20M 1M",
            p(&img),
        ],
    );
    ok("qemu-img", &["resize", "-q", p(&img), "48M"]);
    let want = dir.join("want.raw");
    ok(
        "qemu-img",
        &["convert", "-l", "snapshot.name=before", "-O", "raw", p(&img), p(&want)],
    );
    let active = dir.join("active.raw");
    ok("qemu-img", &["convert", "-O", "raw", p(&img), p(&active)]);
    let before = std::fs::read(&img).unwrap();
    for spec in ["before", "snapshot.id=1", "snapshot.name=before"] {
        let sock = dir.join("snap.sock");
        let srv = NbdServer::start(&["-t", "-k", p(&sock), "-l", spec, p(&img)]);
        let uri = format!("nbd+unix:///?socket={}", p(&sock));
        let info: Value = serde_json::from_str(&ok("nbdinfo", &["--json", &uri])).unwrap();
        let e = &info["exports"][0];
        assert_eq!(e["export-size"], 32 << 20, "{spec}: {e}");
        assert_eq!(e["is_read_only"], true, "{spec}: {e}");
        ok("qemu-img", &["compare", "-f", "raw", p(&want), &uri]);
        let o = run("qemu-img", &["compare", "-f", "raw", p(&active), &uri]);
        assert!(!o.status.success(), "{spec}: the export shows the active disk");
        let o = run("qemu-io", &["-f", "raw", "-c", "write -P 0x55 0 512", &uri]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            !o.status.success() || text.contains("ermission") || text.contains("read-only"),
            "{spec}: a write went through: {text}"
        );
        assert!(srv.stop());
    }
    assert!(
        std::fs::read(&img).unwrap() == before,
        "serving a snapshot changed the image"
    );
    // Refused by name: an unknown snapshot, a raw image.
    let o = run("spindle", &["nbd", "-k", p(&dir.join("x.sock")), "-l", "nope", p(&img)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("no such snapshot"), "{err}");
    let o = run(
        "spindle",
        &["nbd", "-k", p(&dir.join("x.sock")), "-l", "before", p(&want)],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("not qcow2"), "{err}");
}
