//! `spindle img` as an NBD client: convert, compare, info and map on
//! `nbd://` and `nbd+unix://` URIs against qemu-nbd, nbdkit and
//! `spindle nbd`, checked with qemu-img; and the errors of a refused
//! connection, an unknown export and a bad URI.

mod common;

use common::nbd::{need_tool, qemu_map, NbdServer};
use common::{ok, p, run, scratch};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// A qemu-nbd or nbdkit process; killed on drop.
struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `tool args…` with `--pid-file PID` (qemu-nbd) or `-P PID`
/// (nbdkit) and waits (10 s at most) until the server wrote it: it
/// listens then.
fn start(tool: &str, args: &[&str], dir: &Path) -> Peer {
    need_tool(tool);
    let pid = dir.join(format!("{tool}-{}.pid", args.len()));
    let flag = if tool == "nbdkit" { "-P" } else { "--pid-file" };
    let child = Command::new(tool)
        .args([flag, p(&pid)])
        .args(args)
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {tool}: {e}"));
    let peer = Peer(child);
    let t = Instant::now();
    while std::fs::read_to_string(&pid).map_or(true, |s| s.trim().is_empty()) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{tool} {args:?} did not start listening"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    peer
}

/// nbdkit `args…` (plugin, filters, parameters) on the unix socket `sock`.
fn nbdkit(dir: &Path, sock: &Path, args: &[&str]) -> Peer {
    let mut all = vec!["-f", "--exit-with-parent", "-U", p(sock)];
    all.extend_from_slice(args);
    start("nbdkit", &all, dir)
}

/// A free TCP port on loopback (bound and let go).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// qemu-nbd serving `img` (format `fmt`) on a unix socket in `dir`.
fn qemu_nbd_unix(dir: &Path, fmt: &str, img: &Path, extra: &[&str]) -> (Peer, PathBuf) {
    let sock = dir.join(format!("qemu-nbd-{}.sock", extra.len()));
    let s = p(&sock).to_string();
    let mut args = vec!["-t", "-e", "4", "-f", fmt, "-k", &s];
    args.extend_from_slice(extra);
    args.push(p(img));
    let peer = start("qemu-nbd", &args, dir);
    (peer, sock)
}

fn unix_uri(name: &str, sock: &Path) -> String {
    format!("nbd+unix:///{name}?socket={}", p(sock))
}

/// A 64 MiB qcow2 with data, zero clusters, written zeroes and holes.
fn source(dir: &Path) -> PathBuf {
    let img = dir.join("src.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&img), "64M"]);
    ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 0 3M",
            "-c",
            "write -z 8M 2M",
            "-c",
            "write -P 0 12M 1M",
            "-c",
            "write -P 0x22 20M 64k",
            "-c",
            "write -P 0x33 40M 5M",
            "-c",
            "write -P 0x44 63M 1M",
            p(&img),
        ],
    );
    img
}

fn spindle(args: &[&str]) -> String {
    ok("spindle", &[&["img"], args].concat())
}

/// A failing `spindle img …`: its exit code and its message.
fn spindle_fails(args: &[&str]) -> (i32, String) {
    let o = run("spindle", &[&["img"], args].concat());
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "spindle img {args:?} succeeded");
    (o.status.code().unwrap_or(-1), err)
}

#[test]
fn convert_from_qemu_nbd_is_identical_and_stays_sparse() {
    let dir = scratch();
    let src = source(dir.path());
    let (_srv, sock) = qemu_nbd_unix(dir.path(), "qcow2", &src, &["-r"]);
    let uri = unix_uri("", &sock);
    let out = dir.path().join("out.qcow2");
    spindle(&["convert", "-O", "qcow2", &uri, p(&out)]);
    ok("qemu-img", &["compare", "-q", p(&src), p(&out)]);
    let (src_map, out_map) = (qemu_map(&src, 64 * MIB), qemu_map(&out, 64 * MIB));
    for (i, (s, o)) in src_map.iter().zip(&out_map).enumerate() {
        assert!(s.0 || !o.0, "block {i}: a hole of the source is data in the copy");
    }
    let data = out_map.iter().filter(|b| b.0).count() as u64 * (64 << 10);
    // 3M + 64k + 5M + 1M of data; the zero clusters and the zeroes written
    // at 12M stay holes.
    assert_eq!(data, 9 * MIB + (64 << 10), "data in the copy");
}

