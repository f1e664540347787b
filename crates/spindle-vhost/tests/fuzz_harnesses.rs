//! The fuzz harnesses of `fuzz/` in the normal suite: every input of the
//! committed seed corpora, then deterministic mutations of them, must run
//! without a panic (and, for the vhost-user sessions, leave the export
//! serving the next frontend).
//!
//! The seeds are defined here; `cargo test -p spindle-vhost --test
//! fuzz_harnesses -- --ignored write_seed_corpus` writes them to
//! `fuzz/corpus/`, and `seeds_are_in_the_corpus` keeps the two in step.

use spindle_vhost::blk::request::*;
use spindle_vhost::fuzzing::chain::{AVAIL, DESC};
use spindle_vhost::fuzzing::session::Op;
use spindle_vhost::fuzzing::{blk_chain, vhost_user_session};
use std::path::PathBuf;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

fn corpus(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target)
}

/// The committed seeds of a corpus (`NAME.seed`; what a fuzzer adds there
/// is not tracked), by name.
fn read_corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus(target);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().strip_suffix(".seed")?.to_owned();
            Some((name, std::fs::read(e.path()).unwrap()))
        })
        .collect();
    out.sort();
    out
}

/// Deterministic mutations: bit flips, byte overwrites, truncation and
/// duplicated runs, from a fixed xorshift seed.
struct Mutator(u64);

impl Mutator {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn mutate(&mut self, seed: &[u8], hot: usize) -> Vec<u8> {
        let mut v = seed.to_vec();
        if v.is_empty() {
            return v;
        }
        for _ in 0..1 + self.below(6) {
            // Most edits land in the first `hot` bytes (headers, rings).
            let i = if self.below(4) > 0 {
                self.below(hot.min(v.len()))
            } else {
                self.below(v.len())
            };
            match self.below(6) {
                0 => v[i] ^= 1 << self.below(8),
                1 => v[i] = self.next() as u8,
                2 => v[i] = 0xff,
                3 => v[i] = 0,
                4 => v.truncate(i.max(1)),
                _ => {
                    let n = self.below(16).min(v.len() - i);
                    let run = v[i..i + n].to_vec();
                    let at = self.below(v.len());
                    v.splice(at..at, run);
                }
            }
        }
        v
    }
}

/// Runs `harness` on every seed, then on `mutants` mutations of them.
/// Returns each seed's result.
fn run_corpus<R>(target: &str, mutants: usize, hot: usize, harness: fn(&[u8]) -> R) -> Vec<(String, R)> {
    let seeds = read_corpus(target);
    assert!(!seeds.is_empty(), "no seeds in {}", corpus(target).display());
    let results = seeds.iter().map(|(n, s)| (n.clone(), harness(s))).collect();
    let mut m = Mutator(0x5eed_0f5a_1d1e_0001);
    for k in 0..mutants {
        let (_, s) = &seeds[k % seeds.len()];
        harness(&m.mutate(s, hot));
    }
    eprintln!("{target}: {} seeds and {mutants} mutations", seeds.len());
    results
}

fn result<'a, R>(results: &'a [(String, R)], name: &str) -> &'a R {
    &results
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("seed {name}"))
        .1
}

#[test]
fn request_parser_over_seeds_and_mutations() {
    let r = run_corpus("vhost_blk_request", 600, 0x2400, blk_chain);
    // The seeds reach what they were made for (the harness is not a no-op).
    let ok = |popped, ok| spindle_vhost::fuzzing::chain::Outcome { popped, ok };
    assert_eq!(*result(&r, "read"), ok(1, 1));
    assert_eq!(*result(&r, "write"), ok(1, 1));
    assert_eq!(*result(&r, "write_read_only"), ok(1, 0));
    assert_eq!(*result(&r, "flush_and_get_id"), ok(2, 2));
    assert_eq!(*result(&r, "discard_and_write_zeroes"), ok(2, 2));
    assert_eq!(*result(&r, "indirect_read"), ok(1, 1));
    assert_eq!(*result(&r, "past_the_end_of_the_disk"), ok(1, 0));
    assert_eq!(*result(&r, "avail_index_1000"), ok(0, 0), "a broken ring pops nothing");
    assert_eq!(
        *result(&r, "head_out_of_range"),
        ok(0, 0),
        "a head past the table stops the ring"
    );
}

