//! The `qcow2_ops` harness: an image plus an operation script decoded from
//! the fuzzer's bytes. On an image Spindle created itself, a model of the
//! guest-visible contents must match every read, and `check` must stay
//! clean; on an image given as bytes, only "no panic, no hang" holds.
//!
//! Input: byte 0 bit 7 clear: create an image (bits 0-1 the cluster size,
//! 512 B, 4 KiB, 16 KiB or 64 KiB; byte 1 the options: bit 0 compat=0.10,
//! bit 1 extended L2, bit 2 lazy refcounts, bits 3-5 refcount_bits as a
//! power of two, bit 6 zstd; byte 2 the size in 64 KiB units), then the
//! script. Bit 7 set: bytes 1-4 are the length of an image that follows,
//! then the script. Each op is 5 bytes: the op, then two u16 that give
//! offset and length.

use crate::formats::qcow2::header::Compression;
use crate::formats::qcow2::{check, create, CheckMode, CreateOptions, Qcow2};
use crate::{open_image, Format, Node, OpenConfig};
use spindle_io::{CacheMode, Runtime, RuntimeConfig};
use std::path::Path;

/// Most ops of one script.
const MAX_OPS: usize = 64;
/// Largest virtual size a script resizes to.
const MAX_SIZE: u64 = 8 << 20;

/// The guest-visible contents Spindle must show: `None` bytes are
/// unknown (discarded: zero or the old data).
struct Model {
    bytes: Vec<Option<u8>>,
}

impl Model {
    fn check(&self, off: u64, got: &[u8], what: &str) {
        for (i, &b) in got.iter().enumerate() {
            if let Some(want) = self.bytes[off as usize + i] {
                assert_eq!(
                    b,
                    want,
                    "{what}: byte at guest offset {} reads {b:#x}, expected {want:#x}",
                    off + i as u64
                );
            }
        }
    }
    fn set(&mut self, off: u64, len: u64, v: Option<u8>) {
        self.bytes[off as usize..(off + len) as usize].fill(v);
    }
}

fn qcow2(node: &Node) -> Option<&Qcow2> {
    match node {
        Node::Qcow2(q) => Some(q),
        _ => None,
    }
}

fn open(path: &Path) -> Option<Node> {
    // io_uring drops its file references (and so the image locks of the
    // last open) a moment after a close.
    let start = std::time::Instant::now();
    while spindle_io::lock::locked_bytes(path).is_ok_and(|l| !l.is_empty()) && start.elapsed().as_secs() < 5 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let cfg = OpenConfig {
        format: Some(Format::Qcow2),
        cache: CacheMode::Unsafe,
        open_backing: false,
        ..Default::default()
    };
    open_image(path.to_str()?, &cfg).ok()
}

fn create_options(cfg: &[u8]) -> CreateOptions {
    let (a, b, c) = (cfg[0], cfg[1], cfg[2]);
    let cluster_size = [512u64, 4096, 16384, 65536][(a & 3) as usize];
    let v2 = b & 1 != 0;
    let o = CreateOptions {
        size: (c as u64 % 64 + 1) << 16,
        cluster_size,
        version: if v2 { 2 } else { 3 },
        refcount_bits: if v2 { 16 } else { 1 << ((b >> 3) & 7).min(6) },
        lazy_refcounts: !v2 && b & 4 != 0,
        extended_l2: !v2 && b & 2 != 0 && cluster_size >= 16384,
        compression: if !v2 && b & 64 != 0 {
            Compression::Zstd
        } else {
            Compression::Zlib
        },
        ..Default::default()
    };
    // Snapshots need refcounts above 1.
    CreateOptions {
        refcount_bits: o.refcount_bits.max(2),
        ..o
    }
}

/// One decoded op.
#[derive(Debug, Clone, Copy)]
enum Op {
    Read(u64, u64),
    Write(u64, u64, u8),
    Zeroes(u64, u64, bool),
    Discard(u64, u64),
    Resize(u64),
    Flush,
    SnapCreate(u8),
    SnapApply(u8),
    SnapDelete(u8),
    Reopen,
    Check,
}

fn decode(b: &[u8], size: u64) -> Op {
    let (k, x, y) = (
        b[0],
        u16::from_be_bytes([b[1], b[2]]) as u64,
        u16::from_be_bytes([b[3], b[4]]) as u64,
    );
    // Offsets: sector-aligned mostly, any byte sometimes.
    let off = if k & 0x80 != 0 { x * 97 } else { x * 512 } % size.max(1);
    let len = (if k & 0x40 != 0 { y * 4 } else { y % 512 * 512 })
        .clamp(1, 256 << 10)
        .min(size - off);
    match k % 16 {
        0..=2 => Op::Read(off, len),
        3..=5 => Op::Write(off, len, b[4] | 1),
        6 => Op::Zeroes(off, len, k & 0x20 != 0),
        7 => Op::Discard(off, len),
        8 => Op::Resize((x * 4096 + 512).min(MAX_SIZE)),
        9 => Op::Flush,
        10 => Op::SnapCreate(b[1] % 4),
        11 => Op::SnapApply(b[1] % 4),
        12 => Op::SnapDelete(b[1] % 4),
        13 => Op::Reopen,
        _ => Op::Check,
    }
}

