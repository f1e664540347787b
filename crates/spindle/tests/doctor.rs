//! `spindle doctor` on images and settings made to trip each rule, with
//! QEMU's tools making the images and a real QEMU whose guest RAM is not
//! shared. Host facts this machine has (its scheduler, its AIO limit) are
//! read, not assumed: the tests check what doctor says about what they
//! set up, and that the exit status follows the worst finding.

mod common;

use common::serve::Serve;
use common::{need, ok, p, run, scratch};
use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `spindle doctor --output json ARGS`; checks the exit status
/// against the worst finding and returns the findings.
fn doctor(args: &[&str]) -> Vec<Value> {
    let mut a = vec!["doctor", "--output", "json"];
    a.extend_from_slice(args);
    let o = run("spindle", &a);
    let v: Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("doctor printed no JSON ({e}): {}", String::from_utf8_lossy(&o.stderr)));
    let findings = v["findings"].as_array().unwrap().clone();
    let bad = findings
        .iter()
        .any(|f| f["severity"] == "warning" || f["severity"] == "error");
    assert_eq!(o.status.code(), Some(i32::from(bad)), "exit status against {v}");
    for f in &findings {
        for key in ["severity", "check", "subject", "message", "evidence"] {
            assert!(f.get(key).is_some(), "{key} missing in {f}");
        }
    }
    findings
}

fn find<'a>(findings: &'a [Value], check: &str, subject: &str) -> &'a Value {
    findings
        .iter()
        .find(|f| f["check"] == check && f["subject"].as_str().is_some_and(|s| s.contains(subject)))
        .unwrap_or_else(|| panic!("no {check} finding about {subject} in {findings:#?}"))
}

#[test]
fn image_rules_name_the_problem_and_the_fix() {
    let d = scratch();
    let dir = d.path();
    // Small clusters, and a disk larger than the default L2 cache maps
    // with them (32 MiB of L2 maps 16 GiB of 4 KiB clusters).
    let small = dir.join("small.qcow2");
    ok(
        "qemu-img",
        &["create", "-f", "qcow2", "-o", "cluster_size=4k", p(&small), "64G"],
    );
    let f = doctor(&[p(&small)]);
    let c = find(&f, "qcow2-cluster-size", "small.qcow2");
    assert_eq!(c["severity"], "warning", "{c}");
    assert!(c["fix"].as_str().unwrap().contains("cluster_size=64k"), "{c}");
    let l2 = find(&f, "qcow2-l2-cache", "small.qcow2");
    assert_eq!(l2["severity"], "warning", "{l2}");
    assert!(l2["message"].as_str().unwrap().contains("16 GiB of the 64 GiB"), "{l2}");
    assert_eq!(find(&f, "filesystem", "small.qcow2")["severity"], "ok");

    // A default qcow2 is fine on both counts, and not preallocated.
    let plain = dir.join("plain.qcow2");
    ok("qemu-img", &["create", "-f", "qcow2", p(&plain), "8G"]);
    let f = doctor(&[p(&plain)]);
    assert_eq!(find(&f, "qcow2-l2-cache", "plain.qcow2")["severity"], "ok");
    assert!(!f.iter().any(|x| x["check"] == "qcow2-cluster-size"), "{f:#?}");
    assert_eq!(find(&f, "qcow2-preallocation", "plain.qcow2")["severity"], "info");
    let pre = dir.join("pre.qcow2");
    ok(
        "qemu-img",
        &["create", "-f", "qcow2", "-o", "preallocation=metadata", p(&pre), "1G"],
    );
    assert!(!doctor(&[p(&pre)]).iter().any(|x| x["check"] == "qcow2-preallocation"));

    // Sparse raw: information under io_uring, a warning under native AIO.
    let raw = dir.join("sparse.raw");
    ok("truncate", &["-s", "1G", p(&raw)]);
    let f = doctor(&[p(&raw)]);
    assert_eq!(find(&f, "raw-allocation", "sparse.raw")["severity"], "info");
    let f = doctor(&[p(&raw), "--aio", "native"]);
    let w = find(&f, "raw-allocation", "sparse.raw");
    assert_eq!(w["severity"], "warning", "{w}");
    assert!(w["fix"].as_str().unwrap().starts_with("fallocate -l 1073741824"), "{w}");
    ok("fallocate", &["-l", "1G", p(&raw)]);
    assert_eq!(
        find(&doctor(&[p(&raw), "--aio", "native"]), "raw-allocation", "sparse.raw")["severity"],
        "ok"
    );

    // A deep backing chain.
    let mut prev = dir.join("base.qcow2");
    ok("qemu-img", &["create", "-f", "qcow2", p(&prev), "64M"]);
    for i in 0..6 {
        let next = dir.join(format!("layer{i}.qcow2"));
        ok(
            "qemu-img",
            &["create", "-f", "qcow2", "-b", p(&prev), "-F", "qcow2", p(&next)],
        );
        prev = next;
    }
    let deep = find(&doctor(&[p(&prev)]), "backing-chain", "layer5.qcow2").clone();
    assert_eq!(deep["severity"], "warning", "{deep}");
    assert!(deep["message"].as_str().unwrap().contains("6 images deep"), "{deep}");

    // Missing images are errors, with exit status 1.
    let f = doctor(&[p(&dir.join("missing.raw"))]);
    assert_eq!(find(&f, "image", "missing.raw")["severity"], "error");
}

