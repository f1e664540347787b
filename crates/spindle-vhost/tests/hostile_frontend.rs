//! A frontend that breaks its rings (issue 10, item 6), against the real
//! backend over a socket: an available index far past the queue size,
//! queue sizes that are not powers of two or too big, RESET_DEVICE then a
//! new setup, rings outside guest memory. Each time the export must log a
//! handful of lines at most, its I/O thread must go idle, and it must
//! serve a correct read/write round trip again once the frontend resets
//! the device or reconnects.

use spindle_vhost::fuzzing::driver::{ring_base, Driver, Ring, MEM_SIZE};
use spindle_vhost::Export;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;

const T: Duration = Duration::from_secs(10);
/// The longest a test's frontend connection lives (then it fails).
const LIFETIME: Duration = Duration::from_secs(60);
const MAX_QUEUE: u16 = 256;

mod common;
use common::{lines_since, log, mark, serial};

struct Server {
    export: Arc<Export>,
    thread: Option<std::thread::JoinHandle<Result<(), spindle_vhost::Error>>>,
    sock: PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start(name: &str) -> Server {
        log();
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let (export, sock, thread) = common::raw_export(dir.path(), name, &vec![0u8; 4 << 20], 2, MAX_QUEUE);
        let thread = Some(thread);
        Server {
            export,
            thread,
            sock,
            _dir: dir,
        }
    }

    fn connect(&self) -> Driver {
        Driver::connect(&self.sock, 2, LIFETIME).unwrap()
    }

    /// Waits for the export to hold a failure (a broken ring).
    fn wait_failure(&self) -> String {
        let start = Instant::now();
        loop {
            if let Some(f) = self.export.failure() {
                return f;
            }
            assert!(start.elapsed() < T, "the broken ring never stopped the device");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn stop(mut self) {
        self.export.stop();
        let t = self.thread.take().unwrap();
        let start = Instant::now();
        while !t.is_finished() {
            assert!(start.elapsed() < T, "the export did not stop");
            std::thread::sleep(Duration::from_millis(10));
        }
        t.join().unwrap().unwrap();
    }
}

/// CPU time (clock ticks) of the vhost-user I/O threads of this process.
fn io_thread_ticks() -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if &stat[open + 1..close] != "vring_worker" {
            continue;
        }
        // After the name: state (field 3) ... utime (14), stime (15).
        let f: Vec<&str> = stat[close + 2..].split(' ').collect();
        total += f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    }
    total
}

/// The I/O threads use less than 0.2 s of CPU in 1 s: they sleep, not spin.
fn assert_idle() {
    let before = io_thread_ticks();
    std::thread::sleep(Duration::from_secs(1));
    let used = io_thread_ticks() - before;
    eprintln!("I/O threads: {used} clock ticks of CPU in 1 s");
    assert!(used < 20, "the I/O threads used {used} ticks of CPU in 1 s: spinning");
}

/// A correct write then read back through queue `q`.
fn round_trip(d: &mut Driver, q: usize, sector: u64) {
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + sector as u32) as u8).collect();
    assert_eq!(d.write(q, sector, &data, T), Some(0), "write through queue {q}");
    let (status, back) = d.read(q, sector, data.len(), T).expect("read completes");
    assert_eq!(status, 0);
    assert_eq!(back, data, "read back through queue {q}");
}

/// At most `n` lines since `m`, one of them mentioning `what`.
fn assert_few_lines(m: usize, n: usize, what: &str) {
    let lines = lines_since(m);
    eprintln!("{} log lines:\n{}", lines.len(), lines.join("\n"));
    assert!(
        lines.len() <= n,
        "{} log lines, more than {n}:\n{}",
        lines.len(),
        lines[..lines.len().min(20)].join("\n")
    );
    assert!(
        lines.iter().any(|l| l.contains(what)),
        "no line about {what:?} in:\n{}",
        lines.join("\n")
    );
}

