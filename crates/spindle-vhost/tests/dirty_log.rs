//! Dirty logging for live migration through a real vhost-user connection:
//! the frontend negotiates `VHOST_F_LOG_ALL` and `LOG_SHMFD` and hands a
//! memfd log over with SET_LOG_BASE, as QEMU does when a migration starts.
//! Every guest page the backend writes (data, status byte, used ring) must
//! be marked, and no other; nothing once LOG_ALL is cleared. Logs that
//! cannot be used safely are refused with one line, and the export serves
//! the next frontend.

use spindle_vhost::blk::request::VIRTIO_BLK_T_GET_ID;
use spindle_vhost::dirty::VHOST_F_LOG_ALL;
use spindle_vhost::fuzzing::driver::{area, log_pages, memfd, Driver};
use spindle_vhost::Export;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vhost::VhostBackend;

const T: Duration = Duration::from_secs(10);
const LIFETIME: Duration = Duration::from_secs(60);
const QSIZE: u16 = 64;
const PAGE: u64 = 4096;

mod common;
use common::{lines_since, log, mark, serial};
/// Where the queue's ring starts: its used ring 8 bytes before a page end.
const RING: u64 = (1 << 20) + 2928;

struct Server {
    export: Arc<Export>,
    sock: PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start(name: &str) -> Server {
        log();
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let (export, sock, thread) = common::raw_export(
            dir.path(),
            name,
            &(0..4u32 << 20).map(|i| (i % 251) as u8).collect::<Vec<u8>>(),
            1,
            256,
        );
        drop(thread);
        Server {
            export,
            sock,
            _dir: dir,
        }
    }

    fn connect(&self) -> Driver {
        let mut d = Driver::connect(&self.sock, 1, LIFETIME).unwrap();
        d.handshake().unwrap();
        // As QEMU at the start of a migration: LOG_ALL acked.
        d.set_log_all(true).unwrap();
        // The used ring straddles two pages: its flags and index on the
        // first, `avail_event` and all entries but the first on the
        // second. Entries and index are marked after each batch,
        // `avail_event` (EVENT_IDX is acked) after notifications turned
        // off and on: a batch left unmarked shows.
        d.setup_queue_at(0, RING, QSIZE).unwrap();
        let used = d.rings[0].as_ref().unwrap().used;
        assert_eq!(((used + 4) / PAGE, (used + 12) / PAGE), (used / PAGE, used / PAGE + 1));
        d
    }

