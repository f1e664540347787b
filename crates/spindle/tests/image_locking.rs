//! Image locking against the real QEMU tools: QEMU's OFD byte-range locks
//! keep Spindle, QEMU and qemu-img out of each other's images.

mod common;

use common::serve::Serve;
use common::{need, ofd_locked_bytes, ok, p, qcow2_create, run, scratch, wait_unlocked};
use serde_json::json;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs a command that must fail; returns its stderr.
fn fails(cmd: &str, args: &[&str]) -> String {
    let o = run(cmd, args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        !o.status.success(),
        "{cmd} {args:?} succeeded but must be refused:\n{}{err}",
        String::from_utf8_lossy(&o.stdout)
    );
    err
}

/// `spindle serve ARGS` must exit with an error (a server that starts
/// instead is killed and the test fails); returns its stderr.
fn serve_refused(args: &[&str]) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_spindle"))
        .arg("serve")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn spindle serve");
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!(
                "spindle serve {args:?} started serving an image in use:\n{}",
                String::from_utf8_lossy(&o.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let o: Output = child.wait_with_output().unwrap();
    assert!(!o.status.success(), "spindle serve {args:?} exited 0");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_in_use(err: &str, image: &Path, perm: &str) {
    let name = p(image);
    assert!(
        err.contains(&format!("{name}: image is in use")) && err.contains(&format!("\"{perm}\" permission")),
        "expected '{name}: image is in use' naming \"{perm}\", got:\n{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "one line:\n{err}");
}

/// `spindle img convert` of an image someone writes is refused, and copies
/// it with -U.
fn copy_needs_force_share(img: &Path, copy: &Path) {
    let err = fails("spindle", &["img", "convert", "-O", "raw", p(img), p(copy)]);
    assert_in_use(&err, img, "write");
    assert!(err.contains("use -U"), "{err}");
    ok("spindle", &["img", "convert", "-U", "-O", "raw", p(img), p(copy)]);
}

/// Whether some process holds QEMU's "write" lock byte (101) on `image`.
fn write_locked(image: &Path) -> bool {
    ofd_locked_bytes(image).contains(&101)
}

/// A QEMU process, killed on drop.
struct Peer(Child);

impl Peer {
    /// qemu-storage-daemon holding a qcow2 image writable (as a VM's disk).
    fn storage_daemon(image: &Path) -> Peer {
        need("qemu-storage-daemon");
        let child = Command::new("qemu-storage-daemon")
            .args([
                "--blockdev",
                &format!("driver=file,node-name=f0,filename={}", p(image)),
                "--blockdev",
                "driver=qcow2,node-name=d0,file=f0",
            ])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn qemu-storage-daemon");
        let mut q = Peer(child);
        let start = Instant::now();
        while !write_locked(image) {
            assert!(q.0.try_wait().unwrap().is_none(), "qemu-storage-daemon exited");
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "qemu-storage-daemon never locked the image"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        q
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(dir: &Path, image: &Path, sock: &Path, extra: &[&str]) -> Serve {
    let mut args = vec![p(image), "--vhost-user", p(sock)];
    args.extend_from_slice(extra);
    Serve::start(dir, &args, &[sock])
}

/// While `spindle serve` exports an image read-write, QEMU's tools and
/// Spindle itself are kept out, except for looks: with -U, and (as qemu-img
/// does) at raw images, which have no metadata to change underfoot.
#[test]
fn a_served_image_is_refused_to_writers_and_plain_readers() {
    need("qemu-img");
    need("qemu-io");
    let dir = scratch();
    for fmt in ["qcow2", "raw"] {
        let img = dir.path().join(format!("disk.{fmt}"));
        ok("qemu-img", &["create", "-q", "-f", fmt, p(&img), "64M"]);
        let sock = dir.path().join(format!("{fmt}.sock"));
        let s = serve(dir.path(), &img, &sock, &[]);

        let err = fails("qemu-io", &["-f", fmt, "-c", "write 0 4k", p(&img)]);
        assert!(err.contains("Failed to get \"write\" lock"), "{err}");
        let err = fails(
            "qemu-img",
            &["convert", "-f", fmt, "-O", "raw", p(&img), p(&dir.path().join("c.raw"))],
        );
        assert!(err.contains("Failed to get shared \"write\" lock"), "{err}");
        ok("qemu-img", &["info", "-U", "-f", fmt, p(&img)]);
        copy_needs_force_share(&img, &dir.path().join("copy.raw"));
        let out = ok("spindle", &["img", "info", "-U", p(&img)]);
        assert!(out.contains(&format!("file format: {fmt}")), "{out}");
        ok("spindle", &["img", "map", "--force-share", p(&img)]);
        if fmt == "qcow2" {
            let err = fails("qemu-img", &["info", p(&img)]);
            assert!(err.contains("Failed to get shared \"write\" lock"), "{err}");
            let err = fails("spindle", &["img", "info", p(&img)]);
            assert_in_use(&err, &img, "write");
            assert!(err.contains("use -U"), "{err}");
            assert_in_use(&fails("spindle", &["img", "map", p(&img)]), &img, "write");
        } else {
            ok("qemu-img", &["info", p(&img)]);
            ok("spindle", &["img", "info", p(&img)]);
            ok("spindle", &["img", "map", p(&img)]);
        }

        let other = dir.path().join(format!("{fmt}-2.sock"));
        let err = serve_refused(&[p(&img), "--vhost-user", p(&other)]);
        assert!(err.contains("image is in use"), "{err}");
        assert!(!other.exists(), "the refused export bound its socket");
        assert!(s.stop().success());
        // Once Spindle is gone, QEMU gets the image.
        ok("qemu-io", &["-f", fmt, "-c", "write 0 4k", p(&img)]);
        ok(
            "qemu-img",
            &["convert", "-f", fmt, "-O", "raw", p(&img), p(&dir.path().join("c.raw"))],
        );
    }
}

/// Writing commands are refused while an image is served, and -U does not
/// get them in: it is for read-only opens only, as in qemu-img.
#[test]
fn writing_commands_are_refused_while_served() {
    need("qemu-img");
    let dir = scratch();
    let img = dir.path().join("disk.qcow2");
    qcow2_create(&img, &[], Some("64M"));
    let sock = dir.path().join("d.sock");
    let s = serve(dir.path(), &img, &sock, &[]);
    let before = std::fs::read(&img).unwrap();

    assert_in_use(
        &fails("spindle", &["img", "check", "-r", "all", p(&img)]),
        &img,
        "write",
    );
    assert_in_use(
        &fails("spindle", &["img", "snapshot", "-c", "s1", p(&img)]),
        &img,
        "write",
    );
    assert_in_use(&fails("spindle", &["img", "resize", p(&img), "128M"]), &img, "write");
    for args in [
        &["img", "check", "-U", "-r", "all"][..],
        &["img", "snapshot", "-U", "-c", "s1"][..],
        &["img", "bench", "-U", "-w", "-c", "1"][..],
    ] {
        let mut a = args.to_vec();
        a.push(p(&img));
        let err = fails("spindle", &a);
        assert!(
            err.contains("force-share (-U) can only be used with read-only images"),
            "{a:?}: {err}"
        );
    }
    // Neither Spindle nor qemu-img truncates the image under the server.
    assert_in_use(
        &fails("spindle", &["img", "create", "-f", "qcow2", p(&img), "1G"]),
        &img,
        "write",
    );
    assert_in_use(
        &fails("spindle", &["img", "create", "-f", "raw", p(&img), "1G"]),
        &img,
        "write",
    );
    let err = fails("qemu-img", &["create", "-f", "qcow2", p(&img), "1G"]);
    assert!(err.contains("lock"), "{err}");
    assert!(std::fs::read(&img).unwrap() == before, "the served image changed");
    assert!(s.stop().success());
    ok("spindle", &["img", "check", "-r", "all", p(&img)]);
}

/// A second export of an image through the control socket is refused; a
/// removed export lets the image go.
#[test]
fn a_second_export_through_the_control_socket_is_refused() {
    need("qemu-img");
    let dir = scratch();
    let img = dir.path().join("disk.qcow2");
    qcow2_create(&img, &[], Some("64M"));
    let sock = dir.path().join("a.sock");
    let s = serve(dir.path(), &img, &sock, &["--control", "ctl.sock"]);
    let other = dir.path().join("b.sock");
    let r = s.ctl(&json!({"cmd": "add", "export": {"image": p(&img), "socket": p(&other), "name": "again"}}));
    assert_eq!(r["ok"], json!(false), "{r}");
    let e = r["error"].as_str().unwrap_or_default();
    assert!(e.contains("image is in use"), "{r}");
    // Read-only alongside the writer is refused too: the writer does not share.
    let r = s
        .ctl(&json!({"cmd": "add", "export": {"image": p(&img), "socket": p(&other), "name": "ro", "readonly": true}}));
    assert_eq!(r["ok"], json!(false), "{r}");
    assert_eq!(
        s.ctl(&json!({"cmd": "list"}))["exports"].as_array().map(Vec::len),
        Some(1)
    );

    let r = s.ctl(&json!({"cmd": "remove", "name": "disk"}));
    assert_eq!(r["ok"], json!(true), "{r}");
    ok("qemu-img", &["info", p(&img)]);
    let r = s.ctl(&json!({"cmd": "add", "export": {"image": p(&img), "socket": p(&other), "name": "again"}}));
    assert_eq!(r["ok"], json!(true), "{r}");
    fails("qemu-img", &["info", p(&img)]);
    assert!(s.stop().success());
}

/// While QEMU holds an image writable, Spindle refuses to serve or change
/// it, and looks at it only with -U.
#[test]
fn an_image_qemu_writes_is_refused() {
    need("qemu-img");
    let dir = scratch();
    let img = dir.path().join("vm.qcow2");
    qcow2_create(&img, &[], Some("64M"));
    let qsd = Peer::storage_daemon(&img);

    let sock = dir.path().join("vm.sock");
    let err = serve_refused(&[p(&img), "--vhost-user", p(&sock)]);
    assert!(err.contains("image is in use") && err.contains("\"write\""), "{err}");
    let err = serve_refused(&[p(&img), "--vhost-user", p(&sock), "--readonly"]);
    assert!(err.contains("image is in use"), "{err}");
    assert_in_use(
        &fails("spindle", &["img", "snapshot", "-c", "s1", p(&img)]),
        &img,
        "write",
    );
    assert_in_use(&fails("spindle", &["img", "info", p(&img)]), &img, "write");
    let out = ok("spindle", &["img", "info", "-U", p(&img)]);
    assert!(out.contains("virtual size: 64 MiB"), "{out}");
    copy_needs_force_share(&img, &dir.path().join("copy.raw"));
    ok("spindle", &["img", "check", "-U", p(&img)]);
    ok("spindle", &["img", "snapshot", "-U", "-l", p(&img)]);
    drop(qsd);
    ok("spindle", &["img", "snapshot", "-c", "s1", p(&img)]);
}

/// A read-only export shares reading with QEMU, not writing.
#[test]
fn a_read_only_export_lets_readers_in_and_writers_not() {
    need("qemu-img");
    need("qemu-io");
    let dir = scratch();
    let img = dir.path().join("ro.qcow2");
    qcow2_create(&img, &[], Some("64M"));
    let sock = dir.path().join("ro.sock");
    let s = serve(dir.path(), &img, &sock, &["--readonly"]);
    ok("qemu-img", &["info", p(&img)]);
    ok("qemu-io", &["-r", "-c", "read 0 4k", p(&img)]);
    let err = fails("qemu-io", &["-c", "write 0 4k", p(&img)]);
    assert!(err.contains("Failed to get \"write\" lock"), "{err}");
    ok("spindle", &["img", "info", p(&img)]);
    ok("spindle", &["img", "check", p(&img)]);
    assert_in_use(
        &fails("spindle", &["img", "snapshot", "-c", "s1", p(&img)]),
        &img,
        "write",
    );
    // A second read-only export, in another process, reads alongside.
    let sock2 = dir.path().join("ro2.sock");
    let s2 = serve(dir.path(), &img, &sock2, &["--readonly"]);
    assert!(s2.stop().success());
    assert!(s.stop().success());
}

/// Backing files are read-locked like QEMU's backing nodes: QEMU cannot
/// write a backing file Spindle reads, and Spindle refuses a backing file
/// QEMU writes.
#[test]
fn backing_files_are_locked_for_reading() {
    need("qemu-img");
    need("qemu-io");
    let dir = scratch();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    qcow2_create(&base, &[], Some("64M"));
    qcow2_create(&top, &["-b", p(&base), "-F", "qcow2"], None);
    let sock = dir.path().join("top.sock");
    let s = serve(dir.path(), &top, &sock, &[]);
    let err = fails("qemu-io", &["-c", "write 0 4k", p(&base)]);
    assert!(err.contains("Failed to get \"write\" lock"), "{err}");
    let err = fails("qemu-img", &["commit", p(&top)]);
    assert!(err.contains("lock"), "{err}");
    // Readers of the backing file are welcome.
    ok("qemu-img", &["info", p(&base)]);
    ok("qemu-img", &["compare", "-U", p(&top), p(&base)]);
    assert!(s.stop().success());

    let qsd = Peer::storage_daemon(&base);
    let err = serve_refused(&[p(&top), "--vhost-user", p(&sock)]);
    assert!(err.contains(&format!("{}: image is in use", p(&base))), "{err}");
    assert_in_use(&fails("spindle", &["img", "map", p(&top)]), &base, "write");
    ok("spindle", &["img", "map", "-U", p(&top)]);
    drop(qsd);
    // Spindle's own commit: the image writable, its backing file writable.
    ok("qemu-io", &["-c", "write -P 7 0 4k", p(&top)]);
    ok("spindle", &["img", "commit", p(&top)]);
    ok("qemu-io", &["-c", "read -P 7 0 4k", p(&base)]);
}

/// A VM's raw disk (qemu-system-x86_64, stopped with -S): Spindle neither
/// serves nor copies it, and looks at it as qemu-img does.
#[test]
fn a_vm_disk_is_refused() {
    need("qemu-system-x86_64");
    let dir = scratch();
    let img = dir.path().join("vm.raw");
    ok("qemu-img", &["create", "-q", "-f", "raw", p(&img), "64M"]);
    let vm = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-S", "-nodefaults", "-display", "none", "-m", "64"])
        .args(["-drive", &format!("file={},format=raw,if=virtio", p(&img))])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn qemu-system-x86_64");
    let mut vm = Peer(vm);
    let start = Instant::now();
    while !write_locked(&img) {
        assert!(vm.0.try_wait().unwrap().is_none(), "qemu-system-x86_64 exited");
        assert!(start.elapsed() < Duration::from_secs(30), "QEMU never locked its disk");
        std::thread::sleep(Duration::from_millis(20));
    }
    let sock = dir.path().join("vm.sock");
    let err = serve_refused(&[p(&img), "--vhost-user", p(&sock)]);
    assert!(err.contains("does not share the \"write\" permission"), "{err}");
    copy_needs_force_share(&img, &dir.path().join("copy.raw"));
    ok("spindle", &["img", "info", p(&img)]);
    drop(vm);
    wait_unlocked(&img);
    let s = serve(dir.path(), &img, &sock, &[]);
    assert!(s.stop().success());
}
