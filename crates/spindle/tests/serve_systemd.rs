//! `spindle serve` under systemd's conventions, without a systemd: its
//! sd_notify messages (a datagram socket stands in for systemd's), its log
//! as the journal would get it, and the units shipped in contrib/systemd
//! (checked by `systemd-analyze verify`, and their socket paths served
//! through `systemd-socket-activate`).

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

/// A child process, killed if a failed assertion leaves it running.
struct Proc(Child);

impl std::ops::Deref for Proc {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// `spindle serve ARGS` with `env`, stdout and stderr in files of `dir`.
fn serve(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Proc {
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
        .map(Proc)
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
        .map(Proc)
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

fn contrib() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../contrib/systemd")
}

const UNITS: [&str; 3] = ["spindle@.service", "spindle@.socket", "spindle-control@.socket"];

/// `systemd-analyze verify` of `units` (templates, as instance `vm1`) in
/// `dir`: its status and what it printed (it warns, exit status 0, about
/// unknown keys and bad values: a clean unit prints nothing).
fn verify(dir: &Path, units: &[&str]) -> (bool, String) {
    let mut args = vec!["verify".to_string(), "--man=no".to_string()];
    for u in units {
        let inst = u.replacen("@.", "@vm1.", 1);
        let link = dir.join(&inst);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(dir.join(u), &link).unwrap();
        args.push(p(&link).to_string());
    }
    let out = Command::new("systemd-analyze")
        .args(&args)
        .output()
        .expect("systemd-analyze is required: install it with `apt-get install -y systemd`");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_shipped_units_verify() {
    let dir = scratch();
    let d = dir.path();
    // The service's binary must exist for `verify`: this build's, in
    // place of /usr/local/bin/spindle (the only change).
    for u in UNITS {
        let text = std::fs::read_to_string(contrib().join(u)).unwrap();
        assert!(
            !u.ends_with(".service")
                || text.contains("ExecStart=/usr/local/bin/spindle serve --config /etc/spindle/%i.toml"),
            "{u}"
        );
        std::fs::write(
            d.join(u),
            text.replace("/usr/local/bin/spindle", env!("CARGO_BIN_EXE_spindle")),
        )
        .unwrap();
    }
    let (ok, text) = verify(d, &UNITS);
    assert!(ok && text.trim().is_empty(), "systemd-analyze verify:\n{text}");
    // The check can fail: a unit with a key systemd does not know.
    let bad = std::fs::read_to_string(d.join("spindle@.service"))
        .unwrap()
        .replace("Type=notify", "Type=notify\nProtectSystems=full");
    std::fs::write(d.join("bad@.service"), bad).unwrap();
    let (_, text) = verify(d, &["bad@.service"]);
    assert!(text.contains("Unknown key"), "a bad unit passed:\n{text}");
}

/// `ListenStream=` of a shipped socket unit, instance `vm1`, under `run`
/// instead of /run/spindle.
fn listen(unit: &str, run: &Path) -> PathBuf {
    let text = std::fs::read_to_string(contrib().join(unit)).unwrap();
    let l = text
        .lines()
        .find_map(|l| l.strip_prefix("ListenStream="))
        .unwrap_or_else(|| panic!("{unit} has no ListenStream="));
    PathBuf::from(l.replace("%i", "vm1").replace("/run/spindle", p(run)))
}

/// The example config and the socket units agree: started with both
/// units' sockets passed in (as systemd would pass them, names included),
/// Spindle serves the export and the control socket on them and binds
/// nothing of its own.
#[test]
fn the_example_config_serves_the_socket_units_sockets() {
    common::need("systemd-socket-activate");
    let dir = scratch();
    let d = dir.path();
    let run = d.join("run");
    std::fs::create_dir_all(run.join("vm1")).unwrap();
    let img = image(d);
    let (disk, control) = (listen("spindle@.socket", &run), listen("spindle-control@.socket", &run));
    let config = std::fs::read_to_string(contrib().join("vm1.toml"))
        .unwrap()
        .replace("/run/spindle", p(&run))
        .replace("/var/lib/spindle/vm1.qcow2", p(&img));
    assert!(config.contains(p(&disk)) && config.contains(p(&control)), "{config}");
    let cfg = d.join("vm1.toml");
    std::fs::write(&cfg, config).unwrap();
    let mut act = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&disk)
        .arg("-l")
        .arg(&control)
        // systemd names a socket after its unit unless FileDescriptorName= says.
        .arg("--fdname=spindle@vm1.socket:control")
        .args([env!("CARGO_BIN_EXE_spindle"), "serve", "--config", p(&cfg)])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(d.join("stdout.log")).unwrap())
        .stderr(std::fs::File::create(d.join("stderr.log")).unwrap())
        .spawn()
        .map(Proc)
        .unwrap();
    // The first connection starts it.
    let start = Instant::now();
    while !disk.exists() {
        assert!(start.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(UnixStream::connect(&disk).unwrap());
    let start = Instant::now();
    let list = loop {
        if read(d, "stdout.log").contains("spindle: control socket") {
            break common::serve::ctl_at(&control, &serde_json::json!({"cmd": "list"}));
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{}{}",
            read(d, "stdout.log"),
            read(d, "stderr.log")
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(list["exports"][0]["name"], "vm1", "{list}");
    assert_eq!(list["exports"][0]["socket"], p(&disk), "{list}");
    bench_one(&disk);
    signal(&act, libc::SIGTERM);
    assert!(wait(&mut act, Duration::from_secs(60)).success());
    let (out, err) = (read(d, "stdout.log"), read(d, "stderr.log"));
    assert!(
        out.contains("serving 2 socket(s) passed in by the service manager"),
        "{out}{err}"
    );
    assert!(!err.contains("matches no export"), "{err}");
    // Passed sockets are systemd's: left in place.
    assert!(disk.exists() && control.exists());
}