async fn assert_clean(q: &Qcow2, when: &str) {
    let r = check(q, CheckMode::Report).await.expect("check runs");
    assert!(
        r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0,
        "check after {when}: {} corruptions, {} leaks, {} errors: {:?}",
        r.corruptions,
        r.leaks,
        r.check_errors,
        r.messages
    );
}

/// Runs the harness on `data`, using `dir` for the image file. Panics when
/// an image Spindle created reads other than its model, or stops being
/// clean.
pub fn qcow2_ops(data: &[u8], dir: &Path) {
    let Ok(rt) = Runtime::new(RuntimeConfig {
        depth: 64,
        ..Default::default()
    }) else {
        return;
    };
    let path = dir.join("ops.qcow2");
    let _ = std::fs::remove_file(&path);
    let (script, modelled) = if data.first().is_some_and(|b| b & 0x80 != 0) {
        let Some(len) = data
            .get(1..5)
            .map(|l| u32::from_be_bytes(l.try_into().unwrap()) as usize)
        else {
            return;
        };
        let Some(img) = data.get(5..5usize.saturating_add(len)) else {
            return;
        };
        if std::fs::write(&path, img).is_err() {
            return;
        }
        (&data[5 + len..], false)
    } else {
        let Some(cfg) = data.get(..3) else { return };
        let opts = create_options(cfg);
        if rt.block_on(create(&path, &opts)).is_err() {
            return;
        }
        (&data[3..], true)
    };
    rt.block_on(run(&path, script, modelled));
}

async fn run(path: &Path, script: &[u8], modelled: bool) {
    let Some(mut node) = open(path) else {
        assert!(!modelled, "cannot open an image Spindle created");
        return;
    };
    let mut model = Model {
        bytes: vec![Some(0); node.size().min(MAX_SIZE) as usize],
    };
    let mut snaps: Vec<(u8, Vec<Option<u8>>)> = Vec::new();
    let mut buf = vec![0u8; 256 << 10];
    for chunk in script.chunks_exact(5).take(MAX_OPS) {
        let size = node.size().min(MAX_SIZE);
        if size == 0 {
            break;
        }
        let op = decode(chunk, size);
        let r = match op {
            Op::Read(off, len) => {
                let r = node.read_into(off, &mut buf[..len as usize]).await;
                if r.is_ok() && modelled {
                    model.check(off, &buf[..len as usize], &format!("{op:?}"));
                }
                r
            }
            Op::Write(off, len, v) => {
                buf[..len as usize].fill(v);
                let r = node.write_from(off, &buf[..len as usize], false).await;
                model.set(off, len, Some(v));
                r
            }
            Op::Zeroes(off, len, unmap) => {
                let r = node.write_zeroes(off, len, unmap).await;
                model.set(off, len, Some(0));
                r
            }
            Op::Discard(off, len) => {
                let r = node.discard(off, len).await;
                model.set(off, len, None);
                r
            }
            Op::Resize(n) => {
                let r = node.resize(n, true).await;
                if r.is_ok() {
                    model.bytes.resize(n as usize, Some(0));
                }
                r
            }
            Op::Flush => node.flush().await,
            Op::SnapCreate(id) | Op::SnapApply(id) | Op::SnapDelete(id) => {
                let Some(q) = qcow2(&node) else { continue };
                let name = format!("s{id}");
                let known = snaps.iter().position(|(i, _)| *i == id);
                match (op, known) {
                    (Op::SnapCreate(_), None) => {
                        let r = q.snapshot_create(&name, 0, 0).await.map(drop);
                        if r.is_ok() {
                            snaps.push((id, model.bytes.clone()));
                        }
                        r
                    }
                    (Op::SnapApply(_), Some(i)) => {
                        let r = q.snapshot_apply(&name).await;
                        if r.is_ok() {
                            model.bytes = snaps[i].1.clone();
                        }
                        r
                    }
                    (Op::SnapDelete(_), Some(i)) => {
                        let r = q.snapshot_delete(&name).await;
                        if r.is_ok() {
                            snaps.remove(i);
                        }
                        r
                    }
                    _ => continue,
                }
            }
            Op::Reopen => {
                let r = node.close().await;
                drop(node);
                match open(path) {
                    Some(n) => node = n,
                    None => {
                        assert!(!modelled, "cannot reopen an image Spindle created");
                        return;
                    }
                }
                r
            }
            Op::Check => {
                if let (true, Some(q)) = (modelled, qcow2(&node)) {
                    assert_clean(q, &format!("{op:?}")).await;
                }
                Ok(())
            }
        };
        // A resize may be refused, and a snapshot operation when narrow
        // refcounts would overflow (the image unchanged); nothing else, and
        // nothing as a corruption.
        if let (true, Err(e)) = (modelled, r) {
            let refusable = matches!(op, Op::Resize(_) | Op::SnapCreate(_) | Op::SnapApply(_));
            let msg = e.to_string();
            assert!(
                refusable && !msg.contains("corrupt"),
                "{op:?} failed on an image Spindle created: {msg}"
            );
        }
    }
    if modelled {
        if let Some(q) = qcow2(&node) {
            assert_clean(q, "the script").await;
        }
    }
    let _ = node.close().await;
}
