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

// ---- A tolerant parser of an image's metadata (from bytes) ----

/// A metadata range of an image: where a table lives.
#[derive(Debug, Clone)]
pub struct MetaRange {
    /// Host offset.
    pub off: u64,
    /// Length in bytes.
    pub len: u64,
    /// What lives there ("L2 table", "refcount block", ...).
    pub what: &'static str,
}

/// What a field holds, which decides how it is mutated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    /// A plain number (size, count, version).
    Num,
    /// A host offset of a table.
    Offset,
    /// A feature bit mask.
    Flags,
    /// An L1 table entry.
    L1,
    /// A standard L2 entry (bit 62 clear).
    L2,
    /// A compressed L2 entry.
    L2Compressed,
    /// The subcluster bitmap of an extended L2 entry.
    L2Bitmap,
    /// A refcount table entry.
    RefTable,
    /// One refcount value (`bits` wide, sub-byte ones at `shift`).
    Refcount {
        /// Width.
        bits: u32,
        /// Bit position within its byte, for widths below 8.
        shift: u32,
    },
    /// A header extension's type.
    ExtType,
    /// A header extension's length.
    ExtLen,
    /// Bytes of a string (backing name, format, feature name).
    Str,
}

/// A named field of the image, to mutate.
#[derive(Debug, Clone)]
pub struct Field {
    /// Readable name ("header.l1_size", "L2[3] entry 17").
    pub name: String,
    /// Byte offset in the file.
    pub off: usize,
    /// Width in bytes (1, 2, 4, 8; for `Str` the string's length).
    pub width: usize,
    /// Kind.
    pub kind: FieldKind,
    /// The guest offset the field maps, where it maps one.
    pub guest: Option<u64>,
}

/// What the parser found: header facts, metadata ranges and fields.
#[derive(Debug, Clone, Default)]
pub struct Layout {
    /// Cluster size.
    pub cs: u64,
    /// Header version.
    pub version: u32,
    /// Extended L2 entries.
    pub extl2: bool,
    /// Refcount width.
    pub refcount_bits: u32,
    /// Virtual size.
    pub size: u64,
    /// Header length (72 for v2).
    pub header_length: u64,
    /// Where the header extensions end (after the end marker).
    pub ext_end: u64,
    /// Backing file name's offset and length (0 when none).
    pub backing: (u64, u64),
    /// Metadata ranges that the image's tables reference.
    pub meta: Vec<MetaRange>,
    /// Fields to mutate.
    pub fields: Vec<Field>,
}

/// Most entries of any one table the parser walks (hostile sizes).
const MAX_TABLE_ENTRIES: u64 = 1 << 16;

fn rd(b: &[u8], off: u64, n: usize) -> Option<u64> {
    let s = usize::try_from(off).ok()?;
    let e = s.checked_add(n)?;
    let bytes = b.get(s..e)?;
    Some(bytes.iter().fold(0u64, |a, &x| (a << 8) | x as u64))
}

impl Layout {
    fn field(&mut self, name: String, off: u64, width: usize, kind: FieldKind, guest: Option<u64>) {
        self.fields.push(Field {
            name,
            off: off as usize,
            width,
            kind,
            guest,
        });
    }

    fn range(&mut self, off: u64, len: u64, what: &'static str) {
        if len > 0 {
            self.meta.push(MetaRange { off, len, what });
        }
    }

    /// Whether `[off, off + len)` overlaps a metadata range; names it.
    pub fn overlaps(&self, off: u64, len: u64) -> Option<&MetaRange> {
        self.meta
            .iter()
            .find(|m| off < m.off.saturating_add(m.len) && m.off < off.saturating_add(len))
    }
}

