//! The control socket of `spindle serve` under hostile and unlucky use:
//! malformed bytes, many concurrent requests, refused resizes, 0-byte
//! exports, a stuck export at shutdown.

mod common;

use common::serve::{exchange, Serve};
use common::{assert_clean, ok, p, run, scratch};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(30);

fn start_null(dir: &Path) -> Serve {
    start_null_with(dir, &[])
}

/// [`start_null`] with more arguments.
fn start_null_with(dir: &Path, more: &[&str]) -> Serve {
    let sock = dir.join("n.sock");
    let mut args = vec![
        "null:64M",
        "--vhost-user",
        p(&sock),
        "--name",
        "n",
        "--control",
        "ctl.sock",
    ];
    args.extend_from_slice(more);
    Serve::start(dir, &args, &[&sock])
}

fn refusal(reply: &str) -> String {
    let v: Value = serde_json::from_str(reply).unwrap_or_else(|e| panic!("reply {reply:?} is not JSON: {e}"));
    assert_eq!(v["ok"], json!(false), "{reply}");
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error in {reply}"))
        .to_string()
}

#[test]
fn every_hostile_request_line_gets_exactly_one_reply_naming_the_problem() {
    let d = scratch();
    let s = start_null(d.path());
    let ctl = d.path().join("ctl.sock");
    let mut long = vec![b'x'; 64 * 1024 + 1];
    long.push(b'\n');
    let deep = format!("{}\n", "[".repeat(10_000));
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"\xff\xfe{\"cmd\":\"list\"}\n".to_vec(), "not UTF-8"),
        (long, "longer than 65536 bytes"),
        (b"\n".to_vec(), "empty request"),
        (b"  \t \r\n".to_vec(), "empty request"),
        (b"[]\n".to_vec(), "must be a JSON object, not an array"),
        (b"null\n".to_vec(), "not null"),
        (b"{\"cmd\":\"list\",\"x\":1}\n".to_vec(), "unknown field `x`"),
        (
            b"{\"cmd\":\"remove\",\"name\":\"n\",\"force\":true}\n".to_vec(),
            "unknown field `force`",
        ),
        (
            b"{\"cmd\":\"add\",\"export\":{\"image\":\"null:1M\",\"socket\":\"/tmp/x\",\"colour\":\"red\"}}\n".to_vec(),
            "unknown field `colour`",
        ),
        (deep.into_bytes(), "recursion limit"),
        (
            b"{\"cmd\":\"resize\",\"name\":\"n\",\"size\":1e999}\n".to_vec(),
            "number out of range",
        ),
        (
            b"{\"cmd\":\"resize\",\"name\":\"n\",\"size\":123456789012345678901234567890}\n".to_vec(),
            "invalid type",
        ),
        (
            b"{\"cmd\":\"resize\",\"name\":\"n\",\"size\":\"99999999E\"}\n".to_vec(),
            "99999999E",
        ),
        (b"{\"cmd\":\"frobnicate\"}\n".to_vec(), "unknown cmd `frobnicate`"),
        (b"{\"cmd\":42}\n".to_vec(), "`cmd` must be a string"),
        (b"{\"name\":\"n\"}\n".to_vec(), "missing field `cmd`"),
        (b"{\"cmd\":\"stats\"}\n".to_vec(), "missing field `name`"),
        (b"{\"cmd\":\"stats\",\"name\":[1]}\n".to_vec(), "invalid type"),
        (b"{\"cmd\":\"list\"".to_vec(), "not valid JSON"),
    ];
    // One connection per case...
    for (bytes, want) in &cases {
        let lines = exchange(&ctl, bytes, LIMIT);
        let shown = String::from_utf8_lossy(&bytes[..bytes.len().min(60)]).into_owned();
        assert_eq!(lines.len(), 1, "{shown:?}: want one reply, got {lines:?}");
        let e = refusal(&lines[0]);
        assert!(e.contains(want), "{shown:?}: want '{want}' in: {e}");
    }
    // ...and all of them on one connection, each followed by a good
    // request: the connection stays usable and the replies stay in order.
    let mut all = Vec::new();
    for (bytes, _) in &cases {
        all.extend_from_slice(bytes);
        if !bytes.ends_with(b"\n") {
            all.push(b'\n');
        }
        all.extend_from_slice(b"{\"cmd\":\"list\"}\n");
    }
    let lines = exchange(&ctl, &all, LIMIT);
    assert_eq!(lines.len(), 2 * cases.len(), "{lines:#?}");
    for (i, (_, want)) in cases.iter().enumerate() {
        assert!(refusal(&lines[2 * i]).contains(want), "{}: want '{want}'", lines[2 * i]);
        let list: Value = serde_json::from_str(&lines[2 * i + 1]).unwrap();
        assert_eq!(list["exports"][0]["name"], json!("n"), "{list}");
    }
    // An unterminated last request is answered too; the export is intact.
    let lines = exchange(&ctl, b"{\"cmd\":\"stats\",\"name\":\"n\"}", LIMIT);
    assert_eq!(lines.len(), 1);
    assert!(lines[0].contains("\"ok\":true"), "{lines:?}");
    assert!(s.stop().success());
}

