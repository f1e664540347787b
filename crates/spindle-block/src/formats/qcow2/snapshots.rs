//! Internal snapshots: create, list, apply and delete, compatible with
//! `qemu-img snapshot` and QEMU's savevm/loadvm.
//!
//! Every operation keeps QEMU's order so that a crash leaks at most:
//! refcounts go up (and are durable) before anything new points at the
//! clusters, and go down only after nothing points at them any more.

use super::header::MAX_SNAPSHOTS;
use super::meta::{Meta, COPIED};
use super::snapshot::{self, Snapshot};
use super::Qcow2;
use crate::error::{fmt_err, BlockError, Result};
use std::sync::atomic::Ordering;

/// Longest snapshot name or id accepted.
pub const MAX_NAME: usize = 1024;

impl Qcow2 {
    /// The snapshots in the image, in table order.
    pub async fn snapshot_list(&self) -> Vec<Snapshot> {
        self.meta.lock().await.snapshots.clone()
    }

    /// Where QEMU keeps VM state: the disk size rounded up to what one L1
    /// entry maps.
    pub fn vm_state_offset(&self) -> u64 {
        let l2_entry = if self.ext_l2 { 16 } else { 8 };
        let span = (1u64 << self.cluster_bits) * ((1u64 << self.cluster_bits) / l2_entry);
        self.size().div_ceil(span) * span
    }

    fn find(snaps: &[Snapshot], id_or_name: &str) -> Option<usize> {
        snaps
            .iter()
            .position(|s| s.id == id_or_name)
            .or_else(|| snaps.iter().position(|s| s.name == id_or_name))
    }

    pub(super) fn not_found(&self, id_or_name: &str) -> BlockError {
        fmt_err(self.path(), format!("no snapshot with id or name '{id_or_name}'"))
    }

    /// Takes a snapshot of the disk named `name`. `vm_state_size` bytes of VM
    /// state must already be in the VM state area (see `save_vmstate`); 0
    /// makes a disk-only snapshot.
    pub async fn snapshot_create(&self, name: &str, vm_state_size: u64, vm_clock_nsec: u64) -> Result<Snapshot> {
        self.create_snapshot(name, vm_state_size, vm_clock_nsec, false).await
    }