#[test]
fn an_avail_index_past_the_queue_size_stops_the_device_until_reset_or_reconnect() {
    let _s = serial();
    let srv = Server::start("avail");
    let mut d = srv.connect();
    d.setup(2, 64).unwrap();
    round_trip(&mut d, 0, 8);

    let m = mark();
    d.publish(0, 1000);
    let why = srv.wait_failure();
    assert!(why.contains("available index 1000"), "{why}");
    let err = &d.rings[0].as_ref().unwrap().err;
    assert_eq!(err.read().ok(), Some(1), "the ring's error eventfd is signalled once");
    assert_idle();
    // The device, not just the queue, is stopped: queue 1 is not served.
    d.submit(1, 0, 0, &[0u8; 512], true).unwrap();
    assert_eq!(d.wait_used(1, Duration::from_millis(300)), None);
    d.publish(0, 2000);
    assert_idle();
    assert_few_lines(
        m,
        3,
        "broken ring: available index 1000 is 998 entries past the next one (2) on a queue of 64",
    );

    // RESET_DEVICE and a new setup: served again, on both queues.
    d.fe.reset_device().unwrap();
    let features = d.fe.get_features().unwrap();
    d.fe.set_features(features).unwrap();
    d.setup_queue(0, 64).unwrap();
    d.setup_queue(1, 64).unwrap();
    assert_eq!(srv.export.failure(), None);
    round_trip(&mut d, 0, 16);
    round_trip(&mut d, 1, 24);

    // Broken again, then the frontend goes away: the next one is served.
    d.publish(1, 70);
    srv.wait_failure();
    drop(d);
    let mut d = srv.connect();
    d.setup(2, 64).unwrap();
    round_trip(&mut d, 1, 32);
    drop(d);
    srv.stop();
}

#[test]
fn queue_sizes_that_are_no_power_of_two_or_too_big_are_refused() {
    let _s = serial();
    let srv = Server::start("sizes");
    let m = mark();
    for size in [3, 65535, 32768, 0, 384] {
        let mut d = srv.connect();
        d.handshake().unwrap();
        assert!(d.fe.set_vring_num(0, size).is_err(), "queue size {size} accepted");
        // The refusal ended the connection; the next one is served.
        let mut d = srv.connect();
        d.setup(2, 128).unwrap();
        round_trip(&mut d, 1, 8);
    }
    assert_idle();
    assert!(lines_since(m).len() <= 40, "{}", lines_since(m).join("\n"));
    // vhost-user-backend logs each refusal itself (through `log`): the
    // library layer holds those to the same burst as the backend's lines.
    let m = mark();
    for _ in 0..25 {
        let mut d = srv.connect();
        d.handshake().unwrap();
        assert!(d.fe.set_vring_num(0, 0).is_err());
    }
    let lines = lines_since(m);
    let refusals = lines.iter().filter(|l| l.contains("requested queue size 0")).count();
    assert!(
        (1..=10).contains(&refusals),
        "{refusals} refusal lines:\n{}",
        lines.join("\n")
    );
    assert!(lines.len() <= 50, "{}", lines.join("\n"));

    // Size 1 is a power of two: one request at a time, in an indirect table.
    let mut d = srv.connect();
    d.setup(2, 1).unwrap();
    round_trip(&mut d, 0, 8);
    round_trip(&mut d, 0, 16);
    // A 1-entry queue with two chains published is broken; GET_VRING_BASE
    // (the frontend stopping the ring) and a new setup serve again.
    let m = mark();
    let next = d.rings[0].as_ref().unwrap().avail_idx.wrapping_add(2);
    d.publish(0, next);
    srv.wait_failure();
    assert_idle();
    assert_few_lines(m, 3, "on a queue of 1");
    d.fe.get_vring_base(0).unwrap();
    assert_eq!(srv.export.failure(), None);
    d.setup_queue(0, 1).unwrap();
    round_trip(&mut d, 0, 24);
    drop(d);
    srv.stop();
}

#[test]
fn reset_device_then_a_setup_without_base_starts_the_ring_at_zero() {
    let _s = serial();
    let srv = Server::start("reset");
    let mut d = srv.connect();
    d.setup(2, 64).unwrap();
    for k in 0..5 {
        round_trip(&mut d, 0, 8 * k);
    }
    d.fe.reset_device().unwrap();
    let features = d.fe.get_features().unwrap();
    d.fe.set_features(features).unwrap();
    // A fresh, zeroed ring; no SET_VRING_BASE: the ring starts at 0 after a
    // reset (the old one had reached 10).
    let ring = Ring::at(ring_base(0), 64).unwrap();
    let _ = vm_memory::Bytes::write_slice(&d.mem, &[0u8; 4096], vm_memory::GuestAddress(ring.desc));
    d.fe.set_vring_num(0, 64).unwrap();
    d.set_addr(0, &ring).unwrap();
    d.fe.set_vring_kick(0, &ring.kick).unwrap();
    d.fe.set_vring_call(0, &ring.call).unwrap();
    d.fe.set_vring_enable(0, true).unwrap();
    d.rings[0] = Some(ring);
    round_trip(&mut d, 0, 64);
    assert_eq!(srv.export.failure(), None);
    drop(d);
    srv.stop();
}

