//! The qcow2 header and its extensions: parsing with caps, and serialising.

use std::fmt::Write as _;

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Incompatible feature bits.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// The image is corrupt; open read-only.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// External data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// The compression type field is used.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Extended L2 entries (subclusters).
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = 0x1f;
/// Compatible feature: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

/// Header extension types.
pub const EXT_END: u32 = 0;
/// Backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;

/// QEMU's caps on sizes read from an image.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Refcount table cap.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Snapshot count cap.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Backing file name cap.
pub const MAX_BACKING_NAME: u32 = 1023;

/// Compression algorithm of compressed clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Raw deflate.
    Zlib,
    /// zstd frames.
    Zstd,
}

/// A header extension kept verbatim.
#[derive(Debug, Clone)]
pub struct Extension {
    /// Type.
    pub kind: u32,
    /// Payload.
    pub data: Vec<u8>,
}

/// A parsed qcow2 header.
#[derive(Debug, Clone)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2(cluster size).
    pub cluster_bits: u32,
    /// Guest-visible size.
    pub size: u64,
    /// L1 entries.
    pub l1_size: u32,
    /// L1 table offset.
    pub l1_table_offset: u64,
    /// Refcount table offset.
    pub refcount_table_offset: u64,
    /// Refcount table clusters.
    pub refcount_table_clusters: u32,
    /// Snapshots.
    pub nb_snapshots: u32,
    /// Snapshot table offset.
    pub snapshots_offset: u64,
    /// Incompatible features.
    pub incompatible: u64,
    /// Compatible features.
    pub compatible: u64,
    /// Autoclear features.
    pub autoclear: u64,
    /// log2(refcount bits).
    pub refcount_order: u32,
    /// Compression type.
    pub compression: Compression,
    /// Backing file name.
    pub backing_file: Option<String>,
    /// Backing format (extension).
    pub backing_format: Option<String>,
    /// Extensions other than backing format and feature table, kept for rewrites.
    pub other_extensions: Vec<Extension>,
    /// Feature names from the image's table: (type, bit, name).
    pub feature_names: Vec<(u8, u8, String)>,
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(a)
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// Whether L2 entries are 128-bit.
    pub fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTL2 != 0
    }
    /// Bytes per L2 entry.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }
    /// log2(entries per L2 table).
    pub fn l2_bits(&self) -> u32 {
        self.cluster_bits - if self.extended_l2() { 4 } else { 3 }
    }
    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }
    /// L1 entries needed for `size`.
    pub fn l1_entries_for(size: u64, cluster_bits: u32, l2_bits: u32) -> u64 {
        size.div_ceil(1u64 << (cluster_bits + l2_bits))
    }
    /// Bytes of header plus extensions plus backing name, as written.
    pub fn lazy_refcounts(&self) -> bool {
        self.compatible & COMPAT_LAZY_REFCOUNTS != 0
    }

    /// Parses the first cluster (or first `buf.len()` bytes) of an image.
    /// `file_len` bounds table offsets. Errors are one-line messages.
    pub fn parse(buf: &[u8], file_len: u64) -> Result<Header, String> {
        if buf.len() < 72 {
            return Err("file is too short for a qcow2 header".into());
        }
        if be32(buf, 0) != MAGIC {
            return Err("not a qcow2 image (bad magic)".into());
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(format!("unsupported qcow2 version {version}"));
        }
        let cluster_bits = be32(buf, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(format!("cluster_bits {cluster_bits} is outside 9..21"));
        }
        let cs = 1u64 << cluster_bits;
        let crypt = be32(buf, 32);
        if crypt != 0 {
            return Err("encrypted qcow2 images are not supported".into());
        }
        let mut h = Header {
            version,
            cluster_bits,
            // QEMU counts whole sectors: a size that is not a multiple of
            // 512 is rounded down (and written back so).
            size: be64(buf, 24) & !511,
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            compression: Compression::Zlib,
            backing_file: None,
            backing_format: None,
            other_extensions: Vec::new(),
            feature_names: Vec::new(),
        };
        let mut header_len = 72usize;
        if version == 3 {
            if buf.len() < 104 {
                return Err("v3 header is truncated".into());
            }
            h.incompatible = be64(buf, 72);
            h.compatible = be64(buf, 80);
            h.autoclear = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            header_len = be32(buf, 100) as usize;
            if header_len < 104 || !header_len.is_multiple_of(8) || header_len as u64 > cs.min(buf.len() as u64) {
                return Err(format!("invalid header_length {header_len}"));
            }
            if h.refcount_order > 6 {
                return Err(format!("refcount_order {} is above 6", h.refcount_order));
            }
            if header_len > 104 {
                h.compression = match buf[104] {
                    0 => Compression::Zlib,
                    1 => Compression::Zstd,
                    t => return Err(format!("unknown compression type {t}")),
                };
                if h.compression != Compression::Zlib && h.incompatible & INCOMPAT_COMPRESSION == 0 {
                    return Err("compression type set without the compression-type feature bit".into());
                }
            }
        }
        if h.extended_l2() && cluster_bits < 14 {
            return Err("extended L2 entries need clusters of at least 16 KiB".into());
        }
        // Extensions: as QEMU, they end with the end marker, or where the
        // backing file name starts (or the first cluster ends).
        let limit = cs.min(buf.len() as u64) as usize;
        let bo = be64(buf, 8);
        let ext_end = if bo != 0 && bo < limit as u64 {
            bo as usize
        } else {
            limit
        };
        let mut off = header_len;
        while off < ext_end {
            if off + 8 > ext_end {
                return Err("header extensions run past the first cluster".into());
            }
            let kind = be32(buf, off);
            let len = be32(buf, off + 4) as usize;
            off += 8;
            if kind == EXT_END {
                break;
            }
            if len > ext_end - off {
                return Err(format!(
                    "header extension 0x{kind:08x} is longer than the first cluster"
                ));
            }
            let data = &buf[off..off + len];
            match kind {
                EXT_BACKING_FORMAT => h.backing_format = Some(String::from_utf8_lossy(data).into_owned()),
                EXT_FEATURE_TABLE => {
                    for e in data.chunks_exact(48) {
                        let name = String::from_utf8_lossy(&e[2..]).trim_end_matches('\0').to_string();
                        h.feature_names.push((e[0], e[1], name));
                    }
                }
                _ => h.other_extensions.push(Extension {
                    kind,
                    data: data.to_vec(),
                }),
            }
            off += len.div_ceil(8) * 8;
        }
        // Features.
        let unknown = h.incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let mut names = String::new();
            for bit in 0..64 {
                if unknown & (1 << bit) != 0 {
                    let n = h.feature_names.iter().find(|(t, b, _)| *t == 0 && *b == bit as u8);
                    let _ = write!(
                        names,
                        "{}{}",
                        if names.is_empty() { "" } else { ", " },
                        n.map(|n| n.2.clone()).unwrap_or_else(|| format!("bit {bit}"))
                    );
                }
            }
            return Err(format!("unsupported incompatible qcow2 features: {names}"));
        }
        if h.incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err("images with an external data file are not supported".into());
        }
        // Backing file name.
        let bl = be32(buf, 16);
        if bo != 0 {
            if bl > MAX_BACKING_NAME || bo.saturating_add(bl as u64) > limit as u64 {
                return Err("backing file name is too long or lies outside the first cluster".into());
            }
            // As QEMU reads it: a C string, so a NUL ends it, and an empty
            // name means no backing file.
            let raw = &buf[bo as usize..(bo + bl as u64) as usize];
            let name = raw.split(|&b| b == 0).next().unwrap_or_default();
            if !name.is_empty() {
                h.backing_file = Some(String::from_utf8_lossy(name).into_owned());
            }
        }
        // Table sanity, with QEMU's caps.
        let aligned = |o: u64| o.is_multiple_of(cs);
        if h.l1_size as u64 * 8 > MAX_L1_BYTES {
            return Err(format!("L1 table of {} entries exceeds the 32 MiB limit", h.l1_size));
        }
        let need = Header::l1_entries_for(h.size, cluster_bits, h.l2_bits());
        if (h.l1_size as u64) < need {
            return Err(format!(
                "L1 table has {} entries but the virtual size needs {need}",
                h.l1_size
            ));
        }
        if h.l1_size > 0 && (!aligned(h.l1_table_offset) || h.l1_table_offset == 0 || h.l1_table_offset >= file_len) {
            return Err(format!("L1 table offset 0x{:x} is invalid", h.l1_table_offset));
        }
        if h.refcount_table_clusters as u64 * cs > MAX_REFTABLE_BYTES {
            return Err("refcount table exceeds the 8 MiB limit".into());
        }
        if h.refcount_table_clusters == 0 || !aligned(h.refcount_table_offset) || h.refcount_table_offset == 0 {
            return Err(format!(
                "refcount table offset 0x{:x} is invalid",
                h.refcount_table_offset
            ));
        }
        if h.nb_snapshots > MAX_SNAPSHOTS {
            return Err(format!(
                "{} snapshots exceed the limit of {MAX_SNAPSHOTS}",
                h.nb_snapshots
            ));
        }
        if h.nb_snapshots > 0 && (!aligned(h.snapshots_offset) || h.snapshots_offset >= file_len) {
            return Err(format!("snapshot table offset 0x{:x} is invalid", h.snapshots_offset));
        }
        let overlaps = |a: u64, al: u64, b: u64, bl: u64| a < b + bl && b < a + al;
        let l1_bytes = (h.l1_size as u64 * 8).div_ceil(cs) * cs;
        let rt_bytes = h.refcount_table_clusters as u64 * cs;
        if h.l1_size > 0 && overlaps(h.l1_table_offset, l1_bytes, 0, cs)
            || overlaps(h.refcount_table_offset, rt_bytes, 0, cs)
            || (h.l1_size > 0 && overlaps(h.l1_table_offset, l1_bytes, h.refcount_table_offset, rt_bytes))
        {
            return Err("metadata tables overlap each other or the header".into());
        }
        Ok(h)
    }

    /// Serialises header, extensions and backing name into `cluster_size` bytes.
    pub fn serialize(&self) -> Result<Vec<u8>, String> {
        let cs = self.cluster_size() as usize;
        let mut b = vec![0u8; cs];
        let put32 = |b: &mut [u8], o: usize, v: u32| b[o..o + 4].copy_from_slice(&v.to_be_bytes());
        let put64 = |b: &mut [u8], o: usize, v: u64| b[o..o + 8].copy_from_slice(&v.to_be_bytes());
        put32(&mut b, 0, MAGIC);
        put32(&mut b, 4, self.version);
        put32(&mut b, 20, self.cluster_bits);
        put64(&mut b, 24, self.size);
        put32(&mut b, 36, self.l1_size);
        put64(&mut b, 40, self.l1_table_offset);
        put64(&mut b, 48, self.refcount_table_offset);
        put32(&mut b, 56, self.refcount_table_clusters);
        put32(&mut b, 60, self.nb_snapshots);
        put64(&mut b, 64, self.snapshots_offset);
        let mut off = 72;
        if self.version == 3 {
            put64(&mut b, 72, self.incompatible);
            put64(&mut b, 80, self.compatible);
            put64(&mut b, 88, self.autoclear);
            put32(&mut b, 96, self.refcount_order);
            put32(&mut b, 100, 112);
            b[104] = match self.compression {
                Compression::Zlib => 0,
                Compression::Zstd => 1,
            };
            off = 112;
        }
        let mut exts: Vec<(u32, Vec<u8>)> = Vec::new();
        if let Some(f) = &self.backing_format {
            exts.push((EXT_BACKING_FORMAT, f.as_bytes().to_vec()));
        }
        if self.version == 3 {
            exts.push((EXT_FEATURE_TABLE, feature_table()));
        }
        for e in &self.other_extensions {
            exts.push((e.kind, e.data.clone()));
        }
        for (kind, data) in exts {
            let padded = data.len().div_ceil(8) * 8;
            if off + 8 + padded + 8 > cs {
                return Err("header extensions do not fit in the first cluster".into());
            }
            put32(&mut b, off, kind);
            put32(&mut b, off + 4, data.len() as u32);
            b[off + 8..off + 8 + data.len()].copy_from_slice(&data);
            off += 8 + padded;
        }
        off += 8; // end-of-extensions marker (zeroes)
        if let Some(name) = &self.backing_file {
            if name.len() > MAX_BACKING_NAME as usize || off + name.len() > cs {
                return Err("backing file name is too long".into());
            }
            put64(&mut b, 8, off as u64);
            put32(&mut b, 16, name.len() as u32);
            b[off..off + name.len()].copy_from_slice(name.as_bytes());
        }
        Ok(b)
    }
}

