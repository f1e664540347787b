//! Live migration of a TCG guest whose disks Spindle serves, under load.
//! The guest runs gio (tests/guest/gio.c) on a raw disk, a qcow2 disk and a
//! qcow2 over a raw backing file: writers verifying generation patterns,
//! small reads, and heavy readers that keep 32 MiB per disk of what they read in
//! guest memory with checksums, re-checked after the guest resumed on the
//! destination (a guest page Spindle wrote without marking it dirty reaches
//! the destination stale). QEMU migrates it over a unix socket to a second
//! QEMU started with `-incoming`, whose disks are a second export of each
//! image: in the same daemon (`spindle ctl add … --incoming`) or in a second
//! `spindle serve … --incoming`. The guest must finish on the destination
//! with no I/O error and no wrong data, and the images must be clean. A
//! migration cancelled, or failed by a dying destination, after the source
//! stopped its devices must leave the guest running on the source.

mod common;

use common::gio::{self, Layout};
use common::serve::{config_text, Serve};
use common::vm::{self, Vm};
use common::{assert_clean, ok, p, scratch};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

const LAYOUT: Layout = Layout {
    writers: 3,
    region_mib: 2,
    hold_mib: 16,
};
const DISK: u64 = 64 << 20;
const GIO: &str = "--readers 1 --hold-threads 2 --pool-mib 32 --base-gen 1";
const MINUTE: Duration = Duration::from_secs(60);

/// One of the guest's disks.
struct Disk {
    name: &'static str,
    /// The guest's name for it: vda, vdb, ...
    dev: String,
    img: PathBuf,
    fmt: &'static str,
    src: PathBuf,
    dst: PathBuf,
}

