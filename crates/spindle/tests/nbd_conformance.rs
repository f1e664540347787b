//! Protocol conformance of `spindle nbd`, written against the spec
//! (`doc/proto.md`): libnbd (python3-libnbd) for what a well-behaved
//! client sends, and raw sockets for what libnbd will not send. Every case
//! runs while a witness client stays connected, and the witness is served
//! after each one.

mod common;

use common::nbd::NbdServer;
use common::{ok, p, scratch};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE: u32 = 0x6744_6698;
const STRUCTURED: u32 = 0x668e_33ef;
const ERR: u32 = 1 << 31;

struct Client(TcpStream);

impl Client {
    /// Connects and reads the greeting; sends the client flags.
    fn connect(addr: &str, flags: u32) -> Client {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut c = Client(s);
        let g = c.bytes(18);
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(u64::from_be_bytes(g[8..16].try_into().unwrap()), IHAVEOPT);
        c.send(&flags.to_be_bytes());
        c
    }
    fn send(&mut self, b: &[u8]) {
        self.0.write_all(b).unwrap();
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.0.read_exact(&mut b).unwrap();
        b
    }
    /// Whether the server closed the connection (EOF within the timeout).
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Ok(0) | Err(_))
    }
    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }
    /// One option reply: (type, data).
    fn reply(&mut self, opt: u32) -> (u32, Vec<u8>) {
        let h = self.bytes(20);
        assert_eq!(u64::from_be_bytes(h[..8].try_into().unwrap()), REPLY_MAGIC);
        assert_eq!(u32::from_be_bytes(h[8..12].try_into().unwrap()), opt);
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        (kind, self.bytes(len))
    }
    /// Replies until ACK or an error; returns the last type.
    fn final_reply(&mut self, opt: u32) -> u32 {
        loop {
            let (k, _) = self.reply(opt);
            if k == 1 || k & ERR != 0 {
                return k;
            }
        }
    }
    /// STRUCTURED_REPLY (optionally) and GO on `name`: transmission flags.
    fn go(&mut self, name: &str, structured: bool) -> u16 {
        if structured {
            self.option(8, &[]);
            assert_eq!(self.final_reply(8), 1);
        }
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        self.option(7, &d);
        let mut flags = 0;
        loop {
            let (k, data) = self.reply(7);
            if k == 3 && data[..2] == [0, 0] {
                flags = u16::from_be_bytes([data[10], data[11]]);
            }
            if k == 1 {
                return flags;
            }
            assert_eq!(k & ERR, 0, "GO failed: {k:#x}");
        }
    }
    fn request(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        self.send(&b);
    }
    /// A simple reply: (cookie, error).
    fn simple(&mut self) -> (u64, u32) {
        let h = self.bytes(16);
        assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), SIMPLE);
        (
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
        )
    }
    /// Structured chunks until DONE: (cookie, first error, data bytes).
    fn structured(&mut self) -> (u64, u32, usize) {
        let (mut err, mut data) = (0, 0);
        loop {
            let h = self.bytes(20);
            let magic = u32::from_be_bytes(h[..4].try_into().unwrap());
            assert_eq!(magic, STRUCTURED, "a structured reply was due");
            let flags = u16::from_be_bytes([h[4], h[5]]);
            let kind = u16::from_be_bytes([h[6], h[7]]);
            let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
            let body = self.bytes(len);
            if kind & 0x8000 != 0 && err == 0 {
                err = u32::from_be_bytes(body[..4].try_into().unwrap());
            }
            if kind == 1 {
                data += len - 8;
            }
            if flags & 1 != 0 {
                return (cookie, err, data);
            }
        }
    }
}

/// The witness: a client that must keep being served.
fn witness_read(w: &mut Client, cookie: u64) {
    w.request(0, 0, cookie, 0, 4096);
    let (c, e) = w.simple();
    assert_eq!((c, e), (cookie, 0), "the witness client is still served");
    w.bytes(4096);
}

/// A client that sends `partial` after its flags and then nothing is
/// disconnected once the server's 2 s handshake limit is over.
fn closed_at_the_limit(addr: &str, partial: &[u8]) {
    let start = std::time::Instant::now();
    let mut c = Client::connect(addr, 1);
    c.send(partial);
    assert!(c.closed());
    let t = start.elapsed();
    assert!(
        t >= Duration::from_millis(1900) && t < Duration::from_secs(8),
        "closed after {t:?}"
    );
}