#[test]
fn convert_into_writable_exports_over_tcp_and_unix() {
    let dir = scratch();
    let src = source(dir.path());
    // qemu-nbd over TCP with an export name, into an existing image (-n).
    let dst = dir.path().join("dst.raw");
    ok("qemu-img", &["create", "-q", "-f", "raw", p(&dst), "64M"]);
    let port = free_port().to_string();
    let _srv = start(
        "qemu-nbd",
        &[
            "-t",
            "-e",
            "4",
            "-f",
            "raw",
            "-b",
            "127.0.0.1",
            "-p",
            &port,
            "-x",
            "disk1",
            p(&dst),
        ],
        dir.path(),
    );
    let uri = format!("nbd://127.0.0.1:{port}/disk1");
    ok("qemu-io", &["-f", "raw", "-c", "write -P 0x77 8M 4M", &uri]); // stale data to be zeroed
    spindle(&["convert", "-n", p(&src), &uri]);
    ok("qemu-img", &["compare", "-q", p(&src), &uri]);

    // nbdkit's memory plugin, without -n: the export is written, not created.
    let sock = dir.path().join("nbdkit.sock");
    let _kit = nbdkit(dir.path(), &sock, &["memory", "64M"]);
    let uri = unix_uri("", &sock);
    spindle(&["convert", "-O", "raw", p(&src), &uri]);
    ok("qemu-img", &["compare", "-q", p(&src), &uri]);
    let (code, err) = spindle_fails(&["convert", "-O", "qcow2", p(&src), &uri]);
    assert!(code != 0 && err.contains("an NBD target takes raw data"), "{err}");
}

#[test]
fn compare_map_and_info_on_an_nbd_uri() {
    let dir = scratch();
    let src = source(dir.path());
    let (_srv, sock) = qemu_nbd_unix(dir.path(), "qcow2", &src, &["-r"]);
    let uri = unix_uri("", &sock);

    // compare: identical is 0, different is 1 with the offset, as qemu-img.
    let o = run("spindle", &["img", "compare", p(&src), &uri]);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("Images are identical."));
    let other = dir.path().join("other.qcow2");
    ok("qemu-img", &["convert", "-O", "qcow2", p(&src), p(&other)]);
    ok("qemu-io", &["-f", "qcow2", "-c", "write -P 0x99 41M 512", p(&other)]);
    let o = run("spindle", &["img", "compare", p(&other), &uri]);
    let q = run("qemu-img", &["compare", p(&other), &uri]);
    assert_eq!((o.status.code(), q.status.code()), (Some(1), Some(1)));
    assert_eq!(String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&q.stdout));

    // map: the same extents as qemu-img's map of the same URI.
    let ours = ok("spindle", &["img", "map", "--output", "json", &uri]);
    let qemu = ok("qemu-img", &["map", "--output=json", &uri]);
    let fields = |s: &str| -> Vec<(u64, u64, bool, bool, bool, Option<u64>)> {
        let v: Value = serde_json::from_str(s).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["start"].as_u64().unwrap(),
                    e["length"].as_u64().unwrap(),
                    e["data"].as_bool().unwrap(),
                    e["zero"].as_bool().unwrap(),
                    e["present"].as_bool().unwrap(),
                    e["offset"].as_u64(),
                )
            })
            .collect()
    };
    assert_eq!(fields(&ours), fields(&qemu), "spindle:\n{ours}\nqemu-img:\n{qemu}");

    // info: a raw export of the virtual size, as qemu-img shows it.
    let human = ok("spindle", &["img", "info", &uri]);
    assert!(
        human.contains("file format: raw\nvirtual size: 64 MiB (67108864 bytes)\ndisk size: unavailable"),
        "{human}"
    );
    let j: Value = serde_json::from_str(&ok("spindle", &["img", "info", "--output", "json", &uri])).unwrap();
    assert_eq!(
        (j["virtual-size"].as_u64(), j["format"].as_str()),
        (Some(64 * MIB), Some("raw"))
    );
}