    /// Creates a snapshot. With `hand_over_vmstate`, the L2 tables that map
    /// the VM state area move from the active L1 to the snapshot instead of
    /// being shared and then dropped: nothing there is walked or counted
    /// twice. They are unlinked from the active L1 before the table commit,
    /// so a crash in between leaks them at most.
    pub(super) async fn create_snapshot(
        &self,
        name: &str,
        vm_state_size: u64,
        vm_clock_nsec: u64,
        hand_over_vmstate: bool,
    ) -> Result<Snapshot> {
        if self.read_only {
            return Err(self.ro_err());
        }
        if name.is_empty() || name.len() > MAX_NAME {
            return Err(fmt_err(
                self.path(),
                format!("snapshot names are 1 to {MAX_NAME} bytes long"),
            ));
        }
        self.repair_if_dirty().await?;
        let f = &self.file;
        let mut m = self.lock_meta_clear_of(0, u64::MAX).await;
        if m.snapshots.len() >= MAX_SNAPSHOTS as usize {
            return Err(fmt_err(
                self.path(),
                format!("the image already has {MAX_SNAPSHOTS} snapshots"),
            ));
        }
        if m.snapshots.iter().any(|s| s.name == name) {
            return Err(fmt_err(
                self.path(),
                format!("a snapshot named '{name}' already exists"),
            ));
        }
        m.flush(f).await?;
        // The snapshot's copy of the L1 table (flags are meaningless there).
        let copy: Vec<u8> = m.l1.iter().flat_map(|e| (e & !COPIED).to_be_bytes()).collect();
        let l1_off = m.write_new_clusters(f, &copy).await?;
        // The VM state area starts at an L1 entry boundary.
        let disk_entries = if hand_over_vmstate {
            ((self.vm_state_offset() >> (self.cluster_bits + m.hdr.l2_bits())) as usize).min(m.l1.len())
        } else {
            m.l1.len()
        };
        if disk_entries < m.l1.len() {
            m.l1[disk_entries..].fill(0);
            m.write_l1(f).await?;
            m.flush(f).await?;
        }
        // Everything the active L1 reaches gains a reference; COPIED goes.
        let mut l1 = m.l1[..disk_entries].to_vec();
        m.update_snapshot_refcount(f, &mut l1, 1).await?;
        m.l1[..disk_entries].copy_from_slice(&l1);
        m.write_l1(f).await?;
        m.flush(f).await?;
        let next_id = m
            .snapshots
            .iter()
            .filter_map(|s| s.id.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let sn = Snapshot {
            l1_table_offset: l1_off,
            l1_size: m.l1.len() as u32,
            id: next_id.to_string(),
            name: name.to_string(),
            date_sec: now.as_secs() as u32,
            date_nsec: now.subsec_nanos(),
            vm_clock_nsec,
            vm_state_size,
            disk_size: Some(m.hdr.size),
            // As QEMU writes them: qemu-img's disk-only snapshots say 0,
            // savevm says -1 (no icount recording).
            icount: Some(if vm_state_size > 0 { u64::MAX } else { 0 }),
            extra_unknown: Vec::new(),
        };
        let mut snaps = m.snapshots.clone();
        snaps.push(sn.clone());
        self.commit_table(&mut m, snaps).await?;
        Ok(sn)
    }

    /// Writes a new snapshot table, switches the header to it (the commit
    /// point), then frees the old one.
    async fn commit_table(&self, m: &mut Meta, snaps: Vec<Snapshot>) -> Result<()> {
        let f = &self.file;
        let table = snapshot::serialize_table(&snaps);
        if table.len() as u64 > snapshot::MAX_TABLE_BYTES {
            return Err(fmt_err(self.path(), "the snapshot table would exceed 64 MiB"));
        }
        let new_off = if snaps.is_empty() {
            0
        } else {
            m.write_new_clusters(f, &table).await?
        };
        m.flush(f).await?;
        let (old_off, old_len) = (m.hdr.snapshots_offset, m.snapshots_table_len);
        m.hdr.snapshots_offset = new_off;
        m.hdr.nb_snapshots = snaps.len() as u32;
        m.write_header(f).await?;
        m.snapshots = snaps;
        m.snapshots_table_len = if new_off == 0 { 0 } else { table.len() as u64 };
        if old_off != 0 && old_len > 0 {
            m.free_clusters(f, old_off, old_len).await?;
        }
        m.flush(f).await
    }

    /// Checks that the image may change, then locks its metadata with no
    /// write in flight and finds snapshot `id_or_name` (by id, then name).
    async fn begin(&self, id_or_name: &str) -> Result<(futures::lock::MutexGuard<'_, Meta>, usize)> {
        if self.read_only {
            return Err(self.ro_err());
        }
        self.repair_if_dirty().await?;
        let m = self.lock_meta_clear_of(0, u64::MAX).await;
        match Self::find(&m.snapshots, id_or_name) {
            Some(i) => Ok((m, i)),
            None => Err(self.not_found(id_or_name)),
        }
    }

    /// Recomputes the COPIED flags of the active L1 and the L2 tables it
    /// reaches, after references changed, and writes the L1 back.
    async fn refresh_active_flags(&self, m: &mut Meta) -> Result<()> {
        let mut cur = m.l1.clone();
        m.update_snapshot_refcount(&self.file, &mut cur, 0).await?;
        m.l1 = cur;
        m.write_l1(&self.file).await
    }

    /// Reverts the disk to a snapshot (qemu-img snapshot -a).
    pub async fn snapshot_apply(&self, id_or_name: &str) -> Result<()> {
        let (mut m, i) = self.begin(id_or_name).await?;
        let f = &self.file;
        let sn = m.snapshots[i].clone();
        m.flush(f).await?;
        let sn_l1 = m.read_l1(f, sn.l1_table_offset, sn.l1_size).await?;
        if sn_l1.len() > m.l1.len() {
            m.resize_l1(f, sn_l1.len()).await?;
        }
        // The snapshot's clusters gain the active L1's reference first...
        let mut new_l1 = sn_l1;
        new_l1.resize(m.l1.len(), 0);
        m.update_snapshot_refcount(f, &mut new_l1, 1).await?;
        m.flush(f).await?;
        let mut old = std::mem::replace(&mut m.l1, new_l1);
        m.write_l1(f).await?;
        f.flush()
            .await
            .map_err(crate::error::io_err(self.path(), "flush failed"))?;
        // ...and the old active clusters lose it once nothing points at them.
        m.update_snapshot_refcount(f, &mut old, -1).await?;
        self.refresh_active_flags(&mut m).await?;
        if let Some(size) = sn.disk_size {
            if size != m.hdr.size {
                m.hdr.size = size;
                m.write_header(f).await?;
                self.size.store(size, Ordering::Relaxed);
            }
        }
        m.flush(f).await
    }

    /// Deletes a snapshot and frees what only it used.
    pub async fn snapshot_delete(&self, id_or_name: &str) -> Result<()> {
        let (mut m, i) = self.begin(id_or_name).await?;
        let f = &self.file;
        m.flush(f).await?;
        let mut snaps = m.snapshots.clone();
        let sn = snaps.remove(i);
        self.commit_table(&mut m, snaps).await?;
        let mut sn_l1 = m.read_l1(f, sn.l1_table_offset, sn.l1_size).await?;
        m.update_snapshot_refcount(f, &mut sn_l1, -1).await?;
        m.free_clusters(f, sn.l1_table_offset, sn.l1_size as u64 * 8).await?;
        self.refresh_active_flags(&mut m).await?;
        m.flush(f).await
    }
}