#[test]
fn raw_socket_cases_get_the_spec_answers_and_others_keep_being_served() {
    let dir = scratch();
    let img = dir.path().join("disk.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&img), "16M"]);
    let srv = NbdServer::start(&["-t", "-p", "0", "--handshake-limit", "2", "-x", "d", p(&img)]);
    let ro = NbdServer::start(&["-t", "-p", "0", "-r", "-x", "d", "null:16M"]);
    let (addr, ro_addr) = (srv.tcp_addr(), ro.tcp_addr());
    let mut w = Client::connect(&addr, 1);
    w.go("d", false);
    let mut cases = 0;
    let mut case = |name: &str, w: &mut Client, f: &mut dyn FnMut()| {
        f();
        cases += 1;
        witness_read(w, cases);
        eprintln!("case {cases}: {name}: ok");
    };

    case("unknown client flags: disconnect", &mut w, &mut || {
        let mut c = Client::connect(&addr, 0x80);
        assert!(c.closed());
    });
    case("bad option magic: disconnect", &mut w, &mut || {
        let mut c = Client::connect(&addr, 1);
        c.send(&[0xAB; 16]);
        assert!(c.closed());
    });
    case("a command before GO: disconnect", &mut w, &mut || {
        let mut c = Client::connect(&addr, 1);
        c.request(0, 0, 1, 0, 512);
        assert!(c.closed());
    });
    case("unknown option: ERR_UNSUP, negotiation goes on", &mut w, &mut || {
        let mut c = Client::connect(&addr, 1);
        c.option(99, b"junk");
        assert_eq!(c.final_reply(99), ERR + 1);
        c.go("d", false);
    });
    case(
        "oversized option: ERR_TOO_BIG unread, negotiation goes on",
        &mut w,
        &mut || {
            let mut c = Client::connect(&addr, 1);
            c.option(3, &vec![0u8; 1 << 20]);
            assert_eq!(c.final_reply(3), ERR + 9);
            c.option(3, &[]);
            assert_eq!(c.final_reply(3), 1);
        },
    );
    case("LIST with data: ERR_INVALID", &mut w, &mut || {
        let mut c = Client::connect(&addr, 1);
        c.option(3, b"x");
        assert_eq!(c.final_reply(3), ERR + 3);
    });
    case("STARTTLS without TLS: ERR_POLICY", &mut w, &mut || {
        let mut c = Client::connect(&addr, 1);
        c.option(5, &[]);
        assert_eq!(c.final_reply(5), ERR + 2);
    });
    case(
        "SET_META_CONTEXT before STRUCTURED_REPLY: ERR_INVALID",
        &mut w,
        &mut || {
            let mut c = Client::connect(&addr, 1);
            let mut d = 1u32.to_be_bytes().to_vec();
            d.push(b'd');
            d.extend_from_slice(&0u32.to_be_bytes());
            c.option(10, &d);
            assert_eq!(c.final_reply(10), ERR + 3);
        },
    );
    case("GO on an unknown export: ERR_UNKNOWN", &mut w, &mut || {
        let mut c = Client::connect(&addr, 1);
        c.option(7, &[0, 0, 0, 1, b'z', 0, 0]);
        assert_eq!(c.final_reply(7), ERR + 6);
    });
    case("EXPORT_NAME of an unknown export: disconnect", &mut w, &mut || {
        let mut c = Client::connect(&addr, 1);
        c.option(1, b"zz");
        assert!(c.closed());
    });
    case("ABORT: ACK, then closed", &mut w, &mut || {
        let mut c = Client::connect(&addr, 1);
        c.option(2, &[]);
        assert_eq!(c.final_reply(2), 1);
        assert!(c.closed());
    });
    case("EXPORT_NAME without zeroes: size and flags only", &mut w, &mut || {
        let mut c = Client::connect(&addr, 3);
        c.option(1, b"d");
        let b = c.bytes(10);
        assert_eq!(u64::from_be_bytes(b[..8].try_into().unwrap()), 16 << 20);
        c.request(2, 0, 1, 0, 0);
        assert!(c.closed(), "DISC closes");
    });
    case(
        "unknown command and unknown flags: EINVAL, connection goes on",
        &mut w,
        &mut || {
            let mut c = Client::connect(&addr, 1);
            c.go("d", false);
            c.request(42, 0, 7, 0, 0);
            assert_eq!(c.simple(), (7, 22));
            c.request(0, 1 << 9, 8, 0, 512);
            assert_eq!(c.simple(), (8, 22));
            c.request(0, 0, 9, 0, 512);
            assert_eq!(c.simple(), (9, 0));
            c.bytes(512);
        },
    );
    case(
        "read past the end: EINVAL; write past the end: ENOSPC (payload skipped)",
        &mut w,
        &mut || {
            let mut c = Client::connect(&addr, 1);
            c.go("d", false);
            c.request(0, 0, 1, (16 << 20) - 512, 1024);
            assert_eq!(c.simple(), (1, 22));
            c.request(1, 0, 2, 16 << 20, 4096);
            c.send(&[0x77; 4096]);
            assert_eq!(c.simple(), (2, 28));
            c.request(3, 0, 3, 0, 0);
            assert_eq!(c.simple(), (3, 0));
        },
    );
    case(
        "oversized READ and WRITE (33 MiB): EOVERFLOW, payload skipped unread",
        &mut w,
        &mut || {
            let mut c = Client::connect(&addr, 1);
            c.go("d", true);
            c.request(0, 0, 1, 0, 33 << 20);
            assert_eq!(c.structured(), (1, 75, 0));
            c.request(1, 0, 2, 0, 33 << 20);
            c.send(&vec![0x55; 33 << 20]);
            assert_eq!(c.structured(), (2, 75, 0));
            c.request(0, 0, 3, 0, 4096);
            assert_eq!(c.structured(), (3, 0, 4096));
        },
    );
    case("BLOCK_STATUS without a context: EINVAL", &mut w, &mut || {
        let mut c = Client::connect(&addr, 1);
        c.go("d", true);
        c.request(7, 0, 1, 0, 4096);
        assert_eq!(c.structured(), (1, 22, 0));
    });
    case(
        "writes on a read-only export: EPERM, payload skipped",
        &mut w,
        &mut || {
            let mut c = Client::connect(&ro_addr, 1);
            let flags = c.go("d", false);
            assert_ne!(flags & 2, 0, "READ_ONLY is advertised");
            c.request(1, 0, 1, 0, 8192);
            c.send(&[1; 8192]);
            assert_eq!(c.simple(), (1, 1));
            c.request(6, 0, 2, 0, 8192);
            assert_eq!(c.simple(), (2, 1));
            c.request(4, 0, 3, 0, 8192);
            assert_eq!(c.simple(), (3, 1));
            c.request(0, 0, 4, 0, 512);
            assert_eq!(c.simple(), (4, 0));
            c.bytes(512);
        },
    );
    case("bad request magic: disconnect", &mut w, &mut || {
        let mut c = Client::connect(&addr, 1);
        c.go("d", false);
        c.send(&[0xEE; 28]);
        assert!(c.closed());
    });
    case(
        "a client that disconnects in the middle of a write",
        &mut w,
        &mut || {
            let mut c = Client::connect(&addr, 1);
            c.go("d", false);
            c.request(1, 0, 1, 0, 1 << 20);
            c.send(&[9; 4096]);
            drop(c);
        },
    );
    case(
        "pipelined requests: every reply comes, cookies matched",
        &mut w,
        &mut || {
            let mut c = Client::connect(&addr, 1);
            c.go("d", false);
            let mut batch = Vec::new();
            for i in 0..200u64 {
                let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
                b.extend_from_slice(&0u16.to_be_bytes());
                b.extend_from_slice(&1u16.to_be_bytes());
                b.extend_from_slice(&(1000 + i).to_be_bytes());
                b.extend_from_slice(&(i * 65536).to_be_bytes());
                b.extend_from_slice(&65536u32.to_be_bytes());
                b.extend_from_slice(&vec![i as u8; 65536]);
                batch.extend(b);
            }
            // More than the per-connection caps (64 requests, 64 MiB): admitted as credits return.
            let mut sender = c.0.try_clone().unwrap();
            let t = std::thread::spawn(move || sender.write_all(&batch).unwrap());
            let mut seen: Vec<u64> = (0..200)
                .map(|_| c.simple())
                .map(|(ck, e)| {
                    assert_eq!(e, 0);
                    ck
                })
                .collect();
            t.join().unwrap();
            seen.sort();
            assert_eq!(seen, (1000..1200).collect::<Vec<_>>());
        },
    );
    case(
        "a client silent after its flags: disconnected at the handshake limit",
        &mut w,
        &mut || closed_at_the_limit(&addr, &[]),
    );
    case(
        "a client stalled inside an option: disconnected at the handshake limit",
        &mut w,
        &mut || {
            closed_at_the_limit(
                &addr,
                &[IHAVEOPT.to_be_bytes().as_slice(), &3u32.to_be_bytes()].concat(),
            )
        },
    );
    eprintln!("raw-socket conformance cases: {cases}");
    assert_eq!(cases, 22);
    drop(w);
    assert!(srv.stop() && ro.stop());
}

#[test]
fn libnbd_cases_against_the_spec() {
    let has = std::process::Command::new("/usr/bin/python3")
        .args(["-c", "import nbd"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has,
        "python3-libnbd is required for this test: install it with `apt-get install -y python3-libnbd`"
    );
    let dir = scratch();
    let img = dir.path().join("disk.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&img), "16M"]);
    ok("qemu-io", &["-f", "qcow2", "-c", "write -P 0xaa 0 1M", p(&img)]);
    let srv = NbdServer::start(&["-t", "-p", "0", "-A", "--discard=unmap", p(&img)]);
    let script = dir.path().join("cases.py");
    std::fs::write(&script, include_str!("data/nbd_cases.py")).unwrap();
    let out = ok("/usr/bin/python3", &[p(&script), &srv.uri]);
    eprintln!("{out}");
    assert!(out.contains("libnbd conformance cases:"), "{out}");
    assert!(srv.stop());
    common::assert_clean(&img);
}

/// A null device's reads, however short, are answered with hole chunks
/// (its status costs nothing: qemu-nbd's null-co does the same), and with
/// one data chunk of zeroes when the client forbids fragments (DF).
#[test]
fn a_short_read_of_a_null_device_is_one_hole_chunk() {
    let srv = NbdServer::start(&["-t", "-p", "0", "null:16M"]);
    let script = r#"
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
chunks = []
def chunk(subbuf, offset, status, err):
    chunks.append((offset, len(subbuf), status))
    return 0
assert h.pread_structured(4096, 8192, chunk) == bytes(4096)
assert chunks == [(8192, 4096, nbd.READ_HOLE)], chunks
chunks.clear()
assert h.pread_structured(4096, 8192, chunk, flags=nbd.CMD_FLAG_DF) == bytes(4096)
assert chunks == [(8192, 4096, nbd.READ_DATA)], chunks
print("null reads: ok")
"#;
    let out = ok("/usr/bin/python3", &["-c", script, &srv.uri]);
    assert!(out.contains("null reads: ok"), "{out}");
    assert!(srv.stop());
}

/// Holes in structured reads of raw files: a sparse file's read has hole
/// chunks; a dense one (every block written when opened) skips the look,
/// so its reads are data chunks; once a range of it is trimmed, the look
/// is back and finds the hole.
#[test]
fn raw_reads_look_for_holes_only_where_there_can_be_some() {
    let dir = scratch();
    let sparse = dir.path().join("sparse.raw");
    let dense = dir.path().join("dense.raw");
    std::fs::File::create(&sparse).unwrap().set_len(8 << 20).unwrap();
    ok("qemu-io", &["-f", "raw", "-c", "write -P 0x11 0 1M", p(&sparse)]);
    std::fs::write(&dense, vec![0u8; 8 << 20]).unwrap();
    ok("qemu-io", &["-f", "raw", "-c", "write -P 0x22 0 1M", p(&dense)]);
    let script = r#"
import sys, nbd
def chunks_of(h, n, off):
    got = []
    def chunk(subbuf, offset, status, err):
        got.append(status)
        return 0
    h.pread_structured(n, off, chunk)
    return got
h = nbd.NBD()
h.connect_uri(sys.argv[1])
kind = sys.argv[2]
got = chunks_of(h, 2 << 20, 0)
if kind == "sparse":
    assert nbd.READ_HOLE in got and nbd.READ_DATA in got, got
else:
    assert got == [nbd.READ_DATA], got
    h.trim(1 << 20, 1 << 20)
    got = chunks_of(h, 2 << 20, 0)
    assert nbd.READ_HOLE in got, got
    assert h.pread(1 << 20, 1 << 20) == bytes(1 << 20)
print(kind, "ok")
"#;
    for (img, kind) in [(&sparse, "sparse"), (&dense, "dense")] {
        let srv = NbdServer::start(&["-t", "-p", "0", "-f", "raw", "--discard=unmap", p(img)]);
        let out = ok("/usr/bin/python3", &["-c", script, &srv.uri, kind]);
        assert!(out.contains(&format!("{kind} ok")), "{out}");
        assert!(srv.stop());
    }
}
