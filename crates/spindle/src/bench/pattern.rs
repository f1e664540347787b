//! Verifiable block contents: every 8-byte word depends on the block
//! number, the write generation and the word's position, so a block that
//! landed at the wrong offset, a stale block and a torn block all differ.

fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn word(seed: u64, i: usize) -> u64 {
    seed ^ (i as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93)
}

/// Fills `buf` with the pattern of `block` at generation `gen`.
pub fn fill(buf: &mut [u8], block: u64, gen: u32) {
    let seed = mix(block << 24 ^ u64::from(gen));
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&word(seed, i).to_le_bytes());
    }
}

/// Whether `buf` holds the pattern of `block` at generation `gen`.
pub fn check(buf: &[u8], block: u64, gen: u32) -> bool {
    let seed = mix(block << 24 ^ u64::from(gen));
    buf.chunks_exact(8)
        .enumerate()
        .all(|(i, w)| w == word(seed, i).to_le_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_differ_by_block_and_generation() {
        let mut a = vec![0u8; 4096];
        fill(&mut a, 7, 1);
        assert!(check(&a, 7, 1));
        assert!(!check(&a, 8, 1));
        assert!(!check(&a, 7, 2));
        a[4000] ^= 1;
        assert!(!check(&a, 7, 1));
    }
}
