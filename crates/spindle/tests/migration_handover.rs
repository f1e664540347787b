//! The image side of live migration, with real `spindle serve` processes
//! and a vhost-user frontend per side (spindle-vhost's test driver, which
//! sets rings up and stops them as QEMU does): the source stops its device
//! with dirty logging on and hands the image over; the destination
//! (`--incoming`) activates when its device starts and reads the source's
//! last writes; a cancelled migration restarts the source's device, which
//! activates again. Images are judged with qemu-img and /proc/locks.

mod common;

use common::serve::Serve;
use common::{assert_clean, at, need, ofd_locked_bytes, ok, p, qcow2_create, run, scratch};
use serde_json::{json, Value};
use spindle_vhost::fuzzing::driver::Driver;
use std::path::Path;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(10);

fn pattern(tag: u8) -> Vec<u8> {
    (0..4096u32).map(|i| (i as u8) ^ tag).collect()
}

/// A frontend with queue 0 set up (64 entries), dirty logging off.
fn frontend(sock: &Path) -> Driver {
    let mut d = Driver::connect(sock, 16, Duration::from_secs(120)).expect("connect");
    d.setup(1, 64).expect("set up queue 0");
    d
}

fn write(d: &mut Driver, sector: u64, tag: u8) {
    assert_eq!(
        d.write(0, sector, &pattern(tag), T),
        Some(0),
        "write at sector {sector}"
    );
}

fn assert_reads(d: &mut Driver, sector: u64, tag: u8) {
    let (status, data) = d.read(0, sector, 4096, T).expect("read completes");
    assert_eq!(status, 0, "read at sector {sector}");
    assert!(data == pattern(tag), "sector {sector} does not hold pattern {tag:#x}");
}

/// The frontend stops its device for a migration: dirty logging on, then
/// `GET_VRING_BASE` (which answers only once the image is handed over).
fn stop_for_migration(d: &mut Driver) {
    d.set_log_all(true).expect("ack LOG_ALL");
    d.stop_queue(0).expect("GET_VRING_BASE");
}

/// A cancelled migration: QEMU turns logging off and starts the device again.
fn restart(d: &mut Driver) {
    d.set_log_all(false).expect("clear LOG_ALL");
    d.setup_queue(0, 64).expect("set queue 0 up again");
}

fn migration_of(s: &Serve, name: &str) -> String {
    migration_at(s.control.as_ref().expect("a control socket"), name)
}

/// The migration state of export `name` of the server on control socket `ctl`.
fn migration_at(ctl: &Path, name: &str) -> String {
    let r = common::serve::ctl_at(ctl, &json!({"cmd": "list"}));
    let e = r["exports"]
        .as_array()
        .and_then(|v| v.iter().find(|e| e["name"] == name))
        .unwrap_or_else(|| panic!("no export {name} in {r}"));
    e["migration"]
        .as_str()
        .unwrap_or_else(|| panic!("no migration state in {e}"))
        .to_string()
}

fn image(dir: &tempfile::TempDir, qcow2: bool) -> std::path::PathBuf {
    if qcow2 {
        let img = at(dir, "disk.qcow2");
        qcow2_create(&img, &["-o", "lazy_refcounts=on"], Some("64M"));
        img
    } else {
        let img = at(dir, "disk.raw");
        std::fs::File::create(&img).unwrap().set_len(64 << 20).unwrap();
        img
    }
}

fn dirty_flag(img: &Path) -> bool {
    let info: Value = serde_json::from_str(&ok("qemu-img", &["info", "-U", "--output=json", p(img)])).unwrap();
    info["dirty-flag"].as_bool().unwrap_or(false)
}

