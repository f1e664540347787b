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
        }
        let names = &e[40 + extra as usize..];
        s.id = String::from_utf8_lossy(&names[..id_len]).into_owned();
        s.name = String::from_utf8_lossy(&names[id_len..]).into_owned();
        out.push(s);
        off = end.div_ceil(8) * 8;
    }
    Ok((out, off as u64))
}
