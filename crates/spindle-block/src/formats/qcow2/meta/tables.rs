//! The header, the L1 table and snapshot L1 walks.

use super::super::cache::{get_be64, put_be64};
use super::{Meta, COMPRESSED, COPIED, OFFSET_MASK};
use crate::error::{fmt_err, io_err, Result};
use spindle_io::{AlignedBuf, File};

impl Meta {
    /// Writes the header cluster and makes it durable.
    pub async fn write_header(&mut self, f: &File) -> Result<()> {
        let b = self.hdr.serialize().map_err(|m| fmt_err(f.path(), m))?;
        let mut a = AlignedBuf::new(b.len(), f.alignment().mem.max(512));
        a.copy_from_slice(&b);
        f.write_at(0, &a, false)
            .await
            .map_err(io_err(f.path(), "header write failed"))?;
        f.flush().await.map_err(io_err(f.path(), "flush failed"))
    }

    /// Writes L1 entry `i` to disk.
    pub async fn write_l1_entry(&mut self, f: &File, i: usize) -> Result<()> {
        let off = self.hdr.l1_table_offset + i as u64 * 8;
        f.write_at(off, &self.l1[i].to_be_bytes(), false)
            .await
            .map_err(io_err(f.path(), "L1 table write failed"))
    }

    /// Adds `addend` to the refcount of every L2 table and data cluster that
    /// `l1` reaches, and recomputes COPIED flags (set exactly where the
    /// refcount is 1) in those L2 tables and in `l1`. With `addend` 0 it only
    /// recomputes the flags. This is how QEMU counts snapshots: a cluster's
    /// refcount is the number of L1 tables that reach it.
    pub async fn update_snapshot_refcount(&mut self, f: &File, l1: &mut [u64], addend: i64) -> Result<()> {
        let cs = self.cs();
        let w = self.entry_words();
        let per_slice = self.l2.piece_size() / (8 * w);
        let slices = (1usize << self.hdr.l2_bits()) / per_slice;
        for e in l1.iter_mut() {
            let l2_off = *e & OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            self.check_table_offset(f, l2_off, "L2 table")?;
            for s in 0..slices {
                let slice_off = l2_off + (s * self.l2.piece_size()) as u64;
                for j in 0..per_slice {
                    let raw = get_be64(&self.l2_slice(f, slice_off).await?.buf, j * w);
                    let new = if raw & COMPRESSED != 0 {
                        if addend != 0 {
                            let (off, len) = super::super::compressed_extent(raw, self.hdr.cluster_bits);
                            for c in off / cs..=(off + len - 1) / cs {
                                self.update_refcount(f, c, addend).await?;
                            }
                        }
                        raw
                    } else if raw & OFFSET_MASK != 0 {
                        let c = (raw & OFFSET_MASK) / cs;
                        if addend != 0 {
                            self.update_refcount(f, c, addend).await?;
                        }
                        if self.refcount(f, c).await? == 1 {
                            raw | COPIED
                        } else {
                            raw & !COPIED
                        }
                    } else {
                        raw
                    };
                    if new != raw {
                        let e = self.l2_slice(f, slice_off).await?;
                        put_be64(&mut e.buf, j * w, new);
                        e.dirty = true;
                    }
                }
            }
            if addend != 0 {
                self.update_refcount(f, l2_off / cs, addend).await?;
            }
            *e = if self.refcount(f, l2_off / cs).await? == 1 {
                *e | COPIED
            } else {
                *e & !COPIED
            };
        }
        Ok(())
    }

    /// Reads an L1 table (a snapshot's) from disk.
    pub async fn read_l1(&self, f: &File, off: u64, entries: u32) -> Result<Vec<u64>> {
        let cs = self.cs() as usize;
        let bytes = (entries as usize * 8).div_ceil(cs).max(1) * cs;
        let buf = self.read_buf(f, off, bytes).await?;
        Ok((0..entries as usize).map(|i| get_be64(&buf, i)).collect())
    }

    /// Writes the whole active L1 table.
    pub async fn write_l1(&mut self, f: &File) -> Result<()> {
        let cs = self.cs() as usize;
        let bytes = (self.l1.len() * 8).div_ceil(cs).max(1) * cs;
        let mut buf = AlignedBuf::new(bytes, f.alignment().mem.max(512));
        for (i, &e) in self.l1.iter().enumerate() {
            put_be64(&mut buf, i, e);
        }
        f.write_at(self.hdr.l1_table_offset, &buf[..self.l1.len() * 8], false)
            .await
            .map_err(io_err(f.path(), "L1 table write failed"))
    }

    /// Writes `bytes` to newly allocated clusters and returns their offset.
    pub async fn write_new_clusters(&mut self, f: &File, bytes: &[u8]) -> Result<u64> {
        let cs = self.cs();
        let n = (bytes.len() as u64).div_ceil(cs).max(1);
        let off = self.alloc_clusters(f, n).await?;
        let mut buf = AlignedBuf::new((n * cs) as usize, f.alignment().mem.max(512));
        buf[..bytes.len()].copy_from_slice(bytes);
        f.write_at(off, &buf, false)
            .await
            .map_err(io_err(f.path(), "metadata write failed"))?;
        Ok(off)
    }

    /// Replaces the L1 table with one of `entries` entries (resize).
    pub async fn resize_l1(&mut self, f: &File, entries: usize) -> Result<()> {
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
        let mut buf = AlignedBuf::new((clusters * cs) as usize, f.alignment().mem.max(512));
        for (i, &e) in l1.iter().enumerate() {
            put_be64(&mut buf, i, e);
        }
        f.write_at(new_off, &buf, false)
            .await
            .map_err(io_err(f.path(), "L1 table write failed"))?;
        self.flush_refcounts(f).await?;
        f.flush().await.map_err(io_err(f.path(), "flush failed"))?;
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
        self.l1 = l1;
        if old_off != 0 && old_clusters > 0 {
            for c in old_off / cs..old_off / cs + old_clusters {
                self.update_refcount(f, c, -1).await?;
            }
        }
        Ok(())
    }
}
