//! `spindle serve` with an independent client (libblkio's `blkio` crate,
//! through `spindle bench`), the control socket, disconnects and SIGINT.

mod common;

use common::serve::Serve;
use common::{assert_clean, ok, p, run, scratch};
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn bench(sock: &Path, args: &[&str]) -> Value {
    let mut a = vec!["bench", p(sock), "--output", "json"];
    a.extend_from_slice(args);
    let o = run("spindle", &a);
    let text = String::from_utf8_lossy(&o.stdout);
    let v: Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "bench printed no JSON ({e}):\n{text}\n{}",
            String::from_utf8_lossy(&o.stderr)
        )
    });
    assert_eq!(
        o.status.success(),
        v["errors"] == json!(0) && v["verify"]["failures"] == json!(0),
        "{v}"
    );
    v
}

/// `spindle bench SOCK --rw randrw --verify` for `secs` seconds at `iodepth`,
/// plus `extra` options.
fn verify_run(sock: &Path, secs: &str, iodepth: &str, extra: &[&str]) -> Value {
    let mut a = vec!["--rw", "randrw", "--verify", "--runtime", secs, "--iodepth", iodepth];
    a.extend_from_slice(extra);
    bench(sock, &a)
}

/// Starts `spindle bench SOCK ARGS` in the background, output discarded.
fn spawn_bench(sock: &Path, args: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_spindle"))
        .arg("bench")
        .arg(sock)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn op<'a>(stats: &'a Value, name: &str) -> &'a Value {
    stats["stats"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["op"] == name)
        .unwrap_or_else(|| panic!("no {name} in {stats}"))
}

#[test]
fn blkio_writes_verifies_and_flushes() {
    let d = scratch();
    let dir = d.path();
    let img = dir.join("disk.qcow2");
    ok("qemu-img", &["create", "-f", "qcow2", p(&img), "256M"]);
    let sock = dir.join("disk.sock");
    let s = Serve::start(
        dir,
        &[p(&img), "--vhost-user", p(&sock), "--control", "ctl.sock"],
        &[&sock],
    );
    // A fixed amount of work, not of time: under load (other builds and
    // tests on this machine's two cores) 2 s came to 400-600 requests and
    // fewer than 1000 checked blocks. 4000 requests write about 1900
    // distinct blocks, all read back; the runtime is only a cap.
    let v = verify_run(
        &sock,
        "300",
        "8",
        &["--size", "64M", "--flush-every", "64", "--number-ios", "4000"],
    );
    assert_eq!(v["errors"], json!(0), "{v}");
    assert!(v["verify"]["checked"].as_u64().unwrap() > 1000, "{v}");
    assert_eq!(v["verify"]["failures"], json!(0), "{v}");
    let flushes = v["flushes"].as_u64().unwrap();
    assert!(flushes > 0, "{v}");
    let st = s.ctl(&json!({"cmd": "stats", "name": "disk"}));
    assert_eq!(
        op(&st, "flush")["requests"].as_u64(),
        Some(flushes),
        "every flush reaches Spindle: {st}"
    );
    assert!(op(&st, "write")["bytes"].as_u64().unwrap() > 0);
    assert!(op(&st, "read")["p99_us"].as_f64().unwrap() > 0.0);
    assert!(s.stop().success());
    assert_clean(&img);
}

#[test]
fn verify_catches_a_device_that_drops_writes() {
    // The null device reads zeroes: the same verify run must fail there.
    let d = scratch();
    let dir = d.path();
    let sock = dir.join("null.sock");
    let s = Serve::start(dir, &["null:64M", "--vhost-user", p(&sock)], &[&sock]);
    let v = verify_run(&sock, "1", "4", &[]);
    assert!(v["verify"]["failures"].as_u64().unwrap() > 0, "{v}");
    assert!(s.stop().success());
}