/// Bytes of QEMU's lock protocol held on `img`: 100 + i "holds", 200 + i
/// "does not share" (read 0, write 1, resize 3).
fn locks(img: &Path) -> Vec<u64> {
    let mut v = ofd_locked_bytes(img);
    v.sort_unstable();
    v.dedup();
    v
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < T, "{what} within {T:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `spindle serve` of `img` on `sock` with a control socket named after
/// it; `incoming`: as a migration's destination.
fn serve(dir: &tempfile::TempDir, img: &Path, sock: &Path, incoming: bool) -> Serve {
    let ctl = sock.with_extension("ctl");
    let mut args = vec![p(img), "--vhost-user", p(sock), "--control", p(&ctl)];
    if incoming {
        args.push("--incoming");
    }
    Serve::start(dir.path(), &args, &[sock])
}

/// Two daemons on one image (two hosts on shared storage): the incoming
/// one holds only the shared read lock; it activates only once the source
/// released the write lock; it reads the source's last writes. With
/// `early`, the destination's device starts while the source still runs:
/// its request waits (the destination keeps trying to take the write
/// lock) and completes once the source stopped. With `paused`, the
/// source's guest was paused before the migration: QEMU stops the device
/// without dirty logging (it turns logging on only for a running device),
/// so the image stays the source's until its frontend goes away (QEMU
/// quits after the migration).
fn two_daemons(qcow2: bool, early: bool, paused: bool) {
    need("qemu-img");
    let dir = scratch();
    let img = image(&dir, qcow2);
    let (src_sock, dst_sock) = (at(&dir, "src.sock"), at(&dir, "dst.sock"));
    let dst = serve(&dir, &img, &dst_sock, true);
    assert_eq!(
        locks(&img),
        vec![100],
        "an incoming export holds only the shared read lock"
    );
    assert_eq!(migration_of(&dst, "disk"), "incoming");
    let src = serve(&dir, &img, &src_sock, false);
    assert_eq!(migration_of(&src, "disk"), "active");
    assert!(locks(&img).contains(&101), "the source holds the write lock");

    let mut s = frontend(&src_sock);
    write(&mut s, 0, 0xa1);
    write(&mut s, 8, 0xa2);
    // The destination's device starts too early: it may not write while
    // the source does. Its request waits on the ring, not failed.
    let mut d = None;
    if early {
        let mut fe = frontend(&dst_sock);
        let head = fe.submit(0, 0, 0, &[0u8; 4096], true).expect("submit");
        assert_eq!(
            fe.wait_used(0, Duration::from_secs(4)),
            None,
            "no request served beside an active source"
        );
        assert_eq!(migration_of(&dst, "disk"), "incoming");
        d = Some((fe, head));
    }
    write(&mut s, 16, 0xa3);

    if paused {
        s.stop_queue(0).expect("GET_VRING_BASE");
        assert_eq!(migration_of(&src, "disk"), "active", "a pause keeps the image");
        assert!(
            locks(&img).contains(&101),
            "the source keeps the write lock while paused"
        );
        drop(s);
        wait_until("the source hands the image over when its frontend leaves", || {
            migration_of(&src, "disk") == "inactive"
        });
    } else {
        stop_for_migration(&mut s);
        drop(s);
    }
    assert_eq!(migration_of(&src, "disk"), "inactive");
    let mut d = match d {
        Some((mut fe, head)) => {
            assert_eq!(
                fe.wait_used(0, T).map(|u| u.0),
                Some(head),
                "the early request completes on activation"
            );
            fe
        }
        None => {
            assert_eq!(
                locks(&img),
                vec![100],
                "both sides hold only the read lock between the two"
            );
            if qcow2 {
                assert!(!dirty_flag(&img), "the source closed the image clean");
                assert_clean(&img);
            }
            assert_eq!(migration_of(&dst, "disk"), "incoming");
            frontend(&dst_sock)
        }
    };
    assert_reads(&mut d, 0, 0xa1);
    assert_eq!(migration_of(&dst, "disk"), "active");
    assert_reads(&mut d, 8, 0xa2);
    assert_reads(&mut d, 16, 0xa3);
    write(&mut d, 24, 0xb1);
    assert!(locks(&img).contains(&101), "the destination holds the write lock");
    drop(d);
    assert!(src.stop().success());
    assert!(dst.stop().success());
    if qcow2 {
        assert_clean(&img);
    }
    let raw = at(&dir, "check.raw");
    ok("qemu-img", &["convert", "-O", "raw", p(&img), p(&raw)]);
    let data = std::fs::read(&raw).unwrap();
    assert!(
        data[24 * 512..24 * 512 + 4096] == pattern(0xb1)[..],
        "the destination's write is in the image"
    );
}

#[test]
fn two_daemons_raw() {
    two_daemons(false, false, false);
}

#[test]
fn two_daemons_paused_guest_hands_over_when_the_source_frontend_leaves() {
    two_daemons(true, true, true);
}

#[test]
fn two_daemons_qcow2() {
    two_daemons(true, false, false);
}

#[test]
fn two_daemons_qcow2_destination_started_early() {
    two_daemons(true, true, false);
}

/// Two daemons, the destination's device started while the source still
/// holds the write lock: its request waits on the ring, and its I/O thread
/// is not stuck trying to open the image meanwhile (`GET_VRING_BASE`
/// answers at once and leaves the request on the ring; the ring starts
/// again). Once the source handed the image over, the request is served
/// within moments, with no second kick: the destination kept trying to
/// open the image in the background.
#[test]
fn two_daemons_early_destination_waits_responsive_and_is_served_without_a_kick() {
    need("qemu-img");
    let dir = scratch();
    let img = image(&dir, true);
    let (src_sock, dst_sock) = (at(&dir, "src.sock"), at(&dir, "dst.sock"));
    let dst = serve(&dir, &img, &dst_sock, true);
    let src = serve(&dir, &img, &src_sock, false);
    let mut s = frontend(&src_sock);
    write(&mut s, 0, 0xf1);
    let mut d = frontend(&dst_sock);
    // A write (VIRTIO_BLK_T_OUT) the destination may not serve yet.
    let head = d.submit(0, 1, 8, &pattern(0xf2), false).expect("submit");
    assert_eq!(d.wait_used(0, Duration::from_secs(1)), None, "not beside the source");
    let t = Instant::now();
    let base = d.stop_queue(0).expect("GET_VRING_BASE");
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "GET_VRING_BASE of a waiting ring answers at once, took {took:?}"
    );
    assert_eq!(base, 0, "the waiting request is still on the ring");
    d.resume_queue(0, base).expect("start the ring again");
    assert_eq!(d.wait_used(0, Duration::from_secs(1)), None, "still waiting");
    assert_eq!(migration_of(&dst, "disk"), "incoming");
    write(&mut s, 16, 0xf3);
    // Answered once the image is closed and the write lock released.
    stop_for_migration(&mut s);
    let t = Instant::now();
    assert_eq!(d.wait_used(0, T).map(|u| u.0), Some(head), "served, no kick needed");
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "served within moments of the handover, took {took:?}"
    );
    assert_eq!(migration_of(&dst, "disk"), "active");
    assert_reads(&mut d, 0, 0xf1);
    assert_reads(&mut d, 8, 0xf2);
    assert_reads(&mut d, 16, 0xf3);
    drop((s, d));
    assert!(src.stop().success());
    assert!(dst.stop().success());
    assert_clean(&img);
}

