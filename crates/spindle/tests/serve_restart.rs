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
