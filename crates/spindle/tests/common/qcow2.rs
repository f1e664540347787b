//! Reading and patching qcow2 metadata in place, to build the corrupt
//! images the hardening tests need (big-endian fields, as on disk).

use std::os::unix::fs::FileExt;
use std::path::Path;

/// Offset bits of L1/L2 entries.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// Reads a big-endian u64 at `off`.
pub fn be64(img: &Path, off: u64) -> u64 {
    let mut b = [0u8; 8];
    std::fs::File::open(img).unwrap().read_exact_at(&mut b, off).unwrap();
    u64::from_be_bytes(b)
}

/// Reads a big-endian u32 at `off`.
pub fn be32(img: &Path, off: u64) -> u32 {
    let mut b = [0u8; 4];
    std::fs::File::open(img).unwrap().read_exact_at(&mut b, off).unwrap();
    u32::from_be_bytes(b)
}

/// Writes bytes at `off`.
pub fn poke(img: &Path, off: u64, bytes: &[u8]) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(img)
        .unwrap()
        .write_all_at(bytes, off)
        .unwrap();
}

/// Cluster size from the header.
pub fn cluster_size(img: &Path) -> u64 {
    1 << be32(img, 20)
}

/// The active L1 table's offset.
pub fn l1_offset(img: &Path) -> u64 {
    be64(img, 40)
}

/// Host offset of the L2 table of L1 index `i`.
pub fn l2_table(img: &Path, i: u64) -> u64 {
    be64(img, l1_offset(img) + i * 8) & OFFSET_MASK
}

/// Offset of the L2 entry of guest cluster `gc` (within the first L2
/// table), for images with 8-byte (`words` = 1) or 16-byte entries.
pub fn l2_entry_at(img: &Path, gc: u64, words: u64) -> u64 {
    l2_table(img, 0) + gc * 8 * words
}

/// The refcount table's offset.
pub fn refcount_table(img: &Path) -> u64 {
    be64(img, 48)
}

/// Bytes `[off, off + len)` of the file.
pub fn bytes(img: &Path, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    std::fs::File::open(img).unwrap().read_exact_at(&mut b, off).unwrap();
    b
}

/// Whether the header has the corrupt bit.
pub fn corrupt_bit(img: &Path) -> bool {
    be64(img, 72) & 2 != 0
}