/// A migration cancelled after the source's device stopped: the source's
/// device starts again and the source re-opens its image, takes the write
/// lock again and carries on; a request made right after the restart
/// completes.
#[test]
fn cancelled_migration_reactivates_the_source() {
    need("qemu-img");
    let dir = scratch();
    let img = image(&dir, true);
    let sock = at(&dir, "src.sock");
    let src = Serve::start(
        dir.path(),
        &[p(&img), "--vhost-user", p(&sock), "--control", "src.ctl"],
        &[&sock],
    );
    let mut s = Driver::connect(&sock, 16, Duration::from_secs(120)).expect("connect");
    s.setup(2, 64).expect("set up queues 0 and 1");
    write(&mut s, 0, 0xc1);
    assert_eq!(s.write(1, 64, &pattern(0xc3), T), Some(0), "write through queue 1");
    // The device stops only when its last running ring stops.
    s.set_log_all(true).expect("ack LOG_ALL");
    let base1 = s.stop_queue(1).expect("GET_VRING_BASE 1");
    assert_eq!(migration_of(&src, "disk"), "active", "one ring still runs");
    let base0 = s.stop_queue(0).expect("GET_VRING_BASE 0");
    assert_eq!(migration_of(&src, "disk"), "inactive");
    assert!(!locks(&img).contains(&101), "no write lock while inactive");
    assert!(!dirty_flag(&img));
    let r = src.ctl(&json!({"cmd": "resize", "name": "disk", "size": "128M"}));
    let e = r["error"].as_str().unwrap_or_default();
    assert!(
        e.contains("inactive (live migration)"),
        "no resize of a closed image: {r}"
    );
    // Meanwhile another writer changes the image (as a destination that
    // ran for a moment would): the source must not trust its old metadata.
    common::qemu_io(&img, &["write -P 0x5a 1M 64k"]);
    // A request the driver made while the device was stopped waits on
    // the ring and is taken once the device starts again.
    let waiting = s.submit(0, 1, 8, &pattern(0xc2), false).expect("submit");
    assert_eq!(
        s.wait_used(0, Duration::from_millis(300)),
        None,
        "nothing served while stopped"
    );
    s.set_log_all(false).expect("clear LOG_ALL");
    s.resume_queue(0, base0).expect("start queue 0 again");
    s.resume_queue(1, base1).expect("start queue 1 again");
    assert_eq!(
        s.wait_used(0, T).map(|u| u.0),
        Some(waiting),
        "the waiting write completes"
    );
    assert_eq!(migration_of(&src, "disk"), "active");
    assert!(locks(&img).contains(&101), "the write lock is back");
    assert_reads(&mut s, 0, 0xc1);
    assert_reads(&mut s, 8, 0xc2);
    assert_reads(&mut s, 64, 0xc3);
    let (st, data) = s.read(0, 2048, 4096, T).expect("read");
    assert!(
        st == 0 && data.iter().all(|&b| b == 0x5a),
        "metadata re-read on activation"
    );
    // A plain stop (no dirty logging: a guest pause) keeps the image.
    s.stop_queue(0).expect("GET_VRING_BASE");
    assert_eq!(migration_of(&src, "disk"), "active");
    assert!(locks(&img).contains(&101));
    drop(s);
    assert!(src.stop().success());
    assert_clean(&img);
}