#[test]
fn a_client_killed_mid_io_does_not_disturb_other_exports_and_can_reconnect() {
    let d = scratch();
    let dir = d.path();
    let (a, b) = (dir.join("a.raw"), dir.join("b.raw"));
    ok("truncate", &["-s", "128M", p(&a)]);
    ok("truncate", &["-s", "128M", p(&b)]);
    let (sa, sb) = (dir.join("a.sock"), dir.join("b.sock"));
    let cfg = format!(
        "control = \"ctl.sock\"\n[[export]]\nimage = \"{}\"\nsocket = \"{}\"\n[[export]]\nimage = \"{}\"\nsocket = \"{}\"\n",
        a.display(),
        sa.display(),
        b.display(),
        sb.display()
    );
    std::fs::write(dir.join("s.toml"), cfg).unwrap();
    let mut s = Serve::start(dir, &["--config", "s.toml"], &[&sa, &sb]);
    s.use_control(&dir.join("ctl.sock"));
    let mut victim = spawn_bench(&sa, &["--rw", "randwrite", "--runtime", "30", "--iodepth", "32"]);
    let other = std::thread::spawn({
        let sb = sb.clone();
        move || verify_run(&sb, "3", "16", &[])
    });
    std::thread::sleep(Duration::from_millis(1200));
    let list = s.ctl(&json!({"cmd": "list"}));
    assert_eq!(list["exports"][0]["connected"], json!(true), "{list}");
    victim.kill().unwrap();
    victim.wait().unwrap();
    let v = other.join().unwrap();
    assert_eq!(v["errors"], json!(0), "{v}\n{}", s.log_text());
    assert_eq!(v["verify"]["failures"], json!(0), "{v}");
    // The killed client's export serves the next frontend.
    let v = verify_run(&sa, "1", "8", &[]);
    assert_eq!(v["errors"], json!(0), "{v}\n{}", s.log_text());
    assert_eq!(v["verify"]["failures"], json!(0), "{v}");
    let list = s.ctl(&json!({"cmd": "list"}));
    assert_eq!(list["exports"][0]["name"], json!("a"));
    assert_eq!(list["exports"][0]["connections"], json!(2), "{list}");
    assert!(s.stop().success());
}

#[test]
fn control_socket_hot_plugs_lists_resizes_and_unplugs() {
    let d = scratch();
    let dir = d.path();
    let img = dir.join("one.raw");
    ok("truncate", &["-s", "64M", p(&img)]);
    let sock = dir.join("one.sock");
    let s = Serve::start(
        dir,
        &[p(&img), "--vhost-user", p(&sock), "--control", "ctl.sock"],
        &[&sock],
    );
    let two = dir.join("two.qcow2");
    ok("qemu-img", &["create", "-f", "qcow2", p(&two), "32M"]);
    let sock2 = dir.join("two.sock");
    let ctl = dir.join("ctl.sock");
    let out = ok(
        "spindle",
        &[
            "ctl",
            "-c",
            p(&ctl),
            "add",
            p(&two),
            "--vhost-user",
            p(&sock2),
            "--iothreads",
            "2",
        ],
    );
    assert!(out.contains("\"ok\": true"), "{out}");
    let list = s.ctl(&json!({"cmd": "list"}));
    let names: Vec<_> = list["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].clone())
        .collect();
    assert_eq!(names, vec![json!("one"), json!("two")], "{list}");
    assert_eq!(list["exports"][1]["format"], json!("qcow2"));
    let v = verify_run(&sock2, "1", "8", &[]);
    assert_eq!(v["verify"]["failures"], json!(0));
    // Same name or socket twice, unknown export, bad JSON: one clear error each.
    for (req, want) in [
        (
            json!({"cmd": "add", "export": {"image": p(&two), "socket": p(&sock2)}}),
            "already exists",
        ),
        (json!({"cmd": "remove", "name": "nope"}), "no export named 'nope'"),
        (json!({"cmd": "resize", "name": "one", "size": "1M"}), "pass shrink"),
        (json!({"cmd": "frobnicate"}), "unknown cmd `frobnicate`"),
    ] {
        let r = s.ctl(&req);
        assert_eq!(r["ok"], json!(false), "{r}");
        assert!(r["error"].as_str().unwrap().contains(want), "{r}: want {want}");
    }
    let r = s.ctl(&json!({"cmd": "resize", "name": "one", "size": "96M"}));
    assert_eq!(r["size"], json!(96u64 << 20), "{r}");
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 96 << 20);
    let v = bench(&sock, &["--rw", "read", "--runtime", "1", "--iodepth", "4"]);
    assert_eq!(v["errors"], json!(0), "{v}");
    let r = s.ctl(&json!({"cmd": "remove", "name": "two"}));
    assert_eq!(r["ok"], json!(true), "{r}");
    assert!(!sock2.exists(), "the unplugged export's socket must go");
    assert_eq!(s.ctl(&json!({"cmd": "list"}))["exports"].as_array().unwrap().len(), 1);
    assert_clean(&two);
    assert!(s.stop().success());
}

