//! Block devices as disks (a loop device over a sparse file stands for an
//! LVM volume or a partition): discard and write-zeroes reach the device,
//! which the test sees as holes punched in the loop device's backing
//! file. Through NBD with qemu-io under each I/O engine, and from a TCG
//! guest's `blkdiscard` through vhost-user.

mod common;

use common::serve::{boot, Serve};
use common::{ok, p, scratch};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// A loop device over a new sparse file, detached on drop.
struct Loop {
    dev: String,
    file: PathBuf,
}

impl Loop {
    /// `sector`: the device's logical block size.
    fn new(dir: &Path, size: &str, sector: u32) -> Loop {
        let file = dir.join("backing.raw");
        ok("truncate", &["-s", size, p(&file)]);
        let b = sector.to_string();
        let dev = ok("losetup", &["-f", "--show", "-b", &b, p(&file)]).trim().to_owned();
        Loop { dev, file }
    }
    fn allocated(&self) -> u64 {
        std::fs::metadata(&self.file).unwrap().blocks() * 512
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

fn nbd(dev: &str, sock: &Path, aio: &str) -> Child {
    let _ = std::fs::remove_file(sock);
    let child = Command::new(env!("CARGO_BIN_EXE_spindle"))
        .args(["nbd", "-t", "--discard", "unmap", "--aio", aio, "-k", p(sock), dev])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !sock.exists() {
        assert!(start.elapsed() < Duration::from_secs(10), "spindle nbd did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut a = vec!["-f", "raw"];
    for c in cmds {
        a.extend(["-c", c]);
    }
    a.push(uri);
    let out = ok("qemu-io", &a);
    assert!(
        !out.contains("failed") && !out.contains("Pattern verification"),
        "{out}"
    );
    out
}

#[test]
fn discard_and_write_zeroes_reach_a_block_device_under_every_engine() {
    for aio in ["io_uring", "native", "threads"] {
        let d = scratch();
        // 4 KiB logical blocks, as many SSDs and volumes have.
        let lo = Loop::new(d.path(), "64M", 4096);
        let sock = d.path().join("n.sock");
        let mut server = nbd(&lo.dev, &sock, aio);
        let uri = format!("nbd+unix:///?socket={}", sock.display());
        qemu_io(&uri, &["write -P 0xaa 0 32M", "flush"]);
        assert_eq!(lo.allocated(), 32 * MIB, "{aio}");
        // Discard: the device's own; the loop device punches its file.
        qemu_io(&uri, &["discard 0 8M", "flush"]);
        assert_eq!(lo.allocated(), 24 * MIB, "{aio}: discard did not reach the device");
        // Write zeroes that may unmap: punched too.
        qemu_io(&uri, &["write -z -u 8M 8M", "flush"]);
        assert_eq!(
            lo.allocated(),
            16 * MIB,
            "{aio}: write-zeroes with unmap kept the space"
        );
        // Without unmap: zeroes, allocation kept.
        qemu_io(&uri, &["write -z 16M 8M", "flush"]);
        assert_eq!(
            lo.allocated(),
            16 * MIB,
            "{aio}: write-zeroes without unmap freed space"
        );
        // An unaligned discard (24 MiB + 512 to 25 MiB - 512) is shrunk
        // to whole 4 KiB blocks, never widened over data it was not given.
        qemu_io(&uri, &["discard 25166336 1047552"]);
        qemu_io(
            &uri,
            &[
                "read -P 0 0 24M",
                "read -P 0xaa 24M 4k",
                "read -P 0 25169920 1040384",
                "read -P 0xaa 26210304 4k",
                "read -P 0xaa 25M 7M",
            ],
        );
        assert_eq!(lo.allocated(), 16 * MIB - 1040384, "{aio}");
        server.kill().unwrap();
        server.wait().unwrap();
    }
}

const GUEST: &str = r#"
echo "GRAN $(cat /sys/block/vda/queue/discard_granularity)"
dd if=/dev/urandom of=/dev/vda bs=1M count=16 oflag=direct conv=fsync 2>/dev/null
echo "WROTE"
blkdiscard -o 0 -l 8388608 /dev/vda && echo "DISCARD-OK"
dd if=/dev/vda bs=1M count=1 iflag=direct 2>/dev/null | tr -d '\000' | wc -c | sed 's/^/NONZERO /'
"#;

/// A guest's `blkdiscard` on a vhost-user disk over a block device (4 KiB
/// logical blocks) frees the device's space, and the guest sees the
/// device's discard granularity.
#[test]
fn a_guest_discard_frees_a_block_devices_space() {
    let d = scratch();
    let lo = Loop::new(d.path(), "64M", 4096);
    let sock = d.path().join("g.sock");
    let s = Serve::start(d.path(), &[&lo.dev, "--vhost-user", p(&sock)], &[&sock]);
    let out = boot(d.path(), &[(&sock, 1)], GUEST);
    assert!(s.stop().success());
    assert!(out.contains("DISCARD-OK"), "{out}");
    // The device's 4 KiB discard granularity reached the guest through
    // the virtio-blk configuration.
    assert!(out.contains("GRAN 4096"), "{out}");
    assert!(
        out.contains("NONZERO 0"),
        "discarded blocks of a loop device read as zeroes: {out}"
    );
    assert_eq!(lo.allocated(), 8 * MIB, "{out}");
}