#[test]
fn rings_outside_guest_memory_are_refused_or_stop_the_device() {
    let _s = serial();
    let srv = Server::start("outside");
    let m = mark();
    // A ring past guest memory, and one whose descriptor table starts in
    // it and ends past it: both refused at SET_VRING_ADDR.
    for desc in [32 << 20, MEM_SIZE - 2048] {
        let mut d = srv.connect();
        d.handshake().unwrap();
        d.fe.set_vring_num(0, 256).unwrap();
        let mut ring = Ring::at(ring_base(0), 256).unwrap();
        ring.desc = desc;
        assert!(d.set_addr(0, &ring).is_err(), "descriptor table at {desc:#x} accepted");
    }
    // Guest memory shrinks under a ring that was fine: the next kick stops
    // the device; the memory coming back serves it again.
    let mut d = srv.connect();
    d.setup(2, 256).unwrap();
    round_trip(&mut d, 1, 8);
    d.set_mem_table_len(ring_base(1)).unwrap();
    d.submit(1, 0, 0, &[0u8; 512], true);
    let why = srv.wait_failure();
    assert!(why.contains("outside guest memory"), "{why}");
    assert_idle();
    d.set_mem_table().unwrap();
    d.kick(1);
    assert!(
        d.wait_used(1, T).is_some(),
        "the request published while broken is served"
    );
    round_trip(&mut d, 1, 16);
    round_trip(&mut d, 0, 24);
    assert!(lines_since(m).len() <= 20, "{}", lines_since(m).join("\n"));
    drop(d);
    srv.stop();
}