/// The disks, prefilled with generation 1 (gio's base): raw, qcow2, and
/// an empty qcow2 over a raw backing file that holds the data.
fn disks(dir: &Path, which: &[&'static str]) -> (Vec<Disk>, PathBuf) {
    let base = dir.join("base.raw");
    LAYOUT.prefill(&base, DISK, 1);
    let disks = which
        .iter()
        .enumerate()
        .map(|(i, &name)| {
            let (img, fmt) = match name {
                "raw" => (dir.join("raw.img"), "raw"),
                "q" => (dir.join("q.qcow2"), "qcow2"),
                _ => (dir.join("over.qcow2"), "qcow2"),
            };
            match name {
                "raw" => LAYOUT.prefill(&img, DISK, 1),
                "q" => {
                    ok("qemu-img", &["convert", "-f", "raw", "-O", "qcow2", p(&base), p(&img)]);
                }
                _ => {
                    ok(
                        "qemu-img",
                        &["create", "-q", "-f", "qcow2", "-b", p(&base), "-F", "raw", p(&img)],
                    );
                }
            }
            Disk {
                name,
                dev: format!("vd{}", (b'a' + i as u8) as char),
                img,
                fmt,
                src: dir.join(format!("{name}.sock")),
                dst: dir.join(format!("{name}-in.sock")),
            }
        })
        .collect();
    (disks, base)
}

fn src_socks(disks: &[Disk]) -> Vec<(&Path, u16)> {
    disks.iter().map(|d| (d.src.as_path(), 2)).collect()
}

fn dst_socks(disks: &[Disk]) -> Vec<(&Path, u16)> {
    disks.iter().map(|d| (d.dst.as_path(), 2)).collect()
}

/// Boots the guest on the source sockets with gio on every disk, and
/// waits until it works.
fn boot_source(dir: &Path, disks: &[Disk]) -> (Vm, PathBuf) {
    let devs: Vec<String> = disks.iter().map(|d| format!("/dev/{}", d.dev)).collect();
    let script = format!("exec /gio {} {GIO} {}\n", LAYOUT.args(), devs.join(" "));
    let initrd = vm::initrd(dir, &script, true);
    let src = Vm::start(dir, "src", &initrd, &src_socks(disks), None);
    src.wait_line(0, "GIO-RUNNING", Duration::from_secs(120));
    let_it_work(&src, 2);
    (src, initrd)
}

/// Waits until the guest on `vm` printed `n` more progress lines.
fn let_it_work(vm: &Vm, n: usize) {
    let mut at = vm.mark();
    for _ in 0..n {
        at = vm.wait_line(at, "GIO-PROGRESS", MINUTE).0 + 1;
    }
}

/// Starts a destination QEMU on the disks' destination sockets, waiting
/// for the migration on a unix socket of its own.
fn destination(dir: &Path, name: &str, initrd: &Path, disks: &[Disk]) -> (Vm, String) {
    let uri = format!("unix:{}", dir.join(format!("{name}.migration")).display());
    let dst = Vm::start(dir, name, initrd, &dst_socks(disks), Some(&uri));
    (dst, uri)
}

/// Migrates `src` to a new destination QEMU and waits until the guest runs
/// there; returns it and query-migrate's final answer.
fn migrate(dir: &Path, src: &mut Vm, initrd: &Path, disks: &[Disk], name: &str) -> (Vm, Value) {
    let (mut dst, uri) = destination(dir, name, initrd, disks);
    src.qmp.migrate_start(&uri);
    let st = src.qmp.wait_migration(&["completed"], Duration::from_secs(120));
    dst.wait_running(MINUTE);
    (dst, st)
}

/// Lets the guest work on the destination, stops gio there and checks
/// its report; then stops the daemons and checks the images.
fn finish(dst: &mut Vm, src: Vm, st: &Value, disks: &[Disk], base: &Path, dir: &Path, daemons: Vec<Serve>) {
    let_it_work(dst, 2);
    dst.send("S");
    dst.wait_exit(Duration::from_secs(180));
    let console = dst.console();
    println!(
        "--- source console:\n{}\n--- destination console:\n{console}",
        src.console()
    );
    gio::assert_no_kernel_errors(&src.console());
    let summary = gio::assert_clean(&console);
    assert!(
        summary["held_checks"] > 0,
        "the held buffers were never re-checked: {summary:?}"
    );
    println!(
        "migration: total {} ms, downtime {} ms, {} RAM bytes transferred",
        st["total-time"], st["downtime"], st["ram"]["transferred"]
    );
    drop(src);
    for s in daemons {
        let log = s.log.clone();
        let status = s.stop();
        let text = std::fs::read_to_string(log).unwrap_or_default();
        assert!(status.success(), "spindle serve exited with {status}:\n{text}");
    }
    let finals = gio::finals(&console);
    for d in disks {
        if d.fmt == "qcow2" {
            assert_clean(&d.img);
        }
        let last = &finals[&d.dev];
        let bad = LAYOUT.check(&LAYOUT.read(&d.img, dir), 1, |w, g| {
            let (gen, synced) = last[w as usize];
            synced && g == gen
        });
        assert!(
            bad.is_empty(),
            "{}: the image differs from what gio wrote: {bad:#?}",
            d.name
        );
    }
    let bad = LAYOUT.check(&LAYOUT.read(base, dir), 1, |_, g| g == 1);
    assert!(bad.is_empty(), "the backing file changed: {bad:#?}");
}

/// `spindle ctl add NAME IMAGE --vhost-user SOCK --incoming`: a second
/// export of a served image, for a migration's destination.
fn add_incoming(ctl: &Path, name: &str, img: &Path, sock: &Path) {
    ok(
        "spindle",
        &[
            "ctl",
            "-c",
            p(ctl),
            "add",
            "--name",
            name,
            p(img),
            "--vhost-user",
            p(sock),
            "--incoming",
        ],
    );
}

/// Writes the config file `file` serving every disk on its source
/// sockets, or (`incoming`) on its destination sockets as `incoming`
/// exports; returns those sockets.
fn config<'a>(dir: &Path, file: &str, disks: &'a [Disk], incoming: bool) -> Vec<&'a Path> {
    let exports: Vec<_> = disks
        .iter()
        .map(|d| match incoming {
            false => (d.name, d.img.as_path(), d.src.as_path(), ""),
            true => (d.name, d.img.as_path(), d.dst.as_path(), "incoming = true\n"),
        })
        .collect();
    std::fs::write(dir.join(file), config_text(None, &exports)).unwrap();
    exports.iter().map(|e| e.2).collect()
}

