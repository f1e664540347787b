//! `spindle serve --nbd`: the daemon's exports over NBD as well as
//! vhost-user, with real NBD clients (nbdinfo, nbdcopy, nbdsh): the
//! listing, copies with four connections, statistics and `ctl list`
//! figures, NBD requests held by a quiesce, hot plug and unplug.

mod common;

use common::nbd::need_tool;
use common::serve::{config_text, Serve};
use common::{assert_clean, ok, p, scratch};
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SIZE: usize = 16 << 20;

/// `len` bytes of incompressible data with no zero block.
fn random_file(path: &Path, len: usize, mut x: u64) {
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&(x | 1).to_le_bytes());
    }
    std::fs::write(path, &v[..len]).unwrap();
}

/// Export names `nbdinfo --list` reports.
fn listed(uri: &str) -> Vec<String> {
    let out = ok("nbdinfo", &["--list", "--json", uri]);
    let v: Value = serde_json::from_str(&out).unwrap();
    let mut names: Vec<String> = v["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

/// nbdsh must run on Debian's Python (its `nbd` module is
/// python3-libnbd's), whatever `python3` is first on the PATH.
fn need_nbdsh() {
    let has = Command::new("/usr/bin/python3")
        .args(["-c", "import nbd"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has && Path::new("/usr/bin/nbdsh").exists(),
        "nbdsh and libnbd's Python module are required: apt-get install -y libnbd-bin python3-libnbd"
    );
}

/// An nbdsh client running `script` against `uri` (`h` is connected).
fn nbdsh(uri: &str, script: &str) -> Child {
    Command::new("/usr/bin/nbdsh")
        .args(["-u", uri, "-c", script])
        .env("PATH", "/usr/bin:/bin")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nbdsh")
}

/// Polls `f` until it holds, for at most `secs`.
fn eventually(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "{what}: not within {secs} s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn export<'a>(list: &'a Value, name: &str) -> &'a Value {
    list["exports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no export {name} in {list}"))
}

#[test]
fn serve_offers_its_exports_over_nbd_through_the_devices_gate_and_statistics() {
    for t in ["nbdinfo", "nbdcopy"] {
        need_tool(t);
    }
    need_nbdsh();
    let dir = scratch();
    let d = dir.path();
    let (a, b, c) = (d.join("a.qcow2"), d.join("b.raw"), d.join("c.qcow2"));
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&a), "16M"]);
    ok("qemu-img", &["create", "-q", "-f", "raw", p(&b), "16M"]);
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&c), "256M"]);
    let data = d.join("data.raw");
    random_file(&data, SIZE, 0x9e37_79b9_7f4a_7c15);
    let (sa, sb, sc, ctl, nsock) = (
        d.join("a.sock"),
        d.join("b.sock"),
        d.join("c.sock"),
        d.join("ctl.sock"),
        d.join("nbd.sock"),
    );
    let mut cfg = config_text(Some(&ctl), &[("a", &a, &sa, ""), ("b", &b, &sb, "nbd = false\n")]);
    cfg = format!("nbd = \"unix:{}\"\n{cfg}", nsock.display());
    std::fs::write(d.join("serve.toml"), cfg).unwrap();
    let mut srv = Serve::start(d, &["--config", "serve.toml"], &[&sa, &sb, &nsock]);
    srv.use_control(&ctl);
    let uri = |name: &str| format!("nbd+unix:///{name}?socket={}", nsock.display());
    assert!(
        srv.log_text().contains(&uri("a")),
        "the start lines give the NBD URI:\n{}",
        srv.log_text()
    );

    // Only the exports that are offered are listed.
    assert_eq!(listed(&uri("a")), ["a"]);

    // In and out with four connections (multi-conn): the same bytes.
    ok("nbdcopy", &["--connections", "4", p(&data), &uri("a")]);
    let out = d.join("out.raw");
    ok("nbdcopy", &["--connections", "4", &uri("a"), p(&out)]);
    ok(
        "qemu-img",
        &["compare", "-q", "-f", "raw", "-F", "raw", p(&data), p(&out)],
    );

    // The device counted the NBD requests: every byte written, exactly.
    let st = srv.ctl(&json!({"cmd": "stats", "name": "a"}));
    assert_eq!(st["ok"], true, "{st}");
    assert!(st["nbd_requests"].as_u64().unwrap() > 0, "{st}");
    let writes = st["stats"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["op"] == "write")
        .unwrap();
    assert_eq!(writes["bytes"].as_u64(), Some(SIZE as u64), "{st}");
    let reads = st["stats"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["op"] == "read")
        .unwrap();
    assert!(reads["bytes"].as_u64().unwrap() >= SIZE as u64, "{st}");

    // `ctl list` shows the URI and the clients connected now.
    let mut held = nbdsh(&uri("a"), "import time; time.sleep(30)");
    eventually(10, "one NBD client listed", || {
        export(&srv.ctl(&json!({"cmd": "list"})), "a")["nbd_connections"] == 1
    });
    let list = srv.ctl(&json!({"cmd": "list"}));
    assert_eq!(export(&list, "a")["nbd"], uri("a"));
    assert!(export(&list, "b").get("nbd").is_none(), "{list}");
    held.kill().unwrap();
    held.wait().unwrap();

    // A quiesce holds NBD requests back (the snapshot path), and they
    // complete once it is over: nothing reaches the device meanwhile.
    let written = |srv: &Serve| -> u64 {
        let st = srv.ctl(&json!({"cmd": "stats", "name": "a"}));
        let ops = st["stats"].as_array().unwrap().clone();
        ops.iter().find(|o| o["op"] == "write").unwrap()["bytes"]
            .as_u64()
            .unwrap()
    };
    let before = written(&srv);
    let q = srv.ctl(&json!({"cmd": "quiesce", "name": "a", "lease_s": 60}));
    assert_eq!(q["ok"], true, "{q}");
    let mut w = nbdsh(&uri("a"), "h.pwrite(b'\\x5a' * 4096, 0)\nprint('written')");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        w.try_wait().unwrap().is_none(),
        "an NBD write completed under a quiesce"
    );
    assert_eq!(written(&srv), before, "an NBD write reached the device under a quiesce");
    let r = srv.ctl(&json!({"cmd": "resume", "name": "a"}));
    assert_eq!(r["ok"], true, "{r}");
    let o = w.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "written");
    assert_eq!(written(&srv), before + 4096);

    // Hot plug with --nbd, then unplug while a client is connected: the
    // client is disconnected and the export goes from the listing.
    let add = srv.ctl(&json!({"cmd": "add", "export": {"image": p(&c), "socket": p(&sc), "name": "c", "nbd": true}}));
    assert_eq!(add["ok"], true, "{add}");
    assert_eq!(listed(&uri("a")), ["a", "c"]);
    // The client sleeps through the removal, then asks: the server has
    // closed its connection (libnbd learns of it at its next request).
    let cl = nbdsh(
        &uri("c"),
        "import time\ntime.sleep(4)\ntry:\n    h.pread(512, 0)\n    print('served')\nexcept Exception as e:\n    print('refused', e)",
    );
    eventually(3, "the client of c listed", || {
        export(&srv.ctl(&json!({"cmd": "list"})), "c")["nbd_connections"] == 1
    });
    let start = Instant::now();
    let rm = srv.ctl(&json!({"cmd": "remove", "name": "c"}));
    assert_eq!(rm["ok"], true, "{rm}");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "remove took {:?}",
        start.elapsed()
    );
    let o = cl.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(said.starts_with("refused"), "the removed export's client: {said}");
    assert_eq!(listed(&uri("a")), ["a"]);

    // Removed while four connections write to it: the removal waits for
    // the requests in flight, and the image it closed is clean.
    let add = srv.ctl(&json!({"cmd": "add", "export": {"image": p(&c), "socket": p(&sc), "name": "c"}}));
    assert_eq!(add["ok"], true, "{add}");
    let big = d.join("big.raw");
    random_file(&big, 256 << 20, 0x1234_5678_9abc_def1);
    let mut copy = Command::new("nbdcopy")
        .args(["--connections", "4", "--requests", "16", p(&big), &uri("c")])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    eventually(10, "writes into c", || {
        let st = srv.ctl(&json!({"cmd": "stats", "name": "c"}));
        st["nbd_requests"].as_u64().unwrap_or(0) > 50
    });
    let rm = srv.ctl(&json!({"cmd": "remove", "name": "c"}));
    assert_eq!(rm["ok"], true, "{rm}");
    let st = copy.wait().unwrap();
    assert!(!st.success(), "nbdcopy into a removed export succeeded");
    assert_clean(&c);
    ok("qemu-img", &["info", p(&c)]);

    assert!(srv.stop().success());
    assert!(!nsock.exists(), "the NBD socket is removed at exit");
    // What NBD wrote is in the image, which is clean.
    let mut expect = std::fs::read(&data).unwrap();
    expect[..4096].fill(0x5a);
    std::fs::write(&data, &expect).unwrap();
    ok(
        "qemu-img",
        &["compare", "-q", "-f", "raw", "-F", "qcow2", p(&data), p(&a)],
    );
    assert_clean(&a);
}