/// Same daemon: a second export of a served image must be `--incoming`
/// (`spindle ctl add`); it shares the open image, so the handover needs no
/// reopen; `ctl list` shows which export is active.
#[test]
fn same_daemon_incoming_export_shares_the_image() {
    need("qemu-img");
    let dir = scratch();
    let img = image(&dir, true);
    let (a, b) = (at(&dir, "a.sock"), at(&dir, "b.sock"));
    let srv = Serve::start(
        dir.path(),
        &[p(&img), "--name", "src", "--vhost-user", p(&a), "--control", "c.ctl"],
        &[&a],
    );
    let ctl = at(&dir, "c.ctl");
    let add = |extra: &[&str]| {
        let mut args = vec![
            "ctl",
            "-c",
            p(&ctl),
            "add",
            "--name",
            "dst",
            p(&img),
            "--vhost-user",
            p(&b),
        ];
        args.extend_from_slice(extra);
        run("spindle", &args)
    };
    let refused = add(&[]);
    assert!(!refused.status.success(), "a second non-incoming export is refused");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("already served by export 'src'") && err.contains("--incoming"),
        "the refusal names the export and the way out: {err}"
    );
    let added = add(&["--incoming"]);
    assert!(
        added.status.success(),
        "ctl add --incoming: {}",
        String::from_utf8_lossy(&added.stderr)
    );
    assert_eq!(migration_of(&srv, "src"), "active");
    assert_eq!(migration_of(&srv, "dst"), "incoming");
    wait_until("the destination socket", || b.exists());

    let mut s = frontend(&a);
    write(&mut s, 0, 0xd1);
    stop_for_migration(&mut s);
    assert_eq!(migration_of(&srv, "src"), "inactive");
    assert!(locks(&img).contains(&101), "a shared image stays open");
    let mut d = frontend(&b);
    assert_reads(&mut d, 0, 0xd1);
    write(&mut d, 8, 0xd2);
    assert_eq!(migration_of(&srv, "dst"), "active");
    // A cancel: the source's device starts again, and carries on.
    drop(d);
    restart(&mut s);
    assert_reads(&mut s, 8, 0xd2);
    assert_eq!(migration_of(&srv, "src"), "active");
    // The destination goes; the source's image stays open.
    let r = srv.ctl(&json!({"cmd": "remove", "name": "dst"}));
    assert_eq!(r["ok"], true, "{r}");
    write(&mut s, 16, 0xd3);
    assert_reads(&mut s, 16, 0xd3);
    drop(s);
    assert!(srv.stop().success());
    assert_clean(&img);
}

