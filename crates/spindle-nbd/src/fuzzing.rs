//! A fuzzing harness for what an NBD client controls: the handshake
//! ([`crate::handshake`]) and the transmission-phase requests
//! ([`crate::transmission`]), driven over bytes as the connection drives
//! them (`fuzz/fuzz_targets/nbd_session.rs`; the unit tests run it over
//! seeds and their mutations). Besides "no panic", it checks what the
//! connection relies on:
//! - every option reply is a whole chain of replies with the reply magic,
//!   and a finished handshake names one of the exports;
//! - an accepted request stays inside the export and under the payload
//!   limit, and never writes a read-only export;
//! - a refused write skips exactly its payload, nothing else does;
//! - the reply chunks built for a request have the lengths they declare.

use crate::handshake::{ExportInfo, Negotiation, Step, MAX_OPTION};
use crate::proto::{self, cmd, Request, MAX_PAYLOAD, REQUEST_LEN};
use crate::transmission::{self, Command, Limits};

/// The exports the harness negotiates with: a writable default export
/// and a read-only one with `qemu:allocation-depth`.
pub fn exports() -> Vec<ExportInfo> {
    vec![
        ExportInfo {
            name: String::new(),
            description: "rw".into(),
            size: 1 << 30,
            read_only: false,
            multi_conn: true,
            allocation_depth: false,
            fast_zero: true,
        },
        ExportInfo {
            name: "ro".into(),
            description: "read-only".into(),
            size: (64 << 20) + 512,
            read_only: true,
            multi_conn: false,
            allocation_depth: true,
            fast_zero: false,
        },
    ]
}

/// Bytes read in order; running out ends the session (the client left).
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    /// Skips up to `n` bytes (payload the server reads past unread).
    fn skip(&mut self, n: usize) {
        let n = n.min(self.0.len());
        self.0 = &self.0[n..];
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Checks that `bytes` is a chain of option replies to `option`.
fn check_option_replies(option: u32, mut bytes: &[u8]) {
    assert!(!bytes.is_empty(), "option {option}: an empty reply");
    while !bytes.is_empty() {
        assert!(bytes.len() >= 20, "option {option}: a reply header cut short");
        let magic = u64::from_be_bytes(bytes[0..8].try_into().unwrap_or_default());
        assert_eq!(magic, proto::REPLY_MAGIC, "option {option}: bad reply magic");
        assert_eq!(be32(&bytes[8..12]), option, "a reply to another option");
        let len = be32(&bytes[16..20]) as usize;
        assert!(
            bytes.len() >= 20 + len,
            "option {option}: a reply longer than its bytes"
        );
        bytes = &bytes[20 + len..];
    }
}

/// Checks a structured chunk's declared length against its bytes.
fn check_chunk(chunk: &[u8], payload: usize) {
    assert!(chunk.len() >= 20, "a chunk header cut short");
    assert_eq!(be32(&chunk[0..4]), proto::STRUCTURED_REPLY_MAGIC);
    assert_eq!(
        be32(&chunk[16..20]) as usize,
        chunk.len() - 20 + payload,
        "a chunk's length is wrong"
    );
}

/// How far a session got.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Options answered.
    pub options: usize,
    /// Whether the handshake entered transmission.
    pub transmission: bool,
    /// Requests accepted.
    pub accepted: usize,
    /// Requests refused with an error.
    pub refused: usize,
}

/// Runs one client session from `data`; panics on a broken invariant.
pub fn session(data: &[u8]) -> Outcome {
    let mut out = Outcome::default();
    run(data, &mut out);
    out
}

