//! Structural mutations of a qcow2 image: each names the field it changes
//! and the value it writes, so a failing case reads as a reproducer.

use crate::common::qcow2::{Field, FieldKind, Layout, OFFSET_MASK};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

/// One applied mutation.
pub struct Mutation {
    /// What was done, e.g. "L1[0] -> L2@0x30000[3] := 0x8000000000050200 (unaligned)".
    pub desc: String,
    /// A guest offset the mutation affects, where one is known.
    pub guest: Option<u64>,
}

fn get(img: &[u8], off: usize, w: usize) -> u64 {
    img[off..off + w].iter().fold(0u64, |a, &x| (a << 8) | x as u64)
}

fn put(img: &mut [u8], off: usize, w: usize, v: u64) {
    for i in 0..w {
        img[off + i] = (v >> (8 * (w - 1 - i))) as u8;
    }
}

fn mask(w: usize) -> u64 {
    if w >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * w)) - 1
    }
}

/// A host offset chosen to hurt: unaligned, past the end, onto other
/// metadata, zero.
fn bad_offset(l: &Layout, file_len: u64, v: u64, rng: &mut StdRng) -> (u64, &'static str) {
    let cs = l.cs.max(512);
    let eof = file_len.div_ceil(cs) * cs;
    match rng.gen_range(0..9) {
        0 => (0, "zero"),
        1 => (v.wrapping_add(512), "unaligned by 512"),
        2 => (v.wrapping_add(1), "unaligned by 1"),
        3 => (eof + cs * rng.gen_range(0..4), "past EOF"),
        4 => (1 << rng.gen_range(40..56), "far past EOF"),
        5 => (v.wrapping_sub(cs), "one cluster lower"),
        6 => (v.wrapping_add(cs), "one cluster higher"),
        _ => match l.meta.choose(rng) {
            Some(m) => (m.off, m.what),
            None => (cs, "cluster 1"),
        },
    }
}

fn num_value(v: u64, w: usize, rng: &mut StdRng) -> (u64, &'static str) {
    let m = mask(w);
    match rng.gen_range(0..10) {
        0 => (0, "zero"),
        1 => (1, "one"),
        2 => (m, "all ones"),
        3 => (v.wrapping_add(1) & m, "+1"),
        4 => (v.wrapping_sub(1) & m, "-1"),
        5 => ((v << 1) & m, "doubled"),
        6 => (v ^ (1 << rng.gen_range(0..8 * w as u32)), "one bit flipped"),
        7 => (m >> 1, "signed max"),
        8 => (v.wrapping_add(rng.gen_range(2..64)) & m, "a little more"),
        _ => (rng.gen::<u64>() & m, "random"),
    }
}

/// Changes the entry's offset bits, keeping its flags.
fn with_offset(ent: u64, off: u64) -> u64 {
    (ent & !OFFSET_MASK) | (off & OFFSET_MASK)
}

fn entry_value(f: &Field, v: u64, l: &Layout, file_len: u64, rng: &mut StdRng) -> (u64, String) {
    match rng.gen_range(0..8) {
        0..=2 => {
            let (o, why) = bad_offset(l, file_len, v & OFFSET_MASK, rng);
            // Offsets that the mask would drop stay visible in the reserved bits.
            let ent = if rng.gen_bool(0.2) {
                (v & !OFFSET_MASK) | o
            } else {
                with_offset(v, o)
            };
            (ent, format!("offset {why}"))
        }
        3 => (v ^ (1 << 63), "COPIED flipped".into()),
        4 => {
            let bits: &[u32] = match f.kind {
                FieldKind::L2 => &[1, 2, 8, 56, 61],
                FieldKind::RefTable => &[0, 1, 8, 56, 63],
                _ => &[1, 8, 56, 62],
            };
            let b = *bits.choose(rng).unwrap();
            (v | (1 << b), format!("reserved bit {b} set"))
        }
        5 if f.kind == FieldKind::L2 => {
            let b = *[0u32, 62].choose(rng).unwrap();
            (
                v ^ (1 << b),
                format!("{} flag flipped", if b == 0 { "zero" } else { "compressed" }),
            )
        }
        5 => (v ^ (1 << 62), "bit 62 flipped".into()),
        6 => (0, "cleared".into()),
        _ => (u64::MAX, "all ones".into()),
    }
}