/// `incoming = true` in a config file: the export starts incoming, holding
/// only the shared lock.
#[test]
fn config_key_incoming() {
    need("qemu-img");
    let dir = scratch();
    let img = image(&dir, true);
    let sock = at(&dir, "in.sock");
    let cfg = at(&dir, "spindle.toml");
    std::fs::write(
        &cfg,
        format!(
            "control = \"{}\"\n[[export]]\nname = \"vm\"\nimage = \"{}\"\nsocket = \"{}\"\nincoming = true\n",
            p(&at(&dir, "c.ctl")),
            p(&img),
            p(&sock)
        ),
    )
    .unwrap();
    let mut s = Serve::start(dir.path(), &["--config", p(&cfg)], &[&sock]);
    s.use_control(&at(&dir, "c.ctl"));
    assert_eq!(migration_of(&s, "vm"), "incoming");
    assert_eq!(locks(&img), vec![100]);
    let mut d = frontend(&sock);
    write(&mut d, 0, 0xe1);
    assert_eq!(migration_of(&s, "vm"), "active");
    drop(d);
    assert!(s.stop().success());
    assert_clean(&img);
}

/// A scratch directory and a qcow2 image, for servers that hand over
/// (whose new processes this one adopts).
fn handover_scratch() -> (tempfile::TempDir, std::path::PathBuf) {
    need("qemu-img");
    common::handover::become_subreaper();
    let dir = scratch();
    let img = image(&dir, true);
    (dir, img)
}

/// A planned handover (SIGUSR2) keeps each export's migration state. Two
/// daemons: the destination, handed over while incoming, stays incoming;
/// the source, handed over after it handed its image to the destination,
/// stays inactive in its new process (only the shared lock, the image
/// not taken back), and the destination activates and takes the image.
#[test]
fn a_handover_keeps_incoming_and_inactive_exports_off_the_image() {
    use common::handover::Spindle;
    let (dir, img) = handover_scratch();
    let (src_sock, dst_sock) = (at(&dir, "src.sock"), at(&dir, "dst.sock"));
    let (src_ctl, dst_ctl) = (at(&dir, "src.ctl"), at(&dir, "dst.ctl"));
    let mut dst = Spindle::First(serve(&dir, &img, &dst_sock, true));
    dst.hand_over(Duration::from_secs(60));
    assert_eq!(migration_at(&dst_ctl, "disk"), "incoming", "{}", dst.log_text());
    assert_eq!(locks(&img), vec![100]);
    let mut src = Spindle::First(Serve::start(
        dir.path(),
        &[p(&img), "--vhost-user", p(&src_sock), "--control", p(&src_ctl)],
        &[&src_sock],
    ));
    let mut s = frontend(&src_sock);
    write(&mut s, 0, 0xf1);
    stop_for_migration(&mut s);
    drop(s);
    assert_eq!(migration_at(&src_ctl, "disk"), "inactive");
    assert_eq!(locks(&img), vec![100]);

    src.hand_over(Duration::from_secs(60));
    let log = src.log_text();
    assert_eq!(migration_at(&src_ctl, "disk"), "inactive", "{log}");
    assert_eq!(locks(&img), vec![100], "the new source process took the image:\n{log}");
    let mut d = frontend(&dst_sock);
    assert_reads(&mut d, 0, 0xf1);
    write(&mut d, 8, 0xf2);
    assert_eq!(migration_at(&dst_ctl, "disk"), "active");
    assert_eq!(migration_at(&src_ctl, "disk"), "inactive");
    drop(d);
    assert!(src.stop(), "{}", src.log_text());
    assert!(dst.stop(), "{}", dst.log_text());
    assert_clean(&img);
}

