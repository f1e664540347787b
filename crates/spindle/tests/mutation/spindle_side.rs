//! What Spindle does with one mutated image, in-process: read it all
//! read-only, then open it writable and write, zero, flush and close, then
//! read it back. Every error is kept as its one-line message.

use spindle_block::{open_image, Format, Node, OpenConfig};
use spindle_io::{CacheMode, Runtime, RuntimeConfig};
use std::path::Path;

/// Most of the virtual disk that is read and compared.
pub const MAX_COMPARE: u64 = 64 << 20;
/// Granularity of the "known" map of a read.
pub const CHUNK: u64 = 64 << 10;
/// Every 64 bytes Spindle writes start with this, so data that lands on
/// metadata is found by a scan.
pub const SIGNATURE: &[u8; 8] = b"SPNDLMUT";

/// One guest operation of the write phase.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    /// Write `len` bytes of case data at `off`.
    Write { off: u64, len: u64 },
    /// Write zeroes.
    Zeroes { off: u64, len: u64, unmap: bool },
}

/// A read of the whole disk: bytes, and which chunks read without error.
#[derive(Default)]
pub struct Disk {
    /// The bytes (unknown chunks are zero).
    pub data: Vec<u8>,
    /// Per CHUNK: read without error.
    pub known: Vec<bool>,
    /// The first read error.
    pub error: Option<String>,
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let known = self.known.iter().filter(|k| **k).count();
        write!(
            f,
            "{} bytes, {known}/{} chunks read, error {:?}",
            self.data.len(),
            self.known.len(),
            self.error
        )
    }
}

/// Everything Spindle did with the image.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Virtual size Spindle saw (read-only open).
    pub size: Option<u64>,
    /// The read-only open's error.
    pub open_ro: Option<String>,
    /// The disk before writing.
    pub before: Option<Disk>,
    /// The writable open's error.
    pub open_rw: Option<String>,
    /// Each op with its error.
    pub ops: Vec<(Op, Option<String>)>,
    /// Flush and close errors.
    pub close: Option<String>,
    /// The disk after closing, reopened read-only.
    pub after: Option<Disk>,
}

impl Outcome {
    /// Every error message Spindle produced.
    pub fn errors(&self) -> Vec<&str> {
        let mut v: Vec<&str> = [&self.open_ro, &self.open_rw, &self.close]
            .iter()
            .filter_map(|e| e.as_deref())
            .collect();
        v.extend(self.ops.iter().filter_map(|(_, e)| e.as_deref()));
        for d in [&self.before, &self.after].into_iter().flatten() {
            v.extend(d.error.as_deref());
        }
        v
    }
}

/// The bytes the case writes at guest offset `off`: every 64 bytes the
/// signature, the case number and the offset, then a fill byte.
pub fn pattern(case: u32, off: u64, len: u64) -> Vec<u8> {
    let mut v = vec![(case as u8) | 1; len as usize];
    for (i, c) in v.chunks_mut(64).enumerate() {
        let mut h = [0u8; 24];
        h[..8].copy_from_slice(SIGNATURE);
        h[8..12].copy_from_slice(&case.to_be_bytes());
        h[12..20].copy_from_slice(&(off + 64 * i as u64).to_be_bytes());
        let n = c.len().min(24);
        c[..n].copy_from_slice(&h[..n]);
    }
    v
}

fn cfg(read_only: bool) -> OpenConfig {
    OpenConfig {
        format: Some(Format::Qcow2),
        cache: CacheMode::Unsafe,
        read_only,
        ..Default::default()
    }
}

async fn read_all(node: &Node) -> Disk {
    let size = node.size().min(MAX_COMPARE);
    let mut d = Disk {
        data: vec![0; size as usize],
        ..Default::default()
    };
    let mut off = 0;
    while off < size {
        let n = (size - off).min(CHUNK);
        let buf = &mut d.data[off as usize..(off + n) as usize];
        match node.read_into(off, buf).await {
            Ok(()) => d.known.push(true),
            Err(e) => {
                buf.fill(0);
                d.known.push(false);
                d.error.get_or_insert(e.to_string());
            }
        }
        off += n;
    }
    d
}

/// Runs the three phases on `img`.
pub fn run(img: &Path, case: u32, ops: &[Op]) -> Outcome {
    let mut out = Outcome::default();
    let rt = Runtime::new(RuntimeConfig {
        depth: 64,
        ..Default::default()
    })
    .expect("runtime");
    let spec = img.to_str().expect("utf-8 path");
    rt.block_on(async {
        match open_image(spec, &cfg(true)) {
            Err(e) => out.open_ro = Some(e.to_string()),
            Ok(node) => {
                out.size = Some(node.size());
                out.before = Some(read_all(&node).await);
                let _ = node.close().await;
            }
        }
        // io_uring drops its file references, and so the image locks, a
        // moment after the close.
        crate::common::wait_unlocked(img);
        let node = match open_image(spec, &cfg(false)) {
            Err(e) => {
                out.open_rw = Some(e.to_string());
                return;
            }
            Ok(n) => n,
        };
        let size = node.size();
        for &op in ops {
            let r = match op {
                Op::Write { off, len } if off + len <= size => {
                    let b = pattern(case, off, len);
                    node.write_from(off, &b, false).await
                }
                Op::Zeroes { off, len, unmap } if off + len <= size => node.write_zeroes(off, len, unmap).await,
                _ => continue,
            };
            out.ops.push((op, r.err().map(|e| e.to_string())));
        }
        let f = node.flush().await.err();
        let c = node.close().await.err();
        out.close = f.or(c).map(|e| e.to_string());
        drop(node);
        crate::common::wait_unlocked(img);
        if let Ok(node) = open_image(spec, &cfg(true)) {
            out.after = Some(read_all(&node).await);
            let _ = node.close().await;
        }
    });
    crate::common::wait_unlocked(img);
    out
}