#[test]
fn spindles_own_server_both_ways() {
    let dir = scratch();
    let src = source(dir.path());
    let sock = dir.path().join("spindle.sock");
    let served = dir.path().join("served.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&served), "64M"]);
    let srv = NbdServer::start(&["-t", "-k", p(&sock), p(&served)]);
    spindle(&["convert", "-n", p(&src), &srv.uri]);
    let back = dir.path().join("back.qcow2");
    spindle(&["convert", "-O", "qcow2", &srv.uri, p(&back)]);
    assert_eq!(spindle(&["compare", p(&src), &srv.uri]).trim(), "Images are identical.");
    assert!(srv.stop(), "spindle nbd exits 0");
    ok("qemu-img", &["compare", "-q", p(&src), p(&served)]);
    ok("qemu-img", &["compare", "-q", p(&src), p(&back)]);
    common::assert_clean(&served);
}

#[test]
fn block_size_limits_are_honoured() {
    // nbdkit fails any request that breaks its 4 KiB minimum or 64 KiB maximum.
    let dir = scratch();
    let src = source(dir.path());
    let sock = dir.path().join("bs.sock");
    let _kit = nbdkit(
        dir.path(),
        &sock,
        &[
            "--filter=blocksize-policy",
            "memory",
            "64M",
            "blocksize-minimum=4096",
            "blocksize-preferred=4096",
            "blocksize-maximum=65536",
            "blocksize-error-policy=error",
        ],
    );
    let uri = unix_uri("", &sock);
    spindle(&["convert", "-n", p(&src), &uri]);
    ok("qemu-img", &["compare", "-q", p(&src), &uri]);
    // Unaligned writes and reads are widened to whole blocks.
    let rt = spindle_io::Runtime::new(Default::default()).unwrap();
    rt.block_on(async {
        let node = spindle_block::open_image(&uri, &Default::default()).unwrap();
        node.write_from(40 * MIB + 1000, &[0xab; 5000], true).await.unwrap();
        node.write_zeroes(MIB + 100, 3 * 4096, false).await.unwrap();
        let mut got = vec![0u8; 8192];
        node.read_into(40 * MIB, &mut got).await.unwrap();
        assert!(got[..1000].iter().all(|&b| b == 0x33), "the head kept the old data");
        assert!(got[1000..6000].iter().all(|&b| b == 0xab) && got[6000..].iter().all(|&b| b == 0x33));
        node.read_into(MIB, &mut got).await.unwrap();
        assert!(got[..100].iter().all(|&b| b == 0x11) && got[100..].iter().all(|&b| b == 0));
        node.close().await.unwrap();
    });
    ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            &format!("read -P 0xab {} 5000", 40 * MIB + 1000),
            &uri,
        ],
    );
}

#[test]
fn refused_unknown_bad_and_read_only_are_clear_errors() {
    let dir = scratch();
    let src = source(dir.path());
    let out = dir.path().join("o.qcow2");
    let port = free_port();
    let (code, err) = spindle_fails(&["info", &format!("nbd://127.0.0.1:{port}/x")]);
    assert!(
        code != 0 && err.contains("cannot connect to the NBD server: Connection refused"),
        "{err}"
    );
    let missing = dir.path().join("nobody.sock");
    let (_, err) = spindle_fails(&["convert", "-O", "qcow2", &unix_uri("", &missing), p(&out)]);
    assert!(
        err.contains("cannot connect to the NBD server") && err.contains(p(&missing)),
        "{err}"
    );

    let (_srv, sock) = qemu_nbd_unix(dir.path(), "qcow2", &src, &["-r", "-x", "vm1"]);
    let (code, err) = spindle_fails(&["map", &unix_uri("vm2", &sock)]);
    assert!(code != 0 && err.contains("has no export 'vm2'"), "{err}");
    let (code, err) = spindle_fails(&["compare", p(&src), &unix_uri("vm2", &sock)]);
    assert!(code == 2 && err.contains("has no export 'vm2'"), "exit {code}: {err}");
    let (_, err) = spindle_fails(&["convert", "-n", p(&src), &unix_uri("vm1", &sock)]);
    assert!(err.contains("read-only (the NBD server exports it read-only)"), "{err}");

    for (bad, why) in [
        ("nbd+unix:///vm1", "needs ?socket=PATH"),
        ("nbd://127.0.0.1:99999/vm1", "bad port '99999'"),
        ("nbd+tls://h/vm1", "unknown scheme 'nbd+tls'"),
        ("nbds://127.0.0.1/vm1", "TLS"),
    ] {
        let (code, err) = spindle_fails(&["info", bad]);
        assert!(code != 0 && err.contains(why) && err.contains(bad), "{bad}: {err}");
    }
}

