//! Consistency check and repair, with qemu-img check's semantics.

use super::entry::{L1_RESERVED, L2_RESERVED};
use super::meta::{COMPRESSED, COPIED, OFFSET_MASK};
use super::snapshot;
use super::{compressed_extent, Qcow2};
use crate::error::{doing, Result};
use std::collections::HashMap;

/// Most snapshot L1 bytes a check reads (a hostile table could name the
/// same large L1 65,536 times).
const MAX_SNAPSHOT_L1_TOTAL: u64 = 1 << 30;

/// What to repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckMode {
    /// Only report.
    Report,
    /// Repair leaked clusters.
    Leaks,
    /// Repair leaks and corruptions.
    All,
}

/// The outcome, with qemu-img check's fields.
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    /// Errors found (remaining after repair).
    pub corruptions: u64,
    /// Leaked clusters (remaining after repair).
    pub leaks: u64,
    /// Internal errors while checking.
    pub check_errors: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaks repaired.
    pub leaks_fixed: u64,
    /// End of the image file's used area.
    pub image_end_offset: u64,
    /// Guest clusters.
    pub total_clusters: u64,
    /// Guest clusters allocated in this image.
    pub allocated_clusters: u64,
    /// Allocated clusters not contiguous with their predecessor.
    pub fragmented_clusters: u64,
    /// Compressed clusters.
    pub compressed_clusters: u64,
    /// One line per problem, in qemu-img's wording.
    pub messages: Vec<String>,
}