/// Parses what it can of a qcow2 image; never panics on garbage (sizes
/// are capped, offsets bounds-checked), so it also describes mutated
/// images. Fields are recorded only for what lies inside `img`.
pub fn layout(img: &[u8]) -> Layout {
    let mut l = Layout::default();
    let g = |off: u64, n: usize| rd(img, off, n);
    let (Some(version), Some(cluster_bits)) = (g(4, 4), g(20, 4)) else {
        return l;
    };
    if !(9..=21).contains(&cluster_bits) {
        return l;
    }
    l.version = version as u32;
    l.cs = 1 << cluster_bits;
    let cs = l.cs;
    l.size = g(24, 8).unwrap_or(0);
    let incompat = g(72, 8).unwrap_or(0);
    l.extl2 = version >= 3 && incompat & 16 != 0;
    let refcount_order = if version >= 3 { g(96, 4).unwrap_or(4) } else { 4 };
    l.refcount_bits = if refcount_order <= 6 { 1 << refcount_order } else { 16 };
    l.header_length = if version >= 3 { g(100, 4).unwrap_or(104) } else { 72 };
    l.range(0, cs, "header");
    let header: &[(&str, u64, usize, FieldKind)] = &[
        ("magic", 0, 4, FieldKind::Num),
        ("version", 4, 4, FieldKind::Num),
        ("backing_file_offset", 8, 8, FieldKind::Offset),
        ("backing_file_size", 16, 4, FieldKind::Num),
        ("cluster_bits", 20, 4, FieldKind::Num),
        ("size", 24, 8, FieldKind::Num),
        ("crypt_method", 32, 4, FieldKind::Num),
        ("l1_size", 36, 4, FieldKind::Num),
        ("l1_table_offset", 40, 8, FieldKind::Offset),
        ("refcount_table_offset", 48, 8, FieldKind::Offset),
        ("refcount_table_clusters", 56, 4, FieldKind::Num),
        ("nb_snapshots", 60, 4, FieldKind::Num),
        ("snapshots_offset", 64, 8, FieldKind::Offset),
        ("incompatible_features", 72, 8, FieldKind::Flags),
        ("compatible_features", 80, 8, FieldKind::Flags),
        ("autoclear_features", 88, 8, FieldKind::Flags),
        ("refcount_order", 96, 4, FieldKind::Num),
        ("header_length", 100, 4, FieldKind::Num),
        ("compression_type", 104, 1, FieldKind::Num),
    ];
    for &(name, off, w, kind) in header {
        if off + w as u64 <= l.header_length.max(72) || (version >= 3 && off < 112) {
            l.field(format!("header.{name}"), off, w, kind, None);
        }
    }
    // Header extensions.
    let mut e = if version >= 3 { l.header_length } else { 72 };
    for i in 0..64 {
        let (Some(t), Some(len)) = (g(e, 4), g(e + 4, 4)) else {
            break;
        };
        l.field(format!("ext[{i}].type ({t:#x})"), e, 4, FieldKind::ExtType, None);
        l.field(format!("ext[{i}].length ({len})"), e + 4, 4, FieldKind::ExtLen, None);
        if t == 0 {
            e += 8;
            break;
        }
        let data = e + 8;
        match t {
            0xe279_2aca => l.field(
                format!("ext[{i}] backing format"),
                data,
                len as usize,
                FieldKind::Str,
                None,
            ),
            0x6803_f857 => {
                for j in 0..(len / 48).min(64) {
                    let f = data + j * 48;
                    l.field(format!("ext[{i}] feature[{j}].type"), f, 1, FieldKind::Num, None);
                    l.field(format!("ext[{i}] feature[{j}].bit"), f + 1, 1, FieldKind::Num, None);
                    l.field(format!("ext[{i}] feature[{j}].name"), f + 2, 46, FieldKind::Str, None);
                }
            }
            _ => {}
        }
        e = data + len.div_ceil(8) * 8;
        if e >= cs {
            break;
        }
    }
    l.ext_end = e;
    let (bo, bs) = (g(8, 8).unwrap_or(0), g(16, 4).unwrap_or(0));
    if bo != 0 && bs != 0 {
        l.backing = (bo, bs);
        l.field("backing file name".into(), bo, bs as usize, FieldKind::Str, None);
    }
    let file_len = img.len() as u64;
    let in_file = |off: u64, len: u64| off != 0 && off.checked_add(len).is_some_and(|end| end <= file_len);
    let l2_bytes = cs;
    let entry_words: u64 = if l.extl2 { 2 } else { 1 };
    let l2_per_table = l2_bytes / (8 * entry_words);
    let mut seen_l2 = std::collections::BTreeSet::new();
    // L1 tables: the active one, then the snapshots'.
    let mut l1s: Vec<(String, u64, u64, bool)> = Vec::new();
    if let (Some(l1_size), Some(l1_off)) = (g(36, 4), g(40, 8)) {
        l1s.push(("L1".into(), l1_off, l1_size.min(MAX_TABLE_ENTRIES), true));
    }
    // Snapshot table.
    let (nb, so) = (g(60, 4).unwrap_or(0).min(1024), g(64, 8).unwrap_or(0));
    let mut p = so;
    for i in 0..nb {
        if !in_file(p, 40) {
            break;
        }
        let start = p;
        l.field(format!("snap[{i}].l1_table_offset"), p, 8, FieldKind::Offset, None);
        l.field(format!("snap[{i}].l1_size"), p + 8, 4, FieldKind::Num, None);
        l.field(format!("snap[{i}].id_str_size"), p + 12, 2, FieldKind::Num, None);
        l.field(format!("snap[{i}].name_size"), p + 14, 2, FieldKind::Num, None);
        l.field(format!("snap[{i}].vm_state_size"), p + 32, 4, FieldKind::Num, None);
        l.field(format!("snap[{i}].extra_data_size"), p + 36, 4, FieldKind::Num, None);
        let extra = g(p + 36, 4).unwrap_or(0);
        if extra >= 8 {
            l.field(
                format!("snap[{i}].vm_state_size_large"),
                p + 40,
                8,
                FieldKind::Num,
                None,
            );
        }
        if extra >= 16 {
            l.field(format!("snap[{i}].disk_size"), p + 48, 8, FieldKind::Num, None);
        }
        let (id, name) = (g(p + 12, 2).unwrap_or(0), g(p + 14, 2).unwrap_or(0));
        l1s.push((
            format!("snap[{i}] L1"),
            g(p, 8).unwrap_or(0),
            g(p + 8, 4).unwrap_or(0).min(MAX_TABLE_ENTRIES),
            false,
        ));
        p += 40 + extra.min(1 << 16);
        l.field(format!("snap[{i}].id"), p, id as usize, FieldKind::Str, None);
        p += id;
        l.field(format!("snap[{i}].name"), p, name as usize, FieldKind::Str, None);
        p += name;
        p = p.div_ceil(8) * 8;
        l.range(start, p - start, "snapshot table");
    }
    for (name, l1_off, l1_size, active) in l1s {
        if !in_file(l1_off, l1_size * 8) {
            continue;
        }
        l.range(
            l1_off,
            l1_size * 8,
            if active { "active L1 table" } else { "snapshot L1 table" },
        );
        for i in 0..l1_size {
            let at = l1_off + i * 8;
            let ent = g(at, 8).unwrap_or(0);
            let guest = i * l2_per_table * cs;
            l.field(format!("{name}[{i}]"), at, 8, FieldKind::L1, Some(guest));
            let l2 = ent & OFFSET_MASK;
            if !in_file(l2, l2_bytes) || !seen_l2.insert(l2) {
                continue;
            }
            l.range(l2, l2_bytes, "L2 table");
            for j in 0..l2_per_table {
                let at = l2 + j * 8 * entry_words;
                let ent = g(at, 8).unwrap_or(0);
                let bitmap = if l.extl2 { g(at + 8, 8).unwrap_or(0) } else { 0 };
                // Record every used entry and a sprinkling of unused ones.
                if ent == 0 && bitmap == 0 && j % 61 != 7 {
                    continue;
                }
                let gc = Some(guest + j * cs);
                let kind = if ent & (1 << 62) != 0 {
                    FieldKind::L2Compressed
                } else {
                    FieldKind::L2
                };
                l.field(format!("{name}[{i}] -> L2@{l2:#x}[{j}]"), at, 8, kind, gc);
                if l.extl2 {
                    l.field(
                        format!("{name}[{i}] -> L2@{l2:#x}[{j}].bitmap"),
                        at + 8,
                        8,
                        FieldKind::L2Bitmap,
                        gc,
                    );
                }
            }
        }
    }
    // Refcount table and blocks.
    let (rt, rtc) = (g(48, 8).unwrap_or(0), g(56, 4).unwrap_or(0));
    let rt_entries = (rtc * cs / 8).min(MAX_TABLE_ENTRIES);
    if in_file(rt, rt_entries * 8) {
        l.range(rt, rtc * cs, "refcount table");
        let per_block = cs * 8 / l.refcount_bits as u64;
        for i in 0..rt_entries {
            let at = rt + i * 8;
            let blk = g(at, 8).unwrap_or(0);
            if blk == 0 && i > 1 {
                continue;
            }
            l.field(format!("refcount_table[{i}]"), at, 8, FieldKind::RefTable, None);
            let blk = blk & !0x1ff;
            if !in_file(blk, cs) {
                continue;
            }
            l.range(blk, cs, "refcount block");
            // Refcounts of the clusters in the file, and a few past it.
            let clusters = (file_len.div_ceil(cs) + 2).saturating_sub(i * per_block).min(per_block);
            for c in 0..clusters {
                let bit = c * l.refcount_bits as u64;
                let (off, shift) = (blk + bit / 8, (bit % 8) as u32);
                let width = (l.refcount_bits as usize / 8).max(1);
                l.field(
                    format!("refcount[{}] (refblock {i})", i * per_block + c),
                    off,
                    width,
                    FieldKind::Refcount {
                        bits: l.refcount_bits,
                        shift,
                    },
                    None,
                );
            }
        }
    }
    l.fields.retain(|f| f.width > 0 && (f.off + f.width) as u64 <= file_len);
    l
}
