//! Live migration of a guest whose disks Spindle serves. A TCG guest runs
//! gio (tests/guest/gio.c) on three disks, raw, qcow2 and qcow2 over a raw
//! backing file: O_DIRECT writers that write and verify generations of
//! block patterns, small readers racing them, and holders that read heavily
//! into buffers kept in guest memory with their checksums. The guest
//! migrates over a unix socket to a second QEMU started with `-incoming`
//! whose disks are (a) second exports of the same images in the same
//! daemon (`ctl add ... incoming`), (b) exports of another `spindle serve`
//! whose exports are `incoming = true`. On the destination gio re-checks
//! the held buffers, keeps going, and must finish with no I/O error and no
//! wrong data; the images are then clean and hold what gio wrote last.
//! (c) A migration cancelled after the source's devices stopped leaves the
//! guest running on the source with nothing lost. (d) Two exports of one
//! image in one daemon never both serve: an incoming export whose device
//! starts while the source's guest runs waits until the source's device
//! stops, and the other way round.
//!
//! The source is paused right after the migration's setup (dirty logging is
//! on, so Spindle sees a migration stop): a busy TCG guest that keeps
//! running through the RAM copy gets its memory corrupted by QEMU 7.2
//! whatever its disk is (see common/migrate.rs).

mod common;

use common::gio::{self, Layout};
use common::migrate::{self, Mode, SMP};
use common::serve::{config_text, Serve};
use common::vm::{self, Vm};
use common::{assert_clean, ok, p, scratch};
use serde_json::{json, Value};
use spindle_vhost::fuzzing::driver::Driver;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const LAYOUT: Layout = Layout {
    writers: 3,
    region_mib: 2,
    hold_mib: 8,
};
const DISK: u64 = 64 << 20;
const MINUTE: Duration = Duration::from_secs(60);

/// One disk of the guest: its device name, export name and image.
struct Disk {
    dev: &'static str,
    name: &'static str,
    image: PathBuf,
    qcow2: bool,
    more: &'static str,
}

/// raw, qcow2, qcow2 over a raw backing file; every layout block holds
/// generation 1 (the overlay's through its backing file).
fn images(dir: &Path) -> Vec<Disk> {
    let raw = dir.join("raw.img");
    LAYOUT.prefill(&raw, DISK, 1);
    let pre = dir.join("pre.raw");
    LAYOUT.prefill(&pre, DISK, 1);
    let q = dir.join("q.qcow2");
    ok("qemu-img", &["convert", "-f", "raw", "-O", "qcow2", p(&pre), p(&q)]);
    let base = dir.join("base.raw");
    std::fs::rename(&pre, &base).unwrap();
    let over = dir.join("over.qcow2");
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-F", "raw", "-b", p(&base), p(&over)],
    );
    vec![
        Disk {
            dev: "vda",
            name: "raw",
            image: raw,
            qcow2: false,
            more: "format = \"raw\"\n",
        },
        Disk {
            dev: "vdb",
            name: "q",
            image: q,
            qcow2: true,
            more: "",
        },
        Disk {
            dev: "vdc",
            name: "over",
            image: over,
            qcow2: true,
            more: "",
        },
    ]
}

fn sock(dir: &Path, name: &str, side: &str) -> PathBuf {
    dir.join(format!("{name}-{side}.sock"))
}

/// `spindle serve` of `disks` on sockets `*-SIDE.sock`, with a control
/// socket and the serve options `args`.
fn serve(dir: &Path, disks: &[Disk], side: &str, more: &str, args: &[&str]) -> Serve {
    let ctl = dir.join(format!("ctl-{side}.sock"));
    let socks: Vec<PathBuf> = disks.iter().map(|d| sock(dir, d.name, side)).collect();
    let extra: Vec<String> = disks.iter().map(|d| format!("{}{more}", d.more)).collect();
    let exports: Vec<(&str, &Path, &Path, &str)> = disks
        .iter()
        .zip(&socks)
        .zip(&extra)
        .map(|((d, s), e)| (d.name, d.image.as_path(), s.as_path(), e.as_str()))
        .collect();
    let config = dir.join(format!("spindle-{side}.toml"));
    std::fs::write(&config, config_text(Some(&ctl), &exports)).unwrap();
    let refs: Vec<&Path> = socks.iter().map(|s| s.as_path()).collect();
    let mut all = vec!["--config", p(&config)];
    all.extend_from_slice(args);
    let mut s = Serve::start(dir, &all, &refs);
    s.use_control(&ctl);
    s
}