#[test]
fn vhost_user_sessions_over_seeds_and_mutations() {
    let r = run_corpus("vhost_user_session", 150, 64, vhost_user_session);
    // Sessions that a correct backend follows to the end, and ones it ends
    // at the refused message.
    let seeds = session_seeds();
    let ops = |name: &str| seeds.iter().find(|s| s.0 == name).unwrap().1.len();
    for full in [
        "good_io",
        "avail_index_1000_then_stop_and_setup",
        "avail_index_1000_then_reset",
        "queue_size_1",
        "memory_shrinks_under_a_ring",
        "config_space",
    ] {
        assert_eq!(*result(&r, full), ops(full), "{full} runs to its end");
    }
    assert_eq!(*result(&r, "queue_size_3"), 1, "SET_VRING_NUM 3 is refused");
    assert_eq!(
        *result(&r, "ring_outside_memory"),
        2,
        "SET_VRING_ADDR outside memory is refused"
    );
}

// ---- The seeds ----

/// A `blk_chain` input: queue size 1 << `exp`, `flags`, descriptors at the
/// harness's table, `heads` published, and bytes placed in memory.
fn chain_input(exp: u8, flags: u8, descs: &[(u64, u32, u32, u16)], heads: &[u16], bytes: &[(u64, &[u8])]) -> Vec<u8> {
    let mut mem = vec![0u8; 0x2000];
    let mut put = |at: u64, b: &[u8]| {
        let at = at as usize;
        if mem.len() < at + b.len() {
            mem.resize(at + b.len(), 0);
        }
        mem[at..at + b.len()].copy_from_slice(b);
    };
    put(DESC, &table(descs));
    put(AVAIL + 2, &(heads.len() as u16).to_le_bytes());
    for (i, h) in heads.iter().enumerate() {
        put(AVAIL + 4 + 2 * i as u64, &h.to_le_bytes());
    }
    for (at, b) in bytes {
        put(*at, b);
    }
    [vec![exp, flags, 0, 0], mem].concat()
}

/// A descriptor table: (address, length, flags, next) each.
fn table(descs: &[(u64, u32, u32, u16)]) -> Vec<u8> {
    let mut t = Vec::new();
    for &(addr, len, f, next) in descs {
        t.extend_from_slice(&addr.to_le_bytes());
        t.extend_from_slice(&len.to_le_bytes());
        t.extend_from_slice(&(f as u16).to_le_bytes());
        t.extend_from_slice(&next.to_le_bytes());
    }
    t
}

fn header(kind: u32, sector: u64) -> Vec<u8> {
    [kind.to_le_bytes(), 0u32.to_le_bytes()]
        .concat()
        .into_iter()
        .chain(sector.to_le_bytes())
        .collect()
}

const N: u32 = VRING_DESC_F_NEXT;
const W: u32 = VRING_DESC_F_WRITE;

