//! Write-back caches of L2 slices and refcount blocks.
//!
//! Both caches hold aligned buffers keyed by their host offset and evict the
//! least recently used entry. Dirty entries are written back by the owner
//! ([`super::meta::Meta`]), which enforces the ordering "refcount blocks
//! durable before L2 slices, L2 before L1".

use spindle_io::AlignedBuf;
use std::collections::HashMap;

/// One cached table piece.
pub struct Entry {
    /// The bytes as on disk (big-endian entries).
    pub buf: AlignedBuf,
    /// Modified since read or last written back.
    pub dirty: bool,
    used: u64,
}

/// An LRU cache of fixed-size table pieces.
pub struct TableCache {
    piece: usize,
    cap: usize,
    map: HashMap<u64, Entry>,
    tick: u64,
}

impl TableCache {
    /// `cap` pieces of `piece` bytes.
    pub fn new(piece: usize, cap: usize) -> Self {
        TableCache {
            piece,
            cap: cap.max(2),
            map: HashMap::new(),
            tick: 0,
        }
    }
    /// Bytes per piece.
    pub fn piece_size(&self) -> usize {
        self.piece
    }
    /// The cached piece at `off`, marked used.
    pub fn get(&mut self, off: u64) -> Option<&mut Entry> {
        self.tick += 1;
        let t = self.tick;
        let e = self.map.get_mut(&off)?;
        e.used = t;
        Some(e)
    }
    /// Whether inserting needs an eviction first.
    pub fn full(&self) -> bool {
        self.map.len() >= self.cap
    }
    /// The least recently used piece: (offset, dirty).
    pub fn victim(&self) -> Option<(u64, bool)> {
        self.map.iter().min_by_key(|(_, e)| e.used).map(|(&o, e)| (o, e.dirty))
    }
    /// Drops a piece (the caller wrote it back if it was dirty).
    pub fn remove(&mut self, off: u64) -> Option<Entry> {
        self.map.remove(&off)
    }
    /// Inserts a piece read from disk or freshly built.
    pub fn insert(&mut self, off: u64, buf: AlignedBuf, dirty: bool) -> &mut Entry {
        self.tick += 1;
        let used = self.tick;
        self.map.insert(off, Entry { buf, dirty, used });
        self.map.get_mut(&off).expect("just inserted")
    }
    /// Offsets of dirty pieces, sorted for sequential write-back.
    pub fn dirty(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.map.iter().filter(|(_, e)| e.dirty).map(|(&o, _)| o).collect();
        v.sort_unstable();
        v
    }
    /// Whether anything is dirty.
    pub fn any_dirty(&self) -> bool {
        self.map.values().any(|e| e.dirty)
    }
    /// Forgets every piece (the caller wrote back the dirty ones).
    pub fn clear(&mut self) {
        self.map.clear();
    }
    /// Forgets every piece whose offset lies in `[start, end)`.
    pub fn invalidate_range(&mut self, start: u64, end: u64) {
        self.map.retain(|&o, _| o < start || o >= end);
    }
}

/// Reads a big-endian u64 at entry index `i`.
pub fn get_be64(b: &[u8], i: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[i * 8..i * 8 + 8]);
    u64::from_be_bytes(a)
}

/// Writes a big-endian u64 at entry index `i`.
pub fn put_be64(b: &mut [u8], i: usize, v: u64) {
    b[i * 8..i * 8 + 8].copy_from_slice(&v.to_be_bytes());
}

/// Reads refcount `i` of width `1 << order` bits from a refcount block.
pub fn get_refcount(b: &[u8], order: u32, i: usize) -> u64 {
    let bits = 1usize << order;
    if bits >= 8 {
        let n = bits / 8;
        let mut v = 0u64;
        for &x in &b[i * n..i * n + n] {
            v = (v << 8) | x as u64;
        }
        v
    } else {
        let per = 8 / bits;
        let byte = b[i / per];
        let shift = (i % per) * bits;
        ((byte >> shift) as u64) & ((1u64 << bits) - 1)
    }
}

/// Writes refcount `i` (the value must fit the width).
pub fn set_refcount(b: &mut [u8], order: u32, i: usize, v: u64) {
    let bits = 1usize << order;
    if bits >= 8 {
        let n = bits / 8;
        let bytes = v.to_be_bytes();
        b[i * n..i * n + n].copy_from_slice(&bytes[8 - n..]);
    } else {
        let per = 8 / bits;
        let shift = (i % per) * bits;
        let mask = (((1u16 << bits) - 1) as u8) << shift;
        b[i / per] = (b[i / per] & !mask) | (((v as u8) << shift) & mask);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcount_widths_round_trip() {
        for order in 0..=6 {
            let mut b = vec![0u8; 512];
            let max = if order == 6 {
                u64::MAX
            } else {
                (1u64 << (1 << order)) - 1
            };
            let n = (512 * 8) >> order;
            for i in 0..n {
                set_refcount(&mut b, order, i, (i as u64 * 7) & max);
            }
            for i in 0..n {
                assert_eq!(
                    get_refcount(&b, order, i),
                    (i as u64 * 7) & max,
                    "order {order} idx {i}"
                );
            }
        }
        // QEMU's bit order for sub-byte widths: entry 0 is the least significant bit.
        let mut b = vec![0u8; 1];
        set_refcount(&mut b, 0, 0, 1);
        assert_eq!(b[0], 1);
    }

    #[test]
    fn lru_evicts_least_recent() {
        let mut c = TableCache::new(512, 2);
        c.insert(0, AlignedBuf::new(512, 512), false);
        c.insert(512, AlignedBuf::new(512, 512), true);
        c.get(0);
        assert_eq!(c.victim(), Some((512, true)));
        assert_eq!(c.dirty(), vec![512]);
    }
}