/// A name read from an image (backing file, snapshot), safe to print:
/// control characters are escaped, so an image cannot send escape
/// sequences to the terminal.
pub fn printable(name: &str) -> std::borrow::Cow<'_, str> {
    if name.chars().any(char::is_control) {
        name.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect::<String>()
            .into()
    } else {
        name.into()
    }
}

/// The feature name table QEMU writes.
fn feature_table() -> Vec<u8> {
    let feats: [(u8, u8, &str); 7] = [
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
    ];
    let mut v = Vec::new();
    for (t, bit, name) in feats {
        let mut e = [0u8; 48];
        e[0] = t;
        e[1] = bit;
        e[2..2 + name.len()].copy_from_slice(name.as_bytes());
        v.extend_from_slice(&e);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: 3,
            cluster_bits: 16,
            size: 1 << 30,
            l1_size: 2,
            l1_table_offset: 3 << 16,
            refcount_table_offset: 1 << 16,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible: 0,
            compatible: COMPAT_LAZY_REFCOUNTS,
            autoclear: 0,
            refcount_order: 4,
            compression: Compression::Zlib,
            backing_file: Some("base.raw".into()),
            backing_format: Some("raw".into()),
            other_extensions: vec![Extension {
                kind: 0x1234,
                data: vec![1, 2, 3],
            }],
            feature_names: vec![],
        }
    }

    #[test]
    fn round_trips_and_keeps_unknown_extensions() {
        let b = sample().serialize().unwrap();
        let h = Header::parse(&b, 1 << 20).unwrap();
        assert_eq!(h.backing_file.as_deref(), Some("base.raw"));
        assert_eq!(h.backing_format.as_deref(), Some("raw"));
        assert_eq!(h.other_extensions[0].data, vec![1, 2, 3]);
        assert!(h.lazy_refcounts());
        assert_eq!(h.feature_names.len(), 7);
    }

    #[test]
    fn hostile_headers_are_refused_with_a_reason() {
        let good = sample().serialize().unwrap();
        type Mutation = Box<dyn Fn(&mut Vec<u8>)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (
                Box::new(|b| b[20..24].copy_from_slice(&30u32.to_be_bytes())),
                "cluster_bits",
            ),
            (
                Box::new(|b| b[36..40].copy_from_slice(&u32::MAX.to_be_bytes())),
                "32 MiB",
            ),
            (Box::new(|b| b[56..60].copy_from_slice(&1000u32.to_be_bytes())), "8 MiB"),
            (
                Box::new(|b| b[60..64].copy_from_slice(&70000u32.to_be_bytes())),
                "snapshots exceed",
            ),
            (
                Box::new(|b| b[72..80].copy_from_slice(&(1u64 << 40).to_be_bytes())),
                "bit 40",
            ),
            (
                Box::new(|b| b[72..80].copy_from_slice(&INCOMPAT_DATA_FILE.to_be_bytes())),
                "external data file",
            ),
            (
                Box::new(|b| b[32..36].copy_from_slice(&1u32.to_be_bytes())),
                "encrypted",
            ),
            (
                Box::new(|b| b[100..104].copy_from_slice(&0x20000u32.to_be_bytes())),
                "header_length",
            ),
            (
                Box::new(|b| b[40..48].copy_from_slice(&(1u64 << 16).to_be_bytes())),
                "overlap",
            ),
            (
                Box::new(|b| b[24..32].copy_from_slice(&(1u64 << 62).to_be_bytes())),
                "L1 table has",
            ),
            (
                Box::new(|b| {
                    let o = 112 + 8 + 8 + 4;
                    b[o..o + 4].copy_from_slice(&0xfff0u32.to_be_bytes())
                }),
                "longer than",
            ),
        ];
        for (mutate, want) in cases {
            let mut b = good.clone();
            mutate(&mut b);
            let err = Header::parse(&b, 1 << 20).unwrap_err();
            assert!(err.contains(want), "expected '{want}' in '{err}'");
        }
    }
}
