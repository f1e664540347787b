//! `spindle vm restore`: a snapshot of a booted TCG guest with two
//! vhost-user disks restored through Spindle into a new QEMU waiting with
//! `-incoming defer`. The guest's counter goes on from the snapshot point
//! and its disks hold what they held then.

mod common;

use common::serve::Serve;
use common::vm::{self, Vm};
use common::vmsnap::*;
use common::{assert_clean, scratch};
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};

/// Waits until the daemon sees `vm`'s QEMU on both exports.
fn wait_connected(daemon: &Serve, vm: &Vm) {
    let deadline = Instant::now() + MINUTE;
    loop {
        let r = daemon.ctl(&json!({"cmd": "vm_disks", "pid": vm.pid()}));
        if r["disks"].as_array().is_some_and(|d| d.len() == 2) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} never connected to both disks: {r}",
            vm.name
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stderr(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Snapshots `src` as `name`, lets it run on and overwrite its tags, and
/// kills it; the counter's last value before, first after, and last.
fn snapshot_then_diverge(src: &mut Vm, qmp: &Path, ctl: &Path, name: &str) -> (u64, u64, u64) {
    let before = src.mark();
    let last_before = *counts(src, 0).last().unwrap();
    let o = vm_cmd(qmp, ctl, &["snapshot", name]);
    assert!(o.status.success(), "vm snapshot failed:\n{}", stderr(&o));
    let first_after = next_count(src, before);
    let m = src.mark();
    src.send("W2");
    src.wait_line(m, "WROTE v2", MINUTE);
    wait_count(src, first_after + 15);
    let last_src = *counts(src, 0).last().unwrap();
    (last_before, first_after, last_src)
}

#[test]
fn spindle_restores_a_vm_snapshot_into_a_new_qemu() {
    let _one = vm::one_at_a_time();
    let d = scratch();
    let dir = d.path();
    let Booted {
        im,
        daemon,
        ctl,
        socks,
        mut src,
        qmp,
    } = booted(dir);
    let (last_before, first_after, last_src) = snapshot_then_diverge(&mut src, &qmp, &ctl, "s1");
    // A running QEMU is refused: it does not wait for a migration.
    let o = vm_cmd(&qmp, &ctl, &["restore", "s1"]);
    assert!(
        !o.status.success() && stderr(&o).contains("-incoming defer"),
        "{}",
        stderr(&o)
    );
    src.kill();
    drop(src);

    let mut dst = boot(dir, "dst", &socks, Some("defer"));
    wait_connected(&daemon, &dst);
    let qmp = dir.join("dst-spindle.qmp");
    let o = vm_cmd(&qmp, &ctl, &["restore", "nosuch"]);
    assert!(
        !o.status.success() && stderr(&o).contains("no snapshot named 'nosuch'"),
        "{}",
        stderr(&o)
    );
    let from = dst.mark();
    let o = vm_cmd(&qmp, &ctl, &["restore", "s1"]);
    assert!(
        o.status.success(),
        "vm restore failed:\n{}\n{}",
        stderr(&o),
        daemon.log_text()
    );
    println!("{}", stderr(&o));
    assert!(stderr(&o).contains("disks a, b (VM state from 'a')"), "{}", stderr(&o));
    assert_eq!(dst.qmp.execute("query-status", json!({}))["status"], "running");
    assert_resumed_at_snapshot(&mut dst, from, last_before, first_after, last_src);
    // The disk of a guest that runs is never reverted under it.
    let r = daemon.ctl(&json!({"cmd": "snapshot_apply", "name": "a", "snapshot": "s1"}));
    assert!(
        r["error"].as_str().unwrap_or("").contains("has started the device"),
        "{r}"
    );
    dst.kill();
    drop(dst);
    let log = daemon.log_text();
    assert!(daemon.stop().success(), "{log}");
    for img in [&im.a, &im.b] {
        assert!(snapshots(img).contains("s1"), "{}", snapshots(img));
        assert_clean(img);
    }
}