fn run(data: &[u8], out: &mut Outcome) {
    let mut inp = Input(data);
    let Some(flags) = inp.take(4) else { return };
    let exports = exports();
    let Ok(mut neg) = Negotiation::new(exports.clone(), be32(flags)) else {
        return;
    };
    // The handshake: options until one enters transmission.
    loop {
        let Some(h) = inp.take(16) else { return };
        let mut hdr = [0u8; 16];
        hdr.copy_from_slice(h);
        let Ok((option, len)) = crate::handshake::option_header(&hdr) else {
            return;
        };
        let step = if len > MAX_OPTION {
            inp.skip(len as usize);
            neg.too_big(option)
        } else {
            let Some(body) = inp.take(len as usize) else { return };
            match neg.option(option, body) {
                Ok(s) => s,
                Err(_) => return,
            }
        };
        out.options += 1;
        match step {
            Step::Reply(b) => check_option_replies(option, &b),
            // What follows is TLS records: the harness stops there.
            Step::ReplyAndClose(b) | Step::StartTls(b) => {
                check_option_replies(option, &b);
                return;
            }
            Step::Transmission(b) => {
                if option != proto::opt::EXPORT_NAME {
                    check_option_replies(option, &b);
                }
                break;
            }
        }
    }
    out.transmission = true;
    let done = neg.negotiated().expect("transmission without a negotiated export");
    let export = exports
        .get(done.export)
        .expect("a negotiated export that does not exist");
    let limits = Limits {
        size: export.size,
        read_only: export.read_only,
        structured: done.structured,
        contexts: done.contexts,
        fast_zero: export.fast_zero,
    };
    // Transmission: requests until a bad magic, a disconnect or the end.
    while let Some(h) = inp.take(REQUEST_LEN) {
        let mut hdr = [0u8; REQUEST_LEN];
        hdr.copy_from_slice(h);
        let Some(req) = Request::decode(&hdr) else { return };
        match transmission::validate(&req, &limits) {
            Err(r) => {
                out.refused += 1;
                let want = if req.kind == cmd::WRITE { req.len } else { 0 };
                assert_eq!(r.skip, want, "{req:?}: refused, skipping {} bytes", r.skip);
                inp.skip(r.skip as usize);
                let reply = transmission::error_reply(req.cookie, limits.structured, r.errno, r.why);
                if limits.structured {
                    check_chunk(&reply, 0);
                }
            }
            Ok(c) => {
                out.accepted += 1;
                check_accepted(&req, &c, &limits);
                match c {
                    Command::Write { len, .. } => inp.skip(len as usize),
                    Command::Disconnect => return,
                    _ => {}
                }
            }
        }
    }
}

fn check_accepted(req: &Request, c: &Command, l: &Limits) {
    let within = |offset: u64, len: u32| offset.checked_add(u64::from(len)).is_some_and(|e| e <= l.size);
    match *c {
        Command::Read { offset, len, .. } => {
            assert!(len <= MAX_PAYLOAD && within(offset, len), "{req:?}");
            if l.structured {
                let half = len / 2;
                check_chunk(
                    &transmission::data_chunk(req.cookie, false, offset, half),
                    half as usize,
                );
                check_chunk(
                    &transmission::hole_chunk(req.cookie, true, offset + u64::from(half), len - half),
                    0,
                );
            }
        }
        Command::Write { offset, len, .. } | Command::Cache { offset, len } => {
            assert!(len <= MAX_PAYLOAD && within(offset, len), "{req:?}");
            assert!(
                !(l.read_only && matches!(c, Command::Write { .. })),
                "{req:?} on a read-only export"
            );
        }
        Command::Trim { offset, len, .. } | Command::WriteZeroes { offset, len, .. } => {
            assert!(within(offset, len) && !l.read_only, "{req:?}");
        }
        Command::BlockStatus { offset, len, .. } => {
            assert!(
                l.structured && !l.contexts.is_empty() && len > 0 && within(offset, len),
                "{req:?}"
            );
            let extents = [(len / 2, 0), (len - len / 2, 3)];
            check_chunk(&transmission::block_status_chunk(req.cookie, true, 1, &extents), 0);
        }
        Command::Flush | Command::Disconnect => {}
    }
}