#[test]
fn a_re_export_keeps_one_connection_per_io_thread() {
    let dir = scratch();
    let src = source(dir.path());
    // nbdkit offers multi-conn; its log filter counts the connections.
    let (sock, log) = (dir.path().join("kit.sock"), dir.path().join("kit.log"));
    let logfile = format!("logfile={}", p(&log));
    let _kit = nbdkit(dir.path(), &sock, &["--filter=log", "memory", "64M", &logfile]);
    let upstream = unix_uri("", &sock);
    spindle(&["convert", "-n", p(&src), &upstream]);
    let front = dir.path().join("front.sock");
    let srv = NbdServer::start(&["-t", "--iothreads", "2", "-k", p(&front), &upstream]);
    // (The start line names the upstream URI first: the front one is ours.)
    let uri = unix_uri("", &front);
    // Two clients in turn land on the two I/O threads (round robin).
    ok("qemu-img", &["compare", "-q", p(&src), &uri]);
    ok("qemu-io", &["-f", "raw", "-c", "write -P 0x55 30M 1M", &uri]);
    assert!(srv.stop(), "spindle nbd exits 0");
    let count = |what: &str| {
        let text = std::fs::read_to_string(&log).unwrap();
        (text.lines().filter(|l| l.contains(what)).count(), text)
    };
    let t = Instant::now();
    while count(" Disconnect ").0 < count(" Connect ").0 && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    // convert's, then one per I/O thread (the open-time one is the first
    // thread's); qemu-io flushed, so closing needs no connection of its own.
    let (connects, text) = count(" Connect ");
    assert_eq!(connects, 3, "{text}");
    assert_eq!(count(" Disconnect ").0, 3, "{text}");
    assert_eq!(
        text.matches("connection=3 Write").count(),
        1,
        "thread 2 wrote on its own connection:\n{text}"
    );
    ok("qemu-io", &["-f", "raw", "-c", "read -P 0x55 30M 1M", &upstream]);

    // qemu-nbd's default offers no multi-conn: `spindle nbd` over it serves
    // on one I/O thread (every client on the one upstream connection),
    // offers no multi-conn itself, and says read-only for a read-only
    // upstream; `spindle serve` refuses it (each I/O thread needs a
    // connection of its own).
    let sock1 = dir.path().join("single.sock");
    let _one = start(
        "qemu-nbd",
        &["-t", "-r", "-f", "qcow2", "-k", p(&sock1), p(&src)],
        dir.path(),
    );
    let front1 = dir.path().join("front1.sock");
    let srv = NbdServer::start(&["-t", "--iothreads", "2", "-k", p(&front1), &unix_uri("", &sock1)]);
    let uri = unix_uri("", &front1);
    ok("qemu-img", &["compare", "-q", p(&src), &uri]);
    ok("qemu-img", &["compare", "-q", p(&src), &uri]);
    need_tool("nbdinfo");
    let can = run("nbdinfo", &["--can", "multi-conn", &uri]);
    assert_eq!(
        can.status.code(),
        Some(2),
        "multi-conn offered over an upstream without it: {can:?}"
    );
    let can = run("nbdinfo", &["--can", "write", &uri]);
    assert_eq!(
        can.status.code(),
        Some(2),
        "writes offered over a read-only upstream: {can:?}"
    );
    assert!(srv.stop());
    let o = run(
        "spindle",
        &[
            "serve",
            &unix_uri("", &sock1),
            "--vhost-user",
            p(&dir.path().join("v.sock")),
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("offers no multi-conn"), "{err}");

    // A writable upstream without multi-conn: what a client wrote through
    // `spindle nbd` is flushed upstream at exit, from the I/O thread that
    // holds the one connection, and the exit is clean.
    let raw = dir.path().join("w.raw");
    std::fs::File::create(&raw).unwrap().set_len(64 * MIB).unwrap();
    let sock2 = dir.path().join("single-w.sock");
    let _w = start("qemu-nbd", &["-t", "-f", "raw", "-k", p(&sock2), p(&raw)], dir.path());
    let front2 = dir.path().join("front2.sock");
    let srv = NbdServer::start(&["-t", "-k", p(&front2), &unix_uri("", &sock2)]);
    // nbdsh writes and disconnects without a flush (qemu-io would flush).
    let o = Command::new("/usr/bin/nbdsh")
        .args([
            "-u",
            &unix_uri("", &front2),
            "-c",
            "h.pwrite(b'\\x66' * 1048576, 1048576)",
        ])
        .env("PATH", "/usr/bin:/bin")
        .output()
        .expect("nbdsh (apt-get install -y libnbd-bin python3-libnbd)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        srv.stop(),
        "spindle nbd over a writable single-connection upstream did not exit 0"
    );
    ok(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x66 1M 1M", &unix_uri("", &sock2)],
    );
}

#[test]
fn a_server_without_structured_replies_is_read_through_simple_replies() {
    // nbdkit --no-sr: simple replies only, hence no base:allocation either,
    // so everything reads as data and convert finds the zeroes by looking.
    let dir = scratch();
    let src = source(dir.path());
    let sock = dir.path().join("nosr.sock");
    let _kit = nbdkit(dir.path(), &sock, &["--no-sr", "memory", "64M"]);
    let uri = unix_uri("", &sock);
    spindle(&["convert", "-n", p(&src), &uri]);
    let out = dir.path().join("back.qcow2");
    spindle(&["convert", "-O", "qcow2", &uri, p(&out)]);
    ok("qemu-img", &["compare", "-q", p(&src), p(&out)]);
    let map: Value = serde_json::from_str(&spindle(&["map", "--output", "json", &uri])).unwrap();
    assert!(map.as_array().unwrap().iter().all(|e| e["data"] == true), "{map}");
    let data = qemu_map(&out, 64 * MIB).iter().filter(|b| b.0).count() as u64 * (64 << 10);
    assert_eq!(data, 9 * MIB + (64 << 10), "the zeroes read stay holes in the copy");
}

/// qcow2 on an NBD export, as QEMU's qcow2 over its `nbd` driver:
/// qemu-nbd serves the image file's bytes (`-f raw`), Spindle opens the
/// qcow2 format on them with the format stated, reads what qemu-img
/// reads of the image, and its writes are what qemu-img finds after,
/// with a clean check. Without the format the export stays raw.
#[test]
fn qcow2_on_an_nbd_export() {
    let dir = scratch();
    let src = source(dir.path());
    let want = dir.path().join("want.raw");
    ok("qemu-img", &["convert", "-O", "raw", p(&src), p(&want)]);
    let want = std::fs::read(&want).unwrap();
    // Preallocated metadata: writes land in clusters the export holds
    // (the export cannot grow for new ones).
    let rw = dir.path().join("rw.qcow2");
    common::qcow2_create(&rw, &["-o", "preallocation=metadata"], Some("8M"));
    let (ro_srv, ro_sock) = qemu_nbd_unix(dir.path(), "raw", &src, &["-r"]);
    let (rw_srv, rw_sock) = qemu_nbd_unix(dir.path(), "raw", &rw, &["-x", "rw"]);
    let qcow2 = spindle_block::OpenConfig {
        format: Some(spindle_block::Format::Qcow2),
        ..Default::default()
    };
    let rt = spindle_io::Runtime::new(Default::default()).unwrap();
    rt.block_on(async {
        let raw = spindle_block::open_image(&unix_uri("", &ro_sock), &Default::default()).unwrap();
        assert_eq!(raw.info().format, "raw", "not probed: an export is raw unless stated");
        drop(raw);
        let node = spindle_block::open_image(&unix_uri("", &ro_sock), &qcow2).unwrap();
        assert_eq!(
            (node.info().format, node.size(), node.storage().driver()),
            ("qcow2", 64 * MIB, "nbd")
        );
        let mut got = vec![0u8; want.len()];
        for (i, chunk) in got.chunks_mut(MIB as usize).enumerate() {
            node.read_into(i as u64 * MIB, chunk).await.unwrap();
        }
        assert!(got == want, "the image read through NBD differs from qemu-img's view");
        let e = node.map_extent(8 * MIB, 2 * MIB).await.unwrap();
        assert!(e.zero && !e.data, "the zero clusters map as zero: {e:?}");
        node.close().await.unwrap();

        let node = spindle_block::open_image(&unix_uri("rw", &rw_sock), &qcow2).unwrap();
        node.write_from(MIB + 512, &[0x5a; 70_000], false).await.unwrap();
        node.write_zeroes(4 * MIB, 64 << 10, false).await.unwrap();
        node.flush().await.unwrap();
        let mut back = vec![0u8; 70_000];
        node.read_into(MIB + 512, &mut back).await.unwrap();
        assert!(back.iter().all(|&b| b == 0x5a));
        node.close().await.unwrap();
    });
    drop((ro_srv, rw_srv));
    ok("qemu-img", &["check", "-q", p(&rw)]);
    ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            &format!("read -P 0x5a {} 70000", MIB + 512),
            p(&rw),
        ],
    );
}

