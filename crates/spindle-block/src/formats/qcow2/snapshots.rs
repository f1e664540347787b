//! Internal snapshots: create, list, apply and delete, compatible with
//! `qemu-img snapshot` and QEMU's savevm/loadvm.
//!
//! Each operation builds its new state beside the old one and switches to
//! it with one header write (meta/txn.rs), so a crash at any point leaves
//! either the old image or the new one, both consistent.

use super::header::{printable, MAX_SNAPSHOTS};
use super::meta::{Meta, OFFSET_MASK};
use super::snapshot::Snapshot;
use super::Qcow2;
use crate::error::{corrupt, fmt_err, BlockError, Result};
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
    /// being shared: nothing there is walked or counted twice.
    ///
    /// The active L1 table becomes the snapshot's as it is; the new active
    /// L1 reaches the same clusters, each now with one more reference
    /// (meta/txn.rs: all of it takes effect with one header write).
    pub(super) async fn create_snapshot(
        &self,
        name: &str,
        vm_state_size: u64,
        vm_clock_nsec: u64,
        hand_over_vmstate: bool,
    ) -> Result<Snapshot> {
        let r = self
            .create_snapshot_inner(name, vm_state_size, vm_clock_nsec, hand_over_vmstate)
            .await;
        self.guard(r).await
    }

    async fn create_snapshot_inner(
        &self,
        name: &str,
        vm_state_size: u64,
        vm_clock_nsec: u64,
        hand_over_vmstate: bool,
    ) -> Result<Snapshot> {
        self.check_writable()?;
        if name.is_empty() || name.len() > MAX_NAME {
            return Err(fmt_err(
                self.path(),
                format!("snapshot names are 1 to {MAX_NAME} bytes long"),
            ));
        }
        self.repair_if_dirty().await?;
        let f = &self.storage;
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
        let mut sw = m.begin_switch(f).await?;
        let old_l1 = m.l1().to_vec();
        // The VM state area starts at an L1 entry boundary; its tables stay
        // with the snapshot alone.
        let disk_entries = if hand_over_vmstate {
            ((self.vm_state_offset() >> (self.cluster_bits + m.hdr.l2_bits())) as usize).min(old_l1.len())
        } else {
            old_l1.len()
        };
        // The new active L1 is a second L1 reaching the disk's tables.
        m.sh_reference_l1(f, &mut sw.shadow, &old_l1[..disk_entries], 1).await?;
        sw.l1 = vec![0; old_l1.len()];
        for (i, &e) in old_l1[..disk_entries].iter().enumerate() {
            if e & OFFSET_MASK != 0 {
                m.sh_activate(f, &mut sw, i, e & OFFSET_MASK).await?;
            }
        }
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
            l1_table_offset: m.hdr.l1_table_offset,
            l1_size: old_l1.len() as u32,
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
        sw.snapshots = Some(snaps);
        m.commit_switch(f, sw, true).await?;
        Ok(sn)
    }

    /// Checks that the image may change, then locks its metadata with no
    /// write in flight and finds snapshot `id_or_name` (by id, then name),
    /// whose L1 table must be valid.
    async fn begin(&self, id_or_name: &str) -> Result<(futures::lock::MutexGuard<'_, Meta>, usize)> {
        self.check_writable()?;
        self.repair_if_dirty().await?;
        let m = self.lock_meta_clear_of(0, u64::MAX).await;
        let i = Self::find(&m.snapshots, id_or_name).ok_or_else(|| self.not_found(id_or_name))?;
        self.check_snapshot_l1(&m.snapshots[i])?;
        Ok((m, i))
    }

    /// Refuses a snapshot whose L1 table cannot be used (QEMU opens such
    /// an image and fails only operations on that snapshot).
    pub(super) fn check_snapshot_l1(&self, sn: &Snapshot) -> Result<()> {
        let cs = self.cluster_size();
        if sn.l1_size > 0 && (sn.l1_table_offset == 0 || !sn.l1_table_offset.is_multiple_of(cs)) {
            return Err(corrupt(
                self.path(),
                format!(
                    "snapshot {} ({}) has an invalid L1 table offset 0x{:x}",
                    sn.id,
                    printable(&sn.name),
                    sn.l1_table_offset
                ),
            ));
        }
        Ok(())
    }

    /// Reverts the disk to a snapshot (qemu-img snapshot -a).
    pub async fn snapshot_apply(&self, id_or_name: &str) -> Result<()> {
        let r = self.snapshot_apply_inner(id_or_name).await;
        self.guard(r).await
    }

    async fn snapshot_apply_inner(&self, id_or_name: &str) -> Result<()> {
        let (mut m, i) = self.begin(id_or_name).await?;
        let f = &self.storage;
        let sn = m.snapshots[i].clone();
        let mut sw = m.begin_switch(f).await?;
        let sn_l1 = m.read_l1(f, sn.l1_table_offset, sn.l1_size).await?;
        let old_l1 = m.l1().to_vec();
        // The active L1 reaches the snapshot's tables instead of its own.
        m.sh_reference_l1(f, &mut sw.shadow, &sn_l1, 1).await?;
        m.sh_reference_l1(f, &mut sw.shadow, &old_l1, -1).await?;
        sw.l1 = vec![0; old_l1.len().max(sn_l1.len())];
        for (i, &e) in sn_l1.iter().enumerate() {
            if e & OFFSET_MASK != 0 {
                m.sh_activate(f, &mut sw, i, e & OFFSET_MASK).await?;
            }
        }
        sw.size = sn.disk_size.unwrap_or(m.hdr.size);
        m.commit_switch(f, sw, false).await?;
        self.size.store(m.hdr.size, Ordering::Relaxed);
        Ok(())
    }

    /// Serves snapshot `id_or_name` in place of the active disk (`spindle
    /// nbd -l`, as `qemu-nbd -l`): its L1 table becomes the one reads go
    /// through, and its disk size the image's. Only on an image opened
    /// read-only; nothing is written, and the file stays as it is.
    pub async fn view_snapshot(&self, id_or_name: &str) -> Result<()> {
        if !self.read_only {
            return Err(fmt_err(
                self.path(),
                "a snapshot is served only from an image opened read-only",
            ));
        }
        let mut m = self.lock_meta_clear_of(0, u64::MAX).await;
        let i = Self::find(&m.snapshots, id_or_name).ok_or_else(|| self.not_found(id_or_name))?;
        let sn = m.snapshots[i].clone();
        self.check_snapshot_l1(&sn)?;
        let l1 = m.read_l1(&self.storage, sn.l1_table_offset, sn.l1_size).await?;
        m.replace_l1(l1);
        let size = sn.disk_size.unwrap_or(m.hdr.size);
        m.hdr.size = size;
        self.size.store(size, Ordering::Relaxed);
        Ok(())
    }

    /// Deletes a snapshot and frees what only it used.
    pub async fn snapshot_delete(&self, id_or_name: &str) -> Result<()> {
        let r = self.snapshot_delete_inner(id_or_name).await;
        self.guard(r).await
    }

    async fn snapshot_delete_inner(&self, id_or_name: &str) -> Result<()> {
        let (mut m, i) = self.begin(id_or_name).await?;
        let f = &self.storage;
        let mut sw = m.begin_switch(f).await?;
        let mut snaps = m.snapshots.clone();
        let sn = snaps.remove(i);
        let sn_l1 = m.read_l1(f, sn.l1_table_offset, sn.l1_size).await?;
        m.sh_reference_l1(f, &mut sw.shadow, &sn_l1, -1).await?;
        if sn.l1_size > 0 {
            m.sh_add_range(f, &mut sw.shadow, sn.l1_table_offset, sn.l1_size as u64 * 8, -1)
                .await?;
        }
        // Clusters the snapshot shared may belong to the active L1 alone
        // now: its tables get COPIED where that holds.
        let old_l1 = m.l1().to_vec();
        sw.l1 = vec![0; old_l1.len()];
        for (i, &e) in old_l1.iter().enumerate() {
            if e & OFFSET_MASK != 0 {
                m.sh_activate(f, &mut sw, i, e & OFFSET_MASK).await?;
            }
        }
        sw.snapshots = Some(snaps);
        m.commit_switch(f, sw, false).await
    }
}
