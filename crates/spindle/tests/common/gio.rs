//! The test guest's disk workload, tests/guest/gio.c: building it, the
//! block pattern it writes (the host prefills and checks images with the
//! same pattern), and reading what it reports on the console.
#![allow(dead_code)]

use super::{ok, p};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// gio's block size: every block carries its number and generation.
pub const BS: u64 = 4096;
const MAGIC: u64 = 0x4f49_474c_444e_5053;
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn word(block: u64, gen: u64, i: u64) -> u64 {
    let seed = block.wrapping_mul(0xd1b5_4a32_d192_ed03) ^ gen.wrapping_mul(GOLDEN);
    match i {
        0 => MAGIC,
        1 => block,
        2 => gen,
        3 => !block ^ (gen << 32),
        _ => mix64(seed.wrapping_add(i.wrapping_mul(GOLDEN))),
    }
}

/// Writes the pattern of `block` at generation `gen` (> 0) into `out` (BS bytes).
pub fn fill_block(out: &mut [u8], block: u64, gen: u32) {
    for (i, w) in out.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&word(block, gen.into(), i as u64).to_le_bytes());
    }
}

/// What a block holds: `Some(0)` zeroes, `Some(gen)` the pattern of `block`
/// at `gen`, `None` anything else.
pub fn decode(buf: &[u8], block: u64) -> Option<u32> {
    let w = |i: usize| u64::from_le_bytes(buf[i * 8..i * 8 + 8].try_into().unwrap());
    if w(0) != MAGIC {
        return buf.iter().all(|&b| b == 0).then_some(0);
    }
    let gen = w(2);
    if gen == 0 || gen > u32::MAX as u64 {
        return None;
    }
    (0..buf.len() / 8)
        .all(|i| w(i) == word(block, gen, i as u64))
        .then_some(gen as u32)
}

/// Builds gio once per test process (`gcc -static`) and returns its path.
pub fn binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/guest/gio.c");
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("guest");
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("gio");
        let tmp = dir.join(format!("gio.{}", std::process::id()));
        let o = Command::new("gcc")
            .args(["-static", "-O2", "-pthread", "-Wall", "-o"])
            .arg(&tmp)
            .arg(&src)
            .output()
            .unwrap_or_else(|e| {
                panic!("gcc is needed to build the guest's workload tests/guest/gio.c ({e}): apt-get install -y gcc libc6-dev")
            });
        assert!(
            o.status.success(),
            "building tests/guest/gio.c failed (a static build needs libc6-dev: apt-get install -y gcc libc6-dev):\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::fs::rename(&tmp, &out).unwrap();
        out
    })
    .clone()
}

/// Where gio works on each disk: `writers` regions of `region_mib`, then
/// `hold_mib` that only its heavy readers read.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// Writer threads per disk.
    pub writers: u64,
    /// MiB each writer owns.
    pub region_mib: u64,
    /// MiB after the writers' regions, read by the holding readers.
    pub hold_mib: u64,
}

impl Layout {
    /// Blocks per writer.
    pub fn writer_blocks(&self) -> u64 {
        self.region_mib * (1 << 20) / BS
    }

    /// Blocks the layout covers, from block 0.
    pub fn blocks(&self) -> u64 {
        self.writers * self.writer_blocks() + self.hold_mib * (1 << 20) / BS
    }

    /// gio's options for this layout.
    pub fn args(&self) -> String {
        format!(
            "--writers {} --region-mib {} --hold-mib {}",
            self.writers, self.region_mib, self.hold_mib
        )
    }

    /// Makes `path` a raw file of `size` bytes whose layout blocks hold
    /// generation `gen`.
    pub fn prefill(&self, path: &Path, size: u64, gen: u32) {
        let mut data = vec![0u8; (self.blocks() * BS) as usize];
        for (b, chunk) in data.chunks_exact_mut(BS as usize).enumerate() {
            fill_block(chunk, b as u64, gen);
        }
        std::fs::write(path, &data).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.set_len(size).unwrap();
    }

    /// The layout's bytes of `img` (any format qemu-img reads), read with
    /// `-U` so a just-killed or still-served image can be looked at.
    pub fn read(&self, img: &Path, work: &Path) -> Vec<u8> {
        let raw = work.join(format!("read-{}.raw", img.file_name().unwrap().to_string_lossy()));
        ok("qemu-img", &["convert", "-U", "-O", "raw", p(img), p(&raw)]);
        let mut data = std::fs::read(&raw).unwrap();
        std::fs::remove_file(&raw).unwrap();
        data.truncate((self.blocks() * BS) as usize);
        data
    }