    fn wait_disconnected(&self) {
        let start = Instant::now();
        while self.export.is_connected() {
            assert!(start.elapsed() < T, "the connection was not closed");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn marked(log: &File) -> Vec<u64> {
    log_pages(log).unwrap()
}

fn clear(log: &File) {
    log.write_all_at(&vec![0u8; log.metadata().unwrap().len() as usize], 0)
        .unwrap();
}

fn pages(gpa: u64, len: u64) -> std::ops::RangeInclusive<u64> {
    gpa / PAGE..=(gpa + len - 1) / PAGE
}

/// Pages a request in `slot` with `data` bytes writes (data and status),
/// plus the used ring's, sorted.
fn expected(d: &Driver, slot: u16, data: u64) -> Vec<u64> {
    let r = d.rings[0].as_ref().unwrap();
    let mut v: Vec<u64> = pages(area(slot) + 512, data + 1).collect();
    v.extend(pages(r.used, 6 + 8 * u64::from(r.size)));
    v.sort_unstable();
    v.dedup();
    v
}

/// Waits until `log` has exactly `want` marked (the used ring is marked
/// just after the driver may see its entry).
fn assert_marked(log: &File, want: &[u64]) {
    let start = Instant::now();
    loop {
        let got = marked(log);
        if got == want {
            return;
        }
        assert!(start.elapsed() < T, "marked pages {got:?}, want {want:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn slot(d: &Driver) -> u16 {
    let r = d.rings[0].as_ref().unwrap();
    r.avail_idx % r.size
}

#[test]
fn pages_written_while_logging_are_marked_and_nothing_once_log_all_is_cleared() {
    let _s = serial();
    let srv = Server::start("dirty");
    let mut d = srv.connect();
    let features = d.fe.get_features().unwrap();
    assert_ne!(features & VHOST_F_LOG_ALL, 0, "LOG_ALL offered");

    // The handshake acked LOG_ALL; with no log nothing is marked anywhere.
    let log = memfd(4096, true).unwrap();
    let (st, back) = d.read(0, 8, 8192, T).unwrap();
    assert_eq!(st, 0);
    assert_eq!(back[0], ((8 * 512) % 251) as u8);

    // A log for 128 MiB of guest memory.
    d.set_log_base(log.as_raw_fd(), 4096, 0).unwrap();
    let s = slot(&d);
    let (st, back) = d.read(0, 16, 8192, T).unwrap();
    assert_eq!(st, 0);
    assert_eq!(back[1], ((16 * 512 + 1) % 251) as u8);
    let want = expected(&d, s, 8192);
    assert_eq!(want.len(), 5, "3 pages of data and status, 2 of used ring: {want:?}");
    assert_marked(&log, &want);

    // GET_ID writes 20 bytes and the status.
    clear(&log);
    let s = slot(&d);
    d.submit(0, VIRTIO_BLK_T_GET_ID, 0, &[0u8; 20], true).unwrap();
    assert_eq!(d.wait_used(0, T).map(|u| u.1), Some(21));
    assert_marked(&log, &expected(&d, s, 20));

    // LOG_ALL cleared (the migration ended or failed): nothing more.
    d.fe.set_features(features & !VHOST_F_LOG_ALL).unwrap();
    clear(&log);
    assert_eq!(d.read(0, 24, 8192, T).map(|r| r.0), Some(0));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(marked(&log), Vec::<u64>::new(), "marked with LOG_ALL cleared");

    // LOG_ALL again: QEMU sends a new log; the old one is not used again.
    d.fe.set_features(features).unwrap();
    assert_eq!(d.read(0, 24, 4096, T).map(|r| r.0), Some(0));
    let bigger = memfd(8192, true).unwrap();
    d.set_log_base(bigger.as_raw_fd(), 8192, 0).unwrap();
    let s = slot(&d);
    assert_eq!(d.read(0, 32, 4096, T).map(|r| r.0), Some(0));
    assert_marked(&bigger, &expected(&d, s, 4096));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(marked(&log), Vec::<u64>::new(), "the replaced log was marked");
}

#[test]
fn a_log_too_small_for_guest_memory_marks_what_it_can_and_requests_still_complete() {
    let _s = serial();
    let srv = Server::start("tiny");
    let mut d = srv.connect();
    let start = mark();
    // One byte: pages 0 to 7 (32 KiB); every buffer of the driver is above.
    let log = memfd(4096, true).unwrap();
    d.set_log_base(log.as_raw_fd(), 1, 0).unwrap();
    for i in 0..50 {
        assert_eq!(d.read(0, i, 4096, T).map(|r| r.0), Some(0), "read {i}");
    }
    assert_eq!(marked(&log), Vec::<u64>::new());
    let text = lines_since(start).join("\n");
    let lines = text.lines().filter(|l| l.contains("dirty log too small")).count();
    assert!(lines >= 1, "no line about the small log:\n{text}");
    assert!(lines <= 10, "{lines} lines about the small log: not rate-limited");
}

#[test]
fn logs_that_cannot_be_used_safely_are_refused_and_the_next_frontend_is_served() {
    let _s = serial();
    let srv = Server::start("refuse");
    let sealed = memfd(4096, true).unwrap();
    let unsealed = memfd(4096, false).unwrap();
    let efd = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
    let cases: [(&str, i32, u64, u64, &str); 5] = [
        ("unsealed", unsealed.as_raw_fd(), 4096, 0, "not a memfd sealed"),
        ("eventfd", efd.as_raw_fd(), 4096, 0, "not a memfd sealed"),
        ("huge offset", sealed.as_raw_fd(), 4096, 1 << 40, "the log ends at"),
        ("past the file", sealed.as_raw_fd(), 8192, 0, "the log ends at 8192"),
        // The vhost crate refused this one as an "invalid message", which
        // did not say what was wrong with it.
        ("empty", sealed.as_raw_fd(), 0, 0, "log size 0"),
    ];
    for (name, fd, size, offset, why) in cases {
        let since = mark();
        let d = srv.connect();
        assert!(d.set_log_base(fd, size, offset).is_err(), "{name}: accepted");
        drop(d);
        srv.wait_disconnected();
        // The export logs why the connection ended once it is over.
        let start = Instant::now();
        loop {
            let lines = lines_since(since);
            let said =
                |l: &&String| (l.contains("SET_LOG_BASE refused") || l.contains("connection ended")) && l.contains(why);
            if lines.iter().any(|l| said(&l)) {
                break;
            }
            let text = lines.join("\n");
            assert!(start.elapsed() < T, "{name}: no line saying {why:?}:\n{text}");
            std::thread::sleep(Duration::from_millis(5));
        }
        // One error line, naming the export.
        let lines = lines_since(since);
        let why_lines: Vec<_> = lines
            .iter()
            .filter(|l| l.contains("ERROR") && l.contains(why))
            .collect();
        assert_eq!(why_lines.len(), 1, "{name}: {why_lines:?}");
        assert!(why_lines[0].contains("device=refuse"), "{name}: {why_lines:?}");
        let mut d = srv.connect();
        assert_eq!(d.read(0, 8, 4096, T).map(|r| r.0), Some(0), "{name}: next frontend");
    }
}

#[test]
fn set_log_fd_is_kept_the_previous_one_closed_and_the_connection_serves_on() {
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    let _s = serial();
    let srv = Server::start("logfd");
    let mut d = srv.connect();
    let since = mark();
    // The first "eventfd" is one end of a socket pair: once the backend
    // closed the copy it got, the other end reads EOF.
    let (ours, mut peer) = UnixStream::pair().unwrap();
    peer.set_nonblocking(true).unwrap();
    d.fe.set_log_fd(ours.as_raw_fd()).expect("SET_LOG_FD refused");
    drop(ours);
    let log = memfd(4096, true).unwrap();
    d.set_log_base(log.as_raw_fd(), 4096, 0).unwrap();
    let s = slot(&d);
    assert_eq!(d.read(0, 8, 4096, T).map(|r| r.0), Some(0), "read after SET_LOG_FD");
    assert_marked(&log, &expected(&d, s, 4096));
    let e = peer.read(&mut [0u8; 1]).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "the log fd was not kept");
    // A second one (a real eventfd) replaces it: the first is closed.
    let efd = vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
    d.fe.set_log_fd(efd.as_raw_fd()).expect("second SET_LOG_FD refused");
    let start = Instant::now();
    while !matches!(peer.read(&mut [0u8; 1]), Ok(0)) {
        assert!(start.elapsed() < T, "the previous log fd was not closed");
        std::thread::sleep(Duration::from_millis(5));
    }
    for i in 0..20 {
        assert_eq!(d.read(0, i, 4096, T).map(|r| r.0), Some(0), "read {i}");
    }
    assert!(srv.export.is_connected());
    // Never signalled: the log is written as the pages are.
    assert_eq!(efd.read().map_err(|e| e.kind()), Err(std::io::ErrorKind::WouldBlock));
    let lines = lines_since(since);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("dirty log eventfd set") && l.contains("device=logfd")),
        "{lines:?}"
    );
}

#[test]
fn set_vring_addr_on_a_running_ring_loses_no_completion() {
    use vhost::VringConfigData;
    let _s = serial();
    let srv = Server::start("readdr");
    let mut d = srv.connect();
    let log = memfd(4096, true).unwrap();
    d.set_log_base(log.as_raw_fd(), 4096, 0).unwrap();
    let r = d.rings[0].as_ref().unwrap();
    // What QEMU sends when a migration starts (log flag on) and ends.
    let cfg = |flags| VringConfigData {
        queue_max_size: QSIZE,
        queue_size: QSIZE,
        flags,
        desc_table_addr: d.va(r.desc),
        used_ring_addr: d.va(r.used),
        avail_ring_addr: d.va(r.avail),
        log_addr: Some(r.used),
    };
    let (on, off) = (cfg(1), cfg(0));
    // A second handle on the connection sends them while requests complete.
    let fe = d.fe.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopper = stop.clone();
    let readdr = std::thread::spawn(move || {
        let mut n = 0u32;
        while !stopper.load(std::sync::atomic::Ordering::Relaxed) {
            fe.set_vring_addr(0, if n.is_multiple_of(2) { &on } else { &off })
                .unwrap();
            n += 1;
        }
        n
    });
    // 21 requests in flight at a time (3 descriptors each on 64 entries).
    let mut seen = 0u32;
    for round in 0..300u64 {
        let heads: Vec<u16> = (0..21)
            .map(|i| d.submit(0, 0, round * 21 + i, &[0u8; 512], true).unwrap())
            .collect();
        let mut got: Vec<u16> = (0..21)
            .map(|_| d.wait_used(0, T).expect("a completion went missing").0)
            .collect();
        got.sort_unstable();
        let mut want = heads.clone();
        want.sort_unstable();
        assert_eq!(got, want, "round {round}: used entries");
        seen += 21;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let n = readdr.join().unwrap();
    eprintln!("{seen} completions while {n} SET_VRING_ADDR went by");
    assert!(n > 10, "only {n} SET_VRING_ADDR sent");
}
