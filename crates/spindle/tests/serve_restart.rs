//! `spindle serve` started again with the same arguments: after SIGKILL it
//! serves the same socket at once, and an image still held by a previous
//! server is waited for (briefly) instead of refused at once.

mod common;

use common::serve::Serve;
use common::{p, scratch};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn image(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("disk.raw");
    std::fs::File::create(&img).unwrap().set_len(64 << 20).unwrap();
    img
}

/// Waits until something accepts connections on `sock`.
fn wait_accepting(sock: &Path, limit: Duration) -> bool {
    let start = Instant::now();
    while UnixStream::connect(sock).is_err() {
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

#[test]
fn a_serve_killed_with_sigkill_and_started_again_serves_the_same_socket() {
    let dir = scratch();
    let img = image(dir.path());
    let sock = dir.path().join("disk.sock");
    let args = [p(&img), "--vhost-user", p(&sock)];
    for round in 0..3 {
        let mut s = Serve::start(dir.path(), &args, &[&sock]);
        assert!(
            wait_accepting(&sock, Duration::from_secs(10)),
            "round {round}: the socket is not served:\n{}",
            s.log_text()
        );
        assert!(
            s.wait_within(Duration::from_millis(100)).is_none(),
            "round {round}: exited:\n{}",
            s.log_text()
        );
        s.signal(libc::SIGKILL);
        assert!(s.wait_within(Duration::from_secs(10)).is_some());
        // The dead server's socket file stays behind, refusing connections.
        assert!(sock.exists() && UnixStream::connect(&sock).is_err());
    }
}

#[test]
fn an_image_still_in_use_is_waited_for_a_moment_then_refused() {
    let dir = scratch();
    let img = image(dir.path());
    let (s1, s2) = (dir.path().join("one.sock"), dir.path().join("two.sock"));
    let first = Serve::start(dir.path(), &[p(&img), "--vhost-user", p(&s1)], &[&s1]);
    let mut second = Command::new(env!("CARGO_BIN_EXE_spindle"))
        .args(["serve", p(&img), "--vhost-user", p(&s2)])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        second.try_wait().unwrap().is_none(),
        "the second server gave up at once"
    );
    assert!(!s2.exists(), "the second server serves an image in use");
    // The first one goes: the second one takes the image and serves.
    first.stop();
    assert!(
        wait_accepting(&s2, Duration::from_secs(10)),
        "the second server never served"
    );
    // SAFETY: kill(2) on the pid of a child this process spawned.
    unsafe { libc::kill(second.id() as i32, libc::SIGINT) };
    let out = second.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("spindle: {} is in use; trying again for up to 3 s", p(&img))),
        "{err}"
    );

    // Held for longer than that: refused, naming the conflict.
    let first = Serve::start(dir.path(), &[p(&img), "--vhost-user", p(&s1)], &[&s1]);
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_spindle"))
        .args(["serve", p(&img), "--vhost-user", p(&s2)])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let waited = start.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("image is in use"), "{err}");
    assert!(
        (Duration::from_secs(3)..Duration::from_secs(15)).contains(&waited),
        "gave up after {waited:?}"
    );
    first.stop();
}