#[test]
fn tmpfs_images_and_the_aio_limit_of_a_config() {
    // tmpfs refuses O_DIRECT.
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let img = shm.path().join("t.raw");
    ok("truncate", &["-s", "64M", p(&img)]);
    let f = doctor(&[p(&img)]);
    let fs = find(&f, "filesystem", "t.raw");
    assert_eq!(fs["severity"], "warning", "{fs}");
    assert!(fs["message"].as_str().unwrap().contains("O_DIRECT is refused"), "{fs}");

    // A config whose native-AIO exports need more AIO events than the
    // host has: an error, with the sysctl that fixes it.
    let d = scratch();
    let dir = d.path();
    let max: u64 = std::fs::read_to_string("/proc/sys/fs/aio-max-nr")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let threads = max / 256 + 1;
    let raw = dir.join("n.raw");
    ok("truncate", &["-s", "64M", p(&raw)]);
    let cfg = format!(
        "[[export]]\nimage = \"{}\"\nsocket = \"n.sock\"\naio = \"native\"\niothreads = {threads}\n",
        raw.display()
    );
    std::fs::write(dir.join("s.toml"), cfg).unwrap();
    let f = doctor(&["--config", p(&dir.join("s.toml"))]);
    let a = find(&f, "aio-max-nr", "fs.aio-max-nr");
    assert_eq!(a["severity"], "error", "{a}");
    assert!(
        a["fix"].as_str().unwrap().starts_with("sysctl -w fs.aio-max-nr="),
        "{a}"
    );
    assert!(
        a["evidence"]
            .as_str()
            .unwrap()
            .contains(&format!("fs.aio-max-nr = {max}")),
        "{a}"
    );
    // The human output says the same, with the fix line.
    let o = run("spindle", &["doctor", "--config", p(&dir.join("s.toml"))]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("[ERROR] fs.aio-max-nr") && text.contains("    fix: sysctl -w"),
        "{text}"
    );
    assert_eq!(o.status.code(), Some(1));
    // Bad arguments: one clear error.
    let o = run("spindle", &["doctor", "--output", "yaml"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--output must be human or json"));
}

/// A real QEMU with a vhost-user-blk disk and private guest RAM: the
/// disk can never work, and doctor says so for that process.
#[test]
fn a_qemu_without_shared_guest_ram_is_an_error() {
    need("qemu-system-x86_64");
    let d = scratch();
    let dir = d.path();
    let sock = dir.join("n.sock");
    let _s = Serve::start(dir, &["null:64M", "--vhost-user", p(&sock)], &[&sock]);
    let mut qemu = Command::new("qemu-system-x86_64")
        .args([
            "-S",
            "-nodefaults",
            "-display",
            "none",
            "-machine",
            "q35,accel=tcg",
            "-m",
            "128",
        ])
        .args(["-monitor", "none", "-serial", "none"])
        .arg("-chardev")
        .arg(format!("socket,id=c0,path={}", sock.display()))
        .args(["-device", "vhost-user-blk-pci,chardev=c0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let subject = format!("QEMU pid {}", qemu.id());
    let start = Instant::now();
    let found = loop {
        let f = doctor(&[]);
        if let Some(x) = f
            .iter()
            .find(|x| x["check"] == "shared-memory" && x["subject"] == subject.as_str())
        {
            break x.clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "doctor never saw {subject}: {f:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    qemu.kill().unwrap();
    qemu.wait().unwrap();
    assert_eq!(found["severity"], "error", "{found}");
    assert!(found["fix"].as_str().unwrap().contains("share=on"), "{found}");
}

/// A loop device (a whole block device) is named as such, with what
/// passthrough would and would not give.
#[test]
fn a_block_device_is_named_with_the_passthrough_tradeoffs() {
    let d = scratch();
    let file = d.path().join("backing.raw");
    ok("truncate", &["-s", "64M", p(&file)]);
    let dev = ok("losetup", &["-f", "--show", p(&file)]).trim().to_owned();
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").args(["-d", &self.0]).status();
        }
    }
    let _detach = Detach(dev.clone());
    let f = doctor(&[&dev]);
    let b = find(&f, "block-device", &dev);
    assert_eq!(b["severity"], "info", "{b}");
    let m = b["message"].as_str().unwrap();
    assert!(
        m.starts_with("a whole block device") && m.contains("live-migrated"),
        "{b}"
    );
    let name = dev.trim_start_matches("/dev/");
    assert!(
        f.iter()
            .any(|x| x["check"] == "scheduler" && x["subject"] == format!("/dev/{name}").as_str()),
        "the loop device's own queue is looked at: {f:#?}"
    );
}
