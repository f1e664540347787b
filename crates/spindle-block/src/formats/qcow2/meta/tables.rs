//! The header, the L1 table and snapshot L1 walks.

use super::super::cache::{get_be64, put_be64};
use super::{Area, Meta};
use crate::error::{fmt_err, Result};
use crate::storage::Storage;
use spindle_io::{AlignedBuf, SgList};

impl Meta {
    /// Writes the header cluster and makes it durable.
    pub async fn write_header(&mut self, f: &Storage) -> Result<()> {
        let b = self.hdr.serialize().map_err(|m| fmt_err(f.path(), m))?;
        self.write_meta(f, Area::MainHeader, 0, &SgList::copy_of(&b), "header write failed")
            .await?;
        self.sync(f).await?;
        self.header_pending = false;
        Ok(())
    }

    /// Writes L1 entry `i` to disk.
    pub async fn write_l1_entry(&mut self, f: &Storage, i: usize) -> Result<()> {
        let off = self.hdr.l1_table_offset + i as u64 * 8;
        self.write_meta(
            f,
            Area::ActiveL1,
            off,
            &SgList::copy_of(&self.l1[i].to_be_bytes()),
            "L1 table write failed",
        )
        .await
    }

    /// Reads an L1 table (a snapshot's) from disk.
    pub async fn read_l1(&self, f: &Storage, off: u64, entries: u32) -> Result<Vec<u64>> {
        let cs = self.cs() as usize;
        let bytes = (entries as usize * 8).div_ceil(cs).max(1) * cs;
        let buf = self.read_buf(f, off, bytes).await?;
        Ok((0..entries as usize).map(|i| get_be64(&buf, i)).collect())
    }

    /// Replaces the L1 table with one of `entries` entries (resize).
    pub async fn resize_l1(&mut self, f: &Storage, entries: usize) -> Result<()> {
        let cs = self.cs();
        if entries as u64 * 8 > super::super::header::MAX_L1_BYTES {
            return Err(fmt_err(
                f.path(),
                "the L1 table would exceed 32 MiB; use a larger cluster size",
            ));
        }
        self.flush(f).await?;
        let old_off = self.hdr.l1_table_offset;
        let old_clusters = (self.l1.len() as u64 * 8).div_ceil(cs);
        let clusters = (entries as u64 * 8).div_ceil(cs).max(1);
        let new_off = self.alloc_clusters(f, clusters).await?;
        let mut l1 = self.l1.clone();
        l1.resize(entries, 0);
        let mut buf = AlignedBuf::new((clusters * cs) as usize, f.mem_align().max(512));
        for (i, &e) in l1.iter().enumerate() {
            put_be64(&mut buf, i, e);
        }
        self.write_meta(f, Area::ActiveL1, new_off, &SgList::owned(buf), "L1 table write failed")
            .await?;
        self.flush_refcounts(f).await?;
        self.sync(f).await?;
        // The header switches to the new table; until it says so, the old
        // one stays in use (a failure leaks the new clusters at most).
        let (old_hdr_off, old_hdr_size) = (self.hdr.l1_table_offset, self.hdr.l1_size);
        self.hdr.l1_table_offset = new_off;
        self.hdr.l1_size = entries as u32;
        if let Err(e) = self.write_header(f).await {
            self.hdr.l1_table_offset = old_hdr_off;
            self.hdr.l1_size = old_hdr_size;
            return Err(e);
        }
        self.replace_l1(l1);
        if old_off != 0 && old_clusters > 0 {
            for c in old_off / cs..old_off / cs + old_clusters {
                self.release_later(c);
            }
        }
        Ok(())
    }
}