/// Each export's `migration` state, from `ctl list`.
fn migration_states(s: &Serve) -> Vec<(String, String)> {
    let r = s.ctl(&json!({"cmd": "list"}));
    let list = r["exports"]
        .as_array()
        .or_else(|| r.as_array())
        .unwrap_or_else(|| panic!("ctl list: {r}"))
        .clone();
    list.iter()
        .map(|e: &Value| {
            (
                e["name"].as_str().unwrap_or("?").to_string(),
                e["migration"].as_str().unwrap_or("(none)").to_string(),
            )
        })
        .collect()
}

fn assert_states(s: &Serve, want: &[(&str, &str)], when: &str) {
    let got = migration_states(s);
    for (name, state) in want {
        assert!(
            got.iter().any(|(n, m)| n == name && m == state),
            "{when}: export {name} should be {state}: ctl list says {got:?}\n{}",
            s.log_text()
        );
    }
}

/// gio on every disk: writers, small readers, and holders with a 16 MiB
/// pool per disk.
fn initrd(dir: &Path, disks: &[Disk]) -> PathBuf {
    let devs: Vec<String> = disks.iter().map(|d| format!("/dev/{}", d.dev)).collect();
    let script = format!(
        "exec /gio {} --readers 1 --hold-threads 2 --pool-mib 16 --base-gen 1 {}\n",
        LAYOUT.args(),
        devs.join(" ")
    );
    vm::initrd(dir, &script, true)
}

/// Boots the guest on the `src` sockets and lets gio run a few seconds.
fn boot(dir: &Path, disks: &[Disk], name: &str, incoming: Option<&str>, side: &str) -> Vm {
    let socks: Vec<PathBuf> = disks.iter().map(|d| sock(dir, d.name, side)).collect();
    let list: Vec<(&Path, u16)> = socks.iter().map(|s| (s.as_path(), 1)).collect();
    let rd = dir.join("initrd.gz");
    let rd = if rd.exists() { rd } else { initrd(dir, disks) };
    Vm::start_smp(dir, name, &rd, &list, incoming, SMP)
}

fn settle(vm: &Vm, seconds: usize) {
    for _ in 0..seconds {
        let mark = vm.mark();
        vm.wait_line(mark, "GIO-PROGRESS", MINUTE);
    }
}

/// gio stops on `vm`; `console` is everything the guest printed (on every
/// QEMU it ran on). Then the daemons stop and the images must be clean and
/// hold each writer's last, fsynced generation.
fn finish(
    mut vm: Vm,
    before: &str,
    daemons: Vec<Serve>,
    disks: &[Disk],
    dir: &Path,
) -> std::collections::HashMap<String, u64> {
    vm.send("S");
    vm.wait_exit(Duration::from_secs(180));
    let console = format!("{before}\n{}", vm.console());
    println!("{console}");
    let summary = gio::assert_clean(&console);
    for s in daemons {
        let log = s.log_text();
        let st = s.stop();
        assert!(st.success(), "spindle serve exited with {st}:\n{log}");
    }
    let finals = gio::finals(&console);
    for d in disks {
        if d.qcow2 {
            assert_clean(&d.image);
        }
        let last = &finals[d.dev];
        let bad = LAYOUT.check(&LAYOUT.read(&d.image, dir), 1, |w, g| {
            let (gen, synced) = last[w as usize];
            synced && g == gen
        });
        assert!(
            bad.is_empty(),
            "{}: the image differs from what gio wrote last: {bad:#?}",
            d.dev
        );
    }
    assert!(summary["held_checks"] > 0, "the holders checked nothing: {summary:?}");
    summary
}

