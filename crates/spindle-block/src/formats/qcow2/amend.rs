//! Changing an existing image: backing file, compat level, lazy refcounts,
//! emptying (for commit).

use super::header::{Compression, COMPAT_LAZY_REFCOUNTS, INCOMPAT_DIRTY};
use super::meta::ZERO;
use super::{check, Qcow2};
use crate::error::{doing, fmt_err, Result};
use crate::fault;

impl Qcow2 {
    /// Points the image at another backing file (or none). Only the header
    /// changes; callers that need the data preserved copy it first (safe rebase).
    pub async fn set_backing(&self, name: Option<String>, format: Option<String>) -> Result<()> {
        let r = self.set_backing_inner(name, format).await;
        self.guard(r).await
    }

    async fn set_backing_inner(&self, name: Option<String>, format: Option<String>) -> Result<()> {
        self.check_writable()?;
        let mut m = self.lock_meta().await;
        m.flush(&self.storage).await?;
        m.hdr.backing_file = name;
        m.hdr.backing_format = format;
        m.write_header(&self.storage).await
    }

    /// Turns lazy refcounts on or off (v3 only).
    pub async fn set_lazy_refcounts(&self, on: bool) -> Result<()> {
        let r = self.set_lazy_refcounts_inner(on).await;
        self.guard(r).await
    }

    async fn set_lazy_refcounts_inner(&self, on: bool) -> Result<()> {
        self.check_writable()?;
        self.repair_if_dirty().await?;
        let mut m = self.lock_meta().await;
        if on && m.hdr.version < 3 {
            return Err(fmt_err(self.path(), "lazy refcounts need compat=1.1"));
        }
        m.flush(&self.storage).await?;
        if on {
            m.hdr.compatible |= COMPAT_LAZY_REFCOUNTS;
        } else {
            m.hdr.compatible &= !COMPAT_LAZY_REFCOUNTS;
            m.hdr.incompatible &= !INCOMPAT_DIRTY;
        }
        m.write_header(&self.storage).await
    }

    /// Changes the compat level: 2 (0.10) or 3 (1.1). Downgrading needs
    /// 16-bit refcounts, no extended L2, zlib, and no snapshots; zero
    /// clusters are turned into what v2 can express.
    pub async fn set_version(&self, version: u32) -> Result<()> {
        let r = self.set_version_inner(version).await;
        self.guard(r).await
    }

    async fn set_version_inner(&self, version: u32) -> Result<()> {
        self.check_writable()?;
        self.repair_if_dirty().await?;
        let cur = self.lock_meta().await.hdr.version;
        if cur == version {
            return Ok(());
        }
        if version == 3 {
            let mut m = self.lock_meta().await;
            m.flush(&self.storage).await?;
            m.hdr.version = 3;
            return m.write_header(&self.storage).await;
        }
        {
            let m = self.lock_meta().await;
            let h = &m.hdr;
            let why = if h.refcount_order != 4 {
                Some("refcount_bits other than 16")
            } else if h.extended_l2() {
                Some("extended L2 entries")
            } else if h.compression != Compression::Zlib {
                Some("zstd compression")
            } else if h.nb_snapshots > 0 {
                Some("internal snapshots")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(fmt_err(
                    self.path(),
                    format!("cannot downgrade to compat=0.10 with {why}"),
                ));
            }
        }
        // v2 has no zero flag: clusters that must read as zeroes get real zeroes.
        let cs = self.cluster_size();
        let clusters = self.size().div_ceil(cs);
        let mut zero_clusters = Vec::new();
        {
            let mut m = self.lock_meta().await;
            for gc in 0..clusters {
                let (raw, bmp) = m.get_l2(&self.storage, gc).await?;
                let e = self.entry_at(gc * cs, raw, bmp)?;
                if e.zero != 0 {
                    zero_clusters.push((gc, raw, e.host));
                }
            }
        }
        for (gc, raw, host) in zero_clusters {
            let mut m = self.lock_meta().await;
            if self.backing.is_none() {
                // Unallocated reads as zeroes without a backing file.
                m.set_l2(&self.storage, gc, 0, 0).await?;
                m.release_entry(&self.storage, raw).await?;
                continue;
            }
            if host != 0 {
                m.check_overlap(&self.storage, host, cs, None)?;
                drop(m);
                fault::check(self.faults.as_deref(), fault::Kind::Data)
                    .map_err(crate::error::io_err(self.path(), "write failed"))?;
                self.storage
                    .write_zeroes(host, cs, false)
                    .await
                    .map_err(doing("write failed"))?;
                let mut m = self.lock_meta().await;
                m.set_l2(&self.storage, gc, raw & !ZERO, 0).await?;
            } else {
                // Clear the flag first so the write allocates a fresh cluster.
                m.set_l2(&self.storage, gc, 0, 0).await?;
                drop(m);
                let z = crate::SgList::zeroed(cs.min(self.size() - gc * cs) as usize);
                self.write(gc * cs, &z, false).await?;
            }
        }
        let mut m = self.lock_meta().await;
        m.flush(&self.storage).await?;
        m.hdr.version = 2;
        m.hdr.incompatible = 0;
        m.hdr.compatible = 0;
        m.hdr.autoclear = 0;
        m.write_header(&self.storage).await
    }

    /// Drops every cluster of the active L1 so the whole disk reads from the
    /// backing file again (QEMU's make_empty, used after commit).
    pub async fn make_empty(&self) -> Result<()> {
        let r = self.make_empty_inner().await;
        self.guard(r).await
    }

    async fn make_empty_inner(&self) -> Result<()> {
        self.check_writable()?;
        self.repair_if_dirty().await?;
        let cs = self.cluster_size();
        let mut m = self.lock_meta().await;
        self.mark_dirty(&mut m).await?;
        for gc in 0..self.size().div_ceil(cs) {
            let (raw, _) = m.get_l2(&self.storage, gc).await?;
            if raw != 0 {
                m.set_l2(&self.storage, gc, 0, 0).await?;
                m.release_entry(&self.storage, raw).await?;
            }
        }
        m.flush(&self.storage).await
    }

    /// Consistency check and repair (see [`check::check`]).
    pub async fn check(&self, mode: check::CheckMode) -> Result<check::CheckReport> {
        check::check(self, mode).await
    }
}
