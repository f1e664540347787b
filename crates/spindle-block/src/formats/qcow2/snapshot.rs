//! The internal snapshot table (read side; used by check and info).

use super::header::MAX_SNAPSHOTS;

/// QEMU's cap on extra data per snapshot entry.
pub const MAX_EXTRA_DATA: u32 = 1024;
/// QEMU's cap on the whole table.
pub const MAX_TABLE_BYTES: u64 = 64 << 20;

/// One snapshot table entry.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Offset of the snapshot's L1 copy.
    pub l1_table_offset: u64,
    /// Entries of that L1.
    pub l1_size: u32,
    /// ID string.
    pub id: String,
    /// Name.
    pub name: String,
    /// Creation time, seconds.
    pub date_sec: u32,
    /// Creation time, nanoseconds.
    pub date_nsec: u32,
    /// Guest clock, nanoseconds.
    pub vm_clock_nsec: u64,
    /// VM state size in bytes.
    pub vm_state_size: u64,
    /// Disk size when taken, if recorded.
    pub disk_size: Option<u64>,
    /// icount, if recorded (-1 = off).
    pub icount: Option<u64>,
    /// Extra data past the fields Spindle knows, kept for rewrites.
    pub extra_unknown: Vec<u8>,
}

fn be16(b: &[u8], o: usize) -> usize {
    u16::from_be_bytes([b[o], b[o + 1]]) as usize
}
fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(a)
}

/// Parses `count` entries from `buf` (the table, up to [`MAX_TABLE_BYTES`]).
/// Returns the entries and the table's length in bytes.
pub fn parse_table(buf: &[u8], count: u32) -> Result<(Vec<Snapshot>, u64), String> {
    if count > MAX_SNAPSHOTS {
        return Err(format!("{count} snapshots exceed the limit of {MAX_SNAPSHOTS}"));
    }
    let mut out = Vec::with_capacity(count as usize);
    let mut off = 0usize;
    let short = || "snapshot table is truncated or exceeds 64 MiB".to_string();
    for _ in 0..count {
        if off + 40 > buf.len() {
            return Err(short());
        }
        let extra = be32(buf, off + 36);
        if extra > MAX_EXTRA_DATA {
            return Err(format!("snapshot extra data of {extra} bytes exceeds {MAX_EXTRA_DATA}"));
        }
        let (id_len, name_len) = (be16(buf, off + 12), be16(buf, off + 14));
        let end = off + 40 + extra as usize + id_len + name_len;
        if end > buf.len() {
            return Err(short());
        }
        let e = &buf[off..end];
        let mut s = Snapshot {
            l1_table_offset: be64(e, 0),
            l1_size: be32(e, 8),
            date_sec: be32(e, 16),
            date_nsec: be32(e, 20),
            vm_clock_nsec: be64(e, 24),
            vm_state_size: be32(e, 32) as u64,
            ..Default::default()
        };
        let x = &e[40..40 + extra as usize];
        if x.len() >= 8 {
            s.vm_state_size = be64(x, 0);
        }
        if x.len() >= 16 {
            s.disk_size = Some(be64(x, 8));
        }
        if x.len() >= 24 {
            s.icount = Some(be64(x, 16));
            s.extra_unknown = x[24..].to_vec();
        }
        let names = &e[40 + extra as usize..];
        s.id = String::from_utf8_lossy(&names[..id_len]).into_owned();
        s.name = String::from_utf8_lossy(&names[id_len..]).into_owned();
        out.push(s);
        off = end.div_ceil(8) * 8;
    }
    Ok((out, off as u64))
}

/// Encodes the table as QEMU writes it: 24 bytes of extra data (VM state
/// size, disk size, icount) plus whatever unknown extra data an entry had.
pub fn serialize_table(snaps: &[Snapshot]) -> Vec<u8> {
    let mut out = Vec::new();
    for s in snaps {
        let start = out.len();
        out.extend_from_slice(&s.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&s.l1_size.to_be_bytes());
        out.extend_from_slice(&(s.id.len() as u16).to_be_bytes());
        out.extend_from_slice(&(s.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&s.date_sec.to_be_bytes());
        out.extend_from_slice(&s.date_nsec.to_be_bytes());
        out.extend_from_slice(&s.vm_clock_nsec.to_be_bytes());
        // A VM state too large for the old field reads as "disk only" to old readers.
        let legacy = if s.vm_state_size <= u32::MAX as u64 {
            s.vm_state_size as u32
        } else {
            0
        };
        out.extend_from_slice(&legacy.to_be_bytes());
        out.extend_from_slice(&((24 + s.extra_unknown.len()) as u32).to_be_bytes());
        out.extend_from_slice(&s.vm_state_size.to_be_bytes());
        out.extend_from_slice(&s.disk_size.unwrap_or(0).to_be_bytes());
        out.extend_from_slice(&s.icount.unwrap_or(u64::MAX).to_be_bytes());
        out.extend_from_slice(&s.extra_unknown);
        out.extend_from_slice(s.id.as_bytes());
        out.extend_from_slice(s.name.as_bytes());
        let len = out.len() - start;
        out.resize(start + len.div_ceil(8) * 8, 0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_round_trips_and_keeps_unknown_extra_data() {
        let snaps = vec![
            Snapshot {
                l1_table_offset: 0x30000,
                l1_size: 2,
                id: "1".into(),
                name: "first".into(),
                vm_state_size: 5 << 32,
                disk_size: Some(1 << 30),
                icount: Some(u64::MAX),
                ..Default::default()
            },
            Snapshot {
                l1_table_offset: 0x50000,
                l1_size: 2,
                id: "2".into(),
                name: "x".into(),
                extra_unknown: vec![9; 16],
                disk_size: Some(1 << 30),
                icount: Some(7),
                ..Default::default()
            },
        ];
        let b = serialize_table(&snaps);
        let (back, len) = parse_table(&b, 2).unwrap();
        assert_eq!(len as usize, b.len());
        assert_eq!(back[0].vm_state_size, 5 << 32);
        assert_eq!(back[0].name, "first");
        assert_eq!(back[1].extra_unknown, vec![9; 16]);
        assert_eq!(back[1].icount, Some(7));
        // Hostile: extra data over the cap, truncated tables.
        let mut bad = b.clone();
        bad[36..40].copy_from_slice(&5000u32.to_be_bytes());
        assert!(parse_table(&bad, 2).unwrap_err().contains("extra data"));
        assert!(parse_table(&b[..50], 2).is_err());
        assert!(parse_table(&b, 70000).is_err());
    }
}
