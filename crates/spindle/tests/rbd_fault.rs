//! An RBD outage under load: the test cluster's only OSD stops (SIGSTOP)
//! for a few seconds while libblkio writes and verifies an RBD export.
//! Its requests wait and complete once the OSD is back, with no error and
//! no wrong data; an export of a local file in the same daemon serves
//! throughout. (Its own test binary, so its cluster is its own: stopping
//! the OSD would stall other tests' I/O.)

mod common;

use common::ceph::{cluster, unique};
use common::serve::Serve;
use common::{ok, p, scratch};
use serde_json::{json, Value};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) on the OSD's pid, which this test's cluster started.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "signal {sig} to the OSD");
}

/// A stopped process, continued when this goes (also when the test fails,
/// so the cluster can stop).
struct Stopped(i32);

impl Drop for Stopped {
    fn drop(&mut self) {
        signal(self.0, libc::SIGCONT);
    }
}

#[test]
fn requests_wait_through_an_osd_outage_and_local_exports_go_on() {
    let tc = cluster();
    let d = scratch();
    let dir = d.path();
    let name = unique("fault");
    tc.rbd(&["create", &format!("rbd/{name}"), "--size", "64M"]);
    let local = dir.join("local.raw");
    ok("truncate", &["-s", "64M", p(&local)]);
    let (rs, ls) = (dir.join("rbd.sock"), dir.join("local.sock"));
    let cfg = format!(
        "[[export]]\nimage = \"{}\"\nsocket = \"{}\"\n[[export]]\nimage = \"{}\"\nsocket = \"{}\"\n",
        tc.spec(&name),
        rs.display(),
        local.display(),
        ls.display()
    );
    std::fs::write(dir.join("s.toml"), cfg).unwrap();
    let s = Serve::start(dir, &["--config", "s.toml"], &[&rs, &ls]);

    // The RBD export's load: a fixed amount of verified work, which the
    // outage interrupts.
    let load = Command::new(env!("CARGO_BIN_EXE_spindle"))
        .args([
            "bench",
            p(&rs),
            "--rw",
            "randrw",
            "--verify",
            "--iodepth",
            "8",
            "--size",
            "32M",
        ])
        .args([
            "--number-ios",
            "40000",
            "--runtime",
            "120",
            "--flush-every",
            "64",
            "--output",
            "json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let pid_file = tc.dir.join("run/osd.0.pid");
    let osd: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    signal(osd, libc::SIGSTOP);
    let outage = Stopped(osd);
    let stopped = Instant::now();
    // Meanwhile the local export serves as usual.
    let v: Value = serde_json::from_str(&ok(
        "spindle",
        &[
            "bench",
            p(&ls),
            "--rw",
            "randrw",
            "--verify",
            "--iodepth",
            "8",
            "--number-ios",
            "2000",
            "--runtime",
            "20",
            "--output",
            "json",
        ],
    ))
    .unwrap();
    let local_took = stopped.elapsed();
    assert_eq!(
        (v["errors"].clone(), v["verify"]["failures"].clone()),
        (json!(0), json!(0)),
        "{v}"
    );
    assert!(
        v["ios"].as_u64() >= Some(2000),
        "the local export stalled during the outage: {v}"
    );
    // The outage lasts 6 s in all.
    std::thread::sleep(Duration::from_secs(6).saturating_sub(stopped.elapsed()));
    drop(outage);
    let out = load.wait_with_output().unwrap();
    let v: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(v["errors"], json!(0), "requests failed through the outage: {v}");
    assert_eq!(v["verify"]["failures"], json!(0), "{v}");
    assert!(v["verify"]["checked"].as_u64().unwrap() > 1000, "{v}");
    assert!(
        v["runtime_s"].as_f64().unwrap() > 6.0,
        "the load should have waited out the outage: {v}"
    );
    assert!(
        local_took < Duration::from_secs(5),
        "local export took {local_took:?} during the outage"
    );
    assert!(s.stop().success());
}
