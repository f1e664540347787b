//! Live migration of a guest whose disk is a Ceph RBD image, between two
//! `spindle serve` processes with a librbd connection each to the same
//! image (what two hosts look like). A TCG guest runs gio
//! (tests/guest/gio.c) on the disk: O_DIRECT writers that write and verify
//! generations of block patterns, small readers racing them, and holders
//! that keep buffers they read in guest memory with their checksums. It
//! migrates over a unix socket to a second QEMU started with `-incoming`
//! whose disk is an export of the other daemon, `incoming = true`. On the
//! destination gio re-checks the held buffers, keeps going and must finish
//! with no I/O error and no wrong data; the image (`rbd export`) then holds
//! what gio wrote last.
//!
//! The image has the exclusive-lock feature, and the lock is what keeps
//! two hosts from writing it: while the source serves, it alone owns the
//! lock, and the destination's export, even with a frontend that starts
//! its device early and writes, writes nothing (it does not open the image
//! writable before it can take the lock). At the switch-over the source
//! lets the lock go when its device stops, and the destination takes it
//! when its device starts, without waiting for it; afterwards the
//! destination alone owns it. The owners are read with librbd's
//! `rbd_lock_get_owners` (`spindle_rbd::Image::lock_owners`) through a
//! handle of the test's own (`rbd lock ls` lists only advisory locks), and
//! told apart by the watchers `rbd status` lists: a daemon's writable
//! handle watches the image, its read-only look at it does not. So the
//! test also sees that the destination opens no writable handle before its
//! device starts, and that after the migration only the destination has
//! one open.
//!
//! A second test stops a device again and again on one connection, as a
//! paused and resumed guest's QEMU does, then for a migration and a
//! cancelled one, with a vhost-user frontend of the test's: every stop is
//! answered, the migration's lets the lock go, the restart takes it back.
//!
//! The source is paused right after the migration's setup, as in
//! vm_migration.rs: QEMU 7.2 under TCG corrupts the memory of a busy guest
//! that keeps running through the RAM copy, whatever its disk is (see
//! common/migrate.rs).

mod common;

use common::ceph::{self, TestCluster};
use common::gio::{self, Layout, BS};
use common::migrate::{self, Mode, SMP};
use common::serve::Serve;
use common::vm::{self, Vm};
use common::{p, scratch};
use serde_json::{json, Value};
use spindle_rbd::Image;
use spindle_vhost::fuzzing::driver::Driver;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const LAYOUT: Layout = Layout {
    writers: 3,
    region_mib: 2,
    hold_mib: 8,
};
const DISK: u64 = 64 << 20;
const MINUTE: Duration = Duration::from_secs(60);
/// Where the early frontend of the destination tries to write: past what
/// gio touches.
const PROBE_AT: u64 = 32 << 20;

/// A handle of the test's own on the image, to see who holds the lock
/// (librbd answers that only on a writable handle: a read-only one has no
/// exclusive-lock state). It never writes, so it never asks for the lock.
struct Watch {
    /// It keeps its pool and cluster connection open.
    image: Image,
}

impl Watch {
    fn open(tc: &TestCluster, name: &str) -> Watch {
        let pool = tc.connect().pool("rbd", None).expect("pool rbd");
        Watch {
            image: pool.open(name).expect("open the image"),
        }
    }

    /// The clients holding the exclusive lock now.
    fn owners(&self) -> Vec<String> {
        assert!(!self.image.is_lock_owner().unwrap(), "the test's handle owns the lock");
        self.image.lock_owners().expect("rbd_lock_get_owners")
    }

    /// The one owner of the lock; fails the test when there is not exactly one.
    fn owner(&self, when: &str) -> String {
        let o = self.owners();
        assert_eq!(o.len(), 1, "{when}: the exclusive lock should have one owner: {o:?}");
        o[0].clone()
    }

    /// `len` bytes at `offset`, as the image holds them now.
    fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        let n = self.image.read_blocking(offset, &mut buf).expect("read the image");
        assert_eq!(n, len, "short read");
        buf
    }
}