#[test]
fn sigint_drains_in_flight_writes_and_leaves_qcow2_clean() {
    let d = scratch();
    let dir = d.path();
    let img = dir.join("busy.qcow2");
    ok("qemu-img", &["create", "-f", "qcow2", p(&img), "512M"]);
    let sock = dir.join("busy.sock");
    let s = Serve::start(dir, &[p(&img), "--vhost-user", p(&sock), "--iothreads", "2"], &[&sock]);
    let mut load = spawn_bench(
        &sock,
        &[
            "--rw",
            "randwrite",
            "--runtime",
            "30",
            "--iodepth",
            "64",
            "--queues",
            "2",
        ],
    );
    std::thread::sleep(Duration::from_millis(1500));
    let st = s.stop();
    let _ = load.kill();
    let _ = load.wait();
    assert!(st.success(), "spindle serve exited with {st}");
    assert!(!sock.exists());
    let o = run("qemu-img", &["check", p(&img)]);
    assert!(
        o.status.success(),
        "not clean after SIGINT:\n{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let info = ok("qemu-img", &["info", "--output=json", p(&img)]);
    assert!(!info.contains("\"dirty-flag\": true"), "{info}");
}

#[test]
fn bad_serve_arguments_get_one_clear_line() {
    let d = scratch();
    let dir = d.path();
    let img = dir.join("x.raw");
    ok("truncate", &["-s", "1M", p(&img)]);
    let sock = dir.join("x.sock");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["serve", "/nonexistent/disk.qcow2", "--vhost-user", p(&sock)],
            "/nonexistent/disk.qcow2",
        ),
        (
            vec!["serve", p(&img), "--vhost-user", p(&sock), "--iothreads", "0"],
            "iothreads 0",
        ),
        (
            vec!["serve", p(&img), "--vhost-user", p(&sock), "--queue-size", "100"],
            "queue-size 100",
        ),
        (vec!["serve", p(&img), "--vhost-user", p(&img)], "not a socket"),
        (
            vec![
                "serve",
                p(&img),
                "--vhost-user",
                p(&sock),
                "--serial",
                "this-serial-is-far-too-long",
            ],
            "longer than 20",
        ),
        (
            vec!["serve", "--config", "/nonexistent.toml"],
            "cannot read config file",
        ),
        (vec!["bench", p(&img), "--rw", "sideways"], "--rw sideways"),
    ];
    for (args, want) in cases {
        let o = run("spindle", &args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: want '{want}' in: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: one line, got: {err}");
    }
    std::fs::write(
        dir.join("bad.toml"),
        "[[export]]\nimage = \"x\"\nsocket = \"y\"\nbogus = 1\n",
    )
    .unwrap();
    let o = run("spindle", &["serve", "--config", p(&dir.join("bad.toml"))]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("bogus"), "{err}");
}

#[test]
fn every_engine_serves_verified_data() {
    let d = scratch();
    let dir = d.path();
    for aio in ["io_uring", "native", "threads"] {
        let img = dir.join(format!("{aio}.raw"));
        // Preallocated: native AIO blocks on sparse files.
        ok("fallocate", &["-l", "64M", p(&img)]);
        let sock = dir.join(format!("{aio}.sock"));
        let s = Serve::start(
            dir,
            &[p(&img), "--vhost-user", p(&sock), "--aio", aio, "--control", "ctl.sock"],
            &[&sock],
        );
        let v = verify_run(&sock, "1", "16", &[]);
        assert_eq!(
            (v["errors"].clone(), v["verify"]["failures"].clone()),
            (json!(0), json!(0)),
            "{aio}: {v}"
        );
        assert!(v["verify"]["checked"].as_u64().unwrap() > 100, "{aio}: {v}");
        let st = s.ctl(&json!({"cmd": "stats", "name": aio}));
        assert!(op(&st, "write")["requests"].as_u64().unwrap() > 0, "{aio}: {st}");
        assert!(s.stop().success(), "{aio}");
        std::fs::remove_file(dir.join("ctl.sock")).ok();
    }
}