/// Seeds: well-formed sessions of each kind, as the fuzz corpus holds them.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    fn option(out: &mut Vec<u8>, option: u32, data: &[u8]) {
        out.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
    }
    fn name_and_infos(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }
    fn meta(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }
    fn request(out: &mut Vec<u8>, kind: u16, flags: u16, offset: u64, len: u32) {
        let r = Request {
            flags,
            kind,
            cookie: out.len() as u64,
            offset,
            len,
        };
        out.extend_from_slice(&r.encode());
        if kind == cmd::WRITE {
            out.extend(std::iter::repeat_n(0xa5, len as usize));
        }
    }
    let flags = (proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).to_be_bytes();
    let mut full = flags.to_vec();
    option(&mut full, proto::opt::LIST, &[]);
    option(&mut full, proto::opt::STRUCTURED_REPLY, &[]);
    option(&mut full, proto::opt::LIST_META_CONTEXT, &meta("", &["base:"]));
    option(&mut full, proto::opt::SET_META_CONTEXT, &meta("", &["base:allocation"]));
    option(&mut full, proto::opt::INFO, &name_and_infos("", &[0, 1, 2, 3]));
    option(&mut full, proto::opt::GO, &name_and_infos("", &[3]));
    request(&mut full, cmd::WRITE, proto::cflag::FUA, 4096, 512);
    request(&mut full, cmd::READ, proto::cflag::DF, 0, 8192);
    request(&mut full, cmd::BLOCK_STATUS, proto::cflag::REQ_ONE, 0, 1 << 20);
    request(
        &mut full,
        cmd::WRITE_ZEROES,
        proto::cflag::NO_HOLE | proto::cflag::FAST_ZERO,
        1 << 20,
        65536,
    );
    request(&mut full, cmd::TRIM, 0, 2 << 20, 65536);
    request(&mut full, cmd::CACHE, 0, 0, 4096);
    request(&mut full, cmd::FLUSH, 0, 0, 0);
    request(&mut full, cmd::READ, 0, (1 << 30) - 512, 1024);
    request(&mut full, cmd::DISC, 0, 0, 0);

    let mut ro = flags.to_vec();
    option(&mut ro, proto::opt::STRUCTURED_REPLY, &[]);
    option(
        &mut ro,
        proto::opt::SET_META_CONTEXT,
        &meta("ro", &["qemu:allocation-depth", "base:allocation"]),
    );
    option(&mut ro, proto::opt::GO, &name_and_infos("ro", &[]));
    request(&mut ro, cmd::WRITE, 0, 0, 512);
    request(&mut ro, cmd::TRIM, 0, 0, 512);
    request(&mut ro, cmd::BLOCK_STATUS, 0, 64 << 20, 512);
    request(&mut ro, cmd::READ, 0, 0, MAX_PAYLOAD + 1);

    let mut old = flags[..].to_vec();
    old[3] = proto::FLAG_C_FIXED_NEWSTYLE as u8;
    option(&mut old, 99, b"unknown option");
    option(&mut old, proto::opt::STARTTLS, &[]);
    option(&mut old, proto::opt::EXPORT_NAME, b"");
    request(&mut old, cmd::READ, 0, 0, 512);
    request(&mut old, cmd::READ, proto::cflag::DF, 0, 512);
    request(&mut old, 77, 0, 0, 0);
    request(&mut old, cmd::WRITE, 0, 1 << 30, 512);

    let mut big = flags.to_vec();
    big.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    big.extend_from_slice(&proto::opt::INFO.to_be_bytes());
    big.extend_from_slice(&(MAX_OPTION + 1).to_be_bytes());
    big.extend(std::iter::repeat_n(0, MAX_OPTION as usize + 1));
    option(&mut big, proto::opt::ABORT, &[]);

    vec![
        ("structured_go", full),
        ("read_only_depth", ro),
        ("export_name", old),
        ("too_big_then_abort", big),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seeds_run_through_the_whole_session() {
        let want = [
            ("structured_go", 6, true, 8, 1),
            ("read_only_depth", 3, true, 1, 3),
            ("export_name", 3, true, 1, 3),
            ("too_big_then_abort", 2, false, 0, 0),
        ];
        for ((name, s), (n, options, transmission, accepted, refused)) in seeds().into_iter().zip(want) {
            assert_eq!(name, n);
            let o = session(&s);
            assert_eq!(
                o,
                Outcome {
                    options,
                    transmission,
                    accepted,
                    refused
                },
                "{name}"
            );
            // Every prefix is a client that left early.
            for cut in 0..s.len().min(400) {
                session(&s[..cut]);
            }
        }
    }

    #[test]
    fn mutated_seeds_break_no_invariant() {
        // A small deterministic mutator: byte flips, overwrites with
        // boundary values, all over each seed.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for (_, s) in seeds() {
            for _ in 0..2000 {
                let mut m = s.clone();
                for _ in 0..1 + next() % 4 {
                    let at = (next() as usize) % m.len();
                    m[at] = match next() % 4 {
                        0 => m[at] ^ (1 << (next() % 8)),
                        1 => 0xff,
                        2 => 0,
                        _ => next() as u8,
                    };
                }
                session(&m);
            }
        }
    }

    /// Writes the seeds to `fuzz/corpus/nbd_session/` (run by hand).
    #[test]
    #[ignore]
    fn write_seed_corpus() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/nbd_session");
        std::fs::create_dir_all(&dir).unwrap();
        for (name, s) in seeds() {
            std::fs::write(dir.join(format!("{name}.seed")), s).unwrap();
        }
    }
}