#[test]
fn a_hundred_concurrent_adds_and_removes_are_all_answered() {
    let d = scratch();
    let dir = d.path().to_owned();
    let mut s = start_null(&dir);
    let ctl = dir.join("ctl.sock");
    // Ten names, each added and removed by ten connections at once, so
    // a name is often re-added while its old export is still stopping.
    for round in 0..5 {
        let threads: Vec<_> = (0..100)
            .map(|i| {
                let (ctl, dir) = (ctl.clone(), dir.clone());
                std::thread::spawn(move || {
                    let k = (i / 2 + round) % 10;
                    let req = if i % 2 == 0 {
                        json!({"cmd": "add", "export": {
                            "image": format!("null:{}M", k + 1), "name": format!("e{k}"),
                            "socket": dir.join(format!("e{k}.sock"))}})
                    } else {
                        json!({"cmd": "remove", "name": format!("e{k}")})
                    };
                    let t = Instant::now();
                    let lines = exchange(&ctl, format!("{req}\n").as_bytes(), LIMIT);
                    (req, lines, t.elapsed())
                })
            })
            .collect();
        for t in threads {
            let (req, lines, took) = t.join().expect("a request got no reply in time");
            assert_eq!(lines.len(), 1, "{req}: {lines:?}");
            let v: Value = serde_json::from_str(&lines[0]).unwrap();
            assert!(v["ok"].is_boolean(), "{v}");
            assert!(took < LIMIT, "{req} took {took:?}");
        }
        // What is listed is served: its socket exists.
        let list = s.ctl_within(&json!({"cmd": "list"}), LIMIT);
        for e in list["exports"].as_array().unwrap() {
            if e["state"] == "running" {
                let sock = e["socket"].as_str().unwrap();
                assert!(Path::new(sock).exists(), "{sock} of a listed export is gone: {list}");
            }
        }
    }
    s.signal(libc::SIGTERM);
    let st = s.wait_within(LIMIT).expect("SIGTERM did not stop spindle serve");
    assert!(st.success(), "{st}");
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "sock"))
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "sockets left behind: {left:?}");
}

