//! `spindle serve` under systemd's conventions, without a systemd: its
//! sd_notify messages (a datagram socket stands in for systemd's) and its
//! log as the journal would get it.

mod common;

use common::{ok, p, scratch};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn image(dir: &Path) -> PathBuf {
    let img = dir.join("disk.raw");
    std::fs::File::create(&img).unwrap().set_len(64 << 20).unwrap();
    img
}

/// `spindle serve ARGS` with `env`, stdout and stderr in files of `dir`.
fn serve(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Child {
    let out = std::fs::File::create(dir.join("stdout.log")).unwrap();
    let err = std::fs::File::create(dir.join("stderr.log")).unwrap();
    Command::new(env!("CARGO_BIN_EXE_spindle"))
        .arg("serve")
        .args(args)
        .envs(env.iter().copied())
        .env("SPINDLE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("spawn spindle serve")
}

fn read(dir: &Path, f: &str) -> String {
    std::fs::read_to_string(dir.join(f)).unwrap_or_default()
}

/// The next sd_notify message, as text.
fn message(rx: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = rx.recv(&mut buf).expect("an sd_notify message within the timeout");
    String::from_utf8(buf[..n].to_vec()).expect("UTF-8")
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on the pid of a child this process spawned.
    unsafe { libc::kill(child.id() as i32, sig) };
}

fn wait(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("spindle serve did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn bench_one(sock: &Path) {
    ok(
        "spindle",
        &[
            "bench",
            p(sock),
            "--rw",
            "randread",
            "--number-ios",
            "4",
            "--runtime",
            "20",
        ],
    );
}

#[test]
fn ready_comes_once_every_socket_listens_and_stopping_at_sigterm() {
    let dir = scratch();
    let d = dir.path();
    let img = image(d);
    let (sock, ctl, notify) = (d.join("disk.sock"), d.join("ctl.sock"), d.join("notify.sock"));
    let rx = UnixDatagram::bind(&notify).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut child = serve(
        d,
        &[p(&img), "--vhost-user", p(&sock), "--control", p(&ctl)],
        &[("NOTIFY_SOCKET", p(&notify))],
    );
    let ready = message(&rx);
    // Checked the moment READY=1 arrived: both sockets accept already.
    let accepting = (UnixStream::connect(&sock).is_ok(), UnixStream::connect(&ctl).is_ok());
    assert_eq!(
        ready,
        "READY=1\nSTATUS=serving 1 export(s)",
        "{}",
        read(d, "stderr.log")
    );
    assert_eq!(accepting, (true, true), "READY=1 before the sockets listened");
    assert!(
        read(d, "stdout.log").contains("spindle: serving"),
        "READY=1 before the serving line"
    );
    bench_one(&sock);

    signal(&child, libc::SIGTERM);
    assert_eq!(
        message(&rx),
        "STOPPING=1\nSTATUS=SIGTERM: finishing in-flight requests, flushing, exiting"
    );
    assert!(wait(&mut child, Duration::from_secs(60)).success());
    rx.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    assert!(rx.recv(&mut [0u8; 64]).is_err(), "a message after STOPPING=1");

    // stderr is a file, not a terminal: no colour, anywhere.
    let (out, err) = (read(d, "stdout.log"), read(d, "stderr.log"));
    assert!(err.contains("SIGTERM: finishing in-flight requests"), "{err}");
    assert!(!err.contains('\x1b') && !out.contains('\x1b'), "ANSI escapes:\n{err:?}");
}

#[test]
fn sd_notify_reaches_an_abstract_socket() {
    use std::os::linux::net::SocketAddrExt;
    let dir = scratch();
    let d = dir.path();
    let img = image(d);
    let sock = d.join("disk.sock");
    let name = format!("spindle-notify-test-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let rx = UnixDatagram::bind_addr(&addr).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let at = format!("@{name}");
    let mut child = serve(d, &[p(&img), "--vhost-user", p(&sock)], &[("NOTIFY_SOCKET", &at)]);
    assert!(message(&rx).starts_with("READY=1\n"), "{}", read(d, "stderr.log"));
    assert!(sock.exists());
    signal(&child, libc::SIGINT);
    assert!(message(&rx).starts_with("STOPPING=1\nSTATUS=SIGINT: "));
    assert!(wait(&mut child, Duration::from_secs(60)).success());
}

/// With stdout and stderr on the journal (`JOURNAL_STREAM` names them),
/// log lines carry their syslog priority and the multi-line attach hints
/// are left out: one journal entry per event.
#[test]
fn under_the_journal_lines_carry_their_priority_and_stay_single() {
    let dir = scratch();
    let d = dir.path();
    let img = image(d);
    let (sock, ctl) = (d.join("disk.sock"), d.join("ctl.sock"));
    let log = d.join("journal.log");
    let f = std::fs::File::create(&log).unwrap();
    use std::os::unix::fs::MetadataExt;
    let m = f.metadata().unwrap();
    let stream = format!("{}:{}", m.dev(), m.ino());
    let mut child = Command::new(env!("CARGO_BIN_EXE_spindle"))
        .args(["serve", p(&img), "--vhost-user", p(&sock), "--control", p(&ctl)])
        .env("JOURNAL_STREAM", &stream)
        .env("SPINDLE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .unwrap();
    let start = Instant::now();
    while UnixStream::connect(&ctl).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{}",
            std::fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = common::serve::ctl_at(
        &ctl,
        &serde_json::json!({"cmd": "trace", "filter": "spindle::vhost::complete=debug"}),
    );
    assert_eq!(r["ok"], true, "{r}");
    bench_one(&sock);
    signal(&child, libc::SIGTERM);
    assert!(wait(&mut child, Duration::from_secs(60)).success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("spindle: serving"), "{text}");
    assert!(
        !text.contains("qemu-system-x86_64") && !text.contains("<disk"),
        "attach hints on the journal:\n{text}"
    );
    let traced: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("spindle::vhost::complete"))
        .collect();
    assert!(!traced.is_empty(), "{text}");
    assert!(
        traced
            .iter()
            .all(|l| l.starts_with("<7>DEBUG spindle::vhost::complete: request done ")),
        "{traced:?}"
    );

    // The same daemon, not on the journal (another stream): no prefixes,
    // and the hints are printed.
    let mut child = serve(d, &[p(&img), "--vhost-user", p(&sock)], &[("JOURNAL_STREAM", "0:0")]);
    let start = Instant::now();
    while !read(d, "stdout.log").contains("<disk") {
        assert!(start.elapsed() < Duration::from_secs(20), "{}", read(d, "stdout.log"));
        std::thread::sleep(Duration::from_millis(20));
    }
    signal(&child, libc::SIGTERM);
    assert!(wait(&mut child, Duration::from_secs(60)).success());
    assert!(!read(d, "stderr.log").contains("<6>") && !read(d, "stderr.log").contains("<4>"));
}