/// Open file descriptors of this process.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// The fuzzer's finding: each connection leaked one eventfd per I/O
/// thread, so a frontend reconnecting in a loop ran the daemon out of file
/// descriptors (about 10,000 connections at `ulimit -n` 20000), and then
/// no frontend was served.
#[test]
fn frontends_that_come_and_go_leak_no_file_descriptors() {
    let _s = serial();
    let srv = Server::start("fds");
    let settle = |srv: &Server| {
        let start = Instant::now();
        while srv.export.is_connected() && start.elapsed() < T {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let session = || {
        let mut d = srv.connect();
        d.setup(2, 64).unwrap();
        round_trip(&mut d, 0, 8);
    };
    session();
    settle(&srv);
    let before = open_fds();
    for _ in 0..30 {
        session();
        settle(&srv);
    }
    let after = open_fds();
    assert!(
        after <= before + 2,
        "{before} file descriptors before 30 connections, {after} after"
    );
    srv.stop();
}

/// A queue's header in an inflight buffer.
fn inflight_header(version: u16, desc_num: u16, last_batch_head: u16, used_idx: u16) -> Vec<u8> {
    let mut h = 0u64.to_ne_bytes().to_vec();
    for v in [version, desc_num, last_batch_head, used_idx] {
        h.extend_from_slice(&v.to_ne_bytes());
    }
    h
}

/// One entry of an inflight buffer: flag, `next` link, counter.
fn inflight_entry(inflight: u8, next: u16, counter: u64) -> Vec<u8> {
    let mut e = vec![inflight, 0, 0, 0, 0, 0];
    e.extend_from_slice(&next.to_ne_bytes());
    e.extend_from_slice(&counter.to_ne_bytes());
    e
}

/// Where queue `q` and its entry `i` are in a buffer of 64-entry queues.
fn at(q: u64, i: Option<u64>) -> u64 {
    let stride = spindle_vhost::inflight::queue_region_size(64) as u64;
    q * stride + i.map_or(0, |i| 16 + 16 * i)
}

/// Waits until the export's frontend is gone.
fn wait_disconnected(srv: &Server) {
    let start = Instant::now();
    while srv.export.is_connected() {
        assert!(start.elapsed() < T, "the connection was not closed");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn malformed_inflight_buffers_are_refused_and_other_exports_keep_serving() {
    let _s = serial();
    let srv = Server::start("inflight");
    let other = Server::start("bystander");
    let mut by = other.connect();
    by.setup(2, 64).unwrap();
    let used = |q| vec![(at(q, None), inflight_header(1, 64, 0, 0))];
    let with = |q, mut pokes: Vec<(u64, Vec<u8>)>| {
        let mut p = used(q);
        p.append(&mut pokes);
        p
    };
    type Pokes = Vec<(u64, Vec<u8>)>;
    let cases: Vec<(&str, i64, Pokes, String)> = vec![
        (
            "size",
            -64,
            vec![],
            format!("its size is {} bytes", 2 * (16 * 64 + 64) - 64),
        ),
        (
            "version",
            0,
            vec![(at(1, None), inflight_header(2, 64, 0, 0))],
            "queue 1: version 2 (only 1 is known)".into(),
        ),
        (
            "desc_num",
            0,
            vec![(at(0, None), inflight_header(1, 128, 0, 0))],
            "queue 0: desc_num 128 is not the queue size 64".into(),
        ),
        (
            "last_batch_head",
            0,
            vec![(at(1, None), inflight_header(1, 64, 64, 0))],
            "queue 1: last_batch_head 64 is not below 64".into(),
        ),
        (
            "next",
            0,
            with(1, vec![(at(1, Some(3)), inflight_entry(0, 999, 0))]),
            "queue 1: entry 3: next 999 is not below 64".into(),
        ),
        (
            "flag",
            0,
            with(0, vec![(at(0, Some(5)), inflight_entry(2, 0, 0))]),
            "queue 0: entry 5: inflight flag 2".into(),
        ),
        (
            "counters",
            0,
            with(
                1,
                vec![
                    (at(1, Some(1)), inflight_entry(1, 0, 7)),
                    (at(1, Some(2)), inflight_entry(1, 0, 7)),
                ],
            ),
            "queue 1: two chains in flight share counter 7".into(),
        ),
    ];
    for (what, delta, pokes, msg) in cases {
        let m = mark();
        let mut d = srv.connect();
        d.handshake().unwrap();
        let mut desc = d.get_inflight(2, 64).unwrap();
        for (offset, bytes) in &pokes {
            d.poke_inflight(*offset, bytes).unwrap();
        }
        desc.mmap_size = desc.mmap_size.wrapping_add_signed(delta);
        assert!(
            d.set_inflight(&desc).is_err(),
            "a buffer with a bad {what} was accepted"
        );
        wait_disconnected(&srv);
        assert_few_lines(
            m,
            6,
            &format!("SET_INFLIGHT_FD refused, closing the connection: the inflight buffer: {msg}"),
        );
        round_trip(&mut by, 0, 8);
    }
    // A file the frontend could shrink under the backend (not the sealed
    // memfd GET_INFLIGHT_FD hands out).
    let m = mark();
    let mut d = srv.connect();
    d.handshake().unwrap();
    let desc = d.get_inflight(2, 64).unwrap();
    let plain = tempfile::tempfile().unwrap();
    plain.set_len(desc.mmap_size).unwrap();
    d.inflight = Some((plain, desc));
    assert!(d.set_inflight(&desc).is_err());
    wait_disconnected(&srv);
    assert_few_lines(m, 6, "its file is not a memfd sealed against shrinking");
    // More queues or larger ones than the device has: GET_INFLIGHT_FD too.
    let m = mark();
    let mut d = srv.connect();
    d.handshake().unwrap();
    assert!(d.get_inflight(3, 64).is_err());
    wait_disconnected(&srv);
    assert_few_lines(m, 6, "GET_INFLIGHT_FD refused, closing the connection: the inflight buffer: 3 queues asked for; the device has 1 to 2");

    // A chain in flight that is not a descriptor of the ring set up: the
    // device stops when the ring starts, as for any broken ring.
    let mut d = srv.connect();
    d.handshake().unwrap();
    let desc = d.get_inflight(2, 64).unwrap();
    d.poke_inflight(at(0, None), &inflight_header(1, 64, 0, 0)).unwrap();
    d.poke_inflight(at(0, Some(40)), &inflight_entry(1, 0, 1)).unwrap();
    d.set_inflight(&desc).unwrap();
    d.setup_queue(0, 32).unwrap();
    d.kick(0);
    let why = srv.wait_failure();
    assert!(
        why.contains("the ring has 32 entries and the buffer tracks 64"),
        "{why}"
    );
    assert_idle();
    drop(d);

    // A good buffer serves, and the bystander never stopped.
    let mut d = srv.connect();
    d.handshake().unwrap();
    let desc = d.get_inflight(2, 64).unwrap();
    d.set_inflight(&desc).unwrap();
    d.setup_queue(0, 64).unwrap();
    d.setup_queue(1, 64).unwrap();
    round_trip(&mut d, 0, 8);
    round_trip(&mut d, 1, 16);
    round_trip(&mut by, 1, 24);
    drop(d);
    drop(by);
    srv.stop();
    other.stop();
}

/// What QEMU does after a backend died with requests in flight: it keeps
/// the inflight buffer, rewinds the ring's base to the used index, and
/// sets the ring up again for the new backend. Here a backend "died"
/// with four writes taken (heads 0, 3, 6, 9, in the order 0, 9, 6, 3 by
/// counter), one of them (head 3) completed and on the used ring: the new
/// one must run exactly the other three, then go on with new requests.
/// Without inflight tracking it would run heads 3, 6 and 9 again from the
/// available ring (writing sector 8 a second time) and never head 0.
#[test]
fn requests_in_flight_when_a_backend_died_are_resubmitted_and_no_other() {
    let _s = serial();
    let srv = Server::start("resubmit");
    let mut d = srv.connect();
    d.handshake().unwrap();
    let desc = d.get_inflight(2, 64).unwrap();
    // The requests, laid out as the driver made them available: heads 0,
    // 3, 6, 9 write 0xa0.. at sectors 0, 8, 16, 24.
    let ring = Ring::at(ring_base(0), 64).unwrap();
    let _ = vm_memory::Bytes::write_slice(&d.mem, &[0u8; 4096], vm_memory::GuestAddress(ring.desc));
    d.rings[0] = Some(ring);
    let mut heads = Vec::new();
    for k in 0..4u8 {
        heads.push(d.submit(0, 1, 8 * u64::from(k), &[0xa0 + k; 4096], false).unwrap());
    }
    assert_eq!(heads, [0, 3, 6, 9]);
    // Head 3 completed: one used entry, used index 1.
    let used = d.rings[0].as_ref().unwrap().used;
    vm_memory::Bytes::write_slice(&d.mem, &[3, 0, 0, 0, 1, 0, 0, 0], vm_memory::GuestAddress(used + 4)).unwrap();
    vm_memory::Bytes::write_obj(&d.mem, 1u16.to_le(), vm_memory::GuestAddress(used + 2)).unwrap();
    d.rings[0].as_mut().unwrap().used_seen = 1;
    // The dead backend's buffer: 0, 9, 6 in flight (counters 10, 11, 12),
    // 3 returned in the last batch.
    d.poke_inflight(at(0, None), &inflight_header(1, 64, 3, 1)).unwrap();
    for (head, counter) in [(0, 10), (9, 11), (6, 12)] {
        d.poke_inflight(at(0, Some(head)), &inflight_entry(1, 0, counter))
            .unwrap();
    }
    d.poke_inflight(at(0, Some(3)), &inflight_entry(0, 0, 9)).unwrap();
    let m = mark();
    d.set_inflight(&desc).unwrap();
    // The ring set up again, based at the used index (QEMU's rewind).
    let ring = d.rings[0].take().unwrap();
    d.fe.set_vring_num(0, 64).unwrap();
    d.fe.set_vring_base(0, 1).unwrap();
    d.set_addr(0, &ring).unwrap();
    d.fe.set_vring_kick(0, &ring.kick).unwrap();
    d.fe.set_vring_call(0, &ring.call).unwrap();
    d.fe.set_vring_enable(0, true).unwrap();
    d.rings[0] = Some(ring);
    d.kick(0);
    let mut done: Vec<u16> = (0..3)
        .map(|_| d.wait_used(0, T).expect("a resubmitted request completes").0)
        .collect();
    done.sort();
    assert_eq!(done, [0, 6, 9]);
    assert_few_lines(
        m,
        4,
        "3 requests in flight before are resubmitted; the ring goes on at 4 (the frontend said 1)",
    );
    // New requests go on after them; head 3 never ran again.
    d.setup_queue(1, 64).unwrap();
    round_trip(&mut d, 0, 64);
    for (k, want) in [(0u64, 0xa0u8), (1, 0), (2, 0xa2), (3, 0xa3)] {
        let (status, data) = d.read(1, 8 * k, 4096, T).unwrap();
        assert_eq!(status, 0);
        assert!(
            data.iter().all(|&b| b == want),
            "sector {}: {:#x}, want {want:#x}",
            8 * k,
            data[0]
        );
    }
    assert_eq!(d.wait_used(0, Duration::from_millis(200)), None, "nothing ran twice");
    drop(d);
    srv.stop();
}