/// Checks (and with `mode`, repairs) the image's refcounts and flags.
pub async fn check(q: &Qcow2, mode: CheckMode) -> Result<CheckReport> {
    let f = &q.storage;
    let mut r = CheckReport::default();
    let cs = q.cluster_size();
    let mut m = q.lock_meta().await;
    m.flush(f).await.ok();
    // After the flush: it may have written tables past the old end.
    let file_len = f.len().map_err(doing("cannot get size"))?;
    let mut refs: HashMap<u64, u64> = HashMap::new();
    // Counts one reference to every cluster of [off, off+len). References
    // past the end of the file are corruption, not counted, so a hostile
    // offset cannot make the scan below walk billions of clusters.
    let file_clusters = file_len.div_ceil(cs);
    let mut beyond: Vec<u64> = Vec::new();
    let mut inc = |refs: &mut HashMap<u64, u64>, off: u64, len: u64| {
        if len == 0 {
            return;
        }
        let (first, last) = (off / cs, off.saturating_add(len - 1) / cs);
        if last >= file_clusters {
            beyond.push(off);
            return;
        }
        for c in first..=last {
            *refs.entry(c).or_insert(0) += 1;
        }
    };
    inc(&mut refs, 0, cs);
    let hdr = m.hdr.clone();
    inc(
        &mut refs,
        hdr.refcount_table_offset,
        hdr.refcount_table_clusters as u64 * cs,
    );
    // Refcount blocks that cannot be read are reported once; their
    // clusters are not compared below.
    let mut bad_blocks = std::collections::HashSet::new();
    for (i, &e) in m.refcount_table().iter().enumerate() {
        let off = e & !0x1ff;
        let why = if e & 0x1ff != 0 {
            Some("has reserved bits set")
        } else if !off.is_multiple_of(cs) {
            Some("is not cluster aligned; refcount table entry corrupted")
        } else if off >= file_len {
            Some("is outside image")
        } else {
            None
        };
        if let Some(why) = why {
            r.corruptions += 1;
            r.messages.push(format!("ERROR refcount block {i} {why}"));
            bad_blocks.insert(i as u64);
            continue;
        }
        if off != 0 {
            inc(&mut refs, off, cs);
        }
    }
    // Snapshot table and the L1 tables to walk: active first.
    let mut l1s: Vec<(Vec<u64>, bool)> = vec![(m.l1().to_vec(), true)];
    inc(&mut refs, hdr.l1_table_offset, hdr.l1_size as u64 * 8);
    let mut snapshot_l1_bytes = 0u64;
    if hdr.nb_snapshots > 0 {
        let want = (snapshot::MAX_TABLE_BYTES).min(file_len.saturating_sub(hdr.snapshots_offset));
        let mut buf = vec![0u8; want as usize];
        f.read_at(hdr.snapshots_offset, &mut buf)
            .await
            .map_err(doing("snapshot table read failed"))?;
        match snapshot::parse_table(&buf, hdr.nb_snapshots) {
            Ok((snaps, len)) => {
                inc(&mut refs, hdr.snapshots_offset, len);
                for s in snaps {
                    if s.l1_size as u64 * 8 > super::header::MAX_L1_BYTES {
                        r.corruptions += 1;
                        r.messages
                            .push(format!("ERROR snapshot {} has an oversized L1 table", s.id));
                        continue;
                    }
                    if !s.l1_table_offset.is_multiple_of(cs) {
                        r.corruptions += 1;
                        r.messages.push(format!(
                            "ERROR snapshot {} ({}) l1_offset=0x{:x}: L1 table is not cluster aligned; snapshot table entry corrupted",
                            s.id,
                            super::header::printable(&s.name),
                            s.l1_table_offset
                        ));
                        continue;
                    }
                    let bytes = s.l1_size as u64 * 8;
                    if s.l1_table_offset.saturating_add(bytes) > file_len {
                        r.corruptions += 1;
                        r.messages.push(format!(
                            "ERROR snapshot {}: L1 table lies beyond the end of the image file",
                            s.id
                        ));
                        continue;
                    }
                    snapshot_l1_bytes += bytes;
                    if snapshot_l1_bytes > MAX_SNAPSHOT_L1_TOTAL {
                        r.check_errors += 1;
                        r.messages
                            .push("ERROR snapshot L1 tables exceed 1 GiB in total; not checked further".into());
                        break;
                    }
                    inc(&mut refs, s.l1_table_offset, bytes);
                    let mut b = vec![0u8; s.l1_size as usize * 8];
                    f.read_at(s.l1_table_offset, &mut b)
                        .await
                        .map_err(doing("snapshot L1 read failed"))?;
                    let l1: Vec<u64> = b
                        .chunks_exact(8)
                        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or_default()))
                        .collect();
                    l1s.push((l1, false));
                }
            }
            Err(e) => {
                r.check_errors += 1;
                r.messages.push(format!("ERROR snapshot table: {e}"));
            }
        }
    }
    // Walk L2 tables. Remember active entries to verify COPIED flags.
    let mut tables: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut active_entries: Vec<(u64, u64, bool)> = Vec::new(); // (guest cluster, raw, is_l1)
    let l2_bits = hdr.l2_bits();
    let words = if hdr.extended_l2() { 2 } else { 1 };
    let mut last_host;
    let layout = q.layout();
    for (l1, active) in &l1s {
        for (i, &l1e) in l1.iter().enumerate() {
            if l1e == 0 {
                continue;
            }
            if l1e & L1_RESERVED != 0 {
                r.corruptions += 1;
                r.messages
                    .push(format!("ERROR found L1 entry with reserved bits set: {l1e:x}"));
            }
            let l2_off = l1e & OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            if !l2_off.is_multiple_of(cs) || l2_off >= file_len {
                r.corruptions += 1;
                r.messages.push(format!(
                    "ERROR l2_offset={l2_off:x}: Table is not cluster aligned or lies past the end of the file; L1 entry corrupted"
                ));
                continue;
            }
            inc(&mut refs, l2_off, cs);
            if *active {
                active_entries.push((i as u64, l1e, true));
            }
            // QEMU counts a data cluster once per L1 that reaches it, even
            // through an L2 table that several L1s share.
            if let std::collections::hash_map::Entry::Vacant(v) = tables.entry(l2_off) {
                let mut t = vec![0u8; cs as usize];
                f.read_at(l2_off, &mut t).await.map_err(doing("L2 table read failed"))?;
                v.insert(t);
            }
            let t = &tables[&l2_off];
            // QEMU counts fragmentation within each L2 table.
            last_host = 0;
            for j in 0..(1usize << l2_bits) {
                let word = |k: usize| {
                    let o = (j * words + k) * 8;
                    u64::from_be_bytes(t[o..o + 8].try_into().unwrap_or_default())
                };
                let raw = word(0);
                let bmp = if words == 2 { word(1) } else { 0 };
                let gc = ((i as u64) << l2_bits) + j as u64;
                if raw & COMPRESSED == 0 && raw & L2_RESERVED != 0 {
                    r.corruptions += 1;
                    r.messages
                        .push(format!("ERROR found l2 entry with reserved bits set: {raw:x}"));
                }
                if raw & COMPRESSED != 0 {
                    let (off, len) = compressed_extent(raw, hdr.cluster_bits);
                    if raw & COPIED != 0 {
                        r.corruptions += 1;
                        r.messages.push(format!(
                            "ERROR: coffset=0x{off:x}: copied flag must never be set for compressed clusters"
                        ));
                    }
                    if bmp != 0 {
                        r.corruptions += 1;
                        r.messages.push(format!(
                            "ERROR compressed cluster {j} with non-zero subcluster allocation bitmap, entry=0x{raw:x}"
                        ));
                        continue;
                    }
                    inc(&mut refs, off & !511, len + (off & 511));
                    if *active {
                        // Compressed clusters count as fragmented, as in QEMU.
                        r.compressed_clusters += 1;
                        r.allocated_clusters += 1;
                        r.fragmented_clusters += 1;
                    }
                    continue;
                }
                let host = raw & OFFSET_MASK;
                if let Err(why) = layout.decode(raw, bmp) {
                    r.corruptions += 1;
                    if !host.is_multiple_of(cs) {
                        r.messages.push(format!(
                            "ERROR offset={host:x}: Data cluster is not properly aligned; L2 entry corrupted"
                        ));
                        continue;
                    }
                    if host == 0 && layout.ext_l2 {
                        r.messages
                            .push("ERROR: Unallocated cluster has non-zero subcluster allocation map".into());
                        continue;
                    }
                    // A bad bitmap or a v2 zero flag: reads of the cluster
                    // fail. A host cluster it names still counts as used.
                    r.messages.push(format!(
                        "ERROR guest cluster {gc} (offset={host:x}): {why}; L2 entry corrupted"
                    ));
                }
                if host == 0 {
                    continue;
                }
                inc(&mut refs, host, cs);
                if *active {
                    r.allocated_clusters += 1;
                    if last_host != 0 && host != last_host + cs {
                        r.fragmented_clusters += 1;
                    }
                    last_host = host;
                    active_entries.push((gc, raw, false));
                }
            }
        }
    }
    for off in beyond {
        r.corruptions += 1;
        r.messages.push(format!(
            "ERROR offset=0x{off:x}: a table or cluster lies beyond the end of the image file"
        ));
    }
    r.total_clusters = hdr.size.div_ceil(cs);
    // Compare with stored refcounts.
    // Only clusters inside the file are compared (as QEMU does): a hostile
    // refcount can claim a cluster far past the end is in use.
    let max_cluster = refs
        .keys()
        .copied()
        .max()
        .unwrap_or(0)
        .max(m.end_cluster().min(file_clusters).saturating_sub(1));
    let mut end = 0;
    // Only refcount blocks that exist, or that cover referenced clusters,
    // can disagree; everything else is zero on both sides. (A sparse file can
    // be huge while holding little.)
    let rb_bits = m.refcount_block_bits();
    let mut blocks: Vec<u64> = refs.keys().map(|c| c >> rb_bits).collect();
    blocks.extend(
        m.refcount_table()
            .iter()
            .enumerate()
            .filter(|(_, &e)| e & !0x1ff != 0)
            .map(|(i, _)| i as u64)
            .filter(|&b| b <= max_cluster >> rb_bits),
    );
    blocks.sort_unstable();
    blocks.dedup();
    let clusters = blocks
        .iter()
        .flat_map(|&b| (b << rb_bits)..=((b << rb_bits) | ((1 << rb_bits) - 1)).min(max_cluster));
    for c in clusters {
        if bad_blocks.contains(&(c >> rb_bits)) {
            continue;
        }
        let want = refs.get(&c).copied().unwrap_or(0);
        let have = m.refcount(f, c).await?;
        if want > 0 || have > 0 {
            end = c + 1;
        }
        if have == want {
            continue;
        }
        let leak = have > want;
        let fix = match mode {
            CheckMode::All => true,
            CheckMode::Leaks => leak,
            CheckMode::Report => false,
        };
        let word = if leak { "Leaked cluster" } else { "ERROR cluster" };
        let verb = if fix { "Repairing" } else { word };
        r.messages.push(format!("{verb} {c} refcount={have} reference={want}"));
        if fix {
            m.set_refcount(f, c, want).await?;
            if leak {
                r.leaks_fixed += 1
            } else {
                r.corruptions_fixed += 1
            }
        } else if leak {
            r.leaks += 1;
        } else {
            r.corruptions += 1;
        }
    }
    // COPIED flags of the active tables must match refcount == 1.
    for (idx, raw, is_l1) in active_entries {
        let host = raw & OFFSET_MASK;
        if bad_blocks.contains(&((host / cs) >> rb_bits)) {
            continue;
        }
        let rc = m.refcount(f, host / cs).await?;
        let want_copied = rc == 1;
        if (raw & COPIED != 0) == want_copied {
            continue;
        }
        let what = if is_l1 { "L1" } else { "L2" };
        if mode == CheckMode::All {
            r.messages.push(format!(
                "Repairing OFLAG_COPIED {what} cluster: l1_index={idx} refcount={rc}"
            ));
            let fixed = if want_copied { raw | COPIED } else { raw & !COPIED };
            if is_l1 {
                m.set_l1(idx as usize, fixed);
                m.write_l1_entry(f, idx as usize).await?;
            } else {
                let (_, bmp) = m.get_l2(f, idx).await?;
                m.set_l2(f, idx, fixed, bmp).await?;
            }
            r.corruptions_fixed += 1;
        } else {
            r.messages
                .push(format!("ERROR OFLAG_COPIED {what} cluster: index={idx} refcount={rc}"));
            r.corruptions += 1;
        }
    }
    if mode != CheckMode::Report {
        m.flush(f).await?;
        // Consistent again: the dirty and corrupt bits go.
        let stale = super::header::INCOMPAT_DIRTY | super::header::INCOMPAT_CORRUPT;
        if r.corruptions == 0 && r.leaks == 0 && m.hdr.incompatible & stale != 0 {
            m.hdr.incompatible &= !stale;
            m.write_header(f).await?;
        }
    }
    r.image_end_offset = end * cs;
    Ok(r)
}