/// Same daemon: a handover with a source and an incoming destination of
/// one image (whatever their names' order) hands both over, each in its
/// state, before and after the migration.
#[test]
fn a_handover_keeps_a_same_daemon_migration_as_it_is() {
    use common::handover::Spindle;
    let (dir, img) = handover_scratch();
    let (a, b, ctl) = (at(&dir, "a.sock"), at(&dir, "b.sock"), at(&dir, "c.ctl"));
    // "dst" sorts before "src".
    let mut srv = Spindle::First(Serve::start(
        dir.path(),
        &[p(&img), "--name", "src", "--vhost-user", p(&a), "--control", p(&ctl)],
        &[&a],
    ));
    let add = json!({"cmd": "add", "export": {"name": "dst", "image": p(&img), "socket": p(&b), "incoming": true}});
    let r = common::serve::ctl_at(&ctl, &add);
    assert_eq!(r["ok"], true, "{r}");
    srv.hand_over(Duration::from_secs(60));
    let states = || (migration_at(&ctl, "src"), migration_at(&ctl, "dst"));
    assert_eq!(states(), ("active".into(), "incoming".into()), "{}", srv.log_text());
    let mut s = frontend(&a);
    write(&mut s, 0, 0xf3);
    stop_for_migration(&mut s);
    let mut d = frontend(&b);
    assert_reads(&mut d, 0, 0xf3);
    assert_eq!(states(), ("inactive".into(), "active".into()));
    drop((s, d));
    srv.hand_over(Duration::from_secs(60));
    assert_eq!(states(), ("inactive".into(), "active".into()), "{}", srv.log_text());
    let mut d = frontend(&b);
    assert_reads(&mut d, 0, 0xf3);
    write(&mut d, 8, 0xf4);
    drop(d);
    assert!(srv.stop(), "{}", srv.log_text());
    assert_clean(&img);
}

/// A device stopped again and again on one connection (a guest paused and
/// resumed, then migrated), its image on an NBD server: every stop flushes
/// the image from the connection's thread and must be answered. (Each
/// stop's flush once ran on a runtime of its own; the connection to the
/// NBD server that the first stop's made belonged to that runtime, so the
/// second stop waited for ever. rbd_migration.rs has the RBD case.)
#[test]
fn every_stop_of_a_device_on_nbd_storage_is_answered() {
    let d = scratch();
    let img = at(&d, "nbd.raw");
    std::fs::File::create(&img).unwrap().set_len(16 << 20).unwrap();
    let nbd = common::nbd::NbdServer::start(&["-t", "-p", "0", "-x", "disk", "-f", "raw", p(&img)]);
    let sock = at(&d, "disk.sock");
    let srv = Serve::start(
        d.path(),
        &[&nbd.uri, "--format", "raw", "--vhost-user", p(&sock)],
        &[&sock],
    );
    let mut fe = frontend(&sock);
    let mut base = 0;
    for round in 0..4u8 {
        if round > 0 {
            fe.resume_queue(0, base).expect("start the ring again");
        }
        let st = fe.write(0, u64::from(round) * 8, &pattern(round), T);
        assert_eq!(st, Some(0), "round {round}: the write failed:\n{}", srv.log_text());
        base = fe
            .stop_queue(0)
            .unwrap_or_else(|e| panic!("round {round}: GET_VRING_BASE: {e}\n{}", srv.log_text()));
    }
    drop(fe);
    let st = srv.stop();
    assert!(st.success(), "spindle serve exited with {st}");
    assert!(nbd.stop(), "spindle nbd failed");
    let data = std::fs::read(&img).unwrap();
    for round in 0..4u8 {
        let at = usize::from(round) * 4096;
        assert_eq!(
            data[at..at + 4096],
            pattern(round),
            "round {round}: its write is not on the image"
        );
    }
}