fn chain_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let (h, d, s) = (0x2000u64, 0x3000u64, 0x2100u64);
    let rw = |kind| {
        let w = if kind == VIRTIO_BLK_T_IN { W } else { 0 };
        vec![(h, 16, N, 1), (d, 4096, N | w, 2), (s, 1, W, 0)]
    };
    let seg = |sector: u64, n: u32, flags: u32| -> Vec<u8> {
        [
            sector.to_le_bytes().to_vec(),
            n.to_le_bytes().to_vec(),
            flags.to_le_bytes().to_vec(),
        ]
        .concat()
    };
    let segs = [seg(0, 8, 0), seg(64, 16, 0)].concat();
    vec![
        (
            "read",
            chain_input(6, 0, &rw(VIRTIO_BLK_T_IN), &[0], &[(h, &header(VIRTIO_BLK_T_IN, 8))]),
        ),
        (
            "write",
            chain_input(6, 2, &rw(VIRTIO_BLK_T_OUT), &[0], &[(h, &header(VIRTIO_BLK_T_OUT, 8))]),
        ),
        (
            "write_read_only",
            chain_input(6, 1, &rw(VIRTIO_BLK_T_OUT), &[0], &[(h, &header(VIRTIO_BLK_T_OUT, 8))]),
        ),
        (
            "flush_and_get_id",
            chain_input(
                4,
                0,
                &[
                    (h, 16, N, 1),
                    (s, 1, W, 0),
                    (0x2200, 16, N, 3),
                    (d, 20, N | W, 4),
                    (s + 1, 1, W, 0),
                ],
                &[0, 2],
                &[
                    (h, &header(VIRTIO_BLK_T_FLUSH, 0)),
                    (0x2200, &header(VIRTIO_BLK_T_GET_ID, 0)),
                ],
            ),
        ),
        (
            "discard_and_write_zeroes",
            chain_input(
                4,
                0,
                &[
                    (h, 16, N, 1),
                    (d, 32, N, 2),
                    (s, 1, W, 0),
                    (0x2200, 16, N, 4),
                    (d, 32, N, 5),
                    (s + 1, 1, W, 0),
                ],
                &[0, 3],
                &[
                    (h, &header(VIRTIO_BLK_T_DISCARD, 0)),
                    (0x2200, &header(VIRTIO_BLK_T_WRITE_ZEROES, 0)),
                    (d, &segs),
                ],
            ),
        ),
        (
            "indirect_read",
            chain_input(
                0,
                0,
                &[(0x2800, 48, VRING_DESC_F_INDIRECT, 0)],
                &[0],
                &[
                    (h, &header(VIRTIO_BLK_T_IN, 0)),
                    (0x2800, &table(&[(h, 16, N, 1), (d, 512, N | W, 2), (s, 1, W, 0)])),
                ],
            ),
        ),
        (
            "data_across_the_hole",
            chain_input(
                6,
                0,
                &[
                    (h, 16, N, 1),
                    (0xf000, 0x2000, N | W, 2),
                    (0x20000, 512, N | W, 3),
                    (s, 1, W, 0),
                ],
                &[0],
                &[(h, &header(VIRTIO_BLK_T_IN, 0))],
            ),
        ),
        (
            "descriptor_loop",
            chain_input(
                4,
                0,
                &[(h, 16, N, 1), (d, 512, N | W, 0)],
                &[0],
                &[(h, &header(VIRTIO_BLK_T_IN, 0))],
            ),
        ),
        (
            "head_out_of_range",
            chain_input(
                4,
                0,
                &rw(VIRTIO_BLK_T_IN),
                &[16, 0],
                &[(h, &header(VIRTIO_BLK_T_IN, 0))],
            ),
        ),
        ("avail_index_1000", {
            let mut v = chain_input(6, 0, &rw(VIRTIO_BLK_T_IN), &[0], &[(h, &header(VIRTIO_BLK_T_IN, 0))]);
            v[4 + AVAIL as usize + 2..][..2].copy_from_slice(&1000u16.to_le_bytes());
            v
        }),
        (
            "past_the_end_of_the_disk",
            chain_input(6, 0, &rw(VIRTIO_BLK_T_IN), &[0], &[(h, &header(VIRTIO_BLK_T_IN, 2047))]),
        ),
    ]
}

/// Features every Spindle export offers (VERSION_1, PROTOCOL_FEATURES,
/// EVENT_IDX, INDIRECT_DESC, FLUSH): what a frontend acks again after
/// RESET_DEVICE.
const FEATURES: u64 = 1 << 32 | 1 << 30 | 1 << 29 | 1 << 28 | 1 << 9;