    /// Checks the blocks of `data` (from [`Layout::read`]): a writer's block
    /// must be one `want(writer, gen)` accepts (gen 0: zeroes), the hold
    /// region must hold `hold_gen`. Returns what failed (at most 10 lines
    /// and a count).
    pub fn check(&self, data: &[u8], hold_gen: u32, want: impl Fn(u64, u32) -> bool) -> Vec<String> {
        let mut bad = Vec::new();
        let per = self.writer_blocks();
        for (b, chunk) in data.chunks_exact(BS as usize).enumerate() {
            let b = b as u64;
            let got = decode(chunk, b);
            let fine = match (b / per < self.writers, got) {
                (_, None) => false,
                (true, Some(g)) => want(b / per, g),
                (false, Some(g)) => g == hold_gen,
            };
            if !fine {
                bad.push(format!(
                    "block {b} (writer {}): {}",
                    b / per,
                    got.map_or("not a pattern of this block".into(), |g| format!("generation {g}"))
                ));
            }
        }
        if bad.len() > 10 {
            let n = bad.len();
            bad.truncate(10);
            bad.push(format!("... {n} blocks in all"));
        }
        bad
    }
}

/// The `key=value` words of a line.
pub fn fields(line: &str) -> HashMap<&str, &str> {
    line.split_whitespace().filter_map(|w| w.split_once('=')).collect()
}

/// The numbers of the last `GIO-SUMMARY` line of `console`.
pub fn summary(console: &str) -> HashMap<String, u64> {
    let line = console
        .lines()
        .rev()
        .find(|l| l.starts_with("GIO-SUMMARY"))
        .unwrap_or_else(|| panic!("gio printed no GIO-SUMMARY:\n{console}"));
    fields(line)
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.parse().unwrap_or(u64::MAX)))
        .collect()
}

/// Fails the test unless gio finished with no I/O error, no verify or
/// hold failure and no hung thread, and the guest kernel logged no block
/// layer error; returns the summary.
pub fn assert_clean(console: &str) -> HashMap<String, u64> {
    let s = summary(console);
    for k in ["errors", "verify_failures", "hold_failures", "hung"] {
        assert_eq!(s.get(k), Some(&0), "gio reports {k}={:?}:\n{console}", s.get(k));
    }
    assert_no_kernel_errors(console);
    assert!(console.contains("GUEST-END rc=0"), "the guest test failed:\n{console}");
    s
}

/// Fails the test when the guest kernel logged a block-layer or virtio error.
pub fn assert_no_kernel_errors(console: &str) {
    for bad in [
        "I/O error",
        "is not a head",
        "out of range",
        "blk_update_request",
        "Buffer I/O",
    ] {
        assert!(!console.contains(bad), "the guest kernel logged '{bad}':\n{console}");
    }
}

/// Per disk, the writers' final generations and whether each was fsynced
/// (`GIO-FINAL vda 7+,7+,8+,6+`).
pub fn finals(console: &str) -> HashMap<String, Vec<(u32, bool)>> {
    console
        .lines()
        .filter_map(|l| l.strip_prefix("GIO-FINAL "))
        .filter_map(|l| l.split_once(' '))
        .map(|(dev, gens)| (dev.to_string(), parse_gens(gens, '+')))
        .collect()
}

/// Per disk, the generations each writer had fsynced when gio acked a
/// kill, and whether a discard was issued since (`z`).
pub fn durable_at_ack(line: &str) -> HashMap<String, Vec<(u32, bool)>> {
    let list = fields(line).get("durable").copied().unwrap_or_default();
    list.split(';')
        .filter_map(|d| d.split_once(':'))
        .map(|(dev, gens)| (dev.to_string(), parse_gens(gens, 'z')))
        .collect()
}

fn parse_gens(list: &str, flag: char) -> Vec<(u32, bool)> {
    list.trim()
        .split(',')
        .map(|g| {
            let f = g.ends_with(flag);
            (g.trim_end_matches(flag).parse().expect("a generation"), f)
        })
        .collect()
}
