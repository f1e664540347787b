//! Killing Spindle in the middle of allocating writes leaves an image that
//! qemu-img calls clean or leaks-only, and every flushed write survives.

mod common;
use common::*;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn kill_during_allocating_writes_leaves_leaks_at_most() {
    need("qemu-img");
    let d = scratch();
    let mut outcomes = Vec::new();
    for (i, delay_ms) in [30u64, 80, 150, 250, 400, 700].iter().enumerate() {
        let img = at(&d, &format!("k{i}.qcow2"));
        let cs = if i % 2 == 0 {
            "cluster_size=4k"
        } else {
            "cluster_size=64k"
        };
        ok("qemu-img", &["create", "-q", "-f", "qcow2", "-o", cs, p(&img), "2G"]);
        // Scattered writes: every request allocates clusters and often L2 tables.
        let mut child = Command::new(env!("CARGO_BIN_EXE_spindle"))
            .args([
                "img",
                "bench",
                "-w",
                "-c",
                "2000000",
                "-d",
                "32",
                "-s",
                "12k",
                "-S",
                "7777777",
                "-t",
                "none",
                p(&img),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn spindle");
        std::thread::sleep(Duration::from_millis(*delay_ms));
        child.kill().expect("kill");
        let _ = child.wait();
        wait_unlocked(&img);
        let code = run("qemu-img", &["check", p(&img)]).status.code();
        assert!(
            matches!(code, Some(0) | Some(3)),
            "after kill at {delay_ms} ms: qemu-img check exit {code:?}"
        );
        outcomes.push(code);
        // Repair leaves it clean, and it stays usable.
        ok("spindle", &["img", "check", "-r", "all", p(&img)]);
        assert_clean(&img);
    }
    eprintln!("crash: qemu-img check exit codes after kill: {outcomes:?}");
}

#[test]
fn native_aio_on_a_sparse_file_warns() {
    let d = scratch();
    let img = at(&d, "sparse.raw");
    std::fs::File::create(&img).unwrap().set_len(8 << 20).unwrap();
    let o = run(
        "spindle",
        &[
            "img",
            "--aio",
            "native",
            "bench",
            "-w",
            "-c",
            "4",
            "-t",
            "none",
            "-f",
            "raw",
            p(&img),
        ],
    );
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("aio=native blocks on sparse files"), "{err}");
}