fn session_seeds() -> Vec<(&'static str, Vec<Op>)> {
    use Op::*;
    let setup = vec![Handshake, SetupQueue(0, 64), SetupQueue(1, 64)];
    let io = |q| {
        vec![
            Submit(q, VIRTIO_BLK_T_OUT, 8, 4096, false),
            WaitUsed(q, 19),
            Submit(q, VIRTIO_BLK_T_IN, 8, 4096, true),
            WaitUsed(q, 19),
        ]
    };
    let with = |parts: &[Vec<Op>]| parts.concat();
    vec![
        (
            "good_io",
            with(&[
                setup.clone(),
                io(0),
                io(1),
                vec![Submit(1, VIRTIO_BLK_T_FLUSH, 0, 0, false), WaitUsed(1, 19)],
            ]),
        ),
        (
            "avail_index_1000_then_stop_and_setup",
            with(&[
                setup.clone(),
                vec![Publish(0, 1000), Sleep(4), GetVringBase(0), SetupQueue(0, 64)],
                io(0),
            ]),
        ),
        (
            "avail_index_1000_then_reset",
            with(&[
                setup.clone(),
                vec![
                    Publish(0, 1000),
                    Sleep(4),
                    ResetDevice,
                    SetFeatures(FEATURES),
                    SetupQueue(0, 64),
                    SetupQueue(1, 64),
                ],
                io(1),
            ]),
        ),
        (
            "queue_size_1",
            with(&[vec![Handshake, SetupQueue(0, 1)], io(0), vec![Publish(0, 7), Sleep(2)]]),
        ),
        ("queue_size_3", vec![Handshake, SetVringNum(0, 3), SetupQueue(0, 3)]),
        ("queue_size_32768", vec![Handshake, SetVringNum(1, 32768)]),
        ("queue_size_65535", vec![Handshake, SetVringNum(0, 65535)]),
        (
            "reset_then_setup_without_base",
            with(&[
                setup.clone(),
                io(0),
                vec![
                    ResetDevice,
                    SetFeatures(FEATURES),
                    SetVringNum(0, 64),
                    SetVringAddr(0, 1 << 20, (1 << 20) + 1024, (1 << 20) + 2048),
                    SetVringFds(0),
                    SetVringEnable(0, true),
                ],
                io(0),
            ]),
        ),
        (
            "ring_outside_memory",
            vec![
                Handshake,
                SetVringNum(0, 256),
                SetVringAddr(0, (16 << 20) - 2048, (1 << 20) + 4096, (1 << 20) + 8192),
            ],
        ),
        (
            "memory_shrinks_under_a_ring",
            with(&[
                vec![
                    Handshake,
                    SetupQueue(0, 256),
                    SetupQueue(1, 256),
                    SetMemTableLen(2 << 20),
                    Submit(1, VIRTIO_BLK_T_IN, 0, 512, true),
                    Sleep(2),
                    SetMemTableLen(16 << 20),
                    Kick(1),
                    WaitUsed(1, 19),
                ],
                io(0),
            ]),
        ),
        (
            "memory_regions",
            with(&[
                vec![
                    Handshake,
                    AddMemRegion(32 << 20, 1 << 20, 0),
                    RemoveMemRegion(32 << 20, 1 << 20),
                    RemoveMemRegion(0, 16 << 20),
                    SetMemTableLen(16 << 20),
                ],
                setup[1..].to_vec(),
                io(0),
            ]),
        ),
        (
            "config_space",
            vec![
                Handshake,
                GetConfig(0, 60),
                SetConfig(32, vec![0]),
                SetConfig(0, vec![0xff; 8]),
                GetConfig(32, 1),
            ],
        ),
        (
            "bad_descriptors",
            with(&[
                setup.clone(),
                vec![
                    WriteMem(1 << 20, [0u64.to_le_bytes(), [16, 0, 0, 0, 1, 0, 0, 0]].concat()),
                    WriteMem((1 << 20) + 1024 + 4, vec![0, 0]),
                    Publish(0, 1),
                    WaitUsed(0, 19),
                ],
                io(1),
            ]),
        ),
        (
            "inflight_buffers",
            with(&[
                vec![Handshake, GetInflight(2, 64), SetInflight(0, 0, 0)],
                setup[1..].to_vec(),
                io(0),
                io(1),
                // Queue 0's version (now 1) made 7: refused, the session ends.
                vec![GetVringBase(0), SetInflight(8, 7, 0)],
            ]),
        ),
        (
            "inflight_buffer_of_the_wrong_size",
            vec![Handshake, GetInflight(2, 64), SetInflight(0, 0, -64)],
        ),
        (
            "dirty_logs",
            with(&[
                // A log for 256 MiB of guest memory, then one byte (32 KiB),
                // then LOG_ALL cleared, then a log past the end of its file.
                vec![Handshake, SetLogBase(0, 8192, 0)],
                setup[1..].to_vec(),
                io(0),
                vec![SetLogBase(0, 1, 0)],
                io(1),
                vec![SetFeatures(FEATURES)],
                io(0),
                vec![SetLogBase(0, 4096, 1 << 20)],
            ]),
        ),
        ("dirty_log_unsealed", vec![Handshake, SetLogBase(1, 4096, 0)]),
        ("dirty_log_not_a_memfd", vec![Handshake, SetLogBase(2, 4096, 0)]),
        (
            "raw_garbage",
            vec![Handshake, Raw(vec![1, 0, 0, 0, 1, 0, 0, 0, 255, 255, 0, 0])],
        ),
        (
            "features_and_protocol_features",
            with(&[
                vec![Handshake, SetProtocolFeatures(u64::MAX), SetFeatures(u64::MAX)],
                setup[1..].to_vec(),
            ]),
        ),
    ]
}