#[test]
fn serve_without_arguments_creates_and_serves_the_default_disk() {
    let d = scratch();
    let dir = d.path();
    let sock = dir.join("spindle-disk.sock");
    let s = Serve::start(dir, &[], &[&sock]);
    let img = dir.join("spindle-disk.qcow2");
    // -U: the served image is locked against qemu-img's plain look.
    let info: Value = serde_json::from_str(&ok("qemu-img", &["info", "-U", "--output=json", p(&img)])).unwrap();
    assert_eq!(info["virtual-size"], json!(8u64 << 30), "{info}");
    assert_eq!(info["format"], json!("qcow2"));
    let v = verify_run(&sock, "1", "8", &["--size", "64M"]);
    assert_eq!(v["verify"]["failures"], json!(0), "{v}");
    let log = s.log_text();
    assert!(log.contains("created spindle-disk.qcow2"), "{log}");
    assert!(
        log.contains(&format!(
            "-chardev socket,id=spindle-spindle-disk,path={},reconnect=1",
            sock.display()
        )),
        "{log}"
    );
    assert!(
        log.contains("-device vhost-user-blk-pci,chardev=spindle-spindle-disk"),
        "{log}"
    );
    assert!(log.contains("<disk type='vhostuser' device='disk'>"), "{log}");
    assert!(
        log.contains(&format!("<source type='unix' path='{}'>", sock.display())),
        "{log}"
    );
    assert!(s.stop().success());
    assert_clean(&img);
    // A second run opens the existing disk instead of creating it.
    let s = Serve::start(dir, &[], &[&sock]);
    assert!(s.stop().success());
    assert!(!s_log_created_twice(dir));
}

fn s_log_created_twice(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("serve-"))
        .filter(|e| {
            std::fs::read_to_string(e.path())
                .unwrap_or_default()
                .contains("created spindle-disk.qcow2")
        })
        .count()
        > 1
}

#[test]
fn two_io_threads_allocate_one_qcow2_concurrently() {
    // Two queues on two I/O threads write, overwrite and read one fresh
    // qcow2 at once: allocations race and reads use the per-thread L2
    // entry cache; every block must verify and the image stay clean.
    let d = scratch();
    let dir = d.path();
    let img = dir.join("mt.qcow2");
    ok(
        "qemu-img",
        &["create", "-f", "qcow2", "-o", "cluster_size=4k", p(&img), "64M"],
    );
    let sock = dir.join("mt.sock");
    let s = Serve::start(dir, &[p(&img), "--vhost-user", p(&sock), "--iothreads", "2"], &[&sock]);
    let v = verify_run(&sock, "3", "32", &["--queues", "2", "--flush-every", "200"]);
    assert_eq!(
        (v["errors"].clone(), v["verify"]["failures"].clone()),
        (json!(0), json!(0)),
        "{v}"
    );
    assert!(v["verify"]["checked"].as_u64().unwrap() > 1000, "{v}");
    assert!(s.stop().success());
    assert_clean(&img);
}

#[test]
fn a_polling_client_writes_and_verifies() {
    // `--poll` takes libblkio's poll queues: the client never waits for the
    // server's interrupt, so the server must publish used entries that the
    // driver finds by looking, with notifications off on its side.
    let d = scratch();
    let dir = d.path();
    let img = dir.join("d.raw");
    ok("truncate", &["-s", "64M", p(&img)]);
    let sock = dir.join("d.sock");
    let s = Serve::start(dir, &[p(&img), "--vhost-user", p(&sock)], &[&sock]);
    let v = verify_run(&sock, "1", "16", &["--poll", "--flush-every", "50"]);
    assert_eq!(v["verify"]["failures"], json!(0), "{v}");
    // A count, not a rate: the machine may be busy (2 cores shared).
    assert!(v["verify"]["checked"].as_u64().unwrap() > 100, "{v}");
    assert!(s.stop().success());

    // A file has no poll queues here: one clear error line, a failed exit.
    let o = run("spindle", &["bench", p(&img), "--poll", "--runtime", "1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("--poll needs a vhost-user socket"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}