/// vhost-user GET_FEATURES over `sock`: the reply's request code, or
/// `None` when nothing answers within 20 s.
fn get_features(sock: &Path) -> Option<u32> {
    use std::io::{Read, Write};
    let start = Instant::now();
    let mut s = loop {
        match UnixStream::connect(sock) {
            Ok(s) => break s,
            Err(_) if start.elapsed() < Duration::from_secs(20) => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => return None,
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
    // Header: request 1 (GET_FEATURES), flags 1 (version 1), size 0.
    s.write_all(&[1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]).ok()?;
    let mut reply = [0u8; 20];
    s.read_exact(&mut reply).ok()?;
    Some(u32::from_le_bytes(reply[..4].try_into().unwrap()))
}

/// [`get_features`] as a frontend with `reconnect=1` sees it across a
/// handover: a connection the old process accepted just before it stopped
/// its exports is closed unanswered, and one reconnect (to the new
/// process) gets the answer.
fn get_features_reconnecting(sock: &Path) -> Option<u32> {
    get_features(sock).or_else(|| get_features(sock))
}

/// systemd's socket activation, with systemd's own tool: the socket is
/// bound by `systemd-socket-activate`, which starts `spindle serve` on the
/// first connection with the socket passed in (LISTEN_FDS, LISTEN_PID,
/// LISTEN_FDNAMES); Spindle serves it by name, not by binding a new one.
#[test]
fn a_socket_passed_in_by_systemd_is_served_by_name_or_path() {
    common::need("systemd-socket-activate");
    let dir = scratch();
    let img = image(dir.path());
    for (listen, fdname, vhost_user) in [
        // Matched by path: the export's socket is the one passed in.
        ("disk.sock", None, "disk.sock"),
        // Matched by name: the export is named as the descriptor.
        ("passed.sock", Some("--fdname=vm1"), "elsewhere.sock"),
    ] {
        let sock = dir.path().join(listen);
        let mut cmd = Command::new("systemd-socket-activate");
        cmd.arg("-l").arg(&sock);
        if let Some(f) = fdname {
            cmd.arg(f);
        }
        let mut act = cmd
            .args([
                env!("CARGO_BIN_EXE_spindle"),
                "serve",
                p(&img),
                "--name",
                "vm1",
                "--vhost-user",
            ])
            .arg(dir.path().join(vhost_user))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let reply = get_features(&sock);
        // SAFETY: kill(2) on the pid of a child this process spawned
        // (systemd-socket-activate execs spindle in its own process).
        unsafe { libc::kill(act.id() as i32, libc::SIGINT) };
        let start = Instant::now();
        while act.try_wait().unwrap().is_none() && start.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = act.kill();
        let out = act.wait_with_output().unwrap();
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(reply, Some(1), "{listen}: no GET_FEATURES reply:\n{log}");
        assert!(
            log.contains("serving 1 socket(s) passed in by the service manager"),
            "{log}"
        );
        assert!(
            !dir.path().join("elsewhere.sock").exists(),
            "bound a socket of its own:\n{log}"
        );
    }
}

/// Replaces `bin` the way an upgrade does: a new file renamed over it
/// (the running binary's inode is then deleted).
fn install(bin: &Path, contents: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = bin.with_extension("new");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, bin).unwrap();
}

/// A scratch directory with a copy of the binary as `spindle`, to be
/// replaced as an upgrade does, and the binary's bytes; servers started
/// from it hand over to processes this one adopts.
fn upgradable() -> (tempfile::TempDir, Vec<u8>) {
    common::handover::become_subreaper();
    let dir = scratch();
    let real = std::fs::read(env!("CARGO_BIN_EXE_spindle")).unwrap();
    install(&dir.path().join("spindle"), &real);
    (dir, real)
}

fn list(ctl: &Path) -> serde_json::Value {
    let r = common::serve::ctl_at(ctl, &serde_json::json!({"cmd": "list"}));
    assert_eq!(r["ok"], true, "{r}");
    r
}

/// Export names in a `list` reply, sorted.
fn names(r: &serde_json::Value) -> Vec<String> {
    let mut n: Vec<String> = r["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect();
    n.sort();
    n
}

/// Waits until the log has `n` lines containing `pat`.
fn wait_log(p: &common::handover::Pid, pat: &str, n: usize, limit: Duration) -> String {
    let start = Instant::now();
    loop {
        let log = p.log_text();
        if log.matches(pat).count() >= n {
            return log;
        }
        assert!(start.elapsed() < limit, "no {pat:?} (#{n}) within {limit:?}:\n{log}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGUSR2 hands the sockets (vhost-user and control) to a new process
/// started from the binary's path, with the exports as they are now; a new
/// binary that fails costs nothing; the listening sockets never go away.
#[test]
fn sigusr2_hands_the_sockets_and_runtime_exports_to_a_new_process() {
    use common::handover::{handed_to, Pid};
    let (dir, real) = upgradable();
    let d = dir.path();
    let bin = d.join("spindle");
    let img = image(d);
    let img2 = d.join("added.raw");
    std::fs::File::create(&img2).unwrap().set_len(32 << 20).unwrap();
    let (sock, sock2, ctl) = (d.join("disk.sock"), d.join("added.sock"), d.join("ctl.sock"));
    let metrics = d.join("metrics.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(d.join("notify.sock")).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let notify_path = d.join("notify.sock");
    let mut old = Pid::spawn(
        &bin,
        d,
        &[
            p(&img),
            "--vhost-user",
            p(&sock),
            "--control",
            p(&ctl),
            "--metrics",
            p(&metrics),
        ],
        &d.join("serve.log"),
        &[("NOTIFY_SOCKET", p(&notify_path))],
    );
    assert!(wait_accepting(&ctl, Duration::from_secs(20)), "{}", old.log_text());
    let mut msg = [0u8; 256];
    let got = |notify: &std::os::unix::net::UnixDatagram, msg: &mut [u8]| {
        let n = notify.recv(msg).expect("an sd_notify message");
        String::from_utf8_lossy(&msg[..n]).into_owned()
    };
    assert_eq!(got(&notify, &mut msg), "READY=1\nSTATUS=serving 1 export(s)");
    // Each failed handover is a reload that ends with the old process
    // still (or again) the main one.
    let failed_handover = |msg: &mut [u8], old: i32| {
        let reloading = got(&notify, msg);
        assert!(
            reloading.starts_with("RELOADING=1\nMONOTONIC_USEC=")
                && reloading.ends_with("\nSTATUS=SIGUSR2: handing the sockets over to a new process"),
            "{reloading:?}"
        );
        assert_eq!(
            got(&notify, msg),
            format!(
                "MAINPID={old}\nREADY=1\nSTATUS=serving 2 export(s); the last handover (SIGUSR2) failed, see the log"
            )
        );
    };
    let r = common::serve::ctl_at(
        &ctl,
        &serde_json::json!({"cmd": "add", "export": {"image": p(&img2), "socket": p(&sock2), "name": "added"}}),
    );
    assert_eq!(r["ok"], true, "{r}");
    let r = list(&ctl);
    assert_eq!(r["pid"], old.pid);
    assert_eq!(names(&r), ["added", "disk"]);
    let connections = |r: &serde_json::Value| -> u64 {
        r["exports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["connections"].as_u64().unwrap())
            .sum()
    };
    let before = connections(&r);

    // No binary at the path any more, then a new binary that does not
    // start: the old process keeps serving, untouched (not one export
    // was stopped).
    std::fs::remove_file(&bin).unwrap();
    old.signal(libc::SIGUSR2);
    let log = wait_log(&old, "the handover failed, still serving", 1, Duration::from_secs(40));
    assert!(log.contains(&format!("cannot start {}", bin.display())), "{log}");
    failed_handover(&mut msg, old.pid);
    install(&bin, b"#!/bin/sh\necho 'broken build' >&2\nexit 3\n");
    old.signal(libc::SIGUSR2);
    let log = wait_log(&old, "the handover failed, still serving", 2, Duration::from_secs(40));
    assert!(
        log.contains("broken build") && log.contains("ended (exit status: 3) before it was ready"),
        "{log}"
    );
    failed_handover(&mut msg, old.pid);
    assert!(old.running());
    let r = list(&ctl);
    assert_eq!(
        (r["pid"].as_i64(), names(&r)),
        (Some(old.pid as i64), vec!["added".into(), "disk".into()])
    );
    assert_eq!(connections(&r), before, "a failed start disturbed the exports:\n{log}");
    assert_eq!(get_features(&sock), Some(1));
    assert_eq!(get_features(&sock2), Some(1));

    // One that starts but cannot serve (here: a setting it refuses, found
    // when it opens the exports, after the old one released them): the old
    // one serves them again on the same sockets.
    let wrapper = d.join("spindle-real");
    install(&wrapper, &real);
    install(
        &bin,
        format!("#!/bin/sh\nexec {} \"$@\" --iothreads 99\n", wrapper.display()).as_bytes(),
    );
    old.signal(libc::SIGUSR2);
    let log = wait_log(&old, "the handover failed, still serving", 3, Duration::from_secs(60));
    assert!(log.contains("iothreads 99 must be from 1 to 64"), "{log}");
    assert!(log.contains("serving the 2 export(s) here again"), "{log}");
    failed_handover(&mut msg, old.pid);
    assert!(old.running());
    let r = list(&ctl);
    assert_eq!(
        (r["pid"].as_i64(), names(&r)),
        (Some(old.pid as i64), vec!["added".into(), "disk".into()])
    );
    assert_eq!(get_features(&sock), Some(1), "{}", old.log_text());
    assert_eq!(get_features(&sock2), Some(1), "{}", old.log_text());
    // Its metrics endpoint was stopped for the new one and listens again.
    assert!(scrape(&metrics).contains("export=\"added\""), "{}", old.log_text());

    // The real upgrade, twice (the second from a process that was itself
    // handed the sockets), with frontends connecting all along: every
    // connect succeeds (the sockets never close), and one that asks for
    // something gets its answer.
    install(&bin, &real);
    for round in 1..=2 {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s, flag) = (sock.clone(), stop.clone());
        let knocker = std::thread::spawn(move || {
            let mut refused = Vec::new();
            let mut tries = 0;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                tries += 1;
                if let Err(e) = UnixStream::connect(&s) {
                    refused.push(e.to_string());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (tries, refused)
        });
        let start = Instant::now();
        old.signal(libc::SIGUSR2);
        let during = get_features_reconnecting(&sock2);
        let done = old.wait_within(Duration::from_secs(60));
        let took = start.elapsed();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (tries, refused) = knocker.join().unwrap();
        let log = old.log_text();
        assert_eq!(
            done,
            Some(true),
            "round {round}: the old process did not exit 0:\n{log}"
        );
        assert!(
            refused.is_empty() && tries > 0,
            "round {round}: connections refused: {refused:?}\n{log}"
        );
        assert_eq!(
            during,
            Some(1),
            "round {round}: a frontend connecting meanwhile was not served:\n{log}"
        );
        let pid = handed_to(&log, round).unwrap_or_else(|| panic!("no new pid:\n{log}"));
        println!(
            "handover {round}: {} ms from SIGUSR2 to the old process's exit",
            took.as_millis()
        );
        // A reload: the new one names itself the main process once it
        // serves, then the old one names it too (what a NotifyAccess=main
        // unit hears) and exits.
        assert!(got(&notify, &mut msg).starts_with("RELOADING=1\n"));
        assert_eq!(
            got(&notify, &mut msg),
            format!("MAINPID={pid}\nREADY=1\nSTATUS=serving 2 export(s)")
        );
        assert_eq!(got(&notify, &mut msg), format!("MAINPID={pid}\nREADY=1"));
        old = Pid::adopt(pid, &old.log.clone());
        let r = list(&ctl);
        assert_eq!(r["pid"], pid, "round {round}: {r}");
        assert_eq!(
            names(&r),
            ["added", "disk"],
            "round {round}: the exports did not survive:\n{log}"
        );
        assert_eq!(get_features(&sock), Some(1));
        assert_eq!(get_features(&sock2), Some(1));
        assert!(sock.exists() && sock2.exists() && ctl.exists());
        // The new process serves the metrics at the same address.
        assert!(
            scrape(&metrics).contains("export=\"added\""),
            "round {round}: no metrics:\n{log}"
        );
    }
    old.signal(libc::SIGINT);
    assert_eq!(
        old.wait_within(Duration::from_secs(60)),
        Some(true),
        "{}",
        old.log_text()
    );
    // A handed-over control socket's file is left in place, as the
    // exports' are (a later start replaces it).
    assert!(ctl.exists());
}

/// `GET /metrics` on the unix socket at `path`: the reply's body.
fn scrape(path: &Path) -> String {
    use std::io::{Read, Write};
    let mut c = UnixStream::connect(path).unwrap_or_else(|e| panic!("metrics {}: {e}", path.display()));
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut reply = String::new();
    c.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    reply
}

/// The connections each export of `list` reply `r` has served.
fn connections_of(r: &serde_json::Value) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = r["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().into(), e["connections"].as_u64().unwrap()))
        .collect();
    v.sort();
    v
}

/// A handover with a frontend connected: the old process stops its
/// export without connecting to the socket it hands over, so the new
/// process sees no connection but a frontend's (the frontend here does
/// not come back).
#[test]
fn a_handover_leaves_no_connection_of_its_own_to_the_new_process() {
    use common::handover::{become_subreaper, Spindle};
    use spindle_vhost::fuzzing::driver::Driver;
    become_subreaper();
    let dir = scratch();
    let d = dir.path();
    let img = image(d);
    let (sock, ctl) = (d.join("disk.sock"), d.join("ctl.sock"));
    let mut s = Spindle::First(Serve::start(
        d,
        &[p(&img), "--vhost-user", p(&sock), "--control", p(&ctl)],
        &[&sock],
    ));
    let mut fe = Driver::connect(&sock, 16, Duration::from_secs(60)).expect("connect");
    fe.setup(1, 64).expect("set up queue 0");
    assert_eq!(connections_of(&list(&ctl)), [("disk".to_string(), 1)]);
    s.hand_over(Duration::from_secs(60));
    drop(fe);
    // Long enough for the new process to accept what its backlog holds.
    std::thread::sleep(Duration::from_millis(500));
    let r = list(&ctl);
    assert_eq!(r["pid"], s.pid());
    assert_eq!(
        connections_of(&r),
        [("disk".to_string(), 0)],
        "the new process served a connection no frontend made:\n{}",
        s.log_text()
    );
    assert_eq!(get_features(&sock), Some(1));
    assert!(s.stop(), "{}", s.log_text());
}

/// A handover that fails after the old process released its exports, one
/// of which cannot be served again (its image went away meanwhile): its
/// socket is closed and its file removed, and the other export serves on.
#[test]
fn after_a_failed_handover_an_export_not_served_again_closes_its_socket() {
    use common::handover::Pid;
    let (dir, real) = upgradable();
    let d = dir.path();
    let (bin, wrapper) = (d.join("spindle"), d.join("spindle-real"));
    install(&wrapper, &real);
    let img = image(d);
    let img2 = d.join("added.raw");
    std::fs::File::create(&img2).unwrap().set_len(32 << 20).unwrap();
    let (sock, sock2, ctl) = (d.join("disk.sock"), d.join("added.sock"), d.join("ctl.sock"));
    let mut old = Pid::spawn(
        &bin,
        d,
        &[p(&img), "--vhost-user", p(&sock), "--control", p(&ctl)],
        &d.join("serve.log"),
        &[],
    );
    assert!(wait_accepting(&ctl, Duration::from_secs(20)), "{}", old.log_text());
    let add = serde_json::json!({"cmd": "add", "export": {"image": p(&img2), "socket": p(&sock2), "name": "added"}});
    let r = common::serve::ctl_at(&ctl, &add);
    assert_eq!(r["ok"], true, "{r}");
    // The new binary removes the added image, then refuses a setting once
    // the old process released its exports.
    install(
        &bin,
        format!(
            "#!/bin/sh\nrm -f {}\nexec {} \"$@\" --iothreads 99\n",
            img2.display(),
            wrapper.display()
        )
        .as_bytes(),
    );
    old.signal(libc::SIGUSR2);
    let log = wait_log(&old, "the handover failed, still serving", 1, Duration::from_secs(60));
    assert!(old.running());
    assert_eq!(names(&list(&ctl)), ["disk"]);
    assert_eq!(get_features(&sock), Some(1), "{log}");
    assert!(!sock2.exists(), "the socket file of 'added' is left:\n{log}");
    assert!(log.contains("export 'added' cannot be served again"), "{log}");
    let mut old = common::handover::Spindle::Next(old);
    assert!(old.stop(), "{}", old.log_text());
}