/// A planned handover (SIGUSR2) passes the NBD address on: the new process
/// listens there and serves what the old one's NBD clients wrote.
#[test]
fn a_handover_passes_the_nbd_address_on_to_the_new_process() {
    use common::handover::Spindle;
    need_tool("nbdcopy");
    need_tool("nbdinfo");
    common::handover::become_subreaper();
    let dir = scratch();
    let d = dir.path();
    let img = d.join("disk.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&img), "16M"]);
    let data = d.join("data.raw");
    random_file(&data, SIZE, 0x2545_f491_4f6c_dd1d);
    let (sock, ctl, nsock) = (d.join("disk.sock"), d.join("ctl.sock"), d.join("nbd.sock"));
    let nbd = format!("unix:{}", p(&nsock));
    let first = Serve::start(
        d,
        &[p(&img), "--vhost-user", p(&sock), "--control", p(&ctl), "--nbd", &nbd],
        &[&sock, &nsock],
    );
    let mut s = Spindle::First(first);
    let uri = format!("nbd+unix:///disk?socket={}", p(&nsock));
    ok("nbdcopy", &["--connections", "4", p(&data), &uri]);
    let old = s.pid();
    s.hand_over(Duration::from_secs(60));
    assert_ne!(s.pid(), old);
    eventually(20, "the new process listens for NBD", || {
        Command::new("nbdinfo")
            .arg(&uri)
            .output()
            .is_ok_and(|o| o.status.success())
    });
    let list = common::serve::ctl_at(&ctl, &json!({"cmd": "list"}));
    assert_eq!(list["pid"].as_i64(), Some(s.pid() as i64), "{list}");
    assert_eq!(export(&list, "disk")["nbd"], uri.as_str());
    let out = d.join("out.raw");
    ok("nbdcopy", &["--connections", "4", &uri, p(&out)]);
    ok(
        "qemu-img",
        &["compare", "-q", "-f", "raw", "-F", "raw", p(&data), p(&out)],
    );
    assert!(s.stop(), "{}", s.log_text());
    assert_clean(&img);
}