/// Runs `spindle ARGS`, which must fail within [`LIMIT`]; returns stderr.
fn refused(args: &[&str]) -> String {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_spindle"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > LIMIT {
            let _ = child.kill();
            panic!("spindle {args:?} was accepted (still running after {LIMIT:?})");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = child.wait_with_output().unwrap();
    assert!(!o.status.success(), "spindle {args:?} succeeded");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn zero_byte_and_non_disk_exports_are_refused_everywhere() {
    let d = scratch();
    let dir = d.path();
    let empty = dir.join("empty.raw");
    std::fs::write(&empty, b"").unwrap();
    let sock = dir.join("z.sock");
    let fifo = dir.join("fifo");
    ok("mkfifo", &[p(&fifo)]);
    let cases = [
        ("/dev/null", "/dev/null is a character device"),
        ("null:0", "the image is 0 bytes"),
        (p(&empty), "the image is 0 bytes"),
        (p(&fifo), "is a FIFO"),
        (p(dir), "is a directory"),
    ];
    for (image, want) in cases {
        let err = refused(&["serve", image, "--vhost-user", p(&sock)]);
        assert!(err.contains(want), "{image}: want '{want}' in: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{image}: one line: {err}");
        let cfg = dir.join("z.toml");
        std::fs::write(
            &cfg,
            format!("[[export]]\nimage = \"{image}\"\nsocket = \"{}\"\n", p(&sock)),
        )
        .unwrap();
        let err = refused(&["serve", "--config", p(&cfg)]);
        assert!(err.contains(want), "{image} in TOML: {err}");
    }
    let s = start_null(dir);
    for (image, want) in cases {
        for readonly in [false, true] {
            let r = s.ctl_within(
                &json!({"cmd": "add", "export": {"image": image, "socket": p(&sock), "name": "z", "readonly": readonly}}),
                LIMIT,
            );
            assert!(refusal(&r.to_string()).contains(want), "{image}: {r}");
        }
    }
    let r = s.ctl_within(
        &json!({"cmd": "resize", "name": "n", "size": "0", "shrink": true}),
        LIMIT,
    );
    assert!(refusal(&r.to_string()).contains("positive multiple of 512"), "{r}");
    assert_eq!(s.ctl(&json!({"cmd": "list"}))["exports"].as_array().unwrap().len(), 1);
    assert!(!sock.exists());
    assert!(s.stop().success());
}

#[test]
fn a_refused_resize_leaves_the_control_socket_and_sigterm_working() {
    let d = scratch();
    let dir = d.path();
    let img = dir.join("e.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&img), "1G"]);
    let sock = dir.join("e.sock");
    let mut s = Serve::start(
        dir,
        &[p(&img), "--vhost-user", p(&sock), "--control", "ctl.sock"],
        &[&sock],
    );
    let ctl = dir.join("ctl.sock");
    let o = run("spindle", &["ctl", "-c", p(&ctl), "resize", "e", "1E"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("L1 table"), "want the reason in: {err}");
    // The next resize answers promptly and works.
    let t = Instant::now();
    let r = s.ctl_within(&json!({"cmd": "resize", "name": "e", "size": "2G"}), LIMIT);
    assert_eq!(r["ok"], json!(true), "{r}");
    assert_eq!(r["size"], json!(2u64 << 30), "{r}");
    assert!(t.elapsed() < LIMIT);
    // A client sees the new size and can write at its end.
    let mut b = blkio::Blkio::new("virtio-blk-vhost-user").unwrap();
    b.set_str("path", p(&sock)).unwrap();
    b.connect().unwrap();
    assert_eq!(b.get_u64("capacity").unwrap(), 2 << 30);
    drop(b);
    let out = ok(
        "spindle",
        &[
            "bench",
            p(&sock),
            "--rw",
            "randwrite",
            "--verify",
            "--runtime",
            "1",
            "--output",
            "json",
        ],
    );
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["errors"], json!(0), "{v}");
    // Other requests are answered; SIGTERM still stops the daemon promptly.
    let list = s.ctl_within(&json!({"cmd": "list"}), LIMIT);
    assert_eq!(list["exports"][0]["size"], json!(2u64 << 30), "{list}");
    let t = Instant::now();
    s.signal(libc::SIGTERM);
    let st = s.wait_within(LIMIT).expect("SIGTERM did not stop spindle serve");
    assert!(st.success(), "{st}");
    assert!(t.elapsed() < Duration::from_secs(10), "SIGTERM took {:?}", t.elapsed());
    assert_clean(&img);
    let info = ok("qemu-img", &["info", "--output=json", p(&img)]);
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["virtual-size"], json!(2u64 << 30), "{info}");
}

#[test]
fn a_second_signal_ends_a_shutdown_stuck_on_an_export() {
    let d = scratch();
    let dir = d.path();
    let sock = dir.join("n.sock");
    // Every read waits 10 s before it starts: the export stops only once
    // the frontend's read is done.
    let mut s = start_null_with(dir, &["--x-delay-io", "read:1:10000"]);
    let mut fe = spindle_vhost::fuzzing::driver::Driver::connect(&sock, 16, Duration::from_secs(60)).expect("connect");
    fe.setup(1, 64).expect("set up queue 0");
    fe.submit(0, 0, 0, &[0u8; 4096], true).expect("submit a read");
    // Popped (in flight) before the signal.
    std::thread::sleep(Duration::from_millis(300));
    s.signal(libc::SIGTERM);
    assert!(
        s.wait_within(Duration::from_millis(500)).is_none(),
        "exited although an export is running"
    );
    // The control socket still answers while the shutdown waits.
    let list = s.ctl_within(&json!({"cmd": "list"}), LIMIT);
    assert_eq!(list["exports"][0]["state"], json!("stopping"), "{list}");
    let r = s.ctl_within(
        &json!({"cmd": "add", "export": {"image": "null:1M", "socket": p(&dir.join("m.sock"))}}),
        LIMIT,
    );
    assert!(refusal(&r.to_string()).contains("shutting down"), "{r}");
    s.signal(libc::SIGTERM);
    let st = s
        .wait_within(Duration::from_secs(5))
        .expect("a second SIGTERM did not end spindle serve");
    assert_eq!(st.code(), Some(1));
    let log = s.log_text();
    assert!(log.contains("SIGTERM again: exiting without waiting"), "{log}");
    assert!(!dir.join("ctl.sock").exists());
}

#[test]
fn a_socket_in_use_is_never_taken_over() {
    let d = scratch();
    let dir = d.path();
    let s = start_null(dir);
    // The export's own socket, spelled differently.
    std::fs::create_dir(dir.join("sub")).unwrap();
    let same = dir.join("sub/../n.sock");
    let r = s.ctl_within(
        &json!({"cmd": "add", "export": {"image": "null:1M", "socket": same, "name": "m"}}),
        LIMIT,
    );
    assert!(refusal(&r.to_string()).contains("already used by export 'n'"), "{r}");
    // A socket another process listens on.
    let foreign = dir.join("foreign.sock");
    let listener = std::os::unix::net::UnixListener::bind(&foreign).unwrap();
    let r = s.ctl_within(
        &json!({"cmd": "add", "export": {"image": "null:1M", "socket": foreign, "name": "f"}}),
        LIMIT,
    );
    assert!(refusal(&r.to_string()).contains("in use by another process"), "{r}");
    assert!(foreign.exists());
    // A second daemon on the same control socket.
    let err = refused(&[
        "serve",
        "null:1M",
        "--vhost-user",
        p(&dir.join("x.sock")),
        "--control",
        p(&dir.join("ctl.sock")),
    ]);
    assert!(err.contains("cannot listen on control socket"), "{err}");
    assert_eq!(
        s.ctl_within(&json!({"cmd": "list"}), LIMIT)["exports"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    drop(listener);
    assert!(s.stop().success());
}

#[test]
fn idle_connections_cannot_exhaust_the_daemon() {
    let d = scratch();
    let s = start_null(d.path());
    let ctl = d.path().join("ctl.sock");
    let threads = || std::fs::read_dir(format!("/proc/{}/task", s.pid())).unwrap().count();
    let before = threads();
    let idle: Vec<_> = (0..300)
        .map(|_| std::os::unix::net::UnixStream::connect(&ctl).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let during = threads();
    assert!(
        during <= before + 64,
        "{during} threads with 300 idle connections ({before} before)"
    );
    drop(idle);
    let lines = exchange(&ctl, b"{\"cmd\":\"list\"}\n", LIMIT);
    assert!(lines[0].contains("\"ok\":true"), "{lines:?}");
    assert!(s.stop().success());
}

#[test]
fn concurrent_resizes_and_a_racing_remove_of_a_qcow2_export_are_safe() {
    let d = scratch();
    let dir = d.path().to_owned();
    let img = dir.join("q.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&img), "64M"]);
    let sock = dir.join("q.sock");
    let s = Serve::start(
        &dir,
        &[p(&img), "--vhost-user", p(&sock), "--control", "ctl.sock"],
        &[&sock],
    );
    let ctl = dir.join("ctl.sock");
    let resize = |size: String| {
        let ctl = ctl.clone();
        std::thread::spawn(move || {
            let req = json!({"cmd": "resize", "name": "q", "size": size});
            let lines = exchange(&ctl, format!("{req}\n").as_bytes(), LIMIT);
            assert_eq!(lines.len(), 1, "{req}: {lines:?}");
            serde_json::from_str::<Value>(&lines[0]).unwrap()
        })
    };
    // Eight growing resizes at once: all work, one at a time.
    let all: Vec<_> = (1..=8).map(|i| resize(format!("{}M", 64 + 64 * i))).collect();
    let mut sizes: Vec<u64> = all
        .into_iter()
        .map(|t| t.join().unwrap())
        .filter_map(|r| r["size"].as_u64())
        .collect();
    sizes.sort();
    let listed = s.ctl_within(&json!({"cmd": "list"}), LIMIT)["exports"][0]["size"]
        .as_u64()
        .unwrap();
    assert!(sizes.contains(&listed), "listed {listed}, resized to {sizes:?}");
    // Resizes racing a remove: each is answered; after the remove's reply
    // nothing changes the image any more.
    let racing: Vec<_> = (1..=8).map(|i| resize(format!("{}M", 1024 + 64 * i))).collect();
    let r = s.ctl_within(&json!({"cmd": "remove", "name": "q"}), LIMIT);
    assert_eq!(r["ok"], json!(true), "{r}");
    let after_remove = std::fs::read(&img).unwrap();
    let mut grown = vec![listed];
    for t in racing {
        let r = t.join().unwrap();
        match r["size"].as_u64() {
            Some(n) => grown.push(n),
            None => {
                let e = refusal(&r.to_string());
                let fine = ["being removed", "no export named 'q'", "pass shrink"];
                assert!(fine.iter().any(|w| e.contains(w)), "{e}");
            }
        }
    }
    let unchanged = std::fs::read(&img).unwrap() == after_remove;
    assert!(unchanged, "the image changed after remove answered");
    assert_clean(&img);
    let info: Value = serde_json::from_str(&ok("qemu-img", &["info", "--output=json", p(&img)])).unwrap();
    let virt = info["virtual-size"].as_u64().unwrap();
    assert_eq!(
        virt,
        *grown.iter().max().unwrap(),
        "qcow2 size {virt}, resizes {grown:?}"
    );
    assert!(s.stop().success());
}

/// Runs `spindle ctl -c CTL ARGS`; its exit status and stdout (the reply).
fn ctl_cli(dir: &Path, args: &[&str]) -> (bool, Value, String) {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_spindle"))
        .args(["ctl", "-c", p(&dir.join("ctl.sock"))])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    let reply = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    (
        o.status.success(),
        reply,
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn spindle_ctl_sends_each_family_of_request_the_daemon_takes() {
    let d = scratch();
    let dir = d.path();
    let img = dir.join("q.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&img), "64M"]);
    let sock = dir.join("q.sock");
    let s = Serve::start(
        dir,
        &[
            p(&img),
            "--vhost-user",
            p(&sock),
            "--name",
            "q",
            "--control",
            "ctl.sock",
        ],
        &[&sock],
    );
    // Exports, VM snapshots and jobs: one request of each family.
    let (good, r, err) = ctl_cli(dir, &["throttle", "q", "iops-total=1000"]);
    assert!(good && r["ok"] == json!(true), "{r} {err}");
    let (good, r, err) = ctl_cli(dir, &["snapshot-create", "q", "before"]);
    assert!(good && r["snapshot"]["name"] == json!("before"), "{r} {err}");
    let (good, r, err) = ctl_cli(dir, &["quiesce", "q", "--lease", "30"]);
    assert!(good && r["lease_s"] == json!(30), "{r} {err}");
    let (good, r, err) = ctl_cli(dir, &["resume", "q"]);
    assert!(good && r["was_quiesced"] == json!(true), "{r} {err}");
    let (good, r, err) = ctl_cli(dir, &["jobs"]);
    assert!(good && r["jobs"].is_array(), "{r} {err}");
    // A refusal: the reply is printed, the error named, the exit 1.
    let (good, r, err) = ctl_cli(dir, &["snapshot-list", "nope"]);
    assert!(!good && r["ok"] == json!(false), "{r}");
    assert!(err.contains("no export named 'nope'"), "{err}");
    // A command line that makes no request is refused before sending.
    let (good, _, err) = ctl_cli(dir, &["add", "x.raw"]);
    assert!(!good && err.contains("--vhost-user <SOCKET>"), "{err}");
    let (good, _, err) = ctl_cli(dir, &["stream", "q", "--speed", "fast"]);
    assert!(!good && err.contains("invalid rate 'fast'"), "{err}");
    assert!(s.stop().success());
    let list = ok("qemu-img", &["snapshot", "-l", p(&img)]);
    assert!(list.contains("before"), "{list}");
    assert_clean(&img);
}