/// The image `name` in pool `rbd`, [`DISK`] bytes, its layout blocks at
/// generation 1 (`rbd import` of a prefilled file, with Ceph's default
/// features: they include exclusive-lock).
fn create_image(tc: &TestCluster, dir: &Path, name: &str) {
    let raw = dir.join("prefill.raw");
    LAYOUT.prefill(&raw, DISK, 1);
    tc.rbd(&["import", p(&raw), &format!("rbd/{name}")]);
    std::fs::remove_file(&raw).unwrap();
    let info = tc.rbd(&["info", "--format", "json", &format!("rbd/{name}")]);
    let info: Value = serde_json::from_slice(&info.stdout).expect("rbd info json");
    let features: Vec<&str> = info["features"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert!(
        features.contains(&"exclusive-lock"),
        "the test image needs the exclusive-lock feature: rbd info says {info}"
    );
}

/// The layout's bytes of the image, by `rbd export`.
fn read_image(tc: &TestCluster, dir: &Path, name: &str) -> Vec<u8> {
    let out = dir.join("export.raw");
    tc.rbd(&["export", "--no-progress", &format!("rbd/{name}"), p(&out)]);
    let mut data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    data.truncate((LAYOUT.blocks() * BS) as usize);
    data
}

/// The client addresses watching the image (`rbd status`): each writable
/// librbd handle open on it; a read-only one does not watch.
fn watchers(tc: &TestCluster, name: &str) -> Vec<String> {
    let o = tc.rbd(&["status", "--format", "json", &format!("rbd/{name}")]);
    let v: Value = serde_json::from_slice(&o.stdout).expect("rbd status json");
    v["watchers"]
        .as_array()
        .unwrap_or_else(|| panic!("rbd status: {v}"))
        .iter()
        .map(|w| w["address"].as_str().unwrap_or("?").to_string())
        .collect()
}

/// `spindle serve --config` with one export `disk` of the image on `sock`
/// and a control socket: the source names the image by an `rbd:` spec,
/// the destination by `[export.rbd]` keys, `incoming = true`.
fn serve(tc: &TestCluster, dir: &Path, name: &str, side: &str, incoming: bool) -> (Serve, PathBuf) {
    let ctl = dir.join(format!("ctl-{side}.sock"));
    let sock = dir.join(format!("disk-{side}.sock"));
    let mut text = format!(
        "control = \"{}\"\n\n[[export]]\nname = \"disk\"\nsocket = \"{}\"\nformat = \"raw\"\n",
        ctl.display(),
        sock.display()
    );
    if incoming {
        text.push_str(&format!(
            "incoming = true\n\n[export.rbd]\npool = \"rbd\"\nimage = \"{name}\"\nconf = \"{}\"\n",
            tc.conf.display()
        ));
    } else {
        text.push_str(&format!("image = \"{}\"\n", tc.spec(name)));
    }
    let config = dir.join(format!("spindle-{side}.toml"));
    std::fs::write(&config, text).unwrap();
    let mut s = Serve::start(dir, &["--config", p(&config)], &[&sock]);
    s.use_control(&ctl);
    // The file appears at bind(2), a moment before listen(2): a request
    // at once can be refused.
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Err(e) = std::os::unix::net::UnixStream::connect(&ctl) {
        assert!(Instant::now() < deadline, "{}: {e}\n{}", ctl.display(), s.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    (s, sock)
}

/// The `migration` state of export `disk`, from `ctl list`.
fn state(s: &Serve) -> String {
    let r = s.ctl(&json!({"cmd": "list"}));
    let list = r["exports"].as_array().unwrap_or_else(|| panic!("ctl list: {r}"));
    list.iter()
        .find(|e| e["name"] == "disk")
        .and_then(|e| e["migration"].as_str())
        .unwrap_or_else(|| panic!("ctl list has no export disk: {r}"))
        .to_string()
}

fn assert_state(s: &Serve, want: &str, when: &str) {
    let got = state(s);
    assert_eq!(got, want, "{when}: export disk is {got}, not {want}:\n{}", s.log_text());
}

fn settle(vm: &Vm, seconds: usize) {
    for _ in 0..seconds {
        let mark = vm.mark();
        vm.wait_line(mark, "GIO-PROGRESS", MINUTE);
    }
}

/// While the source serves, a frontend of the destination's export starts
/// its device and writes 4 KiB (as a destination QEMU started too early
/// would): the write must not be served, nothing of it may reach the image,
/// and the lock stays the source's. The frontend then goes away, the
/// destination says its open was refused the lock (an open waits for the
/// lock up to 10 s), and the export is still incoming.
fn early_write_waits(dst_d: &Serve, sock: &Path, watch: &Watch, src_owner: &str) {
    let mut fe = Driver::connect(sock, 16, Duration::from_secs(300)).expect("connect to the destination");
    fe.setup(1, 64).expect("set up queue 0");
    let data = vec![0x5au8; 4096];
    // VIRTIO_BLK_T_OUT.
    fe.submit(0, 1, PROBE_AT / 512, &data, false).expect("submit");
    let used = fe.wait_used(0, Duration::from_secs(4));
    assert_eq!(
        used,
        None,
        "the destination served a write while the source owns the lock:\n{}",
        dst_d.log_text()
    );
    assert_eq!(watch.owner("the destination's device started early"), src_owner);
    assert_eq!(
        watch.read(PROBE_AT, 4096),
        vec![0u8; 4096],
        "the destination's early write reached the image"
    );
    drop(fe);
    let deadline = Instant::now() + Duration::from_secs(30);
    while lines_with(&dst_d.log_text(), "cannot activate").is_empty() {
        assert!(
            Instant::now() < deadline,
            "the destination never said why it did not serve:\n{}",
            dst_d.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = dst_d.log_text();
    let refused = lines_with(&log, "cannot activate");
    assert!(
        refused[0].contains("another client holds its exclusive lock"),
        "the destination did not serve for another reason: {refused:#?}"
    );
    assert_eq!(watch.owner("the destination was refused the lock"), src_owner);
    assert_state(dst_d, "incoming", "after the early frontend left");
}

/// Lines of `log` that contain `pat`.
fn lines_with<'a>(log: &'a str, pat: &str) -> Vec<&'a str> {
    log.lines().filter(|l| l.contains(pat)).collect()
}

#[test]
fn guest_under_load_migrates_between_two_daemons_on_one_rbd_image() {
    let _one = vm::one_at_a_time();
    let d = scratch();
    let dir = d.path();
    let tc = ceph::cluster();
    let name = ceph::unique("mig");
    create_image(tc, dir, &name);
    let watch = Watch::open(tc, &name);
    assert!(watch.owners().is_empty(), "a fresh image has no lock owner");
    let mine = watchers(tc, &name);
    assert_eq!(mine.len(), 1, "the test's handle watches the image: {mine:?}");
    // The writable handles of the daemons: the clients other than the
    // test's watching the image.
    let handles = || -> Vec<String> { watchers(tc, &name).into_iter().filter(|w| *w != mine[0]).collect() };

    // The source: daemon A, and the guest on it.
    let t0 = Instant::now();
    let (src_d, src_sock) = serve(tc, dir, &name, "src", false);
    let a_owner = watch.owner("daemon A serves the image");
    assert_eq!(handles(), vec![a_owner.clone()], "daemon A's handle owns the lock");
    let script = format!(
        "exec /gio {} --readers 1 --hold-threads 2 --pool-mib 16 --base-gen 1 /dev/vda\n",
        LAYOUT.args()
    );
    let rd = vm::initrd(dir, &script, true);
    let mut src = Vm::start_smp(dir, "src", &rd, &[(&src_sock, 1)], None, SMP);
    src.wait_line(0, "GIO-RUNNING", Duration::from_secs(120));
    settle(&src, 3);
    println!("source up, gio running: {:.1} s", t0.elapsed().as_secs_f64());

    // The destination: daemon B, incoming. It opens the image without the
    // lock, and a frontend that starts its device early cannot write.
    let (dst_d, dst_sock) = serve(tc, dir, &name, "dst", true);
    assert_state(&dst_d, "incoming", "daemon B started");
    assert_eq!(watch.owner("daemon B started, incoming"), a_owner);
    assert_eq!(
        handles(),
        vec![a_owner.clone()],
        "daemon B's look at the image must be read-only"
    );
    let t = Instant::now();
    early_write_waits(&dst_d, &dst_sock, &watch, &a_owner);
    println!(
        "the destination's early write waited, its open refused the lock: {:.1} s",
        t.elapsed().as_secs_f64()
    );
    settle(&src, 1);
    assert_eq!(watch.owner("the source's guest runs on"), a_owner);
    assert_eq!(
        handles(),
        vec![a_owner.clone()],
        "daemon B kept a writable handle after its early frontend left"
    );
    assert_state(&src_d, "active", "the source's guest runs on");

    // Migrate.
    let uri = migrate::uri(dir, 1);
    let mut dst = Vm::start_smp(dir, "dst", &rd, &[(&dst_sock, 1)], Some(&uri), SMP);
    assert_state(&dst_d, "incoming", "the destination QEMU waits");
    let dst_log_before = dst_d.log_text();
    let inflight = migrate::announce(&mut src, 1);
    let t = Instant::now();
    let fig = migrate::migrate(&mut src, &mut dst, &uri, Mode::PauseAfterSetup);
    let running_in = t.elapsed();
    migrate::quit(&mut src);
    let checked = migrate::resumed(&mut dst, 1, true, "after migrating to daemon B");
    println!(
        "{inflight} guest I/Os in progress at the start, migration {} ms, downtime {} ms, \
         destination running {} ms after `migrate`, {checked} held buffers intact",
        fig.total_ms,
        fig.downtime_ms,
        running_in.as_millis()
    );
    assert_state(&src_d, "inactive", "the source after the migration");
    assert_state(&dst_d, "active", "the destination after the migration");

    // The lock went from A to B, and B did not have to wait for it.
    let b_owner = watch.owner("after the migration");
    assert_ne!(b_owner, a_owner, "the source still owns the lock after the migration");
    assert_eq!(
        handles(),
        vec![b_owner.clone()],
        "after the migration only daemon B's handle is open, and owns the lock"
    );
    let dst_log = dst_d.log_text();
    let new_lines = &dst_log[dst_log_before.len().min(dst_log.len())..];
    let waited = lines_with(new_lines, "cannot activate");
    assert!(
        waited.is_empty(),
        "the destination waited for the image at the switch-over: {waited:#?}\n{dst_log}"
    );
    assert!(
        !lines_with(new_lines, "image opened for a waiting device").is_empty(),
        "the destination never opened the image afresh:\n{dst_log}"
    );
    settle(&dst, 2);

    // A lets go of everything: the lock stays B's.
    let log = src_d.log_text();
    let st = src_d.stop();
    assert!(st.success(), "daemon A exited with {st}:\n{log}");
    assert_eq!(watch.owner("daemon A stopped"), b_owner);
    assert_eq!(handles(), vec![b_owner.clone()], "daemon A stopped");

    // gio finishes on the destination with no error.
    let before = src.console();
    drop(src);
    dst.send("S");
    dst.wait_exit(Duration::from_secs(180));
    let console = format!("{before}\n{}", dst.console());
    println!("{console}");
    let summary = gio::assert_clean(&console);
    assert!(summary["held_checks"] > 0, "the holders checked nothing: {summary:?}");
    let log = dst_d.log_text();
    let st = dst_d.stop();
    assert!(st.success(), "daemon B exited with {st}:\n{log}");
    assert!(watch.owners().is_empty(), "no lock owner once both daemons stopped");
    assert_eq!(handles(), Vec::<String>::new(), "both daemons stopped");

    // The image holds each writer's last, fsynced generation, and nothing
    // of the early write.
    let finals = gio::finals(&console);
    let last = &finals["vda"];
    let bad = LAYOUT.check(&read_image(tc, dir, &name), 1, |w, g| {
        let (gen, synced) = last[w as usize];
        synced && g == gen
    });
    assert!(bad.is_empty(), "the image differs from what gio wrote last: {bad:#?}");
    assert_eq!(
        watch.read(PROBE_AT, 4096),
        vec![0u8; 4096],
        "the early write reached the image"
    );
    drop(watch);
    tc.rbd(&["rm", "--no-progress", &format!("rbd/{name}")]);
    println!("total {:.1} s", t0.elapsed().as_secs_f64());
}

/// A frontend that stops and starts its device again and again on one
/// connection (a guest paused and resumed), then stops it with dirty
/// logging on (a migration's switch-over), then starts it again (the
/// migration cancelled). Every stop flushes the RBD image from the
/// connection's thread and must be answered (the second stop on a
/// connection once waited for ever: its flush reused the image's queue
/// that the first stop's runtime, gone by then, watched). The migration's
/// stop lets the lock go; the start after it opens the image again and
/// takes the lock back, and every write is on the image.
#[test]
fn device_stops_flush_the_rbd_image_and_a_migration_stop_lets_it_go() {
    let d = scratch();
    let dir = d.path();
    let tc = ceph::cluster();
    let name = ceph::unique("stops");
    tc.rbd(&["create", "--size", "64M", &format!("rbd/{name}")]);
    let (srv, sock) = serve(tc, dir, &name, "src", false);
    assert_eq!(watchers(tc, &name).len(), 1, "the served image has one writable handle");
    let mut fe = Driver::connect(&sock, 16, Duration::from_secs(30)).expect("connect");
    fe.setup(1, 64).expect("set up queue 0");
    const ROUNDS: u8 = 6;
    let mut base = 0;
    let write = |fe: &mut Driver, round: u8| {
        let st = fe.write(0, u64::from(round) * 8, &[round + 1; 4096], Duration::from_secs(30));
        assert_eq!(st, Some(0), "round {round}: the write failed:\n{}", srv.log_text());
    };
    for round in 0..ROUNDS {
        if round > 0 {
            fe.resume_queue(0, base).expect("start the ring again");
        }
        write(&mut fe, round);
        if round == ROUNDS - 1 {
            // The migration's switch-over.
            let log = spindle_vhost::fuzzing::driver::memfd(4096, true).expect("memfd");
            fe.set_log_base(log.as_raw_fd(), 4096, 0).expect("SET_LOG_BASE");
            fe.set_log_all(true).expect("ack LOG_ALL");
        }
        let t = Instant::now();
        base = fe
            .stop_queue(0)
            .unwrap_or_else(|e| panic!("round {round}: GET_VRING_BASE: {e}\n{}", srv.log_text()));
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "round {round}: the stop took {:?}",
            t.elapsed()
        );
    }
    assert_state(&srv, "inactive", "the migration's stop");
    let watch = Watch::open(tc, &name);
    assert!(
        watch.owners().is_empty(),
        "a lock owner after the handover: {:?}",
        watch.owners()
    );

    // Cancelled: the device starts again, the image is opened afresh.
    fe.set_log_all(false).expect("clear LOG_ALL");
    fe.resume_queue(0, base).expect("start the ring again");
    write(&mut fe, ROUNDS);
    assert_state(&srv, "active", "the device started again");
    watch.owner("the device started again");
    drop(fe);
    drop(watch);
    let log = srv.log_text();
    let st = srv.stop();
    assert!(st.success(), "spindle serve exited with {st}:\n{log}");
    let out = dir.join("stops.raw");
    tc.rbd(&["export", "--no-progress", &format!("rbd/{name}"), p(&out)]);
    let data = std::fs::read(&out).unwrap();
    for round in 0..=ROUNDS {
        let at = usize::from(round) * 4096;
        assert!(
            data[at..at + 4096].iter().all(|&b| b == round + 1),
            "round {round}: its write is not on the image"
        );
    }
    tc.rbd(&["rm", "--no-progress", &format!("rbd/{name}")]);
}