/// The images, their source daemon and the guest booted on it, with gio
/// running for a few seconds.
fn start_source(dir: &Path, args: &[&str]) -> (Vec<Disk>, Serve, Vm) {
    let disks = images(dir);
    let src_d = serve(dir, &disks, "src", "", args);
    let src = boot(dir, &disks, "src", None, "src");
    src.wait_line(0, "GIO-RUNNING", Duration::from_secs(120));
    settle(&src, 3);
    (disks, src_d, src)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Dest {
    /// Second exports in the source's daemon (`ctl add` with `incoming`).
    SameDaemon,
    /// Another `spindle serve` whose exports are `incoming = true`.
    OtherDaemon,
}

fn migrate_under_load(dest: Dest) {
    let _one = vm::one_at_a_time();
    let d = scratch();
    let dir = d.path();
    // To another daemon, every third read of the source waits 2 s (the
    // test-only delay): the reads in flight when the source's devices
    // stop complete after QEMU's first pass over guest RAM, into pages it
    // has already sent. Only Spindle's dirty log makes QEMU send them again,
    // so the guest's checks of that data fail without it.
    let late_reads: &[&str] = match dest {
        Dest::OtherDaemon => &["--x-delay-io", "read:3:2000"],
        Dest::SameDaemon => &[],
    };
    let (disks, src_d, mut src) = start_source(dir, late_reads);

    let mut daemons = vec![];
    match dest {
        Dest::SameDaemon => {
            for x in &disks {
                let s = sock(dir, x.name, "dst");
                let mut e =
                    json!({"name": format!("{}-in", x.name), "image": p(&x.image), "socket": p(&s), "incoming": true});
                if !x.qcow2 {
                    e["format"] = json!("raw");
                }
                let r = src_d.ctl(&json!({"cmd": "add", "export": e}));
                assert!(r.get("error").is_none(), "ctl add {e}: {r}");
            }
        }
        Dest::OtherDaemon => daemons.push(serve(dir, &disks, "dst", "incoming = true\n", &[])),
    }
    let uri = migrate::uri(dir, 1);
    let mut dst = boot(dir, &disks, "dst", Some(&uri), "dst");
    let dst_d = daemons.first().unwrap_or(&src_d);
    let in_names: Vec<String> = disks
        .iter()
        .map(|x| {
            if dest == Dest::SameDaemon {
                format!("{}-in", x.name)
            } else {
                x.name.to_string()
            }
        })
        .collect();
    let incoming: Vec<(&str, &str)> = in_names.iter().map(|n| (n.as_str(), "incoming")).collect();
    assert_states(dst_d, &incoming, "before the migration");

    let inflight = migrate::announce(&mut src, 1);
    let fig = migrate::migrate(&mut src, &mut dst, &uri, Mode::PauseAfterSetup);
    migrate::quit(&mut src);
    let checked = migrate::resumed(&mut dst, 1, true, &format!("after migrating to {dest:?}"));
    println!(
        "{dest:?}: {inflight} guest I/Os in progress at the start, migration {} ms, downtime {} ms, {checked} held buffers intact",
        fig.total_ms, fig.downtime_ms
    );
    let active: Vec<(&str, &str)> = in_names.iter().map(|n| (n.as_str(), "active")).collect();
    assert_states(dst_d, &active, "after the migration");
    let gone: Vec<(&str, &str)> = disks.iter().map(|x| (x.name, "inactive")).collect();
    assert_states(&src_d, &gone, "the source after the migration");
    settle(&dst, 2);
    let before = src.console();
    drop(src);
    daemons.insert(0, src_d);
    finish(dst, &before, daemons, &disks, dir);
}

#[test]
fn guest_under_load_migrates_to_a_second_export_in_the_same_daemon() {
    migrate_under_load(Dest::SameDaemon);
}

#[test]
fn guest_under_load_migrates_to_another_spindle_serve() {
    migrate_under_load(Dest::OtherDaemon);
}

/// A destination killed during the RAM copy, then a migration cancelled
/// after the source stopped its devices (`pause-before-switchover`): each
/// time the guest carries on on the source with no error.
#[test]
fn guest_carries_on_on_the_source_after_failed_and_cancelled_migrations() {
    let _one = vm::one_at_a_time();
    let d = scratch();
    let dir = d.path();
    let (disks, src_d, mut src) = start_source(dir, &[]);
    let dst_d = serve(dir, &disks, "dst", "incoming = true\n", &[]);

    // 1: the destination dies while RAM is being copied.
    let uri = migrate::uri(dir, 1);
    let mut dst = boot(dir, &disks, "dst1", Some(&uri), "dst");
    migrate::set_bandwidth(&mut src, 64 << 20);
    migrate::start(&mut src, &uri);
    migrate::wait(&mut src, &dst, &["active"], MINUTE);
    std::thread::sleep(Duration::from_millis(500));
    dst.kill();
    let st = migrate::wait(&mut src, &dst, &["failed"], MINUTE);
    println!("migration 1 after killing the destination: {st}");
    src.wait_running(MINUTE);
    migrate::resumed(&mut src, 1, true, "after the destination died");
    drop(dst);

    // 2: cancelled after the source's devices stopped.
    let uri = migrate::uri(dir, 2);
    let mut dst = boot(dir, &disks, "dst2", Some(&uri), "dst");
    migrate::set_caps(&mut src, &["pause-before-switchover"]);
    migrate::set_bandwidth(&mut src, 100_000_000_000);
    migrate::announce(&mut src, 2);
    migrate::start(&mut src, &uri);
    migrate::wait(&mut src, &dst, &["pre-switchover"], Duration::from_secs(180));
    let paused = src.qmp.execute("query-status", json!({}));
    assert_eq!(
        paused["running"], false,
        "pre-switchover with the source running: {paused}"
    );
    let gone: Vec<(&str, &str)> = disks.iter().map(|x| (x.name, "inactive")).collect();
    assert_states(&src_d, &gone, "the source stopped for the switch-over");
    src.qmp.execute("migrate_cancel", json!({}));
    migrate::wait(&mut src, &dst, &["cancelled"], MINUTE);
    src.wait_running(MINUTE);
    dst.kill();
    migrate::resumed(&mut src, 2, true, "after the cancelled migration");
    let back: Vec<(&str, &str)> = disks.iter().map(|x| (x.name, "active")).collect();
    assert_states(&src_d, &back, "the source after the cancelled migration");
    settle(&src, 2);
    drop(dst);
    finish(src, "", vec![src_d, dst_d], &disks, dir);
}

/// Whether the guest printed `pat` on a console line from index `from` on.
fn printed(vm: &Vm, from: usize, pat: &str) -> bool {
    vm.console().lines().skip(from).any(|l| l.contains(pat))
}

/// Same daemon, a guest writing to the source export: an incoming export
/// of the image whose device starts meanwhile (here a vhost-user frontend
/// in the test, as a destination QEMU started too early would) has its
/// write wait on the ring, with nothing of it in the image, while the
/// guest's writes go on. When the source QEMU stops its device (`stop`),
/// the write is served. The source's device, started again (`cont`), then
/// waits in turn until the destination's frontend goes away.
#[test]
fn same_daemon_incoming_export_waits_while_the_source_runs() {
    let _one = vm::one_at_a_time();
    let d = scratch();
    let dir = d.path();
    let img = dir.join("disk.raw");
    std::fs::File::create(&img).unwrap().set_len(DISK).unwrap();
    let (a, b, ctl) = (dir.join("src.sock"), dir.join("dst.sock"), dir.join("c.ctl"));
    let mut srv = Serve::start(
        dir,
        &[
            p(&img),
            "--format",
            "raw",
            "--name",
            "src",
            "--vhost-user",
            p(&a),
            "--control",
            p(&ctl),
        ],
        &[&a],
    );
    srv.use_control(&ctl);
    let script = "i=0\nwhile :; do\n  dd if=/dev/urandom of=/dev/vda bs=4k count=1 seek=$((i % 64)) oflag=direct 2>/dev/null || echo GUARD-IOERR\n  i=$((i + 1))\n  [ $((i % 10)) = 0 ] && echo \"GUARD-W $i\"\ndone\n";
    let rd = vm::initrd(dir, script, false);
    let mut src = Vm::start(dir, "src", &rd, &[(&a, 1)], None);
    src.wait_line(0, "GUARD-W", Duration::from_secs(120));

    let e = json!({"name": "dst", "image": p(&img), "format": "raw", "socket": p(&b), "incoming": true});
    let r = srv.ctl(&json!({"cmd": "add", "export": e}));
    assert!(r.get("error").is_none(), "ctl add {e}: {r}");
    let start = Instant::now();
    while !b.exists() {
        assert!(start.elapsed() < MINUTE, "the destination socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut fe = Driver::connect(&b, 16, Duration::from_secs(300)).expect("connect");
    fe.setup(1, 64).expect("set up queue 0");
    let at = 1 << 20;
    let data = vec![0x77u8; 4096];
    // VIRTIO_BLK_T_OUT at 1 MiB, past what the guest writes.
    let head = fe.submit(0, 1, at / 512, &data, false).expect("submit");
    let mark = src.mark();
    assert_eq!(
        fe.wait_used(0, Duration::from_secs(3)),
        None,
        "the incoming export served beside the running source"
    );
    src.wait_line(mark, "GUARD-W", MINUTE);
    assert_states(&srv, &[("src", "active"), ("dst", "incoming")], "the source runs");
    let on_disk = |len| std::fs::read(&img).unwrap()[at as usize..at as usize + len].to_vec();
    assert_eq!(
        on_disk(4096),
        vec![0; 4096],
        "nothing of the destination reached the image"
    );

    // The source's device stops: the destination's write goes through.
    src.qmp.execute("stop", json!({}));
    assert_eq!(
        fe.wait_used(0, MINUTE).map(|u| u.0),
        Some(head),
        "served once the source stopped"
    );
    assert_eq!(on_disk(4096), data, "the destination's write is in the image");
    assert_states(&srv, &[("dst", "active")], "the destination served");

    // The source's device starts again: now it waits for the destination.
    src.qmp.execute("cont", json!({}));
    std::thread::sleep(Duration::from_millis(500));
    let mark = src.mark();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !printed(&src, mark, "GUARD-W"),
        "the source wrote beside the running destination:\n{}",
        src.console()
    );
    drop(fe);
    src.wait_line(mark, "GUARD-W", MINUTE);
    assert!(!printed(&src, 0, "GUARD-IOERR"), "{}", src.console());
    src.qmp.send_quit();
    src.wait_exit(MINUTE);
    let st = srv.stop();
    assert!(st.success(), "spindle serve exited with {st}");
}