/// A compressed descriptor: host offset in the low `62 - (cluster_bits - 8)`
/// bits, the count of extra 512-byte sectors above.
fn compressed_value(v: u64, l: &Layout, file_len: u64, rng: &mut StdRng) -> (u64, String) {
    let cb = l.cs.trailing_zeros() as u64;
    let off_bits = 62 - (cb - 8);
    let off_mask = (1u64 << off_bits) - 1;
    let flags = v & (3 << 62);
    let sectors = (v & !(3 << 62)) >> off_bits;
    let sec_mask = (1u64 << (cb - 8)) - 1;
    match rng.gen_range(0..5) {
        0 => {
            let (o, why) = bad_offset(l, file_len, v & off_mask, rng);
            (
                flags | (sectors << off_bits) | (o & off_mask),
                format!("compressed offset {why}"),
            )
        }
        1 => (flags | (v & off_mask), "compressed sectors 0".into()),
        2 => (
            flags | (sec_mask << off_bits) | (v & off_mask),
            "compressed sectors max".into(),
        ),
        3 => (v ^ (1 << 63), "COPIED set on compressed".into()),
        _ => (v | 1, "compressed offset +1".into()),
    }
}

fn bitmap_value(v: u64, rng: &mut StdRng) -> (u64, &'static str) {
    match rng.gen_range(0..5) {
        0 => (0, "cleared"),
        1 => (u64::MAX, "alloc and zero all"),
        2 => (0xffff_ffff, "all allocated"),
        3 => (0xffff_ffff_0000_0000, "all zero"),
        _ => (v ^ (1 << rng.gen_range(0..64)), "one bit flipped"),
    }
}

fn str_value(img: &mut [u8], f: &Field, rng: &mut StdRng) -> String {
    let s = &mut img[f.off..f.off + f.width];
    match rng.gen_range(0..4) {
        0 => {
            s.fill(0);
            "zeroed".into()
        }
        1 => {
            let i = rng.gen_range(0..s.len());
            s[i] = rng.gen();
            format!("byte {i} random")
        }
        2 => {
            let i = rng.gen_range(0..s.len());
            s[i] = b'/';
            format!("byte {i} := '/'")
        }
        _ => {
            for (d, c) in s.iter_mut().zip(b"raw\0vmdk".iter().cycle()) {
                *d = *c;
            }
            "overwritten with 'raw\\0vmdk'".into()
        }
    }
}

/// Mutates one field.
pub fn field(img: &mut [u8], f: &Field, l: &Layout, rng: &mut StdRng) -> Mutation {
    let file_len = img.len() as u64;
    let guest = f.guest;
    if f.kind == FieldKind::Str {
        let d = str_value(img, f, rng);
        return Mutation {
            desc: format!("{}: {d}", f.name),
            guest,
        };
    }
    if let FieldKind::Refcount { bits, shift } = f.kind {
        let max = if bits >= 64 { u64::MAX } else { (1u64 << bits) - 1 };
        let old = if bits < 8 {
            (img[f.off] as u64 >> shift) & max
        } else {
            get(img, f.off, f.width)
        };
        let (v, why) = match rng.gen_range(0..5) {
            0 => (0, "zero"),
            1 => (max, "max"),
            2 => (old.wrapping_add(1) & max, "+1"),
            3 => (old.wrapping_sub(1) & max, "-1"),
            _ => (1, "one"),
        };
        if bits < 8 {
            img[f.off] = (img[f.off] & !((max as u8) << shift)) | ((v as u8) << shift);
        } else {
            put(img, f.off, f.width, v);
        }
        return Mutation {
            desc: format!("{} {old} := {v} ({why})", f.name),
            guest,
        };
    }
    let old = get(img, f.off, f.width);
    let (v, why): (u64, String) = match f.kind {
        FieldKind::Offset => {
            let (o, why) = bad_offset(l, file_len, old, rng);
            (o, why.into())
        }
        FieldKind::Flags => {
            let b = *[0u32, 1, 2, 3, 4, 5, 6, 63].choose(rng).unwrap();
            (old ^ (1 << b), format!("bit {b} flipped"))
        }
        FieldKind::L1 | FieldKind::L2 | FieldKind::RefTable => entry_value(f, old, l, file_len, rng),
        FieldKind::L2Compressed => compressed_value(old, l, file_len, rng),
        FieldKind::L2Bitmap => {
            let (v, why) = bitmap_value(old, rng);
            (v, why.into())
        }
        FieldKind::ExtType => {
            let t = *[
                0u32,
                0xe279_2aca,
                0x6803_f857,
                0x2385_2875,
                0x0537_be77,
                0x4441_5441,
                0x1234_5678,
            ]
            .choose(rng)
            .unwrap();
            (t as u64, "another type".into())
        }
        FieldKind::ExtLen => {
            let (v, why) = match rng.gen_range(0..4) {
                0 => (old + 8, "+8"),
                1 => (l.cs, "a cluster"),
                2 => (0xffff_fff0, "huge"),
                _ => num_value(old, 4, rng),
            };
            (v, why.into())
        }
        FieldKind::Num => {
            let (v, why) = num_value(old, f.width, rng);
            (v, why.into())
        }
        FieldKind::Str | FieldKind::Refcount { .. } => unreachable!(),
    };
    let v = v & mask(f.width);
    put(img, f.off, f.width, v);
    Mutation {
        desc: format!("{} {old:#x} := {v:#x} ({why})", f.name),
        guest,
    }
}

