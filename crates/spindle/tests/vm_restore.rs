//! `spindle vm restore`: a snapshot of a booted TCG guest with two
//! vhost-user disks restored through Spindle into a new QEMU waiting with
//! `-incoming defer`. The guest's counter goes on from the snapshot point
//! and its disks hold what they held then.

mod common;

use common::vm::{self, Vm};
use common::vmsnap::*;
use common::{assert_clean, p, scratch};
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};

fn stderr(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Snapshots `src` as `name`, lets it run on and overwrite its tags, and
/// kills it; the counter's last value before the command, the latest the
/// snapshot point can be (the first value after the command started, or,
/// for a live snapshot whose guest counts on during the pre-copy, the last
/// one when the command returned), and the last value.
fn snapshot_then_diverge(src: &mut Vm, qmp: &Path, ctl: &Path, args: &[&str]) -> (u64, u64, u64) {
    let before = src.mark();
    let last_before = *counts(src, 0).last().unwrap();
    let mut all = vec!["snapshot"];
    all.extend_from_slice(args);
    let o = vm_cmd(qmp, ctl, &all);
    println!("{}", stderr(&o));
    assert!(o.status.success(), "vm snapshot failed:\n{}", stderr(&o));
    let at_return = *counts(src, 0).last().unwrap();
    let first_after = next_count(src, before).max(at_return);
    let m = src.mark();
    src.send("W2");
    src.wait_line(m, "WROTE v2", MINUTE);
    wait_count(src, first_after + 15);
    let last_src = *counts(src, 0).last().unwrap();
    (last_before, first_after, last_src)
}

#[test]
fn spindle_restores_a_vm_snapshot_into_a_new_qemu() {
    restores(&[]);
}

/// Pre-copy while the guest runs, the disks snapshotted at QEMU's
/// switch-over; restored, the guest is where it was then. `--max-pause
/// 1200` keeps QEMU's own downtime limit (300 ms, a quarter of it): with
/// the default's 25 ms QEMU makes more pre-copy passes over a guest that
/// runs, and under TCG one such run restored a guest whose kernel then
/// found a corrupted list (docs/snapshots.md, "Limits"); the short pause
/// is measured by bench/vmsnap.py.
#[test]
fn a_live_snapshot_restores_to_its_switch_over() {
    restores(&["--live", "--max-pause", "1200"]);
}

fn restores(flags: &[&str]) {
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
    let mut args = vec!["s1"];
    args.extend_from_slice(flags);
    let (last_before, first_after, last_src) = snapshot_then_diverge(&mut src, &qmp, &ctl, &args);
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
    // The stop-copy case also preallocates the guest's RAM first (auto
    // leaves this guest's, mostly zero, as it is).
    let prealloc = flags.is_empty();
    let restore: &[&str] = match prealloc {
        true => &["restore", "s1", "--prealloc", "on"],
        false => &["restore", "s1"],
    };
    let o = vm_cmd(&qmp, &ctl, restore);
    assert!(
        o.status.success(),
        "vm restore failed:\n{}\n{}",
        stderr(&o),
        daemon.log_text()
    );
    println!("{}", stderr(&o));
    assert!(stderr(&o).contains("disks a, b (VM state from 'a')"), "{}", stderr(&o));
    assert_eq!(stderr(&o).contains("of guest RAM in"), prealloc, "{}", stderr(&o));
    let memdevs = dst.qmp.execute("query-memdev", json!({}));
    assert!(
        memdevs
            .as_array()
            .is_some_and(|m| !m.is_empty() && m.iter().all(|m| m["prealloc"] == json!(prealloc))),
        "{memdevs}"
    );
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

/// `spindle vm list`'s line for `name`, if any.
fn listed(qmp: &Path, ctl: &Path, name: &str) -> Option<String> {
    let o = vm_cmd(qmp, ctl, &["list"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let l = String::from_utf8_lossy(&o.stdout).into_owned();
    l.lines()
        .find(|x| x.split_whitespace().next() == Some(name))
        .map(str::to_string)
}

#[test]
fn a_daemon_killed_during_the_vm_state_stream_leaves_no_half_snapshot() {
    let _one = vm::one_at_a_time();
    let d = scratch();
    let dir = d.path();
    let Booted {
        im,
        mut daemon,
        ctl,
        socks: _,
        mut src,
        qmp,
    } = booted(dir);
    let o = vm_cmd(&qmp, &ctl, &["snapshot", "s0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let cli = slow_snapshot(&qmp, &ctl, "crash", &im.a, &|| daemon.log_text());
    // Its progress, through the control socket, while it runs.
    let jobs = daemon.ctl(&json!({"cmd": "vm_jobs"}));
    let job = &jobs["jobs"][0];
    assert!(
        job["export"] == "a" && job["snapshot"] == "crash" && job["kind"] == "save" && job["bytes"].as_u64() > Some(0),
        "{jobs}"
    );
    daemon.kill();
    let out = cli.wait_with_output().unwrap();
    let text = stderr(&out);
    assert!(!out.status.success(), "{text}");
    println!("vm snapshot, its daemon killed:\n{text}");
    drop(daemon);
    // The dead daemon's socket files stay: gone, the new ones show when
    // it serves.
    for f in ["ctl1.sock", "a1.sock", "b1.sock"] {
        std::fs::remove_file(dir.join(f)).unwrap();
    }
    let (daemon, _, _) = serve(dir, &im, 1);
    wait_connected(&daemon, &src);
    // At most a disk-only leftover; the earlier snapshot complete.
    if let Some(l) = listed(&qmp, &ctl, "crash") {
        // The rollback could not reach the dead daemon: b keeps its
        // disk-only snapshot; a, the VM-state disk, has none.
        assert!(l.contains("disk-only"), "{l}");
        assert_eq!(
            l.split_whitespace().last(),
            Some("b"),
            "the VM-state disk has a half snapshot: {l}"
        );
        let o = vm_cmd(&qmp, &ctl, &["delete", "crash"]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    assert!(listed(&qmp, &ctl, "crash").is_none());
    let l0 = listed(&qmp, &ctl, "s0").expect("s0 listed");
    assert!(l0.contains("complete") && l0.ends_with("a,b"), "{l0}");
    // QEMU's migration failed; the guest stays paused, and goes on once
    // continued, its disks served again.
    assert!(text.contains("the guest stays paused"), "{text}");
    let st = src.qmp.execute("query-status", json!({}));
    assert_eq!(st["status"], "paused", "{st}");
    src.qmp.execute("cont", json!({}));
    // The daemon restarted under the paused guest: its disks serve again
    // once it runs (docs/serve.md, "Restarting while the guest is paused").
    let from = src.mark();
    let first = next_count(&src, from);
    wait_count(&src, first + 3);
    let m = src.mark();
    src.send("W2");
    src.wait_line(m, "WROTE v2", MINUTE);
    src.kill();
    drop(src);
    let log = daemon.log_text();
    assert!(daemon.stop().success(), "{log}");
    for img in [&im.a, &im.b] {
        let l = snapshots(img);
        assert!(l.contains("s0") && !l.contains("crash"), "{}: {l}", img.display());
        assert_clean(img);
    }
}

/// QEMU and `spindle vm snapshot` both die while the VM state streams (a
/// host's OOM killer, say): the stream just ends, as a whole one does, and
/// nobody is left to roll back. The daemon must see that the stream is cut
/// short and take no snapshot with it; the other disk keeps at most the
/// disk-only part, which `vm delete` removes.
#[test]
fn a_vm_state_stream_cut_short_by_a_dead_qemu_leaves_no_vm_state_snapshot() {
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
    let mut cli = slow_snapshot(&qmp, &ctl, "cut", &im.a, &|| daemon.log_text());
    cli.kill().unwrap();
    cli.wait().unwrap();
    src.kill();
    drop(src);
    // The daemon's save ends with the stream.
    let deadline = Instant::now() + MINUTE;
    loop {
        let jobs = daemon.ctl(&json!({"cmd": "vm_jobs"}));
        if jobs["jobs"].as_array().is_some_and(|j| j.is_empty()) {
            break;
        }
        assert!(Instant::now() < deadline, "the save never ended: {jobs}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = daemon.log_text();
    assert!(
        log.contains("cut short"),
        "the daemon did not say why it took no snapshot:\n{log}"
    );
    let a = snapshots(&im.a);
    assert!(
        !a.contains("cut"),
        "the VM-state disk kept a snapshot of a cut stream:\n{a}"
    );
    drop(daemon);
    common::wait_unlocked(&im.b);
    // b has the disk-only part the dead CLI made, or none. (Its export
    // handed its image over when QEMU went away mid-migration, as a
    // migration source does; a new frontend opens it again.)
    let info: serde_json::Value =
        serde_json::from_slice(&common::run("qemu-img", &["info", "--output", "json", p(&im.b)]).stdout).unwrap();
    for sn in info["snapshots"].as_array().into_iter().flatten() {
        if sn["name"] == "cut" {
            assert_eq!(sn["vm-state-size"], json!(0), "{sn}");
            common::ok("qemu-img", &["snapshot", "-d", "cut", p(&im.b)]);
        }
    }
    for img in [&im.a, &im.b] {
        assert_clean(img);
    }
}