#[test]
fn guest_migrates_to_a_second_export_of_its_images_in_the_same_daemon() {
    let _one = vm::one_at_a_time();
    let d = scratch();
    let dir = d.path();
    let (disks, base) = disks(dir, &["raw", "q", "over"]);
    let srcs = config(dir, "spindle.toml", &disks, false);
    let server = Serve::start(dir, &["--config", "spindle.toml", "--control", "ctl.sock"], &srcs);
    let ctl = dir.join("ctl.sock");
    for d in &disks {
        add_incoming(&ctl, &format!("{}-in", d.name), &d.img, &d.dst);
    }
    let (mut src, initrd) = boot_source(dir, &disks);
    let (mut dst, st) = migrate(dir, &mut src, &initrd, &disks, "dst");
    finish(&mut dst, src, &st, &disks, &base, dir, vec![server]);
}

#[test]
fn guest_migrates_to_a_second_spindle_serve_on_the_same_images() {
    let _one = vm::one_at_a_time();
    let d = scratch();
    let dir = d.path();
    let (disks, base) = disks(dir, &["raw", "q", "over"]);
    let srcs = config(dir, "src.toml", &disks, false);
    let dsts = config(dir, "dst.toml", &disks, true);
    let source = Serve::start(dir, &["--config", "src.toml"], &srcs);
    let target = Serve::start(dir, &["--config", "dst.toml"], &dsts);
    let (mut src, initrd) = boot_source(dir, &disks);
    let (mut dst, st) = migrate(dir, &mut src, &initrd, &disks, "dst");
    finish(&mut dst, src, &st, &disks, &base, dir, vec![source, target]);
}

#[test]
fn a_migration_cancelled_or_failed_after_the_source_stopped_leaves_the_guest_running_there() {
    let _one = vm::one_at_a_time();
    let d = scratch();
    let dir = d.path();
    let (disks, base) = disks(dir, &["q"]);
    let q = &disks[0];
    let source = Serve::start(dir, &[p(&q.img), "--vhost-user", p(&q.src)], &[&q.src]);
    let target = Serve::start(dir, &[p(&q.img), "--vhost-user", p(&q.dst), "--incoming"], &[&q.dst]);
    let (mut src, initrd) = boot_source(dir, &disks);
    let pause = |src: &mut Vm, on: bool| {
        src.qmp.execute(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "pause-before-switchover", "state": on}]}),
        );
    };
    pause(&mut src, true);

    // Cancelled once the source's VM and devices are stopped.
    let (mut dst, uri) = destination(dir, "dst1", &initrd, &disks);
    src.qmp.migrate_start(&uri);
    src.qmp.wait_migration(&["pre-switchover"], Duration::from_secs(120));
    src.qmp.execute("migrate_cancel", json!({}));
    src.qmp.wait_migration(&["cancelled"], MINUTE);
    src.wait_running(MINUTE);
    dst.kill();
    let_it_work(&src, 2);

    // The destination QEMU dies there; continuing fails.
    let (mut dst, uri) = destination(dir, "dst2", &initrd, &disks);
    src.qmp.migrate_start(&uri);
    src.qmp.wait_migration(&["pre-switchover"], Duration::from_secs(120));
    dst.kill();
    src.qmp.execute("migrate-continue", json!({"state": "pre-switchover"}));
    src.qmp.wait_migration(&["failed"], MINUTE);
    src.wait_running(MINUTE);
    let_it_work(&src, 2);

    // And the next migration goes through.
    pause(&mut src, false);
    let (mut dst, st) = migrate(dir, &mut src, &initrd, &disks, "dst3");
    finish(&mut dst, src, &st, &disks, &base, dir, vec![source, target]);
}