/// Mutations that change structure rather than one field.
pub fn structural(img: &mut [u8], l: &Layout, name: &str, rng: &mut StdRng) -> Mutation {
    let entries = |k: FieldKind| l.fields.iter().filter(move |f| f.kind == k).collect::<Vec<_>>();
    match rng.gen_range(0..6) {
        0 => {
            // Two L2 entries name the same data cluster.
            let l2: Vec<_> = entries(FieldKind::L2)
                .into_iter()
                .filter(|f| get(img, f.off, 8) != 0)
                .collect();
            if l2.len() >= 2 {
                let (a, b) = (l2.choose(rng).unwrap(), l2.choose(rng).unwrap());
                let v = get(img, a.off, 8);
                put(img, b.off, 8, v);
                return Mutation {
                    desc: format!("{} := {} ({v:#x}, shared)", b.name, a.name),
                    guest: b.guest,
                };
            }
        }
        1 => {
            // A snapshot's L1 is the active one.
            if let Some(f) = l.fields.iter().find(|f| f.name.ends_with(".l1_table_offset")) {
                let v = get(img, 40, 8);
                put(img, f.off, 8, v);
                return Mutation {
                    desc: format!("{} := active L1 {v:#x}", f.name),
                    guest: None,
                };
            }
        }
        2 => {
            // The backing file is the image itself.
            let (bo, bs) = l.backing;
            if bs as usize >= name.len() {
                img[bo as usize..bo as usize + name.len()].copy_from_slice(name.as_bytes());
                put(img, 16, 4, name.len() as u64);
                return Mutation {
                    desc: format!("backing file name := {name} (itself)"),
                    guest: None,
                };
            }
        }
        3 => {
            // An unknown header extension before the others.
            let at = if l.version >= 3 { l.header_length } else { 72 } as usize;
            let room = l.cs.min(if l.backing.0 != 0 { l.backing.0 } else { l.cs }) as usize;
            let len = *[8usize, 16, 24].choose(rng).unwrap();
            if l.ext_end as usize + 8 + len <= room && room <= img.len() {
                let mut ext = vec![0u8; 8 + len];
                ext[..4].copy_from_slice(&0x7e57_ab1eu32.to_be_bytes());
                ext[4..8].copy_from_slice(&(len as u32).to_be_bytes());
                rng.fill(&mut ext[8..]);
                let tail: Vec<u8> = img[at..l.ext_end as usize].to_vec();
                img[at..at + ext.len()].copy_from_slice(&ext);
                img[at + ext.len()..at + ext.len() + tail.len()].copy_from_slice(&tail);
                return Mutation {
                    desc: format!("unknown header extension of {len} bytes inserted"),
                    guest: None,
                };
            }
        }
        4 => {
            // The refcount table overlaps the active L1 table.
            let v = get(img, 40, 8);
            put(img, 48, 8, v);
            return Mutation {
                desc: format!("refcount_table_offset := l1_table_offset {v:#x}"),
                guest: None,
            };
        }
        _ => {}
    }
    // Two L1 entries share one L2 table.
    let l1: Vec<_> = l
        .fields
        .iter()
        .filter(|f| f.kind == FieldKind::L1 && f.name.starts_with("L1"))
        .collect();
    let (a, b) = (l1[0], l1[l1.len() - 1]);
    let v = get(img, a.off, 8);
    put(img, b.off, 8, v);
    Mutation {
        desc: format!("{} := {} ({v:#x}, shared L2)", b.name, a.name),
        guest: b.guest,
    }
}

/// Offsets worth cutting the file at.
pub fn truncation_points(l: &Layout, len: u64) -> Vec<(u64, String)> {
    let mut v: Vec<(u64, String)> = vec![
        (0, "empty".into()),
        (4, "magic only".into()),
        (71, "inside the v2 header".into()),
        (l.header_length, "header only".into()),
        (l.ext_end, "after the extensions".into()),
        (len - 1, "last byte".into()),
        (len - 512, "last sector".into()),
        (len.saturating_sub(l.cs), "last cluster".into()),
    ];
    for m in &l.meta {
        v.push((m.off, format!("at the {} at {:#x}", m.what, m.off)));
        v.push((m.off + m.len / 2, format!("inside the {} at {:#x}", m.what, m.off)));
    }
    v.retain(|(o, _)| *o < len);
    v.sort();
    v.dedup_by_key(|(o, _)| *o);
    v
}