#[test]
fn seeds_are_in_the_corpus() {
    let chain: Vec<_> = read_corpus("vhost_blk_request");
    for (name, bytes) in chain_seeds() {
        assert!(
            chain.iter().any(|(n, b)| n == name && *b == bytes),
            "vhost_blk_request/{name} missing or stale: run write_seed_corpus"
        );
    }
    let session: Vec<_> = read_corpus("vhost_user_session");
    for (name, ops) in session_seeds() {
        let bytes = Op::encode(&ops);
        assert_eq!(Op::decode(&bytes), ops, "{name} decodes as it was encoded");
        assert!(
            session.iter().any(|(n, b)| n == name && *b == bytes),
            "vhost_user_session/{name} missing or stale: run write_seed_corpus"
        );
    }
}

#[test]
#[ignore = "writes fuzz/corpus; run by hand after changing the seeds"]
fn write_seed_corpus() {
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = corpus(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.seed")), bytes).unwrap();
    };
    for (name, bytes) in chain_seeds() {
        write("vhost_blk_request", name, &bytes);
    }
    for (name, ops) in session_seeds() {
        write("vhost_user_session", name, &Op::encode(&ops));
    }
}

/// Replays one input of the fuzzer's (a crash or a corpus file):
/// `SPINDLE_FUZZ_INPUT=path cargo test -p spindle-vhost --test
/// fuzz_harnesses -- --ignored replay --nocapture`. The session target's
/// ops are printed first.
#[test]
#[ignore = "replays $SPINDLE_FUZZ_INPUT"]
fn replay() {
    let path = std::env::var("SPINDLE_FUZZ_INPUT").expect("SPINDLE_FUZZ_INPUT");
    let data = std::fs::read(&path).unwrap();
    if path.contains("vhost_blk_request") {
        eprintln!("{:?}", blk_chain(&data));
    } else {
        eprintln!("{:#?}", Op::decode(&data));
        eprintln!("{} ops ran", vhost_user_session(&data));
    }
}
