//! A QEMU guest (TCG) whose disk is `-blockdev driver=nbd` on `spindle
//! nbd`: it reads what the image held, writes new data with fsync, reads
//! it back past its page cache, and the image then holds exactly that,
//! with `qemu-img check` clean. Over a unix socket and over TCP.

mod common;

use common::nbd::{need_tool, NbdServer};
use common::serve::boot_with;
use common::{assert_clean, ok, p, run, scratch};
use std::path::Path;

/// The guest's part: the first MiB as the host wrote it (md5), then 4 MiB
/// of random data written at 8 MiB with fsync and read back after
/// dropping the page cache.
const SCRIPT: &str = r#"
set -e
echo "FIRST $(dd if=/dev/vda bs=1M count=1 2>/dev/null | md5sum | cut -d' ' -f1)"
dd if=/dev/urandom of=/tmp/pat bs=1M count=4 2>/dev/null
dd if=/tmp/pat of=/dev/vda bs=1M seek=8 conv=fsync 2>/dev/null
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda of=/tmp/back bs=1M skip=8 count=4 2>/dev/null
cmp /tmp/pat /tmp/back
echo "WROTE $(md5sum < /tmp/pat | cut -d' ' -f1)"
"#;

fn md5_of(cmd: &str) -> String {
    let o = run("sh", &["-c", &format!("{cmd} | md5sum")]);
    assert!(o.status.success());
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn field(console: &str, key: &str) -> String {
    console
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key} ")))
        .unwrap_or_else(|| panic!("no {key} line in:\n{console}"))
        .trim()
        .to_string()
}

/// Boots the guest on `server` (a `-blockdev` nbd `server.*` spec) and
/// checks what it saw and left in `img`.
fn guest_on(dir: &Path, img: &Path, server: &str) {
    let extra = [
        "-blockdev".to_string(),
        format!("driver=nbd,{server},export=vm1,node-name=nbd0"),
        "-device".to_string(),
        "virtio-blk-pci,drive=nbd0".to_string(),
    ];
    let console = boot_with(dir, &[], &extra, SCRIPT);
    let want_first = md5_of("head -c 1048576 /dev/zero | tr '\\0' '\\132'");
    assert_eq!(
        field(&console, "FIRST"),
        want_first,
        "the guest read other data:\n{console}"
    );
    let wrote = field(&console, "WROTE");
    let raw = dir.join("out.raw");
    ok("qemu-img", &["convert", "-U", "-O", "raw", p(img), p(&raw)]);
    let have = md5_of(&format!("dd if={} bs=1M skip=8 count=4 2>/dev/null", p(&raw)));
    assert_eq!(have, wrote, "the image does not hold what the guest wrote");
}

#[test]
fn a_qemu_guest_on_blockdev_nbd_reads_and_writes_a_qcow2_through_spindle() {
    need_tool("qemu-img");
    let d = scratch();
    let dir = d.path();
    let img = dir.join("disk.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&img), "64M"]);
    ok("qemu-io", &["-f", "qcow2", "-c", "write -P 0x5a 0 1M", p(&img)]);
    // Over a unix socket.
    let sock = dir.join("nbd.sock");
    let srv = NbdServer::start(&["-t", "-k", p(&sock), "-x", "vm1", "-f", "qcow2", p(&img)]);
    guest_on(dir, &img, &format!("server.type=unix,server.path={}", p(&sock)));
    assert!(srv.stop(), "spindle nbd did not exit 0");
    assert_clean(&img);
    // Over TCP, the same image again.
    let srv = NbdServer::start(&["-t", "-p", "0", "-b", "127.0.0.1", "-x", "vm1", "-f", "qcow2", p(&img)]);
    let addr = srv.tcp_addr();
    let (host, port) = addr.rsplit_once(':').unwrap();
    guest_on(
        dir,
        &img,
        &format!("server.type=inet,server.host={host},server.port={port}"),
    );
    assert!(srv.stop(), "spindle nbd did not exit 0");
    assert_clean(&img);
}