/// One thread that runs one short-lived runtime after another on one open
/// NBD node (what a control thread's resize or snapshot does): each
/// runtime gets a working connection, with multi-conn (a new one) and
/// without (the idle one moves over); before, the second runtime waited
/// for ever on the first one's socket.
#[test]
fn runtimes_one_after_another_on_one_thread_each_get_a_connection() {
    let dir = scratch();
    let kit_sock = dir.path().join("kit.sock");
    let _kit = nbdkit(dir.path(), &kit_sock, &["memory", "64M"]);
    let raw = dir.path().join("one.raw");
    std::fs::File::create(&raw).unwrap().set_len(64 * MIB).unwrap();
    let (_qemu_nbd, one_sock) = qemu_nbd_unix(dir.path(), "raw", &raw, &["-e", "1"]);
    for (what, uri) in [
        ("nbdkit (multi-conn)", unix_uri("", &kit_sock)),
        ("qemu-nbd -e 1 (no multi-conn)", unix_uri("", &one_sock)),
    ] {
        let (tx, rx) = std::sync::mpsc::channel();
        let u = uri.clone();
        std::thread::spawn(move || {
            let node = std::sync::Arc::new(spindle_block::open_image(&u, &Default::default()).unwrap());
            for round in 0..4u8 {
                let rt = spindle_io::Runtime::new(Default::default()).unwrap();
                let n = node.clone();
                let r: Result<(), String> = rt.block_on(async move {
                    if round > 0 {
                        let mut got = vec![0u8; 4096];
                        n.read_into(u64::from(round) * MIB, &mut got)
                            .await
                            .map_err(|e| e.to_string())?;
                        if got.iter().any(|&b| b != round) {
                            return Err(format!("round {round}: read back other data"));
                        }
                    }
                    n.write_from(u64::from(round + 1) * MIB, &[round + 1; 4096], false)
                        .await
                        .map_err(|e| e.to_string())?;
                    n.flush().await.map_err(|e| e.to_string())
                });
                if let Err(e) = r {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
            let rt = spindle_io::Runtime::new(Default::default()).unwrap();
            let _ = tx.send(rt.block_on(async move { node.close().await.map_err(|e| e.to_string()) }));
        });
        match rx.recv_timeout(std::time::Duration::from_secs(60)) {
            Ok(r) => r.unwrap_or_else(|e| panic!("{what}: {e}")),
            Err(_) => panic!("{what}: a runtime after the first hung on the node's connection"),
        }
        ok(
            "qemu-io",
            &["-f", "raw", "-c", &format!("read -P 4 {} 4096", 4 * MIB), &uri],
        );
    }
}
